"""Sharding on 8 virtual CPU devices: every strategy matches the unsharded model."""

from __future__ import annotations

import re
from collections import Counter

import jax
import numpy as np
import pytest
import torch
from architectures import ARCHITECTURES
from test_parity import relative_error
from transformers import LlamaConfig, LlamaForCausalLM

import ttpu
from ttpu import AutoModelForTPU
from ttpu.errors import InvalidArgumentError
from ttpu.sharding import MeshShape
from ttpu.sharding.strategies import choose_auto, mesh_for

STRATEGIES = ("dp", "fsdp", "tp", "2d", "3d")
# llama: a tensor-parallel plan; mixtral: MoE experts; gpt2: no plan (inferred, Conv1D)
SHARDED = [a for a in ARCHITECTURES if a.name in ("llama", "mixtral", "gpt2")]
NEW_TOKENS = 8


def test_eight_devices() -> None:
    assert jax.device_count() == 8, "tests/conftest.py sets XLA_FLAGS for 8 CPU devices"


@pytest.fixture(scope="module", params=SHARDED, ids=lambda a: a.name)
def unsharded(request):
    arch = request.param
    module = arch.build()
    inputs = arch.make_inputs(module, batch=8)  # rows left-padded
    model = AutoModelForTPU.from_model(module)
    logits = np.asarray(model(**inputs).logits)
    tokens = model.generate(inputs["input_ids"], attention_mask=inputs["attention_mask"], max_new_tokens=NEW_TOKENS)
    with torch.no_grad():
        eager = module(**{k: torch.from_numpy(v) for k, v in inputs.items()}).logits.numpy()
    assert relative_error(logits, eager, inputs["attention_mask"]) < 1e-5
    return module, inputs, logits, tokens


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_matches_the_unsharded_model(unsharded, strategy) -> None:
    module, inputs, logits, tokens = unsharded
    model = AutoModelForTPU.from_model(module, parallelism=strategy)
    assert model.sharding.mesh == mesh_for(strategy, 8)
    assert relative_error(np.asarray(model(**inputs).logits), logits, None) <= 1e-5
    generated = model.generate(inputs["input_ids"], attention_mask=inputs["attention_mask"], max_new_tokens=NEW_TOKENS)
    np.testing.assert_array_equal(generated, tokens)
    assert model.decoder().paged_for(8, 16, 64) is not None  # the engine's paged step, data axes too
    for name, array in model.params.items():
        found = model.sharding.parameters.get(name)  # (large buffers are replicated)
        expected = jax.sharding.NamedSharding(array.sharding.mesh, jax.sharding.PartitionSpec(*(found.spec if found else ())))
        assert array.sharding.is_equivalent_to(expected, array.ndim), name


@pytest.mark.parametrize("strategy, replica_axes", [("dp", "data"), ("3d", ("data", "fsdp"))])
def test_a_batch_split_over_data_axes_splits_the_paged_pools_by_block(strategy, replica_axes) -> None:
    """generate() over 8 rows split by data parallelism: each replica holds its own part of
    every pool (its rows' blocks and its own null block), the tokens are one device's, and
    under pure data parallelism no floating-point value (pools, hidden states, logits)
    crosses devices while decoding."""
    module = llama()
    ids = np.random.default_rng(2).integers(1, 256, (8, 12))
    expected = AutoModelForTPU.from_model(module).generate(ids, max_new_tokens=NEW_TOKENS)
    model = AutoModelForTPU.from_model(module, parallelism=strategy)
    np.testing.assert_array_equal(model.generate(ids, max_new_tokens=NEW_TOKENS), expected)
    decoder = model.decoder()
    (prefill,) = decoder._prefill._compiled.values()
    pools = [out for out in jax.tree.leaves(prefill.executable.out_info) if out.ndim == 4]
    assert len(pools) == 2  # one per layer
    replicas = model.sharding.mesh.data_parallel_size
    for pool in pools:
        assert pool.sharding.spec[0] == replica_axes
        assert pool.sharding.shard_shape(pool.shape)[0] * replicas == pool.shape[0]
    if strategy != "dp":  # tensor parallelism's all-reduces move activations; pure data parallelism moves none
        return
    (decode,) = decoder._advance._compiled.values()
    collectives = re.findall(r"= (.+?) (?:all-reduce|all-gather|all-to-all|collective-permute|reduce-scatter)(?:-start)?\(",
                             decode.as_text())
    assert any(re.search(r"\bpred\[", shape) for shape in collectives), collectives  # the loop's "all finished"
    assert [shape for shape in collectives if re.search(r"\bb?f\d+\[", shape)] == [], collectives


@pytest.mark.parametrize("model_type, strategy",
                         [("qwen3_next", "2d"), ("deepseek_v32", "dp")])
def test_a_batch_stepped_in_rows_splits_over_data_axes(model_type: str, strategy: str) -> None:
    """Models whose paged step runs one request per row, split by data parallelism: a
    tiny Qwen3-Next (gated delta nets beside attention) under 2d, its state slots beside
    the pools; a tiny DeepSeek-V3.2 under dp, each replica's rows reading their indexer
    keys from its own part of the indexer pools (16 positions, past the indexer's top 8),
    so that no indexer key crosses devices while decoding (XLA still gathers the inputs
    of a top-k over a split batch, the MoE router's scores and the indexer's alike: a
    few numbers per row). Both give one device's tokens. Qwen3-Next's chunked delta rule solves triangular
    systems, which jaxlib's LAPACK kernel did by waiting on XLA:CPU's thread pool from
    inside it: with every device running it at once, this prefill hung (ttpu's
    solve_triangular lowering runs none)."""
    from transformers import AutoModelForCausalLM

    from ttpu.coverage import tiny_config

    torch.manual_seed(0)
    module = AutoModelForCausalLM.from_config(tiny_config(model_type)).eval()
    ids = np.random.default_rng(3).integers(1, 64, (8, 10))
    single = AutoModelForTPU.from_model(module)
    model = AutoModelForTPU.from_model(module, parallelism=strategy)
    paged = model.decoder().paged_for(8, 10, 16)
    assert paged is not None and paged.in_rows
    np.testing.assert_array_equal(model.generate(ids, max_new_tokens=6), single.generate(ids, max_new_tokens=6))
    if strategy == "dp":  # no collective moves arrays of indexer keys ([..., index_head_dim])
        (decode,) = model.decoder()._advance._compiled.values()
        collectives = re.findall(r"= (.+?) (?:all-reduce|all-gather|all-to-all|collective-permute|reduce-scatter)"
                                 r"(?:-start)?\(", decode.as_text())
        width = module.config.index_head_dim
        assert [shape for shape in collectives if re.search(rf"\bb?f\d+\[[\d,]*,{width}\]", shape)] == [], collectives


def llama(layers: int = 2, **overrides) -> LlamaForCausalLM:
    config = dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=128, pad_token_id=0,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**{**config, **overrides})).eval()


def test_fsdp_puts_an_eighth_of_the_weights_on_each_device() -> None:
    model = AutoModelForTPU.from_model(llama(), parallelism="fsdp")
    total = sum(a.nbytes for a in model.params.values())
    per_device = Counter()
    for array in model.params.values():
        for shard in array.addressable_shards:
            per_device[shard.device] += shard.data.nbytes
    assert len(per_device) == 8
    assert all(abs(n - total / 8) <= 0.01 * total / 8 for n in per_device.values()), per_device
    table = ttpu.describe_sharding(model)
    assert table.total_bytes == total and table.bytes_per_device == total // 8
    assert "model.layers.0.mlp.up_proj.weight" in str(table) and "(fsdp, -)" in str(table)


def test_tensor_parallel_layers_use_two_all_reduces_each() -> None:
    """Megatron-style: column-parallel q/k/v and up/gate need no communication, the
    row-parallel o_proj and down_proj one all-reduce each; the vocabulary-parallel
    embedding adds one per forward and the logits stay split over the vocabulary."""
    ids = np.random.default_rng(0).integers(1, 256, (2, 16))
    counts = {}
    for layers in (1, 2, 3):
        model = AutoModelForTPU.from_model(llama(layers), parallelism="tp")
        text = model._forward.compiled_text({"input_ids": ids}, {})
        counts[layers] = Counter(
            re.findall(r"= \S+ (all-reduce|reduce-scatter|all-gather|all-to-all)(?:-start)?\(", text)
        )
    per_layer = counts[2] - counts[1]
    assert per_layer == Counter({"all-reduce": 2}), counts
    assert counts[3] - counts[2] == per_layer
    assert counts[1] == Counter({"all-reduce": 3}), counts[1]


def test_shapes_that_do_not_divide_fall_back_to_replication_with_a_warning(capsys) -> None:
    """Vocabulary 1001 and 3 KV heads of 12 (36 rows) over 8 tensor devices."""
    module = llama(vocab_size=1001, hidden_size=72, num_attention_heads=6, num_key_value_heads=3, head_dim=12)
    ids = np.random.default_rng(1).integers(1, 1001, (2, 9))
    with torch.no_grad():
        expected = module(input_ids=torch.from_numpy(ids)).logits.numpy()
        hf_tokens = module.generate(torch.from_numpy(ids), do_sample=False, max_new_tokens=NEW_TOKENS).numpy()
    capsys.readouterr()
    model = AutoModelForTPU.from_model(module, parallelism="tp")
    messages = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ttpu: sharding:")]
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.0.self_attn.k_proj.weight"):
        assert sum(name in m for m in messages) == 1, (name, messages)
    assert model.sharding.parameters["lm_head.weight"].spec == (None, None)
    assert model.sharding.parameters["model.layers.0.self_attn.q_proj.weight"].spec == ("tensor", None)
    assert relative_error(np.asarray(model(input_ids=ids).logits), expected, None) <= 1e-5
    np.testing.assert_array_equal(model.generate(ids, max_new_tokens=NEW_TOKENS), hf_tokens)


def test_kv_pools_are_split_over_heads_and_batch() -> None:
    """generate()'s paged pools [blocks, 16, 2 * kv_heads, dim]: blocks over data (each of 2
    replicas: 2 rows of 32 / 16 blocks and its null block), heads over tensor (8 / 4)."""
    model = AutoModelForTPU.from_model(llama(), mesh={"data": 2, "tensor": 4})
    decoder = model.decoder()
    ids = np.ones((4, 5), np.int64)
    from ttpu.generation.generate import _settings

    settings = _settings(model, ids, None, 0, {"max_new_tokens": 4})
    run = decoder.advance(decoder.start(ids, np.ones_like(ids), 32, settings, seed=0), 2)
    pools = run.state.cache.arrays.pools
    assert len(pools) == 2
    for pool in pools:
        assert tuple(pool.sharding.spec) == ("data", None, "tensor")
        assert pool.addressable_shards[0].data.shape == (5, 16, 4, 8)


def test_user_rules_win_over_the_plan() -> None:
    module = llama()
    ids = np.random.default_rng(2).integers(1, 256, (4, 8))
    expected = np.asarray(AutoModelForTPU.from_model(module)(input_ids=ids).logits)
    model = AutoModelForTPU.from_model(
        module, mesh={"data": 2, "fsdp": 2, "tensor": 2},
        sharding_rules=[(r"lm_head", ("tensor", None)), (r"norm", (None,))],
    )
    lm_head = model.sharding.parameters["lm_head.weight"]
    assert lm_head.spec == ("tensor", None) and lm_head.source == "rule 'lm_head'"
    assert model.sharding.parameters["model.norm.weight"].spec == (None,)
    assert model.sharding.parameters["model.layers.0.mlp.down_proj.weight"].spec == ("fsdp", "tensor")
    assert model.params["model.embed_tokens.weight"].sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    assert relative_error(np.asarray(model(input_ids=ids).logits), expected, None) <= 1e-5


def test_auto_picks_dp_for_a_small_model_and_says_why(capsys) -> None:
    model = AutoModelForTPU.from_model(llama(), parallelism="auto")
    assert model.sharding.strategy == "dp"
    assert "parallelism='auto' chose dp {data: 8}" in capsys.readouterr().err


def test_auto_heuristic() -> None:
    gib = 2**30
    assert choose_auto(8, 1 * gib, 16 * gib).strategy == "dp"
    assert choose_auto(8, 20 * gib, 16 * gib).strategy == "fsdp"
    big = choose_auto(8, 100 * gib, 16 * gib)
    assert big.strategy == "2d" and big.mesh == MeshShape((("fsdp", 4), ("tensor", 2)))
    assert choose_auto(1, 100 * gib, 16 * gib).strategy == "dp"
    assert mesh_for("3d", 8) == MeshShape((("data", 2), ("fsdp", 2), ("tensor", 2)))


@pytest.mark.parametrize(
    "options, message",
    [
        ({"parallelism": "zero3"}, "unknown parallelism 'zero3'; valid: dp, fsdp, tp, 2d, 3d, auto"),
        ({"mesh": {"data": 2, "tensor": 2}}, "has 4 devices but 8 are available"),
        ({"mesh": {"data": 8, "model": 1}}, "unknown mesh axis ['model']; valid axes: data, fsdp, tensor"),
        ({"mesh": {"data": 0}}, "positive integers"),
        ({"parallelism": "tp", "sharding_rules": [("lm_head", ("model", None))]},
         "names axis 'model', which the mesh {tensor: 8} does not have; valid: tensor or None"),
        ({"parallelism": "tp", "sharding_rules": [("lm_head", ("tensor", None, None))]}, "has 3 entries"),
        ({"parallelism": "tp", "sharding_rules": [("(", ("tensor",))]}, "not a valid regex"),
        ({"sharding_rules": [("lm_head", ("tensor", None))]}, "sharding_rules need a mesh"),
        ({"parallelism": "tp", "mesh": {"tensor": 8}}, "not both"),
    ],
)
def test_bad_sharding_options_are_clear_errors(options, message) -> None:
    with pytest.raises(InvalidArgumentError) as error:
        AutoModelForTPU.from_model(llama(1), **options)
    assert message in str(error.value)


def test_batches_are_padded_to_split_over_the_data_devices() -> None:
    module = llama()
    ids = np.random.default_rng(5).integers(1, 256, (3, 8))
    expected = np.asarray(AutoModelForTPU.from_model(module)(input_ids=ids).logits)
    model = AutoModelForTPU.from_model(module, mesh={"data": 2, "fsdp": 2, "tensor": 2})
    assert min(model.buckets.batch) == 4  # data x fsdp
    logits = model(input_ids=ids).logits
    assert logits.shape[0] == 3
    assert relative_error(np.asarray(logits), expected, None) <= 1e-5
