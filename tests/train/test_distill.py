"""Logit distillation (`ulskip train --distill-from`): the loss term against a direct computation, and a
run that trains a skipped model towards a fine-tuned full one."""
import json

import pytest
import torch
import torch.nn.functional as F

from helpers import make_checkpoint, write_train_data
from ulskip.cli import main
from ulskip.train.distill import distillation_loss


def test_distillation_loss_equals_a_direct_computation():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 6, 11, generator=g), torch.randn(2, 6, 11, generator=g)
    labels = torch.full((2, 6), -100)
    labels[0, 3:], labels[1, 1:4] = 5, 7      # positions t-1 predict them
    T = 2.0
    want, n = 0.0, 0
    for b in range(2):
        for i in range(1, 6):
            if labels[b, i] != -100:
                p = F.softmax(t[b, i - 1] / T, -1)
                want += float((p * (p.log() - F.log_softmax(s[b, i - 1] / T, -1))).sum())
                n += 1
    assert distillation_loss(s, t, labels, T).item() == pytest.approx(want * T * T / n, rel=1e-5)
    assert distillation_loss(s, t, labels, T, num_items_in_batch=12).item() == pytest.approx(want * T * T / 12, rel=1e-5)
    assert distillation_loss(t, t, labels).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="must share the tokenizer"):
        distillation_loss(s, t[..., :10], labels)


def test_train_with_distillation(tmp_path, capsys):
    ckpt = make_checkpoint(tmp_path / "ckpt", "llama", num_layers=4)
    data = write_train_data(tmp_path)
    common = ["--per-device-train-batch-size", "4", "--learning-rate", "3e-3", "--warmup-ratio", "0",
              "--lr-scheduler-type", "constant", "--logging-steps", "5", "--seed", "0", "--save-steps", "100"]
    teacher = str(tmp_path / "teacher")
    assert main(["train", "--model-name-or-path", ckpt, "--train-file", data, "--output-dir", teacher,
                 "--target-speedup", "1", "--max-steps", "20", *common]) == 0
    out = str(tmp_path / "student")
    assert main(["train", "--model-name-or-path", ckpt, "--train-file", data, "--output-dir", out,
                 "--target-speedup", "2", "--max-steps", "20", "--distill-from", teacher, "--distill-weight", "0.7",
                 "--distill-temperature", "2", *common]) == 0
    cfg = json.load(open(f"{out}/config.json"))
    assert cfg["ulskip"]["kept_layers"] == [0, 3]
    plain = str(tmp_path / "plain")  # the same run without the teacher: the distillation term changed the weights
    assert main(["train", "--model-name-or-path", ckpt, "--train-file", data, "--output-dir", plain,
                 "--target-speedup", "2", "--max-steps", "20", *common]) == 0
    from safetensors.torch import load_file
    a, b = load_file(f"{out}/model.safetensors"), load_file(f"{plain}/model.safetensors")
    assert any(not torch.equal(a[k], b[k]) for k in a if "layers.3" in k)
    for argv, match in ((["--distill-from", str(tmp_path / "none")], "--distill-from .*no such folder"),
                        (["--distill-from", teacher, "--distill-weight", "0"], "--distill-weight must be"),
                        (["--distill-from", teacher, "--distill-temperature", "-1"], "--distill-temperature must be")):
        assert main(["train", "--model-name-or-path", ckpt, "--train-file", data, "--output-dir",
                     str(tmp_path / "x"), "--max-steps", "2", *argv]) == 2
        err = capsys.readouterr().err
        assert __import__("re").search(match, err), err
