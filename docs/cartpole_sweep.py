"""How reliably does `gorila-zmq dev --preset cartpole` solve CartPole-v1? Runs it N times with the given
overrides and reports, per run, the env frames (all actors) at the first greedy evaluation >= 195 —
the criterion of the slow test tests/test_dev_e2e.py::test_cartpole_learns_in_dev_mode.

    python docs/cartpole_sweep.py --runs 8 roles.mode=global roles.actors=2 roles.replay_shards=1 roles.learners=1
    python docs/cartpole_sweep.py --runs 8 ps.shards=2 roles.bundles=2 ps.lr=0.01

Each run is a real process tree; run it on an otherwise idle machine. Evaluations come every
eval.interval_s (10 s), so a first solve is known to within one interval (~35-70 K frames here)."""
import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from gorila_zmq.net import topology  # noqa: E402  (ports below the ephemeral range)


def one(run_dir: str, overrides: list, cap_s: float, threshold: float) -> dict:
    with open(run_dir + ".log", "wb") as log:
        p = subprocess.Popen([sys.executable, "-m", "gorila_zmq.cli", "dev", "--preset", "cartpole",
                              "--duration", str(int(cap_s) + 60), f"run.run_dir={run_dir}",
                              f"net.base_port={topology.free_base_port()}", *overrides],
                             stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
    t0, got, evs = time.monotonic(), None, []
    try:
        while got is None and time.monotonic() - t0 < cap_s and p.poll() is None:
            time.sleep(1.0)
            try:
                with open(os.path.join(run_dir, "evaluations.jsonl")) as f:
                    evs = [json.loads(line) for line in f if line.strip()]
            except FileNotFoundError:
                continue
            got = next((e for e in evs if e["return_mean"] >= threshold), None)
    finally:
        exited = p.poll()                       # not None: dev mode ended by itself (a crash, not a slow run)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(p.pid, sig)           # the whole process group: the roles too
            except ProcessLookupError:
                break
            try:
                p.wait(60)
                break
            except subprocess.TimeoutExpired:
                continue
    return {"exited_early": exited, "solved_frames": got and got["env_frames"], "solved_updates": got and got["global_updates"],
            "wall_s": round(time.monotonic() - t0), "evaluations": [round(e["return_mean"], 1) for e in evs],
            "evaluation_frames": [e["env_frames"] for e in evs]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=8)
    ap.add_argument("--cap-s", type=float, default=220.0, help="give a run up this many seconds (default 220)")
    ap.add_argument("--threshold", type=float, default=195.0)
    ap.add_argument("--dir", default=None, help="where the runs go (default: a new temporary directory)")
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. ps.lr=0.01")
    a = ap.parse_args()
    top = a.dir or tempfile.mkdtemp(prefix="cartpole_sweep_")
    os.makedirs(top, exist_ok=True)
    print(f"cartpole sweep: {a.runs} runs of `gorila-zmq dev --preset cartpole {' '.join(a.overrides)}` "
          f"in {top}", flush=True)
    frames = []
    for i in range(a.runs):
        seed = [] if any(o.startswith("run.seed=") for o in a.overrides) else [f"run.seed={i}"]   # one seed per run
        r = one(os.path.join(top, f"run{i}"), a.overrides + seed, a.cap_s, a.threshold)
        frames.append(r["solved_frames"])
        print(json.dumps({"run": i, **r}), flush=True)
    ok = sorted(f for f in frames if f is not None)
    print(json.dumps({"runs": a.runs, "solved": len(ok), "frames_median": ok and statistics.median(ok),
                      "frames_max": ok and ok[-1], "over_600k": sum(f is None or f > 600_000 for f in frames),
                      "overrides": a.overrides}), flush=True)


if __name__ == "__main__":
    main()
