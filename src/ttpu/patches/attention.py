"""Attention modules that compute their scores themselves instead of calling
transformers' ``AttentionInterface``.

- GPT-Neo slices its causal (and local-window) mask buffer at the last rows of the keys
  it attends to: right for transformers' dynamic cache, whose keys end at the newest
  token, but a fixed-length cache always holds its full length, so every step would read
  the last row (no window). Here the rows are those of the queries' positions in the cache.
- Under an attention implementation registered without a mask function (ttpu's paged
  attention, which finds each token's keys by its position itself), GPT-Neo, Falcon
  (rotary; ALiBi stays stock) and GPT-NeoX-Japanese hand their queries, keys and values
  to that function instead, with their own scaling and GPT-Neo's local window.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ttpu.patches.registry import forward_patch, register

GPT_NEO_ATTENTION = "transformers.models.gpt_neo.modeling_gpt_neo.GPTNeoSelfAttention"
FALCON_ATTENTION = "transformers.models.falcon.modeling_falcon.FalconAttention"
GPT_NEOX_JAPANESE_ATTENTION = "transformers.models.gpt_neox_japanese.modeling_gpt_neox_japanese.GPTNeoXJapaneseAttention"


def maskless_attention(config: Any) -> Callable[..., tuple[torch.Tensor, Any]] | None:
    """The attention function ``config`` names if it was registered without a mask
    function (it masks by the tokens' positions itself), else None."""
    name = config._attn_implementation
    if name in ALL_ATTENTION_FUNCTIONS and name not in ALL_MASK_ATTENTION_FUNCTIONS:
        return ALL_ATTENTION_FUNCTIONS[name]
    return None


def gpt_neo_attention_at_cache_positions(
    self: torch.nn.Module,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    layer_past: Any | None = None,
    use_cache: bool = False,
    output_attentions: bool = False,
    **kwargs: object,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``GPTNeoSelfAttention.forward`` with the mask rows taken at the cache positions the
    queries are written to (``layer_past.get_seq_length`` onwards); under a maskless
    attention function, that function (unscaled scores, the local layers' window)."""
    query, key, value = (
        self._split_heads(projection(hidden_states), self.num_heads, self.head_dim)
        for projection in (self.q_proj, self.k_proj, self.v_proj)
    )
    attend = maskless_attention(self.config)
    if attend is not None:
        window = self.config.window_size if self.attention_type == "local" else None
        output, weights = attend(self, query, key, value, None, scaling=1.0, sliding_window=window)
        output = output.reshape(*hidden_states.shape[:-1], self.embed_dim)
        return self.resid_dropout(self.out_proj(output)), weights
    # Before the update, which moves a cache's length on in place.
    past = layer_past.get_seq_length(self.layer_id) if layer_past is not None else 0
    rows = torch.arange(query.shape[-2], device=query.device) + past
    if layer_past is not None:
        key, value = layer_past.update(key, value, self.layer_id)
    allowed = self.bias[0, 0].index_select(0, rows)[:, : key.shape[-2]]
    weights = torch.matmul(query.float(), key.float().transpose(-1, -2))  # fp32, as the original
    weights = torch.where(allowed, weights, torch.tensor(torch.finfo(weights.dtype).min, device=weights.device))
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = self.attn_dropout(torch.softmax(weights, dim=-1).to(value.dtype))
    output = self._merge_heads(torch.matmul(weights, value), self.num_heads, self.head_dim)
    return self.resid_dropout(self.out_proj(output)), weights


register(
    forward_patch(
        "gpt_neo.mask_at_cache_positions",
        GPT_NEO_ATTENTION,
        gpt_neo_attention_at_cache_positions,
        reason=(
            "GPTNeoSelfAttention takes its causal and local-window mask rows at the end of the "
            "keys, true only of a cache that grows each token; with generate's fixed-length "
            "cache the rows are taken at the queries' cache positions. It computes attention "
            "itself, so the paged attention reaches it only through this forward"
        ),
        test="tests/test_patches.py::test_generate_with_a_local_window_matches_transformers",
        transformers_versions=">=5.0,<6",
        attributes=lambda model, attention: {"layer_idx": attention.layer_id},  # how attention functions name a layer
    )
)


def falcon_attention_through_the_interface(
    self: torch.nn.Module,
    hidden_states: torch.Tensor,
    alibi: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None = None,
    layer_past: Any | None = None,
    use_cache: bool = False,
    output_attentions: bool = False,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``FalconAttention.forward``; with rotary positions under a maskless attention
    function, the queries, keys and values go to that function."""
    attend = maskless_attention(self.config)
    if attend is None or alibi is not None:
        return type(self).forward(self, hidden_states, alibi, attention_mask, position_ids, layer_past, use_cache,
                                  output_attentions, position_embeddings, **kwargs)
    from transformers.models.falcon.modeling_falcon import apply_rotary_pos_emb

    query, key, value = self._split_heads(self.query_key_value(hidden_states))
    batch, length = query.shape[:2]
    kv_heads = self.num_heads if self.new_decoder_architecture else self.num_kv_heads
    query = query.transpose(1, 2).reshape(batch, self.num_heads, length, self.head_dim)
    key, value = (x.transpose(1, 2).reshape(batch, kv_heads, length, self.head_dim) for x in (key, value))
    query, key = apply_rotary_pos_emb(query, key, *position_embeddings)
    if layer_past is not None:
        key, value = layer_past.update(key, value, self.layer_idx)
    output, weights = attend(self, query, key, value, None, scaling=self.inv_norm_factor)
    return self.dense(output.reshape(batch, length, self.num_heads * self.head_dim)), weights


register(
    forward_patch(
        "falcon.attention_through_the_interface",
        FALCON_ATTENTION,
        falcon_attention_through_the_interface,
        reason=(
            "FalconAttention computes attention itself (sdpa or eager by name), so the paged "
            "attention reaches its rotary layers only through this forward"
        ),
        test="tests/test_patches.py::test_modules_that_compute_attention_themselves_are_paged",
        transformers_versions=">=5.0,<6",
    )
)


def gpt_neox_japanese_attention_through_the_interface(
    self: torch.nn.Module,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    layer_past: Any | None = None,
    use_cache: bool | None = False,
    output_attentions: bool | None = False,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``GPTNeoXJapaneseAttention.forward``; under a maskless attention function, the
    queries, keys and values (rotary on their first ``rotary_ndims``) go to that function."""
    attend = maskless_attention(self.config)
    if attend is None:
        return type(self).forward(self, hidden_states, attention_mask, position_ids, layer_past, use_cache,
                                  output_attentions, position_embeddings, **kwargs)
    from transformers.models.gpt_neox_japanese.modeling_gpt_neox_japanese import apply_rotary_pos_emb

    qkv = self.query_key_value(hidden_states)
    qkv = qkv.view(*qkv.shape[:-1], self.num_attention_heads, 3 * self.head_size).permute(0, 2, 1, 3)
    query, key, value = qkv.split(self.head_size, dim=-1)
    rotated = apply_rotary_pos_emb(query[..., : self.rotary_ndims], key[..., : self.rotary_ndims], *position_embeddings)
    query, key = (torch.cat((r, x[..., self.rotary_ndims :]), dim=-1) for r, x in zip(rotated, (query, key)))
    if layer_past is not None:
        key, value = layer_past.update(key, value, self.layer_idx)
    output, weights = attend(self, query, key, value, None, scaling=1.0 / self.norm_factor)
    output = output.reshape(*hidden_states.shape[:-1], self.num_attention_heads * self.head_size)
    return self.dense(output), weights, self.dense_bias


register(
    forward_patch(
        "gpt_neox_japanese.attention_through_the_interface",
        GPT_NEOX_JAPANESE_ATTENTION,
        gpt_neox_japanese_attention_through_the_interface,
        reason=(
            "GPTNeoXJapaneseAttention computes attention itself, so the paged attention "
            "reaches it only through this forward"
        ),
        test="tests/test_patches.py::test_modules_that_compute_attention_themselves_are_paged",
        transformers_versions=">=5.0,<6",
        attributes=lambda model, attention: {"config": model.config},  # where the implementation is named
    )
)
