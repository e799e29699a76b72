"""ModelOutput and transformers 5.x cache classes are pytrees for jax and torch."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import torch
import torch.utils._pytree as torch_pytree
from transformers import DynamicCache, EncoderDecoderCache, LlamaConfig, StaticCache
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.modeling_outputs import CausalLMOutputWithPast

from ttpu.backends.jax import pytrees

CONFIG = LlamaConfig(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    sliding_window=4, layer_types=["sliding_attention", "full_attention"],
)


def filled(cache: Cache) -> Cache:
    for layer_idx in range(2):
        kv = torch.randn(1, 2, 3, 8)
        cache.update(kv, kv, layer_idx)
    return cache


def test_every_cache_and_layer_class_is_registered() -> None:
    pytrees.register_transformers_pytrees()
    classes = pytrees._all_subclasses(Cache) | pytrees._all_subclasses(CacheLayerMixin)
    assert classes <= pytrees._JAX_REGISTERED
    assert all(cls in torch_pytree.SUPPORTED_NODES for cls in classes)


def test_classes_defined_later_are_registered_on_the_next_call() -> None:
    class LateLayer(CacheLayerMixin):
        pass

    pytrees.register_transformers_pytrees()
    assert LateLayer in pytrees._JAX_REGISTERED


def roundtrip(cache: Cache) -> None:
    pytrees.register_transformers_pytrees()
    leaves, treedef = jax.tree.flatten(cache)
    assert leaves and all(isinstance(x, torch.Tensor) for x in leaves)
    rebuilt = jax.tree.unflatten(treedef, [jnp.asarray(x.numpy()) for x in leaves])
    assert type(rebuilt) is type(cache)
    assert set(vars(rebuilt)) == set(vars(cache))
    assert jax.tree.structure(rebuilt) == treedef
    torch_leaves, spec = torch_pytree.tree_flatten(cache)
    assert len(torch_leaves) == len(leaves)
    assert type(torch_pytree.tree_unflatten(torch_leaves, spec)) is type(cache)


def test_dynamic_cache_with_sliding_layers_roundtrips() -> None:
    roundtrip(filled(DynamicCache(config=CONFIG)))


def test_static_cache_with_sliding_layers_roundtrips() -> None:
    cache = filled(StaticCache(config=CONFIG, max_cache_len=8))
    assert {type(layer).__name__ for layer in cache.layers} == {"StaticSlidingWindowLayer", "StaticLayer"}
    roundtrip(cache)


def test_encoder_decoder_cache_roundtrips() -> None:
    roundtrip(EncoderDecoderCache(filled(DynamicCache()), filled(DynamicCache())))


def test_model_output_roundtrips_and_keeps_none_fields_absent() -> None:
    pytrees.register_transformers_pytrees()
    out = CausalLMOutputWithPast(logits=jnp.ones((1, 2, 3)))
    doubled = jax.tree.map(lambda x: x * 2, out)
    assert type(doubled) is CausalLMOutputWithPast
    assert list(doubled.keys()) == ["logits"] and doubled.loss is None
    assert float(doubled.logits.sum()) == 12.0
