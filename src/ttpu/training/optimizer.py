"""The optimizer as transformers' Trainer runs it, in optax.

- learning rates: transformers' own scheduler (``get_scheduler``) evaluated once per
  optimizer step into a table; the compiled step reads the entry of its step count, so
  the rate of update ``k`` is the one transformers' scheduler gives after ``k`` steps
  (zero for the first update under warmup);
- AdamW with torch's update and decoupled weight decay, not applied to the parameters
  transformers exempts (biases, norms: ``Trainer.get_decay_parameter_names``);
- clipping as ``torch.nn.utils.clip_grad_norm_``: scale ``max_norm / (norm + 1e-6)``,
  at most 1; the norm (before clipping) is what gets logged.
"""

from __future__ import annotations

from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
import transformers

from ttpu.training.arguments import TrainingArguments

TORCH_CLIP_EPSILON = 1e-6


def learning_rates(args: TrainingArguments, max_steps: int) -> np.ndarray:
    """The learning rate of each update 0..max_steps (float64, as transformers logs it)."""
    dummy = torch.optim.SGD([torch.nn.Parameter(torch.zeros(()))], lr=args.learning_rate)
    scheduler = transformers.get_scheduler(
        args.lr_scheduler_type, dummy, num_warmup_steps=args.get_warmup_steps(max_steps),
        num_training_steps=max_steps, scheduler_specific_kwargs=args.lr_scheduler_kwargs or {},
    )
    rates = []
    for _ in range(max_steps + 1):
        rates.append(scheduler.get_last_lr()[0])
        dummy.step()
        scheduler.step()
    return np.asarray(rates, dtype=np.float64)


def adamw(args: TrainingArguments, rates: np.ndarray, decayed: dict[str, bool]) -> optax.GradientTransformation:
    """torch's AdamW over a dict of parameters; ``decayed[name]``: weight decay applies."""
    table = jnp.asarray(rates, dtype=jnp.float32)

    def schedule(count: jax.Array) -> jax.Array:
        return table[jnp.minimum(count, len(rates) - 1)]

    return optax.adamw(
        learning_rate=schedule, b1=args.adam_beta1, b2=args.adam_beta2, eps=args.adam_epsilon,
        weight_decay=args.weight_decay, mask=decayed,
    )


def decayed_parameters(module: torch.nn.Module, names: Iterable[str]) -> dict[str, bool]:
    """Which of ``names`` (trainable parameters) transformers' Trainer decays."""
    decay = set(transformers.Trainer.get_decay_parameter_names(None, module))
    return {name: name in decay for name in names}


def global_norm(grads: dict[str, jax.Array]) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in grads.values()))


def clip_like_torch(grads: dict[str, jax.Array], norm: jax.Array, max_norm: float) -> dict[str, jax.Array]:
    """``torch.nn.utils.clip_grad_norm_``'s scaling (``max_norm <= 0``: no clipping)."""
    if max_norm <= 0:
        return grads
    scale = jnp.minimum(max_norm / (norm + TORCH_CLIP_EPSILON), 1.0)
    return {name: (g * scale).astype(g.dtype) for name, g in grads.items()}
