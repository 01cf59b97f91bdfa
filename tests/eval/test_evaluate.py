"""`ulskip eval` and `ulskip calibrate` on the CPU: metrics equal sacrebleu's, the teacher-forced perplexity
equals a direct computation (transformers at 1x; the ULS training forward with skipping), Block Influence
equals one computed from hidden states, and bad input gets one clear line."""
import json
import math

import pytest
import sacrebleu
import torch
from transformers import AutoModelForCausalLM

from helpers import make_checkpoint, make_tokenizer, records, write_jsonl
from ulskip import Engine
from ulskip.calibration import block_influence, read_block_influence
from ulskip.cli import main
from ulskip.eval.evaluate import corpus_scores, read_records, response_nll, tokenize
from ulskip.train import apply_uls


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt"), "llama", num_layers=4, seed=3)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    recs = [{**r, "reference": r["text"]} for r in records()]
    return write_jsonl(tmp_path_factory.mktemp("data") / "test.jsonl", recs)


def test_corpus_scores_equal_sacrebleu():
    hyps = ["the cat sat on the mat", "a dog says woof", "nothing in common here"]
    refs = ["the cat sat on the mat", "a dog says meow", "completely different words"]
    got = corpus_scores(hyps, refs)
    assert got["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
    assert got["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score)
    assert corpus_scores(refs, refs)["bleu"] == pytest.approx(100.0)
    assert 0 < got["bleu"] < 100 and "13a" in got["bleu_signature"]


def _direct_nll(model, exs):
    """Sum and count of -log p(response token) from one full-sequence forward per record."""
    total, count = 0.0, 0
    for ex in exs:
        ids = torch.tensor([ex["prompt"] + ex["response"]])
        labels = torch.full_like(ids, -100)
        labels[0, len(ex["prompt"]):] = ids[0, len(ex["prompt"]):]
        with torch.no_grad():
            loss = model(input_ids=ids, labels=labels).loss
        n = len(ex["response"])
        total, count = total + float(loss) * n, count + n
    return total, count


@pytest.mark.parametrize("speedup,prefill", [(1, "full"), (2, "full"), (2, "skip")])
def test_perplexity_equals_the_direct_computation(ckpt, speedup, prefill):
    """Teacher forcing through the engine (a batch of mixed prompt and response lengths) == the NLL a
    transformers forward gives: the plain model at 1x, the model under apply_uls (what training
    optimizes) with skipping."""
    tok = make_tokenizer()
    exs = tokenize(tok, [{**r, "_where": "x"} for r in records()[:6]])
    assert len({len(e["prompt"]) for e in exs}) > 1 and len({len(e["response"]) for e in exs}) > 1
    eng = Engine.from_pretrained(ckpt, target_speedup=speedup, prefill=prefill, max_batch_size=6, max_seq_len=64)
    nll, count = response_nll(eng, exs)
    hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    if speedup > 1:
        apply_uls(hf, target_speedup=speedup, prefill=prefill)
    want, want_count = _direct_nll(hf, exs)
    assert count == want_count and nll == pytest.approx(want, rel=1e-4)
    if speedup > 1:  # and skipping mattered
        assert abs(nll - _direct_nll(AutoModelForCausalLM.from_pretrained(ckpt).eval(), exs)[0]) > 1e-3


def test_eval_cli_end_to_end(ckpt, data, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["eval", ckpt, "--data", data, "--target-speedup", "2", "--batch-size", "4", "--max-new-tokens", "8",
                 "--no-progress", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "BLEU" in printed and "chrF" in printed and "2/4" in printed
    r = json.loads(out.read_text())
    refs = [x["text"] for x in records()]
    assert len(r["hypotheses"]) == r["records"] == len(refs)
    assert r["bleu"] == pytest.approx(sacrebleu.corpus_bleu(r["hypotheses"], [refs]).score)
    assert r["settings"]["kept_layers"] == [0, 3] and r["perplexity"] > 1 and math.isfinite(r["perplexity"])
    assert r["tokens_per_s"] > 0 and r["new_tokens"] > 0
    assert r["decode_layers_per_step"] == 2 and r["settings"]["skipdecode"] is None  # a static schedule: K
    # the paper's decode settings and a baseline policy run too
    assert main(["eval", ckpt, "--data", data, "--target-speedup", "2", "--strategy", "early-exit", "--limit", "4",
                 "--paper-decode", "--no-perplexity", "--no-progress", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["settings"]["kept_layers"] == [0, 1] and r["settings"]["num_beams"] == 4 and r["perplexity"] is None


@pytest.mark.parametrize("make,match", [
    (lambda d: (d / "e.jsonl").write_text(""), "empty file"),
    (lambda d: (d / "e.jsonl").write_text('{"prefix": "a"}\n'), "missing field 'text'"),
    (lambda d: (d / "e.jsonl").write_text("not json\n"), "not valid JSON"),
    (lambda d: (d / "e.jsonl").write_text('{"prefix": "a", "text": "b", "reference": 3}\n'), "'reference' must be a string"),
])
def test_eval_bad_data(ckpt, tmp_path, make, match):
    make(tmp_path)
    with pytest.raises(SystemExit, match=f"ulskip eval: .*{match}"):
        main(["eval", ckpt, "--data", str(tmp_path / "e.jsonl"), "--no-progress"])


def test_eval_bad_arguments(ckpt, data, tmp_path):
    for argv, match in ((["--batch-size", "0"], "--batch-size must be >= 1"),
                        (["--limit", "0"], "--limit must be >= 1"),
                        (["--json", str(tmp_path / "no" / "r.json")], "does not exist"),
                        (["--target-speedup", "9"], "target_speedup must be in"),
                        (["--target-speedup", "2", "--strategy", "shortgpt"], "needs block_influence")):
        with pytest.raises(SystemExit, match=f"ulskip eval: .*{match}"):
            main(["eval", ckpt, "--data", data, "--no-progress", *argv])
    bare = tmp_path / "bare"
    AutoModelForCausalLM.from_pretrained(ckpt).save_pretrained(bare)  # no tokenizer
    with pytest.raises(SystemExit, match="ulskip eval: .*holds no tokenizer"):
        main(["eval", str(bare), "--data", data, "--no-progress"])
    with pytest.raises(SystemExit):  # argparse: not a strategy
        main(["eval", ckpt, "--data", data, "--strategy", "fastest"])


def test_block_influence_equals_hidden_states(ckpt):
    """BI_i = 1 - mean cos(input of layer i, its output) over non-pad tokens; from transformers' hidden
    states for every layer but the last (whose output transformers reports after the final norm)."""
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 5, 9, 12, 7, 3], [1, 4, 4, 8, 0, 0]])
    am = torch.tensor([[1] * 6, [1, 1, 1, 1, 0, 0]])
    bi = block_influence(model, ids, am, batch_size=1)
    with torch.no_grad():
        hs = model(input_ids=ids, attention_mask=am, output_hidden_states=True).hidden_states
    m = am.double()
    for i in range(len(bi) - 1):
        cos = torch.nn.functional.cosine_similarity(hs[i].double(), hs[i + 1].double(), dim=-1)
        assert bi[i] == pytest.approx(1 - float((cos * m).sum() / m.sum()), abs=1e-6)  # fp32 forwards
    assert len(bi) == 4 and all(0 <= x <= 2 for x in bi)


def test_calibrate_cli_and_shortgpt(ckpt, data, tmp_path, capsys):
    out = tmp_path / "bi.json"
    assert main(["calibrate", ckpt, "--data", data, "--out", str(out), "--num-records", "8", "--device", "cpu"]) == 0
    bi = read_block_influence(str(out), 4)
    want = sorted(sorted(range(4), key=lambda i: (-bi[i], i))[:2])
    eng = Engine.from_pretrained(ckpt, target_speedup=2, strategy="shortgpt", block_influence=bi, max_seq_len=32)
    assert eng.kept_layers == want
    with pytest.raises(SystemExit, match="exists; pass --overwrite"):
        main(["calibrate", ckpt, "--data", data, "--out", str(out)])
    bad = tmp_path / "bad.json"
    bad.write_text('{"block_influence": [1, 2]}')
    with pytest.raises(ValueError, match="was not written by `ulskip calibrate`"):
        read_block_influence(str(bad))
    with pytest.raises(ValueError, match="scores 4 layers, the model has 6"):
        read_block_influence(str(out), 6)


def test_perplexity_of_a_batch_whose_rows_end_at_different_places(ckpt):
    """A long prompt with a short reference beside a short prompt with a long one, in an engine sized for
    each record alone: finished rows must not decode past the cache (the GPU cache write does not check),
    and each row's NLL equals the row alone."""
    tok = make_tokenizer()
    recs = [{"prefix": " ".join(["what color is the sky ?"] * 4), "text": "blue", "_where": "a"},
            {"prefix": "is", "text": " ".join(["the sky is blue ."] * 4), "_where": "b"}]
    exs = tokenize(tok, recs)
    longest = max(len(e["prompt"]) + len(e["response"]) for e in exs)
    assert max(len(e["prompt"]) for e in exs) + max(len(e["response"]) for e in exs) > longest
    eng = Engine.from_pretrained(ckpt, target_speedup=2, max_batch_size=2, max_seq_len=longest)
    both, n = response_nll(eng, exs)
    alone = [response_nll(eng, [e]) for e in exs]
    assert n == sum(c for _, c in alone) and both == pytest.approx(sum(x for x, _ in alone), rel=1e-5)
    short = Engine.from_pretrained(ckpt, target_speedup=2, max_batch_size=2, max_seq_len=longest - 1)
    with pytest.raises(ValueError, match=f"a record of {longest} tokens .* exceeds the engine's max_seq_len"):
        response_nll(short, exs)


def test_skipdecode_eval_reports_the_layers_its_steps_ran(ckpt, data, tmp_path):
    """SkipDecode's depth falls with the response position, so its realized layers per decode step depend on
    the lengths generated: eval reports that mean (recomputed here from the hypotheses' lengths)."""
    from ulskip.schedule import skipdecode
    out = tmp_path / "sd.json"
    assert main(["eval", ckpt, "--data", data, "--target-speedup", "2", "--strategy", "skipdecode", "--batch-size",
                 "4", "--max-new-tokens", "8", "--no-perplexity", "--no-progress", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    sd = skipdecode(4, 2)
    assert r["settings"]["skipdecode"] == sd.as_dict()
    eng = Engine.from_pretrained(ckpt, target_speedup=2, strategy="skipdecode", max_batch_size=4, max_seq_len=64)
    exs = tokenize(eng.tokenizer, read_records([data]))
    lengths = [len(q) for i in range(0, len(exs), 4)
               for q in eng.generate([e["prompt"] for e in exs[i:i + 4]], max_new_tokens=8,
                                     eos_token_id=eng.eos_token_ids or None).sequences]
    want = sum(sd.depth(j) for n in lengths for j in range(n - 1)) / sum(n - 1 for n in lengths)
    assert r["decode_layers_per_step"] == pytest.approx(want)
    assert sd.min_depth <= r["decode_layers_per_step"] <= sd.max_depth
