"""Training checkpoints with orbax, named and laid out as transformers' Trainer's.

``output_dir/checkpoint-N/`` holds the train state (trainable parameters, optimizer state,
step: an orbax ``StandardSave``), the position in the data (``position``: epoch, step in epoch),
transformers' trainer state (``trainer_state``, what resuming reads) and, once the
asynchronous write has finished, a copy of it as transformers' ``trainer_state.json``. orbax
writes each checkpoint into a temporary directory and renames it when complete, so a
save killed midway never appears as ``checkpoint-N`` (the latest stays the previous one);
``save_total_limit`` keeps the newest N. Restoring reads arrays straight into the
shardings of the current mesh, which may differ from the one that saved them.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp
from etils import epath
from transformers import TrainerState

from ttpu.training.step import TrainState, abstract_arrays

CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)")
TRAINER_STATE = "trainer_state.json"


@dataclasses.dataclass(frozen=True)
class TransformersNames(ocp.step.NameFormat):
    """``checkpoint-N`` directories, as transformers names them; unfinished ones skipped."""

    def build_name(self, step: int) -> str:
        return f"checkpoint-{step}"

    def find_all(self, base_path: epath.PathLike) -> Iterator[ocp.step.Metadata]:
        base = epath.Path(base_path)
        if not base.exists():
            return
        for path in base.iterdir():
            match = CHECKPOINT_NAME.fullmatch(path.name)
            if match and path.is_dir() and ocp.step.is_path_finalized(path):
                yield ocp.step.Metadata(step=int(match[1]), path=path)

    def find_step(self, base_path: epath.PathLike, step: int) -> ocp.step.Metadata:
        for metadata in self.find_all(base_path):
            if metadata.step == step:
                return metadata
        raise ValueError(f"no finished checkpoint-{step} in {base_path}")


class Checkpoints:
    """The checkpoints of one output directory."""

    def __init__(self, output_dir: str | Path, keep: int | None, asynchronous: bool = True) -> None:
        """``keep``: how many checkpoints to keep (None or <= 0: all, as transformers)."""
        self.directory = Path(output_dir).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep if keep and keep > 0 else None, step_name_format=TransformersNames(), enable_async_checkpointing=asynchronous,
            cleanup_tmp_directories=True, create=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)
        self._unwritten_states: dict[int, TrainerState] = {}

    def save(self, state: TrainState, position: dict[str, Any], trainer_state: TrainerState) -> Path:
        """Start writing ``checkpoint-{step}``; returns its path (complete once
        :meth:`wait` returns)."""
        step = int(position["global_step"])
        self._write_trainer_states()
        if step in self._manager.all_steps():  # a rerun into the same directory overwrites, as transformers does
            self._manager.wait_until_finished()
            self._manager.delete(step)
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), position=ocp.args.JsonSave(position),
                trainer_state=ocp.args.JsonSave(dataclasses.asdict(trainer_state)),
            ),
            force=True,
        )
        self._unwritten_states[step] = copy.deepcopy(trainer_state)
        return self.directory / f"checkpoint-{step}"

    def wait(self) -> None:
        """Block until every started save is complete on disk."""
        self._manager.wait_until_finished()
        self._write_trainer_states()

    def poll(self) -> None:
        """Write ``trainer_state.json`` into checkpoints whose write has finished."""
        self._write_trainer_states()

    def restore(self, path: str | Path, target: TrainState) -> tuple[TrainState, dict[str, Any], TrainerState]:
        """The train state of ``path`` in ``target``'s shapes and shardings, the
        position in the data and transformers' trainer state."""
        path = Path(path)
        match = CHECKPOINT_NAME.fullmatch(path.name)
        if match is None or not path.is_dir():
            raise FileNotFoundError(f"{path} is not a checkpoint-N directory written by ttpu.Trainer.")
        same_directory = path.parent == self.directory
        manager = self._manager if same_directory else ocp.CheckpointManager(
            path.parent, options=ocp.CheckpointManagerOptions(step_name_format=TransformersNames(), read_only=True)
        )
        restored = manager.restore(
            int(match[1]),
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_arrays(target)), position=ocp.args.JsonRestore(),
                trainer_state=ocp.args.JsonRestore(),
            ),
        )
        if not same_directory:
            manager.close()
        return TrainState(*restored.state), dict(restored.position), TrainerState(**restored.trainer_state)

    def _write_trainer_states(self) -> None:
        """transformers' ``trainer_state.json`` into each checkpoint whose write finished."""
        if not self._unwritten_states or self._manager.is_saving_in_progress():
            return
        for step, trainer_state in self._unwritten_states.items():
            directory = self.directory / f"checkpoint-{step}"
            if directory.is_dir():
                trainer_state.save_to_json(str(directory / TRAINER_STATE))
        self._unwritten_states.clear()
