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
