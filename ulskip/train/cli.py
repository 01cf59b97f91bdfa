"""`ulskip train`: fine-tune a Hugging Face causal LM with the ULS schedule it will run at inference.

    ulskip train --model_name_or_path ckpt --train_file 'data/*.jsonl' --target_speedup 2 \
        --output_dir out --bf16 --per_device_train_batch_size 8 --num_train_epochs 3
    torchrun --nproc_per_node 2 -m ulskip.cli train ...          # DDP
    ... --deepspeed examples/deepspeed_zero2.json               # ZeRO-2/3 (pip install deepspeed)

Built on transformers' Trainer (progress bar, logged loss, checkpoints every --save_steps, resume).
The output folder holds the model, the tokenizer and config.json with an `ulskip` section (kept layers,
target speedup, strategy, prefill) that `ulskip.Engine.from_pretrained` uses as its default schedule.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys


def _bool(v: str) -> bool:
    s = str(v).strip().lower()
    if s in ("1", "true", "yes", "y", "on"):
        return True
    if s in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {v!r}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model_name_or_path", required=True, help="local checkpoint folder (model + tokenizer)")
    p.add_argument("--train_file", required=True,
                   help="glob of .json/.jsonl files with 'prefix' and 'text' fields (comma-separate several)")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--target_speedup", type=float, default=2.0)
    p.add_argument("--strategy", default="paper", choices=["paper", "even"])
    p.add_argument("--prefill", default="full", choices=["full", "skip"])
    p.add_argument("--freeze_emb", type=_bool, default=True, nargs="?", const=True,
                   help="freeze the word embeddings (with tied embeddings: the LM head too); default true")
    p.add_argument("--block_size", type=int, default=1024, help="longest allowed record in tokens")
    p.add_argument("--per_device_train_batch_size", type=int, default=1)
    p.add_argument("--gradient_accumulation_steps", type=int, default=1)
    p.add_argument("--learning_rate", type=float, default=2e-5)
    p.add_argument("--num_train_epochs", type=float, default=3.0)
    p.add_argument("--max_steps", type=int, default=-1, help="overrides --num_train_epochs when > 0")
    p.add_argument("--lr_scheduler_type", default="cosine")
    p.add_argument("--warmup_ratio", type=float, default=0.03)
    p.add_argument("--weight_decay", type=float, default=0.0)
    prec = p.add_mutually_exclusive_group()
    prec.add_argument("--bf16", action="store_true", help="bf16 mixed precision")
    prec.add_argument("--fp16", action="store_true", help="fp16 mixed precision")
    p.add_argument("--torch_dtype", default="float32", choices=["float32", "bfloat16", "float16", "auto"],
                   help="dtype the weights are loaded in (float32 master weights by default)")
    p.add_argument("--deepspeed", default=None, help="DeepSpeed config json (needs `pip install deepspeed`)")
    p.add_argument("--save_steps", type=int, default=500)
    p.add_argument("--save_total_limit", type=int, default=None)
    p.add_argument("--logging_steps", type=int, default=10)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--streaming", action="store_true",
                   help="read the data lazily (needs --max_steps); bad records raise when reached")
    p.add_argument("--resume_from_checkpoint", default=None,
                   help="a checkpoint folder, or 'latest' for the newest checkpoint-* in --output_dir")
    p.add_argument("--use_fused_kernels", type=_bool, default=False, nargs="?", const=True,
                   help="Triton norms/activations and the chunked fused linear cross-entropy")
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--dataloader_num_workers", type=int, default=0)


def _training_args(args):
    from transformers import TrainingArguments

    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    kw = dict(output_dir=args.output_dir, per_device_train_batch_size=args.per_device_train_batch_size,
              gradient_accumulation_steps=args.gradient_accumulation_steps, learning_rate=args.learning_rate,
              num_train_epochs=args.num_train_epochs, max_steps=args.max_steps,
              lr_scheduler_type=args.lr_scheduler_type, weight_decay=args.weight_decay, bf16=args.bf16,
              fp16=args.fp16, deepspeed=args.deepspeed, save_strategy="steps", save_steps=args.save_steps,
              save_total_limit=args.save_total_limit, logging_steps=args.logging_steps, seed=args.seed,
              report_to="none", remove_unused_columns=False, ddp_find_unused_parameters=False,
              gradient_checkpointing=args.gradient_checkpointing,
              dataloader_num_workers=args.dataloader_num_workers)
    if args.gradient_checkpointing and "gradient_checkpointing_kwargs" in fields:
        kw["gradient_checkpointing_kwargs"] = {"use_reentrant": False}
    if "warmup_ratio" in fields:       # older transformers
        kw["warmup_ratio"] = args.warmup_ratio
    else:                              # newer: warmup_steps in [0, 1) is a ratio
        kw["warmup_steps"] = args.warmup_ratio
    if "use_cpu" in fields:
        import torch
        kw["use_cpu"] = not torch.cuda.is_available()
    return TrainingArguments(**{k: v for k, v in kw.items() if k in fields})


def _check_args(args):
    for name in ("block_size", "per_device_train_batch_size", "gradient_accumulation_steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.streaming and args.max_steps <= 0:
        raise ValueError("--streaming reads the data lazily, so the length of an epoch is unknown: give --max_steps")
    if not 0 <= args.warmup_ratio < 1:
        raise ValueError(f"--warmup_ratio must be in [0, 1), got {args.warmup_ratio}")
    if args.deepspeed:
        if not os.path.isfile(args.deepspeed):
            raise ValueError(f"--deepspeed config {args.deepspeed!r} does not exist")
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            raise ValueError("--deepspeed needs the optional package deepspeed (pip install deepspeed)") from None


def _zero_stage(path) -> int:
    if not path:
        return 0
    with open(path) as f:
        return int(json.load(f).get("zero_optimization", {}).get("stage", 0))


def _fused_patch_kwargs(args) -> dict:
    """patch_model's switches for --use_fused_kernels. ZeRO-3 gathers a weight only inside its own
    module's forward (a pre-forward hook). The norm and SwiGLU/GeLU patches read only their own
    module's parameters in that module's forward (SwiGLU calls gate_proj/up_proj as modules), so they
    stay on; the fused loss reads the LM head's weight outside the head's forward, so ZeRO-3 leaves it
    out (the model's own loss runs instead)."""
    return {"norm": True, "activation": True, "cross_entropy": _zero_stage(args.deepspeed) < 3}


def _resume_path(args):
    r = args.resume_from_checkpoint
    if r is None:
        return None
    if r in ("latest", "auto", "true", "True"):
        from transformers.trainer_utils import get_last_checkpoint
        last = get_last_checkpoint(args.output_dir) if os.path.isdir(args.output_dir) else None
        if last is None:
            raise ValueError(f"--resume_from_checkpoint {r}: no checkpoint-* folder in {args.output_dir}")
        return last
    if not os.path.isdir(r):
        raise ValueError(f"--resume_from_checkpoint {r!r} is not a folder")
    return r


def build_trainer(args):
    """Tokenizer, data, model (frozen embeddings, ULS, fused kernels) and Trainer, from parsed args."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, set_seed

    from ulskip.train.apply_uls import apply_uls
    from ulskip.train.data import StreamingULSDataset, ULSCollator, ULSDataset, resolve_files

    _check_args(args)
    set_seed(args.seed)
    files = resolve_files(args.train_file)
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    if args.streaming:
        dataset = StreamingULSDataset(files, tokenizer, args.block_size, seed=args.seed)
    else:
        dataset = ULSDataset(files, tokenizer, args.block_size)  # bad data fails before the model loads
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0

    # TrainingArguments before the model: with a ZeRO-3 --deepspeed config this registers it, so that
    # from_pretrained partitions the weights while loading (zero.Init) instead of each rank loading all.
    targs = _training_args(args)
    dtype = "auto" if args.torch_dtype == "auto" else getattr(torch, args.torch_dtype)
    model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, dtype=dtype)
    if args.freeze_emb:
        model.get_input_embeddings().weight.requires_grad_(False)  # tied: the LM head is the same tensor
    fused = bool(args.use_fused_kernels)
    apply_uls(model, target_speedup=args.target_speedup, strategy=args.strategy, prefill=args.prefill)
    if fused:
        from ulskip.train.patching import patch_model
        kw = _fused_patch_kwargs(args)
        if not kw["cross_entropy"]:
            print("ulskip train: ZeRO-3: the fused linear cross-entropy is off (it reads the LM head outside "
                  "its forward); the norm and activation kernels are on", file=sys.stderr)
        patch_model(model, **kw)

    trainer = Trainer(model=model, args=targs, train_dataset=dataset,
                      data_collator=ULSCollator(pad, pad_to_multiple_of=8 if (args.bf16 or args.fp16) else None),
                      processing_class=tokenizer)
    return trainer, model, tokenizer


def run(args) -> int:
    from ulskip.train.data import DataError

    try:
        trainer, model, tokenizer = build_trainer(args)
        resume = _resume_path(args)
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="ulskip train", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
