"""The Trainer set-up behind `ulskip train` (ulskip/train/trainer.py)."""
import json

from ulskip.train.trainer import fused_patch_kwargs


def test_zero3_fused_kernels(tmp_path):
    """Under ZeRO-3 `--use_fused_kernels` keeps the norm and activation kernels (they read only their own
    module's weights inside its forward) and leaves out only the fused loss (it reads the LM head's
    weight outside the head's forward)."""
    from argparse import Namespace
    for stage, fused_ce in ((0, True), (2, True), (3, False)):
        cfg = tmp_path / f"ds{stage}.json"
        cfg.write_text(json.dumps({"zero_optimization": {"stage": stage}}))
        kw = fused_patch_kwargs(Namespace(deepspeed=str(cfg)))
        assert kw == {"norm": True, "activation": True, "cross_entropy": fused_ce}, stage
    assert fused_patch_kwargs(Namespace(deepspeed=None))["cross_entropy"]


def test_training_args_make_no_extra_loss_reads(tmp_path):
    """The Trainer's NaN/inf loss filter reads every micro-batch's loss on the host (two syncs on a GPU) and
    could never act: ULSTrainer.training_step stops on a non-finite loss before it (test_train_robustness:
    a diverged run stops). The filter is off; nothing else of the step's logging changes."""
    import argparse

    from ulskip.cli.train import add_arguments
    from ulskip.train.trainer import training_args

    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(["--model-name-or-path", "m", "--train-file", "d.jsonl", "--output-dir", str(tmp_path / "o")])
    targs = training_args(args)
    assert targs.logging_nan_inf_filter is False
    assert targs.logging_steps == 10 and targs.include_num_input_tokens_seen in ("no", False)


def test_training_args_copy_batches_without_blocking(tmp_path, monkeypatch):
    """On CUDA the batch's host-to-device copies are asynchronous (accelerate's non_blocking, from the pinned
    memory transformers uses there): a blocking copy waits for the GPU's queued work, once per tensor of every
    batch. On the CPU nothing is copied (and transformers would warn that memory is not pinned): off."""
    import argparse

    import torch

    from ulskip.cli.train import add_arguments
    from ulskip.train import trainer as T

    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(["--model-name-or-path", "m", "--train-file", "d.jsonl", "--output-dir", str(tmp_path / "o")])
    assert T.training_args(args).accelerator_config.non_blocking is torch.cuda.is_available()
    made = {}

    import transformers

    class Spy:  # what training_args gives TrainingArguments on a CUDA machine
        __dataclass_fields__ = transformers.TrainingArguments.__dataclass_fields__

        def __init__(self, **kw):
            made.update(kw)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(transformers, "TrainingArguments", Spy)
    T.training_args(args)
    assert made["accelerator_config"] == {"non_blocking": True} and made["use_cpu"] is False


def test_floating_point_ops_counts_parameters_once(tmp_path, monkeypatch):
    """ULSTrainer.floating_point_ops (the Trainer's total_flos) is the Trainer's own number, with the
    parameter count made once rather than every micro-batch."""
    import argparse

    import torch
    from transformers import Trainer

    from helpers import make_checkpoint, write_train_data
    from ulskip.cli.train import add_arguments
    from ulskip.train.trainer import build_trainer

    ckpt = make_checkpoint(tmp_path / "ckpt", "llama", num_layers=4)
    (tmp_path / "data").mkdir()
    data = write_train_data(tmp_path / "data")
    p = argparse.ArgumentParser()
    add_arguments(p)
    trainer, model, _ = build_trainer(p.parse_args(["--model-name-or-path", ckpt, "--train-file", data,
                                                    "--output-dir", str(tmp_path / "out")]))
    calls = []
    orig = type(model).num_parameters
    monkeypatch.setattr(type(model), "num_parameters", lambda self, *a, **k: calls.append(1) or orig(self, *a, **k))
    inputs = {"input_ids": torch.zeros(3, 7, dtype=torch.long)}
    want = Trainer.floating_point_ops(trainer, inputs)
    assert want > 0 and len(calls) == 1
    for n in (7, 9, 11):
        inputs = {"input_ids": torch.zeros(3, n, dtype=torch.long)}
        assert trainer.floating_point_ops(inputs) == 6 * 3 * n * orig(model, exclude_embeddings=True)
    assert len(calls) == 2  # the reference above and the first of the three
    assert trainer.floating_point_ops({"x": torch.zeros(1)}) == 0
