"""Training data: records to token ids with the prefix/response boundary, the collator's labels and prefix
lengths, streaming across DataLoader workers."""
import pytest
import torch

from helpers import make_tokenizer, write_train_data
from ulskip.train.data import DataError, StreamingULSDataset, ULSCollator, ULSDataset, resolve_files


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_train_data(tmp_path_factory.mktemp("data"))


def test_collator_labels_and_prefix_lengths(data):
    tok = make_tokenizer()
    ds = ULSDataset(resolve_files(data), tok, block_size=64)
    batch = ULSCollator(tok.pad_token_id)([ds[0], ds[9]])
    for b, ex in enumerate([ds[0], ds[9]]):
        n, p = len(ex["input_ids"]), ex["prefix_length"]
        assert batch["prefix_lengths"][b] == p
        assert (batch["labels"][b, :p] == -100).all() and (batch["labels"][b, n:] == -100).all()
        assert torch.equal(batch["labels"][b, p:n], batch["input_ids"][b, p:n])
        assert batch["attention_mask"][b].sum() == n
        assert ex["input_ids"][0] == tok.bos_token_id and ex["input_ids"][-1] == tok.eos_token_id
    with pytest.raises(DataError, match="matches no files"):
        resolve_files("/nonexistent/*.jsonl")


@pytest.mark.parametrize("num_workers", [0, 2])
def test_streaming_each_record_once(data, num_workers):
    """--streaming with --dataloader_num_workers N: each DataLoader worker yields its own share of the
    records, so one pass holds every record exactly once (not N times); also after set_epoch."""
    tok = make_tokenizer()
    files = resolve_files(data)
    want = sorted(tuple(ex["input_ids"]) for ex in ULSDataset(files, tok, block_size=64))
    ds = StreamingULSDataset(files, tok, block_size=64, seed=0)
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=num_workers)
        got = sorted(tuple(ex["input_ids"]) for ex in loader)
        assert got == want, epoch
