"""Auxiliary losses that train the skip path and the full path together: the two terms of the paper's released
code (`full_layers_pred_loss_rate`, `skip_full_layers_sim_loss_rate`), as this project defines them.

Each training forward runs the batch twice through the base model: once under the layer schedule (the skip
path: the ULS semantics of apply_uls) and once through every layer for every token (the full path). With
h_skip, h_full the final hidden states (after the final norm) and CE(h) the head's cross-entropy on the labels:

    loss = CE(h_skip) + a * CE(h_full) + b * sum over response positions of (1 - cos(h_skip, stopgrad(h_full)))

- a (`--full-path-loss-weight`) keeps the all-layers model trained in every step, as a several-speedups
  run's 1x path or a self-speculative verifier needs.
- b (`--hidden-match-weight`) pulls the skip path's output toward the full path's. The full path is the
  target, not pulled toward the skip path: its side of the term carries no gradient. A draft closer to the
  verifier is accepted more often.

A step whose schedule keeps every layer (a several-speedups run's 1x draw) runs one pass and no auxiliary
term: its loss is already the full path's cross-entropy, and the match term is 0.

Positions are those whose next token has a label (the response), and every sum is divided like the
cross-entropy: by the accumulated batch's label count when transformers passes num_items_in_batch, else by
this batch's. Both passes run inside one forward call, so DDP and DeepSpeed see one forward per backward.
The cost is a second pass through all layers per step.
"""
from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F

from ulskip.train.data import IGNORE_INDEX


class AuxLosses:
    """The two weights; enable_aux_losses checks them and attaches this to the model's train state."""

    def __init__(self, full_path_weight: float = 0.0, hidden_match_weight: float = 0.0):
        self.full_path_weight = float(full_path_weight)
        self.hidden_match_weight = float(hidden_match_weight)


def _weight(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def enable_aux_losses(model, full_path_weight: float = 0.0, hidden_match_weight: float = 0.0):
    """Train `model` (prepared by apply_uls with prefill "full") with the auxiliary losses above, in place.
    Both weights 0 turns them off. Returns the model."""
    a = _weight("full_path_weight", full_path_weight)
    b = _weight("hidden_match_weight", hidden_match_weight)
    state = getattr(model, "_ulskip_train", None)
    uls = getattr(state, "uls", None)
    if uls is None:
        raise ValueError("auxiliary losses compare the skip path with the full path: call "
                         "ulskip.train.apply_uls(model, ...) first")
    if uls.prefill != "full" and (a or b):
        raise ValueError(f"auxiliary losses need prefill 'full', got {uls.prefill!r}: with prefill 'skip' the "
                         "skipped layers are frozen and never run at inference, so there is no full path to train")
    state.aux = AuxLosses(a, b) if (a or b) else None
    return model


def head_loss(model, hidden: torch.Tensor, shift_labels: torch.Tensor, fused: bool, num_items_in_batch=None):
    """The causal-LM cross-entropy of hidden [B, T, H] against shift_labels [B, T] (row t predicts token
    t + 1), summed and divided as transformers' loss: through the fused linear cross-entropy when the model
    is patched (no [B, T, V] logits), else through its head."""
    head = model.get_output_embeddings()
    if fused:
        from ulskip.kernels.cross_entropy import fused_linear_cross_entropy
        return fused_linear_cross_entropy(hidden, head.weight, shift_labels, bias=head.bias,
                                          num_items_in_batch=num_items_in_batch)
    logits = head(hidden).float()
    total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), shift_labels.reshape(-1),
                            ignore_index=IGNORE_INDEX, reduction="sum")
    return total / loss_denominator(shift_labels, num_items_in_batch, total.device)


def hidden_match_loss(h_skip: torch.Tensor, h_full: torch.Tensor, shift_labels: torch.Tensor,
                      num_items_in_batch=None) -> torch.Tensor:
    """sum over positions with a label of 1 - cos(h_skip, h_full), divided as the cross-entropy; h_full is
    the target (no gradient through it)."""
    # every position, then the labelled ones picked by a where: h[mask] would be a nonzero (a host sync on a
    # GPU, every step)
    mask = (shift_labels != IGNORE_INDEX).to(h_skip.device)
    cos = F.cosine_similarity(h_skip.float(), h_full.detach().float(), dim=-1)       # [B, T]
    per_pos = torch.where(mask, 1 - cos, torch.zeros((), dtype=cos.dtype, device=cos.device))
    return per_pos.sum() / loss_denominator(shift_labels, num_items_in_batch, cos.device)


def loss_denominator(shift_labels, num_items_in_batch, device) -> torch.Tensor:
    """What a summed per-token loss is divided by, as transformers divides the cross-entropy: the label count
    of the whole accumulated batch when the Trainer passes num_items_in_batch, else this batch's (>= 1)."""
    n = num_items_in_batch if num_items_in_batch is not None else (shift_labels != IGNORE_INDEX).sum()
    n = n.to(device) if torch.is_tensor(n) else torch.tensor(float(n), device=device)
    return n.clamp(min=1)


def aux_forward(model, state, base_kwargs: dict, labels: torch.Tensor, shift_labels, num_items_in_batch,
                begin, end):
    """One training forward with the auxiliary losses -> the combined loss. base_kwargs go to the base
    model (input_ids, attention_mask, position_ids, ...); begin() / end() open and close the ULS semantics
    of the skip path (the full path runs with them closed: every layer, every token)."""
    aux: AuxLosses = state.aux
    base = getattr(model, model.base_model_prefix)
    try:
        begin()  # inside the try: a refused input (bad prefix_lengths) still closes the ULS state
        h_skip = base(**base_kwargs)[0]
    finally:
        end()
    if shift_labels is None:
        labels = labels.to(h_skip.device)
        shift_labels = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    loss = head_loss(model, h_skip, shift_labels, state.fused_ce, num_items_in_batch)
    if all(r is None for r in state.uls.runs):
        # the drawn schedule keeps every layer for every token (a several-speedups run's 1x): the skip path is
        # the full path, so its cross-entropy is already the loss (adding it again would only scale this
        # step) and the match term is 0: one pass, no auxiliary terms
        return loss
    if aux.full_path_weight:
        h_full = base(**base_kwargs)[0]
        loss = loss + aux.full_path_weight * head_loss(model, h_full, shift_labels, state.fused_ce,
                                                       num_items_in_batch)
    else:
        # the full path is only the match term's target (no gradient through it): no graph to keep
        with torch.no_grad():
            h_full = base(**base_kwargs)[0]
    if aux.hidden_match_weight:
        loss = loss + aux.hidden_match_weight * hidden_match_loss(h_skip, h_full, shift_labels, num_items_in_batch)
    return loss
