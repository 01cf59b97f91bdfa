"""A GGUF checkpoint (llama.cpp's format, often quantized) -> a Hugging Face safetensors folder.

transformers dequantizes the GGUF (with the `gguf` package) and rebuilds its tokenizer, but will not
`save_pretrained` a GGUF-loaded model, so the weights are copied into a plain model of the same config.
The engine and `ulskip train` then load the folder like any other checkpoint.
"""
from __future__ import annotations

import copy
import os
import shutil

import torch

from ulskip.loading.config import FAMILIES, SUPPORTED
from ulskip.loading.folders import move_into_place

DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def gguf_architecture(gguf_path: str) -> str:
    """The file's `general.architecture`, after checking that it is a GGUF at all."""
    if not os.path.exists(gguf_path):
        raise FileNotFoundError(f"GGUF file {gguf_path!r} does not exist")
    if not os.path.isfile(gguf_path):
        raise ValueError(f"GGUF path {gguf_path!r} is not a file")
    with open(gguf_path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"{gguf_path!r} is not a GGUF file (it does not start with the magic bytes 'GGUF')")
    try:
        import gguf
    except ImportError:
        raise ImportError("converting a GGUF needs the `gguf` package: pip install gguf") from None
    try:
        reader = gguf.GGUFReader(gguf_path)
    except Exception as e:  # truncated or corrupt header: name the file
        raise ValueError(f"GGUF file {gguf_path!r} is unreadable (truncated or corrupt?): {e}") from None
    field = reader.fields.get("general.architecture")
    if field is None:
        raise ValueError(f"GGUF file {gguf_path!r} has no general.architecture field")
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def convert_gguf(gguf_path: str, out_dir: str, dtype: str = "auto", overwrite: bool = False) -> str:
    """Write `out_dir` (config.json, model.safetensors, tokenizer, generation_config.json) from a GGUF.

    dtype: "auto" keeps what transformers dequantizes to (float32), or float32 / bfloat16 / float16.
    Everything is checked before anything is written; the folder appears complete or not at all.
    Returns the absolute path of the folder.
    """
    if dtype not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; allowed: {', '.join(DTYPES)}")
    arch = gguf_architecture(gguf_path)
    # A Mistral GGUF says "llama"; transformers tells them apart by general.name.
    if arch not in FAMILIES:
        raise ValueError(f"GGUF file {gguf_path!r} has unsupported architecture {arch!r}; supported: {SUPPORTED}")
    out_dir = os.path.abspath(out_dir)  # abspath also drops a trailing "/", which would put tmp inside out_dir
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"output path {out_dir!r} exists and is not a folder")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise ValueError(f"output folder {out_dir!r} exists and is not empty; pass overwrite=True (--overwrite)")

    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = f"{out_dir}.tmp-{os.getpid()}"  # a sibling, so the final rename stays on one filesystem
    shutil.rmtree(tmp, ignore_errors=True)  # a crashed earlier run with the same pid
    os.makedirs(tmp)
    try:
        _write(gguf_path, tmp, DTYPES[dtype])
        move_into_place(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _write(gguf_path: str, folder: str, dtype: torch.dtype | None) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    src_dir, name = os.path.split(os.path.abspath(gguf_path))
    # dequantize=True: with the `kernels` package installed, transformers would otherwise keep packed blocks.
    src, info = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, output_loading_info=True,
                                                     quantization_config=GgufConfig(dequantize=True))
    # transformers fills a tensor the GGUF lacks with random values and only warns; a checkpoint must not
    bad = sorted(info["missing_keys"]) + sorted(str(k) for k in info["mismatched_keys"])
    if bad:
        raise ValueError(f"GGUF file {gguf_path!r} lacks (or has wrongly shaped) tensors for: {', '.join(bad)}")
    tok = None
    if _has_tokenizer(gguf_path):
        tok = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)

    config = copy.deepcopy(src.config)
    config.__dict__.pop("quantization_config", None)  # the folder holds plain tensors
    if tok is not None:  # the GGUF's special tokens, not the config class defaults, drive generation
        for kind in ("bos", "eos", "pad"):
            if getattr(tok, f"{kind}_token_id", None) is not None:
                setattr(config, f"{kind}_token_id", getattr(tok, f"{kind}_token_id"))
    dtype = dtype or src.dtype
    config.dtype = dtype
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)  # ties embeddings like the source
    model.load_state_dict(src.state_dict(), strict=True)
    del src
    model.save_pretrained(folder)
    if tok is not None:
        tok.save_pretrained(folder)


def _has_tokenizer(gguf_path: str) -> bool:
    import gguf
    return "tokenizer.ggml.tokens" in gguf.GGUFReader(gguf_path).fields
