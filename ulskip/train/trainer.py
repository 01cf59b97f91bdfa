"""The fine-tuning run behind `ulskip train` (ulskip/cli/train.py parses the flags): tokenizer, data,
model (frozen embeddings, ULS, fused kernels) and transformers' Trainer.

Built on transformers' Trainer (progress bar, logged loss, checkpoints every --save-steps, resume).
The output folder holds the model, the tokenizer and config.json with an `ulskip` section (kept layers,
target speedup, strategy, prefill; with --target-speedups every trained schedule) that
`ulskip.Engine.from_pretrained` uses as its default schedule.

The guards (checks and file handling in ulskip/train/safety.py): `trainer_class()` stops on a non-finite
loss at every step and writes each checkpoint-N atomically; `safety_callback()` stops on a non-finite
logged gradient norm; `check_weights` runs before every save (finite weights, finite loss on a training
record); `save_final` writes the top-level model last and atomically.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys


def training_args(args):
    from transformers import TrainingArguments

    from ulskip.train.safety import speedup_flags

    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    # prefill "skip" with several schedules: a forward drawing a faster schedule leaves the layers only the
    # slower ones keep unused, which DDP must be told about (else it waits for their gradients)
    unused = args.prefill == "skip" and len(speedup_flags(args)[0]) > 1
    kw = dict(output_dir=args.output_dir, per_device_train_batch_size=args.per_device_train_batch_size,
              gradient_accumulation_steps=args.gradient_accumulation_steps, learning_rate=args.learning_rate,
              num_train_epochs=args.num_train_epochs, max_steps=args.max_steps,
              lr_scheduler_type=args.lr_scheduler_type, weight_decay=args.weight_decay, bf16=args.bf16,
              fp16=args.fp16, deepspeed=args.deepspeed, save_strategy=getattr(args, "save_strategy", "steps"),
              save_steps=500 if args.save_steps is None else args.save_steps,
              save_total_limit=args.save_total_limit, logging_steps=args.logging_steps, seed=args.seed,
              report_to="none", remove_unused_columns=False, ddp_find_unused_parameters=unused,
              gradient_checkpointing=args.gradient_checkpointing,
              dataloader_num_workers=args.dataloader_num_workers,
              # the Trainer's NaN/inf filter reads each micro-batch's loss back (two host syncs on a GPU)
              # to replace a non-finite one; ULSTrainer.training_step stops on a non-finite loss first, so
              # the filter can never act: off
              logging_nan_inf_filter=False)
    if args.gradient_checkpointing and "gradient_checkpointing_kwargs" in fields:
        kw["gradient_checkpointing_kwargs"] = {"use_reentrant": False}
    if "warmup_ratio" in fields:       # older transformers
        kw["warmup_ratio"] = args.warmup_ratio
    else:                              # newer: warmup_steps in [0, 1) is a ratio
        kw["warmup_steps"] = args.warmup_ratio
    import torch
    cuda = torch.cuda.is_available()
    if "use_cpu" in fields:
        kw["use_cpu"] = not cuda
    if cuda:
        # the batch's host-to-device copies asynchronous (from the DataLoader's pinned memory, which
        # transformers uses on CUDA only): a blocking copy waits for the GPU to finish the work queued
        # before it, once per batch tensor
        kw["accelerator_config"] = {"non_blocking": True}
    return TrainingArguments(**{k: v for k, v in kw.items() if k in fields})


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
    """The checkpoint to resume from: --resume-from-checkpoint checked complete, or for 'latest' the newest
    complete checkpoint-N of --output-dir (partial newer ones skipped with a warning); None without it."""
    from ulskip.train.safety import resolve_resume
    return resolve_resume(args)


def build_trainer(args):
    """Tokenizer, data, model (frozen embeddings, ULS, fused kernels) and Trainer, from parsed args.
    Writes nothing (the Trainer creates the output folder if missing, empty): the folder's contents are
    touched only by `prepare_output_dir`, after this succeeded."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

    from ulskip.calibration import read_block_influence
    from ulskip.train.apply_uls import apply_uls, speedup_draw
    from ulskip.train.aux_loss import enable_aux_losses
    from ulskip.train.data import (PackedULSDataset, PackingCollator, StreamingULSDataset, ULSCollator, ULSDataset,
                                   resolve_files)
    from ulskip.train.safety import TrainError, check_args, check_model_folder, speedup_flags, uses_loss_scaling

    check_args(args)  # again here: build_trainer is also called from Python, without the CLI's checks first
    check_model_folder(args.model_name_or_path)
    set_seed(args.seed)
    files = resolve_files(args.train_file)
    bi = read_block_influence(args.calibration) if args.strategy == "shortgpt" else None
    # local_files_only: the tool is offline; a folder is never mistaken for a Hub repo id
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path, local_files_only=True)
    if args.packing:
        from ulskip.loading.config import read_config_json
        if read_config_json(args.model_name_or_path)["model_type"] == "bloom":
            raise TrainError("--packing needs a Llama-family model: Bloom builds ALiBi and its mask from the "
                             "attention mask alone, so packed records would attend to each other")
    if args.streaming:
        dataset = StreamingULSDataset(files, tokenizer, args.block_size, seed=args.seed)
    else:
        dataset = ULSDataset(files, tokenizer, args.block_size)  # bad data fails before the model loads
        if args.packing:
            dataset = PackedULSDataset(dataset, args.block_size)
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0

    # TrainingArguments before the model: with a ZeRO-3 --deepspeed config this registers it, so that
    # from_pretrained partitions the weights while loading (zero.Init) instead of each rank loading all.
    try:
        targs = training_args(args)
    except (ValueError, ImportError) as e:  # TrainingArguments validates the flags it is given
        raise TrainError(f"transformers refused the training arguments: {e}") from e
    dtype = "auto" if args.torch_dtype == "auto" else getattr(torch, args.torch_dtype)
    model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, dtype=dtype, local_files_only=True)
    if args.freeze_emb:
        model.get_input_embeddings().weight.requires_grad_(False)  # tied: the LM head is the same tensor
    speedups, weights = speedup_flags(args)
    # the draws of several schedules (and of a random draft boundary) follow --seed and the step counter
    apply_uls(model, target_speedups=speedups, speedup_weights=weights, strategy=args.strategy, prefill=args.prefill,
              layer_seed=args.layer_seed, block_influence=bi, skipdecode_horizon=args.skipdecode_horizon,
              speedup_draw=getattr(args, "speedup_draw", "step"), draw_seed=args.seed,
              draft_boundary=getattr(args, "draft_boundary", "prefix"))
    # the auxiliary losses (ulskip/train/aux_loss.py): skip and full path in each training forward
    enable_aux_losses(model, getattr(args, "full_path_loss_weight", 0.0), getattr(args, "hidden_match_weight", 0.0))
    teacher = None
    if args.distill_from:
        # the teacher's logits on the response tokens are the student's second target: the fused loss, which
        # never holds the student's logits, is off; the norm and activation kernels stay
        teacher = AutoModelForCausalLM.from_pretrained(args.distill_from, dtype=dtype, local_files_only=True)
        if teacher.config.vocab_size != model.config.vocab_size:
            raise TrainError(f"--distill-from {args.distill_from!r} has a vocabulary of {teacher.config.vocab_size}, "
                             f"the model {model.config.vocab_size}: the teacher must share the tokenizer")
        teacher.eval().requires_grad_(False)
    if args.use_fused_kernels:
        from ulskip.train.patching import patch_model
        kw = fused_patch_kwargs(args)
        if teacher is not None:
            kw["cross_entropy"] = False
        if not kw["cross_entropy"]:
            print("ulskip train: ZeRO-3: the fused linear cross-entropy is off (it reads the LM head outside "
                  "its forward); the norm and activation kernels are on", file=sys.stderr)
        patch_model(model, **kw)

    collator = (PackingCollator if args.packing else ULSCollator)(
        pad, pad_to_multiple_of=8 if (args.bf16 or args.fp16) else None)
    callbacks = [safety_callback()(check_grad_norm=not uses_loss_scaling(args))]
    if speedup_draw(model) is not None:
        callbacks.append(speedup_draw_callback()(speedup_draw(model)))
    try:
        trainer = trainer_class()(model=model, args=targs, train_dataset=dataset, data_collator=collator,
                                  processing_class=tokenizer, callbacks=callbacks)
    except (ValueError, ImportError) as e:
        raise TrainError(f"transformers refused the training set-up: {e}") from e
    if teacher is not None:
        trainer.teacher = teacher.to(trainer.args.device)
        trainer.distill_weight, trainer.distill_temperature = args.distill_weight, args.distill_temperature
    return trainer, model, tokenizer


# ---------------------------------------------------------------------------------------------- the guards
_CLASSES = {}


def trainer_class():
    """transformers' Trainer with two guards (the class is made on first use: transformers loads lazily)."""
    if "trainer" in _CLASSES:
        return _CLASSES["trainer"]
    import shutil

    import torch
    from transformers import Trainer

    from ulskip.train.safety import TMP_PREFIX, DivergedError, rotate_checkpoints

    class ULSTrainer(Trainer):
        teacher = None           # --distill-from: the fine-tuned full model, frozen (ulskip/train/distill.py)
        distill_weight, distill_temperature = 0.0, 1.0
        _flop_params = None      # (model, its num_parameters(exclude_embeddings=True)), counted once

        def floating_point_ops(self, inputs):
            # The Trainer's own count (the total_flos it logs), 6 * tokens * num_parameters(exclude_embeddings=
            # True), with the parameter count made once instead of every micro-batch: it walks every module
            # and parameter (~0.8 ms of host time per call for a 30-layer model), and training changes no
            # parameter's size.
            main = getattr(self.model, "main_input_name", "input_ids")
            if main not in inputs or not hasattr(self.model, "num_parameters"):
                return super().floating_point_ops(inputs)
            if self._flop_params is None or self._flop_params[0] is not self.model:
                self._flop_params = (self.model, self.model.num_parameters(exclude_embeddings=True))
            return 6 * inputs[main].numel() * self._flop_params[1]

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if self.teacher is None:
                return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                            num_items_in_batch=num_items_in_batch)
            from ulskip.train.distill import distillation_loss
            ce, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                               num_items_in_batch=num_items_in_batch)
            keys = ("input_ids", "attention_mask", "position_ids")
            with torch.no_grad():
                teacher_logits = self.teacher(**{k: inputs[k] for k in keys if k in inputs}, use_cache=False).logits
            kd = distillation_loss(outputs.logits, teacher_logits, inputs["labels"], self.distill_temperature,
                                   num_items_in_batch)
            loss = (1 - self.distill_weight) * ce + self.distill_weight * kd
            return (loss, outputs) if return_outputs else loss

        def training_step(self, model, inputs, *args, **kwargs):
            loss = super().training_step(model, inputs, *args, **kwargs)
            # The loss is checked here, not in a callback: training_step returns each micro-batch's loss
            # after its backward and before the optimizer step, so a non-finite loss stops the run before
            # its gradients reach the weights, and on every step; a callback sees the loss only in on_log,
            # every --logging-steps, after the update. This is the step's one read of the loss on the host
            # (the Trainer's own NaN filter, which made two more, is off: training_args).
            if not bool(torch.isfinite(loss.detach()).all()):
                raise DivergedError(
                    f"the training loss is {float(loss.detach().float().mean())} at step "
                    f"{self.state.global_step + 1} (of {self.state.max_steps}): the run diverged and stopped "
                    f"before that step's update; no model was written to {self.args.output_dir!r} "
                    f"(lower --learning-rate, now {self.args.learning_rate:g})")
            return loss

        _save_root = None

        def _get_output_dir(self, trial):
            # where the Trainer's _save_checkpoint puts checkpoint-N (and rotates): our temporary folder
            # while we save, the output folder otherwise
            return self._save_root if self._save_root is not None else super()._get_output_dir(trial)

        def _save_checkpoint(self, model, trial):
            # Atomic checkpoints: the Trainer's own save (same signature and body in transformers 5.17 and
            # 5.24: it writes into self._get_output_dir(trial)/checkpoint-N) writes into a hidden temporary
            # folder inside the output folder, and the finished checkpoint-N is renamed into place (same
            # filesystem), so a checkpoint-N is complete or absent. args.output_dir is left alone (it is
            # pickled into training_args.bin). Every rank has written its part (rng states, DeepSpeed
            # shards) before the rename. A Trainer that ignored _get_output_dir would write checkpoint-N
            # in place, non-atomically: safety.checkpoint_problems is the guard then.
            step = self.state.global_step
            check_weights(self, f"checkpoint-{step} was not saved and no model was written to "
                                f"{self.args.output_dir!r}")
            out, name = self.args.output_dir, f"checkpoint-{step}"
            tmp = os.path.join(out, f"{TMP_PREFIX}{name}")
            if self.args.should_save:
                shutil.rmtree(tmp, ignore_errors=True)
            self.accelerator.wait_for_everyone()
            self._save_root = tmp
            try:
                super()._save_checkpoint(model, trial)
            finally:
                self._save_root = None
            self.accelerator.wait_for_everyone()
            if self.args.should_save:
                written, final = os.path.join(tmp, name), os.path.join(out, name)
                if os.path.isdir(written):
                    if os.path.isdir(final):
                        shutil.rmtree(final)  # a partial one of a killed run, or one this run replaces
                    os.replace(written, final)
                shutil.rmtree(tmp, ignore_errors=True)
                rotate_checkpoints(out, self.args.save_total_limit, keep=final)
            self.accelerator.wait_for_everyone()

    _CLASSES["trainer"] = ULSTrainer
    return ULSTrainer


def safety_callback():
    """A TrainerCallback that stops on a non-finite logged gradient norm and marks when training began."""
    if "callback" in _CLASSES:
        return _CLASSES["callback"]
    import math

    from transformers import TrainerCallback

    from ulskip.train.safety import DivergedError

    class SafetyCallback(TrainerCallback):
        """The gradient norm is checked where transformers exposes it: `grad_norm` in the logs of every
        --logging-steps (logged whenever max_grad_norm > 0, the default 1.0). on_log runs before that step's
        checkpoint save, so the save never happens. Not under fp16 loss scaling (--fp16, or a DeepSpeed fp16
        config): there an infinite norm is the scaler's cue to skip the step and lower the scale, not a
        divergence. `started` tells set-up errors (before the first step) from errors in training."""

        def __init__(self, check_grad_norm=True):
            self.check_grad_norm = check_grad_norm
            self.started = False

        def on_train_begin(self, args, state, control, **kwargs):
            self.started = True

        def on_log(self, args, state, control, logs=None, **kwargs):
            g = (logs or {}).get("grad_norm")
            if self.check_grad_norm and isinstance(g, (int, float)) and not math.isfinite(g):
                raise DivergedError(f"the gradient norm is {g} at step {state.global_step}: the run diverged; that "
                                    f"step is not saved and no model was written to {args.output_dir!r} (lower "
                                    f"--learning-rate, now {args.learning_rate:g})")

    _CLASSES["callback"] = SafetyCallback
    return SafetyCallback


def speedup_draw_callback():
    """A TrainerCallback that drives a model's SpeedupDraw (apply_uls with several speedups): each forward's
    counter is (optimizer step, micro-batch within it), taken from the Trainer's state, so a run resumed
    from checkpoint-N draws for step N what the uninterrupted run drew. Use:
    trainer.add_callback(speedup_draw_callback()(ulskip.train.apply_uls.speedup_draw(model)))."""
    if "draw" in _CLASSES:
        return _CLASSES["draw"]
    from transformers import TrainerCallback

    class SpeedupDrawCallback(TrainerCallback):
        def __init__(self, draw):
            self.draw = draw

        def on_train_begin(self, args, state, control, **kwargs):
            self.draw.driven = True
            self.draw.step, self.draw.micro = state.global_step, 0

        def on_step_begin(self, args, state, control, **kwargs):
            # before the first micro-batch of each optimizer step (global_step = steps done so far)
            self.draw.step, self.draw.micro = state.global_step, 0

        def on_substep_end(self, args, state, control, **kwargs):
            self.draw.micro += 1  # after each micro-batch but the step's last (that one ends in on_step_end)

        def on_train_end(self, args, state, control, **kwargs):
            self.draw.driven = False  # plain forwards after training advance the counter themselves

    _CLASSES["draw"] = SpeedupDrawCallback
    return SpeedupDrawCallback


def prepare_output_dir(trainer, args):
    """After everything was built (bad flags, data and model failed before this, leaving the folder as it
    was): --overwrite-output-dir removes the previous run's model and checkpoints, before training, so a
    failing run can never leave the old model to be served; our temporary folders of a killed run go."""
    from ulskip.train.safety import clear_output_dir, remove_stale_tmp, warn

    if trainer.args.should_save:
        if getattr(args, "overwrite_output_dir", False):
            removed = clear_output_dir(args.output_dir)
            if removed:
                warn(f"--overwrite-output-dir: removed the previous run's {', '.join(removed)} from "
                     f"{args.output_dir}")
        remove_stale_tmp(args.output_dir)
    trainer.accelerator.wait_for_everyone()


def train(trainer, resume):
    """trainer.train with the user's errors as TrainError: a ValueError before the first step is the set-up
    refusing a flag or a checkpoint (dataloader, optimizer, resume); out of memory names the step."""
    import torch

    from ulskip.train.data import DataError
    from ulskip.train.safety import TrainError

    cb = next((c for c in trainer.callback_handler.callbacks if isinstance(c, safety_callback())), None)
    try:
        trainer.train(resume_from_checkpoint=resume)
    except (TrainError, DataError):
        raise
    except ValueError as e:
        if cb is None or cb.started:
            raise  # during training: not a flag problem, keep the traceback
        raise TrainError(f"transformers refused the run before its first step: {e}") from e
    except torch.OutOfMemoryError as e:
        raise TrainError(f"out of memory at step {trainer.state.global_step + 1}: lower "
                         "--per-device-train-batch-size or --block-size, or add --gradient-checkpointing") from e
    if trainer.state.global_step == 0:
        raise TrainError("no training step ran (the data gave no batch): nothing was saved")


def close_progress_bars(trainer) -> None:
    """A run stopped by an exception leaves the Trainer's tqdm bar open: close it, so that the error line
    starts a line of its own."""
    for cb in getattr(getattr(trainer, "callback_handler", None), "callbacks", []):
        bar = getattr(cb, "training_bar", None)
        if bar is not None and hasattr(bar, "close"):
            bar.close()
            cb.training_bar = None


def probe_loss(trainer):
    """The loss of the first training record under the trained weights (eval mode, no grad): the last
    step's update is checked by no later step's loss."""
    import torch

    ds, collate = trainer.train_dataset, trainer.data_collator
    if isinstance(ds, torch.utils.data.IterableDataset):
        ex = next(iter(ds), None)
    else:
        ex = ds[0] if len(ds) else None
    if ex is None:
        return None
    batch = {k: v.to(trainer.args.device) if torch.is_tensor(v) else v for k, v in collate([ex]).items()}
    model = trainer.model
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            loss = model(**batch).loss
    finally:
        model.train(was_training)
    return None if loss is None else float(loss.detach().float())


def check_weights(trainer, consequence: str) -> None:
    """Before anything is saved (every checkpoint-N and the final model): every weight finite (one pass)
    and the model's loss on the first training record finite. The second check catches a divergence in
    the last update before a save, which no later step's loss would show (weights of 1e30 are finite)."""
    import math

    from ulskip.train.safety import DivergedError, nonfinite_parameter

    step = trainer.state.global_step
    hint = f"(lower --learning-rate, now {trainer.args.learning_rate:g})"
    bad = nonfinite_parameter(trainer.model)
    if bad is not None:
        raise DivergedError(f"weight {bad} is not finite after step {step}: the run diverged; {consequence} {hint}")
    loss = probe_loss(trainer)
    if loss is not None and not math.isfinite(loss):
        raise DivergedError(f"the loss on the first training record is {loss} after step {step}: the run "
                            f"diverged; {consequence} {hint}")


def save_final(trainer, tokenizer, output_dir):
    """The top-level model, written last: only after training succeeded and check_weights passed; saved
    into a temporary folder inside output_dir (same filesystem, so the moves are renames), then moved in
    (safety.publish: the old model files are removed only now, config.json is moved last)."""
    import shutil

    from ulskip.train.safety import TMP_MODEL, publish

    check_weights(trainer, f"no model was written to {output_dir!r}")
    tmp = os.path.join(output_dir, TMP_MODEL)
    if trainer.args.should_save:
        shutil.rmtree(tmp, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(tmp)
    if trainer.args.should_save:
        tokenizer.save_pretrained(tmp)
        publish(tmp, output_dir)
    trainer.accelerator.wait_for_everyone()
