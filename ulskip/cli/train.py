"""`ulskip train`: fine-tune a Hugging Face causal LM with the ULS schedule it will run at inference.

    ulskip train --model-name-or-path ckpt --train-file 'data/*.jsonl' --target-speedup 2 \
        --output-dir out --bf16 --per-device-train-batch-size 8 --num-train-epochs 3
    torchrun --nproc_per_node 2 -m ulskip.cli train ...          # DDP
    ... --deepspeed examples/deepspeed_zero2.json               # ZeRO-2/3 (pip install deepspeed)

Every flag also takes its underscore spelling (--target_speedup, --model_name_or_path, ...): the
paper's and transformers' commands run as they are.
"""
from __future__ import annotations

import argparse
import sys

from ulskip.schedule import STRATEGIES


def flag(p, name: str, **kwargs):
    """--name-with-dashes, with --name_with_underscores as an alias."""
    dashed = name.replace("_", "-")
    spellings = ["--" + dashed] + (["--" + name] if name != dashed else [])
    return p.add_argument(*spellings, dest=name, **kwargs)


def _bool(v: str) -> bool:
    s = str(v).strip().lower()
    if s in ("1", "true", "yes", "y", "on"):
        return True
    if s in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {v!r}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    flag(p, "model_name_or_path", required=True, help="local checkpoint folder (model + tokenizer)")
    flag(p, "train_file", required=True,
         help="glob of .json/.jsonl files with 'prefix' and 'text' fields (comma-separate several)")
    flag(p, "output_dir", required=True)
    flag(p, "target_speedup", type=float, default=2.0)
    flag(p, "strategy", default="paper", choices=STRATEGIES,
         help="layer policy (default paper: the ULS rule; baselines: even, early-exit, shortgpt, random)")
    flag(p, "calibration", default=None, help="--strategy shortgpt: the scores file of `ulskip calibrate`")
    flag(p, "layer_seed", type=int, default=0, help="--strategy random: the seed of the drawn layers (default 0)")
    flag(p, "prefill", default="full", choices=["full", "skip"])
    flag(p, "freeze_emb", type=_bool, default=True, nargs="?", const=True,
         help="freeze the word embeddings (with tied embeddings: the LM head too); default true")
    flag(p, "block_size", type=int, default=1024, help="longest allowed record in tokens")
    flag(p, "per_device_train_batch_size", type=int, default=1)
    flag(p, "gradient_accumulation_steps", type=int, default=1)
    flag(p, "learning_rate", type=float, default=2e-5)
    flag(p, "num_train_epochs", type=float, default=3.0)
    flag(p, "max_steps", type=int, default=-1, help="overrides --num_train_epochs when > 0")
    flag(p, "lr_scheduler_type", default="cosine")
    flag(p, "warmup_ratio", type=float, default=0.03)
    flag(p, "weight_decay", type=float, default=0.0)
    prec = p.add_mutually_exclusive_group()
    flag(prec, "bf16", action="store_true", help="bf16 mixed precision")
    flag(prec, "fp16", action="store_true", help="fp16 mixed precision")
    flag(p, "torch_dtype", default="float32", choices=["float32", "bfloat16", "float16", "auto"],
         help="dtype the weights are loaded in (float32 master weights by default)")
    flag(p, "deepspeed", default=None, help="DeepSpeed config json (needs `pip install deepspeed`)")
    flag(p, "save_steps", type=int, default=500)
    flag(p, "save_total_limit", type=int, default=None)
    flag(p, "logging_steps", type=int, default=10)
    flag(p, "seed", type=int, default=42)
    flag(p, "streaming", action="store_true",
         help="read the data lazily (needs --max_steps); bad records raise when reached")
    flag(p, "resume_from_checkpoint", default=None,
         help="a checkpoint folder, or 'latest' for the newest checkpoint-* in --output_dir")
    flag(p, "use_fused_kernels", type=_bool, default=False, nargs="?", const=True,
         help="Triton norms/activations and the chunked fused linear cross-entropy")
    flag(p, "gradient_checkpointing", action="store_true")
    flag(p, "dataloader_num_workers", type=int, default=0)


def run(args) -> int:
    from ulskip.train.data import DataError
    from ulskip.train.trainer import build_trainer, resume_path

    try:
        trainer, model, tokenizer = build_trainer(args)
        resume = resume_path(args)
    except (DataError, ValueError, FileNotFoundError, OSError) as e:
        print(f"ulskip train: error: {e}", file=sys.stderr)
        return 2
    try:
        trainer.train(resume_from_checkpoint=resume)
    except DataError as e:  # streaming: a bad record found mid-run
        print(f"ulskip train: error: {e}", file=sys.stderr)
        return 2
    trainer.save_model(args.output_dir)
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(args.output_dir)
        print(f"ulskip train: saved to {args.output_dir} (kept layers {model.config.ulskip['kept_layers']}, "
              f"prefill {model.config.ulskip['prefill']})")
    return 0

