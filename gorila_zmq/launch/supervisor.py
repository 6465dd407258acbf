"""The supervisor: runs a program (launch/program.py) on one host (dev mode; the cluster launcher runs
one per host), and `gorila-zmq dev`.

The supervisor starts the roles in dependency order (shards, replay, learners and actors, the
evaluator), restarts any that exits or is killed (backoff 1 s doubling to 30 s, reset after a
minute of good running), prints a progress line, and on Ctrl-C/SIGTERM stops everything: SIGTERM,
then SIGKILL after a timeout, and removes the run's shared-memory segments.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

import zmq

from gorila_zmq import config as C
from gorila_zmq.fields import UserError
from gorila_zmq.host import logs, shm
from gorila_zmq.launch.program import RoleSpec, check_shared_memory, make_program, owned_segments, prepare_run
from gorila_zmq.launch.status import collect
from gorila_zmq.net import security, topology

log = logging.getLogger("gorila_zmq.supervisor")


class StartError(UserError, RuntimeError):
    """A role exited while starting, or did not answer in time (the message holds its log's tail)."""


class GaveUp(UserError, RuntimeError):
    """A role that cannot run: it exited with a user error (code 2), or failed soon after every start."""


FAST_FAILURE_S = 30.0      # an error exit this soon after starting counts as a fast failure ...
FAST_FAILURES = 5          # ... and this many in a row stop the run


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the supervisor dies, even by SIGKILL (Linux)."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


@dataclass
class _Proc:
    spec: RoleSpec
    popen: subprocess.Popen | None = None
    started: float = 0.0
    restarts: int = 0
    backoff: float = 1.0
    next_start: float = 0.0
    exits: list = field(default_factory=list)
    fast_failures: int = 0          # exits with an error soon after starting, in a row


class Supervisor:
    def __init__(self, cfg: C.Config, program: list[RoleSpec], env: dict | None = None, quiet: bool = False):
        self.cfg, self.program = cfg, program
        self.procs = {s.name: _Proc(s) for s in program}
        self.env = dict(os.environ, **(env or {}))
        self.quiet = quiet
        self.log_dir = os.path.join(cfg.run.run_dir, "logs")
        os.makedirs(self.log_dir, exist_ok=True)
        self._stop = False
        self.ctx = zmq.Context()
        self._last_progress = 0.0
        self._prev = None

    # -- processes ------------------------------------------------------------------------------
    def _start(self, p: _Proc) -> None:
        out = open(os.path.join(self.log_dir, f"{p.spec.name}.log"), "ab")
        out.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} starting {p.spec.name} ====\n".encode())
        out.flush()
        p.popen = subprocess.Popen([sys.executable, "-m", "gorila_zmq.cli", *p.spec.argv], stdout=out,
                                   stderr=subprocess.STDOUT, env=self.env, start_new_session=True,
                                   preexec_fn=_die_with_parent)
        out.close()
        p.started = time.monotonic()
        with open(os.path.join(self.log_dir, f"{p.spec.name}.pid"), "w") as f:
            f.write(str(p.popen.pid))

    def _wait_stage_ready(self, stage: int, timeout: float = 120.0) -> None:
        """Wait until every role of a stage answers (shards and replay servers serve the others)."""
        specs = [p.spec for p in self.procs.values() if p.spec.stage == stage]
        end = time.monotonic() + timeout
        while time.monotonic() < end and not self._stop:
            got = collect(self.cfg, specs, self.ctx, 0.5)
            if all(v is not None for v in got.values()):
                return
            for p in self.procs.values():
                if p.spec.stage == stage and p.popen and p.popen.poll() is not None:
                    raise StartError(f"{p.spec.name} exited with {p.popen.returncode} while starting; "
                                       f"see {self.log_dir}/{p.spec.name}.log:\n{self.tail(p.spec.name)}")
            time.sleep(0.2)
        if not self._stop:
            raise StartError(f"stage {stage} roles did not answer within {timeout:.0f}s")

    def last_error(self, name: str) -> str:
        """The role's last ERROR line (its own one-line reason), else the last line of its log."""
        lines = [ln for ln in self.tail(name, 40).splitlines() if ln.strip()]
        errors = [ln for ln in lines if " ERROR " in ln]
        return (errors or lines or ["(its log is empty)"])[-1].strip()

    def tail(self, name: str, lines: int = 15) -> str:
        try:
            with open(os.path.join(self.log_dir, f"{name}.log"), "rb") as f:
                return b"".join(f.readlines()[-lines:]).decode(errors="replace")
        except OSError:
            return ""

    def start_all(self) -> None:
        for stage in sorted({s.stage for s in self.program}):
            if self._stop:
                return
            for p in self.procs.values():
                if p.spec.stage == stage:
                    self._start(p)
            if stage in (0, 1) and any(p.spec.role in ("ps", "replay") for p in self.procs.values()
                                       if p.spec.stage == stage):
                self._wait_stage_ready(stage)

    def check(self) -> None:
        """Restart roles that exited (with backoff)."""
        now = time.monotonic()
        for p in self.procs.values():
            if p.popen is None:
                if now >= p.next_start:
                    self._start(p)
                continue
            rc = p.popen.poll()
            if rc is None:
                if now - p.started > 60:
                    p.backoff = self.cfg.dev.restart_backoff_s
                continue
            why = f"killed by signal {-rc}" if rc < 0 else f"exited with code {rc}"
            p.exits.append(rc)
            p.fast_failures = p.fast_failures + 1 if rc > 0 and now - p.started < FAST_FAILURE_S else 0
            if rc == 2 or p.fast_failures >= FAST_FAILURES:
                raise GaveUp(f"{p.spec.name} cannot run: it {why} "
                             + ("(a configuration or input it cannot fix by restarting)" if rc == 2 else
                                f"{p.fast_failures} times in a row, each within {FAST_FAILURE_S:.0f}s of starting")
                             + f"; stopping the run. {self.last_error(p.spec.name)} (log: {self.log_dir}/{p.spec.name}.log)")
            p.restarts += 1
            p.popen = None
            p.next_start = now + p.backoff
            log.warning("%s %s; restarting in %.0fs (restart %d). Last log lines:\n%s", p.spec.name, why,
                        p.backoff, p.restarts, self.tail(p.spec.name, 8))
            p.backoff = min(p.backoff * 2, self.cfg.dev.restart_backoff_max_s)

    def stop_all(self, timeout: float = 15.0) -> None:
        """SIGTERM in reverse start order, then SIGKILL whatever is left; release shared memory."""
        for stage in sorted({s.stage for s in self.program}, reverse=True):
            live = [p for p in self.procs.values() if p.spec.stage == stage and p.popen and p.popen.poll() is None]
            for p in live:
                p.popen.send_signal(signal.SIGTERM)
            end = time.monotonic() + timeout
            for p in live:
                try:
                    p.popen.wait(max(0.1, end - time.monotonic()))
                except subprocess.TimeoutExpired:
                    log.warning("%s did not stop after SIGTERM; killing it", p.spec.name)
                    os.killpg(p.popen.pid, signal.SIGKILL)
                    p.popen.wait(5)
        for spec in self.program:
            for name in owned_segments(self.cfg, spec):
                if shm.remove(name):
                    log.info("removed leftover shared memory %s", name)
        self.ctx.destroy(linger=0)

    def request_stop(self, *_) -> None:
        self._stop = True

    # -- progress -------------------------------------------------------------------------------
    def progress(self) -> str:
        st = collect(self.cfg, self.program, self.ctx, 0.3)
        now = time.monotonic()
        frames = sum(v.get("env_frames", 0) for k, v in st.items() if v and k.startswith("actor"))
        updates = (st.get("ps0") or {}).get("version")
        returns = [v["recent_return"] for k, v in st.items()
                   if v and k.startswith("actor") and v.get("recent_return") is not None]
        eps = next((v.get("epsilon") for k, v in st.items() if v and k.startswith("actor")), None)
        std = next((v.get("exploration_std") for k, v in st.items() if v and k.startswith("actor")), None)
        ev = (st.get("evaluator") or {}).get("last") or {}
        fps = ups = 0.0
        if self._prev is not None:
            t0, f0, u0 = self._prev
            dt = max(now - t0, 1e-6)
            fps = (frames - f0) / dt
            ups = (updates - u0) / dt if updates is not None and u0 is not None else 0.0
        self._prev = (now, frames, updates)   # a shard that missed a status call (busy writing a
        # checkpoint) shows '-' and then one 0.0/s, never a rate from a missing count
        down = [k for k, v in st.items() if v is None]
        line = (f"frames {frames:,} ({fps:,.0f}/s)  updates {updates if updates is not None else '-'} "
                f"({ups:,.1f}/s)  eps {eps:.3f}" if eps is not None else
                f"frames {frames:,} ({fps:,.0f}/s)  updates {updates if updates is not None else '-'} ({ups:,.1f}/s)")
        if std is not None:
            line += f"  std {std:.3f}"
        if returns:
            line += f"  return {sum(returns) / len(returns):.1f}"
        if ev:
            line += f"  eval {ev.get('return_mean', float('nan')):.1f}"
        if down:
            line += f"  down: {','.join(down)}"
        return line

    def run(self, duration: float | None = None) -> None:
        end = None if duration is None else time.monotonic() + duration
        try:
            self.start_all()
            while not self._stop and (end is None or time.monotonic() < end):
                self.check()
                if time.monotonic() - self._last_progress >= self.cfg.dev.progress_interval_s:
                    self._last_progress = time.monotonic()
                    line = self.progress()
                    if not self.quiet:
                        print(f"[{time.strftime('%H:%M:%S')}] {line}", flush=True)
                time.sleep(0.2)
        finally:
            self.stop_all()


def _check_device(cfg: C.Config, program: list[RoleSpec]) -> None:
    """agent.device=cuda on a host without CUDA: one line now, not a learner restarted in a loop."""
    if cfg.agent.device.startswith("cuda") and any(s.role == "learner" for s in program):
        # in a child: the supervisor itself stays without torch (about 185 MB less on every host)
        probe = subprocess.run([sys.executable, "-c", "import sys, torch; sys.exit(not torch.cuda.is_available())"],
                               capture_output=True)
        if probe.returncode != 0:
            raise C.ConfigError(f"agent.device={cfg.agent.device} but CUDA is not available on this host "
                                "(use agent.device=auto or cpu)")


def _say_stale_segments(cfg: C.Config) -> None:
    """Segments nobody maps: this run's (its shards re-adopt theirs; the rest are replaced) and other
    runs' (abandoned: `gorila-zmq clean --stale` removes them)."""
    from gorila_zmq.launch import clean
    gone, _ = clean.stale(shm.segments("gz_"))
    if not gone:
        return
    mine = {k: v for k, v in gone.items() if k.startswith(f"gz_{cfg.run_id}_")}
    if mine:
        print(f"found {clean.describe(mine)} of shared memory this run left behind when it was killed: its shards "
              "re-adopt theirs (nothing applied is lost), the rest is replaced", flush=True)
    others = {k: v for k, v in gone.items() if k not in mine}
    if others:
        log.warning("%s of shared memory belongs to runs that are not live (killed all at once); "
                    "`gorila-zmq clean RUN_DIR` or `gorila-zmq clean --stale` removes it", clean.describe(others))


def dev_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="gorila-zmq dev", description="Run every role on this host, supervised.")
    p.add_argument("--preset", choices=sorted(C.PRESETS), help="start from a preset (dev: Pong on a small box)")
    p.add_argument("--config", help="TOML configuration file")
    p.add_argument("--agent", choices=["dqn", "drqv2"],
                   help="shorthand for agent.name=...; drqv2 without --preset starts from the drqv2 preset")
    p.add_argument("--env", help="shorthand for env.name=...")
    p.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
    p.add_argument("--only-host", metavar="ADDRESS",
                   help="run only the roles net.placement puts on this address (one supervisor per host)")
    p.add_argument("overrides", nargs="*", help="section.field=value overrides")
    p.add_argument("--log-level", default=None, help="DEBUG, INFO (default, or GORILA_LOG), WARNING ...")
    a = p.parse_args(argv)
    logs.setup("supervisor", a.log_level)
    overrides = ([f"agent.name={a.agent}"] if a.agent else []) + list(a.overrides) + \
        ([f"env.name={a.env}"] if a.env else [])
    preset = a.preset or ("drqv2" if a.agent == "drqv2" and not a.config else None)
    cfg = C.load(a.config, overrides, preset=preset)
    resumed = os.path.join(cfg.run.run_dir, "config.json")
    if os.path.exists(resumed) and a.config:
        raise C.ConfigError(f"{cfg.run.run_dir} already holds a run: drop --config to resume it (overrides "
                            "still apply), or choose a new run.run_dir")
    if os.path.exists(resumed) and not a.config:
        # A run resumes from its directory: its config, then this command's overrides. (With --only-host
        # the launcher has just written config.json: the shards say whether they resume.)
        cfg = C.load(resumed, overrides)
        if not a.only_host:
            print(f"resuming the run in {cfg.run.run_dir} (its config.json, shard checkpoints, counters)")
    if a.only_host and os.path.exists(resumed):
        # One of several per-host supervisors: the roles read the run's config.json as written (by
        # the first supervisor or the cluster launcher); run.run_dir only locates it.
        path = resumed
        topology.ensure_ipc_dir(cfg)
    else:
        path = prepare_run(cfg)
    security.configure_role(cfg, "supervisor")
    program = make_program(cfg, path, a.only_host)
    if not program:
        raise C.ConfigError(f"no role is placed on {a.only_host} (net.placement: {cfg.net.placement})")
    _check_device(cfg, program)
    _say_stale_segments(cfg)
    check_shared_memory(cfg, program)
    warning = topology.ephemeral_warning(cfg, program)
    if warning:
        log.warning("net.base_port: %s", warning)
    print(f"gorila-zmq dev: {cfg.agent.name} on {cfg.env.name}, {cfg.roles.mode} mode, {cfg.ps.shards} shard(s), "
          + (f"{cfg.roles.bundles} bundle(s)" if cfg.roles.mode == "bundled" else
             f"{cfg.roles.actors} actor(s), {cfg.roles.replay_shards} replay shard(s), {cfg.roles.learners} learner(s)")
          + f"; run dir {cfg.run.run_dir} (logs/, tb/, scalars/, ckpt/); Ctrl-C stops", flush=True)
    sup = Supervisor(cfg, program)
    signal.signal(signal.SIGTERM, sup.request_stop)
    signal.signal(signal.SIGINT, sup.request_stop)
    sup.run(a.duration)
    return 0
