"""Warm start: traced programs are exported into the program store, and a later process
compiles them without tracing; anything that changes a program changes its key."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from ttpu.backends.jax import program_store
from ttpu.backends.jax.program_store import ProgramStore, StoredProgram
from ttpu.paths import PROGRAM_CACHE_ENV

# A fresh process: a tiny Llama (fixed weights), one padded forward and one greedy
# generation. argv: the config's rms_norm_eps, and "forbid" to make tracing fail.
RUN = """
import json, sys
import numpy as np, torch, transformers
from ttpu import AutoModelForTPU
from ttpu.backends.jax.backend import JaxForward

if sys.argv[2] == "forbid":
    def refuse(*args, **kwargs):
        raise AssertionError("traced although the programs are stored")
    JaxForward.call_traced = refuse
config = transformers.LlamaConfig(
    vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=float(sys.argv[1]),
)
torch.manual_seed(0)
model = AutoModelForTPU.from_model(transformers.LlamaForCausalLM(config).eval())
ids = np.array([[5, 6, 7, 8, 9]])
logits = np.asarray(model(input_ids=ids).logits)
tokens = model.generate(ids, max_new_tokens=6, do_sample=False)
warmed = model.compiled_forward.program_store.warm_up.taken  # compiled while the model loaded
print(json.dumps({"traces": model.trace_count, "warmed": warmed, "logits": logits.round(5).tolist(), "tokens": tokens.tolist()}))
"""


def run(store: Path, eps: str = "1e-6", forbid: bool = False) -> dict:
    env = {**os.environ, PROGRAM_CACHE_ENV: str(store)}
    done = subprocess.run(
        [sys.executable, "-c", RUN, eps, "forbid" if forbid else "allow"],
        env=env, capture_output=True, text=True, cwd=Path(__file__).parent.parent,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def stored_files(store: Path) -> list[Path]:
    return sorted(store.rglob("*.program"))


@pytest.fixture(scope="module")
def first_run(tmp_path_factory) -> tuple[Path, dict]:
    """A store written by a first process, and what that process returned."""
    store = tmp_path_factory.mktemp("first") / "programs"
    return store, run(store)


def copy_of_first(first_run: tuple[Path, dict], tmp_path: Path) -> tuple[Path, dict]:
    """A copy of the first process's store (a test's own to change) and its result."""
    store = tmp_path / "programs"
    shutil.copytree(first_run[0], store)
    return store, first_run[1]


def test_second_process_runs_stored_programs_without_tracing(first_run, tmp_path) -> None:
    store, first = copy_of_first(first_run, tmp_path)
    assert first["traces"] >= 3  # forward, prefill, decode loop
    files = stored_files(store)
    assert len(files) >= 5  # those, the forward's output shapes and the cache layout
    second = run(store, forbid=True)  # tracing would raise
    # The forward, prefill and decode loop were compiled (and run once) while it loaded.
    assert first["warmed"] == 0 and second["warmed"] == 3
    assert second == {**first, "traces": 0, "warmed": 3}
    assert stored_files(store) == files
    # A changed model (same shapes, another constant) misses and traces again.
    changed = run(store, eps="1e-5")
    assert changed["traces"] == first["traces"] and changed["warmed"] == 0
    assert changed["logits"] != first["logits"]


def test_unreadable_entries_are_replaced(first_run, tmp_path) -> None:
    store, first = copy_of_first(first_run, tmp_path)
    for path in stored_files(store):
        path.write_bytes(b"not a program")
    again = run(store)
    assert again == first  # every program traced again (the warm-up found none readable)
    assert run(store, forbid=True) == {**first, "traces": 0, "warmed": 3}  # and stored anew


def test_store_key_changes_with_every_component(monkeypatch, tmp_path) -> None:
    base_context = program_store.environment_context()
    model = {"config": "{}", "weights": [("w", (2, 2), "float32", "replicated")]}
    keys = set()

    def key(environment: dict, context: dict, name: str = "forward", signature: object = ("sig",)) -> str:
        monkeypatch.setattr(program_store, "environment_context", lambda: environment)
        return ProgramStore(tmp_path, context).key(name, signature)

    keys.add(key(base_context, model))
    variants = [
        ({**base_context, "ttpu": "other source"}, model),
        ({**base_context, "devices": [("tpu", "v5e")]}, model),
        ({**base_context, "x64": not base_context["x64"]}, model),
        ({**base_context, "format": -1}, model),
        ({**base_context, "versions": {**base_context["versions"], "jax": "0.0.1"}}, model),
        ({**base_context, "versions": {**base_context["versions"], "transformers": "5.0.0"}}, model),
        ({**base_context, "versions": {**base_context["versions"], "torchax": "9"}}, model),
        ({**base_context, "versions": {**base_context["versions"], "torch": "1.0"}}, model),
        (base_context, {**model, "config": '{"rms_norm_eps": 1e-5}'}),
        (base_context, {**model, "weights": [("w", (2, 2), "bfloat16", "replicated")]}),
        (base_context, {**model, "weights": [("w", (2, 2), "float32", "split over tensor")]}),
    ]
    for environment, context in variants:
        keys.add(key(environment, context))
    keys.add(key(base_context, model, name="prefill"))
    keys.add(key(base_context, model, signature=("other bucket",)))
    assert len(keys) == len(variants) + 3
    assert set(base_context["versions"]) >= {"transformers", "torch", "torchax", "jax", "jaxlib"}


def test_model_context_sees_code_patches_and_constants() -> None:
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1,
    )
    module = transformers.LlamaForCausalLM(config).eval()
    params = {"w": jax.numpy.zeros((2,))}
    base = program_store.model_context(module, params, frozenset())
    mlp = module.model.layers[0].mlp
    mlp.forward = lambda x: x * 2
    overridden = program_store.model_context(module, params, frozenset())
    mlp.forward = lambda x: x * 3
    other_override = program_store.model_context(module, params, frozenset())
    assert len({base["code"], overridden["code"], other_override["code"]}) == 3
    del mlp.forward
    setattr(module, program_store.APPLIED_PATCHES_ATTRIBUTE, ("some_patch",))
    assert program_store.model_context(module, params, frozenset())["code"] != base["code"]
    module.model.rotary_emb.inv_freq.mul_(2)  # a buffer baked into programs as a constant
    assert program_store.model_context(module, params, frozenset())["constants"] != base["constants"]
    assert base == program_store.model_context(transformers.LlamaForCausalLM(config).eval(), params, frozenset())


class RunsACommand:
    def __reduce__(self):
        return (os.system, ("echo unpickled",))


def test_unpickler_refuses_functions(tmp_path) -> None:
    import pickle

    store = ProgramStore(tmp_path, {})
    key = store.key("p", ())
    store.save(key, StoredProgram(None, jax.tree.structure([1]), (((), "float32"),)))
    assert store.load(key) is not None
    path = next(tmp_path.rglob("*.program"))
    path.write_bytes(pickle.dumps(RunsACommand()))
    assert store.load(key) is None  # refused, and the entry deleted
    assert not path.exists()
