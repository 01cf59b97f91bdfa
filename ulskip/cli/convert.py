"""`ulskip convert MODEL.gguf OUT_DIR`: a GGUF checkpoint -> a safetensors folder the engine loads."""
import glob
import json
import os

from ulskip.cli import require

DTYPES = ("auto", "float32", "bfloat16", "float16")
ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}


def add_arguments(p):
    p.add_argument("gguf", help="the .gguf file to convert (quantized or not; dequantized on the way) (required)")
    p.add_argument("out_dir", help="folder to write (config.json, model.safetensors, tokenizer); "
                                   "must not exist or be empty unless --overwrite (required)")
    p.add_argument("--dtype", default="auto",
                   help="auto, float32, bfloat16 or float16 (also fp32, bf16, fp16) (default: %(default)s, what "
                        "transformers dequantizes to: float32)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty OUT_DIR, once the new folder is complete (default: off, refuse)")


def run(args) -> int:
    dtype = ALIASES.get(args.dtype, args.dtype)
    require(dtype in DTYPES, "--dtype", f"one of {', '.join(DTYPES)} (or {', '.join(ALIASES)})", args.dtype)
    from ulskip.loading.gguf import convert_gguf
    out = convert_gguf(args.gguf, args.out_dir, dtype=dtype, overwrite=args.overwrite)
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
