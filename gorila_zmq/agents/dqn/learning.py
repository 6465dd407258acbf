"""DQN's loss: the TD error of a batch against the target network (n-step, optionally Double DQN)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def td_loss(q_net, target_net, obs, action, reward, discount, next_obs, *, double: bool = False,
            huber: bool = True, weight=None) -> tuple[torch.Tensor, dict]:
    """Mean TD loss of a batch. `reward` is the n-step discounted return, `discount` is gamma^n
    (0 where the episode terminated inside the n steps, gamma^k > 0 through a truncation).
    With `weight` (prioritized replay's importance weights) the mean of weight x each sample's loss,
    and info["priorities"] = |TD error| per sample (detached)."""
    q = q_net(obs).gather(1, action.view(-1, 1)).squeeze(1)
    with torch.no_grad():
        q_next_target = target_net(next_obs)
        if double:
            best = q_net(next_obs).argmax(1, keepdim=True)
            q_next = q_next_target.gather(1, best).squeeze(1)
        else:
            q_next = q_next_target.max(1).values
        target = reward + discount * q_next
    if weight is None:
        loss = F.smooth_l1_loss(q, target) if huber else F.mse_loss(q, target)
    else:
        each = F.smooth_l1_loss(q, target, reduction="none") if huber else F.mse_loss(q, target, reduction="none")
        loss = (weight * each).mean()
    loss_v, q_mean = torch.stack([loss.detach(), q.detach().mean()]).tolist()     # one device sync, not two
    info = {"loss": loss_v, "q_mean": q_mean}
    if weight is not None:
        info["priorities"] = (target - q).detach().abs()
    return loss, info
