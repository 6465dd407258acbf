"""DQN as Gorila trains it: the loss against a target network, the loss-outlier safeguard (Gorila 4.2),
and the schedules (epsilon on the *global* update count, target sync every N global updates).

Reads top to bottom: `td_loss` (one screen), `OutlierFilter`, `linear_schedule`, `Every`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def td_loss(q_net, target_net, obs, action, reward, discount, next_obs, *, double: bool = False,
            huber: bool = True) -> tuple[torch.Tensor, dict]:
    """Mean TD loss of a batch. `reward` is the n-step discounted return, `discount` is gamma^n
    (0 where the episode terminated inside the n steps, gamma^k > 0 through a truncation)."""
    q = q_net(obs).gather(1, action.view(-1, 1)).squeeze(1)
    with torch.no_grad():
        q_next_target = target_net(next_obs)
        if double:
            best = q_net(next_obs).argmax(1, keepdim=True)
            q_next = q_next_target.gather(1, best).squeeze(1)
        else:
            q_next = q_next_target.max(1).values
        target = reward + discount * q_next
    loss = F.smooth_l1_loss(q, target) if huber else F.mse_loss(q, target)
    loss_v, q_mean = torch.stack([loss.detach(), q.detach().mean()]).tolist()     # one device sync, not two
    return loss, {"loss": loss_v, "q_mean": q_mean}


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


def actor_epsilon(cfg_agent, global_updates: int, actor_index: int = 0, num_actors: int = 1) -> float:
    """Epsilon for an actor, annealed on the global update count. With `eps_per_actor`, actor i of N
    anneals to eps_end ** (1 + 7 i / (N - 1)) instead (the per-actor spread of Ape-X), an option."""
    end = cfg_agent.eps_end
    if cfg_agent.eps_per_actor and num_actors > 1:
        end = cfg_agent.eps_end ** (1 + 7 * actor_index / (num_actors - 1))
    return linear_schedule(cfg_agent.eps_start, end, cfg_agent.eps_anneal_updates, global_updates)


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
