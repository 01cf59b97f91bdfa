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


def test_training_args_copy_batches_without_blocking(tmp_path):
    """The batch's host-to-device copies are asynchronous (accelerate's non_blocking, from pinned memory):
    a blocking copy waits for the GPU's queued work, once per tensor of every batch."""
    import argparse

    from ulskip.cli.train import add_arguments
    from ulskip.train.trainer import training_args

    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(["--model-name-or-path", "m", "--train-file", "d.jsonl", "--output-dir", str(tmp_path / "o")])
    targs = training_args(args)
    assert targs.accelerator_config.non_blocking is True  # pinned memory: transformers turns it on with CUDA

