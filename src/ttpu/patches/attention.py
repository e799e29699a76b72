"""Attention modules that compute their scores themselves instead of calling
transformers' ``AttentionInterface``.

- GPT-Neo slices its causal (and local-window) mask buffer at the last rows of the keys
  it attends to: right for transformers' dynamic cache, whose keys end at the newest
  token, but a fixed-length cache always holds its full length, so every step would read
  the last row (no window). Here the rows are those of the queries' positions in the cache.
- MPT finds the row of its ALiBi bias from the cache's length, a traced value in a
  compiled step; its bias has one row, which serves every query, so here it is sliced by
  the keys' length alone.
- Under an attention function of :data:`POSITIONAL_ATTENTION` (ttpu's paged attention,
  which finds each token's keys by its position itself and takes no mask), GPT-Neo, Falcon
  (before transformers 5.25; from 5.25 an ALiBi Falcon only adds its slopes),
  GPT-NeoX-Japanese, BLOOM, MPT, XGLM, TrOCR, MVP and GIT hand their queries, keys and values to
  that function instead, with their own scaling, GPT-Neo's local window and BLOOM's,
  MPT's and Falcon's ALiBi slopes (the function adds each head's slope times the key's
  distance from the query: their own biases, up to a constant per query, which the
  softmax ignores).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from transformers.cache_utils import EncoderDecoderCache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ttpu.patches.registry import Patch, forward_patch, instances_of, register

GPT_NEO_ATTENTION = "transformers.models.gpt_neo.modeling_gpt_neo.GPTNeoSelfAttention"
FALCON_ATTENTION = "transformers.models.falcon.modeling_falcon.FalconAttention"
BLOOM_ATTENTION = "transformers.models.bloom.modeling_bloom.BloomAttention"
GPT_NEOX_JAPANESE_ATTENTION = "transformers.models.gpt_neox_japanese.modeling_gpt_neox_japanese.GPTNeoXJapaneseAttention"


# Attention functions that take no mask: they find each token's keys, and mask them, by its
# position themselves (ttpu's paged attention registers its name here).
POSITIONAL_ATTENTION: set[str] = set()


def positional_attention(config: Any) -> Callable[..., tuple[torch.Tensor, Any]] | None:
    """The attention function ``config`` names if it is one of :data:`POSITIONAL_ATTENTION`,
    else None."""
    name = config._attn_implementation
    return ALL_ATTENTION_FUNCTIONS[name] if name in POSITIONAL_ATTENTION else None


def _alibi_slopes(build_alibi_tensor: Callable[..., torch.Tensor], heads: int, device: torch.device) -> torch.Tensor:
    """A model's ALiBi slopes [heads], from its own ``build_alibi_tensor``: the bias at
    position 1 of a sequence of two tokens."""
    return build_alibi_tensor(torch.ones(1, 2, device=device), heads, torch.float32).reshape(heads, 2)[:, 1]


def _interface_patch(model_type: str, qualified_class: str, forward: Callable[..., Any], *, why: str = "",
                     needs_config: bool = False, transformers_versions: str = ">=5.0,<6") -> None:
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
            transformers_versions=transformers_versions,
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
    queries are written to (``layer_past.get_seq_length`` onwards); under a positional
    attention function, that function (unscaled scores, the local layers' window)."""
    query, key, value = (
        self._split_heads(projection(hidden_states), self.num_heads, self.head_dim)
        for projection in (self.q_proj, self.k_proj, self.v_proj)
    )
    attend = positional_attention(self.config)
    if attend is not None:
        if layer_past is not None:
            key, value = layer_past.update(key, value, self.layer_id)
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


def _falcon_alibi_slopes(attention: torch.nn.Module) -> torch.Tensor:
    """A Falcon attention module's ALiBi slopes, scaled with its scores as Falcon scales its bias."""
    from transformers.models.falcon.modeling_falcon import build_alibi_tensor

    device = attention.query_key_value.weight.device
    return _alibi_slopes(build_alibi_tensor, attention.num_heads, device) * attention.inv_norm_factor


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
    """``FalconAttention.forward``; under a positional attention function, the queries,
    keys and values go to that function: grouped keys and values (new decoder
    architecture) as ``num_kv_heads`` heads, not broadcast to every query head as the
    stock split does; with ALiBi, Falcon's slopes scaled as its scores are, in place of
    rotary positions."""
    attend = positional_attention(self.config)
    if attend is None:
        return type(self).forward(self, hidden_states, alibi, attention_mask, position_ids=position_ids,
                                  layer_past=layer_past, use_cache=use_cache, output_attentions=output_attentions,
                                  position_embeddings=position_embeddings, **kwargs)
    from transformers.models.falcon.modeling_falcon import apply_rotary_pos_emb

    fused = self.query_key_value(hidden_states)
    batch, length = fused.shape[:2]
    if self.new_decoder_architecture:  # per key head: its query heads, then its key, then its value
        grouped = fused.view(batch, length, self.num_kv_heads, -1, self.head_dim)
        query, key, value = grouped[:, :, :, :-2].flatten(2, 3), grouped[:, :, :, -2], grouped[:, :, :, -1]
    else:
        query, key, value = self._split_heads(fused)
    query, key, value = (x.transpose(1, 2) for x in (query, key, value))  # [batch, heads, length, dim]
    options = {}
    if alibi is None:
        query, key = apply_rotary_pos_emb(query, key, *position_embeddings)
    else:
        options["alibi_slopes"] = _falcon_alibi_slopes(self)
    if layer_past is not None:
        key, value = layer_past.update(key, value, self.layer_idx)
    output, weights = attend(self, query, key, value, None, scaling=self.inv_norm_factor, **options)
    return self.dense(output.reshape(batch, length, self.num_heads * self.head_dim)), weights


def falcon_alibi_slopes_to_the_interface(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    """``FalconAttention.forward`` from transformers 5.25, which calls the attention
    interface and folds ALiBi into the mask; a positional attention function takes no
    mask, so with ALiBi it is handed Falcon's slopes (scaled as the mask's bias is)."""
    if self.config.alibi and positional_attention(self.config) is not None:
        kwargs["alibi_slopes"] = _falcon_alibi_slopes(self)
    return type(self).forward(self, *args, **kwargs)


def falcon_model_alibi_left_to_the_attention(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    """``FalconModel.forward`` from transformers 5.25, which folds ALiBi into a mask it
    materialises; under a positional attention function (no mask: each layer is handed
    the slopes) the model builds neither."""
    if not (self.use_alibi and positional_attention(self.config) is not None):
        return type(self).forward(self, *args, **kwargs)
    self.use_alibi = False
    try:
        return type(self).forward(self, *args, **kwargs)
    finally:
        self.use_alibi = True


# transformers 5.25 moved Falcon's attention onto the interface and its ALiBi into the mask.
_interface_patch("falcon", FALCON_ATTENTION, falcon_attention_through_the_interface, why=" (sdpa or eager by name)",
                 transformers_versions=">=5.0,<5.25")
register(
    forward_patch(
        "falcon.alibi_slopes_to_the_interface",
        FALCON_ATTENTION,
        falcon_alibi_slopes_to_the_interface,
        reason=("FalconAttention with ALiBi adds its bias through the attention mask, which the paged attention "
                "does not take; this forward hands the paged attention Falcon's slopes instead"),
        test="tests/test_patches.py::test_modules_that_compute_attention_themselves_are_paged",
        transformers_versions=">=5.25,<6",
    )
)
register(
    forward_patch(
        "falcon.alibi_left_to_the_attention",
        "transformers.models.falcon.modeling_falcon.FalconModel",
        falcon_model_alibi_left_to_the_attention,
        reason=("FalconModel with ALiBi folds the bias into a materialised attention mask, which the paged "
                "attention does not take (its attention layers are handed the slopes instead)"),
        test="tests/test_patches.py::test_modules_that_compute_attention_themselves_are_paged",
        transformers_versions=">=5.25,<6",
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
    """``GPTNeoXJapaneseAttention.forward``; under a positional attention function, the
    queries, keys and values (rotary on their first ``rotary_ndims``) go to that function."""
    attend = positional_attention(self.config)
    if attend is None:
        return type(self).forward(self, hidden_states, attention_mask, position_ids, layer_past=layer_past,
                                  use_cache=use_cache, output_attentions=output_attentions,
                                  position_embeddings=position_embeddings, **kwargs)
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
    """``BloomAttention.forward``; under a positional attention function, the queries, keys
    and values go to that function with the heads' ALiBi slopes (not the ``alibi`` the
    model built from its mask, which counts positions from the batch's first token).
    With ``pretraining_tp > 1`` and ``slow_but_exact`` (an output projection by slices)
    it stays stock, never calls that function, and the serving engine recomputes it."""
    attend = positional_attention(self.config)
    if attend is None or (self.pretraining_tp > 1 and self.slow_but_exact):
        return type(self).forward(self, hidden_states, residual, alibi, attention_mask, layer_past=layer_past,
                                  use_cache=use_cache, output_attentions=output_attentions, **kwargs)
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor, dropout_add

    query, key, value = self._reshape(self.query_key_value(hidden_states))
    if layer_past is not None:
        key, value = layer_past.update(key, value, self.layer_idx)
    slopes = _alibi_slopes(build_alibi_tensor, self.num_heads, query.device)
    output, weights = attend(self, query, key, value, None, scaling=self.inv_norm_factor, alibi_slopes=slopes)
    output = self.dense(output.reshape(*hidden_states.shape[:-1], self.hidden_size))
    return dropout_add(output, residual, self.hidden_dropout, self.training), weights


_interface_patch("bloom", BLOOM_ATTENTION, bloom_attention_through_the_interface,
                 why=", its ALiBi bias built from the batch's mask", needs_config=True)


def mpt_attention_at_cache_positions(
    self: torch.nn.Module,
    hidden_states: torch.Tensor,
    position_bias: torch.Tensor,
    cache: Any | None = None,
    attention_mask: torch.Tensor | None = None,
    past_key_values: Any | None = None,  # the cache's name before transformers 5.24
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``MptAttention.forward`` with its ALiBi bias [heads, 1, max_seq_len] sliced by the
    keys' length alone: its one row serves every query, where the stock forward finds
    that row from the cache's length (a traced value in a compiled step). Under a
    positional attention function, the queries, keys and values go to that function with
    MPT's slopes (its bias, the slope times the key's position, up to a constant per query)."""
    from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor

    batch, length = hidden_states.shape[:2]
    fused = self.Wqkv(hidden_states)
    if self.clip_qkv:
        fused = fused.clamp(min=-self.clip_qkv, max=self.clip_qkv)
    query, key, value = (x.reshape(batch, length, self.n_heads, self.head_dim).transpose(1, 2)
                         for x in fused.chunk(3, dim=2))
    cache = cache if cache is not None else past_key_values
    if cache is not None:
        key, value = cache.update(key, value, self.layer_idx)
    attend = positional_attention(self.config)
    if attend is not None:
        bias = build_mpt_alibi_tensor(self.n_heads, 2, device=query.device).reshape(self.n_heads, 2)
        output, weights = attend(self, query, key, value, None, scaling=self.softmax_scale,
                                 alibi_slopes=bias[:, 1] - bias[:, 0])
    else:
        scores = torch.matmul(query, key.transpose(-1, -2)) * self.softmax_scale
        if position_bias is not None:
            scores = scores + position_bias[:, :, max(0, position_bias.size(2) - key.shape[-2]):]
        if attention_mask is not None:
            scores = scores.masked_fill(attention_mask, torch.finfo(query.dtype).min)
        weights = torch.softmax(scores.float(), dim=-1).to(value.dtype)
        weights = torch.nn.functional.dropout(weights, p=self.attn_dropout_p, training=self.training)
        output = torch.matmul(weights, value).transpose(1, 2)
    return self.out_proj(output.reshape(batch, length, self.hidden_size)), weights


def projected_attention_through_the_interface(
    self: torch.nn.Module,
    hidden_states: torch.Tensor,
    key_value_states: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The forward of a BART-era attention module (``q_proj``, ``k_proj``, ``v_proj``,
    ``out_proj``, ``scaling``, computing its scores itself: XGLM's, TrOCR's, MVP's); under
    a positional attention function, a decoder's self-attention queries, keys and values go
    to that function. Cross-attention, an encoder's attention and MVP's prompt keys stay
    stock."""
    attend = positional_attention(self.config)
    if attend is None or key_value_states is not None or not self.is_decoder or kwargs.get("attn_prompt") is not None:
        return type(self).forward(self, hidden_states, key_value_states, **kwargs)
    cache = kwargs.get("cache", kwargs.get("past_key_values"))  # its name before transformers 5.24
    if isinstance(cache, EncoderDecoderCache):
        cache = cache.self_attention_cache
    batch, length = hidden_states.shape[:2]
    query, key, value = (projection(hidden_states).view(batch, length, -1, self.head_dim).transpose(1, 2)
                         for projection in (self.q_proj, self.k_proj, self.v_proj))
    if cache is not None:
        key, value = cache.update(key, value, self.layer_idx)
    output, weights = attend(self, query, key, value, None, scaling=self.scaling)
    return self.out_proj(output.reshape(batch, length, self.embed_dim)), weights


for _model_type, _attention in (("xglm", "transformers.models.xglm.modeling_xglm.XGLMAttention"),
                                ("trocr", "transformers.models.trocr.modeling_trocr.TrOCRAttention"),
                                ("mvp", "transformers.models.mvp.modeling_mvp.MvpAttention")):
    _interface_patch(_model_type, _attention, projected_attention_through_the_interface, needs_config=True)


def git_attention_through_the_interface(
    self: torch.nn.Module,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    cache: Any | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``GitSelfAttention.forward`` (BERT's names, computing its scores itself); under a
    positional attention function, the queries, keys and values of its text tokens go to
    that function (ttpu's steps carry no image tokens)."""
    attend = positional_attention(self.config)
    if attend is None:
        return type(self).forward(self, hidden_states, attention_mask, cache, **kwargs)
    batch, length = hidden_states.shape[:2]
    query, key, value = (projection(hidden_states).view(batch, length, -1, self.attention_head_size).transpose(1, 2)
                         for projection in (self.query, self.key, self.value))
    if cache is not None:
        key, value = cache.update(key, value, self.layer_idx)
    output, weights = attend(self, query, key, value, None, scaling=self.attention_head_size**-0.5)
    return output.reshape(batch, length, self.all_head_size), weights


_interface_patch("git", "transformers.models.git.modeling_git.GitSelfAttention", git_attention_through_the_interface,
                 needs_config=True)


MPT_ATTENTION = "transformers.models.mpt.modeling_mpt.MptAttention"
_interface_patch("mpt", MPT_ATTENTION, mpt_attention_at_cache_positions,
                 why=", its ALiBi bias sliced by the cache's length", needs_config=True)


@contextlib.contextmanager
def _mpt_mask_of_nothing_while_tracing(module: torch.nn.Module) -> Iterator[None]:
    """MPT's ``create_causal_mask``, where transformers builds no mask for a positional
    attention function (which takes none), returns a mask that masks nothing (MPT's masks
    are True where masked) instead of None, which MptModel cannot convert."""
    from transformers.models.mpt import modeling_mpt

    stock = modeling_mpt.create_causal_mask

    def causal_mask(*args: Any, config: Any, **kwargs: Any) -> torch.Tensor:
        mask = stock(*args, config=config, **kwargs)
        if mask is None and config._attn_implementation in POSITIONAL_ATTENTION:
            return torch.zeros((), dtype=torch.bool)
        return mask

    modeling_mpt.create_causal_mask = causal_mask
    try:
        yield
    finally:
        modeling_mpt.create_causal_mask = stock


register(
    Patch(
        name="mpt.no_mask_for_the_interface",
        reason=("MptModel converts its causal mask to booleans, and transformers builds none for an attention "
                "function without a mask function (the paged attention): the conversion failed on None"),
        test="tests/test_patches.py::test_modules_that_compute_attention_themselves_are_paged",
        applies_to=lambda module: bool(instances_of(module, MPT_ATTENTION)),
        apply=lambda module: None,
        while_tracing=_mpt_mask_of_nothing_while_tracing,
        transformers_versions=">=5.0,<6",
    )
)
