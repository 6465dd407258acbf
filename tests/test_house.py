"""The house: layers that import only downward, the agent registry, the run's recorded layout, and
the one-of-each mechanisms (ports, renamed names, atomic writes, the loader's errors, role tracebacks)."""
import ast
import logging
import os
import pathlib
import subprocess
import sys

import pytest

from conftest import ROOT, SMALL_MLP
from gorila_zmq import config as C
from gorila_zmq.fields import ConfigError

PKG = pathlib.Path(ROOT) / "gorila_zmq"
# Bottom to top; a module may import its own layer and the layers below, never one above.
LAYERS = ["fields", "_native", "host", "net", "agents/common", "agents/*/config", "presets", "config", "ps", "replay",
          "envs", "agents", "roles", "launch", "plot", "bench", "cli"]


def _layer(mod: str) -> int:
    if mod == "gorila_zmq":
        return len(LAYERS)                  # the package's face: imports nothing, above everything
    rel = mod.removeprefix("gorila_zmq.").replace(".", "/")
    best = None
    for i, name in enumerate(LAYERS):
        pat = name.split("/")
        parts = rel.split("/")
        if len(parts) >= len(pat) and all(p == "*" or p == q for p, q in zip(pat, parts)):
            if best is None or len(pat) > len(LAYERS[best].split("/")):
                best = i
    assert best is not None, f"{mod} is in no layer"
    return best


def _imports(path: pathlib.Path) -> list[tuple[str, int, bool]]:
    """(module imported, line, at module level) for every gorila_zmq import in a file."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body} | {id(c) for n in tree.body if isinstance(n, ast.If) for c in n.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("gorila_zmq"):
            names = [node.module + "." + a.name for a in node.names] if node.module == "gorila_zmq" else [node.module]
            out += [(n, node.lineno, id(node) in top) for n in names]
        elif isinstance(node, ast.Import):
            out += [(a.name, node.lineno, id(node) in top) for a in node.names if a.name.startswith("gorila_zmq")]
    return out


def test_imports_only_go_down_the_layers():
    wrong = []
    for path in PKG.rglob("*.py"):
        mod = ".".join(path.relative_to(PKG.parent).with_suffix("").parts).removesuffix(".__init__")
        for target, line, _ in _imports(path):
            if target.startswith("gorila_zmq._ext"):
                continue
            if _layer(target) > _layer(mod):
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {target} (a higher layer)")
    assert not wrong, "\n".join(wrong)


def test_the_layer_check_sees_an_upward_import(tmp_path):
    """The check above is not vacuous: a ps/ module importing roles/ is found."""
    assert _layer("gorila_zmq.ps.client") < _layer("gorila_zmq.roles.base")
    f = tmp_path / "m.py"
    f.write_text("from gorila_zmq.roles.base import Role\n\ndef f():\n    from gorila_zmq.launch import program\n")
    assert [(t, top) for t, _, top in _imports(f)] == [("gorila_zmq.roles.base", True),
                                                        ("gorila_zmq.launch", False)]


def test_the_registry_names_agents_and_says_what_is_wrong():
    from gorila_zmq.agents import base
    assert base.get("dqn").name == "dqn" and base.get("drqv2").name == "drqv2"
    with pytest.raises(ConfigError, match="is not one of"):
        base.get("dqn2")
    with pytest.raises(ConfigError, match="cannot import"):
        base.get("no_such_module:Agent")
    with pytest.raises(ConfigError, match="is not a gorila_zmq.agents.base.Agent"):
        base.get("gorila_zmq.config:Config")
    with pytest.raises(ConfigError, match="agent.name"):
        C.load(None, ["agent.name=dqn2"])


def test_port_blocks_that_would_collide_are_refused():
    C.load(None, ["ps.shards=500", "roles.bundles=1000"])          # 1,000 shard ports, 1,000 actors: fit
    with pytest.raises(ConfigError, match="ps.shards"):
        C.load(None, ["ps.shards=501"])
    with pytest.raises(ConfigError, match="actors"):
        C.load(None, ["roles.mode=global", "roles.actors=1001", "roles.replay_shards=1"])
    with pytest.raises(ConfigError, match="net.base_port"):
        C.load(None, ["net.base_port=61000"])


def test_renamed_names_are_accepted_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="gorila_zmq.config"):
        cfg = C.load(None, ["agent.eps_anneal_updates=123", "agent.critic_tau=0.5", "env.frame_skip=3"])
    assert cfg.dqn.eps_anneal_updates == 123 and cfg.drqv2.critic_tau == 0.5 and cfg.env.action_repeat == 3
    cfg = C.from_dict({"agent": {"target_sync_every": 7}, "dqn": {"target_sync_every": 9}})
    assert cfg.dqn.target_sync_every == 9                          # the new name wins over the old


def test_atomic_write_leaves_the_old_file_or_the_new_one(tmp_path):
    from gorila_zmq.host.files import atomic_write
    path = tmp_path / "f.bin"
    with atomic_write(str(path)) as f:
        f.write(b"old")
    with pytest.raises(RuntimeError):
        with atomic_write(str(path)) as f:
            f.write(b"half of the new")
            raise RuntimeError("disk full")
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["f.bin"]


def test_a_prepared_run_records_its_layout_and_a_shard_needs_no_model(make_cfg):
    """A shard started from the run directory reads layout.json and its slice of init.npy; it never
    imports torch (so it never builds a network or opens an environment)."""
    from gorila_zmq.agents.base import build_network
    from gorila_zmq.launch.program import prepare_run
    from gorila_zmq.ps.layout import ParamLayout, load_run_layout
    cfg = make_cfg(*SMALL_MLP, "ps.shards=2")
    conf = prepare_run(cfg, from_env=False)
    net = build_network(cfg)
    want = ParamLayout.from_module(net)
    got = load_run_layout(cfg.run.run_dir)
    assert got.hash == want.hash and got.size == want.size
    code = ("import sys; from gorila_zmq import config as C; from gorila_zmq.roles.ps import ParameterServerShard\n"
            f"cfg = C.load({conf!r}); s = ParameterServerShard(cfg, 1)\n"
            "print(s.layout.hash, s.start, s.stop, float(s.state.theta.sum()), 'torch' in sys.modules); s.close()")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    h, a, b, total, torch_loaded = out.stdout.split()
    start, stop = want.shard_ranges(2)[1]
    assert (int(h), int(a), int(b)) == (want.hash, start, stop) and torch_loaded == "False"
    assert float(total) == pytest.approx(float(want.flatten(net)[start:stop].sum()), rel=1e-5)
    with pytest.raises(ConfigError, match="another network"):
        prepare_run(make_cfg(*SMALL_MLP, "ps.shards=2", "model.hidden=[8]", f"run.run_dir={cfg.run.run_dir}"),
                    from_env=False)


class _Source:
    """A batch source whose sample() raises what the test asks for."""

    def __init__(self, errors):
        self.errors, self.calls = list(errors), 0

    def refresh(self):
        pass

    def sample(self, B, rng, out):
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return out


def test_the_loader_waits_while_replay_is_not_ready_and_fails_on_a_real_error(caplog):
    from gorila_zmq.replay.memory import NotReady
    from gorila_zmq.roles.learner import Loader
    ok = Loader(_Source([NotReady("empty"), NotReady("empty")]), 4)
    ok.free.put("buf")
    ok.start()
    assert ok.get(timeout=5) == "buf" and ok.source.calls == 3      # two waits, then a batch
    ok.stop.set()
    bad = Loader(_Source([ValueError("out.obs must be ... shape (4, 8)")]), 4)
    bad.free.put("buf")
    with caplog.at_level(logging.ERROR):
        bad.start()
        bad.join(5)
    assert not bad.is_alive() and bad.source.calls == 1               # no silent retry of a shape bug
    with pytest.raises(RuntimeError, match="batch loader failed"):
        bad.get(timeout=0.1)
    assert any(r.exc_info and "out.obs" in str(r.exc_info[1]) for r in caplog.records)


def test_a_role_logs_the_traceback_of_an_unexpected_error_and_one_line_for_a_mistake(tmp_path, caplog):
    from gorila_zmq.roles.base import role_main

    def boom(cfg, i):
        raise ZeroDivisionError("a bug deep inside the role")

    def mistake(cfg, i):
        raise ConfigError("no ROM named Pongg")
    args = ["--index", "0", f"run.run_dir={tmp_path}"]
    with caplog.at_level(logging.ERROR):
        assert role_main(args, "learner", "x", boom, uses_torch=False) == 1
        assert role_main(args, "learner", "x", mistake, uses_torch=False) == 2
    crash, user = [r for r in caplog.records if r.levelno >= logging.ERROR][-2:]
    assert crash.exc_info and crash.exc_info[0] is ZeroDivisionError
    assert user.exc_info is None and "no ROM named Pongg" in user.getMessage()


def test_the_command_line_keeps_the_traceback_of_an_unexpected_error(tmp_path):
    """A user's mistake is one line and exit 2; a crash (here: a command function that raises a
    TypeError) is a traceback, never flattened into one line."""
    r = subprocess.run([sys.executable, "-m", "gorila_zmq.cli", "dev", f"run.run_dir={tmp_path}", "ps.shards=0"],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 2 and "ps.shards must be >= 1" in r.stderr and "Traceback" not in r.stderr
    code = "from gorila_zmq.cli import main, COMMANDS; COMMANDS['x'] = ('math', 'sqrt', ''); main(['x'])"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 1 and "Traceback" in r.stderr and "TypeError" in r.stderr
