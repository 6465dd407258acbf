"""Typed configuration: dataclasses with one line of help per field, defaults from the paper.

Load order: defaults -> preset -> TOML file -> `section.field=value` overrides. The agent-specific sections
(`dqn`, `drqv2`) are defined in their agent packages (gorila_zmq/agents/*/config.py). The resolved config
is written as JSON next to a run's output (`save_json`). Unknown sections/fields and values of the
wrong type are clear errors, never silently ignored.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import tomllib
import typing
from dataclasses import dataclass, field

from gorila_zmq.agents.dqn.config import DQNConfig
from gorila_zmq.agents.drqv2.config import DrQv2Config
from gorila_zmq.fields import ConfigError, help_field as _f
from gorila_zmq.host.files import write_json
from gorila_zmq.presets import PRESETS

__all__ = ["Config", "ConfigError", "PRESETS", "load", "from_dict", "to_dict", "save_json", "describe"]
log = logging.getLogger("gorila_zmq.config")
_WARNED: set = set()


@dataclass
class RunConfig:
    run_dir: str = _f("runs/default", "directory for checkpoints, logs, metrics and the resolved config")
    run_id: str = _f("", "names shared-memory segments and ipc endpoints; derived from run_dir when empty")
    seed: int = _f(0, "seed for parameter initialisation and every role's RNG")


@dataclass
class NetConfig:
    transport: str = _f("tcp", "tcp or ipc (ipc: one host only, endpoints under run_dir)")
    host: str = _f("127.0.0.1", "address servers bind to and clients connect to in dev mode")
    base_port: int = _f(15500, "first port; shard i uses base_port+2i (requests) and base_port+2i+1 (broadcast), "
                               "replay shard r base_port+1000+r, actor/learner i's control base_port+2000+i/"
                               "+3000+i, the evaluator's base_port+4000, relay k's base_port+5000+k")
    heartbeat_interval_s: float = _f(1.0, "an idle server publishes a heartbeat this often")
    heartbeat_liveness: int = _f(3, "a peer silent for this many heartbeat intervals is dead")
    reconnect_max_s: float = _f(32.0, "reconnect backoff doubles from 1 s up to this")
    request_timeout_s: float = _f(5.0, "a request without a reply after this long is retried on a new socket")
    request_retries: int = _f(3, "retries (Lazy Pirate) before a request is given up as lost")
    in_flight: int = _f(2, "gradient pushes in flight per shard (bounded window)")
    grad_dtype: str = _f("float32", "gradients travel as float32, bfloat16 or float16 (half the bytes; the shard "
                                    "widens them and applies in float32; float16 overflows past 65504)")
    shm_push: str = _f("off", "auto: a gradient pushed to a shard on the same host stays in a shared-memory "
                               "buffer and the message only names it (ps/local.py); off: every push sends "
                               "its bytes (and shards refuse shared-memory pushes)")
    sub_hwm: int = _f(2, "subscriber high-water mark: slow actors drop stale parameters, not queue them")
    io_threads: int = _f(1, "ZeroMQ I/O threads per process (each moves ~1-2 GB/s in the clear, ~0.8 GB/s under "
                            "CurveZMQ): more for a shard that serves many learners over fast links")
    param_relay: bool = _f(False, "one parameter subscriber per host: a relay role takes theta from the shards and "
                                  "hands it to the host's actors and learners through shared memory (a shard's "
                                  "fan-out then grows with hosts, not with roles)")
    curve: bool = _f(False, "CurveZMQ on every socket: encryption + only the authorised keys get service")
    keys_dir: str = _f("", "directory made by `gorila-zmq keys gen` (needed with net.curve)")
    key_name: str = _f("local", "this host's client key name in keys_dir")
    placement: dict = _f({}, "role name (ps0, replay1, actor3, learner0, evaluator) -> address of its host; "
                             "servers bind that address only; unplaced roles use net.host")


@dataclass
class PSConfig:
    shards: int = _f(1, "number of parameter-server shards (the paper: N_param = 31)")
    optimizer: str = _f("adagrad", "server-side optimiser: adagrad (Gorila) or adam (DrQ-v2)")
    lr: float = _f(0.01, "learning rate of the shard's optimiser (ps.optimizer: AdaGrad or Adam)")
    eps: float = _f(1e-10, "AdaGrad epsilon added to sqrt(G) (Adam's is ps.adam_eps)")
    # Atari DQN gradients are 1e-8..1e-2 per parameter (measured on Pong), so TF's 0.1 shrinks most
    # AdaGrad steps far below Adam's. A G0 below g^2 normalises a parameter, but then its first steps are
    # ~lr each: without ps.lr_warmup_updates they kill most of the network's units within ten updates
    # (docs/RESULTS.md, "AdaGrad's first ten updates").
    initial_accumulator: float = _f(1e-6, "initial value of the AdaGrad accumulator G (small: steps ~ lr*g/sqrt(G))")
    lr_warmup_updates: int = _f(0, "ramp the shard's learning rate linearly from lr/N to lr over its first N "
                                   "updates (0: off); caps AdaGrad's first steps, which are ~lr per parameter "
                                   "once G is below g^2 (docs/RESULTS.md, AdaGrad on Pong)")
    adam_beta1: float = _f(0.9, "Adam: first-moment decay")
    adam_beta2: float = _f(0.999, "Adam: second-moment decay")
    adam_eps: float = _f(1e-8, "Adam: epsilon added to the bias-corrected sqrt(v)")
    max_staleness: int = _f(50, "discard a gradient computed more than this many of the shard's updates ago (0: "
                                "no such bound); with N learners pushing, an honest gradient is ~N updates old, "
                                "so keep it >= 2 x learners + broadcast_every, or use max_staleness_s")
    max_staleness_s: float = _f(0.0, "discard a gradient whose theta stopped being the newest more than this many "
                                     "seconds ago (the paper's time bound; 0: off)")
    staleness_factor: float = _f(0.0, "... or more than this many times the median age of the latest 256 "
                                      "gradients, if longer (0: off): a bound that grows with the layout, so "
                                      "honest gradients pass at any learner count and a stalled learner's do not")
    broadcast_every: int = _f(10, "broadcast the slice after this many applied updates ...")
    broadcast_interval_ms: float = _f(100.0, "... or this many milliseconds after the last send, if any is unbroadcast")
    broadcast_min_interval_ms: float = _f(0.0, "never broadcast more often than this (0: no cap): a shard's bytes "
                                               "out are subscribers x slice x broadcast rate, the wall at scale "
                                               "(docs/SCALING.md)")
    checkpoint_interval_s: float = _f(60.0, "write theta, G and the version to disk this often (and on SIGTERM)")
    bad_checkpoint: str = _f("refuse", "an unreadable checkpoint at resume: refuse (stop with an error naming it) or "
                                       "initial (move it aside, start the shard from the initial parameters)")
    max_payload_factor: float = _f(2.0, "messages larger than this times the shard's slice are refused by ZeroMQ")
    apply_threads: int = _f(1, "threads for the AdaGrad apply (0: every core); 1 leaves the other cores to "
                               "ZeroMQ's I/O thread, which receives the next gradient meanwhile")


@dataclass
class EnvConfig:
    name: str = _f("Pong", "an Atari game (ALE ROM name, e.g. Pong, Breakout) or a gymnasium id such as CartPole-v1")
    num_envs: int = _f(1, "environments per actor, stepped together for batched inference")
    action_repeat: int = _f(4, "emulator frames per agent step (Atari: 4, max over the last two frames; DeepMind "
                               "Control: 2, rewards summed)")
    noop_max: int = _f(30, "Atari: up to this many random no-ops at the start of an episode")
    terminal_on_life_loss: bool = _f(True, "Atari, training only: a lost life ends the episode for the learner")
    clip_rewards: bool = _f(True, "training only: rewards clipped to their sign")
    max_frames: int = _f(108_000, "training episode cap in emulator frames (reported as truncation)")
    repeat_action_probability: float = _f(0.0, "sticky actions (0: the DQN protocol)")
    fire_reset: bool = _f(True, "Atari, training: press FIRE (then action 2) after each reset and lost life in "
                                "games that wait for it (the usual FireReset wrapper); evaluation follows "
                                "eval.fire_reset")
    fast_render: bool = _f(False, "DeepMind Control: shadows and multisampling off (about 4x faster on a CPU)")


@dataclass
class AgentConfig:
    name: str = _f("dqn", "the agent: dqn (Gorila, discrete actions), drqv2 (DrQ-v2, continuous, from pixels), "
                          "or package.module:Class for one of your own (gorila_zmq.agents.base)")
    gamma: float = _f(0.99, "discount")
    n_step: int = _f(1, "n-step returns (1: the paper)")
    batch_size: int = _f(32, "minibatch size")
    replay_capacity: int = _f(1_000_000, "frames (slots) per replay memory, bundle or global shard: one per "
                                         "transition plus one per stored episode")
    learning_starts: int = _f(50_000, "transitions in replay before a learner starts")
    outlier_k: float = _f(5.0, "drop gradients whose |loss| > mean + k*std of recent losses (Gorila 4.2); 0: off")
    outlier_warmup: int = _f(100, "losses seen before the outlier filter starts dropping")
    actor_sync_every: int = _f(1, "actor steps between reads of the latest parameters (non-blocking)")
    max_steps_per_update: float = _f(0.0, "rate limit (0: off): actors pause while all actors' steps exceed "
                                          "learning_starts + this x global updates (on a small box the "
                                          "learners then get the cores)")
    limiter_stall_s: float = _f(10.0, "a rate-limited actor steps anyway once the global update count has not "
                                      "moved for this long: the learners may be starved (a replay shard "
                                      "restarted empty), and waiting for them would wait forever")
    max_updates_ahead: int = _f(100, "the learners' side of the same limiter (as Reverb's SampleToInsertRatio): a "
                                     "learner pauses while its updates since it started exceed its share of the "
                                     "transitions inserted since then / max_steps_per_update by more than this "
                                     "many (a GPU learner faster than its actors); batches the outlier filter "
                                     "dropped and pushes shard 0 refused do not count; 0: only the actors are held")
    grads_per_push: int = _f(1, "minibatch gradients a learner averages locally before one push (k times fewer "
                                "bytes and shard updates per gradient computed)")
    learner_max_updates: int = _f(0, "stop a learner after this many updates (0: never)")
    device: str = _f("auto", "torch device for learners: auto (cuda when present), cpu, cuda, cuda:1 ...")
    torch_threads: int = _f(1, "torch intra-op threads per role process")
    prioritized: bool = _f(False, "proportional prioritized replay (Schaul et al. 2016; off: Gorila's uniform replay)")
    priority_alpha: float = _f(0.6, "prioritized replay: priority = (|TD error| + priority_eps) ** alpha")
    priority_beta: float = _f(0.4, "prioritized replay: importance-sampling exponent at global update 0, "
                                   "annealed linearly to 1")
    priority_beta_updates: int = _f(1_000_000, "prioritized replay: global updates over which beta reaches 1")
    priority_eps: float = _f(1e-6, "prioritized replay: added to |TD error| so no transition has priority 0")
    priority_weight_norm: str = _f("batch", "prioritized replay: importance weights divided by their max over the "
                                            "batch, or over the whole memory ('memory')")
    actor_priorities: bool = _f(False, "Ape-X: actors send each transition's initial priority, their own n-step "
                                       "|TD error| (global mode, agent.prioritized; off: new transitions enter at "
                                       "the shard's max)")
    learner_torch_threads: int = _f(0, "torch intra-op threads in learner processes (0: torch_threads); on a "
                                       "small box the learner is the one role worth a second core")
    batch_layout: str = _f("auto", "a bundled learner's minibatch: pairs (obs and next_obs, a full stack each), "
                                   "frames (rows of stack + 1 frames that obs and next_obs are views of: 5 frames "
                                   "per Atari row instead of 8, one copy to the device; n_step 1 only), or auto "
                                   "(frames where n_step is 1 and frames are stacked)")


@dataclass
class RolesConfig:
    mode: str = _f("bundled", "bundled (actor + learner share a local replay) or global (sharded replay servers)")
    bundles: int = _f(1, "bundled mode: actor+learner pairs (the paper: N_act = N_learn = 100)")
    actors: int = _f(1, "global mode: actors")
    learners: int = _f(1, "global mode: learners")
    replay_shards: int = _f(1, "global mode: replay servers")
    evaluator: bool = _f(True, "run the evaluator role")


@dataclass
class EvalConfig:
    interval_s: float = _f(300.0, "the evaluator plays every this many seconds")
    episodes: int = _f(30, "episodes per evaluation")
    epsilon: float = _f(0.05, "evaluation epsilon")
    noop_max: int = _f(30, "up to this many random no-op starts")
    max_frames: int = _f(18_000, "evaluation episode cap in frames (5 minutes of play)")
    fire_reset: bool = _f(False, "Atari: press FIRE at each reset, as training may (False: the DQN/Gorila "
                                 "protocol, the agent presses it itself); each evaluation records its value")


@dataclass
class DevConfig:
    restart_backoff_s: float = _f(1.0, "first restart delay of a role that died; doubles to restart_backoff_max_s")
    restart_backoff_max_s: float = _f(30.0, "longest restart delay")
    progress_interval_s: float = _f(5.0, "seconds between progress lines")
    stats_interval_s: float = _f(10.0, "seconds between each role's scalar logs (TensorBoard + CSV)")


@dataclass
class ModelConfig:
    kind: str = _f("auto", "auto (the agent chooses from the environment), nature_cnn (Atari, 4x84x84 uint8), "
                           "mlp (vectors) or drqv2 (encoder + actor + critic, 9x84x84 RGB)")
    obs_shape: list[int] = _f([4, 84, 84], "observation shape the network takes (filled from the environment)")
    n_actions: int = _f(6, "discrete actions: how many (Pong: 6); 0 for continuous actions")
    action_dim: int = _f(0, "continuous actions: their dimension (cartpole_swingup: 1); 0 for discrete actions")
    hidden: list[int] = _f([64, 64], "hidden layer sizes of the mlp (drqv2: hidden[0] is the actor/critic width)")
    feature_dim: int = _f(50, "drqv2: trunk feature size (linear -> LayerNorm -> tanh)")


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    net: NetConfig = field(default_factory=NetConfig)
    ps: PSConfig = field(default_factory=PSConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)
    roles: RolesConfig = field(default_factory=RolesConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    dev: DevConfig = field(default_factory=DevConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    dqn: DQNConfig = field(default_factory=DQNConfig)
    drqv2: DrQv2Config = field(default_factory=DrQv2Config)

    # -- derived --------------------------------------------------------------------------------
    @property
    def run_id(self) -> str:
        if self.run.run_id:
            return self.run.run_id
        return hashlib.blake2b(os.path.abspath(self.run.run_dir).encode(), digest_size=4).hexdigest()

    def validate(self) -> "Config":
        errs = []
        if self.net.transport not in ("tcp", "ipc"):
            errs.append(f"net.transport must be 'tcp' or 'ipc', not {self.net.transport!r}")
        bad = [r for r in self.net.placement
               if not re.fullmatch(r"(ps|replay|actor|learner)\d+|evaluator", r)]
        if bad:
            errs.append(f"net.placement names unknown roles {bad} (ps0, replay0, actor0, learner0, evaluator ...)")
        if self.net.curve and not self.net.keys_dir:
            errs.append("net.curve needs net.keys_dir (make keys with `gorila-zmq keys gen DIR --hosts ...`)")
        if self.ps.shards < 1:
            errs.append("ps.shards must be >= 1")
        if self.ps.optimizer not in ("adagrad", "adam"):
            errs.append(f"ps.optimizer {self.ps.optimizer!r} is not one of: adagrad, adam")
        if self.ps.lr <= 0 or self.ps.eps < 0 or self.ps.initial_accumulator < 0:
            errs.append("ps.lr must be > 0, ps.eps and ps.initial_accumulator >= 0")
        if self.ps.lr_warmup_updates < 0:
            errs.append(f"ps.lr_warmup_updates must be >= 0 (0: off), got {self.ps.lr_warmup_updates}")
        if self.ps.max_staleness < 0 or self.ps.max_staleness_s < 0 or self.ps.staleness_factor < 0:
            errs.append("ps.max_staleness, ps.max_staleness_s and ps.staleness_factor must be >= 0 (0: off)")
        if 0 < self.ps.staleness_factor < 2:
            errs.append("ps.staleness_factor below 2 would refuse honest gradients (half are older than the median)")
        if self.agent.batch_layout not in ("auto", "pairs", "frames"):
            errs.append(f"agent.batch_layout {self.agent.batch_layout!r} is not one of: auto, pairs, frames")
        elif self.agent.batch_layout == "frames" and self.agent.n_step != 1:
            errs.append(f"agent.batch_layout=frames needs agent.n_step=1 (it is {self.agent.n_step}): only then is "
                        "next_obs obs shifted by one frame; use auto or pairs")
        if self.net.shm_push not in ("auto", "off"):
            errs.append(f"net.shm_push must be 'auto' or 'off', not {self.net.shm_push!r}")
        if self.net.grad_dtype not in ("float32", "bfloat16", "float16"):
            errs.append(f"net.grad_dtype {self.net.grad_dtype!r} is not one of: float32, bfloat16, float16")
        if self.agent.grads_per_push < 1:
            errs.append("agent.grads_per_push must be >= 1")
        if self.ps.broadcast_every < 1 or self.ps.broadcast_min_interval_ms < 0:
            errs.append("ps.broadcast_every must be >= 1 and ps.broadcast_min_interval_ms >= 0")
        if self.net.in_flight < 1 or self.net.io_threads < 1:
            errs.append("net.in_flight and net.io_threads must be >= 1")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", self.agent.device):
            errs.append(f"agent.device {self.agent.device!r} is not one of: auto, cpu, cuda, cuda:N, mps")
        if self.eval.episodes < 1 or not 0.0 <= self.eval.epsilon <= 1.0:
            errs.append("eval.episodes must be >= 1 and eval.epsilon in [0, 1]")
        if self.ps.bad_checkpoint not in ("refuse", "initial"):
            errs.append(f"ps.bad_checkpoint {self.ps.bad_checkpoint!r} is not one of: refuse, initial")
        if self.net.in_flight > 1024:
            errs.append("net.in_flight must be <= 1024 (a shard remembers the outcome of each client's latest 1,024 pushes)")
        if any(h <= 0 for h in self.model.hidden) or any(d <= 0 for d in self.model.obs_shape):
            errs.append("model.hidden and model.obs_shape must hold positive sizes")
        if self.roles.mode not in ("bundled", "global"):
            errs.append(f"roles.mode must be 'bundled' or 'global', not {self.roles.mode!r}")
        for k in ("bundles", "actors", "learners", "replay_shards"):
            if getattr(self.roles, k) < 1:
                errs.append(f"roles.{k} must be >= 1")
        if self.env.num_envs < 1:
            errs.append("env.num_envs must be >= 1")
        if self.agent.batch_size < 1 or self.agent.n_step < 1 or not 0 <= self.agent.gamma <= 1:
            errs.append("agent.batch_size and agent.n_step must be >= 1, agent.gamma in [0, 1]")
        if self.agent.replay_capacity < self.agent.batch_size:
            errs.append("agent.replay_capacity must be at least agent.batch_size")
        if self.agent.learning_starts > self.agent.replay_capacity:
            errs.append("agent.learning_starts must not exceed agent.replay_capacity (the learner would never start)")
        if self.roles.mode == "global" and self.roles.replay_shards > self.roles.actors:
            errs.append("roles.replay_shards must not exceed roles.actors (a shard nobody writes to stays empty)")
        if self.agent.limiter_stall_s <= 0:
            errs.append("agent.limiter_stall_s must be > 0")
        if self.agent.max_updates_ahead < 0:
            errs.append("agent.max_updates_ahead must be >= 0 (0: the learners are not held)")
        if self.agent.torch_threads < 1 or self.agent.learner_torch_threads < 0:
            errs.append("agent.torch_threads must be >= 1 and agent.learner_torch_threads >= 0")
        a = self.agent
        if a.priority_alpha < 0 or not 0 <= a.priority_beta <= 1 or a.priority_eps <= 0 or a.priority_beta_updates < 0:
            errs.append("agent.priority_alpha must be >= 0, agent.priority_beta in [0, 1], agent.priority_eps > 0 "
                        "and agent.priority_beta_updates >= 0")
        if a.actor_priorities and not (a.prioritized and self.roles.mode == "global"):
            errs.append("agent.actor_priorities needs agent.prioritized and roles.mode = global (in bundled mode the "
                        "learner's tree gives new transitions the current max)")
        if a.priority_weight_norm not in ("batch", "memory"):
            errs.append(f"agent.priority_weight_norm {a.priority_weight_norm!r} is not one of: batch, memory")
        if self.agent.actor_sync_every < 1:
            errs.append("agent.actor_sync_every must be >= 1")
        if self.ps.max_payload_factor < 1:
            errs.append("ps.max_payload_factor must be >= 1 (ZeroMQ would refuse every gradient)")
        if self.agent.name not in ("dqn", "drqv2") and not re.fullmatch(r"[\w.]+:\w+", self.agent.name):
            errs.append(f"agent.name {self.agent.name!r} is not one of: dqn, drqv2 (or package.module:Class)")
        section = {"dqn": self.dqn, "drqv2": self.drqv2}.get(self.agent.name)   # the agent's own section
        if section is not None:
            errs += section.errors()
        errs += self._port_errors()
        if errs:
            raise ConfigError("invalid configuration:\n  " + "\n  ".join(errs))
        self._warn_staleness()
        return self

    def _warn_staleness(self) -> None:
        """With N learners an honest gradient meets ~N other pushes before it lands: a count bound below
        2N + broadcast_every throws most of them away (docs/SCALING.md)."""
        learners = self.roles.bundles if self.roles.mode == "bundled" else self.roles.learners
        need = 2 * learners + self.ps.broadcast_every
        if 0 < self.ps.max_staleness < need and not (self.ps.max_staleness_s or self.ps.staleness_factor) \
                and need not in _WARNED:
            _WARNED.add(need)
            log.warning("ps.max_staleness=%d is below 2 x %d learners + ps.broadcast_every = %d: most gradients "
                        "may be discarded as stale; raise it or bound the age instead (ps.max_staleness_s, "
                        "docs/SCALING.md)", self.ps.max_staleness, learners, need)

    def _port_errors(self) -> list[str]:
        """Ports are offsets from net.base_port (net/topology.py): shards at 2i and 2i+1, replay shards,
        actors' and learners' control sockets and the evaluator's in blocks of 1,000 above. Counts that
        would make two blocks overlap are refused here, not found as a bind error on one host."""
        from_block = {"ps.shards (2 ports each)": 2 * self.ps.shards, "roles.replay_shards": self.roles.replay_shards,
                      "actors (roles.actors or roles.bundles)": max(self.roles.actors, self.roles.bundles),
                      "learners (roles.learners or roles.bundles)": max(self.roles.learners, self.roles.bundles)}
        errs = [f"{what} needs {n} ports, more than the 1,000 its block of net.base_port offsets holds"
                for what, n in from_block.items() if n > 1000]
        if self.net.transport == "tcp" and not 0 < self.net.base_port <= 65535 - 6000:
            errs.append(f"net.base_port {self.net.base_port} leaves no room for the run's ports (1 .. 59535)")
        return errs


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
    elif origin is dict:
        if isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            return dict(value)
        if isinstance(value, str):
            try:
                v = json.loads(value)
                if isinstance(v, dict):
                    return _coerce(v, tp, where)
            except json.JSONDecodeError:
                pass
    elif origin is list:
        items = None
        if isinstance(value, list):
            items = value
        elif isinstance(value, str):
            try:
                v = json.loads(value)
                if isinstance(v, list):
                    items = v
            except json.JSONDecodeError:
                items = [x.strip() for x in value.split(",") if x.strip()]
        if items is not None:
            (elem,) = typing.get_args(tp) or (None,)
            if elem is None:
                return list(items)
            try:
                return [_coerce(x, elem, f"{where}[{k}]") for k, x in enumerate(items)]
            except ConfigError as e:
                raise ConfigError(f"{e} (a list of {elem.__name__}s, e.g. [64,64])") from None
    raise ConfigError(f"{where}: expected {getattr(origin, '__name__', origin)}, got {value!r}")


def _section_types(cls) -> dict[str, type]:
    return typing.get_type_hints(cls)


# Names renamed in 0.2, still accepted (with a warning) for one release: old -> new.
RENAMED = {**{f"agent.{k}": f"dqn.{k}" for k in ("double_dqn", "huber", "target_sync_every", "eps_start", "eps_end",
                                                  "eps_anneal_updates", "eps_per_actor")},
           **{f"agent.{k}": f"drqv2.{k}" for k in ("std_schedule", "std_clip", "seed_frames", "critic_tau",
                                                    "actor_pretanh_reg")},
           "env.frame_skip": "env.action_repeat"}
_warned: set[str] = set()


def _renamed(data: dict, where: str) -> dict:
    """`data` (a whole config) with renamed fields moved to their new names, each warned about once."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for old, new in RENAMED.items():
        (s_old, f_old), (s_new, f_new) = old.split("."), new.split(".")
        sec = out.get(s_old)
        if not isinstance(sec, dict) or f_old not in sec:
            continue
        value = sec.pop(f_old)
        target = out.setdefault(s_new, {})
        if isinstance(target, dict):
            target.setdefault(f_new, value)      # a value given under the new name wins
        if old not in _warned:
            _warned.add(old)
            log.warning("%s: %s is now %s (the old name is accepted until the next release)", where, old, new)
    return out


def apply_dict(cfg, data: dict, where: str = "config"):
    """Set fields of dataclass `cfg` from a nested dict; unknown keys are errors."""
    if isinstance(cfg, Config):
        data = _renamed(data, where)
    hints = _section_types(type(cfg))
    for key, value in data.items():
        if key not in hints:
            valid = ", ".join(sorted(hints))
            raise ConfigError(f"{where}: unknown key {key!r} (valid: {valid})")
        cur = getattr(cfg, key)
        if isinstance(cur, dict) and isinstance(value, dict):      # a mapping field: entries merge
            setattr(cfg, key, {**cur, **_coerce(value, hints[key], f"{where}.{key}")})
        elif dataclasses.is_dataclass(cur):
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
    if len(parts) == 3 and parts[:2] == ["net", "placement"]:          # net.placement.ps0=10.0.0.1
        return {"net": {"placement": {parts[2]: value}}}
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
        presets = PRESETS if presets is None else presets
        if preset not in presets:
            raise ConfigError(f"unknown preset {preset!r} (available: {', '.join(sorted(presets))})")
        apply_dict(cfg, presets[preset], f"preset {preset}")
    if path:
        try:
            with open(path, "rb") as f:
                if path.endswith(".json"):       # a run's resolved config (what roles are started with)
                    data = json.load(f)
                else:
                    data = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path}: not valid {'JSON' if path.endswith('.json') else 'TOML'}: {e}") from None
        apply_dict(cfg, data, path)
    for o in overrides:
        apply_dict(cfg, parse_override(o), f"override {o!r}")
    return cfg.validate()


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(data: dict) -> Config:
    return apply_dict(Config(), data).validate()


def save_json(cfg, path: str) -> None:
    write_json(path, to_dict(cfg), indent=2, sort_keys=True)


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
