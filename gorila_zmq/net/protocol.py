"""The wire protocol: every message gorila-zmq sends, in one place (zguide MDP.py / kvmsg.py style).

A message is a list of ZeroMQ frames:  [header, payload?]  (ROUTER adds the peer identity in front).

header (56 bytes, little-endian, struct `HEADER`):
    magic      2s  b"GZ"
    version    B   PROTOCOL_VERSION
    command    B   Cmd
    shard      H   shard index (or replay shard index)
    status     H   Status (replies); 0 in requests
    client     I   client id (idempotent retries: (client, seq) is applied at most once)
    incarn     I   server incarnation (random per process start; a change means re-snapshot)
    seq        Q   request sequence number (echoed in the reply) / broadcast counter
    pversion   Q   parameter version (updates applied by this shard)
    layout     Q   64-bit layout hash of the model the sender means
    stamp_ns   Q   sender's CLOCK_MONOTONIC in ns (latency measurement on one host)
    dtype      B   Dtype of the payload frame
    flags      B   FLAG_RETRY on a resent request (a server that forgot its client refuses it, never
                   applies it twice)
    _pad       2x
    length     I   payload length in bytes (must equal the payload frame's size)

Payloads: raw array bytes (float32/uint8/int64 ...) sent with copy=False and read with np.frombuffer,
or UTF-8 JSON for small control data. Nothing is pickled, and nothing received is ever unpickled.
"""
from __future__ import annotations

import collections
import enum
import json
import logging
import struct
import time
from dataclasses import dataclass

import numpy as np
import zmq

from gorila_zmq.net import security

MAGIC = b"GZ"
PROTOCOL_VERSION = 1
HEADER = struct.Struct("<2sBBHHIIQQQQBB2xI")
HEADER_SIZE = HEADER.size
FLAG_RETRY = 1
_FLAGS_OFFSET = HEADER_SIZE - 7          # the flags byte: after dtype, before the pad and length


class Cmd(enum.IntEnum):
    HELLO = 1          # -> JSON {layout_hash, n_params, ...}; reply JSON shard description
    PUSH_GRAD = 2      # float32 gradient slice, pversion = version it was computed against
    GET_PARAMS = 3     # snapshot request; reply float32 slice + version
    STATS = 4          # reply JSON stats
    PARAMS = 5         # broadcast (PUB): float32 slice + version
    HEARTBEAT = 6      # broadcast (PUB) when idle: no payload
    REPLY = 7          # generic reply (status says what happened)
    ERROR = 8          # request refused (status says why), JSON detail
    # replay service (global replay mode)
    REPLAY_ADD = 16
    REPLAY_SAMPLE = 17
    REPLAY_PRIORITY = 18   # RAW replay.records.PRIORITY records: new priorities for sampled slots


class Status(enum.IntEnum):
    OK = 0
    APPLIED = 1
    STALE = 2          # discarded: computed against a version older than max_staleness updates
    REJECTED = 4       # invalid request (see ERROR detail)
    # reasons for rejection, carried in ERROR replies
    BAD_HEADER = 10
    BAD_MAGIC = 11
    BAD_VERSION = 12
    BAD_COMMAND = 13
    BAD_LAYOUT = 14
    BAD_SIZE = 15
    BAD_DTYPE = 16
    NON_FINITE = 17
    OVERSIZED = 18
    BAD_SHARD = 19
    BAD_FRAMES = 20
    BAD_PAYLOAD = 21
    BUSY = 22          # backpressure: try again later
    AHEAD = 23         # a gradient computed against a version this shard never reached: re-snapshot
    FORGOTTEN = 24     # a retry whose first outcome this shard no longer remembers: not applied


class Dtype(enum.IntEnum):
    NONE = 0
    FLOAT32 = 1
    UINT8 = 2
    INT64 = 3
    JSON = 4
    RAW = 5            # a packed record with its own documented layout
    FLOAT16 = 6        # IEEE half (gradients with net.grad_dtype=float16)
    BFLOAT16 = 7       # the top 16 bits of a float32, sent as uint16 arrays (net.grad_dtype=bfloat16)
    SHM_REF = 8        # a float32 slice left in a shared-memory segment of this host (SHM_REF_RECORD)


_NP = {Dtype.FLOAT32: np.dtype(np.float32), Dtype.UINT8: np.dtype(np.uint8),
       Dtype.INT64: np.dtype(np.int64), Dtype.FLOAT16: np.dtype(np.float16),
       Dtype.BFLOAT16: np.dtype(np.uint16)}

# The wire dtypes a gradient may travel in (net.grad_dtype); a shard widens them to float32.
GRAD_DTYPES = {"float32": Dtype.FLOAT32, "float16": Dtype.FLOAT16, "bfloat16": Dtype.BFLOAT16}


# A same-host push (net.shm_push, ps/local.py): the gradient slice stays in the pusher's segment and
# the message names it: byte offset, float32 count, segment name (ASCII, NUL-padded).
SHM_REF_RECORD = struct.Struct("<QQ64s")


def shm_ref(name: str, offset: int, count: int) -> bytes:
    return SHM_REF_RECORD.pack(offset, count, name.encode("ascii"))


def parse_shm_ref(hdr: Header, payload: memoryview | None) -> tuple[str, int, int]:
    """(segment name, byte offset, float32 count) of a SHM_REF payload; only its size and the name's
    encoding are checked here (the reader checks the name's prefix and the range against the segment)."""
    if hdr.dtype != Dtype.SHM_REF or payload is None or payload.nbytes != SHM_REF_RECORD.size:
        raise ProtocolError(Status.BAD_PAYLOAD, f"a shared-memory reference is {SHM_REF_RECORD.size} bytes")
    offset, count, raw = SHM_REF_RECORD.unpack(payload)
    name = raw.rstrip(b"\0")
    if not name or not name.isascii() or b"\0" in name:
        raise ProtocolError(Status.BAD_PAYLOAD, "shared-memory reference with an unreadable segment name")
    return name.decode("ascii"), offset, count


def narrow_floats(x: np.ndarray, code: Dtype) -> np.ndarray:
    """float32 -> the wire dtype `code`, rounding to nearest even (NaN and Inf stay non-finite, so the
    shard still refuses them; float16 overflows past 65504 become Inf and are refused too)."""
    if code == Dtype.FLOAT32:
        return x
    import torch        # vectorised, threads released from the GIL, and correct at the edges (NaN, overflow)
    if code == Dtype.FLOAT16:
        return torch.from_numpy(x).to(torch.float16).numpy()
    if code == Dtype.BFLOAT16:
        return torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    raise ValueError(f"no narrowing to {Dtype(code).name}")


def widen_floats(hdr: Header, payload: memoryview | None, count: int, out: np.ndarray) -> np.ndarray:
    """A float32 / float16 / bfloat16 payload of exactly `count` items as float32: the payload itself
    (read-only) when it is float32, else widened into `out` (float32, `count` long) and returned."""
    if hdr.dtype == Dtype.FLOAT32:
        return as_array(hdr, payload, Dtype.FLOAT32, count)
    if hdr.dtype == Dtype.FLOAT16:
        np.copyto(out, as_array(hdr, payload, Dtype.FLOAT16, count), casting="unsafe")
        return out
    if hdr.dtype == Dtype.BFLOAT16:
        bits = as_array(hdr, payload, Dtype.BFLOAT16, count)
        wide = out.view(np.uint32)
        np.copyto(wide, bits, casting="unsafe")
        np.left_shift(wide, 16, out=wide)        # exact: bfloat16 is float32 without its low 16 bits
        return out
    raise ProtocolError(Status.BAD_DTYPE, f"payload dtype {Dtype(hdr.dtype).name}, expected a float type")


class ProtocolError(Exception):
    """A received message is malformed; `status` names the reason (a Status)."""

    def __init__(self, status: Status, detail: str):
        super().__init__(detail)
        self.status = status
        self.detail = detail


@dataclass
class Header:
    command: int
    shard: int = 0
    status: int = 0
    client: int = 0
    incarnation: int = 0
    seq: int = 0
    pversion: int = 0
    layout: int = 0
    stamp_ns: int = 0
    dtype: int = Dtype.NONE
    length: int = 0
    flags: int = 0

    def pack(self) -> bytes:
        return HEADER.pack(MAGIC, PROTOCOL_VERSION, self.command, self.shard, self.status,
                           self.client, self.incarnation, self.seq, self.pversion, self.layout,
                           self.stamp_ns or time.monotonic_ns(), self.dtype, self.flags, self.length)

    @classmethod
    def unpack(cls, buf) -> "Header":
        """Parse and validate a header frame; raises ProtocolError with the reason."""
        if len(buf) != HEADER_SIZE:
            raise ProtocolError(Status.BAD_HEADER, f"header frame is {len(buf)} bytes, expected {HEADER_SIZE}")
        (magic, version, command, shard, status, client, incarn, seq, pversion, layout, stamp,
         dtype, flags, length) = HEADER.unpack(buf)
        if magic != MAGIC:
            raise ProtocolError(Status.BAD_MAGIC, f"bad magic {magic!r}")
        if version != PROTOCOL_VERSION:
            raise ProtocolError(Status.BAD_VERSION,
                                f"protocol version {version}, this build speaks {PROTOCOL_VERSION}")
        try:
            command = Cmd(command)
        except ValueError:
            raise ProtocolError(Status.BAD_COMMAND, f"unknown command {command}") from None
        try:
            dtype = Dtype(dtype)
        except ValueError:
            raise ProtocolError(Status.BAD_DTYPE, f"unknown payload dtype code {dtype}") from None
        return cls(command, shard, status, client, incarn, seq, pversion, layout, stamp, dtype, length, flags)


def mark_retry(header_frame) -> bytes:
    """A packed header with FLAG_RETRY set: what a client resends (net/rpc.Window.resend)."""
    b = bytearray(header_frame)
    b[_FLAGS_OFFSET] |= FLAG_RETRY
    return bytes(b)


def _frame_bytes(frame) -> memoryview:
    """A zero-copy view of a received frame (zmq.Frame or bytes)."""
    if isinstance(frame, zmq.Frame):
        return frame.buffer
    return memoryview(frame)


def parse(frames: list) -> tuple[Header, memoryview | None]:
    """Split [header, payload?] into a validated Header and the payload view."""
    if not frames or len(frames) > 2:
        raise ProtocolError(Status.BAD_FRAMES, f"expected 1 or 2 frames, got {len(frames)}")
    hdr = Header.unpack(_frame_bytes(frames[0]))
    payload = _frame_bytes(frames[1]) if len(frames) == 2 else None
    n = 0 if payload is None else payload.nbytes
    if n != hdr.length:
        raise ProtocolError(Status.BAD_SIZE, f"payload is {n} bytes, header says {hdr.length}")
    if n and hdr.dtype == Dtype.NONE:
        raise ProtocolError(Status.BAD_DTYPE, "payload present but dtype is NONE")
    return hdr, payload


def as_array(hdr: Header, payload: memoryview | None, dtype: Dtype, count: int | None = None) -> np.ndarray:
    """The payload as a read-only 1-D array of `dtype` (and exactly `count` items if given)."""
    if hdr.dtype != dtype:
        raise ProtocolError(Status.BAD_DTYPE, f"payload dtype {Dtype(hdr.dtype).name}, expected {dtype.name}")
    if payload is None:
        raise ProtocolError(Status.BAD_SIZE, "missing payload")
    item = _NP[dtype].itemsize
    if payload.nbytes % item:
        raise ProtocolError(Status.BAD_SIZE, f"payload of {payload.nbytes} bytes is not a whole number of {dtype.name}")
    arr = np.frombuffer(payload, dtype=_NP[dtype])
    if count is not None and arr.size != count:
        status = Status.OVERSIZED if arr.size > count else Status.BAD_SIZE
        raise ProtocolError(status, f"payload has {arr.size} {dtype.name}, expected {count}")
    return arr


_MAX_DIGITS = 40          # JSON integers longer than this are refused before Python converts them


def _json_int(text: str) -> int:
    if len(text) > _MAX_DIGITS:
        raise ProtocolError(Status.BAD_PAYLOAD, f"JSON integer of {len(text)} digits (max {_MAX_DIGITS})")
    return int(text)


def _json_constant(name: str):
    raise ProtocolError(Status.BAD_PAYLOAD, f"JSON {name} is not a number this protocol takes")


def as_json(hdr: Header, payload: memoryview | None, max_bytes: int = 1 << 16) -> dict:
    """A JSON object payload: UTF-8, at most `max_bytes`, integers of at most 40 digits, no NaN or
    Infinity. Anything else is a ProtocolError (BAD_PAYLOAD, OVERSIZED, BAD_DTYPE), never another error."""
    if hdr.dtype != Dtype.JSON or payload is None:
        raise ProtocolError(Status.BAD_DTYPE, "expected a JSON payload")
    if payload.nbytes > max_bytes:
        raise ProtocolError(Status.OVERSIZED, f"JSON payload of {payload.nbytes} bytes (max {max_bytes})")
    try:
        obj = json.loads(bytes(payload).decode("utf-8"), parse_int=_json_int, parse_constant=_json_constant)
    except (ValueError, RecursionError) as e:       # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ProtocolError(Status.BAD_PAYLOAD, f"payload is not UTF-8 JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(Status.BAD_PAYLOAD, "JSON payload must be an object")
    return obj


class Field:
    """One field of a JSON request: its type, its range (numbers) or length (strings), and its
    default when absent (required when the default is `Field.REQUIRED`)."""
    REQUIRED = object()

    def __init__(self, kind: type, lo=None, hi=None, default=REQUIRED):
        self.kind, self.lo, self.hi, self.default = kind, lo, hi, default


def fields(obj: dict, schema: dict[str, Field], what: str) -> dict:
    """The fields of `schema` from a JSON object (as_json), each checked for type (an int is never a
    bool or a float) and range before any server uses it; other keys are ignored. BAD_PAYLOAD names
    the first field that is wrong."""
    out = {}
    for name, f in schema.items():
        if name not in obj:
            if f.default is Field.REQUIRED:
                raise ProtocolError(Status.BAD_PAYLOAD, f"{what}: field {name!r} is missing")
            out[name] = f.default
            continue
        v = obj[name]
        ok = type(v) is f.kind or (f.kind is float and type(v) is int)
        if ok and f.kind in (int, float):
            ok = (f.lo is None or v >= f.lo) and (f.hi is None or v <= f.hi)
        elif ok and f.kind is str:
            ok = f.hi is None or len(v) <= f.hi
        if not ok:
            rng = f" in [{f.lo}, {f.hi}]" if f.kind in (int, float) and (f.lo, f.hi) != (None, None) else ""
            shown = repr(v) if len(repr(v)) <= 40 else repr(v)[:40] + "..."
            raise ProtocolError(Status.BAD_PAYLOAD, f"{what}: field {name!r} must be {f.kind.__name__}{rng}, "
                                f"got {shown}")
        out[name] = v
    return out


def message(hdr: Header, payload=None) -> list:
    """Frames for `send_multipart`; arrays travel as raw buffers (sent with copy=False)."""
    if payload is None:
        hdr.dtype, hdr.length = Dtype.NONE, 0
        return [hdr.pack()]
    if isinstance(payload, dict):
        data = json.dumps(payload, separators=(",", ":")).encode()
        hdr.dtype, hdr.length = Dtype.JSON, len(data)
        return [hdr.pack(), data]
    if isinstance(payload, np.ndarray):
        if not payload.flags.c_contiguous:
            payload = np.ascontiguousarray(payload)
        for code, dt in _NP.items():
            if payload.dtype == dt:
                hdr.dtype = code
                break
        else:
            raise TypeError(f"no wire dtype for {payload.dtype}")
        hdr.length = payload.nbytes
        return [hdr.pack(), payload]
    if isinstance(payload, (bytes, bytearray, memoryview)):
        hdr.dtype = hdr.dtype if hdr.dtype not in (Dtype.NONE,) else Dtype.RAW
        hdr.length = memoryview(payload).nbytes
        return [hdr.pack(), payload]
    raise TypeError(f"unsupported payload type {type(payload)}")


def error_reply(request: Header, status: Status, detail: str, shard: int = 0, incarnation: int = 0,
                pversion: int = 0) -> tuple[Header, dict]:
    return (Header(Cmd.ERROR, shard=shard, status=int(status), client=request.client if request else 0,
                   incarnation=incarnation, seq=request.seq if request else 0, pversion=pversion),
            {"status": Status(status).name, "detail": detail[:500]})


class Rejections:
    """The one way a server refuses a request: count it by kind, log the first of each kind (an
    unexpected error with its traceback, once per exception type), and build the ERROR reply. A peer
    that sends the same bad message a million times writes one log line."""

    def __init__(self, log: logging.Logger, who: str):
        self.log, self.who = log, who
        self.counts: collections.Counter = collections.Counter()
        self._logged: set[str] = set()

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def reject(self, request: Header | None, error: Exception, **reply) -> tuple[Header, dict]:
        """Count `error` (a ProtocolError, or an unexpected exception: REJECTED "internal error") and
        return the ERROR reply's header and body; `reply` sets the header's shard/incarnation/pversion."""
        if not isinstance(error, ProtocolError):
            kind = f"internal:{type(error).__name__}"
            if kind not in self._logged:
                self._logged.add(kind)
                self.log.error("%s: internal error handling a request (later ones of this kind are counted, "
                               "not logged)", self.who, exc_info=error)
            error = ProtocolError(Status.REJECTED, f"internal error: {type(error).__name__}")
        kind = Status(error.status).name
        self.counts[kind] += 1
        if kind not in self._logged:
            self._logged.add(kind)
            self.log.warning("%s: rejected a request (%s): %s (logged once per kind)", self.who, kind, error.detail)
        return error_reply(request, error.status, error.detail, **reply)

    def as_dict(self) -> dict:
        return {"rejected": dict(self.counts), "rejected_total": self.total}


def make_socket(ctx: zmq.Context, kind: int, *, linger: int = 0, rcvhwm: int | None = None,
                sndhwm: int | None = None, maxmsgsize: int | None = None,
                server: bool | None = None) -> zmq.Socket:
    """Every socket in gorila-zmq is made here: linger 0, explicit high-water marks, and CurveZMQ when
    this process runs with it (ROUTER/PUB are servers, DEALER/SUB clients, unless `server` says)."""
    s = ctx.socket(kind)
    security.apply(s, kind in (zmq.ROUTER, zmq.PUB) if server is None else server)
    s.setsockopt(zmq.LINGER, linger)
    if rcvhwm is not None:
        s.setsockopt(zmq.RCVHWM, rcvhwm)
    if sndhwm is not None:
        s.setsockopt(zmq.SNDHWM, sndhwm)
    if maxmsgsize is not None:
        s.setsockopt(zmq.MAXMSGSIZE, maxmsgsize)
    return s
