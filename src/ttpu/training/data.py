"""Training data as static-shape arrays: transformers' sampling order, collators, and
padding to one length so that a run compiles one train step.

Order: as transformers' Trainer (through accelerate's seedable sampler), epoch ``e`` visits
the examples in ``torch.randperm(n)`` drawn from a generator seeded with
``(data_seed or seed) + e`` ("random"), or in order ("sequential"). Rows are collated by
the data collator, then padded to the run's length (the longest example, rounded up to
the collator's ``pad_to_multiple_of`` or 8) and to full micro-batches: padding rows and
positions carry label -100 and attention mask 0, so they change neither the loss nor the
label-token count. The last optimizer step of an epoch may hold fewer micro-batches
(transformers' remainder); it is padded with empty micro-batches the same way.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ttpu.errors import InvalidArgumentError

IGNORE_INDEX = -100
LENGTH_MULTIPLE = 8


@dataclass
class StepBatch:
    """One optimizer step's data: arrays ``[accumulation, rows, length]``, the label
    tokens that count for the loss (transformers' ``num_items_in_batch``), how many
    micro-batches and rows are real, the non-padding tokens, and the elements of the
    collated (not yet padded) ``input_ids``, as transformers counts them for FLOPs."""

    arrays: dict[str, np.ndarray]
    item_count: int
    micro_batches: int
    rows: int
    tokens: int
    input_elements: int


def epoch_order(size: int, seed: int, epoch: int, strategy: str) -> list[int]:
    if strategy == "sequential":
        return list(range(size))
    generator = torch.Generator()
    generator.manual_seed(seed + epoch)
    return torch.randperm(size, generator=generator).tolist()


class Batches:
    """Turns a map-style dataset into padded step batches."""

    def __init__(
        self, dataset: Any, collator: Callable[[list[dict]], Any], *, rows: int, accumulation: int,
        keep_columns: Sequence[str] | None, pad_token_id: int, shifts_labels: bool, drop_last: bool,
    ) -> None:
        if dataset is None or not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
            raise InvalidArgumentError(
                "ttpu.Trainer takes a map-style dataset (a datasets.Dataset, a list of dicts or a torch "
                f"Dataset with __len__ and __getitem__); got {type(dataset).__name__}."
            )
        if len(dataset) == 0:
            raise InvalidArgumentError("the dataset is empty.")
        if drop_last and len(dataset) < rows:
            raise InvalidArgumentError(
                f"dataloader_drop_last=True with {len(dataset)} examples and {rows} rows per batch drops them all; "
                "use a smaller batch or dataloader_drop_last=False."
            )
        self.dataset = dataset
        self.collator = collator
        self.rows = rows
        self.accumulation = accumulation
        self.keep_columns = set(keep_columns) if keep_columns is not None else None
        self.pad_token_id = pad_token_id
        self.shifts_labels = shifts_labels
        self.drop_last = drop_last
        self.length = self._padded_length()

    @property
    def micro_batches_per_epoch(self) -> int:
        full, rest = divmod(len(self.dataset), self.rows)
        return full if self.drop_last or not rest else full + 1

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch, as transformers counts them (at least one)."""
        return max(math.ceil(self.micro_batches_per_epoch / self.accumulation), 1)

    def epoch(self, order: list[int], first_step: int = 0) -> Iterator[StepBatch]:
        """The step batches of one epoch, from step ``first_step`` (resuming)."""
        micro = [order[i:i + self.rows] for i in range(0, len(order), self.rows)]
        micro = micro[: self.micro_batches_per_epoch]
        for step in range(first_step, self.steps_per_epoch):
            group = micro[step * self.accumulation:(step + 1) * self.accumulation]
            yield self.step_batch([[self.dataset[i] for i in indices] for indices in group], self.accumulation)

    def step_batch(self, groups: list[list[dict]], accumulation: int) -> StepBatch:
        """Collate and pad ``groups`` of examples into ``[accumulation, rows, length]``."""
        collated = [self._collate(examples) for examples in groups]
        keys = list(collated[0])
        arrays = {}
        for key in keys:
            fill = self._fill(key)
            padded = np.full((accumulation, self.rows, self.length), fill, dtype=np.int64)
            for i, micro in enumerate(collated):
                value = micro[key]
                padded[i, : value.shape[0], : value.shape[1]] = value
            arrays[key] = padded
        if "shift_labels" in arrays:  # already shifted by the collator
            counted = arrays["shift_labels"]
        elif "labels" in arrays:
            counted = arrays["labels"][..., 1:] if self.shifts_labels else arrays["labels"]
        else:
            counted = None
        item_count = int((counted != IGNORE_INDEX).sum()) if counted is not None else 0
        elements = sum(int(np.prod(c["input_ids"].shape)) for c in collated)
        mask = arrays.get("attention_mask")
        tokens = int(mask.sum()) if mask is not None else elements
        return StepBatch(arrays, item_count, len(groups), sum(len(g) for g in groups), tokens, elements)

    def _collate(self, examples: list[dict]) -> dict[str, np.ndarray]:
        if self.keep_columns is not None:
            examples = [{k: v for k, v in e.items() if k in self.keep_columns} for e in examples]
        batch = self.collator(examples)
        if "input_ids" not in batch:
            raise InvalidArgumentError(
                f"the collated batch has no 'input_ids' (keys: {sorted(batch)}); ttpu.Trainer trains on token batches."
            )
        out = {}
        for key, value in dict(batch).items():
            array = value.numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
            if not np.issubdtype(array.dtype, np.integer) and array.dtype != np.bool_:
                raise InvalidArgumentError(
                    f"the collated batch's {key!r} holds {array.dtype} values; ttpu.Trainer takes token "
                    "batches (integer input_ids, attention_mask, labels) for causal language models."
                )
            if array.ndim != 2:
                raise InvalidArgumentError(
                    f"the collated batch's {key!r} has shape {array.shape}; ttpu.Trainer pads "
                    "[rows, length] token arrays (input_ids, attention_mask, labels, ...)."
                )
            if array.shape[1] > self.length:
                raise InvalidArgumentError(
                    f"the collator made {key!r} {array.shape[1]} tokens long, longer than the longest "
                    f"example rounded up ({self.length}); ttpu pads every batch to that one length."
                )
            out[key] = array
        return out

    def _fill(self, key: str) -> int:
        if key in ("labels", "shift_labels"):
            return IGNORE_INDEX
        if key == "input_ids":
            return self.pad_token_id
        return 0

    def _padded_length(self) -> int:
        column = None
        if hasattr(self.dataset, "column_names") and "input_ids" in self.dataset.column_names:
            column = self.dataset["input_ids"]
        if column is None:
            first = self.dataset[0]
            if not isinstance(first, Mapping) or "input_ids" not in first:
                raise InvalidArgumentError(
                    "ttpu.Trainer takes examples with tokenized 'input_ids' (dicts, or a datasets.Dataset with that "
                    f"column); the first example is {type(first).__name__}"
                    + (f" with keys {sorted(first)}" if isinstance(first, Mapping) else "") + "."
                )
            column = (example["input_ids"] for example in self.dataset)
        longest = max(len(ids) for ids in column)
        multiple = getattr(self.collator, "pad_to_multiple_of", None) or LENGTH_MULTIPLE
        return -(-longest // multiple) * multiple


def forward_columns(module: torch.nn.Module, label_names: Sequence[str] | None) -> list[str] | None:
    """The dataset columns the model takes (transformers' ``remove_unused_columns``):
    its forward's parameters, the label names and ``label``/``label_ids``."""
    signature = inspect.signature(module.forward)
    return [*signature.parameters, "label", "label_ids", *(label_names or [])]


def language_modeling_blocks(paths: Sequence[str], tokenizer: Any, length: int, field: str = "text") -> list[dict]:
    """Causal-LM examples from text files, as transformers' ``run_clm`` makes them: every
    document (a ``.jsonl`` line's ``field``, or a whole other file) tokenized and ended
    with EOS, all concatenated and cut into blocks of ``length`` tokens (the remainder
    dropped)."""
    import json
    from pathlib import Path

    documents = []
    for path in paths:
        text = Path(path).read_text(encoding="utf-8")
        if str(path).endswith(".jsonl"):
            for number, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    record = json.loads(line)
                    if field not in record:
                        raise InvalidArgumentError(f"{path}:{number} has no {field!r} field (keys: {sorted(record)}).")
                    documents.append(record[field])
        else:
            documents.append(text)
    ids: list[int] = []
    for document in documents:
        ids.extend(tokenizer(document)["input_ids"])
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
    blocks = [ids[i:i + length] for i in range(0, len(ids) - length + 1, length)]
    if not blocks:
        raise InvalidArgumentError(
            f"{', '.join(map(str, paths))} hold{'s' if len(paths) == 1 else ''} {len(ids)} tokens, fewer than one "
            f"block of {length}; give more text or a smaller --block-size."
        )
    return [{"input_ids": block, "attention_mask": [1] * length, "labels": list(block)} for block in blocks]
