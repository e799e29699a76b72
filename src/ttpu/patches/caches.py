"""Models that keep their states in a cache class of their own, which ttpu's compiled
generation and serving engine cannot carry (they recomputed such models whole at every
token).

- MiniMax keeps its lightning-attention layers' states in ``MiniMaxCache`` (transformers'
  ``DynamicCache`` with a list of states beside its layers) and refuses any other cache.
  Its config already names those layers ``linear_attention``, for which transformers'
  standard caches build linear-attention layers: here MiniMaxModel takes any ``Cache``
  (building a ``DynamicCache`` for its config when it needs one), and its lightning
  layers read and write their state through that cache's recurrent-state API, so the
  model is a hybrid of linear and full attention as ttpu carries them (Qwen3-Next's kind).
  A MiniMaxCache given to it is used as before.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicCache

from ttpu.compat import CACHE_KEYWORD
from ttpu.patches.registry import forward_patch, register

MINIMAX = "transformers.models.minimax.modeling_minimax"


class _LinearStates:
    """A standard cache seen through MiniMaxCache's two state methods."""

    def __init__(self, cache: Cache) -> None:
        self._cache = cache

    def get_linear_cache(self, layer_idx: int) -> torch.Tensor | None:
        return self._cache.get_recurrent_state(layer_idx)  # None before the layer's first state

    def set_linear_cache(self, layer_idx: int, state: torch.Tensor) -> None:
        self._cache.update_recurrent_state(state, layer_idx)
        # transformers' layers mark a previous state on their first convolution update; this
        # layer has none, so its first state marks it (as MiniMaxCache's list does).
        self._cache.layers[layer_idx].has_previous_state[0] = True


def _given_cache(kwargs: dict[str, Any]) -> Any:
    """The cache in a forward's keyword arguments, under either of its names
    (``past_key_values`` before transformers 5.24), moved to this version's name."""
    caches = [kwargs.pop(name) for name in ("cache", "past_key_values") if name in kwargs]
    kwargs[CACHE_KEYWORD] = next((c for c in caches if c is not None), None)
    return kwargs[CACHE_KEYWORD]


def minimax_lightning_attention_on_a_standard_cache(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    """``MiniMaxLightningAttention.forward``, its state kept by a standard cache's
    linear-attention layer (a MiniMaxCache is used as it is)."""
    cache = _given_cache(kwargs)
    if isinstance(cache, Cache) and not hasattr(cache, "get_linear_cache"):
        kwargs[CACHE_KEYWORD] = _LinearStates(cache)
    return type(self).forward(self, *args, **kwargs)


def minimax_model_on_a_standard_cache(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    """``MiniMaxModel.forward`` (keyword arguments) over any ``Cache``; where it would
    build a MiniMaxCache, a ``DynamicCache`` for its config (linear-attention layers for
    its lightning layers). The stock forward reads ``use_cache`` only to build or check
    its own cache (its layers use whatever cache they are given, and it returns it), so
    a standard cache goes in with ``use_cache=False``."""
    cache = _given_cache(kwargs)
    use_cache = kwargs.get("use_cache")
    if cache is None and (self.config.use_cache if use_cache is None else use_cache):
        cache = kwargs[CACHE_KEYWORD] = DynamicCache(config=self.config)
    if isinstance(cache, Cache) and not hasattr(cache, "get_linear_cache"):
        kwargs["use_cache"] = False
    return type(self).forward(self, *args, **kwargs)


for _suffix, _forward in (("MiniMaxLightningAttention", minimax_lightning_attention_on_a_standard_cache),
                          ("MiniMaxModel", minimax_model_on_a_standard_cache)):
    register(
        forward_patch(
            f"minimax.standard_cache.{_suffix}",
            f"{MINIMAX}.{_suffix}",
            _forward,
            reason=("MiniMax keeps its lightning-attention states in a cache class of its own, which compiled "
                    "generation cannot carry: it takes transformers' standard cache, whose linear-attention layers "
                    "hold those states"),
            test="tests/test_patches.py::test_a_model_with_a_cache_of_its_own_keeps_a_standard_one",
            transformers_versions=">=5.0,<6",
        )
    )
