"""`gorila-zmq plot RUN_DIR [RUN_DIR ...] -o curve.png`: learning curves from run directories.

Each run directory holds the evaluator's `evaluations.jsonl` (one line per evaluation) and the
resolved `config.json`; a copy kept as NAME_evaluations.jsonl beside NAME_config.json (docs/) reads
the same. The figure has two panels, the evaluation's mean return against environment frames and
against wall time (minutes since the run's first evaluation; of the run's up time, `run_seconds`, when
every record has it, so a resumed run's curve leaves out the time it was stopped). Each run is a thin
line; with two or more runs, their mean and their spread (min to max over the runs) are drawn at the first run's
evaluation points inside the range every run covers (the others interpolated linearly); `--no-mean`
overlays runs of different settings without them. For an Atari game with a normalisation table the
right axis reads the same return as a human-normalised score (envs/scores.py).

Reference curves come from CSV files (`--reference FILE[:LABEL]`, repeatable): a header row, then
numbers. A `wall_minutes` column places the curve on the wall-time panel; a `frame`, `frames` or
`env_frames` column on the frames panel (an `agent_steps` column does too, times the action repeat of
the first run, or `--steps-to-frames`). Every other column is a value: one draws a line, several (e.g.
the DrQ-v2 paper's seeds) their mean and their min-max band.

`--table` prints each run's evaluations as a markdown table as well. matplotlib comes with the `plot`
extra (`pip install -e '.[plot]'`).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
from dataclasses import dataclass, replace

import numpy as np

from gorila_zmq.fields import ConfigError

FRAME_COLUMNS = ("frame", "frames", "env_frames")


@dataclass
class Run:
    path: str
    label: str
    game: str
    action_repeat: int
    frames: np.ndarray           # env frames at each evaluation
    minutes: np.ndarray          # minutes since the first evaluation (of up time when recorded)
    mean: np.ndarray
    low: np.ndarray              # min and max over the evaluation's episodes
    high: np.ndarray
    rows: list


def load_run(path: str, label: str | None = None) -> Run:
    """A run's evaluations (ConfigError if it has none) and the game it trained on. `path` is a run
    directory, or a copy of its evaluations as NAME_evaluations.jsonl beside NAME_config.json (docs/)."""
    if os.path.isfile(path) and path.endswith("_evaluations.jsonl"):
        ev, cfg_path = path, path[:-len("evaluations.jsonl")] + "config.json"
        label = label or os.path.basename(path)[:-len("_evaluations.jsonl")]
    else:
        ev, cfg_path = os.path.join(path, "evaluations.jsonl"), os.path.join(path, "config.json")
    if not os.path.isfile(ev):
        raise ConfigError(f"{path}: no evaluations.jsonl (is it a run directory? run.run_dir of a run "
                          "whose evaluator has evaluated at least once)")
    rows = []
    with open(ev) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                float(r["return_mean"]), int(r["env_frames"]), float(r["wall_time"])
            except (ValueError, KeyError, TypeError) as e:
                raise ConfigError(f"{ev}:{n}: not an evaluation record ({type(e).__name__}: {e})") from None
            rows.append(r)
    if not rows:
        raise ConfigError(f"{ev} is empty: the run has not been evaluated yet")
    cfg = {}
    if os.path.isfile(cfg_path):
        with open(cfg_path) as f:
            cfg = json.load(f)
    env = cfg.get("env", {})
    col = lambda k, default=None: np.array([r.get(k, r["return_mean"] if default is None else default)  # noqa: E731
                                            for r in rows], np.float64)
    clock = "run_seconds" if all(isinstance(r.get("run_seconds"), (int, float)) for r in rows) else "wall_time"
    seconds = col(clock)
    return Run(path=path, label=label or os.path.basename(os.path.normpath(path)), game=env.get("name", ""),
               action_repeat=int(env.get("action_repeat", 1)), frames=col("env_frames"),
               minutes=(seconds - seconds.min()) / 60.0, mean=col("return_mean"), low=col("return_min"),
               high=col("return_max"), rows=rows)


@dataclass
class Reference:
    label: str
    frames: np.ndarray | None     # x on the frames panel (None: not on it)
    minutes: np.ndarray | None    # x on the wall-time panel
    values: np.ndarray            # (points, columns)
    names: list


def load_reference(spec: str, steps_to_frames: float) -> Reference:
    """FILE[:LABEL] -> the curve (see the module docstring for the columns it understands)."""
    path, _, label = spec.partition(":") if not os.path.isfile(spec) else (spec, "", "")
    if not os.path.isfile(path):
        raise ConfigError(f"reference curve not found: {path}")
    with open(path, newline="") as f:
        reader = csv.reader(f)
        try:
            header = [h.strip() for h in next(reader)]
            body = [[float(x) for x in row] for row in reader if row]
        except StopIteration:
            raise ConfigError(f"{path}: empty file") from None
        except ValueError as e:
            raise ConfigError(f"{path}: every row after the header must be numbers ({e})") from None
    if not body or any(len(row) != len(header) for row in body):
        raise ConfigError(f"{path}: needs rows of {len(header)} numbers under its header")
    data = np.array(body, np.float64)
    cols = {h: data[:, i] for i, h in enumerate(header)}
    frames = next((cols[c] for c in FRAME_COLUMNS if c in cols), None)
    if frames is None and "agent_steps" in cols:
        frames = cols["agent_steps"] * steps_to_frames
    minutes = cols.get("wall_minutes")
    if frames is None and minutes is None:
        raise ConfigError(f"{path}: no x column (one of {', '.join(FRAME_COLUMNS)}, agent_steps, wall_minutes)")
    names = [h for h in header if h not in FRAME_COLUMNS + ("agent_steps", "wall_minutes")]
    if not names:
        raise ConfigError(f"{path}: no value column beside its x columns")
    return Reference(label or os.path.splitext(os.path.basename(path))[0], frames, minutes,
                     np.stack([cols[n] for n in names], axis=1), names)


def aggregate(xs: list[np.ndarray], ys: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Mean, min and max over runs at the first run's x values inside the range all runs cover (the
    other runs interpolated linearly between their own evaluation points)."""
    lo, hi = max(x[0] for x in xs), min(x[-1] for x in xs)
    grid = xs[0][(xs[0] >= lo) & (xs[0] <= hi)]
    if grid.size == 0:
        return grid, grid, grid, grid
    at = np.stack([np.interp(grid, x, y) for x, y in zip(xs, ys)])
    return grid, at.mean(axis=0), at.min(axis=0), at.max(axis=0)


def clip_frames(runs: list[Run], references: list[Reference], max_frames: float) -> tuple[list, list]:
    """The evaluations (and reference points) up to `max_frames` frames, for both panels: the wall-time
    panel then shows the same stretch of each run as the frames panel. A reference with no frames
    column is kept whole."""
    out = []
    for r in runs:
        k = r.frames <= max_frames
        if not k.any():
            raise ConfigError(f"{r.path}: no evaluation at or below {max_frames:,.0f} frames (--max-frames)")
        out.append(replace(r, frames=r.frames[k], minutes=r.minutes[k], mean=r.mean[k], low=r.low[k],
                           high=r.high[k], rows=[row for row, keep in zip(r.rows, k) if keep]))
    refs = []
    for ref in references:
        if ref.frames is None:
            refs.append(ref)
            continue
        k = ref.frames <= max_frames
        refs.append(replace(ref, frames=ref.frames[k], values=ref.values[k],
                            minutes=None if ref.minutes is None else ref.minutes[k]))
    return out, refs


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("gorila-zmq plot needs matplotlib: pip install -e '.[plot]' "
                          "(or pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot(runs: list[Run], out: str, references: list[Reference] = (), title: str = "",
         hlines: list[tuple[float, str]] = (), mean: bool = True, max_frames: float | None = None):
    """Draw and save the figure; returns it (open: the caller closes it, plt.close(fig))."""
    plt = _pyplot()
    from gorila_zmq.envs.scores import normalization_table
    if max_frames is not None:
        runs, references = clip_frames(runs, references, max_frames)
    games = {r.game for r in runs}
    table = normalization_table(runs[0].game) if len(games) == 1 and runs[0].game else None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    many = len(runs) > 1
    for ax, key, xlabel in ((axes[0], "frames", "environment frames"),
                            (axes[1], "minutes", "wall time since the first evaluation (minutes)")):
        xs = [getattr(r, key) for r in runs]
        for i, r in enumerate(runs):
            ax.plot(xs[i], r.mean, "o-" if not many else ".-", lw=1.8 if not many else 0.9,
                    alpha=1.0 if not many else 0.55, color=f"C{i % 10}", label=f"{r.label}")
            if not many:
                ax.fill_between(xs[i], r.low, r.high, color="C0", alpha=0.2, label="min-max over the episodes")
        if many and mean:
            grid, avg, lo, hi = aggregate(xs, [r.mean for r in runs])
            if grid.size:
                ax.plot(grid, avg, "k-", lw=2.2, label=f"mean of {len(runs)} runs")
                ax.fill_between(grid, lo, hi, color="k", alpha=0.12, label=f"min-max over the {len(runs)} runs")
        for j, ref in enumerate(references):
            x = ref.frames if key == "frames" else ref.minutes
            if x is None:
                continue
            color = f"C{(len(runs) + j) % 10}"
            if ref.values.shape[1] == 1:
                ax.plot(x, ref.values[:, 0], "s--", color=color, label=f"{ref.label} ({ref.names[0]})")
            else:
                ax.plot(x, ref.values.mean(axis=1), "s--", color=color,
                        label=f"{ref.label}: mean of {ref.values.shape[1]}")
                ax.fill_between(x, ref.values.min(axis=1), ref.values.max(axis=1), color=color, alpha=0.12,
                                label=f"{ref.label}: min-max")
        for value, label in hlines:
            ax.axhline(value, color="gray", ls=":", label=label)
        if table is not None:
            name, rnd, human = table
            f = lambda r: 100.0 * (np.asarray(r) - rnd) / (human - rnd)          # noqa: E731
            g = lambda h: rnd + np.asarray(h) * (human - rnd) / 100.0           # noqa: E731
            ax.secondary_yaxis("right", functions=(f, g)).set_ylabel("human-normalised (%)")
        if max_frames is not None and key == "frames":
            ax.set_xlim(right=max_frames)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("evaluation return (mean)")
        ax.grid(alpha=0.3)
    axes[0].legend(loc="best", fontsize=7)
    if table is not None:
        title = title or runs[0].game
        fig.text(0.99, 0.01, f"human-normalised with the {table[0]}", ha="right", fontsize=7, color="gray")
    fig.suptitle(title or ", ".join(sorted(games)))
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    return fig


def markdown_table(run: Run) -> str:
    from gorila_zmq.envs.scores import human_normalized
    lines = [f"{run.label}:", "",
             "| wall time (min) | env frames | global updates | episodes | mean return | min | max | "
             "human-normalised (%) |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for i, r in enumerate(run.rows):
        hn = human_normalized(run.game, r["return_mean"]) if run.game else None
        lines.append(f"| {run.minutes[i]:.1f} | {int(r['env_frames']):,} | {int(r.get('global_updates', 0)):,} | "
                     f"{r.get('episodes', '')} | {r['return_mean']:.2f} | {run.low[i]:.0f} | {run.high[i]:.0f} | "
                     f"{'' if hn is None else f'{hn:.1f}'} |")
    return "\n".join(lines)


def _hline(text: str) -> tuple[float, str]:
    value, _, label = text.partition(":")
    try:
        return float(value), label or value
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be VALUE[:LABEL], not {text!r}") from None


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="gorila-zmq plot", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (run.run_dir)")
    p.add_argument("-o", "--out", required=True, help="the image to write (png, svg, pdf)")
    p.add_argument("--label", action="append", default=[], help="a run's legend label, in RUN_DIR order "
                   "(default: the directory's name)")
    p.add_argument("--reference", action="append", default=[], metavar="CSV[:LABEL]",
                   help="a reference curve (repeatable): e.g. docs/cleanrl_pong_curve.csv:CleanRL")
    p.add_argument("--steps-to-frames", type=float, default=None,
                   help="frames per agent step for a reference's agent_steps column (default: the first "
                        "run's env.action_repeat)")
    p.add_argument("--hline", action="append", type=_hline, default=[], metavar="VALUE[:LABEL]",
                   help="a horizontal line, e.g. --hline=-20.7:random")
    p.add_argument("--title", default="")
    p.add_argument("--no-mean", action="store_true", help="runs of different settings: overlay them without "
                   "their mean and spread")
    p.add_argument("--max-frames", type=float, default=None,
                   help="plot only evaluations up to this many frames (both panels); the frames axis ends here")
    p.add_argument("--table", action="store_true", help="print each run's evaluations as a markdown table")
    a = p.parse_args(argv)
    if len(a.label) > len(a.runs):
        raise ConfigError(f"{len(a.label)} --label for {len(a.runs)} runs")
    runs = [load_run(path, a.label[i] if i < len(a.label) else None) for i, path in enumerate(a.runs)]
    spf = a.steps_to_frames if a.steps_to_frames is not None else runs[0].action_repeat
    refs = [load_reference(s, spf) for s in a.reference]
    _pyplot()                                    # the clear message before any work
    _pyplot().close(plot(runs, a.out, refs, a.title, a.hline, mean=not a.no_mean, max_frames=a.max_frames))
    print(f"wrote {a.out}: {len(runs)} run(s), {sum(len(r.rows) for r in runs)} evaluations"
          + (f", {len(refs)} reference curve(s)" if refs else ""))
    if a.table:
        for r in runs:
            print("\n" + markdown_table(r))
    return 0
