"""Prioritized replay: the sum and min trees (both implementations, against a direct computation and
each other), the sampler over a replay memory (frequencies, importance weights, write-back, the
overwritten-slot rule, bad updates), and beta's anneal."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from gorila_zmq._native import pure_python
from gorila_zmq.replay.memory import NotReady, ReplayMemory
from gorila_zmq.replay.priority import PrioritizedReplay, PriorityTree, beta_at

IMPLS = ["numpy"] if pure_python() else ["cython", "numpy"]


def chi2_ok(counts: np.ndarray, probs: np.ndarray) -> tuple[bool, float]:
    """Pearson's chi-square of counts against probabilities, within 6 standard deviations of its mean."""
    n, keep = counts.sum(), probs > 0
    expect = n * probs[keep]
    chi2 = float(((counts[keep] - expect) ** 2 / expect).sum())
    d = int(keep.sum()) - 1
    return chi2 < d + 6 * np.sqrt(2 * d) and counts[~keep].sum() == 0, chi2


# ---------------------------------------------------------------- the trees

@pytest.mark.parametrize("impl", IMPLS)
def test_tree_sampling_frequencies_match_the_priorities(impl):
    rng = np.random.default_rng(0)
    n = 100
    p = rng.gamma(0.5, size=n)
    p[rng.random(n) < 0.2] = 0.0                      # empty leaves are never drawn
    t = PriorityTree(n, impl=impl)
    t.set(np.arange(n), p)
    counts = np.zeros(n)
    for _ in range(100):                               # 10^5 draws, 1,000 per stratified batch
        np.add.at(counts, t.sample(1000, rng), 1)
    ok, chi2 = chi2_ok(counts, p / p.sum())
    assert ok, chi2


@pytest.mark.parametrize("impl", IMPLS)
def test_tree_total_min_and_updates(impl):
    t = PriorityTree(5, impl=impl)
    assert t.total() == 0 and t.min() == np.inf and t.max() == 0
    assert t.sample(4, np.random.default_rng(0)).size == 0
    t.set([0, 1, 2, 3, 4], [1.0, 2.0, 3.0, 4.0, 5.0])
    assert t.total() == 15.0 and t.min() == 1.0 and t.max() == 5.0
    t.set([0, 4, 0], [7.0, 0.0, 0.5])                 # repeated index: the last one wins; 0 empties
    assert t.get([0, 4]).tolist() == [0.5, 0.0]
    assert t.total() == 9.5 and t.min() == 0.5 and t.max() == 4.0
    assert t.find([0.0, 0.49, 0.5, 2.49, 2.5, 9.49]).tolist() == [0, 0, 1, 1, 2, 3]
    with pytest.raises(IndexError):
        t.set([5], [1.0])
    for bad in (-1.0, np.nan, np.inf):
        with pytest.raises(ValueError):
            t.set([1], [bad])
    assert t.total() == 9.5                            # a refused set changed nothing


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 70), ops=st.lists(st.tuples(st.lists(st.integers(0, 69), min_size=1, max_size=8),
                                                   st.lists(st.floats(0, 100), min_size=8, max_size=8)),
                                         min_size=1, max_size=12),
       u=st.lists(st.floats(0, 1, exclude_max=True), min_size=1, max_size=16))
def test_trees_match_a_direct_computation_and_each_other(n, ops, u):
    trees = [PriorityTree(n, impl=i) for i in IMPLS]
    leaves = np.zeros(n)
    for idx, vals in ops:
        idx = [i % n for i in idx]
        for i, v in zip(idx, vals):
            leaves[i] = v
        for t in trees:
            t.set(idx, vals[:len(idx)])
    for t in trees:
        assert np.isclose(t.total(), leaves.sum())
        nz = leaves[leaves > 0]
        assert t.min() == (nz.min() if nz.size else np.inf) and t.max() == leaves.max()
        assert np.array_equal(t.get(np.arange(n)), leaves)
    if leaves.sum() > 0:
        x = np.asarray(u) * trees[0].total()
        found = [t.find(x) for t in trees]
        assert all(np.array_equal(found[0], f) for f in found), "implementations disagree"
        assert (leaves[found[0]] > 0).all()
        # the leaf whose cumulative interval holds x (up to rounding at an interval's edge)
        cum = np.cumsum(leaves)
        direct = np.searchsorted(cum, x, side="right")
        edge = np.isclose(x, cum[np.minimum(direct, n - 1)]) | np.isclose(x, np.concatenate(([0], cum))[direct])
        assert ((found[0] == direct) | edge).all()
    if len(trees) == 2:
        assert np.array_equal(trees[0]._t.sums, trees[1]._t.sums)     # bit for bit


def test_beta_anneals_to_one_on_the_global_count():
    assert beta_at(0.4, 1000, 0) == 0.4
    assert beta_at(0.4, 1000, 500) == pytest.approx(0.7)
    assert beta_at(0.4, 1000, 5000) == 1.0
    assert beta_at(0.4, 0, 0) == 1.0


# ---------------------------------------------------------------- over a replay memory

def fill(rb, steps, lane=0, end_every=0, start=True):
    """Frames hold their step number (so rows can be checked); an episode every `end_every` steps."""
    if start:
        rb.start_episode(np.zeros(2, np.uint8), lane)
    for t in range(1, steps + 1):
        end = bool(end_every) and t % end_every == 0
        rb.add(t % 3, 1.0, np.full(2, t % 250, np.uint8), end, False, lane)
        if end:
            rb.start_episode(np.zeros(2, np.uint8), lane)


@pytest.mark.parametrize("impl", IMPLS)
def test_new_transitions_enter_at_the_largest_priority_and_episode_starts_hold_none(impl):
    with ReplayMemory(64, frame_shape=(2,), stack=1, impl=impl) as rb:
        pr = PrioritizedReplay(rb, alpha=1.0, eps=0.0 + 1e-9, impl=impl)
        fill(rb, 10, end_every=4)          # slots: S 1 2 3 4T | S 5 6 7 8T | S 9 10
        assert pr.sync() == 13
        leaf = pr.tree.get(np.arange(13))
        # a transition per step slot, at the slot before it; none from the terminal slots or the newest
        assert (leaf > 0).tolist() == [True, True, True, True, False] * 2 + [True, True, False]
        b = pr.sample(8, np.random.default_rng(0))
        pr.update(b.index, b.position, np.full(8, 3.0))
        assert pr.max_priority == pytest.approx(3.0)
        rb.add(0, 0.0, np.zeros(2, np.uint8), False, False)
        pr.sync()
        assert pr.tree.get([12]).item() == pytest.approx(3.0)      # the new one enters at the max
        # the *current* max: once the largest priorities are lowered, new transitions enter lower
        every = np.flatnonzero(pr.tree.get(np.arange(64)) > 0)
        pr.tree.set(every, np.full(every.size, 0.25))
        rb.add(0, 0.0, np.zeros(2, np.uint8), False, False)
        pr.sync()
        assert pr.tree.get([13]).item() == pytest.approx(0.25)


@pytest.mark.parametrize("impl", IMPLS)
def test_sampling_follows_the_priorities_and_weights_match_a_direct_computation(impl):
    rng = np.random.default_rng(1)
    with ReplayMemory(200, frame_shape=(2,), stack=2, n_step=2, lanes=2, impl=impl) as rb:
        fill(rb, 60, lane=0, end_every=7)
        fill(rb, 30, lane=1)
        pr = PrioritizedReplay(rb, alpha=0.5, eps=1e-3, weight_norm="memory", impl=impl)
        pr.sync()
        valid = rb.valid_indices()
        td = rng.gamma(1.0, size=valid.size)
        slots = valid
        # write a priority for every valid transition (positions from a batch of all of them)
        lane, s = slots // rb.lane_capacity, slots % rb.lane_capacity
        w = rb._writes_now()
        lo = np.maximum(w[lane] - rb.lane_capacity + 1, 0)
        assert pr.update(slots, lo + (s - lo) % rb.lane_capacity, td) == valid.size
        p = (td + 1e-3) ** 0.5
        probs = np.zeros(rb.capacity)
        probs[slots] = p
        probs /= probs.sum()
        counts = np.zeros(rb.capacity)
        out = pr.allocate_batch(500, pinned=False)
        for _ in range(200):
            np.add.at(counts, pr.sample(500, rng, out=out, beta=0.6).index, 1)
        ok, chi2 = chi2_ok(counts, probs)
        assert ok, chi2
        # weights: (N P(i))^-beta / max_j (N P(j))^-beta, here every leaf with a priority is valid but
        # the newest of each lane (at the initial max priority 1): the tree's min and total include them
        leaves = pr.tree.get(np.arange(rb.capacity))
        Pi = leaves / leaves.sum()
        N = (leaves > 0).sum()
        wdirect = (N * Pi[out.index]) ** -0.6 / ((N * Pi[leaves > 0]) ** -0.6).max()
        assert np.allclose(out.weight, wdirect, rtol=1e-5)
        # the default: divided by the batch's largest weight
        pr.weight_norm = "batch"
        pr.sample(500, rng, out=out, beta=0.6)
        wb = (N * Pi[out.index]) ** -0.6
        assert np.allclose(out.weight, wb / wb.max(), rtol=1e-5) and out.weight.max() == 1.0


@pytest.mark.parametrize("impl", IMPLS)
def test_write_back_sets_the_new_priorities_of_the_sampled_slots(impl):
    with ReplayMemory(100, frame_shape=(2,), stack=1, impl=impl) as rb:
        fill(rb, 50)
        pr = PrioritizedReplay(rb, alpha=0.6, eps=0.01, impl=impl)
        b = pr.sample(16, np.random.default_rng(2))
        # each row's obs is the frame of its position (frames hold their step number = position here)
        assert np.array_equal(b.obs[:, 0], b.position % 250)
        td = np.linspace(0, 2, 16)
        before = pr.tree.get(np.arange(100))
        assert pr.update(b.index, b.position, td) == 16
        after = pr.tree.get(np.arange(100))
        last = {int(i): t for i, t in zip(b.index, td)}           # a slot sampled twice: the last |td|
        for i, t in last.items():
            assert after[i] == pytest.approx((t + 0.01) ** 0.6)
        untouched = np.setdiff1d(np.arange(100), b.index)
        assert np.array_equal(after[untouched], before[untouched])


@pytest.mark.parametrize("impl", IMPLS)
def test_priorities_for_overwritten_slots_are_ignored(impl):
    cap = 20
    with ReplayMemory(cap, frame_shape=(2,), stack=1, impl=impl) as rb:
        fill(rb, 15)
        pr = PrioritizedReplay(rb, impl=impl)
        b = pr.sample(10, np.random.default_rng(3))
        fill(rb, 12, start=False)                  # the head moves on: the oldest slots are rewritten
        pr.sync()
        w = rb._writes_now()[0]
        gone = b.position < w - cap + 1
        assert gone.any() and (~gone).any()
        before = pr.tree.get(b.index)
        applied = pr.update(b.index, b.position, np.full(10, 50.0))
        assert applied == (~gone).sum()
        after = pr.tree.get(b.index)
        assert np.array_equal(after[gone], before[gone])          # the new transitions keep theirs
        assert np.allclose(after[~gone], (50.0 + pr.eps) ** pr.alpha)
        assert pr.counters["stale_priorities"] == int(gone.sum())


@pytest.mark.parametrize("impl", IMPLS)
def test_bad_priority_updates_are_refused_and_change_nothing(impl):
    with ReplayMemory(50, frame_shape=(2,), stack=1, impl=impl) as rb:
        fill(rb, 30)
        pr = PrioritizedReplay(rb, impl=impl)
        b = pr.sample(4, np.random.default_rng(4))
        before = pr.tree.get(np.arange(50))
        for idx, pos, td in ((b.index, b.position, [1.0, 2.0]),                       # sizes differ
                             (b.index + 50, b.position, np.ones(4)),                  # index out of range
                             (b.index, b.position, [1.0, np.nan, 1.0, 1.0]),          # not finite
                             (b.index, b.position, [1.0, -1.0, 1.0, 1.0])):           # negative
            with pytest.raises(ValueError):
                pr.update(idx, pos, td)
        assert np.array_equal(pr.tree.get(np.arange(50)), before)
        assert pr.max_priority == 1.0


@pytest.mark.parametrize("impl", IMPLS)
def test_prioritized_sample_waits_for_data(impl):
    with ReplayMemory(50, frame_shape=(2,), stack=1, impl=impl) as rb:
        pr = PrioritizedReplay(rb, impl=impl)
        with pytest.raises(NotReady):
            pr.sample(4, np.random.default_rng(0))
        rb.start_episode(np.zeros(2, np.uint8))
        with pytest.raises(NotReady):
            pr.sample(4, np.random.default_rng(0))
