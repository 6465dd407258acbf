"""Typed configuration: dataclasses with one line of help per field, defaults from the paper.

Load order: defaults -> preset -> TOML file -> `section.field=value` overrides. The resolved config
is written as JSON next to a run's output (`save_json`). Unknown sections/fields and values of the
wrong type are clear errors, never silently ignored.
"""
from __future__ import annotations

import dataclasses
import json
import os
import tomllib
import typing
from dataclasses import dataclass, field


def _f(default, help: str, **kw):
    """A dataclass field with a help line (shown by `gorila-zmq config --help-fields`)."""
    if isinstance(default, (list, dict, tuple)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class RunConfig:
    run_dir: str = _f("runs/default", "directory for checkpoints, logs, metrics and the resolved config")
    run_id: str = _f("", "names shared-memory segments and ipc endpoints; derived from run_dir when empty")
    seed: int = _f(0, "seed for parameter initialisation and every role's RNG")


@dataclass
class NetConfig:
    transport: str = _f("tcp", "tcp or ipc (ipc: one host only, endpoints under run_dir)")
    host: str = _f("127.0.0.1", "address servers bind to and clients connect to in dev mode")
    base_port: int = _f(15500, "first port; shard i uses base_port+2i (requests) and base_port+2i+1 (broadcast)")
    heartbeat_interval_s: float = _f(1.0, "an idle server publishes a heartbeat this often")
    heartbeat_liveness: int = _f(3, "a peer silent for this many heartbeat intervals is dead")
    reconnect_max_s: float = _f(32.0, "reconnect backoff doubles from 1 s up to this")
    request_timeout_s: float = _f(5.0, "a request without a reply after this long is retried on a new socket")
    request_retries: int = _f(3, "retries (Lazy Pirate) before a request is given up as lost")
    in_flight: int = _f(2, "gradient pushes in flight per shard (bounded window)")
    sub_hwm: int = _f(2, "subscriber high-water mark: slow actors drop stale parameters, not queue them")


@dataclass
class PSConfig:
    shards: int = _f(1, "number of parameter-server shards (the paper: N_param = 31)")
    optimizer: str = _f("adagrad", "server-side optimiser")
    lr: float = _f(0.01, "AdaGrad learning rate")
    eps: float = _f(1e-10, "AdaGrad epsilon added to sqrt(G)")
    initial_accumulator: float = _f(0.1, "initial value of the AdaGrad accumulator G")
    max_staleness: int = _f(50, "discard a gradient computed more than this many of the shard's updates ago")
    broadcast_every: int = _f(1, "broadcast the slice after this many applied updates ...")
    broadcast_interval_ms: float = _f(50.0, "... or after this many milliseconds with unbroadcast updates")
    checkpoint_interval_s: float = _f(60.0, "write theta, G and the version to disk this often (and on SIGTERM)")
    max_payload_factor: float = _f(2.0, "messages larger than this times the shard's slice are refused by ZeroMQ")
    apply_threads: int = _f(1, "threads for the AdaGrad apply (0: every core); 1 leaves the other cores to "
                               "ZeroMQ's I/O thread, which receives the next gradient meanwhile")


@dataclass
class ModelConfig:
    kind: str = _f("nature_cnn", "nature_cnn (Atari, 4x84x84 uint8) or mlp (vector observations)")
    obs_shape: list = _f([4, 84, 84], "observation shape the network takes")
    n_actions: int = _f(6, "number of discrete actions (Pong: 6)")
    hidden: list = _f([64, 64], "hidden layer sizes of the mlp")


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    net: NetConfig = field(default_factory=NetConfig)
    ps: PSConfig = field(default_factory=PSConfig)
    model: ModelConfig = field(default_factory=ModelConfig)

    # -- derived --------------------------------------------------------------------------------
    @property
    def run_id(self) -> str:
        if self.run.run_id:
            return self.run.run_id
        import hashlib
        return hashlib.blake2b(os.path.abspath(self.run.run_dir).encode(), digest_size=4).hexdigest()

    def validate(self) -> "Config":
        errs = []
        if self.net.transport not in ("tcp", "ipc"):
            errs.append(f"net.transport must be 'tcp' or 'ipc', not {self.net.transport!r}")
        if self.ps.shards < 1:
            errs.append("ps.shards must be >= 1")
        if self.ps.optimizer not in ("adagrad",):
            errs.append(f"ps.optimizer {self.ps.optimizer!r} is not one of: adagrad")
        if self.ps.lr <= 0 or self.ps.eps < 0 or self.ps.initial_accumulator < 0:
            errs.append("ps.lr must be > 0, ps.eps and ps.initial_accumulator >= 0")
        if self.ps.max_staleness < 0:
            errs.append("ps.max_staleness must be >= 0")
        if self.ps.broadcast_every < 1:
            errs.append("ps.broadcast_every must be >= 1")
        if self.net.in_flight < 1:
            errs.append("net.in_flight must be >= 1")
        if self.model.kind not in ("nature_cnn", "mlp"):
            errs.append(f"model.kind {self.model.kind!r} is not one of: nature_cnn, mlp")
        if errs:
            raise ConfigError("invalid configuration:\n  " + "\n  ".join(errs))
        return self


class ConfigError(ValueError):
    pass


# -- loading ------------------------------------------------------------------------------------

def _coerce(value, tp, where: str):
    origin = typing.get_origin(tp) or tp
    if origin is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
    elif origin is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
    elif origin is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif origin is str:
        if isinstance(value, str):
            return value
    elif origin is list:
        if isinstance(value, list):
            return value
        if isinstance(value, str):
            try:
                v = json.loads(value)
                if isinstance(v, list):
                    return v
            except json.JSONDecodeError:
                return [int(x) if x.strip().lstrip("-").isdigit() else x.strip()
                        for x in value.split(",") if x.strip()]
    raise ConfigError(f"{where}: expected {getattr(origin, '__name__', origin)}, got {value!r}")


def _section_types(cls) -> dict[str, type]:
    return typing.get_type_hints(cls)


def apply_dict(cfg, data: dict, where: str = "config"):
    """Set fields of dataclass `cfg` from a nested dict; unknown keys are errors."""
    hints = _section_types(type(cfg))
    for key, value in data.items():
        if key not in hints:
            valid = ", ".join(sorted(hints))
            raise ConfigError(f"{where}: unknown key {key!r} (valid: {valid})")
        cur = getattr(cfg, key)
        if dataclasses.is_dataclass(cur):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}.{key}: expected a table of fields, got {value!r}")
            apply_dict(cur, value, f"{where}.{key}")
        else:
            setattr(cfg, key, _coerce(value, hints[key], f"{where}.{key}"))
    return cfg


def parse_override(text: str) -> dict:
    """`ps.lr=0.01` -> {"ps": {"lr": "0.01"}}."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.field=value")
    key, value = text.split("=", 1)
    parts = key.strip().split(".")
    out: dict = {}
    d = out
    for p in parts[:-1]:
        d = d.setdefault(p, {})
    d[parts[-1]] = value
    return out


def load(path: str | None = None, overrides: list[str] = (), base: Config | None = None,
         presets: dict | None = None, preset: str | None = None) -> Config:
    cfg = base or Config()
    if preset:
        presets = presets or {}
        if preset not in presets:
            raise ConfigError(f"unknown preset {preset!r} (available: {', '.join(sorted(presets))})")
        apply_dict(cfg, presets[preset], f"preset {preset}")
    if path:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML: {e}") from None
        apply_dict(cfg, data, path)
    for o in overrides:
        apply_dict(cfg, parse_override(o), f"override {o!r}")
    return cfg.validate()


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(data: dict) -> Config:
    return apply_dict(Config(), data).validate()


def save_json(cfg, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(to_dict(cfg), f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def describe(cfg=None, prefix: str = "") -> list[str]:
    """One line per field: `section.field = default  # help`."""
    cfg = cfg or Config()
    lines = []
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            lines += describe(v, f"{prefix}{f.name}.")
        else:
            lines.append(f"{prefix}{f.name} = {v!r}  # {f.metadata.get('help', '')}")
    return lines
