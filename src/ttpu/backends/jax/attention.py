"""The "ttpu" attention implementation: attention computed in JAX.

Registered with transformers through its official seams: ``AttentionInterface`` for the
attention itself and ``AttentionMaskInterface`` for the mask. Both are needed: a custom
attention registered without a mask function receives ``attention_mask=None`` and would
silently lose causal and padding masking.

The mask function always materialises a boolean mask (no "is_causal" shortcut), so the
mask carries causality, padding, sliding windows and chunking, exactly as transformers
builds them for the model. The kernel handles GQA/MQA without repeating KV heads, logit
soft-capping, attention sinks and additive float masks from older modeling code.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface

from ttpu.backends.attention_masks import mask_for_groups, materialised_mask, restricted_to_indices
from ttpu.backends.jax.environment import to_traced, tracing_environment
from ttpu.backends.jax.torchax_compat import import_torchax

ATTENTION_NAME = "ttpu"

torchax = import_torchax()


def dot_product_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    mask: jax.Array | None,
    *,
    scale: float,
    softcap: float | None = None,
    sinks: jax.Array | None = None,
    dropout: tuple[float, jax.Array] | None = None,
) -> jax.Array:
    """Attention over [batch, heads, seq, dim] inputs; returns [batch, q_seq, heads, dim].

    ``key``/``value`` may have fewer heads than ``query`` (GQA/MQA). ``mask`` is boolean
    (True = attend) or additive, broadcastable to [batch, q_heads, q_seq, kv_seq].
    Scores and softmax are computed in float32. ``dropout``: (rate, PRNG key) drops
    attention probabilities as ``torch.nn.functional.dropout`` does (scaled by 1/(1-rate)).
    """
    batch, q_heads, q_len, _ = query.shape
    kv_heads = key.shape[1]
    groups = q_heads // kv_heads
    q = query.reshape(batch, kv_heads, groups, q_len, query.shape[-1])
    # Scores as [batch, kv_heads, kv_seq, groups, q_seq]: keys are the left operand, so
    # XLA reads the (cached) keys in place instead of transposing them on every call.
    scores = jax.lax.dot_general(
        key, q, (((3,), (4,)), ((0, 1), (0, 1))), preferred_element_type=jnp.float32
    )
    scores = scores * scale
    if softcap is not None:
        scores = jnp.tanh(scores / softcap) * softcap
    if mask is not None:
        mask = jnp.moveaxis(mask_for_groups(mask, kv_heads), -1, 2)
        if mask.dtype == jnp.bool_:
            scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
        else:
            # Clamped, so a row masked everywhere (padding) stays finite instead of NaN,
            # which would leak into real positions through 0 * NaN in later layers.
            scores = jnp.maximum(scores + mask.astype(jnp.float32), jnp.finfo(jnp.float32).min)
    if sinks is not None:
        sink_logits = sinks.astype(jnp.float32).reshape(1, kv_heads, 1, groups, 1)
        sink_logits = jnp.broadcast_to(sink_logits, (*scores.shape[:2], 1, *scores.shape[3:]))
        probs = jax.nn.softmax(jnp.concatenate([scores, sink_logits], axis=2), axis=2)
        probs = probs[:, :, :-1]
    else:
        probs = jax.nn.softmax(scores, axis=2)
    if dropout is not None:
        rate, dropout_key = dropout
        kept = jax.random.bernoulli(dropout_key, 1.0 - rate, probs.shape)
        probs = jnp.where(kept, probs / (1.0 - rate), 0.0)
    out = jax.lax.dot_general(
        probs.astype(value.dtype), value, (((2,), (2,)), ((0, 1), (0, 1)))
    )  # [batch, kv_heads, groups, q_seq, dim]
    return jnp.moveaxis(out, 3, 1).reshape(batch, q_len, q_heads, value.shape[-1])


def scaled_dot_product_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    attn_mask: jax.Array | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> jax.Array:
    """``torch.nn.functional.scaled_dot_product_attention`` on ttpu's kernel.

    Inputs are [..., heads, seq, dim] as in torch; returns [..., heads, q_seq, dim].
    """
    if dropout_p:
        raise NotImplementedError("scaled_dot_product_attention with dropout is not supported")
    lead = query.shape[:-3]
    q, k, v = (x.reshape(-1, *x.shape[-3:]) for x in (query, key, value))
    mask = attn_mask
    if is_causal:
        if mask is not None:
            raise ValueError("scaled_dot_product_attention: attn_mask with is_causal=True")
        mask = jnp.tril(jnp.ones((q.shape[-2], k.shape[-2]), jnp.bool_))
    if mask is not None and mask.ndim > 4:
        mask = mask.reshape(-1, *mask.shape[-3:])
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    out = dot_product_attention(q, k, v, mask, scale=scale)  # [b, q_seq, heads, dim]
    return jnp.swapaxes(out, 1, 2).reshape(*lead, *query.shape[-3:-1], value.shape[-1])


def ttpu_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    softcap: float | None = None,
    s_aux: torch.Tensor | None = None,
    indices: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function (see ``AttentionInterface``) computed in JAX.

    ``indices`` ([batch, q_seq, k], sparse attention as in DeepSeek's DSA) restricts each
    query to those key positions.
    """
    if not isinstance(query, torchax.tensor.Tensor):
        # Plain torch tensors: the module is being run eagerly outside ttpu.
        if softcap is not None or s_aux is not None or indices is not None:
            raise NotImplementedError(
                "ttpu attention on plain torch tensors supports no softcap, sinks or indices; "
                "run the model through ttpu or set attn_implementation='eager'."
            )
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    # the key comes from the environment, which a train step seeds per step
    drop = (dropout, tracing_environment().get_and_rotate_prng_key()) if dropout and module.training else None
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    view = torchax.interop.jax_view
    if indices is not None:
        attention_mask = restricted_to_indices(attention_mask, indices, key.shape[2])
    mask = None if attention_mask is None else view(attention_mask)
    out = dot_product_attention(
        view(query),
        view(key),
        view(value),
        mask,
        scale=scale,
        softcap=softcap,
        sinks=None if s_aux is None else view(s_aux),
        dropout=drop,
    )
    return to_traced(out), None


def register_attention() -> None:
    """Register the "ttpu" attention and mask implementations with transformers."""
    AttentionInterface.register(ATTENTION_NAME, ttpu_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, materialised_mask)
