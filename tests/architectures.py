"""Tiny random-weight models of the core architectures, with inputs for their forward."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import transformers

VOCAB = 256
DECODER = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    pad_token_id=0,
)
MOE = dict(num_experts=4, num_local_experts=4, num_experts_per_tok=2, moe_intermediate_size=48)
ENCODER = {k: v for k, v in DECODER.items() if k != "num_key_value_heads"}

ENCODER_DECODER = dict(
    vocab_size=VOCAB,
    d_model=64,
    encoder_layers=2,
    decoder_layers=2,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=96,
    decoder_ffn_dim=96,
)
VISION = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=32,
    patch_size=8,
)


@dataclass(frozen=True)
class Arch:
    """One architecture: a model class, its tiny config, and the inputs it takes."""

    name: str
    model_class: str
    config: dict[str, Any] = field(default_factory=dict)
    inputs: str = "text"  # text | seq2seq | pixels | audio
    padding: bool = True  # the forward takes a padding mask

    def build(self) -> torch.nn.Module:
        cls = getattr(transformers, self.model_class)
        config = cls.config_class(**self.config)
        config._attn_implementation = "eager"
        torch.manual_seed(0)
        return cls(config).eval()

    def make_inputs(self, module: torch.nn.Module, batch: int = 2, seq: int = 11) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(0)
        config = module.config
        if self.inputs == "pixels":
            vision = getattr(config, "vision_config", config)
            size, channels = vision.image_size, vision.num_channels
            return {"pixel_values": rng.standard_normal((batch, channels, size, size), np.float32)}
        if self.inputs == "audio":
            frames = 2 * config.max_source_positions
            features = rng.standard_normal((batch, config.num_mel_bins, frames), np.float32)
            decoder = rng.integers(1, VOCAB, (batch, 5))
            return {"input_features": features, "decoder_input_ids": decoder}
        ids = rng.integers(1, VOCAB, (batch, seq))
        inputs = {"input_ids": ids}
        if self.padding:
            mask = np.ones_like(ids)
            if _is_causal(self):
                mask[0, :3] = 0  # left padding, as for generation
            else:
                mask[-1, -4:] = 0  # right padding
            inputs["attention_mask"] = mask
        if self.inputs == "seq2seq":
            inputs["decoder_input_ids"] = rng.integers(1, VOCAB, (batch, 6))
        return inputs


def _is_causal(arch: Arch) -> bool:
    return arch.model_class.endswith(("ForCausalLM", "LMHeadModel"))


def _decoder(name: str, model_class: str, **extra: Any) -> Arch:
    return Arch(name, model_class, {**DECODER, **extra})


ARCHITECTURES: list[Arch] = [
    _decoder("llama", "LlamaForCausalLM"),
    _decoder("mistral", "MistralForCausalLM", sliding_window=8),
    _decoder("mixtral", "MixtralForCausalLM", **MOE),
    _decoder("qwen2", "Qwen2ForCausalLM"),
    _decoder("qwen2_moe", "Qwen2MoeForCausalLM", **MOE, shared_expert_intermediate_size=48),
    _decoder("qwen3", "Qwen3ForCausalLM", head_dim=16),
    _decoder("qwen3_moe", "Qwen3MoeForCausalLM", **MOE, head_dim=16),
    _decoder("gemma", "GemmaForCausalLM", head_dim=16),
    _decoder("gemma2", "Gemma2ForCausalLM", head_dim=16, sliding_window=8),
    _decoder(
        "gemma3_text", "Gemma3ForCausalLM", head_dim=16, sliding_window=8, sliding_window_pattern=2
    ),
    _decoder("phi", "PhiForCausalLM"),
    _decoder("phi3", "Phi3ForCausalLM"),
    Arch(
        "gpt2",
        "GPT2LMHeadModel",
        dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=256, pad_token_id=0),
    ),
    _decoder("gpt_neox", "GPTNeoXForCausalLM"),
    Arch(
        "gptj",
        "GPTJForCausalLM",
        dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=256),
    ),
    Arch(
        "opt",
        "OPTForCausalLM",
        dict(
            vocab_size=VOCAB,
            hidden_size=64,
            ffn_dim=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            word_embed_proj_dim=64,
            max_position_embeddings=256,
            pad_token_id=1,
        ),
    ),
    _decoder("falcon", "FalconForCausalLM", new_decoder_architecture=True, num_kv_heads=2),
    _decoder("stablelm", "StableLmForCausalLM"),
    _decoder("olmo2", "Olmo2ForCausalLM"),
    _decoder("cohere", "CohereForCausalLM"),
    _decoder(
        "deepseek_v3",
        "DeepseekV3ForCausalLM",
        num_key_value_heads=4,  # multi-head latent attention expands keys to every head
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        moe_intermediate_size=48,
        first_k_dense_replace=1,
        q_lora_rank=32,
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=16,
    ),
    Arch("bert", "BertForMaskedLM", ENCODER),
    Arch("bert_seq_cls", "BertForSequenceClassification", ENCODER),
    Arch("roberta", "RobertaForTokenClassification", {**ENCODER, "pad_token_id": 1}),
    Arch(
        "distilbert",
        "DistilBertForQuestionAnswering",
        dict(vocab_size=VOCAB, dim=64, hidden_dim=96, n_layers=2, n_heads=4, pad_token_id=0),
    ),
    Arch("deberta_v2", "DebertaV2ForMaskedLM", ENCODER),
    Arch("electra", "ElectraForMaskedLM", {**ENCODER, "embedding_size": 32}),
    Arch(
        "t5",
        "T5ForConditionalGeneration",
        dict(
            vocab_size=VOCAB,
            d_model=64,
            d_ff=96,
            d_kv=16,
            num_layers=2,
            num_heads=4,
            decoder_start_token_id=0,
        ),
        inputs="seq2seq",
    ),
    Arch(
        "bart",
        "BartForConditionalGeneration",
        {**ENCODER_DECODER, "max_position_embeddings": 256},
        inputs="seq2seq",
    ),
    Arch(
        "whisper",
        "WhisperForConditionalGeneration",
        dict(
            **ENCODER_DECODER,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            decoder_start_token_id=1,
            num_mel_bins=16,
            max_source_positions=32,
            max_target_positions=64,
        ),
        inputs="audio",
    ),
    Arch("vit", "ViTForImageClassification", {**VISION, "num_labels": 5}, inputs="pixels"),
    Arch("clip_vision", "CLIPVisionModel", VISION, inputs="pixels"),
]


def main_output(output: Any) -> Any:
    """The output compared for parity: logits, else the last hidden state, else the first."""
    for key in ("logits", "start_logits", "last_hidden_state"):
        if key in output and output[key] is not None:
            return output[key]
    return output[0]
