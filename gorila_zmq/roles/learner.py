"""The learner role: samples minibatches from replay, has the agent compute its gradient (its
`Learning`: DQN's TD loss against theta^-, DrQ-v2's critic and actor losses), drops loss outliers
(Gorila 4.2), pushes the gradient to every shard, and lets the agent handle its target network.

- A loader thread samples into a ring of preallocated batches (pinned when CUDA is present) while the
  main thread computes the gradient; batches move to the device with non-blocking copies.
- theta is refreshed from the background subscriber before every update (never blocking); the
  gradient carries the per-shard versions of the theta it was computed against.
- Target networks are the agent's: its Learning gets `load_theta(module)`, a blocking snapshot of
  the current theta (DQN syncs theta^- every `dqn.target_sync_every` *global* updates, Gorila 4.1).
- The replay ratio is held from this side too (`allowed_updates`): the actors pause when they run
  ahead of the updates, a learner when it runs ahead of the transitions inserted.
"""
from __future__ import annotations

import logging
import queue
import threading
import time

import numpy as np
import torch

from gorila_zmq.agents import base as agents
from gorila_zmq.agents.common import OutlierFilter
from gorila_zmq.envs import env_spec
from gorila_zmq.fields import ConfigError
from gorila_zmq.net import topology
from gorila_zmq.ps.client import GradientPusher, ShardSet, fetch_params
from gorila_zmq.ps.shared import param_source
from gorila_zmq.ps.layout import ParamLayout
from gorila_zmq.replay.memory import NotReady, shared_views
from gorila_zmq.replay.priority import beta_at
from gorila_zmq.replay.sources import make_source
from gorila_zmq.roles.base import Role, role_main

log = logging.getLogger("gorila_zmq.learner")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"agent.device={name} but CUDA is not available on this host")
    return dev


def allowed_updates(cfg, inserted: int) -> float | None:
    """The learners' side of the replay-ratio limiter (None: off): how many minibatches one learner may
    have sampled since it started, given the transitions inserted since then into what it samples.
    Bundled: its own bundle's memory; global: all shards, shared by every learner. With k =
    agent.grads_per_push minibatches per global update, k x (its share / max_steps_per_update), plus
    agent.max_updates_ahead updates of slack (Reverb's error buffer) so that the two sides never wait
    for each other."""
    ratio, ahead = cfg.agent.max_steps_per_update, cfg.agent.max_updates_ahead
    if ratio <= 0 or ahead <= 0:
        return None
    share = 1 if cfg.roles.mode == "bundled" else cfg.roles.learners
    return cfg.agent.grads_per_push * (ahead + inserted / (ratio * share))


class FlatStaging:
    """Whole-vector moves between the host and a model on an accelerator, one copy each way.

    The gradient is gathered on the device into one vector (a single cat) and copied once, non-blocking,
    into a (pinned) host buffer that the pusher then owns; new parameters go host -> device in one copy
    from a (pinned) host vector and are scattered to the parameters by device-side copies. The per-tensor
    path (ParamLayout.flatten_grads / load_into) makes one synchronous pageable copy per tensor, which
    on a GPU costs more than the update itself. The learner uses this on CUDA; on the CPU the per-tensor
    copies are already plain memcpys (tests run this class on the CPU with pin=False)."""

    def __init__(self, layout: ParamLayout, module, device: torch.device, pin: bool):
        self.layout, self.device, self.pin = layout, device, pin
        self.params = list(module.parameters())
        if [tuple(p.shape) for p in self.params] != [e.shape for e in layout.entries]:
            raise ValueError("FlatStaging: the module's parameters do not match the layout")
        self.grad_dev = torch.empty(layout.size, dtype=torch.float32, device=device)
        self.param_dev = torch.empty(layout.size, dtype=torch.float32, device=device)
        self.param_views = layout.views(self.param_dev)
        self.param_host = self.host_vector()        # the subscriber writes theta here

    def host_vector(self) -> torch.Tensor:
        """A flat float32 host tensor (pinned when staging for a GPU); .numpy() shares its memory."""
        t = torch.empty(self.layout.size, dtype=torch.float32)
        return t.pin_memory() if self.pin else t

    def adopt_host(self, t: torch.Tensor) -> None:
        """Page-lock memory made elsewhere (a shared-memory gradient buffer) as host_vector() pins its
        own; where the driver refuses, the copies stay correct, only synchronous."""
        if not self.pin:
            return
        rc = torch.cuda.cudart().cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(), 0)
        if int(rc) != 0:
            log.warning("cudaHostRegister of a %d-byte shared-memory gradient buffer failed (%s): its "
                        "device-to-host copies will be synchronous", t.numel() * t.element_size(), rc)

    def release_host(self, addr: int) -> None:
        """Undo adopt_host() before the memory at `addr` goes."""
        if self.pin:
            torch.cuda.cudart().cudaHostUnregister(addr)

    def grads_to_host(self, out: torch.Tensor) -> None:
        """Enqueue the gradient's copy into `out` (zeros where a parameter has no grad); the caller
        synchronises (copies_done) before reading `out`."""
        parts = [p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), device=self.device)
                 for p in self.params]
        torch.cat(parts, out=self.grad_dev)
        out.copy_(self.grad_dev, non_blocking=self.pin)

    def load_params(self) -> None:
        """param_host -> the module: one host->device copy, then device-side copies into each tensor."""
        with torch.no_grad():
            self.param_dev.copy_(self.param_host, non_blocking=self.pin)
            torch._foreach_copy_(self.params, self.param_views)

    def copies_done(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()


class Loader(threading.Thread):
    """Fills a ring of preallocated batches in the background; `get()` hands out the next full one."""

    def __init__(self, source, batch_size: int, depth: int = 3, seed: int = 0):
        super().__init__(name="batch-loader", daemon=True)
        self.source, self.B = source, batch_size
        self.rng = np.random.default_rng(seed)
        self.free: queue.Queue = queue.Queue()
        self.full: queue.Queue = queue.Queue()
        self.depth = depth
        self.stop = threading.Event()
        self.sample_s = 0.0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                try:
                    buf = self.free.get(timeout=0.05)
                except queue.Empty:       # every batch is full and waiting: keep the source's counts
                    self.source.refresh()     # current (the replay-ratio limiter reads `inserted`)
                    continue
                self.source.refresh()
                t0 = time.perf_counter()
                try:
                    out = self.source.sample(self.B, self.rng, buf)
                except NotReady:               # nothing valid yet (right after a re-attach, shards filling)
                    self.free.put(buf)
                    time.sleep(0.05)
                    continue
                self.sample_s += time.perf_counter() - t0
                self.full.put(out)
        except BaseException as e:  # surfaced by get(); a learner must not train on nothing silently
            log.exception("batch loader failed")
            self.error = e

    def get(self, timeout: float = 5.0):
        if self.error is not None:
            raise RuntimeError(f"batch loader failed: {self.error!r}") from self.error
        return self.full.get(timeout=timeout)

    def release(self, buf) -> None:
        self.free.put(buf)


def batch_to_device(t, device: torch.device, non_blocking: bool, weights: bool) -> agents.Batch:
    """A sampled batch's tensors (Batch.as_tensors()) on the learner's device. A shared-frames batch
    (agent.batch_layout) travels as its one `frames` tensor; obs and next_obs are views of it there."""
    moved = {k: torch.as_tensor(getattr(t, k)).to(device, non_blocking=non_blocking)
             for k in ("action", "reward", "discount")}
    if getattr(t, "frames", None) is not None:
        moved["obs"], moved["next_obs"] = shared_views(t.frames.to(device, non_blocking=non_blocking))
    else:
        for k in ("obs", "next_obs"):
            moved[k] = torch.as_tensor(getattr(t, k)).to(device, non_blocking=non_blocking)
    return agents.Batch(**moved, weight=torch.as_tensor(t.weight).to(device, non_blocking=non_blocking)
                        if weights else None)


class Learner(Role):
    def __init__(self, cfg, index: int, ctx=None, source=None):
        self.name = f"learner{index}"
        super().__init__(cfg, ctx, topology.control(cfg, "learner", index))
        self.index = index
        agent = agents.prepare(cfg)
        self.device = pick_device(cfg.agent.device)
        self.online = agent.make_network(cfg).to(self.device)
        self.layout = ParamLayout.from_module(self.online)
        self.shards = ShardSet(cfg, self.layout)
        self.sub = param_source(self.ctx, self.shards, cfg, self.name)
        self.pusher = GradientPusher(self.ctx, self.shards)
        self.source = source if source is not None else make_source(self.ctx, cfg, index, agent.record(env_spec(cfg)))
        self.loader = None
        self.filter = OutlierFilter(cfg.agent.outlier_k, cfg.agent.outlier_warmup)
        # On CUDA: whole-vector pinned transfers (FlatStaging); on the CPU: per-tensor copies.
        self.staging = FlatStaging(self.layout, self.online, self.device, pin=True) \
            if self.device.type == "cuda" else None
        self._flat = self.staging.param_host.numpy() if self.staging else np.empty(self.layout.size, np.float32)
        self._grad_bufs: list[tuple[int, np.ndarray, torch.Tensor]] = []
        self._group: list | None = None                # agent.grads_per_push: the group being summed
        self._params = list(self.online.parameters())
        self._seen = -1
        self.versions = [0] * self.shards.n
        self.updates = 0
        self.dropped = 0
        self.last = {}
        self.compute_s = 0.0
        self.wait_s = 0.0
        self.throttled_s = 0.0                         # paused by the replay-ratio limiter
        self._inserted_at_start: int | None = None
        self.started = time.monotonic()
        waited = 0
        while not self.sub.wait_ready(30):            # never compute gradients against unknown theta
            waited += 30
            log.warning("%s: still no parameters from every shard after %d s (alive: %s)", self.name,
                        waited, self.sub.alive)
        self._refresh()
        self.learning = agent.learning(cfg, self.online, self._load_theta, max(self.sub.global_version, 0))

    def _load_theta(self, module) -> None:
        """The agent's target handling: the exact current theta (a blocking snapshot) into `module`."""
        theta, _ = fetch_params(self.ctx, self.shards)
        self.layout.load_into(module, theta)

    # -- one update -----------------------------------------------------------------------------
    def step(self) -> None:
        need = max(self.cfg.agent.learning_starts, self.cfg.agent.batch_size)
        if self.loader is None:
            if not self.source.ready(need):
                time.sleep(0.05)
                self.pusher.poll(0)
                return
            self._start_loader()
        if self._ahead():
            self.throttled_s += 0.005
            time.sleep(0.005)
            self.pusher.poll(0)
            return
        t0 = time.perf_counter()
        # The window first, then theta: no gradient waits to be sent. A shard that does not answer
        # (gone, or restarting) keeps the window full until its pushes are resent or given up; the
        # learner goes back to its loop meanwhile, so a stop is not held up by a missing shard.
        if not self.pusher.wait_room(timeout_s=0.25):
            self.wait_s += time.perf_counter() - t0
            return
        try:
            batch = self.loader.get(timeout=1.0)
        except queue.Empty:
            self.wait_s += time.perf_counter() - t0
            return
        t1 = time.perf_counter()
        self.wait_s += t1 - t0
        self._refresh()
        versions = list(self.versions)
        t = batch.as_tensors()
        nb = self.device.type == "cuda"
        a = self.cfg.agent
        on_device = batch_to_device(t, self.device, nb, a.prioritized)
        copied = None
        if nb:                  # the pinned buffer goes back to the loader only once the copies landed
            copied = torch.cuda.Event()
            copied.record()
        grad, host = self._free_grad_buffer()
        views = self._bind_grads(host) if self.staging is None else None
        global_updates = max(self.sub.global_version, 0)
        self.last, ok = self.learning.gradients(on_device, global_updates, self.filter.accept)
        td_abs = self.last.pop("priorities", None)
        if copied is not None:
            copied.synchronize()
        if td_abs is not None and ok:         # prioritized replay: the new |TD errors| of these rows
            self.source.write_back(batch, td_abs.float().cpu().numpy())
        # the importance-sampling exponent of the next batches, on the global update count
        self.source.beta = beta_at(a.priority_beta, a.priority_beta_updates, global_updates)
        self.loader.release(batch)        # only now: on the CPU the tensors above are views of it
        if views is not None:
            self._unbind_grads(views)
        if not ok:
            self._grad_bufs.append((-1, grad, host))        # unused: back to the pool
            self.dropped += 1
            self.compute_s += time.perf_counter() - t1
            return
        if self.staging is not None:
            self.staging.grads_to_host(host)
            self.staging.copies_done()
        self.updates += 1
        pushed = self._accumulate(grad, host, versions)
        if pushed is not None:
            grad, host, versions = pushed
            seq = self.pusher.push(grad, versions)         # the pusher owns `grad` until reusable(seq)
            self._grad_bufs.append((seq, grad, host))
        self.pusher.poll(0)
        while self.pusher.resnapshot:          # a shard is behind the theta we hold: read it again
            self.sub.resnapshot(self.pusher.resnapshot.pop())
        self.compute_s += time.perf_counter() - t1
        self.learning.after_update(max(self.pusher.versions[0], self.sub.global_version))
        if self.cfg.agent.learner_max_updates and self.updates >= self.cfg.agent.learner_max_updates:
            self.request_stop()

    def paced_updates(self) -> int:
        """The minibatches the replay-ratio limiter counts: those that became, or may still become, global
        updates. The actors pace themselves by the global update count (shard 0's version), so a
        minibatch that never reaches it (an outlier the filter dropped, a push shard 0 discarded as stale,
        refused or lost) must not count here either: each would eat the max_updates_ahead slack for good,
        and once it is gone both sides wait for each other (a Pong run crawled at 4 updates/s after 107
        drops against a slack of 100)."""
        s0 = self.pusher.stats.by_shard[0]
        return self.updates - self.cfg.agent.grads_per_push * (s0["stale"] + s0["rejected"] + s0["lost"])

    def _ahead(self) -> bool:
        """Over the learner's side of the replay ratio: more minibatches counted (paced_updates) since the
        start than the transitions inserted since then allow (the loader thread keeps `source.inserted`
        current)."""
        inserted = getattr(self.source, "inserted", None)
        if inserted is None:                         # a source that does not count: not held
            return False
        if self._inserted_at_start is None:
            self._inserted_at_start = inserted       # what was there when learning began is paid for
        allowed = allowed_updates(self.cfg, inserted - self._inserted_at_start)
        return allowed is not None and self.paced_updates() >= allowed

    def _accumulate(self, grad: np.ndarray, host, versions: list[int]):
        """agent.grads_per_push = k: the mean of k minibatch gradients goes out as one push, computed
        against the versions of the first of them (the oldest theta, so staleness is not understated).
        Returns (grad, host, versions) to push now, or None while the group is filling."""
        k = self.cfg.agent.grads_per_push
        if k == 1:
            return grad, host, versions
        if self._group is None:
            self._group = [grad, host, versions, 1]    # this buffer sums the group
        else:
            np.add(self._group[0], grad, out=self._group[0])
            self._group[3] += 1
            self._grad_bufs.append((-1, grad, host))   # summed: back to the pool
        if self._group[3] < k:
            return None
        total, host, versions, _ = self._group
        self._group = None
        total *= np.float32(1.0 / k)
        return total, host, versions

    def _start_loader(self) -> None:
        a = self.cfg.agent
        self.source.beta = beta_at(a.priority_beta, a.priority_beta_updates, max(self.sub.global_version, 0))
        self.loader = Loader(self.source, self.cfg.agent.batch_size,
                             seed=hash((self.cfg.run.seed, 2, self.index)) % 2**32)
        for _ in range(self.loader.depth):
            self.loader.free.put(self.source.allocate(self.cfg.agent.batch_size))
        self.loader.start()

    def _refresh(self) -> None:
        if self.sub.updates != self._seen:
            _, self.versions, self._seen = self.sub.latest(self._flat)
            if self.staging is not None:        # its H2D copy has landed before the next refresh: every
                self.staging.load_params()      # step synchronises on the batch copies enqueued after it
            else:
                self.layout.load_into(self.online, self._flat)

    # -- gradient buffers -----------------------------------------------------------------------
    def _free_grad_buffer(self) -> tuple[np.ndarray, torch.Tensor]:
        """A gradient buffer no push still needs (every shard answered it), else a new one: no 6.7 MB
        allocation and page faults per update once the window's worth of buffers exists. A buffer
        whose push was given up is dropped, never reused (GradientPusher.reusable says why), so while
        a shard is down each update allocates a fresh one (pinned, with CUDA staging). Returns
        the numpy array the pusher sends and a tensor on the same memory (pinned with CUDA staging)."""
        k = 0
        while k < len(self._grad_bufs):
            seq, buf, host = self._grad_bufs[k]
            ok = self.pusher.reusable(seq)
            if ok is None:
                k += 1
                continue
            del self._grad_bufs[k]
            if ok:
                return buf, host
            if self.pusher.segments is not None:
                if self.staging is not None:
                    self.staging.release_host(buf.ctypes.data)
                self.pusher.segments.drop(buf)       # its name goes; a shard still reading keeps its mapping
        if self.pusher.segments is not None:          # a shard on this host reads it in place (ps/local.py)
            buf = self.pusher.segments.new()
            host = torch.from_numpy(buf)
            if self.staging is not None:
                self.staging.adopt_host(host)
            return buf, host
        host = self.staging.host_vector() if self.staging is not None \
            else torch.empty(self.layout.size, dtype=torch.float32)
        return host.numpy(), host

    def _bind_grads(self, host: torch.Tensor) -> list[torch.Tensor]:
        """CPU: point every parameter's .grad at its slice of the next push buffer, so backward
        accumulates straight into the vector the pusher sends (zero_grad(set_to_none=False) zeroes it
        in place): no per-update allocation of fresh gradient tensors and no flattening copy."""
        views = self.layout.views(host)
        for p, v in zip(self._params, views):
            p.grad = v
        return views

    def _unbind_grads(self, views: list[torch.Tensor]) -> None:
        """The gradient is in the buffer (a .grad that autograd replaced, e.g. DrQ-v2's actor grads set
        from autograd.grad, is copied in; a missing one is zero), and no parameter refers to it any more."""
        for p, v in zip(self._params, views):
            g = p.grad
            if g is not v:
                if g is None:
                    v.zero_()
                else:
                    v.copy_(g)
            p.grad = None

    # -- reporting ------------------------------------------------------------------------------
    def log_step(self) -> int:
        return max(self.sub.global_version, 0)

    def stats(self) -> dict:
        up = time.monotonic() - self.started
        return {"loss": None, "q_mean": None, **self.last, "updates": self.updates, "updates_per_s": self.updates / up if up > 0 else 0.0,
                "outliers_dropped": self.dropped, "global_updates": self.sub.global_version,
                "push": self.pusher.stats.as_dict(), "device": str(self.device), "compute_s": self.compute_s,
                "wait_for_batch_s": self.wait_s, "sample_s": self.loader.sample_s if self.loader else 0.0,
                "throttled_s": self.throttled_s,
                **self.learning.stats(), **self.filter.state(),
                **(self.source.priority_stats() if self.cfg.agent.prioritized else {})}

    def close(self) -> None:
        if self.loader is not None:
            self.loader.stop.set()
            self.loader.join(2)
        self.pusher.flush(2.0)          # the last replies: milliseconds from a live shard; a gone one is not waited for
        self.pusher.close()
        self.sub.close()
        self.source.close()
        super().close()


def main(argv: list[str]) -> int:
    return role_main(argv, "learner", "Run one learner.", lambda cfg, i: Learner(cfg, i))
