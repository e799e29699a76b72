"""Sampling filters agree with transformers' logits processors, and draws stay inside them."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from ttpu.generation.config import GenerationSettings
from ttpu.backends.jax.sampling import draw_logits, generation_sampling, greedy_tokens, sample

VOCAB = 16
DRAWS = 20000


def choose(
    logits: np.ndarray, settings: GenerationSettings, seen: np.ndarray | None = None, generated: int = 0
) -> np.ndarray:
    """The sampler's tokens for ``logits`` [rows, vocab] under ``settings``, after the
    tokens ``seen`` [rows, n] (-1: padding) with ``generated`` of them new."""
    mode, rows, processors = generation_sampling(settings, len(logits), VOCAB, seed=0)
    seen = np.zeros((len(logits), 0), np.int32) if seen is None else seen
    rows = rows._replace(
        steps=jnp.full(len(logits), generated, jnp.int32), history=jnp.asarray(np.where(seen < 0, VOCAB, seen)),
        prompt_lens=jnp.full(len(logits), seen.shape[1] - generated, jnp.int32),
    )
    return np.asarray(sample(jnp.asarray(logits), rows, mode, processors).tokens)


def logits_rows(rows: int = 3) -> np.ndarray:
    return np.random.default_rng(0).normal(0, 2, (rows, VOCAB)).astype(np.float32)


def transformers_filter(logits: np.ndarray, settings: GenerationSettings) -> np.ndarray:
    processors = [TemperatureLogitsWarper(settings.temperature)]
    if settings.top_k:
        processors.append(TopKLogitsWarper(settings.top_k))
    if settings.top_p < 1:
        processors.append(TopPLogitsWarper(settings.top_p))
    if settings.min_p:
        processors.append(MinPLogitsWarper(settings.min_p))
    scores = torch.from_numpy(logits)
    for processor in processors:
        scores = processor(None, scores)
    return scores.numpy()


FILTERS = {
    "top_k": dict(top_k=4),
    "top_p": dict(top_p=0.7),
    "top_k+top_p": dict(top_k=6, top_p=0.5),
    "min_p": dict(min_p=0.2),
    "temperature+top_p": dict(temperature=0.5, top_p=0.9),
}


@pytest.mark.parametrize("options", FILTERS.values(), ids=FILTERS.keys())
def test_filters_keep_the_same_tokens_as_transformers(options) -> None:
    settings = GenerationSettings(max_new_tokens=1, do_sample=True, **options)
    logits = logits_rows()
    mode, rows, _ = generation_sampling(settings, len(logits), VOCAB, seed=0)
    ours = np.asarray(draw_logits(jnp.asarray(logits), rows, mode))
    theirs = transformers_filter(logits, settings)
    np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(theirs))
    kept = np.isfinite(theirs)
    np.testing.assert_allclose(ours[kept], theirs[kept], rtol=1e-6)


@pytest.mark.parametrize("options", [dict(top_k=3), dict(top_p=0.6)], ids=["top_k", "top_p"])
def test_draws_stay_in_the_allowed_set_with_the_right_frequencies(options) -> None:
    settings = GenerationSettings(max_new_tokens=1, do_sample=True, **options)
    logits = np.repeat(logits_rows(1), DRAWS, axis=0)
    draws = choose(logits, settings)  # row i draws with seed i
    allowed = transformers_filter(logits[:1], settings)[0]
    assert np.isfinite(allowed[draws]).all(), "a draw fell outside the allowed set"
    expected = np.exp(allowed - allowed[np.isfinite(allowed)].max())
    expected /= expected.sum()
    observed = np.bincount(draws, minlength=VOCAB) / DRAWS
    assert np.abs(observed - expected).max() < 0.02
    assert np.count_nonzero(observed) == np.count_nonzero(expected)


def test_repetition_penalty_matches_transformers() -> None:
    settings = GenerationSettings(max_new_tokens=1, repetition_penalty=1.3)
    logits = logits_rows(2)
    seen = np.array([[1, 5, 5, 9], [-1, -1, 2, 3]])  # row 1 is left-padded
    ours = choose(logits, settings, seen)
    processor = RepetitionPenaltyLogitsProcessor(1.3)
    for row, real in enumerate(seen >= 0):
        history = torch.from_numpy(seen[row][real][None])
        penalized = processor(history, torch.from_numpy(logits[row : row + 1])).numpy()
        assert ours[row] == penalized.argmax()


def test_min_new_tokens_holds_back_eos() -> None:
    settings = GenerationSettings(max_new_tokens=5, min_new_tokens=2, eos_token_ids=(3, 7))
    logits = np.zeros((1, VOCAB), np.float32)
    logits[0, 7], logits[0, 3], logits[0, 11] = 9.0, 8.0, 1.0
    pick = lambda generated: int(choose(logits, settings, np.full((1, generated + 1), 4), generated)[0])
    assert pick(0) == 11 and pick(1) == 11 and pick(2) == 7


def test_per_row_filters_equal_the_static_ones_row_by_row() -> None:
    """The serving engine's per-row settings ([rows, 1]) filter each row as generate's
    static/scalar settings filter it: one definition of top-k, top-p and min-p."""
    from ttpu.backends.jax.sampling import filtered

    logits = jnp.asarray(np.random.default_rng(0).normal(size=(3, 50)) * 3, jnp.float32)
    settings = [(5, 0.9, 0.0), (0, 0.5, 0.1), (20, 1.0, 0.05)]
    per_row = filtered(
        logits, top_k=jnp.asarray([[k] for k, _, _ in settings]), top_p=jnp.asarray([[p] for _, p, _ in settings]),
        min_p=jnp.asarray([[m] for _, _, m in settings]),
    )
    for row, (k, p, m) in enumerate(settings):
        alone = filtered(logits[row : row + 1], top_k=k or None, top_p=jnp.float32(p), min_p=jnp.float32(m))
        np.testing.assert_array_equal(np.asarray(per_row[row]), np.asarray(alone[0]))


@pytest.mark.parametrize("candidates", [4, 256], ids=["cut-past-the-candidates", "cut-among-them"])
def test_per_row_filters_keep_transformers_tokens_whether_or_not_the_cut_passes_the_candidates(
    candidates: int, monkeypatch
) -> None:
    """Rows of mixed settings over 300 tokens: with 4 candidates most cuts reach past them
    (the whole-vocabulary bisection), with 256 few do; both keep the tokens transformers'
    warpers keep, row by row."""
    from ttpu.backends.jax import sampling

    monkeypatch.setattr(sampling, "MAX_CANDIDATES", candidates)
    rng = np.random.default_rng(1)
    vocab = 300
    settings = [(0, 0.9, 0.0), (3, 1.0, 0.0), (40, 0.8, 0.0), (0, 1.0, 0.05), (7, 0.5, 0.1), (0, 0.3, 0.0),
                (0, 1.0, 0.0), (290, 0.99, 0.0)]
    logits = rng.normal(0, 2, (len(settings), vocab)).astype(np.float32)
    logits[1, :50] = -np.inf  # tokens other processors removed
    ours = np.asarray(sampling.filtered(
        jnp.asarray(logits), top_k=jnp.asarray([[k] for k, _, _ in settings]),
        top_p=jnp.asarray([[p] for _, p, _ in settings], jnp.float32),
        min_p=jnp.asarray([[m] for _, _, m in settings], jnp.float32),
    ))
    for row, (k, p, m) in enumerate(settings):
        scores = torch.from_numpy(logits[row : row + 1])
        for warper, on in ((TopKLogitsWarper(max(k, 1)), k > 0), (TopPLogitsWarper(p), p < 1), (MinPLogitsWarper(m), m > 0)):
            if on:
                scores = warper(None, scores)
        np.testing.assert_array_equal(np.isfinite(ours[row]), np.isfinite(scores[0].numpy()), err_msg=f"row {row}")


def test_draws_over_a_large_vocabulary_follow_the_distribution() -> None:
    """The two-level inverse-CDF draw over 1000 tokens (not a power of two: the last block
    padded): every draw is an allowed token, at the softmax's frequencies."""
    from ttpu.backends.jax.sampling import categorical

    vocab, draws = 1000, 20000
    logits = np.full(vocab, -np.inf, np.float32)
    allowed = np.array([3, 31, 32, 500, 998, 999])
    logits[allowed] = [0.5, 2.0, 1.0, 0.0, 1.5, -1.0]
    tokens = np.asarray(categorical(jax.random.split(jax.random.key(0), draws), jnp.asarray(np.tile(logits, (draws, 1)))))
    assert np.isin(tokens, allowed).all()
    expected = np.exp(logits[allowed] - logits[allowed].max())
    expected /= expected.sum()
    observed = np.array([(tokens == t).mean() for t in allowed])
    assert np.abs(observed - expected).max() < 0.015


def test_a_draw_never_lands_on_zero_mass_however_the_sums_round() -> None:
    """XLA's cumulative sums are not computed in order: a zero-mass block's sum can differ
    from the one before it, and a target between them must still pick positive mass."""
    from ttpu.backends.jax.sampling import _first_reaching

    cumulative = jnp.asarray([[0.5, 0.50000006, 1.0], [0.5, 0.5, 0.99999994]], jnp.float32)
    mass = jnp.asarray([[0.5, 0.0, 0.5], [0.5, 0.0, 0.5]], jnp.float32)
    target = jnp.asarray([0.50000003, 1.0], jnp.float32)  # inside the rounding gap; past the (rounded) total
    assert np.asarray(_first_reaching(cumulative, mass, target)).tolist() == [2, 2]


def test_a_row_far_from_the_candidates_does_not_change_the_cut_of_another(monkeypatch) -> None:
    from ttpu.backends.jax import sampling

    monkeypatch.setattr(sampling, "MAX_CANDIDATES", 4)
    logits = jnp.asarray(np.random.default_rng(2).normal(0, 1, (2, 100)), jnp.float32)
    alone = sampling.filtered(logits[:1], top_k=jnp.asarray([[2]]), top_p=jnp.asarray([[0.7]], jnp.float32))
    beside = sampling.filtered(logits, top_k=jnp.asarray([[2], [0]]), top_p=jnp.asarray([[0.7], [0.95]], jnp.float32))
    np.testing.assert_array_equal(np.asarray(alone[0]), np.asarray(beside[0]))  # row 1 took the bisection


def test_a_bad_word_longer_than_the_sequence_bans_nothing() -> None:
    settings = GenerationSettings(max_new_tokens=2, bad_words_ids=((5, 5, 9),), prompt_length=1)
    logits = np.zeros((1, VOCAB), np.float32)
    logits[0, 9] = 5.0
    assert choose(logits, settings, np.array([[5]]))[0] == 9  # one token: the prefix [5, 5] does not fit
    assert choose(logits, settings, np.array([[5, 5]]), generated=1)[0] != 9


def test_any_integer_seed_is_taken() -> None:
    for seed in (-1, 2**70):
        _, rows, _ = generation_sampling(GenerationSettings(max_new_tokens=1, do_sample=True), 2, VOCAB, seed)
        assert rows.seeds.dtype == jnp.uint32


@pytest.mark.parametrize("vocab", [300, 1024, 1500], ids=["under-a-block", "whole-blocks", "a-part-block"])
def test_greedy_tokens_are_argmax_without_the_banned_stop_tokens(vocab: int) -> None:
    """The two-level choice equals ``jnp.argmax`` over the logits with each banned row's
    stop tokens at -inf: ties (the first wins), a banned stop token as the best, two stop
    tokens in one block, a stop id twice, ids outside the vocabulary (padding), a row all
    -inf; no stop ids at all; one row."""
    rng = np.random.default_rng(vocab)
    rows = 10
    logits = rng.standard_normal((rows, vocab)).astype(np.float32).round(1)  # many ties
    stop_ids = np.stack([rng.integers(0, vocab, rows), rng.integers(0, vocab, rows), np.full(rows, vocab)], axis=1)
    stop_ids[3, 1] = stop_ids[3, 0] ^ 1  # two stop tokens of one block
    stop_ids[4, 1] = stop_ids[4, 0]
    stop_ids[8] = [1, 2, -1]  # an id outside the vocabulary, below it
    logits[np.arange(rows), stop_ids[:, 0]] = 9.0  # the best token is a stop token
    logits[np.arange(rows), stop_ids[:, 1]] = 8.0
    logits[5, vocab - 1] = 9.0  # the last token ties the stop token (in the last block)
    logits[8, vocab - 1], logits[8, 3] = 9.5, 9.2  # the best token, last of the last block
    logits[7] = -np.inf
    banned = np.arange(rows) % 2 == 0
    for ban in (banned, ~banned):
        masked = logits.copy()
        for row in np.flatnonzero(ban):
            ids = stop_ids[row]
            masked[row, ids[(ids >= 0) & (ids < vocab)]] = -np.inf
        for chosen in (slice(None), slice(2, 3)):
            for ids in (stop_ids, stop_ids[:, :0]):
                expected = jnp.argmax(jnp.asarray(masked if ids.shape[1] else logits)[chosen], axis=-1)
                actual = jax.jit(greedy_tokens)(*(jnp.asarray(a[chosen]) for a in (logits, ids.astype(np.int32), ban)))
                np.testing.assert_array_equal(actual, expected)
