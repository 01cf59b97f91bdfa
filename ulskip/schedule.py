"""Which layers run: the Unified Layer Skipping selection rule (Liu, Meng & Zhou, 2024), the baseline
layer policies it is compared with, the prefill modes, and the plan a checkpoint is loaded and run with.

The kept set depends only on the number of layers L and the target speedup s (and, for the baselines
that need one, a seed or calibration scores), never on the input, so every token of a batch follows the
same schedule (docs/design.md, "The method"). Every strategy keeps K = floor(L / s) layers: budgets are
matched by kept layers per token.
"""
from __future__ import annotations

import math
import numbers
import operator
import random
from dataclasses import dataclass

# "paper" (= "uls"): the paper's rule; "even": K evenly spread, ends kept; "early-exit": the first K
# layers, then the final norm and head; "shortgpt": the K layers of highest Block Influence on calibration
# text (ShortGPT drops the rest: ulskip/calibration.py); "random": K layers drawn with a seed.
STRATEGIES = ("paper", "uls", "even", "early-exit", "shortgpt", "random")
KEEPS_ENDS = ("paper", "uls", "even", "custom")  # strategies whose schedules always hold 0 and L-1
# Per-position depth, one depth per generated position shared by the batch: SkipDecode (SkipDecode class).
DYNAMIC_STRATEGIES = ("skipdecode",)
SKIPDECODE_HORIZON = 64  # response positions over which the depth falls from its maximum to its minimum
# "full" (the paper's): the prompt runs through all layers, decode steps through the kept ones;
# "skip": the prompt runs through the kept layers too (the model must be fine-tuned that way).
PREFILL_MODES = ("full", "skip")


def _check(num_layers, target_speedup, strategy) -> int:
    if isinstance(num_layers, bool) or not isinstance(num_layers, numbers.Integral) or num_layers < 2:
        raise ValueError(f"num_layers must be an integer >= 2, got {num_layers!r}")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if (isinstance(target_speedup, bool) or not isinstance(target_speedup, numbers.Real)
            or not math.isfinite(target_speedup)):
        raise ValueError(f"target_speedup must be a finite number in [1, {num_layers / 2:g}] for "
                         f"{num_layers} layers, got {target_speedup!r}")
    num_kept = math.floor(num_layers / target_speedup) if target_speedup > 0 else 0
    if target_speedup < 1 or num_kept < 2:
        raise ValueError(f"target_speedup must be in [1, {num_layers / 2:g}] for {num_layers} layers "
                         f"(at least two layers are kept), got {target_speedup!r}")
    return num_kept


def _check_block_influence(block_influence, num_layers: int) -> list[float]:
    if block_influence is None:
        raise ValueError("strategy 'shortgpt' needs block_influence: one score per layer from `ulskip calibrate`")
    try:
        scores = [float(x) for x in block_influence]
    except (TypeError, ValueError):
        raise ValueError(f"block_influence must be a list of {num_layers} numbers, got {block_influence!r}") from None
    if len(scores) != num_layers or not all(math.isfinite(x) for x in scores):
        raise ValueError(f"block_influence must hold {num_layers} finite numbers (one per layer), got "
                         f"{len(scores)}: {scores!r}")
    return scores


def uls_schedule(num_layers: int, target_speedup: float, strategy: str = "paper", *, seed: int = 0,
                 block_influence=None) -> list[int]:
    """Sorted indices of the layers kept for `target_speedup` (K = floor(L / s) layers).

    "paper" (or "uls"): the rule of the paper's code: both ends kept, interval = floor(L / (K - 1));
    walk i = 1 .. L-2 and keep every i divisible by the interval until K layers are kept.
    "even": K layers evenly spread, ends kept. "early-exit": layers 0 .. K-1. "shortgpt": the K layers
    with the highest block_influence (a score per layer; ties: the lower layer). "random": K layers
    drawn without replacement with random.Random(seed).
    """
    num_kept = _check(num_layers, target_speedup, strategy)
    if strategy == "early-exit":
        return list(range(num_kept))
    if strategy == "shortgpt":
        scores = _check_block_influence(block_influence, num_layers)
        return sorted(sorted(range(num_layers), key=lambda i: (-scores[i], i))[:num_kept])
    if strategy == "random":
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        return sorted(random.Random(int(seed)).sample(range(num_layers), num_kept))
    if strategy == "even":
        step = (num_layers - 1) / (num_kept - 1)
        return [round(i * step) for i in range(num_kept)]
    kept = [0, num_layers - 1]
    interval = num_layers // (num_kept - 1)
    for i in range(1, num_layers - 1):
        if len(kept) >= num_kept:
            break
        if i % interval == 0:
            kept.append(i)
    return sorted(kept)


def validate_schedule(num_layers: int, kept_layers, require_ends: bool = True) -> list[int]:
    """Check a user-given schedule: distinct, sorted-able layer indices in [0, L), including 0 and L-1
    unless require_ends is False (the baselines early-exit, shortgpt and random need not keep them)."""
    try:
        kept = sorted(operator.index(i) for i in kept_layers)  # integers only: 2.5 is not a layer
    except TypeError:
        raise ValueError(f"schedule must be a list of integer layer indices, got {kept_layers!r}") from None
    if len(set(kept)) != len(kept) or not kept or kept[0] < 0 or kept[-1] >= num_layers:
        raise ValueError(f"schedule must hold distinct layer indices in [0, {num_layers - 1}], "
                         f"got {list(kept_layers)!r}")
    if require_ends and (kept[0] != 0 or kept[-1] != num_layers - 1):
        raise ValueError(f"schedule must keep the first (0) and last ({num_layers - 1}) layer, "
                         f"got {list(kept_layers)!r}")
    return kept


def layer_speedup(num_layers: int, kept_layers) -> float:
    """Speedup of the decoder layers alone: L / K (the head and embeddings are not counted)."""
    return num_layers / len(kept_layers)


def check_prefill(prefill) -> str:
    if prefill not in PREFILL_MODES:
        raise ValueError(f"prefill must be one of {PREFILL_MODES}, got {prefill!r}")
    return prefill


@dataclass(frozen=True)
class SkipDecode:
    """SkipDecode (Corro et al., 2023) at a matched budget: response token j (0 = the first one the model
    generates, the first input of a decode step) runs the top depth(j) layers, the lower ones skipped, so
    every layer a later token reads was computed for every earlier token (depth never rises). The depth
    falls linearly from max_depth to min_depth over `horizon` positions and stays at min_depth after;
    max_depth + min_depth = 2K, so over the horizon a token runs K = floor(L / s) layers on average."""
    num_layers: int
    max_depth: int
    min_depth: int
    horizon: int = SKIPDECODE_HORIZON

    def depth(self, j: int) -> int:
        if j >= self.horizon - 1:
            return self.min_depth
        return round(self.max_depth - (self.max_depth - self.min_depth) * j / (self.horizon - 1))

    def layers(self, j: int) -> list[int]:
        """The layers response token j runs."""
        return list(range(self.num_layers - self.depth(j), self.num_layers))

    @property
    def union(self) -> list[int]:
        """Every layer some response token runs: what the compact cache holds."""
        return self.layers(0)

    def response_tokens(self, layer: int) -> int | None:
        """How many response tokens (the first ones) run `layer`; None: all of them."""
        need = self.num_layers - layer
        if self.min_depth >= need:
            return None
        return next(j for j in range(self.horizon) if self.depth(j) < need)

    def as_dict(self) -> dict:
        return {"max_depth": self.max_depth, "min_depth": self.min_depth, "horizon": self.horizon}


def skipdecode(num_layers: int, target_speedup: float, horizon: int = SKIPDECODE_HORIZON) -> SkipDecode:
    """The SkipDecode schedule of budget K = floor(L / s): depths K + K//2 down to K - K//2 (capped at L)."""
    k = _check(num_layers, target_speedup, "paper")
    if isinstance(horizon, bool) or not isinstance(horizon, numbers.Integral) or horizon < 2:
        raise ValueError(f"horizon must be an integer >= 2, got {horizon!r}")
    hi = min(num_layers, k + k // 2)
    return SkipDecode(num_layers, hi, 2 * k - hi, int(horizon))


def _section_skipdecode(section: dict, num_layers: int) -> SkipDecode:
    sd = section.get("skipdecode")
    try:
        plan = SkipDecode(num_layers, int(sd["max_depth"]), int(sd["min_depth"]), int(sd["horizon"]))
    except (TypeError, KeyError, ValueError):
        raise ValueError(f"the ulskip section's strategy is skipdecode but its 'skipdecode' entry ({sd!r}) is not "
                         "{max_depth, min_depth, horizon}") from None
    if not (1 <= plan.min_depth <= plan.max_depth <= num_layers and plan.horizon >= 2):
        raise ValueError(f"the ulskip section's skipdecode entry {sd!r} does not fit a model of {num_layers} layers")
    return plan


@dataclass(frozen=True)
class Plan:
    """How a checkpoint runs: the kept layers (every decode step; with SkipDecode, every layer some step
    runs), the prefill mode, the layers whose weights are loaded (all of them for prefill="full"; only the
    kept ones for "skip"), and for SkipDecode the per-position depths."""
    kept_layers: list[int]
    prefill: str
    load_layers: list[int]
    skipdecode: SkipDecode | None = None


def trained_schedule(section: dict | None, target_speedup, num_layers: int | None = None) -> list[int] | None:
    """The layers a checkpoint was fine-tuned to run at target_speedup: its `schedules` entry (a
    several-speedups fine-tune), or its kept_layers when its one target_speedup is that one (a static
    strategy); None when it was not trained for that speedup. With num_layers: checked for a model of
    that many layers (validate_schedule; the ends only for the strategies that keep them)."""
    kept = _trained(section or {}, target_speedup)
    if kept is None or num_layers is None:
        return kept
    return validate_schedule(num_layers, kept, require_ends=(section or {}).get("strategy", "paper") in KEEPS_ENDS)


def _trained(section: dict, target_speedup) -> list[int] | None:
    try:
        s = float(target_speedup)
    except (TypeError, ValueError):
        return None
    schedules = section.get("schedules") or {}
    if f"{s:g}" in schedules:
        return list(schedules[f"{s:g}"])
    trained = section.get("target_speedup")
    if (not schedules and section.get("kept_layers") and isinstance(trained, numbers.Real)
            and section.get("strategy") not in DYNAMIC_STRATEGIES and math.isclose(float(trained), s)):
        return list(section["kept_layers"])
    return None


def make_plan(num_layers: int, target_speedup=None, schedule=None, prefill=None, strategy: str | None = None,
              section: dict | None = None, seed: int = 0, block_influence=None) -> Plan:
    """Explicit arguments win; then the checkpoint's `ulskip` section (written by `ulskip train`:
    kept_layers, strategy, prefill); else all layers with prefill="full". strategy=None with a
    target_speedup: the schedule the checkpoint was fine-tuned for at that speedup (trained_schedule), else
    the paper's rule."""
    section = section or {}
    if schedule is not None and target_speedup is not None:
        raise ValueError("give either target_speedup or schedule, not both")
    dynamic = None
    if schedule is not None:
        kept = validate_schedule(num_layers, schedule)
    elif target_speedup is not None and strategy in DYNAMIC_STRATEGIES:
        dynamic = skipdecode(num_layers, target_speedup)
        kept = dynamic.union
    elif target_speedup is not None:
        kept = trained_schedule(section, target_speedup, num_layers) if strategy is None else None
        if kept is None:
            kept = uls_schedule(num_layers, target_speedup, strategy or "paper", seed=seed,
                                block_influence=block_influence)
    elif section.get("kept_layers") and section.get("strategy") in DYNAMIC_STRATEGIES:
        dynamic = _section_skipdecode(section, num_layers)
        kept = dynamic.union
    elif section.get("kept_layers"):
        kept = validate_schedule(num_layers, section["kept_layers"],
                                 require_ends=section.get("strategy", "paper") in KEEPS_ENDS)
    else:
        kept = list(range(num_layers))
    prefill = check_prefill(prefill or section.get("prefill", "full"))
    if dynamic is not None and prefill != "full":
        raise ValueError("skipdecode runs the prompt through all layers: prefill must be 'full'")
    load = list(range(num_layers)) if prefill == "full" else kept  # skip: never read the rest
    return Plan(kept, prefill, load, dynamic)
