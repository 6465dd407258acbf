"""The program as data (launchpad's `make_program`): a config -> the run's role specs, and the run's
preparation (the resolved config, the parameter layout and the initial theta, written into the run
directory before any role starts).

Dev mode, the ssh launcher and the tests all start these same `gorila-zmq ROLE --index I --config
RUN_DIR/config.json` processes; only the launcher differs.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from gorila_zmq import config as C
from gorila_zmq.agents import base as agents
from gorila_zmq.fields import ConfigError
from gorila_zmq.net import topology
from gorila_zmq.ps.layout import ParamLayout, load_run_layout, save_run_layout
from gorila_zmq.envs import env_spec
from gorila_zmq.ps import optim, shared as shared_params
from gorila_zmq.ps.state import dedup_clients, segment_bytes as shard_segment_bytes
from gorila_zmq.replay.memory import segment_bytes
from gorila_zmq.replay.sinks import bundle_memory_name


@dataclass
class RoleSpec:
    name: str
    role: str                       # ps | replay | learner | actor | evaluator
    index: int
    argv: list[str]                 # after `gorila-zmq`
    stats_endpoint: str | None = None
    layout_hash: int = 0
    stage: int = 0                  # start order


def make_layout(cfg: C.Config, from_env: bool = True) -> tuple[ParamLayout, np.ndarray]:
    """Build the agent's network once: its layout and initial theta. cfg.model is filled from the
    environment first, unless from_env=False (a network given by model.* alone: tests, benchmarks)."""
    net = agents.prepare(cfg).make_network(cfg) if from_env else agents.build_network(cfg)
    layout = ParamLayout.from_module(net)
    return layout, layout.flatten(net)


def prepare_run(cfg: C.Config, from_env: bool = True) -> str:
    """Write RUN_DIR/config.json (what every role reads), layout.json and init.npy; return the config's
    path. A resumed run keeps its layout: a config that now builds another network is an error."""
    layout, theta0 = make_layout(cfg, from_env)
    os.makedirs(cfg.run.run_dir, exist_ok=True)
    topology.ensure_ipc_dir(cfg)
    old = load_run_layout(cfg.run.run_dir)
    if old is not None and old.hash != layout.hash:
        raise ConfigError(f"{cfg.run.run_dir} holds a run of another network ({old!r}; this config builds "
                          f"{layout!r}): choose a new run.run_dir")
    if old is None:
        save_run_layout(cfg.run.run_dir, layout, cfg.ps.shards, theta0)
    path = os.path.join(cfg.run.run_dir, "config.json")
    C.save_json(cfg, path)
    return path


def run_layout_hash(cfg: C.Config) -> int:
    layout = load_run_layout(cfg.run.run_dir)
    if layout is None:
        raise ConfigError(f"{cfg.run.run_dir} has no layout.json: prepare the run first (gorila-zmq dev)")
    return layout.hash


def make_program(cfg: C.Config, config_path: str | None = None, only_host: str | None = None,
                 layout_hash: int | None = None) -> list[RoleSpec]:
    """Every process of a run, from its config (only those placed on `only_host`, if given). The
    layout hash comes from the run directory unless given."""
    config_path = config_path or os.path.join(cfg.run.run_dir, "config.json")
    lhash = run_layout_hash(cfg) if layout_hash is None else layout_hash

    def spec(role, i, stage, ep, name=None):
        return RoleSpec(name or f"{role}{i}", role, i, [role, "--index", str(i), "--config", config_path],
                        ep, lhash, stage)

    prog = [spec("ps", i, 0, topology.ps_request(cfg, i).connect) for i in range(cfg.ps.shards)]
    r = cfg.roles
    if r.mode == "bundled":
        for b in range(r.bundles):
            prog.append(spec("actor", b, 1, topology.control(cfg, "actor", b).connect))
            prog.append(spec("learner", b, 2, topology.control(cfg, "learner", b).connect))
    else:
        prog += [spec("replay", i, 1, topology.replay(cfg, i).connect) for i in range(r.replay_shards)]
        prog += [spec("actor", i, 2, topology.control(cfg, "actor", i).connect) for i in range(r.actors)]
        prog += [spec("learner", i, 2, topology.control(cfg, "learner", i).connect) for i in range(r.learners)]
    if r.evaluator:
        prog.append(spec("evaluator", 0, 3, topology.control(cfg, "evaluator", 0).connect, "evaluator"))
    if cfg.net.param_relay:            # one per host of actors and learners, started with the shards
        prog += [spec("relay", k, 0, topology.control(cfg, "relay", k, host=h).connect)
                 for k, h in enumerate(topology.relay_hosts(cfg))]
    if only_host is not None:
        prog = [p for p in prog if topology.address(cfg, p.name) == only_host]
    return prog


def owned_segments(cfg: C.Config, spec: RoleSpec) -> list[str]:
    """Shared-memory segments a role creates (what its supervisor removes if the role could not)."""
    if spec.role == "ps":
        return [f"gz_{cfg.run_id}_ps{spec.index}"]
    if spec.role == "replay":
        return [f"gz_{cfg.run_id}_greplay{spec.index}"]
    if spec.role == "actor" and cfg.roles.mode == "bundled":
        return [bundle_memory_name(cfg, spec.index)]
    if spec.role == "relay":
        return [shared_params.segment_name(cfg, spec.index)]
    return []


def shared_memory_plan(cfg: C.Config, program: list[RoleSpec]) -> dict[str, int]:
    """Bytes of shared memory each role of `program` will create on its host: a bundle's actor its
    local replay, a replay server its shard, a shard theta and its optimiser state."""
    layout = load_run_layout(cfg.run.run_dir)
    record = agents.prepare(cfg).record(env_spec(cfg))
    n_states = optim.make_server_optimizer(cfg.ps).n_states
    mem = dict(n_step=cfg.agent.n_step, gamma=cfg.agent.gamma, **record.memory_args())
    plan = {}
    for spec in program:
        if spec.role == "ps" and layout is not None:
            a, b = layout.shard_ranges(cfg.ps.shards)[spec.index]
            plan[spec.name] = shard_segment_bytes(b - a, n_states, dedup_clients(cfg))
        elif spec.role == "actor" and cfg.roles.mode == "bundled":
            plan[spec.name] = segment_bytes(cfg.agent.replay_capacity, lanes=cfg.env.num_envs, **mem)
        elif spec.role == "relay" and layout is not None:
            plan[spec.name] = shared_params.segment_bytes(layout.size, cfg.ps.shards)
        elif spec.role == "replay":
            lanes = -(-cfg.roles.actors // cfg.roles.replay_shards) * cfg.env.num_envs
            plan[spec.name] = segment_bytes(cfg.agent.replay_capacity, lanes=lanes, **mem)
    return plan


def check_shared_memory(cfg: C.Config, program: list[RoleSpec], shm_dir: str = "/dev/shm") -> int:
    """Refuse, before any role starts, a program whose segments do not fit in this host's shared memory
    (a tmpfs fills silently and the role that writes past it dies of SIGBUS much later). Returns the
    total it needs."""
    plan = shared_memory_plan(cfg, program)
    total = sum(plan.values())
    if not os.path.isdir(shm_dir):
        return total
    st = os.statvfs(shm_dir)
    free = st.f_bavail * st.f_frsize
    if total > free:
        gib = 2.0 ** 30
        replays = [v for k, v in plan.items() if k.startswith(("actor", "replay"))]
        parts = []
        if replays:
            parts.append(f"{len(replays)} replay memor{'y' if len(replays) == 1 else 'ies'} of "
                         f"{max(replays) / gib:.2f} GiB (agent.replay_capacity={cfg.agent.replay_capacity:,})")
        shards = [v for k, v in plan.items() if k.startswith("ps")]
        if shards:
            parts.append(f"{len(shards)} shard segment(s) of {sum(shards) / gib:.3f} GiB in all")
        relays = [v for k, v in plan.items() if k.startswith("relay")]
        if relays:
            parts.append(f"{len(relays)} relay segment(s) of {sum(relays) / gib:.3f} GiB")
        raise ConfigError(
            f"this host's roles need {total / gib:.1f} GiB of shared memory ({' + '.join(parts)}), but {shm_dir} "
            f"has {free / gib:.1f} GiB free. Use fewer bundles (roles.bundles={cfg.roles.bundles}), a smaller "
            f"agent.replay_capacity, or cluster mode (`gorila-zmq cluster up` spreads the roles over hosts)")
    return total
