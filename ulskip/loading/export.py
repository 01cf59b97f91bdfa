"""A prefill-"skip" checkpoint -> a plain Hugging Face checkpoint of its kept layers only.

With prefill="skip" the model computes every token, prompt included, through the kept layers alone: the
skipped layers are never run, so a model that holds only the kept layers (renumbered 0 .. K-1) computes
exactly the same thing. Written as an ordinary folder (config.json with num_hidden_layers = K and no
`ulskip` section, safetensors weights, tokenizer, generation_config.json), transformers, vLLM and SGLang
load it as a model of K layers. A prefill="full" checkpoint cannot be exported: its prompt pass runs every
layer and the later tokens attend to the prompt's K/V of the kept layers computed on that full path.

`export_schedule` decides the layers (the checkpoint's `ulskip` section, or a target speedup for a
checkpoint without one); `export_kept_layers` writes the folder, complete or not at all.
"""
from __future__ import annotations

import json
import os
import shutil

from ulskip.loading.checkpoint import SAFE_INDEX, CheckpointTensors
from ulskip.loading.config import load_config
from ulskip.loading.folders import move_into_place
from ulskip.loading.tokenizer import TOKENIZER_FILES
from ulskip.models import MODEL_CLASSES
from ulskip.schedule import (
    DYNAMIC_STRATEGIES,
    KEEPS_ENDS,
    uls_schedule,
    validate_schedule,
)

# what else of the checkpoint folder the exported model needs (training state and logs are left behind)
COPIED_FILES = tuple(dict.fromkeys(TOKENIZER_FILES + (
    "merges.txt", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json",
    "generation_config.json")))
COPIED_FOLDERS = ("additional_chat_templates",)
PER_LAYER_LISTS = ("layer_types",)  # config.json lists of one entry per layer: cut to the kept layers
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer")  # Llama family / Bloom spelling in config.json
MAX_SHARD_BYTES = 5 * 2 ** 30
EXPORT_INFO = "ulskip_export.json"  # provenance: the source's layer count, kept layers, section (no loader reads it)

FULL_PREFILL = ("its prompt pass runs every layer and the later tokens attend to the prompt's K/V of the "
                "kept layers computed on that full path, so a checkpoint of only the kept layers would not be "
                "the same model")


def export_schedule(ckpt: str, num_layers: int, section: dict | None, target_speedup=None,
                    strategy: str = "paper", prefill: str | None = None, seed: int = 0,
                    block_influence=None) -> list[int]:
    """The layers to export. With an `ulskip` section (written by `ulskip train`): its kept layers, which
    must be a prefill="skip", static schedule; target_speedup (with strategy) may be given and must give
    the same layers. Without a section: the layers target_speedup keeps, and prefill="skip" must be passed
    as the caller's word that the model computes that way (was fine-tuned so, or is meant to be used so).
    Every refusal is a ValueError naming its reason."""
    if prefill is not None and prefill not in ("full", "skip"):
        raise ValueError(f"prefill must be 'skip' (or None: the checkpoint's), got {prefill!r}")
    if prefill == "full":
        raise ValueError(f"prefill 'full' (--prefill full) cannot be exported: {FULL_PREFILL}; only prefill "
                         "'skip' models have a kept-layer equivalent")
    dynamic = ("strategy 'skipdecode' gives each generated position its own layers (no fixed layer set), so "
               "no checkpoint of fixed layers computes the same thing")
    if target_speedup is not None and strategy in DYNAMIC_STRATEGIES:
        raise ValueError(f"{dynamic}; use a static strategy (--strategy paper, even, ...)")
    flag_kept = None
    if target_speedup is not None:
        flag_kept = uls_schedule(num_layers, target_speedup, strategy, seed=seed, block_influence=block_influence)
    if section:
        if section.get("strategy") in DYNAMIC_STRATEGIES:
            raise ValueError(f"{ckpt!r} was fine-tuned with {dynamic}")
        kept = validate_schedule(num_layers, section["kept_layers"],
                                 require_ends=section.get("strategy", "paper") in KEEPS_ENDS)
        if section.get("prefill", "full") != "skip":
            raise ValueError(f"{ckpt!r} was fine-tuned with prefill 'full' (its ulskip section): {FULL_PREFILL}; "
                             "run it with `ulskip generate` (only prefill 'skip' checkpoints export)")
        if flag_kept is not None and flag_kept != kept:
            raise ValueError(f"target speedup {target_speedup:g} (--strategy {strategy}) keeps layers "
                             f"{_layers(flag_kept)}, but the ulskip section of {ckpt!r} keeps {_layers(kept)} "
                             f"(target_speedup {section.get('target_speedup', '?')}, strategy "
                             f"{section.get('strategy', 'paper')}), the layers it was fine-tuned with: leave "
                             "--target-speedup out, or give the section's")
        return kept
    if flag_kept is None:
        raise ValueError(f"{ckpt!r} has no ulskip section (it was not written by `ulskip train`), so it names no "
                         "kept layers: give --target-speedup S and --prefill skip")
    if prefill != "skip":
        raise ValueError(f"{ckpt!r} has no ulskip section, so nothing says it computes with prefill 'skip' "
                         "(the prompt through the kept layers only, as it must be fine-tuned for); a checkpoint "
                         "of its kept layers is that model only then: pass --prefill skip to export it anyway")
    return flag_kept


def _layers(kept) -> str:
    return ",".join(map(str, kept))


def export_kept_layers(ckpt: str, out: str, kept_layers=None, overwrite: bool = False,
                       max_shard_bytes: int = MAX_SHARD_BYTES) -> str:
    """Write `out`: a plain Hugging Face checkpoint of `ckpt`'s kept layers, renumbered 0 .. K-1.

    kept_layers: the layers (None: the checkpoint's `ulskip` section, which must say prefill "skip").
    When the checkpoint has a section, prefill "full" or a dynamic strategy there is refused, and
    kept_layers must be the section's. Without a section, kept_layers is the caller's choice: the export
    computes what the checkpoint computes with prefill="skip" and those layers.
    config.json: num_hidden_layers (n_layer for Bloom) = K, per-layer lists (layer_types) cut, Qwen2's
    max_window_layers recounted, the ulskip section dropped. Weights: the embeddings, final norm and head
    as they are (no lm_head with tied embeddings), the kept layers' tensors renamed; safetensors,
    sharded above max_shard_bytes. Tokenizer files, chat templates and generation_config.json are copied.
    Everything is checked before anything is written; the folder appears complete or not at all.
    Returns the absolute path of the folder.
    """
    ckpt_abs, out = os.path.abspath(ckpt), os.path.abspath(out)  # abspath also drops a trailing "/"
    cfg = load_config(ckpt)  # a checkpoint folder of a supported family, its ulskip section checked
    where = os.path.join(ckpt, "config.json")
    section = cfg.ulskip
    if kept_layers is None:
        if not section:
            raise ValueError(f"{ckpt!r} has no ulskip section: pass kept_layers (the layers to export)")
        kept = export_schedule(ckpt, cfg.num_layers, section)
    else:
        kept = validate_schedule(cfg.num_layers, kept_layers, require_ends=False)
        if section:
            theirs = export_schedule(ckpt, cfg.num_layers, section)
            if theirs != kept:
                raise ValueError(f"kept_layers {_layers(kept)} differ from the layers the ulskip section of {ckpt!r} "
                                 f"keeps ({_layers(theirs)}), the layers it was fine-tuned with")
    if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int) or max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be a positive integer, got {max_shard_bytes!r}")
    check_output_folder(ckpt_abs, out, overwrite)

    source = CheckpointTensors(ckpt)
    plan = _tensor_plan(source, MODEL_CLASSES[cfg.family].layer_prefix, cfg.num_layers, kept,
                        cfg.tie_word_embeddings, where)
    with open(os.path.join(ckpt, "config.json")) as f:
        raw = json.load(f)
    config = _export_config(raw, cfg.hf_config, cfg.num_layers, kept)

    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = f"{out}.tmp-{os.getpid()}"  # a sibling, so the final rename stays on one filesystem
    shutil.rmtree(tmp, ignore_errors=True)  # a crashed earlier run with the same pid
    os.makedirs(tmp)
    try:
        _write_weights(source, plan, tmp, max_shard_bytes)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
            f.write("\n")
        _copy_side_files(ckpt, tmp)
        with open(os.path.join(tmp, EXPORT_INFO), "w") as f:
            json.dump({"num_layers": cfg.num_layers, "kept_layers": kept, "prefill": "skip",
                       "ulskip_section": section or None}, f, indent=2)
            f.write("\n")
        move_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def check_output_folder(ckpt: str, out: str, overwrite: bool) -> None:
    """OUT may be written: a folder (or nothing yet), empty unless overwrite, not the checkpoint or a
    folder holding it, its first existing ancestor writable."""
    ckpt, out = os.path.abspath(ckpt), os.path.abspath(out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"output path {out!r} exists and is not a folder")
    real_ckpt, real_out = os.path.realpath(ckpt), os.path.realpath(out)
    if real_out == real_ckpt or real_ckpt.startswith(real_out + os.sep):
        raise ValueError(f"output folder {out!r} would replace the checkpoint {ckpt!r} it is exported from; "
                         "give another folder")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise ValueError(f"output folder {out!r} exists and is not empty; pass overwrite=True (--overwrite)")
    parent = os.path.dirname(out)
    while not os.path.isdir(parent):  # the first existing ancestor must be writable (makedirs below)
        parent = os.path.dirname(parent)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"output folder {out!r}: folder {parent!r} is not writable")


def _layer_of(name: str, prefixes) -> tuple[str, int, str] | None:
    """(prefix, layer index, rest) of a decoder-layer tensor name, else None."""
    for p in prefixes:
        if name.startswith(p):
            idx, _, rest = name[len(p):].partition(".")
            if idx.isdigit() and rest:
                return p, int(idx), rest
    return None


def _tensor_plan(source, prefix: str, num_layers: int, kept: list[int], tied: bool, where: str) -> list:
    """[(new name, checkpoint name)]: everything outside the decoder layers, and the kept layers'
    tensors renumbered; the skipped layers' tensors and a tied lm_head are left out."""
    # checkpoints saved without the top module prefix ("h.0..." for Bloom) are read like the loader does
    prefixes = (prefix, prefix.split(".", 1)[-1])
    new_index = {i: j for j, i in enumerate(kept)}
    plan, seen, beyond = [], set(), set()
    for name in source.names():
        layer = _layer_of(name, prefixes)
        if layer is None:
            if tied and name.split(".")[-2:] == ["lm_head", "weight"]:
                continue  # the embeddings are the head; transformers ties them again on load
            plan.append((name, name))
            continue
        p, i, rest = layer
        if i >= num_layers:
            beyond.add(i)
        elif i in new_index:
            seen.add(i)
            plan.append((f"{p}{new_index[i]}.{rest}", name))
    if beyond:
        b = sorted(beyond)
        raise ValueError(f"{where}: the weights hold tensors of layers {b[:5]}{'...' if len(b) > 5 else ''} but "
                         f"config.json says the model has {num_layers} layers: the config and the weights disagree")
    missing = [i for i in kept if i not in seen]
    if missing:
        raise ValueError(f"{where}: the weights hold no tensors of kept layer{'s' * (len(missing) > 1)} "
                         f"{_layers(missing)} (names {prefix}<i>.*)")
    return plan


def _export_config(raw: dict, hf_config, num_layers: int, kept: list[int]) -> dict:
    config = {k: v for k, v in raw.items() if k != "ulskip"}
    keys = [k for k in LAYER_COUNT_KEYS if k in config] or ["n_layer" if config["model_type"] == "bloom"
                                                              else "num_hidden_layers"]
    for k in keys:
        config[k] = len(kept)
    for k in PER_LAYER_LISTS:
        # the config object's list (transformers may derive it, e.g. Qwen2's from max_window_layers)
        values = getattr(hf_config, k, None) if k not in config else config[k]
        if isinstance(values, (list, tuple)):
            if len(values) != num_layers:
                raise ValueError(f"config.json: {k} has {len(values)} entries for {num_layers} layers")
            config[k] = [values[i] for i in kept]
    mwl = config.get("max_window_layers")
    if isinstance(mwl, int) and not isinstance(mwl, bool):
        # Qwen2: layers at index >= max_window_layers use the sliding window; kept layers stay in order
        config["max_window_layers"] = sum(1 for i in kept if i < mwl)
    return config


def _write_weights(source, plan, folder: str, max_shard_bytes: int) -> None:
    from safetensors.torch import save_file
    shards, current, size = [], {}, 0
    for new, old in plan:
        t = source.get(old)
        n = t.numel() * t.element_size()
        if current and size + n > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[new] = t
        size += n
    shards.append(current)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))])
    weight_map, total = {}, 0
    for fname, shard in zip(names, shards):
        tensors, ptrs = {}, set()
        for k, t in shard.items():
            t = t.contiguous()
            ptr = t.untyped_storage().data_ptr()
            if ptr in ptrs:  # shared storage (a .bin checkpoint's tied tensors): safetensors refuses it
                t = t.clone()
            ptrs.add(t.untyped_storage().data_ptr())
            tensors[k] = t
            weight_map[k] = fname
            total += t.numel() * t.element_size()
        save_file(tensors, os.path.join(folder, fname), metadata={"format": "pt"})
        del tensors
    if len(shards) > 1:
        with open(os.path.join(folder, SAFE_INDEX), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f,
                      indent=2)
            f.write("\n")


def _copy_side_files(ckpt: str, folder: str) -> None:
    for name in COPIED_FILES:
        src = os.path.join(ckpt, name)
        if os.path.isfile(src):
            shutil.copy2(src, os.path.join(folder, name))
    for name in COPIED_FOLDERS:
        src = os.path.join(ckpt, name)
        if os.path.isdir(src):
            shutil.copytree(src, os.path.join(folder, name))
