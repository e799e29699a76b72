"""AutoModelForTPU: resolve -> load -> backend -> patches -> compile-ready TPUModel."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from transformers import AutoConfig, PreTrainedModel

from ttpu import models
from ttpu.backends import Backend, get_backend
from ttpu.buckets import BucketPolicy
from ttpu.dtypes import resolve_dtype
from ttpu.errors import InvalidArgumentError, ModelNotFoundError
from ttpu.logs import transformers_progress_hidden
from ttpu.model import TPUModel
from ttpu.patches import Patch, apply_patches
from ttpu.quantization import QuantizationConfig, quantize_module, resolve_quantization
from ttpu.sharding import plan_sharding
from ttpu.sharding.rules import Rule
from ttpu.tasks import auto_class, check_task, task_from_config

ATTENTION_CHOICES = ("auto", "ttpu", "sdpa", "eager")
STATIC_SHAPE_EXPERTS = "grouped_mm"


class AutoModelForTPU:
    """Load any transformers model and run it compiled on an XLA backend."""

    @classmethod
    def from_pretrained(
        cls,
        name: str | Path,
        *,
        backend: str = "jax",
        task: str | None = None,
        dtype: Any = "auto",
        attn_implementation: str = "auto",
        trust_remote_code: bool = False,
        buckets: BucketPolicy | None = None,
        parallelism: str | None = None,
        mesh: Mapping[str, int] | None = None,
        sharding_rules: Sequence[Rule] | None = None,
        quantization: str | QuantizationConfig | None = None,
        **hf_kwargs: Any,
    ) -> TPUModel:
        """Load ``name``: an offline alias (e.g. "gemma-3-270m"), a local directory or a hub id.

        ``task`` picks the AutoModelFor* class (default: from ``config.architectures``);
        ``dtype`` is "auto" (float32 on CPU, bfloat16 on TPU/GPU) or an explicit dtype;
        ``parallelism`` spreads the model over every device: "dp", "fsdp", "tp", "2d",
        "3d" or "auto" (default None: one device); or ``mesh`` gives the axis sizes
        (``{"data": 2, "fsdp": 2, "tensor": 2}``); ``sharding_rules`` are
        ``(regex, spec)`` pairs that override the per-parameter specs;
        ``quantization`` ("int8", "int4", "gguf" or a ``ttpu.QuantizationConfig``) keeps
        the linear layers' (and the embedding's) weights quantized on the device; loaded
        from a GGUF (``gguf_file=...`` or the offline Gemma), the blocks whose format maps
        exactly onto the scheme are kept as stored;
        extra keyword arguments go to transformers' ``from_pretrained``.
        """
        runtime = get_backend(backend)
        torch_dtype = resolve_dtype(dtype, runtime.platform())
        _check_attention_choice(attn_implementation)
        quantization = resolve_quantization(quantization)
        if task is not None:
            check_task(task)
        source = models.resolve(name)
        try:
            config = AutoConfig.from_pretrained(
                source, trust_remote_code=trust_remote_code, **_config_kwargs(hf_kwargs)
            )
        except OSError as exc:
            raise ModelNotFoundError(models.not_found_message(str(name), exc)) from exc
        task = task or task_from_config(config)
        hf_kwargs.setdefault("use_safetensors", None if "gguf_file" in hf_kwargs else True)
        try:
            with transformers_progress_hidden():  # one display: ttpu's, while it places weights
                module = auto_class(task).from_pretrained(
                    source,
                    config=config,
                    dtype=torch_dtype,
                    trust_remote_code=trust_remote_code,
                    **hf_kwargs,
                )
        except OSError as exc:
            raise ModelNotFoundError(_weights_error(source, exc)) from exc
        sharding = _Sharding(parallelism, mesh, sharding_rules, release_host_weights=True)
        gguf = _gguf_checkpoint(name, source, hf_kwargs) if quantization is not None else None
        model = cls._wrap(
            module, runtime, task, torch_dtype, attn_implementation, None, buckets, sharding, quantization, gguf
        )
        # Loaded last: the backend's warm-up (compiling and first-running the programs
        # this model ran last time) proceeds meanwhile.
        model.tokenizer = _load_tokenizer(source, trust_remote_code)
        return model

    @classmethod
    def from_model(
        cls,
        module: PreTrainedModel,
        *,
        backend: str = "jax",
        task: str | None = None,
        dtype: Any = "auto",
        attn_implementation: str = "auto",
        tokenizer: Any = None,
        buckets: BucketPolicy | None = None,
        parallelism: str | None = None,
        mesh: Mapping[str, int] | None = None,
        sharding_rules: Sequence[Rule] | None = None,
        quantization: str | QuantizationConfig | None = None,
    ) -> TPUModel:
        """Wrap an already-built transformers torch module (its attention and patches are
        set in place; it keeps its weights, unless ``quantization`` replaces its layers).
        Options as in :meth:`from_pretrained`."""
        if not isinstance(module, PreTrainedModel):
            raise InvalidArgumentError(
                f"from_model expects a transformers PreTrainedModel, got {type(module).__name__}."
            )
        runtime = get_backend(backend)
        torch_dtype = resolve_dtype(dtype, runtime.platform())
        _check_attention_choice(attn_implementation)
        task = check_task(task) if task else task_from_config(module.config, type(module).__name__)
        module = module.to(torch_dtype)
        sharding = _Sharding(parallelism, mesh, sharding_rules, release_host_weights=False)
        return cls._wrap(
            module, runtime, task, torch_dtype, attn_implementation, tokenizer, buckets, sharding,
            resolve_quantization(quantization),
        )

    @staticmethod
    def _wrap(
        module, runtime, task, dtype, attn_implementation, tokenizer, buckets, sharding: _Sharding,
        quantization: QuantizationConfig | None, gguf: Path | None = None,
    ) -> TPUModel:
        applied = prepare_module(module, runtime, attn_implementation)
        report = quantize_module(module, quantization, gguf) if quantization is not None else None
        plan = plan_sharding(
            module,
            parallelism=sharding.parallelism,
            mesh=sharding.mesh,
            rules=sharding.rules,
            device_count=runtime.device_count(),
            device_memory=runtime.device_memory(),
        )
        return TPUModel(
            module,
            runtime,
            task=task,
            dtype=dtype,
            tokenizer=tokenizer,
            patches=applied,
            buckets=buckets,
            sharding=plan,
            release_host_weights=sharding.release_host_weights,
            quantization=report,
        )


def prepare_module(module: PreTrainedModel, runtime: Backend, attn_implementation: str = "auto") -> list[Patch]:
    """Adapt a transformers module in place for ``runtime``: eval mode, the backend's
    attention, static-shape MoE experts and ttpu's patches (returned)."""
    module.eval()
    _set_attention(module, runtime.attention_implementation(), attn_implementation)
    _set_static_shape_experts(module)
    return apply_patches(module)


class _Sharding(NamedTuple):
    """The sharding options of ``from_pretrained`` / ``from_model``, checked by
    :func:`ttpu.sharding.plan_sharding` once the module is known."""

    parallelism: str | None
    mesh: Mapping[str, int] | None
    rules: Sequence[Rule] | None
    release_host_weights: bool


def _weights_error(source: str, cause: OSError) -> str:
    pickles = sorted(p.name for p in Path(source).glob("pytorch_model*.bin"))
    if pickles:
        return (
            f"{source} holds only pickle weights ({', '.join(pickles)}), which ttpu does not "
            "load by default because unpickling can run arbitrary code. Convert them to "
            "safetensors, or pass use_safetensors=False if you trust the files."
        )
    return f"could not load the weights of {source}: {cause}"


def _check_attention_choice(choice: str) -> None:
    if choice not in ATTENTION_CHOICES:
        raise InvalidArgumentError(
            f"unknown attn_implementation {choice!r}; valid: {', '.join(ATTENTION_CHOICES)}."
        )


def _set_attention(module: PreTrainedModel, backend_attention: str, choice: str) -> None:
    """Use the backend's attention where the model supports AttentionInterface."""
    wanted = backend_attention if choice in ("auto", "ttpu") else choice
    if wanted == module.config._attn_implementation:
        return
    supports_interface = module._can_set_attn_implementation() and all(
        getattr(m, "_supports_attention_backend", False)
        for m in module.modules()
        if isinstance(m, PreTrainedModel)
    )
    if wanted == backend_attention and not supports_interface:
        if choice != "auto":
            raise InvalidArgumentError(
                f"{type(module).__name__} does not support custom attention implementations "
                "(transformers' AttentionInterface); use attn_implementation='auto' or 'eager'."
            )
        return  # keep the model's own attention: eager, or sdpa (lowered to ttpu's kernel)
    module.set_attn_implementation(wanted)


def _set_static_shape_experts(module: PreTrainedModel) -> None:
    """MoE experts: prefer grouped_mm (static shapes; ttpu lowers it to a ragged dot) over
    the eager per-expert loop, whose shapes depend on the routing."""
    config = module.config
    if getattr(config, "_experts_implementation", None) != "eager":
        return
    if module._can_set_experts_implementation():
        module.set_experts_implementation(STATIC_SHAPE_EXPERTS)


def _gguf_checkpoint(name: str | Path, source: str, hf_kwargs: dict[str, Any]) -> Path | None:
    """The GGUF file the weights were loaded from: ``gguf_file``, or the one an offline
    alias was converted from; None for other checkpoints."""
    if "gguf_file" not in hf_kwargs:
        return models.gguf_checkpoint(name)
    from transformers.utils import cached_file

    options = {k: v for k, v in _config_kwargs(hf_kwargs).items() if k != "gguf_file"}
    return Path(cached_file(source, hf_kwargs["gguf_file"], **options))


def _config_kwargs(hf_kwargs: dict[str, Any]) -> dict[str, Any]:
    keys = ("revision", "cache_dir", "local_files_only", "token", "gguf_file", "subfolder")
    return {k: hf_kwargs[k] for k in keys if k in hf_kwargs}


def _load_tokenizer(source: str, trust_remote_code: bool) -> Any:
    """The tokenizer stored with the weights, or None when there is none."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError):
        return None

