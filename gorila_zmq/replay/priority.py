"""Prioritized replay (Schaul et al. 2016, proportional): a sum tree and a min tree over a replay
memory's slots, and the sampler that draws from them.

    pr = PrioritizedReplay(rb, alpha=0.6, eps=1e-6)     # rb: a ReplayMemory (the writer's or attached)
    batch = pr.allocate_batch(32)                        # a Batch with .weight and .position as well
    pr.sample(32, rng, out=batch, beta=0.4)              # proportional to priority, stratified
    pr.update(batch.index, batch.position, td_abs)       # after the gradient: p = (|delta| + eps)^alpha

Priority p_i = (|delta_i| + eps)^alpha; P(i) = p_i / sum p; importance weight w_i = (N P(i))^-beta /
max_j w_j = (p_i / min_j p_j)^-beta, the max over the batch (weight_norm="batch", the default, as
Dopamine and Acme do) or over the whole memory (weight_norm="memory", Schaul et al.'s reading; the
min tree gives min p). With the memory's max, one transition whose |delta| is near 0 scales every
weight down by (p / p_min)^beta, 30x and more in our CartPole runs: an optimiser that is not scale
invariant (AdaGrad at the shard) then all but stops learning (CartPole stayed at a return of 9 for
500 K frames where the batch's max learned it by 20 K). Sampling is stratified: the total is
cut into B equal segments and one draw falls in each, O(B log N). A transition enters at the current
largest priority (the max tree's root; 1 while no priority has been written) unless its writer gave
one (`give`: Ape-X's actors send their own n-step |TD error| with each step, replay/sinks.py). (The largest priority ever given would not do: one early spike of |delta| would put every new
transition far above the rest for good, and the learner would replay little but the newest data;
CartPole then collapsed to a return of 9 in our runs.)

Leaf k is the transition whose obs ends at slot k (Batch.index). One process owns the trees: the one
that samples (a bundle's learner, whose loader thread does every tree operation; a global replay
shard's server). It follows the writer through the memory's published write counters (`sync`, before
every sample): a slot written as a step makes the transition into it sampleable; an episode's first
slot, and every slot just written, holds none yet (leaf 0). Draws the memory rejects (a window not
yet written, a stack already overwritten) are redrawn, so sampling is exactly proportional among the
valid transitions; weights use the tree's total and minimum, which also count the few leaves that
are not valid yet (the newest n_step - 1 per lane).

A priority written back for a slot the writer has overwritten since it was sampled (its logical
position, Batch.position, is no longer in the ring) is ignored and counted: it belongs to a
transition that is gone.

GORILA_PUREPYTHON=1 selects NumpyTree, the same algorithm with bit-identical results.
"""
from __future__ import annotations

import numpy as np

from gorila_zmq._native import load_ext, try_load_ext
from gorila_zmq.replay.numpy_core import START

__all__ = ["PriorityTree", "NumpyTree", "PrioritizedReplay", "beta_at", "IMPLEMENTATION"]

_ext = load_ext("priority")
IMPLEMENTATION = "numpy" if _ext is None else "cython"


class NumpyTree:
    """ext/priority.pyx's SumTree in NumPy: the same node layout and the same sums."""

    def __init__(self, n: int):
        M = 1
        while M < n:
            M *= 2
        self.n, self.size = n, M
        self.sums = np.zeros(2 * M, np.float64)
        self.mins = np.full(2 * M, np.inf, np.float64)
        self.maxs = np.zeros(2 * M, np.float64)

    def set(self, idx, p):
        """Leaves (repeated indices: the last one wins, as the kernel's in-order loop), then each level's
        touched parents from their children."""
        if idx.size > 1:
            _, last = np.unique(idx[::-1], return_index=True)   # first in the reversed = last given
            keep = np.sort(idx.size - 1 - last)
            idx, p = idx[keep], p[keep]
        i = idx + self.size
        self.sums[i] = p
        self.mins[i] = np.where(p > 0, p, np.inf)
        self.maxs[i] = p
        i = np.unique(i >> 1)
        while i.size and i[-1] >= 1:
            self.sums[i] = self.sums[2 * i] + self.sums[2 * i + 1]
            self.mins[i] = np.minimum(self.mins[2 * i], self.mins[2 * i + 1])
            self.maxs[i] = np.maximum(self.maxs[2 * i], self.maxs[2 * i + 1])
            i = np.unique(i >> 1)
            i = i[i >= 1]

    def get(self, idx, out):
        out[:] = self.sums[idx + self.size]

    def find(self, u, out):
        x = u.copy()
        i = np.ones(u.shape[0], np.int64)
        while self.size > 1 and i[0] < self.size:      # every draw is at the same depth
            left = self.sums[2 * i]
            right = x >= left
            x = np.where(right, x - left, x)
            i = 2 * i + right
        out[:] = i - self.size

    def total(self):
        return float(self.sums[1])

    def min(self):
        return float(self.mins[1])

    def max(self):
        return float(self.maxs[1])


class PriorityTree:
    """Sum, min and max trees over n leaves, validated (the kernel trusts its arguments)."""

    def __init__(self, n: int, impl: str | None = None):
        n = int(n)
        if n < 1:
            raise ValueError(f"a priority tree needs at least one leaf, got {n}")
        if impl is None:
            ext = _ext
        elif impl == "cython":
            ext = try_load_ext("priority")
            if ext is None:
                raise ImportError("the compiled priority kernel is not built (make build)")
        elif impl == "numpy":
            ext = None
        else:
            raise ValueError(f"impl must be 'cython', 'numpy' or None, got {impl!r}")
        self.implementation = "numpy" if ext is None else "cython"
        self._t = NumpyTree(n) if ext is None else ext.SumTree(n)
        self.n = n

    def _idx(self, idx) -> np.ndarray:
        i = np.ascontiguousarray(idx, np.int64).reshape(-1)
        if i.size and (i.min() < 0 or i.max() >= self.n):
            raise IndexError(f"priority tree index out of range [0, {self.n})")
        return i

    def set(self, idx, p) -> None:
        """Leaves idx = p (finite, >= 0; 0 empties a leaf). Repeated indices: the last one wins."""
        i = self._idx(idx)
        v = np.ascontiguousarray(np.broadcast_to(np.asarray(p, np.float64), i.shape))
        if not np.isfinite(v).all() or (v < 0).any():
            raise ValueError("priorities must be finite and >= 0")
        self._t.set(i, v)

    def get(self, idx) -> np.ndarray:
        i = self._idx(idx)
        out = np.empty(i.shape, np.float64)
        self._t.get(i, out)
        return out

    def find(self, u) -> np.ndarray:
        """The leaf holding each prefix mass u (clipped into [0, total))."""
        x = np.ascontiguousarray(u, np.float64).reshape(-1)
        out = np.empty(x.shape, np.int64)
        self._t.find(x, out)
        return out

    def sample(self, m: int, rng: np.random.Generator) -> np.ndarray:
        """m leaves, stratified: the j-th draw is uniform in the j-th of m equal segments of the total."""
        total = self.total()
        if total <= 0:
            return np.empty(0, np.int64)
        u = (np.arange(m) + rng.random(m)) * (total / m)
        np.minimum(u, np.nextafter(total, 0), out=u)
        return self.find(u)

    def total(self) -> float:
        return float(self._t.total())

    def min(self) -> float:
        """The smallest non-zero leaf (inf while every leaf is empty)."""
        return float(self._t.min())

    def max(self) -> float:
        """The largest leaf (0 while every leaf is empty)."""
        return float(self._t.max())


def beta_at(beta0: float, anneal_updates: int, global_updates: int) -> float:
    """The importance-sampling exponent, linear from beta0 to 1 over `anneal_updates` global updates."""
    if anneal_updates <= 0:
        return 1.0
    return beta0 + (1.0 - beta0) * min(1.0, max(global_updates, 0) / anneal_updates)


class PrioritizedReplay:
    """Proportional prioritized sampling from a ReplayMemory (see the module docstring). Not thread-safe:
    one thread samples and updates."""

    def __init__(self, rb, alpha: float = 0.6, eps: float = 1e-6, weight_norm: str = "batch",
                 impl: str | None = None):
        if not (alpha >= 0 and eps > 0):
            raise ValueError(f"need priority_alpha >= 0 and priority_eps > 0, got {alpha}, {eps}")
        if weight_norm not in ("batch", "memory"):
            raise ValueError(f"weight_norm must be 'batch' or 'memory', got {weight_norm!r}")
        self.rb, self.alpha, self.eps, self.weight_norm = rb, float(alpha), float(eps), weight_norm
        lay = rb._lay
        self.cap, self.lanes = lay.lane_capacity, lay.lanes
        self.tree = PriorityTree(lay.lanes * lay.lane_capacity, impl=impl)
        self._seen = np.zeros(self.lanes, np.int64)      # positions of each lane already reflected in the tree
        # initial priorities a writer gave (Ape-X actors), applied by the next sync: slot -> (position, p)
        self._given_pos = np.full((self.lanes, self.cap), -1, np.int64)
        self._given_p = np.zeros((self.lanes, self.cap), np.float64)
        self.counters = {"priority_updates": 0, "stale_priorities": 0}

    def allocate_batch(self, B: int, pinned: bool | None = None):
        return self.rb.allocate_batch(B, pinned=pinned, prioritized=True)

    @property
    def max_priority(self) -> float:
        """What a new transition enters at: the largest priority in the tree (1 while it is empty)."""
        m = self.tree.max()
        return m if m > 0 else 1.0

    def give(self, lane: int, td_abs: float) -> None:
        """The writer's initial |TD error| for the transition its last step on `lane` completed (the one
        whose obs ends at the slot before the step's): it enters at (|td| + eps)^alpha instead of the
        current max, at the next sync. Call right after the memory's add on that lane."""
        td = float(td_abs)
        if not (td >= 0 and np.isfinite(td)):
            raise ValueError(f"an initial priority must be finite and >= 0, got {td_abs!r}")
        pos = int(self.rb._writes_now()[lane]) - 2
        if pos >= 0:
            self._given_pos[lane, pos % self.cap] = pos
            self._given_p[lane, pos % self.cap] = (td + self.eps) ** self.alpha

    def sync(self, initial=None) -> int:
        """Follow the writer: leaves for the slots written since the last call. A step slot x makes the
        transition at x - 1 sampleable at the priority its writer gave (`give`), else at `initial`
        (default: the current largest priority); slot x itself holds none yet. Returns how many slots
        were new."""
        w = self.rb._writes_now()
        a = np.maximum(self._seen, w - self.cap)         # what is still in the ring of what is new
        cnt = w - a
        K = int(cnt.sum())
        if K == 0:
            return 0
        lane = np.repeat(np.arange(self.lanes, dtype=np.int64), cnt)
        start = np.repeat(a - np.concatenate(([0], np.cumsum(cnt)[:-1])), cnt)
        x = start + np.arange(K, dtype=np.int64)         # the new positions, lane by lane
        step = (self.rb.slot_flags()[lane, x % self.cap] & START) == 0     # (no view kept: rb can close)
        p0 = self.max_priority if initial is None else initial
        zero = lane * self.cap + x % self.cap
        prev = x - 1
        ok = step & (prev >= np.maximum(w[lane] - self.cap + 1, 0))   # the previous slot is still held
        pl, pp = lane[ok], prev[ok]
        given = self._given_pos[pl, pp % self.cap] == pp
        p = np.where(given, self._given_p[pl, pp % self.cap], p0)
        self._given_pos[pl[given], pp[given] % self.cap] = -1
        self.tree.set(np.concatenate((zero, pl * self.cap + pp % self.cap)), np.concatenate((np.zeros(K), p)))
        self._seen = w
        return K

    def _draw(self, rng):
        """ReplayMemory.sample's candidate source: leaves by priority, as positions of its snapshot."""
        cap = self.cap

        def draw(m, total, w, lo, cum):
            slots = self.tree.sample(m, rng)
            lane, s = slots // cap, slots % cap
            L = lo[lane] + (s - lo[lane]) % cap
            ok = L < w[lane]
            u = cum[lane[ok]] + (L[ok] - lo[lane[ok]])
            return (u + 0.5) / total
        return draw

    def sample(self, B: int, rng: np.random.Generator, out=None, beta: float = 0.4):
        """B transitions in proportion to their priorities into `out` (from allocate_batch), with
        out.weight (the normalised importance weights for `beta`) and out.position (for update)."""
        self.sync()
        if out is None:
            out = self.allocate_batch(B, pinned=False)
        self.rb.sample(B, rng, out=out, draw=self._draw(rng))
        w = out._scratch["w_last"]                      # the snapshot the rows were gathered under
        lane, s = out.index // self.cap, out.index % self.cap
        lo = np.maximum(w[lane] - self.cap + 1, 0)
        out.position[:] = lo + (s - lo) % self.cap
        p = np.empty(B, np.float64)
        self.tree._t.get(out.index, p)                  # (indices the memory produced: in range)
        pmin = p.min() if self.weight_norm == "batch" else self.tree.min()
        np.power(p / pmin, -float(beta), out=out.weight, casting="unsafe")
        return out

    def update(self, index, position, td_abs) -> int:
        """Priorities (|td| + eps)^alpha for sampled rows; rows whose slot the writer has overwritten
        since (position out of the ring) are ignored. Returns how many were applied. Raises ValueError
        (and changes nothing) on mismatched sizes, an index out of range or a non-finite/negative |td|."""
        idx = np.asarray(index, np.int64).reshape(-1)
        pos = np.asarray(position, np.int64).reshape(-1)
        td = np.asarray(td_abs, np.float64).reshape(-1)
        if not idx.shape == pos.shape == td.shape:
            raise ValueError(f"priority update: {idx.size} indices, {pos.size} positions, {td.size} priorities")
        if idx.size and (idx.min() < 0 or idx.max() >= self.tree.n):
            raise ValueError(f"priority update: an index outside [0, {self.tree.n})")
        if not np.isfinite(td).all() or (td < 0).any():
            raise ValueError("priority update: |td| must be finite and >= 0")
        w = self.rb._writes_now()
        lane = idx // self.cap
        held = (pos % self.cap == idx % self.cap) & (pos >= np.maximum(w[lane] - self.cap + 1, 0)) \
            & (pos < self._seen[lane])
        i = np.ascontiguousarray(idx[held])            # validated above: the kernel's own calls from here
        cur = np.empty(i.size, np.float64)
        self.tree._t.get(i, cur)
        keep = cur > 0                                  # a slot that holds a transition (not an episode start)
        i = np.ascontiguousarray(i[keep])
        n = int(i.size)
        if n:
            self.tree._t.set(i, np.ascontiguousarray((td[held][keep] + self.eps) ** self.alpha))
        self.counters["priority_updates"] += n
        self.counters["stale_priorities"] += int(idx.size - n)
        return n

    def stats(self) -> dict:
        return {**self.counters, "priority_total": self.tree.total(), "priority_max": self.max_priority}
