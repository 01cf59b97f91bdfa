"""The fine-tuning run behind `ulskip train` (ulskip/cli/train.py parses the flags): tokenizer, data,
model (frozen embeddings, ULS, fused kernels) and transformers' Trainer.

Built on transformers' Trainer (progress bar, logged loss, checkpoints every --save-steps, resume).
The output folder holds the model, the tokenizer and config.json with an `ulskip` section (kept layers,
target speedup, strategy, prefill) that `ulskip.Engine.from_pretrained` uses as its default schedule.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys


def training_args(args):
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


def check_args(args):
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


def zero_stage(path) -> int:
    if not path:
        return 0
    with open(path) as f:
        return int(json.load(f).get("zero_optimization", {}).get("stage", 0))


def fused_patch_kwargs(args) -> dict:
    """patch_model's switches for --use_fused_kernels. ZeRO-3 gathers a weight only inside its own
    module's forward (a pre-forward hook). The norm and SwiGLU/GeLU patches read only their own
    module's parameters in that module's forward (SwiGLU calls gate_proj/up_proj as modules), so they
    stay on; the fused loss reads the LM head's weight outside the head's forward, so ZeRO-3 leaves it
    out (the model's own loss runs instead)."""
    return {"norm": True, "activation": True, "cross_entropy": zero_stage(args.deepspeed) < 3}


def resume_path(args):
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

    from ulskip.calibration import read_block_influence
    from ulskip.train.apply_uls import apply_uls
    from ulskip.train.data import StreamingULSDataset, ULSCollator, ULSDataset, resolve_files

    check_args(args)
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
    targs = training_args(args)
    dtype = "auto" if args.torch_dtype == "auto" else getattr(torch, args.torch_dtype)
    model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, dtype=dtype)
    if args.freeze_emb:
        model.get_input_embeddings().weight.requires_grad_(False)  # tied: the LM head is the same tensor
    fused = bool(args.use_fused_kernels)
    bi = None
    if args.strategy == "shortgpt":
        if not args.calibration:
            raise ValueError("--strategy shortgpt needs --calibration (the scores file of `ulskip calibrate`)")
        bi = read_block_influence(args.calibration)
    apply_uls(model, target_speedup=args.target_speedup, strategy=args.strategy, prefill=args.prefill,
              layer_seed=args.layer_seed, block_influence=bi)
    if fused:
        from ulskip.train.patching import patch_model
        kw = fused_patch_kwargs(args)
        if not kw["cross_entropy"]:
            print("ulskip train: ZeRO-3: the fused linear cross-entropy is off (it reads the LM head outside "
                  "its forward); the norm and activation kernels are on", file=sys.stderr)
        patch_model(model, **kw)

    trainer = Trainer(model=model, args=targs, train_dataset=dataset,
                      data_collator=ULSCollator(pad, pad_to_multiple_of=8 if (args.bf16 or args.fp16) else None),
                      processing_class=tokenizer)
    return trainer, model, tokenizer
