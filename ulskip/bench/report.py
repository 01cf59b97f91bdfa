"""Reporting for `ulskip bench`: derived speedups, the printed table, the JSON file and the PNG plot."""
from __future__ import annotations

import json
import math
import os

SYSTEMS = ("ulskip", "hf-eager-full", "hf-eager-skip", "hf-compile-skip", "speculative", "torch-compile")
# asked for by name: speculative (its speed depends on acceptance, i.e. on real weights) and torch-compile
# (minutes of compiling per row on a GPU)
DEFAULT_SYSTEMS = SYSTEMS[:4]


def derive(rows: list[dict]) -> None:
    """Realized speedup over the same system at 1x and over hf-eager-full, same batch size."""
    def key(r):
        return (r["system"], r["batch_size"], r.get("prompt_len"), r.get("new_tokens"))
    ok = [r for r in rows if r["status"] == "ok"]
    one_x = {key(r): r["tokens_per_s"] for r in ok if r["num_kept"] == r["num_layers"]}
    full = {(r["batch_size"], r.get("prompt_len"), r.get("new_tokens")): r["tokens_per_s"]
            for r in ok if r["system"] == "hf-eager-full"}
    for r in rows:
        r["speedup_vs_1x"] = r["speedup_vs_hf_eager_full"] = None
        if r["status"] != "ok":
            continue
        if key(r) in one_x:
            r["speedup_vs_1x"] = r["tokens_per_s"] / one_x[key(r)]
        f = full.get((r["batch_size"], r.get("prompt_len"), r.get("new_tokens")))
        if f:
            r["speedup_vs_hf_eager_full"] = r["tokens_per_s"] / f


def _fmt(v, spec):
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def format_table(rows: list[dict], meta: dict) -> str:
    hdr = ["system", "s", "kept", "bs", "tok/s", "x1x", "xHFfull", "TTFT ms", "ms/step", "GB/s",
           "%roof", "peak GiB", "KV MiB"]
    lines = []
    for r in sorted(rows, key=lambda r: (SYSTEMS.index(r["system"]) if r["system"] in SYSTEMS else 9,
                                         r["target_speedup"], r["batch_size"])):
        if r["status"] != "ok":
            cells = [r["system"], f"{r['target_speedup']:g}", f"{r['num_kept']}/{r['num_layers']}",
                     str(r["batch_size"])] + ["-"] * 9
            lines.append((cells, f"FAILED {r['error']}"))
            continue
        peak = r.get("peak_mem_bytes")
        kv = r.get("kv_cache_bytes")
        cells = [r["system"], f"{r['target_speedup']:g}", f"{r['num_kept']}/{r['num_layers']}",
                 str(r["batch_size"]), _fmt(r["tokens_per_s"], ".1f"), _fmt(r.get("speedup_vs_1x"), ".2f"),
                 _fmt(r.get("speedup_vs_hf_eager_full"), ".2f"), _fmt(r["prefill_ms"], ".1f"),
                 _fmt(r["decode_ms_per_step"], ".2f"), _fmt(r.get("achieved_GBps"), ".0f"),
                 _fmt(r.get("pct_roofline"), ".1f"), _fmt(peak / 2**30 if peak else None, ".2f"),
                 _fmt(kv / 2**20 if kv is not None else None, ".1f")]
        lines.append((cells, r.get("note") or ""))
    widths = [max(len(h), *(len(c[i]) for c, _ in lines)) if lines else len(h) for i, h in enumerate(hdr)]
    out = []
    bwm = meta.get("bandwidth", {})
    out.append(f"{meta.get('model')} | {meta.get('device')} | {meta.get('dtype')} | prompt {meta.get('prompt_len')}"
               f" + {meta.get('new_tokens')} new | prefill {meta.get('prefill')} | copy bandwidth "
               f"{_fmt(bwm.get('GBps'), '.0f')} GB/s ({'GPU copy' if meta.get('device_type') == 'cuda' else 'CPU memcpy'})")
    out.append("  ".join(h.rjust(w) if i > 3 else h.ljust(w) for i, (h, w) in enumerate(zip(hdr, widths))))
    for cells, tail in lines:
        s = "  ".join(c.rjust(w) if i > 3 else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
        out.append(s + (f"  {tail}" if tail else ""))
    out.append("tok/s: generated tokens/s incl. prefill; x1x: vs same system at 1x; xHFfull: vs hf-eager-full; "
               "GB/s and %roof: decode step bytes (kept layers + head + norm + KV) / measured ms/step.")
    return "\n".join(out)


def write_json(path: str, rows: list[dict], meta: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1, default=str)
    os.replace(tmp, path)


def write_plot(path: str, rows: list[dict], meta: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    colors = {"ulskip": "tab:red", "hf-eager-full": "tab:gray", "hf-eager-skip": "tab:blue",
              "hf-compile-skip": "tab:green"}
    speedups = sorted({r["target_speedup"] for r in rows})
    styles = ["-", "--", ":", "-.", (0, (5, 1)), (0, (1, 3))]
    series = {}
    for r in rows:
        if r["status"] == "ok":
            series.setdefault((r["system"], r["target_speedup"]), []).append(r)
    for (system, s), rs in sorted(series.items(), key=lambda kv: (str(kv[0][0]), kv[0][1])):
        rs.sort(key=lambda r: r["batch_size"])
        bs = [r["batch_size"] for r in rs]
        ls = styles[speedups.index(s) % len(styles)]
        label = f"{system} {s:g}x" if system != "hf-eager-full" else "hf-eager-full"
        kw = dict(color=colors.get(system), linestyle=ls, marker="o", label=label)
        axes[0].plot(bs, [r["tokens_per_s"] for r in rs], **kw)
        pct = [(r["batch_size"], r.get("pct_roofline")) for r in rs if r.get("pct_roofline") is not None]
        if pct:
            axes[1].plot([p[0] for p in pct], [p[1] for p in pct], **kw)
    for ax, title, ylabel in ((axes[0], "generated tokens/s (incl. prefill)", "tokens/s"),
                              (axes[1], "decode step, % of copy-bandwidth roofline", "% of roofline")):
        ax.set_xscale("log", base=2)
        ticks = sorted({r["batch_size"] for r in rows})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("batch size")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle(f"ulskip bench: {meta.get('model')} on {meta.get('device')} ({meta.get('dtype')}, prompt "
                 f"{meta.get('prompt_len')}, {meta.get('new_tokens')} new, {meta.get('date', '')[:10]})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def merge(paths: list[str], note=print) -> tuple[list[dict], dict]:
    """Combine earlier --json files (e.g. one run per system on a time-limited machine) into one report.
    A row of a later file replaces an earlier file's row of the same system, target speedup, batch size,
    lengths and prefill mode (a re-measurement), unless the later one failed and the earlier did not
    (then note(...) says so). Raises ValueError naming the file that cannot be read."""
    from ulskip.bench.sweep import TWIN_NOTE, copy_twin, eager_full_twin

    rows, metas = {}, []
    for path in paths:
        try:
            with open(path) as f:
                d = json.load(f)
            for r in d["rows"]:
                k, earlier = _row_key(r), rows.get(_row_key(r))
                if earlier is not None and earlier["status"] == "ok" and r["status"] != "ok":
                    note(f"{path}: {r['system']} s={r['target_speedup']:g} bs={r['batch_size']} is "
                         f"{r['status']}; the earlier measurement stays")
                    continue
                rows[k] = r
            metas.append(d["meta"])
        except (OSError, ValueError, KeyError) as e:
            msg = str(e).strip().splitlines()
            raise ValueError(f"--merge {path!r}: {type(e).__name__}: {msg[0][:300] if msg else ''}") from None
    meta = dict(metas[0])
    meta["merged_from"] = [{"path": p, "command": m.get("command"), "date": m.get("date")}
                           for p, m in zip(paths, metas)]
    rows = list(rows.values())
    for r in rows:  # a re-measured hf-eager-full carries its hf-eager-skip 1x twin along
        twin = eager_full_twin(rows, r) if r.get("note") == TWIN_NOTE else None
        if twin is not None:
            copy_twin(r, twin)
    derive(rows)
    return rows, meta


def _row_key(r: dict) -> tuple:
    return (r["system"], r["target_speedup"], r["batch_size"], r.get("prompt_len"), r.get("new_tokens"),
            r.get("prefill"))
