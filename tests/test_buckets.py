"""Bucket padding and the rules that cut outputs back to the real shapes."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ttpu.buckets import BucketPolicy, PaddedInputs, pad_inputs, padded_axes, unpad_outputs


def test_round_up_to_the_next_bucket_and_respect_the_limit() -> None:
    policy = BucketPolicy()
    assert policy.round_up(17, policy.sequence) == 32
    assert policy.round_up(16, policy.sequence) == 16
    assert policy.round_up(100, policy.sequence, limit=120) == 100  # 128 is past the limit
    assert policy.round_up(3, None) == 3


def test_pad_inputs_pads_sequence_inputs_and_repeats_the_last_row() -> None:
    ids = jnp.arange(1, 7).reshape(2, 3)
    padded = pad_inputs(
        {"input_ids": ids, "labels": ids}, BucketPolicy(sequence=(4,), batch=(4,)),
        pad_token_id=9, pad_sequence=True, max_sequence=None,
    )
    arrays = padded.arrays
    assert arrays["input_ids"].shape == (4, 4) and (arrays["input_ids"][:2, 3] == 9).all()
    assert (arrays["attention_mask"][:2] == jnp.array([[1, 1, 1, 0], [1, 1, 1, 0]])).all()
    assert (arrays["input_ids"][3] == arrays["input_ids"][1]).all()  # repeated row
    assert (arrays["labels"][2:] == -100).all() and (arrays["labels"][:2, 3] == -100).all()


def test_axes_that_move_with_batch_or_sequence_are_cut_keeping_offsets() -> None:
    padded = PaddedInputs({}, batch=3, padded_batch=4, sequence=24, padded_sequence=32)
    shape = jax.ShapeDtypeStruct
    actual = {
        "tokens": jnp.zeros((4, 33, 8)),  # a prepended class token: sequence + 1
        "pooled": jnp.zeros((4, 8)),
        "flat": jnp.zeros((4 * 32, 8)),  # batch * sequence: left padded
    }
    probe = {"tokens": shape((5, 32, 8), jnp.float32), "pooled": shape((5, 8), jnp.float32),
             "flat": shape((5 * 31, 8), jnp.float32)}
    leaves, structure = jax.tree.flatten(actual)
    axes = padded_axes(padded, leaves, jax.tree.leaves(probe))
    cut = jax.tree.unflatten(structure, unpad_outputs(padded, leaves, axes))
    assert cut["tokens"].shape == (3, 25, 8)
    assert cut["pooled"].shape == (3, 8)
    assert cut["flat"].shape == (128, 8)
    assert dict(zip(sorted(actual), axes))["flat"] == ()


def test_numpy_inputs_are_padded_as_numpy() -> None:
    """The torch_xla backend pads on the host."""
    import numpy as np

    ids = np.arange(1, 7).reshape(2, 3)
    padded = pad_inputs({"input_ids": ids}, BucketPolicy(sequence=(4,), batch=(4,)),
                        pad_token_id=0, pad_sequence=True, max_sequence=None)
    assert all(isinstance(a, np.ndarray) for a in padded.arrays.values())
    np.testing.assert_array_equal(padded.arrays["attention_mask"][0], [1, 1, 1, 0])
    np.testing.assert_array_equal(padded.arrays["input_ids"][3], [4, 5, 6, 0])
