"""The serving engine: requests in, one scheduled step at a time, tokens out.

Each :meth:`LLMEngine.step` asks the scheduler which tokens to compute, has the runner
compute them in one compiled step over the paged KV pool, samples each request whose
chunk reached its last token, and hands the results back to the scheduler (which stops
and frees finished requests). Requests can be added and aborted between steps.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jax
from tqdm.auto import tqdm

from ttpu.backends.jax.executables import Executables
from ttpu.backends.jax.sampling import MAX_LOGPROBS, SampledTokens, SamplerMode, sample, split_processors
from ttpu.errors import InvalidArgumentError
from ttpu.generation.config import GenerationSettings, processor_settings
from ttpu.serving.kv_blocks import KVBlockManager
from ttpu.serving.request import Request, RequestStatus, SamplingParams, TokenLogprobs
from ttpu.serving.runner import ModelRunner
from ttpu.serving.sampler import row_sampling
from ttpu.serving.scheduler import Scheduler, SchedulerOutput

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    """The engine's limits: ``num_blocks`` (default: room for every running request at
    full length) blocks of ``block_size`` tokens form the KV pool; each step computes at
    most ``max_num_batched_tokens`` tokens of at most ``max_num_seqs`` requests;
    ``max_model_len`` (default: the model's positions, at most 2048) bounds prompt plus
    output."""

    max_num_seqs: int = 32
    max_model_len: int | None = None
    max_num_batched_tokens: int = 256
    block_size: int = 16
    num_blocks: int | None = None
    enable_prefix_caching: bool = True


class LLMEngine:
    """A continuous-batching engine over one loaded :class:`ttpu.TPUModel` (JAX backend)."""

    def __init__(self, model: Any, config: EngineConfig = EngineConfig()) -> None:
        if model.backend != "jax":
            raise InvalidArgumentError("the serving engine runs on the JAX backend so far: load with backend='jax'")
        context = getattr(model.torch_module.config.get_text_config(decoder=True), "max_position_embeddings", None)
        context = context if isinstance(context, int) and context > 0 else None  # XLNet: -1, unbounded
        max_model_len = config.max_model_len or min(context or 2048, 2048)
        if context and max_model_len > context:
            raise InvalidArgumentError(f"max_model_len={max_model_len} exceeds the model's {context} positions")
        max_num_seqs, max_num_batched_tokens, block_size = config.max_num_seqs, config.max_num_batched_tokens, config.block_size
        blocks_per_request = -(-max_model_len // block_size)
        num_blocks = config.num_blocks or max_num_seqs * blocks_per_request + 1
        self.max_model_len = max_model_len
        self.runner = ModelRunner(
            model, num_blocks, block_size, max_model_len, max_num_batched_tokens, max_num_seqs
        )
        whole = self.runner.whole_prompts
        if config.enable_prefix_caching and not self.runner.caches_prefixes:
            logger.info("prefix caching is off for %s: %s", type(model.torch_module).__name__,
                        self.runner.prefix_caching_refusal)
        self.kv = KVBlockManager(num_blocks, block_size, config.enable_prefix_caching and self.runner.caches_prefixes,
                                 state_slots=self.runner.state_slots)
        self.scheduler = Scheduler(self.kv, max_num_seqs, max_num_batched_tokens, max_model_len,
                                   whole_prefills=self.runner.prefill_tokens if whole else None,
                                   decodes_recompute=self.runner.recompute_reason is not None,
                                   chunked_prefills=self.runner.chunked_prefills)
        generation_config = model.torch_module.generation_config
        eos = generation_config.eos_token_id
        self.vocab_size = model.torch_module.get_input_embeddings().num_embeddings
        self.eos_token_ids = frozenset([eos] if isinstance(eos, int) else eos or [])
        # As transformers' generate, every request gets the processors the model's generation config turns on.
        self.processors, self._processor_values = split_processors(
            GenerationSettings(max_new_tokens=1, **processor_settings(generation_config))
        )
        self._sample = Executables(sample, static_argnums=(2,), name="serving_sampler", store=None)
        self._requests: dict[str, Request] = {}
        self.scheduled_tokens = 0  # tokens computed by steps so far ...
        self.padded_tokens = 0  # ... and the token slots of their buckets (their ratio: padding efficiency)

    @property
    def compile_count(self) -> int:
        """Programs compiled so far (steps and samplers)."""
        return self.runner.compile_count + len(self._sample)

    def warm_up(self, progress: bool = True) -> float:
        """Compile and run every bucket pair's step, and compile its samplers, before
        serving (a progress bar); returns the seconds it took, the runs included.
        Afterwards no request mix compiles anything.

        The samplers (pure JAX) compile in a second thread while the steps are traced
        and compiled in this one."""
        start = time.perf_counter()
        pairs = self.runner.buckets()
        sampled: set[int] = set()  # logits rows whose sampler modes are compiled
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ttpu-sampler-warm-up") as samplers:
            compiling, previous = [], None
            for tokens, requests in tqdm(pairs, desc="compiling serving steps", unit="bucket", disable=not progress):
                logits = self.runner.run(self.runner.empty_step(tokens, requests))
                # The steps run asynchronously, each beside the next one's compile; waiting
                # for the one before keeps at most two steps' logits alive.
                jax.block_until_ready(previous)
                previous = logits
                if logits.shape[0] in sampled:
                    continue
                sampled.add(logits.shape[0])
                for mode in SamplerMode.every(self.processors):
                    rows, _ = row_sampling([], logits.shape[0], logits.shape[1], self.max_model_len, mode=mode)
                    compiling.append(samplers.submit(self._sample.compiled, logits, rows, mode, self._processor_values))
            for done in compiling:
                done.result()  # raises what a sampler's compile raised
        jax.block_until_ready((previous, self.runner.cache))  # the first request must not wait for them
        return time.perf_counter() - start

    @property
    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_work

    def add_request(self, request_id: str, prompt_token_ids: Sequence[int], params: SamplingParams) -> Request:
        if request_id in self._requests:
            raise InvalidArgumentError(f"request id {request_id!r} is already in use")
        if params.logprobs is not None and not 0 <= params.logprobs <= MAX_LOGPROBS:
            raise InvalidArgumentError(
                f"logprobs={params.logprobs}: the engine returns at most the top {MAX_LOGPROBS} tokens' log-probabilities"
            )
        prompt = [int(t) for t in prompt_token_ids]
        outside = [t for t in prompt if not 0 <= t < self.vocab_size]
        if outside:
            raise InvalidArgumentError(
                f"token ids {outside[:5]} are outside the model's vocabulary (0 to {self.vocab_size - 1})"
            )
        request = Request(request_id, prompt, params, eos_token_ids=self.eos_token_ids)
        if params.max_tokens is not None and len(prompt) + params.max_tokens > self.max_model_len:
            raise InvalidArgumentError(
                f"the prompt ({len(prompt)} tokens) and max_tokens={params.max_tokens} exceed the engine's "
                f"max_model_len={self.max_model_len}"
            )
        self.scheduler.add(request)
        self._requests[request_id] = request
        return request

    def abort(self, request_id: str) -> None:
        """Finish ``request_id`` as aborted (its client went away); its blocks are free at once."""
        self.scheduler.abort(request_id)
        self._requests.pop(request_id, None)

    def fail(self, request_id: str, error: str) -> None:
        """Finish ``request_id`` with ``error`` (its step raised); the others go on."""
        request = self._requests.pop(request_id, None)
        if request is not None and not request.status.finished:
            self.scheduler.finish(request, RequestStatus.FINISHED_ERROR, error)

    def stop(self, request_id: str) -> None:
        """Finish ``request_id`` as stopped (the output side found a stop string)."""
        request = self._requests.pop(request_id, None)
        if request is not None and not request.status.finished:
            self.scheduler.finish(request, RequestStatus.FINISHED_STOPPED)

    def step(self) -> list[Request]:
        """One step; returns the requests that got a token or finished (failed ones included)."""
        out = self.scheduler.schedule()
        return self._compute(out) if out.chunks else []

    def _compute(self, out: SchedulerOutput) -> list[Request]:
        """Run ``out``; if it raises, run its chunks one by one, so that only the request
        that raises fails (with its error) and the others get their tokens. A recurrent
        model's decodes are not run again but recomputed from scratch later: the failed
        step may already have moved their states on."""
        try:
            return self._run(out)
        except Exception as error:  # noqa: BLE001  one request's failure must not end the others
            message = f"{type(error).__name__}: {error}"
            if self.runner.cache_lost():  # failed on the device after the cache was donated
                logger.exception("a step failed on the device; the KV cache is rebuilt")
                return self._lose_kv_cache(message)
            if len(out.chunks) == 1:
                request = out.chunks[0].request
                logger.exception("request %s failed in its step", request.id)
                self.fail(request.id, message)
                return [request]
        changed: list[Request] = []
        failed_blocks: set[int] = set()
        for chunk in out.chunks:
            request, blocks = chunk.request, set(self.kv.block_ids(chunk.request.id))
            if blocks & failed_blocks:  # its prefix hit blocks that a failed chunk was to write in this step
                self.scheduler.requeue(request)  # it recomputes them later
                continue
            if self.runner.has_states and chunk.start > 0:  # a decode: the step may have moved its state already
                self.scheduler.requeue(request)  # it recomputes its state from its whole sequence later
                continue
            changed += self._compute(SchedulerOutput([chunk]))
            if request.status is RequestStatus.FINISHED_ERROR:
                failed_blocks |= blocks
        return changed

    def _lose_kv_cache(self, error: str) -> list[Request]:
        """Fail every running request (their keys and values went with the pools), and
        start again from empty pools and no cached prefixes."""
        self.runner.reset_cache()
        self.kv.pool.forget_prefixes()
        failed = list(self.scheduler.running)
        for request in failed:
            self.fail(request.id, f"the step failed on the device and took the KV cache with it: {error}")
        return failed

    def _run(self, out: SchedulerOutput) -> list[Request]:
        ids = [chunk.request.id for chunk in out.chunks]
        slots = {i: self.kv.state_slot(i) for i in ids} if self.runner.has_states else {}
        inputs = self.runner.prepare(out, {i: self.kv.block_ids(i) for i in ids}, slots)
        logits = self.runner.run(inputs)
        self.scheduled_tokens += out.num_tokens
        self.padded_tokens += len(inputs.ids)
        requests = [self._requests[i] for i in inputs.sampling_ids]
        rows, mode = row_sampling(requests, logits.shape[0], logits.shape[1], self.max_model_len, self.processors)
        sampled = jax.device_get(self._sample(logits, rows, mode, self._processor_values))
        changed = self.scheduler.update(out, dict(zip(inputs.sampling_ids, sampled.tokens.tolist())))
        if mode.logprobs:
            _record_logprobs(requests, sampled)
        for request in changed:
            if request.status.finished:
                self._requests.pop(request.id, None)
        return changed


def _record_logprobs(requests: Sequence[Request], sampled: SampledTokens) -> None:
    """Append each row's log-probabilities to its request, if it asked for them and got its token."""
    for row, request in enumerate(requests):
        wanted = request.params.logprobs
        if wanted is None or len(request.output_logprobs) == len(request.output_token_ids):
            continue
        top = tuple(zip(sampled.top_ids[row, :wanted].tolist(), sampled.top_logprobs[row, :wanted].tolist()))
        request.output_logprobs.append(
            TokenLogprobs(int(sampled.tokens[row]), float(sampled.logprobs[row]), int(sampled.ranks[row]), top)
        )
