"""Stop strings, checked on the host between chunks of compiled decode steps.

A stop string is a property of text, not of token ids (one string has many
tokenizations, and may end inside a token), so it is checked on decoded text. The loop
runs a few tokens per host call when stop strings are set; a row whose new text contains
a stop string ends at the first token that completes it, and everything it produced
after that token is replaced by padding, exactly as if it had stopped there.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ttpu.errors import InvalidArgumentError


class StopStrings:
    """Finds, per row, the first generated token whose text completes a stop string."""

    def __init__(self, stop_strings: Sequence[str], tokenizer: Any) -> None:
        if stop_strings and tokenizer is None:
            raise InvalidArgumentError(
                "stop_strings need a tokenizer to read the generated text: pass "
                "generate(..., tokenizer=tokenizer) or load the model with its tokenizer."
            )
        self.strings = tuple(stop_strings)
        self._tokenizer = tokenizer

    def __bool__(self) -> bool:
        return bool(self.strings)

    def first_stop(self, generated: Sequence[int]) -> int | None:
        """How many of ``generated`` to keep (up to and including the token completing a
        stop string), or None if the text holds no stop string."""
        if not self._contains_stop(generated):
            return None
        low, high = 1, len(generated)  # the shortest prefix containing a stop string
        while low < high:
            middle = (low + high) // 2
            if self._contains_stop(generated[:middle]):
                high = middle
            else:
                low = middle + 1
        return low

    def _contains_stop(self, tokens: Sequence[int]) -> bool:
        text = self._tokenizer.decode(list(tokens), skip_special_tokens=False)
        return any(s in text for s in self.strings)
