"""Weight-only int8/int4: the quantizers' error bounds, quantized modules on the device
(integer parameters, one tied table, bytes), the same outputs as the torch module, and
generate, sharding and the serving engine on a quantized model."""

from __future__ import annotations

import copy
import numpy as np
import pytest
import torch
import transformers

from ttpu import AutoModelForTPU, QuantizationConfig
from ttpu.errors import InvalidArgumentError
from ttpu.quantization import quantize_module
from ttpu.quantization.gguf import DECODERS
from ttpu.quantization.modules import QuantizedEmbedding, QuantizedLinear
from ttpu.quantization.tensors import dequantize, quantize_int4, quantize_int8

VOCAB = 256


def tiny_gemma() -> transformers.Gemma3ForCausalLM:  # tied embedding and LM head
    config = transformers.Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, sliding_window=8, pad_token_id=0,
    )
    torch.manual_seed(0)
    return transformers.Gemma3ForCausalLM(config).eval()


def tiny_qwen2() -> transformers.Qwen2ForCausalLM:  # biases on q/k/v
    config = transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return transformers.Qwen2ForCausalLM(config).eval()


def test_int8_round_trip_is_within_half_a_step_and_zero_rows_stay_zero():
    weight = torch.randn(32, 96)
    weight[3] = 0
    q, scale = quantize_int8(weight)
    assert q.dtype == torch.int8 and scale.shape == (32,)
    error = (dequantize(q, scale, torch.float32) - weight).abs()
    assert torch.all(error <= scale[:, None] / 2 + 1e-7)
    assert torch.all(dequantize(q, scale, torch.float32)[3] == 0) and torch.isfinite(scale).all()


def test_int4_packs_two_values_per_byte_in_groups():
    weight = torch.randn(16, 256) + 0.5  # skewed groups: the 16 levels span each one's range
    weight[:, :64] = 0  # a zero group
    packed, scale, minimum = quantize_int4(weight, 64)
    assert packed.dtype == torch.uint8 and packed.shape == (16, 128) and scale.shape == minimum.shape == (16, 4)
    restored = dequantize(packed, scale, torch.float32, minimum)
    error = (restored - weight).abs().reshape(16, 4, 64)
    assert torch.all(error <= scale[..., None] / 2 + 1e-6)
    assert torch.all(restored[:, :64] == 0)
    grid = torch.arange(16.0) * 0.25 - 1.0  # values already on a 16-level grid come back exactly
    on_grid = grid[torch.randint(0, 16, (4, 64))]
    on_grid[:, 0], on_grid[:, 1] = -1.0, 2.75
    packed, scale, minimum = quantize_int4(on_grid, 64)
    np.testing.assert_allclose(dequantize(packed, scale, torch.float32, minimum), on_grid, atol=1e-6)


def test_bad_quantization_options_are_refused():
    with pytest.raises(InvalidArgumentError, match="valid: int8, int4"):
        QuantizationConfig("int3")
    with pytest.raises(InvalidArgumentError, match="positive integer"):
        QuantizationConfig("int4", group_size=0)
    with pytest.raises(InvalidArgumentError, match="groups of 48 do not divide the input dimension 64"):
        quantize_module(tiny_gemma(), QuantizationConfig("int4", group_size=48))
    with pytest.raises(InvalidArgumentError, match="no linear layers"):
        quantize_module(torch.nn.Sequential(torch.nn.ReLU()), QuantizationConfig("int8"))
    with pytest.raises(InvalidArgumentError, match="int8, int4, gguf or a ttpu.QuantizationConfig"):
        AutoModelForTPU.from_model(tiny_gemma(), quantization=8)
    with pytest.raises(InvalidArgumentError, match="leave group_size unset"):
        QuantizationConfig("gguf", group_size=32)
    with pytest.raises(InvalidArgumentError, match="keeps the blocks of the GGUF file"):
        AutoModelForTPU.from_model(tiny_gemma(), quantization="gguf")


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_model_runs_compiled_with_integer_weights_and_one_tied_table(scheme):
    module = tiny_gemma()
    config = QuantizationConfig(scheme, group_size=32)
    model = AutoModelForTPU.from_model(module, quantization=config)
    assert isinstance(module.lm_head, QuantizedLinear) and isinstance(module.model.embed_tokens, QuantizedEmbedding)
    assert module.lm_head.weight is module.model.embed_tokens.weight  # one stored table
    params = model.compiled_forward.params
    tables = [n for n in ("lm_head.weight", "model.embed_tokens.weight") if n in params]
    assert len(tables) == 1 and params[tables[0]].dtype == (np.int8 if scheme == "int8" else np.uint8)
    quantized = [n for n in params if n.endswith(".weight") and "norm" not in n]
    assert all(params[n].dtype in (np.int8, np.uint8) for n in quantized)
    ids = np.random.default_rng(0).integers(1, VOCAB, (2, 11))
    with torch.no_grad():
        expected = module(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(model(input_ids=ids).logits), expected, atol=1e-5)
    text = model.compiled_forward.compiled_text({"input_ids": model.compiled_forward.to_array(ids)}, {})
    assert ("s8[" if scheme == "int8" else "u8[") in text
    float_weights = [n for n in quantized if params[n].dtype == np.float32]
    assert not float_weights
    report = model.quantization
    assert report.bytes_after <= (0.3 if scheme == "int8" else 0.2) * report.bytes_before


def test_biases_stay_float_and_excluded_layers_stay_float():
    module = tiny_qwen2()
    float_logits = module(torch.arange(1, 9)[None]).logits.detach()
    report = quantize_module(module, QuantizationConfig("int8", exclude=["lm_head"], embeddings=False))
    q_proj = module.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, QuantizedLinear) and q_proj.bias.dtype == torch.float32
    assert isinstance(module.lm_head, torch.nn.Linear) and "lm_head" not in report.quantized
    assert isinstance(module.model.embed_tokens, torch.nn.Embedding)
    logits = module(torch.arange(1, 9)[None]).logits.detach()
    assert torch.nn.functional.cosine_similarity(logits.flatten(), float_logits.flatten(), dim=0) > 0.999


def test_generate_sharding_and_serving_on_a_quantized_model():
    from ttpu import LLM, SamplingParams

    module = tiny_gemma()
    reference = tiny_gemma()
    quantize_module(reference, QuantizationConfig("int8"))
    prompt = np.array([[5, 9, 17, 33, 2, 8]])
    expected = reference.generate(torch.from_numpy(prompt), max_new_tokens=8, do_sample=False).numpy()
    one = AutoModelForTPU.from_model(module, quantization="int8")
    np.testing.assert_array_equal(np.asarray(one.generate(input_ids=prompt, max_new_tokens=8)), expected)
    split = AutoModelForTPU.from_model(tiny_gemma(), quantization="int8", parallelism="tp")
    weight = split.compiled_forward.params["model.layers.0.self_attn.q_proj.weight"]
    scale = split.compiled_forward.params["model.layers.0.self_attn.q_proj.weight_scale"]
    assert weight.dtype == np.int8 and len(weight.sharding.device_set) == 8
    assert tuple(scale.sharding.spec) == tuple(weight.sharding.spec)[:1]  # split with their output channels
    np.testing.assert_array_equal(np.asarray(split.generate(input_ids=prompt, max_new_tokens=8)), expected)
    llm = LLM(AutoModelForTPU.from_model(tiny_gemma(), quantization="int8"), max_num_seqs=2, max_model_len=64)
    out = llm.generate([{"prompt_token_ids": prompt[0].tolist()}], SamplingParams(max_tokens=8, temperature=0))
    assert out[0].outputs[0].token_ids == expected[0, prompt.shape[1]:].tolist()


def test_shared_embeddings_quantize_every_reference_and_other_layers_are_left_alone():
    config = transformers.T5Config(vocab_size=VOCAB, d_model=64, d_ff=128, d_kv=16, num_layers=1, num_heads=4,
                                   decoder_start_token_id=0)
    module = transformers.T5ForConditionalGeneration(config).eval()
    report = quantize_module(module, QuantizationConfig("int8"))
    assert module.encoder.embed_tokens.weight is module.shared.weight is module.decoder.embed_tokens.weight
    assert isinstance(module.encoder.embed_tokens, QuantizedEmbedding) and report.bytes_after < 0.3 * report.bytes_before
    tied = tiny_gemma()
    with pytest.raises(InvalidArgumentError, match="shares its weight with the token embedding"):
        quantize_module(tied, QuantizationConfig("int8", exclude=["lm_head"]))
    assert isinstance(tied.model.layers[0].mlp.up_proj, torch.nn.Linear)  # nothing replaced before the error
    router = transformers.Llama4TextConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                           intermediate_size_mlp=128, num_hidden_layers=1, num_attention_heads=4,
                                           num_key_value_heads=2, head_dim=16, num_local_experts=2)
    llama4 = transformers.Llama4ForCausalLM(router).eval()
    quantize_module(llama4, QuantizationConfig("int8"))
    assert not any(isinstance(m, QuantizedLinear) and "router" in n for n, m in llama4.named_modules())
    llama4(torch.arange(1, 9)[None])  # the router keeps its own forward


def random_blocks(kind: str, rows: int, inputs: int, rng: np.random.Generator) -> np.ndarray:
    """Valid GGUF blocks of type ``kind`` for a ``[rows, inputs]`` weight: random bytes
    with finite float16 scales (at the offsets each format keeps them)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    values_per_block, bytes_per_block = GGML_QUANT_SIZES[GGMLQuantizationType[kind]]
    blocks = rng.integers(0, 256, size=(rows * inputs // values_per_block, bytes_per_block), dtype=np.uint8)
    for offset in {"Q4_1": [0, 2], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}.get(kind, [0]):
        blocks[:, offset:offset + 2] = (rng.normal(size=(len(blocks), 1)) / 64).astype(np.float16).view(np.uint8)
    return blocks.reshape(rows, -1)


@pytest.mark.parametrize("scheme,kind", [(s, k) for s in ("int8", "int4") for k in DECODERS[s]])
def test_gguf_block_formats_decode_exactly_into_ttpu_tensors(scheme, kind):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize

    from ttpu.quantization.gguf import GgufCheckpoint

    blocks = random_blocks(kind, 6, 512, np.random.default_rng(0))
    reader = GgufCheckpoint.__new__(GgufCheckpoint)  # decode without a file: one tensor, by hand
    reader.scheme, reader._tensors = scheme, {"w": _StoredTensor(kind, blocks, (512, 6))}
    assert reader.shape("w") == (6, 512)
    values, scale, minimum = reader.decode("w")
    assert values.dtype == (torch.int8 if scheme == "int8" else torch.uint8)
    assert values.shape == (6, 512 if scheme == "int8" else 256)
    expected = gguf_dequantize(blocks, GGMLQuantizationType[kind]).reshape(6, 512)
    np.testing.assert_array_equal(dequantize(values, scale, torch.float32, minimum).numpy(), expected)


class _StoredTensor:
    """The fields of a ``gguf.ReaderTensor`` that ttpu reads."""

    def __init__(self, kind: str, data: np.ndarray, shape: tuple[int, ...]) -> None:
        from gguf import GGMLQuantizationType

        self.name, self.tensor_type, self.data, self.shape = "w", GGMLQuantizationType[kind], data, shape


def gemma_for_k_quants() -> transformers.Gemma3ForCausalLM:
    """A tiny Gemma 3 whose input dimensions are multiples of 256 (K-quant blocks)."""
    config = transformers.Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=128, sliding_window=8, pad_token_id=0,
    )
    torch.manual_seed(0)
    return transformers.Gemma3ForCausalLM(config).eval()


# block format of each weight in the test GGUF (the rest: F32)
GGUF_FORMATS = {
    "model.embed_tokens.weight": "Q8_0", "model.layers.0.self_attn.q_proj.weight": "Q5_0",
    "model.layers.0.self_attn.k_proj.weight": "Q4_K", "model.layers.0.self_attn.v_proj.weight": "Q4_0",
    "model.layers.0.self_attn.o_proj.weight": "Q6_K", "model.layers.0.mlp.gate_proj.weight": "Q4_1",
    "model.layers.0.mlp.up_proj.weight": "F32",
}


def write_gguf(path, module: torch.nn.Module, formats: dict[str, str]) -> None:
    """Write ``module``'s weights as a GGUF under llama.cpp's names, each in its format
    (random blocks), and set the module's weights to what the blocks dequantize to, as
    transformers' GGUF loader would."""
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import dequantize as gguf_dequantize
    from transformers.modeling_gguf_pytorch_utils import TensorProcessor, get_gguf_hf_weights_map

    names = {hf: name for name, hf in get_gguf_hf_weights_map(module, TensorProcessor()).items()}
    writer = GGUFWriter(str(path), "gemma3")
    rng = np.random.default_rng(1)
    state = module.state_dict()
    for hf_name, kind in formats.items():
        weight = state[hf_name]
        if kind == "F32":
            writer.add_tensor(names[hf_name], weight.numpy())
            continue
        blocks = random_blocks(kind, *weight.shape, rng)
        writer.add_tensor(names[hf_name], blocks, raw_dtype=GGMLQuantizationType[kind])
        restored = gguf_dequantize(blocks, GGMLQuantizationType[kind]).reshape(weight.shape)
        weight.copy_(torch.from_numpy(restored))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_blocks_are_kept_as_stored_and_the_rest_quantized_or_left_float(tmp_path):
    reference = gemma_for_k_quants()
    path = tmp_path / "tiny.gguf"
    write_gguf(path, reference, GGUF_FORMATS)
    ids = torch.tensor([[2, 7, 31, 100, 255, 4]])
    with torch.no_grad():
        expected = reference(input_ids=ids).logits

    module = gemma_for_k_quants()
    module.load_state_dict(reference.state_dict())
    report = quantize_module(module, QuantizationConfig("gguf"), gguf=path)
    assert report.quantized == {
        "model.embed_tokens": "int8 g32 (GGUF Q8_0)", "lm_head": "int8 g32 (GGUF Q8_0)",
        "model.layers.0.self_attn.q_proj": "int8 g32 (GGUF Q5_0)",
        "model.layers.0.self_attn.k_proj": "int4 g32 (GGUF Q4_K)",
        "model.layers.0.self_attn.v_proj": "int4 g32 (GGUF Q4_0)",
        "model.layers.0.self_attn.o_proj": "int8 g16 (GGUF Q6_K)",
        "model.layers.0.mlp.gate_proj": "int4 g32 (GGUF Q4_1)",
    }  # up_proj is F32 in the file, down_proj absent from it: both stay float
    assert type(module.model.layers[0].mlp.up_proj) is torch.nn.Linear
    assert module.lm_head.weight is module.model.embed_tokens.weight  # one stored table
    for name in report.quantized:  # every kept weight dequantizes to exactly the loaded one
        layer = module.get_submodule(name)
        restored = dequantize(layer.weight, layer.weight_scale, torch.float32, layer.weight_minimum)
        assert torch.equal(restored, reference.get_submodule(name).weight)
    with torch.no_grad():
        torch.testing.assert_close(module(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)

    int8 = gemma_for_k_quants()
    int8.load_state_dict(reference.state_dict())
    report = quantize_module(int8, QuantizationConfig("int8"), gguf=path)
    assert report.quantized["model.layers.0.self_attn.q_proj"] == "int8 g32 (GGUF Q5_0)"
    assert report.quantized["model.layers.0.self_attn.v_proj"] == "int8 g32 (GGUF Q4_0)"
    assert report.quantized["model.layers.0.self_attn.k_proj"] == "int8 per channel"  # Q4_K: no exact int8
    assert report.quantized["model.layers.0.mlp.up_proj"] == "int8 per channel"
    int4 = gemma_for_k_quants()
    int4.load_state_dict(reference.state_dict())
    report = quantize_module(int4, QuantizationConfig("int4", embeddings=False), gguf=path)
    assert report.quantized["model.layers.0.self_attn.k_proj"] == "int4 g32 (GGUF Q4_K)"
    assert report.quantized["model.layers.0.self_attn.q_proj"] == "int4 g128"  # Q5_0: no exact int4


def test_gguf_blocks_that_cannot_be_kept_are_refused_or_requantized(tmp_path):
    module = gemma_for_k_quants()
    path = tmp_path / "k5.gguf"
    write_gguf(path, module, {"model.layers.0.self_attn.q_proj.weight": "Q8_0",
                              "model.layers.0.mlp.down_proj.weight": "Q5_K"})
    loaded = copy.deepcopy(module.state_dict())
    with pytest.raises(InvalidArgumentError, match="GGUF Q5_K blocks have no exact form in ttpu .*Q8_0"):
        quantize_module(module, QuantizationConfig("gguf"), gguf=path)
    assert type(module.model.layers[0].self_attn.q_proj) is torch.nn.Linear  # planned first, refused before any change
    grouped = gemma_for_k_quants()
    grouped.load_state_dict(loaded)
    report = quantize_module(grouped, QuantizationConfig("int8", group_size=32), gguf=path)
    assert report.quantized["model.layers.0.self_attn.q_proj"] == "int8 g32"  # a group size asked for: re-quantized
    with torch.no_grad():
        module.model.layers[0].self_attn.q_proj.weight.mul_(1.5)  # no longer what the file holds
    with pytest.raises(InvalidArgumentError, match="does not dequantize to the weight transformers loaded"):
        quantize_module(module, QuantizationConfig("gguf", exclude=["down_proj"]), gguf=path)
    report = quantize_module(module, QuantizationConfig("int8"), gguf=path)
    assert report.quantized["model.layers.0.self_attn.q_proj"] == "int8 per channel"
    assert report.quantized["model.layers.0.mlp.down_proj"] == "int8 per channel"
