"""One model type end to end: eager torch forward, the same module under ttpu, compared."""

from __future__ import annotations

import copy
import os
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

from ttpu.coverage.configs import resolve_class, tiny_config
from ttpu.coverage.inputs import input_candidates

RTOL = 1e-5
MAX_PARAMS = 60_000_000  # tiny configs larger than this are not attempted
GENERATE_TOKENS = 8  # greedy new tokens of the generate check


def error_info(exc: BaseException) -> dict[str, Any]:
    root = exc
    seen = set()
    while root.__cause__ is not None and id(root) not in seen:
        seen.add(id(root))
        root = root.__cause__
    message = str(root).strip().splitlines()[0] if str(root).strip() else ""
    outer = str(exc).strip().splitlines()
    failing_module = next((x.split(":", 1)[1].strip() for x in outer if "failing module:" in x), "")
    failing_line = next((x.split(":", 1)[1].strip() for x in outer if "failing line:" in x), "")
    frames = traceback.extract_tb(root.__traceback__)[-6:]
    return {
        "type": type(root).__name__,
        "message": message[:500],
        "wrapper": type(exc).__name__ if root is not exc else "",
        "failing_module": failing_module[-300:],
        "failing_line": failing_line[:300],
        "where": [f"{_short_path(f.filename)}:{f.lineno} {f.name}" for f in frames],
    }


def _is_tensorish(value: Any) -> bool:
    return hasattr(value, "shape") and hasattr(value, "dtype") and len(getattr(value, "shape", ())) > 0


def _children(value: Any) -> list[tuple[str, Any]]:
    if hasattr(value, "keys") and hasattr(value, "__getitem__"):
        return [(str(k), value[k]) for k in value.keys()]
    if isinstance(value, (list, tuple)):
        return [(str(i), v) for i, v in enumerate(value)]
    return []


def _first_tensor(value: Any, path: str = "") -> tuple[str, Any] | None:
    if _is_tensorish(value):
        return path or "output", value
    for key, child in _children(value):
        found = _first_tensor(child, f"{path}.{key}" if path else key)
        if found:
            return found
    return None


def _short_path(filename: str) -> str:
    parts = Path(filename).parts
    for anchor in ("site-packages", "src"):
        if anchor in parts:
            return "/".join(parts[parts.index(anchor) + 1:])
    return "/".join(parts[-2:])


def _main_output(output: Any) -> tuple[str, Any]:
    """(path, tensor): logits, else last_hidden_state, else the first tensor."""
    keys = list(output.keys()) if hasattr(output, "keys") else []
    for key in ("logits", "last_hidden_state", "prediction_logits", "audio_values"):
        if key in keys and output[key] is not None:
            found = _first_tensor(output[key], key)
            if found:
                return found
    found = _first_tensor(output)
    if found is None:
        raise TypeError(f"no tensor output in {type(output).__name__}")
    return found


def _pick(output: Any, path: str) -> Any:
    if path == "output":
        return output
    value = output
    for part in path.split("."):
        if hasattr(value, "keys") and part in value.keys():
            value = value[part]
        elif isinstance(value, (list, tuple)) and part.isdigit():
            value = value[int(part)]
        else:
            raise KeyError(f"ttpu output lacks {path!r}")
    return value


def _relative_error(reference: Any, actual: Any, mask: Any) -> float:
    import numpy as np

    ref = np.asarray(reference.detach().float().numpy() if hasattr(reference, "detach") else reference,
                     dtype=np.float64)
    act = np.asarray(actual, dtype=np.float64)
    if ref.shape != act.shape:
        raise ValueError(f"shape mismatch: torch {ref.shape} vs ttpu {act.shape}")
    if mask is not None and ref.ndim >= 2 and ref.shape[:2] == mask.shape:
        keep = mask.astype(bool)
        ref, act = ref[keep], act[keep]
    finite = np.isfinite(ref)
    if (np.isfinite(act) != finite).any():
        return float("nan")  # non-finite values where torch has finite ones (or vice versa)
    ref, act = ref[finite], act[finite]
    denom = np.linalg.norm(ref)
    diff = np.linalg.norm(act - ref)
    if denom == 0:
        return float(diff)
    return float(diff / denom)


def config_for_class(cls: type, config: Any) -> Any:
    """The (sub-)config ``cls`` expects: composite configs hold it as text_config etc."""
    expected = getattr(cls, "config_class", None)
    if not isinstance(expected, type) or isinstance(config, expected):
        return config
    for value in vars(config).values():
        if isinstance(value, expected):
            return value
    return config


def _count_params_meta(cls: type, config: Any) -> int:
    import torch

    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = cls(config)
    return sum(p.numel() for p in model.parameters())


def _build(cls: type, config: Any) -> Any:
    import torch

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = cls(config)
    model = model.float().eval()
    _randomize_constant_matrices(model)
    return model


def _randomize_constant_matrices(model: Any) -> None:
    """Weight matrices initialised to a constant (zero-init MoE routers, gates) get small
    random values: with random weights elsewhere, a constant router makes every expert
    score tie, and torch and XLA break top-k ties differently."""
    import torch

    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim >= 2 and param.numel() > 1 and param.is_floating_point():
                flat = param.detach().reshape(-1)
                if bool((flat == flat[0]).all()):
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.02)


def _to_torch(inputs: dict[str, Any]) -> dict[str, Any]:
    import numpy as np
    import torch

    return {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in inputs.items()}


def _is_causal(cls: type, source: str) -> bool:
    return "CAUSAL_LM" in source or cls.__name__.endswith(("ForCausalLM", "LMHeadModel"))


def run_one(model_type: str) -> dict[str, Any]:
    """Build, run eagerly, run through ttpu and compare one model type (without
    autograd; the caller's grad mode is left as it was)."""
    import torch

    with torch.no_grad():
        return _run_one(model_type)


def _run_one(model_type: str) -> dict[str, Any]:
    import torch

    result: dict[str, Any] = {
        "model_type": model_type, "class": "", "config": "", "inputs": "", "eager": False,
        "compiles": False, "matches": False, "rel_err": None, "output": "", "stage": "",
        "error": None, "not_attempted": "", "times": {}, "params": None,
    }
    t0 = time.time()
    attempts: list[tuple[str, Any]] = []
    errors = []
    for aggressive in (True, False):
        try:
            attempts.append(("tiny" if aggressive else "tiny (widths kept)", tiny_config(model_type, aggressive)))
        except Exception as exc:  # noqa: BLE001
            errors.append(("config", exc))
    if not attempts:
        result.update(stage="config", error=error_info(errors[0][1]),
                      not_attempted="tiny config could not be built")
        return result
    cls, source = resolve_class(model_type, attempts[0][1])
    if cls is None:
        result.update(stage="class", not_attempted="no model class in transformers' auto mappings")
        return result
    result["class"] = cls.__name__
    causal = _is_causal(cls, source)
    first_failure: tuple[str, BaseException] | None = None
    chosen = None
    log = result["attempts"] = [f"config {type(e).__name__}: {str(e)[:200]}" for _, e in errors]
    for label, config in attempts:
        config = config_for_class(cls, config)
        try:
            n = _count_params_meta(cls, config)
            if n > MAX_PARAMS:
                raise ValueError(f"tiny config still has {n:,} parameters")
            model = _build(cls, config)
        except Exception as exc:  # noqa: BLE001
            first_failure = first_failure or ("build", exc)
            log.append(f"{label} build {type(exc).__name__}: {str(exc)[:200]}")
            continue
        candidates, reason = input_candidates(model, config, causal)
        if not candidates:
            result.update(config=label, stage="inputs", not_attempted=reason, params=n)
            return result
        for cand in candidates:
            try:
                with torch.no_grad():
                    ref = model(**_to_torch(copy.deepcopy(cand.inputs)))
                key, ref_main = _main_output(ref)
                if not isinstance(ref_main, torch.Tensor):
                    raise TypeError(f"main output {key!r} is {type(ref_main).__name__}")
            except Exception as exc:  # noqa: BLE001
                first_failure = first_failure or ("eager", exc)
                log.append(f"{label} {cand.kind} eager {type(exc).__name__}: {str(exc)[:200]}")
                continue
            chosen = (label, config, model, cand, key, ref_main, n)
            break
        if chosen:
            break
    result["times"]["eager"] = round(time.time() - t0, 2)
    if chosen is None:
        stage, exc = first_failure or ("eager", RuntimeError("no attempt"))
        result.update(stage=stage, error=error_info(exc))
        return result
    label, config, model, cand, key, ref_main, n = chosen
    result.update(config=label, inputs=cand.kind, eager=True, output=key, params=n,
                  input_shapes={k: list(v.shape) for k, v in cand.inputs.items() if hasattr(v, "shape")})
    if os.environ.get("TTPU_COVERAGE_EAGER_ONLY"):
        return result
    tpu = _compare_forward(result, cls, config, model, cand, key, ref_main)
    causal_class = _causal_lm_class(model_type)
    if causal_class is not None:
        t2 = time.time()
        if causal_class is cls and "input_ids" in cand.inputs:
            result.update(check_decoding(model, tpu, cand.inputs))
        else:
            result.update(_check_decoding_of_class(causal_class, config))
        result["times"]["generate"] = round(time.time() - t2, 2)
    return result


def _compare_forward(result: dict[str, Any], cls: type, config: Any, model: Any, cand: Any, key: str, ref_main: Any) -> Any:
    """Run ``model``'s copy under ttpu on ``cand`` and compare with the eager output
    (into ``result``); the ttpu model, or None when it failed."""
    t1 = time.time()
    try:
        from ttpu.auto import AutoModelForTPU

        try:
            clone = copy.deepcopy(model)
        except Exception:  # noqa: BLE001
            clone = _build(cls, config)
            clone.load_state_dict(model.state_dict())
        tpu = AutoModelForTPU.from_model(clone)
        out = tpu(**copy.deepcopy(cand.inputs))
        actual = _pick(out, key)
        import jax

        actual = jax.device_get(actual)
    except Exception as exc:  # noqa: BLE001
        result["times"]["ttpu"] = round(time.time() - t1, 2)
        result.update(stage="ttpu", error=error_info(exc))
        return None
    result["times"]["ttpu"] = round(time.time() - t1, 2)
    result["compiles"] = True
    try:
        err = _relative_error(ref_main, actual, cand.mask)
    except Exception as exc:  # noqa: BLE001
        result.update(stage="compare", error=error_info(exc))
        return tpu
    result["rel_err"] = err
    result["matches"] = bool(err <= RTOL)
    if not result["matches"]:
        result["stage"] = "compare"
    return tpu


def _causal_lm_class(model_type: str) -> type | None:
    """The model type's causal-LM class in transformers' auto mappings, if any."""
    import transformers
    import transformers.models.auto.modeling_auto as auto

    name = auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    return getattr(transformers, name, None) if name else None


def _check_decoding_of_class(cls: type, config: Any) -> dict[str, dict[str, Any]]:
    """The generate and serve checks on ``cls`` (a causal LM other than the class the
    forward was compared on: BartForCausalLM beside BartForConditionalGeneration ...)."""
    try:
        config = config_for_class(cls, config)
        module = _build(cls, config)
        candidates, reason = input_candidates(module, config, causal=True)
        text = next((c for c in candidates if "input_ids" in c.inputs), None)
        if text is None:
            raise ValueError(f"no token inputs ({reason or 'the forward takes none'})")
        from ttpu.auto import AutoModelForTPU

        tpu = AutoModelForTPU.from_model(copy.deepcopy(module), task="causal-lm")
    except Exception as exc:  # noqa: BLE001
        failed = {"eager": False, "matches": False, "stage": "build", "error": error_info(exc)}
        return {"generate": failed, "serve": failed}
    return check_decoding(module, tpu, text.inputs)


def check_decoding(module: Any, tpu: Any, inputs: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Greedy decoding of the (left-padded) batch, transformers' ``generate`` on the eager
    module against ttpu's, token for token: ``generate`` (ttpu's static generate on the
    same batch) and ``serve`` (each row's prompt, unpadded, through the serving engine,
    against transformers' ``generate`` on that prompt alone, up to its first EOS). In
    each, ``eager`` says whether transformers' own runs (only then is ttpu's compared),
    ``matches`` whether the tokens are equal."""
    import numpy as np
    import torch

    if tpu is None:  # the forward did not compile: generate cannot either, but does eager's run?
        tpu = _Unavailable()
    ids, mask = inputs["input_ids"], inputs.get("attention_mask")
    mask = np.ones_like(ids) if mask is None else mask
    config = module.generation_config
    eos = config.eos_token_id
    pad = config.pad_token_id
    if pad is None:
        pad = (eos[0] if isinstance(eos, list) and eos else eos) if eos is not None else 0
    settings = {"max_new_tokens": GENERATE_TOKENS, "do_sample": False, "pad_token_id": int(pad)}
    check: dict[str, Any] = {"eager": False, "matches": False, "stage": "eager", "error": None}
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = module.generate(
                torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), **settings
            ).numpy()
            # The engine serves each prompt unpadded: its reference is transformers' generate
            # on each prompt alone (left padding shifts positions in models that count them
            # from 0).
            prompts = [row[np.asarray(m).astype(bool)].tolist() for row, m in zip(ids, mask)]
            served = [module.generate(torch.tensor([p]), **settings)[0, len(p) :].tolist() for p in prompts]
    except Exception as exc:  # noqa: BLE001
        check["error"] = error_info(exc)
        return {"generate": check, "serve": dict(check)}
    return {"generate": _check_generate(tpu, ids, mask, settings, expected),
            "serve": _check_serve(tpu, prompts, served, eos)}


def _check_generate(tpu: Any, ids: Any, mask: Any, settings: dict[str, Any], expected: Any) -> dict[str, Any]:
    import numpy as np

    check: dict[str, Any] = {"eager": True, "matches": False, "stage": "ttpu", "error": None}
    try:
        actual = np.asarray(tpu.generate(ids, attention_mask=mask, **settings))
    except Exception as exc:  # noqa: BLE001
        check["error"] = error_info(exc)
        return check
    check.update(stage="compare", matches=actual.shape == expected.shape and bool((actual == expected).all()))
    if not check["matches"]:
        check["tokens"] = {"transformers": expected.tolist(), "ttpu": actual.tolist()}
    else:
        check["stage"] = ""
    return check


def _check_serve(tpu: Any, prompts: list[list[int]], references: list[list[int]], eos: Any) -> dict[str, Any]:
    """The ``prompts`` through the serving engine (submitted together, a budget of 16
    tokens per step: longer prompts prefill in chunks where the engine chunks them)
    against transformers' tokens for each (``references``), up to its first EOS."""
    from ttpu.serving.engine import EngineConfig, LLMEngine
    from ttpu.serving.request import SamplingParams

    check: dict[str, Any] = {"eager": True, "matches": False, "stage": "ttpu", "error": None}
    eos_ids = set([eos] if isinstance(eos, int) else eos or [])
    wanted = []
    for row in references:
        end = next((i + 1 for i, t in enumerate(row) if t in eos_ids), len(row))
        wanted.append(row[:end])
    try:
        if isinstance(tpu, _Unavailable):
            raise RuntimeError(_Unavailable.REASON)
        config = EngineConfig(max_num_seqs=4, max_model_len=max(map(len, prompts)) + GENERATE_TOKENS,
                              max_num_batched_tokens=16, block_size=4)
        engine = LLMEngine(tpu, config)
        params = SamplingParams(temperature=0, max_tokens=GENERATE_TOKENS)
        requests = [engine.add_request(str(i), prompt, params) for i, prompt in enumerate(prompts)]
        while engine.has_unfinished_requests:
            engine.step()
    except Exception as exc:  # noqa: BLE001
        check["error"] = error_info(exc)
        return check
    failed = next((r.error for r in requests if r.error), None)
    if failed:  # a request that failed in its step (the engine goes on without raising)
        check["error"] = error_info(RuntimeError(failed))
        return check
    actual = [r.output_token_ids for r in requests]
    if engine.runner.recompute_reason:
        check["recomputes"] = engine.runner.recompute_reason
    check.update(stage="compare", matches=actual == wanted)
    if check["matches"]:
        check["stage"] = ""
    else:
        check["tokens"] = {"transformers": wanted, "ttpu": actual}
    return check


class _Unavailable:
    """Stands in for a ttpu model that could not be built: generate raises that."""

    REASON = "the model's forward does not compile under ttpu (see the forward column)"

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(self.REASON)
