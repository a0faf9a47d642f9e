"""The physical blocks of the paged KV cache: which are free, who holds which, and which hold a
cached prompt prefix.

Blocks are handed out lowest number first, so the blocks in use cluster at the bottom of the pool
and the decode's block-major attention (`kv_cache.DecodeKV`) reads few blocks nobody uses. A block
counts its holders, so sequences with a common prefix share it.

Prefix reuse (HELIOS observes that consecutive requests share prefixes: a system prompt, a chat
history): a full block of prompt positions is registered under a hash of its tokens and of every
token before it. A later prompt that starts with the same tokens takes those blocks instead of
recomputing them. A cached block is valid for the layers it was computed with: unloading layers keeps
it (the remaining layers' K/V is unchanged), loading layers forgets every cached block (the new
layers have no K/V for it). When its last holder ends, a cached block stays in the
pool, *evictable*: it is reclaimed, least recently used first, only when no free block is left.
The hash is SHA-256, so a crafted prompt cannot collide with another request's prefix.
"""

from __future__ import annotations

import hashlib
import heapq
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence


class OutOfBlocks(RuntimeError):
    """No free block: the scheduler preempts a sequence before this can happen."""


def block_hashes(tokens: Sequence[int], block_size: int, num_blocks: int) -> list[bytes]:
    """The prefix hash of each of the first `num_blocks` full blocks of `tokens`: block i's hash covers
    tokens [0, (i+1)·block_size), chained through the hash of block i-1."""
    hashes, parent = [], b""
    for i in range(num_blocks):
        chunk = tokens[i * block_size : (i + 1) * block_size]
        parent = hashlib.sha256(parent + b"".join(t.to_bytes(4, "little") for t in chunk)).digest()
        hashes.append(parent)
    return hashes


@dataclass
class PrefixStats:
    lookups: int = 0  # prompt blocks looked up
    hits: int = 0  # of those, found cached
    tokens_saved: int = 0  # prompt positions not prefilled thanks to a hit

    @property
    def hit_rate(self) -> float:
        return self.hits / self.lookups if self.lookups else 0.0

    def counts(self) -> tuple[int, int, int]:
        """(lookups, hits, tokens_saved), for summing over engines."""
        return self.lookups, self.hits, self.tokens_saved


class BlockAllocator:
    def __init__(self, num_blocks: int, prefix_caching: bool = True):
        self.num_blocks = num_blocks
        self.prefix_caching = prefix_caching
        self.refs = [0] * num_blocks
        self._free = list(range(num_blocks))  # a heap
        self._cached: dict[bytes, int] = {}  # prefix hash -> block
        self._hash_of: dict[int, bytes] = {}  # block -> its prefix hash, for cached blocks
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached blocks nobody holds, LRU first
        self.stats = PrefixStats()

    @property
    def num_free(self) -> int:
        """Blocks an allocation can get: free ones, and cached ones nobody holds."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        return len(self._hash_of)

    def allocate(self) -> int:
        if self._free:
            block = heapq.heappop(self._free)
        elif self._evictable:
            block, _ = self._evictable.popitem(last=False)
            self._forget(block)
        else:
            raise OutOfBlocks(f"all {self.num_blocks} KV blocks are in use")
        self.refs[block] = 1
        return block

    def free(self, block: int) -> None:
        self.refs[block] -= 1
        if self.refs[block] == 0:
            if block in self._hash_of:
                self._evictable[block] = None  # most recently used last
            else:
                heapq.heappush(self._free, block)

    # --- prefix reuse ---------------------------------------------------------------------------
    def match(self, hashes: list[bytes]) -> list[int]:
        """The cached blocks of the longest cached prefix among `hashes`."""
        hit = []
        for h in hashes:
            if h not in self._cached:
                break
            hit.append(self._cached[h])
        return hit

    def num_reclaimable(self, blocks: list[int]) -> int:
        """How many of `blocks` nobody holds: taking them leaves that many fewer blocks to allocate."""
        return sum(self.refs[b] == 0 for b in blocks)

    def take(self, hit: list[int], looked_up: int, block_size: int) -> None:
        """Hold the blocks `match` found (the caller frees them like its own), and count the lookup."""
        for block in hit:
            if self.refs[block] == 0:
                del self._evictable[block]
            self.refs[block] += 1
        self.stats.lookups += looked_up
        self.stats.hits += len(hit)
        self.stats.tokens_saved += len(hit) * block_size

    def register(self, block: int, block_hash: bytes) -> None:
        """`block` (held) now holds the K/V of the prefix `block_hash`."""
        if not self.prefix_caching or block_hash in self._cached or block in self._hash_of:
            return  # an equal block is cached already: this one stays private
        self._cached[block_hash] = block
        self._hash_of[block] = block_hash

    def forget_cached(self) -> None:
        """Forget every cached prefix (layers were loaded: the cached blocks have no K/V for them)."""
        for block in list(self._hash_of):
            self._forget(block)
        for block in self._evictable:
            heapq.heappush(self._free, block)
        self._evictable.clear()

    def _forget(self, block: int) -> None:
        del self._cached[self._hash_of.pop(block)]

    # --- re-sizing ------------------------------------------------------------------------------
    def resize(self, num_blocks: int, tables: list[list[int]]) -> dict[int, int]:
        """Re-number the pool to `num_blocks` blocks, keeping the blocks `tables` hold (which must fit).

        Held blocks numbered beyond the new pool move to the lowest free numbers; the tables are
        updated in place, and so is the prefix cache (of the cached blocks nobody holds, those beyond
        the new pool are dropped). Returns old -> new number for every block whose contents survive
        (the KV cache copies them): the held ones, and the cached ones that stay.
        """
        held = sorted({b for table in tables for b in table})
        if len(held) > num_blocks:
            raise OutOfBlocks(f"{len(held)} blocks are held but the pool would have {num_blocks}")
        stay = [b for b in held if b < num_blocks]
        outside = len(held) - len(stay)
        # Cached blocks nobody holds keep their number if it is in the new pool and not needed for a
        # held block that must move; the rest are dropped, least recently used first.
        for block in list(self._evictable):
            if block >= num_blocks or num_blocks - len(stay) - len(self._evictable) < outside:
                del self._evictable[block]
                self._forget(block)
        vacant = iter(sorted(set(range(num_blocks)) - set(stay) - set(self._evictable)))
        moves = {b: b for b in stay} | {b: next(vacant) for b in held if b >= num_blocks}
        refs = [0] * num_blocks
        for b in held:
            refs[moves[b]] = self.refs[b]
        for table in tables:
            table[:] = [moves[b] for b in table]
        moved = moves | {b: b for b in self._evictable}
        self._hash_of = {moved[b]: h for b, h in self._hash_of.items()}
        self._cached = {h: moved[b] for h, b in self._cached.items()}
        self.num_blocks, self.refs = num_blocks, refs
        self._free = [b for b in range(num_blocks) if refs[b] == 0 and b not in self._evictable]  # sorted: a heap
        return moved
