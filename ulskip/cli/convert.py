"""`ulskip convert MODEL.gguf OUT_DIR`: a GGUF checkpoint -> a safetensors folder the engine loads."""
import glob
import json
import os


def add_arguments(p):
    p.add_argument("gguf", help="the .gguf file to convert (quantized or not; dequantized on the way)")
    p.add_argument("out_dir", help="folder to write (config.json, model.safetensors, tokenizer); "
                                   "must not exist or be empty unless --overwrite")
    p.add_argument("--dtype", default="auto",
                   help="auto, float32, bfloat16 or float16 (default: auto, what transformers dequantizes to: "
                        "float32)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty OUT_DIR, once the new folder is complete (default: refuse)")


def run(args) -> int:
    from ulskip.loading.gguf import convert_gguf
    try:
        out = convert_gguf(args.gguf, args.out_dir, dtype=args.dtype, overwrite=args.overwrite)
    except (ValueError, FileNotFoundError, OSError, ImportError) as e:
        raise SystemExit(f"ulskip convert: {e}")
    from safetensors import safe_open
    n, dtypes = 0, set()
    for file in sorted(glob.glob(os.path.join(out, "*.safetensors"))):
        with safe_open(file, framework="pt") as f:
            n += len(f.keys())
            dtypes |= {f.get_slice(k).get_dtype() for k in f.keys()}
    with open(os.path.join(out, "config.json")) as f:
        model_type = json.load(f)["model_type"]
    tok = "with tokenizer" if os.path.isfile(os.path.join(out, "tokenizer_config.json")) else "no tokenizer"
    print(f"wrote {out}: {n} tensors, {'/'.join(sorted(dtypes))}, architecture {model_type}, {tok}")
    return 0
