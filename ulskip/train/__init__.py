"""ULS fine-tuning of Hugging Face models (docs/design.md, "The method": training).

    from ulskip.train import apply_uls, patch_model
    apply_uls(model, target_speedup=2, prefill="full")   # prefix: all layers; response: kept layers
    patch_model(model)                                    # fused Triton norms/activations + chunked CE
    # or: apply_uls(model, target_speedups=[1, 2, 3])     # one checkpoint for 1x/2x/3x, a schedule drawn per step
    enable_aux_losses(model, 1.0, 1.0)                    # optional: full-path CE + hidden-state match per step

`ulskip train` (ulskip/cli/train.py, ulskip/train/trainer.py) wraps both in a transformers Trainer.
"""
from ulskip.kernels.cross_entropy import fused_linear_cross_entropy
from ulskip.schedule import PREFILL_MODES
from ulskip.train.apply_uls import SpeedupDraw, apply_uls, decoder_layers, speedup_draw
from ulskip.train.aux_loss import enable_aux_losses
from ulskip.train.patching import patch_model

__all__ = ["apply_uls", "patch_model", "fused_linear_cross_entropy", "decoder_layers", "PREFILL_MODES", "SpeedupDraw",
           "speedup_draw", "enable_aux_losses"]
