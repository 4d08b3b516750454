"""The prefix cache of serving.pages.PageTable on the host: hash chains, reference counts,
read-only sharing and LRU eviction, checked against a simulated page pool whose "K/V" are the
tokens themselves, through seeded random interleavings of admissions, decode steps,
preemptions, finishes and aborts (the order the scheduler makes its calls in)."""

from __future__ import annotations

import numpy as np
import pytest

from jaxinfer.serving.pages import PageTable

PAGE = 4


def test_a_full_page_prefix_is_found_and_shared_with_a_reference_each():
    table = PageTable(num_pages=10, page_size=PAGE, slots=2, pages_per_seq=4,
                      prefix_caching=True)
    first = list(range(10))  # two full pages and a partial one
    pages = table.allocate(3)
    table.cache(pages, first)
    assert table.cached_count == 2  # the partial page is not cached
    assert table.lookup(first[:9] + [99]) == pages[:2]
    assert table.refs[pages[:2]].tolist() == [2, 2]
    assert table.lookup([7] + first[1:]) == []  # a different first page: a different chain
    assert table.lookup(first[:8]) == pages[:1]  # the last token is always left to prefill


def test_released_cached_pages_count_as_free_and_are_evicted_oldest_first():
    table = PageTable(num_pages=5, page_size=PAGE, slots=1, pages_per_seq=4,
                      prefix_caching=True)
    a, b = table.allocate(2), table.allocate(2)
    table.cache(a, list(range(8)))
    table.cache(b, list(range(100, 108)))
    table.release(a)
    table.release(b)
    assert table.free_count == 4 and table.cached_count == 4
    assert table.allocate(2) == [a[1], a[0]]  # a was released first; a sequence's tail first
    assert table.lookup(list(range(9))) == []  # a's K/V are gone
    assert table.lookup(list(range(100, 109))) == b


def test_without_prefix_caching_nothing_is_found():
    table = PageTable(num_pages=5, page_size=PAGE, slots=1, pages_per_seq=4)
    pages = table.allocate(2)
    table.cache(pages, list(range(8)))
    assert table.lookup(list(range(9))) == [] and table.cached_count == 0


def test_releasing_a_page_without_a_reference_is_refused():
    table = PageTable(num_pages=3, page_size=PAGE, slots=1, pages_per_seq=2)
    table.release(table.allocate(1))
    with pytest.raises(ValueError, match="no reference"):
        table.release([1])


def test_hash_chains_differ_with_the_salt():
    tokens = list(range(8))
    assert (PageTable(3, PAGE, 1, 2, True, b"model a").page_hashes(tokens)
            != PageTable(3, PAGE, 1, 2, True, b"model b").page_hashes(tokens))


class Simulation:
    """The scheduler's calls on a PageTable, with a pool that stores the token at each
    position in place of its K/V, so reading a wrong or overwritten page shows."""

    def __init__(self, rng, num_pages=24, slots=4, pages_per_seq=8):
        self.rng = rng
        self.table = PageTable(num_pages, PAGE, slots, pages_per_seq, prefix_caching=True)
        self.pool = np.full((num_pages, PAGE), -1)
        self.running: dict[int, list[int]] = {}  # slot -> tokens whose K/V are written, + last
        self.prefixes = [list(rng.integers(0, 50, size=n)) for n in (3, 8, 13, 20)]
        self.context = pages_per_seq * PAGE
        self.hits = 0

    def write(self, slot_pages: list[int], position: int, token: int) -> None:
        page = slot_pages[position // PAGE]
        # Only a page its writer holds alone, and that no lookup can find, is written.
        assert self.table.refs[page] == 1, f"writing page {page} shared by {self.table.refs[page]}"
        assert page not in self.table._hash_of, f"writing cached page {page}"
        self.pool[page, position % PAGE] = token

    def admit(self) -> None:
        free = [s for s in range(len(self.table.slot_pages)) if s not in self.running]
        if not free:
            return
        prefix = self.prefixes[self.rng.integers(len(self.prefixes))]
        tail = list(self.rng.integers(0, 50, size=self.rng.integers(1, 8)))
        sequence = (prefix + tail)[: self.context - 2]
        cached = self.table.lookup(sequence)
        for i, page in enumerate(cached):  # a hit holds exactly the tokens it was named by
            assert self.pool[page].tolist() == sequence[i * PAGE : (i + 1) * PAGE]
        new = self.table.allocate(self.table.pages_for(len(sequence) + 1) - len(cached))
        if new is None:
            self.table.release(cached)
            return
        self.hits += len(cached)
        pages = cached + new
        for position in range(len(cached) * PAGE, len(sequence)):  # prefill the rest
            self.write(pages, position, sequence[position])
        self.table.cache(pages, sequence)
        slot = free[0]
        self.table.assign(slot, pages)
        self.running[slot] = sequence + [int(self.rng.integers(0, 50))]  # its first token

    def decode(self) -> None:
        slot = list(self.running)[self.rng.integers(len(self.running))]
        sequence = self.running[slot]
        if len(sequence) >= self.context:
            return self.end(slot)
        if not self.table.grow(slot, len(sequence)):
            return self.end(slot)  # preempted: the scheduler frees it the same way
        self.write(self.table.slot_pages[slot], len(sequence) - 1, sequence[-1])
        sequence.append(int(self.rng.integers(0, 50)))

    def end(self, slot: int) -> None:
        """Finish, abort or preemption: cache the written pages, drop the slot's references."""
        self.table.cache(self.table.slot_pages[slot], self.running.pop(slot)[:-1])
        self.table.free(slot)

    def check(self) -> None:
        table = self.table
        holders = np.zeros(table.num_pages, np.int32)
        for pages in table.slot_pages:
            holders[pages] += 1
        assert holders[0] == 0 and table.refs[0] == 0  # scratch is never handed out
        assert (table.refs == holders).all(), "a reference count differs from its holders"
        held = np.count_nonzero(holders)
        assert table.free_count + held == table.usable  # no page lost or counted twice
        assert all(table.refs[p] == 0 and p not in table._hash_of for p in table._free)
        assert all(table.refs[p] == 0 and p in table._hash_of for p in table._evictable)
        for slot, pages in enumerate(table.slot_pages):
            assert table.table[slot, : len(pages)].tolist() == pages


@pytest.mark.parametrize("seed", range(40))
def test_random_interleavings_keep_reference_counts_and_never_hand_out_a_page_in_use(seed):
    sim = Simulation(np.random.default_rng(seed))
    for _ in range(300):
        action = sim.rng.random()
        if action < 0.3 or not sim.running:
            sim.admit()
        elif action < 0.9:
            sim.decode()
        else:
            sim.end(list(sim.running)[sim.rng.integers(len(sim.running))])
        sim.check()
    for slot in list(sim.running):
        sim.end(slot)
    sim.check()
    assert sim.table.free_count == sim.table.usable
    assert sim.hits > 0  # the shared prefixes were found, so sharing was exercised
