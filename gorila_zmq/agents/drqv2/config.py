"""The `[drqv2]` configuration section: DrQ-v2's exploration schedule, policy noise and critic target."""
from __future__ import annotations

from dataclasses import dataclass

from gorila_zmq.agents.common import schedule
from gorila_zmq.fields import help_field as _f


@dataclass
class DrQv2Config:
    std_schedule: str = _f("linear(1.0,0.1,50000)", "exploration std, a number or linear(init,final,global "
                                                     "updates) (paper: 100k steps = 50k updates on easy tasks)")
    std_clip: float = _f(0.3, "the policy noise is clipped to +-this in the critic and actor updates")
    seed_frames: int = _f(4000, "uniform random actions for this many env frames (summed over actors)")
    critic_tau: float = _f(0.01, "soft update rate of the learner's critic target")
    actor_pretanh_reg: float = _f(0.0, "weight of mean(z^2) on the actor's pre-tanh mean z (0: the paper); "
                                       "keeps float32 tanh off exactly +-1, where the actor's gradient is "
                                       "exactly 0 (docs/RESULTS.md)")

    def errors(self) -> list[str]:
        errs = []
        try:
            schedule(self.std_schedule, 0)
        except ValueError as e:
            errs.append(f"drqv2.std_schedule: {e}")
        if self.actor_pretanh_reg < 0:
            errs.append("drqv2.actor_pretanh_reg must be >= 0")
        if not 0 < self.critic_tau <= 1 or self.std_clip < 0:
            errs.append("drqv2.critic_tau must be in (0, 1], drqv2.std_clip >= 0")
        return errs
