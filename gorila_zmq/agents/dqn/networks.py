"""Networks, built from the model config: the Nature DQN CNN and an MLP for vector observations (DQN),
and DrQ-v2's encoder + actor + critic (gorila_zmq.agents.drqv2.agent)."""
from __future__ import annotations

import torch
from torch import nn


class NatureCNN(nn.Module):
    """Mnih et al. 2015: 3 conv layers + 512 hidden; uint8 frames in, scaled to [0, 1] inside."""

    def __init__(self, obs_shape=(4, 84, 84), n_actions: int = 6):
        super().__init__()
        c, h, w = obs_shape
        self.conv = nn.Sequential(
            nn.Conv2d(c, 32, 8, stride=4), nn.ReLU(),
            nn.Conv2d(32, 64, 4, stride=2), nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=1), nn.ReLU(),
            nn.Flatten(),
        )
        with torch.no_grad():
            n = self.conv(torch.zeros(1, c, h, w)).shape[1]
        self.head = nn.Sequential(nn.Linear(n, 512), nn.ReLU(), nn.Linear(512, n_actions))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            x = x.float().div_(255.0)
        return self.head(self.conv(x))


class MLP(nn.Module):
    def __init__(self, obs_dim: int, n_actions: int, hidden=(64, 64)):
        super().__init__()
        layers, d = [], obs_dim
        for h in hidden:
            layers += [nn.Linear(d, h), nn.ReLU()]
            d = h
        layers.append(nn.Linear(d, n_actions))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.reshape(x.shape[0], -1).float())


def build_model(model_cfg, seed: int = 0) -> nn.Module:
    """The same seed gives the same initial parameters on every host and in every role."""
    if model_cfg.kind == "auto":
        raise ValueError("model.kind is 'auto': resolve it from the environment first "
                         "(gorila_zmq.envs.resolve_model)")
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        if model_cfg.kind == "nature_cnn":
            return NatureCNN(tuple(model_cfg.obs_shape), model_cfg.n_actions)
        if model_cfg.kind == "drqv2":
            from gorila_zmq.agents.drqv2.agent import DrQV2
            return DrQV2(tuple(model_cfg.obs_shape), model_cfg.n_actions, model_cfg.feature_dim,
                         int(model_cfg.hidden[0]))
        if model_cfg.kind == "mlp":
            import math
            return MLP(int(math.prod(model_cfg.obs_shape)), model_cfg.n_actions, tuple(model_cfg.hidden))
        raise ValueError(f"unknown model kind {model_cfg.kind!r}")
    finally:
        torch.random.set_rng_state(gen_state)
