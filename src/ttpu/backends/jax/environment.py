"""ttpu's torchax environment: where torch ops run as JAX while a model is traced.

It differs from torchax's default environment in one way. A forward often builds small
CPU tensors from Python values (``torch.tensor(kernel - stride)``, ``torch.arange(n)``)
and uses them both in Python control flow and in math with the traced activations.
torchax's default refuses the math ("mixed math between XLATensor and torch.Tensor").
Here such a tensor stays a concrete CPU tensor, so control flow on it keeps working, and
becomes a jax constant only where it meets traced values. Writing traced values into a
CPU tensor in place cannot be represented that way and raises a clear error instead.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.utils._pytree as torch_pytree

from ttpu.backends.jax.torchax_compat import import_torchax

torchax = import_torchax()
_TRACED_TYPES = (torchax.tensor.Tensor, torchax.view.View)


class TracingEnvironment(torchax.tensor.Environment):
    """torchax environment that lifts CPU tensors into constants where they meet traced ones."""

    def dispatch(self, func: Any, types: Any, args: Any, kwargs: Any) -> Any:
        _refuse_inplace_into_cpu_tensor(func, args, kwargs)
        args, kwargs = self._lift_where_mixed((args, kwargs or {}))
        return super().dispatch(func, types, args, kwargs)

    def _lift_where_mixed(self, operands: Any) -> Any:
        """Plain CPU tensors among traced operands become constants of the program (an op
        on CPU tensors alone still runs eagerly, so its result stays concrete)."""
        leaves = torch_pytree.tree_leaves(operands)
        if not any(isinstance(leaf, _TRACED_TYPES) for leaf in leaves):
            return operands
        return torch_pytree.tree_map_only(torch.Tensor, self._lift, operands)

    def _lift(self, value: torch.Tensor) -> torch.Tensor:
        if isinstance(value, _TRACED_TYPES) or value.ndim == 0:
            return value  # scalars become Python numbers in torchax already
        return torchax.tensor.Tensor(cpu_to_jax(value), self)


def cpu_to_jax(tensor: torch.Tensor) -> Any:
    """Copy a CPU torch tensor (any dtype, bf16 included) into a jax array."""
    return torchax.ops.mappings.t2j(tensor.cpu(), use_dlpack=False)


def _refuse_inplace_into_cpu_tensor(func: Any, args: Any, kwargs: Any) -> None:
    schema = getattr(func, "_schema", None)
    if schema is None or not schema.is_mutable or not args:
        return
    target = args[0]
    if not isinstance(target, torch.Tensor) or isinstance(target, _TRACED_TYPES):
        return
    leaves = torch_pytree.tree_leaves((args[1:], kwargs or {}))
    if any(isinstance(leaf, _TRACED_TYPES) for leaf in leaves):
        raise TypeError(
            f"{func} writes traced values into a CPU tensor in place, which cannot be "
            "traced; the model should create that tensor on the input's device "
            "(device=hidden_states.device)."
        )


@functools.cache
def tracing_environment() -> TracingEnvironment:
    """The one environment ttpu traces models in (op lowerings are installed in it)."""
    return TracingEnvironment()


def to_traced(value: Any) -> Any:
    """Wrap jax arrays (anywhere in a pytree) as traced torch tensors of ttpu's environment."""
    return tracing_environment().j2t_iso(value)
