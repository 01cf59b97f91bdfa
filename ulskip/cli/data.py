"""`ulskip data gettext --lang de --out DIR`: build fine-tuning / evaluation data sets."""
import sys

from ulskip.cli import add_debug_flag, check_min, check_seed


def add_arguments(p):
    sub = p.add_subparsers(dest="data_command", metavar="{gettext}")
    g = sub.add_parser("gettext", help="English->X translation pairs from the system's gettext catalogs",
                       description="English->X translation pairs from <locale-dir>/<lang>/LC_MESSAGES/*.mo, "
                                   "written as train.jsonl, test.jsonl and meta.json for `ulskip train`.")
    g.add_argument("--lang", required=True,
                   help="target language: a folder of --locale-dir, e.g. de, fr, pt_BR; region variants are not "
                        "merged in (required, no default)")
    g.add_argument("--out", required=True, help="output folder; must be new or empty (required, no default)")
    g.add_argument("--tokenizer", default=None,
                   help="local checkpoint/tokenizer folder whose chat template wraps the prompt (default: "
                        "none, plain 'English: ...\\n<Language>:\\n' prompts)")
    g.add_argument("--locale-dir", default="/usr/share/locale", help="catalog folder (default: %(default)s)")
    g.add_argument("--test-size", type=int, default=500,
                   help="pairs held out for test.jsonl, >= 0 (default: %(default)s)")
    g.add_argument("--seed", type=int, default=0,
                   help="seed of the train/test shuffle, in [0, 2**63-1] (default: %(default)s)")
    g.add_argument("--min-words", type=int, default=4,
                   help="fewest words of the English side, >= 1 (default: %(default)s)")
    g.add_argument("--max-words", type=int, default=30,
                   help="most words of the English side, >= --min-words (default: %(default)s)")
    g.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out folder written by this command (default: off, refuse)")
    add_debug_flag(g)
    g.set_defaults(cli_label="data gettext")


def run(args) -> int:
    if args.data_command != "gettext":
        raise ValueError("choose a data set: gettext (see `ulskip data gettext --help`)")
    check_min("--test-size", args.test_size, 0)
    check_min("--min-words", args.min_words, 1)
    check_min("--max-words", args.max_words, args.min_words, f">= --min-words ({args.min_words})")
    check_seed("--seed", args.seed)
    from ulskip.datasets.gettext import build_gettext_pairs
    meta = build_gettext_pairs(args.lang, args.out, tokenizer_path=args.tokenizer, locale_dir=args.locale_dir,
                               test_size=args.test_size, seed=args.seed, min_words=args.min_words,
                               max_words=args.max_words, overwrite=args.overwrite)
    for name, err in meta["catalogs_unreadable"].items():
        print(f"ulskip data gettext: warning: skipped unreadable catalog {name} ({err})", file=sys.stderr)
    steps = meta["filters"]
    dropped = ", ".join(f"{s['step']} {s['dropped']}" for s in steps[1:] if s["dropped"])
    print(f"{meta['lang']} ({meta['language']}): {meta['catalogs']} catalogs, {steps[0]['left']} entries "
          f"-> {meta['pairs']} pairs (dropped: {dropped or 'none'})")
    print(f"train {meta['train']}, test {meta['test']}, format {meta['format']}, seed {meta['seed']} -> {args.out}")
    return 0
