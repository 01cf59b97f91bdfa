"""Training throughput (tokens/s) of a ~1B Llama-shaped random model, with and without the fused kernels.

Modes (each on a fresh model, same data, AdamW, a few warmup steps then timed steps):
  hf        plain transformers (sdpa attention), the loss of transformers (full [tokens, vocab] logits)
  fused     ulskip.train.patch_model: Triton RMSNorm / SwiGLU fwd+bwd, chunked fused linear + CE
  uls       apply_uls(target_speedup=--speedup, prefill="full") + the fused kernels (what `ulskip train
            --use_fused_kernels` runs): skipped layers process only the prefix tokens
Every batch is [batch, seq] random tokens whose first --prefix-frac of each row is prefix (label -100),
as in instruction tuning; all modes compute the loss on the response tokens only.
Precision: "amp" = fp32 master weights + bf16 autocast (what `ulskip train --bf16` does), or "bf16" =
bf16 weights and optimizer state.

    python -m ulskip.bench.train                                  # 1 GPU
    torchrun --nproc_per_node 2 -m ulskip.bench.train             # 2 GPUs, DDP (tokens/s summed)
    python -m ulskip.bench.train --device cpu --hidden 64 --layers 2 --vocab 128 --seq 32 --batch 2 \
        --steps 2 --warmup 1                                      # smoke test without a GPU
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

import torch


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=22)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--batch", type=int, default=8, help="per-GPU batch size")
    p.add_argument("--prefix-frac", type=float, default=0.5)
    p.add_argument("--speedup", type=float, default=2.0, help="ULS target speedup of the 'uls' mode")
    p.add_argument("--steps", type=int, default=20, help="timed steps per mode")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--modes", default="hf,fused,uls")
    p.add_argument("--precision", default="amp", choices=["amp", "bf16"])
    p.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing")
    p.add_argument("--device", default="cuda")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the GPU's dense bf16 peak for model FLOPs utilisation (default: 989 on an H100/H200 "
                        "SXM, else none)")
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    return p.parse_args(argv)


def layer_forward_flops(hidden: int, intermediate: int, heads: int, kv_heads: int, head_dim: int | None = None) -> int:
    """Forward matmul FLOPs of one Llama decoder layer per token: q, k, v, o and the SwiGLU's three."""
    d = head_dim or hidden // heads
    return 2 * (hidden * heads * d + 2 * hidden * kv_heads * d + heads * d * hidden + 3 * hidden * intermediate)


def model_flops_per_step(args, mode) -> float:
    """The FLOPs a training step needs by the method, forward + backward (3x forward): each token through the
    layers it runs (uls: prefix tokens through all layers, response tokens through the kept ones), causal
    attention (2 x tokens before it x hidden per layer, forward), and the LM head on the tokens with a loss.
    Work a mode does beyond that (e.g. plain transformers' logits of the prefix tokens) is overhead, not model
    FLOPs: MFU = these / time / peak."""
    from ulskip.schedule import uls_schedule
    H, I, L, V, T = args.hidden, args.intermediate, args.layers, args.vocab, args.seq
    layer = layer_forward_flops(H, I, args.heads, args.kv_heads)
    P = max(1, int(T * args.prefix_frac))
    kept = len(uls_schedule(L, args.speedup)) if mode == "uls" else L
    tokens_layers = P * L + (T - P) * kept                        # (token, layer) pairs the step runs
    attn = 4 * H * (T * (T + 1) // 2) * tokens_layers / T          # QK^T and AV over the causal pairs
    head = 2 * H * V * (T - P)
    return 3.0 * args.batch * (tokens_layers * layer + attn + head)


def build(args, mode, device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    from ulskip.train import apply_uls, patch_model

    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=args.kv_heads, max_position_embeddings=max(2048, args.seq),
                      attn_implementation="sdpa", use_cache=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    if mode == "uls":
        apply_uls(model, target_speedup=args.speedup, prefill="full", fused_kernels=True)
    elif mode == "fused":
        patch_model(model)
    elif mode != "hf":
        raise ValueError(f"unknown mode {mode!r}; modes: hf, fused, uls")
    if args.grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def batch(args, device, step):
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(3, args.vocab, (args.batch, args.seq), generator=g)
    P = max(1, int(args.seq * args.prefix_frac))
    labels = ids.clone()
    labels[:, :P] = -100
    return {"input_ids": ids.to(device), "labels": labels.to(device),
            "attention_mask": torch.ones_like(ids, device=device)}


def run_mode(args, mode, device, rank, world):
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    model = build(args, mode, device, dtype)
    ddp_model = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        ddp_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda")
    n_params = sum(p.numel() for p in model.parameters())
    amp = args.precision == "amp" and device.type == "cuda"

    def step(i):
        b = batch(args, device, i + rank * 100000)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = ddp_model(**b).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(args.warmup):
        step(i)
    sync()
    t0 = time.perf_counter()
    for i in range(args.steps):
        loss = step(args.warmup + i)
    sync()
    dt = time.perf_counter() - t0
    tokens = args.steps * args.batch * args.seq
    flops = model_flops_per_step(args, mode) * args.steps / dt
    res = {"mode": mode, "params_M": n_params / 1e6, "step_ms": 1000 * dt / args.steps,
           "model_TFLOPs_per_gpu": flops / 1e12,
           "mfu": flops / (args.peak_tflops * 1e12) if args.peak_tflops else None,
           "tokens_per_s_per_gpu": tokens / dt, "tokens_per_s": tokens / dt * world,
           "loss": float(loss), "peak_mem_GiB": (torch.cuda.max_memory_allocated(device) / 2**30
                                                 if device.type == "cuda" else 0.0)}
    del ddp_model, model, opt, params
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return res


def default_peak_tflops(device) -> float | None:
    """The GPU's dense bf16 peak for MFU: NVIDIA's 989 TFLOP/s for an H100 / H200 SXM, else None (unknown)."""
    if device.type == "cuda" and any(n in torch.cuda.get_device_name(device) for n in ("H100", "H200")):
        return 989.0
    return None


def main(argv=None):
    args = parse(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if args.device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device(args.device)
    if world > 1:
        import torch.distributed as dist
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    torch.backends.cuda.matmul.allow_tf32 = True
    if args.peak_tflops is None:
        args.peak_tflops = default_peak_tflops(device)
    results = []
    for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
        results.append(run_mode(args, mode, device, rank, world))
        if rank == 0:
            r = results[-1]
            print(f"  {mode}: {r['tokens_per_s']:.0f} tok/s, {r['step_ms']:.1f} ms/step, "
                  f"peak {r['peak_mem_GiB']:.1f} GiB", flush=True)
    if rank == 0:
        dev = torch.cuda.get_device_name(device) if device.type == "cuda" else args.device
        import transformers
        import triton
        print(f"\nLlama-shaped random model, {results[0]['params_M']:.0f}M params ({args.layers} layers, hidden "
              f"{args.hidden}, vocab {args.vocab}), seq {args.seq}, batch {args.batch}/GPU x {world} GPU(s), "
              f"prefix {args.prefix_frac:.0%}, precision {args.precision}, grad ckpt {args.grad_ckpt}")
        print(f"device {dev}; torch {torch.__version__}, triton {triton.__version__}, "
              f"transformers {transformers.__version__}; {args.warmup} warmup + {args.steps} timed steps")
        base = results[0]["tokens_per_s"]
        print(f"| mode | tokens/s (all GPUs) | tokens/s/GPU | ms/step | vs {results[0]['mode']} | model TFLOP/s/GPU | "
              f"MFU | peak GiB | loss |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in results:
            mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
            print(f"| {r['mode']} | {r['tokens_per_s']:.0f} | {r['tokens_per_s_per_gpu']:.0f} | {r['step_ms']:.1f} | "
                  f"{r['tokens_per_s'] / base:.2f}x | {r['model_TFLOPs_per_gpu']:.1f} | {mfu} | "
                  f"{r['peak_mem_GiB']:.1f} | {r['loss']:.3f} |")
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"args": vars(args), "world": world, "device": dev, "results": results}, f, indent=1)
    if world > 1:
        import torch.distributed as dist
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
