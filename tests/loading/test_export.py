"""`ulskip export`: a prefill-"skip" checkpoint -> a plain Hugging Face checkpoint of its kept layers, which
transformers loads as an ordinary model computing what the engine computes on the original with
prefill="skip"; refusals (prefill "full", dynamic schedules, no section without --prefill skip, a
disagreeing --target-speedup, bad paths) are one line and write nothing."""
import json
import os

import pytest
import torch
from helpers import make_checkpoint, make_hf_model, make_tokenizer, reduced_copy
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from ulskip import Engine
from ulskip.cli import main
from ulskip.loading.export import export_kept_layers, export_schedule
from ulskip.schedule import uls_schedule

PROMPTS = [[1, 17, 33, 5], [1, 8, 44, 2, 60, 9, 71]]
LAYERS = 6


def add_section(path, **section) -> str:
    file = os.path.join(path, "config.json")
    with open(file) as f:
        raw = json.load(f)
    raw["ulskip"] = {"num_layers": LAYERS, "strategy": "paper", **section}
    with open(file, "w") as f:
        json.dump(raw, f, indent=2)
    return str(path)


def skip_checkpoint(path, family="llama", kept=None, strategy="paper", seed=0, **overrides):
    """A tiny random checkpoint (no tokenizer: the engine then never stops at EOS, like transformers' generate
    here) with an ulskip section saying prefill "skip" and `kept` (None: no section)."""
    model = make_hf_model(family, LAYERS, seed=seed, **overrides)
    model.save_pretrained(path)
    if kept is not None:
        add_section(path, kept_layers=list(kept), prefill="skip", strategy=strategy, target_speedup=2.0)
    return model, str(path)


def read_config(path):
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)


def tensor_names(path):
    names = []
    for file in sorted(os.listdir(path)):
        if file.endswith(".safetensors"):
            with safe_open(os.path.join(path, file), framework="pt") as f:
                names += list(f.keys())
    return names


def layer_indices(names):
    return {int(n.split(".")[2]) for n in names if n.startswith(("model.layers.", "transformer.h."))}


@torch.no_grad()
def hf_greedy(model, prompt, steps):
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         do_sample=False, max_new_tokens=steps, eos_token_id=None,
                         pad_token_id=0)
    return out[0, len(prompt):].tolist()


def check_same_model(model, original, exported, kept, engine):
    """The exported folder: K layers, no ulskip section, loads in transformers as a plain model whose greedy
    tokens equal the engine's on the original (prefill "skip") and whose logits equal the reduced copy's."""
    config = read_config(exported)
    assert "ulskip" not in config
    assert config.get("num_hidden_layers", config.get("n_layer")) == len(kept)
    names = tensor_names(exported)
    assert layer_indices(names) == set(range(len(kept)))
    hf = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
    assert hf.config.num_hidden_layers == len(kept)
    want = engine.generate(PROMPTS, max_new_tokens=8).sequences
    assert [hf_greedy(hf, p, 8) for p in PROMPTS] == want
    ref = reduced_copy(model, kept)
    ids = torch.tensor([PROMPTS[1]])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ref(ids).logits, rtol=0, atol=1e-6)
    return config, names


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "bloom"])
def test_section_export_is_the_skip_model(tmp_path, family):
    kept = uls_schedule(LAYERS, 2)
    model, ckpt = skip_checkpoint(tmp_path / "ckpt", family, kept)
    out = export_kept_layers(ckpt, tmp_path / "out")
    assert out == str(tmp_path / "out")
    engine = Engine.from_pretrained(ckpt, dtype="float32", device="cpu", cuda_graphs=False)
    assert engine.prefill_mode == "skip"
    config, _ = check_same_model(model, ckpt, out, kept, engine)
    if family == "qwen2":
        assert config["layer_types"] == ["full_attention"] * len(kept)
    with open(os.path.join(out, "ulskip_export.json")) as f:
        info = json.load(f)
    assert info["kept_layers"] == kept and info["num_layers"] == LAYERS and info["ulskip_section"]["prefill"] == "skip"
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "out"]  # no temporary folder left


@pytest.mark.parametrize("family", ["llama", "bloom"])
def test_cli_target_speedup_prefill_skip(tmp_path, capsys, family):
    """A checkpoint without a section: --target-speedup 2 --prefill skip, the engine's skip path."""
    model, ckpt = skip_checkpoint(tmp_path / "ckpt", family)
    out = str(tmp_path / "out")
    assert main(["export", ckpt, out, "--target-speedup", "2", "--prefill", "skip"]) == 0
    kept = uls_schedule(LAYERS, 2)
    printed = capsys.readouterr().out
    assert f"wrote {out}: {len(kept)} of {LAYERS} layers (kept {','.join(map(str, kept))}" in printed
    engine = Engine.from_pretrained(ckpt, target_speedup=2, prefill="skip", dtype="float32", device="cpu",
                                    cuda_graphs=False)
    check_same_model(model, ckpt, out, kept, engine)


def test_schedule_without_the_ends(tmp_path):
    """A section of a baseline strategy (random: the ends need not be kept) exports its layers as they are."""
    kept = uls_schedule(LAYERS, 2, "random", seed=3)
    assert kept != [0, 3, 5]
    model, ckpt = skip_checkpoint(tmp_path / "ckpt", "llama", kept, strategy="random")
    out = export_kept_layers(ckpt, tmp_path / "out")
    engine = Engine.from_pretrained(ckpt, dtype="float32", device="cpu", cuda_graphs=False)
    check_same_model(model, ckpt, out, kept, engine)


def test_tied_sharded_in_sharded_out(tmp_path):
    """Tied embeddings: no lm_head written, transformers ties it again; a sharded source is read and a small
    max_shard_bytes writes shards and an index."""
    kept = uls_schedule(LAYERS, 3)
    model = make_hf_model("llama", LAYERS, tie_word_embeddings=True)
    model.save_pretrained(tmp_path / "ckpt", max_shard_size="40KB")
    ckpt = add_section(tmp_path / "ckpt", kept_layers=kept, prefill="skip")
    assert os.path.isfile(os.path.join(ckpt, "model.safetensors.index.json"))
    out = export_kept_layers(ckpt, tmp_path / "out", max_shard_bytes=100_000)
    files = sorted(os.listdir(out))
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 1 and "model.safetensors.index.json" in files
    with open(os.path.join(out, "model.safetensors.index.json")) as f:
        assert sorted(set(json.load(f)["weight_map"].values())) == shards
    names = tensor_names(out)
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names
    engine = Engine.from_pretrained(ckpt, dtype="float32", device="cpu", cuda_graphs=False)
    check_same_model(model, ckpt, out, kept, engine)
    hf = AutoModelForCausalLM.from_pretrained(out)
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()


def test_tokenizer_chat_template_generation_config_copied(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt", "llama", num_layers=LAYERS)
    tok = make_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    tok.save_pretrained(ckpt)
    add_section(ckpt, kept_layers=[0, 2, 5], prefill="skip")
    for junk in ("trainer_state.json", "optimizer.pt", "training_args.bin"):  # a training folder's state stays
        with open(os.path.join(ckpt, junk), "w") as f:
            f.write("{}")
    out = export_kept_layers(ckpt, tmp_path / "out")
    files = set(os.listdir(out))
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= files
    assert not files & {"trainer_state.json", "optimizer.pt", "training_args.bin"}
    with open(os.path.join(ckpt, "generation_config.json")) as a, \
            open(os.path.join(out, "generation_config.json")) as b:
        assert a.read() == b.read()
    loaded = AutoTokenizer.from_pretrained(out)
    assert loaded.chat_template == tok.chat_template
    assert loaded("the sky is blue").input_ids == tok("the sky is blue").input_ids
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 3


def test_qwen2_sliding_window_layer_types(tmp_path):
    """Per-layer config lists are cut to the kept layers, and Qwen2's max_window_layers is recounted."""
    kept = [0, 2, 3, 5]
    _, ckpt = skip_checkpoint(tmp_path / "ckpt", "qwen2", kept, use_sliding_window=True, sliding_window=4,
                              max_window_layers=3)
    types = read_config(ckpt)["layer_types"]
    assert types == ["full_attention"] * 3 + ["sliding_attention"] * 3
    out = export_kept_layers(ckpt, tmp_path / "out")
    config = read_config(out)
    assert config["layer_types"] == [types[i] for i in kept] and config["max_window_layers"] == 2
    hf = AutoModelForCausalLM.from_pretrained(out)
    assert hf.config.layer_types == [types[i] for i in kept]


# ----------------------------------------------------------------------------------------------------
# Refusals: one clear line from the CLI, a ValueError from Python, nothing written
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def f(tmp_path_factory):
    d = tmp_path_factory.mktemp("export_errors")
    kept = uls_schedule(LAYERS, 2)
    paths = {"skip": skip_checkpoint(d / "skip", "llama", kept)[1], "bare": skip_checkpoint(d / "bare", "bloom")[1],
             "full": skip_checkpoint(d / "full", "llama")[1], "sd": skip_checkpoint(d / "sd", "llama")[1],
             "missing": str(d / "missing"), "noconf": str(d / "noconf"), "busy": str(d / "busy"),
             "file": str(d / "file.txt"), "out": str(d / "out")}
    add_section(paths["full"], kept_layers=kept, prefill="full", target_speedup=2.0)
    add_section(paths["sd"], kept_layers=list(range(1, LAYERS)), prefill="full", strategy="skipdecode",
                skipdecode={"max_depth": 5, "min_depth": 1, "horizon": 64})
    os.mkdir(paths["noconf"])
    os.mkdir(paths["busy"])
    with open(os.path.join(paths["busy"], "keep.txt"), "w") as fh:
        fh.write("mine")
    with open(paths["file"], "w") as fh:
        fh.write("x")
    return paths


def run_cli(argv):
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def fails(capsys, argv, *culprits):
    rc = run_cli(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and "Traceback" not in err, (rc, err)
    assert len(lines) == 1 and lines[0].startswith("ulskip export: "), err
    for c in culprits:
        assert c in lines[0], (c, lines[0])
    return lines[0]


REFUSED = [
    (["{full}", "{out}"], ["prefill 'full'", "every layer", "not be the same model"]),
    (["{full}", "{out}", "--prefill", "skip"], ["prefill 'full'", "not be the same model"]),
    (["{sd}", "{out}"], ["skipdecode", "no fixed layer set"]),
    (["{bare}", "{out}", "--target-speedup", "2", "--prefill", "skip", "--strategy", "skipdecode"],
     ["skipdecode", "no fixed layer set"]),
    (["{bare}", "{out}"], ["no ulskip section", "--target-speedup", "--prefill skip"]),
    (["{bare}", "{out}", "--target-speedup", "2"], ["no ulskip section", "pass --prefill skip"]),
    (["{bare}", "{out}", "--target-speedup", "2", "--prefill", "full"], ["--prefill full", "every layer"]),
    (["{skip}", "{out}", "--prefill", "full"], ["--prefill full"]),
    (["{skip}", "{out}", "--target-speedup", "3"], ["target speedup 3", "keeps layers 0,5", "keeps 0,3,5",
                                                    "target_speedup 2.0"]),
    (["{skip}", "{out}", "--target-speedup", "2", "--strategy", "early-exit"], ["early-exit", "0,1,2", "0,3,5"]),
    (["{bare}", "{out}", "--target-speedup", "9", "--prefill", "skip"], ["target_speedup", "[1, 3]", "9"]),
    (["{bare}", "{out}", "--target-speedup", "2", "--prefill", "skip", "--strategy", "fastest"],
     ["--strategy", "'fastest'"]),
    (["{bare}", "{out}", "--target-speedup", "2", "--prefill", "skip", "--strategy", "shortgpt"],
     ["--strategy shortgpt", "--calibration"]),
    (["{missing}", "{out}"], ["{missing}", "does not exist"]),
    (["{noconf}", "{out}"], ["{noconf}", "config.json"]),
    (["{file}", "{out}"], ["{file}", "is a file"]),
    (["{skip}", "{busy}"], ["{busy}", "not empty", "--overwrite"]),
    (["{skip}", "{file}"], ["{file}", "not a folder"]),
    (["{skip}", "{skip}", "--overwrite"], ["would replace the checkpoint"]),
]


@pytest.mark.parametrize("argv, culprits", REFUSED, ids=[" ".join(a)[:60] for a, _ in REFUSED])
def test_refused(f, capsys, argv, culprits):
    parent = os.path.dirname(f["out"])
    before = sorted(os.listdir(parent))
    fails(capsys, ["export"] + [a.format(**f) for a in argv], *[c.format(**f) for c in culprits])
    assert sorted(os.listdir(parent)) == before  # nothing written, no temporary folder left
    assert os.listdir(f["busy"]) == ["keep.txt"]


def test_agreeing_target_speedup_and_overwrite(f, capsys, tmp_path):
    out = str(tmp_path / "out")
    os.mkdir(out)
    with open(os.path.join(out, "old.txt"), "w") as fh:
        fh.write("old")
    fails(capsys, ["export", f["skip"], out, "--target-speedup", "2"], "not empty")
    assert main(["export", f["skip"], out, "--target-speedup", "2", "--overwrite"]) == 0
    assert "old.txt" not in os.listdir(out) and read_config(out)["num_hidden_layers"] == 3
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_python_api_refusals(f, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="prefill 'full'"):
        export_kept_layers(f["full"], out)
    with pytest.raises(ValueError, match="differ from the layers the ulskip section"):
        export_kept_layers(f["skip"], out, kept_layers=[0, 1, 5])
    with pytest.raises(ValueError, match="no ulskip section: pass kept_layers"):
        export_kept_layers(f["bare"], out)
    with pytest.raises(ValueError, match="distinct layer indices"):
        export_kept_layers(f["bare"], out, kept_layers=[0, 9])
    with pytest.raises(ValueError, match="max_shard_bytes"):
        export_kept_layers(f["skip"], out, max_shard_bytes=0)
    assert not out.exists()
    assert export_schedule("x", LAYERS, None, target_speedup=2, prefill="skip") == [0, 3, 5]
    # without a section, kept_layers is the caller's choice
    assert read_config(export_kept_layers(f["bare"], out, kept_layers=[1, 4]))["n_layer"] == 2


def test_weights_missing_a_kept_layer(tmp_path):
    from safetensors.torch import load_file, save_file
    _, ckpt = skip_checkpoint(tmp_path / "ckpt", "llama", [0, 3, 5])
    file = os.path.join(ckpt, "model.safetensors")
    tensors = {k: v for k, v in load_file(file).items() if not k.startswith("model.layers.3.")}
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="no tensors of kept layer 3"):
        export_kept_layers(ckpt, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_trained_folder_end_to_end(tmp_path, capsys):
    """`ulskip train --prefill skip` then `ulskip export` with no schedule flags: transformers' greedy text on
    the export equals the engine's on the trained folder; the Trainer's state stays behind."""
    from helpers import write_train_data
    ckpt = make_checkpoint(tmp_path / "base", "llama", num_layers=LAYERS)
    trained = str(tmp_path / "trained")
    assert main(["train", "--model_name_or_path", ckpt, "--train_file", write_train_data(tmp_path),
                 "--output_dir", trained, "--target_speedup", "2", "--prefill", "skip", "--max_steps", "16",
                 "--save_steps", "16", "--per_device_train_batch_size", "4", "--learning_rate", "3e-3",
                 "--warmup_ratio", "0", "--lr_scheduler_type", "constant", "--seed", "0"]) == 0
    assert read_config(trained)["ulskip"]["prefill"] == "skip"
    out = str(tmp_path / "export")
    assert main(["export", trained, out]) == 0
    assert "wrote" in capsys.readouterr().out
    assert not [f for f in os.listdir(out) if f.startswith(("checkpoint-", "training_args", "trainer_state"))]
    engine = Engine.from_pretrained(trained, dtype="float32", device="cpu", cuda_graphs=False)
    prompts = ["question : what color is the sky ? answer :", "question : where is rome ? answer :"]
    tok = AutoTokenizer.from_pretrained(out)
    want = engine.generate(prompts, max_new_tokens=8, eos_token_id=tok.eos_token_id)  # transformers stops there too
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    for prompt, seq in zip(prompts, want.sequences):
        ids = tok(prompt).input_ids
        got = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          do_sample=False, max_new_tokens=8, pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()
        assert got == seq, (got, seq)
    assert min(len(seq) for seq in want.sequences) >= 2  # words, not EOS at once: a comparison that means something
