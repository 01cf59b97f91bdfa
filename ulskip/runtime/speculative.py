"""Self-speculative decoding, batched: the ULS schedule drafts, all layers verify, the output is the full
model's (the lossless mode).

Each round, every sequence of the batch
  1. drafts k tokens: k decode steps through the draft layers (the ULS schedule at draft_speedup, a subset
     of the layers the engine holds). They read the cache of the verified tokens, which the full model
     wrote, and write their own K/V at the draft layers for the unverified positions only;
  2. runs its last accepted token and the k drafts through all layers in one verify pass, which
     overwrites those k + 1 positions at every layer (one KV cache, no second one for the draft);
  3. keeps the drafts the full model agrees with, up to the first disagreement, plus the full model's own
     token there: 1 to k + 1 new tokens.
Greedy: a draft is kept when it is the full model's argmax, so the tokens are the full model's greedy
decoding. Sampling: the rejection rule of Leviathan et al. / Chen et al. (2023) -- keep draft d with
probability min(1, p(d) / q(d)), else draw from max(0, p - q) -- so the tokens are distributed as the full
model's samples (p and q both after the same temperature / top-k / top-p), but seeded draws differ from
non-speculative ones.

Every sequence runs the same program (same layers, same k), so the batch drafts together and every draft
step and verify pass replays a CUDA graph; rows advance by their own counts through per-row positions.
Acceptance stays on the device; the one host sync is the "all finished" check, read one round late so
the host never waits for the round it just queued.
"""
from __future__ import annotations

import gc
import math
import warnings
from dataclasses import dataclass, fields

import torch

from ulskip.arguments import integer, number
from ulskip.kernels.decode_attention import MAX_VERIFY_TOKENS
from ulskip.runtime.sampling import draw, probabilities
from ulskip.runtime.text import SequenceEnds
from ulskip.runtime.transfer import HostCopy
from ulskip.schedule import trained_schedule, uls_schedule

MAX_DRAFT_TOKENS = MAX_VERIFY_TOKENS - 1  # the verify pass holds the last accepted token and the drafts


@dataclass(frozen=True)
class SpeculativeConfig:
    draft_speedup: float = 2.0   # the draft runs the ULS schedule of this speedup (> 1)
    num_draft_tokens: int = 4    # k: drafts per round, 1 .. MAX_DRAFT_TOKENS

    def __post_init__(self):
        object.__setattr__(self, "num_draft_tokens", integer(
            "num_draft_tokens", self.num_draft_tokens, 1, MAX_DRAFT_TOKENS,
            what=f"an integer in [1, {MAX_DRAFT_TOKENS}]"))
        object.__setattr__(self, "draft_speedup", number(
            "draft_speedup", self.draft_speedup, 1, lo_open=True, what="a finite number > 1 (1 = no draft)"))


def describe(stats: dict) -> str:
    """One line of a run's statistics ("-" where no round ran: max_new_tokens 1, or EOS first everywhere)."""
    def f(v):
        return "-" if v is None else f"{v:.2f}"
    return (f"draft {len(stats['draft_layers'])} layers ({','.join(map(str, stats['draft_layers']))}), "
            f"k={stats['num_draft_tokens']}: acceptance {f(stats['acceptance_rate'])}, "
            f"{f(stats['tokens_per_verify'])} tokens per verify pass")


def check_speculative(spec) -> SpeculativeConfig | None:
    """None, a SpeculativeConfig or a dict of its fields -> a SpeculativeConfig (or None)."""
    if spec is None or isinstance(spec, SpeculativeConfig):
        return spec
    if not isinstance(spec, dict):
        raise ValueError(f"speculative must be None, a SpeculativeConfig or a dict with keys draft_speedup, "
                         f"num_draft_tokens, got {spec!r}")
    known = {f.name for f in fields(SpeculativeConfig)}
    unknown = sorted(set(spec) - known)
    if unknown:
        raise ValueError(f"speculative has unknown keys {unknown}; allowed: {sorted(known)}")
    return SpeculativeConfig(**spec)


def _key(s: float) -> str:
    return f"{s:g}"


def trained_speedups(section: dict | None) -> list[float]:
    """The speedups a checkpoint's ulskip section says it was fine-tuned for ([] without a section)."""
    section = section or {}
    if section.get("target_speedups"):
        return [float(s) for s in section["target_speedups"]]
    if section.get("target_speedup") is not None:
        return [float(section["target_speedup"])]
    return []


def draft_layers(num_layers: int, spec: SpeculativeConfig, section: dict | None) -> list[int]:
    """The draft's layers: the schedule the checkpoint was fine-tuned for at draft_speedup (one of a
    several-speedups fine-tune's, or a one-speedup fine-tune's kept layers), else the ULS rule. Warns when
    the checkpoint was not trained to skip at that speedup."""
    s = spec.draft_speedup
    layers = trained_schedule(section, s, num_layers)
    if layers is None:
        try:
            layers = uls_schedule(num_layers, s)
        except ValueError:
            raise ValueError(f"draft_speedup must be in (1, {num_layers / 2:g}] for {num_layers} layers (the draft "
                             f"keeps at least two), got {s:g}") from None
    trained = trained_speedups(section)
    if not any(math.isclose(s, t) for t in trained):
        why = (f"it was fine-tuned for speedups {[_key(t) for t in trained]}" if trained else
               "it was not fine-tuned for layer skipping (its config.json has no ulskip section)")
        warnings.warn(f"speculative draft_speedup={_key(s)}: {why}, so the draft will agree with the full model "
                      f"rarely and speculation may be slower than plain decoding; fine-tune with "
                      f"`ulskip train --target-speedups 1,{_key(s)}`", stacklevel=5)
    return layers


def _round(engine, last, pos, k, draft, gen, rng, sampling, graphs=True):
    """One draft + verify round -> (tokens [B, k + 1], n [B]): each row's new tokens are tokens[:, :n + 1].
    graphs=False runs the steps eagerly (inside the capture of a whole round)."""
    tok, drafts, qs = last, [], []
    for i in range(k):
        logits = engine.decode(tok, pos + i, graphs=graphs, layers=draft)
        if sampling:
            q = probabilities(logits, gen.temperature, gen.top_k, gen.top_p)
            tok = draw(q, rng)
            qs.append(q)
        else:
            tok = torch.argmax(logits, dim=-1)
        drafts.append(tok)
    d = torch.stack(drafts, dim=1)                                      # [B, k]
    logits = engine.verify(torch.cat([last[:, None], d], dim=1), pos, graphs=graphs)  # [B, k + 1, V]
    if not sampling:
        y = torch.argmax(logits, dim=-1)
        # drafts kept up to the first disagreement; y[:, n] is the full model's token after them
        return y, (d == y[:, :k]).long().cumprod(dim=1).sum(dim=1)
    B, T, V = logits.shape
    p = probabilities(logits.reshape(B * T, V), gen.temperature, gen.top_k, gen.top_p).view(B, T, V)
    q = torch.stack(qs, dim=1)                                          # [B, k, V]
    pd = p[:, :k].gather(2, d.unsqueeze(-1)).squeeze(-1)
    qd = q.gather(2, d.unsqueeze(-1)).squeeze(-1)                       # > 0: d was drawn from q
    u = torch.rand(B, k, device=p.device, generator=rng)
    n = (u * qd < pd).long().cumprod(dim=1).sum(dim=1)                  # keep with probability min(1, p / q)
    rows = torch.arange(B, device=p.device)
    pn = p[rows, n]
    qn = torch.cat([q, torch.zeros_like(q[:, :1])], dim=1)[rows, n]    # q = 0 after the last draft: draw p
    residual = (pn - qn).clamp_min(0)
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, pn)  # p == q up to rounding
    x = draw(residual, rng)
    out = torch.cat([d, x[:, None]], dim=1)
    out[rows, n] = x
    return out, n


class _LateFlag:
    """done.all() read one round late: the copy is queued behind the round, and the host waits only for
    the round before it, which the GPU has finished (or nearly) by the time the next one is queued."""

    def __init__(self, device):
        self.cuda, self.pending = device.type == "cuda", None

    def push(self, done: torch.Tensor) -> bool:
        """Queue this round's flag; True once an earlier round's flag says every row is finished."""
        if not self.cuda:
            return bool(done.all())
        prev, self.pending = self.pending, HostCopy(done.all().view(1))
        return prev is not None and bool(prev.values()[0])


class _Rows:
    """The device state of a batch decoding speculatively: each row's newest token (not yet in the cache),
    its position, how many tokens it has, whether it is finished; and the running statistics. Updated in
    place, so that on a GPU a greedy round is one CUDA graph (_round_graph) over the same tensors."""

    def __init__(self, engine, logits, lengths, gen, spec: SpeculativeConfig, draft):
        self.engine, self.gen, self.k, self.draft = engine, gen, spec.num_draft_tokens, tuple(draft)
        self.spec = spec
        dev = logits.device
        B = logits.shape[0]
        self.sampling = gen.do_sample and gen.top_k != 1
        self.rng = engine._rng(gen)
        self.first = torch.argmax(logits, dim=-1) if not self.sampling else \
            draw(probabilities(logits, gen.temperature, gen.top_k, gen.top_p), self.rng)
        graphs = engine.graphs is not None and not self.sampling
        key = (B, self.k, self.draft, len(gen.eos_ids))
        # a round graph reads and writes the same state tensors on every replay: one set per shape, reused
        st = engine._spec_rounds.get(key) if graphs else None
        if st is None:
            st = {"last": torch.zeros(B, dtype=torch.long, device=dev), "pos": torch.zeros(B, dtype=torch.long, device=dev),
                  "count": torch.zeros(B, dtype=torch.long, device=dev), "done": torch.zeros(B, dtype=torch.bool, device=dev),
                  "eos": torch.zeros(len(gen.eos_ids), dtype=torch.long, device=dev),
                  "max_new": torch.zeros((), dtype=torch.long, device=dev),
                  "accepted": torch.zeros((), dtype=torch.long, device=dev),
                  "row_rounds": torch.zeros((), dtype=torch.long, device=dev),
                  "ar": torch.arange(self.k + 1, device=dev), "graph": None}
            if graphs:
                engine._spec_rounds[key] = st
        self.st = st
        self.last, self.pos, self.count, self.done = st["last"], st["pos"], st["count"], st["done"]
        self.eos, self.max_new = st["eos"], st["max_new"]
        self.accepted, self.row_rounds = st["accepted"], st["row_rounds"]
        self.eos.copy_(torch.tensor(gen.eos_ids, dtype=torch.long))
        self.max_new.fill_(gen.max_new_tokens)
        self.accepted.zero_()
        self.row_rounds.zero_()
        self.count.fill_(1)
        self.done.copy_(self.count >= self.max_new)
        if len(gen.eos_ids):
            self.done |= (self.first[:, None] == self.eos).any(-1)
        self.last.copy_(self.first)
        self.pos.copy_(lengths)
        self.ar = st["ar"]
        self.rounds = 0
        self.graphs = graphs

    def _advance(self, graphs: bool = True):
        """The round's device work, in place on the state -> (tokens [B, k + 1], n [B], live [B])."""
        tokens, n = _round(self.engine, self.last, self.pos, self.k, self.draft, self.gen, self.rng, self.sampling,
                           graphs)
        live = ~self.done
        gained = torch.where(live, n + 1, 0)
        self.accepted += torch.where(live, n, 0).sum()
        self.row_rounds += live.sum()
        self.count += gained
        if self.eos.numel():
            # not torch.isin: with many EOS ids it sorts through unique(), a host sync a capture refuses
            hit = (tokens[..., None] == self.eos).any(-1)
            self.done |= (hit & (self.ar <= n[:, None])).any(dim=1) & live
        self.done |= self.count >= self.max_new
        self.pos += torch.where(self.done, 0, gained)     # a finished row's position stays inside the cache
        self.last.copy_(tokens.gather(1, n[:, None]).squeeze(1))
        return tokens, n, live

    def round(self):
        """One draft + verify round for every row -> (tokens [B, k + 1], n [B], live [B]): a row that was live
        gained tokens[:, :n + 1]. A finished row keeps running (one static program) with its state frozen.
        On a GPU (greedy) the whole round replays one CUDA graph: its k draft steps, verify pass and
        acceptance ops would otherwise be k + 1 graph replays and ~25 small kernels launched from Python,
        ~0.7 ms of host time per ~2.4 ms round for SmolLM2-135M on the H200 (bench/RESULTS.md)."""
        self.rounds += 1
        if not self.graphs:
            return self._advance()
        if self.st["graph"] is None:
            self.st["graph"] = _capture_round(self)
        graph, out = self.st["graph"]
        graph.replay()
        return out


    def stats(self) -> dict:
        acc, rr, k = int(self.accepted), int(self.row_rounds), self.k
        return {"draft_speedup": self.spec.draft_speedup, "num_draft_tokens": k, "draft_layers": list(self.draft),
                "rounds": self.rounds, "row_rounds": rr, "accepted_drafts": acc,
                "acceptance_rate": acc / (k * rr) if rr else None,
                "tokens_per_verify": (acc + rr) / rr if rr else None}


def _capture_round(rows: _Rows):
    """Capture rows' round as a graph. The warm-up runs really run a round (Triton compiles, cuBLAS picks),
    so the state is put back after each; their K/V writes are at the positions the real round writes next."""
    state = [rows.last, rows.pos, rows.count, rows.done, rows.accepted, rows.row_rounds]
    saved = [t.clone() for t in state]
    stream = torch.cuda.Stream(rows.last.device)
    stream.wait_stream(torch.cuda.current_stream(rows.last.device))
    with torch.cuda.stream(stream):
        for _ in range(2):
            rows._advance(graphs=False)
            for t, v in zip(state, saved):
                t.copy_(v)
    torch.cuda.current_stream(rows.last.device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    if rows.engine._spec_pool is None:  # one pool for the engine's round graphs: they replay one at a time
        rows.engine._spec_pool = torch.cuda.graph_pool_handle()
    collecting = gc.isenabled()
    gc.disable()  # see graphs._capture
    try:
        with torch.cuda.device(rows.last.device), torch.cuda.graph(graph, pool=rows.engine._spec_pool):
            out = rows._advance(graphs=False)
    finally:
        if collecting:
            gc.enable()
    return graph, out


def speculative_decode(engine, logits, lengths, gen, spec: SpeculativeConfig, draft: list[int]):
    """The decode loop after the prompt pass (logits of each prompt's last token) -> (new tokens per row, cut
    at max_new_tokens and after the first EOS; statistics). Everything stays on the device but the lagged
    "all finished" flag."""
    rows = _Rows(engine, logits, lengths, gen, spec, draft)
    B, k, max_new = logits.shape[0], rows.k, gen.max_new_tokens
    # a row writes its round's k + 1 tokens at count..count + k, past its end by up to k when it finishes
    out = torch.zeros(B, max_new + 2 * (k + 1), dtype=torch.long, device=logits.device)
    out[:, 0] = rows.first
    flag = _LateFlag(logits.device)
    for _ in range(max_new - 1):                # every live row gains >= 1 token per round
        if flag.push(rows.done):
            break
        at = rows.count[:, None] + rows.ar
        tokens, _, _ = rows.round()
        out.scatter_(1, at, tokens)
    seqs = []
    for row, c in zip(out.tolist(), rows.count.tolist()):
        row = row[:min(c, max_new)]
        cut = next((i + 1 for i, t in enumerate(row) if t in gen.eos_ids), len(row))
        seqs.append(row[:cut])
    return seqs, rows.stats()


def speculative_stream(engine, logits, lengths, gen, spec: SpeculativeConfig, draft: list[int], stops):
    """speculative_decode as it happens: per round, the new tokens of each live row as (row, token_id, piece,
    finish_reason) with the streaming loop's semantics (Engine._host_loop: EOS, stop strings, length). One
    host sync per round; a row a stop string ends is marked finished on the device too."""
    rows = _Rows(engine, logits, lengths, gen, spec, draft)
    B = logits.shape[0]
    ends = SequenceEnds(B, engine.tokenizer, gen.eos_ids, stops, gen.max_new_tokens)
    done = ends.done
    for r, t in enumerate(rows.first.tolist()):
        yield (r, t, *ends.push(r, t))
    while not all(done):
        stopped = [r for r in range(B) if done[r]]
        if stopped:  # ended on the host (a stop string): freeze it on the device too
            rows.done[torch.tensor(stopped, device=rows.done.device)] = True
        tokens, n, _ = rows.round()
        for r, (ts, nr) in enumerate(zip(tokens.tolist(), n.tolist())):
            for t in ts[:nr + 1]:
                if done[r]:
                    break
                yield (r, t, *ends.push(r, t))
