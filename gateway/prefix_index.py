"""An approximate, bounded index of which prompt prefixes each worker has seen.

Text is cut into fixed-size blocks and each block is named by a hash chained with the previous one's,
so a block hash stands for the whole prefix up to it. A worker's index is the set of block hashes it
was sent, kept in LRU order and bounded by the bytes of text those blocks stand for; matching walks a
prompt's chain until a block the worker has not seen. Matches are exact to block granularity (a
prompt shorter than one block never matches), and the memory per worker is bounded by construction.

Eviction drops a worker's least recently sent blocks, deepest first within a prompt (like the
engine's radix cache evicting leaves), so a surviving block always has its whole prefix too.
Invariant (checked by `check`): each worker's blocks stand for at most max_bytes_per_worker bytes.
"""

from __future__ import annotations

import struct
from collections import OrderedDict, deque


def block_chain(data: bytes, block_size: int) -> list[int]:
    """The block hashes of a text's full blocks (its UTF-8 bytes), each naming the prefix that ends with it.

    Python's own 64-bit hash, chained through a tuple: a third of blake2b's cost per block (a 4 KB
    prompt's chain in ~30 µs instead of ~80), and a collision only misroutes, it never corrupts. It is
    seeded per process (PYTHONHASHSEED): chains are compared only within one process, or between the
    relays, which share a seed (gateway/relays.py)."""
    hashes, previous = [], 0
    # struct cuts the blocks in one C loop: a quarter faster than slicing each (a 16 KB prompt: 34 -> 26 µs).
    for (block,) in struct.iter_unpack(f"{block_size}s", memoryview(data)[:len(data) - len(data) % block_size]):
        previous = hash((previous, block))
        hashes.append(previous)
    return hashes


def _held(blocks: OrderedDict[int, None], chain: list[int]) -> int:
    """How many of the chain's blocks `blocks` holds: they are a leading run of it (a block is never evicted
    before a deeper block of the same prefix, see above), so a binary search finds its end, ~8 lookups for a
    256-block prompt instead of up to 256."""
    held, absent = 0, len(chain)  # chain[:held] is held; chain[absent:] is not
    while held < absent:
        middle = (held + absent + 1) // 2
        if chain[middle - 1] in blocks:
            held = middle
        else:
            absent = middle - 1
    return held


class PrefixIndex:
    def __init__(self, block_size: int = 64, max_bytes_per_worker: int = 64 << 20):
        if block_size < 1 or max_bytes_per_worker < block_size:
            raise ValueError("block_size must be >= 1 and max_bytes_per_worker >= block_size")
        self.block_size = block_size
        self.max_bytes = max_bytes_per_worker
        self._blocks: dict[str, OrderedDict[int, None]] = {}

    def chain(self, text: str) -> list[int]:
        return block_chain(text.encode(), self.block_size)

    def match(self, chain: list[int], worker: str) -> int:
        """Bytes of the prefix (whole blocks) that `worker` was already sent."""
        blocks = self._blocks.get(worker)
        return _held(blocks, chain) * self.block_size if blocks else 0

    def insert(self, chain: list[int], worker: str) -> None:
        """Record that worker was sent this prefix; refreshes it and evicts the least recently sent.

        The prompt's first block ends up most recent and its last evicted first, as if each block from the
        last to the first were moved to the end in turn; done in two C-level passes instead (2.5x faster on
        a 16 KB prompt): the blocks not held yet are appended, deepest first, then the held ones (a leading
        run of the chain, see `_held`) are moved behind them."""
        blocks = self._blocks.setdefault(worker, OrderedDict())
        held = _held(blocks, chain) if blocks else 0
        if held < len(chain):
            blocks.update(dict.fromkeys(reversed(chain[held:])))
        deque(map(blocks.move_to_end, reversed(chain[:held])), 0)  # consumed for its calls
        while len(blocks) * self.block_size > self.max_bytes:
            blocks.popitem(last=False)

    def forget(self, worker: str) -> None:
        """A restarted worker has an empty cache: stop routing its old prefixes to it."""
        self._blocks.pop(worker, None)

    def bytes_of(self, worker: str) -> int:
        return len(self._blocks.get(worker, ())) * self.block_size

    def check(self) -> None:
        for worker, blocks in self._blocks.items():
            assert len(blocks) * self.block_size <= self.max_bytes, f"{worker} is over its byte budget"
