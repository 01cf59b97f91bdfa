import json

import pytest

from ulskip.cli import main
from helpers import make_hf_model, save


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return save(make_hf_model("qwen2"), tmp_path_factory.mktemp("qwen2"))


def test_generate_token_ids(path, capsys):
    assert main(["generate", path, "--prompt-ids", "1,2,3", "--prompt-ids", "4,5", "--target-speedup", "2",
                 "--max-new-tokens", "5", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["kept_layers"] == [0, 3, 5] and out["prefill"] == "full"
    assert [len(s) for s in out["sequences"]] == [5, 5] and out["new_tokens"] == 10


def test_generate_bad_input(path):
    with pytest.raises(SystemExit, match="at least one --prompt"):
        main(["generate", path])
    with pytest.raises(SystemExit, match="comma-separated integers"):
        main(["generate", path, "--prompt-ids", "1,x"])
    with pytest.raises(SystemExit, match="string prompts, stop strings and streamed text need a tokenizer"):
        main(["generate", path, "--prompt", "hello"])
    with pytest.raises(SystemExit, match=r"target_speedup must be in \[1, 3\]"):
        main(["generate", path, "--prompt-ids", "1", "--target-speedup", "9"])


def test_generate_stream_and_stop(tmp_path, capsys):
    from ulskip import Engine
    from helpers import make_checkpoint
    ckpt = make_checkpoint(tmp_path / "tok", "llama", num_layers=4)
    prompt = "question : where is paris ? answer :"
    ref = Engine.from_pretrained(ckpt, target_speedup=2, device="cpu")
    eos = ref.tokenizer.eos_token_id
    plain = ref.generate([prompt], max_new_tokens=8, eos_token_id=eos).texts[0]
    assert main(["generate", ckpt, "--prompt", prompt, "--target-speedup", "2", "--max-new-tokens", "8",
                 "--device", "cpu", "--stream"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(plain + "\n")
    assert "new tokens in" in out
    stop = plain.split()[0]  # the first word: the output must end there
    assert main(["generate", ckpt, "--prompt", prompt, "--target-speedup", "2", "--max-new-tokens", "8",
                 "--device", "cpu", "--stop", stop, "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["texts"] == ref.generate([prompt], max_new_tokens=8, eos_token_id=eos, stop=[stop]).texts
    assert got["texts"][0].endswith(stop) and len(got["sequences"][0]) <= len(plain.split())


def test_generate_stream_bad_input(path):
    with pytest.raises(SystemExit, match="--stream must be used with one prompt"):
        main(["generate", path, "--prompt-ids", "1", "--prompt-ids", "2", "--stream"])
    with pytest.raises(SystemExit, match="--num-beams must be 1 with --stream"):
        main(["generate", path, "--prompt-ids", "1", "--stream", "--num-beams", "2"])
    with pytest.raises(SystemExit, match="--stream must be used without --json"):
        main(["generate", path, "--prompt-ids", "1", "--stream", "--json"])
    with pytest.raises(SystemExit, match="--stop: string prompts, stop strings and streamed text need a tokenizer"):
        main(["generate", path, "--prompt-ids", "1", "--stop", "x"])
    with pytest.raises(SystemExit, match="--stop must be a non-empty string"):
        main(["generate", path, "--prompt-ids", "1", "--stop", ""])


def test_generate_speculative(path, capsys):
    """The lossless mode: the same tokens as all layers, with the draft's acceptance reported."""
    base = ["generate", path, "--prompt-ids", "1,2,3", "--prompt-ids", "4,5", "--max-new-tokens", "9", "--json"]
    assert main(base + ["--target-speedup", "1"]) == 0
    full = json.loads(capsys.readouterr().out)
    with pytest.warns(UserWarning, match="not fine-tuned for layer skipping"):
        assert main(base + ["--speculative-draft-speedup", "2", "--num-draft-tokens", "3"]) == 0
    spec = json.loads(capsys.readouterr().out)
    assert spec["sequences"] == full["sequences"] and spec["kept_layers"] == list(range(6))
    assert spec["speculative"]["draft_layers"] == [0, 3, 5] and spec["speculative"]["num_draft_tokens"] == 3
    with pytest.warns(UserWarning):  # max_new_tokens 1: no round runs; the statistics print as "-"
        assert main(base[:-3] + ["--max-new-tokens", "1", "--speculative-draft-speedup", "2"]) == 0
    assert "acceptance -, - tokens per verify pass" in capsys.readouterr().out
    for extra, msg in [(["--speculative-draft-speedup", "1"], r"--speculative-draft-speedup must be > 1"),
                       (["--speculative-draft-speedup", "2", "--num-draft-tokens", "0"],
                        r"--num-draft-tokens must be in \[1, 15\], got 0"),
                       (["--speculative-draft-speedup", "2", "--target-speedup", "2"],
                        r"--target-speedup must be left out with --speculative-draft-speedup"),
                       (["--speculative-draft-speedup", "2", "--num-beams", "2"], r"--num-beams must be 1 with"),
                       (["--speculative-draft-speedup", "9"], r"draft_speedup must be in \(1, 3\] for 6 layers"),
                       (["--num-draft-tokens", "3"], r"--num-draft-tokens must be used with --speculative-draft-speedup"),
                       (["--speculative-draft-speedup", "2", "--strategy", "even"],
                        r"--strategy must be left out with --speculative-draft-speedup"),
                       (["--speculative-draft-speedup", "2", "--prefill", "skip"],
                        r"--prefill must be left out with --speculative-draft-speedup")]:
        with pytest.raises(SystemExit, match=msg):
            main(base + extra)


def test_generate_stops_at_generation_config_end_tokens(tmp_path, capsys):
    from helpers import make_checkpoint
    path = make_checkpoint(tmp_path / "ckpt", "llama", num_layers=4, seed=2)
    base = ["generate", path, "--prompt-ids", "1,5,9,13", "--max-new-tokens", "8", "--json"]
    assert main(base + ["--no-eos"]) == 0
    free = json.loads(capsys.readouterr().out)["sequences"][0]
    end = next(t for i, t in enumerate(free) if i >= 2 and t not in free[:i])
    (tmp_path / "ckpt" / "generation_config.json").write_text(json.dumps({"eos_token_id": end}))
    assert main(base) == 0
    assert json.loads(capsys.readouterr().out)["sequences"][0] == free[:free.index(end) + 1]
    assert main(base + ["--no-eos"]) == 0
    assert json.loads(capsys.readouterr().out)["sequences"][0] == free


def test_generate_stream_speculative(tmp_path, capsys):
    from helpers import make_checkpoint
    path = make_checkpoint(tmp_path / "ckpt", "llama", num_layers=4, seed=2)
    base = ["generate", path, "--prompt", "question : where is paris ? answer :", "--max-new-tokens", "8", "--stream"]
    assert main(base) == 0
    plain = capsys.readouterr().out.splitlines()
    with pytest.warns(UserWarning, match="not fine-tuned"):
        assert main(base + ["--speculative-draft-speedup", "2", "--num-draft-tokens", "3"]) == 0
    spec = capsys.readouterr().out.splitlines()
    assert spec[0] == plain[0] and spec[1].split(" new tokens")[0] == plain[1].split(" new tokens")[0]
