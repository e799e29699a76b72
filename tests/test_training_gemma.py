"""LoRA fine-tuning of the real Gemma 3 270M (offline weights) on local prose."""

from __future__ import annotations

import importlib.metadata

import jax
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ttpu import Trainer, TrainingArguments, models
from ttpu.training.data import language_modeling_blocks

pytestmark = pytest.mark.slow


def test_lora_on_gemma_learns_local_prose_and_its_adapter_loads_in_peft(tmp_path):
    import peft

    source = models.offline_model_dir("gemma-3-270m")
    tokenizer = AutoTokenizer.from_pretrained(source)
    corpus = tmp_path / "prose.txt"
    corpus.write_text(importlib.metadata.metadata("transformers").get_payload())  # its long description
    blocks = language_modeling_blocks([str(corpus)], tokenizer, 64)[:8]

    def base() -> torch.nn.Module:
        return AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)

    model = peft.get_peft_model(base(), peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=8,
                             learning_rate=3e-3, logging_steps=1, save_strategy="no", report_to="none",
                             disable_tqdm=True)
    trainer = Trainer(model, args, train_dataset=blocks, processing_class=tokenizer)
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert np.mean(losses[-2:]) < losses[0] - 0.3, losses  # four passes over the same 8 blocks
    assert trainer.compile_count == 1

    saved = trainer.save_model(tmp_path / "adapter")
    loaded = peft.PeftModel.from_pretrained(base(), saved).eval()
    ids = np.array([blocks[0]["input_ids"][:32]])
    with torch.no_grad():
        expected = loaded(input_ids=torch.from_numpy(ids)).logits.numpy()
    ours = np.asarray(trainer.forward({"input_ids": jax.numpy.asarray(ids)}, {}).logits)
    np.testing.assert_allclose(ours, expected, atol=2e-3)
