"""The Agent protocol, and the registry that maps `agent.name` to an agent (Acme's builder is the model).

The roles are generic; everything that differs between agents sits behind four small objects:

- `Agent`: checks that it can run the configured environment and fills `model.*` (`configure`), builds
  the network the parameter server holds (`network`), says what a replay record holds (`record`), and
  makes the three objects below.
- `Policy` (`behaviour` for actors, `evaluation` for the evaluator): a batch of observations -> actions.
- `Learning` (in the learner): one gradient from a batch, and the target network's handling.

`get(name)` returns the agent: `dqn` and `drqv2` are built in; any other name of the form
`package.module:attribute` is imported (a user's own agent, or the tiny one in tests/). Adding an agent
touches only its package and `BUILTIN` below.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np

if TYPE_CHECKING:       # torch is imported where a network is built: launchers and supervisors never load it
    import torch

from gorila_zmq.envs import EnvSpec, env_spec
from gorila_zmq.fields import ConfigError
from gorila_zmq.replay.records import Record

BUILTIN = {"dqn": "gorila_zmq.agents.dqn.agent:DQN", "drqv2": "gorila_zmq.agents.drqv2.agent:DrQv2"}


@dataclass(frozen=True)
class Clock:
    """What an acting policy may schedule on: the global update count (shard 0's version, Gorila's N)
    and this actor's own environment frames."""
    global_updates: int = 0
    env_frames: int = 0


@dataclass
class Batch:
    """A minibatch on the learner's device, as replay made it (dtypes as stored: the agent converts).
    obs and next_obs may be overlapping views of one tensor (agent.batch_layout's shared frames), so
    not contiguous: reshape them, never .view()."""
    obs: torch.Tensor
    action: torch.Tensor
    reward: torch.Tensor          # the n-step discounted return
    discount: torch.Tensor        # gamma^k, 0 where the episode terminated within the k steps
    next_obs: torch.Tensor
    weight: "torch.Tensor | None" = None   # prioritized replay: each sample's importance weight


class Policy:
    """Acts for E environments at once. `q_values`: the (E, A) action values of the last act, for a
    policy asked to keep them (Ape-X's actor priorities), else None."""

    q_values = None

    def describe(self) -> str:
        """One line for a person (`gorila-zmq eval` prints it)."""
        return type(self).__name__

    def act(self, obs: np.ndarray, clock: Clock) -> np.ndarray:
        """(E, *obs_shape) observations -> (E, *action_shape) actions of the record's dtype."""
        raise NotImplementedError

    def stats(self) -> dict:
        return {}


class Learning:
    """The learner's agent-specific half. `load_theta(module)` (given at construction) loads the
    parameter server's current theta into a module of the network's shape (a blocking snapshot)."""

    def gradients(self, batch: Batch, global_updates: int, accept: Callable[[float], bool]) -> tuple[dict, bool]:
        """Compute the gradient of one batch into the online network's .grad (in place: zero_grad with
        set_to_none=False first, since the learner binds .grad to its push buffer). `accept(loss)` may
        veto the update before any backward pass (the outlier filter); then return (info, False) and
        leave .grad alone. info holds "loss" (what the filter judged) and any other scalars.

        Prioritized replay (an agent with `prioritized_replay = True`): when batch.weight is set, each
        sample's loss is multiplied by its weight, and info["priorities"] is the per-sample |TD error|
        (a tensor of B, detached) that the learner writes back."""
        raise NotImplementedError

    def after_update(self, global_updates: int) -> None:
        """Target handling after an update was pushed (DQN: sync every N global updates; DrQ-v2: soft)."""

    def stats(self) -> dict:
        return {}


class Agent:
    """One agent. Subclasses set `name` and implement every method."""

    name = "agent"
    prioritized_replay = False      # True: its Learning weights losses and returns priorities (agent.prioritized)

    def configure(self, cfg, env: EnvSpec) -> None:
        """Raise ConfigError if this agent cannot run `env` with `cfg`; fill cfg.model from `env`."""
        raise NotImplementedError

    def network(self, cfg) -> torch.nn.Module:
        """The network whose parameters the parameter server holds (cfg.model is configured)."""
        raise NotImplementedError

    def record(self, env: EnvSpec) -> Record:
        """What one replay record holds (the action's shape, dtype and bounds)."""
        raise NotImplementedError

    def behaviour(self, cfg, net: torch.nn.Module, index: int, num_actors: int) -> Policy:
        raise NotImplementedError

    def evaluation(self, cfg, net: torch.nn.Module, seed: int) -> Policy:
        raise NotImplementedError

    def learning(self, cfg, online: torch.nn.Module, load_theta: Callable[[torch.nn.Module], None],
                 global_updates: int) -> Learning:
        """The learner's half, for `online` (which holds the parameter server's theta); global_updates
        is the count when the learner starts (a periodic target sync counts from it)."""
        raise NotImplementedError

    # -- shared ---------------------------------------------------------------------------------
    def make_network(self, cfg, seed: int | None = None) -> torch.nn.Module:
        """`network(cfg)` with its initial parameters drawn from cfg.run.seed (or `seed`): the same on
        every host and in every role (the caller's torch RNG is left as it was)."""
        import torch
        state = torch.random.get_rng_state()
        torch.manual_seed(cfg.run.seed if seed is None else seed)
        try:
            return self.network(cfg)
        finally:
            torch.random.set_rng_state(state)


def get(name: str) -> Agent:
    """The agent called `name`: a built-in one, or `package.module:attribute` (a class or an instance)."""
    target = BUILTIN.get(name, name)
    mod_name, sep, attr = target.partition(":")
    if not sep:
        raise ConfigError(f"agent.name {name!r} is not one of: {', '.join(BUILTIN)} (or package.module:Class)")
    try:
        obj = getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"agent.name {name!r}: cannot import {target} ({e})") from None
    agent = obj() if isinstance(obj, type) else obj
    if not isinstance(agent, Agent):
        raise ConfigError(f"agent.name {name!r}: {target} is not a gorila_zmq.agents.base.Agent")
    return agent


def prepare(cfg) -> Agent:
    """The configured agent, with cfg.model filled from the environment (it checks they fit)."""
    agent = get(cfg.agent.name)
    if cfg.agent.prioritized and not agent.prioritized_replay:
        raise ConfigError(f"agent.prioritized: agent {agent.name} does not compute priorities "
                          "(prioritized replay is for dqn)")
    agent.configure(cfg, env_spec(cfg))
    return agent


def build_network(cfg, seed: int | None = None) -> torch.nn.Module:
    """The network of cfg.agent.name as cfg.model describes it (model.kind must be set: `prepare` fills
    it from the environment), initialised from cfg.run.seed or `seed`."""
    if cfg.model.kind == "auto":
        raise ConfigError("model.kind is 'auto': fill it from the environment first (agents.base.prepare)")
    return get(cfg.agent.name).make_network(cfg, seed)
