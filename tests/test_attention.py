"""The "ttpu" attention equals transformers' eager attention, feature by feature."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from ttpu.backends import get_backend
from ttpu.backends.jax.attention import ATTENTION_NAME, dot_product_attention

get_backend("jax")


def eager_reference(q, k, v, mask, scale, softcap=None, sinks=None) -> np.ndarray:
    """Plain torch attention, as transformers' eager implementations compute it."""
    q, k, v = map(torch.from_numpy, (q, k, v))
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = q @ k.transpose(-1, -2) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        mask = torch.from_numpy(mask)
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min) if mask.dtype == torch.bool else scores + mask
    if sinks is not None:
        sink = torch.from_numpy(sinks).reshape(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
        probs = torch.softmax(torch.cat([scores, sink], -1), -1)[..., :-1]
    else:
        probs = torch.softmax(scores, -1)
    return (probs @ v).transpose(1, 2).numpy()


def inputs(q_heads=8, kv_heads=2, q_len=5, kv_len=7):
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, q_heads, q_len, 16), np.float32)
    k = rng.standard_normal((2, kv_heads, kv_len, 16), np.float32)
    v = rng.standard_normal((2, kv_heads, kv_len, 16), np.float32)
    causal = np.tril(np.ones((q_len, kv_len), bool), kv_len - q_len)
    mask = np.broadcast_to(causal, (2, 1, q_len, kv_len)).copy()
    mask[1, :, :, :2] = False  # padding
    return q, k, v, mask


@pytest.mark.parametrize(
    ("q_heads", "kv_heads", "softcap", "with_sinks"),
    [(8, 8, None, False), (8, 2, None, False), (8, 1, None, False), (8, 2, 5.0, False), (8, 2, None, True)],
    ids=["mha", "gqa", "mqa", "softcap", "sinks"],
)
def test_matches_eager(q_heads, kv_heads, softcap, with_sinks) -> None:
    q, k, v, mask = inputs(q_heads, kv_heads)
    sinks = np.linspace(-1, 1, q_heads).astype(np.float32) if with_sinks else None
    expected = eager_reference(q, k, v, mask, 0.25, softcap, sinks)
    actual = dot_product_attention(
        *map(jnp.asarray, (q, k, v, mask)), scale=0.25, softcap=softcap,
        sinks=None if sinks is None else jnp.asarray(sinks),
    )
    np.testing.assert_allclose(np.asarray(actual), expected, rtol=1e-5, atol=1e-5)


def test_additive_float_mask_and_per_head_mask() -> None:
    q, k, v, mask = inputs()
    additive = np.where(np.broadcast_to(mask, (2, 8, 5, 7)), 0.0, -1e9).astype(np.float32)
    expected = eager_reference(q, k, v, additive, 0.25)
    actual = dot_product_attention(*map(jnp.asarray, (q, k, v, additive)), scale=0.25)
    np.testing.assert_allclose(np.asarray(actual), expected, rtol=1e-5, atol=1e-5)


def test_registered_with_both_interfaces() -> None:
    assert ATTENTION_NAME in AttentionInterface().valid_keys()
    assert ATTENTION_NAME in AttentionMaskInterface._global_mapping


def test_mask_function_never_skips_the_causal_mask() -> None:
    mask_fn = AttentionMaskInterface._global_mapping[ATTENTION_NAME]
    mask = mask_fn(batch_size=1, q_length=4, kv_length=4, allow_is_causal_skip=True)
    assert mask is not None and mask.dtype == torch.bool
    assert torch.equal(mask[0, 0], torch.tril(torch.ones(4, 4, dtype=torch.bool)))


@pytest.mark.parametrize("additive", [False, True], ids=["boolean-mask", "additive-mask"])
def test_sparse_key_indices_restrict_attention(additive: bool) -> None:
    """DSA's ``indices`` (each query's chosen keys; -1 chooses none) through the
    registered attention: eager attention under the mask restricted to them."""
    import torchax

    q, k, v, mask = inputs(q_len=7, kv_len=7)
    indices = np.stack([np.arange(7) // 2, np.arange(7), np.full(7, -1)], axis=-1)[None].repeat(2, 0)  # [2, 7, 3]
    allowed = np.zeros((2, 1, 7, 8), bool)
    np.put_along_axis(allowed[:, 0], np.where(indices >= 0, indices, 7), True, axis=-1)
    allowed = allowed[..., :7]
    expected = eager_reference(q, k, v, mask & allowed, 0.25)
    given = np.where(mask, 0.0, np.finfo(np.float32).min).astype(np.float32) if additive else mask
    forward = AttentionInterface()[ATTENTION_NAME]
    with torchax.default_env():
        tensors = [torch.from_numpy(a).to("jax") for a in (q, k, v, given, indices)]
        out, _ = forward(torch.nn.Module(), *tensors[:4], scaling=0.25, indices=tensors[4])
        actual = np.asarray(torchax.interop.jax_view(out))
    np.testing.assert_allclose(actual.transpose(0, 2, 1, 3), expected.transpose(0, 2, 1, 3), rtol=1e-5, atol=1e-5)
