"""ttpu.Trainer against transformers' Trainer: numerics, meshes, ZeRO stages, remat,
checkpoints (a real kill), export, LoRA, callbacks and argument checks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
import transformers

from ttpu import Trainer, TrainingArguments
from ttpu.errors import InvalidArgumentError

VOCAB = 64
ROOT = Path(__file__).resolve().parents[1]


def tiny(kind: str = "llama", **extra) -> transformers.PreTrainedModel:
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, **extra)
    torch.manual_seed(0)
    if kind == "gemma3":
        config = transformers.Gemma3TextConfig(head_dim=8, sliding_window=8, **common)  # tied embeddings
        return transformers.Gemma3ForCausalLM(config)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))


def dataset(size: int = 41, seed: int = 0) -> list[dict]:
    """Rows of unequal lengths whose first labels are sometimes ignored, so micro-batches
    hold unequal numbers of label tokens. 41 rows: an epoch ends with a partial
    micro-batch and a partial accumulation."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(size):
        n = int(rng.integers(5, 20))
        ids = rng.integers(1, VOCAB, n).tolist()
        labels = list(ids)
        for j in range(int(rng.integers(0, 4))):
            labels[j] = -100
        rows.append({"input_ids": ids, "attention_mask": [1] * n, "labels": labels})
    return rows


def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
    length = max(len(r["input_ids"]) for r in rows)
    return {
        key: torch.tensor([r[key] + [-100 if key == "labels" else 0] * (length - len(r[key])) for r in rows])
        for key in rows[0]
    }


COMMON = dict(
    per_device_train_batch_size=2, gradient_accumulation_steps=2, learning_rate=1e-2, warmup_steps=3,
    lr_scheduler_type="linear", weight_decay=0.01, max_grad_norm=1.0, max_steps=20, logging_steps=1,
    save_strategy="no", report_to="none", seed=42, disable_tqdm=True,
)


def run(model, output_dir, data=None, **overrides) -> Trainer:
    args = TrainingArguments(output_dir=str(output_dir), **{**COMMON, **overrides})
    trainer = Trainer(model, args, train_dataset=data or dataset(), data_collator=collate)
    trainer.train()
    return trainer


def losses(trainer) -> np.ndarray:
    return np.array([e["loss"] for e in trainer.state.log_history if "loss" in e])


def weights(trainer) -> dict[str, np.ndarray]:
    return {n: np.asarray(a) for n, a in trainer.forward.params.items()}


@pytest.fixture
def transformers_trainer(monkeypatch):
    """transformers' own Trainer in this process: accelerate's device-cache release
    trips on torchax's "jax" torch device, which has no caching allocator."""
    import accelerate.utils.memory

    monkeypatch.setattr(accelerate.utils.memory, "clear_device_cache", lambda *a, **k: None)
    return transformers.Trainer


@pytest.mark.parametrize("kind", ["llama", "gemma3", "mean-loss"])
def test_every_step_matches_transformers_trainer(kind, tmp_path, transformers_trainer):
    """"mean-loss": a model whose loss ignores num_items_in_batch (accepts_loss_kwargs
    False): both trainers average per micro-batch, and the epoch's last step, with fewer
    micro-batches, divides by its own count."""

    def model():
        module = tiny("llama" if kind == "mean-loss" else kind)
        if kind == "mean-loss":
            module.accepts_loss_kwargs = False
        return module

    reference = model()
    hf = transformers_trainer(
        model=reference, args=transformers.TrainingArguments(output_dir=str(tmp_path / "hf"), use_cpu=True, **COMMON),
        train_dataset=dataset(), data_collator=collate,
    )
    hf.train()
    ours = run(model(), tmp_path / "ttpu")
    theirs = [e for e in hf.state.log_history if "loss" in e]
    mine = [e for e in ours.state.log_history if "loss" in e]
    assert len(mine) == len(theirs) == 20
    for a, b in zip(theirs, mine):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
        assert b["learning_rate"] == a["learning_rate"]
        assert b["epoch"] == pytest.approx(a["epoch"])
        assert set(a) == set(b)
    final = reference.state_dict()
    for name, value in weights(ours).items():
        if name in final:
            np.testing.assert_allclose(value, final[name].numpy(), atol=1e-4, rtol=1e-4)
    assert ours.state.log_history[-1]["train_loss"] == pytest.approx(hf.state.log_history[-1]["train_loss"], rel=1e-4)
    assert ours.compile_count == 1


def test_meshes_and_zero_stages_give_the_same_run(tmp_path):
    """The same global batch (8 rows x 2 micro-batches) on one device, data=8, fsdp=8,
    data 2 x fsdp 4 and every ZeRO stage."""
    base = run(tiny(), tmp_path / "one", per_device_train_batch_size=8, max_steps=6)
    runs = {
        "data=8": dict(mesh={"data": 8}),
        "fsdp=8": dict(mesh={"fsdp": 8}),
        "2x4": dict(mesh={"data": 2, "fsdp": 4}),
        "zero1": dict(mesh={"data": 8}, zero_stage=1),
        "zero2": dict(mesh={"data": 8}, zero_stage=2),
        "zero3": dict(mesh={"data": 8}, zero_stage=3),
    }
    for name, options in runs.items():
        other = run(tiny(), tmp_path / name, per_device_train_batch_size=1, max_steps=6, **options)
        np.testing.assert_allclose(losses(other), losses(base), rtol=1e-5, err_msg=name)
        for key, value in weights(other).items():
            np.testing.assert_allclose(value, weights(base)[key], atol=1e-5, err_msg=f"{name}: {key}")


def test_accumulation_weights_micro_batches_by_label_tokens(tmp_path):
    big = run(tiny(), tmp_path / "big", per_device_train_batch_size=8, gradient_accumulation_steps=1, max_steps=3)
    small = run(tiny(), tmp_path / "small", per_device_train_batch_size=2, gradient_accumulation_steps=4, max_steps=3)
    counts = [int((np.array(r["labels"][1:]) != -100).sum()) for r in dataset()]
    assert len(set(counts)) > 1  # the micro-batches really hold unequal label counts
    np.testing.assert_allclose(losses(small), losses(big), rtol=1e-5)
    for key, value in weights(small).items():
        np.testing.assert_allclose(value, weights(big)[key], atol=1e-5)


def _bytes_on(arrays, device) -> int:
    return sum(s.data.nbytes for a in jax.tree.leaves(arrays) for s in a.addressable_shards if s.device == device)


def test_zero_stages_split_what_they_say(tmp_path):
    """Per-device bytes of the placed state, and the compiled step's arguments."""
    measured = {}
    for stage in range(4):
        trainer = run(tiny(), tmp_path / f"z{stage}", per_device_train_batch_size=1, max_steps=1, mesh={"data": 8},
                      zero_stage=stage)
        state = trainer.train_state
        device = jax.devices()[0]
        total_opt = sum(a.nbytes for a in jax.tree.leaves(state.opt_state))
        total_params = sum(a.nbytes for a in jax.tree.leaves(state.params))
        opt, params = _bytes_on(state.opt_state, device), _bytes_on(state.params, device)
        if stage >= 1:
            assert opt <= total_opt / 8 * 1.02 + 64, (stage, opt, total_opt)
        else:
            assert opt == total_opt
        assert params == (total_params / 8 if stage == 3 else total_params), (stage, params, total_params)
        measured[stage] = trainer._train_program.memory_analysis().argument_size_in_bytes
        assert losses(trainer)[0] == pytest.approx(losses(run(tiny(), tmp_path / "one", max_steps=1,
                                                               per_device_train_batch_size=8))[0], rel=1e-5)
    assert measured[0] > measured[1] > measured[3]


def test_gradient_checkpointing_recomputes_layers(tmp_path):
    """jax.checkpoint around every decoder layer: the compiled step's temporary memory
    drops by at least 30% on a model whose activations dominate it (8 layers, 32 x 64
    tokens), and the loss is unchanged. XLA:CPU's default concurrency-optimized
    scheduler runs the recomputations early, which cancels the saving; the test compiles
    without it (TPU and GPU schedulers are memory-aware)."""
    script = textwrap.dedent(f"""
        import numpy as np, torch, transformers, json
        from ttpu import Trainer, TrainingArguments
        config = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=1024, num_hidden_layers=8,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0)
        rng = np.random.default_rng(0)
        data = [{{"input_ids": (ids := rng.integers(1, 64, 64).tolist()), "labels": ids}} for _ in range(32)]
        temp = {{}}
        for checkpointing in (False, True):
            torch.manual_seed(0)
            args = TrainingArguments(output_dir="{tmp_path}", per_device_train_batch_size=32, max_steps=1,
                gradient_checkpointing=checkpointing, report_to="none", disable_tqdm=True, save_strategy="no",
                logging_steps=1)
            trainer = Trainer(transformers.LlamaForCausalLM(config), args, train_dataset=data,
                data_collator=lambda rows: {{k: torch.tensor([r[k] for r in rows]) for k in rows[0]}})
            trainer.train()
            temp[checkpointing] = [trainer._train_program.memory_analysis().temp_size_in_bytes,
                                   trainer.state.log_history[0]["loss"]]
        print(json.dumps(temp))
    """)
    env = {**os.environ, "XLA_FLAGS": "--xla_cpu_enable_concurrency_optimized_scheduler=false"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    temp = json.loads(out.stdout.strip().splitlines()[-1])
    (plain, plain_loss), (remat, remat_loss) = temp["false"], temp["true"]
    assert remat_loss == pytest.approx(plain_loss, rel=1e-6)
    assert remat <= 0.7 * plain, (remat, plain)


KILLED_RUN = """
import os, signal, sys
sys.path.insert(0, {tests!r})
import transformers
from test_training import tiny, dataset, collate, COMMON
from ttpu import Trainer, TrainingArguments

class Kill(transformers.TrainerCallback):
    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == {kill_at}:
            {before_kill}
            os.kill(os.getpid(), signal.SIGKILL)

args = TrainingArguments(output_dir={out!r}, **{{**COMMON, "max_steps": 10, "save_strategy": "steps", "save_steps": 5}})
trainer = Trainer(tiny(), args, train_dataset=dataset(), data_collator=collate, callbacks=[Kill()])
{patch}
trainer.train()
"""


def killed_run(out: Path, kill_at: int, before_kill: str = "pass", patch: str = "") -> None:
    script = KILLED_RUN.format(tests=str(ROOT / "tests"), out=str(out), kill_at=kill_at, before_kill=before_kill,
                               patch=patch)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode == -signal.SIGKILL, result.stderr[-6000:]


def test_resume_after_a_kill_continues_the_unbroken_run(tmp_path):
    unbroken = run(tiny(), tmp_path / "unbroken", max_steps=10)
    out = tmp_path / "killed"
    killed_run(out, kill_at=7, before_kill="trainer._checkpoints.wait()")
    assert transformers.trainer_utils.get_last_checkpoint(str(out)).endswith("checkpoint-5")
    state = json.loads((out / "checkpoint-5" / "trainer_state.json").read_text())
    assert state["global_step"] == 5 and len([e for e in state["log_history"] if "loss" in e]) == 5
    again = Trainer(tiny(), TrainingArguments(output_dir=str(out), **{**COMMON, "max_steps": 10}),
                    train_dataset=dataset(), data_collator=collate)
    again.train(resume_from_checkpoint=str(out / "checkpoint-5"))
    assert [e["step"] for e in again.state.log_history if "loss" in e] == list(range(1, 11))
    np.testing.assert_allclose(losses(again), losses(unbroken), rtol=1e-6)
    for key, value in weights(again).items():
        np.testing.assert_allclose(value, weights(unbroken)[key], atol=1e-6)


KILL_BEFORE_COMMIT = """
import orbax.checkpoint._src.path.atomicity as atomicity
finalize = atomicity.AtomicRenameTemporaryPath.finalize
async def killing_finalize(self, *args, **kwargs):
    if "checkpoint-10" in str(self.get_final()):
        os.kill(os.getpid(), signal.SIGKILL)  # every file of checkpoint-10 written, not yet committed
    return await finalize(self, *args, **kwargs)
atomicity.AtomicRenameTemporaryPath.finalize = killing_finalize
"""


def test_a_save_killed_midway_leaves_the_previous_checkpoint_latest(tmp_path):
    out = tmp_path / "run"
    killed_run(out, kill_at=-1, patch=KILL_BEFORE_COMMIT)
    names = sorted(p.name for p in out.iterdir())
    assert any(n.startswith("checkpoint-10.") for n in names), names  # the unfinished write is there
    assert transformers.trainer_utils.get_last_checkpoint(str(out)).endswith("checkpoint-5")
    resumed = Trainer(tiny(), TrainingArguments(output_dir=str(out), **{**COMMON, "max_steps": 10}),
                      train_dataset=dataset(), data_collator=collate)
    resumed.train(resume_from_checkpoint=True)
    assert [e["step"] for e in resumed.state.log_history if "loss" in e][4:] == list(range(5, 11))
    assert not any(p.name.startswith("checkpoint-10.") for p in out.iterdir())  # orbax cleans it up


def test_save_total_limit_keeps_the_newest(tmp_path):
    trainer = run(tiny(), tmp_path, max_steps=8, save_strategy="steps", save_steps=2, save_total_limit=2)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("checkpoint")) == [
        "checkpoint-6", "checkpoint-8"]
    assert json.loads((tmp_path / "checkpoint-8" / "trainer_state.json").read_text())["global_step"] == 8
    assert trainer.compile_count == 1


PLAIN_TRANSFORMERS = """
import sys, json, numpy as np, torch, transformers
assert "ttpu" not in sys.modules
model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1])
tied = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
logits = model(torch.tensor([[5, 6, 7, 8, 9]])).logits.detach().numpy()
np.save(sys.argv[2], logits)
print(json.dumps({"tied": tied}))
"""


def test_save_model_loads_with_plain_transformers(tmp_path):
    trainer = run(tiny("gemma3"), tmp_path / "run", max_steps=3)
    saved = trainer.save_model(tmp_path / "final")
    assert (saved / "model.safetensors").is_file() and (saved / "config.json").is_file()
    result = subprocess.run([sys.executable, "-c", PLAIN_TRANSFORMERS, str(saved), str(tmp_path / "logits.npy")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"tied": True}
    ours = trainer.forward({"input_ids": jax.numpy.asarray([[5, 6, 7, 8, 9]])}, {}).logits
    np.testing.assert_allclose(np.load(tmp_path / "logits.npy"), np.asarray(ours), atol=1e-5)


def test_lora_trains_only_the_adapter(tmp_path):
    import peft

    model = peft.get_peft_model(tiny(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainer = run(model, tmp_path / "run", max_steps=4, learning_rate=5e-2)
    assert trainer.trainable_names and all(".lora_A." in n or ".lora_B." in n for n in trainer.trainable_names)
    assert set(trainer.train_state.params) == set(trainer.trainable_names)
    for leaf in jax.tree.leaves(trainer.train_state.opt_state):  # Adam moments of adapter weights only
        assert leaf.size <= max(trainer.train_state.params[n].size for n in trainer.trainable_names)
    for name, before in frozen_before.items():
        assert np.array_equal(np.asarray(trainer.forward.params[name]), before.numpy()), name
    trained_b = [np.asarray(a) for n, a in trainer.train_state.params.items() if ".lora_B." in n]
    assert all(np.abs(b).max() > 0 for b in trained_b)  # PEFT starts B at zero

    saved = trainer.save_model(tmp_path / "adapter")
    assert (saved / "adapter_model.safetensors").is_file() and not (saved / "model.safetensors").exists()
    loaded = peft.PeftModel.from_pretrained(tiny(), saved).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    ours = np.asarray(trainer.forward({"input_ids": jax.numpy.asarray(ids.numpy())}, {}).logits)
    np.testing.assert_allclose(loaded(input_ids=ids).logits.detach().numpy(), ours, atol=1e-5)
    merged = loaded.merge_and_unload()
    np.testing.assert_allclose(merged(input_ids=ids).logits.detach().numpy(), ours, atol=1e-5)


class Recorder(transformers.TrainerCallback):
    def __init__(self) -> None:
        self.events: list[str] = []

    def __getattribute__(self, name):
        if name.startswith("on_"):
            events = object.__getattribute__(self, "events")
            return lambda *args, **kwargs: events.append(name)
        return object.__getattribute__(self, name)


def test_callbacks_metrics_and_log_history_as_transformers(tmp_path, transformers_trainer):
    def compute_metrics(prediction):
        logits, labels = prediction
        predicted = logits[:, :-1].argmax(-1)
        kept = labels[:, 1:] != -100
        return {"accuracy": float((predicted == labels[:, 1:])[kept].mean())}

    options = dict(COMMON, max_steps=6, eval_strategy="steps", eval_steps=3, logging_steps=2, save_strategy="steps",
                   save_steps=3, per_device_eval_batch_size=4)
    runs = {}
    for name, cls, arguments, model in [
        ("hf", transformers_trainer, transformers.TrainingArguments, tiny()),
        ("ttpu", Trainer, TrainingArguments, tiny()),
    ]:
        recorder = Recorder()
        args = arguments(output_dir=str(tmp_path / name), **options, **({"use_cpu": True} if name == "hf" else {}))
        trainer = cls(model=model, args=args, train_dataset=dataset(), eval_dataset=dataset(10, seed=1),
                      data_collator=collate, compute_metrics=compute_metrics, callbacks=[recorder])
        trainer.train()
        runs[name] = (trainer, recorder.events)
    (hf, hf_events), (ours, our_events) = runs["hf"], runs["ttpu"]
    assert our_events == hf_events
    hf_keys = [sorted(e) for e in hf.state.log_history]
    assert [sorted(e) for e in ours.state.log_history] == hf_keys
    for a, b in zip(hf.state.log_history, ours.state.log_history):
        for key in ("loss", "eval_loss", "eval_accuracy", "learning_rate", "grad_norm"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4), key
    assert ours.compile_count == 2  # one train step, one eval step, over logging, eval and save boundaries


def test_arguments_keep_transformers_fields_and_refuse_the_rest(tmp_path):
    hf = transformers.TrainingArguments(output_dir=str(tmp_path), learning_rate=3e-4, warmup_steps=5,
                                        lr_scheduler_type="cosine", per_device_train_batch_size=3)
    ours = TrainingArguments(**{k: v for k, v in hf.to_dict().items() if k in
                                ("output_dir", "learning_rate", "warmup_steps", "lr_scheduler_type",
                                 "per_device_train_batch_size")})
    assert (ours.learning_rate, ours.warmup_steps, ours.lr_scheduler_type) == (3e-4, 5, hf.lr_scheduler_type)
    with pytest.raises(InvalidArgumentError, match="torch_compile=True"):
        TrainingArguments(output_dir=str(tmp_path), torch_compile=True)
    with pytest.raises(InvalidArgumentError, match="optim"):
        TrainingArguments(output_dir=str(tmp_path), optim="sgd")
    with pytest.raises(InvalidArgumentError, match="zero_stage"):
        TrainingArguments(output_dir=str(tmp_path), zero_stage=4)
    with pytest.raises(InvalidArgumentError, match="offload_optimizer"):
        TrainingArguments(output_dir=str(tmp_path), deepspeed={"zero_optimization": {
            "stage": 3, "offload_optimizer": {"device": "cpu"}}})
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": 2,
                                  "gradient_accumulation_steps": 4, "gradient_clipping": 0.5,
                                  "bf16": {"enabled": "auto"}, "train_batch_size": 64}))
    args = TrainingArguments(output_dir=str(tmp_path), deepspeed=str(config), parallelism="dp")
    assert (args.zero_stage, args.per_device_train_batch_size, args.gradient_accumulation_steps,
            args.max_grad_norm, args.bf16) == (2, 2, 4, 0.5, False)
    args.check_batch(8)
    with pytest.raises(InvalidArgumentError, match="train_batch_size=64"):
        args.check_batch(4)
    assert TrainingArguments(output_dir=str(tmp_path), fsdp="full_shard").zero_stage == 3


def test_dropout_draws_a_new_mask_every_step_from_the_seed(tmp_path):
    def run_with(seed: int) -> np.ndarray:
        return losses(run(tiny(attention_dropout=0.5), tmp_path / str(seed), max_steps=4, seed=seed, data_seed=0))

    first, again, other = run_with(1), run_with(1), run_with(2)
    np.testing.assert_array_equal(first, again)
    assert np.abs(first - other).max() > 1e-4  # same data, same start, other masks
    trainer = run(tiny(attention_dropout=0.5), tmp_path / "masks", max_steps=1)
    steps, params = trainer._steps, trainer.train_state.params
    batch = {k: jax.numpy.asarray(v[0]) for k, v in trainer._batches(dataset(), 2, 1, False).epoch(
        list(range(40))).__next__().arrays.items()}

    def loss(key):
        return float(steps._loss(params, trainer._frozen(), batch, jax.numpy.float32(20), key, True)[0])

    assert loss(jax.random.key(3)) == loss(jax.random.key(3)) != loss(jax.random.key(4))


def test_dropout_under_gradient_checkpointing(tmp_path):
    """Each recomputed layer draws its dropout from a key passed into its checkpoint."""
    plain = losses(run(tiny(attention_dropout=0.5), tmp_path / "plain", max_steps=3))
    recomputed = losses(run(tiny(attention_dropout=0.5), tmp_path / "remat", max_steps=3, gradient_checkpointing=True))
    assert np.all(np.isfinite(recomputed)) and np.abs(plain - recomputed).max() < 0.5


def test_rerunning_into_the_same_directory_overwrites_its_checkpoints(tmp_path):
    run(tiny(), tmp_path, max_steps=4, save_strategy="steps", save_steps=2, save_total_limit=0)
    again = run(tiny(), tmp_path, max_steps=4, save_strategy="steps", save_steps=2, save_total_limit=0)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("checkpoint")) == [
        "checkpoint-2", "checkpoint-4"]  # 0 keeps all, as transformers
    assert again.state.log_history[-1]["train_loss"] == pytest.approx(np.mean(losses(again)))


def test_bad_data_gets_clear_errors(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), **{**COMMON, "max_steps": 1})
    with pytest.raises(InvalidArgumentError, match="tokenized 'input_ids'"):
        Trainer(tiny(), args, train_dataset=[{"text": "hello"}], data_collator=collate).train()
    floats = [{"input_ids": [1, 2, 3], "labels": [0.5, 0.5, 0.5]}]
    with pytest.raises(InvalidArgumentError, match="float"):
        Trainer(tiny(), args, train_dataset=floats, data_collator=collate).train()
    without_labels = [{"input_ids": [1, 2, 3], "attention_mask": [1, 1, 1]}] * 4
    with pytest.raises(Exception, match="returned no loss"):
        Trainer(tiny(), args, train_dataset=without_labels, data_collator=collate).train()
    with pytest.raises(InvalidArgumentError, match="needs an eval_dataset"):
        Trainer(tiny(), TrainingArguments(output_dir=str(tmp_path), eval_strategy="steps"), train_dataset=dataset())


def test_bf16_computes_in_bf16_and_keeps_float32_state(tmp_path):
    full = run(tiny(), tmp_path / "f32", max_steps=5)
    half = run(tiny(), tmp_path / "bf16", max_steps=5, bf16=True)
    assert all(a.dtype == np.float32 for a in jax.tree.leaves(half.train_state.params))
    assert all(a.dtype in (np.float32, np.int32) for a in jax.tree.leaves(half.train_state.opt_state))
    np.testing.assert_allclose(losses(half), losses(full), rtol=2e-2)
    assert "bf16" in half._train_program.as_text()


class StopAt(transformers.TrainerCallback):
    """Save and stop after step ``step``, as a preempted job would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_save = control.should_training_stop = True
        return control


def test_resume_onto_other_meshes_continues_the_run(tmp_path):
    """Steps 1-4 on data=8 (ZeRO-3), 5-7 on data 2 x fsdp 4, 8-10 on one device: the
    losses and weights of one unbroken run on one device."""
    unbroken = run(tiny(), tmp_path / "unbroken", max_steps=10, per_device_train_batch_size=8)
    out = tmp_path / "moved"
    segments = [(4, dict(mesh={"data": 8}, zero_stage=3, per_device_train_batch_size=1)),
                (7, dict(mesh={"data": 2, "fsdp": 4}, per_device_train_batch_size=1)),
                (10, dict(per_device_train_batch_size=8))]
    for stop, options in segments:
        args = TrainingArguments(output_dir=str(out), **{**COMMON, "max_steps": 10, **options})
        trainer = Trainer(tiny(), args, train_dataset=dataset(), data_collator=collate, callbacks=[StopAt(stop)])
        trainer.train(resume_from_checkpoint=True)
    assert [e["step"] for e in trainer.state.log_history if "loss" in e] == list(range(1, 11))
    np.testing.assert_allclose(losses(trainer), losses(unbroken), rtol=1e-5)
    for key, value in weights(trainer).items():
        np.testing.assert_allclose(value, weights(unbroken)[key], atol=1e-5)
