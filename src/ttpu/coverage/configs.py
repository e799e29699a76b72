"""Tiny random-weight configs derived generically from each config class's defaults, and
the model class the sweep builds for a model type."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import math
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any


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
# A sparse-attention indexer sums ReLU scores over its heads: with 4, random weights leave
# many positions' scores at exactly 0, ties that torch's and XLA's top-k break differently.
INDEXER_HEADS = 16

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
    (re.compile(r"^index_n_heads$"), INDEXER_HEADS),
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
TINY_CONFIG_OVERRIDES: dict[str, dict[str, Any]] = {
    # its indexer's 16 heads x 128 equal its hidden size, which the shrink keeps equal (4 x 16): see INDEXER_HEADS
    "axk2": {"index_n_heads": INDEXER_HEADS},
}


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


def collect_token_ids(d: Any, out: set[int]) -> None:
    if isinstance(d, dict):
        for key, value in d.items():
            if _is_config_dict(value) or isinstance(value, dict):
                collect_token_ids(value, out)
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
    collect_token_ids(d, ids)
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


