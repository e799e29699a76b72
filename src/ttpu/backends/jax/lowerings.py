"""JAX lowerings for torch ops that torchax 0.0.13 cannot run under jit.

Each entry names the op, why it is needed and the test that fails without it. They are
installed into ttpu's torchax environment when the JAX backend starts (never globally at
import time) and are listed by ``ttpu doctor``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import jax.scipy.linalg
import jaxlib
import torch
from packaging.version import Version

from ttpu.backends.jax.attention import scaled_dot_product_attention
from ttpu.backends.jax.environment import to_traced
from ttpu.backends.jax.torchax_compat import import_torchax

torchax = import_torchax()


@dataclass(frozen=True)
class OpLowering:
    op: Any  # a torch OpOverload / OpOverloadPacket
    reason: str
    test: str
    jax_impl: Callable[..., Any]  # takes and returns jax arrays; see view_op
    # True: an in-place op whose impl takes torch-level arguments (torchax Tensors and
    # Views, the environment as ``env``) and mutates its first one.
    view_op: bool = False

    @property
    def name(self) -> str:
        return str(self.op)


def grouped_mm(
    mat_a: jax.Array,
    mat_b: jax.Array,
    offs: jax.Array | None = None,
    bias: jax.Array | None = None,
    out_dtype: Any = None,
) -> jax.Array:
    """``torch._grouped_mm``: rows of ``mat_a`` grouped by cumulative ``offs``.

    The 2D x 3D form (token rows against per-expert weights) is ``lax.ragged_dot``; rows
    past ``offs[-1]`` come out as zeros, as in torch. 3D x 3D is a batched matmul.
    """
    if bias is not None:
        raise NotImplementedError("torch._grouped_mm with bias is not supported by ttpu")
    dtype = out_dtype and torchax.interop.jax_view(out_dtype) or mat_a.dtype
    if mat_a.ndim == 2 and mat_b.ndim == 3 and offs is not None:
        group_sizes = jnp.diff(offs.astype(jnp.int32), prepend=0)
        return jax.lax.ragged_dot(mat_a, mat_b, group_sizes, preferred_element_type=dtype)
    if mat_a.ndim == 3 and mat_b.ndim == 3 and offs is None:
        return jnp.matmul(mat_a, mat_b, preferred_element_type=dtype)
    raise NotImplementedError(
        f"torch._grouped_mm with shapes {mat_a.shape} x {mat_b.shape} "
        f"(offs={'given' if offs is not None else 'none'}) is not supported by ttpu"
    )


def all_true(values: jax.Array) -> jax.Array:
    """``aten._is_all_true``: the value behind ``torch._assert_async``-style checks."""
    return jnp.all(values)


def arange(
    *args: Any,
    start: Any = None,
    end: Any = None,
    step: Any = None,
    dtype: Any = None,
    **placement: Any,  # device, layout, pin_memory, requires_grad: meaningless here
) -> jax.Array:
    """``torch.arange`` with every torch calling form, ``arange(end=n)`` included."""
    given = list(args)
    if start is None and end is None and len(given) == 1:
        start, end = 0, given[0]
    else:
        start = given.pop(0) if start is None and given else start
        end = given.pop(0) if end is None and given else end
        step = given.pop(0) if step is None and given else step
    return jnp.arange(0 if start is None else start, end, 1 if step is None else step, dtype=dtype)


# XLA:CPU multiplies a few rows by an [out, in] weight faster as ``weight @ rows.T`` than as
# ``rows @ weight.T``: before jaxlib 0.10.2 up to about 48 rows (1.4-2x faster; about as fast
# at 64 rows, slower from about 96). From 0.10.2 on, whose YNNPACK kernels take such
# products, only up to about 8: Gemma 3's 262k-row lm_head over 32 rows took 70 ms rows
# first against 86 ms weight first (its transpose included), while generate()
# over 4 prompts ran 71.8 tok/s weight first against 62.7-66.2 rows first (docs/PERFORMANCE.md).
CPU_WEIGHT_FIRST_MAX_ROWS = 48 if Version(jaxlib.__version__) < Version("0.10.2") else 8


def linear(input: jax.Array, weight: jax.Array, bias: jax.Array | None = None) -> jax.Array:
    """``torch.nn.functional.linear``, accepting its arguments by keyword too.

    On CPU a product of at most ``CPU_WEIGHT_FIRST_MAX_ROWS`` rows is computed weight
    first and transposed after; the optimization barrier keeps XLA from folding the
    transpose back into the product."""
    rows = math.prod(input.shape[:-1])
    if jax.default_backend() == "cpu" and rows <= CPU_WEIGHT_FIRST_MAX_ROWS:
        out = jnp.moveaxis(jax.lax.optimization_barrier(jnp.einsum("oi,...i->o...", weight, input)), 0, -1)
    else:
        out = jnp.einsum("...i,oi->...o", input, weight)
    return out if bias is None else out + bias


def copy_into(target: Any, source: Any, non_blocking: bool = False, *, env: Any) -> Any:
    """``Tensor.copy_`` from a torchax View too (torchax's own reads the source's
    ``_elem``, which a View lacks: ``state.copy_(x[..., -k:])``)."""
    if isinstance(source, torchax.view.View):
        source = source.torch()
    elif isinstance(source, torch.Tensor) and not isinstance(source, torchax.tensor.Tensor):
        source = env.to_xla(source)
    current = target.torch()._elem if isinstance(target, torchax.view.View) else target._elem
    value = jnp.broadcast_to(source._elem.astype(current.dtype), current.shape)
    if isinstance(target, torchax.view.View):
        target.update(torchax.tensor.Tensor(value, env))
    else:
        target._elem = value
    return target


def solve_triangular(a: jax.Array, b: jax.Array, *, upper: bool = True, left: bool = True,
                     unitriangular: bool = False) -> jax.Array:
    """``torch.linalg.solve_triangular``; on CPU by forward substitution in a loop over the rows.

    jax lowers a triangular solve on CPU to jaxlib's LAPACK kernel, which in jaxlib 0.10
    splits a batch over XLA:CPU's thread pool and blocks a pool thread waiting for it;
    when every pool thread runs such a kernel (one per device on a multi-device CPU
    mesh) none of them returns. A ``fori_loop`` runs no custom call and compiles one
    small body whatever the size (an unrolled blocked solve made a tiny Qwen3-Next's
    forward compile 4x slower). Other platforms keep jax's own solve, which runs no
    LAPACK kernel there."""
    if not left:  # X A = B is A^T X^T = B^T
        return jnp.matrix_transpose(solve_triangular(jnp.matrix_transpose(a), jnp.matrix_transpose(b),
                                                     upper=not upper, unitriangular=unitriangular))
    if upper:  # reversing the unknowns' order makes an upper triangle lower
        return jnp.flip(_solve_lower(jnp.flip(a, (-2, -1)), jnp.flip(b, -2), unitriangular), -2)
    return _solve_lower(a, b, unitriangular)


def _solve_lower(a: jax.Array, b: jax.Array, unitriangular: bool) -> jax.Array:
    """X with ``a @ X == b``, ``a`` [..., n, n] lower triangular (its other entries unread),
    ``b`` [..., n, k]; batches broadcast."""
    if jax.default_backend() != "cpu":
        return jax.scipy.linalg.solve_triangular(a, b, lower=True, unit_diagonal=unitriangular)
    batch = jnp.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    b = jnp.broadcast_to(b, (*batch, *b.shape[-2:])).astype(jnp.result_type(a, b))
    below = jnp.tril(a, -1)  # rows not solved yet are zeros in x, so a row's product reads only solved ones
    diagonal = jnp.diagonal(a, axis1=-2, axis2=-1)[..., None]

    def solve_row(i: jax.Array, x: jax.Array) -> jax.Array:
        row = jax.lax.dynamic_slice_in_dim(below, i, 1, axis=-2)
        value = jax.lax.dynamic_slice_in_dim(b, i, 1, axis=-2) - jnp.matmul(row, x, precision=jax.lax.Precision.HIGHEST)
        if not unitriangular:
            value = value / jax.lax.dynamic_slice_in_dim(diagonal, i, 1, axis=-2)
        return jax.lax.dynamic_update_slice_in_dim(x, value, i, axis=-2)

    return jax.lax.fori_loop(0, a.shape[-1], solve_row, jnp.zeros_like(b))


LOWERINGS: list[OpLowering] = [
    OpLowering(
        torch.ops.aten._grouped_mm.default,
        "transformers' MoE experts (grouped_mm implementation) call torch._grouped_mm, "
        "which torchax does not lower",
        "tests/test_parity.py::test_matches_eager_pytorch[mixtral]",
        grouped_mm,
    ),
    OpLowering(
        torch.ops.aten._is_all_true.default,
        "`tensor.all()` checks on bool tensors dispatch to aten._is_all_true, which "
        "torchax does not lower",
        "tests/test_lowerings.py::test_is_all_true",
        all_true,
    ),
    OpLowering(
        torch.arange,
        "torchax's torch.arange requires `start` positionally, so `torch.arange(end=n)` "
        "(used by detection models' anchor generators) fails",
        "tests/test_lowerings.py::test_arange_calling_forms",
        arange,
    ),
    OpLowering(
        torch.nn.functional.linear,
        "torchax's F.linear takes its weight positionally only, so "
        "`F.linear(x, weight=w, bias=b)` (I-BERT's quantized linear) fails; on CPU a few rows "
        "are multiplied weight first, faster there (decode steps)",
        "tests/test_lowerings.py::test_linear_by_keyword",
        linear,
    ),
    OpLowering(
        torch.ops.aten.copy_.default,
        "torchax's copy_ reads its source's array directly, which a View (a slice) lacks: "
        "transformers' linear-attention caches copy a slice into their conv state",
        "tests/test_lowerings.py::test_copy_from_a_slice",
        copy_into,
        view_op=True,
    ),
    OpLowering(
        torch.ops.aten.linalg_solve_triangular.default,
        "torchax's solve_triangular runs jaxlib's LAPACK kernel on CPU, which deadlocks XLA:CPU's thread "
        "pool when every device runs it at once (gated delta nets under data parallelism: Qwen3-Next, Qwen3.5)",
        "tests/test_lowerings.py::test_solve_triangular_runs_no_lapack_kernel",
        solve_triangular,
    ),
    *(
        OpLowering(
            sdpa,
            "models that keep torch's SDPA (no AttentionInterface support) get ttpu's "
            "attention kernel; torchax's reference SDPA turns fully masked padding rows "
            "into NaN, which leaks into real positions in later layers",
            "tests/test_lowerings.py::test_sdpa_with_padding_rows_stays_finite",
            scaled_dot_product_attention,
        )
        for sdpa in (
            torch.nn.functional.scaled_dot_product_attention,
            torch.ops.aten.scaled_dot_product_attention,
        )
    ),
]


def type_as(self: Any, other: torch.Tensor) -> Any:
    """``Tensor.type_as``: a converted copy (torchax 0.0.13's converts ``self`` in place
    and reads ``other``'s array, which a View lacks)."""
    return self.to(other.dtype)


@contextlib.contextmanager
def tensor_method_fixes() -> Iterator[None]:
    """torchax Tensor methods that bypass op dispatch, fixed while ttpu traces (and
    restored afterwards: other torchax users in the process keep torchax's own)."""
    original = torchax.tensor.Tensor.type_as
    torchax.tensor.Tensor.type_as = type_as
    try:
        yield
    finally:
        torchax.tensor.Tensor.type_as = original


def _as_torch_op(jax_impl: Callable[..., Any]) -> Callable[..., Any]:
    view_jax = torchax.interop.jax_view

    def impl(*args: Any, **kwargs: Any) -> Any:
        return to_traced(jax_impl(*view_jax(args), **view_jax(kwargs)))

    return impl


def install_lowerings(env: Any) -> list[OpLowering]:
    """Register every lowering in the torchax environment ``env`` (idempotent)."""
    for lowering in LOWERINGS:
        if lowering.view_op:
            impl = lowering.jax_impl
            env.override_op_definition(lowering.op, lambda *a, _impl=impl, **k: _impl(*a, **k, env=env), is_view_op=True)
        else:
            env.override_op_definition(lowering.op, _as_torch_op(lowering.jax_impl))
    return LOWERINGS
