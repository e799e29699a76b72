"""Per-request token choice for the serving engine: every row of a step has its own
temperature, top-k, top-p, min-p and PRNG key as traced values, so any mix of requests
runs in the same compiled program (only "does any row filter" is static)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ttpu.serving.request import Request

NEG_INF = -jnp.inf


class RowSampling(NamedTuple):
    """Each row's settings ([rows] arrays); ``temperature`` 0 is greedy."""

    temperature: jax.Array
    top_k: jax.Array  # 0: off
    top_p: jax.Array  # 1: off
    min_p: jax.Array  # 0: off
    seeds: jax.Array  # [rows] uint32: a request's seed
    steps: jax.Array  # [rows] tokens the request has generated (its draw's index)
    suppressed: jax.Array  # [rows, n] tokens it may not pick yet (EOS and stop tokens before min_tokens), padded past the vocabulary


def row_sampling(requests: Sequence[Request], rows: int, vocab: int) -> tuple[RowSampling, bool]:
    """The settings of ``requests`` padded to ``rows`` (padding rows greedy), and whether
    any row filters (top-k/top-p/min-p)."""
    settings = np.zeros((6, rows), np.float64)
    settings[2] = 1.0
    early = []
    for row, request in enumerate(requests):
        p = request.params
        settings[:, row] = (p.temperature, max(p.top_k, 0), p.top_p, p.min_p, request.seed, len(request.output_token_ids))
        stops = set(p.stop_token_ids) | (set() if p.ignore_eos else set(request.eos_token_ids))
        early.append(sorted(stops) if len(request.output_token_ids) < p.min_tokens else [])
    width = 4  # a power of two from 4, so the usual EOS and stop-token counts share one program
    while width < max(map(len, early), default=0):
        width *= 2
    suppressed = np.full((rows, width), vocab, np.int32)
    for row, tokens in enumerate(early):
        suppressed[row, : len(tokens)] = tokens
    filters = bool(np.any(settings[1] > 0) or np.any(settings[2] < 1) or np.any(settings[3] > 0))
    return RowSampling(
        jnp.asarray(settings[0], jnp.float32), jnp.asarray(settings[1], jnp.int32), jnp.asarray(settings[2], jnp.float32),
        jnp.asarray(settings[3], jnp.float32), jnp.asarray(settings[4], jnp.uint32), jnp.asarray(settings[5], jnp.int32),
        jnp.asarray(suppressed),
    ), filters


def sample(logits: jax.Array, rows: RowSampling, filters: bool) -> jax.Array:
    """The next token of each row of ``logits`` [rows, vocab] (float32)."""
    row_index = jnp.arange(logits.shape[0])[:, None]
    logits = logits.at[row_index, rows.suppressed].set(NEG_INF, mode="drop")
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits / jnp.maximum(rows.temperature, 1e-6)[:, None]
    if filters:
        scaled = _filtered(scaled, rows)
    keys = jax.vmap(lambda seed, step: jax.random.fold_in(jax.random.key(seed), step))(rows.seeds, rows.steps)
    drawn = jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)
    return jnp.where(rows.temperature == 0.0, greedy, drawn)


def _filtered(logits: jax.Array, rows: RowSampling) -> jax.Array:
    """Top-k, then top-p, then min-p, per row (removed tokens get -inf)."""
    descending = -jnp.sort(-logits, axis=-1)
    vocab = logits.shape[-1]
    kth = jnp.take_along_axis(descending, jnp.clip(rows.top_k - 1, 0, vocab - 1)[:, None], axis=-1)
    logits = jnp.where((rows.top_k[:, None] > 0) & (logits < kth), NEG_INF, logits)
    descending = jnp.where((rows.top_k[:, None] > 0) & (descending < kth), NEG_INF, descending)
    probs = jax.nn.softmax(descending, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of the better tokens
    kept = jnp.sum(before < rows.top_p[:, None], axis=-1, keepdims=True)  # at least the top token
    cutoff = jnp.take_along_axis(descending, jnp.maximum(kept - 1, 0), axis=-1)
    logits = jnp.where(logits < cutoff, NEG_INF, logits)
    probs = jax.nn.softmax(logits, axis=-1)
    floor = rows.min_p[:, None] * jnp.max(probs, axis=-1, keepdims=True)
    return jnp.where(probs < floor, NEG_INF, logits)
