"""The serving engine's side of sampling: the settings of a step's requests as the
rows of the one sampler (:mod:`ttpu.backends.jax.sampling`), every value traced, so any
mix of requests runs in the same compiled program; only what the step has to compute
at all is static (its :class:`SamplerMode`), so a warm-up compiles every variant up front."""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from ttpu.backends.jax.sampling import Processors, RowSampling, SamplerMode
from ttpu.serving.request import Request


def row_sampling(
    requests: Sequence[Request], rows: int, vocab: int, history_width: int,
    processors: Processors = Processors(), mode: SamplerMode | None = None,
) -> tuple[RowSampling, SamplerMode]:
    """The settings of ``requests`` padded to ``rows`` (padding rows greedy), and the
    mode they need with the engine's ``processors`` (or ``mode``, for a warm-up).
    ``history_width`` bounds a request's tokens (the engine's max_model_len)."""
    settings = np.zeros((12, rows), np.float64)
    settings[[2, 6]] = 1.0
    stops = []
    for row, request in enumerate(requests):
        p = request.params
        prompt = len(request.prompt_token_ids)
        settings[:, row] = (
            p.temperature, max(p.top_k, 0), p.top_p, p.min_p, p.presence_penalty, p.frequency_penalty,
            p.repetition_penalty, request.seed, len(request.output_token_ids), p.min_tokens,
            p.max_tokens or history_width - prompt, prompt,
        )
        early = len(request.output_token_ids) < p.min_tokens  # only then are they suppressed: listed
        stops.append(sorted(set(p.stop_token_ids) | (set() if p.ignore_eos else set(request.eos_token_ids))) if early else [])
    if mode is None:
        draws = bool(np.any(settings[0] > 0))
        mode = SamplerMode(
            draws=draws,
            filters=draws and bool(np.any(settings[1] > 0) or np.any(settings[2] < 1) or np.any(settings[3] > 0)),
            penalties=bool(np.any(settings[4:6] != 0) or np.any(settings[6] != 1)),
            logprobs=any(r.params.logprobs is not None for r in requests),
            processors=processors,
        )
    width = 4  # a power of two from 4, so the usual EOS and stop-token counts share one program
    while width < max(map(len, stops), default=0):
        width *= 2
    stop_ids = np.full((rows, width), vocab, np.int32)
    for row, tokens in enumerate(stops):
        stop_ids[row, : len(tokens)] = tokens
    history = np.full((rows, history_width if mode.reads_history else 0), vocab, np.int32)
    if mode.reads_history:
        for row, request in enumerate(requests):
            history[row, : request.num_tokens] = request.tokens
    floats = [jnp.asarray(settings[i], jnp.float32) for i in range(7)]
    ints = [jnp.asarray(settings[i], jnp.int32) for i in (1, 8, 9, 10, 11)]
    return RowSampling(
        floats[0], ints[0], floats[2], floats[3], floats[4], floats[5], floats[6],
        jnp.asarray(settings[7], jnp.uint32), ints[1], jnp.asarray(stop_ids), ints[2], ints[3],
        jnp.asarray(history), jnp.zeros(rows, jnp.int32), ints[4],
    ), mode
