"""`ulskip train`: fine-tune a Hugging Face causal LM with the ULS schedule it will run at inference.

    ulskip train --model-name-or-path ckpt --train-file 'data/*.jsonl' --target-speedup 2 \
        --output-dir out --bf16 --per-device-train-batch-size 8 --num-train-epochs 3
    torchrun --nproc_per_node 2 -m ulskip.cli train ...          # DDP
    ... --deepspeed examples/deepspeed_zero2.json               # ZeRO-2/3 (pip install deepspeed)

Several speedups in one checkpoint: --target-speedups 1,2,3 [--speedup-weights 1,1,2] [--speedup-draw
step|micro-batch]; each training forward runs one drawn schedule (ulskip/train/apply_uls.py, SpeedupDraw).

Every flag also takes its underscore spelling (--target_speedup, --model_name_or_path, ...): the
paper's and transformers' commands run as they are.

The output folder: a non-empty --output-dir is refused unless --overwrite-output-dir (the previous run's
model files and checkpoint-* folders are removed once the data, model and Trainer are built, before the
first step) or --resume-from-checkpoint (latest: the newest complete checkpoint-N). Checkpoints are written
atomically; the model is written last, only after training succeeded and its weights were checked finite,
so a failed or diverged run leaves no servable model (ulskip/train/safety.py).

Errors: every expected one (a bad flag value, file, folder or record; a diverged run) is one line
`ulskip train: <message>` on stderr and exit code 2; --debug raises it with its traceback instead.
"""
from __future__ import annotations

import argparse
import sys

from ulskip.schedule import DYNAMIC_STRATEGIES, STRATEGIES


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
    # --debug (raise with the traceback instead of the one-line message) is added to every subcommand by
    # ulskip.cli (add_debug_flag); run() reads it as args.debug.
    flag(p, "model_name_or_path", required=True,
         help="local checkpoint folder with config.json, weights and a tokenizer (required; nothing is "
              "downloaded)")
    flag(p, "train_file", required=True,
         help="glob of .json/.jsonl files with 'prefix' and 'text' fields (comma-separate several; required)")
    flag(p, "output_dir", required=True,
         help="folder of the checkpoints and, after a successful run, the model (required; must be empty or "
              "missing unless --overwrite-output-dir or --resume-from-checkpoint)")
    flag(p, "overwrite_output_dir", action="store_true",
         help="remove a previous run's model files and checkpoint-* folders from --output-dir before training "
              "(other files stay; default: a non-empty --output-dir is refused)")
    flag(p, "target_speedup", type=float, default=None, help="target layer speedup s: keep floor(L / s) layers "
         "(default 2; with --target-speedups it may only repeat one of them)")
    flag(p, "target_speedups", default=None,
         help="train one checkpoint for several speedups, comma-separated (e.g. 1,2,3; 1 = every layer): each "
              "training forward runs one of their schedules, drawn from --seed and the step; the checkpoint's "
              "default schedule is the largest, `ulskip eval/generate --target-speedup s` runs another "
              "(default: none, one speedup)")
    flag(p, "speedup_weights", default=None,
         help="with --target-speedups: comma-separated draw weights >= 0, one per speedup (default: uniform)")
    flag(p, "speedup_draw", default="step", choices=["step", "micro-batch"],
         help="with --target-speedups: one schedule per optimizer step, or one per micro-batch of "
              "--gradient-accumulation-steps (default %(default)s)")
    flag(p, "draft_boundary", default="prefix", choices=["prefix", "random"],
         help="random: each training record's skip path starts at a drawn point inside its response (the "
              "stretch before it runs every layer, as verified tokens do in self-speculative decoding; the loss "
              "stays on the whole response); needs --prefill full (default %(default)s: at the "
              "prefix end)")
    flag(p, "strategy", default="paper", choices=STRATEGIES + DYNAMIC_STRATEGIES,
         help="layer policy (default %(default)s: the ULS rule; baselines: even, early-exit, shortgpt, random, "
              "skipdecode)")
    flag(p, "calibration", default=None,
         help="--strategy shortgpt: the scores file of `ulskip calibrate` (default: none)")
    flag(p, "layer_seed", type=int, default=0,
         help="--strategy random: the seed of the drawn layers (default %(default)s)")
    flag(p, "prefill", default="full", choices=["full", "skip"],
         help="full: the prefix runs through all layers; skip: through the kept layers too "
              "(default %(default)s)")
    flag(p, "freeze_emb", type=_bool, default=True, nargs="?", const=True,
         help="freeze the word embeddings (with tied embeddings: the LM head too) (default %(default)s)")
    flag(p, "block_size", type=int, default=1024,
         help="longest allowed record in tokens (default %(default)s)")
    flag(p, "per_device_train_batch_size", type=int, default=1, help="records per batch and device "
         "(default %(default)s)")
    flag(p, "gradient_accumulation_steps", type=int, default=1,
         help="batches per optimizer step (default %(default)s)")
    flag(p, "learning_rate", type=float, default=2e-5, help="peak learning rate, > 0 (default %(default)s)")
    flag(p, "num_train_epochs", type=float, default=3.0,
         help="passes over the data, > 0 (default %(default)s)")
    flag(p, "max_steps", type=int, default=-1,
         help="optimizer steps; overrides --num-train-epochs when >= 1 (default %(default)s: use the epochs)")
    flag(p, "lr_scheduler_type", default="cosine",
         help="transformers' learning-rate schedule: linear, cosine, constant, ... (default %(default)s)")
    flag(p, "warmup_ratio", type=float, default=0.03,
         help="share of the steps spent warming up, in [0, 1) (default %(default)s)")
    flag(p, "weight_decay", type=float, default=0.0, help="AdamW weight decay, >= 0 (default %(default)s)")
    prec = p.add_mutually_exclusive_group()
    flag(prec, "bf16", action="store_true", help="bf16 mixed precision (default: off)")
    flag(prec, "fp16", action="store_true", help="fp16 mixed precision with loss scaling (default: off)")
    flag(p, "torch_dtype", default="float32", choices=["float32", "bfloat16", "float16", "auto"],
         help="dtype the weights are loaded and trained in (default %(default)s: float32 master weights)")
    flag(p, "deepspeed", default=None, help="DeepSpeed config json (needs `pip install deepspeed`; default: none)")
    flag(p, "save_steps", type=int, default=None,
         help="write a checkpoint-N every this many steps, >= 1 (default 500)")
    flag(p, "save_strategy", default="steps", choices=["steps", "no"],
         help="steps: a checkpoint-N (model + optimizer, to resume from) every --save-steps and at the last "
              "step, as transformers' Trainer does; no: none, only the final model (default %(default)s)")
    flag(p, "save_total_limit", type=int, default=None,
         help="keep at most this many checkpoint-* folders, >= 1 (default: keep all)")
    flag(p, "logging_steps", type=int, default=10, help="log the loss every this many steps, >= 1 "
         "(default %(default)s)")
    flag(p, "seed", type=int, default=42, help="seed of the data order and initialisation (default %(default)s)")
    flag(p, "distill_from", default=None,
         help="logit distillation: a fine-tuned full model (same tokenizer) whose next-token distribution the "
              "skipped model also learns on the response tokens (default: none, labels only)")
    flag(p, "distill_weight", type=float, default=0.5,
         help="with --distill-from: weight w of the distillation term, loss = (1-w) CE + w KL, in (0, 1] "
              "(default %(default)s)")
    flag(p, "distill_temperature", type=float, default=1.0,
         help="with --distill-from: softmax temperature of both distributions, > 0 (default %(default)s)")
    flag(p, "full_path_loss_weight", type=float, default=0.0,
         help="auxiliary loss: each step also runs every layer for every token and adds this weight x the full "
              "path's cross-entropy (the paper code's full_layers_pred_loss_rate; costs a second pass), >= 0 "
              "(default %(default)s: off)")
    flag(p, "hidden_match_weight", type=float, default=0.0,
         help="auxiliary loss: adds this weight x the summed 1 - cosine between the skip path's and the full "
              "path's final hidden states on the response, the full path as the target (the paper code's "
              "skip_full_layers_sim_loss_rate), >= 0 (default %(default)s: off)")
    flag(p, "packing", action="store_true",
         help="padding-free rows: records packed into rows of up to --block-size tokens, attention and positions "
              "per record, the ULS semantics per record (Llama family; --per-device-train-batch-size then counts "
              "rows) (default: off, one record per row)")
    flag(p, "skipdecode_horizon", type=int, default=64,
         help="--strategy skipdecode: response positions over which the depth falls (default %(default)s)")
    flag(p, "streaming", action="store_true",
         help="read the data lazily (needs --max-steps); bad records raise when reached (default: off)")
    flag(p, "resume_from_checkpoint", default=None,
         help="a checkpoint folder, or 'latest' for the newest complete checkpoint-* in --output-dir "
              "(default: none, start from --model-name-or-path)")
    flag(p, "use_fused_kernels", type=_bool, default=False, nargs="?", const=True,
         help="Triton norms/activations and the chunked fused linear cross-entropy (default %(default)s)")
    flag(p, "gradient_checkpointing", action="store_true",
         help="recompute activations in backward to save memory (default: off)")
    flag(p, "dataloader_num_workers", type=int, default=0,
         help="data loading processes, >= 0 (default %(default)s: the main process)")


def _one_line(e) -> str:
    return " ".join(str(e).split("\n")).strip() or type(e).__name__


def run(args) -> int:
    """Every expected error is one line `ulskip train: <message>` on stderr and exit code 2 (--debug:
    the exception with its traceback). Order: flags, model folder, output folder and resume checkpoint
    (nothing read or written yet); data, model and Trainer (still nothing written); then the output folder
    is prepared (--overwrite-output-dir), training runs, and the model is saved last."""
    from ulskip.train import safety
    from ulskip.train import trainer as T
    from ulskip.train.data import DataError

    trainer = None
    try:
        safety.check_args(args)
        safety.check_model_folder(args.model_name_or_path)
        safety.check_output_dir(args)
        resume = T.resume_path(args)
        try:
            trainer, model, tokenizer = T.build_trainer(args)
        except (safety.TrainError, DataError):
            raise
        except (ValueError, OSError) as e:  # the schedule's checks, unreadable model/tokenizer files
            raise safety.TrainError(_one_line(e)) from e
        if resume is not None:
            safety.check_resume_schedule(resume, model.config.ulskip)
        T.prepare_output_dir(trainer, args)
        T.train(trainer, resume)
        T.save_final(trainer, tokenizer, args.output_dir)
    except (safety.TrainError, DataError) as e:
        if trainer is not None:
            T.close_progress_bars(trainer)
        if getattr(args, "debug", False):
            raise
        print(f"ulskip train: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if trainer is not None:
            T.close_progress_bars(trainer)
        if getattr(args, "debug", False):
            raise
        step = f" at step {trainer.state.global_step}" if trainer is not None else ""
        print(f"ulskip train: interrupted{step}; no model was written (--resume-from-checkpoint latest continues "
              "from the newest complete checkpoint)", file=sys.stderr)
        return 130
    if trainer.is_world_process_zero():
        sec = model.config.ulskip
        many = (f", trained for speedups {', '.join(sec['schedules'])} (default {sec['target_speedup']:g})"
                if "schedules" in sec else "")
        print(f"ulskip train: saved to {args.output_dir} (kept layers {sec['kept_layers']}{many}, "
              f"prefill {sec['prefill']})")
    return 0
