"""Shared helpers of the training tests (no tests here): a tiny word-level tokenizer trained on the
tests' own text, tiny random checkpoints, and a small real-text prefix/response data set."""
from __future__ import annotations

import json
import os

import torch

WORDS = ("the sky is blue . grass is green . snow is white . the sun is hot . ice is cold . fire is hot . "
         "a cat says meow . a dog says woof . a cow says moo . two plus two is four . one plus one is two . "
         "three plus three is six . paris is in france . rome is in italy . tokyo is in japan .")
FACTS = [
    ("what color is the sky ?", "the sky is blue ."), ("what color is grass ?", "grass is green ."),
    ("what color is snow ?", "snow is white ."), ("is the sun hot or cold ?", "the sun is hot ."),
    ("is ice hot or cold ?", "ice is cold ."), ("is fire hot or cold ?", "fire is hot ."),
    ("what does a cat say ?", "a cat says meow ."), ("what does a dog say ?", "a dog says woof ."),
    ("what does a cow say ?", "a cow says moo ."), ("what is two plus two ?", "two plus two is four ."),
    ("what is one plus one ?", "one plus one is two ."), ("what is three plus three ?", "three plus three is six ."),
    ("where is paris ?", "paris is in france ."), ("where is rome ?", "rome is in italy ."),
    ("where is tokyo ?", "tokyo is in japan ."),
]


def records():
    return [{"prefix": f"question : {q} answer :", "text": a} for q, a in FACTS]


def make_tokenizer(path=None):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    text = [WORDS] + [f"question : {q} answer : {a}" for q, a in FACTS]
    tok.train_from_iterator(text, trainers.WordLevelTrainer(special_tokens=["<pad>", "<s>", "</s>", "<unk>"]))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    if path is not None:
        fast.save_pretrained(path)
    return fast


def make_model(family="llama", num_layers=4, vocab_size=64, seed=0, tie=None):
    from transformers import BloomConfig, BloomForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    ids = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if family == "bloom":
        return BloomForCausalLM(BloomConfig(vocab_size=vocab_size, hidden_size=64, n_layer=num_layers, n_head=4,
                                            **ids))
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=num_layers, num_attention_heads=4,
                                        num_key_value_heads=2, max_position_embeddings=256,
                                        tie_word_embeddings=bool(tie), **ids))


def make_checkpoint(path, family="llama", num_layers=4, seed=0):
    tok = make_tokenizer()
    model = make_model(family, num_layers, vocab_size=len(tok), seed=seed)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def write_jsonl(path, recs):
    with open(path, "w") as f:
        for r in recs:
            f.write(json.dumps(r) + "\n")
    return str(path)


def read_log_losses(output_dir):
    """Losses logged by the Trainer, from the last checkpoint's trainer_state.json."""
    ckpts = sorted((d for d in os.listdir(output_dir) if d.startswith("checkpoint-")),
                   key=lambda d: int(d.split("-")[1]))
    with open(os.path.join(output_dir, ckpts[-1], "trainer_state.json")) as f:
        return [h["loss"] for h in json.load(f)["log_history"] if "loss" in h]
