"""``ttpu serve`` started on 127.0.0.1 by the test (a tiny random Llama saved with a small
BPE tokenizer trained on local text), talked to with the official ``openai`` client:
completions and chat, streaming and not, sync and async, usage, errors, metrics, a
client that hangs up mid-stream; and a tiny hybrid model (Qwen3-Next) served the same way."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import httpx
import numpy as np
import openai
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

MODEL = "tiny"


class Server(NamedTuple):
    url: str
    pid: int

    def rss_mib(self) -> float:
        """The server process's resident memory."""
        status = Path(f"/proc/{self.pid}/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS"))) / 1024
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m.role }}: {{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant:{% endif %}"
)


def _tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    text = importlib.metadata.metadata("transformers").get_payload()  # local prose: its long description
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator([text], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> tuple[Path, LlamaForCausalLM, PreTrainedTokenizerFast]:
    directory = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = _tokenizer()
    config = LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    torch.manual_seed(0)
    module = LlamaForCausalLM(config).eval()
    module.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory, module, tokenizer


@contextlib.contextmanager
def serving(directory: Path, max_model_len: int = 1024) -> Iterator[Server]:
    """``ttpu serve`` on the model saved in ``directory``, started on a free local port,
    until the block ends."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(directory / "server.log", "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "ttpu.cli", "serve", str(directory), "--served-model-name", MODEL, "--port", str(port),
         "--max-num-seqs", "8", "--max-model-len", str(max_model_len), "--max-num-batched-tokens", "64", "--block-size", "8",
         "--dtype", "float32"],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail("ttpu serve exited:\n" + (directory / "server.log").read_text()[-3000:])
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.5)
    else:
        process.kill()
        pytest.fail("ttpu serve did not start:\n" + (directory / "server.log").read_text()[-3000:])
    yield Server(base, process.pid)
    process.terminate()
    process.wait(timeout=30)
    log.close()


@pytest.fixture(scope="module")
def server(saved_model):
    with serving(saved_model[0]) as running:
        yield running


def expected_text(saved_model, prompt_ids: list[int], new_tokens: int) -> str:
    _, module, tokenizer = saved_model
    with torch.no_grad():
        out = module.generate(torch.tensor([prompt_ids]), max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return tokenizer.decode(out[0, len(prompt_ids) :], skip_special_tokens=True)


def test_models_health_and_greedy_completion(server, saved_model) -> None:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
    assert [m.id for m in client.models.list().data] == [MODEL]
    prompt = "The library provides"
    done = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    ids = saved_model[2](prompt)["input_ids"]
    assert done.choices[0].text == expected_text(saved_model, ids, 12)
    assert done.usage.prompt_tokens == len(ids) and done.usage.completion_tokens <= 12


def test_chat_streams_the_same_text_with_usage(server, saved_model) -> None:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
    messages = [{"role": "user", "content": "Say something about models."}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=10, temperature=0, stream=True, stream_options={"include_usage": True}
    ))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_concurrent_async_requests(server, saved_model) -> None:
    async def run() -> list[str]:
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none")
        prompts = ["Hugging Face", "transformers models", "A", "state-of-the-art machine learning for"]
        answers = await asyncio.gather(*(
            client.completions.create(model=MODEL, prompt=p, max_tokens=8, temperature=0) for p in prompts
        ))
        return prompts, [a.choices[0].text for a in answers]

    prompts, texts = asyncio.run(run())
    tokenizer = saved_model[2]
    assert texts == [expected_text(saved_model, tokenizer(p)["input_ids"], 8) for p in prompts]


def test_bad_requests_get_openai_errors_and_the_server_goes_on(server) -> None:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model=MODEL, prompt="x", temperature=-1)
    with pytest.raises(openai.BadRequestError, match="maximum context length is 1024"):
        client.completions.create(model=MODEL, prompt="x", max_tokens=1500)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model=MODEL, prompt="x", max_tokens=0)
    with pytest.raises(openai.BadRequestError, match="role"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "wizard", "content": "x"}])
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="other", prompt="x")
    bad_json = httpx.post(server.url + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert bad_json.status_code == 400 and "error" in bad_json.json()
    assert client.completions.create(model=MODEL, prompt="still", max_tokens=2).choices[0].text is not None


def test_a_client_hanging_up_mid_stream_frees_its_request(server) -> None:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
    stream = client.completions.create(
        model=MODEL, prompt="Go on", max_tokens=1000, stream=True, extra_body={"min_tokens": 1000}
    )
    for _, _ in zip(range(3), stream):
        pass
    stream.close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        metrics = httpx.get(server.url + "/metrics").text
        if "ttpu:num_requests_running 0.0" in metrics and "ttpu:kv_cache_blocks_used 0.0" in metrics:
            break
        time.sleep(0.2)
    else:
        pytest.fail("the hung-up request still holds the engine:\n" + metrics)
    assert 'ttpu:request_success_total{finished_reason="abort"} 1.0' in metrics
    assert "ttpu:time_to_first_token_seconds_count" in metrics


def _reference_logprobs(saved_model, prompt_ids: list[int], new_tokens: int) -> list[torch.Tensor]:
    _, module, _ = saved_model
    with torch.no_grad():
        out = module.generate(torch.tensor([prompt_ids]), max_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                              output_logits=True, return_dict_in_generate=True)
    return [torch.log_softmax(step[0].float(), -1) for step in out.logits]


def test_logprobs_in_both_response_shapes(server, saved_model) -> None:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
    prompt = "The library provides"
    ids = saved_model[2](prompt)["input_ids"]
    reference = _reference_logprobs(saved_model, ids, 6)
    done = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0, logprobs=2)
    logprobs = done.choices[0].logprobs
    n = done.usage.completion_tokens
    expected = [float(step.max()) for step in reference[:n]]  # greedy: each token is its step's most likely
    np.testing.assert_allclose(logprobs.token_logprobs, expected, atol=1e-4)
    assert [len(top) for top in logprobs.top_logprobs] == [2] * n and "".join(logprobs.tokens) == done.choices[0].text
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0,
        logprobs=True, top_logprobs=3, stream=True,
    )
    content = [entry for chunk in chat if chunk.choices and chunk.choices[0].logprobs
               for entry in chunk.choices[0].logprobs.content]
    assert content and all(len(e.top_logprobs) == 3 and e.top_logprobs[0].logprob == e.logprob for e in content)


def test_n_sequences_stream_side_by_side_and_equal_the_whole_answer(server) -> None:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
    args = dict(model=MODEL, prompt="Models", max_tokens=8, temperature=1.0, seed=5, n=3, extra_body={"min_tokens": 8})
    whole = client.completions.create(**args)
    chunks = [c for c in client.completions.create(**args, stream=True) if c.choices]
    texts = {i: "".join(c.choices[0].text for c in chunks if c.choices[0].index == i) for i in range(3)}
    assert texts == {c.index: c.text for c in whole.choices} and len(set(texts.values())) > 1
    order = [c.choices[0].index for c in chunks]
    assert order != sorted(order)  # the forks ran together, not one after another


def test_a_refused_field_answers_400_before_a_stream_starts(server) -> None:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="logprobs=50"):
        client.completions.create(model=MODEL, prompt="x", logprobs=50, stream=True)
    with pytest.raises(openai.BadRequestError, match="top_logprobs needs logprobs"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], top_logprobs=2)


def test_soak_1000_requests_at_64_concurrent(server) -> None:
    """0 errors, every block free after the drain, and the server's memory flat between
    the first and the last 100 requests."""

    async def run() -> tuple[list, list[float]]:
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)
        gate, done, rss = asyncio.Semaphore(64), [0], []
        rng = np.random.default_rng(0)
        settings = [(int(rng.integers(1, 60)), int(rng.integers(1, 12)), bool(rng.integers(0, 2))) for _ in range(1000)]

        async def one(seed: int, words: int, max_tokens: int, stream: bool) -> str | None:
            args = dict(model=MODEL, prompt="models " * words, max_tokens=max_tokens, temperature=0.7, seed=seed)
            async with gate:
                if stream:
                    chunks = [c async for c in await client.completions.create(**args, stream=True) if c.choices]
                    reason = chunks[-1].choices[0].finish_reason
                else:
                    reason = (await client.completions.create(**args)).choices[0].finish_reason
            done[0] += 1
            if done[0] in (100, 1000):
                rss.append(server.rss_mib())
            return reason

        results = await asyncio.gather(*(one(i, *s) for i, s in enumerate(settings)), return_exceptions=True)
        return [r for r in results if r not in ("stop", "length")], rss

    errors, rss = asyncio.run(run())
    assert errors == []
    metrics = httpx.get(server.url + "/metrics").text
    assert "ttpu:num_requests_running 0.0" in metrics and "ttpu:kv_cache_blocks_used 0.0" in metrics
    first, last = rss
    print(f"server RSS after 100 requests: {first:.0f} MiB, after 1000: {last:.0f} MiB")
    assert last - first < 64, (first, last)


def _aborted(server) -> float:
    metrics = httpx.get(server.url + "/metrics").text
    found = re.search(r'ttpu:request_success_total\{finished_reason="abort"\} ([0-9.]+)', metrics)
    return float(found.group(1)) if found else 0.0


def _engine_idle(server, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        metrics = httpx.get(server.url + "/metrics").text
        if "ttpu:num_requests_running 0.0" in metrics and "ttpu:kv_cache_blocks_used 0.0" in metrics:
            return metrics
        time.sleep(0.2)
    pytest.fail("a request whose client left still holds the engine:\n" + metrics)


def test_a_client_leaving_a_non_streaming_request_aborts_it(server) -> None:
    """No byte of a non-streaming response is sent before the end: the server notices
    the hang-up by watching the connection."""
    before = _aborted(server)
    body = json.dumps({"model": MODEL, "prompt": "Go on", "max_tokens": 1000, "min_tokens": 1000}).encode()
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as connection:
        connection.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        deadline = time.monotonic() + 30
        while "ttpu:num_requests_running 1.0" not in httpx.get(server.url + "/metrics").text:
            assert time.monotonic() < deadline, "the request never started"
            time.sleep(0.05)
    _engine_idle(server)
    assert _aborted(server) == before + 1


def test_an_abort_that_raises_leaves_the_engine_serving(saved_model, monkeypatch) -> None:
    """A release whose abort raises (run by the engine thread) returns with that error,
    and the engine thread goes on serving the next request (beside the one it failed to
    abort)."""
    from ttpu import LLM, AutoModelForTPU, SamplingParams
    from ttpu.serving.server import AsyncEngine

    llm = LLM(AutoModelForTPU.from_pretrained(saved_model[0]), max_num_seqs=2, max_model_len=256, block_size=8)
    engine = AsyncEngine(llm)

    def broken_abort(request_id: str) -> None:
        raise RuntimeError("abort failed")

    async def collect(submission) -> list[int]:
        return [u async for u in engine.updates(submission)][-1].token_ids

    async def run() -> list[int]:
        first = await engine.submit([1, 2, 3], SamplingParams(max_tokens=200, min_tokens=200))
        with monkeypatch.context() as patched:
            patched.setattr(llm.engine, "abort", broken_abort)
            raised: list[Exception] = []

            def release() -> None:
                try:
                    engine.release(first)
                except RuntimeError as error:
                    raised.append(error)

            releasing = threading.Thread(target=release, daemon=True)  # not joined at exit
            releasing.start()
            await asyncio.to_thread(releasing.join, 30)
            assert not releasing.is_alive(), "the release never returned"
            assert [str(e) for e in raised] == ["abort failed"]
        second = await engine.submit([4, 5], SamplingParams(max_tokens=3))
        return await asyncio.wait_for(collect(second), timeout=60)

    try:
        assert len(asyncio.run(run())) == 3
        assert engine.alive
    finally:
        engine.shutdown()


def test_a_stream_abandoned_before_its_response_starts_is_aborted(saved_model) -> None:
    """The client is gone by the time the response would start (the ASGI app gets the
    disconnect at once), so the stream's generator never runs: its requests are still
    aborted, before the app call returns."""
    from ttpu import LLM, AutoModelForTPU
    from ttpu.serving.server import build_app

    directory, _, tokenizer = saved_model
    llm = LLM(AutoModelForTPU.from_pretrained(directory), max_num_seqs=2, max_model_len=256, block_size=8)
    app = build_app(llm, MODEL)
    body = json.dumps({"model": MODEL, "prompt": "Go on", "max_tokens": 200, "min_tokens": 200, "stream": True})
    messages = [{"type": "http.request", "body": body.encode(), "more_body": False}, {"type": "http.disconnect"}]
    sent: list[dict] = []

    async def receive() -> dict:
        return messages.pop(0) if len(messages) > 1 else messages[0]

    async def send(message: dict) -> None:
        sent.append(message)
        await asyncio.sleep(0.01)  # a real send may wait for the socket: the disconnect lands here

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions",
             "query_string": b"", "root_path": "", "headers": [(b"content-type", b"application/json")],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2)}
    engine = app.state.engine
    try:
        asyncio.run(app(scope, receive, send))
        assert not any(m.get("body", b"").startswith(b"data:") for m in sent)  # not one event was streamed
        assert not llm.engine.has_unfinished_requests and llm.engine.kv.used_blocks == 0
        assert engine.metrics.finished.labels("abort")._value.get() == 1
    finally:
        engine.shutdown()


def test_a_hybrid_model_serves_concurrent_and_streamed_requests(tmp_path) -> None:
    """Qwen3-Next (gated delta net layers beside attention layers): each request's state
    slot through the real server, concurrent requests and a stream giving transformers'
    greedy text."""
    from transformers import AutoModelForCausalLM

    from ttpu.coverage.configs import tiny_config

    config = tiny_config("qwen3_next", True)
    config.vocab_size, config.bos_token_id, config.eos_token_id, config.pad_token_id = 512, 1, 2, 0
    config.max_position_embeddings = 128  # the server's max_model_len (its warm-up compiles each prompt length to it)
    torch.manual_seed(0)
    module = AutoModelForCausalLM.from_config(config).eval()
    tokenizer = _tokenizer()
    module.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    saved = (tmp_path, module, tokenizer)
    prompts = ["Hugging Face", "transformers models", "A", "state-of-the-art machine learning for"]

    async def run(url: str) -> list[str]:
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none")
        answers = await asyncio.gather(*(
            client.completions.create(model=MODEL, prompt=p, max_tokens=8, temperature=0) for p in prompts
        ))
        return [a.choices[0].text for a in answers]

    with serving(tmp_path, max_model_len=128) as running:
        texts = asyncio.run(run(running.url))
        client = openai.OpenAI(base_url=running.url + "/v1", api_key="none")
        stream = client.completions.create(model=MODEL, prompt=prompts[3], max_tokens=8, temperature=0, stream=True)
        streamed = "".join(chunk.choices[0].text for chunk in stream if chunk.choices)
    assert texts == [expected_text(saved, tokenizer(p)["input_ids"], 8) for p in prompts]
    assert streamed == texts[3]
