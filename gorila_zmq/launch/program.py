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
    return []
