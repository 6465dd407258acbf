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
