"""What keeps `ulskip train` from serving a diverged or half-written model (ulskip/train/trainer.py wires it
into transformers' Trainer, ulskip/cli/train.py runs it):

* `check_args`, `check_model_folder`, `check_output_dir`: every flag value the Trainer would choke on, the
  model folder and the output folder, checked before anything is loaded or written (one-line errors).
* `checkpoint_problems` / `latest_complete_checkpoint`: the one definition of a complete `checkpoint-N`
  (what transformers needs to resume from it), and resuming from the newest complete one.
* `clear_output_dir` / `publish`: removing a previous run's model and checkpoints (--overwrite-output-dir),
  and moving a freshly saved model into the output folder so that it is always complete or absent.
* `nonfinite_parameter`: the one pass over the weights before anything is saved.

Pure Python + torch: importing this module does not import transformers.
"""
from __future__ import annotations

import fnmatch
import json
import math
import os
import re
import shutil
import sys

from ulskip.loading.tokenizer import TOKENIZER_FILES

PREFIX = "ulskip train"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
TMP_PREFIX = ".ulskip-tmp-"   # our temporary folders inside output_dir (hidden, never `checkpoint-*`)
TMP_MODEL = TMP_PREFIX + "model"

# Files of a saved model (transformers' save_pretrained of a model, its tokenizer and the Trainer's
# training_args.bin) at the top level of an output folder. Anything else there is the user's and stays.
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "model-*-of-*.safetensors",
               "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model-*-of-*.bin",
               "pytorch_model.bin.index.json", "adapter_config.json", "adapter_model.safetensors",
               "adapter_model.bin", "training_args.bin", "tokenizer.json", "tokenizer_config.json",
               "tokenizer.model", "special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt",
               "merges.txt", "spiece.model", "chat_template.jinja", "chat_template.json")

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "adapter_model.safetensors", "adapter_model.bin")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


class TrainError(ValueError):
    """An expected failure of `ulskip train` (bad flag, file or folder; a diverged run): printed as one line
    `ulskip train: <message>`, exit code 2."""


class DivergedError(TrainError):
    """A non-finite loss, gradient norm or weight: the run stops and nothing of it is saved."""


def is_main_process() -> bool:
    """Rank 0 of a torchrun / DeepSpeed launch (before the Trainer exists: from the launcher's variables)."""
    return int(os.environ.get("RANK", "0") or 0) == 0


def warn(msg: str) -> None:
    if is_main_process():
        print(f"{PREFIX}: warning: {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ flag values
def _fmt(v):
    return repr(v) if isinstance(v, str) else f"{v:g}" if isinstance(v, float) else str(v)


def _need(ok: bool, flag: str, value, allowed: str):
    """The one form of a flag error (as ulskip.cli's): '--flag must be <what is allowed>, got <value>'."""
    if not ok:
        raise TrainError(f"--{flag} must be {allowed}, got {_fmt(value)}")


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def check_args(args) -> None:
    """Every number the Trainer (or torch's optimizer / DataLoader) would choke on, and a run of zero steps.
    The error names the flag, the value and what is allowed."""
    _need(_finite(args.learning_rate) and args.learning_rate > 0, "learning-rate", args.learning_rate,
          "a finite number > 0 (default 2e-05)")
    _need(_finite(args.weight_decay) and args.weight_decay >= 0, "weight-decay", args.weight_decay,
          "a finite number >= 0 (default 0)")
    _need(_finite(args.warmup_ratio) and 0 <= args.warmup_ratio < 1, "warmup-ratio", args.warmup_ratio,
          "in [0, 1) (default 0.03)")
    check_speedup_args(args)
    _need(_finite(args.num_train_epochs) and args.num_train_epochs >= 0, "num-train-epochs",
          args.num_train_epochs, "a finite number > 0 (default 3)")
    _need(args.max_steps == -1 or args.max_steps >= 1, "max-steps", args.max_steps,
          ">= 1, or -1 (the default: train --num-train-epochs epochs; 0 would train zero steps)")
    if args.max_steps == -1 and args.num_train_epochs == 0:
        raise TrainError("--num-train-epochs 0 trains zero steps (nothing would be learned, the untrained "
                         "weights would be saved): give --num-train-epochs > 0 or --max-steps >= 1")
    for name, default in (("block_size", 1024), ("per_device_train_batch_size", 1),
                          ("gradient_accumulation_steps", 1), ("save_steps", 500), ("logging_steps", 10)):
        v = getattr(args, name)
        _need(v is None or v >= 1, name.replace("_", "-"), v, f"an integer >= 1 (default {default})")
    if getattr(args, "save_strategy", "steps") == "no":
        for name in ("save_steps", "save_total_limit"):
            if getattr(args, name) is not None:
                raise TrainError(f"--{name.replace('_', '-')} {getattr(args, name)} has no effect with --save-strategy "
                                 "no, which writes no checkpoint-N: give one of the two")
    if args.save_total_limit is not None:
        _need(args.save_total_limit >= 1, "save-total-limit", args.save_total_limit,
              "an integer >= 1 (default: keep every checkpoint)")
    _need(args.dataloader_num_workers >= 0, "dataloader-num-workers", args.dataloader_num_workers,
          "an integer >= 0 (default 0: load in the main process)")
    _need(0 <= args.seed < 2 ** 32, "seed", args.seed, "an integer in [0, 2**32) (default 42)")
    if args.strategy == "shortgpt" and not args.calibration:
        raise TrainError("--strategy shortgpt needs --calibration (the scores file of `ulskip calibrate`)")
    if getattr(args, "distill_from", None):
        check_model_folder(args.distill_from, "--distill-from")
        _need(math.isfinite(args.distill_weight) and 0 < args.distill_weight <= 1, "distill-weight",
              args.distill_weight, "a number in (0, 1] (default 0.5)")
        _need(math.isfinite(args.distill_temperature) and args.distill_temperature > 0, "distill-temperature",
              args.distill_temperature, "a finite number > 0 (default 1.0)")
        if args.deepspeed:
            raise TrainError("--distill-from is not supported with --deepspeed (the teacher is not partitioned)")
    a, b = getattr(args, "full_path_loss_weight", 0.0), getattr(args, "hidden_match_weight", 0.0)
    _need(_finite(a) and a >= 0, "full-path-loss-weight", a, "a finite number >= 0 (default 0: off)")
    _need(_finite(b) and b >= 0, "hidden-match-weight", b, "a finite number >= 0 (default 0: off)")
    if a or b:
        if args.prefill != "full":
            raise TrainError(f"--full-path-loss-weight / --hidden-match-weight need prefill 'full', got --prefill "
                             f"{args.prefill}: with 'skip' the skipped layers are frozen and never run at inference")
        if getattr(args, "distill_from", None):
            raise TrainError("--full-path-loss-weight / --hidden-match-weight cannot be combined with --distill-from "
                             "(the distillation needs the student's logits, which the two-path forward does not return)")
    if getattr(args, "packing", False) and args.streaming:
        raise TrainError("--packing packs the whole data set into rows up front; it cannot be combined with --streaming")
    _need(getattr(args, "skipdecode_horizon", 64) >= 2, "skipdecode-horizon", getattr(args, "skipdecode_horizon", 64),
          "an integer >= 2 (default 64)")
    if args.streaming and args.max_steps <= 0:
        raise TrainError("--streaming reads the data lazily, so the length of an epoch is unknown: give --max-steps")
    if args.fp16 and args.torch_dtype == "float16":
        raise TrainError(f"--fp16 needs float32 master weights, got --torch-dtype {args.torch_dtype}: give "
                         "--torch-dtype float32 (the default)")
    try:
        from transformers.trainer_utils import SchedulerType
        known = [s.value for s in SchedulerType]
    except ImportError:  # pragma: no cover - transformers is a dependency
        known = None
    if known is not None:
        _need(args.lr_scheduler_type in known, "lr-scheduler-type", args.lr_scheduler_type,
              f"one of {', '.join(known)} (default cosine)")
    if args.deepspeed:
        if not os.path.isfile(args.deepspeed):
            raise TrainError(f"--deepspeed config {args.deepspeed!r} does not exist")
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            raise TrainError("--deepspeed needs the optional package deepspeed (pip install deepspeed)") from None


def _numbers(v, flag: str):
    """A flag's comma-separated numbers: the CLI's string "1,2,3", or a list from Python; None stays None."""
    if v is None:
        return None
    try:
        parts = [x.strip() for x in v.split(",")] if isinstance(v, str) else list(v)
        if not parts or any(isinstance(x, bool) for x in parts):
            raise ValueError
        return [float(x) for x in parts]
    except (TypeError, ValueError):
        raise TrainError(f"--{flag} must be comma-separated numbers (e.g. 1,2,3), got {_fmt(v)}") from None


def speedup_flags(args):
    """(the speedups to train, their draw weights or None) from --target-speedups / --speedup-weights, else
    the one --target-speedup (2 when it is not given either)."""
    many = _numbers(getattr(args, "target_speedups", None), "target-speedups")
    weights = _numbers(getattr(args, "speedup_weights", None), "speedup-weights")
    single = args.target_speedup
    if many is None:
        if weights is not None:
            raise TrainError("--speedup-weights weigh the --target-speedups: give --target-speedups too")
        return [2.0 if single is None else single], None
    if single is not None and single not in many:
        raise TrainError(f"--target-speedup {_fmt(float(single))} is not one of --target-speedups "
                         f"{','.join(f'{s:g}' for s in many)}: give one of the two (the checkpoint's default "
                         "schedule is the largest listed speedup)")
    return many, weights


def check_speedup_args(args) -> None:
    """--target-speedup(s), --speedup-weights, --speedup-draw and --draft-boundary, one line each."""
    listed = getattr(args, "target_speedups", None)
    speeds, weights = speedup_flags(args)
    if listed is None:
        _need(_finite(speeds[0]) and speeds[0] >= 1, "target-speedup", speeds[0], "a finite number >= 1 (default 2)")
    else:
        raw = listed if isinstance(listed, str) else ",".join(f"{s:g}" for s in speeds)
        _need(all(_finite(s) and s >= 1 for s in speeds), "target-speedups", raw,
              "comma-separated finite numbers >= 1, e.g. 1,2,3 (1 keeps every layer)")
        _need(len(set(speeds)) == len(speeds), "target-speedups", raw, "distinct speedups (each listed once)")
        if len(speeds) > 1 and args.strategy in ("skipdecode",):
            raise TrainError(f"--strategy skipdecode trains one per-position depth schedule: it takes one "
                             f"--target-speedup, got --target-speedups {raw}")
        if weights is not None:
            w_raw = args.speedup_weights if isinstance(args.speedup_weights, str) else \
                ",".join(f"{w:g}" for w in weights)
            _need(len(weights) == len(speeds), "speedup-weights", w_raw,
                  f"one weight per --target-speedups value ({len(speeds)})")
            _need(all(_finite(w) and w >= 0 for w in weights), "speedup-weights", w_raw,
                  "comma-separated finite numbers >= 0 (default: uniform)")
            _need(any(w > 0 for w in weights), "speedup-weights", w_raw,
                  "weights not all 0 (no schedule could be drawn)")
            _need(_finite(sum(weights)), "speedup-weights", w_raw, "weights with a finite sum")
    if listed is None or len(speeds) == 1:  # one speedup: nothing is drawn, so these flags would do nothing
        for flag, v, default in (("speedup-weights", getattr(args, "speedup_weights", None), None),
                                 ("speedup-draw", getattr(args, "speedup_draw", "step"), "step")):
            if v != default:
                raise TrainError(f"--{flag} {v} needs --target-speedups with at least two speedups (one schedule "
                                 "is never drawn)")
    draw = getattr(args, "speedup_draw", "step")
    _need(draw in ("step", "micro-batch"), "speedup-draw", draw, "one of step, micro-batch (default step)")
    boundary = getattr(args, "draft_boundary", "prefix")
    _need(boundary in ("prefix", "random"), "draft-boundary", boundary, "one of prefix, random (default prefix)")
    if boundary == "random":
        if args.prefill != "full" or args.strategy == "skipdecode":
            raise TrainError("--draft-boundary random moves where each record's skip path starts inside its "
                             "response: it needs --prefill full and a static --strategy (not skipdecode)")


def uses_loss_scaling(args) -> bool:
    """fp16 training with a dynamic loss scale (--fp16, or a DeepSpeed config with fp16 enabled): there
    an infinite gradient norm makes the scaler skip the step, it is no divergence."""
    if args.fp16:
        return True
    if args.deepspeed:
        try:
            with open(args.deepspeed) as f:
                return json.load(f).get("fp16", {}).get("enabled") is True
        except (OSError, ValueError, AttributeError):
            return False
    return False


def check_model_folder(path: str, flag: str = "--model-name-or-path") -> None:
    """ulskip train is offline-only: the model (and a --distill-from teacher) is a local checkpoint folder."""
    if not os.path.isdir(path):
        what = "is a file, not a folder" if os.path.exists(path) else "no such folder"
        raise TrainError(f"{flag} {path!r}: {what} (ulskip train loads local checkpoint folders "
                         "only, with config.json, weights and a tokenizer; it downloads nothing)")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise TrainError(f"{flag} {path!r}: no config.json in the folder (ulskip train needs a local "
                         "checkpoint folder with config.json, weights and a tokenizer)")
    if not any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES):
        raise TrainError(f"{flag} {path!r}: no tokenizer in the folder (none of "
                         f"{', '.join(TOKENIZER_FILES)}); ulskip train needs it to tokenize the data and saves it "
                         "with the model")


# ------------------------------------------------------------------------------------------ checkpoints
def checkpoint_step(name: str):
    m = CHECKPOINT_RE.match(os.path.basename(os.path.normpath(name)))
    return int(m.group(1)) if m else None


def list_checkpoints(folder: str) -> list[str]:
    """The `checkpoint-N` folders of an output folder, newest (highest N) first."""
    if not os.path.isdir(folder):
        return []
    found = [(checkpoint_step(d), os.path.join(folder, d)) for d in os.listdir(folder)]
    return [p for n, p in sorted((x for x in found if x[0] is not None and os.path.isdir(x[1])), reverse=True)]


def _nonempty(path):
    return os.path.isfile(path) and os.path.getsize(path) > 0


def checkpoint_problems(path: str) -> list[str]:
    """Why `path` is not a complete checkpoint (empty list: complete). Complete = every file transformers'
    Trainer reads to resume is there: trainer_state.json (valid JSON with a global_step), the model weights
    (a weights file, or an index whose shards all exist), the optimizer and the LR scheduler state; a DeepSpeed
    checkpoint holds weights, optimizer and scheduler in the `global_stepN` folder its `latest` file names.
    transformers writes trainer_state.json after the weights and the optimizer, in the same process, so a
    save killed half-way lacks it (or has it cut short); the files before it were closed before it opened."""
    if not os.path.isdir(path):
        return ["not a folder"]
    problems = []
    state = os.path.join(path, "trainer_state.json")
    if not os.path.isfile(state):
        problems.append("missing trainer_state.json")
    else:
        try:
            with open(state) as f:
                step = json.load(f).get("global_step")
            if not isinstance(step, int):
                problems.append("trainer_state.json has no global_step")
        except (OSError, ValueError, AttributeError):
            problems.append("trainer_state.json is cut short or not valid JSON")
    deepspeed = False
    latest = os.path.join(path, "latest")
    if os.path.isfile(latest):
        with open(latest) as f:
            tag = f.read().strip()
        deepspeed = bool(tag) and os.path.isdir(os.path.join(path, tag))
        if not deepspeed:
            problems.append(f"the DeepSpeed state {tag!r} named in 'latest' is missing")
    if not deepspeed:
        weights = any(_nonempty(os.path.join(path, w)) for w in WEIGHT_FILES)
        for idx in WEIGHT_INDEXES:
            ip = os.path.join(path, idx)
            if not weights and os.path.isfile(ip):
                try:
                    with open(ip) as f:
                        shards = set(json.load(f)["weight_map"].values())
                except (OSError, ValueError, KeyError, TypeError, AttributeError):
                    problems.append(f"{idx} is cut short or not valid JSON")
                    weights = True  # reported already
                    continue
                gone = sorted(s for s in shards if not _nonempty(os.path.join(path, s)))
                if gone:
                    problems.append(f"missing weight shard{'s' * (len(gone) > 1)} {', '.join(gone)}")
                weights = True
        if not weights:
            problems.append("missing the model weights (model.safetensors)")
        names = os.listdir(path)
        if not (_nonempty(os.path.join(path, "optimizer.pt")) or _nonempty(os.path.join(path, "optimizer.bin"))
                or any(fnmatch.fnmatch(n, "rank*-of-*-optimizer.pt") for n in names)):
            problems.append("missing optimizer.pt")
        if not _nonempty(os.path.join(path, "scheduler.pt")):
            problems.append("missing scheduler.pt")
    return problems


def is_complete_checkpoint(path: str) -> bool:
    return not checkpoint_problems(path)


def latest_complete_checkpoint(folder: str):
    """(the newest complete checkpoint-N of `folder` or None, [(partial newer checkpoint, its problems)])."""
    skipped = []
    for c in list_checkpoints(folder):
        problems = checkpoint_problems(c)
        if not problems:
            return c, skipped
        skipped.append((c, problems))
    return None, skipped


def resolve_resume(args):
    """The checkpoint --resume-from-checkpoint names, checked complete; 'latest' = the newest complete
    checkpoint-N in --output-dir (newer partial ones are skipped with a warning naming them)."""
    r = args.resume_from_checkpoint
    if r is None:
        return None
    if r in ("latest", "auto", "true", "True"):
        last, skipped = latest_complete_checkpoint(args.output_dir)
        if last is None:
            if not skipped:
                raise TrainError(f"--resume-from-checkpoint {r}: no checkpoint-* folder in {args.output_dir!r}")
            detail = "; ".join(f"{os.path.basename(c)}: {', '.join(p)}" for c, p in skipped)
            raise TrainError(f"--resume-from-checkpoint {r}: no complete checkpoint in {args.output_dir!r}, "
                             f"every checkpoint-* is partial ({detail})")
        for c, p in skipped:
            warn(f"skipping the partial {c} ({', '.join(p)}; a save that did not finish); resuming from "
                 f"{os.path.basename(last)}")
        return last
    if not os.path.isdir(r):
        raise TrainError(f"--resume-from-checkpoint {r!r}: no such folder (give a checkpoint-N folder or 'latest')")
    problems = checkpoint_problems(r)
    if problems:
        raise TrainError(f"--resume-from-checkpoint {r!r}: not a complete checkpoint ({', '.join(problems)})")
    return r


def check_resume_schedule(checkpoint: str, ulskip_section: dict) -> None:
    """A checkpoint trained with another schedule cannot be continued under this run's one."""
    try:
        with open(os.path.join(checkpoint, "config.json")) as f:
            theirs = json.load(f).get("ulskip")
    except (OSError, ValueError, AttributeError):
        return
    if not isinstance(theirs, dict):
        return
    # several speedups: the whole set of schedules must match (a one-speedup section has neither key)
    for key in ("kept_layers", "prefill", "skipdecode", "target_speedups", "schedules"):
        if theirs.get(key) != ulskip_section.get(key):
            raise TrainError(f"--resume-from-checkpoint {checkpoint!r} was trained with {key} {theirs.get(key)}, "
                             f"this run's flags give {ulskip_section.get(key)}: give the schedule flags of that run "
                             "(--target-speedup(s), --strategy, --prefill, ...) or another --output-dir")
    for key in ("speedup_weights", "speedup_draw"):
        if theirs.get(key) != ulskip_section.get(key):
            warn(f"--resume-from-checkpoint {checkpoint!r} was trained with {key} {theirs.get(key)}, this run "
                 f"draws with {ulskip_section.get(key)}: from here on it draws other schedules than that run would")


# ------------------------------------------------------------------------------------------ output folder
def _is_model_file(name: str) -> bool:
    return any(fnmatch.fnmatch(name, p) for p in MODEL_FILES)


def _same_folder(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_output_dir(args) -> None:
    """Refuse a non-empty --output-dir unless --overwrite-output-dir or --resume-from-checkpoint is given
    (our own temporary folders left by a killed run do not count)."""
    out = args.output_dir
    if os.path.exists(out) and not os.path.isdir(out):
        raise TrainError(f"--output-dir {out!r} is a file, not a folder")
    if os.path.isdir(out) and _same_folder(out, args.model_name_or_path):
        raise TrainError(f"--output-dir {out!r} is the --model-name-or-path folder: write the fine-tuned model to "
                         "another folder")
    resume = args.resume_from_checkpoint
    if resume is not None and getattr(args, "overwrite_output_dir", False):
        inside = resume in ("latest", "auto", "true", "True") or (
            os.path.isdir(out) and os.path.abspath(resume).startswith(os.path.abspath(out) + os.sep))
        if inside:
            raise TrainError("--overwrite-output-dir would delete the checkpoint --resume-from-checkpoint "
                             f"{resume} continues from: give one of the two")
    if not os.path.isdir(out) or getattr(args, "overwrite_output_dir", False) or resume is not None:
        return
    entries = sorted(e for e in os.listdir(out) if not e.startswith(TMP_PREFIX))
    if entries:
        shown = ", ".join(entries[:4]) + (f", ... ({len(entries)} entries)" if len(entries) > 4 else "")
        raise TrainError(f"--output-dir {out!r} is not empty ({shown}): give --overwrite-output-dir to replace "
                         "what a previous run left there, --resume-from-checkpoint latest to continue that run, "
                         "or an empty folder")


def clear_output_dir(out: str) -> list[str]:
    """--overwrite-output-dir: remove a previous run's top-level model files (config.json first, so the
    folder is never a servable half-model), its checkpoint-* folders and our temporary folders. Other files
    stay. Returns the names removed."""
    if not os.path.isdir(out):
        return []
    names = sorted(os.listdir(out), key=lambda n: n != "config.json")
    removed = []
    for n in names:
        p = os.path.join(out, n)
        if os.path.isdir(p) and (CHECKPOINT_RE.match(n) or n.startswith(TMP_PREFIX)):
            shutil.rmtree(p)
        elif os.path.isfile(p) and _is_model_file(n):
            os.remove(p)
        else:
            continue
        removed.append(n)
    return removed


def remove_stale_tmp(out: str) -> None:
    """Our temporary folders a killed run left behind (never read: a save is complete only once renamed)."""
    if os.path.isdir(out):
        for n in os.listdir(out):
            if n.startswith(TMP_PREFIX) and os.path.isdir(os.path.join(out, n)):
                shutil.rmtree(os.path.join(out, n), ignore_errors=True)


def _remove(path):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def publish(tmp: str, out: str) -> None:
    """Move a complete saved model from `tmp` (a folder inside `out`, same filesystem) into `out`. Only now
    are the old top-level model files removed: config.json first (from then on the folder is no servable
    model), then the other old model files and whatever the new save replaces; the new files are moved in
    with config.json last, so a reader sees either no model or the whole new one."""
    new = os.listdir(tmp)
    if "config.json" not in new:
        raise RuntimeError(f"the saved model in {tmp} has no config.json")
    old_cfg = os.path.join(out, "config.json")
    if os.path.lexists(old_cfg):
        os.remove(old_cfg)
    for n in os.listdir(out):
        p = os.path.join(out, n)
        if n in new or (os.path.isfile(p) and _is_model_file(n)):
            _remove(p)
    for n in sorted(new, key=lambda n: n == "config.json"):
        os.replace(os.path.join(tmp, n), os.path.join(out, n))
    os.rmdir(tmp)


def rotate_checkpoints(out: str, limit, keep: str) -> None:
    """--save-total-limit: keep `keep` (the checkpoint just written) and the newest complete others up to
    `limit` in all, by step number; older and partial ones go."""
    if not limit:
        return
    room = limit - 1
    for c in list_checkpoints(out):
        if _same_folder(c, keep):
            continue
        if room > 0 and is_complete_checkpoint(c):
            room -= 1
            continue
        shutil.rmtree(c, ignore_errors=True)


# ------------------------------------------------------------------------------------------ weights
def nonfinite_parameter(model):
    """The name of the first parameter holding a NaN or an infinity, or None. One pass over the weights
    (one flag per tensor on its device, one host sync at the end); under torch.distributed the verdict is
    agreed by every rank (ZeRO-3 ranks hold different shards), so all ranks stop or all go on."""
    import torch

    names, flags = [], []
    for name, p in model.named_parameters():
        if p.numel():
            names.append(name)
            flags.append(torch.isfinite(p.detach()).all())
    bad = None
    if flags:
        dev = flags[0].device
        ok = torch.stack([f.to(dev) for f in flags])
        idx = (~ok).nonzero()
        bad = names[int(idx[0])] if idx.numel() else None
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        dev = flags[0].device if flags else torch.device("cpu")
        if torch.distributed.get_backend() == "nccl" and dev.type != "cuda":
            dev = torch.device("cuda", torch.cuda.current_device())
        t = torch.tensor([0 if bad is None else 1], device=dev)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        if int(t) and bad is None:
            bad = "(a weight shard of another rank)"
    return bad
