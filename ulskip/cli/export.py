"""`ulskip export CKPT OUT`: a prefill-"skip" checkpoint -> a plain Hugging Face model of its kept layers."""
import glob
import json
import os

from ulskip.cli import check_checkpoint, check_schedule_arguments, schedule_kwargs


def add_arguments(p):
    from ulskip.schedule import DYNAMIC_STRATEGIES, PREFILL_MODES, STRATEGIES
    p.add_argument("ckpt", metavar="CKPT", help="checkpoint folder to export, trained with prefill \"skip\" (required)")
    p.add_argument("out", metavar="OUT", help="folder to write (config.json of K layers without an ulskip section, "
                               "safetensors weights, tokenizer, generation_config.json); must not exist or be "
                               "empty unless --overwrite (required)")
    p.add_argument("--target-speedup", type=float, default=None,
                   help="target speedup s: the layers its schedule keeps (default: the checkpoint's ulskip "
                        "section; given with a section, it must keep the same layers; required without one)")
    p.add_argument("--strategy", default="paper", choices=STRATEGIES + DYNAMIC_STRATEGIES,
                   help="layer policy for --target-speedup (default %(default)s: the ULS rule; skipdecode has "
                        "no fixed layer set and is refused)")
    p.add_argument("--calibration", default=None,
                   help="--strategy shortgpt: the scores file of `ulskip calibrate` (default: none)")
    p.add_argument("--layer-seed", type=int, default=0,
                   help="--strategy random: seed of the drawn layers, in [0, 2**63-1] (default %(default)s)")
    p.add_argument("--prefill", default=None, choices=PREFILL_MODES,
                   help="skip: your word that a checkpoint without an ulskip section computes with the prompt "
                        "through the kept layers (it was fine-tuned so); needed then, with --target-speedup. "
                        "full is refused: its prompt pass needs every layer (default: the checkpoint's "
                        "section, which must say skip)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty OUT, once the new folder is complete (default: off, refuse)")


def run(args) -> int:
    check_schedule_arguments(args)
    check_checkpoint(args.ckpt)
    from ulskip.loading.config import load_config
    from ulskip.loading.export import (
        check_output_folder,
        export_kept_layers,
        export_schedule,
    )
    cfg = load_config(args.ckpt)
    kw = schedule_kwargs(args)
    kept = export_schedule(args.ckpt, cfg.num_layers, cfg.ulskip, kw["target_speedup"], kw["strategy"],
                           kw["prefill"], kw["layer_seed"], kw["block_influence"])
    check_output_folder(args.ckpt, args.out, args.overwrite)
    out = export_kept_layers(args.ckpt, args.out, kept, overwrite=args.overwrite)

    from safetensors import safe_open
    n, dtypes = 0, set()
    for file in sorted(glob.glob(os.path.join(out, "*.safetensors"))):
        with safe_open(file, framework="pt") as f:
            keys = list(f.keys())
            n += len(keys)
            dtypes |= {f.get_slice(k).get_dtype() for k in keys}
    with open(os.path.join(out, "config.json")) as f:
        model_type = json.load(f)["model_type"]
    tok = "with tokenizer" if os.path.isfile(os.path.join(out, "tokenizer_config.json")) else "no tokenizer"
    print(f"wrote {out}: {len(kept)} of {cfg.num_layers} layers (kept {','.join(map(str, kept))}, renumbered "
          f"0..{len(kept) - 1}), {n} tensors, {'/'.join(sorted(dtypes))}, architecture {model_type}, {tok}")
    print("it loads as a plain model: transformers AutoModelForCausalLM.from_pretrained(OUT), vllm serve OUT, ...")
    return 0
