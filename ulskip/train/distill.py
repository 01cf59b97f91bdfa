"""Logit distillation for skip-aware fine-tuning: the student (the model under its layer schedule) learns
the fine-tuned full model's next-token distribution on the response tokens, beside the labels.

loss = (1 - w) * CE(labels) + w * T^2 * KL(softmax(teacher / T) || softmax(student / T)), the KL summed over
the response positions and divided like the cross-entropy (by the tokens of the whole accumulated batch
when transformers passes num_items_in_batch, else by this batch's). Hinton et al.'s T^2 keeps the
gradient scale independent of the temperature.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ulskip.train.aux_loss import loss_denominator
from ulskip.train.data import IGNORE_INDEX


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                      temperature: float = 1.0, num_items_in_batch=None) -> torch.Tensor:
    """student_logits, teacher_logits [B, T, V]; labels [B, T] (-100 where no loss): logits at position t
    predict labels[t + 1], as transformers' causal-LM loss shifts them."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ: the teacher must share the tokenizer and vocabulary")
    mask = labels[:, 1:] != IGNORE_INDEX
    s = student_logits[:, :-1][mask].float() / temperature
    t = teacher_logits[:, :-1][mask].float() / temperature
    kl = F.kl_div(F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1), log_target=True, reduction="sum")
    return kl * temperature ** 2 / loss_denominator(labels[:, 1:], num_items_in_batch, kl.device)
