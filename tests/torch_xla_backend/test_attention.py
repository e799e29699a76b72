"""The torch_xla backend's attention: the fused fallback's numerics, and which kernel
each call gets (the Pallas flash kernel itself runs on TPU only)."""

from __future__ import annotations

import pytest
import torch

from ttpu.backends.torch_xla import attention


def reference(query, key, value, mask, scale, softcap=None, sinks=None):
    """Plain per-head attention with repeated KV heads, in float64."""
    groups = query.shape[1] // key.shape[1]
    key, value = (x.repeat_interleave(groups, dim=1).double() for x in (key, value))
    scores = query.double() @ key.transpose(-1, -2) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, float("-inf"))
    if sinks is not None:
        sink = sinks.double()[None, :, None, None].expand(*scores.shape[:-1], 1)
        probs = torch.softmax(torch.cat([scores, sink], -1), -1)[..., :-1]
    else:
        probs = torch.softmax(scores, -1)
    return (probs @ value).transpose(1, 2).float()


@pytest.mark.parametrize("softcap, sinks", [(None, None), (20.0, None), (None, torch.tensor([0.5, -1.0, 2.0, 0.0]))])
def test_fallback_matches_reference_with_gqa_softcap_and_sinks(softcap, sinks) -> None:
    g = torch.Generator().manual_seed(0)
    query = torch.randn(2, 4, 5, 8, generator=g)
    key, value = torch.randn(2, 2, 7, 8, generator=g), torch.randn(2, 2, 7, 8, generator=g)
    mask = torch.ones(2, 1, 5, 7, dtype=torch.bool).tril(diagonal=2)
    mask[0, :, :, :3] = False  # left padding of the first row
    mask[0, :, :, 3] = True
    expected = reference(query, key, value, mask, 0.3, softcap, sinks)
    actual = attention.dot_product_attention(query, key, value, mask, 0.3, softcap, sinks)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    additive = torch.zeros(mask.shape).masked_fill(~mask, attention.MASK_MIN)
    torch.testing.assert_close(
        attention.dot_product_attention(query, key, value, additive, 0.3, softcap, sinks), expected, rtol=1e-5, atol=1e-5
    )


def test_flash_only_on_tpu_for_long_queries_without_softcap_or_sinks() -> None:
    long = attention.FLASH_MIN_QUERY
    assert attention.kernel_for("tpu", long, None, None) == "flash"
    assert attention.kernel_for("tpu", 1, None, None) == "xla"  # a decode step
    assert attention.kernel_for("tpu", long, 30.0, None) == "xla"
    assert attention.kernel_for("tpu", long, None, torch.zeros(4)) == "xla"
    for platform in ("cpu", "gpu"):
        assert attention.kernel_for(platform, long, None, None) == "xla"
    assert "TPU only" in attention.describe("cpu") and "flash" in attention.describe("tpu")


def test_the_flash_kernel_is_importable_here() -> None:
    """Its TPU path is untested on these machines; the import it needs must work."""
    from torch_xla.experimental.custom_kernel import flash_attention

    assert callable(flash_attention)
