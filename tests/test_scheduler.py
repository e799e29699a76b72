"""The engine's scheduler, driven without a model: token budgets and chunked prefill,
mixed decode and prefill steps, admission limits, preemption by recompute, aborts,
prefix hits, stop conditions, and random traffic that always drains to an empty pool."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from ttpu.errors import InvalidArgumentError
from ttpu.serving.kv_blocks import KVBlockManager
from ttpu.serving.request import Request, RequestStatus, SamplingParams
from ttpu.serving.scheduler import Scheduler, SchedulerOutput

BLOCK = 4
EOS = 2


def scheduler(num_blocks: int = 80, max_num_seqs: int = 8, budget: int = 32, max_model_len: int = 256) -> Scheduler:
    return Scheduler(KVBlockManager(num_blocks, BLOCK), max_num_seqs, budget, max_model_len)


def request(name: str, prompt: list[int], **params) -> Request:
    return Request(name, prompt, SamplingParams(**params), eos_token_ids=frozenset({EOS}))


def step(s: Scheduler, token: int = 7) -> tuple[list[tuple[str, int, int]], list[Request]]:
    """One engine step with every sampling chunk drawing ``token``."""
    out = s.schedule()
    sampled = {c.request.id: token for c in out.chunks if c.samples}
    s.update(out, sampled)
    return [(c.request.id, c.start, c.count) for c in out.chunks], out.preempted


def test_a_long_prompt_is_prefilled_in_budget_sized_chunks_beside_decodes() -> None:
    s = scheduler(budget=8)
    s.add(request("short", [5, 6, 7], max_tokens=10))
    assert step(s)[0] == [("short", 0, 3)]
    s.add(request("long", list(range(10, 30))))
    # The decode goes first; the long prompt takes what is left of the budget, chunk by chunk.
    assert step(s)[0] == [("short", 3, 1), ("long", 0, 7)]
    assert step(s)[0] == [("short", 4, 1), ("long", 7, 7)]
    assert step(s)[0] == [("short", 5, 1), ("long", 14, 6)]
    long = next(r for r in s.running if r.id == "long")
    assert long.output_token_ids == [7]  # only the chunk reaching its last token sampled


def test_admission_stops_at_max_num_seqs() -> None:
    s = scheduler(max_num_seqs=2)
    for i in range(3):
        s.add(request(f"r{i}", [5, 6]))
    assert [c[0] for c in step(s)[0]] == ["r0", "r1"]
    assert [r.id for r in s.waiting] == ["r2"]


def test_when_blocks_run_out_the_newest_request_is_preempted_and_recomputed_later() -> None:
    s = scheduler(num_blocks=5, budget=64, max_model_len=16)  # 4 usable blocks of 4 tokens
    s.add(request("old", [5] * 7, max_tokens=9, ignore_eos=True))
    s.add(request("new", [6] * 7, max_tokens=5, ignore_eos=True))
    step(s)  # both prefilled: 7 positions (2 blocks) each, and a first token sampled
    step(s)  # both decode their first token: position 7, still in the 2nd block
    chunks, preempted = step(s)  # old needs a 3rd block: new (newest) gives its blocks up
    assert [r.id for r in preempted] == ["new"] and chunks == [("old", 8, 1)]
    new = s.waiting[0]
    assert new.status is RequestStatus.PREEMPTED and new.computed == 0 and new.output_token_ids == [7, 7]
    assert s.preemptions == 1
    # It comes back once blocks free up, recomputing prompt and generated token together.
    while s.has_work:
        chunks, _ = step(s)
        if ("new", 0, 9) in chunks:
            break
    else:
        pytest.fail("the preempted request never came back")
    while s.has_work:
        step(s)
    assert s.kv.used_blocks == 0


def test_an_aborted_request_frees_its_blocks_at_once() -> None:
    s = scheduler()
    s.add(request("a", list(range(10))))
    step(s)
    assert s.kv.used_blocks == 3
    assert s.abort("a").status is RequestStatus.FINISHED_ABORTED
    assert s.kv.used_blocks == 0 and not s.has_work and s.abort("a") is None


def test_a_shared_prefix_schedules_only_the_suffix() -> None:
    s = scheduler()
    prefix = list(range(100, 112))  # 3 full blocks
    s.add(request("a", prefix + [1, 2]))
    step(s)
    s.add(request("b", prefix + [3, 4, 5]))
    assert ("b", 12, 3) in step(s)[0]
    assert s.kv.stats.hit == 12


@pytest.mark.parametrize(
    "params, tokens, reason, generated",
    [
        ({"max_tokens": 3}, [7, 7, 7, 7], "length", 3),
        ({}, [7, EOS, 7], "stop", 2),
        ({"min_tokens": 3}, [EOS, EOS, EOS, 7], "stop", 3),
        ({"ignore_eos": True, "max_tokens": 4}, [EOS] * 5, "length", 4),
        ({"stop_token_ids": [9]}, [7, 9, 7], "stop", 2),
    ],
)
def test_stop_conditions(params: dict, tokens: list[int], reason: str, generated: int) -> None:
    s = scheduler()
    r = request("a", [5, 6], **params)
    s.add(r)
    for token in tokens:
        if not s.has_work:
            break
        step(s, token)
    assert r.finish_reason == reason and len(r.output_token_ids) == generated
    assert s.kv.used_blocks == 0


def test_a_pool_that_cannot_hold_one_full_length_request_is_refused() -> None:
    with pytest.raises(InvalidArgumentError, match="cannot hold one request of max_model_len=17"):
        scheduler(num_blocks=5, max_model_len=17)


def test_the_model_length_ends_a_request_and_longer_prompts_are_refused() -> None:
    s = scheduler(max_model_len=8)
    with pytest.raises(InvalidArgumentError, match="the model takes at most 8"):
        s.add(request("long", list(range(8))))
    r = request("a", [5, 6, 7], max_tokens=100)
    s.add(r)
    while s.has_work:
        step(s)
    assert r.finish_reason == "length" and r.num_tokens == 8


def random_traffic(s: Scheduler, rng: random.Random, check: Callable[[SchedulerOutput], None]) -> list[Request]:
    """Up to 40 requests of random lengths arriving over time, some aborted, each step's
    schedule passed to ``check``, then a drain; returns the requests, all finished."""
    requests = []
    for step_index in range(400):
        if rng.random() < 0.3 and len(requests) < 40:
            r = request(f"r{step_index}", [rng.randrange(3, 50) for _ in range(rng.randrange(1, 20))],
                        max_tokens=rng.randrange(1, 12))
            s.add(r)
            requests.append(r)
        if s.running and rng.random() < 0.05:
            s.abort(rng.choice(s.running).id)
        out = s.schedule()
        check(out)
        s.update(out, {c.request.id: rng.randrange(1, 50) for c in out.chunks if c.samples})
        if not s.has_work and len(requests) >= 40:
            break
    while s.has_work:
        out = s.schedule()
        s.update(out, {c.request.id: rng.randrange(1, 50) for c in out.chunks if c.samples})
    assert all(r.status.finished for r in requests)
    return requests


@pytest.mark.parametrize("seed", range(10))
def test_random_traffic_respects_every_limit_and_drains(seed: int) -> None:
    rng = random.Random(seed)
    s = scheduler(num_blocks=12, max_num_seqs=4, budget=rng.choice([4, 8, 16]), max_model_len=44)

    def check(out: SchedulerOutput) -> None:
        assert out.num_tokens <= s.max_num_batched_tokens and len(s.running) <= s.max_num_seqs
        assert len({c.request.id for c in out.chunks}) == len(out.chunks)

    requests = random_traffic(s, rng, check)
    assert s.kv.used_blocks == 0
    for r in requests:
        if r.status is RequestStatus.FINISHED_LENGTH:
            assert len(r.output_token_ids) == r.params.max_tokens or r.num_tokens == s.max_model_len


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("temperature", -0.1, "temperature must be in"),
        ("top_p", 0.0, "top_p must be in"),
        ("n", 0, "n must be at least 1"),
        ("max_tokens", 0, "max_tokens must be at least 1"),
        ("min_tokens", 20, "min_tokens must be less than or equal to max_tokens"),
        ("presence_penalty", 3.0, "presence_penalty"),
        ("stop", [""], "stop must be non-empty"),
    ],
)
def test_bad_sampling_params_name_the_field(field: str, value: object, message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        SamplingParams(**{field: value})


def test_an_empty_prompt_is_refused() -> None:
    with pytest.raises(InvalidArgumentError, match="the prompt is empty"):
        request("a", [])


def whole_prefills_scheduler(budget: int, num_blocks: int = 80, max_num_seqs: int = 4, max_model_len: int = 44) -> Scheduler:
    """As the engine builds it for a model with recurrent layers: a state slot per seat, no prefix caching."""
    kv = KVBlockManager(num_blocks, BLOCK, prefix_caching=False, state_slots=max_num_seqs)
    return Scheduler(kv, max_num_seqs, budget, max_model_len, whole_prefills=lambda rows, longest: rows * longest)


def test_with_whole_prefills_a_step_is_new_prompts_or_decodes() -> None:
    s = whole_prefills_scheduler(budget=16)
    s.add(request("a", [5] * 3, max_tokens=4))
    s.add(request("b", [6] * 5, max_tokens=4))
    s.add(request("long", [7] * 20, max_tokens=4))
    # Two rows of 5 fit 16; a third row padded to 20 would not. The 20-token prompt goes alone, unchunked.
    assert step(s)[0] == [("a", 0, 3), ("b", 0, 5)]
    assert step(s)[0] == [("long", 0, 20)]
    assert step(s)[0] == [("a", 3, 1), ("b", 5, 1), ("long", 20, 1)]
    s.add(request("c", [8] * 2))
    assert step(s)[0] == [("c", 0, 2)]  # a new prompt goes before the decodes, in a step of its own
    assert sorted(s.kv.state_slot(r.id) for r in s.running) == [1, 2, 3, 4]


def test_whole_prefills_with_prefix_caching_admit_what_the_prefix_leaves() -> None:
    """As the engine builds it for a model stepped in rows whose pools hold its whole
    cache per block (sparse-attention indexers): a new prompt is admitted whole but for
    the full blocks an earlier request registered, and the step's padded size counts
    only that remainder."""
    kv = KVBlockManager(20, BLOCK, prefix_caching=True)
    s = Scheduler(kv, 4, 8, 44, whole_prefills=lambda rows, longest: rows * longest)
    shared = list(range(10, 18))  # 2 full blocks
    s.add(request("a", [*shared, 5], max_tokens=1))
    assert step(s)[0] == [("a", 0, 9)]  # alone past the budget: one prompt always fits
    assert not s.has_work
    s.add(request("b", [*shared, 6, 7], max_tokens=1))
    s.add(request("c", [*shared, 8], max_tokens=1))
    assert step(s)[0] == [("b", 8, 2), ("c", 8, 1)]  # two rows of 2: within the budget of 8
    assert kv.stats.hit == 2 * len(shared)


@pytest.mark.parametrize("seed", range(10))
def test_random_traffic_with_whole_prefills_keeps_one_state_slot_per_running_request(seed: int) -> None:
    rng = random.Random(seed)
    s = whole_prefills_scheduler(budget=rng.choice([8, 16, 32]), num_blocks=14)

    def check(out: SchedulerOutput) -> None:
        new = [c for c in out.chunks if c.start == 0]
        assert not new or len(new) == len(out.chunks)  # never new prompts beside decodes
        assert all(c.count == c.request.num_tokens for c in new)  # whole, never chunked
        assert len(new) <= 1 or len(new) * max(c.count for c in new) <= s.max_num_batched_tokens
        assert all(c.count == 1 for c in out.chunks if c.start > 0)
        slots = [s.kv.state_slot(r.id) for r in s.running]
        assert len(set(slots)) == len(slots) and set(slots) <= {1, 2, 3, 4} and s.kv.used_state_slots == len(slots)

    random_traffic(s, rng, check)
    assert s.kv.used_blocks == 0 and s.kv.used_state_slots == 0


def chunked_prefills_scheduler(budget: int, num_blocks: int = 80, max_model_len: int = 64) -> Scheduler:
    """As the engine builds it for a model with sparse-attention indexers: rows of prompt
    chunks, prefix caching on, no state slots."""
    return Scheduler(KVBlockManager(num_blocks, BLOCK), 4, budget, max_model_len,
                     whole_prefills=lambda rows, longest: rows * longest, chunked_prefills=True)


def test_chunked_prefills_cut_prompts_to_the_padded_budget_and_finish_them_before_decodes() -> None:
    s = chunked_prefills_scheduler(budget=8)
    s.add(request("a", [5] * 3, max_tokens=4))
    s.add(request("b", [6] * 10, max_tokens=4))
    # a's 3 tokens, then b's rows padded to the longest: 2 x 4 fits 8, so b's first chunk is 4.
    assert step(s)[0] == [("a", 0, 3), ("b", 0, 4)]
    assert step(s)[0] == [("b", 4, 6)]  # b's rest before any decode (a waits)
    assert step(s)[0] == [("a", 3, 1), ("b", 10, 1)]
    s.add(request("long", [7] * 20, max_tokens=2))
    assert step(s)[0] == [("long", 0, 8)]  # alone past the budget: cut to it
    assert step(s)[0] == [("long", 8, 8)]
    assert step(s)[0] == [("long", 16, 4)]
    long = next(r for r in s.running if r.id == "long")
    assert long.output_token_ids == [7]  # only the last chunk sampled


@pytest.mark.parametrize("seed", range(10))
def test_random_traffic_with_chunked_prefills_keeps_every_step_within_the_padded_budget(seed: int) -> None:
    rng = random.Random(seed)
    s = chunked_prefills_scheduler(budget=rng.choice([8, 16, 32]), num_blocks=14, max_model_len=44)

    def check(out: SchedulerOutput) -> None:
        counts = [c.count for c in out.chunks]
        if max(counts, default=1) > 1:  # prompt rows (a decode, or what a prefix leaves, may be one token)
            assert len(counts) * max(counts) <= s.max_num_batched_tokens
        assert all(c.start + c.count <= c.request.num_tokens for c in out.chunks)

    random_traffic(s, rng, check)
    assert s.kv.used_blocks == 0


def test_recomputed_decodes_keep_their_whole_sequences_within_the_budget_and_take_turns() -> None:
    """A decode of a recomputed model runs its request's whole sequence: a step of them
    fits the budget (one always runs), and those left out go first in the next step."""
    kv = KVBlockManager(80, BLOCK, prefix_caching=False)
    s = Scheduler(kv, 4, 24, 44, whole_prefills=lambda rows, longest: rows * longest, decodes_recompute=True)
    for i in range(4):
        s.add(request(f"r{i}", [5] * 6, max_tokens=6, ignore_eos=True))
    assert len(step(s)[0]) == 4  # new prompts: 4 rows of 6 tokens fit 24
    decoded: dict[str, int] = {f"r{i}": 0 for i in range(4)}
    while s.has_work:
        chunks, _ = step(s)
        assert all(count == 1 for _, _, count in chunks)
        # each chunk's sequence is its start + 1 tokens; the step's rows x longest within the budget
        assert len(chunks) == 1 or len(chunks) * max(start + 1 for _, start, _ in chunks) <= 24
        for name, _, _ in chunks:
            decoded[name] += 1
    assert decoded == {f"r{i}": 5 for i in range(4)}  # every request got all its decodes (the first token came with its prompt)
