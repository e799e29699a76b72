"""The paged KV cache's block bookkeeping: reference counts, the free queue's order,
prefix hits by chained hashes, and random request traffic that always drains to an empty
pool with every shared block holding the tokens its sharers expect."""

from __future__ import annotations

import random

import pytest

from ttpu.errors import InvalidArgumentError
from ttpu.serving.kv_blocks import NULL_BLOCK, BlockPool, KVBlockManager, block_hashes

BLOCK = 4


def test_hashes_chain_over_full_blocks_only() -> None:
    tokens = list(range(10))
    hashes = block_hashes(tokens, BLOCK)
    assert len(hashes) == 2  # the last 2 tokens fill no block
    assert block_hashes(tokens[4:8], BLOCK, parent=hashes[0]) == hashes[1:]
    # A block's hash depends on everything before it, not only its own tokens.
    assert block_hashes([9, 9, 9, 9, *tokens[4:8]], BLOCK)[1] != hashes[1]


def test_the_least_recently_freed_block_is_reused_first_and_forgets_its_prefix() -> None:
    pool = BlockPool(4)
    a, b, c = pool.take_free(3)
    assert NULL_BLOCK not in (a.id, b.id, c.id) and pool.num_free == 0
    with pytest.raises(InvalidArgumentError, match="1 KV blocks asked for, 0 free"):
        pool.take_free(1)
    pool.register(b, b"prefix")
    pool.release([c, b, a])  # a request frees its last block first
    assert [block.id for block in pool.take_free(1)] == [c.id]
    assert pool.cached(b"prefix") is b
    assert pool.take_free(1) == [b] and pool.cached(b"prefix") is None and b.hash is None


def test_a_shared_prefix_is_computed_once_and_outlives_its_first_request() -> None:
    manager = KVBlockManager(num_blocks=16, block_size=BLOCK)
    prompt = list(range(100, 114))  # 3 full blocks and 2 tokens
    assert manager.computed_prefix(prompt) == []
    first = manager.allocate("a", prompt, computed=0, new=len(prompt))
    assert len(first) == 4
    # The same 3 blocks, then a different tail: 3 blocks hit (12 tokens), 1 new block.
    other = prompt[:12] + [7, 7, 7]
    hit = manager.computed_prefix(other)
    assert [block.id for block in hit] == first[:3]
    manager.allocate("b", other, computed=12, new=3, prefix=hit)
    assert manager.block_ids("b")[:3] == first[:3] and manager.block_ids("b")[3] not in first
    manager.free("a")
    assert [block.ref_count for block in hit] == [1, 1, 1]  # still b's
    manager.free("b")
    # Freed but still registered: a third request hits them from the free queue.
    again = manager.computed_prefix(prompt)
    assert [block.id for block in again] == first[:3]
    assert manager.stats.hit == 24 and manager.stats.queried == 2 * len(prompt) + len(other)


def test_the_last_token_is_always_computed() -> None:
    manager = KVBlockManager(num_blocks=8, block_size=BLOCK)
    prompt = list(range(8))  # exactly 2 blocks
    manager.allocate("a", prompt, computed=0, new=8)
    assert len(manager.computed_prefix(prompt)) == 1  # the 2nd block holds the last token


def test_allocation_that_does_not_fit_changes_nothing() -> None:
    manager = KVBlockManager(num_blocks=4, block_size=BLOCK)  # 3 usable blocks
    assert manager.allocate("a", list(range(8)), computed=0, new=8) is not None
    assert manager.allocate("b", list(range(50, 58)), computed=0, new=8) is None
    assert manager.block_ids("b") == [] and manager.used_blocks == 2
    # A prefix hit sitting in the free queue counts against the free blocks it takes.
    manager.free("a")
    hit = manager.computed_prefix(list(range(8)) + [1] * 8)
    assert len(hit) == 2
    assert manager.allocate("c", list(range(8)) + [1] * 8, computed=8, new=8, prefix=hit) is None
    assert [block.ref_count for block in hit] == [0, 0] and manager.pool.num_free == 3


def test_each_request_holds_one_state_slot_until_freed() -> None:
    manager = KVBlockManager(num_blocks=20, block_size=BLOCK, prefix_caching=False, state_slots=2)
    assert manager.allocate("a", [5] * 3, computed=0, new=3) is not None
    assert manager.allocate("a", [5] * 6, computed=3, new=3) is not None  # a later allocation keeps its slot
    assert manager.allocate("b", [6] * 3, computed=0, new=3) is not None
    assert (manager.state_slot("a"), manager.state_slot("b")) == (1, 2)
    # Blocks are free, but no slot is: nothing changes.
    assert manager.allocate("c", [7] * 3, computed=0, new=3) is None
    assert manager.block_ids("c") == [] and manager.used_state_slots == 2 and manager.used_blocks == 3
    manager.free("a")
    assert manager.allocate("c", [7] * 3, computed=0, new=3) is not None and manager.state_slot("c") == 1
    manager.free("b")
    manager.free("c")
    assert manager.used_state_slots == 0 and manager.used_blocks == 0


def test_prefix_caching_off_shares_nothing() -> None:
    manager = KVBlockManager(num_blocks=8, block_size=BLOCK, prefix_caching=False)
    manager.allocate("a", list(range(12)), computed=0, new=12)
    assert manager.computed_prefix(list(range(12))) == []


@pytest.mark.parametrize("seed", range(20))
def test_random_traffic_keeps_counts_exact_and_drains_to_an_empty_pool(seed: int) -> None:
    """Requests arrive (some sharing prompt prefixes), grow a few tokens per step, and
    finish or are preempted at random, under a pool too small for all of them. After every
    operation: each block's reference count is the number of tables holding it, the free
    queue holds exactly the unreferenced blocks, and every block a request holds has the
    tokens that request wrote or expects there."""
    rng = random.Random(seed)
    manager = KVBlockManager(num_blocks=24, block_size=BLOCK, prefix_caching=seed % 4 != 0)
    prefixes = [[rng.randrange(50) for _ in range(rng.randrange(1, 13))] for _ in range(3)]
    content: dict[int, list[int]] = {}  # block id -> the tokens written into it
    running: dict[str, tuple[list[int], int]] = {}  # request -> (tokens, computed)

    def write(request: str, tokens: list[int], start: int, end: int) -> None:
        table = manager.block_ids(request)
        for position in range(start, end):
            block = content.setdefault(table[position // BLOCK], [None] * BLOCK)
            block[position % BLOCK] = tokens[position]

    def check() -> None:
        holders: dict[int, int] = {}
        for request, (tokens, computed) in running.items():
            table = manager.block_ids(request)
            assert len(table) * BLOCK >= computed
            for position in range(computed):
                assert content[table[position // BLOCK]][position % BLOCK] == tokens[position]
            for block_id in table:
                holders[block_id] = holders.get(block_id, 0) + 1
        for block in manager.pool.blocks[1:]:
            assert block.ref_count == holders.get(block.id, 0)
        assert manager.pool.num_free == sum(1 for b in manager.pool.blocks[1:] if b.ref_count == 0)
        assert NULL_BLOCK not in holders

    for step in range(300):
        action = rng.random()
        if action < 0.3 or not running:
            tokens = rng.choice(prefixes) + [rng.randrange(50) for _ in range(rng.randrange(1, 10))]
            hit = manager.computed_prefix(tokens)
            computed = len(hit) * BLOCK
            name = f"r{step}"
            new = len(tokens) - computed
            if manager.allocate(name, tokens, computed, new, prefix=hit) is not None:
                running[name] = (tokens, computed)
                write(name, tokens, computed, len(tokens))
                running[name] = (tokens, len(tokens))
        elif action < 0.8:
            name = rng.choice(sorted(running))
            tokens, computed = running[name]
            tokens = tokens + [rng.randrange(50) for _ in range(rng.randrange(1, 4))]
            if manager.allocate(name, tokens, computed, len(tokens) - computed) is None:
                manager.free(name)  # preempted: recomputed later from scratch
                del running[name]
            else:
                write(name, tokens, computed, len(tokens))
                running[name] = (tokens, len(tokens))
        else:
            name = rng.choice(sorted(running))
            manager.free(name)
            del running[name]
        check()
    for name in list(running):
        manager.free(name)
        del running[name]
    check()
    assert manager.used_blocks == 0 and manager.pool.num_free == manager.pool.capacity
