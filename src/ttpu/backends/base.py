"""The small interface every backend implements (JAX now, torch_xla next)."""

from __future__ import annotations

import inspect
import os
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ttpu.compat import CACHE_KEYWORD
from ttpu.sharding import ShardingPlan

if TYPE_CHECKING:
    from ttpu.generation.config import GenerationSettings


class CompiledForward(ABC):
    """A torch module turned into compiled, backend-native forward calls."""

    @property
    @abstractmethod
    def params(self) -> Any:
        """The weights, in the backend's native form (a pytree of jax arrays for JAX)."""

    @property
    @abstractmethod
    def compile_count(self) -> int:
        """How many executables have been compiled so far."""

    @property
    def trace_count(self) -> int | None:
        """How many programs were traced in this process (not read back from a store);
        None for a backend that traces every call."""
        return None

    @abstractmethod
    def __call__(self, arrays: Mapping[str, Any], constants: Mapping[str, Any]) -> Any:
        """Run forward with array inputs (traced) and constants (compile-time static).

        Array inputs arrive already padded to their buckets; returns the model's output
        with backend-native arrays.
        """

    @abstractmethod
    def output_shapes(self, arrays: Mapping[str, Any], constants: Mapping[str, Any]) -> Any:
        """The output's structure with shapes only, without compiling or running."""

    @abstractmethod
    def to_array(self, value: Any) -> Any:
        """Convert a numpy / torch / jax value to the array type inputs are padded in and
        passed to ``__call__`` as (jax arrays on the JAX backend, numpy on torch_xla)."""

    @abstractmethod
    def flatten(self, output: Any) -> tuple[list[Any], Any]:
        """An output's array leaves and its structure (the backend's pytree rules)."""

    @abstractmethod
    def unflatten(self, structure: Any, leaves: list[Any]) -> Any:
        """The output rebuilt from :meth:`flatten`'s structure and (new) leaves."""

    @abstractmethod
    def to_host(self, value: Any) -> np.ndarray:
        """An output array as numpy."""


class Decoder(ABC):
    """A causal LM's compiled prefill and decode steps over a static KV cache.

    ``ttpu.generation`` drives it from the host; the state it returns is opaque there.
    Layout: prompts left-padded to one length ``P``; index ``i`` of the cache and of the
    token buffer is the same position for every row, the first new token at index ``P``.
    """

    @property
    @abstractmethod
    def compile_count(self) -> int:
        """How many programs (prefill and decode) have been compiled so far."""

    @property
    def trace_count(self) -> int | None:
        """Programs traced in this process (None: the backend traces every call)."""
        return None

    @abstractmethod
    def start(
        self,
        input_ids: np.ndarray,
        prompt_mask: np.ndarray,
        max_length: int,
        settings: GenerationSettings,
        seed: int,
    ) -> Any:
        """Run the prompts (left-padded int64 [batch, P]) into a cache of ``max_length``
        positions and pick each row's first new token with ``settings``' sampling rules."""

    @abstractmethod
    def advance(self, state: Any, steps: int) -> Any:
        """Generate up to ``steps`` more tokens (fewer if every row has finished or
        ``max_new_tokens`` is reached); ``state`` may be consumed: use the returned one."""

    @abstractmethod
    def read(self, state: Any) -> tuple[int, np.ndarray]:
        """How many tokens have been generated, and the token buffer [batch, max_length]
        (prompt, then new tokens; finished rows continue with padding)."""

    @abstractmethod
    def finish(self, state: Any, rows: Sequence[int]) -> Any:
        """Mark ``rows`` finished: from now on they only receive padding."""


class CachedStepInputs:
    """Keyword arguments of a causal LM's forward over a KV cache, fitted to its
    signature: position ids, and ``logits_to_keep=1`` (only the last position's logits),
    where its forward takes them. Both backends' decoders build their steps with it."""

    def __init__(self, module: torch.nn.Module) -> None:
        accepted = set(inspect.signature(module.forward).parameters)
        self._takes_positions = "position_ids" in accepted
        self._takes_logits_to_keep = "logits_to_keep" in accepted
        self._takes_use_cache = "use_cache" in accepted

    def without_cache(self, ids: Any, mask: Any, positions: Any) -> dict[str, Any]:
        """The forward over whole sequences, no cache (models whose forward keeps none)."""
        inputs = {"input_ids": ids, "attention_mask": mask}
        if self._takes_positions:
            inputs["position_ids"] = positions
        if self._takes_use_cache:
            inputs["use_cache"] = False
        return inputs

    def __call__(self, ids: Any, mask: Any, cache: Any, positions: Any) -> dict[str, Any]:
        inputs = {"input_ids": ids, "attention_mask": mask, CACHE_KEYWORD: cache, "use_cache": True}
        if self._takes_positions:
            inputs["position_ids"] = positions
        if self._takes_logits_to_keep:
            inputs["logits_to_keep"] = 1
        return inputs


class Backend(ABC):
    """Turns torch modules into compiled forwards on one kind of XLA runtime."""

    name: str

    @abstractmethod
    def platform(self) -> str:
        """Device platform of the default device: "cpu", "gpu" or "tpu"."""

    @abstractmethod
    def device_summary(self) -> list[str]:
        """One line per visible device."""

    @abstractmethod
    def diagnostics(self) -> list[tuple[str, str]]:
        """(label, value) lines for ``ttpu doctor``: fixes applied, caches, kernels."""

    @abstractmethod
    def attention_implementation(self) -> str:
        """Name of the attention implementation this backend registers with transformers."""

    @abstractmethod
    def device_count(self) -> int:
        """Devices of all processes (the size of the global mesh)."""

    @abstractmethod
    def device_memory(self) -> int | None:
        """Bytes of memory of one device, if known."""

    @abstractmethod
    def compile(self, module: torch.nn.Module, plan: ShardingPlan, release_host_weights: bool) -> CompiledForward:
        """Wrap an eval-mode torch module (already in its final dtype), its weights placed
        as ``plan`` says. ``release_host_weights``: free the module's host copy of each
        weight once placed (the module is then only a structure for tracing)."""

    @abstractmethod
    def decoder(self, forward: CompiledForward, module: torch.nn.Module) -> Decoder:
        """The compiled prefill/decode loop of a causal LM (``ttpu.generation``)."""


def host_memory() -> int:
    """Bytes of physical memory on this host (CPU devices share it)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
