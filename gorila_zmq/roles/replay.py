"""The global replay role (Gorila's "global replay database"): a ROUTER in front of a ReplayMemory that
many actors write to and many learners sample from.

REPLAY_ADD carries a batch of packed transition records (replay/records.py) from one actor (a step
may carry the actor's initial priority for its transition: Ape-X);
REPLAY_SAMPLE (JSON {"batch": B, "min_size": N}) returns one packed batch, or BUSY while the memory
holds fewer than N; STATS returns JSON. With agent.prioritized the shard samples by priority
(replay/priority.py): REPLAY_SAMPLE carries "beta" and the batch also the importance weights and
each row's slot and logical position; REPLAY_PRIORITY (RAW records.PRIORITY records) sets the new
priorities of sampled rows (all or nothing: a bad index, size or value is a counted rejection; rows
whose slot has been overwritten since are ignored and counted as stale). Memory is bounded by the ring; a full inbound queue (ROUTER
high-water mark) and each client's bounded window are the backpressure. Nothing is unpickled: records
are validated whole before anything touches the memory. Actor j writes to shard j % R, in lanes
(j // R) * E .. + E - 1 (E = env.num_envs).
"""
from __future__ import annotations

import logging
import time

import numpy as np
import zmq

from gorila_zmq.agents import base as agents
from gorila_zmq.envs import env_spec
from gorila_zmq.net import protocol as P, security, topology
from gorila_zmq.replay.memory import NotReady, ReplayMemory
from gorila_zmq.replay.priority import PrioritizedReplay
from gorila_zmq.replay.records import ADD, MAX_SAMPLE, PRIORITY, START
from gorila_zmq.replay.sources import priority_args
from gorila_zmq.roles.base import Role, role_main

log = logging.getLogger("gorila_zmq.replay")


def actors_per_shard(cfg) -> int:
    return -(-cfg.roles.actors // cfg.roles.replay_shards)


class ReplayServer(Role):
    def __init__(self, cfg, index: int, ctx=None):
        self.name = f"replay{index}"
        super().__init__(cfg, ctx, None)
        self.index = index
        self.record = agents.prepare(cfg).record(env_spec(cfg))
        self.E = cfg.env.num_envs
        self.lanes = actors_per_shard(cfg) * self.E
        self.rec = self.record.wire_dtype()
        self.memory = ReplayMemory(cfg.agent.replay_capacity, n_step=cfg.agent.n_step, gamma=cfg.agent.gamma,
                                   lanes=self.lanes, name=f"gz_{cfg.run_id}_greplay{index}", **self.record.memory_args())
        pa = priority_args(cfg)
        self.pr = PrioritizedReplay(self.memory, **pa) if pa else None
        self.open = np.zeros(self.lanes, bool)
        self.seqs: dict[int, tuple[int, int]] = {}      # actor -> (writer incarnation, last batch seq)
        self.rng = np.random.default_rng([cfg.run.seed, 3, index])
        self._batches: dict[int, tuple] = {}
        self.counters = {"records_in": 0, "batches_in": 0, "orphans_restarted": 0, "samples_out": 0,
                         "busy": 0, "duplicates": 0, "gaps": 0, "initial_priorities": 0}
        self.rejections = P.Rejections(log, f"replay {index}")
        self.sock = P.make_socket(self.ctx, zmq.ROUTER, rcvhwm=64, sndhwm=64,
                                  maxmsgsize=self.rec.itemsize * 4096 + 65536)
        self.sock.bind(topology.replay(cfg, index).bind)
        self.auth = security.AuthMonitor(self.sock) if security.current() else None
        self.started = time.monotonic()
        log.info("replay shard %d: %d lanes, capacity %d", index, self.lanes, cfg.agent.replay_capacity)

    def step(self) -> None:
        if not self.sock.poll(100):
            return
        for _ in range(64):
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self.handle(frames)

    def _send(self, ident, hdr, payload=None) -> None:
        try:
            self.sock.send_multipart([ident] + P.message(hdr, payload), zmq.NOBLOCK, copy=False)
        except zmq.ZMQError:
            pass

    def handle(self, frames) -> None:
        ident, req = frames[0].bytes, None
        try:
            req, payload = P.parse(frames[1:])
            if req.shard != self.index:
                raise P.ProtocolError(P.Status.BAD_SHARD, f"request for replay shard {req.shard} reached {self.index}")
            if req.command == P.Cmd.REPLAY_ADD:
                self._add(req, payload)
                return self._send(ident, P.Header(P.Cmd.REPLY, shard=self.index, seq=req.seq, client=req.client,
                                                  status=P.Status.OK))
            if req.command == P.Cmd.REPLAY_SAMPLE:
                return self._sample(ident, req, payload)
            if req.command == P.Cmd.REPLAY_PRIORITY:
                return self._send(ident, P.Header(P.Cmd.REPLY, shard=self.index, seq=req.seq, client=req.client),
                                  self._priorities(req, payload))
            if req.command in (P.Cmd.STATS, P.Cmd.HELLO):
                return self._send(ident, P.Header(P.Cmd.REPLY, shard=self.index, seq=req.seq), self.stats())
            raise P.ProtocolError(P.Status.BAD_COMMAND, f"{P.Cmd(req.command).name} is not served by a replay shard")
        except Exception as e:  # noqa: BLE001 - nothing a peer sends may take the server down
            hdr, body = self.rejections.reject(req, e, shard=self.index)
            self._send(ident, hdr, body)

    def _add(self, req, payload) -> int:
        if req.dtype != P.Dtype.RAW or payload is None:
            raise P.ProtocolError(P.Status.BAD_DTYPE, "REPLAY_ADD carries RAW transition records")
        if payload.nbytes % self.rec.itemsize:
            raise P.ProtocolError(P.Status.BAD_SIZE, f"{payload.nbytes} bytes is not a whole number of "
                                  f"{self.rec.itemsize}-byte records (another environment?)")
        actor = req.client
        R = self.cfg.roles.replay_shards
        if actor >= self.cfg.roles.actors or actor % R != self.index:
            raise P.ProtocolError(P.Status.BAD_SHARD, f"actor {actor} does not write to replay shard {self.index}")
        recs = np.frombuffer(payload, dtype=self.rec)
        if recs.size == 0:
            return 0
        if (recs["kind"] > ADD).any() or (recs["lane"] >= self.E).any():
            raise P.ProtocolError(P.Status.BAD_PAYLOAD, "record kind or lane out of range")
        if (recs["terminated"] > 1).any() or (recs["truncated"] > 1).any():
            raise P.ProtocolError(P.Status.BAD_PAYLOAD, "a terminated/truncated flag not 0/1")
        why = self.record.bad_actions(recs["action"])
        if why:
            raise P.ProtocolError(P.Status.BAD_PAYLOAD, why)
        if np.dtype(self.record.frame_dtype).kind == "f" and not np.isfinite(recs["frame"]).all():
            raise P.ProtocolError(P.Status.NON_FINITE, "observation with NaN or Inf")
        if not np.isfinite(recs["reward"]).all():
            raise P.ProtocolError(P.Status.NON_FINITE, "reward with NaN or Inf")
        given = recs["has_priority"]
        if (given > 1).any():
            raise P.ProtocolError(P.Status.BAD_PAYLOAD, "a has_priority flag not 0/1")
        if given.any() and not (np.isfinite(recs["priority"][given == 1]).all()
                                and (recs["priority"][given == 1] >= 0).all()):
            raise P.ProtocolError(P.Status.BAD_PAYLOAD, "an initial priority that is not finite and >= 0")
        # Each actor's batches apply once and in order: a retry that crossed its original is skipped;
        # a gap (a batch given up) or a restarted actor (new incarnation) closes its lanes, so the next
        # record starts a new partial episode instead of joining unrelated frames.
        inc, last = self.seqs.get(actor, (None, 0))
        if inc == req.incarnation and req.seq <= last:
            self.counters["duplicates"] += 1
            return 0
        base = (actor // R) * self.E
        if inc != req.incarnation or req.seq != last + 1:
            if inc is not None:
                self.counters["gaps"] += 1
            self.open[base:base + self.E] = False
        self.seqs[actor] = (req.incarnation, req.seq)      # only now: the whole message was valid
        for r in recs:
            lane = base + int(r["lane"])
            if r["kind"] == START:
                self.memory.start_episode(r["frame"], lane=lane)
                self.open[lane] = True
            elif not self.open[lane]:
                # The memory never saw this episode's start (this server restarted): begin a new
                # partial episode at this frame, losing one transition rather than the whole episode.
                self.counters["orphans_restarted"] += 1
                if not (r["terminated"] or r["truncated"]):
                    self.memory.start_episode(r["frame"], lane=lane)
                    self.open[lane] = True
            else:
                self.memory.add(r["action"], float(r["reward"]), r["frame"], bool(r["terminated"]),
                                bool(r["truncated"]), lane=lane)
                if self.pr is not None and r["has_priority"]:      # the actor's own |TD error| (Ape-X)
                    self.pr.give(lane, float(r["priority"]))
                    self.counters["initial_priorities"] += 1
                if r["terminated"] or r["truncated"]:
                    self.open[lane] = False
        self.counters["records_in"] += int(recs.size)
        self.counters["batches_in"] += 1
        return int(recs.size)

    SAMPLE_FIELDS = {"batch": P.Field(int, 1, MAX_SAMPLE), "min_size": P.Field(int, 0, 1 << 48, 0),
                     "beta": P.Field(float, 0.0, 1.0, None)}

    def _sample(self, ident, req, payload) -> None:
        body = P.fields(P.as_json(req, payload), self.SAMPLE_FIELDS, "REPLAY_SAMPLE")
        B, min_size, beta = body["batch"], body["min_size"], body["beta"]
        if (beta is None) != (self.pr is None):
            raise P.ProtocolError(P.Status.BAD_PAYLOAD, "this replay shard is prioritized: ask with beta" if self.pr
                                  else "this replay shard is not prioritized (agent.prioritized differs)")
        if B not in self._batches:
            if len(self._batches) >= 4:          # a client cycling through sizes must not grow memory
                self._batches.clear()
            self._batches[B] = self.memory.allocate_batch(B, pinned=False, prioritized=self.pr is not None)
        try:
            if len(self.memory) < max(min_size, 1):
                raise NotReady(f"replay holds {len(self.memory)} transitions, the learner waits for {min_size}")
            if self.pr is not None:
                batch = self.pr.sample(B, self.rng, out=self._batches[B], beta=beta)
            else:
                batch = self.memory.sample(B, self.rng, out=self._batches[B])
        except NotReady as e:                    # not enough yet: backpressure, not an error
            self.counters["busy"] += 1
            hdr, err = P.error_reply(req, P.Status.BUSY, str(e), self.index)
            return self._send(ident, hdr, dict(err, size=len(self.memory)))
        buf = b"".join(np.ascontiguousarray(getattr(batch, k), dtype=d).tobytes()
                       for k, d, _ in self.record.batch_layout(B, self.pr is not None))
        self.counters["samples_out"] += 1
        hdr = P.Header(P.Cmd.REPLY, shard=self.index, seq=req.seq, client=req.client, dtype=P.Dtype.RAW)
        self._send(ident, hdr, buf)

    def _priorities(self, req, payload) -> dict:
        if self.pr is None:
            raise P.ProtocolError(P.Status.BAD_COMMAND, "this replay shard is not prioritized")
        if req.dtype != P.Dtype.RAW or payload is None or payload.nbytes % PRIORITY.itemsize \
                or payload.nbytes > PRIORITY.itemsize * MAX_SAMPLE:
            raise P.ProtocolError(P.Status.BAD_SIZE, f"REPLAY_PRIORITY carries up to {MAX_SAMPLE} RAW "
                                  f"{PRIORITY.itemsize}-byte priority records")
        rec = np.frombuffer(payload, PRIORITY)
        stale = self.pr.counters["stale_priorities"]
        try:
            applied = self.pr.update(rec["index"], rec["position"], rec["td_abs"])
        except ValueError as e:
            raise P.ProtocolError(P.Status.BAD_PAYLOAD, str(e)) from None
        return {"applied": applied, "stale": self.pr.counters["stale_priorities"] - stale}

    def stats(self) -> dict:
        return {**self.memory.stats(), **(self.pr.stats() if self.pr else {}), **self.counters, **self.rejections.as_dict(), "role": "replay", "shard": self.index,
                "auth_failures": self.auth.poll() if self.auth else 0,
                "uptime_s": time.monotonic() - self.started}

    def close(self) -> None:
        if self.auth is not None:
            self.auth.close()
        self.sock.close(linger=0)
        self.memory.close()
        self.memory.unlink()
        super().close()


def main(argv: list[str]) -> int:
    return role_main(argv, "replay", "Run one global replay shard.", lambda cfg, i: ReplayServer(cfg, i))
