"""ttpu.TrainingArguments: transformers' TrainingArguments with the same names and
meanings, plus where the model runs (mesh, ZeRO stage, remat policy, backend).

A transformers field that ttpu does not implement is refused when it is set to anything
but transformers' default, never silently ignored. A DeepSpeed JSON
(``deepspeed="ds_config.json"`` or a dict) is read for what maps onto ttpu: ZeRO stage,
micro batch, accumulation, clipping and bf16.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import transformers

from ttpu.errors import InvalidArgumentError
from ttpu.sharding.mesh import MeshShape

BACKENDS = ("jax", "torch_xla")
ZERO_STAGES = (0, 1, 2, 3)
# jax.checkpoint policies by name (jax.checkpoint_policies.<name>); None saves nothing.
REMAT_POLICIES = (
    "nothing_saveable", "everything_saveable", "dots_saveable",
    "dots_with_no_batch_dims_saveable", "checkpoint_dots",
)
# AdamW under transformers' names: every one computes torch's AdamW update.
ADAMW_NAMES = ("adamw_torch", "adamw_torch_fused")
SAMPLING_STRATEGIES = ("random", "sequential")
UNSCHEDULED = ("reduce_lr_on_plateau", "greedy")  # rates that follow metrics, not steps
FSDP_TO_ZERO = {"full_shard": 3, "shard_grad_op": 2, "no_shard": 0}

# transformers fields ttpu implements with transformers' meaning (or that only describe
# the run); every other field must keep its default.
IMPLEMENTED = frozenset({
    "output_dir", "per_device_train_batch_size", "per_device_eval_batch_size", "num_train_epochs",
    "max_steps", "learning_rate", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps", "optim",
    "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "gradient_accumulation_steps",
    "average_tokens_across_devices", "max_grad_norm", "bf16", "gradient_checkpointing",
    "gradient_checkpointing_kwargs", "activation_checkpointing", "activation_checkpointing_kwargs",
    "logging_strategy", "logging_steps", "logging_first_step",
    "logging_nan_inf_filter", "disable_tqdm", "report_to", "run_name", "project", "log_level",
    "log_level_replica", "log_on_each_node", "eval_strategy", "eval_steps", "prediction_loss_only",
    "save_strategy", "save_steps", "save_total_limit", "seed", "data_seed", "dataloader_drop_last",
    "dataloader_pin_memory", "remove_unused_columns", "train_sampling_strategy",
    "ignore_data_skip", "resume_from_checkpoint", "do_train", "do_eval", "do_predict", "use_cpu",
    "skip_memory_metrics", "local_rank", "deepspeed", "fsdp", "save_on_each_node", "debug",
    "include_num_input_tokens_seen",
})


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    """transformers' ``TrainingArguments`` for ``ttpu.Trainer``, plus:

    - ``parallelism`` / ``mesh`` / ``sharding_rules``: the device mesh, as for
      ``AutoModelForTPU.from_pretrained`` (default: one device);
    - ``zero_stage``: 0 replicates parameters, gradients and optimizer state over the data
      axes (data, fsdp); 1 shards the optimizer state over them; 2 the gradients too; 3 the
      parameters too. Default: 3 when the mesh has an fsdp axis, else 0;
    - ``remat_policy``: with ``gradient_checkpointing``, what each decoder layer keeps for
      the backward pass (a ``jax.checkpoint_policies`` name; default: nothing);
    - ``backend``: "jax" (ttpu's compiled step) or "torch_xla" (transformers' own Trainer
      with ttpu's FSDPv2 setup).

    ``per_device_train_batch_size`` counts rows per data-parallel device: one optimizer
    step sees it x the data-parallel size x ``gradient_accumulation_steps`` rows.
    """

    parallelism: str | None = field(default=None, metadata={"help": "dp, fsdp, tp, 2d, 3d, auto"})
    mesh: dict[str, int] | None = field(default=None, metadata={"help": "axis sizes, e.g. {'fsdp': 8}"})
    sharding_rules: list | None = field(default=None, metadata={"help": "(regex, spec) pairs"})
    zero_stage: int | None = field(default=None, metadata={"help": "ZeRO stage 0-3"})
    remat_policy: str | None = field(default=None, metadata={"help": "jax.checkpoint policy name"})
    backend: str = field(default="jax", metadata={"help": "jax or torch_xla"})

    def __post_init__(self) -> None:
        if self.backend == "jax":  # backend="torch_xla" runs transformers' own Trainer
            _refuse_unimplemented(self)
        deepspeed, self.deepspeed = self.deepspeed, None  # read here, not by transformers
        fsdp, self.fsdp = self.fsdp, None
        if deepspeed:
            self._apply_deepspeed(_read_json(deepspeed))
        if fsdp:
            self._apply_fsdp(fsdp)
        bf16, self.bf16 = self.bf16, False  # transformers refuses bf16 without a torch GPU
        if self.backend == "torch_xla":
            _spmd_before_the_runtime_starts()
        super().__post_init__()
        self.deepspeed, self.fsdp, self.bf16 = deepspeed, fsdp, bf16
        self._check()

    def _check(self) -> None:
        if self.backend not in BACKENDS:
            raise InvalidArgumentError(f"unknown backend {self.backend!r}; valid: {', '.join(BACKENDS)}.")
        if self.backend == "torch_xla":
            set_here = [f"{name}={getattr(self, name)!r}" for name in ("zero_stage", "remat_policy")
                        if getattr(self, name) is not None]
            if set_here:
                raise InvalidArgumentError(
                    f"{', '.join(set_here)} apply to the JAX backend; backend='torch_xla' runs FSDPv2 (parameters, "
                    "gradients and optimizer state split, ZeRO-3) with torch_xla's checkpoint."
                )
            return  # transformers' own Trainer checks the rest
        if self.zero_stage is not None and self.zero_stage not in ZERO_STAGES:
            raise InvalidArgumentError(f"zero_stage must be one of {ZERO_STAGES} (got {self.zero_stage!r}).")
        if self.remat_policy is not None and self.remat_policy not in REMAT_POLICIES:
            raise InvalidArgumentError(
                f"unknown remat_policy {self.remat_policy!r}; valid: {', '.join(REMAT_POLICIES)}."
            )
        if self.remat_policy is not None and not self.checkpoints_layers:
            raise InvalidArgumentError("remat_policy applies with gradient_checkpointing=True; set both.")
        if str(self.optim) not in ADAMW_NAMES and getattr(self.optim, "value", None) not in ADAMW_NAMES:
            raise InvalidArgumentError(
                f"optim={self.optim!r} is not implemented by ttpu.Trainer; valid: {', '.join(ADAMW_NAMES)} (AdamW)."
            )
        if self.lr_scheduler_type in UNSCHEDULED:
            raise InvalidArgumentError(
                f"lr_scheduler_type={str(self.lr_scheduler_type)!r} changes the rate from evaluation metrics, which a "
                "compiled step cannot follow; use a step-based schedule (linear, cosine, constant_with_warmup, ...)."
            )
        if self.train_sampling_strategy not in SAMPLING_STRATEGIES:
            raise InvalidArgumentError(
                f"train_sampling_strategy={self.train_sampling_strategy!r} is not implemented; "
                f"valid: {', '.join(SAMPLING_STRATEGIES)}."
            )
        if not self.average_tokens_across_devices:
            raise InvalidArgumentError(
                "average_tokens_across_devices=False is not implemented: ttpu's step always divides "
                "by the label tokens of the whole global batch (transformers' default)."
            )
        if self.parallelism is not None and self.mesh is not None:
            raise InvalidArgumentError("give either parallelism= (a strategy name) or mesh= (axis sizes), not both.")

    def _apply_deepspeed(self, config: Mapping[str, Any]) -> None:
        """ZeRO stage, micro batch, accumulation, clipping and bf16 from a DeepSpeed
        config ("auto" keeps this object's value); offloading is refused."""
        zero = config.get("zero_optimization", {}) or {}
        for key in ("offload_optimizer", "offload_param"):
            device = (zero.get(key) or {}).get("device", "none")
            if device not in ("none", None):
                raise InvalidArgumentError(
                    f"DeepSpeed zero_optimization.{key}.device={device!r} is not implemented by ttpu; "
                    "remove it (use a larger mesh or zero_stage=3 to fit)."
                )
        mapping = {
            "zero_stage": zero.get("stage"),
            "per_device_train_batch_size": config.get("train_micro_batch_size_per_gpu"),
            "gradient_accumulation_steps": config.get("gradient_accumulation_steps"),
            "max_grad_norm": config.get("gradient_clipping"),
            "bf16": (config.get("bf16") or {}).get("enabled"),
        }
        for name, value in mapping.items():
            if value is not None and value != "auto":
                setattr(self, name, value)
        if (config.get("fp16") or {}).get("enabled") not in (None, False, "auto"):
            raise InvalidArgumentError("DeepSpeed fp16 is not implemented by ttpu; use bf16.enabled instead.")
        self._deepspeed_train_batch_size = config.get("train_batch_size")

    def _apply_fsdp(self, fsdp: Any) -> None:
        options = fsdp.split() if isinstance(fsdp, str) else list(fsdp)
        stages = [FSDP_TO_ZERO[o] for o in options if o in FSDP_TO_ZERO]
        unknown = [o for o in options if o not in FSDP_TO_ZERO]
        if unknown or len(stages) != 1:
            raise InvalidArgumentError(
                f"fsdp={fsdp!r}: ttpu reads one of {', '.join(FSDP_TO_ZERO)} (as zero_stage 3, 2, 0); "
                "other FSDP options are not implemented. Or use zero_stage= and parallelism= directly."
            )
        self.zero_stage = stages[0]
        if self.parallelism is None and self.mesh is None and stages[0] > 0:
            self.parallelism = "fsdp"

    def check_batch(self, data_parallel_size: int) -> None:
        """A DeepSpeed ``train_batch_size`` must equal micro batch x accumulation x data
        parallel size, as DeepSpeed checks."""
        total = getattr(self, "_deepspeed_train_batch_size", None)
        if total in (None, "auto"):
            return
        expected = self.per_device_train_batch_size * self.gradient_accumulation_steps * data_parallel_size
        if total != expected:
            raise InvalidArgumentError(
                f"DeepSpeed train_batch_size={total} but train_micro_batch_size_per_gpu "
                f"({self.per_device_train_batch_size}) x gradient_accumulation_steps "
                f"({self.gradient_accumulation_steps}) x data-parallel devices ({data_parallel_size}) = {expected}."
            )

    @property
    def checkpoints_layers(self) -> bool:
        """Gradient (activation) checkpointing, under either of transformers' names
        (``activation_checkpointing`` is transformers >= 5.23's)."""
        return bool(self.gradient_checkpointing or getattr(self, "activation_checkpointing", False))

    def resolved_zero_stage(self, mesh: MeshShape) -> int:
        if self.zero_stage is not None:
            return self.zero_stage
        return 3 if mesh.size("fsdp") > 1 else 0


def _spmd_before_the_runtime_starts() -> None:
    """transformers' device setup starts the XLA runtime; started outside SPMD mode it
    counts every device as a process (accelerate would split batches across them) and
    SPMD cannot be switched on any more. The torch_xla trainer runs FSDPv2 under SPMD,
    so SPMD is switched on first (process-wide, as the torch_xla backend does)."""
    from ttpu.backends.torch_xla.versions import import_torch_xla

    import_torch_xla()
    import torch_xla.runtime as xr

    if not xr.is_spmd():
        xr.use_spmd()


def _refuse_unimplemented(args: TrainingArguments) -> None:
    changed = []
    for f in dataclasses.fields(transformers.TrainingArguments):
        if not f.init or f.name in IMPLEMENTED:
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if getattr(args, f.name) != default:
            changed.append(f"{f.name}={getattr(args, f.name)!r}")
    if changed:
        raise InvalidArgumentError(
            "ttpu.TrainingArguments does not implement " + ", ".join(changed) + "; leave "
            + ("it" if len(changed) == 1 else "them") + " at transformers' default (see docs/TRAINING.md "
            "for what ttpu.Trainer implements), or use backend='torch_xla' for transformers' own Trainer."
        )


def _read_json(source: str | Mapping[str, Any]) -> Mapping[str, Any]:
    if isinstance(source, Mapping):
        return source
    path = Path(source)
    if not path.is_file():
        raise InvalidArgumentError(f"deepspeed={source!r}: no such file; give a DeepSpeed JSON path or a dict.")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InvalidArgumentError(f"deepspeed config {source} is not valid JSON: {exc}") from exc
