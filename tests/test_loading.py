"""Loading: local save_pretrained directories, safety defaults, lookup errors, argument checks.

Fast: tiny random-weight models only, written into tmp_path.
"""

from __future__ import annotations

import inspect
import json

import huggingface_hub
import jax
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from ttpu import AutoModelForTPU, models
from ttpu.errors import InvalidArgumentError, ModelNotFoundError

WORDS = "the quick brown fox jumps over a lazy dog and cat".split()


def tiny_llama() -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=32,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<unk>": 1, "<s>": 2, "</s>": 3}
    vocab.update({word: i + 4 for i, word in enumerate(WORDS)})
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
    )


@pytest.fixture
def llama_dir(tmp_path):
    module = tiny_llama()
    module.save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    return tmp_path, module


def test_local_directory_matches_torch(llama_dir) -> None:
    path, reference = llama_dir
    model = AutoModelForTPU.from_pretrained(str(path))

    assert model.backend == "jax"
    assert model.task == "causal-lm"
    assert isinstance(model.config, LlamaConfig)
    assert isinstance(model.torch_module, LlamaForCausalLM)
    assert isinstance(model.params, dict) and model.params
    assert all(isinstance(v, jax.Array) for v in model.params.values())
    assert model.tokenizer is not None

    batch = model.tokenizer(
        ["the quick brown fox jumps over the lazy dog", "a cat"],
        padding=True,
        return_tensors="np",
    )
    assert batch["attention_mask"][1].sum() < batch["attention_mask"][0].sum()
    with torch.no_grad():
        expected = reference(
            **{k: torch.from_numpy(v) for k, v in batch.items() if k != "token_type_ids"}
        ).logits.numpy()
    actual = np.asarray(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits)

    assert actual.shape == expected.shape
    real = batch["attention_mask"].astype(bool)
    error = np.linalg.norm(actual[real] - expected[real]) / np.linalg.norm(expected[real])
    assert error <= 1e-5, f"relative error {error:.2e}"


class _CreatesFileWhenUnpickled:
    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_pickle_weights_are_not_loaded_by_default(tmp_path) -> None:
    module = tiny_llama()
    module.config.save_pretrained(tmp_path)
    marker = tmp_path / "unpickled"
    weights = {**module.state_dict(), "payload": _CreatesFileWhenUnpickled(marker)}
    torch.save(weights, tmp_path / "pytorch_model.bin")

    with pytest.raises(ModelNotFoundError, match="only pickle weights.*use_safetensors=False"):
        AutoModelForTPU.from_pretrained(str(tmp_path))
    assert not marker.exists()


def test_trust_remote_code_defaults_to_false() -> None:
    default = inspect.signature(AutoModelForTPU.from_pretrained).parameters["trust_remote_code"].default
    assert default is False


def test_unknown_model_id_offline(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the variable at import time; set its constant too.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    name = "no-such-org/no-such-model-ttpu"

    with pytest.raises(ModelNotFoundError) as info:
        AutoModelForTPU.from_pretrained(name)
    message = str(info.value)
    assert name in message
    for alias in models.OFFLINE_MODELS:
        assert alias in message


def test_offline_alias_is_built_once_into_the_cache(monkeypatch, tmp_path) -> None:
    builds = []

    def build(target):
        builds.append(target)
        tiny_llama().save_pretrained(target)

    alias = "tiny-test-alias"
    monkeypatch.setenv("TTPU_CACHE_DIR", str(tmp_path))
    monkeypatch.setitem(
        models.OFFLINE_MODELS, alias, models.OfflineModel(alias, "test", "json", "json", build)
    )

    first = models.resolve(alias)
    second = models.resolve(alias.upper())

    assert first == second == str(tmp_path / "models" / alias)
    assert len(builds) == 1
    assert json.loads((tmp_path / "models" / alias / "config.json").read_text())["model_type"] == "llama"
    assert [p.name for p in (tmp_path / "models").iterdir()] == [alias]  # no scratch left


def test_offline_alias_without_its_package(monkeypatch, tmp_path) -> None:
    alias = "tiny-missing-alias"
    monkeypatch.setenv("TTPU_CACHE_DIR", str(tmp_path))
    monkeypatch.setitem(
        models.OFFLINE_MODELS,
        alias,
        models.OfflineModel(alias, "test", "ttpu-no-such-pkg", "ttpu_no_such_pkg", lambda t: None),
    )
    with pytest.raises(ModelNotFoundError, match="pip install ttpu-no-such-pkg"):
        AutoModelForTPU.from_pretrained(alias)


@pytest.mark.parametrize(
    ("argument", "value", "valid"),
    [
        ("backend", "tensorflow", "jax"),
        ("task", "summarize-everything", "causal-lm"),
        ("dtype", "int3", "bfloat16"),
        ("attn_implementation", "magic", "eager"),
    ],
)
def test_invalid_arguments_list_valid_values(llama_dir, argument, value, valid) -> None:
    path, _ = llama_dir
    with pytest.raises(InvalidArgumentError) as info:
        AutoModelForTPU.from_pretrained(str(path), **{argument: value})
    message = str(info.value)
    assert repr(value) in message
    assert "valid" in message and valid in message


PEAK_MEMORY_SCRIPT = """
import json, sys
from pathlib import Path
import numpy as np
from ttpu import AutoModelForTPU
from ttpu.backends import get_backend

def status(key):
    return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) * 1024

get_backend("jax")  # imports and device set-up are not part of loading
Path("/proc/self/clear_refs").write_text("5")  # restart the peak (VmHWM) from here
before = status("VmRSS:")
model = AutoModelForTPU.from_pretrained(sys.argv[1], parallelism=sys.argv[2] or None)
import jax
jax.block_until_ready(model.params)  # transfers to the devices are asynchronous
peak = status("VmHWM:") - before
logits = np.asarray(model(input_ids=np.arange(1, 9)[None]).logits)
meta = all(p.is_meta for p in model.torch_module.parameters())
json.dump({"peak": peak, "meta": meta, "logits": logits.tolist()}, sys.stdout)
"""


@pytest.mark.parametrize("parallelism", [None, "fsdp"])
def test_loading_peaks_under_twice_the_checkpoint_in_host_memory(tmp_path, parallelism) -> None:
    """A ~190 MB checkpoint: weights are placed one tensor at a time and each host copy
    released (measured in a fresh process, from the end of imports to the end of loading)."""
    config = LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=6,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=128)
    torch.manual_seed(0)
    module = LlamaForCausalLM(config).eval()
    module.save_pretrained(tmp_path)
    checkpoint = (tmp_path / "model.safetensors").stat().st_size
    with torch.no_grad():
        expected = module(input_ids=torch.arange(1, 9)[None]).logits.numpy()
    del module
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-c", PEAK_MEMORY_SCRIPT, str(tmp_path), str(parallelism) if parallelism else ""],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(result.stdout)
    assert seen["meta"], "the torch module still holds its weights after loading"
    assert seen["peak"] < 2 * checkpoint, f"peak {seen['peak'] / 2**20:.0f} MiB, checkpoint {checkpoint / 2**20:.0f} MiB"
    logits = np.array(seen["logits"])
    assert np.linalg.norm(logits - expected) <= 1e-5 * np.linalg.norm(expected)
