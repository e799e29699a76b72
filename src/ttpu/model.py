"""TPUModel: a transformers model compiled for an XLA backend, called like the original."""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Iterator
from typing import Any

import ml_dtypes
import numpy as np
import torch
from transformers import GenerationConfig, PretrainedConfig, PreTrainedModel

from ttpu.backends import Backend, CompiledForward
from ttpu.buckets import (
    BucketPolicy,
    PaddedInputs,
    array_namespace,
    pad_inputs,
    padded_axes,
    probe_shapes,
    unpad_outputs,
)
from ttpu.inputs import TOKEN_ID_INPUTS, bind_arguments, check_token_ids, split_inputs
from ttpu.patches import Patch
from ttpu.quantization import QuantizationReport
from ttpu.sharding import ShardingPlan

logger = logging.getLogger(__name__)


class TPUModel:
    """A transformers model running as compiled XLA executables.

    Call it like the torch model: ``model(input_ids=ids, attention_mask=mask)`` with
    numpy, jax or torch inputs. The result is the model's own ``ModelOutput`` type with
    backend arrays (``jax.Array`` on the JAX backend).

    ``sharding`` is the plan its weights, inputs and caches follow (see
    :func:`ttpu.describe_sharding`); batches are padded to a multiple of its data-parallel
    device count so that they split evenly.
    """

    def __init__(
        self,
        torch_module: PreTrainedModel,
        backend: Backend,
        *,
        task: str,
        dtype: torch.dtype,
        tokenizer: Any = None,
        patches: list[Patch] | None = None,
        buckets: BucketPolicy | None = None,
        sharding: ShardingPlan,
        release_host_weights: bool = False,
        quantization: QuantizationReport | None = None,
    ) -> None:
        self.torch_module = torch_module
        self.task = task
        self.dtype = dtype
        self.tokenizer = tokenizer
        self.patches = list(patches or [])
        self.buckets = (buckets or BucketPolicy()).batch_multiple_of(sharding.mesh.data_parallel_size)
        self.sharding = sharding
        self.quantization = quantization  # what was quantized (None: nothing)
        self._backend = backend
        self._forward: CompiledForward = backend.compile(torch_module, sharding, release_host_weights)
        self._decoder: Any = None
        self._padded_axes_cache: dict[Any, list] = {}
        self._accepts_padding_mask = "attention_mask" in _forward_parameters(torch_module)
        # Right-padding the sequence is invisible to causal LMs (no position looks right).
        # Other models (1-D convolutions, pooling, landmarks over the sequence ...) may
        # see it: their first padded call is checked against the exact shape, once.
        self.sequence_padding = "on" if task == "causal-lm" else "verify"

    @property
    def config(self) -> PretrainedConfig:
        return self.torch_module.config

    @property
    def backend(self) -> str:
        return self._backend.name

    @property
    def compiled_forward(self) -> CompiledForward:
        """The backend's compiled forward (its module, placement and executables)."""
        return self._forward

    @property
    def params(self) -> Any:
        """The weights as a pytree of backend arrays (name -> array)."""
        return self._forward.params

    @property
    def compile_count(self) -> int:
        """How many executables this model has compiled (one per bucket and options)."""
        decoder = self._decoder.compile_count if self._decoder is not None else 0
        return self._forward.compile_count + decoder

    @property
    def trace_count(self) -> int | None:
        """How many programs this model traced in this process (not read back from the
        program store); None where the backend traces every call (torch_xla)."""
        counts = [self._forward.trace_count]
        if self._decoder is not None:
            counts.append(self._decoder.trace_count)
        return None if None in counts else sum(counts)

    @functools.cached_property
    def vocabulary_size(self) -> int | None:
        """Rows of the input embedding table: token ids must lie below it (None when the
        model embeds its inputs some other way)."""
        try:
            embeddings = self.torch_module.get_input_embeddings()
        except (NotImplementedError, AttributeError):  # composite models (CLIP, ...) have none
            return None
        # nn.Embedding, or a quantized table (ttpu.quantization.QuantizedEmbedding)
        return getattr(embeddings, "num_embeddings", None)

    @property
    def attn_implementation(self) -> str:
        return self.config._attn_implementation

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        bound = bind_arguments(self.torch_module.forward, args, kwargs)
        float_dtype = ml_dtypes.bfloat16 if self.dtype == torch.bfloat16 else np.dtype(
            str(self.dtype).removeprefix("torch.")
        )
        arrays, constants = split_inputs(bound, self._forward.to_array, float_dtype)
        for name in TOKEN_ID_INPUTS:
            if name in arrays:
                check_token_ids(arrays[name], self.vocabulary_size, name)  # numpy or jax: read as numpy
        output, padded = self._run(arrays, constants, self.sequence_padding != "off")
        if self.sequence_padding == "verify" and padded.sequence != padded.padded_sequence:
            self.sequence_padding = "on" if self._padding_is_invisible(arrays, constants) else "off"
            if self.sequence_padding == "off":
                logger.warning(
                    "%s's outputs change when its sequence is padded to a bucket; sequence "
                    "buckets are off for this model (each new length compiles).",
                    type(self.torch_module).__name__,
                )
                output, _ = self._run(arrays, constants, pad_sequence=False)
        return output

    def generate(
        self,
        input_ids: Any,
        attention_mask: Any = None,
        *,
        generation_config: GenerationConfig | None = None,
        seed: int | None = None,
        tokenizer: Any = None,
        **kwargs: Any,
    ) -> np.ndarray:
        """Generate like ``transformers``' ``model.generate``, compiled end to end.

        Takes left-padded ``input_ids`` (numpy, jax, torch or lists), the model's
        ``generation_config`` as default, a ``GenerationConfig`` and/or its fields as
        keyword arguments (``max_new_tokens``, ``do_sample``, ``temperature``, ``top_k``,
        ``top_p``, ``min_p``, ``repetition_penalty``, ``eos_token_id``, ``stop_strings``,
        ...), and ``seed`` for sampling. Returns int64 token ids [batch, prompt + new]
        as numpy, rows that ended padded with ``pad_token_id``.
        """
        from ttpu.generation.generate import generate

        return generate(
            self, input_ids, attention_mask, generation_config=generation_config,
            seed=seed, tokenizer=tokenizer, **kwargs,
        )

    def stream(self, prompt: str | Any, *, tokenizer: Any = None, **kwargs: Any) -> Iterator[str]:
        """Yield the text of ``prompt``'s continuation (a string, or the token ids of one
        sequence) piece by piece as it is generated; same options as :meth:`generate`."""
        from ttpu.generation.generate import stream

        return stream(self, prompt, tokenizer=tokenizer, **kwargs)

    def decoder(self) -> Any:
        """The compiled prefill/decode loop (built on first use)."""
        if self._decoder is None:
            self._decoder = self._backend.decoder(self._forward, self.torch_module)
        return self._decoder

    def _padding_is_invisible(self, arrays: dict, constants: dict) -> bool:
        """Compare bucket-padded and exact-shape outputs on these inputs, every position
        real (positions the caller padded hold arbitrary values in both)."""
        if "attention_mask" in arrays:
            mask = arrays["attention_mask"]
            arrays = {**arrays, "attention_mask": array_namespace(mask).ones_like(mask)}
        padded, _ = self._run(arrays, constants, pad_sequence=True)
        exact, _ = self._run(arrays, constants, pad_sequence=False)
        def arrays_of(output: Any) -> list[np.ndarray]:
            leaves = self._forward.flatten(output)[0]
            return [self._forward.to_host(x) for x in leaves if hasattr(x, "shape")]

        return _outputs_agree(arrays_of(padded), arrays_of(exact), self.dtype)

    def _run(self, arrays: dict, constants: dict, pad_sequence: bool) -> tuple[Any, PaddedInputs]:
        padded = pad_inputs(
            arrays,
            self.buckets,
            pad_token_id=_pad_token_id(self.config),
            pad_sequence=pad_sequence and self._accepts_padding_mask,
            max_sequence=getattr(self.config, "max_position_embeddings", None),
        )
        output = self._forward(padded.arrays, constants)
        if padded.is_padded:
            leaves, structure = self._forward.flatten(output)
            cut = unpad_outputs(padded, leaves, self._axes_to_cut(padded, constants, leaves))
            output = self._forward.unflatten(structure, cut)
        return output, padded

    def _axes_to_cut(self, padded: PaddedInputs, constants: dict, leaves: list) -> list:
        key = (
            tuple(sorted(constants.items())),
            tuple(sorted(padded.arrays)),
            padded.padded_batch != padded.batch,
            padded.padded_sequence != padded.sequence,
        )
        axes = self._padded_axes_cache.get(key)
        if axes is None or len(axes) != len(leaves):
            probe = self._forward.output_shapes(probe_shapes(padded), constants)
            axes = padded_axes(padded, leaves, self._forward.flatten(probe)[0])
            self._padded_axes_cache[key] = axes
        return axes

    def __repr__(self) -> str:
        return (
            f"TPUModel({type(self.torch_module).__name__}, backend={self.backend!r}, "
            f"task={self.task!r}, dtype={str(self.dtype).removeprefix('torch.')}, "
            f"attention={self.attn_implementation!r})"
        )


PADDING_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-2}


def _outputs_agree(a: list[np.ndarray], b: list[np.ndarray], dtype: torch.dtype) -> bool:
    """Do two outputs' leaves match (relative error within the dtype's tolerance)?"""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if x.shape != y.shape:
            return False
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        scale = np.linalg.norm(y)
        if not np.isfinite(x).all() or np.linalg.norm(x - y) > PADDING_TOLERANCE[dtype] * max(scale, 1e-30):
            return False
    return True


def _pad_token_id(config: PretrainedConfig) -> int | None:
    pad = getattr(config, "pad_token_id", None)
    if pad is None and hasattr(config, "get_text_config"):
        pad = getattr(config.get_text_config(), "pad_token_id", None)
    return pad if isinstance(pad, int) else None


def _forward_parameters(module: torch.nn.Module) -> set[str]:
    return set(inspect.signature(module.forward).parameters)
