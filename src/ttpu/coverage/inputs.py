"""Generic inputs for a model's forward, derived from its signature and config."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

from ttpu.coverage.configs import IMAGE_SIZE, collect_token_ids


B = 2
SEQ = 24
PAD = 6
DEC_SEQ = 12


def _forward_parameters(module: Any) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(module.forward).parameters)


def _special_ids(config: Any) -> set[int]:
    ids: set[int] = set()
    collect_token_ids(config.to_dict(), ids)
    return ids


def _text_vocab(config: Any) -> int:
    sizes = []
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for c in (text, config):
        v = getattr(c, "vocab_size", None)
        if isinstance(v, int) and v > 8:
            sizes.append(v)
    return min(sizes) if sizes else 100


def _token_ids_array(config: Any, shape: tuple[int, int], seed: int) -> Any:
    import numpy as np

    vocab = _text_vocab(config)
    special = _special_ids(config)
    low, high = min(4, vocab - 1), max(5, vocab - 64) if vocab > 128 else vocab
    allowed = np.array([i for i in range(low, high) if i not in special] or [low])
    rng = np.random.default_rng(seed)
    return allowed[rng.integers(0, len(allowed), size=shape)].astype(np.int64)


def _image_size(config: Any) -> tuple[int, int]:
    for c in (getattr(config, "vision_config", None), config):
        if c is None:
            continue
        size = getattr(c, "image_size", None)
        if isinstance(size, int):
            return size, size
        if isinstance(size, (list, tuple)) and len(size) == 2:
            return int(size[0]), int(size[1])
        if isinstance(size, dict) and "height" in size:
            return int(size["height"]), int(size["width"])
    return IMAGE_SIZE, IMAGE_SIZE


@dataclass
class InputCandidate:
    kind: str
    inputs: dict[str, Any]
    mask: Any = None  # [batch, seq] of real positions, for the compared output
    note: str = ""


def input_candidates(model: Any, config: Any, causal: bool) -> tuple[list[InputCandidate], str]:
    """Generic input sets to try in order, or ([], reason) when none can be built."""
    import numpy as np

    params = _forward_parameters(model)
    required = [
        n for n, p in params.items()
        if p.default is inspect.Parameter.empty
        and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]
    buildable = {"input_ids", "attention_mask", "decoder_input_ids", "pixel_values",
                 "input_values", "input_features"}
    missing = [n for n in required if n not in buildable]
    if missing:
        return [], f"forward requires {', '.join(missing)}"
    extra: dict[str, Any] = {}
    if "use_cache" in params:
        extra["use_cache"] = False
    candidates: list[InputCandidate] = []
    is_multimodal = any(
        getattr(config, k, None) is not None for k in ("vision_config", "audio_config", "visual_config")
    )
    if "input_ids" in params:
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        limit = getattr(text, "max_position_embeddings", None)
        seq = min(SEQ, limit) if isinstance(limit, int) and limit > 4 else SEQ
        pad = max(1, seq * PAD // SEQ)
        ids = _token_ids_array(config, (B, seq), 0)
        mask = np.ones((B, seq), np.int64)
        if causal:
            mask[1, :pad] = 0  # left padding
        else:
            mask[1, seq - pad:] = 0  # right padding
        pad = getattr(config, "pad_token_id", None)
        if isinstance(pad, int) and 0 <= pad < _text_vocab(config):
            ids[mask == 0] = pad
        inputs = {"input_ids": ids}
        if "attention_mask" in params:
            inputs["attention_mask"] = mask
        else:
            mask = None
        if getattr(config, "is_encoder_decoder", False) or "decoder_input_ids" in params:
            if "decoder_input_ids" in params:
                inputs["decoder_input_ids"] = _token_ids_array(config, (B, DEC_SEQ), 1)
        kind = "text-only (multimodal)" if is_multimodal else "text"
        candidates.append(InputCandidate(kind, {**inputs, **extra}, mask))
    height, width = _image_size(config)
    vision = getattr(config, "vision_config", None) or config
    channels = getattr(vision, "num_channels", 3)
    channels = channels if isinstance(channels, int) else 3
    if "pixel_values" in params:
        rng = np.random.default_rng(2)
        pixels = rng.standard_normal((B, channels, height, width)).astype(np.float32)
        if candidates:  # dual encoders (CLIP-like) take text and image together
            both = InputCandidate("text+image", {**candidates[0].inputs, "pixel_values": pixels},
                                  candidates[0].mask)
            candidates.append(both)
        if "input_ids" not in required:
            candidates.append(InputCandidate("vision", {"pixel_values": pixels, **extra}))
            frames = [getattr(vision, k) for k in ("num_frames", "frames_per_clip")
                      if isinstance(getattr(vision, k, None), int)] + [2]
            for t in frames[:2]:
                video = rng.standard_normal((B, t, channels, height, width)).astype(np.float32)
                candidates.append(InputCandidate("video", {"pixel_values": video, **extra}))
    if "input_values" in params:
        rng = np.random.default_rng(3)
        audio_channels = getattr(config, "audio_channels", None)
        shapes = [(B, 8000)]
        if isinstance(audio_channels, int):
            shapes.insert(0, (B, audio_channels, 8000))
        else:
            shapes.append((B, 1, 8000))
        mels = getattr(config, "num_mel_bins", None)
        if isinstance(mels, int):  # spectrogram transformers: [batch, frames, mel bins]
            frames = getattr(config, "max_length", None)
            shapes.insert(0, (B, frames if isinstance(frames, int) else 64, mels))
        for shape in shapes:
            candidates.append(InputCandidate(
                "audio (input_values)",
                {"input_values": rng.standard_normal(shape).astype(np.float32), **extra}))
    if "input_features" in params:
        rng = np.random.default_rng(4)
        mels = next((getattr(config, k) for k in ("num_mel_bins", "feature_size", "input_feat_per_channel",
                                                      "input_dim", "n_mels")
                     if isinstance(getattr(config, k, None), int)), 80)
        frames = [64]
        src = getattr(config, "max_source_positions", None)
        if isinstance(src, int):
            frames.insert(0, 2 * src)
        dec = {}
        if "decoder_input_ids" in params:
            dec["decoder_input_ids"] = _token_ids_array(config, (B, DEC_SEQ), 1)
        for t in frames:
            for shape in ((B, mels, t), (B, t, mels)):
                candidates.append(InputCandidate(
                    "audio (input_features)",
                    {"input_features": rng.standard_normal(shape).astype(np.float32), **dec, **extra}))
    if not candidates:
        takes = ", ".join(n for n in params if n not in ("self", "kwargs", "args"))[:120]
        return [], f"no generic inputs for forward({takes})"
    return candidates, ""


