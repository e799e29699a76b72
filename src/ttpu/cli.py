"""The ``ttpu`` command: generate, chat, predict, doctor, serve, train, coverage, launch."""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

DEFAULT_MODEL = "gemma-3-270m"


@contextlib.contextmanager
def step(message: str) -> Iterator[None]:
    """Show a long step's name with a live elapsed-time counter (on a terminal), then
    how long it took."""
    from tqdm.auto import tqdm

    live = sys.stderr.isatty()
    bar = tqdm(desc=message, bar_format="{desc} ... {elapsed}", file=sys.stderr, disable=not live)
    done = threading.Event()

    def tick() -> None:
        while not done.wait(0.25):
            bar.refresh()

    ticker = threading.Thread(target=tick, daemon=True)
    ticker.start()
    start = time.perf_counter()
    outcome = "failed"
    try:
        yield
        outcome = f"{time.perf_counter() - start:.1f} s"
    finally:
        done.set()
        ticker.join()
        bar.close()
        print(f"{message} ... {outcome}", file=sys.stderr, flush=True)


def _load(args: argparse.Namespace) -> Any:
    from ttpu import AutoModelForTPU

    from ttpu.logs import library_progress_hidden

    with step(f"loading {args.model} (backend {args.backend})"), library_progress_hidden():
        return AutoModelForTPU.from_pretrained(
            args.model, backend=args.backend, dtype=args.dtype, task=args.task,
            parallelism=args.parallelism, quantization=args.quantization,
        )


def _versions() -> str:
    names = ("ttpu", "transformers", "torch", "jax", "torchax", "torch_xla")
    found = []
    for name in names:
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{name} (not installed)")
    return ", ".join(found)


def sample_inputs(model: Any) -> dict[str, Any]:
    """Small dummy inputs for a compile check, built from the model's config."""
    import numpy as np

    module, config = model.torch_module, model.config
    name = module.main_input_name
    if name == "input_ids":
        inputs: dict[str, Any] = {"input_ids": np.ones((1, 8), np.int64)}
    elif name == "pixel_values":
        vision = getattr(config, "vision_config", config)
        size, channels = vision.image_size, getattr(vision, "num_channels", 3)
        inputs = {name: np.zeros((1, channels, size, size), np.float32)}
    else:
        raise ValueError(f"no generic sample input for {name!r}")
    if getattr(config, "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = np.ones((1, 4), np.int64)
    return inputs


def doctor(args: argparse.Namespace) -> int:
    """Explain how ttpu runs a model: backend, devices, dtype, attention, patches, compile."""
    from ttpu.backends import get_backend

    backend = get_backend(args.backend)
    print(f"versions:    {_versions()}")
    for label, value in backend.diagnostics():
        print(f"{label + ':':<12} {value}")
    print(f"backend:     {backend.name} on {backend.platform()}")
    for line in backend.device_summary():
        print(f"  device     {line}")
    model = _load(args)
    params = sum(p.numel() for p in model.torch_module.parameters())
    print(f"model:       {type(model.torch_module).__name__} ({params / 1e6:.1f}M parameters)")
    print(f"task:        {model.task}")
    print(f"dtype:       {str(model.dtype).removeprefix('torch.')}")
    print(f"attention:   {model.attn_implementation}")
    plan = model.sharding
    print(f"sharding:    {plan.strategy} {plan.mesh} ({plan.reason})")
    experts = getattr(model.config, "_experts_implementation", None)
    if experts:
        print(f"moe experts: {experts}")
    print(f"tokenizer:   {type(model.tokenizer).__name__ if model.tokenizer else 'none found'}")
    print(f"seq buckets: {model.sequence_padding} (on | verify: checked on first padded call | off)")
    report = model.quantization
    if report is None:
        print("quantized:   no (--quantization int8 | int4 | gguf)")
    else:
        print(f"quantized:   {report.config.weights}: {len(report.quantized)} modules, parameters "
              f"{report.bytes_before / 2**20:.1f} MiB -> {report.bytes_after / 2**20:.1f} MiB "
              f"({report.bytes_after / report.bytes_before:.2f}x)")
        for name, representation in report.quantized.items():
            print(f"  - {name}: {representation}")
    print(f"patches:     {len(model.patches)} applied")
    for patch in model.patches:
        print(f"  - {patch.name}: {patch.reason}")
    lowerings = getattr(backend, "lowerings", [])
    print(f"lowerings:   {len(lowerings)} ops lowered by ttpu")
    for lowering in lowerings:
        print(f"  - {lowering.name}: {lowering.reason}")
    try:
        inputs = sample_inputs(model)
    except ValueError as exc:
        print(f"compiles:    not checked ({exc})")
        return 0
    start = time.perf_counter()
    try:
        model(**inputs)
    except Exception as exc:  # report, don't crash: this is a diagnosis
        print(f"compiles:    NO\n{exc}")
        return 1
    print(f"compiles:    yes ({time.perf_counter() - start:.1f} s, {model.compile_count} executable)")
    if model.task == "causal-lm":
        try:
            decoder = model.decoder()
        except Exception as exc:  # report, don't crash
            print(f"generate:    NO ({type(exc).__name__}: {str(exc).splitlines()[0]})")
            return 1
        layout = getattr(decoder, "layout", None)
        cache = layout.describe() if layout is not None else "transformers' StaticCache"
        print(f"generate:    compiled decode loop; cache: {cache}")
        if hasattr(decoder, "paged_model"):
            from ttpu.backends.jax.paged import NotPageable

            try:
                decoder.paged_model()
                print("paged:       yes (the serving engine and generate run the paged step)")
            except NotPageable as reason:
                print(f"paged:       no, generate runs the dense cache and the engine recomputes ({reason})")
    return 0


def predict(args: argparse.Namespace) -> int:
    """Print the most likely next tokens after a prompt."""
    import jax
    import numpy as np

    if not args.prompt.strip():
        print("error: the prompt is empty", file=sys.stderr)
        return 2
    model = _load(args)
    if model.tokenizer is None:
        print(f"error: no tokenizer was found next to {args.model!r}", file=sys.stderr)
        return 2
    ids = np.asarray([model.tokenizer(args.prompt)["input_ids"]])
    with step("compiling and running"):
        logits = model(input_ids=ids, use_cache=False).logits[0, -1]
    probs = np.asarray(jax.nn.softmax(logits))
    print(f"prompt: {args.prompt!r}")
    for token in np.argsort(-probs)[: args.top]:
        print(f"  {probs[token]:6.1%}  {model.tokenizer.decode([int(token)])!r}")
    return 0


def generate(args: argparse.Namespace) -> int:
    """Continue a prompt, printing the text as it is generated."""
    if not args.prompt.strip():
        print("error: the prompt is empty", file=sys.stderr)
        return 2
    model = _load(args)
    _print_stream(model.stream(args.prompt, **_generation_options(args)), args.prompt)
    return 0


def chat(args: argparse.Namespace) -> int:
    """Talk with a model, turn by turn, through its tokenizer's chat template."""
    from ttpu.generation.chat import chat_prompt

    model = _load(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("type a message; an empty line or Ctrl-D ends the chat.", file=sys.stderr)
    while True:
        try:
            text = input("> ").strip()
        except EOFError:
            break
        if not text:
            break
        messages.append({"role": "user", "content": text})
        ids = chat_prompt(model.tokenizer, messages)
        reply = _print_stream(model.stream(ids, **_generation_options(args)))
        messages.append({"role": "assistant", "content": reply.strip()})
    return 0


def _print_stream(pieces: Iterator[str], prefix: str = "") -> str:
    """Print generated text as it arrives (the first piece waits for compiling)."""
    with step("prefill (compiles on first use of a shape bucket)"):
        first = next(pieces, "")
    print(prefix + first, end="", flush=True)
    text = first
    for piece in pieces:
        print(piece, end="", flush=True)
        text += piece
    print()
    return text


def _generation_options(args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = {"max_new_tokens": args.max_new_tokens, "seed": args.seed}
    if args.do_sample:
        options.update(do_sample=True, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    if args.repetition_penalty is not None:
        options["repetition_penalty"] = args.repetition_penalty
    if args.stop:
        options["stop_strings"] = args.stop
    return options


def _add_generation_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"model (default: {DEFAULT_MODEL})")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=50, help="0 turns it off")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--repetition-penalty", type=float, default=None)
    parser.add_argument("--stop", action="append", help="stop string (repeatable)")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed")
    _add_model_options(parser)


def coverage(args: argparse.Namespace) -> int:
    """Sweep every installed model type through ttpu and write a coverage report."""
    from ttpu.coverage.cli import main

    return main(args.forwarded)


def launch(args: argparse.Namespace) -> int:
    """Run a script in several local processes joined into one jax.distributed job."""
    from ttpu import launch as launcher

    return launcher.run(
        args.script, args.script_args, nproc=args.nproc, local_devices=args.local_devices,
        port=args.port,
    )


def serve(args: argparse.Namespace) -> int:
    """Serve a model over an OpenAI-compatible HTTP API (continuous batching)."""
    import uvicorn

    from ttpu.serving.llm import LLM
    from ttpu.serving.server import build_app

    model = _load(args)
    with step("starting the serving engine"):
        llm = LLM(
            model, max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
            max_num_batched_tokens=args.max_num_batched_tokens, block_size=args.block_size,
            num_blocks=args.num_blocks, enable_prefix_caching=not args.no_prefix_caching,
        )
    seconds = llm.engine.warm_up(progress=sys.stderr.isatty())
    print(f"compiled {llm.engine.compile_count} serving programs in {seconds:.1f} s", file=sys.stderr, flush=True)
    app = build_app(llm, args.served_model_name or args.model)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def train(args: argparse.Namespace) -> int:
    """Fine-tune a causal LM on text or JSONL files (transformers' Trainer semantics)."""
    from ttpu.training.arguments import TrainingArguments
    from ttpu.training.data import language_modeling_blocks
    from ttpu.training.trainer import Trainer

    training_args = TrainingArguments(
        output_dir=args.output_dir, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps, learning_rate=args.learning_rate,
        lr_scheduler_type=args.lr_scheduler_type, warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
        max_steps=args.max_steps, num_train_epochs=args.num_train_epochs, logging_steps=args.logging_steps,
        save_steps=args.save_steps, save_total_limit=args.save_total_limit, seed=args.seed,
        gradient_checkpointing=args.gradient_checkpointing, parallelism=args.parallelism, zero_stage=args.zero_stage,
        bf16=args.bf16, include_num_input_tokens_seen="non_padding", report_to="none",
    )
    from transformers import default_data_collator

    from ttpu import models
    from ttpu.auto import _load_tokenizer
    from ttpu.errors import InvalidArgumentError

    source = models.resolve(args.model)
    tokenizer = _load_tokenizer(source, False)
    if tokenizer is None:
        raise InvalidArgumentError(f"{args.model} has no tokenizer stored with it; ttpu train needs one.")
    blocks = language_modeling_blocks(args.data, tokenizer, args.block_size, args.field)
    print(f"{len(blocks)} blocks of {args.block_size} tokens", file=sys.stderr, flush=True)
    with step(f"loading {args.model}"):
        trainer = Trainer(
            _lora_model(source, args.lora_rank) if args.lora_rank else source, training_args,
            train_dataset=blocks, processing_class=tokenizer, data_collator=default_data_collator,
        )
    metrics = trainer.train(resume_from_checkpoint=args.resume or None)
    saved = trainer.save_model(args.output_dir)
    print(f"trained {trainer.state.global_step} steps, loss {metrics['train_loss']:.4f}; saved to {saved}")
    return 0


def _lora_model(source: str, rank: int) -> Any:
    """The model in ``source`` with LoRA adapters (rank ``rank``) on every linear layer."""
    import peft
    import torch
    from transformers import AutoConfig

    from ttpu.tasks import auto_class, task_from_config

    module = auto_class(task_from_config(AutoConfig.from_pretrained(source))).from_pretrained(source, dtype=torch.float32)
    config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", task_type="CAUSAL_LM")
    return peft.get_peft_model(module, config)


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", default="jax", help="backend (default: jax)")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    parser.add_argument("--task", default=None, help="task (default: from the config)")
    parser.add_argument(
        "--parallelism", default=None,
        help="spread over every device: dp, fsdp, tp, 2d, 3d or auto (default: one device)",
    )
    parser.add_argument(
        "--quantization", default=None, help="keep the weights quantized on the device: int8, int4, or gguf (a GGUF's own blocks; default: off)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ttpu", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("generate", help=generate.__doc__)
    p.add_argument("prompt")
    _add_generation_options(p)
    p.set_defaults(run=generate)

    p = commands.add_parser("chat", help=chat.__doc__)
    p.add_argument("--system", default=None, help="system message")
    _add_generation_options(p)
    p.set_defaults(run=chat)

    p = commands.add_parser("doctor", help=doctor.__doc__)
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    _add_model_options(p)
    p.set_defaults(run=doctor)

    p = commands.add_parser("predict", help=predict.__doc__)
    p.add_argument("prompt")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--top", type=int, default=5, help="how many tokens to show")
    _add_model_options(p)
    p.set_defaults(run=predict)

    p = commands.add_parser("serve", help=serve.__doc__)
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None, help="the model's name in the API (default: MODEL)")
    p.add_argument("--max-num-seqs", type=int, default=32, help="requests running at once")
    p.add_argument("--max-model-len", type=int, default=None, help="prompt + output tokens (default: the model's, at most 2048)")
    p.add_argument("--max-num-batched-tokens", type=int, default=256, help="tokens computed per engine step")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV cache block")
    p.add_argument("--num-blocks", type=int, default=None, help="KV cache blocks (default: room for every request at full length)")
    p.add_argument("--no-prefix-caching", action="store_true")
    _add_model_options(p)
    p.set_defaults(run=serve)

    p = commands.add_parser("train", help=train.__doc__)
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    p.add_argument("--data", nargs="+", required=True, help="text files, or .jsonl files with a text field")
    p.add_argument("--field", default="text", help="the JSONL field holding the text (default: text)")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--block-size", type=int, default=256, help="tokens per training example")
    p.add_argument("--batch-size", type=int, default=4, help="examples per data-parallel device")
    p.add_argument("--gradient-accumulation-steps", type=int, default=1)
    p.add_argument("--learning-rate", type=float, default=2e-5)
    p.add_argument("--lr-scheduler-type", default="linear")
    p.add_argument("--warmup-steps", type=float, default=0)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--max-steps", type=int, default=-1, help="optimizer steps (default: --num-train-epochs)")
    p.add_argument("--num-train-epochs", type=float, default=1.0)
    p.add_argument("--logging-steps", type=int, default=10)
    p.add_argument("--save-steps", type=int, default=500)
    p.add_argument("--save-total-limit", type=int, default=None)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--bf16", action="store_true", help="compute in bfloat16 (parameters stay float32)")
    p.add_argument("--parallelism", default=None, help="dp, fsdp, tp, 2d, 3d or auto (default: one device)")
    p.add_argument("--zero-stage", type=int, default=None, help="0-3 (default: 3 with an fsdp axis, else 0)")
    p.add_argument("--lora-rank", type=int, default=0, help="train LoRA adapters of this rank instead of every weight")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output-dir")
    p.set_defaults(run=train)

    p = commands.add_parser("coverage", help=coverage.__doc__, add_help=False)
    p.set_defaults(run=coverage)  # its own options are parsed by ttpu.coverage

    p = commands.add_parser("launch", help=launch.__doc__)
    p.add_argument("--nproc", type=int, required=True, help="number of processes")
    p.add_argument("--local-devices", type=int, default=None,
                   help="CPU devices per process (default: as the environment sets)")
    p.add_argument("--port", type=int, default=None, help="coordinator port (default: a free one)")
    p.add_argument("script", help="Python script run by every process")
    p.add_argument("script_args", nargs=argparse.REMAINDER, help="the script's arguments")
    p.set_defaults(run=launch)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args, forwarded = build_parser().parse_known_args(argv)
    if forwarded and args.command != "coverage":
        build_parser().error(f"unrecognized arguments: {' '.join(forwarded)}")
    args.forwarded = forwarded
    from ttpu.errors import TTPUError

    try:
        return args.run(args)
    except TTPUError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
