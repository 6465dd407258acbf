"""Cluster mode: the same roles and configuration, started over ssh on several hosts.

`gorila-zmq cluster up|down|status|logs|restart SPEC.toml` (also `python cluster/launch.py ...`).
The spec (see cluster/example.toml) names the hosts (address, ssh user/port/options, python, working
directory), where each role runs, the run and key directories, a preset and overrides. `up` writes
the run's config.json to every host, then starts on each one supervisor (`gorila-zmq dev
--only-host ADDRESS`, the dev-mode supervisor reused) detached from the ssh session; the supervisor
starts and restarts that host's roles, each with its own log and pid file. `up` waits until every
role answers and reports those that do not with the tail of their logs; it is idempotent. `down`
stops every supervisor (SIGTERM, then SIGKILL) and checks that no process and no shared-memory
segment of the run is left on any host. OpenSSH runs in batch mode: key-only, never a prompt.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shlex
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field

import numpy as np
import zmq

from gorila_zmq import config as C
from gorila_zmq.fields import UserError
from gorila_zmq.launch.program import make_layout, make_program
from gorila_zmq.launch.status import collect
from gorila_zmq.net import security, topology
from gorila_zmq.ps.layout import INIT_FILE, LAYOUT_FILE, layout_record


class ClusterError(UserError, RuntimeError):
    """A host that cannot be reached, logged into or used."""


@dataclass
class Host:
    name: str
    address: str
    user: str = "root"
    port: int = 22
    python: str = sys.executable
    workdir: str = "."
    ssh_options: list = field(default_factory=list)

    def ssh(self, command: str, *, input: bytes | None = None, timeout: float = 30.0, check: bool = True
            ) -> subprocess.CompletedProcess:
        argv = ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=5", "-p", str(self.port), *self.ssh_options,
                f"{self.user}@{self.address}", command]
        try:
            r = subprocess.run(argv, input=input, capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise ClusterError(f"host {self.name} ({self.address}): ssh timed out after {timeout:.0f}s") from None
        if check and r.returncode == 255:
            err = r.stderr.decode(errors="replace").strip().splitlines()
            why = err[-1] if err else "no message"
            kind = "ssh login failed" if "denied" in why.lower() else "unreachable"
            raise ClusterError(f"host {self.name} ({self.user}@{self.address}:{self.port}) {kind}: {why}")
        return r


@dataclass
class ClusterSpec:
    hosts: dict[str, Host]
    cfg: C.Config
    path: str
    layout: object = None           # the run's ParamLayout, built once when the spec is loaded
    theta0: object = None           # and its initial theta (shipped to every host by `up`)

    def program(self, only_host: str | None = None):
        return make_program(self.cfg, only_host=only_host, layout_hash=self.layout.hash)

    def host_of(self, role: str) -> Host:
        addr = topology.address(self.cfg, role)
        return next(h for h in self.hosts.values() if h.address == addr)


ROLE_KEYS = {"ps": "ps", "bundles": "bundle", "actors": "actor", "learners": "learner", "replay": "replay"}


def read_toml(path: str, what: str) -> dict:
    """A launcher spec as a dict; a missing file or bad TOML is a one-line ConfigError."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise C.ConfigError(f"{what} not found: {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise C.ConfigError(f"{path}: not valid TOML: {e}") from None


def load_spec(path: str) -> ClusterSpec:
    raw = read_toml(path, "cluster spec")
    hosts = {}
    for h in raw.get("host", []):
        try:
            host = Host(**h)
        except TypeError as e:
            raise C.ConfigError(f"{path}: bad [[host]] entry {h}: {e}") from None
        if host.name in hosts:
            raise C.ConfigError(f"{path}: host {host.name!r} listed twice")
        hosts[host.name] = host
    if not hosts:
        raise C.ConfigError(f"{path}: no [[host]] entries")
    roles = raw.get("roles", {})

    def where(kind, host_name):
        if host_name not in hosts:
            raise C.ConfigError(f"{path}: [roles] {kind} names unknown host {host_name!r} "
                                f"(hosts: {', '.join(hosts)})")
        return hosts[host_name].address
    placement = place_roles(roles, where, path)
    cfg = spec_config(raw, roles, placement, next(iter(hosts.values())).address, "runs/cluster")
    cfg.run.run_id = cfg.run_id          # fixed now: every host names shared memory the same way
    if not cfg.net.curve:
        print("WARNING: curve = false in the cluster spec: every socket of this cluster is UNAUTHENTICATED and "
              "UNENCRYPTED; anyone who can reach these hosts can read parameters, push gradients, read replay",
              file=sys.stderr)
    layout, theta0 = make_layout(cfg)      # once: status polls and `up` reuse it
    spec = ClusterSpec(hosts, cfg, path, layout, theta0)
    missing = [s.name for s in spec.program() if s.name not in placement and s.role != "relay"]   # relays follow
    if missing:
        raise C.ConfigError(f"{path}: no host for roles {missing}: list them under [roles]")
    return spec


def place_roles(roles: dict, where, path: str) -> dict[str, str]:
    """The [roles] table of a launcher spec -> {role name: where(kind, entry)} (shards, bundles, actors,
    learners, replay servers, the evaluator). Shared by the ssh and Slurm launchers."""
    unknown = set(roles) - set(ROLE_KEYS) - {"evaluator", "mode"}
    if unknown:
        raise C.ConfigError(f"{path}: unknown role kinds {sorted(unknown)} (ps, bundles, actors, learners, replay, "
                            "evaluator, mode)")
    placement: dict[str, str] = {}
    for i, h in enumerate(roles.get("ps", [])):
        placement[f"ps{i}"] = where("ps", h)
    for key, role in (("bundles", None), ("actors", "actor"), ("learners", "learner"), ("replay", "replay")):
        for i, h in enumerate(roles.get(key, [])):
            if key == "bundles":
                placement[f"actor{i}"] = placement[f"learner{i}"] = where(key, h)
            else:
                placement[f"{role}{i}"] = where(key, h)
    if "evaluator" in roles:
        placement["evaluator"] = where("evaluator", roles["evaluator"])
    return placement


def spec_config(raw: dict, roles: dict, placement: dict, host: str, default_run_dir: str) -> C.Config:
    """The run's config from a launcher spec: its preset, overrides, ports, keys and role counts."""
    mode = roles.get("mode", "bundled")
    base = {"run": {"run_dir": raw.get("run_dir", default_run_dir)},
            "net": {"base_port": raw.get("base_port", 15500), "placement": placement,
                    "curve": bool(raw.get("curve", True)), "keys_dir": raw.get("keys_dir", ""), "host": host},
            "ps": {"shards": max(1, len(roles.get("ps", [])))},
            "roles": {"mode": mode, "evaluator": "evaluator" in roles}}
    if mode == "bundled":
        base["roles"]["bundles"] = max(1, len(roles.get("bundles", [])))
    else:
        base["roles"].update(actors=max(1, len(roles.get("actors", []))), learners=max(1, len(roles.get("learners", []))),
                             replay_shards=max(1, len(roles.get("replay", []))))
    return C.load(None, list(raw.get("overrides", [])), base=C.apply_dict(_preset(raw.get("preset")), base))


def _preset(name):
    cfg = C.Config()
    if name:
        if name not in C.PRESETS:
            raise C.ConfigError(f"unknown preset {name!r} (available: {', '.join(sorted(C.PRESETS))})")
        C.apply_dict(cfg, C.PRESETS[name])
    return cfg


# -- commands -------------------------------------------------------------------------------------

def _run_dir(spec: ClusterSpec) -> str:
    return spec.cfg.run.run_dir


def _sup_pid(spec: ClusterSpec, host: Host) -> int | None:
    r = host.ssh(f"cat {shlex.quote(_run_dir(spec))}/logs/supervisor-{host.name}.pid 2>/dev/null "
                 f"&& kill -0 $(cat {shlex.quote(_run_dir(spec))}/logs/supervisor-{host.name}.pid) 2>/dev/null")
    out = r.stdout.decode().strip()
    return int(out) if r.returncode == 0 and out.isdigit() else None


def _check_host(spec: ClusterSpec, host: Host) -> None:
    """Reachable, Python there, and the ports of its roles free."""
    host.ssh("true")
    r = host.ssh(f"test -x {shlex.quote(host.python)} && {shlex.quote(host.python)} -c 'import gorila_zmq'", check=False)
    if r.returncode != 0:
        raise ClusterError(f"host {host.name}: no Python with gorila-zmq at {host.python} "
                           f"({r.stderr.decode(errors='replace').strip()[-200:] or 'not found'}); see `cluster bootstrap`")
    program = spec.program(host.address)
    ports = topology.tcp_ports(spec.cfg, program)
    if ports:
        # Which ports are taken now (an error), and the host's ephemeral range (a warning: see topology).
        probe = PORT_PROBE % (ports, host.address)
        r = host.ssh(f"{shlex.quote(host.python)} -c {shlex.quote(probe)}", check=False)
        if r.returncode != 0:
            raise ClusterError(f"host {host.name}: the port check failed: "
                               f"{r.stderr.decode(errors='replace').strip()[-300:]}")
        lines = r.stdout.decode().split("\n")
        busy, rng = lines[0].split(), (lines[1].split() if len(lines) > 1 else [])
        warning = (len(rng) == 2 and all(x.isdigit() for x in rng)
                   and topology.ephemeral_warning(spec.cfg, program, (int(rng[0]), int(rng[1]))))
        if warning:
            print(f"warning: host {host.name}: {warning}", file=sys.stderr)
        if busy:
            raise ClusterError(f"host {host.name}: port(s) {', '.join(busy)} on {host.address} already in use "
                               "(another run? change base_port)")


def _write_remote(host: Host, path: str, data: bytes) -> None:
    """Write a file on a host the way host/files.atomic_write does here: a temporary file, synced, then
    renamed over the old one; a cut connection leaves the previous file whole."""
    tmp = shlex.quote(f"{path}.tmp-launcher")
    host.ssh(f"cat > {tmp} && sync {tmp} && mv {tmp} {shlex.quote(path)} && sync {shlex.quote(os.path.dirname(path))}",
             input=data, timeout=120)


def up(spec: ClusterSpec, timeout: float = 180.0, launcher_key: str | None = None) -> dict:
    t0 = time.monotonic()
    run_dir = _run_dir(spec)
    body = json.dumps(C.to_dict(spec.cfg), indent=2, sort_keys=True).encode()
    layout = json.dumps(layout_record(spec.layout, spec.cfg.ps.shards)).encode()
    init = io.BytesIO()
    np.save(init, spec.theta0)
    started = []
    for host in spec.hosts.values():
        if _sup_pid(spec, host) is not None:
            print(f"{host.name}: supervisor already running")
            continue
        _check_host(spec, host)
        host.ssh(f"mkdir -p {shlex.quote(run_dir)}/logs")
        for name, data in (("config.json", body), (LAYOUT_FILE, layout), (INIT_FILE, init.getvalue())):
            _write_remote(host, os.path.join(run_dir, name), data)
        # `cd ... || exit` first, so that only the supervisor is backgrounded (with its output
        # redirected): a backgrounded list would keep the ssh channel open.
        cmd = (f"cd {shlex.quote(host.workdir)} || exit 1; GORILA_KEY_NAME={shlex.quote(host.name)} setsid "
               f"{shlex.quote(host.python)} -m gorila_zmq.cli dev --only-host {shlex.quote(host.address)} "
               f"run.run_dir={shlex.quote(run_dir)} > {shlex.quote(run_dir)}/logs/supervisor-{host.name}.log 2>&1 "
               f"< /dev/null & echo $! > {shlex.quote(run_dir)}/logs/supervisor-{host.name}.pid")
        host.ssh(cmd)
        started.append(host.name)
        print(f"{host.name}: supervisor started")
    answered = wait_up(spec, timeout, launcher_key)
    res = {"started": started, "seconds": time.monotonic() - t0, "roles": answered}
    end = time.monotonic() + timeout
    while time.monotonic() < end:          # the figure: from `up` to the first applied gradient
        if (_collect(spec, launcher_key, 0.5).get("ps0") or {}).get("version", 0) > 0:
            res["up_to_first_update_s"] = time.monotonic() - t0
            print(f"first gradient applied {res['up_to_first_update_s']:.1f}s after `up`")
            break
        time.sleep(0.5)
    return res


def bootstrap(spec: ClusterSpec, wheel_dir: str | None = None) -> str:
    """Build a wheel here and install it on every host over ssh (hosts without a shared filesystem).
    Dependencies come from each host's package index as usual; torch should be installed first."""
    import glob
    import tempfile
    out = wheel_dir or tempfile.mkdtemp(prefix="gz-wheel-")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", out,
                        root], capture_output=True, text=True)
    if r.returncode != 0:
        raise ClusterError(f"building the wheel failed: {r.stderr.strip()[-500:]}")
    wheel = sorted(glob.glob(os.path.join(out, "gorila_zmq-*.whl")))[-1]
    name = os.path.basename(wheel)
    for host in spec.hosts.values():
        with open(wheel, "rb") as f:
            host.ssh(f"cat > /tmp/{name}", input=f.read(), timeout=120)
        r = host.ssh(f"{shlex.quote(host.python)} -m pip install -q --no-deps --force-reinstall /tmp/{name}",
                     check=False, timeout=300)
        if r.returncode != 0:
            raise ClusterError(f"host {host.name}: installing {name} failed: "
                               f"{r.stderr.decode(errors='replace').strip()[-300:]}")
        print(f"{host.name}: installed {name}")
    return wheel


def _collect(spec: ClusterSpec, launcher_key: str | None, timeout_s: float = 1.0) -> dict:
    ctx = zmq.Context()
    try:
        curve = security.load(spec.cfg.net.keys_dir, launcher_key or "launcher") if spec.cfg.net.curve else None
        with security.use(curve):
            return collect(spec.cfg, spec.program(), ctx, timeout_s)
    finally:
        ctx.destroy(linger=0)


def wait_up(spec: ClusterSpec, timeout: float, launcher_key: str | None = None) -> dict:
    end = time.monotonic() + timeout
    while True:
        st = _collect(spec, launcher_key, 0.5)
        down = [k for k, v in st.items() if v is None]
        if not down:
            print(f"all {len(st)} roles answered")
            return st
        if time.monotonic() > end:
            msg = [f"{len(down)} role(s) did not answer within {timeout:.0f}s: {', '.join(down)}"]
            for name in down:
                host = spec.host_of(name)
                r = host.ssh(f"tail -n 15 {shlex.quote(_run_dir(spec))}/logs/{name}.log", check=False)
                msg.append(f"--- {name} on {host.name}:\n{r.stdout.decode(errors='replace')}")
            raise ClusterError("\n".join(msg))
        time.sleep(1.0)


# Run on a host (python -c): the ports of `ports` that cannot be bound there, then its ephemeral range.
# SO_REUSEADDR as libzmq sets it: a port held only by the last run's connections in TIME_WAIT (a quick
# `down` then `up`) binds; one that another socket listens on does not.
PORT_PROBE = ("import socket,sys\nbad=[]\nfor p in %r:\n s=socket.socket()\n"
              " s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n try: s.bind((%r,p))\n"
              " except OSError: bad.append(p)\n s.close()\nprint(' '.join(map(str,bad)))\n"
              "try: print(open('/proc/sys/net/ipv4/ip_local_port_range').read().strip())\n"
              "except OSError: pass")


def _run_pattern(spec: ClusterSpec) -> str:
    """pgrep's pattern for this run's processes: its supervisors (`run.run_dir=RUN_DIR`) and roles
    (`--config RUN_DIR/config.json`), and nothing else: not a launcher whose spec path merely starts
    with the run directory's path (`cluster down /runs/pong.toml` for run_dir /runs/pong)."""
    d = "".join("\\" + c if c in ".[]()*+?{}|^$\\" else c for c in _run_dir(spec))     # POSIX ERE
    return f"[g]orila_zmq[.]cli .*(run[.]run_dir={d}|{d}/config[.]json)( |$)"


def down(spec: ClusterSpec, timeout: float = 30.0) -> None:
    run_dir = shlex.quote(_run_dir(spec))
    for host in spec.hosts.values():
        pid = _sup_pid(spec, host)
        if pid is not None:
            host.ssh(f"kill -TERM {pid}")
    end = time.monotonic() + timeout
    for host in spec.hosts.values():
        while _sup_pid(spec, host) is not None and time.monotonic() < end:
            time.sleep(0.5)
        pid = _sup_pid(spec, host)
        if pid is not None:
            host.ssh(f"kill -KILL -{pid} {pid}", check=False)
        # whatever still runs from this run (a supervisor killed hard): SIGKILL it, then clean up
        host.ssh(f"pkill -KILL -f {shlex.quote(_run_pattern(spec))}; "
                 f"rm -f /dev/shm/gz_{spec.cfg.run_id}_*; rm -f {run_dir}/logs/supervisor-{host.name}.pid", check=False)
        print(f"{host.name}: stopped")


def leftovers(spec: ClusterSpec) -> dict[str, list[str]]:
    """Processes and shared-memory segments of this run still on each host (should be none)."""
    out = {}
    for host in spec.hosts.values():
        r = host.ssh(f"pgrep -af {shlex.quote(_run_pattern(spec))} | grep -v pgrep; "
                     f"ls /dev/shm | grep gz_{spec.cfg.run_id}_", check=False)
        out[host.name] = [ln for ln in r.stdout.decode().splitlines() if ln.strip()]
    return out


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="gorila-zmq cluster", description=__doc__.splitlines()[0])
    p.add_argument("command", choices=["up", "down", "status", "logs", "restart", "check", "bootstrap"])
    p.add_argument("spec", help="cluster spec (TOML), e.g. cluster/example.toml")
    p.add_argument("role", nargs="?", help="logs/restart: the role (ps0, actor1, learner0, evaluator ...)")
    p.add_argument("--timeout", type=float, default=180.0)
    p.add_argument("--launcher-key", default="launcher", help="this machine's key name in keys_dir")
    p.add_argument("--lines", type=int, default=40)
    a = p.parse_args(argv)
    spec = load_spec(a.spec)
    if a.command == "up":
        res = up(spec, a.timeout, a.launcher_key)
        print(f"up in {res['seconds']:.1f}s")
    elif a.command == "down":
        down(spec)
        left = {h: v for h, v in leftovers(spec).items() if v}
        if left:
            print(f"left behind: {left}", file=sys.stderr)
            return 1
    elif a.command == "status":
        for name, st in _collect(spec, a.launcher_key).items():
            host = spec.host_of(name).name
            print(f"{name:<12} {host:<10} " + ("DOWN" if st is None else
                  "up  " + " ".join(f"{k}={st[k]}" for k in ("version", "env_frames", "updates", "evaluations",
                                                              "auth_failures") if k in st)))
    elif a.command == "bootstrap":
        bootstrap(spec)
    elif a.command == "check":
        for host in spec.hosts.values():
            _check_host(spec, host)
            print(f"{host.name}: ok")
    else:
        if not a.role:
            raise C.ConfigError(f"`cluster {a.command}` needs a role name")
        host = spec.host_of(a.role)
        log = f"{shlex.quote(_run_dir(spec))}/logs/{a.role}"
        if a.command == "logs":
            print(host.ssh(f"tail -n {a.lines} {log}.log", check=False).stdout.decode(errors="replace"))
        else:
            host.ssh(f"kill -KILL $(cat {log}.pid)")
            print(f"{a.role} on {host.name} killed; its supervisor restarts it")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
