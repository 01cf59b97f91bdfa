"""The quality study: fine-tune a real model under each layer policy, evaluate every checkpoint with the
engine, and report BLEU / chrF / perplexity against the realized speedup (bench/QUALITY.md).

    python -m ulskip.bench.quality run --model CKPT --data DATA_DIR --out STUDY_DIR [--steps a,b,...]
    python -m ulskip.bench.quality report STUDY_DIR... --md table.md --plot quality.png [--speed bench.json]

Every step is one `ulskip` command (calibrate, train, eval) run as a subprocess, so the study is exactly
what a user can repeat by hand. A step is skipped when its result file exists: the study resumes where a
time limit stopped it. Each step's result is STUDY_DIR/<step>/eval.json (the `ulskip eval --json` file)
plus train.log and the step's settings in step.json.

A several-speedups step (multi123-s2: `ulskip train --target-speedups 1,2,3` once into STUDY/multi123/ckpt,
evaluated with `ulskip eval CKPT --target-speedup 2`) is reported as policy "paper (multi 1,2,3)".

--jobs N runs N steps at once: a fine-tune of this small model keeps the GPU mostly idle (the host is the
bound), so several on one GPU finish several times sooner. A distillation step waits for ft-full, a
several-speedups step for its set's first step. --reuse-checkpoints DIR evaluates another study's trained
checkpoints (e.g. with --paper-decode) instead of training again.

Budgets are matched by kept layers per token (K = floor(L / s) for every policy), so the decode speed of a
row depends only on K and the prefill mode: it comes from one `ulskip bench` run on the same model
(--speed), not from each checkpoint.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

# name -> (strategy, target speedup, prefill, fine-tuned). "base-*": the pretrained model, no fine-tune.
STEPS = {
    "base-full": ("paper", 1, "full", False),
    "base-uls2": ("paper", 2, "full", False),
    "ft-full": ("paper", 1, "full", True),
}
for _s in (2, 3, 5, 10):
    STEPS[f"uls{_s}-full"] = ("paper", _s, "full", True)
    STEPS[f"uls{_s}-skip"] = ("paper", _s, "skip", True)
    for _name, _strategy in (("ee", "early-exit"), ("sg", "shortgpt"), ("rnd", "random"), ("even", "even"),
                             ("sd", "skipdecode")):
        STEPS[f"{_name}{_s}"] = (_strategy, _s, "full", True)
    # variants of the ULS recipe (deliverable 6): logit distillation from the study's full fine-tune
    # (ft-full must have run first), and unfrozen embeddings (= the tied head)
    STEPS[f"uls{_s}-kd"] = ("paper", _s, "full", True)
    STEPS[f"uls{_s}-emb"] = ("paper", _s, "full", True)
    # the skip path starting at a drawn point inside the response (`--draft-boundary random`: the stretch
    # before it runs every layer, as tokens verified in self-speculative decoding do)
    STEPS[f"uls{_s}-db"] = ("paper", _s, "full", True)
    # the auxiliary losses of the paper's code (AUX_ARGS): the full path's cross-entropy and the skip path's
    # final hidden states matched to the full path's, in every step
    STEPS[f"uls{_s}-aux"] = ("paper", _s, "full", True)
# one checkpoint trained for several speedups (`ulskip train --target-speedups 1,2,3`, into STUDY/<set>/ckpt),
# evaluated at each of them (`ulskip eval CKPT --target-speedup s` overrides the checkpoint's default)
MULTI = {"multi12": (1, 2), "multi123": (1, 2, 3), "multi1235": (1, 2, 3, 5), "multi12aux": (1, 2),
         "multi12db": (1, 2)}
# a first guess, not tuned: weight 1 on each auxiliary term (ulskip/train/aux_loss.py)
AUX_ARGS = ["--full-path-loss-weight", "1", "--hidden-match-weight", "1"]
DB_ARGS = ["--draft-boundary", "random"]
# a recipe variant's words in the report (a step name's suffix, or a several-speedups set's variant)
VARIANT_NAMES = {"kd": " + distillation", "emb": " + unfrozen embeddings", "db": " + random draft boundary",
                 "aux": " + auxiliary losses"}
# several-speedups sets trained with more than the recipe: set -> (extra flags, its VARIANT_NAMES key)
MULTI_ARGS = {"multi12aux": (AUX_ARGS, "aux"), "multi12db": (DB_ARGS, "db")}
for _set, _speeds in MULTI.items():
    for _s in _speeds:
        STEPS[f"{_set}-s{_s}"] = ("paper", _s, "full", True)


def multi_set(name: str):
    """The several-speedups set a step evaluates (its name's prefix in MULTI), else None."""
    head = name.rsplit("-s", 1)[0]
    return head if head in MULTI and name != head else None


_SET_LOCKS: dict[str, threading.Lock] = {}  # --jobs: one training of a several-speedups set at a time


def variant_args(name: str, out: str) -> list[str]:
    if multi_set(name):
        return list(MULTI_ARGS.get(multi_set(name), ([], ""))[0])
    if name.endswith("-kd"):
        teacher = os.path.join(out, "ft-full", "ckpt")
        if not os.path.isfile(os.path.join(teacher, "config.json")):
            raise SystemExit(f"quality study: step {name} distills from the full fine-tune: run ft-full first")
        return ["--distill-from", teacher, "--distill-weight", "0.5", "--distill-temperature", "1"]
    if name.endswith("-emb"):
        return ["--freeze-emb", "false"]
    if name.endswith("-db"):
        return list(DB_ARGS)
    if name.endswith("-aux"):
        return list(AUX_ARGS)
    return []



def train_args(args) -> list[str]:
    """The one recipe every fine-tune of the study uses (the pilot's: lr 1e-4, batch 32, embeddings frozen)."""
    # SkipDecode's depth falls over this many response positions (`ulskip train --skipdecode-horizon`; only
    # skipdecode steps read it): near the data's mean response length, its layers per step average to K
    horizon = ["--skipdecode-horizon", str(args.skipdecode_horizon)] if args.skipdecode_horizon else []
    return (horizon + (["--bf16", "--use-fused-kernels"] if args.bf16 else []) +
            ["--per-device-train-batch-size", str(args.batch_size), "--learning-rate", str(args.lr),
             "--num-train-epochs", str(args.epochs), "--lr-scheduler-type", "cosine", "--warmup-ratio", "0.03",
             "--save-strategy", "no", "--logging-steps", "50", "--block-size", str(args.block_size), "--seed", "0"]
            + (["--packing"] if args.packing else []))


def eval_args(args) -> list[str]:
    # the dtype always named: without it the engine would pick its own default (bf16 for an fp32 checkpoint)
    return (["--batch-size", "64", "--max-new-tokens", "64", "--no-progress", "--dtype", "bf16" if args.bf16 else "fp32"]
            + (["--paper-decode"] if args.paper_decode else []))


def _run(cmd, log):
    t0 = time.perf_counter()
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT)
    if rc != 0:
        with open(log) as f:
            tail = f.read()[-3000:]
        raise SystemExit(f"quality study: `{' '.join(cmd)}` failed (rc {rc}); the end of {log}:\n{tail}")
    return time.perf_counter() - t0


def run_step(name, model, data, out, train_args, eval_args, calibration, reuse=None):
    strategy, speedup, prefill, trained = STEPS[name]
    d = os.path.join(out, name)
    result = os.path.join(d, "eval.json")
    if os.path.isfile(result):
        print(f"{name}: done already ({result})", flush=True)
        return
    os.makedirs(d, exist_ok=True)
    log = os.path.join(d, "train.log")
    cli = [sys.executable, "-m", "ulskip.cli"]
    policy = ["--strategy", strategy] + (["--calibration", calibration] if strategy == "shortgpt" else [])
    multi = multi_set(name)
    step = {"name": name, "strategy": strategy, "target_speedup": speedup, "prefill": prefill,
            "fine_tuned": trained, "variant": variant_args(name, out) if trained and not reuse else [], "model": model,
            "data": data, "train_args": train_args if trained else None,
            "eval_args": eval_args, "multi": list(MULTI[multi]) if multi else None}
    ckpt, train_s = model, None
    if multi:
        # trained once for the whole set (the first of its steps to run does it); each step evaluates it at
        # its own speedup, the explicit --target-speedup overriding the checkpoint's default schedule
        shared = os.path.join(out, multi)
        ckpt = os.path.join(shared, "ckpt")
        os.makedirs(shared, exist_ok=True)
        info = os.path.join(shared, "train.json")
        with _SET_LOCKS.setdefault(shared, threading.Lock()):
            if not os.path.isfile(os.path.join(ckpt, "config.json")):
                again = ["--overwrite-output-dir"] if os.path.isdir(ckpt) and os.listdir(ckpt) else []
                speeds = ",".join(str(x) for x in MULTI[multi])
                t = _run(cli + ["train", "--model-name-or-path", model, "--train-file", os.path.join(data, "train.jsonl"),
                                "--output-dir", ckpt, "--target-speedups", speeds, "--prefill", prefill, *policy,
                                *train_args, *again, *step["variant"]], os.path.join(shared, "train.log"))
                with open(info, "w") as f:
                    json.dump({"train_s": t, "target_speedups": list(MULTI[multi])}, f)
        if os.path.isfile(info):
            with open(info) as f:
                train_s = json.load(f)["train_s"]
        schedule = ["--target-speedup", str(speedup), "--prefill", prefill, *policy]
    elif trained:
        ckpt = os.path.join(d, "ckpt")
        if reuse:
            # another study's checkpoint of this step (cmd_run checked it is there), evaluated with this run's
            # eval flags
            ckpt = os.path.join(reuse, name, "ckpt")
            with open(os.path.join(reuse, name, "step.json")) as f:
                done = json.load(f)
            step.update(train_args=done["train_args"], variant=done.get("variant", []), reused_from=ckpt)
        elif not os.path.isfile(os.path.join(ckpt, "config.json")):
            # a run stopped by a time limit left a folder without the final model: train it again from scratch
            again = ["--overwrite-output-dir"] if os.path.isdir(ckpt) and os.listdir(ckpt) else []
            train_s = _run(cli + ["train", "--model-name-or-path", model, "--train-file",
                                  os.path.join(data, "train.jsonl"), "--output-dir", ckpt, "--target-speedup",
                                  str(speedup), "--prefill", prefill, *policy, *train_args, *again,
                                  *variant_args(name, out)], log)
        schedule = []  # the checkpoint's own ulskip section
    else:
        schedule = ["--target-speedup", str(speedup), "--prefill", prefill, *policy]
    eval_s = _run(cli + ["eval", ckpt, "--data", os.path.join(data, "test.jsonl"), *schedule, *eval_args,
                         "--json", result + ".tmp"], log)
    os.replace(result + ".tmp", result)
    step.update(train_s=train_s, eval_s=eval_s)
    with open(os.path.join(d, "step.json"), "w") as f:
        json.dump(step, f, indent=1)
    with open(result) as f:
        r = json.load(f)
    print(f"{name}: BLEU {r['bleu']:.2f} chrF {r['chrf']:.2f} ppl {r['perplexity']:.3f} kept "
          f"{len(r['settings']['kept_layers'])}/{r['settings']['num_layers']} (train {train_s or 0:.0f} s, "
          f"eval {eval_s:.0f} s)", flush=True)


def step_needs(name: str, steps: list[str]) -> list[str]:
    """The steps of this run that `name` must wait for when steps run at once: a distillation step its
    teacher (ft-full), a several-speedups step the first of its set (which trains the shared checkpoint)."""
    needs = ["ft-full"] if name.endswith("-kd") and "ft-full" in steps else []
    multi = multi_set(name)
    if multi:
        first = next(s for s in steps if multi_set(s) == multi)
        needs += [first] if first != name else []
    return needs


def run_steps(steps: list[str], jobs: int, run_one) -> None:
    """run_one(step) for every step, up to `jobs` at once, each after the steps it needs. After a failure no
    new step starts; the running ones finish, then every failure is reported."""
    pending, running, done, failed = list(steps), {}, set(), {}
    with ThreadPoolExecutor(jobs) as pool:
        while pending or running:
            for s in [s for s in pending if not failed and all(n in done for n in step_needs(s, steps))]:
                if len(running) < jobs:
                    pending.remove(s)
                    running[pool.submit(run_one, s)] = s
            if not running:
                break
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for f in finished:
                s = running.pop(f)
                try:
                    f.result()
                    done.add(s)
                except SystemExit as e:
                    failed[s] = str(e)
                except Exception as e:  # noqa: BLE001  (a step's own error: reported with the others)
                    failed[s] = f"quality study: step {s} failed: {type(e).__name__}: {e}"
    if failed:
        raise SystemExit("\n".join(failed.values()) + (f"\nquality study: not started: {', '.join(pending)}"
                                                        if pending else ""))


def cmd_run(args):
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    bad = [s for s in steps if s not in STEPS]
    if bad:
        raise SystemExit(f"quality study: unknown steps {bad}; known: {', '.join(STEPS)}")
    if not steps:
        raise SystemExit(f"quality study: --steps {args.steps!r} names no step; known: {', '.join(STEPS)}")
    if len(set(steps)) != len(steps):
        raise SystemExit(f"quality study: a step is named twice in --steps {args.steps}")
    if args.jobs < 1:
        raise SystemExit(f"quality study: --jobs must be at least 1, got {args.jobs}")
    if args.reuse_checkpoints and not os.path.isdir(args.reuse_checkpoints):
        raise SystemExit(f"quality study: --reuse-checkpoints {args.reuse_checkpoints} is not a folder")
    if args.skipdecode_horizon is not None and args.skipdecode_horizon < 2:
        raise SystemExit(f"quality study: --skipdecode-horizon must be an integer >= 2 (default: ulskip train's, "
                         f"64), got {args.skipdecode_horizon}")
    for s in steps if args.reuse_checkpoints else []:  # before any step runs: every reused one is there
        if multi_set(s):
            raise SystemExit(f"quality study: --reuse-checkpoints does not take several-speedups steps ({s})")
        need = [os.path.join(args.reuse_checkpoints, s, f) for f in ("ckpt/config.json", "step.json")]
        missing = [f for f in need if not os.path.isfile(f)]
        if not STEPS[s][3] or os.path.isfile(os.path.join(args.out, s, "eval.json")):
            continue
        if missing:
            raise SystemExit(f"quality study: --reuse-checkpoints {args.reuse_checkpoints} has no trained {s} "
                             f"({', '.join(missing)} missing)")
        with open(need[1]) as f:
            trained_on = json.load(f).get("data")
        if trained_on and os.path.abspath(trained_on) != os.path.abspath(args.data):
            # the report names a row's language after its data folder: a mismatch would mislabel it
            raise SystemExit(f"quality study: --reuse-checkpoints {args.reuse_checkpoints}: {s} was fine-tuned on "
                             f"{trained_on}, not --data {args.data}")
    if args.jobs > 1 and "OMP_NUM_THREADS" not in os.environ:
        # the steps' processes share the host's cores: without a cap each would start one thread per core
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // args.jobs))
    os.makedirs(args.out, exist_ok=True)
    calibration = os.path.join(args.out, "block_influence.json")
    if (any(STEPS[s][0] == "shortgpt" and STEPS[s][3] for s in steps) and not args.reuse_checkpoints
            and not os.path.isfile(calibration)):
        _run([sys.executable, "-m", "ulskip.cli", "calibrate", args.model, "--data",
              os.path.join(args.data, "train.jsonl"), "--out", calibration, "--num-records", "512"],
             os.path.join(args.out, "calibrate.log"))
    targs, eargs = train_args(args), eval_args(args)
    run_steps(steps, args.jobs, lambda s: run_step(s, args.model, args.data, args.out, targs, eargs, calibration,
                                                   args.reuse_checkpoints))


def _speed(paths):
    """(num_kept, batch) -> (tok/s, decode ms/step) from `ulskip bench --json` files (prefill "full" rows:
    a decode step runs the kept layers whatever the prefill mode, so its time depends on K alone; tok/s
    includes the prompt pass of the full mode)."""
    out = {}
    missing = [p for p in paths or [] if not os.path.isfile(p)]
    if missing:
        raise SystemExit(f"quality study: report --speed: no such file: {', '.join(missing)} (`ulskip bench --json`)")
    for p in paths or []:
        with open(p) as f:
            for r in json.load(f)["rows"]:
                if r["system"] == "ulskip" and r["status"] == "ok" and r["prefill"] == "full":
                    out[(r["num_kept"], r["batch_size"])] = (r["tokens_per_s"], r["decode_ms_per_step"])
    return out


def collect(dirs):
    """One row per (language, step, recipe, decoding): where several folders hold the same one (a step run
    again), the later folder's row stands and `repeats` lists every earlier one beside it."""
    rows, repeats = {}, []
    for d in dirs:
        for name in sorted(os.listdir(d)):
            e, s = os.path.join(d, name, "eval.json"), os.path.join(d, name, "step.json")
            if os.path.isfile(e) and os.path.isfile(s):
                with open(e) as f:
                    ev = json.load(f)
                with open(s) as f:
                    st = json.load(f)
                lang = os.path.basename(os.path.normpath(st["data"])).replace("data-", "")
                cfg = ev["settings"]
                # SkipDecode's depth falls with the position: its budget is the layers a decode step ran on average
                mean = ev.get("decode_layers_per_step") if cfg.get("skipdecode") else None
                row = {**st, "lang": lang, "bleu": ev["bleu"], "chrf": ev["chrf"], "perplexity": ev["perplexity"],
                       "kept": round(mean) if mean else len(cfg["kept_layers"]), "mean_kept": mean,
                       "num_layers": cfg["num_layers"], "kept_layers": cfg["kept_layers"],
                       "recipe": recipe_name(st.get("train_args")), "decode": decode_name(cfg), "dir": d}
                key = (lang, name, row["recipe"], row["decode"])
                if key in rows:
                    repeats.append((rows[key], row))
                rows[key] = row
    return list(rows.values()), repeats


def _flag(argv, name, default=None):
    return argv[argv.index(name) + 1] if name in argv else default


def recipe_name(train_args) -> str:
    """A fine-tune's recipe in a few words (epochs, lr, batch), from the `ulskip train` flags of its step."""
    if not train_args:
        return "-"
    batch = _flag(train_args, "--per-device-train-batch-size")
    rows = f"{batch} packed rows" if "--packing" in train_args else f"{batch} records"
    mantissa, exponent = f"{float(_flag(train_args, '--learning-rate')):e}".split("e")
    lr = f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"  # 2e-4, 1.5e-4
    return f"{float(_flag(train_args, '--num-train-epochs')):g} ep, lr {lr}, {rows}"


def decode_name(settings) -> str:
    if settings.get("num_beams", 1) > 1 or settings.get("no_repeat_ngram_size", 0):
        return f"beam {settings.get('num_beams', 1)}, no-repeat {settings.get('no_repeat_ngram_size', 0)}"
    return "greedy"


def main_recipe(rows) -> str:
    """The recipe most fine-tuned rows of a language share: the plot draws those (other recipes would put a
    second point at the same speedup on a policy's line)."""
    counts = Counter(r["recipe"] for r in rows if r["fine_tuned"] and r["decode"] == "greedy")
    return counts.most_common(1)[0][0] if counts else "-"


def main_rows(rows, lang) -> tuple[str, list[dict]]:
    """A language's main recipe and its fine-tuned greedy rows: what the Table 4 view and the plot show."""
    rs = [r for r in rows if r["lang"] == lang]
    main = main_recipe(rs)
    return main, [r for r in rs if r["fine_tuned"] and r["recipe"] == main and r["decode"] == "greedy"]


def policy_name(r) -> str:
    """The report's policy column: the layer policy, a recipe variant, or the set of a several-speedups run."""
    if r.get("multi"):
        variant = MULTI_ARGS.get(multi_set(r["name"]), ([], None))[1]
        return (f"{r['strategy']} (multi {','.join(f'{x:g}' for x in r['multi'])})"
                + VARIANT_NAMES.get(variant, ""))
    return r["strategy"] + VARIANT_NAMES.get(r["name"].rsplit("-", 1)[-1], "")


def pivot_lines(rows) -> list[str]:
    """The paper's Table 4 view of each language's main recipe (greedy): a row per policy, a column per
    target speedup, BLEU / chrF in each cell, the best BLEU of a column in bold."""
    out = []
    for lang in sorted({r["lang"] for r in rows}):
        main, rs = main_rows(rows, lang)
        sel = [r for r in rs if r["target_speedup"] > 1]
        if not sel:
            continue
        speeds = sorted({r["target_speedup"] for r in sel})
        ft = next((r for r in rs if r["name"] == "ft-full"), None)
        cell = {(policy_name(r), r["prefill"], r["target_speedup"]): r for r in sel}
        best = {s: max(r["bleu"] for r in sel if r["target_speedup"] == s) for s in speeds}
        ref = f"; full fine-tune {ft['bleu']:.1f} / {ft['chrf']:.1f}" if ft else ""
        out += ["", f"en->{lang}, BLEU / chrF ({main}, greedy{ref}):", "",
                "| policy (prefill) | " + " | ".join(f"{s:g}x ({int(sel[0]['num_layers'] // s)} kept)" for s in speeds) + " |",
                "|---|" + "---|" * len(speeds)]
        for policy, prefill in sorted({(p, f) for p, f, _ in cell}):
            cells = []
            for s in speeds:
                r = cell.get((policy, prefill, s))
                b = f"**{r['bleu']:.1f}**" if r and r["bleu"] == best[s] else f"{r['bleu']:.1f}" if r else ""
                cells.append(f"{b} / {r['chrf']:.1f}" if r else "-")
            out.append(f"| {policy} ({prefill}) | " + " | ".join(cells) + " |")
    return out


def cmd_report(args):
    not_dirs = [d for d in args.dirs if not os.path.isdir(d)]
    if not_dirs:
        raise SystemExit(f"quality study: report takes study folders; not a folder: {', '.join(not_dirs)}")
    rows, repeats = collect(args.dirs)
    if not rows:
        raise SystemExit(f"quality study: no results in {', '.join(args.dirs)} (a step's <step>/eval.json "
                         "and step.json; give the study folder itself, e.g. STUDY/fr)")
    speed = _speed(args.speed)
    lines = ["| lang | model | policy | s | kept | prefill | BLEU | chrF | ppl | % of FT BLEU | tok/s bs1 | tok/s bs16 "
             "| decode speedup bs1 / bs16 | recipe | decode |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for lang in sorted({r["lang"] for r in rows}):
        rs = [r for r in rows if r["lang"] == lang]
        main = main_recipe(rs)
        # each row against the full fine-tune of its own recipe and decoding
        fts = {(r["recipe"], r["decode"]): r for r in rs if r["name"] == "ft-full"}
        base1 = speed.get((rs[0]["num_layers"], 1)) if rs else None
        base16 = speed.get((rs[0]["num_layers"], 16)) if rs else None
        for r in sorted(rs, key=lambda r: (not r["fine_tuned"], r["recipe"] != main, r["recipe"], r["decode"] != "greedy", r["decode"],
                                           r["target_speedup"], r["strategy"], r["prefill"], r["name"])):
            s1, s16 = speed.get((r["kept"], 1)), speed.get((r["kept"], 16))
            ft = fts.get((r["recipe"], r["decode"]))
            pct = f"{100 * r['bleu'] / ft['bleu']:.0f}%" if ft and ft["bleu"] > 0 and r["fine_tuned"] else "-"
            policy = policy_name(r)
            kept = f"{r['mean_kept']:.1f}/{r['num_layers']} avg" if r["mean_kept"] else f"{r['kept']}/{r['num_layers']}"
            lines.append(f"| {lang} | {'fine-tuned' if r['fine_tuned'] else 'pretrained'} | {policy} | "
                         f"{r['target_speedup']:g} | {kept} | {r['prefill']} | {r['bleu']:.1f} | "
                         f"{r['chrf']:.1f} | {r['perplexity']:.2f} | {pct} | "
                         f"{f'{s1[0]:.0f}' if s1 else '-'} | {f'{s16[0]:.0f}' if s16 else '-'} | "
                         f"{f'{base1[1] / s1[1]:.2f}x' if s1 and base1 else '-'} / "
                         f"{f'{base16[1] / s16[1]:.2f}x' if s16 and base16 else '-'} | {r['recipe']} | {r['decode']} |")
    lines += pivot_lines(rows)
    if repeats:
        lines += ["", "Steps run more than once (the later run is the row above): " + "; ".join(
            f"{a['lang']} {a['name']} ({a['recipe']}, {a['decode']}) BLEU {a['bleu']:.2f} in {a['dir']}, "
            f"{b['bleu']:.2f} in {b['dir']}" for a, b in repeats) + "."]
    table = "\n".join(lines)
    print(table)
    if args.md:
        with open(args.md, "w") as f:
            f.write(table + "\n")
    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        langs = sorted({r["lang"] for r in rows})
        fig, axes = plt.subplots(1, max(1, len(langs)), figsize=(6 * max(1, len(langs)), 6.5), squeeze=False)
        # one colour and marker per (policy, prefill) across the panels (more lines than one cycle of colours)
        labels = sorted({(policy_name(r), r["prefill"]) for r in rows if r["fine_tuned"]})
        colour = {label: plt.get_cmap("tab20")(i % 20) for i, label in enumerate(labels)}
        marker = {label: "os^Dv<>PX*"[i % 10] for i, label in enumerate(labels)}
        for ax, lang in zip(axes[0], langs):
            main, rs = main_rows(rows, lang)
            base1 = speed.get((rs[0]["num_layers"], 1)) if rs else None
            for label in sorted({(policy_name(r), r["prefill"]) for r in rs}):
                pts = sorted((r["target_speedup"], r["bleu"], r["kept"], r["prefill"]) for r in rs
                             if (policy_name(r), r["prefill"]) == label)
                xs = []
                for s, _, kept, prefill in pts:
                    sp = speed.get((kept, 1))
                    xs.append(base1[1] / sp[1] if sp and base1 else s)
                ax.plot(xs, [b for _, b, _, _ in pts], marker=marker[label], color=colour[label],
                        label=f"{label[0]} ({label[1]})")
            ax.set_xlabel("realized decode speedup, batch 1")
            ax.set_ylabel("BLEU")
            ax.set_title(f"en->{lang}, fine-tuned per policy ({main}, greedy)", fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)  # below: no line hidden
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"wrote {args.plot}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run study steps (resumable)")
    r.add_argument("--model", required=True, help="the pretrained checkpoint folder")
    r.add_argument("--data", required=True, help="folder with train.jsonl and test.jsonl (`ulskip data gettext`)")
    r.add_argument("--out", required=True, help="study folder (one sub-folder per step)")
    r.add_argument("--steps", default="base-full,base-uls2,ft-full,uls2-full,uls2-skip,ee2,sg2,rnd2",
                   help=f"comma list of {', '.join(STEPS)}")
    r.add_argument("--epochs", type=float, default=2.0, help="epochs per fine-tune (default 2)")
    r.add_argument("--lr", type=float, default=1e-4, help="learning rate (default 1e-4)")
    r.add_argument("--batch-size", type=int, default=32, help="records per step (default 32)")
    r.add_argument("--no-bf16", dest="bf16", action="store_false", help="fp32 training and eval (CPU smoke runs)")
    r.add_argument("--packing", action="store_true",
                   help="padding-free rows (`ulskip train --packing`); --batch-size then counts rows (default: off)")
    r.add_argument("--block-size", type=int, default=256,
                   help="longest record, or with --packing the row length, in tokens (default 256)")
    r.add_argument("--paper-decode", action="store_true", help="evaluate with 4 beams + no_repeat_ngram_size 3")
    r.add_argument("--skipdecode-horizon", type=int, default=None,
                   help="response positions over which SkipDecode's depth falls (default: ulskip train's, 64)")
    r.add_argument("--jobs", type=int, default=1, help="steps run at once on the one GPU (default 1)")
    r.add_argument("--reuse-checkpoints", default=None, metavar="STUDY_DIR",
                   help="evaluate the trained checkpoints of this earlier study instead of fine-tuning again")
    p = sub.add_parser("report", help="table and plot from study folders")
    p.add_argument("dirs", nargs="+")
    p.add_argument("--speed", nargs="*", help="`ulskip bench --json` files of the model (tok/s per kept layers)")
    p.add_argument("--md", default=None)
    p.add_argument("--plot", default=None)
    args = ap.parse_args(argv)
    return cmd_run(args) if args.cmd == "run" else cmd_report(args)


if __name__ == "__main__":
    sys.exit(main())
