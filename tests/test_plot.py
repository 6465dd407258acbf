"""`gorila-zmq plot`: run directories and reference CSVs in, a figure (and a table) out."""
import json
import os
import sys

import numpy as np
import pytest

from gorila_zmq import cli
from gorila_zmq import plot as P
from gorila_zmq.fields import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLEANRL = os.path.join(REPO, "docs", "cleanrl_pong_curve.csv")     # a copy of ../shared/data/'s
DRQ_PAPER = os.path.join(REPO, "docs", "drqv2_paper_cartpole_swingup.csv")


def make_run(tmp_path, name, frames, returns, minutes, game="Pong", action_repeat=4):
    d = tmp_path / name
    d.mkdir()
    t0 = 1_800_000_000.0
    with open(d / "evaluations.jsonl", "w") as f:
        for fr, r, m in zip(frames, returns, minutes):
            f.write(json.dumps({"episodes": 5, "return_mean": r, "return_min": r - 1, "return_max": r + 1,
                                "global_updates": fr // 16, "wall_time": t0 + 60 * m, "env_frames": fr}) + "\n")
    (d / "config.json").write_text(json.dumps({"env": {"name": game, "action_repeat": action_repeat}}))
    return str(d)


def test_aggregate_interpolates_onto_the_first_runs_points_inside_the_common_range():
    xs = [np.array([0.0, 10, 20, 30]), np.array([5.0, 15, 25])]
    ys = [np.array([0.0, 10, 20, 30]), np.array([10.0, 30, 50])]      # second: y = 2x at its points
    grid, mean, lo, hi = P.aggregate(xs, ys)
    np.testing.assert_array_equal(grid, [10, 20])                    # 0 and 30 lie outside [5, 25]
    second = np.array([20.0, 40.0])                                  # interpolated at 10 and 20
    np.testing.assert_allclose(mean, (np.array([10.0, 20]) + second) / 2)
    np.testing.assert_allclose(lo, [10, 20])
    np.testing.assert_allclose(hi, second)


def test_load_run_reads_times_from_the_first_evaluation_and_the_game(tmp_path):
    d = make_run(tmp_path, "a", [40_000, 80_000, 120_000], [-21.0, -20.0, -15.0], [3.0, 8.0, 13.0])
    r = P.load_run(d)
    assert r.game == "Pong" and r.action_repeat == 4 and r.label == "a"
    np.testing.assert_allclose(r.minutes, [0.0, 5.0, 10.0])
    np.testing.assert_array_equal(r.frames, [40_000, 80_000, 120_000])
    np.testing.assert_array_equal(r.low, [-22, -21, -16])


def test_a_resumed_runs_curve_against_time_leaves_out_the_time_it_was_stopped(tmp_path):
    """Evaluator records carry `run_seconds` (up time over every start of a run): the time panel uses it
    when every record has it, so an hour's stop between evaluations 2 and 3 is not drawn; a run whose
    records lack it (older evaluators) keeps the wall clock."""
    d = make_run(tmp_path, "resumed", [40_000, 80_000, 120_000], [-21.0, -20.0, -15.0], [0.0, 5.0, 65.0])
    path = os.path.join(d, "evaluations.jsonl")
    rows = [json.loads(line) for line in open(path)]
    for r, up in zip(rows, [10.0, 310.0, 610.0]):
        r["run_seconds"] = up
    open(path, "w").write("".join(json.dumps(r) + "\n" for r in rows))
    np.testing.assert_allclose(P.load_run(d).minutes, [0.0, 5.0, 10.0])
    del rows[1]["run_seconds"]
    open(path, "w").write("".join(json.dumps(r) + "\n" for r in rows))
    np.testing.assert_allclose(P.load_run(d).minutes, [0.0, 5.0, 65.0])


def test_load_run_reads_a_docs_copy_with_its_config_beside_it():
    r = P.load_run(os.path.join(REPO, "docs", "pong_run3_evaluations.jsonl"))
    assert r.label == "pong_run3" and r.game == "Pong" and len(r.rows) >= 10


def test_bad_runs_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="no evaluations.jsonl"):
        P.load_run(str(tmp_path))
    (tmp_path / "evaluations.jsonl").write_text("")
    with pytest.raises(ConfigError, match="is empty"):
        P.load_run(str(tmp_path))
    (tmp_path / "evaluations.jsonl").write_text('{"return_mean": -21}\n')
    with pytest.raises(ConfigError, match=r"evaluations.jsonl:1: not an evaluation record"):
        P.load_run(str(tmp_path))


def test_references_place_agent_steps_as_frames_and_keep_every_seed(tmp_path):
    ref = P.load_reference(CLEANRL + ":CleanRL", steps_to_frames=4)
    assert ref.label == "CleanRL" and ref.values.shape[1] == 1
    np.testing.assert_array_equal(ref.frames[:2], [4 * 236_000, 4 * 487_000])
    np.testing.assert_array_equal(ref.minutes[:2], [30, 60])
    paper = P.load_reference(DRQ_PAPER, steps_to_frames=2)
    assert paper.values.shape[1] == 10 and paper.minutes is None and paper.frames[1] == 20_000
    bad = tmp_path / "bad.csv"
    bad.write_text("seed_1,seed_2\n1,2\n")
    with pytest.raises(ConfigError, match="no x column"):
        P.load_reference(str(bad), 4)
    bad.write_text("frame,seed_1\n0,abc\n")
    with pytest.raises(ConfigError, match="must be numbers"):
        P.load_reference(str(bad), 4)
    with pytest.raises(ConfigError, match="not found"):
        P.load_reference(str(tmp_path / "missing.csv"), 4)


def test_plot_draws_each_run_their_mean_and_spread_and_the_references(tmp_path):
    pytest.importorskip("matplotlib")
    a = make_run(tmp_path, "seed0", [0, 100, 200, 300], [-21.0, -15.0, -5.0, 5.0], [0, 10, 20, 30])
    b = make_run(tmp_path, "seed1", [0, 100, 200, 300], [-21.0, -19.0, -11.0, -1.0], [0, 11, 21, 31])
    out = str(tmp_path / "curve.png")
    fig = P.plot([P.load_run(a), P.load_run(b)], out, [P.load_reference(CLEANRL, 4)], hlines=[(-20.7, "random")])
    try:
        with open(out, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        frames_ax, wall_ax = fig.axes[0], fig.axes[1]
        lines = {ln.get_label(): ln for ln in frames_ax.get_lines()}
        mean = lines["mean of 2 runs"]
        np.testing.assert_array_equal(mean.get_xdata(), [0, 100, 200, 300])
        np.testing.assert_allclose(mean.get_ydata(), [-21, -17, -8, 2])
        assert "seed0" in lines and "seed1" in lines
        ref = [ln for k, ln in lines.items() if k.startswith("cleanrl_pong_curve")]
        assert ref and ref[0].get_xdata()[0] == 4 * 236_000
        wall_refs = [ln for ln in wall_ax.get_lines() if ln.get_label().startswith("cleanrl")]
        assert wall_refs and wall_refs[0].get_xdata()[0] == 30
        # the right axis reads human-normalised Pong scores: the random score is 0 %
        sec = [c for c in frames_ax.child_axes]
        assert sec and sec[0].get_ylabel() == "human-normalised (%)"
    finally:
        import matplotlib.pyplot as plt
        plt.close(fig)


def test_cli_writes_the_image_and_the_table(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    a = make_run(tmp_path, "run", [40_000, 80_000], [-21.0, -12.5], [0, 5])
    out = tmp_path / "c.png"
    assert cli.main(["plot", a, "-o", str(out), "--label", "mine", "--hline=-20.7:random", "--table"]) == 0
    text = capsys.readouterr().out
    assert out.stat().st_size > 1000
    assert "wrote" in text and "| 5.0 | 80,000 | 5,000 | 5 | -12.50 | -14 | -12 |" in text
    assert cli.main(["plot", str(tmp_path / "nope"), "-o", str(out)]) == 2
    assert "no evaluations.jsonl" in capsys.readouterr().err


def test_without_matplotlib_the_message_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ConfigError, match=r"pip install -e '.\[plot\]'"):
        P._pyplot()


def test_no_mean_overlays_runs_of_different_settings(tmp_path):
    pytest.importorskip("matplotlib")
    a = make_run(tmp_path, "lr1", [0, 100], [-21.0, -15.0], [0, 10])
    b = make_run(tmp_path, "lr2", [0, 100, 200], [-21.0, -19.0, -10.0], [0, 10, 20])
    fig = P.plot([P.load_run(a), P.load_run(b)], str(tmp_path / "c.png"), mean=False, max_frames=150)
    try:
        labels = [ln.get_label() for ln in fig.axes[0].get_lines()]
        assert labels == ["lr1", "lr2"] and fig.axes[0].get_xlim()[1] == 150
        # --max-frames clips both panels: the wall-time panel shows the same stretch of each run
        wall = {ln.get_label(): list(ln.get_xdata()) for ln in fig.axes[1].get_lines()}
        assert wall["lr2"] == [0, 10] and wall["lr1"] == [0, 10]
    finally:
        import matplotlib.pyplot as plt
        plt.close(fig)
    with pytest.raises(ConfigError, match="no evaluation at or below 50"):
        P.plot([P.load_run(make_run(tmp_path, "late", [100, 200], [-21.0, -20.0], [0, 5]))],
               str(tmp_path / "d.png"), max_frames=50)
