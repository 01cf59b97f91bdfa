import math

import pytest

import ulskip
from ulskip.cli import main


@pytest.mark.parametrize("L,s,expected", [
    (30, 2, [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 29]),
    (30, 3, [0, 3, 6, 9, 12, 15, 18, 21, 24, 29]),
    (30, 5, [0, 6, 12, 18, 24, 29]),
    (30, 10, [0, 15, 29]),
    (32, 3, [0, 3, 6, 9, 12, 15, 18, 21, 24, 31]),
    (32, 1, list(range(32))),
    (30, 15, [0, 29]),
])
def test_paper_rule_examples(L, s, expected):
    assert ulskip.uls_schedule(L, s) == expected


@pytest.mark.parametrize("strategy", ["paper", "even"])
@pytest.mark.parametrize("L", [2, 3, 7, 24, 30, 32, 40, 80])
def test_count_ends_and_order_for_many_speedups(L, strategy):
    for s in [s for s in (1, 1.3, 2, 2.5, 3, 4, 5.5, L / 2) if s <= L / 2]:
        kept = ulskip.uls_schedule(L, s, strategy)
        assert len(kept) == math.floor(L / s)
        assert kept[0] == 0 and kept[-1] == L - 1
        assert kept == sorted(set(kept)) and all(0 <= i < L for i in kept)


def test_even_strategy_spreads_evenly():
    assert ulskip.uls_schedule(30, 5, "even") == [0, 6, 12, 17, 23, 29]
    assert ulskip.uls_schedule(9, 3, "even") == [0, 4, 8]


@pytest.mark.parametrize("L,s", [(30, 0.5), (30, 0), (30, -2), (30, 15.5), (30, 100), (3, 2)])
def test_out_of_range_speedup_names_the_range(L, s):
    with pytest.raises(ValueError, match=r"target_speedup must be in \[1, "):
        ulskip.uls_schedule(L, s)


@pytest.mark.parametrize("s", ["2", None, float("nan"), float("inf"), True, [2]])
def test_speedup_not_a_number(s):
    with pytest.raises(ValueError, match="target_speedup"):
        ulskip.uls_schedule(30, s)


def test_bad_layers_and_strategy():
    with pytest.raises(ValueError, match="num_layers"):
        ulskip.uls_schedule(1, 1)
    with pytest.raises(ValueError, match="num_layers"):
        ulskip.uls_schedule(30.0, 2)
    with pytest.raises(ValueError, match="strategy must be one of"):
        ulskip.uls_schedule(30, 2, "random")


def test_layer_speedup():
    assert ulskip.layer_speedup(30, ulskip.uls_schedule(30, 5)) == 5.0


def test_cli_schedule(capsys):
    assert main(["schedule", "--layers", "30", "--target-speedup", "5"]) == 0
    out = capsys.readouterr().out
    assert "0,6,12,18,24,29" in out and "5.000x" in out
    with pytest.raises(SystemExit, match=r"\[1, 15\]"):
        main(["schedule", "--layers", "30", "--target-speedup", "50"])


def test_user_schedule_must_be_integers():
    from ulskip.schedule import validate_schedule
    import numpy as np
    assert validate_schedule(6, [5, np.int64(0), 2]) == [0, 2, 5]
    with pytest.raises(ValueError, match="integer layer indices"):
        validate_schedule(6, [0, 2.5, 5])
