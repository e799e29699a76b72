"""Gemma 3 270M (offline weights) quantized to int8 and int4 against float32, measured in
one run: device-resident parameter bytes, accuracy on local prose (mean KL divergence of
the next-token distributions, top-1 agreement, perplexity ratio) and decode speed.

The offline Gemma comes from a Q4_K_M GGUF, so two kinds of rows: loaded by
``from_pretrained`` (which keeps the GGUF blocks that map exactly onto the scheme; "gguf"
keeps all of them), and "RTN": the float32 model quantized by round-to-nearest through
``from_model``, as any model without a GGUF would be.

    python benchmarks/quantization.py [--tokens 2048] [--chunk 256]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import time

import jax
import jax.numpy as jnp
import numpy as np
import transformers

from ttpu import AutoModelForTPU, QuantizationConfig
from ttpu.models import resolve

MODEL = "gemma-3-270m"


def device_bytes(model) -> int:
    """Bytes of the placed parameter arrays, summed over their device shards."""
    return sum(s.data.nbytes for a in model.compiled_forward.params.values() for s in a.addressable_shards)


def log_probs(model, ids: np.ndarray) -> jax.Array:
    logits = model(input_ids=ids).logits
    return jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)[0, :-1]


def accuracy(reference, model, chunks: list[np.ndarray]) -> dict[str, float]:
    kl, agree, nll_ref, nll, count = 0.0, 0, 0.0, 0.0, 0
    for ids in chunks:
        p, q = log_probs(reference, ids), log_probs(model, ids)
        targets = jnp.asarray(ids[0, 1:])
        kl += float(jnp.sum(jnp.exp(p) * (p - q)))
        agree += int(jnp.sum(jnp.argmax(p, -1) == jnp.argmax(q, -1)))
        nll_ref -= float(jnp.sum(jnp.take_along_axis(p, targets[:, None], -1)))
        nll -= float(jnp.sum(jnp.take_along_axis(q, targets[:, None], -1)))
        count += ids.shape[1] - 1
    return {"kl": kl / count, "top1": agree / count, "ppl_ratio": float(np.exp((nll - nll_ref) / count)),
            "ppl": float(np.exp(nll / count))}


def decode_speed(model, prompt: np.ndarray, tokens: int) -> float:
    model.generate(input_ids=prompt, max_new_tokens=tokens)  # compile
    start = time.perf_counter()
    model.generate(input_ids=prompt, max_new_tokens=tokens)
    return tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=2048, help="tokens of prose to score")
    parser.add_argument("--chunk", type=int, default=256, help="tokens per scored sequence")
    parser.add_argument("--decode", type=int, default=32, help="tokens to decode for the speed figure")
    args = parser.parse_args()

    loaded = {"float32": None, "int8": "int8", "gguf": "gguf", "int4": "int4"}
    rounded = {"int8 RTN": QuantizationConfig("int8"), "int8 g32 RTN": QuantizationConfig("int8", 32),
               "int4 g128 RTN": QuantizationConfig("int4", 128), "int4 g32 RTN": QuantizationConfig("int4", 32)}
    models = {name: AutoModelForTPU.from_pretrained(MODEL, quantization=q) for name, q in loaded.items()}
    tokenizer = models["float32"].tokenizer
    for name, config in rounded.items():
        module = transformers.AutoModelForCausalLM.from_pretrained(resolve(MODEL), dtype="float32")
        models[name] = AutoModelForTPU.from_model(module, quantization=config, tokenizer=tokenizer)
    text = importlib.metadata.metadata("transformers").get_payload()  # local prose: its long description
    ids = tokenizer(text)["input_ids"][: args.tokens]
    if len(ids) < args.tokens:
        raise SystemExit(f"only {len(ids)} tokens of prose; lower --tokens")
    chunks = [np.array([ids[i:i + args.chunk]]) for i in range(0, len(ids) - args.chunk + 1, args.chunk)]
    prompt = np.array([ids[:16]])
    base_bytes = device_bytes(models["float32"])
    base_speed = decode_speed(models["float32"], prompt, args.decode)
    print(f"{len(chunks) * args.chunk} tokens of prose in {len(chunks)} sequences of {args.chunk}; "
          f"jax {jax.__version__} on {jax.default_backend()}")
    print(f"{'scheme':<13} {'MiB':>8} {'x f32':>6} {'mean KL':>9} {'top-1':>7} {'PPL':>8} {'PPL x':>7} "
          f"{'tok/s':>7} {'x f32':>6}")
    for name, model in models.items():
        size = device_bytes(model)
        speed = base_speed if name == "float32" else decode_speed(model, prompt, args.decode)
        stats = accuracy(models["float32"], model, chunks)
        print(f"{name:<13} {size / 2**20:8.1f} {size / base_bytes:6.3f} {stats['kl']:9.5f} {stats['top1']:7.2%} "
              f"{stats['ppl']:8.3f} {stats['ppl_ratio']:7.4f} {speed:7.2f} {speed / base_speed:6.2f}")


if __name__ == "__main__":
    main()
