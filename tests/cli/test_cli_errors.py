"""Bad input to every `ulskip` subcommand (not train: its errors are its own) is one line on stderr,
`ulskip <cmd>: <message>` naming the culprit flag or value, exit status 2, no traceback, nothing loaded
or written; `--debug` shows the traceback; `--version`; every --help states each flag's default.

Faults by class: type (a non-number where a number goes), range, files (missing / corrupt), existing
output, device (cuda without CUDA)."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from ulskip import __version__
from ulskip.cli import SUBCOMMANDS, ExitStatus, main
from helpers import make_checkpoint, make_hf_model, records, save, write_jsonl

HUGE = str(2 ** 64)


@pytest.fixture(scope="module")
def f(tmp_path_factory):
    """Paths the cases name: {ckpt} a checkpoint with a tokenizer, {bare} one without, {data} records,
    {missing} nothing, {noconf} a folder without config.json, {badjson} one whose config.json is not
    JSON, {existing} a file, {dir} a folder, {full} a non-empty folder, {badrec} a .jsonl that is not JSON,
    {noweights} / {trunc} the checkpoint without its weight file / with it truncated."""
    d = tmp_path_factory.mktemp("cli_errors")
    paths = {"ckpt": make_checkpoint(d / "ckpt", num_layers=4), "bare": save(make_hf_model("llama", 4), d / "bare"),
             "data": write_jsonl(d / "d.jsonl", records()[:4]), "missing": str(d / "missing"),
             "noconf": str(d / "noconf"), "badjson": str(d / "badjson"), "existing": str(d / "existing.json"),
             "dir": str(d / "dir"), "full": str(d / "full"), "notgguf": str(d / "not.gguf"), "txt": str(d / "d.txt"),
             "badrec": str(d / "bad.jsonl")}
    for k in ("noconf", "badjson", "dir", "full"):
        os.mkdir(paths[k])
    with open(os.path.join(paths["badjson"], "config.json"), "w") as fh:
        fh.write("{not json")
    for k, text in (("existing", "{}"), ("notgguf", "PK\x03\x04 not a gguf"), ("txt", "x"), ("badrec", "not json\n")):
        with open(paths[k], "w") as fh:
            fh.write(text)
    with open(os.path.join(paths["full"], "keep.txt"), "w") as fh:
        fh.write("mine")
    for k in ("noweights", "trunc"):            # the checkpoint without weights / with a truncated file
        paths[k] = str(d / k)
        shutil.copytree(paths["ckpt"], paths[k])
    os.remove(os.path.join(paths["noweights"], "model.safetensors"))
    with open(os.path.join(paths["trunc"], "model.safetensors"), "r+b") as fh:
        fh.truncate(1000)
    return paths


def run_cli(argv):
    """The exit status of main(argv), whether it returns it or raises SystemExit."""
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    return rc


def fails(capsys, argv, cmd, *culprits):
    """The expected-error contract: status 2, one stderr line `ulskip <cmd>: ...` naming every culprit."""
    rc = run_cli(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, (rc, err)
    prefix = f"ulskip {cmd}: " if cmd else "ulskip: "
    assert len(lines) == 1 and lines[0].startswith(prefix), err
    assert not lines[0][len(prefix):].startswith("ulskip") and ": error:" not in lines[0], err
    for c in culprits:
        assert c in lines[0], (c, lines[0])
    return lines[0]


def fmt(argv, f):
    return [a.format(**f) for a in argv]


G = ["generate", "{ckpt}", "--prompt-ids", "1,2"]
E = ["eval", "{ckpt}", "--data", "{data}", "--no-progress"]
C = ["calibrate", "{ckpt}", "--data", "{data}", "--out", "{dir}/bi.json"]
D = ["data", "gettext", "--lang", "de", "--out", "{dir}/de"]
B = ["bench", "--model", "tiny-llama", "--no-progress"]

TYPE = [
    (["schedule", "--layers", "x", "--target-speedup", "2"], "schedule", ["--layers", "'x'"]),
    (["schedule", "--layers", "8", "--target-speedup", "two"], "schedule", ["--target-speedup", "'two'"]),
    (G + ["--max-new-tokens", "x"], "generate", ["--max-new-tokens", "'x'"]),
    (G + ["--top-p", "high"], "generate", ["--top-p", "'high'"]),
    (["generate", "{ckpt}", "--prompt-ids", "1,x"], "generate", ["--prompt-ids", "'1,x'"]),
    (B + ["--prompt-len", "1.5"], "bench", ["--prompt-len", "'1.5'"]),
    (B + ["--batch-sizes", "two"], "bench", ["--batch-sizes", "'two'"]),
    (B + ["--target-speedups", "fast"], "bench", ["--target-speedups", "'fast'"]),
    (D + ["--test-size", "many"], "data gettext", ["--test-size", "'many'"]),
    (C + ["--num-records", "x"], "calibrate", ["--num-records", "'x'"]),
    (E + ["--batch-size", "1e3"], "eval", ["--batch-size", "'1e3'"]),
    (E + ["--repetition-penalty", "none"], "eval", ["--repetition-penalty", "'none'"]),
]

RANGE = [
    (["schedule", "--layers", "1", "--target-speedup", "1"], "schedule", ["--layers", "got 1"]),
    (["schedule", "--layers", "8", "--target-speedup", "0"], "schedule", ["target_speedup", "got 0"]),
    (["schedule", "--layers", "8", "--target-speedup", "5"], "schedule", ["target_speedup", "[1, 4]"]),
    (G + ["--num-beams", "0"], "generate", ["--num-beams", ">= 1", "got 0"]),
    (G + ["--max-new-tokens", "0"], "generate", ["--max-new-tokens", "got 0"]),
    (G + ["--max-new-tokens", "-5"], "generate", ["--max-new-tokens", "got -5"]),
    (G + ["--top-k", "-1"], "generate", ["--top-k", "got -1"]),
    (G + ["--top-p", "0"], "generate", ["--top-p", "(0, 1]"]),
    (G + ["--top-p", "1.5"], "generate", ["--top-p", "(0, 1]", "1.5"]),
    (G + ["--do-sample", "--temperature", "0"], "generate", ["--temperature", "> 0"]),
    (G + ["--do-sample", "--temperature", "-1"], "generate", ["--temperature", "-1"]),
    (G + ["--do-sample", "--num-beams", "2"], "generate", ["--num-beams", "--do-sample"]),
    (G + ["--seed", HUGE], "generate", ["--seed", HUGE, "2**63 - 1"]),
    (G + ["--seed", "-1"], "generate", ["--seed", "got -1"]),
    (G + ["--layer-seed", HUGE], "generate", ["--layer-seed", HUGE]),
    (G + ["--dtype", "fp64"], "generate", ["--dtype", "'fp64'", "bf16", "fp16", "fp32"]),
    (G + ["--device", "tpu"], "generate", ["--device", "'tpu'", "cpu, cuda or cuda:N"]),
    (G + ["--device", "cpu:1"], "generate", ["--device", "'cpu:1'"]),
    (["generate", "{ckpt}", "--prompt-ids", "1,-2"], "generate", ["--prompt-ids", "'1,-2'", ">= 0"]),
    (["generate", "{ckpt}", "--prompt-ids", "5,"], "generate", ["--prompt-ids", "'5,'"]),
    (["generate", "{ckpt}"], "generate", ["--prompt", "--prompt-ids"]),
    (["generate", "{bare}", "--prompt", "hi"], "generate", ["--prompt", "{bare}", "tokenizer", "--prompt-ids"]),
    (G + ["--strategy", "shortgpt", "--target-speedup", "2"], "generate", ["--strategy shortgpt", "--calibration"]),
    (G + ["--strategy", "fastest"], "generate", ["--strategy", "'fastest'"]),
    (B + ["--new-tokens", "0"], "bench", ["--new-tokens", "got 0"]),
    (B + ["--batch-sizes", "1,-4"], "bench", ["--batch-sizes", "got -4"]),
    (B + ["--threads", "0"], "bench", ["--threads", "got 0"]),
    (B + ["--seed", HUGE], "bench", ["--seed", HUGE]),
    (B + ["--repeats", "0"], "bench", ["--repeats", "got 0"]),
    (B + ["--warmup", "-1"], "bench", ["--warmup", "got -1"]),
    (B + ["--target-speedups", "0.5"], "bench", ["--target-speedups", "0.5"]),
    (B + ["--plot", "{dir}/p.jpg"], "bench", ["--plot", "p.jpg", ".png"]),
    (D + ["--min-words", "0"], "data gettext", ["--min-words", "got 0"]),
    (D + ["--min-words", "9", "--max-words", "5"], "data gettext", ["--max-words", "(9)", "got 5"]),
    (D + ["--test-size", "-1"], "data gettext", ["--test-size", "got -1"]),
    (D + ["--seed", "-3"], "data gettext", ["--seed", "got -3"]),
    (["data"], "data", ["gettext"]),
    (C + ["--num-records", "0"], "calibrate", ["--num-records", "got 0"]),
    (C + ["--max-tokens", "-1"], "calibrate", ["--max-tokens", "got -1"]),
    (C + ["--batch-size", "0"], "calibrate", ["--batch-size", "got 0"]),
    (E + ["--max-new-tokens", "0"], "eval", ["--max-new-tokens", "got 0"]),
    (E + ["--num-beams", "0"], "eval", ["--num-beams", "got 0"]),
    (E + ["--limit", "0"], "eval", ["--limit", "got 0"]),
    (E + ["--no-repeat-ngram-size", "-1"], "eval", ["--no-repeat-ngram-size", "got -1"]),
    (E + ["--repetition-penalty", "0"], "eval", ["--repetition-penalty", "got 0"]),
    (E + ["--repetition-penalty", "inf"], "eval", ["--repetition-penalty", "inf"]),
    (E + ["--layer-seed", "-1"], "eval", ["--layer-seed", "got -1"]),
    (E + ["--dtype", "int8"], "eval", ["--dtype", "'int8'"]),
    (E + ["--strategy", "shortgpt", "--target-speedup", "2"], "eval", ["--strategy shortgpt", "--calibration"]),
    (["convert", "{notgguf}", "{dir}/out", "--dtype", "fp8"], "convert", ["--dtype", "'fp8'", "auto, float32"]),
    (["frobnicate"], "", ["'frobnicate'", "schedule", "generate"]),
]

FILES = [
    (["generate", "{missing}", "--prompt-ids", "1"], "generate", ["{missing}", "does not exist"]),
    (["generate", "{noconf}", "--prompt-ids", "1"], "generate", ["{noconf}", "config.json"]),
    (["generate", "{badjson}", "--prompt-ids", "1"], "generate", ["config.json", "not valid JSON"]),
    (["generate", "{existing}", "--prompt-ids", "1"], "generate", ["{existing}", "is a file"]),
    (["generate", "{noweights}", "--prompt-ids", "1"], "generate", ["{noweights}", "no weights"]),
    (["generate", "{trunc}", "--prompt-ids", "1"], "generate", ["model.safetensors", "truncated or corrupt"]),
    (["calibrate", "{noweights}", "--data", "{data}", "--out", "{dir}/bi.json"], "calibrate", ["{noweights}"]),
    (["calibrate", "{trunc}", "--data", "{data}", "--out", "{dir}/bi.json"], "calibrate",
     ["{trunc}", "truncated or corrupt"]),
    (G + ["--strategy", "shortgpt", "--target-speedup", "2", "--calibration", "{missing}"], "generate",
     ["{missing}"]),
    (["eval", "{missing}", "--data", "{data}"], "eval", ["{missing}", "does not exist"]),
    (["eval", "{noconf}", "--data", "{data}"], "eval", ["{noconf}", "config.json"]),
    (["eval", "{badjson}", "--data", "{data}"], "eval", ["not valid JSON"]),
    (["eval", "{bare}", "--data", "{data}"], "eval", ["{bare}", "no tokenizer"]),
    (["eval", "{ckpt}", "--data", "{missing}/*.jsonl"], "eval", ["--data", "matches no files"]),
    (["eval", "{ckpt}", "--data", "{existing}"], "eval", ["{existing}", "missing field 'prefix'"]),
    (["eval", "{ckpt}", "--data", "{badrec}"], "eval", ["{badrec}", "line 1", "not valid JSON"]),
    (["calibrate", "{missing}", "--data", "{data}", "--out", "{dir}/bi.json"], "calibrate", ["{missing}"]),
    (["calibrate", "{noconf}", "--data", "{data}", "--out", "{dir}/bi.json"], "calibrate", ["config.json"]),
    (["calibrate", "{badjson}", "--data", "{data}", "--out", "{dir}/bi.json"], "calibrate", ["not valid JSON"]),
    (["calibrate", "{bare}", "--data", "{data}", "--out", "{dir}/bi.json"], "calibrate", ["no tokenizer"]),
    (["calibrate", "{ckpt}", "--data", "{txt}", "--out", "{dir}/bi.json"], "calibrate", ["--data", "d.txt"]),
    (["bench", "--model", "{noconf}"], "bench", ["--model", "config.json"]),
    (["bench", "--model", "{badjson}"], "bench", ["config.json"]),
    (["bench", "--model", "{missing}"], "bench", ["--model", "{missing}"]),
    (["bench", "--merge", "{missing}"], "bench", ["--merge", "{missing}"]),
    (["convert", "{missing}", "{dir}/out"], "convert", ["{missing}", "does not exist"]),
    (["convert", "{notgguf}", "{dir}/out"], "convert", ["not.gguf", "not a GGUF"]),
    (D + ["--locale-dir", "{missing}"], "data gettext", ["--locale-dir", "{missing}"]),
    (D + ["--tokenizer", "{missing}"], "data gettext", ["--tokenizer", "{missing}"]),
]

OUTPUT = [
    (B + ["--json", "{dir}"], "bench", ["--json", "{dir}", "is a folder; give a file path"]),
    (B + ["--plot", "{dir}"], "bench", ["--plot", "{dir}", "is a folder; give a file path"]),
    (B + ["--json", "{dir}/o.json", "--plot", "{dir}/o.json"], "bench", ["--json", "--plot", "same file"]),
    (B + ["--json", "{missing}/o.json"], "bench", ["--json", "does not exist"]),
    (["bench", "--merge", "{existing}", "--json", "{dir}"], "bench", ["--json", "is a folder"]),
    (C[:-1] + ["{existing}"], "calibrate", ["--out", "{existing}", "exists", "--overwrite"]),
    (C[:-1] + ["{dir}"], "calibrate", ["--out", "{dir}", "is a folder"]),
    (C[:-1] + ["{dir}", "--overwrite"], "calibrate", ["--out", "{dir}", "is a folder"]),
    (C[:-1] + ["{missing}/bi.json"], "calibrate", ["--out", "does not exist"]),
    (E + ["--json", "{dir}"], "eval", ["--json", "{dir}", "is a folder"]),
    (E + ["--json", "{missing}/r.json"], "eval", ["--json", "does not exist"]),
    (["data", "gettext", "--lang", "de", "--out", "{full}"], "data gettext", ["--out", "{full}"]),
    (["data", "gettext", "--lang", "de", "--out", "{existing}"], "data gettext", ["--out", "not a folder"]),
]

CUDA_DEVICE = [
    (G + ["--device", "cuda"], "generate", ["--device cuda: CUDA is not available on this machine (use --device cpu)"]),
    (G + ["--device", "cuda:1"], "generate", ["--device cuda:1", "not available"]),
    (E + ["--device", "cuda"], "eval", ["--device cuda", "not available"]),
    (C + ["--device", "cuda"], "calibrate", ["--device cuda", "not available"]),
    (B + ["--device", "cuda"], "bench", ["--device cuda", "not available"]),
]


def _ids(cases):
    return [" ".join(a)[:60] for a, _, _ in cases]


@pytest.mark.parametrize("argv, cmd, culprits", TYPE, ids=_ids(TYPE))
def test_type_fault(f, capsys, argv, cmd, culprits):
    fails(capsys, fmt(argv, f), cmd, *fmt(culprits, f))


@pytest.mark.parametrize("argv, cmd, culprits", RANGE, ids=_ids(RANGE))
def test_range_fault(f, capsys, argv, cmd, culprits):
    fails(capsys, fmt(argv, f), cmd, *fmt(culprits, f))


@pytest.mark.parametrize("argv, cmd, culprits", FILES, ids=_ids(FILES))
def test_missing_or_corrupt_file(f, capsys, argv, cmd, culprits):
    fails(capsys, fmt(argv, f), cmd, *fmt(culprits, f))


@pytest.mark.parametrize("argv, cmd, culprits", OUTPUT, ids=_ids(OUTPUT))
def test_existing_or_unwritable_output(f, capsys, argv, cmd, culprits):
    before = sorted(os.listdir(f["dir"]))
    fails(capsys, fmt(argv, f), cmd, *fmt(culprits, f))
    assert sorted(os.listdir(f["dir"])) == before            # nothing written, no temporary files left
    assert os.listdir(f["full"]) == ["keep.txt"]
    with open(f["existing"]) as fh:
        assert fh.read() == "{}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
@pytest.mark.parametrize("argv, cmd, culprits", CUDA_DEVICE, ids=_ids(CUDA_DEVICE))
def test_cuda_without_cuda(f, capsys, argv, cmd, culprits):
    fails(capsys, fmt(argv, f), cmd, *fmt(culprits, f))


def test_checks_come_before_loading(f, capsys, monkeypatch):
    """A bad flag is reported before the checkpoint is read at all."""
    from ulskip.runtime.engine import Engine

    def boom(*a, **k):
        raise AssertionError("loaded before checking the flags")
    monkeypatch.setattr(Engine, "from_pretrained", boom)
    for argv in (G + ["--num-beams", "0"], G + ["--device", "tpu"], E + ["--batch-size", "0"]):
        fails(capsys, fmt(argv, f), argv[0], argv[-2])


def test_exit_status_reads_as_the_line(f, capsys):
    with pytest.raises(SystemExit) as e:
        main(fmt(G + ["--num-beams", "0"], f))
    assert isinstance(e.value.code, ExitStatus) and e.value.code == 2
    assert str(e.value.code) == str(e.value) == capsys.readouterr().err.strip()


def test_version(capsys):
    assert run_cli(["--version"]) == 0
    out = capsys.readouterr().out.strip()  # the version, the torch and whether the compiled ops have CUDA
    assert out.startswith(f"ulskip {__version__} (torch ") and "compiled ops ulskip._C: CPU" in out


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_reraises(f, capsys, where):
    argv = ["schedule", "--layers", "8", "--target-speedup", "9"]
    with pytest.raises(ValueError, match="target_speedup"):
        main(["--debug", *argv] if where == "before" else [*argv, "--debug"])
    gettext = fmt(D[2:] + ["--seed", "-1"], f)
    with pytest.raises(ValueError, match="--seed"):
        main(["data", "gettext", *gettext, "--debug"] if where == "after" else ["data", "--debug", "gettext", *gettext])
    assert capsys.readouterr().err == ""


def test_debug_prints_traceback_and_plain_run_does_not():
    argv = [sys.executable, "-m", "ulskip.cli", "schedule", "--layers", "8", "--target-speedup", "9"]
    plain = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    assert plain.stderr.splitlines() == [plain.stderr.strip()] and plain.stderr.startswith("ulskip schedule: ")
    debug = subprocess.run(argv + ["--debug"], capture_output=True, text=True, timeout=120, check=False)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "ValueError: target_speedup" in debug.stderr


def _patch_handler(monkeypatch, exc):
    from ulskip.cli import schedule

    def run(args):
        raise exc
    monkeypatch.setattr(schedule, "run", run)


@pytest.mark.parametrize("msg", ["ulskip schedule: boom", "ulskip schedule: error: boom", "boom"])
def test_handler_system_exit_keeps_one_prefix(capsys, monkeypatch, msg):
    _patch_handler(monkeypatch, SystemExit(msg))
    assert fails(capsys, ["schedule", "--layers", "8", "--target-speedup", "2"], "schedule") == "ulskip schedule: boom"


def test_handler_expected_errors(capsys, monkeypatch):
    cases = [(FileNotFoundError(2, "No such file or directory", "/x/y"), "No such file or directory: '/x/y'"),
             (PermissionError(13, "Permission denied", "/root/z"), "Permission denied: '/root/z'"),
             (NotADirectoryError("'/a' is not a folder"), "'/a' is not a folder"),
             (OSError("disk on fire\nsecond line"), "disk on fire second line"),
             (ModuleNotFoundError("No module named 'gguf'", name="gguf"), "pip install gguf")]
    from ulskip.train.data import DataError
    cases.append((DataError("a.jsonl:3: missing field 'text'"), "a.jsonl:3: missing field 'text'"))
    for exc, want in cases:
        _patch_handler(monkeypatch, exc)
        assert want in fails(capsys, ["schedule", "--layers", "8", "--target-speedup", "2"], "schedule")


def test_interrupt_and_bugs(capsys, monkeypatch):
    argv = ["schedule", "--layers", "8", "--target-speedup", "2"]
    _patch_handler(monkeypatch, KeyboardInterrupt())
    assert run_cli(argv) == 130
    assert capsys.readouterr().err.strip() == "ulskip schedule: interrupted"
    _patch_handler(monkeypatch, RuntimeError("a bug"))
    with pytest.raises(RuntimeError, match="a bug"):      # anything unexpected keeps its traceback
        main(argv)
    _patch_handler(monkeypatch, ImportError("cannot import name 'x'", name="ulskip.models"))
    with pytest.raises(ImportError):                      # our own module failing to import is a bug
        main(argv)


def test_train_errors_stay_its_own(f, capsys, tmp_path):
    rc = run_cli(["train", "--model_name_or_path", f["missing"], "--train_file", f["data"],
                  "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and err.startswith("ulskip train: ") and f["missing"] in err
    assert not (tmp_path / "out").exists()
    fails(capsys, ["train", "--output_dir", str(tmp_path / "out")], "train", "--model-name-or-path")


def test_plot_path_written_is_the_one_printed(tmp_path, capsys):
    row = {"system": "ulskip", "target_speedup": 1, "num_kept": 8, "num_layers": 8, "batch_size": 1,
           "prompt_len": 8, "new_tokens": 4, "status": "ok", "tokens_per_s": 10.0, "prefill_ms": 1.0,
           "decode_ms_per_step": 1.0, "error": None}
    meta = {"model": "tiny-llama", "device": "cpu", "device_type": "cpu", "command": "ulskip bench"}
    (tmp_path / "a.json").write_text(json.dumps({"meta": meta, "rows": [row]}))
    plot = tmp_path / "plot"                               # no extension: matplotlib alone would add .png
    assert main(["bench", "--merge", str(tmp_path / "a.json"), "--plot", str(plot)]) == 0
    assert f"wrote {plot}" in capsys.readouterr().out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(os.listdir(tmp_path)) == ["a.json", "plot"]


# ----------------------------------------------------------------------------------------------------
# --help: exits 0, a description, and every option states its default
# ----------------------------------------------------------------------------------------------------


def option_entries(help_text: str) -> list[str]:
    """The entries of the options section, each flattened to one line."""
    entries, section = [], None
    for line in help_text.splitlines():
        if re.match(r"^\S.*:$", line):
            section = line
            continue
        if section not in ("options:", "optional arguments:"):
            continue
        if re.match(r"^  -", line):
            entries.append([line])
        elif entries and line.startswith("   "):
            entries[-1].append(line)
    return [" ".join(" ".join(e).split()) for e in entries]


HELP = [[name] for name in SUBCOMMANDS] + [["data", "gettext"]]


@pytest.mark.parametrize("cmd", HELP, ids=[" ".join(c) for c in HELP])
def test_help(cmd, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    assert run_cli([*cmd, "--help"]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: ulskip {' '.join(cmd)}")
    entries = option_entries(text)
    assert entries and any(e.startswith("--debug") for e in entries)
    if cmd == ["train"]:
        return                                             # train's help is its owner's
    desc = text.split("\n\n")[1]                          # after the usage block
    assert desc.strip() and not desc.startswith(("positional arguments:", "options:", " "))
    for e in entries:
        if not e.startswith("-h, --help"):
            assert "default" in e.lower(), e


def test_top_level_help_and_no_command(capsys):
    assert run_cli(["--help"]) == 0
    text = capsys.readouterr().out
    assert all(name in text for name in SUBCOMMANDS) and "--version" in text and "--debug" in text
    assert run_cli([]) == 2
