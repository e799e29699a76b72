"""torch_xla backend: the torch module itself runs on an XLA device as lazy tensors.

Each call traces the forward into a lazy graph, which ``torch_xla.sync()`` compiles (once
per graph shape, cached) and runs. Inputs arrive padded to ttpu's buckets, so nearby
shapes share one compiled graph, as on the JAX backend.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import ml_dtypes
import numpy as np
import torch
import torch.utils._pytree as torch_pytree

from ttpu.backends.base import Backend, CompiledForward, Decoder, host_memory
from ttpu.backends.torch_xla import attention
from ttpu.backends.torch_xla.versions import import_torch_xla
from ttpu.patches import tracing_scope
from ttpu.paths import compile_cache_dir
from ttpu.sharding import ShardingPlan
from ttpu.weights import host_view

os.environ.setdefault("PJRT_DEVICE", "CPU")  # torch_xla's own default, without its warning
torch_xla = import_torch_xla()
import torch_xla.core.xla_model as xm  # noqa: E402
import torch_xla.debug.metrics as metrics  # noqa: E402
import torch_xla.distributed.spmd as xs  # noqa: E402
import torch_xla.runtime as xr  # noqa: E402


class TorchXlaBackend(Backend):
    """Runs transformers modules on torch_xla's XLA devices (TPU, GPU or CPU via PJRT)."""

    name = "torch_xla"

    def __init__(self) -> None:
        attention.register_attention()
        self.compile_cache = _enable_persistent_cache()

    def platform(self) -> str:
        kind = xr.device_type().lower()
        return {"cuda": "gpu"}.get(kind, kind)

    def device_summary(self) -> list[str]:
        return [f"{xr.device_type().lower()}:{i}" for i in range(xr.global_runtime_device_count())]

    def diagnostics(self) -> list[tuple[str, str]]:
        return [
            ("graphs", "lazy tensors: one graph per input shape, compiled by torch_xla.sync() and cached"),
            ("kernels", attention.describe(self.platform())),
            ("moe experts", f"transformers' {EXPERTS_IMPLEMENTATION} (static shapes) where a model has experts"),
            ("xla cache", self.compile_cache),
        ]

    def attention_implementation(self) -> str:
        return attention.ATTENTION_NAME

    def device_count(self) -> int:
        return xr.global_runtime_device_count()

    def device_memory(self) -> int | None:
        if self.platform() == "cpu":
            return host_memory() // xr.global_runtime_device_count()
        try:
            return int(xm.get_memory_info(torch_xla.device())["bytes_limit"])
        except (KeyError, RuntimeError, TypeError):
            return None

    def compile(self, module: torch.nn.Module, plan: ShardingPlan, release_host_weights: bool) -> XlaForward:
        return XlaForward(module, plan, release_host_weights)

    def decoder(self, forward: CompiledForward, module: torch.nn.Module) -> Decoder:
        from ttpu.backends.torch_xla.decoder import XlaDecoder  # it imports this module

        return XlaDecoder(forward)


class XlaForward(CompiledForward):
    """The module's forward on the XLA device; ``compile_count`` counts the graphs torch_xla
    compiled during this forward's calls.

    A sharded plan runs under torch_xla's SPMD mode (process-wide, switched on here before
    any weight reaches the device): one ``xs.Mesh`` of the plan's axes over every device,
    each parameter marked with the spec the rules engine gave it, inputs split along the
    batch. XLA's sharding propagation does the rest, as on the JAX backend.
    """

    def __init__(self, module: torch.nn.Module, plan: ShardingPlan, release_host_weights: bool) -> None:
        self._mesh = None if plan.single_device else _spmd_mesh(plan)
        self.plan = plan
        self.device = torch_xla.device()
        # A module the caller passed in keeps its weights on the host: move a copy.
        self._module = module if release_host_weights else copy.deepcopy(module)
        _use_static_shape_experts(self._module)
        self._module.to(self.device)
        if hasattr(self._module, "tie_weights"):
            self._module.tie_weights()  # moving to an XLA device unties shared weights
        if self._mesh is not None:
            for name, parameter in self._module.named_parameters():
                found = plan.parameters.get(name)
                if found is not None and any(found.spec):
                    xs.mark_sharding(parameter, self._mesh, found.spec)
        torch_xla.sync()  # weights materialised: the first forward's graph is the steady one
        self._takes_use_cache = "use_cache" in inspect.signature(self._module.forward).parameters
        self._compiles = 0

    @property
    def mesh(self) -> Any:
        """torch_xla's ``xs.Mesh`` of the plan (None on a single device)."""
        return self._mesh

    @property
    def module(self) -> torch.nn.Module:
        """The module on the XLA device (the caller's own, or a copy for from_model)."""
        return self._module

    @property
    def params(self) -> dict[str, torch.Tensor]:
        return dict(self._module.state_dict())

    @property
    def compile_count(self) -> int:
        return self._compiles

    def to_array(self, value: Any) -> Any:
        """Inputs are padded on the host, as numpy, and moved to the device per call."""
        if isinstance(value, torch.Tensor):
            return self.to_host(value)
        return np.asarray(value)

    def to_host(self, value: Any) -> np.ndarray:
        return host_view(value.detach().cpu())

    def flatten(self, output: Any) -> tuple[list[Any], Any]:
        return torch_pytree.tree_flatten(output)

    def unflatten(self, structure: Any, leaves: list[Any]) -> Any:
        return torch_pytree.tree_unflatten(leaves, structure)

    def __call__(self, arrays: Mapping[str, Any], constants: Mapping[str, Any]) -> Any:
        with self.counting_compiles() as compiled:
            output = self._run(arrays, constants)
            torch_xla.sync()
        self._compiles += compiled()
        return output

    @staticmethod
    @contextlib.contextmanager
    def counting_compiles() -> Iterator[Callable[[], int]]:
        """Yields a function that counts the graphs torch_xla compiled since the block began."""
        before = _compile_total()
        yield lambda: _compile_total() - before

    def output_shapes(self, arrays: Mapping[str, Any], constants: Mapping[str, Any]) -> Any:
        """Traced lazily, never compiled nor run: the lazy tensors know their shapes."""
        return self._run(arrays, constants)

    def _run(self, arrays: Mapping[str, Any], constants: Mapping[str, Any]) -> Any:
        if self._takes_use_cache and "use_cache" not in constants:
            # No KV cache unless asked for: transformers' dynamic sliding-window layers
            # slice before the start of a short sequence, which torch clamps and torch_xla
            # refuses. Generation brings its own static cache.
            constants = {**constants, "use_cache": False}
        hosts = [np.asarray(value) for value in arrays.values()]
        specs = self.plan.input_specs([host.shape for host in hosts])
        with torch.no_grad(), tracing_scope(self._module):
            return self._module(
                **{name: self.place(host, spec) for name, host, spec in zip(arrays, hosts, specs)}, **constants
            )

    def place(self, value: np.ndarray, spec: tuple | None = None) -> torch.Tensor:
        """A host array on the device; under SPMD split as ``spec`` says (default: along
        its first axis, the batch)."""
        value = np.asarray(value)
        if value.dtype == ml_dtypes.bfloat16:
            tensor = torch.from_numpy(value.view(np.int16)).view(torch.bfloat16).to(self.device)
        else:
            tensor = torch.from_numpy(value).to(self.device)
        if self._mesh is not None and value.ndim:
            spec = self.plan.batch_spec(value.shape) if spec is None else spec
            if any(spec):
                xs.mark_sharding(tensor, self._mesh, spec)
        return tensor

    def shard_kv_cache(self, cache: Any) -> None:
        """Split a transformers static cache's keys and values as the plan says (its
        arrays arrive from the prefill with whatever sharding XLA propagated)."""
        if self._mesh is None:
            return
        xm.wait_device_ops()  # the prefill that filled them has run
        for layer in cache.layers:
            for tensor in (layer.keys, layer.values):
                xs.clear_sharding(tensor)
                xs.mark_sharding(tensor, self._mesh, self.plan.kv_cache_spec(tensor.shape))


# transformers' MoE experts implementation for torch_xla: each token gathers its experts'
# weights (static shapes). The default, grouped_mm, sorts tokens by expert and counts them
# with torch.histc on integers, which torch_xla cannot run.
EXPERTS_IMPLEMENTATION = "batched_mm"


def _use_static_shape_experts(module: torch.nn.Module) -> None:
    can_set = getattr(module, "_can_set_experts_implementation", None)
    if can_set is not None and can_set():
        module.set_experts_implementation(EXPERTS_IMPLEMENTATION)


def _spmd_mesh(plan: ShardingPlan) -> Any:
    """torch_xla's mesh for ``plan`` (SPMD mode on; it cannot be switched off again)."""
    if not xr.is_spmd():
        xr.use_spmd()
    return xs.Mesh(np.arange(plan.mesh.device_count), plan.mesh.sizes, plan.mesh.names)


def _enable_persistent_cache() -> str:
    """torch_xla's persistent compilation cache under ttpu's (it can only be switched on
    before the first computation of the process); says where, or why not."""
    directory = compile_cache_dir()
    if directory is None:
        return "off"
    if torch_xla._XLAC._xla_computation_cache_is_initialized():
        return f"not set: torch_xla ran before ttpu (cache {os.environ.get('XLA_PERSISTENT_CACHE_PATH', 'none')})"
    path = directory / "torch_xla"
    path.mkdir(parents=True, exist_ok=True)
    xr.initialize_cache(str(path))
    return str(path)


def _compile_total() -> int:
    data = metrics.metric_data("CompileTime")
    return int(data[0]) if data else 0

