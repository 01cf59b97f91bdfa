"""`ulskip eval`'s work: records in, hypotheses decoded by the engine, BLEU / chrF / perplexity out.

A record is {"prefix", "text"} (+ "reference", the raw target text for BLEU, as `ulskip data gettext`
writes it; "text" otherwise). Token ids are made exactly as `ulskip train` makes them
(ulskip/train/data.py: the prefix with the tokenizer's special tokens, the text without, then EOS), so the
prompt the engine sees is the prefix the model was fine-tuned on.

Perplexity is teacher-forced through the engine itself: the prompt pass over the prefix (all layers with
prefill="full"), then one decode step per reference token through the kept layers, each reading the K/V
the earlier steps wrote. That is the ULS semantics exactly, the same computation as generation, and what
`ulskip train` optimizes (its loss on the same record is this NLL).
"""
from __future__ import annotations

import math
import time

import torch

from ulskip.train.data import DataError, encode, iter_records


def read_records(files: list[str], limit: int | None = None) -> list[dict]:
    """The records of the files, checked ({prefix, text} strings; a 'reference' must be a string too)."""
    out = []
    for path in files:
        for where, rec in iter_records(path):
            if "reference" in rec and not isinstance(rec["reference"], str):
                raise DataError(f"{where}: field 'reference' must be a string, got {type(rec['reference']).__name__}")
            out.append({**rec, "_where": where})
            if limit is not None and len(out) == limit:
                return out
    if not out:
        raise DataError(f"no evaluation records in {', '.join(files)}")
    return out


def tokenize(tokenizer, records: list[dict]) -> list[dict]:
    """prompt / response token ids of each record, as training builds them (response ends with EOS)."""
    out = []
    for rec in records:
        ex = encode(tokenizer, rec, 1 << 30, rec["_where"])
        p = ex["prefix_length"]
        out.append({"prompt": ex["input_ids"][:p], "response": ex["input_ids"][p:]})
    return out


def corpus_scores(hypotheses: list[str], references: list[str]) -> dict:
    """BLEU and chrF of the corpus (sacrebleu's defaults: 13a tokenization, chrF with char order 6)."""
    from sacrebleu.metrics import BLEU, CHRF

    bleu, chrf = BLEU(), CHRF()
    return {"bleu": bleu.corpus_score(hypotheses, [references]).score,
            "chrf": chrf.corpus_score(hypotheses, [references]).score,
            "bleu_signature": str(bleu.get_signature()), "chrf_signature": str(chrf.get_signature())}


@torch.inference_mode()
def response_nll(engine, batch: list[dict]) -> tuple[float, int]:
    """Summed NLL (nats) of the response tokens of a batch and their count, teacher-forced through the
    engine (module docstring)."""
    dev = engine.device
    P = max(len(ex["prompt"]) for ex in batch)
    R = max(len(ex["response"]) for ex in batch)
    tokens = torch.tensor([ex["prompt"] + [0] * (P - len(ex["prompt"])) for ex in batch]).to(dev)
    lengths = torch.tensor([len(ex["prompt"]) for ex in batch]).to(dev)
    resp = torch.tensor([ex["response"] + [0] * (R - len(ex["response"])) for ex in batch]).to(dev)
    live = torch.tensor([[t < len(ex["response"]) for t in range(R)] for ex in batch]).to(dev)
    longest = max(len(ex["prompt"]) + len(ex["response"]) for ex in batch)
    if longest > engine.max_seq_len:
        raise ValueError(f"a record of {longest} tokens (prompt + reference) exceeds the engine's "
                         f"max_seq_len={engine.max_seq_len}")
    nll = torch.zeros((), dtype=torch.float64, device=dev)
    logits = engine.prefill(tokens, lengths)
    positions = lengths.clone()
    for t in range(R):
        lp = torch.log_softmax(logits.float(), dim=-1).gather(1, resp[:, t:t + 1])[:, 0]
        nll -= (lp.double() * live[:, t]).sum()
        if t + 1 < R:
            # rows whose reference ended decode padding; their position is held inside the cache (their own
            # row, never read again), since the GPU cache write does not range-check (no host sync)
            logits = engine.decode(resp[:, t], positions.clamp(max=engine.max_seq_len - 1),
                                   layers=engine.step_layers(t))
            positions += 1
    return float(nll), int(live.sum())


def evaluate(engine, records: list[dict], batch_size: int = 16, max_new_tokens: int = 64, num_beams: int = 1,
             no_repeat_ngram_size: int = 0, repetition_penalty: float = 1.0, perplexity: bool = True,
             progress: bool = False) -> dict:
    """Decode every record's prefix with the engine (greedy or beam search), score against the
    references, and (perplexity=True) the perplexity of the references. Returns metrics and hypotheses."""
    from tqdm import tqdm

    tok = engine.tokenizer
    if tok is None:
        raise ValueError("evaluation needs the checkpoint's tokenizer (none found in the folder)")
    exs = tokenize(tok, records)
    eos = engine.eos_token_ids or None
    hyps, new_tokens, gen_s = [], 0, 0.0
    # layers run per decode step, averaged over the steps each returned sequence took (the first generated
    # token comes from the prompt pass): K for a static schedule, the realized mean for SkipDecode, whose depth
    # falls with the response position, so short responses run deeper than its nominal budget
    depth = [len(engine.step_layers(j)) for j in range(max_new_tokens)]
    decode_layers, decode_steps = 0, 0
    nll, count = 0.0, 0
    batches = range(0, len(exs), batch_size)
    for s in tqdm(batches, desc="ulskip eval", unit="batch", disable=not progress, dynamic_ncols=True):
        batch = exs[s:s + batch_size]
        if engine.device.type == "cuda":
            torch.cuda.synchronize(engine.device)
        t0 = time.perf_counter()
        out = engine.generate([ex["prompt"] for ex in batch], max_new_tokens=max_new_tokens, num_beams=num_beams,
                              eos_token_id=eos, no_repeat_ngram_size=no_repeat_ngram_size,
                              repetition_penalty=repetition_penalty)
        if engine.device.type == "cuda":
            torch.cuda.synchronize(engine.device)
        gen_s += time.perf_counter() - t0
        new_tokens += sum(len(q) for q in out.sequences)
        for q in out.sequences:
            decode_layers += sum(depth[:max(len(q) - 1, 0)])
            decode_steps += max(len(q) - 1, 0)
        hyps += [tok.decode(q, skip_special_tokens=True).strip() for q in out.sequences]
        if perplexity:
            n, c = response_nll(engine, batch)
            nll, count = nll + n, count + c
    refs = [r.get("reference", r["text"]).strip() for r in records]
    result = corpus_scores(hyps, refs)
    result.update({"records": len(records), "new_tokens": new_tokens, "generate_s": gen_s,
                   "tokens_per_s": new_tokens / gen_s if gen_s > 0 else None,
                   "decode_layers_per_step": decode_layers / decode_steps if decode_steps else None,
                   "perplexity": math.exp(nll / count) if perplexity else None,
                   "nll_per_token": nll / count if perplexity else None, "reference_tokens": count if perplexity else None,
                   "hypotheses": hyps})
    return result
