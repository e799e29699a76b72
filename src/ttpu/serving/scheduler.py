"""Which requests compute which tokens in the next engine step (vLLM v1's algorithm).

Every request's ``computed`` count chases its token count: a new prompt, a prompt chunk,
a prefix hit's remainder and a decode step are all "compute the next ``n`` tokens". Each
step has a token budget. Running requests go first, in arrival order; when the KV pool
cannot hold a running request's next tokens, the most recently arrived running request
is preempted (its blocks freed; it starts over later, recomputing its tokens), until the
request fits or is itself the one preempted. Waiting requests are admitted, oldest first,
only in steps that preempted nothing, while the budget, ``max_num_seqs`` and the pool allow.

Models with recurrent layers (SSM, linear attention) keep one state per request that only
a whole prompt, computed from an empty state, leaves exact under padding; models with
sparse-attention indexers step in rows too. For them (``whole_prefills``) a step is
either prompts or decodes, its rows padded to one length: waiting requests are admitted
whole (what a cached prefix leaves of them, where the KV manager caches prefixes: the
engine turns that off for recurrent states) when they can be, else the running ones
decode. With ``chunked_prefills`` (indexers: a row may start after computed positions), a
prompt too long for the budget is computed in chunks instead, prompts still being
prefilled going first.
Models the engine recomputes (``decodes_recompute``) run the same way, and a decode
step, which runs each request's whole sequence, is also kept within the budget; the
running requests left out of one go first in the next.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from ttpu.errors import InvalidArgumentError
from ttpu.serving.kv_blocks import KVBlockManager
from ttpu.serving.request import Request, RequestStatus


@dataclass(frozen=True)
class ScheduledChunk:
    """``count`` tokens of ``request`` from position ``start`` computed in one step."""

    request: Request
    start: int
    count: int

    @property
    def samples(self) -> bool:
        """Whether the chunk reaches the request's last token: its logits pick the next one."""
        return self.start + self.count == self.request.num_tokens


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(chunk.count for chunk in self.chunks)


class Scheduler:
    """The waiting queue, the running requests and their KV blocks."""

    def __init__(self, kv: KVBlockManager, max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int,
                 whole_prefills: Callable[[int, int], int] | None = None, decodes_recompute: bool = False,
                 chunked_prefills: bool = False) -> None:
        """``whole_prefills`` (models stepped in rows, or recomputed): the tokens a step of
        ``n`` prompts, the longest ``longest`` tokens, takes once padded; such steps are
        kept within the budget (one whole prompt always fits, or with
        ``chunked_prefills`` the chunk of it that does, at least the smallest padded step's).
        ``decodes_recompute`` (with ``whole_prefills``): a decode runs its request's whole
        sequence, so a step of decodes is kept within the budget the same way (one
        request always fits; those left out go first in the next step)."""
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise InvalidArgumentError("max_num_seqs and max_num_batched_tokens must be at least 1")
        if kv.pool.capacity * kv.block_size < max_model_len:
            raise InvalidArgumentError(
                f"a KV pool of {kv.pool.capacity} blocks of {kv.block_size} tokens cannot hold one request of "
                f"max_model_len={max_model_len}: give it more blocks (memory) or lower max_model_len"
            )
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.whole_prefills = whole_prefills
        self.decodes_recompute = decodes_recompute
        self.chunked_prefills = chunked_prefills
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.preemptions = 0

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, request: Request) -> None:
        if request.num_tokens >= self.max_model_len:
            raise InvalidArgumentError(
                f"the prompt has {request.num_tokens} tokens; the model takes at most {self.max_model_len} "
                "including the generated ones"
            )
        self.waiting.append(request)

    def abort(self, request_id: str) -> Request | None:
        """Finish ``request_id`` as aborted, freeing its blocks now; None if unknown or done."""
        for request in [*self.running, *self.waiting]:
            if request.id == request_id:
                self.finish(request, RequestStatus.FINISHED_ABORTED)
                return request
        return None

    def finish(self, request: Request, status: RequestStatus, error: str | None = None) -> None:
        request.status, request.error = status, error
        self.kv.free(request.id, written=status is not RequestStatus.FINISHED_ERROR)
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        if self.whole_prefills is not None:  # a step of prompts if any is scheduled, else one of decodes
            if self.chunked_prefills:
                self._continue_prefills(out)
            if not out.preempted:
                self._admit(out, self.max_num_batched_tokens)
            if not out.chunks and not out.preempted:
                self._schedule_running(out, self.max_num_batched_tokens)
            return out
        budget = self._schedule_running(out, self.max_num_batched_tokens)
        if not out.preempted:
            self._admit(out, budget)
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        """The running requests' next tokens, preempting when the pool runs out; returns the budget left."""
        index, longest = 0, 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            if self.decodes_recompute:
                longest = max(longest, request.num_tokens)
                if out.chunks and self.whole_prefills(len(out.chunks) + 1, longest) > self.max_num_batched_tokens:
                    self.running = self.running[index:] + self.running[:index]  # the rest go first next step
                    break
            count = min(request.num_tokens - request.computed, budget)
            if not self._allocate_or_preempt(out, request, count):
                break
            out.chunks.append(ScheduledChunk(request, request.computed, count))
            budget -= count
            index += 1
        return budget

    def _continue_prefills(self, out: SchedulerOutput) -> None:
        """The next chunks of the running requests still being prefilled (more than one
        token left to compute), within the padded budget, preempting when the pool runs out."""
        index = 0
        while index < len(self.running):
            request = self.running[index]
            left = request.num_tokens - request.computed
            if left > 1:
                count = self._prefill_chunk(out, left)
                if count == 0 or not self._allocate_or_preempt(out, request, count):
                    break
                out.chunks.append(ScheduledChunk(request, request.computed, count))
            index += 1

    def _allocate_or_preempt(self, out: SchedulerOutput, request: Request, count: int) -> bool:
        """Blocks for ``count`` more tokens of running ``request``, preempting the most
        recently arrived running requests (``request`` itself, last) until they fit;
        whether ``request`` got them."""
        while self.kv.allocate(request.id, request.tokens, request.computed, count) is None:
            victim = self.running.pop()
            self._preempt(victim)
            out.preempted.append(victim)
            if victim is request:
                return False
        return True

    def _prefill_chunk(self, out: SchedulerOutput, left: int) -> int:
        """How many of ``left`` prompt tokens a row joining the step's prefill rows takes:
        all, if the step padded to its longest row still fits the budget (a first row
        always fits whole, or with ``chunked_prefills`` up to the budget or the smallest
        padded step); with ``chunked_prefills``, else the most that fit; 0 if none do."""
        rows, longest = len(out.chunks), max((chunk.count for chunk in out.chunks), default=0)

        def cost(count: int) -> int:
            return self.whole_prefills(rows + 1, max(longest, count))

        limit = max(self.max_num_batched_tokens, cost(1)) if rows == 0 else self.max_num_batched_tokens
        if cost(left) <= limit or (rows == 0 and not self.chunked_prefills):
            return left
        if not self.chunked_prefills:
            return 0
        low, high = 0, left - 1  # the largest count that fits (0: none)
        while low < high:
            middle = (low + high + 1) // 2
            low, high = (middle, high) if cost(middle) <= limit else (low, middle - 1)
        return low

    def _admit(self, out: SchedulerOutput, budget: int) -> None:
        """Waiting requests, oldest first, while the budget, the seats and the pool allow.
        With ``whole_prefills`` each takes its whole prompt (or its first chunk), and the
        step's padded size must fit the budget (:meth:`_prefill_chunk`)."""
        while self.waiting and len(self.running) < self.max_num_seqs:
            request = self.waiting[0]
            prefix = self.kv.computed_prefix(request.tokens)
            computed = len(prefix) * self.kv.block_size
            if self.whole_prefills is not None:
                count = self._prefill_chunk(out, request.num_tokens - computed)
                if count == 0:
                    break
            elif budget > 0:
                count = min(request.num_tokens - computed, budget)
            else:
                break
            if self.kv.allocate(request.id, request.tokens, computed, count, prefix=prefix) is None:
                break
            self.waiting.popleft()
            request.computed, request.status = computed, RequestStatus.RUNNING
            self.running.append(request)
            out.chunks.append(ScheduledChunk(request, computed, count))
            budget -= count

    def update(self, out: SchedulerOutput, sampled: Mapping[str, int]) -> list[Request]:
        """Advance the scheduled requests by their chunks, append each sampled token
        (``sampled``: request id -> token, for chunks that sample) and finish the requests
        that stopped; returns those that got a token or finished."""
        changed = []
        for chunk in out.chunks:
            request = chunk.request
            if request.status.finished:  # aborted while its step ran
                continue
            request.computed = chunk.start + chunk.count
            if request.id not in sampled:
                continue
            request.output_token_ids.append(int(sampled[request.id]))
            status = self._stop_status(request)
            if status is not None:
                self.finish(request, status)
            changed.append(request)
        return changed

    def _stop_status(self, request: Request) -> RequestStatus | None:
        params, token, generated = request.params, request.output_token_ids[-1], len(request.output_token_ids)
        if generated >= params.min_tokens and (
            (token in request.eos_token_ids and not params.ignore_eos) or token in params.stop_token_ids
        ):
            return RequestStatus.FINISHED_STOPPED
        if (params.max_tokens is not None and generated >= params.max_tokens) or request.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def requeue(self, request: Request) -> None:
        """Send running ``request`` back to wait and recompute from scratch, its blocks
        not kept as cached prefixes (its step failed before writing them)."""
        self.running.remove(request)
        self._preempt(request, written=False)

    def _preempt(self, request: Request, written: bool = True) -> None:
        self.kv.free(request.id, written=written)
        request.computed, request.status = 0, RequestStatus.PREEMPTED
        self.waiting.appendleft(request)
        self.preemptions += 1
