"""Radix prefix cache (RadixAttention): a compressed trie from token ids to the KV slots that hold them.

A request whose prompt starts with a cached prefix reuses that prefix's KV slots instead of recomputing
them. Each node holds a run of tokens (`key`) and the slot of each (`value`); a node's children start
with distinct tokens. The scheduler locks the path of every running request's prefix (`inc_lock_ref`)
so that `evict` — which frees least-recently-used unlocked leaves to the pool — cannot take it away.

Invariants (kept by the methods named, asserted by `check_integrity`):
- len(node.value) == len(node.key) > 0 for every node but the root; a child sits under its first token.
  (`_split` cuts key and value at the same place; `insert` stores slots[existing:] for key[existing:].)
- No slot is held twice, and none is on the pool's free list: the tree only stores slots handed to it
  by `insert` past what it already had, and frees a slot exactly when it drops the node (`evict`, `reset`).
- node.lock_ref == locks taken on it + sum of its children's lock_ref, so parent.lock_ref >=
  sum(children.lock_ref): a lock covers the whole path to the root (`inc_lock_ref`/`dec_lock_ref`).
- evictable_size + protected_size == tokens in the tree, split by lock_ref == 0 / > 0 (the counters
  move when a node is created, evicted, or its lock_ref crosses zero; `_split` keeps both halves' lock_ref).
- parent.last_access >= child.last_access: every access stamps the whole path with the same tick, so
  a leaf is never younger than its parent and evicting leaves first is LRU order.
- Every unlocked leaf has a live entry (its newest) in the LRU heap carrying its current last_access
  (`_push` is called whenever a node becomes an unlocked leaf or an unlocked leaf is stamped).
"""

from __future__ import annotations

import heapq
from typing import NamedTuple, Sequence

import torch

from .kv_pool import KVPool


class TreeNode:
    __slots__ = ("key", "value", "parent", "children", "lock_ref", "last_access", "heap_seq")

    def __init__(self, key: tuple[int, ...], value: torch.Tensor, parent: TreeNode | None, last_access: int):
        self.key = key
        self.value = value
        self.parent = parent  # None for the root and for a node that has been evicted
        self.children: dict[int, TreeNode] = {}
        self.lock_ref = 0
        self.last_access = last_access
        self.heap_seq = -1  # seq of this node's newest LRU heap entry; older entries are stale


class MatchResult(NamedTuple):
    indices: torch.Tensor  # int64 1-D: slot ids of the matched prefix, in order
    node: TreeNode  # deepest matched node (the root if nothing matched); the match ends at its end


class RadixCache:
    def __init__(self, pool: KVPool, disable: bool = False):
        self.pool = pool
        self.disable = disable
        self._clock = 0  # logical time: one tick per match or insert
        self._seq = 0  # tie-breaker so heap entries never compare nodes
        self._new_tree()

    def _new_tree(self) -> None:
        self.root = TreeNode((), self._no_slots(), None, 0)
        self._evictable = 0
        self._protected = 0
        self._num_nodes = 0  # excluding the root; bounds the number of live heap entries
        # (last_access, seq, node); lazily invalidated: see _is_live.
        self._heap: list[tuple[int, int, TreeNode]] = []

    def _no_slots(self) -> torch.Tensor:
        return torch.empty(0, dtype=torch.int64, device=self.pool.device)

    # ---- lookup and insertion ----

    def match_prefix(self, key: Sequence[int]) -> MatchResult:
        if self.disable:
            return MatchResult(self._no_slots(), self.root)
        node, _ = self._walk(tuple(map(int, key)))
        return MatchResult(self.path_slots(node), node)

    def insert(self, key: Sequence[int], slots: torch.Tensor) -> int:
        assert len(slots) == len(key), f"{len(slots)} slots for {len(key)} tokens"
        if self.disable:
            self.pool.free(slots)
            return 0
        key = tuple(map(int, key))
        node, existing = self._walk(key)
        if existing < len(key):
            # A copy: the caller's tensor may be a view of a buffer it reuses (the request→slot table).
            leaf = TreeNode(key[existing:], slots[existing:].clone(), node, self._clock)
            node.children[key[existing]] = leaf
            self._num_nodes += 1
            self._evictable += len(leaf.key)
            self._push(leaf)
        return existing

    def _walk(self, key: tuple[int, ...]) -> tuple[TreeNode, int]:
        """Follow key from the root as far as the tree has it, stamping each node passed with a new tick.

        Returns the deepest node reached and how many tokens matched. A node the match ends inside is
        split first, so the returned node ends exactly where the match does.
        """
        self._clock += 1
        node, pos = self.root, 0
        while pos < len(key):
            child = node.children.get(key[pos])
            if child is None:
                break
            n = _common_prefix_len(child.key, key, pos)
            if n < len(child.key):
                child = self._split(child, n)
            node = child
            pos += n
            node.last_access = self._clock
            if not node.children and node.lock_ref == 0:
                self._push(node)
        return node, pos

    def _split(self, child: TreeNode, n: int) -> TreeNode:
        """Cut child after its first n tokens; the new upper node is returned. The original object stays
        the lower part, so a caller holding it (a lock, a match result) still ends at the same token."""
        upper = TreeNode(child.key[:n], child.value[:n], child.parent, child.last_access)
        upper.lock_ref = child.lock_ref  # the same locks pass through both halves
        upper.children[child.key[n]] = child
        child.parent.children[child.key[0]] = upper
        child.key, child.value, child.parent = child.key[n:], child.value[n:], upper
        self._num_nodes += 1
        return upper

    def path_slots(self, node: TreeNode) -> torch.Tensor:
        parts = []
        while node is not self.root:
            parts.append(node.value)
            node = node.parent
        return torch.cat(parts[::-1]) if parts else self._no_slots()

    # ---- locking ----

    def inc_lock_ref(self, node: TreeNode) -> None:
        while node is not self.root:
            if node.lock_ref == 0:
                self._evictable -= len(node.key)
                self._protected += len(node.key)
            node.lock_ref += 1
            node = node.parent

    def dec_lock_ref(self, node: TreeNode) -> None:
        while node is not self.root:
            assert node.lock_ref > 0, "dec_lock_ref on a node that is not locked"
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self._protected -= len(node.key)
                self._evictable += len(node.key)
                if not node.children:
                    self._push(node)
            node = node.parent

    # ---- eviction ----

    def _push(self, node: TreeNode) -> None:
        self._seq += 1
        node.heap_seq = self._seq
        heapq.heappush(self._heap, (node.last_access, self._seq, node))
        # Stale entries pile up as leaves are stamped, locked or grow children; compact once they
        # clearly outnumber the live ones (at most one per node), keeping push amortised O(log n).
        if len(self._heap) > 4 * self._num_nodes + 64:
            self._heap = [entry for entry in self._heap if _is_live(entry)]
            heapq.heapify(self._heap)

    def evict(self, num_tokens: int) -> int:
        if self.disable:
            return 0
        freed: list[torch.Tensor] = []
        num_freed = 0
        while num_freed < num_tokens and self._heap:
            entry = heapq.heappop(self._heap)
            if not _is_live(entry):
                continue
            node = entry[2]
            parent = node.parent
            del parent.children[node.key[0]]
            node.parent = None
            self._num_nodes -= 1
            self._evictable -= len(node.key)
            num_freed += len(node.key)
            freed.append(node.value)
            if parent is not self.root and not parent.children and parent.lock_ref == 0:
                self._push(parent)
        if freed:
            self.pool.free(torch.cat(freed))
        return num_freed

    # ---- sizes and maintenance ----

    def evictable_size(self) -> int:
        return self._evictable

    def protected_size(self) -> int:
        return self._protected

    def total_size(self) -> int:
        return self._evictable + self._protected

    def all_slots(self) -> torch.Tensor:
        parts = [node.value for node in self._nodes()]
        return torch.cat(parts) if parts else self._no_slots()

    def reset(self) -> None:
        assert self._protected == 0, f"reset with {self._protected} locked tokens in the tree"
        self.pool.free(self.all_slots())
        self._new_tree()

    def _nodes(self) -> list[TreeNode]:
        """Every node but the root, parents before children."""
        out, stack = [], list(self.root.children.values())
        while stack:
            node = stack.pop()
            out.append(node)
            stack.extend(node.children.values())
        return out

    def check_integrity(self) -> None:
        assert self.root.lock_ref == 0 and not self.root.key, "root must be empty and unlocked"
        nodes = self._nodes()
        evictable = protected = 0
        live = {id(entry[2]): entry[0] for entry in self._heap if _is_live(entry)}
        for node in [self.root, *nodes]:
            for first, child in node.children.items():
                assert child.parent is node, f"child {child.key[:4]} has a wrong parent"
                assert child.key and child.key[0] == first, f"child {child.key[:4]} filed under token {first}"
                assert node is self.root or child.last_access <= node.last_access, "a child is newer than its parent"
            if node is self.root:  # the root is never locked: every request shares it
                continue
            children_locks = sum(child.lock_ref for child in node.children.values())
            assert node.lock_ref >= children_locks, f"lock_ref {node.lock_ref} < children's {children_locks}"
            assert len(node.value) == len(node.key), f"{len(node.value)} slots for {len(node.key)} tokens"
            assert node.value.dtype == torch.int64, f"slots of dtype {node.value.dtype}"
            if node.lock_ref:
                protected += len(node.key)
            else:
                evictable += len(node.key)
                if not node.children:
                    assert live.get(id(node)) == node.last_access, f"unlocked leaf {node.key[:4]} not in the LRU heap"
        assert len(nodes) == self._num_nodes, f"{len(nodes)} nodes, counter says {self._num_nodes}"
        assert evictable == self._evictable, f"{evictable} evictable tokens, counter says {self._evictable}"
        assert protected == self._protected, f"{protected} protected tokens, counter says {self._protected}"
        slots = self.all_slots()
        assert slots.numel() == torch.unique(slots).numel(), "a slot is held twice in the tree"
        assert not torch.isin(slots, self.pool.free_slots()).any(), "a slot in the tree is on the free list"


def _is_live(entry: tuple[int, int, TreeNode]) -> bool:
    """A heap entry counts only if it is its node's newest and the node is still an unlocked leaf."""
    _, seq, node = entry
    return seq == node.heap_seq and node.parent is not None and not node.children and node.lock_ref == 0


def _common_prefix_len(node_key: tuple[int, ...], key: tuple[int, ...], start: int) -> int:
    n, limit = 0, min(len(node_key), len(key) - start)
    while n < limit and node_key[n] == key[start + n]:
        n += 1
    return n
