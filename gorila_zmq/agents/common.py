"""Helpers any agent (or the learner) may use, free of torch: the loss-outlier filter (Gorila 4.2),
schedules on a counter (`linear_schedule`, `schedule` from a config string) and `Every`."""
from __future__ import annotations

import math
import re


class OutlierFilter:
    """Gorila 4.2: drop a gradient whose |loss| is above mean + k*std of the running |loss|, after a
    warm-up. Running moments are exponential (window ~ 1/alpha) and only accepted losses update them,
    so one spike cannot widen the band for the next."""

    def __init__(self, k: float = 5.0, warmup: int = 100, alpha: float = 0.01, rewarm_after: int = 50):
        self.k, self.warmup, self.alpha, self.rewarm_after = k, warmup, alpha, rewarm_after
        self.n = 0
        self.mean = 0.0
        self.var = 0.0
        self.dropped = 0
        self.in_a_row = 0
        self.rewarms = 0

    def accept(self, loss: float) -> bool:
        x = abs(loss)
        if not math.isfinite(x):
            self.dropped += 1
            return False
        if self.k > 0 and self.n >= self.warmup and x > self.mean + self.k * math.sqrt(self.var):
            self.dropped += 1
            self.in_a_row += 1
            if self.in_a_row >= self.rewarm_after:
                # Not a spike but a new level of loss (e.g. after a target sync): learn it again
                # rather than drop every gradient from now on.
                self.n, self.mean, self.var, self.in_a_row = 0, 0.0, 0.0, 0
                self.rewarms += 1
            return False
        self.in_a_row = 0
        self.n += 1
        if self.n <= self.warmup:               # exact running moments while warming up
            d = x - self.mean
            self.mean += d / self.n
            self.var += (d * (x - self.mean) - self.var) / self.n
        else:
            d = x - self.mean
            self.mean += self.alpha * d
            self.var = (1 - self.alpha) * (self.var + self.alpha * d * d)
        return True

    def state(self) -> dict:
        return {"outlier_mean": self.mean, "outlier_std": math.sqrt(self.var), "outliers_dropped": self.dropped,
                "outlier_rewarms": self.rewarms}


def linear_schedule(start: float, end: float, duration: int, t: int) -> float:
    """start -> end linearly over `duration` steps of t, then end."""
    if duration <= 0:
        return end
    frac = min(max(t, 0) / duration, 1.0)
    return start + frac * (end - start)


def schedule(spec: str, step: int) -> float:
    """'0.2' (a constant) or 'linear(init, final, duration)' (DrQ-v2's stddev schedule)."""
    try:
        return float(spec)
    except ValueError:
        pass
    m = re.fullmatch(r"linear\((.+),(.+),(.+)\)", spec.replace(" ", ""))
    if not m:
        raise ValueError(f"unknown schedule {spec!r}: a number or linear(init, final, duration)")
    init, final, duration = (float(g) for g in m.groups())
    mix = min(max(step / duration, 0.0), 1.0)
    return (1.0 - mix) * init + mix * final


class Every:
    """True once each time the counter crosses a multiple of `period` (counters may jump)."""

    def __init__(self, period: int, start: int = 0):
        self.period = period
        self.last = start // period if period > 0 else 0

    def __call__(self, t: int) -> bool:
        if self.period <= 0:
            return False
        k = t // self.period
        if k != self.last:
            self.last = k
            return True
        return False
