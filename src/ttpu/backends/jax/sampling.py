"""Choosing the next token in JAX: the one sampler of ``generate`` and of the serving
engine.

Every row has its own settings as traced values (:class:`RowSampling`), so any mix of
rows runs in the same compiled program; what changes the program's shape is static
(:class:`SamplerMode`): whether any row draws, filters, is penalized or wants
log-probabilities, a top-k size shared by every row, and which of transformers' other
logits processors run (:class:`Processors`, values shared by every row:
:class:`ProcessorValues`; ``generate`` takes them from a generation config).

Order as in ``transformers``: penalties (repetition; vLLM's presence and frequency),
repeated n-grams (of the whole sequence, of the prompt), bad words, minimum new tokens
(stop tokens suppressed), forced BOS and EOS tokens, suppressed tokens (always, and at
the first position), then for drawing rows temperature, top-k, top-p, min-p, and a draw
keyed by the row's seed and step. Log-probabilities are of the raw logits (vLLM's default).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ttpu.generation.config import GenerationSettings

NEG_INF = -jnp.inf
MAX_LOGPROBS = 20  # vLLM's default max_logprobs: the most top tokens a request may ask for
MAX_CANDIDATES = 256  # the most likely tokens among which top-k, top-p and min-p cut (see filtered)
GREEDY_BLOCK = 512  # logits per block of the greedy choice's two-level argmax (see greedy_tokens)


class Processors(NamedTuple):
    """Which of transformers' generation-config processors run (static)."""

    forced_bos: bool = False
    forced_eos: bool = False
    suppress: bool = False
    begin_suppress: bool = False
    bad_words: tuple[int, ...] = ()  # the length of each bad-word sequence
    no_repeat_ngram: int = 0  # n-gram size; 0: off
    prompt_no_repeat_ngram: int = 0


class ProcessorValues(NamedTuple):
    """Their traced token ids, the same for every row."""

    forced_bos_id: jax.Array
    forced_eos_ids: jax.Array  # [n]
    suppress_ids: jax.Array  # [n]
    begin_suppress_ids: jax.Array  # [n]
    bad_words: jax.Array  # [n, longest] token sequences, left-aligned (padded with -1)


class SamplerMode(NamedTuple):
    """What a sampler program computes (static)."""

    draws: bool = False  # any row samples (temperature > 0); else every row is greedy
    filters: bool = False  # top-k, top-p or min-p
    penalties: bool = False  # presence, frequency or repetition
    logprobs: bool = False  # the chosen token's log-probability and the top MAX_LOGPROBS
    top_k: int = 0  # one top-k size for every row (generate); 0: each row's own
    processors: Processors = Processors()

    @classmethod
    def every(cls, processors: Processors = Processors()) -> list[SamplerMode]:
        """The modes a serving step can need with ``processors`` (filters only matter when a row draws)."""
        flags = (False, True)
        return [cls(d, f, p, lp, processors=processors)
                for d in flags for f in flags for p in flags for lp in flags if d or not f]

    @property
    def reads_history(self) -> bool:
        """Whether the rows' tokens so far are read (penalties, n-grams, bad words)."""
        p = self.processors
        return self.penalties or bool(p.bad_words or p.no_repeat_ngram or p.prompt_no_repeat_ngram)


class RowSampling(NamedTuple):
    """Each row's settings ([rows] arrays); ``temperature`` 0 is greedy."""

    temperature: jax.Array
    top_k: jax.Array  # 0: off
    top_p: jax.Array  # 1: off
    min_p: jax.Array  # 0: off
    presence: jax.Array  # 0: off
    frequency: jax.Array  # 0: off
    repetition: jax.Array  # 1: off
    seeds: jax.Array  # [rows] uint32
    steps: jax.Array  # [rows] tokens the row has generated (its draw's index)
    stop_ids: jax.Array  # [rows, n] tokens it may not pick before ``min_tokens`` (EOS, stop tokens), padded past the vocabulary
    min_tokens: jax.Array  # [rows]
    max_tokens: jax.Array  # [rows] the most tokens it generates (a forced EOS comes last)
    history: jax.Array  # [rows, width] prompt then output tokens, padded past the vocabulary ([rows, 0] when nothing reads it)
    prompt_starts: jax.Array  # [rows] where each row's prompt starts in ``history`` (after padding, if any)
    prompt_lens: jax.Array  # [rows] where each row's output starts in ``history``


class SampledTokens(NamedTuple):
    """The chosen tokens and, in a ``logprobs`` mode, their log-probabilities under the
    model's raw distribution, their ranks (1 = the most likely) and the top tokens."""

    tokens: jax.Array  # [rows] int32
    logprobs: jax.Array | None = None  # [rows]
    ranks: jax.Array | None = None  # [rows]
    top_ids: jax.Array | None = None  # [rows, MAX_LOGPROBS] (fewer if the vocabulary is smaller)
    top_logprobs: jax.Array | None = None  # [rows, MAX_LOGPROBS]


def split_processors(settings: GenerationSettings) -> tuple[Processors, ProcessorValues]:
    """The generation-config processors of ``settings``: which run, and their token ids."""
    processors = Processors(
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
    values = ProcessorValues(
        forced_bos_id=jnp.int32(settings.forced_bos_token_id or 0),
        forced_eos_ids=jnp.asarray(settings.forced_eos_token_ids, jnp.int32).reshape(-1),
        suppress_ids=jnp.asarray(settings.suppress_tokens, jnp.int32).reshape(-1),
        begin_suppress_ids=jnp.asarray(settings.begin_suppress_tokens, jnp.int32).reshape(-1),
        bad_words=jnp.asarray(bad_words, jnp.int32).reshape(len(bad_words), longest),
    )
    return processors, values


def generation_sampling(
    settings: GenerationSettings, rows: int, vocab_size: int, seed: int
) -> tuple[SamplerMode, RowSampling, ProcessorValues]:
    """``generate``'s settings as every row's (row ``i`` draws with seed ``seed + i``);
    ``steps``, ``history``, ``prompt_starts`` and ``prompt_lens`` are the decode loop's to fill."""
    top_k = settings.top_k if settings.do_sample and 0 < settings.top_k < vocab_size else 0
    processors, values = split_processors(settings)
    mode = SamplerMode(
        draws=settings.do_sample,
        filters=settings.do_sample and bool(top_k or settings.top_p < 1.0 or settings.min_p > 0.0),
        penalties=settings.repetition_penalty != 1.0,
        top_k=top_k,
        processors=processors,
    )

    def each(value: float, dtype: Any = jnp.float32) -> jax.Array:
        return jnp.full((rows,), value, dtype)

    eos = np.asarray(settings.eos_token_ids, np.int32).reshape(1, -1)
    row_sampling = RowSampling(
        temperature=each(settings.temperature if settings.do_sample else 0.0), top_k=each(top_k, jnp.int32),
        top_p=each(settings.top_p), min_p=each(settings.min_p), presence=each(0.0), frequency=each(0.0),
        repetition=each(settings.repetition_penalty),
        seeds=jnp.asarray(np.array([(seed + row) % 2**32 for row in range(rows)], np.uint32)),
        steps=each(0, jnp.int32), stop_ids=jnp.asarray(np.repeat(eos, rows, axis=0)),
        min_tokens=each(settings.min_new_tokens, jnp.int32), max_tokens=each(settings.max_new_tokens, jnp.int32),
        history=jnp.zeros((rows, 0), jnp.int32), prompt_starts=each(0, jnp.int32), prompt_lens=each(0, jnp.int32),
    )
    return mode, row_sampling, values


def sample(
    logits: jax.Array, rows: RowSampling, mode: SamplerMode, processor_values: ProcessorValues | None = None
) -> SampledTokens:
    """The next token of each row of ``logits`` [rows, vocab]; ``processor_values`` is
    needed when ``mode.processors`` turns any on."""
    logits = raw = logits.astype(jnp.float32)
    vocab = logits.shape[-1]
    if mode.penalties:
        logits = _penalized(logits, rows)
    if mode.processors != Processors():
        logits = _processed(logits, rows, mode.processors, processor_values)
    banned = rows.steps < rows.min_tokens  # rows whose stop tokens may not come yet
    if mode.processors != Processors():  # a forced token wins over the ban: ban, then force
        logits = _forced(_without(logits, rows.stop_ids, banned), rows, mode.processors, processor_values)
        banned = jnp.zeros_like(banned)  # (applied)
    tokens = greedy_tokens(logits, rows.stop_ids, banned)
    if mode.draws:
        scaled = draw_logits(_without(logits, rows.stop_ids, banned), rows, mode)
        keys = jax.vmap(lambda seed, step: jax.random.fold_in(jax.random.key(seed), step))(rows.seeds, rows.steps)
        drawn = categorical(keys, scaled)
        tokens = jnp.where(rows.temperature == 0.0, tokens, drawn)
    if not mode.logprobs:
        return SampledTokens(tokens)
    logprobs = jax.nn.log_softmax(raw, axis=-1)
    chosen = jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
    ranks = 1 + jnp.sum(logprobs > chosen[:, None], axis=-1).astype(jnp.int32)
    top_logprobs, top_ids = jax.lax.top_k(logprobs, min(MAX_LOGPROBS, vocab))
    return SampledTokens(tokens, chosen, ranks, top_ids.astype(jnp.int32), top_logprobs)


def _without(logits: jax.Array, stop_ids: jax.Array, banned: jax.Array) -> jax.Array:
    """``logits`` with the ``stop_ids`` [rows, n] of the ``banned`` [rows] rows at -inf
    (compared, not scattered, so that it fuses with the producer of the logits)."""
    stops = jnp.any(jnp.arange(logits.shape[-1])[None, None, :] == stop_ids[:, :, None], axis=1)
    return jnp.where(banned[:, None] & stops, NEG_INF, logits)


def greedy_tokens(logits: jax.Array, stop_ids: jax.Array, banned: jax.Array) -> jax.Array:
    """Each row's most likely token, the first of equals (``jnp.argmax``'s choice; not
    for logits holding a NaN, which XLA:CPU's vectorized maximum may pass over),
    ``stop_ids`` [rows, n] left out where ``banned`` [rows].

    In two levels: the maximum of each block of :data:`GREEDY_BLOCK` logits, then the best
    block's logits. XLA:CPU runs a plain maximum over the vocabulary vectorized, while an
    argmax over it, or a maximum with the ban compared in, ran 20x slower (21 ms against
    1 ms for 32 rows of Gemma's 262,144 logits); so only the blocks holding a banned
    token, and the best block, are looked at token by token."""
    rows, vocab = logits.shape
    padded = -(-vocab // GREEDY_BLOCK) * GREEDY_BLOCK
    blocks = jnp.pad(logits, ((0, 0), (0, padded - vocab)), constant_values=NEG_INF).reshape(rows, -1, GREEDY_BLOCK)

    def read(chosen: jax.Array) -> jax.Array:
        """The blocks ``chosen`` [rows, k] of each row, banned tokens at -inf: [rows, k, block]."""
        ids = chosen[..., None] * GREEDY_BLOCK + jnp.arange(GREEDY_BLOCK)
        hit = jnp.any(ids[..., None] == stop_ids[:, None, None, :], axis=-1)
        values = jnp.take_along_axis(blocks, chosen[..., None], axis=1)
        return jnp.where(banned[:, None, None] & hit, NEG_INF, values)

    touched = jnp.clip(stop_ids // GREEDY_BLOCK, 0, blocks.shape[1] - 1)  # (ids outside the vocabulary ban nothing)
    highs = jnp.max(blocks, axis=-1).at[jnp.arange(rows)[:, None], touched].set(jnp.max(read(touched), axis=-1))
    best = jnp.argmax(highs, axis=-1)
    return (best * GREEDY_BLOCK + jnp.argmax(read(best[:, None])[:, 0], axis=-1)).astype(jnp.int32)


def draw_logits(logits: jax.Array, rows: RowSampling, mode: SamplerMode) -> jax.Array:
    """What a drawing row samples from: its logits over its temperature, then (in a
    ``filters`` mode) top-k, top-p and min-p."""
    scaled = logits / jnp.maximum(rows.temperature, 1e-6)[:, None]
    if not mode.filters:
        return scaled
    return filtered(scaled, top_k=mode.top_k or rows.top_k[:, None], top_p=rows.top_p[:, None], min_p=rows.min_p[:, None])


def filtered(
    logits: jax.Array, *, top_k: int | jax.Array | None = None, top_p: jax.Array | float | None = None,
    min_p: jax.Array | float | None = None,
) -> jax.Array:
    """Top-k, then top-p, then min-p over ``logits`` [rows, vocab] (removed tokens get
    -inf), in transformers' order, each filter as transformers' processors and vLLM's
    sampler define it (vLLM applies min-p first; ties with the last kept value are kept).
    ``top_k`` is a static size or per-row sizes [rows, 1] (0: off); ``top_p`` and
    ``min_p`` are scalars or per-row [rows, 1] (1 and 0: off).

    Nothing sorts the vocabulary: each row's cut is decided among its
    ``MAX_CANDIDATES`` (or static ``top_k`` + 1) most likely tokens (one ``top_k``); a row
    whose cut reaches past them is cut over the whole vocabulary by bisection on the
    values (:func:`_thresholds_by_bisection`), which runs only when some row needs it."""
    rows, vocab = logits.shape
    k = jnp.broadcast_to(jnp.asarray(0 if top_k is None else top_k, jnp.int32), (rows, 1))
    p = jnp.broadcast_to(jnp.asarray(1.0 if top_p is None else top_p, jnp.float32), (rows, 1))
    m = jnp.broadcast_to(jnp.asarray(0.0 if min_p is None else min_p, jnp.float32), (rows, 1))
    width = min(vocab, max(MAX_CANDIDATES, top_k + 1 if isinstance(top_k, int) else 0))
    # [rows, width] descending; the barrier keeps XLA:CPU from fusing the top-k into its
    # consumers as a full sort of the vocabulary (70x slower at 262k tokens).
    candidates = jax.lax.optimization_barrier(jax.lax.top_k(logits, width)[0])
    top_k_on = k > 0
    kth = jnp.take_along_axis(candidates, jnp.clip(k - 1, 0, width - 1), axis=-1)
    kept = jnp.where(top_k_on & (candidates < kth), NEG_INF, candidates)
    # Top-p over what top-k kept: its probabilities among the candidates (normalized over
    # all of the vocabulary when top-k is off), kept while the mass before a token is < p.
    total = jnp.where(top_k_on, jax.nn.logsumexp(kept, axis=-1, keepdims=True),
                      jax.nn.logsumexp(logits, axis=-1, keepdims=True))
    probs = jnp.exp(kept - total)
    count = jnp.sum(jnp.cumsum(probs, axis=-1) - probs < p, axis=-1, keepdims=True)
    cut_p = jnp.take_along_axis(kept, jnp.clip(count - 1, 0, width - 1), axis=-1)
    threshold = jnp.maximum(jnp.where(top_k_on, kth, NEG_INF), jnp.where(p < 1, cut_p, NEG_INF))
    # Min-p: a token's probability under min_p times the top one's, i.e. its logit below the top's + log(min_p).
    threshold = jnp.maximum(threshold, jnp.where(m > 0, candidates[:, :1] + jnp.log(m), NEG_INF))
    filters = top_k_on | (p < 1) | (m > 0)
    beyond = filters & ((threshold <= candidates[:, -1:]) | (k > width)) & (width < vocab)
    among_candidates = jnp.where(filters & (logits < threshold), NEG_INF, logits)
    return jax.lax.cond(  # only rows whose cut passes the candidates take the bisection's
        jnp.any(beyond),
        lambda: jnp.where(beyond, _thresholds_by_bisection(logits, k, p, m, jnp.where(k <= width, kth, NEG_INF)),
                          among_candidates),
        lambda: among_candidates,
    )


def _thresholds_by_bisection(logits: jax.Array, k: jax.Array, p: jax.Array, m: jax.Array, kth: jax.Array) -> jax.Array:
    """:func:`filtered`'s cuts over the whole vocabulary, without sorting it: the largest
    value (as an order-preserving int32 key) that keeps ``k`` tokens (``kth`` where the
    candidates held it), then the largest that keeps mass ``p`` of what top-k kept, each
    found by 32 halvings of the key range."""
    keys = _order_keys(logits)

    def largest(holds: Any) -> jax.Array:
        """[rows, 1] the largest key ``t`` where ``holds(t)`` (it holds at the smallest key)."""
        low = jnp.full(k.shape, jnp.iinfo(jnp.int32).min, jnp.int32)
        high = jnp.max(keys, axis=-1, keepdims=True) + 1  # never holds

        def halve(_: int, bounds: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
            low, high = bounds
            middle = (low >> 1) + (high >> 1) + (low & high & 1)
            ok = holds(middle)
            return jnp.where(ok, middle, low), jnp.where(ok, high, middle)

        return jax.lax.fori_loop(0, 32, halve, (low, high))[0]

    lowest = jnp.iinfo(jnp.int32).min
    cut_k = jnp.where(k > 0, _order_keys(kth), lowest)
    cut_k = jax.lax.cond(
        jnp.any(jnp.isneginf(kth) & (k > 0)),  # a row's top-k reaches past the candidates
        lambda: jnp.where(jnp.isneginf(kth) & (k > 0),
                          largest(lambda t: jnp.sum(keys >= t, axis=-1, keepdims=True) >= k), cut_k),
        lambda: cut_k,
    )
    kept = jnp.where(keys < cut_k, NEG_INF, logits)
    probs = jax.nn.softmax(kept, axis=-1)
    cut_p = jax.lax.cond(
        jnp.any(p < 1),
        lambda: largest(lambda t: jnp.sum(jnp.where(keys >= t, probs, 0.0), axis=-1, keepdims=True) >= p),
        lambda: jnp.full(k.shape, lowest, jnp.int32),
    )
    threshold = jnp.maximum(cut_k, jnp.where(p < 1, cut_p, lowest))
    floor = jnp.max(logits, axis=-1, keepdims=True) + jnp.log(m)
    return jnp.where((keys < threshold) | ((m > 0) & (logits < floor)), NEG_INF, logits)


def _order_keys(values: jax.Array) -> jax.Array:
    """float32 ``values`` as int32 keys ordered as the floats are."""
    values = values.astype(jnp.float32)
    bits = jax.lax.bitcast_convert_type(jnp.where(values == 0, 0.0, values), jnp.int32)  # -0.0 as +0.0
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def categorical(keys: jax.Array, logits: jax.Array) -> jax.Array:
    """One draw per row from softmax(``logits``) [rows, vocab] (-inf: never), with the
    row's PRNG key: the inverse of its cumulative distribution, in two levels (blocks of
    the vocabulary, then tokens of the chosen block), so a draw costs a few passes over
    the logits, not a random number per token."""
    rows, vocab = logits.shape
    width = 1 << max((vocab - 1).bit_length() // 2, 0)  # about sqrt(vocab)
    blocks = -(-vocab // width)
    probs = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
    probs = jnp.pad(probs, ((0, 0), (0, blocks * width - vocab))).reshape(rows, blocks, width)
    mass = jnp.sum(probs, axis=-1)  # [rows, blocks]
    cumulative = jnp.cumsum(mass, axis=-1)
    target = jax.vmap(jax.random.uniform)(keys) * cumulative[:, -1]
    block = _first_reaching(cumulative, mass, target)
    inside = target - jnp.take_along_axis(cumulative - mass, block[:, None], axis=-1)[:, 0]
    chosen = jnp.take_along_axis(probs, block[:, None, None], axis=1)[:, 0]  # [rows, width]
    token = _first_reaching(jnp.cumsum(chosen, axis=-1), chosen, inside)
    return (block * width + token).astype(jnp.int32)


def _first_reaching(cumulative: jax.Array, mass: jax.Array, target: jax.Array) -> jax.Array:
    """[rows] the first index of positive ``mass`` whose ``cumulative`` passes ``target``
    [rows], else the last of positive mass: never one of zero mass, however the sums
    rounded (XLA's cumulative sums are not computed in order)."""
    passes = (cumulative > target[:, None]) & (mass > 0)
    last = mass.shape[-1] - 1 - jnp.argmax(mass[:, ::-1] > 0, axis=-1)
    return jnp.where(jnp.any(passes, axis=-1), jnp.argmax(passes, axis=-1), last)


def penalize_repetitions(
    logits: jax.Array, seen: jax.Array, seen_mask: jax.Array, penalty: jax.Array
) -> jax.Array:
    """transformers' (and vLLM's) repetition penalty: each row's logits of the tokens in
    ``seen`` [rows, n] (where ``seen_mask``) divided by ``penalty`` when positive,
    multiplied when negative; ``penalty`` a scalar or per-row [rows, 1]."""
    rows = jnp.arange(logits.shape[0])[:, None]
    was_seen = jnp.zeros(logits.shape, jnp.bool_).at[rows, seen].max(seen_mask.astype(jnp.bool_), mode="drop")
    penalized = jnp.where(logits < 0, logits * penalty, logits / penalty)
    return jnp.where(was_seen, penalized, logits)


def _penalized(logits: jax.Array, rows: RowSampling) -> jax.Array:
    """Repetition over the prompt and output tokens (transformers' and vLLM's), then
    vLLM's frequency (per occurrence) and presence (once) over the output tokens."""
    vocab = logits.shape[-1]
    logits = penalize_repetitions(logits, rows.history, rows.history < vocab, rows.repetition[:, None])
    is_output = jnp.arange(rows.history.shape[1])[None, :] >= rows.prompt_lens[:, None]
    row_index = jnp.arange(logits.shape[0])[:, None]
    counts = jnp.zeros(logits.shape, jnp.float32).at[row_index, rows.history].add(
        is_output.astype(jnp.float32), mode="drop"
    )
    logits = logits - rows.frequency[:, None] * counts
    return logits - rows.presence[:, None] * (counts > 0)


def _processed(logits: jax.Array, rows: RowSampling, processors: Processors, values: ProcessorValues) -> jax.Array:
    """transformers' repeated n-grams and bad words, over each row's ``history``."""
    vocab = logits.shape[-1]
    last = rows.prompt_lens + rows.steps - 1  # each row's latest token in its history
    if processors.no_repeat_ngram:
        banned = _ngram_completions(rows.history, last, processors.no_repeat_ngram, rows.prompt_starts, last + 1, vocab)
        logits = jnp.where(banned, NEG_INF, logits)
    if processors.prompt_no_repeat_ngram:
        size = processors.prompt_no_repeat_ngram
        banned = _ngram_completions(rows.history, last, size, rows.prompt_starts, rows.prompt_lens, vocab)
        logits = jnp.where(banned, NEG_INF, logits)
    for index, length in enumerate(processors.bad_words):
        words = values.bad_words[index]
        # Where the last length-1 tokens equal the sequence's start, its last token is banned.
        completes = jnp.all(_recent(rows.history, last, length - 1) == words[: length - 1], axis=1)
        completes &= last + 1 - rows.prompt_starts >= length - 1  # transformers: not before the prefix fits
        logits = jnp.where(completes[:, None] & _one_hot(words[length - 1], vocab), NEG_INF, logits)
    return logits


def _forced(logits: jax.Array, rows: RowSampling, processors: Processors, values: ProcessorValues) -> jax.Array:
    """transformers' forced BOS and EOS tokens and suppressed tokens."""
    vocab = logits.shape[-1]
    generated = rows.steps[:, None]
    prompt_length = (rows.prompt_lens - rows.prompt_starts)[:, None]
    if processors.forced_bos:
        first = prompt_length + generated == 1
        logits = jnp.where(first, jnp.where(_one_hot(values.forced_bos_id, vocab), 0.0, NEG_INF), logits)
    if processors.forced_eos:
        final = generated == rows.max_tokens[:, None] - 1
        logits = jnp.where(final, jnp.where(_one_hot(values.forced_eos_ids, vocab), 0.0, NEG_INF), logits)
    if processors.suppress:
        logits = jnp.where(_one_hot(values.suppress_ids, vocab), NEG_INF, logits)
    if processors.begin_suppress:
        # transformers' begin index: the prompt's end, one later when a forced BOS follows a 1-token prompt
        begin = jnp.where((prompt_length == 1) & processors.forced_bos, 1, 0)
        logits = jnp.where((generated == begin) & _one_hot(values.begin_suppress_ids, vocab), NEG_INF, logits)
    return logits


def _one_hot(ids: jax.Array, vocab: int) -> jax.Array:
    """[vocab] True at ``ids``."""
    return jnp.zeros(vocab, jnp.bool_).at[ids].set(True, mode="drop")


def _recent(history: jax.Array, last: jax.Array, count: int) -> jax.Array:
    """[rows, count] each row's ``count`` tokens up to and including ``last`` [rows]."""
    index = last[:, None] + jnp.arange(1 - count, 1)
    return jnp.take_along_axis(history, jnp.clip(index, 0, history.shape[1] - 1), axis=1)


def _ngram_completions(
    seen: jax.Array, last: jax.Array, size: int, start: jax.Array, end: jax.Array, vocab: int
) -> jax.Array:
    """[rows, vocab] True for the tokens that, after ``seen[:, last]``, would repeat a
    ``size``-gram lying in ``seen[:, start:end]`` (per row; transformers' n-gram
    blocking: none while the sequence from ``start`` is shorter than ``size - 1`` tokens)."""
    rows, width = seen.shape
    windows = width - size + 1
    if windows <= 0:
        return jnp.zeros((rows, vocab), bool)
    suffix = _recent(seen, last, size - 1)
    first = jnp.arange(windows)[None, :]
    match = (first >= start[:, None]) & (first + size <= end[:, None])
    for k in range(size - 1):
        match = match & (seen[:, k : k + windows] == suffix[:, k : k + 1])
    match = match & (last + 2 - start >= size)[:, None]
    return jnp.zeros((rows, vocab), bool).at[jnp.arange(rows)[:, None], seen[:, size - 1 :]].max(match, mode="drop")
