"""JAX backend: a torch module becomes (params pytree, pure jitted function) via torchax."""

from __future__ import annotations

import contextlib
import os
import traceback
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.utils._pytree as torch_pytree
from tqdm.auto import tqdm
from transformers.utils import logging as transformers_logging

from ttpu.backends.base import Backend, CompiledForward, Decoder, host_memory
from ttpu.backends.jax import attention, compile_cache, lowerings, pytrees, torchax_compat
from ttpu.backends.jax.environment import cpu_to_jax, tracing_environment
from ttpu.backends.jax.executables import Executables
from ttpu.backends.jax.placement import Placement
from ttpu.backends.jax.program_store import model_context, open_store
from ttpu.backends.jax.torchax_compat import import_torchax
from ttpu.backends.jax.warm_up import WarmUp
from ttpu.errors import CompilationError
from ttpu.logs import progress_enabled
from ttpu.paths import program_cache_dir
from ttpu.patches import tracing_scope
from ttpu.sharding import ShardingPlan
from ttpu.weights import convert_weights, host_dtype

torchax = import_torchax()

Constants = tuple[tuple[str, Any], ...]


class JaxBackend(Backend):
    """Runs transformers modules as jitted JAX functions (XLA on TPU, GPU or CPU)."""

    name = "jax"

    def __init__(self) -> None:
        attention.register_attention()
        compile_cache.enable_persistent_cache()
        self.lowerings = lowerings.install_lowerings(tracing_environment())

    def platform(self) -> str:
        return jax.default_backend()

    def device_summary(self) -> list[str]:
        return [f"{d.platform}:{d.id} {d.device_kind}" for d in jax.devices()]

    def diagnostics(self) -> list[tuple[str, str]]:
        fix = "applied" if torchax_compat.needs_named_overload_fix() else "not needed"
        return [
            ("torchax fix", f"torch 2.13 named-overload import fix {fix}"),
            ("xla cache", str(compile_cache.compile_cache_dir() or "off")),
            ("programs", str(program_cache_dir() or "off") + " (traced programs, jax.export)"),
        ]

    def attention_implementation(self) -> str:
        return attention.ATTENTION_NAME

    def device_count(self) -> int:
        return jax.device_count()

    def device_memory(self) -> int | None:
        device = jax.local_devices()[0]
        stats = device.memory_stats() if device.platform != "cpu" else None
        if stats and "bytes_limit" in stats:
            return int(stats["bytes_limit"])
        return host_memory() // jax.local_device_count()  # CPU devices share the host's

    def compile(self, module: torch.nn.Module, plan: ShardingPlan, release_host_weights: bool) -> JaxForward:
        return JaxForward(module, Placement(plan), release_host_weights)

    def decoder(self, forward: CompiledForward, module: torch.nn.Module) -> Decoder:
        from ttpu.backends.jax.decoder import JaxDecoder  # it imports this module

        return JaxDecoder(forward, module)


class JaxForward(CompiledForward):
    """The module's forward as ahead-of-time compiled XLA executables, one per signature.

    Array inputs are traced; constants (Python bools, ints, strings, None) are baked in.
    An executable is compiled once per (constants, input structure, shapes, dtypes).
    Weights are placed as ``placement`` says, one tensor at a time; with
    ``release_host_weights`` the torch module's copy of each is freed once placed.
    """

    def __init__(self, module: torch.nn.Module, placement: Placement, release_host_weights: bool) -> None:
        pytrees.register_transformers_pytrees()
        self._env = tracing_environment()
        self._module = module
        self.placement = placement
        with _quiet_attribute_scan():
            self._jittable = torchax.interop.JittableModule(module)
        _drop_computed_tensors(self._jittable.buffers, module)
        _keep_small_buffers_constant(self._jittable.buffers, module)
        _share_tied_frozen_weights(self._jittable)
        self._buffer_names = frozenset(self._jittable.buffers)
        weights = {**self._jittable.params, **self._jittable.buffers}
        self._jittable.params.clear()  # the placed arrays replace them
        self._jittable.buffers.clear()
        described = {
            name: jax.ShapeDtypeStruct(tuple(t.shape), host_dtype(t.dtype), sharding=placement.weight_sharding(name))
            for name, t in weights.items()
        }
        self.program_store = open_store(model_context(module, described, self._buffer_names))
        warm_up = None
        if self.program_store is not None:  # last time's programs compile while the weights are placed
            warm_up = self.program_store.warm_up = WarmUp(self.program_store, described, placement.mesh)
        hidden = None if progress_enabled() else True
        with tqdm(total=len(weights), desc="placing weights", unit="tensor", disable=hidden, leave=False) as progress:
            def place(name: str, host: np.ndarray) -> jax.Array:
                progress.update()
                return placement.weight(name, host)

            try:
                self._params = convert_weights(module, weights, place, release_host_weights)
            except BaseException:
                if warm_up is not None:
                    warm_up.cancel()
                raise
        if warm_up is not None:
            warm_up.weights_placed(self._params)
        self._executables = Executables(
            self._forward, static_argnums=(2,), out_shardings=placement.output_sharding(),
            name="forward", store=self.program_store,
        )

    @property
    def params(self) -> dict[str, jax.Array]:
        return self._params

    @property
    def compile_count(self) -> int:
        return len(self._executables)

    @property
    def trace_count(self) -> int:
        """How many programs of the forward were traced (not read from the program store)."""
        return self._executables.traces

    def to_array(self, value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return _to_jax(value.detach())
        if isinstance(value, (np.ndarray, jax.Array, np.generic)):
            return jnp.asarray(value)
        return jax.tree.map(self.to_array, value)

    def __call__(self, arrays: Mapping[str, Any], constants: Mapping[str, Any]) -> Any:
        return self._executables(self._params, self._placed(arrays), _freeze(constants))

    def flatten(self, output: Any) -> tuple[list[Any], Any]:
        return jax.tree.flatten(output)

    def unflatten(self, structure: Any, leaves: list[Any]) -> Any:
        return jax.tree.unflatten(structure, leaves)

    def to_host(self, value: Any) -> np.ndarray:
        return self.placement.to_host(value)

    def compiled_text(self, arrays: Mapping[str, Any], constants: Mapping[str, Any]) -> str:
        """The optimised HLO the compiler produced for these inputs (collectives, fusions)."""
        return self._executables.compiled(self._params, self._placed(arrays), _freeze(constants)).as_text()

    def _placed(self, arrays: Mapping[str, Any]) -> dict[str, Any]:
        """Inputs laid out as the plan says (``ShardingPlan.input_specs``)."""
        per_input = [jax.tree.flatten(value) for value in arrays.values()]
        leaves = [leaf for values, _ in per_input for leaf in values]
        specs = iter(self.placement.plan.input_specs([np.shape(leaf) for leaf in leaves]))
        return {
            name: jax.tree.unflatten(tree, [self.placement.put(leaf, next(specs)) for leaf in values])
            for name, (values, tree) in zip(arrays, per_input)
        }

    def output_shapes(self, arrays: Mapping[str, Any], constants: Mapping[str, Any]) -> Any:
        return self._executables.output_shapes(self._params, dict(arrays), _freeze(constants))

    def _forward(self, params: dict[str, jax.Array], arrays: dict[str, Any], constants: Constants):
        out = self.call_traced(params, {**self._env.j2t_iso(arrays), **dict(constants)})
        return torch_pytree.tree_map_only(torch.Tensor, _to_jax, out)

    def call_traced(self, params: dict[str, jax.Array], inputs: dict[str, Any], training: bool = False) -> Any:
        """The module's forward on torch-side inputs (traced tensors, caches, constants),
        inside a jax trace; returns the torch-side output. Building block of larger
        compiled programs such as the generation loop and the train step. ``training``:
        the module runs in training mode (dropout, gradient checkpointing), gradients
        enabled as torch sees it; jax does the differentiation."""
        env = self._env
        weights = env.j2t_iso(params)
        buffers = {k: weights.pop(k) for k in self._buffer_names}
        scopes = (
            env, torch.enable_grad() if training else torch.no_grad(), _training_mode(self._module, training),
            _value_checks_off(), tracing_scope(self._module), _module_state_kept(self._module),
            lowerings.tensor_method_fixes(),
        )
        with contextlib.ExitStack() as stack, _module_tracker() as modules:
            for scope in scopes:
                stack.enter_context(scope)
            try:
                out = self._jittable.functional_call("forward", weights, buffers, **inputs)
            except Exception as exc:
                raise CompilationError(_describe_failure(exc, modules)) from exc
        pytrees.register_types_in(out)  # output classes of modules imported during the trace
        return out


def _drop_computed_tensors(buffers: dict[str, torch.Tensor], module: torch.nn.Module) -> None:
    """Forget tensors that torchax's attribute scan found behind read-only properties.

    They are computed from real weights, and cannot be swapped in for tracing.
    """
    for name in list(buffers):
        owner_path, _, attribute = name.rpartition(".")
        owner = module.get_submodule(owner_path)
        if isinstance(getattr(type(owner), attribute, None), property):
            del buffers[name]


def _share_tied_frozen_weights(jittable: Any) -> None:
    """One entry per tensor among the frozen weights too. torchax keeps one name of a
    tensor tied under several names (an embedding and its LM head) only among trainable
    parameters; frozen ones (a PEFT base, quantized tables) would be placed twice. The
    other names are filled back in at each call, as torchax does for parameters."""
    first_name = {id(tensor): name for name, tensor in jittable.params.items()}
    for name, tensor in list(jittable.buffers.items()):
        kept = first_name.setdefault(id(tensor), name)
        if kept != name:
            del jittable.buffers[name]
            jittable._extra_dumped_weights.setdefault(kept, []).append(name)


# Buffers up to this many elements are compile-time constants; larger ones are traced.
MAX_CONSTANT_BUFFER_ELEMENTS = 1 << 16


def _keep_small_buffers_constant(buffers: dict[str, torch.Tensor], module: torch.nn.Module) -> None:
    """Buffers (rotary frequencies, shape constants, schedules) are fixed at inference and
    models use them in Python arithmetic and control flow. Left out of the traced inputs,
    they stay concrete module attributes: compile-time constants, lifted into the program
    where they meet traced values. Parameters are weights and always traced, frozen ones
    too (torchax files parameters without requires_grad among its buffers)."""
    parameters = {name for name, _ in module.named_parameters(remove_duplicate=False)}
    for name, buffer in list(buffers.items()):
        if name not in parameters and buffer.numel() <= MAX_CONSTANT_BUFFER_ELEMENTS:
            del buffers[name]


@contextlib.contextmanager
def _quiet_attribute_scan() -> Iterator[None]:
    """torchax finds weights by reading every attribute of every module, which trips
    deprecation warnings and transformers' log messages from properties: silence them."""
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        transformers_logging.set_verbosity(verbosity)


def _to_jax(t: torch.Tensor) -> jax.Array:
    """A torchax tensor's array, or a copy of a CPU tensor (any dtype, bf16 included)."""
    if hasattr(t, "jax"):  # torchax Tensor or View
        return t.jax()
    return cpu_to_jax(t)


def _freeze(constants: Mapping[str, Any]) -> Constants:
    return tuple(sorted(constants.items()))


# transformers' switch for its value assertions (torch_compilable_check): a compiled
# program cannot raise on a traced value, so they are skipped while tracing, as under
# torch.compile. transformers reads it from the environment, so it is set for the
# duration of each trace only (process-wide while it lasts: another thread running
# transformers eagerly meanwhile would skip its checks too).
DISABLE_VALUE_CHECKS_ENV = "TRANSFORMERS_DISABLE_TORCH_CHECK"


@contextlib.contextmanager
def _value_checks_off() -> Iterator[None]:
    previous = os.environ.get(DISABLE_VALUE_CHECKS_ENV)
    os.environ[DISABLE_VALUE_CHECKS_ENV] = "1"
    try:
        yield
    finally:
        if previous is None:
            del os.environ[DISABLE_VALUE_CHECKS_ENV]
        else:
            os.environ[DISABLE_VALUE_CHECKS_ENV] = previous


@contextlib.contextmanager
def _training_mode(module: torch.nn.Module, training: bool) -> Iterator[None]:
    """Every submodule in training (or eval) mode while tracing, as they were after."""
    modes = [(m, m.training) for m in module.modules()]
    module.train(training)
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


@contextlib.contextmanager
def _module_state_kept(module: torch.nn.Module) -> Iterator[None]:
    """Undo tensors a forward caches on its modules (``self.table = self.table.to(device)``
    in GPT-J, random masks ...): left in place they would be traced values of this trace,
    leaking into every later one."""
    saved = [(m, dict(m._buffers), _tensor_attributes(m)) for m in module.modules()]
    try:
        yield
    finally:
        for m, buffers, attributes in saved:
            m._buffers.clear()
            m._buffers.update(buffers)
            for name in _tensor_attributes(m).keys() - attributes.keys():
                delattr(m, name)
            m.__dict__.update(attributes)


def _tensor_attributes(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in vars(module).items() if isinstance(v, torch.Tensor)}


@contextlib.contextmanager
def _module_tracker() -> Iterator[list[str]]:
    """Track which modules are running (outermost first), so a failure can name them."""
    stack: list[str] = []

    def enter(module: torch.nn.Module, *args: Any) -> None:
        stack.append(type(module).__name__)

    def leave(module: torch.nn.Module, *args: Any) -> None:
        if stack:
            stack.pop()

    pre = torch.nn.modules.module.register_module_forward_pre_hook(enter)
    post = torch.nn.modules.module.register_module_forward_hook(leave)
    try:
        yield stack
    finally:
        pre.remove()
        post.remove()


def _describe_failure(exc: Exception, modules: list[str]) -> str:
    where = " > ".join(modules) or "the model's forward"
    return (
        f"could not trace the model for XLA: {type(exc).__name__}: {exc}\n"
        f"  failing module: {where}\n"
        f"  failing line: {_model_source_line(exc)}\n"
        "  run `ttpu doctor MODEL` for the backend, attention and patches in use."
    )


def _model_source_line(exc: Exception) -> str:
    """The innermost frame of transformers' code in the traceback, as file:line: code."""
    frames = [
        f for f in traceback.extract_tb(exc.__traceback__) if "/transformers/" in f.filename
    ]
    if not frames:
        return "unknown"
    frame = frames[-1]
    return f"{Path(frame.filename).name}:{frame.lineno}: {(frame.line or '').strip()}"
