"""DrQ-v2's networks (Yarats et al., 2021, "Mastering Visual Continuous Control"), as the reference
implementation writes them.

- `Encoder`: 4 conv layers of 32 filters 3x3 (the first with stride 2) on a stack of 3 RGB frames
  (9 x 84 x 84 uint8, scaled to [-0.5, 0.5]), flattened: 32 x 35 x 35 = 39,200 features.
- `Actor`: trunk (linear -> LayerNorm -> tanh, feature_dim 50), MLP (hidden 1024), tanh mean; the
  policy is N(mean, std(t)^2) with noise clipped to +-stddev_clip when updating.
- `Critic`: the same kind of trunk and two Q heads (clipped double Q).
- `random_shift`: replicate-pad 4 and a random shift per sample via bilinear grid_sample, which
  equals an integer crop of the padded image to within float rounding (tested).
"""
from __future__ import annotations

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
