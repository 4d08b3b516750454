"""The KV page allocator, the host page table and the prefix cache, owned by the scheduler.

The engine's page pool lives on the device; which page belongs to which slot is decided
here, on the host, and each decode call takes the table rows of the slots it runs. Page 0 is
scratch: never handed out, so free slots and padding write there.

Prefix caching (as vLLM's automatic prefix caching, our own code): a full page is named by a
hash chain, the hash of its parent page's hash and its own tokens (the chain's root hashes
whatever else changes a page's contents: the model config, its dtypes, the kv format). Pages
are reference counted; a page whose count drops to 0 keeps its K/V and its hash, and is
evicted least-recently-released first only when `allocate` finds no never-cached page left.
A request shares the cached pages of its longest cached prefix read-only: the engine writes
only positions past them (prefill of the rest, then decode).

Host tier (`HostTier`): a cached page evicted from the device pool can keep its K/V in host
memory (a jax "pinned_host" array, within a byte budget); a lookup that runs past the device
pages continues there, and each hit is copied back into a fresh device page instead of being
recomputed.
"""

from __future__ import annotations

import collections
import hashlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


class HostTier:
    """K/V of cached pages evicted from the device pool, by page hash, in host memory up to
    `budget_bytes` (least recently stored out first).

    `save(page) -> data` copies one device page out (a tuple of host arrays);
    `load(page, data)` writes it back into a device page: the engine's `read_pages` and
    `write_pages`.
    """

    def __init__(self, budget_bytes: int, save: Callable[[int], Any],
                 load: Callable[[int, Any], None]):
        self.budget_bytes, self.save, self.load = budget_bytes, save, load
        self._pages: collections.OrderedDict[bytes, Any] = collections.OrderedDict()
        self.bytes = 0
        self.restored = 0  # pages brought back so far

    def __contains__(self, page_hash: bytes) -> bool:
        return page_hash in self._pages

    def __len__(self) -> int:
        return len(self._pages)

    def put(self, page_hash: bytes, page: int) -> None:
        """Keeps device page `page`'s K/V (about to be reused) under `page_hash`."""
        data = self.save(page)
        size = sum(x.nbytes for x in data)
        if size > self.budget_bytes:
            return
        while self.bytes + size > self.budget_bytes:
            _, old = self._pages.popitem(last=False)
            self.bytes -= sum(x.nbytes for x in old)
        self._pages[page_hash] = data
        self.bytes += size

    def restore(self, page_hash: bytes, page: int) -> None:
        """Writes the K/V kept under `page_hash` into device page `page` (and forgets them)."""
        data = self._pages.pop(page_hash)
        self.bytes -= sum(x.nbytes for x in data)
        self.load(page, data)
        self.restored += 1


class PageTable:
    """A pool of `num_pages` pages (page 0 scratch) and each slot's pages, in order.

    `table` [slots, pages_per_seq]: slot s's position p lives in page table[s, p // page_size].
    `salt`: bytes naming everything besides tokens that makes two pages' K/V differ (pass the
    model config); with `prefix_caching` False, `lookup` finds nothing and `cache` keeps nothing.
    `host`: where evicted cached pages go (None: they are dropped).
    """

    def __init__(self, num_pages: int, page_size: int, slots: int, pages_per_seq: int,
                 prefix_caching: bool = False, salt: bytes = b"", host: HostTier | None = None):
        self.num_pages, self.page_size, self.pages_per_seq = num_pages, page_size, pages_per_seq
        self.prefix_caching, self.host = prefix_caching, host
        self._free = list(range(num_pages - 1, 0, -1))  # never cached; pop() gives low ids first
        self._evictable: collections.OrderedDict[int, None] = collections.OrderedDict()  # LRU
        self.refs = np.zeros(num_pages, np.int32)  # holders of each page (slots, prefills)
        self._page_of: dict[bytes, int] = {}  # page hash -> the cached page with those K/V
        self._hash_of: dict[int, bytes] = {}  # cached page -> its hash
        self._root = hashlib.sha256(b"jaxinfer-kv-page\0" + salt).digest()
        self.table = np.zeros((slots, pages_per_seq), np.int32)
        self.slot_pages: list[list[int]] = [[] for _ in range(slots)]

    @property
    def free_count(self) -> int:
        """Pages `allocate` can hand out: never-cached ones and unreferenced cached ones."""
        return len(self._free) + len(self._evictable)

    @property
    def cached_count(self) -> int:
        """Pages holding a cached prefix page (referenced or not)."""
        return len(self._hash_of)

    @property
    def usable(self) -> int:
        """Pages that can be handed out (all but the scratch page)."""
        return self.num_pages - 1

    def pages_for(self, positions: int) -> int:
        """Pages that hold `positions` positions of one sequence (at most a full row)."""
        return min(math.ceil(positions / self.page_size), self.pages_per_seq)

    def allocate(self, n: int) -> list[int] | None:
        """n free pages, each with one reference, or None (and nothing taken) when fewer are
        left. Never-cached pages go first, then the least recently released cached ones."""
        if n > self.free_count:
            return None
        pages = []
        for _ in range(n):
            if self._free:
                page = self._free.pop()
            else:
                page, _ = self._evictable.popitem(last=False)
                page_hash = self._hash_of.pop(page)
                del self._page_of[page_hash]
                if self.host is not None:
                    self.host.put(page_hash, page)
            self.refs[page] = 1
            pages.append(page)
        return pages

    def release(self, pages: Sequence[int]) -> None:
        """Drops one reference to each page; an unreferenced page becomes free (a cached one
        stays findable until evicted). The last page goes first into the LRU order: a
        sequence's tail is the least likely to be shared."""
        for page in reversed(pages):
            if self.refs[page] < 1:
                raise ValueError(f"page {page} released with no reference held")
            self.refs[page] -= 1
            if self.refs[page]:
                continue
            if page in self._hash_of:
                self._evictable[page] = None
            else:
                self._free.append(page)

    # -- the prefix cache ---------------------------------------------------------------------

    def page_hashes(self, tokens: Sequence[int]) -> list[bytes]:
        """The hash chain of every full page of `tokens` (a sequence from position 0)."""
        hashes, parent = [], self._root
        ids = np.asarray(tokens, np.int64)
        for i in range(len(ids) // self.page_size):
            page = ids[i * self.page_size : (i + 1) * self.page_size]
            parent = hashlib.sha256(parent + page.tobytes()).digest()
            hashes.append(parent)
        return hashes

    def lookup(self, tokens: Sequence[int]) -> list[int]:
        """The cached pages of the longest cached prefix of `tokens`, one reference taken on
        each. The last token is never covered, since prefill must compute its logits."""
        if not self.prefix_caching:
            return []
        pages, hashes = [], self.page_hashes(tokens[: len(tokens) - 1])
        for h in hashes:
            page = self._page_of.get(h)
            if page is None:
                break
            pages.append(page)
        for page in pages:
            self.refs[page] += 1
            self._evictable.pop(page, None)
        for h in hashes[len(pages):]:  # then what the host tier kept, copied back
            if self.host is None or h not in self.host or not (new := self.allocate(1)):
                break
            self.host.restore(h, new[0])
            self._page_of[h], self._hash_of[new[0]] = new[0], h
            pages += new
        return pages

    def cache(self, pages: Sequence[int], tokens: Sequence[int]) -> None:
        """Makes the full pages of `tokens` findable: pages[i] holds the K/V of tokens
        [i * page_size, (i + 1) * page_size), all written. A page already cached, or whose
        contents another page caches already, is left as it is."""
        if not self.prefix_caching:
            return
        for page, h in zip(pages, self.page_hashes(tokens), strict=False):
            if page not in self._hash_of and h not in self._page_of:
                self._page_of[h], self._hash_of[page] = page, h

    # -- slots --------------------------------------------------------------------------------

    def assign(self, slot: int, pages: Sequence[int]) -> None:
        """Makes `pages` (allocated already) slot `slot`'s, which must be empty."""
        if self.slot_pages[slot]:
            raise ValueError(f"slot {slot} holds {len(self.slot_pages[slot])} pages; free it "
                             "first")
        self.slot_pages[slot] = list(pages)
        self.table[slot] = 0
        self.table[slot, : len(pages)] = pages

    def grow(self, slot: int, positions: int) -> bool:
        """Gives `slot` pages for its first `positions` positions; False if the pool ran out."""
        have = self.slot_pages[slot]
        need = self.pages_for(positions) - len(have)
        if need <= 0:
            return True
        pages = self.allocate(need)
        if pages is None:
            return False
        self.table[slot, len(have) : len(have) + need] = pages
        have.extend(pages)
        return True

    def free(self, slot: int) -> None:
        """Drops the slot's references to its pages; its table row points at scratch again."""
        self.release(self.slot_pages[slot])
        self.slot_pages[slot] = []
        self.table[slot] = 0

    def move(self, source: int, target: int) -> None:
        """Moves slot `source`'s pages to the empty slot `target` (the K/V stay in place)."""
        self.assign(target, self.slot_pages[source])
        self.slot_pages[source] = []
        self.table[source] = 0
