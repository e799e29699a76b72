"""Choosing the next token in JAX, with transformers' logits processors semantics.

Order as in ``transformers``: repetition penalty, repeated n-grams (of the whole
sequence, of the prompt), bad words, minimum new tokens (EOS suppressed), forced BOS and EOS tokens, suppressed tokens (always, and at the first
position), then for sampling temperature, top-k, top-p, min-p, and a draw with an
explicit PRNG key.
Numeric settings are traced (:class:`SamplingValues`): changing them does not recompile.
What changes the program's shape is static (:class:`SamplingMode`): greedy or sampled,
the top-k size, and which filters are on.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from ttpu.generation.config import GenerationSettings

NEG_INF = -jnp.inf


class SamplingMode(NamedTuple):
    """The static part of the settings (part of the compiled program)."""

    do_sample: bool
    top_k: int
    top_p: bool
    min_p: bool
    repetition_penalty: bool
    eos_count: int
    forced_bos: bool = False
    forced_eos: bool = False
    suppress: bool = False
    begin_suppress: bool = False
    bad_words: tuple[int, ...] = ()  # the length of each bad-word sequence
    no_repeat_ngram: int = 0  # n-gram size; 0: off
    prompt_no_repeat_ngram: int = 0


class SamplingValues(NamedTuple):
    """The traced part of the settings (arguments of the compiled program)."""

    temperature: jax.Array
    top_p: jax.Array
    min_p: jax.Array
    repetition_penalty: jax.Array
    min_new_tokens: jax.Array
    max_new_tokens: jax.Array
    eos_ids: jax.Array  # [eos_count]
    pad_id: jax.Array
    prompt_length: jax.Array  # the prompts' width as given
    forced_bos_id: jax.Array
    forced_eos_ids: jax.Array  # [n]
    suppress_ids: jax.Array  # [n]
    begin_suppress_ids: jax.Array  # [n]
    bad_words: jax.Array  # [n, longest] token sequences, left-aligned (padded with -1)


def split_settings(settings: GenerationSettings, vocab_size: int) -> tuple[SamplingMode, SamplingValues]:
    top_k = settings.top_k if settings.do_sample and 0 < settings.top_k < vocab_size else 0
    mode = SamplingMode(
        do_sample=settings.do_sample,
        top_k=top_k,
        top_p=settings.do_sample and settings.top_p < 1.0,
        min_p=settings.do_sample and settings.min_p > 0.0,
        repetition_penalty=settings.repetition_penalty != 1.0,
        eos_count=len(settings.eos_token_ids),
        forced_bos=settings.forced_bos_token_id is not None,
        forced_eos=bool(settings.forced_eos_token_ids),
        suppress=bool(settings.suppress_tokens),
        begin_suppress=bool(settings.begin_suppress_tokens),
        bad_words=tuple(len(words) for words in settings.bad_words_ids),
        no_repeat_ngram=settings.no_repeat_ngram_size,
        prompt_no_repeat_ngram=settings.prompt_no_repeat_ngram_size,
    )
    longest = max((len(words) for words in settings.bad_words_ids), default=1)
    bad_words = [list(words) + [-1] * (longest - len(words)) for words in settings.bad_words_ids]
    values = SamplingValues(
        temperature=jnp.float32(settings.temperature),
        top_p=jnp.float32(settings.top_p),
        min_p=jnp.float32(settings.min_p),
        repetition_penalty=jnp.float32(settings.repetition_penalty),
        min_new_tokens=jnp.int32(settings.min_new_tokens),
        max_new_tokens=jnp.int32(settings.max_new_tokens),
        eos_ids=jnp.asarray(settings.eos_token_ids, jnp.int32).reshape(-1),
        pad_id=jnp.int32(settings.pad_token_id),
        prompt_length=jnp.int32(settings.prompt_length),
        forced_bos_id=jnp.int32(settings.forced_bos_token_id or 0),
        forced_eos_ids=jnp.asarray(settings.forced_eos_token_ids, jnp.int32).reshape(-1),
        suppress_ids=jnp.asarray(settings.suppress_tokens, jnp.int32).reshape(-1),
        begin_suppress_ids=jnp.asarray(settings.begin_suppress_tokens, jnp.int32).reshape(-1),
        bad_words=jnp.asarray(bad_words, jnp.int32).reshape(len(bad_words), longest),
    )
    return mode, values


def next_tokens(
    logits: jax.Array,
    key: jax.Array,
    seen: jax.Array,
    seen_mask: jax.Array,
    generated: jax.Array,
    mode: SamplingMode,
    values: SamplingValues,
    last: jax.Array | int = 0,
) -> jax.Array:
    """The next token of each row from its last logits [batch, vocab].

    ``seen`` [batch, n] holds the tokens so far (prompt and generated), ``seen_mask``
    which of them are real, ``last`` the index of the latest one; ``generated`` counts
    the tokens generated before this one.
    """
    logits = logits.astype(jnp.float32)
    vocab = logits.shape[-1]

    def tokens(ids: jax.Array) -> jax.Array:  # [vocab] True at ids
        return jnp.zeros(vocab, jnp.bool_).at[ids].set(True, mode="drop")

    if mode.repetition_penalty:
        logits = penalize_repetitions(logits, seen, seen_mask, values.repetition_penalty)
    # The prompt as given sits just before the generated tokens (bucket padding before it).
    prompt_end = last + 1 - generated
    prompt_start = prompt_end - values.prompt_length
    if mode.no_repeat_ngram:
        banned = _ngram_completions(seen, last, mode.no_repeat_ngram, prompt_start, last + 1, vocab)
        logits = jnp.where(banned, NEG_INF, logits)
    if mode.prompt_no_repeat_ngram:
        banned = _ngram_completions(seen, last, mode.prompt_no_repeat_ngram, prompt_start, prompt_end, vocab)
        logits = jnp.where(banned, NEG_INF, logits)
    for index, length in enumerate(mode.bad_words):
        words = values.bad_words[index]
        # Where the last length-1 tokens equal the sequence's start, its last token is banned.
        completes = jnp.ones(seen.shape[0], bool)
        if length > 1:
            recent = jax.lax.dynamic_slice_in_dim(seen, last - (length - 2), length - 1, axis=1)
            completes = jnp.all(recent == words[: length - 1], axis=1)
        logits = jnp.where(completes[:, None] & tokens(words[length - 1]), NEG_INF, logits)
    if mode.eos_count:
        too_early = generated < values.min_new_tokens
        logits = jnp.where(too_early & tokens(values.eos_ids), NEG_INF, logits)
    if mode.forced_bos:
        first = values.prompt_length + generated == 1
        logits = jnp.where(first, jnp.where(tokens(values.forced_bos_id), 0.0, NEG_INF), logits)
    if mode.forced_eos:
        final = generated == values.max_new_tokens - 1
        logits = jnp.where(final, jnp.where(tokens(values.forced_eos_ids), 0.0, NEG_INF), logits)
    if mode.suppress:
        logits = jnp.where(tokens(values.suppress_ids), NEG_INF, logits)
    if mode.begin_suppress:
        # transformers' begin index: the prompt's end, one later when a forced BOS follows a 1-token prompt
        begin = jnp.where((values.prompt_length == 1) & mode.forced_bos, 1, 0)
        logits = jnp.where((generated == begin) & tokens(values.begin_suppress_ids), NEG_INF, logits)
    if not mode.do_sample:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, filter_logits(logits, mode, values), axis=-1).astype(jnp.int32)


def filter_logits(logits: jax.Array, mode: SamplingMode, values: SamplingValues) -> jax.Array:
    """Temperature, then top-k, top-p and min-p filtering (removed tokens get -inf)."""
    return filtered(
        logits / values.temperature, top_k=mode.top_k or None, top_p=values.top_p if mode.top_p else None,
        min_p=values.min_p if mode.min_p else None,
    )


def filtered(
    logits: jax.Array, *, top_k: int | jax.Array | None = None, top_p: jax.Array | None = None,
    min_p: jax.Array | None = None,
) -> jax.Array:
    """Top-k, then top-p, then min-p over ``logits`` [rows, vocab] (removed tokens get
    -inf), in transformers' order, each filter as transformers' processors and vLLM's
    sampler define it (vLLM applies min-p first). ``top_k`` is a
    static size or per-row sizes [rows, 1] (0: off); ``top_p`` and ``min_p`` are scalars
    or per-row [rows, 1] (1 and 0: off)."""
    candidates = None
    if isinstance(top_k, int):
        candidates = jax.lax.top_k(logits, top_k)[0]  # descending
        logits = jnp.where(logits < candidates[..., -1:], NEG_INF, logits)
    elif top_k is not None:
        descending = -jnp.sort(-logits, axis=-1)
        kth = jnp.take_along_axis(descending, jnp.clip(top_k - 1, 0, logits.shape[-1] - 1), axis=-1)
        logits = jnp.where((top_k > 0) & (logits < kth), NEG_INF, logits)
    if top_p is not None:
        # Only the top-k candidates can survive: sorting them is enough when a static top-k is on.
        ascending = jnp.sort(logits, axis=-1) if candidates is None else candidates[..., ::-1]
        cumulative = jnp.cumsum(jax.nn.softmax(ascending, axis=-1), axis=-1)
        # Remove the low tail whose mass is <= 1 - top_p, always keeping the top token.
        removed = jnp.sum(cumulative[..., :-1] <= 1 - top_p, axis=-1, keepdims=True)
        cutoff = jnp.take_along_axis(ascending, removed, axis=-1)
        logits = jnp.where(logits < cutoff, NEG_INF, logits)
    if min_p is not None:
        probs = jax.nn.softmax(logits, axis=-1)
        floor = min_p * jnp.max(probs, axis=-1, keepdims=True)
        logits = jnp.where(probs < floor, NEG_INF, logits)
    return logits


def _ngram_completions(
    seen: jax.Array, last: jax.Array | int, size: int, start: jax.Array, end: jax.Array, vocab: int
) -> jax.Array:
    """[batch, vocab] True for the tokens that, after ``seen[:, last]``, would repeat a
    ``size``-gram lying in ``seen[:, start:end]`` (transformers' n-gram blocking: none
    while the sequence from ``start`` is shorter than ``size - 1`` tokens)."""
    batch, width = seen.shape
    windows = width - size + 1
    if windows <= 0:
        return jnp.zeros((batch, vocab), bool)
    suffix = jax.lax.dynamic_slice_in_dim(seen, last - (size - 2), size - 1, axis=1)
    first = jnp.arange(windows)
    match = jnp.broadcast_to((first >= start) & (first + size <= end), (batch, windows))
    for k in range(size - 1):
        match = match & (seen[:, k : k + windows] == suffix[:, k : k + 1])
    match = match & (last + 2 - start >= size)
    rows = jnp.arange(batch)[:, None]
    return jnp.zeros((batch, vocab), bool).at[rows, seen[:, size - 1 :]].max(match)


def penalize_repetitions(
    logits: jax.Array, seen: jax.Array, seen_mask: jax.Array, penalty: jax.Array
) -> jax.Array:
    """transformers' (and vLLM's) repetition penalty: each row's logits of the tokens in
    ``seen`` [rows, n] (where ``seen_mask``) divided by ``penalty`` when positive,
    multiplied when negative; ``penalty`` a scalar or per-row [rows, 1]."""
    rows = jnp.arange(logits.shape[0])[:, None]
    was_seen = jnp.zeros(logits.shape, jnp.bool_).at[rows, seen].max(seen_mask.astype(jnp.bool_))
    penalized = jnp.where(logits < 0, logits * penalty, logits / penalty)
    return jnp.where(was_seen, penalized, logits)
