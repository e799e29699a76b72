"""torch_xla: lazy tensors vs ``torch.compile(backend="openxla")``, for one forward and for
one decode step of ttpu's generation loop.

Run in the torch_xla environment (scripts/install-torch-xla.sh):

    PJRT_DEVICE=CPU python benchmarks/torch_xla_forward.py [--model gemma-3-270m] [--calls 20]

Prints, for the same model and input in one run, the time per call of eager PyTorch on
the CPU (the baseline), lazy tensors (the forward re-traced into a graph every call,
compiled once and then found in torch_xla's graph cache) and torch.compile with the
openxla backend (dynamo captures the graph once; later calls replay it behind guards),
plus each one's first call (tracing + compiling) and the ratio to eager. Then the same
for a batch-1 decode step over transformers' StaticCache (``XlaDecoder.decode_step``),
with the Python tracing time of a lazy step and dynamo's recompile count.
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

from ttpu import AutoModelForTPU, models  # noqa: E402
from ttpu.generation.generate import _settings  # noqa: E402


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
    decode_steps(args)


def decode_steps(args: argparse.Namespace) -> None:
    """A batch-1 decode step (KV cache of 128) lazily and under torch.compile(openxla)."""
    import torch._dynamo

    model = AutoModelForTPU.from_pretrained(args.model, backend="torch_xla")
    decoder = model.decoder()
    ids = np.ones((1, args.tokens), np.int64)
    settings = _settings(model, ids, None, 0, {"max_new_tokens": args.calls + 8})

    def stepper(step):
        state = decoder.start(ids, np.ones_like(ids), 128, settings, 0)

        def call() -> None:
            (state.tokens, state.mask, state.positions, state.index, state.generated, state.finished) = step(
                state.cache, state.chooser, state.tokens, state.mask, state.positions, state.index,
                state.generated, state.finished, state.pad_id,
            )
            torch_xla.sync()
            state.tokens.cpu()  # wait for the step

        return call, state

    lazy_call, state = stepper(decoder.decode_step)
    lazy_first, lazy_s = timed(lazy_call, args.calls)
    start = time.perf_counter()
    decoder.decode_step(state.cache, state.chooser, state.tokens, state.mask, state.positions, state.index,
                        state.generated, state.finished, state.pad_id)
    trace_s = time.perf_counter() - start
    torch_xla.sync()
    torch._dynamo.reset()
    dynamo_call, _ = stepper(torch.compile(decoder.decode_step, backend="openxla"))
    dynamo_first, dynamo_s = timed(dynamo_call, args.calls)
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    print(f"\ndecode step, batch 1, KV cache 128, median of {args.calls} steps")
    print("| path | first step s | per step ms |")
    print("|---|---|---|")
    print(f"| lazy tensors (Python trace of a step: {trace_s * 1e3:.0f} ms) | {lazy_first:.2f} | {lazy_s * 1e3:.1f} |")
    print(f"| torch.compile openxla ({frames} graphs captured) | {dynamo_first:.2f} | {dynamo_s * 1e3:.1f} |")


if __name__ == "__main__":
    main()
