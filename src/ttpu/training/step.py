"""The compiled train and eval steps: pure functions of (state, batch) -> (state, metrics).

The train step differentiates the model's own loss (transformers' loss function, given
``num_items_in_batch``) with respect to the trainable parameters only; frozen parameters
and buffers are inputs it does not differentiate. One step is one optimizer update: the
batch arrives as ``[accumulation, rows, ...]`` and a ``lax.scan`` sums the micro-batches'
gradients, each loss already divided by the label tokens of the whole accumulated batch
(transformers' token-weighted accumulation). Parameters and optimizer state are donated.
Dropout draws from a key derived from the seed and the step number.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
import torch
import torch.utils._pytree as torch_pytree
from jax.sharding import NamedSharding

from ttpu.errors import InvalidArgumentError
from ttpu.training import optimizer
from ttpu.training.zero import ZeroPlan, data_entry

if TYPE_CHECKING:  # the JAX backend (torchax) is imported when a JAX trainer is built
    from ttpu.backends.jax.backend import JaxForward

Params = dict[str, jax.Array]
Batch = dict[str, jax.Array]


class TrainState(NamedTuple):
    """What changes from step to step: the trainable parameters, the optimizer state
    (its count is the number of updates done, which positions the schedule) and the
    step number (which seeds dropout)."""

    params: Params
    opt_state: optax.OptState
    step: jax.Array


class Metrics(NamedTuple):
    """One step's loss (token-weighted mean over the accumulated batch) and gradient
    norm before clipping, left on the device until they are logged."""

    loss: jax.Array
    grad_norm: jax.Array


def checkpointed_layers(policy: str | None) -> Callable[..., Any]:
    """A ``gradient_checkpointing_func`` for transformers' decoder layers that wraps the
    layer in ``jax.checkpoint``: its activations are recomputed in the backward pass
    instead of kept (``policy``: what to keep, a ``jax.checkpoint_policies`` name)."""
    from ttpu.backends.jax.environment import tracing_environment

    chosen = getattr(jax.checkpoint_policies, policy) if policy else None
    env = tracing_environment()

    def run_checkpointed(function: Callable[..., Any], *args: Any) -> Any:
        bound = function if isinstance(function, functools.partial) else functools.partial(function)
        target, keywords = functools.partial(bound.func, *bound.args), bound.keywords
        leaves, tree = torch_pytree.tree_flatten((args, keywords))
        traced = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]

        def layer(*arrays: jax.Array) -> Any:
            filled = list(leaves)
            for i, array in zip(traced, arrays):
                filled[i] = env.j2t_iso(array)
            call_args, call_keywords = torch_pytree.tree_unflatten(filled, tree)
            return env.t2j_iso(target(*call_args, **call_keywords))

        def layer_with_key(key: jax.Array, *arrays: jax.Array) -> Any:
            # dropout inside rotates the environment's key: a key of its own, passed in,
            # so no value of the checkpointed trace leaks into the environment
            with env.override_property(prng=key):
                return layer(*arrays)

        arrays = [env.t2j_iso(leaves[i]) for i in traced]
        key = env.get_and_rotate_prng_key()
        return env.j2t_iso(jax.checkpoint(layer_with_key, policy=chosen)(key, *arrays))

    return run_checkpointed


class Steps:
    """Builds and compiles the train and eval steps of one model, mesh and optimizer
    (``tx`` None: evaluation only)."""

    def __init__(
        self, forward: JaxForward, tx: optax.GradientTransformation | None, zero: ZeroPlan, *,
        seed: int, max_grad_norm: float, bf16: bool, loss_takes_item_count: bool, parameter_names: frozenset[str],
    ) -> None:
        self.forward = forward
        self.tx = tx
        self.zero = zero
        self.seed = seed
        self.max_grad_norm = max_grad_norm
        self.bf16 = bf16
        self.loss_takes_item_count = loss_takes_item_count
        self.parameter_names = parameter_names  # cast to bf16 with ``bf16`` (buffers are not)
        placement = forward.placement
        self.mesh = placement.mesh
        self.replicated = placement.replicated
        self._sharding = placement.sharding

    # shardings ---------------------------------------------------------------------
    def param_shardings(self, names: list[str]) -> dict[str, NamedSharding]:
        return {n: self._sharding(self.zero.parameters()[n]) for n in names}

    def opt_state_shardings(self, opt_shapes: Any) -> Any:
        """Each optimizer-state leaf of a parameter's shape follows the stage's optimizer
        spec of that parameter; scalars (the count) are replicated."""
        specs = self.zero.optimizer_state()

        def leaf_sharding(path: tuple, leaf: Any) -> NamedSharding:
            names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
            name = names[-1] if names else None
            if name in specs and len(specs[name]) == len(leaf.shape):
                return self._sharding(specs[name])
            return self.replicated

        return jax.tree_util.tree_map_with_path(leaf_sharding, opt_shapes)

    def state_shardings(self, state: TrainState) -> TrainState:
        return TrainState(
            self.param_shardings(list(state.params)), self.opt_state_shardings(state.opt_state), self.replicated
        )

    def init_state(self, params: Params) -> TrainState:
        """Optimizer state created directly with the stage's shardings (never whole on
        one device first)."""
        shapes = jax.eval_shape(self.tx.init, params)
        init = jax.jit(self.tx.init, out_shardings=self.opt_state_shardings(shapes))
        return TrainState(params, init(params), jax.device_put(jnp.zeros((), jnp.int32), self.replicated))

    # the pure functions ------------------------------------------------------------
    def _loss(self, params: Params, frozen: Params, batch: Batch, item_count: jax.Array, key: jax.Array | None,
              training: bool) -> tuple[jax.Array, jax.Array]:
        """The model's loss on one micro-batch, and its logits."""
        from ttpu.backends.jax.environment import tracing_environment

        weights = {**frozen, **params}
        if self.bf16:
            weights = {
                n: w.astype(jnp.bfloat16) if n in self.parameter_names and jnp.issubdtype(w.dtype, jnp.floating) else w
                for n, w in weights.items()
            }
        env = tracing_environment()
        inputs = env.j2t_iso(dict(batch))
        if self.loss_takes_item_count:
            inputs["num_items_in_batch"] = env.j2t_iso(item_count)
        with env.override_property(prng=key) if key is not None else contextlib.nullcontext():
            out = self.forward.call_traced(weights, inputs, training=training)
        if getattr(out, "loss", None) is None:
            raise InvalidArgumentError(
                "the model returned no loss: the batches need labels (for a causal LM, "
                "DataCollatorForLanguageModeling(tokenizer, mlm=False) adds them) and the model a head that "
                "computes a loss (e.g. a *ForCausalLM class)."
            )
        return out.loss.jax().astype(jnp.float32), out.logits.jax()

    def _train(self, state: TrainState, frozen: Params, batch: Batch, item_count: jax.Array,
               micro_batches: jax.Array) -> tuple[TrainState, Metrics]:
        grad_shardings = {n: self._sharding(s) for n, s in self.zero.gradients().items() if n in state.params}
        step_key = jax.random.fold_in(jax.random.key(self.seed), state.step)

        def micro_step(carry: tuple[Params, jax.Array], inputs: tuple[Batch, jax.Array]) -> tuple[Any, None]:
            grads, loss_sum = carry
            micro, index = inputs

            def loss_of(params: Params) -> jax.Array:
                loss, _ = self._loss(params, frozen, micro, item_count, jax.random.fold_in(step_key, index), True)
                # a model whose loss ignores num_items_in_batch averages per micro-batch;
                # transformers' Trainer then divides by the number of micro-batches
                return loss if self.loss_takes_item_count else loss / micro_batches

            def nothing(params: Params) -> tuple[jax.Array, Params]:
                return jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params)

            # micro-batches past the real ones (the end of an epoch) are skipped, not run:
            # a model's own mean over their no labels would be 0/0
            loss, micro_grads = jax.lax.cond(index < micro_batches, jax.value_and_grad(loss_of), nothing, state.params)
            micro_grads = jax.lax.with_sharding_constraint(micro_grads, grad_shardings)
            grads = jax.tree.map(jnp.add, grads, micro_grads)
            return (grads, loss_sum + loss), None

        zeros = jax.lax.with_sharding_constraint(jax.tree.map(jnp.zeros_like, state.params), grad_shardings)
        accumulation = next(iter(batch.values())).shape[0]
        (grads, loss), _ = jax.lax.scan(
            micro_step, (zeros, jnp.zeros((), jnp.float32)), (batch, jnp.arange(accumulation))
        )
        norm = optimizer.global_norm(grads)
        grads = optimizer.clip_like_torch(grads, norm, self.max_grad_norm)
        opt_specs = self.zero.optimizer_state()
        grads = jax.lax.with_sharding_constraint(grads, {n: self._sharding(opt_specs[n]) for n in grads})
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        params = jax.lax.with_sharding_constraint(params, self.param_shardings(list(params)))
        return TrainState(params, opt_state, state.step + 1), Metrics(loss, norm)

    def _eval(self, params: Params, frozen: Params, batch: Batch, item_count: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self._loss(params, frozen, batch, item_count, None, False)

    # compiled programs -------------------------------------------------------------
    def compile_train(self, state: TrainState, frozen: Params, batch: Batch) -> jax.stages.Compiled:
        """The train step compiled for these shapes (the only train program of a run)."""
        shardings = self.state_shardings(state)
        frozen_shardings = {n: a.sharding for n, a in frozen.items()}
        batch_shardings = {n: self.batch_sharding(a.ndim, accumulated=True) for n, a in batch.items()}
        jitted = jax.jit(
            self._train,
            in_shardings=(shardings, frozen_shardings, batch_shardings, self.replicated, self.replicated),
            out_shardings=(shardings, Metrics(self.replicated, self.replicated)),
            donate_argnums=(0,),
        )
        scalar = jax.ShapeDtypeStruct((), jnp.float32)
        return jitted.lower(abstract_arrays(state), abstract_arrays(frozen), abstract_arrays(batch), scalar, scalar).compile()

    def compile_eval(self, params: Params, frozen: Params, batch: Batch) -> jax.stages.Compiled:
        jitted = jax.jit(
            self._eval,
            in_shardings=(
                {n: a.sharding for n, a in params.items()}, {n: a.sharding for n, a in frozen.items()},
                {n: self.batch_sharding(a.ndim, accumulated=False) for n, a in batch.items()}, self.replicated,
            ),
        )
        scalar = jax.ShapeDtypeStruct((), jnp.float32)
        return jitted.lower(abstract_arrays(params), abstract_arrays(frozen), abstract_arrays(batch), scalar).compile()

    def batch_sharding(self, ndim: int, accumulated: bool) -> NamedSharding:
        """Rows split over the data axes (after the accumulation axis, if any)."""
        rows = data_entry(self.forward.placement.plan.mesh)
        spec = ((None,) if accumulated else ()) + (rows,)
        return self._sharding(spec + (None,) * (ndim - len(spec)))


def abstract_arrays(tree: Any) -> Any:
    """``tree``'s arrays as shape, dtype and sharding only."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), tree)

