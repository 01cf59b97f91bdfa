"""`ulskip schedule --layers 30 --target-speedup 5`: the kept layers and the layer-only speedup."""
from ulskip.schedule import STRATEGIES, layer_speedup, uls_schedule


def add_arguments(p):
    p.add_argument("--layers", type=int, required=True, help="number of decoder layers L")
    p.add_argument("--target-speedup", type=float, required=True, help="target speedup s (K = floor(L/s))")
    p.add_argument("--strategy", default="paper", choices=STRATEGIES)


def run(args) -> int:
    try:
        kept = uls_schedule(args.layers, args.target_speedup, args.strategy)
    except ValueError as e:
        raise SystemExit(f"ulskip schedule: {e}")
    print(f"kept layers ({len(kept)} of {args.layers}): {','.join(map(str, kept))}")
    print(f"layer-only speedup: {layer_speedup(args.layers, kept):.3f}x")
    return 0
