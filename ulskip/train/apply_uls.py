"""Make a transformers causal LM train with Unified Layer Skipping semantics (docs/design.md, "The method").

prefill="full" (the paper's): prefix tokens run through all L layers, response tokens through the kept
layers only; at kept layer i a response token attends to the prefix K/V of layer i and to the response
K/V of the skip path, exactly as the engine's compact cache serves them at decode time.
prefill="skip": every token runs through the kept layers only.

How (one pass, exact, and no compute spent on response tokens at skipped layers):
  * kept layer: all tokens, unchanged.
  * skipped layer (prefill="full"): it runs on the first P = max(prefix_lengths) positions only, and its
    output replaces the input where the position is a prefix token of that row:
        h[:, :P] = where(t < prefix_len[b], layer(h[:, :P]), h[:, :P]);  h[:, P:] passes unchanged.
    This is exact because attention is causal: a prefix token never sees a later token, so cutting the
    sequence after P changes nothing for the tokens that keep the layer's output. Rows with a shorter
    prefix waste only their [prefix_len, P) stretch; response-heavy rows cost nothing extra.
  * skipped layer (prefill="skip"): not called at all.
The cut happens in the layer's __call__, outside transformers' gradient checkpointing (which wraps the
layer's forward), so the recomputation in backward sees exactly the cut inputs of the forward.
The prefix of each row is `prefix_lengths` (a [batch] tensor passed to the forward) or, without it, the
position of the row's first label that is not -100 (the first response token); at least 1.

Several speedups (target_speedups=[1, 2, 3]): one checkpoint trained for every listed schedule. Each
training forward runs ONE of them, drawn by SpeedupDraw from (seed, optimizer step, micro-batch) only, so
every DDP rank draws the same one and a resumed run repeats an uninterrupted one's draws; within that
forward the ULS semantics above hold unchanged. Eval-mode forwards run the default schedule (the largest
speedup, the one config.json's kept_layers names).
"""
from __future__ import annotations

import math
import numbers
import random

import torch

from ulskip.schedule import (DYNAMIC_STRATEGIES, SKIPDECODE_HORIZON, check_prefill, layer_speedup, skipdecode,
                             uls_schedule, validate_schedule)
from ulskip.train.patching import install_forward, model_type, patch_model


def decoder_layers(model):
    mt = model_type(model)
    base = getattr(model, model.base_model_prefix)
    return base.h if mt == "bloom" else base.layers


class _ULSContext:
    """What the layers of one model need to know about the forward in flight."""

    def __init__(self, runs, prefill, draw=None, draft_boundary="prefix"):
        # runs[i]: None = every token runs layer i (kept); J = the prefix and the first J response tokens
        # run it (0 for a skipped layer; SkipDecode's lower layers: J > 0). With several speedups `draw`
        # swaps in the drawn schedule's runs for each training forward.
        self.runs = self.default_runs = runs
        self.prefill = prefill
        self.draw = draw
        self.draft_boundary = draft_boundary
        self.speedup = None       # several speedups: the speedup of the forward in flight (or the last one)
        self.active = False
        self.p_max = 0
        self.prefix_lengths = None  # [B]
        self.keeps = {}           # J -> (P, [B, P, 1] bool: position t < prefix_len[b] + J), per forward
        self.response_index = None  # packed rows: [B, T] index of each token in its record's response, -1 prefix
        self.seq_len = 0
        self.tuple_out = None     # whether the layers return (hidden, ...) tuples; learned from layer 0

    def begin(self, prefix_lengths, labels, batch, seq_len, device, response_index=None, training=False):
        self.seq_len = seq_len
        self.active = True
        self.response_index = None
        # draw once per forward, before anything else: an eval-mode forward neither draws nor advances
        key = self.draw.advance() if training and self.draw is not None else None
        if key is not None and self.draw.speedups is not None:
            self.speedup = self.draw.speedup_at(*key)
            self.runs = self.draw.runs[self.speedup]
        elif self.draw is not None and self.draw.speedups is not None:
            self.speedup = self.draw.default
            self.runs = self.default_runs
        if self.prefill == "skip":
            return
        if response_index is not None:  # packed rows (train/data.py PackingCollator)
            ri = torch.as_tensor(response_index, device=device).long()
            if ri.shape != (batch, seq_len):
                raise ValueError(f"response_index must be [batch, seq] = {[batch, seq_len]}, got {list(ri.shape)}")
            if key is not None and self.draft_boundary == "random":
                ri = self.draw.packed_boundaries(key, ri)
            self.response_index, self.keeps = ri, {}
            return
        if prefix_lengths is not None:
            pl = torch.as_tensor(prefix_lengths, device=device).reshape(-1).long()
            if pl.numel() != batch:
                raise ValueError(f"prefix_lengths must hold one length per row ({batch}), got shape "
                                 f"{tuple(torch.as_tensor(prefix_lengths).shape)}")
        elif labels is not None:
            resp = labels.to(device) != -100
            first = torch.argmax(resp.int(), dim=1)
            pl = torch.where(resp.any(dim=1), first, torch.full_like(first, seq_len))
        else:  # no way to tell: the whole sequence is prefix (plain full-model forward)
            pl = torch.full((batch,), seq_len, device=device, dtype=torch.long)
        pl = pl.clamp(1, seq_len)
        if key is not None and self.draft_boundary == "random":
            pl = self.draw.boundaries(key, pl, labels, seq_len)
        self.p_max = int(pl.max())
        self.prefix_lengths = pl
        self.keeps = {}

    def keep(self, response_tokens: int):
        """(P, mask): a layer that runs on the prefix and the first `response_tokens` response tokens of each
        row processes positions [0, P) and keeps its output where the mask is set. Packed rows: every
        position runs (P = seq_len; records follow each other, so there is no cut) and the mask picks the
        prefix tokens and the response tokens of index < response_tokens of every record."""
        if self.response_index is not None:
            if response_tokens not in self.keeps:
                self.keeps[response_tokens] = (self.seq_len, (self.response_index < response_tokens).unsqueeze(-1))
            return self.keeps[response_tokens]
        if response_tokens not in self.keeps:
            P = min(self.seq_len, self.p_max + response_tokens)
            pos = torch.arange(P, device=self.prefix_lengths.device)
            mask = (pos[None, :] < (self.prefix_lengths + response_tokens)[:, None]).unsqueeze(-1)
            self.keeps[response_tokens] = (P, mask)
        return self.keeps[response_tokens]

    def end(self):
        self.active = False
        self.prefix_lengths, self.keeps, self.response_index = None, {}, None


def _cut(name, v, T, P):
    """Keep the first P of T positions of a layer kwarg."""
    if v is None or P == T or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, tuple) and name == "position_embeddings":  # (cos, sin) [B or 1, T, D]
        return tuple(x[..., :P, :] for x in v)
    if not torch.is_tensor(v):
        if name == "attention_mask":
            raise ValueError(f"apply_uls cannot cut an attention mask of type {type(v).__name__}; use the "
                             "'sdpa' or 'eager' attention implementation")
        return v
    if name == "attention_mask":
        if v.dim() == 4:              # [B, 1, T, T]
            return v[..., :P, :P]
        if v.dim() == 2:              # [B, T] (flash attention's padding mask)
            return v[:, :P]
    elif name in ("position_ids", "alibi"):
        return v[..., :P]             # [B, T] / [B*H, 1, T]
    elif name == "cache_position":
        return v[:P]
    elif v.dim() == 0:                # e.g. num_items_in_batch, passed down by the Trainer
        return v
    raise ValueError(f"apply_uls does not know how to cut the layer argument {name!r} of shape "
                     f"{tuple(v.shape)}")


class _ULSLayerMixin:
    """Mixed into each decoder layer's class (same name, same parameters) by apply_uls."""

    def __call__(self, hidden_states, *args, **kwargs):
        ctx: _ULSContext = self._ulskip_ctx
        if not ctx.active or hidden_states.shape[1] != ctx.seq_len:
            return super().__call__(hidden_states, *args, **kwargs)
        runs = ctx.runs[self._ulskip_index]  # this forward's schedule (_ULSContext.runs)
        if runs is None:
            out = super().__call__(hidden_states, *args, **kwargs)
            ctx.tuple_out = isinstance(out, tuple)
            return out
        if ctx.prefill == "skip":
            return (hidden_states, None) if ctx.tuple_out else hidden_states
        if args:
            raise ValueError("apply_uls expects the decoder layer's arguments after hidden_states by name")
        T = hidden_states.shape[1]
        P, keep = ctx.keep(runs)
        cut = {k: _cut(k, v, T, P) for k, v in kwargs.items()}
        h_in = hidden_states[:, :P]
        out = super().__call__(h_in, **cut)
        h_out = out[0] if isinstance(out, tuple) else out
        h = torch.where(keep, h_out, h_in)
        if P < T:
            h = torch.cat([h, hidden_states[:, P:]], dim=1)
        return (h,) + tuple(out[1:]) if isinstance(out, tuple) else h


SPEEDUP_DRAWS = ("step", "micro-batch")
DRAFT_BOUNDARIES = ("prefix", "random")


class SpeedupDraw:
    """What each training forward draws: which listed schedule it runs (several speedups) and, with
    draft_boundary="random", where each row's skip path starts. Every draw comes from
    random.Random(f"{seed}:{step}:{micro}"), a function of the seed and the counter alone: DDP ranks agree
    without talking, and a resumed run repeats an uninterrupted one. The counter is set by a Trainer callback
    (ulskip.train.trainer.speedup_draw_callback: step = optimizer step, micro = micro-batch within it); with
    none driving it (plain Python), every training forward is the next step."""

    def __init__(self, speedups=None, weights=None, runs=None, mode="step", seed=0):
        self.speedups = speedups  # sorted; None when only the boundary is drawn (one speedup)
        self.weights = weights
        self.runs = runs or {}    # speedup -> per-layer runs (_ULSContext.runs)
        self.default = speedups[-1] if speedups else None
        self.mode, self.seed = mode, seed
        self.step, self.micro = 0, 0
        self.driven = False       # a Trainer callback sets step/micro; forwards then do not advance them

    def speedup_at(self, step: int, micro: int = 0) -> float:
        """The speedup drawn for micro-batch `micro` of optimizer step `step`."""
        m = micro if self.mode == "micro-batch" else 0  # "step": one schedule for all its micro-batches
        return random.Random(f"{self.seed}:{step}:{m}").choices(self.speedups, weights=self.weights)[0]

    def advance(self):
        """The (step, micro) of the training forward in flight."""
        key = (self.step, self.micro)
        if not self.driven:
            self.step += 1
        return key

    def boundaries(self, key, prefix_lengths, labels, seq_len):
        """draft_boundary="random": each row's boundary moved from the prefix end p to p + k, k uniform in
        [0, r - 2] for a response of r tokens (labels: up to the last one not -100; else to seq_len), so that
        the logits of at least one response position still come from the skip path. The stretch before the
        new boundary runs all layers, as tokens verified in self-speculative decoding have."""
        pl = prefix_lengths
        if labels is not None:
            resp = labels.to(pl.device) != -100
            last = seq_len - torch.argmax(resp.flip(1).int(), dim=1)  # one past the last response token
            end = torch.where(resp.any(dim=1), last, pl)
        else:
            end = torch.full_like(pl, seq_len)
        span = (end - pl - 1).clamp(min=1)  # k takes r - 1 values, 0 .. r - 2 (only 0 when r <= 2)
        rng = random.Random(f"{self.seed}:{key[0]}:{key[1]}:boundary")  # per micro-batch: rows differ
        u = torch.tensor([rng.random() for _ in range(pl.numel())], dtype=torch.float64, device=pl.device)
        return pl + (u * span).floor().long()

    def packed_boundaries(self, key, response_index):
        """boundaries() for packed rows: each record's response (a run of response_index 0, 1, ..., r - 1)
        shifted down by its own k, uniform in [0, r - 2], so its first k response tokens run every layer (a
        negative index is kept by every layer, as a prefix token is). All on the device, no host read: the
        record count is not known on the host, so the uniforms come from a generator seeded by the key, one
        per position, and each record takes the one at its first response token."""
        ri = response_index
        flat = ri.reshape(-1)
        n = flat.numel()
        resp = flat >= 0
        pos = torch.arange(n, device=flat.device)
        # each response token's record, named by the position of its first response token (index 0 there);
        # prefix and padding count into a spare slot n
        first = torch.where(resp, pos - flat, torch.full_like(pos, n))
        r = torch.zeros(n + 1, dtype=torch.long, device=flat.device).scatter_add_(0, first, torch.ones_like(first))
        seed = random.Random(f"{self.seed}:{key[0]}:{key[1]}:boundary").getrandbits(63)
        u = torch.rand(n, generator=torch.Generator(device=flat.device).manual_seed(seed), dtype=torch.float64,
                       device=flat.device)
        span = (r[first] - 1).clamp(min=1)                       # k takes r - 1 values, 0 .. r - 2
        k = (u[first.clamp(max=n - 1)] * span).floor().long()   # (the spare slot's k is never used)
        return torch.where(resp, flat - k, flat).reshape(ri.shape)


def speedup_draw(model):
    """The SpeedupDraw of a model prepared by apply_uls with several speedups (or a random draft boundary),
    else None."""
    state = getattr(model, "_ulskip_train", None)
    return getattr(getattr(state, "uls", None), "draw", None)


def _runs(num_layers, kept, dynamic=None):
    return [dynamic.response_tokens(i) if dynamic else (None if i in kept else 0) for i in range(num_layers)]


def _speedup_set(num_layers, target_speedups, speedup_weights, strategy, layer_seed, block_influence):
    """(sorted speedups as floats, their weights, speedup -> kept layers), every bad input refused."""
    if isinstance(target_speedups, (str, bytes)) or not hasattr(target_speedups, "__iter__"):
        raise ValueError(f"target_speedups must be a list of numbers, got {target_speedups!r}")
    raw = list(target_speedups)
    if not raw:
        raise ValueError("target_speedups must list at least one speedup, got []")
    # uls_schedule's own error for a value it refuses (bool, nan, < 1, too few layers left)
    kept = [uls_schedule(num_layers, s, strategy, seed=layer_seed, block_influence=block_influence) for s in raw]
    speeds = [float(s) for s in raw]
    dup = next((s for i, s in enumerate(speeds) if s in speeds[:i]), None)
    if dup is not None:
        raise ValueError(f"target_speedups lists {dup:g} twice ({raw!r}): give each speedup once")
    keys = [f"{s:g}" for s in speeds]  # how config.json's `schedules` names them
    clash = next((i for i, k in enumerate(keys) if k in keys[:i]), None)
    if clash is not None:
        raise ValueError(f"target_speedups {speeds[keys.index(keys[clash])]!r} and {speeds[clash]!r} both print as "
                         f"{keys[clash]}: give speedups that differ in their first 6 digits")
    same = next(((j, i) for i in range(len(kept)) for j in range(i) if kept[i] == kept[j]), None)
    if same is not None:
        j, i = same
        raise ValueError(f"target_speedups {keys[j]} and {keys[i]} keep the same layers {kept[i]} on this "
                         f"{num_layers}-layer model: list one of them (use speedup_weights to draw it more often)")
    if speedup_weights is None:
        weights = [1.0] * len(speeds)
    else:
        if isinstance(speedup_weights, (str, bytes)) or not hasattr(speedup_weights, "__iter__"):
            raise ValueError(f"speedup_weights must be a list of numbers, got {speedup_weights!r}")
        weights = list(speedup_weights)
        if len(weights) != len(speeds):
            raise ValueError(f"speedup_weights must hold one weight per speedup ({len(speeds)} for {raw!r}), "
                             f"got {len(weights)}: {weights!r}")
        if not all(isinstance(w, numbers.Real) and not isinstance(w, bool) and math.isfinite(w) and w >= 0
                   for w in weights):
            raise ValueError(f"speedup_weights must be finite numbers >= 0, got {weights!r}")
        if not any(w > 0 for w in weights):
            raise ValueError(f"speedup_weights must not all be 0 (no schedule could be drawn), got {weights!r}")
        if not math.isfinite(sum(weights)):
            raise ValueError(f"speedup_weights must have a finite sum (the draw normalizes them), got {weights!r}")
        weights = [float(w) for w in weights]
    order = sorted(range(len(speeds)), key=speeds.__getitem__)
    return ([speeds[i] for i in order], [weights[i] for i in order],
            {speeds[i]: kept[i] for i in order})


_CLASSES: dict = {}


def _uls_class(cls):
    if issubclass(cls, _ULSLayerMixin):
        return cls
    if cls not in _CLASSES:
        _CLASSES[cls] = type(cls.__name__, (_ULSLayerMixin, cls), {"__module__": cls.__module__,
                                                                   "__qualname__": cls.__qualname__})
    return _CLASSES[cls]


def apply_uls(model, target_speedup=None, strategy: str = "paper", prefill: str = "full", schedule=None,
              fused_kernels: bool = False, layer_seed: int = 0, block_influence=None,
              skipdecode_horizon: int = SKIPDECODE_HORIZON, *, target_speedups=None, speedup_weights=None,
              speedup_draw: str = "step", draw_seed: int = 0, draft_boundary: str = "prefix"):
    """Prepare `model` (a transformers Llama/Mistral/Qwen2/Bloom causal LM) for ULS fine-tuning, in place.

    The kept layers are `schedule` if given, else `uls_schedule(L, target_speedup, strategy)` (any layer
    policy of ulskip.schedule; shortgpt takes block_influence, random layer_seed, skipdecode its depths'
    horizon). Records
    {kept_layers, num_layers, target_speedup, strategy, prefill} in `model.config.ulskip`, so
    save_pretrained writes it into config.json (the engine's default schedule). With prefill="skip" the
    skipped layers never run, so their parameters are frozen (requires_grad=False; DDP needs every
    trainable parameter used). `fused_kernels=True` also calls `patch_model(model)`. Returns the model.

    Several speedups (instead of target_speedup): target_speedups=[1, 2, 3] trains one checkpoint for all of
    them; each training forward runs one schedule uls_schedule(L, s, strategy), drawn with speedup_weights
    (default uniform) from (draw_seed, step, micro) by SpeedupDraw; speedup_draw="step" (one schedule per
    optimizer step: micro stays 0) or "micro-batch". The default schedule (kept_layers, target_speedup, and
    every eval-mode forward) is the largest speedup; the section also records target_speedups (sorted),
    speedup_weights, schedules ({f"{s:g}": kept layers}) and speedup_draw. With prefill="skip" a layer is
    frozen only if no listed schedule keeps it. A one-element list is target_speedup (today's section).
    draft_boundary="random" (prefill "full"): each training record's prefix/response boundary moves to a drawn
    point inside its response (SpeedupDraw.boundaries; packed rows: .packed_boundaries); the loss stays on
    every response token.
    """
    check_prefill(prefill)
    if speedup_draw not in SPEEDUP_DRAWS:
        raise ValueError(f"speedup_draw must be one of {SPEEDUP_DRAWS}, got {speedup_draw!r}")
    if draft_boundary not in DRAFT_BOUNDARIES:
        raise ValueError(f"draft_boundary must be one of {DRAFT_BOUNDARIES}, got {draft_boundary!r}")
    if isinstance(draw_seed, bool) or not isinstance(draw_seed, numbers.Integral):
        raise ValueError(f"draw_seed must be an integer, got {draw_seed!r}")
    layers = decoder_layers(model)
    L = len(layers)
    dynamic = None
    multi = None  # several speedups: (sorted speedups, weights, speedup -> kept layers)
    if target_speedups is not None:
        if target_speedup is not None or schedule is not None:
            raise ValueError("give target_speedups alone, not with target_speedup or schedule (the default schedule "
                             "is the largest listed speedup)")
        if strategy in DYNAMIC_STRATEGIES:
            ts = [target_speedups] if isinstance(target_speedups, (str, bytes)) else list(target_speedups)
            if len(ts) != 1:
                raise ValueError("skipdecode trains one per-position depth schedule: it takes one speedup, got "
                                 f"target_speedups {ts!r}")
            target_speedup = ts[0]
        else:
            multi = _speedup_set(L, target_speedups, speedup_weights, strategy, layer_seed, block_influence)
            if len(multi[0]) == 1:  # one speedup: exactly a target_speedup run (today's section)
                target_speedup, multi = multi[0][0], None
    elif speedup_weights is not None:
        raise ValueError("speedup_weights weigh the target_speedups: give target_speedups too")
    if schedule is not None:
        kept = validate_schedule(L, schedule)
        if target_speedup is None:
            target_speedup = layer_speedup(L, kept)
        strategy = "custom"
    elif multi is not None:
        target_speedup = multi[0][-1]
        kept = multi[2][target_speedup]
    else:
        if target_speedup is None:
            raise ValueError("apply_uls needs target_speedup (or target_speedups, or an explicit schedule)")
        if strategy in DYNAMIC_STRATEGIES:
            if prefill != "full":
                raise ValueError("skipdecode runs the prompt through all layers: prefill must be 'full'")
            dynamic = skipdecode(L, target_speedup, skipdecode_horizon)
            kept = dynamic.union
        else:
            kept = uls_schedule(L, target_speedup, strategy, seed=layer_seed, block_influence=block_influence)
    if draft_boundary == "random" and (prefill != "full" or dynamic is not None):
        raise ValueError("draft_boundary='random' moves where the skip path starts inside the response: it needs "
                         "prefill='full' and a static layer policy (not skipdecode)")
    draw = None
    if multi is not None:
        speeds, weights, kept_by = multi
        draw = SpeedupDraw(speeds, weights, {s: _runs(L, set(k)) for s, k in kept_by.items()}, speedup_draw,
                           int(draw_seed))
    elif draft_boundary == "random":
        draw = SpeedupDraw(mode=speedup_draw, seed=int(draw_seed))
    runs = _runs(L, set(kept), dynamic)
    # with several schedules a layer is frozen only if none of them runs it
    used = set().union(*multi[2].values()) if multi is not None else set(kept)
    ctx = _ULSContext(runs, prefill, draw, draft_boundary)
    if multi is not None:
        ctx.speedup = draw.default
    # a skipped layer must return what the layer class returns; learned from the first kept layer that runs,
    # but with prefill="skip" the first layers may all be skipped (random, shortgpt): Bloom's blocks return
    # tuples, the Llama family's layers a tensor (transformers 5)
    ctx.tuple_out = model_type(model) == "bloom"
    for i, layer in enumerate(layers):
        layer.__class__ = _uls_class(type(layer))
        layer._ulskip_ctx = ctx
        layer._ulskip_index = i
        if prefill == "skip" and i not in used:
            for p in layer.parameters():
                p.requires_grad_(False)
    state = install_forward(model)
    state.uls = ctx
    state.aux = None  # a new schedule: enable_aux_losses again to check the losses against it
    model.config.ulskip = {"kept_layers": list(kept), "num_layers": L,
                           "target_speedup": float(target_speedup), "strategy": strategy,
                           "prefill": prefill}
    if dynamic is not None:
        model.config.ulskip["skipdecode"] = dynamic.as_dict()
    if multi is not None:
        speeds, weights, kept_by = multi
        model.config.ulskip.update(target_speedups=speeds, speedup_weights=weights,
                                   schedules={f"{s:g}": list(kept_by[s]) for s in speeds}, speedup_draw=speedup_draw)
    if draft_boundary != "prefix":
        model.config.ulskip["draft_boundary"] = draft_boundary
    if fused_kernels:
        patch_model(model)
    return model
