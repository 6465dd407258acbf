"""Where every role listens: one function from a config to endpoints.

Addresses are bound late (launchpad style): roles are built with a config and resolve their
endpoints here when they start. `net.placement` maps a role name (ps0, replay1, actor3, learner0,
evaluator; a relay follows the actors and learners of its host) to the address of the host it runs on; a server binds that address only (not every
interface) and clients connect to it. Roles without a placement use `net.host`.
"""
from __future__ import annotations

import os
import random
import socket
from dataclasses import dataclass


@dataclass(frozen=True)
class Endpoint:
    bind: str      # what the server binds
    connect: str   # what a client connects to


def address(cfg, role: str) -> str:
    """The host address of role `role` (e.g. "ps0"). A relay (net.param_relay) sits on the k-th host
    of actors and learners."""
    placed = cfg.net.placement.get(role)
    if placed:
        return placed
    if role.startswith("relay") and role[5:].isdigit():
        return relay_hosts(cfg)[int(role[5:])]
    return cfg.net.host


def relay_hosts(cfg) -> list[str]:
    """The hosts of a run's actors and learners, in a fixed order: relay k serves the k-th."""
    r = cfg.roles
    actors, learners = (r.bundles, r.bundles) if r.mode == "bundled" else (r.actors, r.learners)
    names = [f"actor{i}" for i in range(actors)] + [f"learner{i}" for i in range(learners)]
    return sorted({cfg.net.placement.get(n) or cfg.net.host for n in names})


def relay_index(cfg, role: str) -> int:
    """Which relay serves role `role` (an actor or learner): the one on its host."""
    return relay_hosts(cfg).index(address(cfg, role))


def _ep(cfg, name: str, port_offset: int, host: str | None = None) -> Endpoint:
    if host is None:
        host = address(cfg, name.split(".")[0])
    if cfg.net.transport == "ipc":
        path = os.path.join(os.path.abspath(cfg.run.run_dir), "sock", f"{name}")
        if len(path) > 100:
            raise ValueError(f"ipc path {path!r} is too long for a unix socket (max ~107 bytes): "
                             "use a shorter run.run_dir or net.transport=tcp")
        return Endpoint(f"ipc://{path}", f"ipc://{path}")
    h = host or cfg.net.host
    port = cfg.net.base_port + port_offset
    return Endpoint(f"tcp://{h}:{port}", f"tcp://{h}:{port}")


def ps_request(cfg, i: int, host: str | None = None) -> Endpoint:
    return _ep(cfg, f"ps{i}.req", 2 * i, host)


def ps_broadcast(cfg, i: int, host: str | None = None) -> Endpoint:
    return _ep(cfg, f"ps{i}.pub", 2 * i + 1, host)


def ensure_ipc_dir(cfg) -> None:
    if cfg.net.transport == "ipc":
        os.makedirs(os.path.join(os.path.abspath(cfg.run.run_dir), "sock"), exist_ok=True)


# Port offsets from net.base_port: shards use [0, 2S); the rest sit far above any shard count.
REPLAY_PORT, ACTOR_CTL, LEARNER_CTL, EVAL_CTL, RELAY_CTL = 1000, 2000, 3000, 4000, 5000


def replay(cfg, r: int, host: str | None = None) -> Endpoint:
    """Global replay shard r: actors send transitions, learners request samples."""
    return _ep(cfg, f"replay{r}", REPLAY_PORT + r, host)


def control(cfg, role: str, i: int = 0, host: str | None = None) -> Endpoint:
    """A role's control socket (stats on request); shards answer on their request socket."""
    base = {"actor": ACTOR_CTL, "learner": LEARNER_CTL, "evaluator": EVAL_CTL, "relay": RELAY_CTL}[role]
    name = "evaluator" if role == "evaluator" else f"{role}{i}"
    return _ep(cfg, f"{name}.ctl", base + i, host)


def bundle_replay_name(cfg, i: int) -> str:
    """Shared-memory name of bundle i's local replay (actor i writes, learner i reads)."""
    return f"gz_{cfg.run_id}_replay{i}"


def role_endpoints(cfg, s) -> list[str]:
    """What role `s` (a supervisor.RoleSpec) binds."""
    if s.role == "ps":
        return [ps_request(cfg, s.index).bind, ps_broadcast(cfg, s.index).bind]
    if s.role == "replay":
        return [replay(cfg, s.index).bind]
    return [control(cfg, s.role, s.index).bind]


def tcp_ports(cfg, program) -> list[int]:
    """The TCP ports the roles of `program` bind, sorted."""
    return sorted(int(ep.rsplit(":", 1)[1]) for s in program for ep in role_endpoints(cfg, s)
                  if ep.startswith("tcp://"))


def ephemeral_range(path: str = "/proc/sys/net/ipv4/ip_local_port_range") -> tuple[int, int] | None:
    """The kernel's range of local ports for outgoing connections (Linux), or None where unknown."""
    try:
        with open(path) as f:
            lo, hi = (int(x) for x in f.read().split()[:2])
        return lo, hi
    except (OSError, ValueError):
        return None


def ephemeral_warning(cfg, program, rng: tuple[int, int] | None = None) -> str | None:
    """A warning when a role would listen on a port in the ephemeral range: any outgoing connection on
    the host (a ZeroMQ client among them) may hold that port when the role binds it, and the role fails
    with "Address already in use" at random."""
    rng = rng or ephemeral_range()
    ports = tcp_ports(cfg, program)
    clash = [p for p in ports if rng and rng[0] <= p <= rng[1]]
    if not clash:
        return None
    # `program` may be one host's share of a run; the evaluator's control port is the highest a run uses.
    top = max(EVAL_CTL, ports[-1] - cfg.net.base_port)
    fits = ([f"net.base_port <= {rng[0] - 1 - top}"] if rng[0] - 1 - top >= 1024 else []) + \
        ([f"net.base_port >= {rng[1] + 1}"] if rng[1] + 1 + top <= 65535 else [])
    advice = (f"Choose {' or '.join(fits)}, or reserve" if fits else "Reserve") + \
        f" the run's ports (sysctl net.ipv4.ip_local_reserved_ports): a run listens up to net.base_port + {top}."
    return (f"port(s) {', '.join(map(str, clash[:6]))}{' ...' if len(clash) > 6 else ''} lie in this host's "
            f"ephemeral port range ({rng[0]}-{rng[1]}), where outgoing connections take their local ports: a "
            f"role can fail to bind with 'Address already in use'. {advice}")


def _port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def free_base_port(count: int = 16, host: str = "127.0.0.1") -> int:
    """A net.base_port for a run on `host` (tests, benchmarks): the shard ports [0, count), and the
    first 8 replay shard and control ports of each kind, free now and below the ephemeral range."""
    offsets = list(range(count)) + [o + k for o in (REPLAY_PORT, ACTOR_CTL, LEARNER_CTL, EVAL_CTL, RELAY_CTL)
                                    for k in range(8)]
    rng = ephemeral_range()
    top = min(32768, rng[0] if rng else 32768) - RELAY_CTL - 16
    if top <= 10000:
        raise RuntimeError(f"the ephemeral port range {rng} leaves no room below it for a run")
    for _ in range(200):
        base = random.randrange(10000, top)
        if all(_port_free(base + k, host) for k in offsets):
            return base
    raise RuntimeError("no free port range found")
