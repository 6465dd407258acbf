"""DrQ-v2 (Yarats et al., 2021, "Mastering Visual Continuous Control"): networks, augmentation,
schedule, and the update, written to read top to bottom like the reference implementation.

- `Encoder`: 4 conv layers of 32 filters 3x3 (the first with stride 2) on a stack of 3 RGB frames
  (9 x 84 x 84 uint8, scaled to [-0.5, 0.5]), flattened: 32 x 35 x 35 = 39,200 features.
- `Actor`: trunk (linear -> LayerNorm -> tanh, feature_dim 50), MLP (hidden 1024), tanh mean; the
  policy is N(mean, std(t)^2) with noise clipped to +-stddev_clip when updating.
- `Critic`: the same kind of trunk and two Q heads (clipped double Q).
- `random_shift`: replicate-pad 4 and a random shift per sample via bilinear grid_sample, which
  equals an integer crop of the padded image to within float rounding (tested).
- `update_critic`: n-step target with the minimum of the two target heads; the encoder is trained by
  the critic loss only. `update_actor`: -min Q with the encoder's features detached.
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn


def weight_init(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.orthogonal_(m.weight.data)
        if m.bias is not None:
            m.bias.data.fill_(0.0)
    elif isinstance(m, nn.Conv2d):
        gain = nn.init.calculate_gain("relu")
        nn.init.orthogonal_(m.weight.data, gain)
        if m.bias is not None:
            m.bias.data.fill_(0.0)


class Encoder(nn.Module):
    def __init__(self, obs_shape=(9, 84, 84)):
        super().__init__()
        c, h, w = obs_shape
        self.convnet = nn.Sequential(nn.Conv2d(c, 32, 3, stride=2), nn.ReLU(),
                                     nn.Conv2d(32, 32, 3, stride=1), nn.ReLU(),
                                     nn.Conv2d(32, 32, 3, stride=1), nn.ReLU(),
                                     nn.Conv2d(32, 32, 3, stride=1), nn.ReLU())
        with torch.no_grad():
            self.repr_dim = int(self.convnet(torch.zeros(1, c, h, w)).numel())
        self.apply(weight_init)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        obs = obs.reshape(obs.shape[0], -1, *obs.shape[-2:])    # (B, 3, 3, 84, 84) from replay -> (B, 9, 84, 84)
        obs = obs.float() / 255.0 - 0.5
        return self.convnet(obs).flatten(1)


def _trunk(repr_dim: int, feature_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(repr_dim, feature_dim), nn.LayerNorm(feature_dim), nn.Tanh())


class Actor(nn.Module):
    def __init__(self, repr_dim: int, action_dim: int, feature_dim: int = 50, hidden_dim: int = 1024):
        super().__init__()
        self.trunk = _trunk(repr_dim, feature_dim)
        self.policy = nn.Sequential(nn.Linear(feature_dim, hidden_dim), nn.ReLU(),
                                    nn.Linear(hidden_dim, hidden_dim), nn.ReLU(),
                                    nn.Linear(hidden_dim, action_dim))
        self.apply(weight_init)

    def pre_tanh(self, h: torch.Tensor) -> torch.Tensor:
        """The policy mean before the tanh (z, with mean action tanh(z))."""
        return self.policy(self.trunk(h))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """The mean action in [-1, 1]."""
        return torch.tanh(self.pre_tanh(h))


class Critic(nn.Module):
    def __init__(self, repr_dim: int, action_dim: int, feature_dim: int = 50, hidden_dim: int = 1024):
        super().__init__()
        self.trunk = _trunk(repr_dim, feature_dim)

        def head():
            return nn.Sequential(nn.Linear(feature_dim + action_dim, hidden_dim), nn.ReLU(),
                                 nn.Linear(hidden_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, 1))
        self.q1, self.q2 = head(), head()
        self.apply(weight_init)

    def forward(self, h: torch.Tensor, action: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.cat([self.trunk(h), action], dim=-1)
        return self.q1(x), self.q2(x)


class DrQV2(nn.Module):
    """Encoder + actor + critic: the parameters the parameter server holds (the critic target lives
    in the learner, soft-updated)."""

    def __init__(self, obs_shape=(9, 84, 84), action_dim: int = 1, feature_dim: int = 50, hidden_dim: int = 1024):
        super().__init__()
        self.encoder = Encoder(obs_shape)
        self.actor = Actor(self.encoder.repr_dim, action_dim, feature_dim, hidden_dim)
        self.critic = Critic(self.encoder.repr_dim, action_dim, feature_dim, hidden_dim)

    def act(self, obs: torch.Tensor, std: float, explore: bool, generator=None) -> torch.Tensor:
        with torch.no_grad():
            mu = self.actor(self.encoder(obs))
            if not explore:
                return mu
            noise = torch.randn(mu.shape, generator=generator, device=mu.device) * std
            return (mu + noise).clamp(-1.0, 1.0)


def random_shift(x: torch.Tensor, pad: int = 4, generator=None, shift=None) -> torch.Tensor:
    """Replicate-pad by `pad`, then crop back to the input size at a random integer offset per sample,
    done with bilinear grid_sample as in the paper. `shift` (B, 2) in pixels, for tests."""
    n, c, h, w = x.shape
    assert h == w, "random_shift expects square images"
    x = F.pad(x.float(), (pad, pad, pad, pad), mode="replicate")
    eps = 1.0 / (h + 2 * pad)
    arange = torch.linspace(-1.0 + eps, 1.0 - eps, h + 2 * pad, device=x.device)[:h]
    arange = arange.unsqueeze(0).repeat(h, 1).unsqueeze(2)
    base_grid = torch.cat([arange, arange.transpose(1, 0)], dim=2).unsqueeze(0).repeat(n, 1, 1, 1)
    if shift is None:
        shift = torch.randint(0, 2 * pad + 1, size=(n, 1, 1, 2), device=x.device, generator=generator)
    else:
        shift = shift.view(n, 1, 1, 2)
    grid = base_grid + shift.float() * (2.0 / (h + 2 * pad))
    return F.grid_sample(x, grid, padding_mode="zeros", align_corners=False)


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


def exploration_std(std_schedule: str, seed_frames: int, actor_frames: int, num_actors: int,
                    global_updates: int) -> float | None:
    """An actor's exploration: None (uniform random actions) while its own frames are within its share
    of the seed frames, else the scheduled std on the global update count."""
    if actor_frames < seed_frames / max(num_actors, 1):
        return None
    return schedule(std_schedule, global_updates)


def policy_sample(mu: torch.Tensor, std: float, clip: float) -> torch.Tensor:
    """A ~ N(mu, std^2) with the noise clipped to +-clip, then clamped to the action box. The clamp is
    straight-through (as the paper's TruncatedNormal): the gradient reaches mu even where the sample
    was clamped, so saturated actions still train the actor."""
    x = mu + (torch.randn_like(mu) * std).clamp(-clip, clip)
    return x - x.detach() + x.detach().clamp(-1.0, 1.0)


def critic_target(agent: DrQV2, critic_target_net: Critic, next_obs_h: torch.Tensor, reward: torch.Tensor,
                  discount: torch.Tensor, std: float, clip: float) -> torch.Tensor:
    """r_n + gamma^n * min(Q1', Q2')(h', a'), a' from the current actor: the n-step clipped double-Q
    target (reward is the n-step discounted return, discount gamma^n, 0 at a terminal)."""
    with torch.no_grad():
        next_action = policy_sample(agent.actor(next_obs_h), std, clip)
        tq1, tq2 = critic_target_net(next_obs_h, next_action)
        return reward + discount * torch.min(tq1, tq2)


def update_critic(agent: DrQV2, critic_target_net: Critic, obs_h, action, reward, discount, next_obs_h,
                  std: float, clip: float) -> tuple[torch.Tensor, dict]:
    """Critic loss; gradients flow into the critic and the encoder (obs_h carries the encoder)."""
    target = critic_target(agent, critic_target_net, next_obs_h, reward, discount, std, clip)
    q1, q2 = agent.critic(obs_h, action)
    loss = F.mse_loss(q1, target) + F.mse_loss(q2, target)
    vals = torch.stack([loss.detach(), q1.detach().mean(), target.mean()]).tolist()     # one device sync
    return loss, dict(zip(("critic_loss", "critic_q1", "critic_target_q"), vals))


def update_actor(agent: DrQV2, obs_h: torch.Tensor, std: float, clip: float,
                 pretanh_reg: float = 0.0) -> tuple[torch.Tensor, dict]:
    """Actor loss -min(Q1, Q2)(h, a) with h detached: the encoder is not trained by the actor.

    pretanh_reg > 0 adds pretanh_reg * mean(z^2) on the pre-tanh mean z (not in the paper; SAC's
    reference code has the same kind of term on its policy mean). The reason: in float32, tanh(z)
    rounds to exactly +-1 once |z| > ~9, so 1 - tanh(z)^2 and with it the actor's whole gradient
    are exactly 0, and an actor pushed there by an early critic never moves again. The info reports
    actor_pretanh = mean |z|, the saturation gauge."""
    h = obs_h.detach()
    z = agent.actor.pre_tanh(h)
    action = policy_sample(torch.tanh(z), std, clip)
    q1, q2 = agent.critic(h, action)
    q_loss = -torch.min(q1, q2).mean()
    loss = q_loss + pretanh_reg * z.square().mean() if pretanh_reg > 0 else q_loss
    vals = torch.stack([q_loss.detach(), z.detach().abs().mean()]).tolist()     # one device sync
    return loss, {"actor_loss": vals[0], "actor_pretanh": vals[1]}


def soft_update(target: nn.Module, source: nn.Module, tau: float) -> None:
    with torch.no_grad():
        torch._foreach_lerp_(list(target.parameters()), list(source.parameters()), tau)


def gradients(agent: DrQV2, critic_target_net: Critic, obs, action, reward, discount, next_obs,
              std: float, clip: float, accept=None, pretanh_reg: float = 0.0) -> tuple[dict, bool]:
    """One DrQ-v2 update as a single gradient over every parameter the parameter server holds:
    encoder + critic from the critic loss, actor from the actor loss (via autograd.grad on the actor's
    parameters only, so the actor loss trains neither the encoder nor the critic). obs/next_obs are
    uint8 stacks (B, 9, 84, 84) or (B, 3, 3, 84, 84); reward/discount (B,) or (B, 1).

    Returns (info, accepted); `accept(critic_loss) -> bool` may veto the update before any backward
    pass (the learner's outlier filter), and then no .grad is touched."""
    B = obs.shape[0]
    obs = random_shift(obs.reshape(B, -1, *obs.shape[-2:]))
    next_obs = random_shift(next_obs.reshape(B, -1, *next_obs.shape[-2:]))
    reward, discount = reward.reshape(B, 1).float(), discount.reshape(B, 1).float()
    obs_h = agent.encoder(obs)
    with torch.no_grad():
        next_h = agent.encoder(next_obs)
    critic_loss, info = update_critic(agent, critic_target_net, obs_h, action, reward, discount, next_h, std, clip)
    if accept is not None and not accept(info["critic_loss"]):
        return info, False
    agent.zero_grad(set_to_none=False)            # in place (the learner may have bound .grad to its buffer)
    critic_loss.backward()                        # encoder + critic (the actor is not in this graph)
    actor_loss, ainfo = update_actor(agent, obs_h, std, clip, pretanh_reg)
    actor_params = list(agent.actor.parameters())
    for p, g in zip(actor_params, torch.autograd.grad(actor_loss, actor_params)):
        p.grad = g
    info.update(ainfo)
    return info, True
