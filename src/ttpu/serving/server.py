"""``ttpu serve``: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over the engine.

The engine steps in a background thread; each HTTP request adds an engine request and
awaits its tokens through an asyncio queue. A streaming client that disconnects aborts
its request (its blocks are free before the next step). Bad fields answer 400 with an
OpenAI-shaped error body; an unknown model 404.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal, Union

from fastapi import FastAPI, Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field

from ttpu.errors import InvalidArgumentError, TTPUError
from ttpu.generation.chat import chat_prompt
from ttpu.serving.llm import LLM
from ttpu.serving.request import Request, SamplingParams

logger = logging.getLogger(__name__)


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    n: int = 1
    seed: int | None = None
    stop: Union[str, list[str], None] = None
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: Any = None

    def sampling_params(self, default_max_tokens: int) -> SamplingParams:
        max_tokens = next((v for v in (self.max_completion_tokens, self.max_tokens) if v is not None), default_max_tokens)
        return SamplingParams(
            n=self.n, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
            seed=self.seed, stop=self.stop, stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos,
            max_tokens=max_tokens, min_tokens=self.min_tokens,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            logprobs=None if self.logprobs in (None, False) else 1,
        )


class CompletionBody(_Body):
    prompt: Union[str, list[int]]


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatBody(_Body):
    messages: list[ChatMessage]


@dataclass
class _Update:
    """What a request's stream gets after a step: its whole output so far."""

    token_ids: list[int]
    finish_reason: str | None
    error: str | None = None


class Metrics:
    """The server's Prometheus metrics (vLLM's names, ``ttpu:`` prefix)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram("ttpu:time_to_first_token_seconds", "time to the first token", registry=r)
        self.itl = Histogram("ttpu:inter_token_latency_seconds", "time between tokens", registry=r)
        self.e2e = Histogram("ttpu:e2e_request_latency_seconds", "request latency", registry=r)
        self.running = Gauge("ttpu:num_requests_running", "requests running", registry=r)
        self.waiting = Gauge("ttpu:num_requests_waiting", "requests waiting", registry=r)
        self.kv_blocks = Gauge("ttpu:kv_cache_blocks_used", "KV cache blocks held by requests", registry=r)
        self.prefix_queries = Counter("ttpu:prefix_cache_queries", "prompt tokens looked up", registry=r)
        self.prefix_hits = Counter("ttpu:prefix_cache_hits", "prompt tokens found cached", registry=r)
        self.preemptions = Counter("ttpu:num_preemptions", "requests preempted", registry=r)
        self.finished = Counter("ttpu:request_success", "finished requests", ["finished_reason"], registry=r)
        self._counted = {"queries": 0, "hits": 0, "preemptions": 0}

    def count(self, name: str, counter: Counter, total: int) -> None:
        """Move ``counter`` on to the engine's running ``total``."""
        counter.inc(total - self._counted[name])
        self._counted[name] = total


class AsyncEngine:
    """The engine stepping in its own thread; requests come and go from asyncio."""

    def __init__(self, llm: LLM) -> None:
        self.llm = llm
        self.engine = llm.engine
        self.metrics = Metrics()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stopped = False
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._run, name="ttpu-engine", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=10)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    async def generate(self, prompt: list[int], params: SamplingParams) -> AsyncIterator[_Update]:
        """The request's output after each step that changed it, until it finishes;
        leaving early (a disconnect) aborts it."""
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        request_id = f"req-{next(self._ids)}"
        with self._lock:
            self.engine.add_request(request_id, prompt, params)
            self._streams[request_id] = (loop, queue)
        self._wake.set()
        finished = False
        try:
            while not finished:
                update = await queue.get()
                finished = update.finish_reason is not None or update.error is not None
                yield update
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                with self._lock:
                    self.engine.abort(request_id)
                self.metrics.finished.labels("abort").inc()

    def _run(self) -> None:
        last = {}
        while not self._stopped:
            if not self.engine.has_unfinished_requests:
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            with self._lock:
                try:
                    changed = self.engine.step()
                except Exception as exc:  # noqa: BLE001  the step's requests fail, the server goes on
                    logger.exception("an engine step failed")
                    changed = self._fail_running(f"{type(exc).__name__}: {exc}")
                for request in changed:
                    if request.error is None:
                        self.llm._check_stop_strings(request)
                self._observe(changed, last)
            for request in changed:
                stream = self._streams.get(request.id)
                if stream is not None:
                    update = _Update(list(request.output_token_ids), request.finish_reason, request.error)
                    stream[0].call_soon_threadsafe(stream[1].put_nowait, update)

    def _fail_running(self, error: str) -> list[Request]:
        failed = list(self.engine.scheduler.running)
        for request in failed:
            self.engine.fail(request.id, error)
        return failed

    def _observe(self, changed: list[Request], last: dict[str, float]) -> None:
        now = time.monotonic()
        m, scheduler, kv = self.metrics, self.engine.scheduler, self.engine.kv
        for request in changed:
            if len(request.output_token_ids) == 1:
                m.ttft.observe(now - request.arrival)
            elif request.id in last:
                m.itl.observe(now - last[request.id])
            last[request.id] = now
            if request.status.finished:
                m.e2e.observe(now - request.arrival)
                m.finished.labels(request.finish_reason).inc()
                last.pop(request.id, None)
        m.running.set(len(scheduler.running))
        m.waiting.set(len(scheduler.waiting))
        m.kv_blocks.set(kv.used_blocks)
        m.count("queries", m.prefix_queries, kv.stats.queried)
        m.count("hits", m.prefix_hits, kv.stats.hit)
        m.count("preemptions", m.preemptions, scheduler.preemptions)


def _error(status: int, message: str, param: str | None = None) -> JSONResponse:
    kind = {400: "BadRequestError", 404: "NotFoundError"}.get(status, "InternalServerError")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}}, status_code=status)


def build_app(llm: LLM, model_name: str, default_max_tokens: int = 16) -> FastAPI:
    """The FastAPI application serving ``llm`` as ``model_name``."""
    app = FastAPI(title="ttpu")
    engine = AsyncEngine(llm)
    app.state.engine = engine
    app.router.add_event_handler("shutdown", engine.shutdown)
    created = int(time.time())

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_: HttpRequest, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return _error(400, f"{where}: {first.get('msg', 'invalid request')}", where or None)

    @app.exception_handler(TTPUError)
    async def refused(_: HttpRequest, exc: TTPUError) -> JSONResponse:
        return _error(400, str(exc))

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200 if engine.alive else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(engine.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "ttpu"}]}

    def check_model(body: _Body) -> JSONResponse | None:
        if body.model != model_name:
            return _error(404, f"the model {body.model!r} does not exist; this server serves {model_name!r}", "model")
        return None

    @app.post("/v1/completions")
    async def completions(body: CompletionBody) -> Any:
        if (missing := check_model(body)) is not None:
            return missing
        _, prompt = llm._prompt(body.prompt if isinstance(body.prompt, str) else list(body.prompt))
        return await _respond(engine, llm, body, prompt, "text_completion", default_max_tokens, model_name)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody) -> Any:
        if (missing := check_model(body)) is not None:
            return missing
        prompt = chat_prompt(llm.tokenizer, [m.model_dump() for m in body.messages])[0].tolist()
        return await _respond(engine, llm, body, prompt, "chat.completion", default_max_tokens, model_name)

    return app


async def _respond(
    engine: AsyncEngine, llm: LLM, body: _Body, prompt: list[int], kind: str, default_max_tokens: int, model_name: str
) -> Any:
    params = body.sampling_params(default_max_tokens)
    if len(prompt) + (params.max_tokens or 0) > llm.engine.max_model_len:
        raise InvalidArgumentError(
            f"this model's maximum context length is {llm.engine.max_model_len} tokens; the prompt has "
            f"{len(prompt)} and max_tokens is {params.max_tokens}"
        )
    response_id = f"{'chatcmpl' if kind.startswith('chat') else 'cmpl'}-{time.monotonic_ns()}"
    created = int(time.time())
    chat = kind.startswith("chat")
    streams = [engine.generate(prompt, fork) for fork in params.forks()]

    def text_of(update: _Update) -> str:
        return llm.decode(update.token_ids, params)

    def choice(index: int, text: str, finish: str | None, delta: bool) -> dict:
        if chat:
            content = {"delta" if delta else "message": {"role": "assistant", "content": text}}
            return {"index": index, **content, "finish_reason": finish}
        return {"index": index, "text": text, "finish_reason": finish, "logprobs": None}

    if not body.stream:
        finals = []
        for stream in streams:
            update = None
            async for update in stream:
                pass
            if update.error:
                return _error(500, f"generation failed: {update.error}")
            finals.append(update)
        completion_tokens = sum(len(u.token_ids) for u in finals)
        return {
            "id": response_id, "object": kind, "created": created, "model": model_name,
            "choices": [choice(i, text_of(u), _reason(u), False) for i, u in enumerate(finals)],
            "usage": _usage(len(prompt), completion_tokens),
        }

    chunk_kind = "chat.completion.chunk" if chat else "text_completion"
    include_usage = bool((body.stream_options or {}).get("include_usage"))

    async def events() -> AsyncIterator[str]:
        generated = 0
        for index, stream in enumerate(streams):
            sent = ""
            async for update in stream:
                if update.error:
                    yield f"data: {json.dumps({'error': {'message': update.error, 'code': 500}})}\n\n"
                    return
                text = text_of(update)
                piece, sent = text[len(sent):], text
                reason = _reason(update)
                chunk = {"id": response_id, "object": chunk_kind, "created": created, "model": model_name,
                         "choices": [choice(index, piece, reason, True)]}
                yield f"data: {json.dumps(chunk)}\n\n"
                if reason is not None:
                    generated += len(update.token_ids)
        if include_usage:
            usage = {"id": response_id, "object": chunk_kind, "created": created, "model": model_name,
                     "choices": [], "usage": _usage(len(prompt), generated)}
            yield f"data: {json.dumps(usage)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


def _reason(update: _Update) -> str | None:
    return None if update.finish_reason is None else {"abort": "abort", "error": "error"}.get(
        update.finish_reason, update.finish_reason
    )


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
