"""The load test's plan (the load test itself is a command: `python -m sparsity_app loadtest`, minutes long)."""
import pytest

from sparsity_app.bench.load import configurations
from sparsity_app.cli.main import main
from sparsity_app.runs import resolve


def test_each_session_runs_the_fixed_configuration_second_and_its_own_others():
    plan, fixed = configurations(8, 3, 128)
    assert [len(runs) for runs in plan] == [3] * 8 and all(runs[1] == fixed for runs in plan)
    others = [s for runs in plan for i, s in enumerate(runs) if i != 1]
    assert len(set(others)) == 16 and fixed not in others  # uncached: no two sessions share one
    assert all(resolve.layer(s).shape == (384, 384) and s.tokens == 128 for s in others)
    assert configurations(2, 1, 16)[0] == [[configurations(2, 1, 16)[1]]] * 2


@pytest.mark.parametrize("args, words", [(["--sessions", "0"], "--sessions must be in [1, 32]"),
                                         (["--sessions", "30", "--runs", "10"], "distinct configurations"),
                                         (["--quiet-runs", "0"], "--quiet-runs must be in [1, 32]")])
def test_bad_arguments_are_one_line(args, words, capsys):
    assert main(["loadtest", *args]) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1
