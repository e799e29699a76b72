"""ttpu's serving engine on a sparse-attention model (DeepSeek-V3.2's DSA, random
weights) with its indexer keys paged (each token attends to its indexer's top-k
positions through the pools), against the same engine recomputing each request's whole
sequence at every step (how it served these models before their indexers were paged) and
transformers' ``generate`` on the same requests in one left-padded batch, measured in
one run; each engine prints for how many requests its greedy tokens are transformers'.

    python benchmarks/sparse_attention.py [--requests 16] [--prompt-len 64,256] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Sequence

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from ttpu import AutoModelForTPU
from ttpu.backends.jax.paged import NotPageable
from ttpu.coverage import tiny_config
from ttpu.serving.engine import EngineConfig, LLMEngine
from ttpu.serving.request import SamplingParams

# A small DeepSeek-V3.2: MLA attention with an indexer on every layer, MoE after the first.
CONFIG = dict(vocab_size=8192, hidden_size=256, intermediate_size=512, moe_intermediate_size=256, num_hidden_layers=4,
              num_attention_heads=8, num_key_value_heads=8, kv_lora_rank=64, q_lora_rank=96, qk_rope_head_dim=16,
              head_dim=16, qk_nope_head_dim=32, v_head_dim=32, index_n_heads=16, index_head_dim=32, index_topk=64,
              max_position_embeddings=1024, mlp_layer_types=["dense", "sparse", "sparse", "sparse"],
              layer_types=["indexed_attention"] * 4)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--prompt-len", default="64,256", help="uniform range, inclusive: LOW,HIGH")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--max-num-seqs", type=int, default=16)
    parser.add_argument("--max-num-batched-tokens", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def engine_tokens(model: AutoModelForTPU, prompts: list[list[int]], args: argparse.Namespace,
                  ) -> tuple[list[list[int]], float, float]:
    """The engine's greedy tokens for ``prompts`` (submitted together), its seconds for
    them after the warm-up, and the warm-up's seconds."""
    longest = max(map(len, prompts)) + args.new_tokens
    engine = LLMEngine(model, EngineConfig(max_num_seqs=args.max_num_seqs, max_model_len=-(-longest // 16) * 16,
                                           max_num_batched_tokens=args.max_num_batched_tokens))
    warm_up = engine.warm_up(progress=False)
    params = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True)
    start = time.perf_counter()
    requests = [engine.add_request(f"r{i}", prompt, params) for i, prompt in enumerate(prompts)]
    while engine.has_unfinished_requests:
        engine.step()
    return [r.output_token_ids for r in requests], time.perf_counter() - start, warm_up


def transformers_tokens(module: torch.nn.Module, prompts: list[list[int]], new_tokens: int) -> tuple[list[list[int]], float]:
    """transformers' greedy tokens for ``prompts`` in one left-padded batch, and its seconds."""
    width = max(map(len, prompts))
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):], mask[row, width - len(prompt):] = torch.tensor(prompt), 1
    start = time.perf_counter()
    with torch.no_grad():
        out = module.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              do_sample=False, pad_token_id=0)
    return out[:, width:].tolist(), time.perf_counter() - start


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    low, high = (int(n) for n in args.prompt_len.split(","))
    rng = np.random.default_rng(args.seed)
    prompts = [rng.integers(2, CONFIG["vocab_size"], int(n)).tolist() for n in rng.integers(low, high + 1, args.requests)]
    config = tiny_config("deepseek_v32")
    for name, value in CONFIG.items():
        setattr(config, name, value)
    torch.manual_seed(args.seed)
    module = AutoModelForCausalLM.from_config(config).eval()
    eager = copy.deepcopy(module)
    paged = AutoModelForTPU.from_model(module)
    recomputed = AutoModelForTPU.from_model(copy.deepcopy(eager))
    # The engine's runner recomputes a model whose paged step is refused, as it did DSA models before.
    recomputed.decoder()._paged = NotPageable("benchmark: recompute, as before the indexers were paged")

    print(f"DeepSeek-V3.2 (random weights, {sum(p.numel() for p in eager.parameters()) / 1e6:.1f}M parameters, "
          f"top-{CONFIG['index_topk']} of {CONFIG['index_n_heads']} indexer heads): {args.requests} requests, prompts "
          f"{low}-{high} tokens ({sum(map(len, prompts))} in all), {args.new_tokens} new tokens each, greedy")
    expected, hf_s = transformers_tokens(eager, prompts, args.new_tokens)
    rows = [("transformers generate (one batch)", hf_s, None)]
    for label, model in (("ttpu engine, indexers paged", paged), ("ttpu engine, recomputing", recomputed)):
        tokens, seconds, warm_up = engine_tokens(model, prompts, args)
        same = sum(t == e for t, e in zip(tokens, expected))
        print(f"{label}: {same} of {len(prompts)} requests give transformers' tokens")
        rows.append((label, seconds, warm_up))
    output = args.requests * args.new_tokens
    print("\n| way | seconds | output tok/s | warm-up s |\n|---|---|---|---|")
    for label, seconds, warm_up in rows:
        print(f"| {label} | {seconds:.1f} | {output / seconds:.1f} | {'-' if warm_up is None else f'{warm_up:.1f}'} |")
    paged_s, recompute_s = rows[1][1], rows[2][1]
    print(f"\nThe paged engine: {recompute_s / paged_s:.2f}x the recomputing engine's output throughput, "
          f"{hf_s / paged_s:.2f}x transformers'.")


if __name__ == "__main__":
    main()
