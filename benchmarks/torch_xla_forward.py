"""torch_xla: lazy tensors vs ``torch.compile(backend="openxla")`` for one forward.

Run in the torch_xla environment (scripts/install-torch-xla.sh):

    PJRT_DEVICE=CPU python benchmarks/torch_xla_forward.py [--model gemma-3-270m] [--calls 20]

Prints, for the same model and input in one run, the time per call of eager PyTorch on
the CPU (the baseline), lazy tensors (the forward re-traced into a graph every call,
compiled once and then found in torch_xla's graph cache) and torch.compile with the
openxla backend (dynamo captures the graph once; later calls replay it behind guards),
plus each one's first call (tracing + compiling) and the ratio to eager.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("PJRT_DEVICE", "CPU")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch_xla  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from ttpu import models  # noqa: E402


def timed(call, calls: int) -> tuple[float, float]:
    """(first call s, median s of the following calls)."""
    start = time.perf_counter()
    call()
    first = time.perf_counter() - start
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return first, float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--calls", type=int, default=20)
    args = parser.parse_args()
    path = models.resolve(args.model)
    module = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()
    ids = torch.randint(1, 1000, (1, args.tokens))
    device = torch_xla.device()

    def eager() -> None:
        with torch.no_grad():
            module(input_ids=ids, use_cache=False).logits.numpy()

    first_eager, eager_s = timed(eager, args.calls)
    module.to(device)
    xla_ids = ids.to(device)

    def lazy() -> None:
        with torch.no_grad():
            module(input_ids=xla_ids, use_cache=False).logits.cpu()

    compiled = torch.compile(module, backend="openxla")

    def dynamo() -> None:
        with torch.no_grad():
            compiled(input_ids=xla_ids, use_cache=False).logits.cpu()

    rows = [("eager PyTorch (CPU)", first_eager, eager_s), ("lazy tensors", *timed(lazy, args.calls)),
            ("torch.compile openxla", *timed(dynamo, args.calls))]
    print(f"{args.model}, batch 1 x {args.tokens} tokens, float32, median of {args.calls} calls, "
          f"torch {torch.__version__}, torch_xla {torch_xla.__version__}, PJRT {os.environ['PJRT_DEVICE']}")
    print("| path | first call s | per call ms | vs eager |")
    print("|---|---|---|---|")
    for name, first, per_call in rows:
        print(f"| {name} | {first:.2f} | {per_call * 1e3:.1f} | {eager_s / per_call:.2f}x |")


if __name__ == "__main__":
    main()
