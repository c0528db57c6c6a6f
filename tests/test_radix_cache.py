"""Radix prefix cache: direct cases, then a randomized run against a token-level reference model."""

from __future__ import annotations

import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from sglang_gw.engine.kv_pool import KVLayout, KVPool
from sglang_gw.engine.radix_cache import RadixCache


def make_pool(size: int) -> KVPool:
    return KVPool(KVLayout(num_layers=1, num_kv_heads=1, head_dim=1, dtype=torch.float32), size, torch.device("cpu"))


def insert_fresh(cache: RadixCache, pool: KVPool, key: list[int]) -> torch.Tensor:
    """Insert key with newly allocated slots, freeing the ones the tree already had, as a scheduler would."""
    slots = pool.alloc(len(key))
    existing = cache.insert(key, slots)
    pool.free(slots[:existing])
    return slots


def test_match_on_empty_tree():
    cache = RadixCache(make_pool(8))
    result = cache.match_prefix([1, 2, 3])
    assert result.indices.tolist() == [] and result.indices.dtype == torch.int64
    assert result.node is cache.root
    cache.check_integrity()


def test_insert_then_match():
    pool = make_pool(8)
    cache = RadixCache(pool)
    slots = insert_fresh(cache, pool, [1, 2, 3])
    assert cache.match_prefix([1, 2, 3]).indices.tolist() == slots.tolist()
    assert cache.match_prefix([1, 2, 3, 4, 5]).indices.tolist() == slots.tolist()
    assert cache.match_prefix([2, 1]).node is cache.root
    assert cache.total_size() == cache.evictable_size() == 3 and pool.available() == 5
    cache.check_integrity()


def test_partial_match_splits_node():
    pool = make_pool(8)
    cache = RadixCache(pool)
    slots = insert_fresh(cache, pool, [1, 2, 3, 4])
    result = cache.match_prefix([1, 2, 9])
    assert result.indices.tolist() == slots[:2].tolist()
    assert result.node.key == (1, 2)
    assert [child.key for child in result.node.children.values()] == [(3, 4)]
    assert cache.total_size() == 4
    cache.check_integrity()


def test_insert_returns_existing_length():
    pool = make_pool(16)
    cache = RadixCache(pool)
    first = insert_fresh(cache, pool, [1, 2, 3])
    slots = pool.alloc(4)
    assert cache.insert([1, 2, 5, 6], slots) == 2
    pool.free(slots[:2])
    assert cache.match_prefix([1, 2, 5, 6]).indices.tolist() == first[:2].tolist() + slots[2:].tolist()
    assert cache.total_size() == 5 and pool.available() + cache.total_size() == pool.size
    cache.check_integrity()


def test_lock_protects_from_eviction():
    pool = make_pool(8)
    cache = RadixCache(pool)
    insert_fresh(cache, pool, [1, 2, 3])
    insert_fresh(cache, pool, [1, 2, 4])
    node = cache.match_prefix([1, 2, 3]).node
    cache.inc_lock_ref(node)
    assert cache.protected_size() == 3 and cache.evictable_size() == 1
    assert cache.evict(100) == 1  # only the unlocked branch [4] goes
    assert cache.match_prefix([1, 2, 3]).node is node
    cache.dec_lock_ref(node)
    assert cache.protected_size() == 0 and cache.evictable_size() == 3
    assert cache.evict(100) == 3
    assert pool.available() == pool.size
    cache.check_integrity()


def test_evict_frees_lru_leaf_to_pool():
    pool = make_pool(8)
    cache = RadixCache(pool)
    old = insert_fresh(cache, pool, [1, 2])
    insert_fresh(cache, pool, [3, 4, 5])
    cache.match_prefix([1, 2])  # [3, 4, 5] is now the least recently used
    assert cache.evict(1) == 3  # whole nodes only
    assert pool.available() == 6
    assert cache.match_prefix([3, 4, 5]).node is cache.root
    assert cache.match_prefix([1, 2]).indices.tolist() == old.tolist()
    cache.check_integrity()
    pool.check()


def test_lru_heap_stays_compact():
    pool = make_pool(8)
    cache = RadixCache(pool)
    insert_fresh(cache, pool, [1, 2, 3])
    for _ in range(1000):
        cache.match_prefix([1, 2, 3])  # each stamp leaves the previous heap entry stale
    assert len(cache._heap) < 100
    cache.check_integrity()


def test_disabled():
    pool = make_pool(8)
    cache = RadixCache(pool, disable=True)
    slots = pool.alloc(3)
    assert cache.insert([1, 2, 3], slots) == 0
    assert pool.available() == 8  # the cache gave the slots straight back
    result = cache.match_prefix([1, 2, 3])
    assert result.indices.numel() == 0 and result.node is cache.root
    assert cache.evict(10) == 0 and cache.total_size() == 0
    cache.check_integrity()


def test_reset():
    pool = make_pool(8)
    cache = RadixCache(pool)
    insert_fresh(cache, pool, [1, 2, 3])
    insert_fresh(cache, pool, [1, 4])
    cache.reset()
    assert pool.available() == 8 and cache.total_size() == 0
    assert cache.match_prefix([1, 2, 3]).node is cache.root
    cache.check_integrity()
    pool.check()


# ---- randomized run against a reference model ----

ALPHABET = 4
keys = st.lists(st.integers(0, ALPHABET - 1), max_size=12)
picks = st.integers(0, 1000)  # index into a list of held items, taken modulo its length


class RadixCacheMachine(RuleBasedStateMachine):
    """The reference holds every cached prefix (as a tuple) with the slot of its last token, and the
    logical time it was last accessed. Locks are node handles from match_prefix; running requests hold
    a locked matched prefix plus slots of their own until they finish and insert."""

    def __init__(self):
        super().__init__()
        self.pool = make_pool(24)
        self.cache = RadixCache(self.pool)
        self.slot_of: dict[tuple[int, ...], int] = {}
        self.accessed: dict[tuple[int, ...], int] = {}
        self.clock = 0
        self.locks: list[tuple[object, tuple[int, ...], list[int]]] = []  # (node, matched key, its slots)
        self.running: list[tuple[tuple[int, ...], torch.Tensor, object, int]] = []  # (key, slots, node, cached)

    # -- reference helpers --

    def ref_match_len(self, key: tuple[int, ...]) -> int:
        m = 0
        while m < len(key) and key[: m + 1] in self.slot_of:
            m += 1
        return m

    def stamp(self, key: tuple[int, ...], length: int) -> None:
        self.clock += 1
        for i in range(1, length + 1):
            self.accessed[key[:i]] = self.clock

    def locked_prefixes(self) -> set[tuple[int, ...]]:
        held = [key for _, key, _ in self.locks] + [key[:cached] for key, _, _, cached in self.running]
        return {key[:i] for key in held for i in range(1, len(key) + 1)}

    def match(self, key: tuple[int, ...]):
        result = self.cache.match_prefix(key)
        m = self.ref_match_len(key)
        assert result.indices.tolist() == [self.slot_of[key[:i]] for i in range(1, m + 1)]
        assert result.node is self.cache.root if m == 0 else key[m - len(result.node.key) : m] == result.node.key
        self.stamp(key, m)
        return result, m

    def insert(self, key: tuple[int, ...], slots: torch.Tensor, owned: int) -> None:
        """Insert as a scheduler does; slots[:owned] are already the tree's own, the rest are ours."""
        m = self.ref_match_len(key)
        existing = self.cache.insert(key, slots)
        assert existing == m and existing >= owned
        self.pool.free(slots[owned:existing])
        for i in range(existing + 1, len(key) + 1):
            self.slot_of[key[:i]] = int(slots[i - 1])
        self.stamp(key, len(key))

    def alloc(self, n: int) -> torch.Tensor | None:
        slots = self.pool.alloc(n)
        if slots is None:
            self.evict_and_check(n - self.pool.available())
            slots = self.pool.alloc(n)
        return slots

    def evict_and_check(self, n: int) -> None:
        evictable, available = self.cache.evictable_size(), self.pool.available()
        freed = self.cache.evict(n)
        assert self.pool.available() - available == freed
        assert freed >= min(n, evictable)
        kept_slots = set(self.cache.all_slots().tolist())
        removed = {p for p, slot in self.slot_of.items() if slot not in kept_slots}
        kept = self.slot_of.keys() - removed
        assert freed == len(removed)
        assert not removed & self.locked_prefixes(), "a locked prefix was evicted"
        assert all(len(p) == 1 or p[:-1] in kept for p in kept), "an evicted prefix left an extension behind"
        locked = self.locked_prefixes()
        leaves = [p for p in kept if p not in locked and not any(p + (t,) in kept for t in range(ALPHABET))]
        if removed and leaves:
            assert max(self.accessed[p] for p in removed) <= min(self.accessed[p] for p in leaves), "not LRU"
        for p in removed:
            del self.slot_of[p], self.accessed[p]

    # -- rules --

    @rule(key=keys)
    def insert_fresh(self, key):
        key = tuple(key)
        slots = self.alloc(len(key))
        if slots is not None:
            self.insert(key, slots, owned=0)

    @rule(key=keys)
    def start_request(self, key):
        key = tuple(key)
        result, m = self.match(key)
        self.cache.inc_lock_ref(result.node)
        self.running.append((key, result.indices, result.node, m))
        extra = self.alloc(len(key) - m)
        if extra is None:
            self.running.pop()
            self.cache.dec_lock_ref(result.node)
        else:
            self.running[-1] = (key, torch.cat([result.indices, extra]), result.node, m)

    @precondition(lambda self: self.running)
    @rule(pick=picks)
    def finish_request(self, pick):
        key, slots, node, cached = self.running.pop(pick % len(self.running))
        self.insert(key, slots, owned=cached)
        self.cache.dec_lock_ref(node)

    @rule(key=keys)
    def match_prefix(self, key):
        self.match(tuple(key))

    @rule(key=keys)
    def lock(self, key):
        key = tuple(key)
        result, m = self.match(key)
        self.cache.inc_lock_ref(result.node)
        self.locks.append((result.node, key[:m], result.indices.tolist()))

    @precondition(lambda self: self.locks)
    @rule(pick=picks)
    def unlock(self, pick):
        node, _, _ = self.locks.pop(pick % len(self.locks))
        self.cache.dec_lock_ref(node)

    @precondition(lambda self: self.locks)
    @rule(pick=picks)
    def locked_node_still_matches(self, pick):
        node, key, slots = self.locks[pick % len(self.locks)]
        result, _ = self.match(key)
        assert result.node is node and result.indices.tolist() == slots

    @rule(n=st.integers(0, 30))
    def evict(self, n):
        self.evict_and_check(n)

    @precondition(lambda self: not self.locks and not self.running)
    @rule()
    def reset(self):
        self.cache.reset()
        self.slot_of.clear()
        self.accessed.clear()

    # -- after every step --

    @invariant()
    def consistent(self):
        self.cache.check_integrity()
        self.pool.check()
        held = sum(len(slots) - cached for _, slots, _, cached in self.running)
        assert self.pool.available() + self.cache.total_size() + held == self.pool.size
        assert self.cache.total_size() == len(self.slot_of)
        assert self.cache.protected_size() == len(self.locked_prefixes())


RadixCacheMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)
test_radix_cache_against_reference = RadixCacheMachine.TestCase
