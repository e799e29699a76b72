"""Weight-only int8/int4: the quantizers' error bounds, quantized modules on the device
(integer parameters, one tied table, bytes), the same outputs as the torch module, and
generate, sharding and the serving engine on a quantized model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

from ttpu import AutoModelForTPU, QuantizationConfig
from ttpu.errors import InvalidArgumentError
from ttpu.quantization import quantize_module
from ttpu.quantization.modules import QuantizedEmbedding, QuantizedLinear, dequantize, quantize_int4, quantize_int8

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
    with pytest.raises(InvalidArgumentError, match="int8, int4 or a ttpu.QuantizationConfig"):
        AutoModelForTPU.from_model(tiny_gemma(), quantization=8)


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
