"""``ttpu serve``: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over the engine.

The engine steps in a background thread; each HTTP request adds an engine request and
awaits its tokens through an asyncio queue. A client that disconnects, streaming or not,
at any point after its request was added (even before its response started) aborts the
request (its blocks are free before the next step). Bad fields answer 400 with an
OpenAI-shaped error body; an unknown model 404.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, Union

from fastapi import FastAPI, Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field

from ttpu.errors import InvalidArgumentError, TTPUError
from ttpu.generation.chat import chat_prompt
from ttpu.serving.llm import LLM
from ttpu.serving.request import Request, SamplingParams, TokenLogprobs

logger = logging.getLogger(__name__)
T = TypeVar("T")


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
    repetition_penalty: float = 1.0

    def sampling_params(self, default_max_tokens: int) -> SamplingParams:
        max_tokens = next((v for v in (self.max_completion_tokens, self.max_tokens) if v is not None), default_max_tokens)
        return SamplingParams(
            n=self.n, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
            seed=self.seed, stop=self.stop, stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos,
            max_tokens=max_tokens, min_tokens=self.min_tokens, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, repetition_penalty=self.repetition_penalty,
            logprobs=self.requested_logprobs(),
        )

    def requested_logprobs(self) -> int | None:
        """How many top tokens' log-probabilities to return per token (None: none)."""
        return None


class CompletionBody(_Body):
    prompt: Union[str, list[int]]
    logprobs: int | None = None  # the top tokens to return per token

    def requested_logprobs(self) -> int | None:
        return self.logprobs


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatBody(_Body):
    messages: list[ChatMessage]
    logprobs: bool = False
    top_logprobs: int | None = None

    def requested_logprobs(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidArgumentError("top_logprobs needs logprobs=true")
        return (self.top_logprobs or 0) if self.logprobs else None


@dataclass
class _Update:
    """What a request's stream gets after a step: fork ``index``'s whole output so far."""

    index: int
    token_ids: list[int]
    logprobs: list[TokenLogprobs]
    finish_reason: str | None
    error: str | None = None

    @property
    def final(self) -> bool:
        return self.finish_reason is not None or self.error is not None


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


@dataclass
class _Submission:
    """One HTTP request's engine requests (one per fork) and the queue of their updates."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    request_ids: list[str]


@dataclass
class _Job:
    """Work for the engine thread to run under its lock before its next step."""

    work: Callable[[], Any]
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: Exception | None = None


class AsyncEngine:
    """The engine stepping in its own thread; requests come and go from asyncio."""

    def __init__(self, llm: LLM) -> None:
        self.llm = llm
        self.engine = llm.engine
        self.metrics = Metrics()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._streams: dict[str, tuple[_Submission, int]] = {}  # request id -> its submission and fork index
        self._last_token: dict[str, float] = {}  # request id -> when it got its latest token
        self._stopped = False
        self._ids = itertools.count()
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="ttpu-engine", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=10)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    async def submit(self, prompt: list[int], params: SamplingParams) -> _Submission:
        """Add ``params``' ``n`` forks to the engine now (a refused field raises here,
        before any response starts); their updates arrive on one queue. The engine thread
        adds them before its next step, waited for off the event loop."""
        submission = _Submission(asyncio.get_running_loop(), asyncio.Queue(), [])
        await asyncio.to_thread(self._on_engine_thread, functools.partial(self._add, submission, prompt, params))
        return submission

    def _add(self, submission: _Submission, prompt: list[int], params: SamplingParams) -> None:
        """Run by the engine thread, under its lock (:meth:`_on_engine_thread`)."""
        base = f"req-{next(self._ids)}"
        try:
            for index, fork in enumerate(params.forks()):
                request_id = f"{base}-{index}"
                self.engine.add_request(request_id, prompt, fork)
                submission.request_ids.append(request_id)
                self._streams[request_id] = (submission, index)
        except Exception:
            self._drop(submission)
            raise

    async def updates(self, submission: _Submission) -> AsyncIterator[_Update]:
        """The forks' outputs after each step that changed them, until all finish;
        leaving early (a disconnect) aborts the unfinished ones."""
        unfinished = set(range(len(submission.request_ids)))
        try:
            while unfinished:
                update = await submission.queue.get()
                if update.final:
                    unfinished.discard(update.index)
                yield update
        finally:
            if unfinished:  # the client left: released off the event loop (a step may hold the lock)
                asyncio.get_running_loop().run_in_executor(None, self.release, submission)

    def release(self, submission: _Submission) -> None:
        """Abort ``submission``'s unfinished requests (their client is gone), counted as
        aborted, before the engine's next step; a no-op once they all finished."""
        if not any(request_id in self._streams for request_id in submission.request_ids):
            return  # all finished (each leaves _streams with its final update)
        self._on_engine_thread(lambda: self.metrics.finished.labels("abort").inc(self._drop(submission)))

    def _on_engine_thread(self, work: Callable[[], T]) -> T:
        """``work()``'s result (or its exception, raised here), run by the engine thread
        under its lock before its next step, so within one step. (Waiting for the lock here
        instead could wait for many steps: the engine thread takes it again at once.) Run
        here if the engine thread is gone. Blocks: call it off the event loop."""
        job = _Job(work)
        self._jobs.put(job)
        self._wake.set()
        while not job.done.wait(0.1):
            if not self.alive:  # no engine thread to run it (shut down)
                self._run_jobs()
        if job.error is not None:
            raise job.error
        return job.result

    def _run_jobs(self) -> None:
        """Run the queued jobs, in order, each under the lock."""
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                return
            try:
                with self._lock:
                    job.result = job.work()
            except Exception as error:  # noqa: BLE001  raised to the job's caller, not the engine thread
                job.error = error
            finally:
                job.done.set()

    def _drop(self, submission: _Submission) -> int:
        """Abort ``submission``'s requests that are still running (under the lock); how many."""
        aborted = 0
        for request_id in submission.request_ids:
            if self._streams.pop(request_id, None) is not None:
                self.engine.abort(request_id)
                self._last_token.pop(request_id, None)
                aborted += 1
        self._gauge_engine()
        return aborted

    def _gauge_engine(self) -> None:
        """Set the gauges of running and waiting requests and used blocks."""
        m, scheduler = self.metrics, self.engine.scheduler
        m.running.set(len(scheduler.running))
        m.waiting.set(len(scheduler.waiting))
        m.kv_blocks.set(self.engine.kv.used_blocks)

    def _run(self) -> None:
        while not self._stopped:
            self._run_jobs()
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
                self._observe(changed)
                self._deliver(changed)  # under the lock: a release meanwhile sees finished requests gone

    def _deliver(self, changed: list[Request]) -> None:
        """Queue each changed request's update to its submission; a final one leaves ``_streams``."""
        for request in changed:
            stream = self._streams.get(request.id)
            if stream is None:
                continue
            submission, index = stream
            update = _Update(index, list(request.output_token_ids), list(request.output_logprobs),
                             request.finish_reason, request.error)
            if update.final:
                self._streams.pop(request.id, None)
            submission.loop.call_soon_threadsafe(submission.queue.put_nowait, update)

    def _fail_running(self, error: str) -> list[Request]:
        failed = list(self.engine.scheduler.running)
        for request in failed:
            self.engine.fail(request.id, error)
        return failed

    def _observe(self, changed: list[Request]) -> None:
        now = time.monotonic()
        m, scheduler, kv = self.metrics, self.engine.scheduler, self.engine.kv
        for request in changed:
            if len(request.output_token_ids) == 1:
                m.ttft.observe(now - request.arrival)
            elif request.id in self._last_token:
                m.itl.observe(now - self._last_token[request.id])
            self._last_token[request.id] = now
            if request.status.finished:
                m.e2e.observe(now - request.arrival)
                m.finished.labels(request.finish_reason).inc()
                self._last_token.pop(request.id, None)
        self._gauge_engine()
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
    async def completions(body: CompletionBody, http: HttpRequest) -> Any:
        if (missing := check_model(body)) is not None:
            return missing
        _, prompt = llm._prompt(body.prompt if isinstance(body.prompt, str) else list(body.prompt))
        return await _respond(engine, llm, http, body, prompt, "text_completion", default_max_tokens, model_name)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody, http: HttpRequest) -> Any:
        if (missing := check_model(body)) is not None:
            return missing
        prompt = chat_prompt(llm.tokenizer, [m.model_dump() for m in body.messages])[0].tolist()
        return await _respond(engine, llm, http, body, prompt, "chat.completion", default_max_tokens, model_name)

    return app


async def _respond(
    engine: AsyncEngine, llm: LLM, http: HttpRequest, body: _Body, prompt: list[int], kind: str,
    default_max_tokens: int, model_name: str,
) -> Any:
    params = body.sampling_params(default_max_tokens)
    if len(prompt) + (params.max_tokens or 0) > llm.engine.max_model_len:
        raise InvalidArgumentError(
            f"this model's maximum context length is {llm.engine.max_model_len} tokens; the prompt has "
            f"{len(prompt)} and max_tokens is {params.max_tokens}"
        )
    submission = await engine.submit(prompt, params)
    chat = kind.startswith("chat")
    header = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{time.monotonic_ns()}", "created": int(time.time()),
              "model": model_name}
    token_text = _TokenText(llm)

    def choice(update: _Update, text: str, logprobs: list[TokenLogprobs], delta: bool, offset: int = 0) -> dict:
        wanted = params.logprobs is not None
        if chat:
            message = {"delta" if delta else "message": {"role": "assistant", "content": text}}
            return {"index": update.index, **message, "logprobs": token_text.chat(logprobs) if wanted else None,
                    "finish_reason": update.finish_reason}
        return {"index": update.index, "text": text,
                "logprobs": token_text.completion(logprobs, offset) if wanted else None,
                "finish_reason": update.finish_reason}

    if not body.stream:
        finals: dict[int, _Update] = {}

        async def collect() -> str | None:
            """The forks' final updates into ``finals``; the first error, if any."""
            async for update in engine.updates(submission):
                if update.error:
                    return update.error
                if update.final:
                    finals[update.index] = update
            return None

        try:
            error = await _unless_disconnected(http, collect())
        except ClientGone:
            await asyncio.to_thread(engine.release, submission)
            return Response(status_code=499)  # nobody reads it (nginx's "client closed request")
        if error:
            return _error(500, f"generation failed: {error}")
        ordered = [finals[i] for i in sorted(finals)]
        return {
            **header, "object": kind,
            "choices": [choice(u, llm.decode(u.token_ids, params), u.logprobs, False) for u in ordered],
            "usage": _usage(len(prompt), sum(len(u.token_ids) for u in ordered)),
        }

    chunk_kind = "chat.completion.chunk" if chat else "text_completion"
    include_usage = bool((body.stream_options or {}).get("include_usage"))

    async def events() -> AsyncIterator[str]:
        sent_text: dict[int, str] = {}
        sent_logprobs: dict[int, int] = {}
        generated = 0
        async for update in engine.updates(submission):
            if update.error:
                yield f"data: {json.dumps({'error': {'message': update.error, 'code': 500}})}\n\n"
                yield "data: [DONE]\n\n"
                return
            text, before = llm.decode(update.token_ids, params), sent_text.get(update.index, "")
            logprobs = update.logprobs[sent_logprobs.get(update.index, 0) :]
            sent_text[update.index], sent_logprobs[update.index] = text, len(update.logprobs)
            piece = choice(update, text[len(before):], logprobs, True, offset=len(before))
            chunk = {**header, "object": chunk_kind, "choices": [piece]}
            yield f"data: {json.dumps(chunk)}\n\n"
            if update.final:
                generated += len(update.token_ids)
        if include_usage:
            yield f"data: {json.dumps({**header, 'object': chunk_kind, 'choices': [], 'usage': _usage(len(prompt), generated)})}\n\n"
        yield "data: [DONE]\n\n"

    # Run after the stream ends, however it ends: a client gone before the first event
    # leaves events() unstarted, so its own cleanup would never run.
    release = BackgroundTask(asyncio.to_thread, engine.release, submission)
    return StreamingResponse(events(), media_type="text/event-stream", background=release)


DISCONNECT_POLL_S = 0.1


class ClientGone(Exception):
    """The HTTP client disconnected before its response was ready."""


async def _unless_disconnected(http: HttpRequest, work: Awaitable[T]) -> T:
    """``work``'s result, or ClientGone (``work`` cancelled) once the client disconnects."""
    task = asyncio.ensure_future(work)
    try:
        while not (await asyncio.wait({task}, timeout=DISCONNECT_POLL_S))[0]:
            if await http.is_disconnected():
                raise ClientGone
        return task.result()
    finally:
        task.cancel()


class _TokenText:
    """Log-probabilities in OpenAI's two response shapes, with each token's text."""

    def __init__(self, llm: LLM) -> None:
        self._tokenizer = llm.tokenizer

    def text(self, token_id: int) -> str:
        return self._tokenizer.decode([token_id]) if self._tokenizer is not None else f"token_id:{token_id}"

    def completion(self, logprobs: list[TokenLogprobs], offset: int = 0) -> dict:
        """The legacy completions shape; ``text_offset`` counts from ``offset`` (the text
        already streamed), and each token's top dict holds the sampled token too (vLLM)."""
        tokens = [self.text(lp.token_id) for lp in logprobs]
        offsets = list(itertools.accumulate((len(t) for t in tokens[:-1]), initial=offset)) if tokens else []
        return {
            "tokens": tokens, "token_logprobs": [lp.logprob for lp in logprobs], "text_offset": offsets,
            "top_logprobs": [
                {**{self.text(t): v for t, v in lp.top}, self.text(lp.token_id): lp.logprob} for lp in logprobs
            ],
        }

    def chat(self, logprobs: list[TokenLogprobs]) -> dict:
        def entry(token_id: int, logprob: float) -> dict:
            text = self.text(token_id)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        return {"content": [
            {**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]} for lp in logprobs
        ]}


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
