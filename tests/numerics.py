"""What two numerically different computations of the same logits can be asked to agree on.

XLA:CPU picks kernels by instruction set, so float results differ in the last bits between
machines. If two computations' logits differ by at most `atol` everywhere, their top-1 tokens
can differ only where the reference's two best logits are within 2 * atol (a near-tie), and
which way a near-tie falls depends on the machine. So tests compare logits under the same
prefix within a stated tolerance, and top-1 tokens only where the reference is decisive.
"""

from __future__ import annotations

import numpy as np


def top2_margin(logits) -> np.ndarray:
    """logits: [..., vocab] -> [...]: the best logit minus the second best."""
    top2 = np.partition(np.asarray(logits, np.float32), -2, axis=-1)[..., -2:]
    return top2[..., 1] - top2[..., 0]


def assert_logits_close(got, want, atol: float) -> float:
    """max |got - want| <= atol; returns the measured maximum."""
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert got.shape == want.shape, f"shapes {got.shape} and {want.shape}"
    diff = np.abs(got - want)
    worst = float(diff.max())
    assert worst <= atol, (f"max |logits diff| {worst:.3g} > tolerance {atol:.3g} at index "
                           f"{np.unravel_index(diff.argmax(), diff.shape)}")
    return worst


def assert_top1_agrees_where_decisive(got, want, atol: float) -> float:
    """`got` ([...] token ids or [..., vocab] logits) picks the reference logits' `want`
    ([..., vocab]) top-1 token wherever the reference's top-2 margin exceeds 2 * atol, atol
    bounding |got logits - want logits|. Returns the fraction of positions checked."""
    want = np.asarray(want, np.float32)
    tokens = np.asarray(got)
    if tokens.ndim == want.ndim:
        tokens = tokens.argmax(-1)
    margin = top2_margin(want)
    decisive = margin > 2 * atol
    wrong = np.argwhere((tokens != want.argmax(-1)) & decisive)
    assert not len(wrong), (
        f"top-1 differs at {len(wrong)} decisive positions (reference margin > 2 * {atol:.3g}); "
        f"first at {tuple(wrong[0])}: token {tokens[tuple(wrong[0])]} instead of "
        f"{want.argmax(-1)[tuple(wrong[0])]}, margin {margin[tuple(wrong[0])]:.3g}")
    return float(decisive.mean())


def assert_greedy_agrees_until_a_near_tie(got: list[int], want: list[int], want_logits,
                                          atol: float) -> int:
    """Two greedy continuations of one prompt: `want_logits[i]` ([len(want), vocab]) are the
    reference's logits that chose `want[i]` (teacher-forced along `want`). The other
    computation, within `atol` of them under the same prefix, can first differ only at a
    near-tie of the reference (margin <= 2 * atol); past that the prefixes differ and nothing
    is compared. Returns how many tokens agree."""
    margin = top2_margin(np.asarray(want_logits)[: len(want)])
    same = 0
    while same < min(len(got), len(want)) and got[same] == want[same]:
        same += 1
    if same == len(got) == len(want):
        return same
    assert same < len(want) and margin[same] <= 2 * atol, (
        f"greedy tokens differ first at step {same} ({got[same:same + 1]} instead of "
        f"{want[same:same + 1]}; lengths {len(got)}, {len(want)}) where the reference's top-2 "
        f"margin is {margin[min(same, len(margin) - 1)]:.3g} > 2 * {atol:.3g}: not a near-tie")
    return same


def assert_no_near_ties(logits, atol: float) -> float:
    """Every position of the reference `logits` ([..., vocab]) is decisive: its top-2 margin
    exceeds 2 * atol, so any computation within atol of it picks the same greedy tokens.
    Returns the smallest margin."""
    margin = top2_margin(logits)
    smallest = float(margin.min())
    assert smallest > 2 * atol, (
        f"near-tie at {np.unravel_index(margin.argmin(), margin.shape)}: top-2 margin "
        f"{smallest:.3g} <= 2 * {atol:.3g}; pick prompts whose greedy path has none")
    return smallest
