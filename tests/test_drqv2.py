"""DrQ-v2 pieces: the augmentation, the n-step clipped double-Q target, the actor update leaving the
encoder alone, the schedule, and the networks' shapes."""
import copy

import pytest
import torch

from gorila_zmq.agents.common import schedule
from gorila_zmq.agents.drqv2.learning import critic_target, soft_update, update_actor, update_critic
from gorila_zmq.agents.drqv2.networks import Critic, DrQV2, random_shift


def test_random_shift_equals_an_integer_crop_of_the_padded_image():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (6, 9, 84, 84), generator=g).float()
    shift = torch.randint(0, 9, (6, 2), generator=g)
    out = random_shift(x, pad=4, shift=shift)
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4), mode="replicate")
    for i in range(6):
        dx, dy = int(shift[i, 0]), int(shift[i, 1])          # grid x is the width axis
        crop = padded[i, :, dy:dy + 84, dx:dx + 84]
        assert (out[i] - crop).abs().max().item() < 1e-2     # grey levels: float rounding of the grid only
    # random shifts stay within the pad
    r = random_shift(x, pad=4, generator=g)
    assert r.shape == x.shape


def test_schedule():
    assert schedule("0.2", 10) == 0.2
    assert schedule("linear(1.0,0.1,100000)", 0) == 1.0
    assert schedule("linear(1.0, 0.1, 100000)", 50000) == pytest.approx(0.55)
    assert schedule("linear(1.0,0.1,100000)", 10**7) == pytest.approx(0.1)
    with pytest.raises(ValueError):
        schedule("cosine(1,2)", 0)


def small_agent():
    torch.manual_seed(0)
    return DrQV2((9, 84, 84), action_dim=2, feature_dim=8, hidden_dim=16)


def test_shapes():
    a = small_agent()
    assert a.encoder.repr_dim == 32 * 35 * 35
    obs = torch.randint(0, 256, (3, 9, 84, 84), dtype=torch.uint8)
    act = a.act(obs, std=0.2, explore=True)
    assert act.shape == (3, 2) and act.abs().max() <= 1.0
    q1, q2 = a.critic(a.encoder(obs), act)
    assert q1.shape == q2.shape == (3, 1)


def test_n_step_clipped_double_q_target_by_hand():
    a = small_agent()
    tgt = copy.deepcopy(a.critic)
    h = torch.randn(4, a.encoder.repr_dim)
    reward = torch.tensor([[1.0], [0.5], [0.0], [2.0]])            # n-step discounted returns
    discount = torch.tensor([[0.99 ** 3], [0.99 ** 3], [0.0], [0.99 ** 2]])   # 0: terminated
    torch.manual_seed(5)
    target = critic_target(a, tgt, h, reward, discount, std=0.0, clip=0.3)
    with torch.no_grad():
        next_a = a.actor(h)                                      # std 0: the mean action
        q1, q2 = tgt(h, next_a)
        expected = reward + discount * torch.minimum(q1, q2)
    assert torch.allclose(target, expected, atol=1e-6)
    assert target[2].item() == pytest.approx(0.0)                # terminal: the reward alone


def test_actor_update_leaves_the_encoder_untouched_and_critic_trains_it():
    a = small_agent()
    obs = torch.randint(0, 256, (4, 9, 84, 84), dtype=torch.uint8)
    h = a.encoder(obs)
    loss, _ = update_actor(a, h, std=0.2, clip=0.3)
    loss.backward()
    assert all(p.grad is None for p in a.encoder.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in a.actor.parameters())
    a.zero_grad(set_to_none=True)
    tgt = copy.deepcopy(a.critic)
    h = a.encoder(obs)
    closs, info = update_critic(a, tgt, h, torch.zeros(4, 2), torch.ones(4, 1), torch.full((4, 1), 0.97),
                                a.encoder(obs).detach(), std=0.2, clip=0.3)
    closs.backward()
    assert all(p.grad is not None for p in a.encoder.parameters())
    assert all(p.grad is None for p in a.actor.parameters())     # the target's action is no_grad


def test_soft_update():
    a, b = Critic(10, 2, 4, 8), Critic(10, 2, 4, 8)
    before = [p.clone() for p in a.parameters()]
    soft_update(a, b, 0.01)
    for p0, p, q in zip(before, a.parameters(), b.parameters()):
        assert torch.allclose(p, 0.99 * p0 + 0.01 * q, atol=1e-6)


def test_exploration_seed_frames_then_schedule_on_global_updates():
    from gorila_zmq.agents.drqv2.agent import exploration_std
    sched = "linear(1.0,0.1,1000)"
    # 4000 seed frames over 2 actors: each actor explores uniformly for its first 2000 frames
    assert exploration_std(sched, 4000, 0, 2, 0) is None
    assert exploration_std(sched, 4000, 1998, 2, 500) is None
    assert exploration_std(sched, 4000, 2000, 2, 500) == pytest.approx(0.55)
    assert exploration_std(sched, 4000, 10**6, 2, 10**6) == pytest.approx(0.1)
    assert exploration_std(sched, 0, 0, 1, 0) == pytest.approx(1.0)


def _batch(B=4, A=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    obs = torch.randint(0, 256, (B, 3, 3, 84, 84), dtype=torch.uint8, generator=g)     # as replay gives it
    nxt = torch.randint(0, 256, (B, 3, 3, 84, 84), dtype=torch.uint8, generator=g)
    act = torch.rand(B, A, generator=g) * 2 - 1
    return obs, act, torch.rand(B, generator=g), torch.full((B,), 0.99 ** 3), nxt


def test_combined_gradient_is_critic_loss_on_encoder_and_critic_and_actor_loss_on_actor():
    from gorila_zmq.agents.drqv2.learning import gradients
    a = small_agent()
    tgt = copy.deepcopy(a.critic)
    obs, act, rew, disc, nxt = _batch()
    torch.manual_seed(7)
    info, ok = gradients(a, tgt, obs, act, rew, disc, nxt, std=0.3, clip=0.3)
    assert ok and {"critic_loss", "actor_loss"} <= set(info)
    got = {n: p.grad.clone() for n, p in a.named_parameters()}

    # by hand, consuming the random numbers in the same order: shift obs, shift next_obs, target
    # noise, actor noise; the critic loss alone for encoder + critic, the actor loss alone for the actor
    b = small_agent()
    torch.manual_seed(7)
    o = random_shift(obs.reshape(4, 9, 84, 84))
    n = random_shift(nxt.reshape(4, 9, 84, 84))
    h = b.encoder(o)
    with torch.no_grad():
        nh = b.encoder(n)
    closs, _ = update_critic(b, tgt, h, act, rew.view(-1, 1), disc.view(-1, 1), nh, 0.3, 0.3)
    closs.backward()
    assert closs.item() == pytest.approx(info["critic_loss"], rel=1e-5)
    enc_critic = {k: p.grad.clone() for k, p in b.named_parameters() if not k.startswith("actor.")}
    b.zero_grad(set_to_none=True)
    aloss, _ = update_actor(b, h.detach(), 0.3, 0.3)
    aloss.backward()
    for k, p in b.named_parameters():
        want = p.grad if k.startswith("actor.") else enc_critic[k]
        assert torch.allclose(got[k], want, atol=1e-6, rtol=1e-4), k
    assert all(got[k].abs().sum() > 0 for k in got if k.startswith(("encoder.", "actor.policy")))


def test_a_vetoed_update_touches_no_gradient():
    from gorila_zmq.agents.drqv2.learning import gradients
    a = small_agent()
    info, ok = gradients(a, copy.deepcopy(a.critic), *_batch(), std=0.2, clip=0.3, accept=lambda loss: False)
    assert not ok and "critic_loss" in info
    assert all(p.grad is None for p in a.parameters())


def test_clamped_actions_still_train_the_actor():
    """The clamp to [-1, 1] is straight-through: a mean near the edge plus noise beyond it keeps its
    gradient (a plain clamp would give 0 there and leave saturated actions untrained)."""
    from gorila_zmq.agents.drqv2.learning import policy_sample
    mu = torch.full((64, 1), 0.9, requires_grad=True)
    torch.manual_seed(0)
    a = policy_sample(mu, std=1.0, clip=0.3)
    assert a.max().item() <= 1.0 and (a == 1.0).any()
    (3.0 * a).sum().backward()
    assert torch.allclose(mu.grad, torch.full((64, 1), 3.0))


def test_a_saturated_actor_has_exactly_zero_gradient_in_float32_unless_pretanh_reg():
    """The float32 dead zone: with the pre-tanh mean z past ~9, tanh(z) rounds to exactly 1, so the
    actor's gradient is exactly 0 whatever the critic says (the ~75 plateau on cartpole_swingup).
    agent.actor_pretanh_reg adds 2 * reg * z to dL/dz, which pulls z back."""
    torch.manual_seed(0)
    a = small_agent()
    with torch.no_grad():
        a.actor.policy[-1].bias.fill_(12.0)
    h = a.encoder(torch.randint(0, 256, (8, 9, 84, 84), dtype=torch.uint8)).detach()
    z = a.actor.pre_tanh(h).detach()
    assert torch.all(torch.tanh(z) == 1.0)
    params = list(a.actor.parameters())
    loss, info = update_actor(a, h, std=0.2, clip=0.3)
    assert info["actor_pretanh"] == pytest.approx(z.abs().mean().item(), rel=1e-5) and info["actor_pretanh"] > 11
    assert all(torch.count_nonzero(g) == 0 for g in torch.autograd.grad(loss, params))
    loss, info = update_actor(a, h, std=0.2, clip=0.3, pretanh_reg=1e-3)
    g_bias = torch.autograd.grad(loss, a.actor.policy[-1].bias)[0]
    expected = 2e-3 * z.mean(0) / z.shape[1]                  # d/db of 1e-3 * mean over (B, A) of z^2
    assert torch.allclose(g_bias, expected, rtol=1e-4) and torch.all(g_bias > 0)     # a step lowers z
    assert info["actor_loss"] == pytest.approx((loss - 1e-3 * z.square().mean()).item(), rel=1e-5)
