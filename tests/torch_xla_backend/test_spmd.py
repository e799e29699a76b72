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


@pytest.mark.parametrize("strategy", ["dp", "fsdp", "tp", "2d", "3d"])
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
