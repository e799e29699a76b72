"""transformers' own results that tests compare ttpu's against."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def transformers_greedy(model: torch.nn.Module, prompts: Sequence[Sequence[int]], new_tokens: int,
                        batch: int = 4) -> list[list[int]]:
    """transformers' greedy ``generate`` of exactly ``new_tokens`` after each prompt (token
    ids), prompts of similar lengths run together in left-padded batches of ``batch``: a
    real model's step reads its whole vocabulary projection however many rows share it,
    so batches cost about what one prompt does. On Gemma 3 270M's test prompts the
    tokens equal those of one prompt at a time (padding is masked out exactly; only the
    products' shapes differ)."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: dict[int, list[int]] = {}
    for start in range(0, len(order), batch):
        group = order[start : start + batch]
        width = max(len(prompts[i]) for i in group)
        ids = torch.tensor([[0] * (width - len(prompts[i])) + list(prompts[i]) for i in group])
        mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in group])
        with torch.no_grad():
            tokens = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                    do_sample=False, pad_token_id=0)
        out.update({i: tokens[row, width:].tolist() for row, i in enumerate(group)})
    return [out[i] for i in range(len(prompts))]
