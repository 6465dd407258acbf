"""`gorila-zmq bench` argument handling (the benchmarks themselves run outside the tests)."""
import pytest

from gorila_zmq.bench import main


def test_bench_help_lists_the_benchmarks_own_options(capsys):
    with pytest.raises(SystemExit) as e:
        main(["learner", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--updates" in out and "--device" in out and "overrides" in out


def test_bench_without_or_with_an_unknown_name_prints_the_usage(capsys):
    for argv in ([], ["nope"], ["--help"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == (0 if argv == ["--help"] else 2)
        captured = capsys.readouterr()
        assert "gorila-zmq bench" in captured.out + captured.err
        assert "adagrad" in captured.out + captured.err          # the list of benchmarks


def test_bench_json_may_come_before_the_name(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--json", "out.json", "learner", "--help"])
    assert e.value.code == 0 and "--updates" in capsys.readouterr().out


def test_e2e_single_process_baseline_acts_and_learns_at_the_replay_ratio(make_cfg):
    """bench e2e's baseline: one process alternating acting and learning, one update per
    max_steps_per_update agent steps once learning_starts transitions are in."""
    from gorila_zmq.agents.base import prepare
    from gorila_zmq.bench.e2e import single_process
    cfg = make_cfg("env.name=CartPole-v1", "model.kind=mlp", "model.hidden=[16]", "env.clip_rewards=false",
                   "agent.learning_starts=200", "agent.batch_size=16", "agent.max_steps_per_update=4",
                   "agent.replay_capacity=5000", "agent.outlier_k=0", "ps.optimizer=adam", "ps.lr=1e-3")
    prepare(cfg)
    out = single_process(cfg, warmup=0.5, seconds=1.5, threads=1)
    assert out["learn_from"] is not None and out["updates"] > 10
    assert out["turns"] == out["updates"]                              # no filter: every turn an update
    assert (out["steps"] - out["learn_from"]) // 4 + 1 == out["turns"]  # one per 4 steps since learning began
    assert out["env_frames_per_s"] > 0 and out["updates_per_s"] > 0 and out["threads"] == 1
