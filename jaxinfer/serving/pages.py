"""The KV page allocator and the host page table, owned by the scheduler.

The engine's page pool lives on the device; which page belongs to which slot is decided
here, on the host, and each decode call takes the table rows of the slots it runs. Page 0 is
scratch: never handed out, so free slots and padding write there.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


class PageTable:
    """A pool of `num_pages` pages (page 0 scratch) and each slot's pages, in order.

    `table` [slots, pages_per_seq]: slot s's position p lives in page table[s, p // page_size].
    """

    def __init__(self, num_pages: int, page_size: int, slots: int, pages_per_seq: int):
        self.num_pages, self.page_size, self.pages_per_seq = num_pages, page_size, pages_per_seq
        self._free = list(range(num_pages - 1, 0, -1))  # pop() hands out low ids first
        self.table = np.zeros((slots, pages_per_seq), np.int32)
        self.slot_pages: list[list[int]] = [[] for _ in range(slots)]

    @property
    def free_count(self) -> int:
        return len(self._free)

    @property
    def usable(self) -> int:
        """Pages that can be handed out (all but the scratch page)."""
        return self.num_pages - 1

    def pages_for(self, positions: int) -> int:
        """Pages that hold `positions` positions of one sequence (at most a full row)."""
        return min(math.ceil(positions / self.page_size), self.pages_per_seq)

    def allocate(self, n: int) -> list[int] | None:
        """n free pages, or None (and nothing taken) when fewer are left."""
        if n > len(self._free):
            return None
        return [self._free.pop() for _ in range(n)]

    def release(self, pages: Sequence[int]) -> None:
        self._free.extend(reversed(pages))

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
        """Returns the slot's pages to the pool; its table row points at scratch again."""
        self.release(self.slot_pages[slot])
        self.slot_pages[slot] = []
        self.table[slot] = 0

    def move(self, source: int, target: int) -> None:
        """Moves slot `source`'s pages to the empty slot `target` (the K/V stay in place)."""
        self.assign(target, self.slot_pages[source])
        self.slot_pages[source] = []
        self.table[source] = 0
