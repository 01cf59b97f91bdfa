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
    with pytest.raises(SystemExit, match="string prompts need a tokenizer"):
        main(["generate", path, "--prompt", "hello"])
    with pytest.raises(SystemExit, match=r"target_speedup must be in \[1, 3\]"):
        main(["generate", path, "--prompt-ids", "1", "--target-speedup", "9"])
