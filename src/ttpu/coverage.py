"""Coverage sweep: every model type in the installed transformers, tiny and random.

For each model type a tiny random-weight config is derived generically from the
config class defaults (``tiny_config``), the model's main class is built in float32,
its eager torch forward is run on generic inputs, then the same module is wrapped
with ``AutoModelForTPU.from_model`` and its output is compared with torch's.

Stages recorded per model type: ``eager`` (the torch forward runs), ``compiles``
(ttpu traces, compiles and runs it), ``matches`` (relative error of the main output,
``||jax - torch|| / ||torch||`` on non-padded positions, is <= ``RTOL``).

Each model type runs in a worker subprocess with a timeout, so that a crash or hang
does not stop the sweep. Usage::

    python -m ttpu.coverage                       # full sweep -> docs/COVERAGE.md
    python -m ttpu.coverage --filter '^(llama|gpt2|bert)$' --out-md /tmp/c.md
"""

from __future__ import annotations

import argparse
import copy
import datetime
import importlib
import importlib.util
import inspect
import json
import math
import multiprocessing
import os
import platform
import random
import re
import sys
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import wait as wait_connections
from pathlib import Path
from typing import Any

RTOL = 1e-5
DEFAULT_TIMEOUT = 120.0
DEFAULT_OUT_MD = "docs/COVERAGE.md"
DEFAULT_OUT_JSON = "docs/coverage.json"
MAX_PARAMS = 60_000_000  # tiny configs larger than this are not attempted
TASKS_PER_WORKER = 25  # recycle workers to bound memory growth and state leaks

# ---------------------------------------------------------------------------
# Tiny configs
# ---------------------------------------------------------------------------

WIDTH = 64
HEADS = 4
KV_HEADS = 2
HEAD_DIM = WIDTH // HEADS
FFN = 128
LAYERS = 2
MAX_LAYERS = 4  # per-layer patterns with more distinct kinds keep up to this many
VOCAB = 1024
EXPERTS = 4
TOP_K = 2
MAX_POSITIONS = 512
IMAGE_SIZE = 64
PATCH_SIZE = 8
WINDOW = 8  # sliding windows / attention chunks, shorter than the test sequence
LORA_RANK = 32
ROPE_HEAD_DIM = 8

_LAYER_COUNT_KEYS = re.compile(
    r"^(num_hidden_layers|num_layers|n_layers?|n_layer|encoder_layers|decoder_layers|"
    r"num_encoder_layers|num_decoder_layers|(encoder|decoder|text_encoder|speech_encoder|"
    r"pred|conf|mit|t2u_encoder|t2u_decoder)_(num_)?(hidden_)?layers|depth|decoder_depth|"
    r"num_blocks|num_encoder_blocks|resampler_depth|perceiver_resampler_num_layers|"
    r"num_self_attends_per_block|num_spatial_layers|num_temporal_layers|x_layers|l_layers|"
    r"r_layers|num_global_layers|memory_attention_num_layers|num_mem_blocks)$"
)
# Rules on integer attributes: (name pattern, target); values above target shrink to it.
# Order matters: the first matching rule wins.
_INT_RULES: list[tuple[re.Pattern, int | str]] = [
    (re.compile(r"token_ids?$|token_index$|_id$|^(bos|eos|pad|sep|cls|unk|mask)_"), "keep"),
    (re.compile(r"(^|_)(type_vocab_size|num_labels|num_channels|in_channels|input_channels)$"), "keep"),
    (re.compile(r"kernel|stride|dilation|padding|merge_size|temporal_patch|tubelet|ratio|factor|"
                r"multiple_of|groups?_width"), "keep"),
    (re.compile(r"vocab(_size)?$|vocab_size_per_layer_input$|^num_embeddings$|codebook_size$"), VOCAB),
    (re.compile(r"(max_position_embeddings|^n_positions|max_source_positions|max_target_positions|^n_ctx|"
                r"max_seq_len|max_sequence_length|^seq_length|max_length|position_embeddings)$"), MAX_POSITIONS),
    (re.compile(r"(sliding_window|attention_chunk_size|sliding_window_size|attention_window_size|"
                r"chunk_size|index_topk|window_size)$"), WINDOW),
    (re.compile(r"^(num_queries|num_top_queries|num_object_queries)$"), 16),
    (re.compile(r"^(num_experts|num_local_experts|n_routed_experts|moe_num_experts|zero_expert_num)$"), EXPERTS),
    (re.compile(r"^(num_experts_per_tok|num_experts_per_token|top_k|moe_topk|moe_top_k|moe_k|"
                r"num_selected_experts|experts_per_token)$"), TOP_K),
    (re.compile(r"^(n_group|num_expert_group)$"), 2),
    (re.compile(r"^(n_groups|mamba_n_groups|mamba_ngroups)$"), 2),
    (re.compile(r"(d_state|ssm_state_size|state_size)$"), 16),
    (re.compile(r"^(topk_group|n_shared_experts|num_shared_experts|moe_num_shared_experts|"
                r"first_k_dense_replace|num_nextn_predict_layers|num_mtp_layers|max_window_layers|"
                r"num_kv_shared_layers|num_dense_layers)$"), 1),
    (re.compile(r"^(q_lora_rank|kv_lora_rank|o_lora_rank|adapter_rank|laurel_rank|embedding_rank)$"), LORA_RANK),
    (re.compile(r"^(qk_rope_head_dim)$"), ROPE_HEAD_DIM),
    (re.compile(r"^(qk_nope_head_dim)$"), HEAD_DIM - ROPE_HEAD_DIM),
    (re.compile(r"(head_dim|headdim|d_kv|attention_head_size|d_head|dim_head|head_size|kv_channels|"
                r"rotary_dim|rotary_emb_dim)$"), HEAD_DIM),
    (re.compile(r"(key_value_heads|kv_heads|kv_n_heads|query_groups|multi_query_group_num|"
                r"num_key_value_groups|linear_num_key_heads)$"), "kv_heads"),
    (re.compile(r"(attention_heads|num_heads|n_heads?|_heads|^heads)$"), HEADS),
    (_LAYER_COUNT_KEYS, LAYERS),
    (re.compile(r"(intermediate_size|intermediate_dim|ffn_dim|^d_ff|^n_inner|mlp_dim|ffn_hidden_size|"
                r"dim_feedforward|feedforward_dim|feed_forward_size|_ff$|^dim_ff)$"), FFN),
    (re.compile(r"^(image_size|img_size|pretrain_image_size|crop_size|max_image_size)$"), IMAGE_SIZE),
    (re.compile(r"^(patch_size)$"), PATCH_SIZE),
    (re.compile(r"(hidden_size|_dim$|^dim$|d_model|n_embd|embed_dim|embedding_size|_width$|^width$|"
                r"channels?$|_size$|^hidden$|projection_dim|proj_dim|_ssm$)"), WIDTH),
]

# Lists of layer indices, remapped proportionally onto the new layer count.
_LAYER_INDEX_LIST = re.compile(
    r"(index|indexes|indices|layer_ids|_idxs|layers_ids|^mlp_only_layers|^moe_layers|hook_ids|"
    r"cross_attention_layers|extract_layers|target_layers|kv_source_layers|"
    r"global_attention_blocks|^out_indices)$"
)
# Per-stage lists of widths (conv nets, hierarchical vision transformers).
_WIDTH_LIST = re.compile(r"(hidden_sizes|embed_dims?|embed_dim_per_stage|channels|_dims|^conv_dim|"
                         r"^tdnn_dim|channel_list|out_channels|_sizes)$")
_HEADS_LIST = re.compile(r"(num_heads|attention_heads|heads_per_stage|num_attention_heads_per_layer)$")
_DEPTH_LIST = re.compile(r"^(depths|depth|blocks_per_stage|stage_num_blocks|num_block_repeats|"
                         r"block_repeats|stage_numb_of_layers|num_layers_per_stage)$")

# Documented exceptions: model types whose defaults the generic rules get wrong.
# model_type -> {attribute: value} applied after the generic shrink.
TINY_CONFIG_OVERRIDES: dict[str, dict[str, Any]] = {}


def _ceil_to(value: float, step: int) -> int:
    return max(step, int(math.ceil(value / step)) * step)


def _is_config_dict(value: Any) -> bool:
    return isinstance(value, dict) and "model_type" in value


def _layer_count_key(d: dict) -> str | None:
    for key in ("num_hidden_layers", "num_layers", "n_layer", "n_layers", "encoder_layers",
                "decoder_layers", "depth"):
        if isinstance(d.get(key), int) and d[key] > 0:
            return key
    return None


def _per_layer_dict_keys(key: str, value: Any, old: int) -> bool:
    """A dict keyed by layer index (ints or digit strings such as '05')."""
    if not isinstance(value, dict) or not value or _is_config_dict(value) or "layer" not in key:
        return False
    keys = [int(k) if isinstance(k, str) and k.isdigit() else k for k in value]
    return all(isinstance(k, int) and 0 <= k < old for k in keys)


def _select_layers(d: dict, old: int, new: int, aggressive: bool) -> int:
    """Shrink per-layer lists and dicts keyed by layer, keeping each distinct layer kind."""
    per_layer = [k for k, v in d.items() if isinstance(v, (list, tuple)) and len(v) == old and old > 1
                 and not _LAYER_INDEX_LIST.search(k) and not _is_config_dict(v)]
    per_layer_dicts = [k for k, v in d.items() if _per_layer_dict_keys(k, v, old)]
    if not per_layer and not per_layer_dicts:
        return new
    kinds: dict[Any, int] = {}
    for i in range(old):
        kind = tuple(json.dumps(d[k][i], sort_keys=True, default=str) for k in per_layer)
        for k in per_layer_dicts:
            entry = next((v for key, v in d[k].items() if int(key) == i), None)
            kind += (json.dumps(entry, sort_keys=True, default=str),)
        kinds.setdefault(kind, i)
    indices = sorted(kinds.values())[:MAX_LAYERS]
    extra = [i for i in range(old) if i not in indices]
    while len(indices) < min(new, old) and extra:
        indices.append(extra.pop(0))
    indices.sort()
    for k in per_layer:
        values = [d[k][i] for i in indices]
        d[k] = type(d[k])(values) if isinstance(d[k], tuple) else values
    for k in per_layer_dicts:
        out = {}
        for key, entry in d[k].items():
            i = int(key)
            if i in indices:
                new_i = indices.index(i)
                new_key = str(new_i).zfill(len(key)) if isinstance(key, str) else new_i
                if isinstance(entry, dict):
                    entry = {ek: _shrink_int(ek, ev, entry, None, aggressive)
                             if isinstance(ev, int) and not isinstance(ev, bool) else ev
                             for ek, ev in entry.items()}
                out[new_key] = entry
        d[k] = out
    return len(indices)


def _shrink_int(key: str, value: int, d: dict, old_heads: int | None, aggressive: bool) -> int:
    for pattern, target in _INT_RULES:
        if not pattern.search(key):
            continue
        if target == "keep":
            return value
        if target == "kv_heads":
            if old_heads and value >= old_heads:
                return min(value, HEADS)
            return value if value <= 1 else min(value, KV_HEADS)
        if not aggressive and target in (WIDTH, FFN, HEAD_DIM, HEADS, LORA_RANK,
                                          ROPE_HEAD_DIM, HEAD_DIM - ROPE_HEAD_DIM, IMAGE_SIZE,
                                          PATCH_SIZE):
            return value
        return min(value, target)
    return value


def _shrink_list(key: str, value: list | tuple, d: dict, aggressive: bool) -> list | tuple | None:
    if not value or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return None
    out: list[int] | None = None
    if _DEPTH_LIST.search(key):
        out = [min(v, 1) for v in value]
    elif aggressive and _HEADS_LIST.search(key):
        out = [min(v, 2 ** min(i + 1, 2)) if v > 1 else v for i, v in enumerate(value)]
    elif aggressive and _WIDTH_LIST.search(key) and max(value) > WIDTH:
        # elementwise min, like scalar widths: equal widths stay equal across lists
        out = [min(v, WIDTH) for v in value]
    elif aggressive and key in ("image_size", "img_size") and len(value) == 2:
        out = [min(v, IMAGE_SIZE) for v in value]
    elif aggressive and key == "patch_size" and len(value) == 2:
        out = [min(v, PATCH_SIZE) for v in value]
    if out is None:
        return None
    return tuple(out) if isinstance(value, tuple) else out


def _remap_indices(values: Sequence[int], old_max: int, new_max: int) -> list[int]:
    """Map indices in [0, old_max] onto [0, new_max] proportionally, keeping them distinct
    where there is room (negative indices count from the end and are kept)."""
    out: list[int] = []
    for v in values:
        if v < 0:
            out.append(v)
            continue
        r = min(new_max, round(v * new_max / old_max)) if old_max > 0 else 0
        out.append(r)
    positive = sorted({v for v in values if v >= 0})
    if len(positive) <= new_max + 1:  # room to keep them distinct: shift collisions upward
        mapping, used = {}, -1
        for v in positive:
            r = max(min(new_max, round(v * new_max / old_max)) if old_max > 0 else 0, used + 1)
            mapping[v] = r
            used = r
        overflow = used - new_max
        if overflow > 0:
            mapping = {k: r - overflow for k, r in mapping.items()}
        out = [mapping.get(v, v) if v >= 0 else v for v in values]
    deduped: list[int] = []
    for v in out:
        if v not in deduped:
            deduped.append(v)
    return deduped


def _fill_unset(d: dict) -> None:
    """Core sizes that some defaults leave as None although the model needs them."""
    heads = _int(d, "num_attention_heads")
    hidden = _int(d, "hidden_size")
    if "head_dim" in d and d["head_dim"] is None and heads and hidden:
        d["head_dim"] = hidden // heads
    if "num_key_value_heads" in d and d["num_key_value_heads"] is None and heads:
        d["num_key_value_heads"] = heads
    if "vocab_size" in d and d["vocab_size"] is None:
        d["vocab_size"] = VOCAB


def _shrink_dict(d: dict, aggressive: bool, mrope_default: list[int] | None = None) -> dict:
    original = d
    d = dict(d)
    for key in ("stage_names", "_out_features", "out_features"):
        d.pop(key, None)
    own_default = _mrope_default_for(d.get("model_type"))
    mrope_default = own_default or mrope_default
    # sub-configs first (dicts carrying a model_type)
    for key, value in list(d.items()):
        if _is_config_dict(value):
            d[key] = _shrink_dict(value, aggressive, mrope_default)
    old_heads = next((d[k] for k in ("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads")
                      if isinstance(d.get(k), int)), None)
    layer_key = _layer_count_key(d)
    old_layers = d[layer_key] if layer_key else None
    staged = any(_DEPTH_LIST.search(k) and isinstance(v, (list, tuple)) for k, v in d.items())
    index_lists = {
        k: v for k, v in d.items()
        if isinstance(k, str) and isinstance(v, (list, tuple)) and v and all(isinstance(i, int) for i in v)
        and (_LAYER_INDEX_LIST.search(k) or (k in ("out_indices", "_out_indices") and not staged))
    }
    new_layers = LAYERS
    if old_layers:
        wanted = max([LAYERS] + [min(MAX_LAYERS, len({i for i in v if i >= 0}))
                                 for k, v in index_lists.items() if "out_indices" in k])
        new_layers = _select_layers(d, old_layers, min(wanted, old_layers), aggressive)
        new_layers = max(new_layers, min(wanted, old_layers))
    for key, value in list(d.items()):
        if isinstance(value, bool) or not isinstance(key, str) or (key.startswith("_") and key != "_out_indices"):
            continue
        if isinstance(value, int):
            if key == layer_key:
                d[key] = new_layers
            else:
                d[key] = _shrink_int(key, value, d, old_heads, aggressive)
        elif isinstance(value, (list, tuple)):
            if key in index_lists:
                if old_layers:
                    # out_indices count stages with the embeddings as stage 0
                    stem = 1 if "out_indices" in key else 0
                    remapped = _remap_indices(value, old_layers - 1 + stem, new_layers - 1 + stem)
                    d[key] = type(value)(remapped) if isinstance(value, tuple) else remapped
                continue
            shrunk = _shrink_list(key, value, d, aggressive)
            if shrunk is not None:
                d[key] = shrunk
    if aggressive:
        _keep_relations(original, d)
    _fill_unset(d)
    _fill_moe(d)
    _shrink_rope(original, d, mrope_default)
    return d


def _mrope_default_for(model_type: Any) -> list[int] | None:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        return None
    try:
        return _modeling_mrope_default(CONFIG_MAPPING[model_type])
    except Exception:  # noqa: BLE001
        return None


_HEADS_KEY = re.compile(r"^(.*?)_?(num_attention_heads|num_heads|n_heads|n_head|heads)$")
_HEAD_DIM_KEY = re.compile(r"^(.*?)_?(head_dim|headdim|d_head|attention_head_size|head_size)$")
# head-dim-like attributes; equal ones stay equal (first listed wins)
_HEAD_FAMILY = ("qk_rope_head_dim", "v_head_dim", "qk_nope_head_dim", "head_dim", "kv_channels",
                "attention_head_size", "d_kv")


def _int(d: dict, key: str) -> int | None:
    v = d.get(key)
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _head_dim_of(d: dict) -> int | None:
    hd = _int(d, "head_dim")
    if hd:
        return hd
    heads = next((_int(d, k) for k in ("num_attention_heads", "n_head", "num_heads") if _int(d, k)), None)
    hidden = next((_int(d, k) for k in ("hidden_size", "d_model", "n_embd") if _int(d, k)), None)
    return hidden // heads if heads and hidden else None


def _keep_relations(o: dict, d: dict) -> None:
    """Restore the arithmetic relations between widths that the defaults had."""
    # equal head-dim-like attributes stay equal
    for i, a in enumerate(_HEAD_FAMILY):
        for b in _HEAD_FAMILY[:i]:
            if _int(o, a) and _int(o, a) == _int(o, b) and _int(d, b):
                d[a] = d[b]
                break
    # heads * head_dim == some width (hidden size, expand * hidden ...): keep it, adjusting
    # the head dim for plain attention and the head count for the rest (mamba, linear attention)
    widths = {}
    for k, v in o.items():
        if _int(o, k) and _int(d, k) and re.search(r"hidden_size|d_model|n_embd|_dim$|^dim$|d_ssm|intermediate", k):
            widths.setdefault(v, d[k])
    expand = next((_int(o, k) for k in o if isinstance(k, str) and re.search(r"expand$", k) and _int(o, k)), None)
    hidden_key = next((k for k in ("hidden_size", "d_model", "n_embd") if _int(o, k)), None)
    if expand and hidden_key:
        widths.setdefault(expand * o[hidden_key], expand * d[hidden_key])
    for hk in [k for k in o if isinstance(k, str) and _HEADS_KEY.match(k) and _int(o, k)]:
        prefix = _HEADS_KEY.match(hk).group(1)
        for dk in [k for k in o if isinstance(k, str) and _HEAD_DIM_KEY.match(k) and _int(o, k)]:
            if _HEAD_DIM_KEY.match(dk).group(1) != prefix:
                continue
            target = widths.get(o[hk] * o[dk])
            if not target:
                continue
            if prefix == "" and target % d[hk] == 0:
                d[dk] = target // d[hk]
            elif target % d[dk] == 0:
                d[hk] = target // d[dk]
    if {"qk_nope_head_dim", "qk_rope_head_dim", "qk_head_dim"} <= d.keys():
        if all(_int(d, k) for k in ("qk_nope_head_dim", "qk_rope_head_dim")):
            d["qk_head_dim"] = d["qk_nope_head_dim"] + d["qk_rope_head_dim"]
    # partial rotary dims scale with the head dim
    old_hd, new_hd = _head_dim_of(o), _head_dim_of(d)
    for key in ("rotary_dim", "rotary_emb_dim", "rope_dim"):
        if _int(o, key) and old_hd and new_hd:
            d[key] = max(2, 2 * round(o[key] * new_hd / old_hd / 2))
    # attributes no rule knows that equalled the hidden size (depthwise conv groups ...)
    if hidden_key and _int(o, hidden_key) and o[hidden_key] != d[hidden_key]:
        for key, value in o.items():
            if (isinstance(key, str) and _int(o, key) and value == o[hidden_key]
                    and d.get(key) == value and not any(p.search(key) for p, _ in _INT_RULES)):
                d[key] = d[hidden_key]
    for key in [k for k in o if isinstance(k, str) and re.search(r"(ssm|d_inner|mamba_d_ssm)$", k)]:
        if _int(o, key) and expand and hidden_key and o[key] == expand * o[hidden_key]:
            d[key] = expand * d[hidden_key]


_EXPERT_FILL = (
    (re.compile(r"^(num_experts|num_local_experts|n_routed_experts|moe_num_experts)$"), EXPERTS),
    (re.compile(r"^(num_experts_per_tok|num_experts_per_token|moe_topk|moe_top_k|moe_k)$"), TOP_K),
    (re.compile(r"^(n_shared_experts|num_shared_experts|n_group|topk_group|num_expert_group)$"), 1),
)


def _fill_moe(d: dict) -> None:
    """MoE configs whose defaults leave expert counts unset (None) get small ones."""
    is_moe = any(
        isinstance(v, int) and not isinstance(v, bool) and v > 0 and isinstance(k, str)
        and ("moe" in k or "expert" in k) and "token" not in k
        for k, v in d.items()
    )
    if not is_moe:
        return
    for key, value in d.items():
        if value is None:
            for pattern, fill in _EXPERT_FILL:
                if pattern.search(key):
                    d[key] = fill


def _scale_sections(sections: list, total: int) -> list:
    old = sum(sections)
    new = [max(1, int(s * total / old)) for s in sections]
    i = 0
    while sum(new) < total:
        new[i % len(new)] += 1
        i += 1
    while sum(new) > total and max(new) > 1:
        new[new.index(max(new))] -= 1
    return new


def _modeling_mrope_default(config_class: type) -> list[int] | None:
    """``rope_parameters.get("mrope_section", [..])``'s default in the model's source."""
    module_name = config_class.__module__.replace(".configuration_", ".modeling_")
    try:
        spec = importlib.util.find_spec(module_name)
        source = Path(spec.origin).read_text() if spec and spec.origin else ""
    except Exception:  # noqa: BLE001
        return None
    m = re.search(r"get\(\s*[\"']mrope_section[\"']\s*,\s*\[([\d,\s]+)\]", source)
    return [int(x) for x in m.group(1).split(",") if x.strip()] if m else None


def _shrink_rope(o: dict, d: dict, mrope_default: list[int] | None = None) -> None:
    """Positions limits and multimodal-rope sections that follow the shrunk head dim."""
    rope = d.get("rope_parameters")
    if not isinstance(rope, dict):
        return
    if mrope_default and "mrope_section" not in json.dumps(rope):
        # modeling code defaults the sections when the config has none
        rope = {**rope, "mrope_section": list(mrope_default)}
    limit = d.get("max_position_embeddings")
    new_hd = _head_dim_of(d)

    def fix(params: dict) -> dict:
        params = dict(params)
        original = params.get("original_max_position_embeddings")
        if isinstance(limit, int) and isinstance(original, int) and original > limit:
            params["original_max_position_embeddings"] = max(1, limit // 4)
        sections = params.get("mrope_section")
        if isinstance(sections, list) and sections and new_hd:
            # sections cover the rotary half of the head dim
            partial = params.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0)) or 1.0
            total = max(len(sections), int(new_hd * partial) // 2)
            params["mrope_section"] = _scale_sections(sections, total)
        return params

    if all(isinstance(v, dict) for v in rope.values()) and rope:
        d["rope_parameters"] = {k: fix(v) for k, v in rope.items()}  # per layer type
    else:
        d["rope_parameters"] = fix(rope)


def _token_ids(d: Any, out: set[int]) -> None:
    if isinstance(d, dict):
        for key, value in d.items():
            if _is_config_dict(value) or isinstance(value, dict):
                _token_ids(value, out)
            elif isinstance(key, str) and re.search(r"token_ids?$|token_index$|_token_id", key):
                values = value if isinstance(value, (list, tuple)) else [value]
                out.update(v for v in values if isinstance(v, int) and not isinstance(v, bool))


def _min_vocab(d: Any) -> int | None:
    sizes = []

    def walk(x: Any) -> None:
        if isinstance(x, dict):
            for k, v in x.items():
                if k in ("vocab_size", "text_vocab_size") and isinstance(v, int) and v > 8:
                    sizes.append(v)
                elif isinstance(v, dict):
                    walk(v)

    walk(d)
    return min(sizes) if sizes else None


def _remap_token_ids(d: dict, vocab: int) -> dict:
    """Move special token ids that fall outside the shrunk vocabulary into its top end."""
    ids: set[int] = set()
    _token_ids(d, ids)
    high = sorted(i for i in ids if i >= vocab)
    mapping = {old: vocab - 1 - n for n, old in enumerate(high)}

    def walk(x: Any) -> Any:
        if isinstance(x, dict):
            out = {}
            for k, v in x.items():
                if isinstance(v, dict):
                    out[k] = walk(v)
                elif isinstance(k, str) and re.search(r"token_ids?$|token_index$|_token_id", k):
                    if isinstance(v, int) and not isinstance(v, bool):
                        out[k] = mapping.get(v, v)
                    elif isinstance(v, (list, tuple)):
                        out[k] = type(v)(mapping.get(i, i) if isinstance(i, int) else i for i in v)
                    else:
                        out[k] = v
                else:
                    out[k] = v
            return out
        return x

    return walk(d)


def _drop_timm_backbones(d: dict) -> bool:
    """Without timm installed, timm sub-configs are replaced by the config's default."""
    if importlib.util.find_spec("timm") is not None:
        return False
    dropped = False
    for key, value in list(d.items()):
        if _is_config_dict(value):
            if value.get("model_type") in ("timm_backbone", "timm_wrapper"):
                d[key] = None
                d["use_timm_backbone"] = False  # DETR-style configs then default to ResNet
                dropped = True
            else:
                dropped |= _drop_timm_backbones(value)
        if key == "use_timm_backbone" and value is True:
            d[key] = False
            dropped = True
    return dropped


def tiny_config(model_type: str, aggressive: bool = True) -> Any:
    """A small random-init config for ``model_type``, shrunk generically from its defaults.

    ``aggressive=False`` shrinks only depth, vocabulary, positions, experts and windows
    (no widths or heads), a fallback for models whose widths are tied in ways the
    generic rules miss.
    """
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            config = AutoConfig.for_model(model_type)
        except Exception:
            config = CONFIG_MAPPING[model_type]()
        d = config.to_dict()
        if _drop_timm_backbones(d):  # let the config pick its transformers default
            d.pop("transformers_version", None)
            d = type(config).from_dict(d).to_dict()
        d = _shrink_dict(d, aggressive, _modeling_mrope_default(type(config)))
        vocab = _min_vocab(d)
        if vocab:
            d = _remap_token_ids(d, vocab)
        d.update(TINY_CONFIG_OVERRIDES.get(model_type, {}))
        d.pop("transformers_version", None)
        tiny = type(config).from_dict(d)
    return tiny


# ---------------------------------------------------------------------------
# Model classes and inputs
# ---------------------------------------------------------------------------

_PREFERRED_MAPPINGS = (
    "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
    "MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES",
    "MODEL_FOR_MASKED_LM_MAPPING_NAMES",
    "MODEL_MAPPING_NAMES",
)


def main_class_name(model_type: str) -> tuple[str | None, str]:
    """(class name, mapping it came from): the LM head if any, else the base model."""
    import transformers.models.auto.modeling_auto as auto

    names = list(_PREFERRED_MAPPINGS) + sorted(
        n for n in dir(auto) if n.endswith("_MAPPING_NAMES") and n.startswith("MODEL_FOR_")
        and n not in _PREFERRED_MAPPINGS
    )
    for mapping_name in names:
        mapping = getattr(auto, mapping_name)
        if model_type in mapping:
            value = mapping[model_type]
            return (value[0] if isinstance(value, (list, tuple)) else value), mapping_name
    return None, ""


def _class_from_config_module(config: Any) -> type | None:
    """The PreTrainedModel in the config's own modeling module whose config_class it is."""
    from transformers import PreTrainedModel

    module_name = type(config).__module__.replace(".configuration_", ".modeling_")
    try:
        module = importlib.import_module(module_name)
    except Exception:
        return None
    candidates = [
        obj for obj in vars(module).values()
        if inspect.isclass(obj) and issubclass(obj, PreTrainedModel)
        and getattr(obj, "config_class", None) is type(config)
        and not obj.__name__.endswith("PreTrainedModel")
    ]
    order = ("ForCausalLM", "ForConditionalGeneration", "ForMaskedLM", "Model")
    for suffix in order:
        for obj in candidates:
            if obj.__name__.endswith(suffix):
                return obj
    return candidates[0] if candidates else None


def resolve_class(model_type: str, config: Any) -> tuple[type | None, str]:
    import transformers
    import transformers.models.auto.modeling_auto as auto

    name, source = main_class_name(model_type)
    # encoders (explicit is_decoder=False) that also have an LM-head decoder variant
    # (BertLMHeadModel ...) are tested with their masked-LM head
    masked = auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES.get(model_type)
    if source == "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES" and masked and "is_decoder" in config.to_diff_dict() \
            and not config.is_decoder:
        name, source = masked, "MODEL_FOR_MASKED_LM_MAPPING_NAMES"
    if name is not None:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls, source
    cls = _class_from_config_module(config)
    return cls, ("config module" if cls else "")


B = 2
SEQ = 24
PAD = 6
DEC_SEQ = 12


def _forward_parameters(module: Any) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(module.forward).parameters)


def _special_ids(config: Any) -> set[int]:
    ids: set[int] = set()
    _token_ids(config.to_dict(), ids)
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


# ---------------------------------------------------------------------------
# One model type (runs in a worker)
# ---------------------------------------------------------------------------


def _error_info(exc: BaseException) -> dict[str, Any]:
    root = exc
    seen = set()
    while root.__cause__ is not None and id(root) not in seen:
        seen.add(id(root))
        root = root.__cause__
    message = str(root).strip().splitlines()[0] if str(root).strip() else ""
    outer = str(exc).strip().splitlines()
    failing_module = next((x.split(":", 1)[1].strip() for x in outer if "failing module:" in x), "")
    failing_line = next((x.split(":", 1)[1].strip() for x in outer if "failing line:" in x), "")
    frames = traceback.extract_tb(root.__traceback__)[-6:]
    return {
        "type": type(root).__name__,
        "message": message[:500],
        "wrapper": type(exc).__name__ if root is not exc else "",
        "failing_module": failing_module[-300:],
        "failing_line": failing_line[:300],
        "where": [f"{_short_path(f.filename)}:{f.lineno} {f.name}" for f in frames],
    }


def _is_tensorish(value: Any) -> bool:
    return hasattr(value, "shape") and hasattr(value, "dtype") and len(getattr(value, "shape", ())) > 0


def _children(value: Any) -> list[tuple[str, Any]]:
    if hasattr(value, "keys") and hasattr(value, "__getitem__"):
        return [(str(k), value[k]) for k in value.keys()]
    if isinstance(value, (list, tuple)):
        return [(str(i), v) for i, v in enumerate(value)]
    return []


def _first_tensor(value: Any, path: str = "") -> tuple[str, Any] | None:
    if _is_tensorish(value):
        return path or "output", value
    for key, child in _children(value):
        found = _first_tensor(child, f"{path}.{key}" if path else key)
        if found:
            return found
    return None


def _short_path(filename: str) -> str:
    parts = Path(filename).parts
    for anchor in ("site-packages", "src"):
        if anchor in parts:
            return "/".join(parts[parts.index(anchor) + 1:])
    return "/".join(parts[-2:])


def _main_output(output: Any) -> tuple[str, Any]:
    """(path, tensor): logits, else last_hidden_state, else the first tensor."""
    keys = list(output.keys()) if hasattr(output, "keys") else []
    for key in ("logits", "last_hidden_state", "prediction_logits", "audio_values"):
        if key in keys and output[key] is not None:
            found = _first_tensor(output[key], key)
            if found:
                return found
    found = _first_tensor(output)
    if found is None:
        raise TypeError(f"no tensor output in {type(output).__name__}")
    return found


def _pick(output: Any, path: str) -> Any:
    if path == "output":
        return output
    value = output
    for part in path.split("."):
        if hasattr(value, "keys") and part in value.keys():
            value = value[part]
        elif isinstance(value, (list, tuple)) and part.isdigit():
            value = value[int(part)]
        else:
            raise KeyError(f"ttpu output lacks {path!r}")
    return value


def _relative_error(reference: Any, actual: Any, mask: Any) -> float:
    import numpy as np

    ref = np.asarray(reference.detach().float().numpy() if hasattr(reference, "detach") else reference,
                     dtype=np.float64)
    act = np.asarray(actual, dtype=np.float64)
    if ref.shape != act.shape:
        raise ValueError(f"shape mismatch: torch {ref.shape} vs ttpu {act.shape}")
    if mask is not None and ref.ndim >= 2 and ref.shape[:2] == mask.shape:
        keep = mask.astype(bool)
        ref, act = ref[keep], act[keep]
    finite = np.isfinite(ref)
    if (np.isfinite(act) != finite).any():
        return float("nan")  # non-finite values where torch has finite ones (or vice versa)
    ref, act = ref[finite], act[finite]
    denom = np.linalg.norm(ref)
    diff = np.linalg.norm(act - ref)
    if denom == 0:
        return float(diff)
    return float(diff / denom)


def config_for_class(cls: type, config: Any) -> Any:
    """The (sub-)config ``cls`` expects: composite configs hold it as text_config etc."""
    expected = getattr(cls, "config_class", None)
    if not isinstance(expected, type) or isinstance(config, expected):
        return config
    for value in vars(config).values():
        if isinstance(value, expected):
            return value
    return config


def _count_params_meta(cls: type, config: Any) -> int:
    import torch

    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = cls(config)
    return sum(p.numel() for p in model.parameters())


def _build(cls: type, config: Any) -> Any:
    import torch

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = cls(config)
    model = model.float().eval()
    _randomize_constant_matrices(model)
    return model


def _randomize_constant_matrices(model: Any) -> None:
    """Weight matrices initialised to a constant (zero-init MoE routers, gates) get small
    random values: with random weights elsewhere, a constant router makes every expert
    score tie, and torch and XLA break top-k ties differently."""
    import torch

    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim >= 2 and param.numel() > 1 and param.is_floating_point():
                flat = param.detach().reshape(-1)
                if bool((flat == flat[0]).all()):
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.02)


def _to_torch(inputs: dict[str, Any]) -> dict[str, Any]:
    import numpy as np
    import torch

    return {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in inputs.items()}


def _is_causal(cls: type, source: str) -> bool:
    return "CAUSAL_LM" in source or cls.__name__.endswith(("ForCausalLM", "LMHeadModel"))


def run_one(model_type: str) -> dict[str, Any]:
    """Build, run eagerly, run through ttpu and compare one model type."""
    import torch

    result: dict[str, Any] = {
        "model_type": model_type, "class": "", "config": "", "inputs": "", "eager": False,
        "compiles": False, "matches": False, "rel_err": None, "output": "", "stage": "",
        "error": None, "not_attempted": "", "times": {}, "params": None,
    }
    torch.set_grad_enabled(False)
    t0 = time.time()
    attempts: list[tuple[str, Any]] = []
    errors = []
    for aggressive in (True, False):
        try:
            attempts.append(("tiny" if aggressive else "tiny (widths kept)", tiny_config(model_type, aggressive)))
        except Exception as exc:  # noqa: BLE001
            errors.append(("config", exc))
    if not attempts:
        result.update(stage="config", error=_error_info(errors[0][1]),
                      not_attempted="tiny config could not be built")
        return result
    cls, source = resolve_class(model_type, attempts[0][1])
    if cls is None:
        result.update(stage="class", not_attempted="no model class in transformers' auto mappings")
        return result
    result["class"] = cls.__name__
    causal = _is_causal(cls, source)
    first_failure: tuple[str, BaseException] | None = None
    chosen = None
    log = result["attempts"] = [f"config {type(e).__name__}: {str(e)[:200]}" for _, e in errors]
    for label, config in attempts:
        config = config_for_class(cls, config)
        try:
            n = _count_params_meta(cls, config)
            if n > MAX_PARAMS:
                raise ValueError(f"tiny config still has {n:,} parameters")
            model = _build(cls, config)
        except Exception as exc:  # noqa: BLE001
            first_failure = first_failure or ("build", exc)
            log.append(f"{label} build {type(exc).__name__}: {str(exc)[:200]}")
            continue
        candidates, reason = input_candidates(model, config, causal)
        if not candidates:
            result.update(config=label, stage="inputs", not_attempted=reason, params=n)
            return result
        for cand in candidates:
            try:
                with torch.no_grad():
                    ref = model(**_to_torch(copy.deepcopy(cand.inputs)))
                key, ref_main = _main_output(ref)
                if not isinstance(ref_main, torch.Tensor):
                    raise TypeError(f"main output {key!r} is {type(ref_main).__name__}")
            except Exception as exc:  # noqa: BLE001
                first_failure = first_failure or ("eager", exc)
                log.append(f"{label} {cand.kind} eager {type(exc).__name__}: {str(exc)[:200]}")
                continue
            chosen = (label, config, model, cand, key, ref_main, n)
            break
        if chosen:
            break
    result["times"]["eager"] = round(time.time() - t0, 2)
    if chosen is None:
        stage, exc = first_failure or ("eager", RuntimeError("no attempt"))
        result.update(stage=stage, error=_error_info(exc))
        return result
    label, config, model, cand, key, ref_main, n = chosen
    result.update(config=label, inputs=cand.kind, eager=True, output=key, params=n,
                  input_shapes={k: list(v.shape) for k, v in cand.inputs.items() if hasattr(v, "shape")})
    if os.environ.get("TTPU_COVERAGE_EAGER_ONLY"):
        return result
    # ttpu
    t1 = time.time()
    try:
        from ttpu.auto import AutoModelForTPU

        try:
            clone = copy.deepcopy(model)
        except Exception:  # noqa: BLE001
            clone = _build(cls, config)
            clone.load_state_dict(model.state_dict())
        tpu = AutoModelForTPU.from_model(clone)
        out = tpu(**copy.deepcopy(cand.inputs))
        actual = _pick(out, key)
        import jax

        actual = jax.device_get(actual)
    except Exception as exc:  # noqa: BLE001
        result["times"]["ttpu"] = round(time.time() - t1, 2)
        result.update(stage="ttpu", error=_error_info(exc))
        return result
    result["times"]["ttpu"] = round(time.time() - t1, 2)
    result["compiles"] = True
    try:
        err = _relative_error(ref_main, actual, cand.mask)
    except Exception as exc:  # noqa: BLE001
        result.update(stage="compare", error=_error_info(exc))
        return result
    result["rel_err"] = err
    result["matches"] = bool(err <= RTOL)
    if not result["matches"]:
        result["stage"] = "compare"
    return result


# ---------------------------------------------------------------------------
# Failure causes
# ---------------------------------------------------------------------------

# (label, pattern on "Type: message"): the first match names the cause.
_CAUSES: list[tuple[str, re.Pattern]] = [
    ("op without lowering: {0}", re.compile(r"Operator with name ([\w:.]+) has no lowering")),
    ("op without lowering: {0}", re.compile(
        r"(aten::[\w.]+|aten\.[\w.]+)[^\n]*(?:not (?:implemented|supported|lowered)|no lowering)")),
    ("data-dependent shape/value under jit (.item/.tolist/nonzero/boolean indexing)", re.compile(
        r"ConcretizationTypeError|TracerBoolConversionError|TracerIntegerConversionError|"
        r"TracerArrayConversionError|NonConcreteBooleanIndexError|Abstract tracer value|"
        r"data-dependent|DynamicShape")),
    ("jax array used as an index (tensor index not converted)", re.compile(
        r"IndexError: only integers, slices .* are valid indices")),
    ("mixed torch CPU tensor with jax tensor", re.compile(
        r"Expected all tensors to be on the same device|found at least two devices|"
        r"expected .*(jax|torchax).*(cpu|CPU)|(cpu|CPU).*(jax|torchax)|is not a torchax|"
        r"unsupported operand type\(s\).*'(Tensor|View)'|"
        r"AssertionError: <class 'torch\.(nn\.parameter\.Parameter|Tensor)'>|"
        r"'Tensor' object has no attribute '_(env|elem)'")),
    ("ttpu input validation rejects the input ({0})", re.compile(
        r"InvalidArgumentError: input '(\w+)' must be")),
    ("torchax View object lacks a Tensor attribute", re.compile(r"'View' object has no attribute")),
    ("module property assigned during functional_call", re.compile(r"property '\w+' of '\w+' object has no setter")),
]
# frames inside torchax: failures raised by a lowering itself
_TORCHAX_FRAME = re.compile(r"^torchax/")


def classify(result: dict[str, Any]) -> str:
    """A short failure cause for a result ("" when it matches)."""
    if result.get("not_attempted"):
        return f"not attempted: {result['not_attempted']}"
    if result.get("matches"):
        return ""
    error = result.get("error") or {}
    text = f"{error.get('type', '')}: {error.get('message', '')}"
    stage = result.get("stage")
    missing_lib = re.search(r"requires the (\w+) library", error.get("message", ""))
    if missing_lib:
        return f"not attempted: needs {missing_lib.group(1)} (not installed)"
    if stage in ("config", "build", "eager", "class", "inputs"):
        return f"eager failed ({stage})"
    if stage == "timeout":
        return "timeout"
    if stage in ("crash", "harness"):
        return "worker crashed"
    if stage == "compare" and not error:
        err = result.get("rel_err")
        if err is None or not math.isfinite(err):
            return "non-finite output (NaN/inf where torch is finite)"
        return "numerical mismatch"
    if stage == "compare":
        return f"output structure differs: {error.get('type', '')}"
    for label, pattern in _CAUSES:
        m = pattern.search(text)
        if m:
            return label.format(*(g for g in m.groups() if g))
    where = error.get("where") or []
    if where and _TORCHAX_FRAME.search(where[-1]):
        func = where[-1].rsplit(" ", 1)[-1]
        return f"torchax lowering error in {func}: {error.get('type', '')}"
    return f"other: {error.get('type', '')}"


# ---------------------------------------------------------------------------
# Sweep
# ---------------------------------------------------------------------------


def all_model_types() -> list[str]:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return sorted(CONFIG_MAPPING_NAMES)


def select_model_types(selection: str | Sequence[str] | None, sample: int | None = None,
                       seed: int = 0) -> list[str]:
    """All model types, or those matching a regex / in a list, optionally sampled."""
    types = all_model_types()
    if selection:
        if isinstance(selection, str):
            pattern = re.compile(selection)
            types = [t for t in types if pattern.search(t)]
        else:
            wanted = set(selection)
            types = [t for t in types if t in wanted]
    if sample and sample < len(types):
        types = sorted(random.Random(seed).sample(types, sample))
    return types


def _worker_main(conn: Any) -> None:
    warnings.simplefilter("ignore")
    import logging

    logging.disable(logging.WARNING)
    try:
        import torch

        torch.set_num_threads(1)
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except Exception:  # noqa: BLE001
        pass
    while True:
        try:
            task = conn.recv()
        except EOFError:
            return
        if task is None:
            return
        try:
            result = run_one(task)
        except BaseException as exc:  # noqa: BLE001
            result = {"model_type": task, "stage": "harness", "error": _error_info(exc),
                      "eager": False, "compiles": False, "matches": False}
        conn.send(result)


@dataclass
class _Worker:
    process: Any
    conn: Any
    task: str | None = None
    started: float = 0.0
    done: int = 0


def _worker_env() -> None:
    os.environ.setdefault("TTPU_COMPILE_CACHE", "off")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")


def _spawn(ctx: Any) -> _Worker:
    parent, child = ctx.Pipe()
    process = ctx.Process(target=_worker_main, args=(child,), daemon=True)
    process.start()
    child.close()
    return _Worker(process, parent)


def _stop(worker: _Worker, kill: bool = False) -> None:
    if kill:
        worker.process.kill()
    else:
        try:
            worker.conn.send(None)
        except Exception:  # noqa: BLE001
            worker.process.kill()
    worker.process.join(5)
    if worker.process.is_alive():
        worker.process.kill()
        worker.process.join(5)
    worker.conn.close()


def sweep(model_types: Sequence[str], workers: int = 2, timeout: float = DEFAULT_TIMEOUT,
          progress: bool = True, on_result: Any = None) -> list[dict[str, Any]]:
    """Run ``run_one`` for each model type in worker subprocesses."""
    _worker_env()
    ctx = multiprocessing.get_context("spawn")
    pending = list(model_types)
    results: list[dict[str, Any]] = []
    pool: list[_Worker] = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(pending), desc="coverage", unit="model", dynamic_ncols=True)
    counts: Counter = Counter()

    def finish(result: dict[str, Any]) -> None:
        results.append(result)
        counts["match"] += bool(result.get("matches"))
        counts["eager"] += bool(result.get("eager"))
        if on_result:
            on_result(result)
        if bar:
            bar.set_postfix(match=counts["match"], eager=counts["eager"], last=result["model_type"])
            bar.update(1)

    try:
        while pending or any(w.task for w in pool):
            while len(pool) < min(workers, len(pending) + sum(1 for w in pool if w.task)):
                pool.append(_spawn(ctx))
            for w in pool:
                if w.task is None and pending:
                    w.task, w.started = pending.pop(0), time.time()
                    w.conn.send(w.task)
            busy = [w for w in pool if w.task]
            if not busy:
                break
            ready = wait_connections([w.conn for w in busy], timeout=1.0)
            now = time.time()
            for w in list(busy):
                result = None
                if w.conn in ready:
                    try:
                        result = w.conn.recv()
                    except (EOFError, OSError):
                        result = None
                    if result is not None:
                        result.setdefault("times", {})["total"] = round(now - w.started, 2)
                        finish(result)
                        w.task, w.done = None, w.done + 1
                        if w.done >= TASKS_PER_WORKER:
                            _stop(w)
                            pool.remove(w)
                        continue
                if (result is None and w.conn in ready) or not w.process.is_alive():
                    finish({"model_type": w.task, "stage": "crash", "eager": False, "compiles": False,
                            "matches": False, "error": {"type": "WorkerCrash",
                                                        "message": f"exit code {w.process.exitcode}"}})
                    _stop(w, kill=True)
                    pool.remove(w)
                elif now - w.started > timeout:
                    finish({"model_type": w.task, "stage": "timeout", "eager": None, "compiles": False,
                            "matches": False, "error": {"type": "Timeout",
                                                        "message": f"no result within {timeout:.0f} s"}})
                    _stop(w, kill=True)
                    pool.remove(w)
    finally:
        for w in pool:
            _stop(w, kill=w.task is not None)
        if bar:
            bar.close()
    order = {t: i for i, t in enumerate(model_types)}
    results.sort(key=lambda r: order.get(r["model_type"], 0))
    return results


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    import ttpu

    out = {"python": platform.python_version(), "ttpu": ttpu.__version__ + _revision()}
    for name in ("transformers", "torch", "jax", "jaxlib", "torchax"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _revision() -> str:
    """" (git abc1234)" for a source checkout, or $TTPU_COVERAGE_REVISION."""
    rev = os.environ.get("TTPU_COVERAGE_REVISION")
    if not rev:
        import subprocess

        try:
            rev = subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                capture_output=True, text=True, timeout=10, check=True,
            ).stdout.strip()
        except Exception:  # noqa: BLE001
            rev = ""
    return f" (git {rev})" if rev else ""


def _fmt_err(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return f"{value:.1e}"


def _mark(value: Any) -> str:
    return {True: "yes", False: "no", None: "?"}.get(value, str(value))


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    eager = [r for r in results if r.get("eager")]
    matches = [r for r in eager if r.get("matches")]
    compiles = [r for r in eager if r.get("compiles")]
    causes = Counter(classify(r) for r in results if classify(r))
    return {
        "model_types": len(results),
        "eager": len(eager),
        "compiles": len(compiles),
        "matches": len(matches),
        "headline": (100.0 * len(matches) / len(eager)) if eager else 0.0,
        "causes": dict(causes.most_common()),
    }


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def write_markdown(results: list[dict[str, Any]], path: str | Path, command: str,
                   elapsed: float | None = None) -> None:
    summary = summarize(results)
    versions = _versions()
    lines = [
        "# ttpu model coverage",
        "",
        f"**{summary['matches']} / {summary['eager']} = {summary['headline']:.1f}%** of the model "
        "types whose eager torch forward runs also match under ttpu "
        f"(relative error <= {RTOL:g} on the main output, non-padded positions).",
        "",
        f"- date: {datetime.date.today().isoformat()}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
        f"- command: `{command}`",
        f"- model types swept: {summary['model_types']}; eager runs: {summary['eager']}; "
        f"ttpu compiles: {summary['compiles']}; matches: {summary['matches']}"
        + (f"; sweep time: {elapsed / 60:.0f} min" if elapsed else ""),
        "",
        "Models are random-weight tiny configs derived generically from each config class's "
        "defaults (`ttpu.coverage.tiny_config`), built with `torch.manual_seed(0)` in float32 "
        "eval mode; text inputs are a batch of 2 x 24 tokens with 6 padded positions in one row "
        "(left padding for causal LMs, right padding otherwise), compared with `use_cache=False`. "
        "\"text-only (multimodal)\" means a multimodal model run on its text inputs alone.",
        "",
        "## Failure causes",
        "",
        "| cause | count | examples |",
        "|---|---:|---|",
    ]
    by_cause: dict[str, list[str]] = {}
    for r in results:
        c = classify(r)
        if c:
            by_cause.setdefault(c, []).append(r["model_type"])
    for cause, count in summary["causes"].items():
        examples = ", ".join(by_cause[cause][:4])
        lines.append(f"| {_cell(cause)} | {count} | {_cell(examples)} |")
    lines += [
        "",
        "## Results",
        "",
        "| model_type | class | inputs | eager | compiles | matches | rel err | cause |",
        "|---|---|---|---|---|---|---:|---|",
    ]
    for r in results:
        cause = classify(r)
        error = r.get("error") or {}
        if cause and error.get("message") and not r.get("not_attempted"):
            cause = f"{cause} — {error.get('type', '')}: {error['message'][:120]}"
            if error.get("failing_line"):
                cause += f" (at {error['failing_line'].split(': ', 1)[0]})"
        lines.append(
            f"| {r['model_type']} | {r.get('class', '')} | {r.get('inputs', '')} | "
            f"{_mark(r.get('eager'))} | {_mark(r.get('compiles'))} | {_mark(r.get('matches'))} | "
            f"{_fmt_err(r.get('rel_err'))} | {_cell(cause)} |"
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def write_json(results: list[dict[str, Any]], path: str | Path, command: str = "") -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "versions": _versions(),
        "command": command,
        "rtol": RTOL,
        "summary": summarize(results),
        "results": [{**r, "cause": classify(r)} for r in results],
    }
    path.write_text(json.dumps(payload, indent=1, default=str))


def run_coverage(
    model_types: str | Sequence[str] | None = None,
    workers: int = 2,
    timeout: float = DEFAULT_TIMEOUT,
    out_md: str | Path | None = DEFAULT_OUT_MD,
    out_json: str | Path | None = DEFAULT_OUT_JSON,
    *,
    sample: int | None = None,
    resume: bool = False,
    progress: bool = True,
    command: str | None = None,
) -> dict[str, Any]:
    """Sweep model types (all, a regex, or a list); write the markdown and JSON reports.

    ``resume`` reuses results already in ``out_json`` and sweeps only the rest.
    Returns the summary (headline percentage, counts, failure causes).
    """
    types = select_model_types(model_types, sample)
    command = command or "python -m ttpu.coverage " + " ".join(sys.argv[1:])
    previous: dict[str, dict] = {}
    if resume and out_json and Path(out_json).exists():
        for r in json.loads(Path(out_json).read_text()).get("results", []):
            r.pop("cause", None)
            previous[r["model_type"]] = r
    todo = [t for t in types if t not in previous]
    done = [previous[t] for t in types if t in previous]
    start = time.time()

    def checkpoint(result: dict[str, Any]) -> None:
        done.append(result)
        if out_json and len(done) % 10 == 0:
            write_json(done, out_json, command)

    sweep(todo, workers=workers, timeout=timeout, progress=progress, on_result=checkpoint)
    order = {t: i for i, t in enumerate(types)}
    done.sort(key=lambda r: order[r["model_type"]])
    elapsed = time.time() - start
    if out_json:
        write_json(done, out_json, command)
    if out_md:
        write_markdown(done, out_md, command, elapsed)
    return summarize(done)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ttpu coverage",
        description="Run every transformers model type (tiny random weights) through ttpu.",
    )
    parser.add_argument("--filter", help="regex on model_type (e.g. '^(llama|bert)$')")
    parser.add_argument("--types", help="comma-separated model types")
    parser.add_argument("--sample", type=int, help="sweep a random sample of this many types")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds per model type")
    parser.add_argument("--out-md", default=DEFAULT_OUT_MD)
    parser.add_argument("--out-json", default=DEFAULT_OUT_JSON)
    parser.add_argument("--resume", action="store_true", help="reuse results already in --out-json")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--eager-only", action="store_true", help="skip ttpu (debug tiny configs)")
    parser.add_argument("--one", help="run a single model type in this process and print the result")
    args = parser.parse_args(argv)
    if args.eager_only:
        os.environ["TTPU_COVERAGE_EAGER_ONLY"] = "1"
    if args.one:
        _worker_env()
        print(json.dumps({**run_one(args.one)}, indent=1, default=str))
        return 0
    selection: str | list[str] | None = args.filter
    if args.types:
        selection = [t.strip() for t in args.types.split(",") if t.strip()]
    command = "ttpu coverage " + " ".join(argv if argv is not None else sys.argv[1:])
    summary = run_coverage(
        selection, workers=args.workers, timeout=args.timeout, out_md=args.out_md,
        out_json=args.out_json, sample=args.sample, resume=args.resume,
        progress=not args.no_progress, command=command.strip(),
    )
    print(f"{summary['matches']}/{summary['eager']} match ({summary['headline']:.1f}%)")
    for cause, count in summary["causes"].items():
        print(f"{count:5d}  {cause}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
