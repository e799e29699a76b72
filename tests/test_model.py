"""TPUModel behaviour: inputs, constants, buckets and the compile counter, dtypes, errors."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithPast

from ttpu import AutoModelForTPU, BucketPolicy
from ttpu.errors import CompilationError, InvalidArgumentError
from ttpu.compat import CACHE_OUTPUT

CONFIG = LlamaConfig(
    vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0,
)


def llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(CONFIG).eval()


@pytest.fixture(scope="module")
def pair() -> tuple[LlamaForCausalLM, object]:
    module = llama()
    reference = llama()
    return reference, AutoModelForTPU.from_model(module)


def eager_logits(module: torch.nn.Module, ids: np.ndarray, **kwargs) -> np.ndarray:
    with torch.no_grad():
        return module(input_ids=torch.from_numpy(ids), **kwargs).logits.numpy()


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(np.asarray(a) - b) / np.linalg.norm(b))


def test_output_is_the_hf_output_type_with_jax_arrays(pair) -> None:
    _, model = pair
    out = model(input_ids=np.arange(1, 8)[None])
    assert type(out) is CausalLMOutputWithPast
    assert isinstance(out.logits, jax.Array) and out.logits.shape == (1, 7, 128)
    assert getattr(out, CACHE_OUTPUT).layers[0].keys.shape == (1, 2, 7, 8)  # cut back from the bucket


def test_numpy_jax_torch_and_positional_inputs_agree(pair) -> None:
    reference, model = pair
    ids = np.random.default_rng(0).integers(1, 128, (2, 9))
    expected = eager_logits(reference, ids)
    for given in (ids, jax.numpy.asarray(ids), torch.from_numpy(ids)):
        assert rel(model(input_ids=given).logits, expected) < 1e-5
    assert rel(model(ids).logits, expected) < 1e-5


def test_ten_prompt_lengths_in_one_bucket_compile_once() -> None:
    model = AutoModelForTPU.from_model(llama())
    reference = llama()
    rng = np.random.default_rng(1)
    for length in range(17, 27):  # all inside the 32 bucket
        ids = rng.integers(1, 128, (2, length))
        assert rel(model(input_ids=ids).logits, eager_logits(reference, ids)) < 1e-5
    assert model.compile_count == 1
    model(input_ids=rng.integers(1, 128, (2, 40)))  # the next bucket
    assert model.compile_count == 2


def test_batch_sizes_share_a_bucket() -> None:
    model = AutoModelForTPU.from_model(llama())
    reference = llama()
    rng = np.random.default_rng(2)
    for batch in (5, 6, 7, 8):
        ids = rng.integers(1, 128, (batch, 10))
        out = model(input_ids=ids).logits
        assert out.shape == (batch, 10, 128)
        assert rel(out, eager_logits(reference, ids)) < 1e-5
    assert model.compile_count == 1


def test_buckets_can_be_disabled() -> None:
    model = AutoModelForTPU.from_model(llama(), buckets=BucketPolicy(sequence=None, batch=None))
    for length in (5, 6):
        model(input_ids=np.ones((1, length), np.int64))
    assert model.compile_count == 2


def test_python_constants_are_static_and_recompile_only_when_changed(pair) -> None:
    reference, model = pair
    ids = np.arange(1, 6)[None]
    before = model.compile_count
    out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
    assert len(out.hidden_states) == CONFIG.num_hidden_layers + 1
    assert CACHE_OUTPUT not in out
    model(input_ids=ids, output_hidden_states=True, use_cache=False)
    assert model.compile_count == before + 1
    with torch.no_grad():
        expected = reference(input_ids=torch.from_numpy(ids), output_hidden_states=True)
    assert rel(out.hidden_states[1], expected.hidden_states[1].numpy()) < 1e-5


def test_labels_give_the_same_loss(pair) -> None:
    reference, model = pair
    ids = np.random.default_rng(3).integers(1, 128, (3, 12))
    with torch.no_grad():
        expected = reference(input_ids=torch.from_numpy(ids), labels=torch.from_numpy(ids)).loss
    loss = model(input_ids=ids, labels=ids).loss  # padded to batch 4 and sequence 16
    assert abs(float(loss) - float(expected)) < 1e-5 * abs(float(expected))


def test_sliding_window_prompt_longer_than_the_window_with_padding() -> None:
    config = Gemma3TextConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=1, head_dim=8, sliding_window=6,
        max_position_embeddings=256, pad_token_id=0, final_logit_softcapping=30.0,
    )
    torch.manual_seed(0)
    reference = Gemma3ForCausalLM(config).eval()
    model = AutoModelForTPU.from_model(Gemma3ForCausalLM(config).eval().requires_grad_(False))
    model.torch_module.load_state_dict(reference.state_dict())
    model = AutoModelForTPU.from_model(model.torch_module)
    ids = np.random.default_rng(4).integers(1, 128, (2, 40))
    mask = np.ones_like(ids)
    mask[0, :7] = 0
    expected = eager_logits(reference, ids, attention_mask=torch.from_numpy(mask))
    actual = np.asarray(model(input_ids=ids, attention_mask=mask).logits)
    real = mask.astype(bool)
    assert rel(actual[real], expected[real]) < 1e-5


def test_dtype_auto_is_float32_on_cpu_and_explicit_dtypes_are_honoured() -> None:
    assert AutoModelForTPU.from_model(llama()).dtype == torch.float32
    model = AutoModelForTPU.from_model(llama(), dtype="bfloat16")
    assert model.params["model.embed_tokens.weight"].dtype == jax.numpy.bfloat16
    assert model(input_ids=np.ones((1, 4), np.int64)).logits.dtype == jax.numpy.bfloat16


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"input_ids": np.arange(5)}, "Add a batch dimension"),
        ({"input_ids": np.ones((1, 5), np.float32)}, "integer token ids"),
        ({"input_ids": np.ones((1, 5), np.int64), "bogus": 1}, "unknown input"),
        ({"input_ids": "hello"}, "must be an array"),
        ({"input_ids": np.ones((1, 5), np.int64), "attention_mask": object()}, "has type object"),
    ],
)
def test_bad_inputs_fail_before_compiling(pair, kwargs, message) -> None:
    _, model = pair
    before = model.compile_count
    with pytest.raises(InvalidArgumentError, match=message):
        model(**kwargs)
    assert model.compile_count == before


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"backend": "tensorflow"}, "valid backends: jax"),
        ({"task": "painting"}, "valid tasks: causal-lm"),
        ({"dtype": "int4"}, "valid dtypes: auto, float32"),
        ({"attn_implementation": "flash"}, "valid: auto, ttpu"),
    ],
)
def test_bad_options_list_the_valid_ones(kwargs, message) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        AutoModelForTPU.from_model(llama(), **kwargs)


def test_untraceable_model_names_the_op_and_module(monkeypatch) -> None:
    module = llama()

    def forward_with_unlowered_op(hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten.segment_reduce(hidden_states, "sum", lengths=None)

    monkeypatch.setattr(module.model.layers[1].mlp, "forward", forward_with_unlowered_op)
    model = AutoModelForTPU.from_model(module)
    with pytest.raises(CompilationError, match=r"(?s)aten::segment_reduce.*LlamaDecoderLayer.*ttpu doctor"):
        model(input_ids=np.ones((1, 4), np.int64))


def patch_first_mlp(module: torch.nn.Module, monkeypatch, extra) -> None:
    mlp = module.model.layers[0].mlp
    original = mlp.forward
    monkeypatch.setattr(mlp, "forward", lambda hidden_states: extra(original(hidden_states)))


def test_cpu_tensors_built_in_forward_mix_with_traced_values(monkeypatch) -> None:
    def add_constants(hidden: torch.Tensor) -> torch.Tensor:
        sizes = torch.tensor([3, 5])  # CPU tensors used in Python control flow ...
        step = int(max(sizes[0], sizes[1]))
        ramp = torch.arange(hidden.shape[-1]) / 100  # ... and in math with traced values
        return hidden + ramp * step + torch.ones(hidden.shape[-1])

    reference, module = llama(), llama()
    patch_first_mlp(reference, monkeypatch, add_constants)
    patch_first_mlp(module, monkeypatch, add_constants)
    ids = np.arange(1, 9)[None]
    actual = AutoModelForTPU.from_model(module)(input_ids=ids).logits
    assert rel(actual, eager_logits(reference, ids)) < 1e-5


def test_writing_traced_values_into_a_cpu_tensor_is_a_clear_error(monkeypatch) -> None:
    def write_into_cpu_buffer(hidden: torch.Tensor) -> torch.Tensor:
        buffer = torch.zeros(hidden.shape)
        buffer.copy_(hidden)
        return buffer

    module = llama()
    patch_first_mlp(module, monkeypatch, write_into_cpu_buffer)
    with pytest.raises(CompilationError, match="writes traced values into a CPU tensor"):
        AutoModelForTPU.from_model(module)(input_ids=np.arange(1, 9)[None])


def test_value_assertions_are_skipped_while_tracing(monkeypatch) -> None:
    from transformers.utils.import_utils import torch_compilable_check

    def checked(hidden: torch.Tensor) -> torch.Tensor:
        torch_compilable_check(torch.isfinite(hidden).all(), "hidden states must be finite")
        return hidden

    module = llama()
    patch_first_mlp(module, monkeypatch, checked)
    ids = np.arange(1, 9)[None]
    assert rel(AutoModelForTPU.from_model(module)(input_ids=ids).logits, eager_logits(llama(), ids)) < 1e-5


def test_small_buffers_are_compile_time_constants(monkeypatch) -> None:
    def with_shape_buffer(module: torch.nn.Module) -> None:
        mlp = module.model.layers[0].mlp
        mlp.register_buffer("repeats", torch.tensor(2), persistent=False)
        patch_first_mlp(module, monkeypatch, lambda h: h * max(mlp.repeats, 1))  # Python max

    reference, module = llama(), llama()
    with_shape_buffer(reference)
    with_shape_buffer(module)
    model = AutoModelForTPU.from_model(module)
    assert "model.layers.0.mlp.repeats" not in model.params
    assert "model.rotary_emb.inv_freq" not in model.params


def test_frozen_weights_are_traced_not_constants() -> None:
    reference, module = llama(), llama().requires_grad_(False)
    model = AutoModelForTPU.from_model(module)
    assert "model.layers.0.input_layernorm.weight" in model.params  # 32 elements, frozen
    ids = np.arange(1, 9)[None]
    assert rel(model(input_ids=ids).logits, eager_logits(reference, ids)) < 1e-5
    ids = np.arange(1, 9)[None]
    assert rel(model(input_ids=ids).logits, eager_logits(reference, ids)) < 1e-5


def test_moe_experts_use_the_static_shape_implementation() -> None:
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
    )
    torch.manual_seed(0)
    reference = MixtralForCausalLM(config).eval()
    module = MixtralForCausalLM(config).eval()
    module.load_state_dict(reference.state_dict())
    module.set_experts_implementation("eager")  # a data-dependent loop over experts
    model = AutoModelForTPU.from_model(module)
    assert model.config._experts_implementation == "grouped_mm"
    ids = np.arange(1, 9)[None]
    assert rel(model(input_ids=ids).logits, eager_logits(reference, ids)) < 1e-5


def encoder_pair(config_class, model_class, **sizes):
    config = config_class(
        vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=128, **sizes,
    )
    torch.manual_seed(0)
    reference = model_class(config).eval()
    module = model_class(config).eval()
    module.load_state_dict(reference.state_dict())
    return reference, AutoModelForTPU.from_model(module)


def encoder_outputs(reference, model, ids):
    with torch.no_grad():
        expected = reference(input_ids=torch.from_numpy(ids)).last_hidden_state.numpy()
    return np.asarray(model(input_ids=ids).last_hidden_state), expected


def test_causal_lms_pad_sequences_without_checking(pair) -> None:
    assert pair[1].sequence_padding == "on"


def test_padding_invariant_encoder_is_verified_once_then_bucketed() -> None:
    from transformers import BertConfig, BertModel

    reference, model = encoder_pair(BertConfig, BertModel)
    assert model.sequence_padding == "verify"
    rng = np.random.default_rng(5)
    actual, expected = encoder_outputs(reference, model, rng.integers(1, 128, (2, 10)))
    assert rel(actual, expected) < 1e-5
    assert model.sequence_padding == "on" and model.compile_count == 2  # bucket + exact check
    for length in (11, 12, 13):
        actual, expected = encoder_outputs(reference, model, rng.integers(1, 128, (2, length)))
        assert rel(actual, expected) < 1e-5
    assert model.compile_count == 2


def test_padding_sensitive_encoder_turns_sequence_buckets_off(capsys) -> None:
    from transformers import ConvBertConfig, ConvBertModel

    reference, model = encoder_pair(ConvBertConfig, ConvBertModel, embedding_size=32)
    ids = np.random.default_rng(6).integers(1, 128, (2, 10))
    actual, expected = encoder_outputs(reference, model, ids)
    assert "ttpu: ConvBertModel's outputs change" in capsys.readouterr().err
    assert model.sequence_padding == "off"
    assert rel(actual, expected) < 1e-5
    actual, expected = encoder_outputs(reference, model, ids[:, :7])
    assert rel(actual, expected) < 1e-5


def test_cpu_tensors_indexed_by_or_fed_to_traced_values(monkeypatch) -> None:
    def mix(module: torch.nn.Module) -> None:
        proj = module.model.layers[0].mlp.down_proj  # traced weights

        def extra(hidden: torch.Tensor) -> torch.Tensor:
            table = torch.linspace(0, 1, 4 * 32).reshape(4, 32)  # CPU, built in forward
            index = (hidden[..., 0] > 0).long()  # traced
            return hidden + table[index] + torch.nn.functional.linear(table[:1, :64 // 2].repeat(1, 2), proj.weight)

        patch_first_mlp(module, monkeypatch, extra)

    reference, module = llama(), llama()
    mix(reference)
    mix(module)
    ids = np.arange(1, 9)[None]
    assert rel(AutoModelForTPU.from_model(module)(input_ids=ids).logits, eager_logits(reference, ids)) < 1e-5


def test_sequence_constants_are_hashable_through_the_padded_path() -> None:
    from transformers import BertConfig, BertModel

    from ttpu.inputs import split_inputs

    _, constants = split_inputs({"indices": [1, 2]}, lambda v: v, np.float32)
    assert constants == {"indices": (1, 2)}
    _, model = encoder_pair(BertConfig, BertModel)
    _, constants = split_inputs({"output_hidden_states": True, "extra": [3]}, lambda v: v, np.float32)
    out, _ = model._run({"input_ids": jax.numpy.ones((1, 5), jax.numpy.int32)}, constants, True)
    assert out.last_hidden_state.shape == (1, 5, 32)
