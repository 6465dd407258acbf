"""Launch cost: `slurm submit` vs `cluster up` over ssh to the first applied gradient; memory per node.

Builds the namespace testbed (gorila_zmq/launch/testbed.py: a real slurmctld, one slurmd and one sshd
per node) and runs the same CartPole layout both ways, alternating, `--rounds` times each: ps0 on n1,
a bundle on each of n2 and n3, the evaluator on n2, CurveZMQ on. Each launch's clock starts when its
command starts and stops when ps0 first reports a version above 0 (both polled the same way, every
0.2 s). While each Slurm job runs, it reads every node's supervisor and its slurmstepd from /proc (RSS
and PSS from smaps_rollup), and the same for the ssh launch's supervisors. Needs root; the Debian
packages slurmctld slurmd slurm-client munge openssh-server.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from gorila_zmq.bench import Report

DESCRIPTION = __doc__.splitlines()[0]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ROLES = "ps = [{0}]\nbundles = [{1}, {2}]\nevaluator = {1}"


def add_arguments(p):
    p.add_argument("--rounds", type=int, default=3, help="launches of each kind (alternating)")
    p.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for a first gradient")


def _mem(pid: int) -> tuple[float, float]:
    """(RSS, PSS) of one process in MiB."""
    out = {}
    for line in open(f"/proc/{pid}/smaps_rollup"):
        k, _, v = line.partition(":")
        if k in ("Rss", "Pss"):
            out[k] = int(v.split()[0]) / 1024
    return out["Rss"], out["Pss"]


def _parent(pid: int) -> int:
    return int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])


def _comm(pid: int) -> str:
    return open(f"/proc/{pid}/comm").read().strip()


def _cli(env, *argv, timeout=300):
    return subprocess.run([sys.executable, "-m", "gorila_zmq.cli", *argv], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=timeout)


def _wait_first_gradient(version, t0: float, timeout: float, gave_up=lambda: None) -> float:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        why = gave_up()
        if why:
            raise RuntimeError(why)
        try:
            if (version() or 0) > 0:
                return time.monotonic() - t0
        except Exception:          # config.json not written yet, a role not answering yet
            pass
        time.sleep(0.2)
    raise RuntimeError(f"no gradient applied within {timeout:.0f}s")


def _common(run_dir: str, port: int) -> list[str]:
    return [f'run_dir = "{run_dir}"', f"base_port = {port}", 'preset = "cartpole"',
            'overrides = ["net.heartbeat_interval_s=0.5", "ps.checkpoint_interval_s=1.0"]',
            f'python = "{sys.executable}"', f'workdir = "{ROOT}"']


def _slurm_round(tb, d: str, k: int, timeout: float) -> dict:
    from gorila_zmq.launch.slurm import collect_roles
    run_dir = os.path.join(d, f"slurm{k}")
    spec = os.path.join(d, f"slurm{k}.toml")
    with open(spec, "w") as f:
        f.write("\n".join(_common(run_dir, 17900) + ["[slurm]", "nodes = 3", 'time = "00:20:00"',
                                                     "[roles]", ROLES.format(0, 1, 2)]) + "\n")
    t0 = time.monotonic()
    r = _cli(tb.env, "slurm", "submit", spec)
    if r.returncode != 0:
        raise RuntimeError(f"slurm submit failed: {r.stderr.strip()}")
    try:
        first = _wait_first_gradient(lambda: (collect_roles(run_dir, 0.5).get("ps0") or {}).get("version"), t0, timeout)
        mem = {}
        for name in tb.nodes:
            pid = json.load(open(os.path.join(run_dir, "slurm", f"node-{name}.json")))["pid"]
            step = _parent(pid)
            while _comm(step) != "slurmstepd":
                step = _parent(step)
            mem[name] = {"supervisor": _mem(pid), "slurmstepd": _mem(step)}
    finally:
        t1 = time.monotonic()
        c = _cli(tb.env, "slurm", "cancel", run_dir)
        cancel_s = time.monotonic() - t1
    if c.returncode != 0:
        raise RuntimeError(f"slurm cancel: {c.stdout.strip()} {c.stderr.strip()}")
    return {"first_s": first, "mem": mem, "stop_s": cancel_s}


def _ssh_round(tb, d: str, k: int, keys: str, timeout: float) -> dict:
    from gorila_zmq.launch.cluster import _collect, load_spec
    run_dir = os.path.join(d, f"ssh{k}")
    spec_path = os.path.join(d, f"ssh{k}.toml")
    lines = _common(run_dir, 18900) + [f'keys_dir = "{keys}"', "curve = true"]
    for name, addr in tb.nodes.items():
        lines += ["[[host]]", f'name = "{name}"', f'address = "{addr}"', 'user = "root"',
                  f'python = "{sys.executable}"', f'workdir = "{ROOT}"', f"ssh_options = {json.dumps(tb.ssh_options)}"]
    lines += ["[roles]", ROLES.format('"n1"', '"n2"', '"n3"')]
    with open(spec_path, "w") as f:
        f.write("\n".join(lines) + "\n")
    spec = load_spec(spec_path)
    t0 = time.monotonic()
    up = subprocess.Popen([sys.executable, "-m", "gorila_zmq.cli", "cluster", "up", spec_path], cwd=ROOT,
                          env=tb.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        def gave_up():
            if up.poll() not in (None, 0):
                return f"cluster up failed: {up.stdout.read().strip()[-600:]}"
        first = _wait_first_gradient(lambda: (_collect(spec, "launcher", 0.5).get("ps0") or {}).get("version"),
                                     t0, timeout, gave_up)
        out, _ = up.communicate(timeout=timeout)
        if up.returncode != 0:
            raise RuntimeError(f"cluster up failed: {out.strip()[-400:]}")
        mem = {}
        for name in tb.nodes:
            pid = int(open(os.path.join(run_dir, "logs", f"supervisor-{name}.pid")).read())
            mem[name] = {"supervisor": _mem(pid)}
    finally:
        if up.poll() is None:
            up.kill()
        t1 = time.monotonic()
        dn = _cli(tb.env, "cluster", "down", spec_path)
        stop_s = time.monotonic() - t1
    if dn.returncode != 0:
        raise RuntimeError(f"cluster down: {dn.stdout.strip()} {dn.stderr.strip()}")
    return {"first_s": first, "mem": mem, "stop_s": stop_s}


def run(args) -> Report:
    from gorila_zmq.launch import testbed
    from gorila_zmq.net import security
    rep = Report()
    why = testbed.why_not(ssh=True)
    if why:
        rep.notes.append(f"skipped: {why}")
        return rep
    slurm, ssh = [], []
    with tempfile.TemporaryDirectory(prefix="gz-bench-launch-") as d, testbed.Testbed(3, ssh=True) as tb:
        keys = os.path.join(d, "keys")
        security.gen_keys(keys, [*tb.nodes, "launcher"])
        for k in range(args.rounds):
            for kind, go in (("slurm", lambda: _slurm_round(tb, d, k, args.timeout)),
                             ("ssh", lambda: _ssh_round(tb, d, k, keys, args.timeout))):
                res = go()
                (slurm if kind == "slurm" else ssh).append(res)
                print(f"round {k + 1}/{args.rounds} {kind:<5}: first gradient {res['first_s']:.1f}s after the "
                      f"command started; stopped in {res['stop_s']:.1f}s", flush=True)
    med = statistics.median
    s_first, h_first = med(r["first_s"] for r in slurm), med(r["first_s"] for r in ssh)
    rep.row("slurm submit -> first gradient (median)", s_first, "s", f"of {[round(r['first_s'], 1) for r in slurm]}")
    rep.row("cluster up (ssh) -> first gradient (median)", h_first, "s", f"of {[round(r['first_s'], 1) for r in ssh]}")
    rep.row("slurm cancel (median)", med(r["stop_s"] for r in slurm), "s")
    rep.row("cluster down (median)", med(r["stop_s"] for r in ssh), "s")
    last_s, last_h = slurm[-1]["mem"], ssh[-1]["mem"]
    for name in sorted(last_s):
        sup, step = last_s[name]["supervisor"], last_s[name]["slurmstepd"]
        rep.row(f"{name}: supervisor under slurmd RSS / PSS", sup[0], "MiB", f"PSS {sup[1]:.1f} MiB")
        rep.row(f"{name}: its slurmstepd RSS / PSS", step[0], "MiB", f"PSS {step[1]:.1f} MiB")
        if last_h.get(name):
            h = last_h[name]["supervisor"]
            rep.row(f"{name}: supervisor over ssh RSS / PSS", h[0], "MiB", f"PSS {h[1]:.1f} MiB")
    rep.metrics = {"slurm_first_gradient_s": s_first, "ssh_first_gradient_s": h_first,
                   "slurm_over_ssh": s_first / h_first,
                   "supervisor_pss_mib": med(m["supervisor"][1] for m in last_s.values()),
                   "slurmstepd_pss_mib": med(m["slurmstepd"][1] for m in last_s.values())}
    rep.notes.append("one slurmd per namespace node and one slurmctld on this one machine: Slurm's own "
                     "scheduling latency (bf_interval=1) is in the Slurm figure; on a busy cluster the queue wait is extra")
    return rep
