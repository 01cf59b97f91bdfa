"""`ulskip calibrate CKPT --data d.jsonl --out bi.json`: Block Influence per layer, for --strategy shortgpt."""
import json
import os
import sys


def add_arguments(p):
    p.add_argument("model", help="local Hugging Face checkpoint folder")
    p.add_argument("--data", required=True, help="json/jsonl file(s) of {prefix, text} records (glob, comma-separated)")
    p.add_argument("--out", required=True, help="JSON file to write (refused if it exists, unless --overwrite)")
    p.add_argument("--num-records", type=int, default=256, help="records to score (default 256)")
    p.add_argument("--max-tokens", type=int, default=256, help="tokens per record, cut after (default 256)")
    p.add_argument("--batch-size", type=int, default=8, help="records per forward (default 8)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out (default: refuse)")


def run(args) -> int:
    from ulskip.calibration import calibrate
    from ulskip.train.data import DataError, resolve_files

    if os.path.exists(args.out) and not args.overwrite:
        raise SystemExit(f"ulskip calibrate: --out {args.out!r} exists; pass --overwrite to replace it")
    folder = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(folder):
        raise SystemExit(f"ulskip calibrate: --out {args.out!r}: folder {folder!r} does not exist")
    try:
        result = calibrate(args.model, resolve_files(args.data), args.num_records, args.max_tokens, args.device,
                           args.batch_size)
    except (DataError, ValueError, OSError) as e:
        raise SystemExit(f"ulskip calibrate: {e}")
    tmp = f"{args.out}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, args.out)  # a complete file or none
    bi = result["block_influence"]
    order = sorted(range(len(bi)), key=lambda i: bi[i])
    print(f"wrote {args.out}: Block Influence of {len(bi)} layers on {result['records']} records "
          f"({result['tokens']} tokens); lowest (dropped first by --strategy shortgpt): {order[:8]}", file=sys.stdout)
    return 0
