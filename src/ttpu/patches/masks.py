"""Attention masks that assume a cache growing by one position per token.

GPT-Neo slices its causal (and local-window) mask buffer at the last rows of the keys it
attends to: right for transformers' dynamic cache, whose keys end at the newest token, but
a fixed-length cache always holds its full length, so every step would read the last
row (no window). Here the rows are those of the queries' positions in the cache.
"""

from __future__ import annotations

import torch

from ttpu.patches.registry import forward_patch, register


def gpt_neo_attention_at_cache_positions(
    self: torch.nn.Module,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    layer_past: object | None = None,
    use_cache: bool = False,
    output_attentions: bool = False,
    **kwargs: object,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``GPTNeoSelfAttention.forward`` with the mask rows taken at the cache positions the
    queries are written to (``layer_past.get_seq_length`` onwards)."""
    query, key, value = (
        self._split_heads(projection(hidden_states), self.num_heads, self.head_dim)
        for projection in (self.q_proj, self.k_proj, self.v_proj)
    )
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
        "transformers.models.gpt_neo.modeling_gpt_neo.GPTNeoSelfAttention",
        gpt_neo_attention_at_cache_positions,
        reason=(
            "GPTNeoSelfAttention takes its causal and local-window mask rows at the end of the "
            "keys, true only of a cache that grows each token; with generate's fixed-length "
            "cache the rows are taken at the queries' cache positions"
        ),
        test="tests/test_patches.py::test_generate_with_a_local_window_matches_transformers",
        transformers_versions=">=5.0,<6",
    )
)
