"""ttpu.Trainer: transformers' Trainer loop (callbacks, logging, evaluation, checkpoints,
``log_history``) around one compiled JAX train step.

The stock torch model is traced once by the JAX backend; its parameters live on the mesh
as the ZeRO stage says, and every optimizer step is one call of a compiled program that
takes and returns the train state (see :mod:`ttpu.training.step`).
"""

from __future__ import annotations

import inspect
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import torch
from transformers import (
    AutoConfig,
    DataCollatorWithPadding,
    EvalPrediction,
    PreTrainedModel,
    TrainerControl,
    TrainerState,
    default_data_collator,
)
from transformers.integrations import get_reporting_integration_callbacks
from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss
from transformers.utils import logging as transformers_logging
from transformers.trainer_callback import CallbackHandler, DefaultFlowCallback, PrinterCallback, ProgressCallback
from transformers.trainer_utils import get_last_checkpoint, speed_metrics

from ttpu import models
from ttpu.auto import prepare_module
from ttpu.backends import get_backend
from ttpu.errors import InvalidArgumentError, ModelNotFoundError
from ttpu.logs import transformers_progress_hidden
from ttpu.sharding import plan_sharding
from ttpu.tasks import auto_class, task_from_config
from ttpu.training import optimizer
from ttpu.training.arguments import TrainingArguments
from ttpu.training.checkpoints import Checkpoints
from ttpu.training.data import Batches, StepBatch, epoch_order, forward_columns
from ttpu.training.step import Metrics, Steps, TrainState, checkpointed_layers
from ttpu.training.zero import ZeroPlan, placement_plan, plan_zero

logger = logging.getLogger(__name__)


class Trainer:
    """Train a transformers model with transformers' Trainer semantics on the JAX backend.

    ``model``: an alias, local directory or hub id (loaded in float32 with the class of
    its config's architecture, e.g. a causal LM), a
    transformers ``PreTrainedModel``, or a PEFT model (only its trainable adapter
    parameters are trained and saved). The other arguments are transformers'.

    With ``args.backend="torch_xla"`` this builds transformers' own Trainer instead, over
    a model ttpu placed with FSDPv2 (:func:`ttpu.training.torch_xla.xla_trainer`).
    """

    def __new__(cls, model: Any = None, args: Any = None, **kwargs: Any) -> Any:
        if isinstance(args, TrainingArguments) and args.backend == "torch_xla":
            from ttpu.training.torch_xla import xla_trainer

            return xla_trainer(model, args, **kwargs)
        return super().__new__(cls)

    def __init__(
        self,
        model: str | Path | torch.nn.Module,
        args: TrainingArguments,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        data_collator: Callable[[list[dict]], Any] | None = None,
        processing_class: Any = None,
        compute_metrics: Callable[[EvalPrediction], dict[str, float]] | None = None,
        callbacks: list | None = None,
        preprocess_logits_for_metrics: Callable[[Any, Any], Any] | None = None,
    ) -> None:
        if not isinstance(args, TrainingArguments):
            raise InvalidArgumentError(
                "args must be a ttpu.TrainingArguments (transformers' fields, same names, plus mesh and ZeRO "
                f"options); got {type(args).__name__}."
            )
        if args.eval_strategy != "no" and eval_dataset is None:
            raise InvalidArgumentError(
                f"eval_strategy={str(args.eval_strategy)!r} needs an eval_dataset; pass one or set eval_strategy='no'."
            )
        transformers_logging.set_verbosity(args.get_process_log_level())
        self.args = args
        self.module, tokenizer = _load_module(model)
        self.processing_class = processing_class if processing_class is not None else tokenizer
        self.train_dataset = train_dataset
        self.eval_dataset = eval_dataset
        self.data_collator = data_collator or _default_collator(self.processing_class)
        self.compute_metrics = compute_metrics
        self.preprocess_logits_for_metrics = preprocess_logits_for_metrics
        transformers_module = _unwrap_peft(self.module)
        self._loss_takes_item_count = _accepts_loss_kwargs(transformers_module)
        self._shifts_labels = LOSS_MAPPING.get(
            getattr(transformers_module, "loss_type", None)
        ) is ForCausalLMLoss and not getattr(transformers_module.config, "is_encoder_decoder", False)
        self._flops_per_token = 6 * transformers_module.num_parameters(exclude_embeddings=True)
        self._columns = forward_columns(transformers_module, args.label_names) if args.remove_unused_columns else None

        runtime = get_backend("jax")
        prepare_module(transformers_module, runtime)
        if args.checkpoints_layers:
            options = getattr(args, "activation_checkpointing_kwargs", None) or args.gradient_checkpointing_kwargs or {}
            _enable_checkpointing(transformers_module, args.remat_policy, options.get("every_n_layers", 1))
        plan = plan_sharding(
            self.module, parallelism=args.parallelism, mesh=args.mesh, rules=args.sharding_rules,
            device_count=runtime.device_count(), device_memory=runtime.device_memory(),
        )
        self.mesh_shape = plan.mesh
        args.check_batch(plan.mesh.data_parallel_size)
        shapes = {n: tuple(p.shape) for n, p in self.module.named_parameters()}
        tables = {f"{n}.weight" for n, m in self.module.named_modules() if isinstance(m, torch.nn.Embedding)}
        self.zero: ZeroPlan = plan_zero(plan, shapes, args.resolved_zero_stage(plan.mesh), tables)
        self.forward = runtime.compile(self.module, placement_plan(plan, self.zero), release_host_weights=False)
        trainable = {n for n, p in self.module.named_parameters() if p.requires_grad}
        self.trainable_names = [n for n in self.forward.params if n in trainable]
        if not self.trainable_names:
            raise InvalidArgumentError("the model has no trainable parameters (every requires_grad is False).")

        self.state = TrainerState()
        self.control = TrainerControl()
        reporting = get_reporting_integration_callbacks(args.report_to)
        progress = PrinterCallback if args.disable_tqdm else ProgressCallback
        self.callback_handler = CallbackHandler(
            [DefaultFlowCallback, *reporting, progress, *(callbacks or [])],
            self.module, self.processing_class, None, None,
        )
        self.train_state: TrainState | None = None
        self._steps: Steps | None = None
        self._train_program: Any = None
        self._eval_programs: dict[tuple, Any] = {}  # by batch shape
        self._checkpoints: Checkpoints | None = None
        self._start_time: float | None = None
        self._initial_tokens_seen = 0
        self.control = self.callback_handler.on_init_end(args, self.state, self.control)

    # public API ----------------------------------------------------------------------
    @property
    def data_parallel_size(self) -> int:
        return self.mesh_shape.data_parallel_size

    @property
    def compile_count(self) -> int:
        """Programs this trainer holds compiled: the train step of the last ``train()``
        call (one per call) and one eval step per eval batch shape."""
        return int(self._train_program is not None) + len(self._eval_programs)

    def add_callback(self, callback: Any) -> None:
        self.callback_handler.add_callback(callback)

    def train(self, resume_from_checkpoint: str | bool | None = None) -> Any:
        """Run the training loop; ``resume_from_checkpoint``: True for the latest
        ``checkpoint-N`` in ``output_dir``, or a checkpoint directory."""
        args = self.args
        resume_from_checkpoint = resume_from_checkpoint or args.resume_from_checkpoint
        batches = self._batches(self.train_dataset, args.per_device_train_batch_size, args.gradient_accumulation_steps,
                                args.dataloader_drop_last)
        steps_per_epoch = batches.steps_per_epoch
        max_steps = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * steps_per_epoch)
        rates = optimizer.learning_rates(args, max_steps)
        decayed = optimizer.decayed_parameters(self.module, self.trainable_names)
        self._steps = self._new_steps(optimizer.adamw(args, rates, decayed))
        self._train_program = None  # this call's optimizer and schedule
        params = {n: self.forward.params[n] for n in self.trainable_names}
        self.train_state = self._steps.init_state(params)
        self._checkpoints = Checkpoints(args.output_dir, args.save_total_limit)

        self.state = TrainerState(
            logging_steps=args.logging_steps, eval_steps=args.eval_steps, save_steps=args.save_steps,
            train_batch_size=args.per_device_train_batch_size * self.data_parallel_size,
        )
        self.state.max_steps = max_steps
        self.state.num_train_epochs = math.ceil(max_steps / steps_per_epoch)
        self.state.compute_steps(args, max_steps)  # fractions of max_steps, as transformers
        epoch, first_step = 0, 0
        checkpoint = self._resume_path(resume_from_checkpoint)
        if checkpoint is not None:
            self.train_state, position, saved = self._checkpoints.restore(checkpoint, self.train_state)
            self.forward.params.update(self.train_state.params)
            self.state.global_step, self.state.log_history = saved.global_step, saved.log_history
            self.state.epoch, self.state.total_flos = saved.epoch, saved.total_flos
            self.state.num_input_tokens_seen = saved.num_input_tokens_seen
            epoch, first_step = position["epoch"], position["step_in_epoch"]
            if args.ignore_data_skip:  # transformers: the data starts over, the schedule does not
                epoch, first_step = 0, 0
            if first_step >= steps_per_epoch:
                epoch, first_step = epoch + 1, 0
            logger.info("resuming from %s at step %d", checkpoint, self.state.global_step)

        start = self._start_time = time.time()
        self._initial_tokens_seen = self.state.num_input_tokens_seen
        start_step, total_loss = self.state.global_step, 0.0
        pending: list[Metrics] = []
        last_logged = self.state.global_step
        self.control = self.callback_handler.on_train_begin(args, self.state, self.control)
        while self.state.global_step < max_steps and not self.control.should_training_stop:
            self.control = self.callback_handler.on_epoch_begin(args, self.state, self.control)
            order = epoch_order(len(self.train_dataset), _data_seed(args), epoch, args.train_sampling_strategy)
            step_in_epoch = first_step
            for batch in batches.epoch(order, first_step):
                self.control = self.callback_handler.on_step_begin(args, self.state, self.control)
                metrics = self._train_step(batch)
                for _ in range(batch.micro_batches - 1):
                    self.control = self.callback_handler.on_substep_end(args, self.state, self.control)
                self.control = self.callback_handler.on_pre_optimizer_step(args, self.state, self.control)
                self.control = self.callback_handler.on_optimizer_step(args, self.state, self.control)
                pending.append(metrics)
                step_in_epoch += 1
                self.state.global_step += 1
                self.state.total_flos += self._flops_per_token * batch.input_elements
                if args.include_num_input_tokens_seen != "no":
                    self.state.num_input_tokens_seen += (
                        batch.tokens if args.include_num_input_tokens_seen == "non_padding" else batch.input_elements
                    )
                micro_done = min(step_in_epoch * args.gradient_accumulation_steps, batches.micro_batches_per_epoch)
                self.state.epoch = epoch + micro_done / batches.micro_batches_per_epoch
                self.control = self.callback_handler.on_step_end(args, self.state, self.control)
                self._checkpoints.poll()
                last_logged, total_loss = self._log_save_evaluate(
                    pending, rates, last_logged, total_loss, epoch, step_in_epoch
                )
                if self.state.global_step >= max_steps:
                    self.control.should_training_stop = True
                if self.control.should_epoch_stop or self.control.should_training_stop:
                    break
            self.control = self.callback_handler.on_epoch_end(args, self.state, self.control)
            last_logged, total_loss = self._log_save_evaluate(
                pending, rates, last_logged, total_loss, epoch, step_in_epoch
            )
            epoch, first_step = epoch + 1, 0

        self._checkpoints.wait()
        steps_run = self.state.global_step - start_step
        total_loss += self._interval_loss(pending)
        metrics = speed_metrics(
            "train", start, num_samples=steps_run * self.state.train_batch_size * args.gradient_accumulation_steps,
            num_steps=steps_run,
        )
        metrics["total_flos"] = self.state.total_flos
        metrics["train_loss"] = total_loss / max(steps_run, 0.001)  # transformers' mean over this call's steps
        self.log(metrics)
        self._sync_torch_module()
        self.control = self.callback_handler.on_train_end(args, self.state, self.control)
        return metrics

    def evaluate(
        self, eval_dataset: Any = None, ignore_keys: list[str] | None = None, metric_key_prefix: str = "eval"
    ) -> dict[str, float]:
        """The eval loss (mean over examples of their batch's loss, as transformers) and
        ``compute_metrics`` over every example's logits. ``ignore_keys`` is accepted for
        transformers' signature: only the loss and the logits are read from the output."""
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None:
            raise InvalidArgumentError("evaluate() needs an eval_dataset (here or in the Trainer).")
        batches = self._batches(dataset, self.args.per_device_eval_batch_size, 1, drop_last=False)
        start = time.time()
        params = {**self.forward.params, **(self.train_state.params if self.train_state else {})}
        trainable = {n: params[n] for n in self.trainable_names}
        frozen = {n: a for n, a in params.items() if n not in trainable}
        weighted, rows, predictions, label_ids = 0.0, 0, [], []
        for batch in batches.epoch(list(range(len(dataset)))):
            arrays = {k: v[0] for k, v in batch.arrays.items()}
            placed = {k: jax.device_put(v, self._steps_or_new().batch_sharding(v.ndim, False)) for k, v in arrays.items()}
            shape = tuple(sorted((k, v.shape) for k, v in arrays.items()))
            if shape not in self._eval_programs:
                self._eval_programs[shape] = self._steps_or_new().compile_eval(trainable, frozen, placed)
            loss, logits = self._eval_programs[shape](trainable, frozen, placed, jnp.float32(max(batch.item_count, 1)))
            self.control = self.callback_handler.on_prediction_step(self.args, self.state, self.control)
            weighted += float(loss) * batch.rows
            rows += batch.rows
            if self.compute_metrics is not None and not self.args.prediction_loss_only:
                kept = np.asarray(jax.device_get(logits))[: batch.rows]
                labels = arrays["labels"][: batch.rows]
                if self.preprocess_logits_for_metrics is not None:
                    kept = np.asarray(self.preprocess_logits_for_metrics(torch.from_numpy(kept), torch.from_numpy(labels)))
                predictions.append(kept)
                label_ids.append(labels)
        metrics = {f"{metric_key_prefix}_loss": weighted / rows}
        if predictions:
            computed = self.compute_metrics(EvalPrediction(np.concatenate(predictions), np.concatenate(label_ids)))
            metrics.update({k if k.startswith(f"{metric_key_prefix}_") else f"{metric_key_prefix}_{k}": v
                            for k, v in computed.items()})
        metrics.update(speed_metrics(metric_key_prefix, start, num_samples=rows, num_steps=batches.steps_per_epoch))
        self.log(metrics)
        self._sync_torch_module()
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Record ``logs`` in ``state.log_history`` and tell the callbacks, as
        transformers does (with the tokens seen and their rate when
        ``include_num_input_tokens_seen`` is on)."""
        if self.state.epoch is not None:
            logs["epoch"] = self.state.epoch
        if self.args.include_num_input_tokens_seen != "no":
            logs["num_input_tokens_seen"] = self.state.num_input_tokens_seen
            if start_time is not None:
                seen = self.state.num_input_tokens_seen - self._initial_tokens_seen
                logs.update(speed_metrics("train", start_time, num_tokens=seen))
        self.state.log_history.append({**logs, "step": self.state.global_step})
        self.control = self.callback_handler.on_log(self.args, self.state, self.control, logs)

    def save_model(self, output_dir: str | Path | None = None) -> Path:
        """The trained model as transformers saves it (safetensors, config, tokenizer):
        ``from_pretrained`` loads it without ttpu. A PEFT model saves its adapter only."""
        output_dir = Path(output_dir or self.args.output_dir)
        if self._checkpoints is not None:
            self._checkpoints.wait()
        self.module.save_pretrained(output_dir, state_dict=self._host_state_dict(), safe_serialization=True)
        if self.processing_class is not None and hasattr(self.processing_class, "save_pretrained"):
            self.processing_class.save_pretrained(output_dir)
        return output_dir

    # steps ---------------------------------------------------------------------------
    def _train_step(self, batch: StepBatch) -> Metrics:
        steps = self._steps
        arrays = {k: jax.device_put(v, steps.batch_sharding(v.ndim, True)) for k, v in batch.arrays.items()}
        if self._train_program is None:
            logger.info("compiling the train step (once per run)")
            self._train_program = steps.compile_train(self.train_state, self._frozen(), arrays)
        self.train_state, metrics = self._train_program(
            self.train_state, self._frozen(), arrays, jnp.float32(max(batch.item_count, 1)),
            jnp.float32(batch.micro_batches),
        )
        self.forward.params.update(self.train_state.params)
        return metrics

    def _host_state_dict(self) -> dict[str, torch.Tensor]:
        """The trained weights as the module's state dict (CPU tensors, read one at a
        time; tied weights under their first name, as transformers saves them)."""
        names = set(self.module.state_dict())
        return {n: _to_torch(self.forward.to_host(a)) for n, a in self.forward.params.items() if n in names}

    def _sync_torch_module(self) -> None:
        """Copy the trained weights into the torch module that callbacks receive."""
        if self.train_state is not None:
            self.module.load_state_dict(self._host_state_dict(), strict=False)

    def _frozen(self) -> dict[str, jax.Array]:
        trainable = set(self.trainable_names)
        return {n: a for n, a in self.forward.params.items() if n not in trainable}

    def _steps_or_new(self) -> Steps:
        if self._steps is None:  # evaluate() before train(): no optimizer needed
            self._steps = self._new_steps(None)
        return self._steps

    def _new_steps(self, tx: Any) -> Steps:
        return Steps(
            self.forward, tx, self.zero, seed=self.args.seed, max_grad_norm=self.args.max_grad_norm,
            bf16=self.args.bf16, loss_takes_item_count=self._loss_takes_item_count,
            parameter_names=frozenset(n for n, _ in self.module.named_parameters()),
        )

    def _interval_loss(self, pending: list[Metrics]) -> float:
        """The summed loss of the steps since the last log, with transformers' NaN/Inf
        filter (a non-finite step counts as the running mean so far; applied per step,
        where transformers applies it per micro-batch)."""
        total = 0.0
        for i, metrics in enumerate(pending):
            loss = float(metrics.loss)
            if self.args.logging_nan_inf_filter and not math.isfinite(loss):
                total += total / (1 + i)
            else:
                total += loss
        return total

    def _log_save_evaluate(self, pending: list[Metrics], rates: np.ndarray, last_logged: int, total_loss: float,
                           epoch: int, step_in_epoch: int) -> tuple[int, float]:
        """transformers' ``_maybe_log_save_evaluate``; returns the step last logged and
        the summed loss of the logged steps."""
        if self.control.should_log and self.state.global_step > last_logged:
            interval = self._interval_loss(pending)
            logs = {
                "loss": interval / (self.state.global_step - last_logged),
                "grad_norm": float(pending[-1].grad_norm),
                "learning_rate": float(rates[self.state.global_step - 1]),
            }
            pending.clear()
            total_loss += interval
            last_logged = self.state.global_step
            self.log(logs, self._start_time)
        if self.control.should_evaluate:
            self.evaluate()
        if self.control.should_save:
            position = {"global_step": self.state.global_step, "epoch": epoch, "step_in_epoch": step_in_epoch}
            self._checkpoints.save(self.train_state, position, self.state)
            self._sync_torch_module()
            self.control = self.callback_handler.on_save(self.args, self.state, self.control)
        return last_logged, total_loss

    def _batches(self, dataset: Any, per_device: int, accumulation: int, drop_last: bool) -> Batches:
        pad = getattr(self.processing_class, "pad_token_id", None)
        return Batches(
            dataset, self.data_collator, rows=per_device * self.data_parallel_size, accumulation=accumulation,
            keep_columns=self._columns, pad_token_id=pad if pad is not None else 0,
            shifts_labels=self._shifts_labels, drop_last=drop_last,
        )

    def _resume_path(self, resume: str | bool | None) -> Path | None:
        if not resume:
            return None
        if resume is True:
            found = get_last_checkpoint(self.args.output_dir) if Path(self.args.output_dir).is_dir() else None
            if found is None:
                logger.info("resume_from_checkpoint=True: no checkpoint in %s, starting fresh", self.args.output_dir)
            return Path(found) if found else None
        path = Path(resume)
        if not (path / "state").is_dir():
            raise InvalidArgumentError(
                f"resume_from_checkpoint={resume!r} is not a finished ttpu checkpoint (no state/ inside); "
                "pass True for the latest one in output_dir."
            )
        return path


def _load_module(model: Any) -> tuple[torch.nn.Module, Any]:
    """The torch module to train and the tokenizer stored with it (if loaded by name)."""
    if isinstance(model, torch.nn.Module):
        if not isinstance(_unwrap_peft(model), PreTrainedModel):
            raise InvalidArgumentError(
                f"model must be a transformers PreTrainedModel, a PEFT model or a name; got {type(model).__name__}."
            )
        return model, None
    if not isinstance(model, (str, Path)):
        raise InvalidArgumentError(f"model must be a name, a path or a torch module; got {type(model).__name__}.")
    from ttpu.auto import _load_tokenizer

    source = models.resolve(model)
    try:
        config = AutoConfig.from_pretrained(source)
    except OSError as exc:
        raise ModelNotFoundError(models.not_found_message(str(model), exc)) from exc
    with transformers_progress_hidden():
        module = auto_class(task_from_config(config)).from_pretrained(source, config=config, dtype=torch.float32)
    return module, _load_tokenizer(source, False)


def _unwrap_peft(model: torch.nn.Module) -> torch.nn.Module:
    base = getattr(model, "get_base_model", None)
    return base() if callable(base) else model


def _accepts_loss_kwargs(module: torch.nn.Module) -> bool:
    """transformers' Trainer's test: does the model divide its loss by
    ``num_items_in_batch`` itself?"""
    if hasattr(module, "accepts_loss_kwargs"):
        return bool(module.accepts_loss_kwargs)
    return any(p.kind == inspect.Parameter.VAR_KEYWORD for p in inspect.signature(module.forward).parameters.values())


def _to_torch(array: np.ndarray) -> torch.Tensor:
    if array.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(np.ascontiguousarray(array).view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(np.array(array))


def _enable_checkpointing(module: PreTrainedModel, policy: str | None, every_n_layers: int) -> None:
    if not module.supports_gradient_checkpointing:
        raise InvalidArgumentError(
            f"{type(module).__name__} does not support gradient checkpointing (transformers' "
            "supports_gradient_checkpointing is False); set gradient_checkpointing=False."
        )
    module._set_gradient_checkpointing(
        enable=True, gradient_checkpointing_func=checkpointed_layers(policy), every_n_layers=every_n_layers
    )


def _default_collator(processing_class: Any) -> Callable[[list[dict]], Any]:
    """transformers' default: pad with the tokenizer when there is one."""
    if processing_class is not None and hasattr(processing_class, "pad"):
        return DataCollatorWithPadding(processing_class)
    return default_data_collator


def _data_seed(args: TrainingArguments) -> int:
    return args.data_seed if args.data_seed is not None else args.seed
