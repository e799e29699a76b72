"""A request of the serving engine: its sampling parameters (vLLM's fields and checks)
and its state as the scheduler moves it along."""

from __future__ import annotations

import dataclasses
import enum
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from ttpu.errors import InvalidArgumentError


@dataclass(frozen=True)
class SamplingParams:
    """How one request's tokens are chosen and when it stops; the fields and the checks
    (``InvalidArgumentError`` naming the field) are vLLM's. ``temperature=0`` is greedy;
    ``top_k`` 0 or -1 is off; ``stop`` strings end the text (and are cut from it unless
    ``include_stop_str_in_output``)."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: str | Sequence[str] | None = None
    stop_token_ids: Sequence[int] = ()
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        stop = () if self.stop is None else (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        object.__setattr__(self, "stop", stop)
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        checks = [
            (isinstance(self.n, int) and self.n >= 1, "n", f"must be at least 1, got {self.n!r}"),
            (-2.0 <= self.presence_penalty <= 2.0, "presence_penalty", f"must be in [-2, 2], got {self.presence_penalty}"),
            (-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty",
             f"must be in [-2, 2], got {self.frequency_penalty}"),
            (self.repetition_penalty > 0.0, "repetition_penalty", f"must be greater than zero, got {self.repetition_penalty}"),
            (0.0 <= self.temperature <= 2.0, "temperature", f"must be in [0, 2], got {self.temperature}"),
            (0.0 < self.top_p <= 1.0, "top_p", f"must be in (0, 1], got {self.top_p}"),
            (isinstance(self.top_k, int) and self.top_k >= -1, "top_k", f"must be -1 (off), 0 (off) or positive, got {self.top_k!r}"),
            (0.0 <= self.min_p <= 1.0, "min_p", f"must be in [0, 1], got {self.min_p}"),
            (self.max_tokens is None or (isinstance(self.max_tokens, int) and self.max_tokens >= 1), "max_tokens",
             f"must be at least 1, got {self.max_tokens!r}"),
            (isinstance(self.min_tokens, int) and self.min_tokens >= 0, "min_tokens", f"must be >= 0, got {self.min_tokens!r}"),
            (self.max_tokens is None or self.min_tokens <= self.max_tokens, "min_tokens",
             f"must be less than or equal to max_tokens={self.max_tokens}, got {self.min_tokens}"),
            (self.logprobs is None or (isinstance(self.logprobs, int) and self.logprobs >= -1), "logprobs",
             f"must be non-negative or -1, got {self.logprobs!r}"),
            (all(isinstance(s, str) and s for s in self.stop), "stop", f"must be non-empty strings, got {self.stop!r}"),
        ]
        for ok, name, message in checks:
            if not ok:
                raise InvalidArgumentError(f"{name} {message}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def forks(self) -> list[SamplingParams]:
        """The ``n`` single-sequence requests these params make (seeds ``seed + i``)."""
        return [
            dataclasses.replace(self, n=1, seed=None if self.seed is None else self.seed + i) for i in range(self.n)
        ]


class RequestStatus(enum.IntEnum):
    """Where a request is; every status after ``PREEMPTED`` is final."""

    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED_STOPPED = 3  # an EOS or stop token (or a stop string, found by the output side)
    FINISHED_LENGTH = 4  # max_tokens or the model's length
    FINISHED_ABORTED = 5  # cancelled by its client
    FINISHED_ERROR = 6  # its step raised; the others went on

    @property
    def finished(self) -> bool:
        return self > RequestStatus.PREEMPTED


class TokenLogprobs(NamedTuple):
    """A generated token's log-probability under the model's raw distribution, its rank
    (1 = the most likely) and the ``logprobs`` most likely tokens with theirs."""

    token_id: int
    logprob: float
    rank: int
    top: tuple[tuple[int, float], ...]


FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_ERROR: "error",
}


@dataclass(eq=False)
class Request:
    """One sequence to generate: its tokens so far and how many of them the KV cache
    holds (``computed``). Chunked prefill, prefix hits and decoding are all the same
    thing: ``computed`` chasing ``len(tokens)``."""

    id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()
    arrival: float = field(default_factory=time.monotonic)
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[TokenLogprobs] = field(default_factory=list)  # one per output token if params.logprobs is set
    computed: int = 0
    error: str | None = None
    seed: int = -1  # of its draws: the params' seed, else a random one

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise InvalidArgumentError("the prompt is empty: give at least one token")
        if self.seed < 0:
            self.seed = self.params.seed if self.params.seed is not None else secrets.randbits(32)
        self.seed %= 2**32

    @property
    def tokens(self) -> list[int]:
        return [*self.prompt_token_ids, *self.output_token_ids]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def finish_reason(self) -> str | None:
        return FINISH_REASONS.get(self.status)
