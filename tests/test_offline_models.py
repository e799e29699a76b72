"""Real weights from the offline aliases match eager PyTorch on the same converted directory.

The first run converts the models into the ttpu cache ($TTPU_CACHE_DIR, else ~/.cache/ttpu):
about a minute for Gemma 3 270M; later runs load the converted directories in seconds.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from references import transformers_greedy
from transformers import AutoModel, AutoModelForCausalLM

from ttpu import AutoModelForTPU, models

pytestmark = pytest.mark.slow

CAKE = "The secret to baking a good cake is"
GEMMA_BATCHES = {
    "single": [CAKE],
    "padded-batch": [
        "Paris is the capital of",
        "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    ],
}
SENTENCES = [
    "A man is playing a guitar on stage.",
    "The new movie is awesome",
    "Quantum computers use qubits, which can be in superpositions of states.",
]


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def reference(auto_class, alias: str) -> torch.nn.Module:
    """The eager float32 PyTorch model on the directory that ttpu converted."""
    path = models.offline_model_dir(alias)
    return auto_class.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def gemma():
    return AutoModelForTPU.from_pretrained("gemma-3-270m"), reference(AutoModelForCausalLM, "gemma-3-270m")


@pytest.fixture(scope="module")
def minilm():
    return AutoModelForTPU.from_pretrained("all-minilm-l6-v2"), reference(AutoModel, "all-minilm-l6-v2")


def logits(model, torch_model, prompts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    batch = model.tokenizer(prompts, padding=True, return_tensors="np")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    actual = np.asarray(model(input_ids=ids, attention_mask=mask).logits)
    with torch.no_grad():
        expected = torch_model(
            input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)
        ).logits.numpy()
    return actual, expected, mask.astype(bool)


@pytest.mark.parametrize("prompts", GEMMA_BATCHES.values(), ids=GEMMA_BATCHES.keys())
def test_gemma_logits_match_eager_pytorch(gemma, prompts) -> None:
    model, torch_model = gemma
    actual, expected, real = logits(model, torch_model, prompts)

    assert actual.shape == expected.shape
    if len(prompts) > 1:
        assert not real.all(), "the batch should contain padding"
    error = relative_error(actual[real], expected[real])
    assert error <= 1e-4, f"relative error {error:.2e}"


def test_gemma_predicts_the_next_token(gemma) -> None:
    model, torch_model = gemma
    actual, expected, _ = logits(model, torch_model, [CAKE])

    assert model.tokenizer.decode([int(actual[0, -1].argmax())]) == " to"
    assert actual[0, -1].argmax() == expected[0, -1].argmax()


def sentence_embeddings(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean pooling over the attention mask, then L2 normalisation (sentence-transformers)."""
    weights = mask[..., None].astype(hidden.dtype)
    pooled = (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)
    return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)


def test_minilm_sentence_embeddings_match_eager_pytorch(minilm) -> None:
    model, torch_model = minilm
    batch = model.tokenizer(SENTENCES, padding=True, return_tensors="np")
    mask = batch["attention_mask"]
    assert not mask.all(), "the batch should contain padding"

    hidden = np.asarray(model(**batch).last_hidden_state)
    with torch.no_grad():
        expected_hidden = torch_model(**{k: torch.from_numpy(v) for k, v in batch.items()})
    actual = sentence_embeddings(hidden, mask)
    expected = sentence_embeddings(expected_hidden.last_hidden_state.numpy(), mask)

    assert actual.shape == (len(SENTENCES), model.config.hidden_size)
    cosines = (actual * expected).sum(axis=1)
    assert (cosines >= 0.9999).all(), f"cosine similarities {cosines}"


GENERATION_PROMPTS = [
    CAKE,
    "Paris is the capital of",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three primary colors are",
]


def hf_greedy(torch_model, ids: np.ndarray, new_tokens: int) -> np.ndarray:
    """The prompts ``ids`` [rows, length] (unpadded) and transformers' greedy tokens after each."""
    return np.concatenate([ids, transformers_greedy(torch_model, ids.tolist(), new_tokens, batch=1)], axis=1)


@pytest.fixture(scope="module")
def greedy_references(gemma) -> dict[str, list[int]]:
    """Each generation prompt's 64 greedy tokens from transformers."""
    model, torch_model = gemma
    prompts = [model.tokenizer(prompt)["input_ids"] for prompt in GENERATION_PROMPTS]
    return dict(zip(GENERATION_PROMPTS, transformers_greedy(torch_model, prompts, 64, batch=len(prompts))))


@pytest.mark.parametrize("prompt", GENERATION_PROMPTS)
def test_gemma_greedy_generation_equals_transformers(gemma, greedy_references, prompt) -> None:
    model, _ = gemma
    ids = model.tokenizer([prompt], return_tensors="np")["input_ids"]
    actual = model.generate(ids, max_new_tokens=64, min_new_tokens=64)
    np.testing.assert_array_equal(actual, np.concatenate([ids, [greedy_references[prompt]]], axis=1))


def test_gemma_prompt_longer_than_its_sliding_window(gemma) -> None:
    model, torch_model = gemma
    window = model.config.sliding_window
    text = " ".join(f"Item {i}: a cake with {i % 7} layers." for i in range(200))
    ids = model.tokenizer([text], return_tensors="np")["input_ids"][:, : window + 100]
    assert ids.shape[1] > window
    np.testing.assert_array_equal(model.generate(ids, max_new_tokens=16), hf_greedy(torch_model, ids, 16))


@pytest.mark.parametrize("parallelism", ["fsdp", "tp"])
def test_gemma_sharded_over_eight_devices(gemma, parallelism) -> None:
    """fsdp holds an eighth of the weights per device; both strategies generate the same
    tokens as transformers."""
    import ttpu

    _, torch_model = gemma
    model = AutoModelForTPU.from_pretrained("gemma-3-270m", parallelism=parallelism)
    table = ttpu.describe_sharding(model)
    if parallelism == "fsdp":
        assert abs(table.bytes_per_device - table.total_bytes / 8) <= 0.01 * table.total_bytes / 8, str(table)
    ids = model.tokenizer([CAKE], return_tensors="np")["input_ids"]
    np.testing.assert_array_equal(model.generate(ids, max_new_tokens=16), hf_greedy(torch_model, ids, 16))


def test_gemma_keeps_its_gguf_blocks_on_the_device_with_the_float_logits(gemma):
    """quantization="gguf": every linear layer and the tied embedding stay the Q4_K_M
    file's own blocks (int8/int4 arrays on the device, ~0.27x the float32 bytes), which
    dequantize to exactly the float32 weights the alias was converted to."""
    model, _ = gemma
    kept = AutoModelForTPU.from_pretrained("gemma-3-270m", quantization="gguf")
    report = kept.quantization
    assert len(report.quantized) == 18 * 7 + 2 and all("(GGUF " in r for r in report.quantized.values())
    params = kept.compiled_forward.params
    weights = [f"{name}.weight" for name in report.quantized if f"{name}.weight" in params]  # the tied head: once
    assert len(weights) == 18 * 7 + 1 and all(params[w].dtype in (np.int8, np.uint8) for w in weights)

    def device_bytes(m) -> int:
        return sum(s.data.nbytes for a in m.compiled_forward.params.values() for s in a.addressable_shards)

    assert device_bytes(kept) <= 0.30 * device_bytes(model)
    batch = model.tokenizer(GEMMA_BATCHES["padded-batch"], padding=True, return_tensors="np")
    np.testing.assert_allclose(np.asarray(kept(**batch).logits), np.asarray(model(**batch).logits), atol=1e-5)
