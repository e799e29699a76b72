"""Bookkeeping of the paged KV cache: which fixed-size blocks of the pool each request
holds, and which full blocks can be shared by requests with the same prefix.

Pure Python, no arrays: the runner turns block tables into the indices its compiled step
reads and writes. Semantics follow vLLM v1's block pool:

* block 0 is the null block, never handed out (padding in block tables);
* a block is referenced by every request whose table holds it; at zero references it joins
  the free queue's tail, so the least recently freed block is reused first (requests free
  their blocks last block first: a prefix outlives its tails);
* a full block is registered under the chained hash of its tokens (the hash of the block
  before it, then its own tokens); a later request whose prompt starts with the same
  blocks takes them instead of computing them again, until a block is reused for other
  tokens (then its hash is evicted).
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ttpu.errors import InvalidArgumentError

NULL_BLOCK = 0
_ROOT_HASH = hashlib.sha256(b"ttpu kv blocks").digest()


@dataclass(eq=False)
class Block:
    """One block of the pool; ``hash`` is set while it holds a registered full prefix block."""

    id: int
    ref_count: int = 0
    hash: bytes | None = None


def block_hashes(tokens: Sequence[int], block_size: int, parent: bytes | None = None) -> list[bytes]:
    """The chained hashes of the full blocks of ``tokens`` (a partial last block has none);
    ``parent`` is the hash of the block before ``tokens[0]``, if any."""
    hashes, previous = [], parent or _ROOT_HASH
    for start in range(0, len(tokens) - block_size + 1, block_size):
        chunk = struct.pack(f"<{block_size}q", *tokens[start : start + block_size])
        previous = hashlib.sha256(previous + chunk).digest()
        hashes.append(previous)
    return hashes


class BlockPool:
    """``num_blocks`` blocks (the null block among them), their reference counts, the free
    queue and the registry of full blocks by hash."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 2:
            raise InvalidArgumentError(f"a KV block pool needs at least 2 blocks (got {num_blocks})")
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, Block] = OrderedDict((b.id, b) for b in self.blocks[1:])
        self._by_hash: dict[bytes, Block] = {}

    @property
    def num_free(self) -> int:
        """Blocks not referenced by any request (some still hold a registered prefix)."""
        return len(self._free)

    @property
    def capacity(self) -> int:
        """Blocks requests can hold (all but the null block)."""
        return len(self.blocks) - 1

    def cached(self, block_hash: bytes) -> Block | None:
        return self._by_hash.get(block_hash)

    def take_free(self, count: int) -> list[Block]:
        """``count`` blocks from the head of the free queue, each referenced once; a block
        that held a registered prefix forgets it."""
        if count > len(self._free):
            raise InvalidArgumentError(f"{count} KV blocks asked for, {len(self._free)} free")
        taken = []
        for _ in range(count):
            _, block = self._free.popitem(last=False)
            if block.hash is not None:
                del self._by_hash[block.hash]
                block.hash = None
            block.ref_count = 1
            taken.append(block)
        return taken

    def share(self, blocks: Iterable[Block]) -> None:
        """One more reference to each of ``blocks`` (prefix hits), out of the free queue."""
        for block in blocks:
            if block.ref_count == 0:
                del self._free[block.id]
            block.ref_count += 1

    def release(self, blocks: Iterable[Block]) -> None:
        """One reference less to each of ``blocks``, in order; unreferenced ones join the
        free queue's tail."""
        for block in blocks:
            if block.ref_count <= 0:
                raise AssertionError(f"KV block {block.id} released more often than taken")
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block.id] = block

    def register(self, block: Block, block_hash: bytes) -> None:
        """``block`` is full and holds the tokens ``block_hash`` names; the first block
        registered under a hash keeps it (an equal later one stays private)."""
        if block.hash is None and block_hash not in self._by_hash:
            block.hash = block_hash
            self._by_hash[block_hash] = block

    def unregister(self, block: Block) -> None:
        """``block`` no longer names the tokens it was registered under."""
        if block.hash is not None:
            self._by_hash.pop(block.hash, None)
            block.hash = None

    def forget_prefixes(self) -> None:
        """Unregister every full block (weights changed: cached keys are stale)."""
        for block in self._by_hash.values():
            block.hash = None
        self._by_hash.clear()


@dataclass
class PrefixStats:
    """Prefix-cache lookups since start, counted in tokens."""

    queried: int = 0
    hit: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hit / self.queried if self.queried else 0.0


class KVBlockManager:
    """Each request's block table over a :class:`BlockPool`: prefix lookups, allocation
    as a request's computed tokens grow, registration of its full blocks, and release.

    With ``state_slots`` (models with recurrent layers, as vLLM's hybrid cache manager),
    each request also holds one slot, 1 to ``state_slots``, of the fixed-size recurrent
    state pools from its first allocation until it is freed (slot 0 is padding's)."""

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True, state_slots: int = 0) -> None:
        if block_size < 1:
            raise InvalidArgumentError(f"block_size must be >= 1 (got {block_size})")
        self.pool = BlockPool(num_blocks)
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self.stats = PrefixStats()
        self._tables: dict[str, list[Block]] = {}
        self._hashes: dict[str, list[bytes]] = {}
        self.state_slots = state_slots
        self._free_slots = list(range(state_slots, 0, -1))  # popped from the end: lowest first
        self._slots: dict[str, int] = {}

    def state_slot(self, request_id: str) -> int:
        """The recurrent-state slot ``request_id`` holds."""
        return self._slots[request_id]

    def block_ids(self, request_id: str) -> list[int]:
        return [block.id for block in self._tables.get(request_id, [])]

    def computed_prefix(self, tokens: Sequence[int]) -> list[Block]:
        """The longest run of registered full blocks ``tokens`` starts with, leaving at
        least its last token to compute (its logits pick the next one)."""
        if not self.prefix_caching:
            return []
        hits = []
        for block_hash in block_hashes(tokens[: len(tokens) - 1], self.block_size):
            block = self.pool.cached(block_hash)
            if block is None:
                break
            hits.append(block)
        self.stats.queried += len(tokens)
        self.stats.hit += len(hits) * self.block_size
        return hits

    def allocate(
        self, request_id: str, tokens: Sequence[int], computed: int, new: int, prefix: Sequence[Block] = ()
    ) -> list[int] | None:
        """Blocks for ``request_id`` to hold positions up to ``computed + new`` (of its
        ``tokens``: prompt and generated so far), taking the ``prefix`` blocks of a lookup
        first (a request's first allocation), and a state slot if it holds none; None,
        changing nothing, when the pool has too few free blocks or no slot is free.
        Returns the ids of the blocks it newly holds."""
        table = self._tables.setdefault(request_id, [])
        wanted = -(-(computed + new) // self.block_size) - len(table) - len(prefix)
        reusable = sum(1 for block in prefix if block.ref_count == 0)  # shared from the free queue
        needs_slot = self.state_slots > 0 and request_id not in self._slots
        if max(wanted, 0) > self.pool.num_free - reusable or (needs_slot and not self._free_slots):
            if not table:
                del self._tables[request_id]
            return None
        if needs_slot:
            self._slots[request_id] = self._free_slots.pop()
        self.pool.share(prefix)
        added = [*prefix, *self.pool.take_free(max(wanted, 0))]
        table.extend(added)
        self._register_full_blocks(request_id, tokens, min(computed + new, len(tokens)))
        return [block.id for block in added]

    def free(self, request_id: str, written: bool = True) -> None:
        """Release every block (and the state slot) of ``request_id`` (finished, aborted or preempted). When
        its step failed (``written`` False), the blocks it alone holds stop being cached
        prefixes: their keys and values may never have been written."""
        table = self._tables.pop(request_id, [])
        self._hashes.pop(request_id, None)
        if request_id in self._slots:
            self._free_slots.append(self._slots.pop(request_id))
        if not written:
            for block in table:
                if block.ref_count == 1:
                    self.pool.unregister(block)
        self.pool.release(reversed(table))

    @property
    def used_blocks(self) -> int:
        return self.pool.capacity - self.pool.num_free

    @property
    def used_state_slots(self) -> int:
        return len(self._slots)

    def _register_full_blocks(self, request_id: str, tokens: Sequence[int], filled: int) -> None:
        if not self.prefix_caching:
            return
        hashes = self._hashes.setdefault(request_id, [])
        done, full = len(hashes), filled // self.block_size
        if full <= done:
            return
        parent = hashes[-1] if hashes else None
        hashes.extend(block_hashes(tokens[done * self.block_size : full * self.block_size], self.block_size, parent))
        for block, block_hash in zip(self._tables[request_id][done:full], hashes[done:full]):
            self.pool.register(block, block_hash)
