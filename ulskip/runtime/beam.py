"""Beam search over the compact cache, step for step the algorithm of transformers' `_beam_search`
(default length_penalty=1.0, early_stopping=False), so results match Hugging Face's generate().

Shapes: N prompts, nb beams, V vocab, k = max(2, 1 + #eos) * nb candidates kept per step.
Only the kept layers' cache rows are reordered when beams swap, since only they are stored.
"""
from __future__ import annotations

import torch

from ulskip.runtime.penalties import apply_penalties_

NEG = -1.0e9


def _gather(t, idx):  # t [N, m, ...], idx [N, j] -> [N, j, ...]
    return t.gather(1, idx.view(*idx.shape, *([1] * (t.dim() - 2))).expand(*idx.shape, *t.shape[2:]))


@torch.inference_mode()
def beam_search(engine, logits, lengths, gen, history=None):
    """Beam search from the prompt pass's logits [N, V] (one row per prompt) with gen.num_beams beams
    per prompt; runs engine.decode steps. history: the prompts' TokenHistory when gen has a repetition
    penalty or no-repeat n-grams (applied to the log-probabilities, as transformers does in beam search).
    Returns (sequences per prompt, per-step scores or None)."""
    nb, max_new, eos = gen.num_beams, gen.max_new_tokens, gen.eos_ids
    length_penalty, output_scores = gen.length_penalty, gen.output_scores
    N, V = logits.shape
    dev = logits.device
    max_len = int(lengths.max())
    rows = torch.arange(N, device=dev).repeat_interleave(nb)
    engine.cache.reorder_(rows, max_len)                # every beam starts from its prompt's cache
    logits, positions = logits[rows], lengths[rows].clone()
    if history is not None:
        history.reorder(rows)
    eos_t = torch.tensor(eos, device=dev, dtype=torch.long)
    k = max(2, 1 + len(eos)) * nb
    top_mask = torch.arange(k, device=dev) < nb
    offset = torch.arange(N, device=dev).view(N, 1) * nb

    running = torch.full((N, nb, max_new), -1, dtype=torch.long, device=dev)
    running_scores = torch.zeros(N, nb, device=dev)
    running_scores[:, 1:] = NEG                         # only the first beam is live at the start
    done = running.clone()
    done_scores = torch.full((N, nb), NEG, device=dev)
    done_flag = torch.zeros(N, nb, dtype=torch.bool, device=dev)
    improvable = torch.ones(N, 1, dtype=torch.bool, device=dev)
    scores = [] if output_scores else None

    for t in range(max_new):
        if output_scores:
            scores.append(logits.clone())
        logp = torch.log_softmax(logits.float(), dim=-1)
        if history is not None:
            apply_penalties_(logp, history, gen.repetition_penalty, gen.no_repeat_ngram_size)
        logp = logp.view(N, nb, V) + running_scores.unsqueeze(-1)
        top_lp, top_idx = torch.topk(logp.view(N, nb * V), k)
        src, tok = top_idx // V, top_idx % V
        cand = _gather(running, src)
        cand[:, :, t] = tok
        cand_rows = src + offset
        hits = torch.isin(tok, eos_t) | (t + 1 == max_new)  # EOS or max length

        # the best nb candidates that did not stop keep running
        run_lp = top_lp + hits.float() * NEG
        keep = torch.topk(run_lp, nb).indices
        running, running_scores, running_rows = _gather(cand, keep), _gather(run_lp, keep), _gather(cand_rows, keep)

        # stopped candidates among the top nb join the finished set if they beat it
        just_done = hits & top_mask
        fin = top_lp / ((t + 1) ** length_penalty) + (~improvable).float() * NEG + (~just_done).float() * NEG
        merged_scores = torch.cat((done_scores, fin), 1)
        best = torch.topk(merged_scores, nb).indices
        done = _gather(torch.cat((done, cand), 1), best)
        done_scores = _gather(merged_scores, best)
        done_flag = _gather(torch.cat((done_flag, just_done), 1), best)

        best_possible = running_scores[:, :1] / ((t + 1) ** length_penalty)
        worst_done = torch.where(done_flag, done_scores.min(1, keepdim=True).values, torch.full_like(done_scores, NEG))
        improvable = improvable & (best_possible > worst_done).any(-1, keepdim=True)
        if t == max_new - 1 or not bool(improvable.any()) or bool(hits.all()):
            break
        engine.cache.reorder_(running_rows.flatten(), max_len + t)  # positions written so far
        if history is not None:
            history.reorder(running_rows.flatten())
            history.append(running[:, :, t].flatten())
        logits = engine.decode(running[:, :, t].flatten(), positions, layers=engine.step_layers(t))
        positions += 1

    seqs = []
    for r in done[:, 0].tolist():
        out = []
        for tok in r:
            if tok < 0:
                break
            out.append(tok)
            if tok in eos:
                break
        seqs.append(out)
    return seqs, scores
