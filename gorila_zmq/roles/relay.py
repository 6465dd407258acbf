"""The relay role (net.param_relay): one parameter subscriber for a whole host. It subscribes to every
shard (ps/subscriber.py) and writes each slice it applies into the host's shared-memory segment
(ps/shared.py), where the host's actors and learners read theta without a socket of their own."""
from __future__ import annotations

import logging
import os
import time

import numpy as np

from gorila_zmq.fields import ConfigError
from gorila_zmq.net import topology
from gorila_zmq.ps.client import ShardSet
from gorila_zmq.ps.layout import load_run_layout
from gorila_zmq.ps.shared import SharedParamsWriter, segment_name
from gorila_zmq.ps.subscriber import ParamSubscriber
from gorila_zmq.roles.base import Role, role_main

log = logging.getLogger("gorila_zmq.relay")


class Relay(Role):
    def __init__(self, cfg, index: int, ctx=None):
        self.name = f"relay{index}"
        layout = load_run_layout(cfg.run.run_dir)
        if layout is None:
            raise ConfigError(f"{cfg.run.run_dir} has no layout.json: start the run with `gorila-zmq dev` (or "
                              "cluster up), which prepares it")
        hosts = topology.relay_hosts(cfg)
        if not 0 <= index < len(hosts):
            raise ConfigError(f"relay index {index} out of range: this run's actors and learners are on "
                              f"{len(hosts)} host(s)")
        super().__init__(cfg, ctx, topology.control(cfg, "relay", index, host=hosts[index]), scalars=False)
        self.index = index
        self.shards = ShardSet(cfg, layout)
        self.store = SharedParamsWriter(segment_name(cfg, index), layout.size, self.shards.ranges)
        self.sub = ParamSubscriber(self.ctx, self.shards, store=self.store, record_latency=True)
        self.started = time.monotonic()
        log.info("relay %d: theta of %d shard(s) for the actors and learners on %s, in %s", index, self.shards.n,
                 hosts[index], self.store.name)

    def step(self) -> None:
        time.sleep(0.2)
        self.store.beat()

    def stats(self) -> dict:
        lat = self.sub.latency_ns
        del lat[:-1000]                                # the latest 1,000 broadcasts' delivery latencies
        ms = np.array(lat, dtype=np.float64) / 1e6
        pct = {f"broadcast_latency_p{q}_ms": float(np.percentile(ms, q)) if ms.size else None for q in (50, 99)}
        return {"role": "relay", "relay": self.index, **self.sub.counters, **pct, "versions": list(self.sub.versions),
                "shards_alive": list(self.sub.alive), "global_updates": self.sub.global_version,
                "uptime_s": round(time.monotonic() - self.started, 3), "pid": os.getpid()}

    def close(self) -> None:
        if getattr(self, "sub", None) is not None:
            self.sub.close()
            self.sub = None
        if getattr(self, "store", None) is not None:
            self.store.close()
            self.store = None
        super().close()


def main(argv: list[str]) -> int:
    return role_main(argv, "relay", "Hand the shards' parameters to this host's actors and learners through shared "
                     "memory.", lambda cfg, i: Relay(cfg, i), uses_torch=False)
