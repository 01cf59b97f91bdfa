"""`ulskip schedule --layers 30 --target-speedup 5`: the kept layers and the layer-only speedup."""
from ulskip.cli import check_min
from ulskip.schedule import STRATEGIES, layer_speedup, uls_schedule


def add_arguments(p):
    p.add_argument("--layers", type=int, required=True,
                   help="number of decoder layers L, >= 2 (required, no default)")
    p.add_argument("--target-speedup", type=float, required=True,
                   help="target speedup s, in [1, L/2]: K = floor(L/s) layers are kept (required, no default)")
    p.add_argument("--strategy", default="paper", choices=STRATEGIES,
                   help="layer policy (default %(default)s: the ULS rule; random draws with seed 0; shortgpt "
                        "needs a model's scores and is refused here)")


def run(args) -> int:
    check_min("--layers", args.layers, 2)
    kept = uls_schedule(args.layers, args.target_speedup, args.strategy)
    print(f"kept layers ({len(kept)} of {args.layers}): {','.join(map(str, kept))}")
    print(f"layer-only speedup: {layer_speedup(args.layers, kept):.3f}x")
    return 0
