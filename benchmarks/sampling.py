"""ttpu's sampler against a straightforward JAX one (the vocabulary sorted for top-k and
top-p, a Gumbel draw per token, as ttpu's was before), measured in one run, and the
serving engine's sampled throughput against its greedy one on Gemma 3 270M.

The sampler rows: one step's choice of the next token for ``--rows`` rows of logits over
Gemma's 262,144 tokens, for greedy decoding and the usual sampling settings; "peaked"
logits (a few tokens far above the rest, as a language model's mostly are) keep top-p
among the 256 candidates, "flat" ones (random normal) push it past them (the bisection).

    python benchmarks/sampling.py [--rows 32] [--requests 16] [--tokens 32]
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ttpu.backends.jax.sampling import NEG_INF, sample
from ttpu.serving.request import Request, SamplingParams
from ttpu.serving.sampler import row_sampling

VOCAB = 262_144
SETTINGS = {
    "greedy": SamplingParams(temperature=0),
    "temperature 0.8": SamplingParams(temperature=0.8),
    "top-p 0.95": SamplingParams(temperature=0.8, top_p=0.95),
    "top-k 50": SamplingParams(temperature=0.8, top_k=50),
    "min-p 0.05": SamplingParams(temperature=0.8, min_p=0.05),
}


def sorting_sampler(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array,
                    min_p: jax.Array, key: jax.Array, params: SamplingParams) -> jax.Array:
    """The baseline: per-row top-k and top-p by sorting the vocabulary, min-p by softmax,
    a Gumbel draw (``jax.random.categorical``); each only when ``params`` use it."""
    if params.temperature == 0:
        return jnp.argmax(logits, axis=-1)
    scaled = logits / temperature[:, None]
    if params.top_k > 0:
        descending = -jnp.sort(-scaled, axis=-1)
        kth = jnp.take_along_axis(descending, jnp.clip(top_k[:, None] - 1, 0, VOCAB - 1), axis=-1)
        scaled = jnp.where(scaled < kth, NEG_INF, scaled)
    if params.top_p < 1:
        ascending = jnp.sort(scaled, axis=-1)
        cumulative = jnp.cumsum(jax.nn.softmax(ascending, axis=-1), axis=-1)
        removed = jnp.sum(cumulative[..., :-1] <= 1 - top_p[:, None], axis=-1, keepdims=True)
        scaled = jnp.where(scaled < jnp.take_along_axis(ascending, removed, axis=-1), NEG_INF, scaled)
    if params.min_p > 0:
        probs = jax.nn.softmax(scaled, axis=-1)
        scaled = jnp.where(probs < min_p[:, None] * jnp.max(probs, axis=-1, keepdims=True), NEG_INF, scaled)
    return jax.random.categorical(key, scaled, axis=-1)


def seconds(function: Callable[[], jax.Array], repeats: int = 3) -> float:
    jax.block_until_ready(function())  # compile
    start = time.perf_counter()
    for _ in range(repeats):
        jax.block_until_ready(function())
    return (time.perf_counter() - start) / repeats


def sampler_rows(rows: int) -> None:
    rng = np.random.default_rng(0)
    logits = {
        "peaked": jnp.asarray(rng.normal(0, 1, (rows, VOCAB)) + 14 * (rng.random((rows, VOCAB)) < 2e-5), jnp.float32),
        "flat": jnp.asarray(rng.normal(0, 3, (rows, VOCAB)), jnp.float32),
    }
    ours = jax.jit(lambda x, r, mode: sample(x, r, mode).tokens, static_argnums=2)
    baseline = jax.jit(sorting_sampler, static_argnums=6)
    print(f"one step's sampler, {rows} rows x {VOCAB} tokens (ms; baseline / ttpu):")
    print("| logits | settings | ttpu ms | sorting baseline ms | ratio |\n|---|---|---|---|---|")
    for kind, x in logits.items():
        for name, params in SETTINGS.items():
            requests = [Request(str(i), [1, 2, 3], params) for i in range(rows)]
            row, mode = row_sampling(requests, rows, VOCAB, history_width=64)
            t_ours = seconds(lambda: ours(x, row, mode))
            t_base = seconds(lambda: baseline(x, row.temperature, row.top_k, row.top_p, row.min_p, jax.random.key(0), params))
            print(f"| {kind} | {name} | {t_ours * 1e3:.0f} | {t_base * 1e3:.0f} | {t_base / t_ours:.1f}x |")


def engine_rows(requests: int, tokens: int) -> None:
    from ttpu import LLM

    llm = LLM("gemma-3-270m", max_num_seqs=requests, max_model_len=512, max_num_batched_tokens=256)
    llm.engine.warm_up(progress=False)
    prompts = [f"Story {i}: once upon a time in a land far away," for i in range(requests)]
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)  # the host side's first run
    print(f"\nthe engine on Gemma 3 270M, {requests} requests x {tokens} tokens (EOS ignored):")
    print("| settings | output tok/s | over greedy |\n|---|---|---|")
    greedy = None
    for name, params in SETTINGS.items():
        params = dataclasses.replace(params, max_tokens=tokens, seed=0, ignore_eos=True)
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        rate = sum(len(o.outputs[0].token_ids) for o in outputs) / (time.perf_counter() - start)
        greedy = greedy or rate
        print(f"| {name} | {rate:.1f} | {rate / greedy:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args()
    sampler_rows(args.rows)
    engine_rows(args.requests, args.tokens)


if __name__ == "__main__":
    main()
