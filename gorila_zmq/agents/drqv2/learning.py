"""DrQ-v2's update, written to read top to bottom like the reference implementation: `update_critic`
(n-step target with the minimum of the two target heads; the encoder is trained by the critic loss
only), `update_actor` (-min Q with the encoder's features detached), and `gradients`, both as one flat
gradient over every parameter the parameter server holds."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gorila_zmq.agents.drqv2.networks import Critic, DrQV2, random_shift


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
