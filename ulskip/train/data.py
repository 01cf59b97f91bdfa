"""Training data for ULS fine-tuning: json/jsonl records with a `prefix` (instruction + input, the prompt
the engine will see) and a `text` (the response), tokenized separately so the prefix/response boundary
is exactly the prompt/generation boundary at inference.

One example = tokenizer(prefix) (with the tokenizer's special tokens, e.g. BOS) + tokenizer(text,
no special tokens) + EOS (when the tokenizer has one). Loss falls on the response tokens (and EOS) only.
Every bad input is a `DataError` naming the file and the record (line number in a .jsonl, or in a .json
holding JSON Lines; record number in a .json array).
"""
from __future__ import annotations

import glob
import itertools
import json
import os

import numpy as np
import torch

IGNORE_INDEX = -100


class DataError(ValueError):
    pass


def resolve_files(pattern: str) -> list[str]:
    """Expand a glob (several may be given, comma-separated) into a sorted list of files."""
    files = []
    for pat in [p.strip() for p in str(pattern).split(",") if p.strip()]:
        hits = sorted(f for f in glob.glob(os.path.expanduser(pat), recursive=True) if os.path.isfile(f))
        if not hits:
            raise DataError(f"--train_file {pat!r} matches no files")
        files += hits
    if not files:
        raise DataError(f"--train_file {pattern!r} names no files")
    for f in files:
        if not f.endswith((".json", ".jsonl")):
            raise DataError(f"{f}: training files must be .json or .jsonl")
    return list(dict.fromkeys(files))


def _check_record(rec, where):
    if not isinstance(rec, dict):
        raise DataError(f"{where}: a record must be a JSON object with string fields 'prefix' and 'text', "
                        f"got {type(rec).__name__}")
    for key in ("prefix", "text"):
        if key not in rec:
            raise DataError(f"{where}: missing field {key!r} (a record needs string fields 'prefix' and 'text')")
        if not isinstance(rec[key], str):
            raise DataError(f"{where}: field {key!r} must be a string, got {type(rec[key]).__name__}")
    if not rec["text"]:
        raise DataError(f"{where}: field 'text' is empty (nothing to learn)")
    return rec


def iter_records(path: str):
    """Yield (where, record) for every record of one file, `where` being 'file, line N' / 'file, record N'."""
    with open(path, encoding="utf-8") as f:
        content = f.read()
    if not content.strip():
        raise DataError(f"{path}: empty file (no records)")
    stripped = content.lstrip()
    if path.endswith(".json") and stripped[:1] == "[":
        try:
            records = json.loads(content)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON ({e})") from None
        if not records:
            raise DataError(f"{path}: empty file (the JSON array holds no records)")
        for i, rec in enumerate(records, 1):
            where = f"{path}, record {i}"
            yield where, _check_record(rec, where)
        return
    n = 0
    for lineno, line in enumerate(content.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}, line {lineno}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e})") from None
        n += 1
        yield where, _check_record(rec, where)
    if n == 0:
        raise DataError(f"{path}: empty file (no records)")


def encode(tokenizer, rec: dict, block_size: int, where: str) -> dict:
    prefix_ids = list(tokenizer(rec["prefix"], add_special_tokens=True)["input_ids"])
    text_ids = list(tokenizer(rec["text"], add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is not None:
        text_ids.append(tokenizer.eos_token_id)
    if not text_ids:
        raise DataError(f"{where}: field 'text' tokenizes to no tokens")
    ids = prefix_ids + text_ids
    if len(ids) > block_size:
        raise DataError(f"{where}: the record is {len(ids)} tokens long (prefix {len(prefix_ids)} + text "
                        f"{len(text_ids)}), longer than --block_size {block_size}")
    # At least one prefix token: the first response token is predicted from the full (prefill) pass.
    return {"input_ids": ids, "prefix_length": max(1, len(prefix_ids))}


class ULSDataset(torch.utils.data.Dataset):
    """All records of all files, tokenized and checked up front (a bad record fails before training)."""

    def __init__(self, files, tokenizer, block_size: int):
        self.examples = []
        for path in files:
            for where, rec in iter_records(path):
                self.examples.append(encode(tokenizer, rec, block_size, where))
        if not self.examples:
            raise DataError(f"no training records in {', '.join(files)}")

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, i):
        return self.examples[i]


class StreamingULSDataset(torch.utils.data.IterableDataset):
    """Records read and tokenized lazily, file by file (for data larger than memory). A bad record
    raises when it is reached. Each pass re-reads the files; `seed` and `set_epoch` shuffle the order
    of the files from epoch to epoch.

    DataLoader workers: worker w of N yields records w, w+N, w+2N, ... of the pass (every worker reads
    the files, each tokenizes only its own records), so each record comes once per pass, not N times.
    Processes (DDP/DeepSpeed ranks) are not sharded here: under transformers' Trainer, accelerate does
    that for an IterableDataset (rank 0 reads and dispatches the batches by default, or each rank keeps
    its slice of every batch through IterableDatasetShard); sharding by rank here as well would drop
    records."""

    def __init__(self, files, tokenizer, block_size: int, seed: int = 0):
        self.files, self.tokenizer, self.block_size, self.seed = list(files), tokenizer, block_size, seed
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        order = list(self.files)
        if self.epoch:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = [order[i] for i in torch.randperm(len(order), generator=g).tolist()]
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        i = 0
        for path in order:
            for where, rec in iter_records(path):
                if i % workers == worker:
                    yield encode(self.tokenizer, rec, self.block_size, where)
                i += 1


class ULSCollator:
    """Pads a list of examples (right padding) into input_ids, attention_mask, labels (-100 on prefix and
    padding) and prefix_lengths [batch]."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.pad_token_id = int(pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features):
        T = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            T = -(-T // self.pad_to_multiple_of) * self.pad_to_multiple_of
        B = len(features)
        # numpy arrays filled row by row, one tensor per field at the end: no per-record tensor ops (the
        # collator runs in the training loop's own process with --dataloader-num-workers 0, every step)
        input_ids = np.full((B, T), self.pad_token_id, dtype=np.int64)
        attention_mask = np.zeros((B, T), dtype=np.int64)
        labels = np.full((B, T), IGNORE_INDEX, dtype=np.int64)
        prefix_lengths = np.empty(B, dtype=np.int64)
        for b, f in enumerate(features):
            ids = np.asarray(f["input_ids"], dtype=np.int64)
            n, p = ids.size, int(f["prefix_length"])
            input_ids[b, :n] = ids
            attention_mask[b, :n] = 1
            labels[b, p:n] = ids[p:]
            prefix_lengths[b] = p
        input_ids, attention_mask, labels, prefix_lengths = (
            torch.from_numpy(x) for x in (input_ids, attention_mask, labels, prefix_lengths))
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
                "prefix_lengths": prefix_lengths}


class PackedULSDataset(torch.utils.data.Dataset):
    """Padding-free rows: the examples of `dataset` packed greedily, in order, into rows of at most
    `block_size` tokens (a record is never split). A row is a list of examples; PackingCollator lays them
    out with per-record positions, so attention never crosses a record (transformers builds the
    block-diagonal causal mask from position ids that restart at 0)."""

    def __init__(self, dataset, block_size: int):
        self.rows, row, n = [], [], 0
        for i in range(len(dataset)):
            ex = dataset[i]
            k = len(ex["input_ids"])
            if row and n + k > block_size:
                self.rows.append(row)
                row, n = [], 0
            row.append(ex)
            n += k
        if row:
            self.rows.append(row)
        self.num_records = len(dataset)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


class PackingCollator:
    """Rows of packed examples -> input_ids, position_ids (restarting at 0 for every record), labels (-100
    on prefixes and padding) and response_index (-1 on prefix tokens and padding, else the token's index
    in its record's response): no attention_mask, so transformers detects the packed layout. Padding at the
    end of a row is one more segment of its own, which no record attends to."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.pad_token_id = int(pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, rows):
        T = max(sum(len(ex["input_ids"]) for ex in row) for row in rows)
        if self.pad_to_multiple_of:
            T = -(-T // self.pad_to_multiple_of) * self.pad_to_multiple_of
        B = len(rows)
        # numpy, one pass per row over the row's records concatenated (no per-record tensor ops: the collator
        # runs in the training loop's own process with --dataloader-num-workers 0, every step)
        input_ids = np.full((B, T), self.pad_token_id, dtype=np.int64)
        position_ids = np.empty((B, T), dtype=np.int64)
        labels = np.full((B, T), IGNORE_INDEX, dtype=np.int64)
        response_index = np.full((B, T), -1, dtype=np.int64)
        for b, row in enumerate(rows):
            lens = np.array([len(ex["input_ids"]) for ex in row], dtype=np.int64)
            prefix = np.array([int(ex["prefix_length"]) for ex in row], dtype=np.int64)
            s = int(lens.sum())
            ids = np.fromiter(itertools.chain.from_iterable(ex["input_ids"] for ex in row), dtype=np.int64, count=s)
            local = np.arange(s) - np.repeat(np.cumsum(lens) - lens, lens)  # position inside its record
            past = local - np.repeat(prefix, lens)                           # >= 0: a response token
            input_ids[b, :s] = ids
            position_ids[b, :s] = local
            position_ids[b, s:] = np.arange(T - s)  # the padding: a segment of its own
            labels[b, :s] = np.where(past >= 0, ids, IGNORE_INDEX)
            response_index[b, :s] = np.where(past >= 0, past, -1)
        input_ids, position_ids, labels, response_index = (
            torch.from_numpy(x) for x in (input_ids, position_ids, labels, response_index))
        return {"input_ids": input_ids, "position_ids": position_ids, "labels": labels,
                "response_index": response_index}
