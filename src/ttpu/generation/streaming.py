"""Turning a growing list of token ids into text pieces, as they are generated."""

from __future__ import annotations

from typing import Any


class TextPieces:
    """Incremental detokenizer: ``add(ids)`` returns the text the new ids completed.

    Text is decoded from all ids so far and only the new suffix returned, so tokens that
    merge with their neighbours (byte fallback, leading-space rules) come out right. A
    trailing partial character (U+FFFD) is held back until the next token completes it.
    """

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._emitted = 0

    def add(self, ids: list[int]) -> str:
        self._ids.extend(ids)
        text = self._tokenizer.decode(self._ids, skip_special_tokens=self._skip)
        if text.endswith("\ufffd"):
            return ""
        piece = text[self._emitted :]
        self._emitted = len(text)
        return piece

    def flush(self) -> str:
        """Whatever is left, partial characters included."""
        text = self._tokenizer.decode(self._ids, skip_special_tokens=self._skip)
        piece = text[self._emitted :]
        self._emitted = len(text)
        return piece
