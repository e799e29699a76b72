"""Attention modules that compute their scores themselves instead of calling
transformers' ``AttentionInterface``.

- GPT-Neo slices its causal (and local-window) mask buffer at the last rows of the keys
  it attends to: right for transformers' dynamic cache, whose keys end at the newest
  token, but a fixed-length cache always holds its full length, so every step would read
  the last row (no window). Here the rows are those of the queries' positions in the cache.
- Under an attention implementation registered without a mask function (ttpu's paged
  attention, which finds each token's keys by its position itself), GPT-Neo, Falcon,
  GPT-NeoX-Japanese and BLOOM hand their queries, keys and values to that function
  instead, with their own scaling, GPT-Neo's local window and BLOOM's and Falcon's ALiBi
  slopes (the function adds each head's slope times the key's distance from the query:
  their own biases, up to a constant per query, which the softmax ignores).
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
BLOOM_ATTENTION = "transformers.models.bloom.modeling_bloom.BloomAttention"
GPT_NEOX_JAPANESE_ATTENTION = "transformers.models.gpt_neox_japanese.modeling_gpt_neox_japanese.GPTNeoXJapaneseAttention"


def maskless_attention(config: Any) -> Callable[..., tuple[torch.Tensor, Any]] | None:
    """The attention function ``config`` names if it was registered without a mask
    function (it masks by the tokens' positions itself), else None."""
    name = config._attn_implementation
    if name in ALL_ATTENTION_FUNCTIONS and name not in ALL_MASK_ATTENTION_FUNCTIONS:
        return ALL_ATTENTION_FUNCTIONS[name]
    return None


def _interface_patch(model_type: str, qualified_class: str, forward: Callable[..., Any], *, why: str = "",
                     needs_config: bool = False) -> None:
    """Register ``forward`` for ``qualified_class``, a module that computes attention
    itself (``needs_config``: it is given the model's config, where the implementation
    is named)."""
    register(
        forward_patch(
            f"{model_type}.attention_through_the_interface",
            qualified_class,
            forward,
            reason=(f"{qualified_class.rsplit('.', 1)[1]} computes attention itself{why}, so the paged attention "
                    "reaches it only through this forward"),
            test="tests/test_patches.py::test_modules_that_compute_attention_themselves_are_paged",
            transformers_versions=">=5.0,<6",
            attributes=(lambda model, attention: {"config": model.config}) if needs_config else None,
        )
    )


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
    """``FalconAttention.forward``; under a maskless attention function, the queries,
    keys and values go to that function (with ALiBi, Falcon's slopes scaled as its
    scores are, in place of rotary positions)."""
    attend = maskless_attention(self.config)
    if attend is None:
        return type(self).forward(self, hidden_states, alibi, attention_mask, position_ids, layer_past, use_cache,
                                  output_attentions, position_embeddings, **kwargs)
    from transformers.models.falcon.modeling_falcon import apply_rotary_pos_emb, build_alibi_tensor

    query, key, value = self._split_heads(self.query_key_value(hidden_states))
    batch, length = query.shape[:2]
    kv_heads = self.num_heads if self.new_decoder_architecture else self.num_kv_heads
    query = query.transpose(1, 2).reshape(batch, self.num_heads, length, self.head_dim)
    key, value = (x.transpose(1, 2).reshape(batch, kv_heads, length, self.head_dim) for x in (key, value))
    options = {}
    if alibi is None:
        query, key = apply_rotary_pos_emb(query, key, *position_embeddings)
    else:  # Falcon's own slopes (its bias at position 1 of two tokens), scaled with the scores
        slopes = build_alibi_tensor(torch.ones(1, 2, device=query.device), self.num_heads, torch.float32)[:, 0, 1]
        options["alibi_slopes"] = slopes * self.inv_norm_factor
    if layer_past is not None:
        key, value = layer_past.update(key, value, self.layer_idx)
    output, weights = attend(self, query, key, value, None, scaling=self.inv_norm_factor, **options)
    return self.dense(output.reshape(batch, length, self.num_heads * self.head_dim)), weights


_interface_patch("falcon", FALCON_ATTENTION, falcon_attention_through_the_interface, why=" (sdpa or eager by name)")


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


_interface_patch("gpt_neox_japanese", GPT_NEOX_JAPANESE_ATTENTION, gpt_neox_japanese_attention_through_the_interface,
                 needs_config=True)


def bloom_attention_through_the_interface(
    self: torch.nn.Module,
    hidden_states: torch.Tensor,
    residual: torch.Tensor,
    alibi: torch.Tensor,
    attention_mask: torch.Tensor | None,
    layer_past: Any | None = None,
    use_cache: bool = False,
    output_attentions: bool = False,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``BloomAttention.forward``; under a maskless attention function, the queries, keys
    and values go to that function with the heads' ALiBi slopes (not the ``alibi`` the
    model built from its mask, which counts positions from the batch's first token)."""
    attend = maskless_attention(self.config)
    if attend is None or (self.pretraining_tp > 1 and self.slow_but_exact):
        return type(self).forward(self, hidden_states, residual, alibi, attention_mask, layer_past, use_cache,
                                  output_attentions, **kwargs)
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor, dropout_add

    query, key, value = self._reshape(self.query_key_value(hidden_states))
    if layer_past is not None:
        key, value = layer_past.update(key, value, self.layer_idx)
    # BLOOM's own slopes: its bias at position 1 of a two-token sequence.
    slopes = build_alibi_tensor(torch.ones(1, 2, device=query.device), self.num_heads, torch.float32)[:, 0, 1]
    output, weights = attend(self, query, key, value, None, scaling=self.inv_norm_factor, alibi_slopes=slopes)
    output = self.dense(output.reshape(*hidden_states.shape[:-1], self.hidden_size))
    return dropout_add(output, residual, self.hidden_dropout, self.training), weights


_interface_patch("bloom", BLOOM_ATTENTION, bloom_attention_through_the_interface,
                 why=", its ALiBi bias built from the batch's mask", needs_config=True)
