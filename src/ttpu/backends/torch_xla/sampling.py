"""Choosing the next token on torch_xla, with the same rules and order as the JAX backend.

Repetition penalty, then minimum new tokens (EOS suppressed), then for sampling
transformers' own warpers: temperature, top-k, top-p, min-p, and a draw from torch_xla's
RNG. The penalty and the minimum are written here over the static token buffer (only
real tokens count), since transformers' processors read a growing ``input_ids``.
Settings are constants of the traced step: they are fixed for one generation, and a new
value of one compiles a new step graph.
"""

from __future__ import annotations

import torch
from transformers import (
    LogitsProcessorList,
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from ttpu.errors import InvalidArgumentError
from ttpu.generation.config import GenerationSettings


class TokenChooser:
    """Picks each row's next token from its last logits, as ``settings`` say."""

    def __init__(self, settings: GenerationSettings, vocab_size: int, device: torch.device) -> None:
        if settings.uses_config_processors:
            raise InvalidArgumentError(
                "forced BOS/EOS tokens, suppress_tokens, begin_suppress_tokens, bad_words_ids and n-gram blocking are "
                "implemented on the JAX backend only so far; use backend='jax', or clear them in the "
                "generation config."
            )
        self._settings = settings
        self._eos = torch.zeros(vocab_size, dtype=torch.bool)
        self._eos[[t for t in settings.eos_token_ids if 0 <= t < vocab_size]] = True  # others never come
        self._eos = self._eos.to(device)
        warpers = []
        if settings.do_sample:
            if settings.temperature != 1.0:
                warpers.append(TemperatureLogitsWarper(settings.temperature))
            if 0 < settings.top_k < vocab_size:
                warpers.append(TopKLogitsWarper(settings.top_k))
            if settings.top_p < 1.0:
                warpers.append(TopPLogitsWarper(settings.top_p))
            if settings.min_p > 0.0:
                warpers.append(MinPLogitsWarper(settings.min_p))
        self._warpers = LogitsProcessorList(warpers)

    def __call__(
        self, logits: torch.Tensor, seen: torch.Tensor, seen_mask: torch.Tensor, generated: torch.Tensor
    ) -> torch.Tensor:
        """Next tokens [batch] from logits [batch, vocab]. ``seen`` [batch, n] holds the
        tokens so far, ``seen_mask`` which are real; ``generated`` (a device scalar)
        counts the tokens generated before this one."""
        settings = self._settings
        logits = logits.float()
        if settings.repetition_penalty != 1.0:
            was_seen = torch.zeros_like(logits).scatter_add(1, seen, seen_mask.to(logits.dtype)) > 0
            penalized = torch.where(
                logits < 0, logits * settings.repetition_penalty, logits / settings.repetition_penalty
            )
            logits = torch.where(was_seen, penalized, logits)
        if settings.eos_token_ids and settings.min_new_tokens:
            too_early = generated < settings.min_new_tokens
            logits = logits.masked_fill(too_early & self._eos, -float("inf"))
        if not settings.do_sample:
            return logits.argmax(dim=-1)
        logits = self._warpers(seen, logits)
        return torch.multinomial(logits.softmax(dim=-1), num_samples=1).squeeze(1)

    def is_eos(self, tokens: torch.Tensor) -> torch.Tensor:
        """Which of ``tokens`` [batch] are EOS tokens."""
        return self._eos[tokens]
