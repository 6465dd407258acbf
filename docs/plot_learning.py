"""Plot a run's evaluations (RUN_DIR/evaluations.jsonl) against env frames and wall time, and print
the same as a markdown table.  Usage: python docs/plot_learning.py RUN_DIR OUT.png [--title T]

--paper CSV overlays a published curve on the frames axis: a CSV with a `frame` column and one column
per seed (e.g. docs/drqv2_paper_cartpole_swingup.csv), drawn as the median and the min-max band."""
import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("run_dir")
    p.add_argument("out")
    p.add_argument("--title", default="")
    p.add_argument("--reference", type=float, default=None, help="a horizontal line (e.g. the random score)")
    p.add_argument("--reference-label", default="random")
    p.add_argument("--paper", default=None, help="CSV: frame, then one column per seed (a published curve)")
    p.add_argument("--paper-label", default="paper")
    a = p.parse_args()
    rows = [json.loads(line) for line in open(f"{a.run_dir}/evaluations.jsonl") if line.strip()]
    t0 = rows[0]["wall_time"] - rows[0].get("eval_seconds", 0)
    cfg = json.load(open(f"{a.run_dir}/config.json"))
    start = min(r["wall_time"] for r in rows)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in ((axes[0], "env_frames", "environment frames"), (axes[1], "wall", "wall time (minutes)")):
        xs = [r["env_frames"] for r in rows] if key == "env_frames" else [(r["wall_time"] - start) / 60 for r in rows]
        ax.plot(xs, [r["return_mean"] for r in rows], "o-", label="evaluation mean return")
        ax.fill_between(xs, [r["return_min"] for r in rows], [r["return_max"] for r in rows], alpha=0.2,
                        label="min-max over episodes")
        if a.reference is not None:
            ax.axhline(a.reference, color="gray", ls="--", label=a.reference_label)
        if a.paper and key == "env_frames":
            import numpy as np
            ref = np.genfromtxt(a.paper, delimiter=",", names=True)
            seeds = np.stack([ref[n] for n in ref.dtype.names if n != "frame"], axis=1)
            upto = ref["frame"] <= max(xs) * 1.25
            ax.plot(ref["frame"][upto], np.median(seeds[upto], axis=1), "s--", color="tab:green",
                    label=f"{a.paper_label}: median of {seeds.shape[1]} seeds")
            ax.fill_between(ref["frame"][upto], seeds[upto].min(axis=1), seeds[upto].max(axis=1),
                            color="tab:green", alpha=0.12, label=f"{a.paper_label}: min-max")
        ax.set_xlabel(label)
        ax.set_ylabel("return")
        ax.grid(alpha=0.3)
    axes[0].legend(loc="best", fontsize=8)
    fig.suptitle(a.title or f"{cfg['env']['name']} ({cfg['roles']['mode']} mode)")
    fig.tight_layout()
    fig.savefig(a.out, dpi=100)
    print("| wall time (min) | env frames | global updates | episodes | mean return | min | max | human-normalised (%) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    from gorila_zmq.roles.evaluator import human_normalized    # the current table (runs logged before may differ)
    for r in rows:
        hn = human_normalized(cfg["env"]["name"], r["return_mean"]) if "human_normalized" in r else None
        print(f"| {(r['wall_time'] - start) / 60:.1f} | {r['env_frames']:,} | {r['global_updates']:,} | {r['episodes']} | "
              f"{r['return_mean']:.2f} | {r['return_min']:.0f} | {r['return_max']:.0f} | "
              f"{'' if hn is None else f'{hn:.1f}'} |")


if __name__ == "__main__":
    main()
