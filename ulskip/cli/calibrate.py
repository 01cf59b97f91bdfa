"""`ulskip calibrate CKPT --data d.jsonl --out bi.json`: Block Influence per layer, for --strategy shortgpt."""
import json
import os
import sys

from ulskip.cli import check_checkpoint, check_device, check_min, check_output_file, data_files


def add_arguments(p):
    p.add_argument("model", help="local Hugging Face checkpoint folder, with its tokenizer (required)")
    p.add_argument("--data", required=True,
                   help="json/jsonl file(s) of {prefix, text} records (glob, comma-separated) (required, no default)")
    p.add_argument("--out", required=True,
                   help="JSON file to write; refused if it exists, unless --overwrite (required, no default)")
    p.add_argument("--num-records", type=int, default=256, help="records to score, >= 1 (default %(default)s)")
    p.add_argument("--max-tokens", type=int, default=256,
                   help="tokens per record, cut after, >= 1 (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=8, help="records per forward, >= 1 (default %(default)s)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out (default: off, refuse)")


def run(args) -> int:
    check_output_file("--out", args.out, overwrite=args.overwrite)
    for flag in ("--num-records", "--max-tokens", "--batch-size"):
        check_min(flag, getattr(args, flag[2:].replace("-", "_")), 1)
    check_device(args.device)
    check_checkpoint(args.model, needs_tokenizer="calibration")
    files = data_files(args.data)
    from safetensors import SafetensorError

    from ulskip.calibration import calibrate
    try:
        result = calibrate(args.model, files, args.num_records, args.max_tokens, args.device, args.batch_size)
    except SafetensorError as e:  # transformers passes a truncated or corrupt weight file's error through
        raise ValueError(f"checkpoint folder {args.model!r}: a weight file is unreadable (truncated or corrupt?): "
                         f"{e}") from e
    tmp = f"{args.out}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1)
        os.replace(tmp, args.out)  # a complete file or none
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    bi = result["block_influence"]
    order = sorted(range(len(bi)), key=lambda i: bi[i])
    print(f"wrote {args.out}: Block Influence of {len(bi)} layers on {result['records']} records "
          f"({result['tokens']} tokens); lowest (dropped first by --strategy shortgpt): {order[:8]}", file=sys.stdout)
    return 0
