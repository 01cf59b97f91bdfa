"""Swap fused training kernels into a transformers model with one call: `patch_model(model)`.

What gets replaced (forward methods of module instances; parameters and state-dict keys unchanged):
  RMSNorm (Llama/Mistral/Qwen2)  -> RMSNormFunction: Triton forward and backward (kernels/norm.py)
  LayerNorm (Bloom)              -> LayerNormFunction: same
  SwiGLU MLP (Llama family)      -> gate_proj(x) and up_proj(x) called as modules (their hooks run:
                                    DeepSpeed ZeRO-3 gathers the weights, adapters apply), then
                                    SwiGLUFunction: silu(gate) * up, Triton forward and backward
                                    (kernels/activation.py silu_mul_split[_backward])
  Bloom GeLU                     -> GeluTanhFunction (kernels/activation.py)
  LM head + loss                 -> chunked fused linear + cross-entropy (kernels/cross_entropy.py) when
                                    labels are given: no [tokens, vocab] logits, logits=None returned
The Triton pieces run where `kernels.backend.use_triton(t, interpreter=True)` says (CUDA tensors, or
anywhere under TRITON_INTERPRET=1); elsewhere the patched modules fall back to their original forward,
and the fused cross-entropy uses its PyTorch path.
Every patched module reads only its own parameters inside its own forward, so the norm/activation patches
are safe under DeepSpeed ZeRO-3; the fused loss reads the LM head's weight outside the head's forward,
so it is not (`ulskip train` leaves it out under ZeRO-3).
"""
from __future__ import annotations

import types

import torch
import torch.nn as nn
import torch.nn.functional as F

from ulskip.kernels import backend
from ulskip.kernels.activation import GeluTanhFunction, SwiGLUFunction
from ulskip.kernels.cross_entropy import fused_linear_cross_entropy
from ulskip.kernels.norm import LayerNormFunction, RMSNormFunction
from ulskip.loading.config import check_model_type


def _autocast_on(t: torch.Tensor) -> bool:
    try:
        return torch.is_autocast_enabled(t.device.type)
    except TypeError:
        return t.is_cuda and torch.is_autocast_enabled()


# ----------------------------------------------------------------------------- patched forwards
def _rms_forward(self, hidden_states):
    if not backend.use_triton(hidden_states, interpreter=True):
        return self._ulskip_orig_forward(hidden_states)
    eps = getattr(self, "variance_epsilon", None) or getattr(self, "eps", 1e-6)
    return RMSNormFunction.apply(hidden_states, self.weight, float(eps))


def _ln_forward(self, x):
    if not backend.use_triton(x, interpreter=True):
        return self._ulskip_orig_forward(x)
    w, b = self.weight, self.bias
    if _autocast_on(x):  # F.layer_norm autocasts to fp32; keep that contract
        x, w, b = x.float(), w.float(), (b.float() if b is not None else None)
    if b is None:
        b = torch.zeros_like(w)
    return LayerNormFunction.apply(x, w, b, float(self.eps))


def _swiglu_forward(self, x):
    if not backend.use_triton(x, interpreter=True):
        return self._ulskip_orig_forward(x)
    # Call the projections as modules, never read their weights here: under ZeRO-3 a weight is gathered
    # only inside its own module's forward (pre-forward hook), and adapters/hooks must see the call.
    gate, up = self.gate_proj(x), self.up_proj(x)
    if gate.dtype != up.dtype:  # e.g. one projection swapped for a module of another precision
        up = up.to(gate.dtype)
    return self.down_proj(SwiGLUFunction.apply(gate, up))


def _gelu_forward(self, x):
    if not backend.use_triton(x, interpreter=True):
        return self._ulskip_orig_forward(x)
    return GeluTanhFunction.apply(x)


def _set_forward(module: nn.Module, fn) -> None:
    if not hasattr(module, "_ulskip_orig_forward"):
        module._ulskip_orig_forward = module.forward
    module.forward = types.MethodType(fn, module)


def model_type(model) -> str:
    mt = getattr(getattr(model, "config", None), "model_type", None)
    check_model_type(mt, "the model config")
    return mt


def patch_model(model, norm: bool = True, activation: bool = True, cross_entropy: bool = True):
    """Patch the fused training kernels into a transformers causal LM (Llama, Mistral, Qwen2, Bloom),
    in place; returns the model. Idempotent. Returns counts in `model._ulskip_patched`."""
    mt = model_type(model)
    counts = {"rms_norm": 0, "layer_norm": 0, "swiglu": 0, "gelu": 0, "cross_entropy": 0}
    for module in model.modules():
        name = type(module).__name__
        if norm and mt != "bloom" and name.endswith("RMSNorm") and hasattr(module, "weight"):
            _set_forward(module, _rms_forward)
            counts["rms_norm"] += 1
        elif norm and mt == "bloom" and isinstance(module, nn.LayerNorm):
            if not module.elementwise_affine:
                continue
            _set_forward(module, _ln_forward)
            counts["layer_norm"] += 1
        elif (activation and mt != "bloom" and all(hasattr(module, a) for a in ("gate_proj", "up_proj", "down_proj"))
              and getattr(module, "config", None) is not None
              and getattr(module.config, "hidden_act", None) in ("silu", "swish")):
            _set_forward(module, _swiglu_forward)
            counts["swiglu"] += 1
        elif activation and mt == "bloom" and name == "BloomGelu":
            _set_forward(module, _gelu_forward)
            counts["gelu"] += 1
    if cross_entropy:
        state = install_forward(model)
        state.fused_ce = True
        counts["cross_entropy"] = 1
    model._ulskip_patched = counts
    return model


# ----------------------------------------------------------------------------- the causal LM forward
class TrainState:
    """Per-model switches read by the patched top-level forward."""

    def __init__(self, orig_forward):
        self.orig_forward = orig_forward
        self.fused_ce = False
        self.uls = None  # an apply_uls._ULSContext
        self.aux = None  # an aux_loss.AuxLosses: skip and full path in each training forward


def install_forward(model) -> TrainState:
    state = getattr(model, "_ulskip_train", None)
    if state is None:
        state = TrainState(model.forward)
        model._ulskip_train = state
        model.forward = types.MethodType(_causal_lm_forward, model)
    return state


_NOT_FOR_BASE = ("labels", "num_items_in_batch", "logits_to_keep", "return_dict", "shift_labels",
                 "output_attentions", "output_hidden_states")


def _causal_lm_forward(self, input_ids=None, attention_mask=None, labels=None, prefix_lengths=None,
                       response_index=None, **kwargs):
    """The model's forward plus ULS semantics (`prefix_lengths` [batch], else derived from `labels`; packed
    rows: `response_index` [batch, seq] with position_ids restarting per record) and the fused linear
    cross-entropy (when patched and labels are given)."""
    state: TrainState = self._ulskip_train
    uls = state.uls
    ref = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
    if uls is not None:
        for k in ("cache", "past_key_values"):
            if kwargs.get(k) is not None:
                raise ValueError("a model prepared by ulskip.train.apply_uls runs whole sequences (training, "
                                 "teacher-forced scoring) and takes no KV cache; generate with ulskip.Engine")
        kwargs["use_cache"] = False
        if response_index is not None and (model_type(self) == "bloom" or attention_mask is not None
                                           or kwargs.get("position_ids") is None):
            # transformers builds the per-record (block-diagonal) mask from position ids that restart at 0,
            # and only without an attention mask; Bloom derives ALiBi and its mask from attention_mask alone
            raise ValueError("packed rows (response_index) need position_ids restarting per record, no "
                             "attention_mask, and a Llama-family model (Bloom cannot pack)")
    elif prefix_lengths is not None or response_index is not None:
        raise ValueError("prefix_lengths / response_index are only meaningful after ulskip.train.apply_uls(model, ...)")
    if uls is not None and state.aux is not None and self.training and labels is not None:
        return _aux_forward(self, state, input_ids, attention_mask, labels, prefix_lengths, response_index, kwargs)
    try:
        if uls is not None:  # inside the try: a refused input still ends the forward's ULS state
            # training: several speedups draw this forward's schedule; eval mode runs the default one
            uls.begin(prefix_lengths, labels, ref.shape[0], ref.shape[1], ref.device, response_index,
                      training=self.training)
        if state.fused_ce and labels is not None and not kwargs.get("output_hidden_states") \
                and not kwargs.get("output_attentions"):
            return _fused_ce_forward(self, input_ids, attention_mask, labels, **kwargs)
        return state.orig_forward(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
    finally:
        if uls is not None:
            uls.end()


def _aux_forward(self, state, input_ids, attention_mask, labels, prefix_lengths, response_index, kwargs):
    """A training forward with the auxiliary losses (ulskip/train/aux_loss.py): the skip and the full path
    in this one call, so DDP and DeepSpeed see one forward per backward."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    from ulskip.train.aux_loss import aux_forward

    asked = [k for k in ("output_hidden_states", "output_attentions") if kwargs.get(k)]
    if asked:
        raise ValueError(f"a training forward with auxiliary losses returns the loss only; {asked[0]}=True is not "
                         "supported (run the model in eval mode, or turn the losses off with enable_aux_losses(model, 0, 0))")
    ref = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
    base_kwargs = {k: v for k, v in kwargs.items() if k not in _NOT_FOR_BASE}
    base_kwargs.update(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    loss = aux_forward(self, state, base_kwargs, labels, kwargs.get("shift_labels"), kwargs.get("num_items_in_batch"),
                       begin=lambda: state.uls.begin(prefix_lengths, labels, ref.shape[0], ref.shape[1], ref.device,
                                                     response_index, training=True),
                       end=state.uls.end)
    return CausalLMOutputWithPast(loss=loss, logits=None)


def _fused_ce_forward(self, input_ids, attention_mask, labels, **kwargs):
    from transformers.modeling_outputs import CausalLMOutputWithPast

    num_items = kwargs.get("num_items_in_batch")
    shift_labels = kwargs.get("shift_labels")
    base_kwargs = {k: v for k, v in kwargs.items() if k not in _NOT_FOR_BASE}
    base_kwargs.setdefault("use_cache", False)
    base = getattr(self, self.base_model_prefix)
    out = base(input_ids=input_ids, attention_mask=attention_mask, **base_kwargs)
    hidden = out[0]                                                     # [B, T, H]
    if shift_labels is None:
        labels = labels.to(hidden.device)
        shift_labels = F.pad(labels[:, 1:], (0, 1), value=-100)         # row t predicts token t+1
    head = self.get_output_embeddings()
    loss = fused_linear_cross_entropy(hidden, head.weight, shift_labels, bias=head.bias,
                                      num_items_in_batch=num_items)
    return CausalLMOutputWithPast(loss=loss, logits=None)
