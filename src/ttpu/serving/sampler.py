"""Per-request token choice for the serving engine: every row of a step has its own
temperature, top-k, top-p, min-p, penalties and PRNG key as traced values, so any mix of
requests runs in the same compiled program. Only what the step has to compute at all is
static (:class:`SamplerMode`): whether any row filters, applies penalties, or asks for
log-probabilities, so a warm-up compiles every variant up front."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ttpu.backends.jax.sampling import filtered, penalize_repetitions
from ttpu.serving.request import Request

NEG_INF = -jnp.inf
MAX_LOGPROBS = 20  # vLLM's default max_logprobs: the most top tokens a request may ask for


class SamplerMode(NamedTuple):
    """What a step's sampler computes beyond temperature and seeds."""

    draws: bool = False  # any row samples (temperature > 0); else every row is greedy
    filters: bool = False  # top-k, top-p or min-p
    penalties: bool = False  # presence, frequency or repetition
    logprobs: bool = False  # the chosen token's log-probability and the top MAX_LOGPROBS

    @classmethod
    def every(cls) -> list[SamplerMode]:
        """The modes a step can need (filters only matter when a row draws)."""
        flags = (False, True)
        return [cls(d, f, p, lp) for d in flags for f in flags for p in flags for lp in flags if d or not f]


class RowSampling(NamedTuple):
    """Each row's settings ([rows] arrays); ``temperature`` 0 is greedy."""

    temperature: jax.Array
    top_k: jax.Array  # 0: off
    top_p: jax.Array  # 1: off
    min_p: jax.Array  # 0: off
    presence: jax.Array  # 0: off
    frequency: jax.Array  # 0: off
    repetition: jax.Array  # 1: off
    seeds: jax.Array  # [rows] uint32: a request's seed
    steps: jax.Array  # [rows] tokens the request has generated (its draw's index)
    suppressed: jax.Array  # [rows, n] tokens it may not pick yet (EOS and stop tokens before min_tokens), padded past the vocabulary
    history: jax.Array  # [rows, history width] prompt then output tokens, padded past the vocabulary ([rows, 0] without penalties)
    prompt_lens: jax.Array  # [rows] where each row's output starts in ``history``


class SampledTokens(NamedTuple):
    """The chosen tokens and, in a ``logprobs`` mode, their log-probabilities under the
    model's raw distribution, their ranks (1 = the most likely) and the top tokens."""

    tokens: jax.Array  # [rows] int32
    logprobs: jax.Array | None = None  # [rows]
    ranks: jax.Array | None = None  # [rows]
    top_ids: jax.Array | None = None  # [rows, MAX_LOGPROBS] (fewer if the vocabulary is smaller)
    top_logprobs: jax.Array | None = None  # [rows, MAX_LOGPROBS]


def row_sampling(
    requests: Sequence[Request], rows: int, vocab: int, history_width: int, mode: SamplerMode | None = None
) -> tuple[RowSampling, SamplerMode]:
    """The settings of ``requests`` padded to ``rows`` (padding rows greedy), and the
    mode they need (or ``mode``, for a warm-up). ``history_width`` bounds a request's
    tokens (the engine's max_model_len)."""
    settings = np.zeros((10, rows), np.float64)
    settings[[2, 6]] = 1.0
    early = []
    for row, request in enumerate(requests):
        p = request.params
        settings[:, row] = (
            p.temperature, max(p.top_k, 0), p.top_p, p.min_p, p.presence_penalty, p.frequency_penalty,
            p.repetition_penalty, request.seed, len(request.output_token_ids), request.num_tokens,
        )
        stops = set(p.stop_token_ids) | (set() if p.ignore_eos else set(request.eos_token_ids))
        early.append(sorted(stops) if len(request.output_token_ids) < p.min_tokens else [])
    if mode is None:
        draws = bool(np.any(settings[0] > 0))
        mode = SamplerMode(
            draws=draws,
            filters=draws and bool(np.any(settings[1] > 0) or np.any(settings[2] < 1) or np.any(settings[3] > 0)),
            penalties=bool(np.any(settings[4:6] != 0) or np.any(settings[6] != 1)),
            logprobs=any(r.params.logprobs is not None for r in requests),
        )
    width = 4  # a power of two from 4, so the usual EOS and stop-token counts share one program
    while width < max(map(len, early), default=0):
        width *= 2
    suppressed = np.full((rows, width), vocab, np.int32)
    for row, tokens in enumerate(early):
        suppressed[row, : len(tokens)] = tokens
    history = np.full((rows, history_width if mode.penalties else 0), vocab, np.int32)
    prompt_lens = np.zeros(rows, np.int32)
    if mode.penalties:
        for row, request in enumerate(requests):
            history[row, : request.num_tokens] = request.tokens
            prompt_lens[row] = len(request.prompt_token_ids)
    floats = [jnp.asarray(settings[i], jnp.float32) for i in range(7)]
    return RowSampling(
        floats[0], jnp.asarray(settings[1], jnp.int32), floats[2], floats[3], floats[4], floats[5], floats[6],
        jnp.asarray(settings[7], jnp.uint32), jnp.asarray(settings[8], jnp.int32), jnp.asarray(suppressed),
        jnp.asarray(history), jnp.asarray(prompt_lens),
    ), mode


def sample(logits: jax.Array, rows: RowSampling, mode: SamplerMode) -> SampledTokens:
    """The next token of each row of ``logits`` [rows, vocab] (float32): EOS and stop
    tokens suppressed before ``min_tokens``, then penalties, then greedy or temperature
    with top-k, top-p and min-p. Log-probabilities are of the raw logits (vLLM's default)."""
    raw = logits
    row_index = jnp.arange(logits.shape[0])[:, None]
    logits = logits.at[row_index, rows.suppressed].set(NEG_INF, mode="drop")
    if mode.penalties:
        logits = _penalized(logits, rows)
    tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if mode.draws:
        scaled = logits / jnp.maximum(rows.temperature, 1e-6)[:, None]
        if mode.filters:
            scaled = filtered(scaled, top_k=rows.top_k[:, None], top_p=rows.top_p[:, None], min_p=rows.min_p[:, None])
        keys = jax.vmap(lambda seed, step: jax.random.fold_in(jax.random.key(seed), step))(rows.seeds, rows.steps)
        drawn = jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)
        tokens = jnp.where(rows.temperature == 0.0, tokens, drawn)
    if not mode.logprobs:
        return SampledTokens(tokens)
    logprobs = jax.nn.log_softmax(raw, axis=-1)
    chosen = jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
    ranks = 1 + jnp.sum(logprobs > chosen[:, None], axis=-1).astype(jnp.int32)
    top_logprobs, top_ids = jax.lax.top_k(logprobs, min(MAX_LOGPROBS, logprobs.shape[-1]))
    return SampledTokens(tokens, chosen, ranks, top_ids.astype(jnp.int32), top_logprobs)


def _penalized(logits: jax.Array, rows: RowSampling) -> jax.Array:
    """vLLM's penalties: repetition over the prompt and output tokens (as transformers'),
    then frequency (per occurrence) and presence (once) over the output tokens."""
    vocab = logits.shape[-1]
    logits = penalize_repetitions(logits, rows.history, rows.history < vocab, rows.repetition[:, None])
    is_output = jnp.arange(rows.history.shape[1])[None, :] >= rows.prompt_lens[:, None]
    row_index = jnp.arange(logits.shape[0])[:, None]
    counts = jnp.zeros(logits.shape, jnp.float32).at[row_index, rows.history].add(
        is_output.astype(jnp.float32), mode="drop"
    )
    logits = logits - rows.frequency[:, None] * counts
    return logits - rows.presence[:, None] * (counts > 0)
