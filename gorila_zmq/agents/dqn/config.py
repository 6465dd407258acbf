"""The `[dqn]` configuration section: what DQN as Gorila trains it needs beyond the common `agent.*`."""
from __future__ import annotations

from dataclasses import dataclass

from gorila_zmq.fields import help_field as _f


@dataclass
class DQNConfig:
    double_dqn: bool = _f(False, "Double DQN targets")
    huber: bool = _f(True, "Huber loss (False: squared)")
    target_sync_every: int = _f(60_000, "sync the target network every this many *global* updates (Gorila N)")
    eps_start: float = _f(1.0, "actor epsilon at global update 0")
    eps_end: float = _f(0.1, "actor epsilon after the anneal")
    eps_anneal_updates: int = _f(1_000_000, "global updates over which epsilon anneals")
    eps_per_actor: bool = _f(False, "spread the final epsilon over actors (eps_end ** (1 + 7 i / (N-1)))")

    def errors(self) -> list[str]:
        errs = []
        if self.target_sync_every < 1:
            errs.append("dqn.target_sync_every must be >= 1")
        if not (0 <= self.eps_end <= 1 and 0 <= self.eps_start <= 1):
            errs.append("dqn.eps_start and dqn.eps_end must lie in [0, 1]")
        return errs
