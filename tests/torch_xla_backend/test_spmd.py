"""torch_xla SPMD on 8 PJRT CPU devices, with the same rules engine as the JAX backend.

SPMD mode is process-wide and the device count is fixed when the runtime starts, so this
module runs in a process of its own with CPU_NUM_DEVICES=8 (scripts/test.sh).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from architectures import ARCHITECTURES
from test_parity import relative_error

from ttpu import AutoModelForTPU

pytestmark = pytest.mark.skipif(
    os.environ.get("CPU_NUM_DEVICES") != "8", reason="run in its own process with CPU_NUM_DEVICES=8"
)
SHARDED = [a for a in ARCHITECTURES if a.name in ("llama", "gpt2")]


@pytest.fixture(scope="module", params=SHARDED, ids=lambda a: a.name)
def reference(request):
    arch = request.param
    module = arch.build()
    inputs = arch.make_inputs(module, batch=8)
    with torch.no_grad():
        expected = module(**{k: torch.from_numpy(v) for k, v in inputs.items()}).logits.numpy()
    return module, inputs, expected


@pytest.mark.parametrize("strategy", ["dp", "fsdp", "tp", "2d", "3d", "auto"])
def test_every_strategy_matches_eager(reference, strategy) -> None:
    import torch_xla

    module, inputs, expected = reference
    model = AutoModelForTPU.from_model(module, backend="torch_xla", parallelism=strategy)
    actual = model(**inputs).logits.cpu().numpy()
    assert relative_error(actual, expected, inputs["attention_mask"]) <= 1e-5
    for name, parameter in model._forward._module.named_parameters():
        spec = model.sharding.parameters[name].spec
        shard = torch_xla._XLAC._get_local_shards([parameter])[0][0][0].shape if any(spec) else parameter.shape
        expected_shape = tuple(size // model.sharding.mesh.split(axis) for size, axis in zip(parameter.shape, spec))
        assert tuple(shard) == expected_shape, (name, spec)


@pytest.mark.parametrize("strategy", ["fsdp", "tp", "2d"])
def test_generate_under_every_split_matches_transformers(reference, strategy) -> None:
    """Greedy tokens equal transformers'; the static KV cache stays split over the batch
    (data axes) and the KV heads (tensor axis) where they divide."""
    import torch_xla
    import torch_xla.core.xla_model

    module, inputs, _ = reference
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    with torch.no_grad():
        expected = module.generate(
            torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), do_sample=False, max_new_tokens=8
        ).numpy()
    model = AutoModelForTPU.from_model(module, backend="torch_xla", parallelism=strategy)
    decoder = model.decoder()
    np.testing.assert_array_equal(model.generate(ids, attention_mask=mask, max_new_tokens=8), expected)
    from ttpu.generation.generate import _settings

    state = decoder.advance(decoder.start(ids, mask, 32, _settings(model, ids, None, 0, {"max_new_tokens": 4}), 0), 3)
    torch_xla.core.xla_model.wait_device_ops()
    keys = state.cache.layers[0].keys
    spec = model.sharding.kv_cache_spec(keys.shape)
    shard = torch_xla._XLAC._get_local_shards([keys])[0][0][0].shape
    assert tuple(shard) == tuple(size // model.sharding.mesh.split(axis) for size, axis in zip(keys.shape, spec))


def test_fsdp_v2_forward_and_one_optimizer_step_equal_unsharded() -> None:
    """Every decoder layer wrapped (they return a plain Tensor) and the model (a
    ModelOutput); one AdamW step gives the loss and the weights eager PyTorch gives."""
    import copy

    import torch_xla

    from ttpu import fsdp_v2

    module = next(a for a in SHARDED if a.name == "llama").build()
    reference = copy.deepcopy(module).train()
    # The XLA runtime starts before the first backward of the process: PyTorch's autograd
    # engine counts each device type's devices once, at its first backward.
    model = AutoModelForTPU.from_model(module, backend="torch_xla", parallelism="fsdp")
    wrapped = fsdp_v2(model)

    ids = torch.from_numpy(np.random.default_rng(3).integers(1, 256, (8, 12)))
    optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    expected_loss = reference(input_ids=ids, labels=ids).loss
    expected_loss.backward()
    optimizer.step()

    layers = [m for m in wrapped.modules() if type(m).__name__ == "SpmdFullyShardedDataParallel"]
    assert len(layers) == 1 + module.config.num_hidden_layers
    optimizer = torch.optim.AdamW(wrapped.parameters(), lr=1e-2)
    on_device = ids.to(torch_xla.device())
    loss = wrapped(input_ids=on_device, labels=on_device, use_cache=False).loss
    loss.backward()
    optimizer.step()
    torch_xla.sync()
    assert abs(loss.item() - expected_loss.item()) <= 1e-5 * abs(expected_loss.item())
    expected = dict(reference.named_parameters())
    for name, parameter in wrapped.named_parameters():
        name = name.replace("_orig_module.", "")
        torch.testing.assert_close(parameter.detach().cpu(), expected[name].detach(), rtol=1e-4, atol=1e-5)


def test_fsdp_v2_refuses_a_model_without_an_fsdp_axis() -> None:
    from ttpu import fsdp_v2
    from ttpu.errors import InvalidArgumentError

    model = AutoModelForTPU.from_model(SHARDED[0].build(), backend="torch_xla", parallelism="tp")
    with pytest.raises(InvalidArgumentError, match="parallelism='fsdp'"):
        fsdp_v2(model)


def test_trainer_on_torch_xla_trains_like_the_jax_trainer_and_saves_trained_weights(tmp_path) -> None:
    """``Trainer(args.backend="torch_xla")`` is transformers' Trainer over ttpu's FSDPv2
    model on 8 devices: its losses are the JAX Trainer's on one device, and its
    checkpoint holds the trained weights (transformers#36004 saved the base ones)."""
    import transformers
    from test_training import COMMON, collate, dataset, tiny

    from ttpu import Trainer, TrainingArguments
    from ttpu.training.torch_xla import XlaTrainer

    options = {**COMMON, "max_steps": 4, "per_device_train_batch_size": 8, "gradient_accumulation_steps": 1}
    initial = tiny().state_dict()
    args = TrainingArguments(output_dir=str(tmp_path / "xla"), backend="torch_xla", save_strategy="steps",
                             save_steps=4, **{k: v for k, v in options.items() if k != "save_strategy"})
    trainer = Trainer(tiny(), args, train_dataset=dataset(), data_collator=collate)
    assert isinstance(trainer, XlaTrainer) and trainer.tpu_model.sharding.mesh.size("fsdp") == 8
    trainer.train()
    reference = Trainer(tiny(), TrainingArguments(output_dir=str(tmp_path / "jax"), **options),
                        train_dataset=dataset(), data_collator=collate)
    reference.train()
    xla_losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    jax_losses = [e["loss"] for e in reference.state.log_history if "loss" in e]
    np.testing.assert_allclose(xla_losses, jax_losses, rtol=1e-4)
    recomputing = Trainer(tiny(), TrainingArguments(output_dir=str(tmp_path / "remat"), backend="torch_xla",
                                                    gradient_checkpointing=True, **options),
                          train_dataset=dataset(), data_collator=collate)
    recomputing.train()  # torch_xla's checkpoint around each layer (torch's fails on XLA)
    np.testing.assert_allclose([e["loss"] for e in recomputing.state.log_history if "loss" in e], xla_losses,
                               rtol=1e-5)

    saved = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "xla" / "checkpoint-4").state_dict()
    assert set(saved) == set(initial)
    for name, value in saved.items():
        assert not torch.equal(value, initial[name]), name  # trained, not the base weights
        np.testing.assert_allclose(value.numpy(), np.asarray(reference.forward.params[name]), atol=1e-4)
