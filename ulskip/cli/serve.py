"""`ulskip serve CKPT --target-speedup 2`: an OpenAI-compatible HTTP server with continuous batching."""
import os

from ulskip.cli import (
    add_schedule_arguments,
    check_checkpoint,
    check_choice,
    check_device,
    check_min,
    check_schedule_arguments,
    require,
    schedule_kwargs,
)


def add_arguments(p):
    p.add_argument("model", help="local Hugging Face checkpoint folder (required)")
    add_schedule_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port, 1-65535 (default %(default)s)")
    p.add_argument("--served-model-name", default=None,
                   help="the model name requests must give (default: the checkpoint folder's name)")
    p.add_argument("--max-batch-size", type=int, default=16,
                   help="sequences decoded together (cache rows), >= 1 (default %(default)s)")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="context per sequence, prompt + new tokens (default: the model's, at most 2048)")
    p.add_argument("--max-queue", type=int, default=256,
                   help="requests that may wait for a row; more get HTTP 429, >= 1 (default %(default)s)")
    p.add_argument("--prefill-chunk", type=int, default=512,
                   help="prompt tokens run between two decode steps, >= 1: waiting prompts that fit share one pass, "
                        "a longer prompt runs in chunks of this size (default %(default)s)")
    p.add_argument("--dtype", default=None,
                   help="fp32, fp16 or bf16 (default: on a GPU the checkpoint's fp16/bf16, bf16 for an fp32 one; "
                        "fp32 on the CPU)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds running requests get to finish on shutdown before they are cancelled (default "
                        "%(default)s)")


def check_args(args) -> str:
    check_schedule_arguments(args)
    require(args.strategy != "skipdecode", "--strategy", "a static policy (continuous batching needs one layer "
            "set for every sequence)", args.strategy)
    require(isinstance(args.port, int) and 1 <= args.port <= 65535, "--port", "in [1, 65535]", args.port)
    check_min("--max-batch-size", args.max_batch_size, 1)
    if args.max_seq_len is not None:
        check_min("--max-seq-len", args.max_seq_len, 2)
    check_min("--max-queue", args.max_queue, 1)
    check_min("--prefill-chunk", args.prefill_chunk, 1)
    require(args.shutdown_timeout >= 0, "--shutdown-timeout", ">= 0 seconds", args.shutdown_timeout)
    from ulskip.runtime.engine import DTYPES
    check_choice("--dtype", args.dtype, list(DTYPES))
    check_device(args.device)
    check_checkpoint(args.model)
    name = args.served_model_name or os.path.basename(os.path.normpath(args.model))
    require(bool(name.strip()), "--served-model-name", "a non-empty name", args.served_model_name)
    return name


def run(args) -> int:
    name = check_args(args)
    import uvicorn

    from ulskip import Engine
    from ulskip.serve.app import build_app
    eng = Engine.from_pretrained(args.model, dtype=args.dtype, device=args.device, max_batch_size=args.max_batch_size,
                                 max_seq_len=args.max_seq_len, **schedule_kwargs(args))
    if eng.tokenizer is None:
        print("note: the checkpoint has no tokenizer: only token-id prompts on /v1/completions will work")
    app = build_app(eng, name, max_queue=args.max_queue, shutdown_timeout=args.shutdown_timeout,
                    prefill_chunk=args.prefill_chunk)
    print(f"serving {name!r}: {len(eng.kept_layers)} of {eng.num_layers} layers (prefill={eng.prefill_mode}), "
          f"{eng.max_batch_size} rows x {eng.max_seq_len} tokens, {eng.device}, {str(eng.dtype)[6:]}; "
          f"http://{args.host}:{args.port}/v1")
    uvicorn.run(app, host=args.host, port=args.port, log_level="info",
                timeout_graceful_shutdown=args.shutdown_timeout)
    return 0
