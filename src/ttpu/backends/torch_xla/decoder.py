"""The torch_xla decode loop: transformers' ``StaticCache`` on the XLA device, one lazy
graph for the prefill (per prompt bucket) and one for a decode step.

Every value that changes from step to step (the write index, positions, the count of
generated tokens, the cache's own length) is a device tensor, so each step traces to
the same graph, compiled once and replayed; ``torch_xla.sync()`` after each step cuts
the graph and runs it asynchronously while Python traces the next one. The host reads
back whether every row has finished only every few steps.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch_xla
import torch_xla.core.xla_model as xm
from transformers import StaticCache

from ttpu.backends.base import CachedStepInputs, Decoder
from ttpu.backends.torch_xla.sampling import TokenChooser
from ttpu.generation.config import GenerationSettings
from ttpu.patches import tracing_scope

if TYPE_CHECKING:
    from ttpu.backends.torch_xla.backend import XlaForward

# Decode steps between host reads of "has every row finished?" (each read waits for the
# device, so reading after every step would stop tracing and running from overlapping).
FINISHED_CHECK_EVERY = 8


@dataclasses.dataclass
class XlaGeneration:
    """One generation in flight; its tensors live on the XLA device."""

    cache: StaticCache
    chooser: TokenChooser
    tokens: torch.Tensor  # [batch, max_length] every token at its cache index
    mask: torch.Tensor  # [batch, max_length] 1 where a real token sits
    positions: torch.Tensor  # [batch] position id of the token fed next
    index: torch.Tensor  # () cache index of the newest token
    generated: torch.Tensor  # () tokens generated so far, on the device
    finished: torch.Tensor  # [batch] ended with an EOS token or by finish()
    count: int  # the same count, on the host
    max_new_tokens: int
    pad_id: int


class XlaDecoder(Decoder):
    """Prefill and decode steps of one causal LM on torch_xla."""

    def __init__(self, forward: XlaForward) -> None:
        self._forward = forward
        self._module = forward.module
        self._config = self._module.config
        self._vocab_size = self._config.get_text_config(decoder=True).vocab_size
        self._step_inputs = CachedStepInputs(self._module)
        self._compiles = 0

    @property
    def compile_count(self) -> int:
        return self._compiles

    def start(
        self,
        input_ids: np.ndarray,
        prompt_mask: np.ndarray,
        max_length: int,
        settings: GenerationSettings,
        seed: int,
    ) -> XlaGeneration:
        forward = self._forward
        device = forward.device
        chooser = TokenChooser(settings, self._vocab_size, device)
        xm.set_rng_state(seed % (1 << 63), device=str(device))
        batch, prompt_length = input_ids.shape
        with forward.counting_compiles() as compiled:
            ids = forward.place(input_ids.astype(np.int64))
            prompt = forward.place(prompt_mask.astype(np.int64))
            positions = (prompt.cumsum(dim=1) - 1).clamp(min=0)
            cache = StaticCache(config=self._config, max_cache_len=max_length)
            logits = self._step(cache, ids, prompt, positions)
            rest = max_length - prompt_length
            tokens = torch.cat([ids, torch.full((batch, rest), settings.pad_token_id, device=device)], dim=1)
            mask = torch.cat([prompt, torch.zeros((batch, rest), dtype=torch.int64, device=device)], dim=1)
            generated = torch.zeros((), dtype=torch.int64, device=device)
            token = chooser(logits, tokens, mask, generated)
            index = torch.tensor(prompt_length, device=device)
            state = XlaGeneration(
                cache=cache,
                chooser=chooser,
                tokens=tokens.index_copy(1, index.view(1), token[:, None]),
                mask=mask.index_fill(1, index.view(1), 1),
                positions=positions[:, -1] + 1,
                index=index,
                generated=generated + 1,
                finished=chooser.is_eos(token),
                count=1,
                max_new_tokens=settings.max_new_tokens,
                pad_id=settings.pad_token_id,
            )
            torch_xla.sync()
            forward.shard_kv_cache(cache)
        self._compiles += compiled()
        return state

    def advance(self, state: XlaGeneration, steps: int) -> XlaGeneration:
        limit = min(state.count + steps, state.max_new_tokens)
        with self._forward.counting_compiles() as compiled:
            while state.count < limit:
                self._decode_step(state)
                torch_xla.sync()
                if state.count % FINISHED_CHECK_EVERY == 0 and bool(state.finished.all().cpu()):
                    break
        self._compiles += compiled()
        return state

    def read(self, state: XlaGeneration) -> tuple[int, np.ndarray]:
        return state.count, state.tokens.cpu().numpy()

    def finish(self, state: XlaGeneration, rows: Sequence[int]) -> XlaGeneration:
        rows_on_device = torch.tensor(list(rows), dtype=torch.int64, device=self._forward.device)
        state.finished = state.finished.index_fill(0, rows_on_device, True)
        return state

    def _decode_step(self, state: XlaGeneration) -> None:
        (state.tokens, state.mask, state.positions, state.index, state.generated, state.finished) = self.decode_step(
            state.cache, state.chooser, state.tokens, state.mask, state.positions, state.index,
            state.generated, state.finished, state.pad_id,
        )
        state.count += 1

    def decode_step(
        self,
        cache: StaticCache,
        chooser: TokenChooser,
        tokens: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        index: torch.Tensor,
        generated: torch.Tensor,
        finished: torch.Tensor,
        pad_id: int,
    ) -> tuple[torch.Tensor, ...]:
        """One token for every row, as a function of tensors (the cache is updated in
        place): the new (tokens, mask, positions, index, generated, finished)."""
        fed = tokens.index_select(1, index.view(1))
        logits = self._step(cache, fed, mask, positions[:, None])
        token = torch.where(finished, pad_id, chooser(logits, tokens, mask, generated))
        index = index + 1
        return (
            tokens.index_copy(1, index.view(1), token[:, None]),
            mask.index_fill(1, index.view(1), 1),
            positions + 1,
            index,
            generated + 1,
            finished | chooser.is_eos(token),
        )

    def _step(self, cache: StaticCache, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The model on ``ids`` with the cache: the last position's logits [batch, vocab]."""
        with torch.no_grad(), tracing_scope(self._module):
            return self._module(**self._step_inputs(ids, mask, cache, positions)).logits[:, -1]
