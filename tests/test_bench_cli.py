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
