"""CurveZMQ: keys, the per-process socket security setting, and the server-side authenticator.

Key layout made by `gorila-zmq keys gen DIR --hosts h1,h2,...`:
    DIR/server.key, DIR/server.key_secret     the servers' key pair (every server socket of the cluster)
    DIR/<host>.key, DIR/<host>.key_secret     one client key pair per host
    DIR/authorized/<host>.key                 the public keys a server admits (the cluster's list)
Secret keys are written readable by their owner only (0600).

With `net.curve = true`, every socket made by `protocol.make_socket` is encrypted and authenticated:
ROUTER and PUB sockets are CurveZMQ servers, DEALER and SUB sockets clients. A ZAP authenticator
thread on each context admits only clients whose public key is in DIR/authorized; anyone else never
completes the handshake, so gets no parameters, cannot push gradients and cannot read replay. Failed
handshakes are counted by a socket monitor (`AuthMonitor`) and shown in the servers' stats.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import threading
from dataclasses import dataclass

import zmq
import zmq.auth
from zmq.utils.monitor import parse_monitor_message

log = logging.getLogger("gorila_zmq.security")


@dataclass(frozen=True)
class Curve:
    server_public: bytes
    server_secret: bytes | None      # None on a host that runs no server
    client_public: bytes
    client_secret: bytes
    authorized_dir: str


_current: Curve | None = None
_auth_lock = threading.Lock()
_authenticators: dict[int, object] = {}


def gen_keys(keys_dir: str, hosts: list[str]) -> list[str]:
    """Make the server key pair (once) and one client key pair per host; list them as authorised."""
    os.makedirs(keys_dir, exist_ok=True)
    auth_dir = os.path.join(keys_dir, "authorized")
    os.makedirs(auth_dir, exist_ok=True)
    made = []
    for name in ["server", *hosts]:
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"bad key name {name!r}")
        pub = os.path.join(keys_dir, f"{name}.key")
        if not os.path.exists(pub):
            old = os.umask(0o077)          # the secret key is never readable by others, not even briefly
            try:
                pub, sec = zmq.auth.create_certificates(keys_dir, name)
            finally:
                os.umask(old)
            os.chmod(sec, 0o600)
            os.chmod(pub, 0o644)
            made += [pub, sec]
        if name != "server":
            with open(pub, "rb") as src, open(os.path.join(auth_dir, f"{name}.key"), "wb") as dst:
                dst.write(src.read())
    return made


def load(keys_dir: str, key_name: str) -> Curve:
    """This host's view of the keys; clear errors for what is missing."""
    if not os.path.isdir(keys_dir):
        raise ValueError(f"net.keys_dir {keys_dir!r} does not exist: make keys with `gorila-zmq keys gen DIR`")
    spub = os.path.join(keys_dir, "server.key")
    ssec = os.path.join(keys_dir, "server.key_secret")
    cfile = os.path.join(keys_dir, f"{key_name}.key_secret")
    for path in (spub, cfile):
        if not os.path.exists(path):
            raise ValueError(f"missing key file {path} (net.key_name={key_name!r}); run `gorila-zmq keys gen`")
    server_public, _ = zmq.auth.load_certificate(spub)
    server_secret = zmq.auth.load_certificate(ssec)[1] if os.path.exists(ssec) else None
    client_public, client_secret = zmq.auth.load_certificate(cfile)
    return Curve(server_public, server_secret, client_public, client_secret, os.path.join(keys_dir, "authorized"))


def configure(cfg) -> Curve | None:
    """Set this process's socket security from the config (roles call this once at start)."""
    global _current
    if not cfg.net.curve:
        _current = None
        return None
    # GORILA_KEY_NAME: the cluster launcher says which host this is without rewriting the config.
    _current = load(cfg.net.keys_dir, os.environ.get("GORILA_KEY_NAME") or cfg.net.key_name)
    return _current


def configure_role(cfg, role: str) -> Curve | None:
    """configure(), and say loudly when a role serves a network address without CurveZMQ."""
    curve = configure(cfg)
    if curve is None and cfg.net.transport == "tcp" and not _loopback(cfg.net.host):
        log.warning("%s: CurveZMQ is OFF on %s: anyone who can reach this address can read parameters, "
                    "push gradients and read replay (set net.curve=true with net.keys_dir)", role, cfg.net.host)
    return curve


def _loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def current() -> Curve | None:
    return _current


@contextlib.contextmanager
def use(curve: Curve | None):
    """Temporarily make sockets with another identity (tests play several clients in one process)."""
    global _current
    old, _current = _current, curve
    try:
        yield
    finally:
        _current = old


def _ensure_authenticator(ctx: zmq.Context, curve: Curve) -> None:
    with _auth_lock:
        if id(ctx) in _authenticators:
            return
        from zmq.auth.thread import ThreadAuthenticator
        auth = ThreadAuthenticator(ctx, log=logging.getLogger("gorila_zmq.zap"))
        auth.start()
        auth.configure_curve(domain="*", location=curve.authorized_dir)
        _authenticators[id(ctx)] = auth


def apply(sock: zmq.Socket, server: bool) -> None:
    """Make `sock` a CurveZMQ server or client if this process runs with CurveZMQ."""
    curve = _current
    if curve is None:
        return
    if server:
        if curve.server_secret is None:
            raise ValueError("this host has no server secret key (server.key_secret) but runs a server")
        _ensure_authenticator(sock.context, curve)
        sock.curve_secretkey = curve.server_secret
        sock.curve_publickey = curve.server_public
        sock.curve_server = True
    else:
        sock.curve_serverkey = curve.server_public
        sock.curve_publickey = curve.client_public
        sock.curve_secretkey = curve.client_secret


class AuthMonitor:
    """Counts failed handshakes on a server socket (unauthorised keys, plain-text peers)."""

    EVENTS = zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | \
        zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL

    def __init__(self, sock: zmq.Socket):
        self.failures = 0
        self.mon = sock.get_monitor_socket(self.EVENTS)

    def poll(self) -> int:
        while True:
            try:
                msg = self.mon.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return self.failures
            try:
                ev = parse_monitor_message(msg)
            except Exception:
                continue
            if ev["event"] & self.EVENTS:
                self.failures += 1
                if self.failures == 1:
                    log.warning("refused a peer that failed the CurveZMQ handshake (%s); counting the rest",
                                ev.get("endpoint", b"").decode(errors="replace"))

    def close(self) -> None:
        self.mon.close(linger=0)


def keys_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="gorila-zmq keys", description="CurveZMQ keys for a cluster.")
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("gen", help="make the server key pair and one client key pair per host")
    g.add_argument("dir")
    g.add_argument("--hosts", required=True, help="comma-separated host names (as in the cluster spec)")
    s = sub.add_parser("show", help="list the keys and the authorised hosts")
    s.add_argument("dir")
    a = p.parse_args(argv)
    if a.cmd == "gen":
        hosts = [h.strip() for h in a.hosts.split(",") if h.strip()]
        made = gen_keys(a.dir, hosts)
        for path in made:
            print(f"wrote {path}")
        print(f"{len(hosts)} host key(s) authorised in {os.path.join(a.dir, 'authorized')}; "
              f"secret keys are mode 0600: copy each host only its own and server.key_secret")
        return 0
    auth = os.path.join(a.dir, "authorized")
    print("authorised:", ", ".join(sorted(f[:-4] for f in os.listdir(auth))) if os.path.isdir(auth) else "none")
    return 0
