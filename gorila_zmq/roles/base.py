"""What every role process shares: the role interface, its control socket (stats on request), scalar
logging (TensorBoard event files + a CSV of the same scalars), and the one entry point (`role_main`).

A role implements `Role`: `step()` does one unit of work, `stats()` reports counters, `finish()` runs
once when the loop ends (a shard's last checkpoint); `run()` loops, `close()` releases everything.
A background thread answers control requests, so `gorila-zmq status` gets an answer from any live
role, even one in the middle of a long step (a DrQ-v2 update on a CPU, an evaluation episode).
"""
from __future__ import annotations

import argparse
import csv
import logging
import os
import signal
import threading
import time

import zmq

from gorila_zmq import config as C
from gorila_zmq.fields import UserError
from gorila_zmq.host import logs
from gorila_zmq.net import protocol as P, security, topology

log = logging.getLogger("gorila_zmq.roles")


class ControlServer:
    """A ROUTER answering HELLO/STATS with JSON; anything else is counted and refused."""

    def __init__(self, ctx: zmq.Context, endpoint: topology.Endpoint, name: str):
        self.name = name
        self.sock = P.make_socket(ctx, zmq.ROUTER, maxmsgsize=1 << 16)
        self.sock.bind(endpoint.bind)
        self.rejections = P.Rejections(log, f"{name} control")
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def serve_in_background(self, stats_fn) -> None:
        """Answer requests from a daemon thread from now on (it owns the socket and closes it)."""
        def loop():
            try:
                while not self._stop.is_set():
                    if self.sock.poll(100):
                        self.poll(stats_fn)
            finally:
                self.sock.close(linger=0)
        self._thread = threading.Thread(target=loop, name=f"{self.name}-control", daemon=True)
        self._thread.start()

    def poll(self, stats_fn) -> None:
        """Answer every pending request without blocking."""
        while True:
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            ident, req = frames[0].bytes, None
            try:
                req, _ = P.parse(frames[1:])
                if req.command not in (P.Cmd.STATS, P.Cmd.HELLO):
                    raise P.ProtocolError(P.Status.BAD_COMMAND, f"{self.name} answers only STATS and HELLO")
                try:
                    body = dict(stats_fn(), role=self.name, pid=os.getpid())
                except Exception as e:  # noqa: BLE001 - a counter read mid-update must not end the thread
                    raise P.ProtocolError(P.Status.REJECTED, f"stats unavailable: {type(e).__name__}: {e}") from None
                out = P.message(P.Header(P.Cmd.REPLY, seq=req.seq, client=req.client), body)
            except Exception as e:  # noqa: BLE001 - nothing a peer sends may end the control thread
                out = P.message(*self.rejections.reject(req, e))
            try:
                self.sock.send_multipart([ident] + out, zmq.NOBLOCK)
            except zmq.ZMQError:
                pass

    def close(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(5)
        else:
            self.sock.close(linger=0)


class ScalarLog:
    """Scalars per role: TensorBoard events under run_dir/tb/<role>/ and run_dir/scalars/<role>.csv."""

    def __init__(self, run_dir: str, role: str):
        self.path = os.path.join(run_dir, "scalars", f"{role}.csv")
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self._csv = open(self.path, "a", newline="")
        self._w = csv.writer(self._csv)
        if self._csv.tell() == 0:
            self._w.writerow(["wall_time", "step", "name", "value"])
            self._csv.flush()
        try:
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(os.path.join(run_dir, "tb", role))
        except Exception as e:  # tensorboard missing: CSV still has everything
            log.warning("TensorBoard logging off for %s: %s", role, e)
            self._tb = None

    def log(self, step: int, scalars: dict) -> None:
        now = time.time()
        for k, v in scalars.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                self._w.writerow([f"{now:.3f}", step, k, v])
                if self._tb is not None:
                    self._tb.add_scalar(k, v, step, walltime=now)
        self._csv.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        """Idempotent (a role may be closed by its run loop and again by its owner)."""
        self._csv.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None


class Role:
    """One process of the program. Subclasses set `name` and implement step() and stats()."""

    name = "role"
    failed = False           # set when run() ends with an exception

    def __init__(self, cfg: C.Config, ctx: zmq.Context | None = None, control: topology.Endpoint | None = None,
                 scalars: bool = True):
        self.cfg = cfg
        self.ctx = ctx or zmq.Context.instance(io_threads=cfg.net.io_threads)
        self._stop = False
        self.control = ControlServer(self.ctx, control, self.name) if control is not None else None
        self.scalars = ScalarLog(cfg.run.run_dir, self.name) if scalars else None
        self._last_log = time.monotonic()

    def request_stop(self, *_) -> None:
        self._stop = True

    def step(self) -> None:
        raise NotImplementedError

    def stats(self) -> dict:
        return {}

    def log_step(self) -> int:
        """The x axis for this role's scalars."""
        return 0

    def run(self, duration: float | None = None) -> None:
        end = None if duration is None else time.monotonic() + duration
        if self.control is not None:
            self.control.serve_in_background(self.stats)
        try:
            while not self._stop and (end is None or time.monotonic() < end):
                self.step()
                if self.scalars is not None and time.monotonic() - self._last_log >= self.cfg.dev.stats_interval_s:
                    self._last_log = time.monotonic()
                    self.scalars.log(self.log_step(), self.stats())
            self.finish()
        except BaseException:
            self.failed = True       # close() may keep what a successor can use (a shard's segment)
            raise
        finally:
            self.close()

    def finish(self) -> None:
        """Once, when the loop ends without an error (before close)."""

    def close(self) -> None:
        """Release sockets, memory and files; safe to call more than once."""
        if self.control is not None:
            self.control.close()
            self.control = None
        if self.scalars is not None:
            self.scalars.close()


def torch_threads(cfg: C.Config, prog: str) -> int:
    """Intra-op threads for a role process: agent.learner_torch_threads for learners when set, else
    agent.torch_threads."""
    if prog == "learner" and cfg.agent.learner_torch_threads > 0:
        return cfg.agent.learner_torch_threads
    return cfg.agent.torch_threads


def role_main(argv: list[str], prog: str, description: str, make_role, index_required: bool = True,
              uses_torch: bool = True) -> int:
    """The `gorila-zmq ROLE` entry point of every role: config, logging, signals, run. A user's mistake
    (a bad config, a missing ROM) is one clear line in the role's log and exit code 2; an unexpected
    error is logged with its full traceback (the supervisor's restart message shows the log's tail)."""
    p = argparse.ArgumentParser(prog=f"gorila-zmq {prog}", description=description)
    p.add_argument("--index", type=int, default=0, required=index_required, help="which one of its kind")
    p.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
    p.add_argument("--config", help="TOML (or a run's config.json)")
    p.add_argument("overrides", nargs="*", help="section.field=value overrides")
    p.add_argument("--log-level", default=None, help="DEBUG, INFO (default, or GORILA_LOG), WARNING ...")
    a = p.parse_args(argv)
    name = prog if prog == "evaluator" else f"{prog}{a.index}"
    logs.setup(name, a.log_level)
    rlog = logging.getLogger(f"gorila_zmq.{prog}")

    def early_exit(*_):          # while the role is still being built (it may wait for the shards)
        raise SystemExit(0)
    signal.signal(signal.SIGTERM, early_exit)
    signal.signal(signal.SIGINT, early_exit)
    try:
        cfg = C.load(a.config, a.overrides)
        security.configure_role(cfg, name)
        os.makedirs(cfg.run.run_dir, exist_ok=True)
        topology.ensure_ipc_dir(cfg)
        if uses_torch:
            import torch
            torch.set_num_threads(torch_threads(cfg, prog))
        role = make_role(cfg, a.index)
        signal.signal(signal.SIGTERM, role.request_stop)
        signal.signal(signal.SIGINT, role.request_stop)
        role.run(a.duration)
    except UserError as e:
        rlog.error("%s: %s", name, e)
        return 2
    except Exception:
        rlog.exception("%s died of an unexpected error", name)
        return 1
    return 0
