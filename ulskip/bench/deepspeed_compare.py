"""`ulskip train` plain against `--deepspeed` ZeRO-2 and ZeRO-3: the same fine-tune three times (same model,
data, flags and seed), the loss curves compared step by step, throughput and peak memory per GPU.

    python -m ulskip.bench.deepspeed_compare run --model CKPT --train-file DATA.jsonl --out OUT [--max-steps 100]
    python -m ulskip.bench.deepspeed_compare run ... --gpus 2 --out OUT2 --baseline OUT   # DDP / ZeRO on 2 GPUs
    python -m ulskip.bench.deepspeed_compare report OUT2 [--baseline OUT] [--json compare.json]

With --gpus N every run goes through `torchrun --nproc_per_node N` (plain = DDP); each GPU takes
--batch-size rows per step, so N GPUs train on N times the tokens per step. tokens/s counts rank 0's batches
times N (the ranks' batches are of the same recipe); with --baseline (the one-GPU run's --out), the scaling
efficiency of each run is its tokens/s over N times the baseline's same run.

`run` launches each fine-tune as a subprocess: plain = `ulskip train` in one process, zero2 / zero3 =
`torchrun --standalone --nproc_per_node 1` with --deepspeed examples/deepspeed_zero{2,3}.json (DeepSpeed needs
the launcher's RANK / MASTER_ADDR / ... even for one process; without them it looks for MPI). The configs
have no "optimizer" or "scheduler" section, so transformers' Trainer builds the same torch AdamW and LR
schedule as the plain run and sets zero_allow_untested_optimizer: no DeepSpeed op is compiled. Each fine-tune
is `ulskip train` itself (ulskip.cli.train.run) plus one callback (`train` below) that writes OUT/<run>.json:
the Trainer's log history, tokens/s over the steps after --timed-from (record tokens of the batches of those
steps, padding excluded), peak GPU memory (torch.cuda.max_memory_allocated of the process). The checkpoints
go to --work, not OUT (they are large). The log of each run is OUT/<run>.log; the table goes to stdout and
OUT/compare.json.

Losses are not expected to be bitwise equal on a GPU: plain --bf16 is fp32 weights under bf16 autocast,
DeepSpeed bf16 keeps bf16 weights with fp32 master copies in the optimizer.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

RUNS = {"plain": None, "zero2": "deepspeed_zero2.json", "zero3": "deepspeed_zero3.json"}
EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "examples")


# ------------------------------------------------------------------------------------------ one fine-tune
def _records(features):
    """The records of a batch's features: one dict per record, or a list of them per packed row."""
    for f in features:
        yield from (f if isinstance(f, list) else [f])


class CountingCollator:
    """Wraps the run's collator and keeps, per batch in the order the data loader built them, the record
    tokens (padding excluded) and the response tokens. The order of building is the order of training, so
    the tokens of steps a..b are a slice of the list whatever the loader fetches ahead."""

    def __init__(self, collate):
        self.collate = collate
        self.tokens, self.response_tokens = [], []

    def __call__(self, features):
        recs = list(_records(features))
        self.tokens.append(sum(len(r["input_ids"]) for r in recs))
        self.response_tokens.append(sum(len(r["input_ids"]) - int(r["prefix_length"]) for r in recs))
        return self.collate(features)


def metrics_callback():
    """A TrainerCallback writing one run's metrics (made on first use: transformers loads lazily)."""
    import torch
    from transformers import TrainerCallback

    def sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    class MetricsCallback(TrainerCallback):
        def __init__(self, path, counter, timed_from):
            self.path, self.counter, self.timed_from = path, counter, timed_from
            self.t0 = self.t1 = None
            self.step0 = self.step1 = None

        def on_step_end(self, args, state, control, **kwargs):
            # the same point of every step (after its optimizer step, before its logging and saving)
            if state.global_step == self.timed_from:
                sync()
                self.t0, self.step0 = time.perf_counter(), state.global_step
            elif state.global_step == state.max_steps and self.t0 is not None:
                sync()
                self.t1, self.step1 = time.perf_counter(), state.global_step

        def on_train_end(self, args, state, control, **kwargs):
            if not state.is_world_process_zero:
                return
            ga = args.gradient_accumulation_steps
            timed = None
            if self.t1 is not None:
                sl = slice(self.step0 * ga, self.step1 * ga)
                secs = self.t1 - self.t0
                tok, resp = sum(self.counter.tokens[sl]), sum(self.counter.response_tokens[sl])
                timed = {"from_step": self.step0, "to_step": self.step1, "seconds": secs, "tokens": tok,
                         "response_tokens": resp, "tokens_per_s": tok / secs, "response_tokens_per_s": resp / secs,
                         "steps_per_s": (self.step1 - self.step0) / secs}
            cuda = torch.cuda.is_available()
            import transformers
            try:
                import deepspeed
                ds_version = deepspeed.__version__
            except ImportError:
                ds_version = None
            chain, opt = [], kwargs.get("optimizer")  # Accelerate's wrapper > DeepSpeed's ZeRO optimizer > torch's
            while opt is not None and len(chain) < 4:
                chain.append(type(opt).__name__ + (" (fused)" if getattr(opt, "defaults", {}).get("fused") else ""))
                opt = getattr(opt, "optimizer", None)
            out = {"deepspeed": args.deepspeed, "world_size": args.world_size, "optimizer": chain,
                   "steps": state.global_step,
                   "max_steps": state.max_steps, "timed": timed,
                   "peak_mem_GiB": torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None,
                   "peak_reserved_GiB": torch.cuda.max_memory_reserved() / 2 ** 30 if cuda else None,
                   "device": torch.cuda.get_device_name() if cuda else "cpu",
                   "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                                "deepspeed": ds_version},
                   "log_history": state.log_history}
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            with open(self.path + ".tmp", "w") as f:
                json.dump(out, f, indent=1)
            os.replace(self.path + ".tmp", self.path)

    return MetricsCallback


def cmd_train(argv) -> int:
    """`ulskip train` (the same flags, checks and run) with the metrics callback and token counter added to
    the Trainer it builds."""
    from ulskip.cli import train as cli_train
    from ulskip.train import trainer as T

    p = argparse.ArgumentParser(prog="python -m ulskip.bench.deepspeed_compare train",
                                description="ulskip train, writing this bench's metrics to --metrics")
    p.add_argument("--metrics", required=True, help="the run's metrics JSON")
    p.add_argument("--timed-from", type=int, default=10, help="time the steps after this one, >= 1 (default 10)")
    p.add_argument("--debug", action="store_true", help="raise errors with their traceback")
    cli_train.add_arguments(p)
    args = p.parse_args(argv)
    if args.timed_from < 1:
        raise SystemExit("deepspeed_compare train: --timed-from must be >= 1")
    if args.dataloader_num_workers:
        raise SystemExit("deepspeed_compare train: --dataloader-num-workers must be 0 (the tokens are counted "
                         "in the collator, in this process)")
    build = T.build_trainer

    def build_with_metrics(a):
        trainer, model, tokenizer = build(a)
        counter = CountingCollator(trainer.data_collator)
        trainer.data_collator = counter
        trainer.add_callback(metrics_callback()(args.metrics, counter, args.timed_from))
        return trainer, model, tokenizer

    T.build_trainer = build_with_metrics
    try:
        return cli_train.run(args)
    finally:
        T.build_trainer = build


# ------------------------------------------------------------------------------------------ the three runs
def train_command(run, config, args, metrics, output_dir) -> list[str]:
    """The command line of one run (a list for subprocess)."""
    gpus = getattr(args, "gpus", 1)
    if config is None and gpus == 1:
        head = [sys.executable, "-m", "ulskip.bench.deepspeed_compare", "train"]
    else:
        head = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(gpus),
                "-m", "ulskip.bench.deepspeed_compare", "train"] + (["--deepspeed", config] if config else [])
    return head + [
        "--metrics", metrics, "--timed-from", str(args.timed_from),
        "--model-name-or-path", args.model, "--train-file", args.train_file, "--output-dir", output_dir,
        "--overwrite-output-dir", "--target-speedup", str(args.target_speedup), "--max-steps", str(args.max_steps),
        "--per-device-train-batch-size", str(args.batch_size), "--learning-rate", str(args.lr),
        "--block-size", str(args.block_size), "--logging-steps", str(args.logging_steps),
        "--save-steps", "1000000", "--seed", str(args.seed)] + (
        ["--bf16"] if args.bf16 else []) + (["--packing"] if args.packing else [])


def _check_baseline(path):
    if path and not os.path.isdir(path):
        raise SystemExit(f"deepspeed_compare: --baseline {path!r} is not a folder (the one-GPU run's --out)")


def cmd_run(args) -> int:
    if args.gpus < 1:
        raise SystemExit(f"deepspeed_compare: --gpus must be an integer >= 1, got {args.gpus}")
    _check_baseline(args.baseline)
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    bad = [r for r in runs if r not in RUNS]
    if bad:
        raise SystemExit(f"deepspeed_compare: unknown runs {bad}; known: {', '.join(RUNS)}")
    os.makedirs(args.out, exist_ok=True)
    failed = []
    for run in runs:
        config = os.path.join(args.configs, RUNS[run]) if RUNS[run] else None
        metrics = os.path.join(args.out, f"{run}.json")
        if os.path.exists(metrics):
            os.remove(metrics)  # a stale file of an earlier run would be reported as this one's
        cmd = train_command(run, config, args, metrics, os.path.join(args.work, run))
        log = os.path.join(args.out, f"{run}.log")
        print(f"== {run}: {' '.join(cmd)}", flush=True)
        t0 = time.perf_counter()
        with open(log, "w") as f:
            f.write("$ " + " ".join(cmd) + "\n")
            f.flush()
            # a session of its own: past --run-timeout the whole group goes (torchrun and its worker)
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                rc = proc.wait(timeout=args.run_timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                rc = f"killed after {args.run_timeout:g} s"
        print(f"   rc {rc}, {time.perf_counter() - t0:.0f} s, log {log}", flush=True)
        if rc != 0 or not os.path.isfile(metrics):
            failed.append(run)
            with open(log) as f:
                print("   " + "\n   ".join(f.read()[-1500:].splitlines()), flush=True)
    report(args.out, runs, os.path.join(args.out, "compare.json"), args.baseline)
    return 1 if failed else 0


# ------------------------------------------------------------------------------------------ the report
def losses(metrics) -> dict:
    """step -> logged training loss (the Trainer's log history; the final summary has no 'loss')."""
    return {h["step"]: h["loss"] for h in metrics.get("log_history", []) if "loss" in h and "step" in h}


def _all_gpus_tokens_per_s(m):
    """tokens/s of a run over all its GPUs: rank 0's counted batches times the world size."""
    tps = (m.get("timed") or {}).get("tokens_per_s")
    return None if tps is None else tps * (m.get("world_size") or 1)


def compare(runs: dict, base="plain", baseline: dict | None = None) -> list[dict]:
    """One row per run: steps, final logged loss, the largest |loss - base loss| over the steps both logged,
    tokens/s (all GPUs), steps/s, peak memory per GPU, and with `baseline` (the same runs on one GPU) the
    scaling efficiency: tokens/s / (world size x the baseline run's tokens/s)."""
    ref = losses(runs[base]) if base in runs else {}
    rows = []
    for name, m in runs.items():
        ls = losses(m)
        common = sorted(set(ls) & set(ref))
        timed = m.get("timed") or {}
        summary = next((h for h in reversed(m.get("log_history", [])) if "train_runtime" in h), {})
        world, tps = m.get("world_size") or 1, _all_gpus_tokens_per_s(m)
        one = _all_gpus_tokens_per_s(baseline[name]) if baseline and name in baseline else None
        rows.append({
            "run": name, "deepspeed": m.get("deepspeed"), "steps": m.get("steps"), "world_size": world,
            "final_loss": ls[max(ls)] if ls else None,
            "max_abs_loss_diff": max(abs(ls[s] - ref[s]) for s in common) if common and name != base else None,
            "steps_compared": len(common) if name != base else None,
            "tokens_per_s": tps, "steps_per_s": timed.get("steps_per_s"),
            "scaling_efficiency": tps / (world * one) if tps and one else None,
            "timed_steps": f"{timed['from_step']}-{timed['to_step']}" if timed else None,
            "train_runtime_s": summary.get("train_runtime"), "peak_mem_GiB": m.get("peak_mem_GiB"),
            "peak_reserved_GiB": m.get("peak_reserved_GiB")})
    return rows


def _f(v, spec):
    return "-" if v is None else format(v, spec)


def format_table(rows) -> str:
    lines = ["| run | GPUs | steps | final loss | max abs loss diff vs plain (steps) | tokens/s (all GPUs) | "
             "scaling efficiency | steps/s | peak GiB per GPU (reserved) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        diff = "-" if r["max_abs_loss_diff"] is None else f"{r['max_abs_loss_diff']:.4f} ({r['steps_compared']})"
        eff = "-" if r.get("scaling_efficiency") is None else f"{100 * r['scaling_efficiency']:.0f}%"
        lines.append(f"| {r['run']} | {r.get('world_size') or 1} | {_f(r['steps'], 'd')} | {_f(r['final_loss'], '.4f')} | "
                     f"{diff} | {_f(r['tokens_per_s'], '.0f')} | {eff} | {_f(r['steps_per_s'], '.2f')} | "
                     f"{_f(r['peak_mem_GiB'], '.2f')} ({_f(r['peak_reserved_GiB'], '.2f')}) |")
    return "\n".join(lines)


def _read_runs(out, runs) -> dict:
    found = {}
    for run in runs:
        p = os.path.join(out, f"{run}.json")
        if os.path.isfile(p):
            with open(p) as f:
                found[run] = json.load(f)
    return found


def report(out, runs, json_path=None, baseline_dir=None) -> list[dict]:
    found = _read_runs(out, runs)
    missing = [r for r in runs if r not in found]
    rows = compare(found, baseline=_read_runs(baseline_dir, runs) if baseline_dir else None)
    any_run = next(iter(found.values()), {})
    meta = {"device": any_run.get("device"), "versions": any_run.get("versions"), "missing": missing,
            "timed_steps": next((r["timed_steps"] for r in rows if r["timed_steps"]), None)}
    print(f"\n{meta['device']}; {meta['versions']}; tokens/s and steps/s over steps {meta['timed_steps']}"
          + (f"; no metrics for {', '.join(missing)}" if missing else ""))
    print(format_table(rows))
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"meta": meta, "rows": rows, "losses": {k: losses(v) for k, v in found.items()}}, f, indent=1)
    return rows


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train"]:
        return cmd_train(argv[1:])  # ulskip train's own parser (its flags would clash with a subparser's)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="the fine-tunes, then the report")
    r.add_argument("--model", required=True, help="checkpoint folder (config.json, weights, tokenizer)")
    r.add_argument("--train-file", required=True, help="`ulskip train` data (.jsonl with prefix and text)")
    r.add_argument("--out", required=True, help="folder of the logs, metrics and compare.json")
    r.add_argument("--work", default="/tmp/ulskip-deepspeed-compare",
                   help="folder of the runs' checkpoints and models (default %(default)s)")
    r.add_argument("--runs", default="plain,zero2,zero3", help=f"comma list of {', '.join(RUNS)}")
    r.add_argument("--configs", default=EXAMPLES, help="folder of the DeepSpeed configs (default: examples/)")
    r.add_argument("--max-steps", type=int, default=100)
    r.add_argument("--batch-size", type=int, default=8, help="records (with --packing: rows) per step")
    r.add_argument("--lr", type=float, default=2e-4)
    r.add_argument("--block-size", type=int, default=512)
    r.add_argument("--no-packing", dest="packing", action="store_false", help="one record per row")
    r.add_argument("--target-speedup", type=float, default=2.0)
    r.add_argument("--logging-steps", type=int, default=5)
    r.add_argument("--timed-from", type=int, default=10, help="tokens/s over the steps after this one")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--no-bf16", dest="bf16", action="store_false", help="fp32 (CPU smoke runs)")
    r.add_argument("--run-timeout", type=float, default=170, help="seconds per fine-tune (default %(default)s)")
    r.add_argument("--gpus", type=int, default=1, help="GPUs per run, through torchrun (default %(default)s)")
    r.add_argument("--baseline", default=None, help="the one-GPU run's --out: scaling efficiency against it")
    p = sub.add_parser("report", help="the table of an --out folder")
    p.add_argument("out")
    p.add_argument("--runs", default="plain,zero2,zero3")
    p.add_argument("--json", default=None)
    p.add_argument("--baseline", default=None, help="the one-GPU run's --out: scaling efficiency against it")
    args = ap.parse_args(argv)
    if args.cmd == "run":
        return cmd_run(args)
    _check_baseline(args.baseline)
    report(args.out, [x.strip() for x in args.runs.split(",") if x.strip()], args.json, args.baseline)
    return 0


if __name__ == "__main__":
    sys.exit(main())
