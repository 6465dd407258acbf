"""Request/reply the Lazy Pirate way (zguide chapter 4), the one implementation every client uses.

- `Client`: one DEALER to one server. `request()` sends, polls with a timeout for the reply that carries
  the request's sequence number (late replies to earlier requests are dropped), and on a timeout closes
  the socket, opens a new one and resends, `retries` times; then raises `Unavailable`. An ERROR reply
  raises ProtocolError with its status and detail.
- `request()`: the same, once, on a socket made for it (snapshots, stats, HELLO).
- `Window`: the pipelined form, for clients that keep several requests in flight (gradient pushes,
  replay writes): at most `size` unanswered; `expired()` says when the oldest waited too long, and
  `resend()` puts every pending request on a fresh socket, giving up those already retried `retries`
  times. Retries reuse (client, seq) and carry FLAG_RETRY, so a server applies each request at most
  once (one that no longer remembers the client refuses a retry rather than guess).
"""
from __future__ import annotations

import itertools
import logging
import random
import time

import zmq

from gorila_zmq.net import protocol as P

log = logging.getLogger("gorila_zmq.rpc")


class Unavailable(RuntimeError):
    """No reply after every retry: the server is down, unreachable or overloaded."""


def new_client_id() -> int:
    return random.getrandbits(32) or 1


def _raise_if_error(endpoint: str, hdr: P.Header, body) -> None:
    if hdr.command == P.Cmd.ERROR:
        try:
            detail = P.as_json(hdr, body).get("detail", "") if body is not None else ""
        except P.ProtocolError:
            detail = "(unreadable detail)"
        raise P.ProtocolError(P.Status(hdr.status), f"{endpoint}: {detail}")


class Client:
    """A persistent DEALER to one server, with Lazy Pirate retries."""

    _seqs = itertools.count(1)

    def __init__(self, ctx: zmq.Context, endpoint: str, socket_options=None, **sockopts):
        self.ctx, self.endpoint, self._options, self._sockopts = ctx, endpoint, socket_options, sockopts
        self.sock: zmq.Socket | None = None

    def _socket(self) -> zmq.Socket:
        if self.sock is None:
            self.sock = P.make_socket(self.ctx, zmq.DEALER, **self._sockopts)
            if self._options:
                self._options(self.sock)
            self.sock.connect(self.endpoint)
        return self.sock

    def reconnect(self) -> zmq.Socket:
        self.close()
        return self._socket()

    def request(self, hdr: P.Header, payload=None, *, timeout_s: float = 5.0, retries: int = 3
                ) -> tuple[P.Header, memoryview | None]:
        if not hdr.seq:
            hdr.seq = next(self._seqs)
        frames = P.message(hdr, payload)
        for attempt in range(retries + 1):
            s = self._socket()
            s.send_multipart(frames, copy=False)
            end = time.monotonic() + timeout_s
            while (left := end - time.monotonic()) > 0:
                if not s.poll(max(1, int(left * 1000)), zmq.POLLIN):
                    break
                rhdr, body = P.parse(s.recv_multipart(copy=False))
                if rhdr.seq != hdr.seq:
                    continue                         # a late reply to a request already given up
                _raise_if_error(self.endpoint, rhdr, body)
                return rhdr, body
            self.close()                             # Lazy Pirate: a fresh socket for the retry
            log.debug("no reply from %s (attempt %d/%d)", self.endpoint, attempt + 1, retries + 1)
        raise Unavailable(f"no reply from {self.endpoint} after {retries + 1} attempts of {timeout_s:g}s")

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close(linger=0)
            self.sock = None


def request(ctx: zmq.Context, endpoint: str, hdr: P.Header, payload=None, *, timeout_s: float = 5.0,
            retries: int = 3, socket_options=None) -> tuple[P.Header, memoryview | None]:
    """One request on a socket made for it (see Client.request)."""
    c = Client(ctx, endpoint, socket_options)
    try:
        return c.request(hdr, payload, timeout_s=timeout_s, retries=retries)
    finally:
        c.close()


class _Pending:
    __slots__ = ("frames", "sent_at", "tries")

    def __init__(self, frames, sent_at: float):
        self.frames, self.sent_at, self.tries = frames, sent_at, 0


class Window:
    """Requests in flight on one connection: seq -> frames, when sent, how often retried."""

    def __init__(self, size: int, timeout_s: float, retries: int):
        self.size, self.timeout, self.retries = size, timeout_s, retries
        self.pending: dict[int, _Pending] = {}

    def __len__(self) -> int:
        return len(self.pending)

    def __contains__(self, seq: int) -> bool:
        return seq in self.pending

    def full(self) -> bool:
        return len(self.pending) >= self.size

    def sent(self, seq: int, frames) -> None:
        self.pending[seq] = _Pending(frames, time.monotonic())

    def answered(self, seq: int) -> bool:
        """Forget `seq`; False if it was not in flight (a late reply to a request given up)."""
        return self.pending.pop(seq, None) is not None

    def expired(self, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        return bool(self.pending) and now - min(p.sent_at for p in self.pending.values()) > self.timeout

    def resend(self, sock: zmq.Socket) -> list[int]:
        """Resend every pending request on `sock` (a new socket); return the seqs given up instead
        (already retried `retries` times). The caller counts both."""
        now, lost = time.monotonic(), []
        for seq in list(self.pending):
            p = self.pending[seq]
            if p.tries >= self.retries:
                del self.pending[seq]
                lost.append(seq)
                continue
            p.tries, p.sent_at = p.tries + 1, now
            if not p.tries - 1:                     # marked once: a server that forgot this client refuses it
                p.frames = [P.mark_retry(p.frames[0]), *p.frames[1:]]
            sock.send_multipart(p.frames, copy=False)
        return lost
