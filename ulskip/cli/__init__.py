"""`ulskip` command line: schedule, generate, bench, train.

Each heavy subcommand lives in its own module exposing `add_arguments(parser)` and `run(args) -> int`;
it is imported only when chosen, so `ulskip schedule` stays instant.
"""
from __future__ import annotations

import argparse
import importlib
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
}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="ulskip", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(SUBCOMMANDS) + "}")
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_)
        if name == chosen:
            mod = importlib.import_module(module)
            mod.add_arguments(p)
            p.set_defaults(handler=mod.run)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
