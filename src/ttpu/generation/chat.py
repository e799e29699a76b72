"""Chat prompts: a conversation rendered with the tokenizer's own chat template."""

from __future__ import annotations

from typing import Any

import numpy as np

from ttpu.errors import InvalidArgumentError

ROLES = ("system", "user", "assistant")


def chat_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> np.ndarray:
    """Token ids [1, length] of ``messages`` followed by the assistant's turn opening.

    Each message is ``{"role": "system" | "user" | "assistant", "content": str}``.
    """
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise InvalidArgumentError(
            "this tokenizer has no chat template, so a conversation cannot be turned into a "
            "prompt; use `ttpu generate` with plain text, or set tokenizer.chat_template."
        )
    if not messages:
        raise InvalidArgumentError("the conversation is empty: give at least one user message")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise InvalidArgumentError(
                f"message {index} must be a dict with a string 'content' (got {message!r})"
            )
        if message.get("role") not in ROLES:
            raise InvalidArgumentError(
                f"message {index} has role {message.get('role')!r}; chat roles are {list(ROLES)}"
            )
    from jinja2 import TemplateError

    try:
        encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="np")
    except TemplateError as exc:
        raise InvalidArgumentError(f"the chat template refused this conversation: {exc}") from exc
    ids = encoded["input_ids"] if hasattr(encoded, "keys") else encoded
    return np.asarray(ids, np.int64).reshape(1, -1)
