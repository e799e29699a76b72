"""``generate`` and ``stream``: prompts in, token ids (or text pieces) out.

The host side of generation: validate the prompts and settings, pad them to buckets
(left-padded prompt lengths and batch sizes rounded up, the cache length rounded up to a
power of two), then drive the backend's compiled :class:`~ttpu.backends.base.Decoder`
in chunks of steps. Between chunks the host only reads the tokens, to check stop strings or
stream text; without either, one call runs the whole generation.
"""

from __future__ import annotations

import inspect

import secrets
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ttpu.errors import InvalidArgumentError
from ttpu.inputs import check_token_ids, positional_embeddings
from ttpu.generation.config import GenerationSettings, resolve_settings
from ttpu.generation.stopping import StopStrings
from ttpu.generation.streaming import TextPieces

if TYPE_CHECKING:
    from ttpu.model import TPUModel

# Tokens per host call while stop strings are watched.
STOP_CHECK_EVERY = 16
MIN_CACHE_LENGTH = 32


def generate(
    model: TPUModel,
    input_ids: Any,
    attention_mask: Any = None,
    *,
    generation_config: Any = None,
    seed: int | None = None,
    tokenizer: Any = None,
    **kwargs: Any,
) -> np.ndarray:
    """Token ids [batch * num_return_sequences, prompt + new], as transformers returns them:
    the prompt as given, then the new tokens, padded after a row ends."""
    ids, mask = _prompts(input_ids, attention_mask, _vocab_size(model))
    settings = _settings(model, ids, generation_config, seed, kwargs)
    chunk = STOP_CHECK_EVERY if settings.stop_strings else settings.max_new_tokens
    generated = None
    for generated in _decode_chunks(model, ids, mask, settings, tokenizer or model.tokenizer, chunk):
        pass
    ids = np.repeat(ids, settings.num_return_sequences, axis=0)
    return np.concatenate([ids, generated], axis=1)


def stream(
    model: TPUModel,
    prompt: str | Any,
    *,
    tokenizer: Any = None,
    generation_config: Any = None,
    seed: int | None = None,
    skip_special_tokens: bool = True,
    **kwargs: Any,
) -> Iterator[str]:
    """Text pieces of one prompt's continuation, as they are generated. ``prompt`` is a
    string or its token ids (one sequence)."""
    tokenizer = tokenizer or model.tokenizer
    if tokenizer is None:
        raise InvalidArgumentError(
            "stream() needs a tokenizer: pass stream(prompt, tokenizer=...) or load the model "
            "from a directory or hub id that has one."
        )
    if isinstance(prompt, str):
        prompt = tokenizer(prompt, return_tensors="np")["input_ids"]
    pieces = TextPieces(tokenizer, skip_special_tokens)
    tokens = stream_tokens(model, prompt, tokenizer=tokenizer, generation_config=generation_config, seed=seed, **kwargs)
    for token in tokens:
        piece = pieces.add([token])
        if piece:
            yield piece
    rest = pieces.flush()
    if rest:
        yield rest


def stream_tokens(
    model: TPUModel,
    prompt: Any,
    *,
    tokenizer: Any = None,
    generation_config: Any = None,
    seed: int | None = None,
    **kwargs: Any,
) -> Iterator[int]:
    """The new token ids of one prompt (its token ids, one sequence), each as soon as it
    is generated."""
    ids, mask = _prompts(prompt, None, _vocab_size(model))
    if ids.shape[0] != 1:
        raise InvalidArgumentError(f"stream() takes one prompt (got a batch of {ids.shape[0]})")
    settings = _settings(model, ids, generation_config, seed, kwargs)
    if settings.num_return_sequences != 1:
        raise InvalidArgumentError("stream() generates one sequence: num_return_sequences must be 1")
    sent = 0
    for generated in _decode_chunks(model, ids, mask, settings, tokenizer or model.tokenizer, chunk=1):
        row = generated[0].tolist()
        yield from row[sent:]
        sent = len(row)


def _settings(model: TPUModel, ids: np.ndarray, generation_config: Any, seed: int | None, kwargs: dict) -> GenerationSettings:
    if model.task != "causal-lm":
        raise InvalidArgumentError(
            f"generate() runs causal language models; this model was loaded for task "
            f"{model.task!r}. Load it with task='causal-lm' if it is a decoder."
        )
    settings = resolve_settings(
        model.config,
        getattr(model.torch_module, "generation_config", None),
        prompt_length=ids.shape[1],
        generation_config=generation_config,
        seed=seed,
        **kwargs,
    )
    context = _context_length(model)
    if context is not None and ids.shape[1] + settings.max_new_tokens > context:
        raise InvalidArgumentError(
            f"the prompt ({ids.shape[1]} tokens) plus max_new_tokens ({settings.max_new_tokens}) "
            f"exceeds the model's context of {context} positions; shorten the prompt or "
            "lower max_new_tokens."
        )
    return settings


def _prompts(input_ids: Any, attention_mask: Any, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Prompts as int64 [batch, length] with a mask; clear errors for empty ones and for
    token ids outside the vocabulary."""
    ids = _to_numpy(input_ids, "input_ids")
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise InvalidArgumentError(
            f"input_ids must be integer token ids shaped [batch, length] (got {ids.dtype} {ids.shape})"
        )
    if ids.shape[0] == 0 or ids.shape[1] == 0:
        raise InvalidArgumentError(f"the prompt is empty (input_ids shape {ids.shape}); give at least one token")
    check_token_ids(ids, vocab_size, "input_ids")
    mask = np.ones_like(ids) if attention_mask is None else _to_numpy(attention_mask, "attention_mask")
    mask = mask.reshape(ids.shape) if mask.size == ids.size else mask
    if mask.shape != ids.shape:
        raise InvalidArgumentError(f"attention_mask shape {mask.shape} does not match input_ids {ids.shape}")
    mask = (mask != 0).astype(np.int64)
    empty = np.flatnonzero(mask.sum(axis=1) == 0)
    if empty.size:
        raise InvalidArgumentError(f"prompt row(s) {empty.tolist()} are empty (attention_mask all zeros)")
    if (mask[:, -1] == 0).any():
        raise InvalidArgumentError(
            "prompts must be left-padded for generation (the last position of every row must be "
            "a real token); set tokenizer.padding_side = 'left'."
        )
    return ids.astype(np.int64), mask


def _to_numpy(value: Any, name: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    try:
        return np.asarray(value)
    except Exception as exc:
        raise InvalidArgumentError(f"{name} must be an array of token ids (got {type(value).__name__})") from exc


def _vocab_size(model: TPUModel) -> int:
    return model.vocabulary_size or model.config.get_text_config(decoder=True).vocab_size


def _context_length(model: TPUModel) -> int | None:
    text = model.config.get_text_config(decoder=True)
    context = getattr(text, "max_position_embeddings", None)
    return context if isinstance(context, int) and context > 0 else None  # XLNet: -1, unbounded


def _decode_chunks(
    model: TPUModel,
    ids: np.ndarray,
    mask: np.ndarray,
    settings: GenerationSettings,
    tokenizer: Any,
    chunk: int,
) -> Iterator[np.ndarray]:
    """After each chunk of steps, the new tokens so far [batch, n] (rows that ended padded)."""
    stop = StopStrings(settings.stop_strings, tokenizer)
    ids = np.repeat(ids, settings.num_return_sequences, axis=0)
    mask = np.repeat(mask, settings.num_return_sequences, axis=0)
    batch = ids.shape[0]
    vocab_size = _vocab_size(model)
    # Bucket padding is masked out, but must still be a valid embedding row.
    filler = settings.pad_token_id if 0 <= settings.pad_token_id < vocab_size else 0
    padded_ids, padded_mask = _pad_prompts(model, ids, mask, filler)
    prompt_length = padded_ids.shape[1]
    max_length = cache_length(prompt_length, settings.max_new_tokens)
    decoder = model.decoder()
    seed = secrets.randbits(63) if settings.seed is None else settings.seed
    state = decoder.start(padded_ids, padded_mask, max_length, settings, seed)
    if padded_ids.shape[0] > batch:  # rows added for the batch bucket never hold the loop
        state = decoder.finish(state, range(batch, padded_ids.shape[0]))
    eos = np.asarray(settings.eos_token_ids, np.int64)
    stopped: dict[int, int] = {}
    checked = 0  # tokens of every row already searched for stop strings
    while True:
        count, buffer = decoder.read(state)
        tokens = buffer[:batch, prompt_length : prompt_length + count]
        lengths, ended = _eos_ends(tokens, eos)
        newly_stopped = _check_stop_strings(stop, tokens, lengths, ended, checked, stopped)
        checked = count
        for row, kept in stopped.items():
            lengths[row] = min(lengths[row], kept)
            ended[row] = True
        done = count >= settings.max_new_tokens or bool(ended.all())
        width = int(lengths.max()) if done else count
        out = tokens[:, :width].copy()
        out[np.arange(width)[None, :] >= lengths[:, None]] = settings.pad_token_id
        yield out
        if done:
            return
        if newly_stopped:
            state = decoder.finish(state, newly_stopped)
        state = decoder.advance(state, chunk)


def _pad_prompts(model: TPUModel, ids: np.ndarray, mask: np.ndarray, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad the prompt length and repeat the last row up to the buckets (not the
    length where padding would shift positions: :func:`_padding_shifts_positions`)."""
    batch, length = ids.shape
    policy = model.buckets
    shifts = _padding_shifts_positions(model.torch_module)
    padded_length = length if shifts else policy.round_up(length, policy.sequence)
    padded_batch = policy.round_up(batch, policy.batch)
    left = padded_length - length
    ids = np.pad(ids, ((0, 0), (left, 0)), constant_values=pad_id)
    mask = np.pad(mask, ((0, 0), (left, 0)))
    rows = np.minimum(np.arange(padded_batch), batch - 1)
    return ids[rows], mask[rows]


def _padding_shifts_positions(module: torch.nn.Module) -> bool:
    """Whether more left padding changes what the model computes: its forward takes no
    position ids but it embeds positions by index from the first token (Marian, Pegasus,
    Whisper: their positional-embedding modules). Models without positions (Mamba) or
    with positions from the mask (BLOOM's ALiBi) are unaffected."""
    if "position_ids" in inspect.signature(module.forward).parameters:
        return False
    return bool(positional_embeddings(module))


def _check_stop_strings(
    stop: StopStrings,
    tokens: np.ndarray,
    lengths: np.ndarray,
    ended: np.ndarray,
    checked: int,
    stopped: dict[int, int],
) -> list[int]:
    """Record rows whose text (up to their EOS) now holds a stop string; return them.
    Rows that had ended by EOS before the last ``checked`` tokens were searched already."""
    if not stop:
        return []
    newly = []
    for row, row_tokens in enumerate(tokens):
        if row in stopped or (ended[row] and lengths[row] <= checked):
            continue
        kept = stop.first_stop(row_tokens[: lengths[row]].tolist())
        if kept is not None:
            stopped[row] = kept
            newly.append(row)
    return newly


def _eos_ends(tokens: np.ndarray, eos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's length up to and including its first EOS (all tokens without one),
    and whether it has one."""
    hits = np.isin(tokens, eos)
    ended = hits.any(axis=1)
    return np.where(ended, hits.argmax(axis=1) + 1, tokens.shape[1]), ended


def cache_length(padded_prompt: int, max_new_tokens: int) -> int:
    """The KV-cache length generation allocates: the next power of two that holds the
    padded prompt and the new tokens, at least ``MIN_CACHE_LENGTH``."""
    return max(MIN_CACHE_LENGTH, 1 << max(padded_prompt + max_new_tokens - 1, 0).bit_length())
