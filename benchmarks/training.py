"""ttpu.Trainer's structure on 8 virtual CPU devices: per-device bytes and collectives
of each ZeRO stage, temporary memory with and without gradient checkpointing, and step
time against transformers' Trainer (eager PyTorch) in the same run.

    XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_cpu_enable_concurrency_optimized_scheduler=false" \\
        python benchmarks/training.py
"""

from __future__ import annotations

import os
import re
import tempfile
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from ttpu import Trainer, TrainingArguments  # noqa: E402

COLLECTIVE = re.compile(r"\b(all-reduce|reduce-scatter|all-gather|all-to-all)(-start)?\(")


def model(layers: int = 4, hidden: int = 64, mlp: int | None = None) -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(
        vocab_size=512, hidden_size=hidden, intermediate_size=mlp or 4 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


def data(rows: int, length: int) -> list[dict]:
    rng = np.random.default_rng(0)
    return [{"input_ids": (ids := rng.integers(1, 512, length).tolist()), "labels": ids} for _ in range(rows)]


def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
    return {k: torch.tensor([r[k] for r in rows]) for k in rows[0]}


def train(module, rows, steps: int, **options) -> Trainer:
    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(), max_steps=steps, logging_steps=1, save_strategy="no", report_to="none",
        disable_tqdm=True, **options,
    )
    trainer = Trainer(module, args, train_dataset=rows, data_collator=collate)
    trainer.train()
    return trainer


def per_device(tree) -> int:
    device = jax.devices()[0]
    return sum(s.data.nbytes for a in jax.tree.leaves(tree) for s in a.addressable_shards if s.device == device)


def zero_stages() -> None:
    print("ZeRO stages, data=8, per device (MB):")
    print(f"{'stage':>5} {'params':>8} {'opt state':>10} {'argument':>9} {'temp':>8}  collectives in the compiled step")
    rows = data(16, 64)
    for stage in range(4):
        trainer = train(model(), rows, 1, per_device_train_batch_size=1, gradient_accumulation_steps=2,
                        mesh={"data": 8}, zero_stage=stage)
        program = trainer._train_program
        memory = program.memory_analysis()
        counts: dict[str, int] = {}
        for match in COLLECTIVE.finditer(program.as_text()):
            counts[match[1]] = counts.get(match[1], 0) + 1
        state = trainer.train_state
        print(f"{stage:>5} {per_device(state.params) / 1e6:8.3f} {per_device(state.opt_state) / 1e6:10.3f} "
              f"{memory.argument_size_in_bytes / 1e6:9.3f} {memory.temp_size_in_bytes / 1e6:8.3f}  {counts}")


def checkpointing() -> None:
    """Temporary memory of the compiled step with and without gradient checkpointing, on
    an MLP-heavy and an attention-heavy shape."""
    shapes = {"MLP-heavy (hidden 64, MLP 1024, 32 x 64 tokens)": (64, 1024, 32, 64),
              "attention-heavy (hidden 32, MLP 128, 8 x 256 tokens)": (32, 128, 8, 256)}
    for label, (hidden, mlp, rows, length) in shapes.items():
        temp = {}
        for enabled in (False, True):
            trainer = train(model(layers=8, hidden=hidden, mlp=mlp), data(rows, length), 1,
                            per_device_train_batch_size=rows, gradient_checkpointing=enabled)
            temp[enabled] = trainer._train_program.memory_analysis().temp_size_in_bytes
        print(f"gradient checkpointing, 8 layers, {label}: temp {temp[False] / 1e6:.1f} MB -> "
              f"{temp[True] / 1e6:.1f} MB ({temp[True] / temp[False]:.2f}x)")


class StepClock(transformers.TrainerCallback):
    """When each step's loss was logged (both trainers log every step, after it ran)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.times.append(time.perf_counter())


def speed() -> None:
    """Steady-state seconds per optimizer step (median after two warm-up steps; ttpu's
    first step compiles), ttpu on one device against transformers' Trainer."""
    import accelerate.utils.memory

    accelerate.utils.memory.clear_device_cache = lambda *a, **k: None  # torchax's "jax" device has no cache
    rows = data(96, 128)
    steps = 12
    options = dict(per_device_train_batch_size=4, gradient_accumulation_steps=2, learning_rate=1e-3,
                   max_steps=steps, logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True)
    seconds = {}
    for name in ("transformers", "ttpu"):
        clock = StepClock()
        if name == "ttpu":
            args = TrainingArguments(output_dir=tempfile.mkdtemp(), **options)
            Trainer(model(), args, train_dataset=rows, data_collator=collate, callbacks=[clock]).train()
        else:
            args = transformers.TrainingArguments(output_dir=tempfile.mkdtemp(), use_cpu=True, **options)
            transformers.Trainer(model=model(), args=args, train_dataset=rows, data_collator=collate,
                                 callbacks=[clock]).train()
        seconds[name] = float(np.median(np.diff(clock.times[2:])))
    print(f"seconds per step (8 x 128 tokens, 4 layers, one device): transformers {seconds['transformers']:.4f}, "
          f"ttpu {seconds['ttpu']:.4f} -> ttpu is {seconds['transformers'] / seconds['ttpu']:.2f}x transformers")


if __name__ == "__main__":
    start = time.time()
    zero_stages()
    checkpointing()
    speed()
    print(f"({time.time() - start:.0f} s)")
