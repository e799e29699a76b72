"""Generation settings: transformers' ``GenerationConfig`` and ``generate()`` kwargs,
resolved and validated once, before anything is compiled or run.

As in transformers, the model's own ``generation_config`` is the default, a
``generation_config=`` argument replaces it, keyword arguments override single fields,
and unset fields take transformers' defaults (``max_length=20``, ``top_k=50``, ...).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from typing import Any

from transformers import GenerationConfig, PretrainedConfig

from ttpu.errors import InvalidArgumentError

# Fields ttpu implements; any other field set to a non-default value is refused rather
# than silently ignored.
SUPPORTED = {
    "max_length", "max_new_tokens", "min_length", "min_new_tokens", "do_sample",
    "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "eos_token_id",
    "pad_token_id", "bos_token_id", "stop_strings", "num_return_sequences", "use_cache",
    "cache_implementation", "decoder_start_token_id", "transformers_version",
    "_from_model_config", "output_attentions", "output_hidden_states", "return_dict_in_generate",
    "forced_bos_token_id", "forced_eos_token_id", "suppress_tokens", "begin_suppress_tokens", "bad_words_ids",
    "no_repeat_ngram_size", "encoder_no_repeat_ngram_size",
}


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
    """Everything one ``generate`` call needs, validated."""

    max_new_tokens: int
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    min_p: float = 0.0  # 0.0: off
    repetition_penalty: float = 1.0  # 1.0: off
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0
    stop_strings: tuple[str, ...] = ()
    num_return_sequences: int = 1
    seed: int | None = None
    prompt_length: int = 0  # the prompts' width as given (before bucket padding)
    # Logits processors transformers applies from a model's generation config.
    forced_bos_token_id: int | None = None  # the first token when the prompt is one token long
    forced_eos_token_ids: tuple[int, ...] = ()  # the last token allowed by max_new_tokens
    suppress_tokens: tuple[int, ...] = ()  # never generated
    begin_suppress_tokens: tuple[int, ...] = ()  # not generated first
    bad_words_ids: tuple[tuple[int, ...], ...] = ()  # token sequences never completed
    no_repeat_ngram_size: int = 0  # n-grams of the prompt and generated tokens occur once (0: off)
    prompt_no_repeat_ngram_size: int = 0  # n-grams of the prompt are not generated (0: off)

    @property
    def uses_config_processors(self) -> bool:
        return bool(
            self.forced_bos_token_id is not None or self.forced_eos_token_ids or self.suppress_tokens
            or self.begin_suppress_tokens or self.bad_words_ids or self.no_repeat_ngram_size
            or self.prompt_no_repeat_ngram_size
        )


def resolve_settings(
    model_config: PretrainedConfig,
    model_generation_config: GenerationConfig | None,
    prompt_length: int,
    generation_config: GenerationConfig | None = None,
    seed: int | None = None,
    **kwargs: Any,
) -> GenerationSettings:
    """Merge the model's generation config, the caller's config and keyword overrides,
    as ``transformers``' ``generate`` does, and validate the result."""
    base = generation_config or model_generation_config
    if base is None:
        base = GenerationConfig.from_model_config(model_config)
    config = copy.deepcopy(base)
    try:
        unknown = config.update(**kwargs)
    except ValueError as exc:  # transformers validates the updated fields
        raise InvalidArgumentError(f"invalid generation setting: {exc}") from exc
    if unknown:
        raise InvalidArgumentError(
            f"unknown generate() argument(s) {sorted(unknown)}; generation options are the "
            "fields of transformers.GenerationConfig (max_new_tokens, do_sample, temperature, "
            "top_k, top_p, min_p, repetition_penalty, eos_token_id, stop_strings, ...) and seed."
        )
    defaults = GenerationConfig._get_default_generation_params()

    def value(name: str) -> Any:
        current = getattr(config, name, None)
        return defaults.get(name) if current is None else current

    _refuse_unsupported(config, defaults)
    max_new_tokens = config.max_new_tokens
    if max_new_tokens is None:
        max_new_tokens = value("max_length") - prompt_length
    min_new_tokens = config.min_new_tokens
    if min_new_tokens is None:
        min_new_tokens = max(value("min_length") - prompt_length, 0)
    eos = _token_list(value("eos_token_id"))
    pad = value("pad_token_id")
    if pad is None:
        pad = eos[0] if eos else 0
    stop = value("stop_strings") or ()
    settings = GenerationSettings(
        max_new_tokens=int(max_new_tokens),
        min_new_tokens=int(min_new_tokens),
        do_sample=bool(value("do_sample")),
        temperature=float(value("temperature")),
        top_k=int(value("top_k") or 0),
        top_p=float(value("top_p")),
        min_p=float(value("min_p") or 0.0),
        repetition_penalty=float(value("repetition_penalty")),
        eos_token_ids=eos,
        pad_token_id=int(pad),
        stop_strings=(stop,) if isinstance(stop, str) else tuple(stop),
        num_return_sequences=int(value("num_return_sequences")),
        seed=seed,
        prompt_length=int(prompt_length),
        **processor_settings(config),
    )
    validate(settings)
    return settings


def processor_settings(config: GenerationConfig) -> dict[str, Any]:
    """The :class:`GenerationSettings` fields of the logits processors a generation config
    turns on (forced, suppressed and bad tokens, repeated n-grams)."""
    eos = _token_list(config.eos_token_id)
    return dict(
        forced_bos_token_id=None if config.forced_bos_token_id is None else int(config.forced_bos_token_id),
        forced_eos_token_ids=_token_list(config.forced_eos_token_id),
        suppress_tokens=_token_list(config.suppress_tokens),
        begin_suppress_tokens=_token_list(config.begin_suppress_tokens),
        # transformers drops a bad word that is one EOS token
        bad_words_ids=tuple(tuple(int(t) for t in words) for words in config.bad_words_ids or ()
                            if not (len(words) == 1 and words[0] in eos)),
        no_repeat_ngram_size=int(config.no_repeat_ngram_size or 0),
        # transformers' encoder_no_repeat_ngram_size: a decoder-only model's "encoder input" is its prompt.
        prompt_no_repeat_ngram_size=int(getattr(config, "encoder_no_repeat_ngram_size", 0) or 0),
    )


def validate(settings: GenerationSettings) -> None:
    """Clear errors for settings no generation can run with."""
    checks = [
        (settings.max_new_tokens > 0,
         (f"max_new_tokens must be at least 1 (got {settings.max_new_tokens}); "
          "with max_length, it must exceed the prompt length")),
        (settings.min_new_tokens >= 0, f"min_new_tokens must be >= 0 (got {settings.min_new_tokens})"),
        (not settings.do_sample or settings.temperature > 0,
         (f"temperature must be > 0 when sampling (got {settings.temperature}); "
          "use do_sample=False for greedy decoding")),
        (0 < settings.top_p <= 1, f"top_p must be in (0, 1] (got {settings.top_p})"),
        (settings.top_k >= 0, f"top_k must be >= 0 (got {settings.top_k}); 0 turns it off"),
        (0 <= settings.min_p <= 1, f"min_p must be in [0, 1] (got {settings.min_p})"),
        (settings.repetition_penalty > 0,
         f"repetition_penalty must be > 0 (got {settings.repetition_penalty}); 1.0 turns it off"),
        (settings.num_return_sequences >= 1,
         f"num_return_sequences must be >= 1 (got {settings.num_return_sequences})"),
        (all(isinstance(s, str) and s for s in settings.stop_strings),
         f"stop_strings must be non-empty strings (got {settings.stop_strings!r})"),
        (all(settings.bad_words_ids),
         f"bad_words_ids must be non-empty lists of token ids (got {settings.bad_words_ids!r})"),
        (settings.no_repeat_ngram_size >= 0 and settings.prompt_no_repeat_ngram_size >= 0,
         "no_repeat_ngram_size and encoder_no_repeat_ngram_size must be >= 0 (0 turns them off)"),
    ]
    for ok, message in checks:
        if not ok:
            raise InvalidArgumentError(message)


def _refuse_unsupported(config: GenerationConfig, defaults: dict[str, Any]) -> None:
    unsupported = []
    for name, current in config.to_dict().items():
        if name in SUPPORTED or current is None or name not in defaults:
            continue
        if current != defaults[name]:
            unsupported.append(f"{name}={current!r}")
    if config.return_dict_in_generate:
        unsupported.append("return_dict_in_generate=True")
    if unsupported:
        raise InvalidArgumentError(
            f"ttpu's generate() does not implement {', '.join(unsupported)} yet; it supports "
            "greedy and sampled decoding with temperature, top_k, top_p, min_p, "
            "repetition_penalty, min/max new tokens, EOS tokens, stop strings, forced BOS/EOS "
            "tokens, suppressed tokens, bad words and (encoder_)no_repeat_ngram_size; no beam search."
        )


def _token_list(value: int | Sequence[int] | None) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)
