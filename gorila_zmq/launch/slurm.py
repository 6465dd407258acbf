"""Slurm: a run as one batch job on the scheduler a research cluster already has.

    gorila-zmq slurm submit SPEC.toml [--dry-run]     # sbatch underneath; prints the job id
    gorila-zmq slurm status RUN_DIR                    # the job's state, each node, every role's stats
    gorila-zmq slurm logs RUN_DIR ROLE|job             # a role's log, or the job's own output
    gorila-zmq slurm cancel RUN_DIR                    # scancel; then what each node left behind

The spec (cluster/slurm-example.toml) gives the run directory (on a filesystem every node sees), a
preset and overrides, and a [slurm] table: partition, node count, time limit, GPUs per node, extra
#SBATCH lines, or several [[slurm.group]] tables (a heterogeneous job: e.g. shards on CPU nodes,
bundles on GPU nodes). [roles] places each role on a node of the allocation: `0` (the job's first
node) or `"gpu:1"` (the second node of group gpu).

`submit` checks the partitions with `sinfo`, makes CurveZMQ keys in RUN_DIR/keys (0600) unless the spec
names a keys_dir, writes RUN_DIR/slurm/ (the resolved spec, a visibility token) and calls sbatch.
Inside the job, the batch step (`slurm job`) reads the allocation (SLURM_JOB_NODELIST, each node's
NodeAddr), computes the placement, checks with one quick step that every node sees the run directory,
writes the run's config.json, then starts one supervisor per node with srun (`slurm node`: the dev
supervisor with --only-host), each of which recomputes the placement from the same allocation and
refuses to start if it differs. Before the time limit Slurm sends SIGUSR1 (`--signal=B:USR1@S`): the
batch step stops every supervisor, the roles checkpoint, and with `requeue = true` the job requeues
itself; resubmitting the same spec resumes the run from its directory as well.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

import zmq

from gorila_zmq import config as C
from gorila_zmq.fields import UserError
from gorila_zmq.host import files
from gorila_zmq.launch.cluster import place_roles, read_toml, spec_config
from gorila_zmq.launch.program import make_layout, make_program, owned_segments
from gorila_zmq.launch.status import collect
from gorila_zmq.net import security
from gorila_zmq.ps.layout import load_run_layout, save_run_layout

SLURM_KEYS = {"job_name", "partition", "nodes", "time", "gpus_per_node", "cpus_per_node", "exclusive",
              "signal_before_s", "requeue", "sbatch", "group"}
GROUP_KEYS = {"name", "partition", "nodes", "gpus_per_node", "cpus_per_node", "sbatch"}
TOP_KEYS = {"run_dir", "keys_dir", "curve", "base_port", "preset", "overrides", "python", "workdir", "slurm", "roles"}


class SlurmError(UserError, RuntimeError):
    """Slurm missing, refusing a job, or a job that cannot run as specified."""


def atomic_write(path: str, data: bytes) -> None:
    with files.atomic_write(path) as f:
        f.write(data)


@dataclass
class Group:
    name: str
    nodes: int
    partition: str | None = None
    gpus_per_node: int = 0
    cpus_per_node: int = 0
    sbatch: list = field(default_factory=list)


@dataclass
class SlurmSpec:
    path: str
    run_dir: str
    cfg: C.Config
    groups: list[Group]
    refs: dict[str, list[int]]          # role -> [group index, node index]
    job_name: str = "gorila"
    time: str = "01:00:00"
    signal_before_s: int = 120
    requeue: bool = False
    exclusive: bool = True
    sbatch: list = field(default_factory=list)
    python: str = sys.executable
    workdir: str = "."

    @property
    def n_nodes(self) -> int:
        return sum(g.nodes for g in self.groups)

    def flat(self, gi: int, ni: int) -> int:
        return sum(g.nodes for g in self.groups[:gi]) + ni


def _int(path, where, v, lo=0):
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise C.ConfigError(f"{path}: {where} must be an integer ≥ {lo}, got {v!r}")
    return v


def load_spec(path: str) -> SlurmSpec:
    raw = read_toml(path, "Slurm spec")
    for keys, known, where in ((raw, TOP_KEYS, "top level"), (raw.get("slurm", {}), SLURM_KEYS, "[slurm]")):
        unknown = set(keys) - known
        if unknown:
            raise C.ConfigError(f"{path}: unknown key(s) {sorted(unknown)} in {where} (known: {', '.join(sorted(known))})")
    if "run_dir" not in raw:
        raise C.ConfigError(f"{path}: run_dir is required (a directory on a filesystem every node sees)")
    s = raw.get("slurm", {})
    if s.get("group") and "nodes" in s:
        raise C.ConfigError(f"{path}: [slurm] nodes and [[slurm.group]] tables: in a heterogeneous job each "
                            "group gives its own nodes")
    groups = []
    for g in s.get("group", []) or [{"name": "node", "nodes": s.get("nodes", 1), "partition": s.get("partition"),
                                      "gpus_per_node": s.get("gpus_per_node", 0),
                                      "cpus_per_node": s.get("cpus_per_node", 0)}]:
        unknown = set(g) - GROUP_KEYS
        if unknown:
            raise C.ConfigError(f"{path}: unknown key(s) {sorted(unknown)} in [[slurm.group]]")
        if "name" not in g or not re.fullmatch(r"[A-Za-z_][\w-]*", str(g["name"])):
            raise C.ConfigError(f"{path}: every [[slurm.group]] needs a name (letters, digits, _ and -)")
        groups.append(Group(g["name"], _int(path, f"group {g['name']} nodes", g.get("nodes", 1), 1),
                            g.get("partition") or s.get("partition"),
                            _int(path, "gpus_per_node", g.get("gpus_per_node", s.get("gpus_per_node", 0))),
                            _int(path, "cpus_per_node", g.get("cpus_per_node", s.get("cpus_per_node", 0))),
                            list(g.get("sbatch", []))))
    names = [g.name for g in groups]
    if len(set(names)) != len(names):
        raise C.ConfigError(f"{path}: group names repeat: {names}")
    refs: dict[str, list[int]] = {}

    def where(kind, ref):
        if isinstance(ref, int) and not isinstance(ref, bool):
            total, gi = ref, 0
            while gi < len(groups) and total >= groups[gi].nodes:
                total -= groups[gi].nodes
                gi += 1
            if ref < 0 or gi == len(groups):
                raise C.ConfigError(f"{path}: [roles] {kind} names node {ref}, but the job has "
                                    f"{sum(g.nodes for g in groups)} node(s) (0 .. {sum(g.nodes for g in groups) - 1})")
            return f"{gi}:{total}"
        m = re.fullmatch(r"([A-Za-z_][\w-]*):(\d+)", str(ref))
        if not m or m.group(1) not in names:
            raise C.ConfigError(f"{path}: [roles] {kind} entry {ref!r}: use a node number (0, 1, ...) or "
                                f"GROUP:N with a group of {names}")
        gi, ni = names.index(m.group(1)), int(m.group(2))
        if ni >= groups[gi].nodes:
            raise C.ConfigError(f"{path}: [roles] {kind} entry {ref!r}: group {m.group(1)} has {groups[gi].nodes} node(s)")
        return f"{gi}:{ni}"
    roles = raw.get("roles", {})
    placed = place_roles(roles, where, path)
    refs = {k: [int(x) for x in v.split(":")] for k, v in placed.items()}
    run_dir = os.path.abspath(raw["run_dir"])
    raw = dict(raw, run_dir=run_dir)
    if raw.get("curve", True) and not raw.get("keys_dir"):
        raw["keys_dir"] = os.path.join(run_dir, "keys")
    # placement by node address is known only inside the job: here a placeholder of the right shape
    cfg = spec_config(raw, roles, {k: f"node{v}" for k, v in placed.items()}, "0.0.0.0", run_dir)
    cfg.run.run_id = cfg.run_id
    spec = SlurmSpec(path, run_dir, cfg, groups, refs, job_name=str(s.get("job_name", "gorila")),
                     time=str(s.get("time", "01:00:00")),
                     signal_before_s=_int(path, "signal_before_s", s.get("signal_before_s", 120)),
                     requeue=bool(s.get("requeue", False)), exclusive=bool(s.get("exclusive", True)),
                     sbatch=list(s.get("sbatch", [])), python=raw.get("python", sys.executable),
                     workdir=os.path.abspath(raw.get("workdir", ".")))
    used = {spec.flat(*r) for r in refs.values()}
    idle = [f"{g.name}:{i}" for gi, g in enumerate(groups) for i in range(g.nodes) if spec.flat(gi, i) not in used]
    if idle:
        raise C.ConfigError(f"{path}: node(s) {', '.join(idle)} would run no role: ask for fewer nodes, or place "
                            "roles there")
    missing = [r.name for r in make_program(cfg, layout_hash=0) if r.name not in refs and r.role != "relay"]
    if missing:
        raise C.ConfigError(f"{path}: no node for roles {missing}: list them under [roles]")
    return spec


# -- the batch script --------------------------------------------------------------------------------

def slurm_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "slurm")


def batch_script(spec: SlurmSpec) -> str:
    out = ["#!/bin/bash", f"# made by `gorila-zmq slurm submit {spec.path}`: one supervisor per node, started by srun"]
    for gi, g in enumerate(spec.groups):
        if gi:
            out.append("#SBATCH hetjob")
        lines = [f"--nodes={g.nodes}", "--ntasks-per-node=1", f"--time={spec.time}"]
        if gi == 0:
            lines = [f"--job-name={spec.job_name}", f"--output={slurm_dir(spec.run_dir)}/job-%j.out",
                     "--open-mode=append", f"--chdir={spec.workdir}",
                     f"--signal=B:USR1@{spec.signal_before_s}", "--requeue" if spec.requeue else "--no-requeue"] + lines
        if g.partition:
            lines.append(f"--partition={g.partition}")
        if g.gpus_per_node:
            lines.append(f"--gpus-per-node={g.gpus_per_node}")
        if g.cpus_per_node:
            lines.append(f"--cpus-per-task={g.cpus_per_node}")
        if spec.exclusive:
            lines.append("--exclusive")
        lines += [str(x) for x in g.sbatch] + ([str(x) for x in spec.sbatch] if gi == 0 else [])
        out += [f"#SBATCH {x}" for x in lines]
    out.append(f"exec {shlex.quote(spec.python)} -m gorila_zmq.cli slurm job {shlex.quote(spec.run_dir)}")
    return "\n".join(out) + "\n"


# -- Slurm commands ----------------------------------------------------------------------------------

def _need(tool: str) -> str:
    path = shutil.which(tool)
    if not path:
        raise SlurmError(f"Slurm is not installed here: no `{tool}` on PATH (run this on a Slurm login node, "
                         "or install slurm-client)")
    return path


def _slurm(*argv: str, input: str | None = None, timeout: float = 60.0) -> subprocess.CompletedProcess:
    try:
        return subprocess.run([_need(argv[0]), *argv[1:]], input=input, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        raise SlurmError(f"`{' '.join(argv)}` did not answer within {timeout:.0f}s (is slurmctld up?)") from None


def _last_error(r: subprocess.CompletedProcess) -> str:
    lines = [ln.strip() for ln in (r.stderr or r.stdout or "").splitlines() if ln.strip()]
    return lines[-1] if lines else f"exit code {r.returncode}"


def partitions() -> tuple[dict[str, int], str | None]:
    """{partition: node count} and the default partition, from sinfo."""
    r = _slurm("sinfo", "-h", "-o", "%P %D")
    if r.returncode != 0:
        raise SlurmError(f"sinfo failed: {_last_error(r)}")
    parts, default = {}, None
    for line in r.stdout.split("\n"):
        if len(line.split()) == 2:
            name, n = line.split()
            if name.endswith("*"):
                name = default = name[:-1]
            parts[name] = parts.get(name, 0) + int(n)
    return parts, default


def check_partitions(spec: SlurmSpec) -> None:
    parts, default = partitions()
    want: dict[str, int] = {}
    for g in spec.groups:
        p = g.partition or default
        if p is None:
            raise SlurmError("the spec names no partition and this cluster has no default one: set slurm.partition")
        if p not in parts:
            raise SlurmError(f"unknown partition {p!r} (this cluster has: {', '.join(sorted(parts)) or 'none'})")
        want[p] = want.get(p, 0) + g.nodes
    for p, n in want.items():
        if n > parts[p]:
            raise SlurmError(f"the spec asks for {n} node(s) in partition {p!r}, which has {parts[p]}")


def job_state(job_id: str) -> dict:
    """{'state', 'reason', 'elapsed', 'limit', 'nodes'}; state 'UNKNOWN' once Slurm has forgotten it."""
    r = _slurm("scontrol", "show", "job", "-o", job_id)
    if r.returncode != 0:
        return {"state": "UNKNOWN", "reason": _last_error(r)}
    out: dict = {}
    for line in r.stdout.splitlines():          # a heterogeneous job: one line per component
        f = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
        out.setdefault("state", f.get("JobState", "?"))
        out.setdefault("reason", f.get("Reason", ""))
        out.setdefault("elapsed", f.get("RunTime", ""))
        out.setdefault("limit", f.get("TimeLimit", ""))
        out.setdefault("restarts", int(f.get("Restarts", 0) or 0))
        nodes = f.get("NodeList", "")
        if nodes and nodes != "(null)":
            out["nodes"] = ",".join(filter(None, [out.get("nodes", ""), nodes]))
    return out


ACTIVE = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_HOLD", "RESIZING",
          "SIGNALING", "STAGE_OUT", "REQUEUE_FED"}


# -- submit ------------------------------------------------------------------------------------------

def _record(run_dir: str, event: str, **kw) -> None:
    with open(os.path.join(slurm_dir(run_dir), "events.jsonl"), "a") as f:
        f.write(json.dumps({"event": event, "time": time.time(), **kw}) + "\n")


def events(run_dir: str) -> list[dict]:
    try:
        return [json.loads(x) for x in open(os.path.join(slurm_dir(run_dir), "events.jsonl")) if x.strip()]
    except FileNotFoundError:
        return []


def current_job(run_dir: str) -> str | None:
    try:
        return json.load(open(os.path.join(slurm_dir(run_dir), "job.json")))["job_id"]
    except (OSError, ValueError, KeyError):
        return None


def submit(spec: SlurmSpec, dry_run: bool = False) -> str:
    script = batch_script(spec)
    if dry_run:
        print(script, end="")
        return ""
    _need("sbatch")
    old = current_job(spec.run_dir)
    if old and job_state(old)["state"] in ACTIVE:
        raise SlurmError(f"job {old} of this run is still {job_state(old)['state']}: `gorila-zmq slurm cancel "
                         f"{spec.run_dir}` first (resubmitting resumes the run)")
    check_partitions(spec)
    resumed = os.path.exists(os.path.join(spec.run_dir, "config.json"))
    sd = slurm_dir(spec.run_dir)
    os.makedirs(sd, exist_ok=True)
    cfg = spec.cfg
    if cfg.net.curve:
        made = security.gen_keys(cfg.net.keys_dir, ["launcher", *(f"node{i}" for i in range(spec.n_nodes))])
        if made:
            print(f"CurveZMQ keys made in {cfg.net.keys_dir} (secret keys 0600)")
    else:
        print("WARNING: curve = false: every socket of this job is UNAUTHENTICATED and UNENCRYPTED", file=sys.stderr)
    layout, theta0 = make_layout(cfg)          # here: a config that cannot build its network fails now
    old_layout = load_run_layout(spec.run_dir)
    if old_layout is not None and old_layout.hash != layout.hash:
        raise C.ConfigError(f"{spec.run_dir} holds a run of another network: choose a new run_dir")
    if old_layout is None:
        save_run_layout(spec.run_dir, layout, cfg.ps.shards, theta0)
    token = secrets.token_hex(16)
    atomic_write(os.path.join(sd, "visible"), token.encode())
    record = {"groups": [g.__dict__ for g in spec.groups], "refs": spec.refs, "token": token,
              "config": C.to_dict(cfg), "requeue": spec.requeue, "python": spec.python, "spec": os.path.abspath(spec.path)}
    atomic_write(os.path.join(sd, "spec.json"), json.dumps(record, indent=1).encode())
    atomic_write(os.path.join(sd, "batch.sh"), script.encode())
    for stale in os.listdir(sd):           # the last job's node records and error: not this job's
        if stale.startswith("node-") or stale == "error":
            os.remove(os.path.join(sd, stale))
    r = _slurm("sbatch", "--parsable", input=script)
    if r.returncode != 0:
        raise SlurmError(f"sbatch refused the job: {_last_error(r)}")
    job_id = r.stdout.strip().split(";")[0]
    atomic_write(os.path.join(sd, "job.json"), json.dumps({"job_id": job_id, "submitted": time.time()}).encode())
    _record(spec.run_dir, "submitted", job_id=job_id, resumes=resumed)
    print(f"submitted job {job_id}" + (" (resuming the run in its directory)" if resumed else "")
          + f"; `gorila-zmq slurm status {spec.run_dir}`")
    return job_id


# -- inside the job ----------------------------------------------------------------------------------

def allocation(n_groups: int, env=os.environ) -> list[list[tuple[str, str]]]:
    """[(node name, IPv4 address)] per group, in Slurm's node-list order: the same on every node."""
    out = []
    for gi in range(n_groups):
        key = f"SLURM_JOB_NODELIST_HET_GROUP_{gi}" if n_groups > 1 else "SLURM_JOB_NODELIST"
        nodelist = env.get(key) or (env.get("SLURM_JOB_NODELIST_HET_GROUP_0") if n_groups == 1 else None)
        if not nodelist:
            raise SlurmError(f"{key} is not set: `slurm job`/`slurm node` run inside a Slurm job only")
        r = _slurm("scontrol", "show", "hostnames", nodelist)
        names = r.stdout.split()
        addrs = {}
        r = _slurm("scontrol", "show", "node", "-o", nodelist)
        for line in r.stdout.splitlines():
            f = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
            addrs[f.get("NodeName")] = f.get("NodeAddr") or f.get("NodeName")
        group = []
        for name in names:
            addr = addrs.get(name, name)
            try:
                addr = socket.getaddrinfo(addr, None, socket.AF_INET)[0][4][0]
            except OSError as e:
                raise SlurmError(f"node {name}: cannot resolve its address {addr!r}: {e}") from None
            group.append((name, addr))
        out.append(group)
    return out


def placement(record: dict, nodes: list[list[tuple[str, str]]]) -> dict[str, str]:
    for gi, g in enumerate(record["groups"]):
        if len(nodes[gi]) != g["nodes"]:
            raise SlurmError(f"group {g['name']}: the allocation has {len(nodes[gi])} node(s), the spec {g['nodes']}")
    return {role: nodes[gi][ni][1] for role, (gi, ni) in sorted(record["refs"].items())}


def _load_record(run_dir: str) -> dict:
    try:
        return json.load(open(os.path.join(slurm_dir(run_dir), "spec.json")))
    except FileNotFoundError:
        raise SlurmError(f"{run_dir} holds no Slurm run (no slurm/spec.json): submit one with "
                         "`gorila-zmq slurm submit SPEC`") from None


def _srun(record: dict, command: list[str]) -> list[str]:
    """One task per node of every group (a heterogeneous step: one component per group)."""
    groups = record["groups"]
    if len(groups) == 1:
        return ["srun", f"--nodes={groups[0]['nodes']}", f"--ntasks={groups[0]['nodes']}", "--kill-on-bad-exit=0",
                *command]
    argv = ["srun", "--kill-on-bad-exit=0"]
    for gi, g in enumerate(groups):
        argv += ([":"] if gi else []) + [f"--het-group={gi}", f"--nodes={g['nodes']}", f"--ntasks={g['nodes']}",
                                         *command]
    return argv


def job_main(run_dir: str) -> int:
    """The batch step: placement, the visibility check, config.json, then one supervisor per node."""
    record = _load_record(run_dir)
    sd = slurm_dir(run_dir)
    job_id = os.environ.get("SLURM_JOB_ID", "?")
    nodes = allocation(len(record["groups"]))
    flat = [n for g in nodes for n in g]
    where = placement(record, nodes)
    restart = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    print(f"job {job_id}: nodes {', '.join(f'{n}={a}' for n, a in flat)}" + (f" (restart {restart})" if restart else ""),
          flush=True)
    py = record["python"]
    check = subprocess.run(_srun(record, [py, "-m", "gorila_zmq.cli", "slurm", "check", run_dir, record["token"]]),
                           capture_output=True, text=True)
    if check.returncode != 0:
        bad = sorted({ln.strip() for ln in (check.stdout + check.stderr).splitlines() if "does not see" in ln})
        msg = ("; ".join(bad) or _last_error(check)) + " (the run directory must be on a filesystem every node sees)"
        atomic_write(os.path.join(sd, "error"), (msg + "\n").encode())
        print(f"ERROR: {msg}", file=sys.stderr, flush=True)
        return 2
    path = os.path.join(run_dir, "config.json")
    resumed = os.path.exists(path)
    cfg = C.load(path) if resumed else C.from_dict(record["config"])
    cfg.net.placement = where              # a requeued job may have other nodes: placed afresh
    cfg.net.host = flat[0][1]
    cfg.validate()
    C.save_json(cfg, path)
    atomic_write(os.path.join(sd, "nodes.json"), json.dumps(
        [{"name": n, "address": a, "key": f"node{i}"} for i, (n, a) in enumerate(flat)]).encode())
    _record(run_dir, "started", job_id=job_id, nodes=flat, restart=restart, resumed=resumed)
    step = subprocess.Popen(_srun(record, [py, "-m", "gorila_zmq.cli", "slurm", "node", run_dir]))
    why = {}

    def stop(signum, _frame):
        why.setdefault("signal", signal.Signals(signum).name)
        if step.poll() is None:
            # SIGTERM to every step of the job but not to this batch step: each supervisor stops its
            # roles, which checkpoint. (A SIGTERM to srun itself would kill the tasks at once.)
            subprocess.run([shutil.which("scancel") or "scancel", "--signal=TERM", job_id], capture_output=True)
    signal.signal(signal.SIGUSR1, stop)
    signal.signal(signal.SIGTERM, stop)
    rc = step.wait()
    versions = _checkpointed_versions(run_dir, cfg.ps.shards)
    if why.get("signal") == "SIGUSR1":
        print(f"job {job_id}: the time limit is near: every role stopped and checkpointed (shard versions "
              f"{versions})", flush=True)
        _record(run_dir, "time_limit", job_id=job_id, versions=versions)
        if record["requeue"]:
            _record(run_dir, "requeueing", job_id=job_id)      # first: the requeue ends this step too
            print(f"job {job_id}: requeueing itself; it resumes from {run_dir} when it starts again", flush=True)
            r = _slurm("scontrol", "requeue", job_id)
            if r.returncode != 0:
                _record(run_dir, "requeue_failed", job_id=job_id, error=_last_error(r))
                print(f"job {job_id}: scontrol requeue failed: {_last_error(r)}", file=sys.stderr, flush=True)
        return 0
    _record(run_dir, "ended", job_id=job_id, rc=rc, versions=versions, signal=why.get("signal"))
    return rc


def _checkpointed_versions(run_dir: str, shards: int) -> list:
    from gorila_zmq.ps.state import checkpoint_path, load_checkpoint
    out = []
    for i in range(shards):
        try:
            ck = load_checkpoint(checkpoint_path(run_dir, i))
            out.append(int(ck[2]["version"]) if ck else None)
        except Exception:           # a damaged checkpoint: its shard says so when it starts
            out.append(None)
    return out


def check_main(run_dir: str, token: str) -> int:
    """One task per node: does this node see the file `submit` wrote?"""
    node = os.environ.get("SLURMD_NODENAME", socket.gethostname())
    try:
        seen = open(os.path.join(slurm_dir(run_dir), "visible")).read().strip()
    except OSError:
        seen = None
    if seen != token:
        print(f"node {node} does not see {slurm_dir(run_dir)}/visible", flush=True)
        return 1
    return 0


def node_main(run_dir: str) -> int:
    """One task per node: the dev supervisor for this node's roles, then a record of what it left."""
    from gorila_zmq.launch import supervisor
    record = _load_record(run_dir)
    me = os.environ.get("SLURMD_NODENAME")
    nodes = allocation(len(record["groups"]))
    flat = [n for g in nodes for n in g]
    index = next((i for i, (n, _) in enumerate(flat) if n == me), None)
    if index is None:
        raise SlurmError(f"node {me!r} is not in this job's allocation {flat}")
    path = os.path.join(run_dir, "config.json")
    cfg = C.load(path)
    mine = placement(record, nodes)
    if mine != cfg.net.placement:        # every node computes the placement itself: it must agree
        raise SlurmError(f"node {me}: the placement computed here {mine} differs from {path} {cfg.net.placement}")
    address = flat[index][1]
    os.environ["GORILA_KEY_NAME"] = f"node{index}"
    info = os.path.join(slurm_dir(run_dir), f"node-{me}.json")
    atomic_write(info, json.dumps({"node": me, "address": address, "pid": os.getpid(), "started": time.time(),
                                   "job_id": os.environ.get("SLURM_JOB_ID")}).encode())
    try:
        rc = supervisor.dev_main(["--only-host", address, f"run.run_dir={run_dir}"])
    finally:
        program = make_program(cfg, path, address)
        segments = [s for spec in program for s in owned_segments(cfg, spec) if os.path.exists(f"/dev/shm/{s}")]
        procs = _run_processes(cfg, path, program)
        atomic_write(os.path.join(slurm_dir(run_dir), f"node-{me}.exit.json"), json.dumps(
            {"node": me, "time": time.time(), "left_processes": procs, "left_segments": segments}).encode())
    return rc


def _run_processes(cfg, config_path: str, program) -> list[str]:
    """This node's role processes of the run still alive (by their command line)."""
    names = {(s.role, str(s.index)) for s in program}
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
        except OSError:
            continue
        argv = [a.decode(errors="replace") for a in argv]
        if config_path in argv and "--index" in argv and int(pid) != os.getpid():
            i = argv.index("--index")
            if (argv[i - 1], argv[i + 1]) in names:
                out.append(f"{pid} {' '.join(argv[i - 1:i + 2])}")
    return out


# -- status, logs, cancel ----------------------------------------------------------------------------

def node_records(run_dir: str) -> dict[str, dict]:
    out = {}
    sd = slurm_dir(run_dir)
    for f in sorted(os.listdir(sd)) if os.path.isdir(sd) else []:
        m = re.fullmatch(r"node-(.+?)(\.exit)?\.json", f)
        if m:
            try:
                out.setdefault(m.group(1), {}).update({"exit" if m.group(2) else "start": json.load(open(os.path.join(sd, f)))})
            except (OSError, ValueError):
                pass
    return out


def collect_roles(run_dir: str, timeout_s: float = 1.0) -> dict[str, dict | None]:
    cfg = C.load(os.path.join(run_dir, "config.json"))
    ctx = zmq.Context()
    try:
        curve = security.load(cfg.net.keys_dir, "launcher") if cfg.net.curve else None
        with security.use(curve):
            return collect(cfg, make_program(cfg), ctx, timeout_s)
    finally:
        ctx.destroy(linger=0)


def job_output(run_dir: str, job_id: str | None = None) -> str:
    job_id = job_id or current_job(run_dir)
    try:
        return open(os.path.join(slurm_dir(run_dir), f"job-{job_id}.out"), errors="replace").read()
    except OSError:
        return ""


def status(run_dir: str, timeout_s: float = 1.0) -> int:
    _load_record(run_dir)
    job_id = current_job(run_dir)
    st = job_state(job_id) if job_id else {"state": "NOT SUBMITTED"}
    print(f"job {job_id}: {st['state']}" + (f" ({st['reason']})" if st.get("reason") not in (None, "", "None") else "")
          + (f", {st['elapsed']} of {st['limit']}" if st.get("elapsed") else "")
          + (f", restarted {st['restarts']}x" if st.get("restarts") else "") + (f", nodes {st['nodes']}" if st.get("nodes") else ""))
    try:
        print("error: " + open(os.path.join(slurm_dir(run_dir), "error")).read().strip())
        return 1
    except OSError:
        pass
    srun_errors = [ln for ln in job_output(run_dir, job_id).splitlines() if ln.startswith("srun: error")]
    for ln in srun_errors[-5:]:
        print(f"slurm: {ln}")
    if not os.path.exists(os.path.join(run_dir, "config.json")):
        print("roles: not placed yet (the job writes config.json when it starts)")
        return 1
    cfg = C.load(os.path.join(run_dir, "config.json"))
    by_addr = {}
    try:
        by_addr = {n["address"]: n["name"] for n in json.load(open(os.path.join(slurm_dir(run_dir), "nodes.json")))}
    except (OSError, ValueError):
        pass
    stats = collect_roles(run_dir, timeout_s) if st["state"] in ("RUNNING", "COMPLETING") else {}
    down_nodes = {}
    from gorila_zmq.net import topology
    for spec in make_program(cfg):
        if spec.stats_endpoint is None:
            continue
        node = by_addr.get(topology.address(cfg, spec.name), "?")
        v = stats.get(spec.name)
        if v is None:
            down_nodes.setdefault(node, []).append(spec.name)
            print(f"{spec.name:<12} {node:<8} DOWN")
        else:
            print(f"{spec.name:<12} {node:<8} up  " + " ".join(
                f"{k}={v[k]}" for k in ("version", "env_frames", "updates", "evaluations", "best_return",
                                        "resumed_from", "auth_failures") if v.get(k) is not None))
    if st["state"] == "RUNNING":
        for node, roles in down_nodes.items():
            if len(roles) == sum(1 for s in make_program(cfg) if by_addr.get(topology.address(cfg, s.name)) == node
                                 and s.stats_endpoint):
                killed = [ln for ln in srun_errors if re.search(rf"\b{re.escape(node)}\b", ln)]
                print(f"node {node}: every role is down" + (" (Slurm reports its task ended)" if killed else ""))
    return 0 if st["state"] in ACTIVE and not down_nodes else 1


def cancel(run_dir: str, timeout: float = 60.0) -> int:
    _load_record(run_dir)
    job_id = current_job(run_dir)
    if not job_id:
        raise SlurmError(f"{run_dir}: no job was submitted")
    nodes = []
    try:
        nodes = [n["name"] for n in json.load(open(os.path.join(slurm_dir(run_dir), "nodes.json")))]
    except (OSError, ValueError):
        pass
    before = job_state(job_id)["state"]
    if before in ACTIVE:
        r = _slurm("scancel", job_id)
        if r.returncode != 0:
            raise SlurmError(f"scancel {job_id} failed: {_last_error(r)}")
    else:
        print(f"job {job_id} had already ended ({before}); nothing to cancel")
    end = time.monotonic() + timeout
    while job_state(job_id)["state"] in ACTIVE and time.monotonic() < end:
        time.sleep(0.5)
    state = job_state(job_id)["state"]
    print(f"job {job_id}: {state}")
    if state in ACTIVE:
        print(f"job {job_id} is still {state} after {timeout:.0f}s", file=sys.stderr)
        return 1
    if before in ACTIVE:
        _record(run_dir, "cancelled", job_id=job_id)
    records = node_records(run_dir)
    bad = 0
    started = [n for n in nodes if "start" in records.get(n, {}) and records[n]["start"].get("job_id") == job_id]
    for n in started:
        ex = records[n].get("exit")
        if ex is None:
            print(f"{n}: its supervisor left no exit record (killed before it could stop its roles?)")
            bad += 1
        elif ex["left_processes"] or ex["left_segments"]:
            print(f"{n}: left behind {ex['left_processes'] + ex['left_segments']}")
            bad += 1
        else:
            print(f"{n}: nothing left")
    return 1 if bad else 0


def logs(run_dir: str, role: str, lines: int = 40) -> int:
    if role == "job":
        text = job_output(run_dir)
    else:
        try:
            text = open(os.path.join(run_dir, "logs", f"{role}.log"), errors="replace").read()
        except OSError:
            raise SlurmError(f"no log for {role!r} in {run_dir}/logs (roles: "
                             + ", ".join(sorted(f[:-4] for f in os.listdir(os.path.join(run_dir, "logs"))
                                                if f.endswith(".log"))) + ")") from None
    print("\n".join(text.splitlines()[-lines:]))
    return 0


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="gorila-zmq slurm", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("submit", help="sbatch a run from a spec (cluster/slurm-example.toml)")
    s.add_argument("spec")
    s.add_argument("--dry-run", action="store_true", help="print the batch script; submit nothing")
    for name in ("status", "cancel"):
        sub.add_parser(name).add_argument("run_dir")
    lg = sub.add_parser("logs", help="a role's log (ps0, learner1, ...) or `job` for the job's output")
    lg.add_argument("run_dir")
    lg.add_argument("role")
    lg.add_argument("--lines", type=int, default=40)
    for name in ("job", "node"):                       # inside the job
        sub.add_parser(name, help=argparse.SUPPRESS).add_argument("run_dir")
    ck = sub.add_parser("check", help=argparse.SUPPRESS)
    ck.add_argument("run_dir")
    ck.add_argument("token")
    a = p.parse_args(argv)
    if a.command == "submit":
        submit(load_spec(a.spec), a.dry_run)
        return 0
    run_dir = os.path.abspath(a.run_dir)
    if a.command == "status":
        return status(run_dir)
    if a.command == "cancel":
        return cancel(run_dir)
    if a.command == "logs":
        return logs(run_dir, a.role, a.lines)
    if a.command == "job":
        return job_main(run_dir)
    if a.command == "node":
        return node_main(run_dir)
    return check_main(run_dir, a.token)
