"""ttpu's JAX lowerings of ops torchax lacks match torch's own kernels."""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest
import torch

from ttpu.backends import get_backend
from ttpu.backends.jax import lowerings
from ttpu.backends.jax.environment import to_traced, tracing_environment
from ttpu.backends.jax.torchax_compat import import_torchax

torchax = import_torchax()
get_backend("jax")  # installs the lowerings


def jitted(fn):
    """``fn`` (torch in, torch out) as a jitted function of jax arrays, traced in ttpu's environment."""
    env = tracing_environment()

    def traced(*jax_arrays):
        with env:
            return torchax.interop.jax_view(fn(*to_traced(jax_arrays)))

    return jax.jit(traced)


def run_traced(fn, *arrays: np.ndarray) -> np.ndarray:
    return np.asarray(jitted(fn)(*arrays))


def test_grouped_mm_matches_torch_including_rows_past_the_last_offset() -> None:
    rng = np.random.default_rng(0)
    tokens = rng.standard_normal((10, 8), np.float32)
    experts = rng.standard_normal((3, 8, 5), np.float32)
    offsets = np.array([2, 2, 7], np.int32)  # an empty group, and 3 trailing rows
    expected = np.zeros((10, 5), np.float32)
    start = 0
    for group, end in enumerate(offsets):
        expected[start:end] = tokens[start:end] @ experts[group]
        start = end
    actual = run_traced(torch._grouped_mm, tokens, experts, offsets)
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)


def test_grouped_mm_batched_form() -> None:
    rng = np.random.default_rng(1)
    a = rng.standard_normal((3, 4, 8), np.float32)
    b = rng.standard_normal((3, 8, 5), np.float32)
    np.testing.assert_allclose(run_traced(torch._grouped_mm, a, b), a @ b, rtol=1e-5, atol=1e-5)


def test_is_all_true() -> None:
    for values in ([True, True], [True, False]):
        actual = run_traced(torch.ops.aten._is_all_true, np.array(values))
        assert bool(actual) is all(values)


def test_every_lowering_names_its_reason_and_test() -> None:
    for lowering in lowerings.LOWERINGS:
        assert lowering.reason and lowering.test.startswith("tests/")


def test_arange_calling_forms() -> None:
    forms = [
        ((5,), {}),
        ((2, 9), {}),
        ((2, 9, 3), {}),
        ((), {"end": 4}),
        ((1,), {"end": 4}),
        ((), {"start": 1, "end": 7, "step": 2}),
        ((0.0, 1.0, 0.25), {}),
    ]
    for args, kwargs in forms:
        expected = torch.arange(*args, **kwargs).numpy()
        actual = run_traced(lambda x: torch.arange(*args, **kwargs, device="jax") + 0 * x.sum(), np.zeros(1, np.float32))
        np.testing.assert_allclose(actual, expected, err_msg=f"arange{args, kwargs}")



@pytest.mark.parametrize(
    ("is_causal", "mask_kind"),
    [(False, "none"), (True, "none"), (False, "bool"), (False, "additive")],
)
def test_sdpa_matches_torch(is_causal: bool, mask_kind: str) -> None:
    rng = np.random.default_rng(2)
    q = rng.standard_normal((2, 4, 5, 8), np.float32)
    k = rng.standard_normal((2, 4, 5, 8), np.float32)
    v = rng.standard_normal((2, 4, 5, 6), np.float32)
    masks = {
        "none": None,
        "bool": rng.random((2, 1, 5, 5)) > 0.3,
        "additive": np.where(rng.random((2, 1, 5, 5)) > 0.3, 0, -1e4).astype(np.float32),
    }
    mask = masks[mask_kind]
    if mask is not None:
        mask[..., 0] = 0 if mask.dtype != bool else True  # keep every row attending somewhere
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def call(q, k, v, *m):
        return sdpa(q, k, v, attn_mask=m[0] if m else None, is_causal=is_causal)

    arrays = (q, k, v) if mask is None else (q, k, v, mask)
    expected = call(*map(torch.from_numpy, arrays)).numpy()
    np.testing.assert_allclose(run_traced(call, *arrays), expected, rtol=1e-5, atol=1e-5)


def test_sdpa_with_padding_rows_stays_finite() -> None:
    q = np.ones((1, 2, 3, 4), np.float32)
    mask = np.zeros((1, 1, 3, 3), np.float32)
    mask[..., 0, :] = -np.inf  # a padding row that attends to nothing
    out = run_traced(
        lambda q, m: torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=m), q, mask
    )
    assert np.isfinite(out).all()


def test_linear_by_keyword() -> None:
    rng = np.random.default_rng(3)
    x, w, b = (rng.standard_normal(s, np.float32) for s in ((2, 3, 4), (5, 4), (5,)))
    for call in (
        lambda x, w, b: torch.nn.functional.linear(x, weight=w, bias=b),
        lambda x, w, b: torch.nn.functional.linear(x, w),
    ):
        expected = call(*map(torch.from_numpy, (x, w, b))).numpy()
        np.testing.assert_allclose(run_traced(call, x, w, b), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("weight_first_max_rows", [8, 48])
@pytest.mark.parametrize("leading", [(1,), (2, 16), (49,), (4, 64)])
def test_linear_on_cpu_puts_the_weight_first_for_few_rows(
    leading: tuple[int, ...], weight_first_max_rows: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Up to ``CPU_WEIGHT_FIRST_MAX_ROWS`` rows (48 before jaxlib 0.10.2, 8 after) run
    as ``weight @ rows.T``, more as ``rows @ weight.T``; both give torch's numbers."""
    monkeypatch.setattr(lowerings, "CPU_WEIGHT_FIRST_MAX_ROWS", weight_first_max_rows)
    rng = np.random.default_rng(5)
    x, w, b = (rng.standard_normal(s, np.float32) for s in ((*leading, 24), (40, 24), (40,)))
    call = torch.nn.functional.linear
    expected = call(*map(torch.from_numpy, (x, w, b))).numpy()
    np.testing.assert_allclose(run_traced(call, x, w, b), expected, rtol=1e-5, atol=1e-5)
    program = jitted(call).lower(x, w, b).as_text()
    assert ("optimization_barrier" in program) == (math.prod(leading) <= weight_first_max_rows)


def test_copy_from_a_slice() -> None:
    """Linear-attention caches copy the last columns of a longer state into their own."""

    def keep_last_two(state: torch.Tensor, longer: torch.Tensor) -> torch.Tensor:
        state = state.clone()
        state.copy_(longer[..., -2:])
        head = state[..., :1]
        head.copy_(longer[..., :1] * 10)  # into a view of the target too
        return state

    state = np.zeros((2, 3, 2), np.float32)
    longer = np.arange(2 * 3 * 5, dtype=np.float32).reshape(2, 3, 5)
    expected = keep_last_two(torch.from_numpy(state), torch.from_numpy(longer)).numpy()
    np.testing.assert_array_equal(run_traced(keep_last_two, state, longer), expected)


def test_type_as_a_slice_converts_a_copy() -> None:
    """Gemma 3n's norms call ``x.type_as(hidden)`` on a slice; torchax's own type_as
    converted ``x`` in place and failed on a View."""

    def convert(x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        converted = x.type_as(other[:, :1])
        return converted + x.to(torch.float32) * 0.5  # x itself unchanged

    x = np.arange(6, dtype=np.int32).reshape(2, 3)
    other = np.zeros((2, 3), np.float32)
    with lowerings.tensor_method_fixes():
        actual = run_traced(convert, x, other)
    np.testing.assert_array_equal(actual, convert(torch.from_numpy(x), torch.from_numpy(other)).numpy())


@pytest.mark.parametrize("upper", [False, True])
@pytest.mark.parametrize("left", [True, False])
@pytest.mark.parametrize("unitriangular", [False, True])
@pytest.mark.parametrize("n", [7, 1])
def test_solve_triangular_runs_no_lapack_kernel(n: int, upper: bool, left: bool, unitriangular: bool) -> None:
    """torch's answer, batches broadcast, an odd size; the program calls no LAPACK kernel
    (jaxlib 0.10's deadlocks XLA:CPU's thread pool when every device of a mesh runs it)."""
    rng = np.random.default_rng(1)
    a = rng.standard_normal((3, 1, n, n), np.float32) + 4 * np.eye(n, dtype=np.float32)  # well conditioned
    b = rng.standard_normal((2, n, 5) if left else (2, 5, n), np.float32)

    def solve(a, b):
        return torch.linalg.solve_triangular(a, b, upper=upper, left=left, unitriangular=unitriangular)

    expected = solve(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    np.testing.assert_allclose(run_traced(solve, a, b), expected, rtol=1e-5, atol=1e-5)
    program = jitted(solve).lower(a, b).compile().as_text()
    assert "custom_call_target" not in program
