"""`ulskip bench` on the CPU: smoke run, input checks, roofline arithmetic, failed baselines, HF copies.

No timed assertions (docs/design.md, "Tests"): speed lives in bench/RESULTS.md.
"""
import json

import pytest
import torch

from ulskip import Engine
from ulskip.bench import models as bm
from ulskip.bench import sweep
from ulskip.cli import bench
from ulskip.cli import main


@pytest.fixture(autouse=True)
def _one_thread():
    # the tiny shapes gain nothing from intra-op threads, and on a busy 2-core runner spinning threads
    # make them several times slower; restore the setting for the other test files
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_cpu_smoke_json_and_plot(tmp_path, capsys):
    out, png = tmp_path / "out.json", tmp_path / "out.png"
    rc = main(["bench", "--model", "tiny-llama", "--batch-sizes", "1,2", "--target-speedups", "1,2",
               "--prompt-len", "8", "--new-tokens", "4", "--json", str(out), "--plot", str(png)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "tok/s" in printed and "hf-compile-skip" in printed
    data = json.loads(out.read_text())
    meta, rows = data["meta"], data["rows"]
    assert meta["model"] == "tiny-llama" and meta["device_type"] == "cpu"
    assert meta["bandwidth"]["GBps"] > 0 and "memcpy" in meta["bandwidth"]["method"].lower()
    for k in ("torch", "triton", "transformers", "ulskip"):
        assert k in meta["versions"]
    assert meta["command"].startswith("ulskip bench --model tiny-llama") and meta["date"]
    got = {(r["system"], r["target_speedup"], r["batch_size"]) for r in rows}
    want = {("hf-eager-full", 1.0, b) for b in (1, 2)}
    want |= {(s, t, b) for s in ("ulskip", "hf-eager-skip", "hf-compile-skip") for t in (1.0, 2.0) for b in (1, 2)}
    assert got == want and len(rows) == len(want)
    for r in rows:
        assert r["status"] == "ok", r
        assert r["tokens_per_s"] > 0 and r["prefill_ms"] > 0 and r["kv_cache_bytes"] > 0
        for k in ("decode_ms_per_step", "achieved_GBps", "pct_roofline", "roofline_tokens_per_s",
                  "speedup_vs_1x", "bytes_per_step", "kv_bytes_per_step"):
            assert k in r
    by = {(r["system"], r["target_speedup"], r["batch_size"]): r for r in rows}
    assert by[("hf-eager-skip", 2.0, 1)]["kept_layers"] == [0, 2, 4, 7]     # uls_schedule(8, 2)
    assert by[("hf-eager-skip", 1.0, 1)]["speedup_vs_1x"] == pytest.approx(1.0)
    assert by[("hf-eager-full", 1.0, 2)]["num_kept"] == 8
    # HF keeps exactly the kept layers' cache: 4 layers x K,V x batch 2 x 2 kv heads x 64 x 11 tokens x 4 B
    assert by[("hf-eager-skip", 2.0, 2)]["kv_cache_bytes"] == 4 * 2 * 2 * 2 * 64 * 11 * 4
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("argv, msg", [
    (["--model", "llama-9b"], "known shapes: llama-2-7b, llama-3-8b, mistral-7b, qwen2-7b, bloom-7b1, tiny-llama"),
    (["--batch-sizes", "1,0"], "--batch-sizes must be integers >= 1, got 0"),
    (["--batch-sizes", "-4"], "--batch-sizes must be integers >= 1, got -4"),
    (["--batch-sizes", "two"], "--batch-sizes must be a comma list of integers like 1,16,64, got 'two'"),
    (["--target-speedups", "5"], "tiny-llama (8 layers)"),
    (["--target-speedups", "0.5"], "target_speedup must be in [1, 4]"),
    (["--prompt-len", "1000", "--new-tokens", "100"], "1100 exceeds tiny-llama's maximum of 1024 positions"),
    (["--new-tokens", "0"], "--new-tokens must be >= 1"),
    (["--systems", "ulskip,vllm"], "unknown vllm"),
    (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--repeats", "0"], ""),
])
def test_bad_input_rejected_before_allocation(argv, msg, tmp_path, capsys, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("allocated before validating")
    monkeypatch.setattr(sweep, "build_hf_model", boom)
    monkeypatch.setattr(sweep, "measure_bandwidth", boom)
    out = tmp_path / "o.json"
    base = [] if "--model" in argv else ["--model", "tiny-llama"]
    rc = main(["bench", *base, *argv, "--json", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("ulskip bench: ") and msg in err
    assert not out.exists()


def test_missing_output_folder_rejected(tmp_path, capsys):
    rc = main(["bench", "--model", "tiny-llama", "--json", str(tmp_path / "no" / "o.json")])
    assert rc == 2 and "does not exist" in capsys.readouterr().err


def test_cpu_defaults():
    p = bench.argparse.ArgumentParser()
    bench.add_arguments(p)
    r = bench.resolve_args(p.parse_args(["--device", "cpu"]))
    assert r["model"] == "tiny-llama" and r["batches"] == [1, 4] and r["speedups"] == [1.0, 2.0, 4.0]
    assert r["dtype"] == torch.float32 and r["repeats"] == 1


def test_roofline_arithmetic_hand_computed():
    from transformers import AutoModelForCausalLM, LlamaConfig
    cfg = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    c = bm.byte_counts(hf, torch.float32)
    # per layer: q 64x64 + k,v 64x32 each (2 kv heads x head_dim 16) + o 64x64 + gate,up,down 64x128 each
    # + two RMSNorm weights of 64 = 36992 parameters x 4 bytes
    assert c.layer_bytes == [36992 * 4] * 4
    assert c.head_bytes == 100 * 64 * 4 and c.other_bytes == 64 * 4      # LM head, final norm
    assert c.kv_token_layer_bytes == 2 * 2 * 16 * 4                       # K+V x 2 heads x 16 x fp32
    # kept layers 0 and 3, batch 2, prompt 10, 4 new tokens: mean decode context 10 + 4/2 = 12
    step = bm.decode_step_bytes(c, [0, 3], batch=2, prompt_len=10, new_tokens=4)
    assert step["weight_bytes"] == 2 * 147968 + 25600 + 256 == 321792
    assert step["kv_bytes"] == 2 * 2 * 256 * 12 == 12288
    assert step["bytes"] == 334080
    roof = bm.roofline(step["bytes"], 1e9, batch=2, decode_step_s=2 * 334080e-9)
    assert roof["roofline_step_ms"] == pytest.approx(0.33408)
    assert roof["roofline_tokens_per_s"] == pytest.approx(2 / 334080e-9)
    assert roof["achieved_GBps"] == pytest.approx(0.5) and roof["pct_roofline"] == pytest.approx(50.0)
    # tied embeddings (BLOOM): the LM head is the embedding matrix, counted once
    tb = bm.byte_counts(bm.build_hf_model("tiny-bloom", torch.device("cpu"), torch.float32), torch.float32)
    assert tb.head_bytes == 2048 * 256 * 4 and tb.other_bytes == 4 * 256 * 4   # ln_f + embedding LayerNorm


def test_failed_baseline_is_reported_and_run_goes_on(tmp_path, capsys, monkeypatch):
    real_bind = sweep.HFSystem.bind

    def bind(self, input_ids):
        if self.static:
            def generate(n):
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
            return generate
        return real_bind(self, input_ids)
    monkeypatch.setattr(sweep.HFSystem, "bind", bind)
    out = tmp_path / "o.json"
    rc = main(["bench", "--model", "tiny-llama", "--systems", "hf-compile-skip,hf-eager-skip",
               "--batch-sizes", "1", "--target-speedups", "1,2", "--prompt-len", "4", "--new-tokens", "3",
               "--threads", "1", "--no-progress", "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    rows = json.loads(out.read_text())["rows"]
    failed = [r for r in rows if r["system"] == "hf-compile-skip"]
    assert len(failed) == 2 and all(r["status"] == "failed" for r in failed)
    assert failed[0]["error"].startswith("OutOfMemoryError: CUDA out of memory")
    assert [r["status"] for r in rows if r["system"] == "hf-eager-skip"] == ["ok", "ok"]
    assert "FAILED OutOfMemoryError" in printed


def test_skip_copy_shares_weights_and_matches_engine():
    dev = torch.device("cpu")
    hf = bm.build_hf_model("tiny-llama", dev, torch.float32, seed=1)
    ids = torch.randint(10, 2000, (2, 6), generator=torch.Generator().manual_seed(0))
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=5, min_new_tokens=5, do_sample=False,
              pad_token_id=0)
    before = hf.generate(ids, **kw)
    kept = [0, 2, 4, 7]
    cp = bm.skip_layers_copy(hf, kept)
    layers = cp.model.layers
    assert len(layers) == 4 and cp.config.num_hidden_layers == 4 and hf.config.num_hidden_layers == 8
    assert [m.self_attn.layer_idx for m in layers] == [0, 1, 2, 3]
    assert [m.self_attn.layer_idx for m in hf.model.layers] == list(range(8))      # original untouched
    assert layers[1].mlp.up_proj.weight is hf.model.layers[2].mlp.up_proj.weight    # shared, not copied
    got = cp.generate(ids, **kw)
    assert torch.equal(hf.generate(ids, **kw), before)                             # original still works
    assert torch.equal(bm.skip_layers_copy(hf, list(range(8))).generate(ids, **kw), before)
    # HF with layers removed == our engine with prefill="skip" (same semantics)
    eng = Engine.from_hf_model(hf, schedule=kept, prefill="skip", max_batch_size=2, max_seq_len=16)
    out = eng.generate(ids.tolist(), max_new_tokens=5, eos_token_id=None)
    assert out.sequences == got[:, 6:].tolist()


def test_merge(tmp_path, capsys):
    def row(system, s, kept, tps):
        return {"system": system, "target_speedup": s, "num_kept": kept, "num_layers": 8, "batch_size": 1,
                "prompt_len": 8, "new_tokens": 4, "status": "ok", "tokens_per_s": tps, "prefill_ms": 1.0,
                "decode_ms_per_step": 1.0, "error": None}
    meta = {"model": "tiny-llama", "device": "cpu", "device_type": "cpu", "command": "ulskip bench"}
    (tmp_path / "a.json").write_text(json.dumps({"meta": meta, "rows": [row("hf-eager-full", 1, 8, 10.0)]}))
    (tmp_path / "b.json").write_text(json.dumps({"meta": meta, "rows": [row("hf-compile-skip", 1, 8, 20.0),
                                                                        row("hf-compile-skip", 2, 4, 30.0)]}))
    out = tmp_path / "m.json"
    assert main(["bench", "--merge", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--json", str(out)]) == 0
    rows = {(r["system"], r["target_speedup"]): r for r in json.loads(out.read_text())["rows"]}
    assert rows[("hf-compile-skip", 2)]["speedup_vs_1x"] == pytest.approx(1.5)
    assert rows[("hf-compile-skip", 2)]["speedup_vs_hf_eager_full"] == pytest.approx(3.0)
    assert main(["bench", "--merge", str(tmp_path / "missing.json")]) == 2


def test_merge_later_rows_replace_earlier_measurements(tmp_path, capsys):
    def row(system, s, tps, bs=1, prompt=8, status="ok", note=""):
        return {"system": system, "target_speedup": s, "num_kept": 8 // s, "num_layers": 8, "batch_size": bs,
                "prompt_len": prompt, "new_tokens": 4, "status": status, "tokens_per_s": tps, "prefill_ms": 1.0,
                "decode_ms_per_step": 1.0, "error": None if status == "ok" else "OutOfMemoryError", "note": note}
    meta = {"model": "tiny-llama", "device": "cpu", "device_type": "cpu", "command": "ulskip bench"}
    first = [row("hf-eager-full", 1, 10.0), row("hf-eager-skip", 1, 10.0, note=sweep.TWIN_NOTE),
             row("hf-compile-skip", 1, 20.0), row("hf-compile-skip", 2, 30.0), row("hf-compile-skip", 1, 80.0, bs=4),
             row("ulskip", 1, 50.0)]
    later = [row("hf-eager-full", 1, 12.0),                     # re-measured: its 1x hf-eager-skip twin follows
             row("hf-compile-skip", 1, 15.0),                   # re-measured at bs 1 only
             row("hf-compile-skip", 1, 25.0, prompt=64),        # another prompt length: a row of its own
             row("ulskip", 1, None, status="failed")]           # a failure never replaces a measurement
    (tmp_path / "a.json").write_text(json.dumps({"meta": meta, "rows": first}))
    (tmp_path / "b.json").write_text(json.dumps({"meta": meta, "rows": later}))
    out = tmp_path / "m.json"
    assert main(["bench", "--merge", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--json", str(out)]) == 0
    assert "ulskip s=1 bs=1 is failed; the earlier measurement stays" in capsys.readouterr().err
    merged = json.loads(out.read_text())["rows"]
    rows = {(r["system"], r["target_speedup"], r["batch_size"], r["prompt_len"]): r for r in merged}
    assert len(merged) == len(rows) == 7
    assert rows[("hf-compile-skip", 1, 1, 8)]["tokens_per_s"] == 15.0
    assert rows[("hf-compile-skip", 1, 4, 8)]["tokens_per_s"] == 80.0
    assert rows[("hf-compile-skip", 1, 1, 64)]["tokens_per_s"] == 25.0
    assert rows[("hf-compile-skip", 2, 1, 8)]["speedup_vs_1x"] == pytest.approx(2.0)
    assert rows[("ulskip", 1, 1, 8)]["tokens_per_s"] == 50.0
    twin = rows[("hf-eager-skip", 1, 1, 8)]
    assert twin["tokens_per_s"] == 12.0 and twin["system"] == "hf-eager-skip" and twin["note"] == sweep.TWIN_NOTE


def test_checkpoint_folder(tmp_path):
    hf = bm.build_hf_model("tiny-qwen2", torch.device("cpu"), torch.float32)
    hf.save_pretrained(tmp_path / "ckpt")
    out = tmp_path / "o.json"
    rc = main(["bench", "--model", str(tmp_path / "ckpt"), "--systems", "hf-eager-skip", "--batch-sizes", "1",
               "--target-speedups", "2", "--prompt-len", "4", "--new-tokens", "2", "--no-progress",
               "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert rc == 0 and [(r["system"], r["status"], r["kept_layers"]) for r in rows] == \
        [("hf-eager-skip", "ok", [0, 2, 4, 7])]


def test_kernel_bench_script_smoke():
    # python -m ulskip.bench.kernels is only run on the GPU for numbers; this catches it breaking (tiny
    # shapes, interpreter)
    import os
    import subprocess
    import sys
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-m", "ulskip.bench.kernels", "--device", "cpu", "--tiny", "--batches", "1",
                        "--seq-lens", "64"], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "gemv rms+qkv" in r.stdout and "decode_attention" in r.stdout
