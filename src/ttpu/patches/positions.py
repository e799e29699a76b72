"""Positional-embedding modules that read their cache's length in Python: in a compiled
step with a cache that length is traced, so generation recomputed these models whole at
every token and the serving engine could not page them.

- XGLM's sinusoidal table grows when a position passes its end, a check made on the
  length; a traced length skips the check (generation and the engine keep positions
  below ``max_position_embeddings``, the table's size).
- TrOCR's and MVP's learned positions are ``arange(cache_length, cache_length + length)``, whose
  bounds must be numbers; here they are the length's positions plus the cache's length.

Before transformers 5.24 their length argument was named ``past_key_values_length``.
"""

from __future__ import annotations

from typing import Any

import torch

from ttpu.patches.registry import forward_patch, register


def xglm_positions_of_a_traced_length(self: torch.nn.Module, position_ids: torch.Tensor, length: Any = 0,
                                      **named_length: Any) -> torch.Tensor:
    """``XGLMSinusoidalPositionalEmbedding.forward``, whose table grows only for a
    cache length that is a number."""
    length = next(iter(named_length.values()), length)
    if not torch.is_tensor(length):
        return type(self).forward(self, position_ids, length)
    rows = (position_ids + self.offset).reshape(-1)
    return self.weights.index_select(0, rows).view(*position_ids.shape, self.weights.shape[-1]).detach()


register(
    forward_patch(
        "xglm.positions_of_a_traced_length",
        "transformers.models.xglm.modeling_xglm.XGLMSinusoidalPositionalEmbedding",
        xglm_positions_of_a_traced_length,
        reason=("XGLMSinusoidalPositionalEmbedding compares its cache's length with its table's to grow it; in a "
                "compiled step that length is traced, so generation could not keep a cache for XGLM"),
        test="tests/test_patches.py::test_modules_that_compute_attention_themselves_are_paged",
        transformers_versions=">=5.0,<6",
    )
)


def learned_positions_after_the_cache(self: torch.nn.Module, input_ids: torch.Tensor, length: Any = 0,
                                      position_ids: torch.Tensor | None = None, **named_length: Any) -> torch.Tensor:
    """The forward of a BART-era learned positional embedding (TrOCR's, MVP's), numbering
    the tokens from the cache's length by adding it to their own positions (a traced
    length cannot bound a range)."""
    length = next(iter(named_length.values()), length)
    if position_ids is None:
        batch, tokens = input_ids.shape[:2]
        position_ids = (torch.arange(tokens, device=self.weight.device) + length).expand(batch, -1)
    else:
        position_ids = position_ids.unsqueeze(0)
    return torch.nn.Embedding.forward(self, position_ids + self.offset)


for _model_type, _embedding in (
    ("trocr", "transformers.models.trocr.modeling_trocr.TrOCRLearnedPositionalEmbedding"),
    ("mvp", "transformers.models.mvp.modeling_mvp.MvpLearnedPositionalEmbedding"),
):
    register(
        forward_patch(
            f"{_model_type}.positions_after_the_cache",
            _embedding,
            learned_positions_after_the_cache,
            reason=(f"{_embedding.rsplit('.', 1)[1]} bounds a range by its cache's length; in a compiled step that "
                    "length is traced, so generation could not keep a cache for the model"),
            test="tests/test_patches.py::test_modules_that_compute_attention_themselves_are_paged",
            transformers_versions=">=5.0,<6",
        )
    )
