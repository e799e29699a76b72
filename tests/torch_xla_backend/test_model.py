"""AutoModelForTPU with backend="torch_xla": the same API as the JAX backend."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from architectures import ARCHITECTURES, main_output
from test_loading import tiny_llama, tiny_tokenizer
from test_parity import TOLERANCE, relative_error

from ttpu import AutoModelForTPU
from ttpu.errors import InvalidArgumentError

SOME = [a for a in ARCHITECTURES if a.name in ("llama", "gemma3_text", "gpt2", "bert", "t5", "vit")]


@pytest.mark.parametrize("arch", SOME, ids=lambda a: a.name)
def test_model_matches_eager_pytorch_through_the_buckets(arch) -> None:
    module = arch.build()
    inputs = arch.make_inputs(module, batch=3)  # batch padded to 4, sequences to 16
    with torch.no_grad():
        expected = main_output(module(**{k: torch.from_numpy(v) for k, v in inputs.items()})).numpy()
    model = AutoModelForTPU.from_model(module, backend="torch_xla")
    assert model.backend == "torch_xla"
    actual = main_output(model(**inputs)).cpu().numpy()
    assert actual.shape == expected.shape
    assert relative_error(actual, expected, inputs.get("attention_mask")) <= TOLERANCE


def test_lengths_within_a_bucket_share_one_graph() -> None:
    """Lengths within the 16 bucket, filling it exactly too (the mask is always
    materialised: transformers' "nothing is padded" shortcut would read mask values on
    the host and split the graph)."""
    model = AutoModelForTPU.from_model(tiny_llama(), backend="torch_xla")
    model(input_ids=np.ones((1, 5), np.int64))
    compiled = model.compile_count
    for length in (3, 9, 15, 16):
        model(input_ids=np.ones((1, length), np.int64))
    assert model.compile_count == compiled


def test_from_pretrained_directory(tmp_path) -> None:
    reference = tiny_llama()
    reference.save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    model = AutoModelForTPU.from_pretrained(tmp_path, backend="torch_xla")
    ids = model.tokenizer(["the quick brown fox"], return_tensors="np")["input_ids"]
    with torch.no_grad():
        expected = reference(input_ids=torch.from_numpy(ids)).logits.numpy()
    assert relative_error(model(input_ids=ids).logits.cpu().numpy(), expected, None) <= TOLERANCE


def test_a_mesh_larger_than_the_devices_says_so() -> None:
    with pytest.raises(InvalidArgumentError, match="has 8 devices but 1 are available"):
        AutoModelForTPU.from_model(tiny_llama(), backend="torch_xla", mesh={"fsdp": 8})


def test_doctor_explains_the_torch_xla_backend(tmp_path, capsys) -> None:
    from ttpu.cli import main

    tiny_llama().save_pretrained(tmp_path)
    assert main(["doctor", str(tmp_path), "--backend", "torch_xla"]) == 0
    out = capsys.readouterr().out
    for expected in ("torch_xla 2.9.0", "backend:     torch_xla on cpu", "graphs:      lazy tensors",
                     "attention:   ttpu_xla", "kernels:     ttpu_xla: fused XLA attention",
                     "moe experts: transformers' batched_mm", "compiles:    yes"):
        assert expected in out, out


def test_bfloat16_on_request_float32_by_default_on_cpu() -> None:
    """The dtype policy is the JAX backend's: float32 on CPU unless asked."""
    module = tiny_llama()
    ids = np.random.default_rng(0).integers(1, 32, (2, 6))
    assert AutoModelForTPU.from_model(module, backend="torch_xla").dtype == torch.float32
    model = AutoModelForTPU.from_model(module, backend="torch_xla", dtype="bfloat16")
    logits = model(input_ids=ids).logits
    assert logits.dtype == torch.bfloat16 and model.params["model.embed_tokens.weight"].dtype == torch.bfloat16
    with torch.no_grad():
        expected = module.to(torch.bfloat16)(input_ids=torch.from_numpy(ids)).logits.float().numpy()
    assert relative_error(logits.float().cpu().numpy(), expected, None) <= 2e-2
    assert model.generate(ids, max_new_tokens=4).shape == (2, 10)
