"""FSDPv2 on the torch_xla backend: torch_xla's ``SpmdFullyShardedDataParallel`` around a
model loaded with an fsdp axis, for training.

Every transformer layer (the model's ``_no_split_modules`` classes) is wrapped, then the
whole model, as transformers' Trainer does for FSDPv2. Parameters keep the shardings the
rules engine gave them at load time (FSDPv2 leaves already-sharded tensors alone), and
each wrapped module's output is split along the batch by :func:`shard_output`: decoder
layers return a plain Tensor, the model a ``ModelOutput``.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import torch
from transformers.utils import ModelOutput

from ttpu.backends.torch_xla.versions import import_torch_xla
from ttpu.errors import InvalidArgumentError
from ttpu.sharding import ShardingPlan

import_torch_xla()  # a clear error naming the versions to install, if torch_xla is missing
import torch_xla.distributed.spmd as xs  # noqa: E402
from torch_xla.distributed.fsdp.wrap import transformer_auto_wrap_policy  # noqa: E402
from torch_xla.experimental.spmd_fully_sharded_data_parallel import SpmdFullyShardedDataParallel  # noqa: E402

if TYPE_CHECKING:
    from ttpu.model import TPUModel


def shard_output(output: Any, mesh: xs.Mesh, plan: ShardingPlan) -> None:
    """Split a wrapped module's activations along the batch over the data axes: a Tensor
    (a decoder layer), a ``ModelOutput`` (its batch-first tensors: logits, hidden states;
    the scalar loss stays as it is) or a tuple (its first element)."""
    if isinstance(output, ModelOutput):
        tensors = [v for v in output.values() if isinstance(v, torch.Tensor) and v.dim() >= 2]
    elif isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        tensors = [output[0]]
    elif isinstance(output, torch.Tensor):
        tensors = [output]
    else:
        raise InvalidArgumentError(
            f"FSDPv2 cannot split a {type(output).__name__} output along the batch; wrapped "
            "modules must return a Tensor, a tuple starting with one, or a ModelOutput."
        )
    for tensor in tensors:
        spec = plan.batch_spec(tensor.shape)
        if any(spec):
            xs.mark_sharding(tensor, mesh, spec)


def fsdp_v2(model: TPUModel) -> SpmdFullyShardedDataParallel:
    """``model``'s torch module on the XLA devices, wrapped with FSDPv2 and set to
    training mode: call it like the torch model, then ``loss.backward()`` and an
    optimizer step over its parameters (``torch_xla.sync()`` ends a step)."""
    forward = model.compiled_forward
    mesh = getattr(forward, "mesh", None)
    if model.backend != "torch_xla" or mesh is None or model.sharding.mesh.size("fsdp") < 2:
        raise InvalidArgumentError(
            "FSDPv2 wraps a model loaded with backend='torch_xla' and an fsdp axis, e.g. "
            "AutoModelForTPU.from_pretrained(name, backend='torch_xla', parallelism='fsdp')."
        )
    module = forward.module
    layer_classes = {
        type(m) for m in module.modules() if type(m).__name__ in set(getattr(module, "_no_split_modules", None) or ())
    }
    policy = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls=layer_classes)
    wrapped = SpmdFullyShardedDataParallel(
        module,
        mesh=mesh,
        shard_output=functools.partial(shard_output, plan=model.sharding),
        auto_wrap_policy=policy if layer_classes else None,
    )
    return wrapped.train()
