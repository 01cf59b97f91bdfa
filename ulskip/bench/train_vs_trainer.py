"""Fine-tuning throughput on short records against plain transformers' Trainer, same data, same run (issue 12
item 5).

Configs, each a fresh model from --model, the same tokenized records (ulskip.train.data.encode: the same ids and
prefix/response boundary), bf16 mixed precision, AdamW, lr 2e-4 cosine, embeddings frozen in all:
  trainer          transformers' Trainer as a user writes it: AutoModelForCausalLM, DataCollatorForSeq2Seq
                   (labels -100 on the prefix and the padding), every layer, transformers' own loss
  uls1-padded      `ulskip train --target-speedup 1 --use-fused-kernels`: all layers, one record per row (what
                   the fused kernels and the step fixes give alone)
  uls2-packedB     `ulskip train --target-speedup 2 --packing --block-size 512 --use-fused-kernels`, B rows
Timing: the seconds between the end of step --warmup and the end of the last step, with a device sync at
those two points only; tokens = the real (non-padding) tokens the collator handed those steps.
MFU: the FLOPs the method needs (ulskip.bench.train's definition, attention left out: records of ~66 tokens
make it about 1% of a layer's matmuls): forward + backward = 3 x forward, each token through the layers it
runs (ULS: prefix tokens all layers, response tokens the kept ones; the Trainer: all) and the LM head on the
response tokens; over the GPU's dense bf16 peak.

    python -m ulskip.bench.train_vs_trainer --model smollm2 --train-file data-fr/train.jsonl --json out.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time

import torch

from ulskip.bench.train import default_peak_tflops, layer_forward_flops

CONFIGS = ("trainer", "uls1-padded", "uls2-packed8", "uls2-packed64")


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a checkpoint folder (Llama family: --packing needs one)")
    p.add_argument("--train-file", required=True)
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma list of {', '.join(CONFIGS)}")
    p.add_argument("--trainer-batch-size", type=int, default=32, help="records per step of trainer / uls1-padded")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=10, help="steps before the timed stretch")
    p.add_argument("--block-size", type=int, default=512)
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak (default: 989 on an H100/H200)")
    p.add_argument("--random-init", action="store_true",
                   help="--model's config and tokenizer with random weights (seed 0): throughput does not depend on "
                        "the weights, and a folder of config + tokenizer files travels where the weights cannot")
    p.add_argument("--cpu", action="store_true", help="run on the CPU in fp32 (smoke test; no --bf16; refused while a GPU is visible)")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    bad = [c for c in a.configs.split(",") if c not in CONFIGS]
    if bad:
        p.error(f"--configs: unknown {bad}; known: {', '.join(CONFIGS)}")
    if a.warmup < 1 or a.steps <= a.warmup:
        p.error(f"--steps ({a.steps}) must exceed --warmup ({a.warmup}), and --warmup must be at least 1")
    if a.trainer_batch_size < 1:
        p.error(f"--trainer-batch-size must be at least 1, got {a.trainer_batch_size}")
    if a.peak_tflops is not None and not 0 < a.peak_tflops < float("inf"):
        p.error(f"--peak-tflops must be a positive number, got {a.peak_tflops}")
    return a


class _Counting:
    """A collator wrapper that records (prefix, response) tokens of each batch it makes, in order (batch i =
    step i: one micro-batch per step, --dataloader-num-workers 0)."""

    def __init__(self, collate, count):
        self.collate, self.count, self.tokens = collate, count, []

    def __call__(self, features):
        self.tokens.append(self.count(features))  # first: transformers' collator pads the features' labels in place
        return self.collate(features)


def _timer_callback(warmup: int, device):
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.t0 = self.t1 = None

        def on_step_end(self, args, state, control, **kw):
            if state.global_step == warmup or state.global_step == state.max_steps:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                if state.global_step == warmup:
                    self.t0 = time.perf_counter()
                else:
                    self.t1 = time.perf_counter()

    return StepTimer()


def model_flops(config, kept: int, prefix_tokens: int, response_tokens: int) -> float:
    """Forward + backward FLOPs of the tokens' matmuls (see the module docstring)."""
    heads = config.num_attention_heads
    layer = layer_forward_flops(config.hidden_size, config.intermediate_size, heads,
                                getattr(config, "num_key_value_heads", None) or heads, getattr(config, "head_dim", None))
    L, head = config.num_hidden_layers, 2 * config.hidden_size * config.vocab_size
    return 3.0 * ((prefix_tokens * L + response_tokens * kept) * layer + response_tokens * head)


def _split(examples):
    """(prefix tokens, response tokens) of encoded records."""
    return (sum(e["prefix_length"] for e in examples),
            sum(len(e["input_ids"]) - e["prefix_length"] for e in examples))


def _trainer(args, out, device):
    """transformers' Trainer as a user writes it for instruction tuning."""
    from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer,
                              TrainingArguments)

    from ulskip.train.data import IGNORE_INDEX, ULSDataset, resolve_files

    tok = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    examples = ULSDataset(resolve_files(args.train_file), tok, args.block_size).examples
    feats = [{"input_ids": e["input_ids"], "attention_mask": [1] * len(e["input_ids"]),
              "labels": [IGNORE_INDEX] * e["prefix_length"] + e["input_ids"][e["prefix_length"]:]} for e in examples]
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, local_files_only=True)
    model.get_input_embeddings().weight.requires_grad_(False)
    collate = _Counting(DataCollatorForSeq2Seq(tok, pad_to_multiple_of=None if args.cpu else 8),
                        lambda fs: _split([{"input_ids": f["input_ids"], "prefix_length": f["labels"].count(IGNORE_INDEX)}
                                           for f in fs]))
    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    warm = {"warmup_ratio": 0.03} if "warmup_ratio" in fields else {"warmup_steps": 0.03}  # newer: a ratio if < 1
    targs = TrainingArguments(output_dir=out, per_device_train_batch_size=args.trainer_batch_size,
                              max_steps=args.steps, learning_rate=2e-4, lr_scheduler_type="cosine", **warm,
                              bf16=not args.cpu, use_cpu=args.cpu, logging_steps=10 ** 6, save_strategy="no",
                              report_to="none", dataloader_num_workers=0, seed=0)
    trainer = Trainer(model=model, args=targs, train_dataset=feats, data_collator=collate)
    return trainer, model, collate


def _ulskip(args, out, device, speedup: float, packed: bool, batch: int):
    """`ulskip train`'s own Trainer (ulskip.train.trainer.build_trainer), from the CLI's flags."""
    from ulskip.cli import train as cli
    from ulskip.train.trainer import build_trainer

    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    flags = ["--model-name-or-path", args.model, "--train-file", args.train_file, "--output-dir", out,
             "--target-speedup", f"{speedup:g}", "--per-device-train-batch-size", str(batch), "--max-steps",
             str(args.steps), "--learning-rate", "2e-4", "--lr-scheduler-type", "cosine", "--warmup-ratio", "0.03",
             "--save-steps", str(10 ** 6), "--logging-steps", str(10 ** 6), "--block-size", str(args.block_size),
             "--seed", "0"] + ([] if args.cpu else ["--bf16", "--use-fused-kernels"]) + (["--packing"] if packed else [])
    trainer, model, _ = build_trainer(p.parse_args(flags))
    trainer.args.save_strategy = "no"  # no checkpoint at the last step: its write is no training
    count = (lambda rows: _split([ex for row in rows for ex in row])) if packed else _split
    collate = _Counting(trainer.data_collator, count)
    trainer.data_collator = collate
    return trainer, model, collate


def run_config(args, name, device):
    out = tempfile.mkdtemp(prefix=f"ulskip-tvt-{name}-")
    try:
        if name == "trainer":
            trainer, model, collate = _trainer(args, out, device)
            speedup = 1.0
        else:
            speedup = 1.0 if name == "uls1-padded" else 2.0
            packed = name.startswith("uls2-packed")
            batch = int(name.rsplit("packed", 1)[1]) if packed else args.trainer_batch_size
            trainer, model, collate = _ulskip(args, out, device, speedup, packed, batch)
        timer = _timer_callback(args.warmup, device)
        trainer.add_callback(timer)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        trainer.train()
        secs = timer.t1 - timer.t0
        prefix = sum(c[0] for c in collate.tokens[args.warmup:args.steps])
        response = sum(c[1] for c in collate.tokens[args.warmup:args.steps])
        L = model.config.num_hidden_layers
        kept = len((getattr(model.config, "ulskip", None) or {}).get("kept_layers", range(L)))
        row = {"config": name, "target_speedup": speedup, "steps_timed": args.steps - args.warmup, "seconds": secs,
               "steps_per_s": (args.steps - args.warmup) / secs, "tokens": prefix + response,
               "prefix_tokens": prefix, "response_tokens": response, "tokens_per_s": (prefix + response) / secs,
               "kept_layers": kept, "num_layers": L, "batches": len(collate.tokens),
               "model_tflops_per_s": model_flops(model.config, kept, prefix, response) / secs / 1e12,
               "peak_gib": torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None}
        return row
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main(argv=None):
    from ulskip.train.data import DataError
    from ulskip.train.safety import TrainError

    args = parse(argv)
    try:
        return _main(args)
    except (DataError, TrainError) as e:  # a missing folder or file, a bad record: one line, as ulskip train
        raise SystemExit(f"train_vs_trainer: {e}") from None


def _main(args):
    from ulskip.train.data import resolve_files
    from ulskip.train.safety import check_model_folder

    check_model_folder(args.model, "--model")  # config.json and a tokenizer (weights too, unless --random-init)
    resolve_files(args.train_file)
    device = torch.device("cpu" if args.cpu else "cuda")
    if args.cpu and torch.cuda.is_available():
        # `ulskip train` (the uls configs) takes the GPU whenever one is visible: the trainer row would run on the
        # CPU, the others on the GPU, timed without a sync
        raise SystemExit("train_vs_trainer: --cpu, but a CUDA device is visible and `ulskip train` would use it; "
                         "hide it for a CPU run (CUDA_VISIBLE_DEVICES=)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("train_vs_trainer: no CUDA device (use --cpu for a smoke test)")
    peak = args.peak_tflops if args.peak_tflops is not None else default_peak_tflops(device)
    rows = []
    meta = {"model": args.model, "train_file": args.train_file, "steps": args.steps, "warmup": args.warmup,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "peak_tflops": peak}
    try:
        import transformers
        meta["transformers"] = transformers.__version__
    except ImportError:
        pass
    tmp = None
    if args.random_init:
        tmp = tempfile.mkdtemp(prefix="ulskip-tvt-model-")
        args.model = random_checkpoint(args.model, tmp)
        meta["weights"] = "random (seed 0)"
    try:
        for name in args.configs.split(","):
            rows.append(_one(args, name, device, peak, meta, rows))
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    base = next((r for r in rows if r["config"] == "trainer"), None)

    print(f"{'config':15s} {'steps/s':>8s} {'tok/s':>10s} {'x trainer':>9s} {'TFLOP/s':>8s} {'MFU':>6s} {'peak GiB':>8s}")
    for r in rows:
        x = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}" if base else "-"
        gib = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "-"
        mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else "-"
        print(f"{r['config']:15s} {r['steps_per_s']:8.2f} {r['tokens_per_s']:10.0f} {x:>9s} "
              f"{r['model_tflops_per_s']:8.1f} {mfu:>6s} {gib:>8s}")
    print("tok/s: real (non-padding) tokens over the timed steps; TFLOP/s: the model FLOPs the method needs "
          "(module docstring)")
    return 0


def random_checkpoint(folder: str, out: str) -> str:
    """`folder`'s config and tokenizer with random weights (seed 0), saved to `out`."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder, local_files_only=True))
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(folder, local_files_only=True).save_pretrained(out)
    return out


def _one(args, name, device, peak, meta, rows):
    """One config's row, written to --json with the rows before it (a later crash keeps them)."""
    row = run_config(args, name, device)
    if peak:
        row["mfu"] = row["model_tflops_per_s"] / peak
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows + [row]}, f, indent=1)
    gc_collect(device)
    return row


def gc_collect(device):
    import gc
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


if __name__ == "__main__":
    sys.exit(main())
