"""The JAX and torch_xla backends agree with each other (this environment holds both),
and the torch_xla backend generates what transformers generates on the real Gemma 3 270M."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from architectures import ARCHITECTURES, _is_causal, main_output
from test_offline_models import CAKE, GENERATION_PROMPTS, hf_greedy, reference, relative_error
from transformers import AutoModelForCausalLM

from ttpu import AutoModelForTPU

AGREEING = [a for a in ARCHITECTURES if a.name in ("llama", "gemma3_text", "gpt2", "qwen3", "bert", "t5", "vit")]


def as_numpy(value) -> np.ndarray:
    return value.cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


@pytest.mark.parametrize("arch", AGREEING, ids=lambda a: a.name)
def test_jax_and_torch_xla_give_the_same_outputs(arch) -> None:
    module = arch.build()
    inputs = arch.make_inputs(module)
    on_jax = AutoModelForTPU.from_model(module, backend="jax")
    on_xla = AutoModelForTPU.from_model(module, backend="torch_xla")
    expected = as_numpy(main_output(on_jax(**inputs)))
    assert relative_error(as_numpy(main_output(on_xla(**inputs))), expected) <= 1e-5
    if _is_causal(arch):
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        np.testing.assert_array_equal(
            on_xla.generate(ids, attention_mask=mask, max_new_tokens=16),
            on_jax.generate(ids, attention_mask=mask, max_new_tokens=16),
        )


@pytest.fixture(scope="module")
def gemma():
    model = AutoModelForTPU.from_pretrained("gemma-3-270m", backend="torch_xla")
    return model, reference(AutoModelForCausalLM, "gemma-3-270m")


@pytest.mark.slow
# One prompt against transformers (the JAX backend checks all five in test_offline_models.py);
# test_gemma_on_both_backends_agrees compares a padded batch with the JAX backend's tokens.
@pytest.mark.parametrize("prompt", GENERATION_PROMPTS[:1])
def test_gemma_greedy_generation_equals_transformers(gemma, prompt) -> None:
    model, torch_model = gemma
    ids = model.tokenizer([prompt], return_tensors="np")["input_ids"]
    expected = hf_greedy(torch_model, ids, 32)
    np.testing.assert_array_equal(model.generate(ids, max_new_tokens=32, min_new_tokens=32), expected)


@pytest.mark.slow
def test_gemma_on_both_backends_agrees(gemma) -> None:
    model, _ = gemma
    on_jax = AutoModelForTPU.from_pretrained("gemma-3-270m", backend="jax")
    batch = model.tokenizer([CAKE, "Paris is the capital of"], padding=True, return_tensors="np")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    xla_logits = model(input_ids=ids, attention_mask=mask).logits.cpu().numpy()
    jax_logits = np.asarray(on_jax(input_ids=ids, attention_mask=mask).logits)
    real = mask.astype(bool)
    assert relative_error(xla_logits[real], jax_logits[real]) <= 1e-5
    np.testing.assert_array_equal(
        model.generate(ids, attention_mask=mask, max_new_tokens=16),
        on_jax.generate(ids, attention_mask=mask, max_new_tokens=16),
    )


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_models_give_the_same_outputs_on_both_backends(scheme) -> None:
    """The same quantized modules on both backends: integer weights on the device, the
    same logits and greedy tokens."""
    from ttpu import QuantizationConfig

    arch = next(a for a in ARCHITECTURES if a.name == "gemma3_text")
    config = QuantizationConfig(scheme, group_size=32)
    inputs = arch.make_inputs(arch.build())
    on_jax = AutoModelForTPU.from_model(arch.build(), backend="jax", quantization=config)
    on_xla = AutoModelForTPU.from_model(arch.build(), backend="torch_xla", quantization=config)
    weight = on_xla.compiled_forward.params["model.layers.0.mlp.up_proj.weight"]
    assert weight.dtype == (torch.int8 if scheme == "int8" else torch.uint8)
    expected = as_numpy(main_output(on_jax(**inputs)))
    assert relative_error(as_numpy(main_output(on_xla(**inputs))), expected) <= 1e-5
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    np.testing.assert_array_equal(
        on_xla.generate(ids, attention_mask=mask, max_new_tokens=8),
        on_jax.generate(ids, attention_mask=mask, max_new_tokens=8),
    )
