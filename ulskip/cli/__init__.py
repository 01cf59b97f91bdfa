"""`ulskip` command line: schedule, generate, convert, data, calibrate, eval, bench, train.

Each heavy subcommand lives in its own module exposing `add_arguments(parser)` and `run(args) -> int`;
it is imported only when chosen, so `ulskip schedule` stays instant.

Errors. Every expected error (bad input, missing or unreadable files, a missing optional package) is one
line on stderr, `ulskip <cmd>: <message>`, and exit status 2; `--debug` shows the traceback instead.
Ctrl-C is `ulskip <cmd>: interrupted`, status 130. Anything else is a bug and keeps its traceback.
Called from Python, `main()` returns the handler's status, and on such an error raises SystemExit whose
`code` is the status (an int) and reads as the message line (str(code)), after printing that line.

The checks the subcommands share (flag ranges, devices, dtypes, output paths, checkpoint folders, data
globs) are here, so every message has one form: `--flag must be <what is allowed>, got <value>`.
"""
from __future__ import annotations

import argparse
import glob
import importlib
import os
import re
import sys

# name -> (module, help)
SUBCOMMANDS = {
    "schedule": ("ulskip.cli.schedule", "print the kept layers for a target speedup"),
    "generate": ("ulskip.cli.generate", "generate text from a checkpoint folder with layer skipping"),
    "convert": ("ulskip.cli.convert", "convert a GGUF checkpoint into a safetensors folder the engine loads"),
    "data": ("ulskip.cli.data", "build fine-tuning / evaluation data sets (gettext translation pairs)"),
    "calibrate": ("ulskip.cli.calibrate", "Block Influence per layer on calibration text (for --strategy shortgpt)"),
    "eval": ("ulskip.cli.eval", "quality of a checkpoint under a schedule: BLEU, chrF, perplexity, tokens/s"),
    "bench": ("ulskip.cli.bench", "throughput against Hugging Face baselines, with roofline"),
    "train": ("ulskip.cli.train", "fine-tune a Hugging Face model with the ULS schedule"),
    "serve": ("ulskip.cli.serve", "an OpenAI-compatible HTTP server with continuous batching"),
    "export": ("ulskip.cli.export", "a prefill-\"skip\" checkpoint as a plain Hugging Face model of its kept layers"),
}

# OSError covers FileNotFoundError, NotADirectoryError, PermissionError; ValueError covers DataError
EXPECTED = (ValueError, OSError, ImportError)
USAGE_STATUS, INTERRUPT_STATUS = 2, 130
SEED_MAX = 2 ** 63 - 1  # torch.Generator.manual_seed takes a 64-bit seed
DEBUG_HELP = "on an error, raise it with its traceback (default: off, one line on stderr)"


# ----------------------------------------------------------------------------------------------------
# Exit and argument parsing
# ----------------------------------------------------------------------------------------------------


class ExitStatus(int):
    """An exit status that reads as its message: SystemExit(ExitStatus(2, line)) exits with status 2
    (the interpreter prints nothing for an int code), while str(exc.code) and str(exc) give the line."""

    def __new__(cls, status: int, message: str):
        self = super().__new__(cls, status)
        self.message = message
        return self

    def __str__(self) -> str:
        return self.message


class UsageError(Exception):
    """argparse found bad arguments (raised by Parser.error instead of printing the usage block)."""

    def __init__(self, prog: str, message: str):
        super().__init__(message)
        self.prog = prog


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line ("ulskip generate: --num-beams: invalid int value:
    'x'"), not the usage block; subparsers are made of this class too."""

    def error(self, message):
        message = re.sub(r"^argument \{[^}]*\}: ", "", message)  # the subcommand: its metavar lists them all
        raise UsageError(self.prog, re.sub(r"^argument ([^:]+): ", r"\1: ", message))


def add_debug_flag(p: argparse.ArgumentParser) -> None:
    """--debug on a (sub)parser. SUPPRESS: a subparser that did not see the flag leaves the value another
    level set (`ulskip --debug generate ...` and `ulskip generate ... --debug` both work)."""
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def _strip_prefix(msg: str, label: str, command: str | None) -> str:
    """'ulskip eval: x' / 'ulskip bench: error: x' -> 'x' (no doubled prefix)."""
    for pre in (f"ulskip {label}:", f"ulskip {command}:", "ulskip:"):
        if msg.startswith(pre):
            msg = msg[len(pre):].lstrip()
            break
    return msg[len("error:"):].lstrip() if msg.startswith("error:") else msg


def describe(e: BaseException) -> str:
    """The message of an expected error, on one line."""
    if isinstance(e, OSError) and e.strerror and e.filename is not None:
        msg = f"{e.strerror}: {e.filename!r}" + (f" -> {e.filename2!r}" if e.filename2 is not None else "")
    elif isinstance(e, ModuleNotFoundError) and e.name and "pip install" not in str(e):
        msg = f"{e} (an optional dependency: pip install {e.name.split('.')[0]})"
    else:
        msg = str(e) or type(e).__name__
    return _one_line(msg)


def _is_expected(e: BaseException) -> bool:
    if isinstance(e, ImportError):  # a missing optional package; our own modules failing to import is a bug
        return (e.name or "").split(".")[0] != "ulskip"
    return isinstance(e, EXPECTED)


def _fail(label: str, msg: str, status: int = USAGE_STATUS) -> SystemExit:
    """Print the one line; return the SystemExit to raise."""
    line = f"ulskip {label}: {msg}" if label else f"ulskip: {msg}"
    print(line, file=sys.stderr, flush=True)
    return SystemExit(ExitStatus(status, line))


class _Version(argparse.Action):
    """--version: the build is looked at only when asked (it imports torch and the compiled core)."""

    def __call__(self, parser, namespace, values, option_string=None):
        from ulskip import __version__
        try:
            import torch
            from ulskip.kernels.cache_write import has_cuda_ops, is_available
            ops = ("CPU + CUDA" if has_cuda_ops() else "CPU only") if is_available() else "not built"
            extra = f" (torch {torch.__version__}; compiled ops ulskip._C: {ops})"
        except ImportError as e:
            extra = f" ({e})"
        print(f"ulskip {__version__}{extra}")
        parser.exit()


def build_parser(chosen: str | None) -> argparse.ArgumentParser:
    parser = Parser(prog="ulskip", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action=_Version, nargs=0,
                        help="print the version, the torch it runs on and whether the compiled ops have CUDA, "
                             "then exit")
    parser.add_argument("--debug", action="store_true", default=False, help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(SUBCOMMANDS) + "}")
    for name, (module, help_) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        if name == chosen:
            mod = importlib.import_module(module)
            if mod.__doc__:
                p.description = mod.__doc__.strip().splitlines()[0]
            mod.add_arguments(p)
            add_debug_flag(p)
            p.set_defaults(handler=mod.run)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    label = chosen if chosen in SUBCOMMANDS else ""
    try:
        args = build_parser(chosen).parse_args(argv)
    except UsageError as e:
        raise _fail(e.prog[len("ulskip"):].strip(), f"{_one_line(e)} (see `{e.prog} --help`)") from None
    except KeyboardInterrupt:
        raise _fail(label, "interrupted", INTERRUPT_STATUS) from None
    if args.command is None:
        build_parser(None).print_help()
        return USAGE_STATUS
    label = getattr(args, "cli_label", None) or args.command
    debug = getattr(args, "debug", False)
    try:
        return int(args.handler(args) or 0)
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            raise
        raise _fail(label, _one_line(_strip_prefix(str(e.code), label, args.command))) from None
    except KeyboardInterrupt:
        if debug:
            raise
        raise _fail(label, "interrupted", INTERRUPT_STATUS) from None
    except Exception as e:
        if debug or not _is_expected(e):
            raise
        raise _fail(label, _strip_prefix(describe(e), label, args.command)) from None


# ----------------------------------------------------------------------------------------------------
# Checks shared by the subcommands (before any model is loaded); each raises ValueError
# ----------------------------------------------------------------------------------------------------


def require(ok: bool, flag: str, what: str, value) -> None:
    """ValueError '<flag> must be <what>, got <value>' unless ok."""
    if not ok:
        raise ValueError(f"{flag} must be {what}, got {value!r}")


def check_min(flag: str, value, lo, what: str | None = None) -> None:
    """value >= lo (None passes: the flag was not given). NaN never passes."""
    if value is not None:
        require(value >= lo, flag, what or f">= {lo}", value)


def check_seed(flag: str, value) -> None:
    if value is not None:
        require(0 <= value <= SEED_MAX, flag, "in [0, 2**63 - 1]", value)


def check_finite(flag: str, value, what: str) -> None:
    import math
    if value is not None:
        require(math.isfinite(value), flag, what, value)


def check_device(value, flag: str = "--device"):
    """cpu, cuda or cuda:N, and available here. None passes (the command's default)."""
    if value is None:
        return None
    m = re.fullmatch(r"(cpu|cuda)(?::(\d+))?", value.strip())
    if m is None or (m.group(1) == "cpu" and m.group(2) is not None):
        raise ValueError(f"{flag} must be cpu, cuda or cuda:N, got {value!r}")
    if m.group(1) == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise ValueError(f"{flag} {value}: CUDA is not available on this machine (use {flag} cpu)")
        n = torch.cuda.device_count()
        if m.group(2) is not None and int(m.group(2)) >= n:
            raise ValueError(f"{flag} {value}: this machine has {n} CUDA device{'s' * (n != 1)} "
                             f"(cuda:0{f' .. cuda:{n - 1}' if n > 1 else ''})")
    return value.strip()


def check_choice(flag: str, value, allowed) -> None:
    if value is not None:
        require(value in allowed, flag, "one of " + ", ".join(allowed), value)


def check_output_file(flag: str, path, overwrite: bool | None = None) -> None:
    """A file path a command will write: not a folder, its folder exists and is writable; when overwrite
    is not None, an existing file is refused unless overwrite."""
    if not path:
        return
    if os.path.isdir(path):
        raise ValueError(f"{flag} {path!r} is a folder; give a file path")
    if overwrite is not None and os.path.exists(path) and not overwrite:
        raise ValueError(f"{flag} {path!r} exists; pass --overwrite to replace it")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"{flag} {path!r}: folder {folder!r} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(f"{flag} {path!r}: folder {folder!r} is not writable")


def check_checkpoint(path: str, needs_tokenizer: str | None = None) -> dict:
    """A checkpoint folder with a readable config.json of a supported model_type (the loader's checks and
    messages); needs_tokenizer: what needs one (e.g. "evaluation"), refused when it has no tokenizer files.
    Returns the raw config dict."""
    from ulskip.loading.config import read_config_json
    from ulskip.loading.tokenizer import TOKENIZER_FILES
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(f"checkpoint folder {path!r} is a file; give the folder holding config.json "
                                 "and the weights")
    raw = read_config_json(path)
    if needs_tokenizer and not any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES):
        raise ValueError(f"checkpoint folder {path!r} holds no tokenizer ({', '.join(TOKENIZER_FILES)}); "
                         f"{needs_tokenizer} needs one")
    return raw


def data_files(pattern: str, flag: str = "--data") -> list[str]:
    """The json/jsonl files of a comma-separated list of globs, each of which must match a file."""
    from ulskip.train.data import resolve_files
    pats = [p.strip() for p in str(pattern).split(",") if p.strip()]
    if not pats:
        raise ValueError(f"{flag} must name json/jsonl files (globs, comma-separated), got {pattern!r}")
    for pat in pats:
        hits = [f for f in glob.glob(os.path.expanduser(pat), recursive=True) if os.path.isfile(f)]
        if not hits:
            raise FileNotFoundError(f"{flag} {pat!r} matches no files")
        bad = [f for f in hits if not f.endswith((".json", ".jsonl"))]
        if bad == [pat]:
            raise ValueError(f"{flag} {pat!r} is not a .json or .jsonl file")
        if bad:
            raise ValueError(f"{flag} {pat!r} matches {bad[0]!r}, not a .json or .jsonl file")
    return resolve_files(",".join(pats))


if __name__ == "__main__":
    sys.exit(main())


# ----------------------------------------------------------------------------------------------------
# The schedule flags of the commands that run the engine on a checkpoint (generate, eval)
# ----------------------------------------------------------------------------------------------------


def add_schedule_arguments(p) -> None:
    from ulskip.schedule import DYNAMIC_STRATEGIES, PREFILL_MODES, STRATEGIES
    p.add_argument("--target-speedup", type=float, default=None,
                   help="target speedup s (default: the checkpoint's ulskip section, else all layers)")
    p.add_argument("--strategy", default=None, choices=STRATEGIES + DYNAMIC_STRATEGIES,
                   help="layer policy for --target-speedup (default: the schedule the checkpoint was fine-tuned for "
                        "at that speedup, else paper, the ULS rule)")
    p.add_argument("--calibration", default=None,
                   help="--strategy shortgpt: the scores file of `ulskip calibrate` (default: none)")
    p.add_argument("--layer-seed", type=int, default=0,
                   help="--strategy random: seed of the drawn layers, in [0, 2**63-1] (default %(default)s)")
    p.add_argument("--prefill", default=None, choices=PREFILL_MODES,
                   help="prompt pass through all layers (full) or the kept ones (skip) (default: the "
                        "checkpoint's, else full)")


def check_schedule_arguments(args) -> None:
    check_seed("--layer-seed", args.layer_seed)
    if args.strategy == "shortgpt" and args.target_speedup is not None and not args.calibration:
        raise ValueError("--strategy shortgpt needs block_influence scores: pass --calibration FILE (written by "
                         "`ulskip calibrate`)")


def schedule_kwargs(args) -> dict:
    """Engine.from_pretrained's schedule arguments from the flags of add_schedule_arguments."""
    bi = None
    if args.calibration:
        from ulskip.calibration import read_block_influence
        bi = read_block_influence(args.calibration)
    return dict(target_speedup=args.target_speedup, strategy=args.strategy, prefill=args.prefill,
                layer_seed=args.layer_seed, block_influence=bi)
