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
        ulskip.uls_schedule(30, 2, "fastest")  # ("random" became a policy)


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


@pytest.mark.parametrize("L,s", [(30, 2), (30, 5), (30, 10), (32, 3), (6, 2.5)])
def test_every_policy_keeps_the_same_budget(L, s):
    """Budgets are matched by kept layers per token: K = floor(L / s) for every policy."""
    bi = [float((7 * i) % L) for i in range(L)]
    for strategy in ulskip.schedule.STRATEGIES:
        kept = ulskip.uls_schedule(L, s, strategy, seed=1, block_influence=bi)
        assert len(kept) == math.floor(L / s) == len(set(kept)) and kept == sorted(kept), strategy
        assert 0 <= kept[0] and kept[-1] < L


def test_baseline_policies():
    assert ulskip.uls_schedule(30, 2, "uls") == ulskip.uls_schedule(30, 2, "paper")
    assert ulskip.uls_schedule(30, 5, "early-exit") == [0, 1, 2, 3, 4, 5]
    bi = [0.1] * 30
    bi[7], bi[3], bi[29], bi[12], bi[20], bi[0] = 0.9, 0.8, 0.7, 0.6, 0.5, 0.4
    assert ulskip.uls_schedule(30, 5, "shortgpt", block_influence=bi) == [0, 3, 7, 12, 20, 29]
    assert ulskip.uls_schedule(30, 10, "shortgpt", block_influence=[0.0] * 30) == [0, 1, 2]  # ties: lower layers
    a = ulskip.uls_schedule(30, 5, "random", seed=4)
    assert a == ulskip.uls_schedule(30, 5, "random", seed=4) != ulskip.uls_schedule(30, 5, "random", seed=5)


@pytest.mark.parametrize("kw,match", [
    (dict(strategy="shortgpt"), "needs block_influence"),
    (dict(strategy="shortgpt", block_influence=[0.1] * 5), "must hold 6 finite numbers"),
    (dict(strategy="shortgpt", block_influence=[0.1] * 5 + [float("nan")]), "must hold 6 finite numbers"),
    (dict(strategy="shortgpt", block_influence="abc"), "must be a list of 6 numbers"),
    (dict(strategy="random", seed=1.5), "seed must be an integer"),
    (dict(strategy="skipdecode"), "strategy must be one of"),
])
def test_bad_policy_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        ulskip.uls_schedule(6, 2, **kw)


def test_schedule_ends_are_required_unless_a_baseline_says_otherwise():
    from ulskip.schedule import make_plan, validate_schedule
    with pytest.raises(ValueError, match="must keep the first"):
        validate_schedule(6, [0, 1, 2])
    assert validate_schedule(6, [0, 1, 2], require_ends=False) == [0, 1, 2]
    section = {"kept_layers": [0, 1, 2], "strategy": "early-exit", "prefill": "full"}
    assert make_plan(6, section=section).kept_layers == [0, 1, 2]
    with pytest.raises(ValueError, match="must keep the first"):
        make_plan(6, section={**section, "strategy": "paper"})


def test_skipdecode_depths():
    """SkipDecode at a matched budget: the depth falls linearly over the horizon, never rises, averages K
    over it, and a token runs the top depth(j) layers (so a later token only reads layers every earlier
    token ran)."""
    from ulskip.schedule import skipdecode
    for L, s in ((30, 2), (30, 5), (30, 10), (32, 3), (6, 2)):
        sd = skipdecode(L, s)
        K = math.floor(L / s)
        depths = [sd.depth(j) for j in range(sd.horizon + 10)]
        assert depths == sorted(depths, reverse=True) and depths[0] == sd.max_depth and depths[-1] == sd.min_depth
        assert sum(depths[:sd.horizon]) / sd.horizon == pytest.approx(K, abs=0.05)
        assert sd.union == list(range(L - sd.max_depth, L)) and sd.layers(5) == list(range(L - depths[5], L))
        for layer in range(L):  # response_tokens(layer): exactly the tokens j whose layers include it
            n = sd.response_tokens(layer)
            runs = [layer in sd.layers(j) for j in range(sd.horizon + 10)]
            assert runs == ([True] * len(runs) if n is None else [j < n for j in range(len(runs))])
    assert skipdecode(30, 2).max_depth == 22 and skipdecode(30, 2).min_depth == 8
    with pytest.raises(ValueError, match="target_speedup must be in"):
        skipdecode(6, 4)
    from ulskip.schedule import make_plan
    with pytest.raises(ValueError, match="prefill must be 'full'"):
        make_plan(6, target_speedup=2, strategy="skipdecode", prefill="skip")


def test_plan_runs_the_schedule_a_checkpoint_was_trained_for():
    """strategy=None with a target_speedup: a several-speedups fine-tune's schedules entry, a one-speedup
    fine-tune's kept layers at its speedup; the paper's rule otherwise; an explicit strategy still wins."""
    from ulskip.schedule import make_plan, trained_schedule, uls_schedule
    multi = {"kept_layers": [1, 3, 4, 6], "num_layers": 8, "target_speedup": 2.0, "strategy": "random", "prefill": "full",
             "target_speedups": [1.0, 2.0], "schedules": {"1": list(range(8)), "2": [1, 3, 4, 6]}}
    assert make_plan(8, target_speedup=2, section=multi).kept_layers == [1, 3, 4, 6]
    assert make_plan(8, target_speedup=1, section=multi).kept_layers == list(range(8))
    assert make_plan(8, target_speedup=4, section=multi).kept_layers == uls_schedule(8, 4)  # not trained: paper
    assert make_plan(8, target_speedup=2, strategy="paper", section=multi).kept_layers == uls_schedule(8, 2)
    single = {"kept_layers": [0, 1, 2, 3], "num_layers": 8, "target_speedup": 2.0, "strategy": "early-exit",
              "prefill": "full"}
    assert make_plan(8, target_speedup=2.0, section=single).kept_layers == [0, 1, 2, 3]
    assert make_plan(8, target_speedup=4, section=single).kept_layers == uls_schedule(8, 4)
    assert trained_schedule(single, "x") is None and trained_schedule(None, 2) is None
    sd = {"kept_layers": [4, 5, 6, 7], "num_layers": 8, "target_speedup": 2.0, "strategy": "skipdecode", "prefill": "full"}
    assert trained_schedule(sd, 2) is None  # a dynamic schedule has no one layer set
