"""`ulskip data gettext`: filters, dedup, split, chat prefix with exactly one BOS, and the bad inputs,
on small .mo catalogs written here (the system's only in the last, optional test)."""
import json
import os
import struct
import unicodedata

import pytest

from ulskip.cli import main
from ulskip.datasets.gettext import build_gettext_pairs

GOOD = {  # source -> translation that must survive
    "The file could not be opened.": "Die Datei konnte nicht geöffnet werden.",
    "Please try again later.": "Bitte versuchen Sie es später erneut.",
    "Enter the new password again:": "Geben Sie das neue Passwort erneut ein:",
    "Leading and trailing spaces here": "Führende und folgende Leerzeichen hier",
    "Close the window right now": "Das Fenster sofort schließen, für immer",  # NFD in a.mo
    "Connection to the server was lost": "Verbindung zum Server verloren",  # a tie, a.mo and c.mo
    "Press any key to continue.": "Drücken Sie eine Taste, um fortzufahren.",  # 2 of 3 catalogs
}

# Each must be dropped by the named filter.
BAD = {
    "": ("Content-Type: text/plain; charset=UTF-8\n", "header"),
    "Remove the selected file now\x00Remove the selected files now":
        ("Die gewählte Datei entfernen\x00Die gewählten Dateien entfernen", "plural"),
    "menu\x04Open the selected file now": ("Die gewählte Datei jetzt öffnen", "context"),
    "This string has no translation yet": ("   ", "empty"),
    "First line of text\nSecond line of text": ("Erste Zeile des Textes\nZweite Zeile des Textes", "multiline"),
    "Cannot open file %s for reading": ("Datei %s kann nicht gelesen werden", "format"),
    "Copied %1$s of all the files": ("%1$s aller Dateien kopiert", "format"),
    "The value %(name)s is not valid": ("Der Wert %(name)s ist ungültig", "format"),
    "Unknown option {0} was given here": ("Unbekannte Option {0} wurde angegeben", "format"),
    "Please set the $HOME variable first": ("Bitte zuerst die Variable $HOME setzen", "format"),
    "Progress is at 100%% now": ("Der Fortschritt ist jetzt bei 100%%", "format"),
    "<b>Warning:</b> the disk is full": ("<b>Warnung:</b> die Platte ist voll", "markup"),
    "Tom &amp; Jerry are both here": ("Tom &amp; Jerry sind beide hier", "markup"),
    "Click here to learn more": ("<a href='x'>Hier</a> klicken für mehr", "markup"),
    "_Open the selected document now": ("Gewähltes Dokument jetzt _öffnen", "mnemonic"),
    "&Save the current document now": ("Aktuelles Dokument &speichern", "mnemonic"),
    "Sa_ve all the open documents": ("Alle offenen Dokumente _speichern", "mnemonic"),
    "-v, --verbose     print more information": ("-v, --verbose     mehr Information ausgeben", "layout"),
    "Open file": ("Datei öffnen", "length"),
    " ".join(["word"] * 31): (" ".join(["Wort"] * 31), "length"),
    "GNU General Public License version 3": ("GNU General Public License version 3", "identical"),
}


def write_mo(path, entries):
    """A GNU .mo file: magic, revision 0, count, offsets of the msgid and msgstr tables, no hash table."""
    items = sorted((k.encode(), v.encode()) for k, v in entries.items())
    n = len(items)
    data_start = 28 + 16 * n
    blob, otab, ttab = b"", [], []
    for table, idx in ((otab, 0), (ttab, 1)):
        for item in items:
            s = item[idx]
            table.append((len(s), data_start + len(blob)))
            blob += s + b"\0"
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<7I", 0x950412DE, 0, n, 28, 28 + 8 * n, 0, 0))
        for length, off in otab + ttab:
            f.write(struct.pack("<2I", length, off))
        f.write(blob)


HEADER = {"": "Content-Type: text/plain; charset=UTF-8\nPlural-Forms: nplurals=2; plural=(n != 1);\n"}


def catalogs():
    """Contents of a.mo, b.mo, c.mo."""
    a = {**HEADER, **{k: v for k, (v, _) in BAD.items()}}
    a.update({k: v for k, v in GOOD.items() if k != "Press any key to continue."})
    a["  Leading and trailing spaces here  "] = a.pop("Leading and trailing spaces here")
    a["Close the window right now"] = unicodedata.normalize("NFD", GOOD["Close the window right now"])
    assert a["Close the window right now"] != GOOD["Close the window right now"]
    # a tie between two translations: the lexicographically first (c.mo's) wins
    a["Connection to the server was lost"] = "Verbindung zum Server wurde unterbrochen"
    # "Press any key": 2 votes for GOOD's (lexicographically later) against 1: the most frequent wins.
    a["Press any key to continue."] = "Beliebige Taste drücken."
    b = {**HEADER, "Press any key to continue.": GOOD["Press any key to continue."],
         "Please try again later.": GOOD["Please try again later."]}  # exact duplicate pair
    c = {**HEADER, "Press any key to continue.": GOOD["Press any key to continue."],
         "Connection to the server was lost": GOOD["Connection to the server was lost"]}
    return a, b, c


def make_locale(root, order=("a", "b", "c")):
    for name, entries in zip(order, catalogs()):
        write_mo(os.path.join(root, "de", "LC_MESSAGES", f"{name}.mo"), entries)
    return str(root)


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def run_cli(*argv):
    with pytest.raises(SystemExit) as ei:
        main(["data", "gettext", *argv])
    msg = str(ei.value.code)
    assert msg.startswith("ulskip data gettext:"), msg
    return msg


def no_temp_left(folder):
    return not [n for n in os.listdir(folder) if ".tmp-" in n]


def test_filters_dedup_and_counts(tmp_path):
    loc = make_locale(tmp_path / "locale")
    meta = build_gettext_pairs("de", str(tmp_path / "out"), locale_dir=loc, test_size=2)
    recs = read_jsonl(tmp_path / "out" / "train.jsonl") + read_jsonl(tmp_path / "out" / "test.jsonl")
    assert {r["source"]: r["reference"] for r in recs} == GOOD
    assert len(recs) == len(GOOD) == meta["pairs"] == meta["train"] + meta["test"]
    for r in recs:
        assert r["lang"] == "de" and r["text"] == r["reference"]
        assert r["prefix"] == f"English: {r['source']}\nGerman:\n"
        assert unicodedata.is_normalized("NFC", r["text"])
    dropped = {s["step"]: s["dropped"] for s in meta["filters"][1:]}
    want = {name: 0 for name in dropped}
    for _, reason in BAD.values():
        want[reason] += 1
    want["header"] = 3
    want["plural"] = 2  # one key per plural form
    want["duplicate_pair"] = 2  # "Please try again later." and GOOD's "Press any key" seen twice
    want["other_translation"] = 2  # "Press any key" and "Connection" had two translations each
    assert dropped == want
    assert meta["filters"][0]["left"] == sum(len(c) for c in catalogs()) + 1  # plural: 2 keys for 1 msgid
    assert meta["filters"][-1]["left"] == meta["pairs"]
    assert meta["catalogs"] == 3 and meta["format"] == "plain" and meta["catalogs_unreadable"] == {}
    assert meta == json.loads((tmp_path / "out" / "meta.json").read_text())
    assert no_temp_left(tmp_path)


def test_split_is_deterministic_and_disjoint(tmp_path):
    outs = []
    for i, order in enumerate([("a", "b", "c"), ("c", "a", "b"), ("a", "b", "c")]):
        loc = make_locale(tmp_path / f"locale{i}", order)  # same contents, other file order
        build_gettext_pairs("de", str(tmp_path / f"out{i}"), locale_dir=loc, test_size=3, seed=7)
        outs.append([(tmp_path / f"out{i}" / n).read_bytes() for n in ("train.jsonl", "test.jsonl")])
    assert outs[0] == outs[1] == outs[2]
    train, test = (read_jsonl(tmp_path / "out0" / n) for n in ("train.jsonl", "test.jsonl"))
    assert len(test) == 3 and len(train) == len(GOOD) - 3
    assert not {r["source"] for r in train} & {r["source"] for r in test}
    build_gettext_pairs("de", str(tmp_path / "other"), locale_dir=str(tmp_path / "locale0"), test_size=3, seed=8)
    assert read_jsonl(tmp_path / "other" / "test.jsonl") != test  # the seed moves the split


def make_tokenizer(folder, template_bos: bool, adds_bos: bool, chat=True):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    specials = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>"]
    words = sorted({w for s in list(GOOD) + list(GOOD.values()) + ["Translate", "from", "English", "to",
                                                                    "German", ":", "Hello", "world", "."]
                    for w in s.replace(":", " : ").replace(".", " . ").split()})
    vocab = {t: i for i, t in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if adds_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>"]})
    if chat:
        fast.chat_template = (("{{ bos_token }}" if template_bos else "")
                              + "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}\n{% endfor %}"
                              + "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    fast.save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("template_bos,adds_bos", [(True, True), (True, False), (False, True)])
def test_chat_prefix_has_exactly_one_bos(tmp_path, template_bos, adds_bos):
    from transformers import AutoTokenizer
    from ulskip.train.data import encode
    tok_dir = make_tokenizer(tmp_path / "tok", template_bos, adds_bos)
    loc = make_locale(tmp_path / "locale")
    meta = build_gettext_pairs("de", str(tmp_path / "out"), tokenizer_path=tok_dir, locale_dir=loc, test_size=1)
    assert meta["format"] == "chat" and meta["bos_stripped"] == (template_bos and adds_bos)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    raw = tok.apply_chat_template([{"role": "user", "content": "x"}], add_generation_prompt=True, tokenize=False)
    raw_bos = tok(raw, add_special_tokens=True)["input_ids"].count(tok.bos_token_id)
    assert raw_bos == template_bos + adds_bos  # (True, True) would give two BOS without the fix
    recs = read_jsonl(tmp_path / "out" / "train.jsonl") + read_jsonl(tmp_path / "out" / "test.jsonl")
    for rec in recs:
        bos = "<s>" if template_bos and not adds_bos else ""
        assert rec["prefix"] == f"{bos}<|user|>\nTranslate from English to German:\n{rec['source']}\n<|assistant|>\n"
        ids = encode(tok, rec, block_size=512, where="test")["input_ids"]
        assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
        assert ids[-1] == tok.eos_token_id and ids.count(tok.eos_token_id) == 1


def test_tokenizer_without_chat_template(tmp_path):
    tok_dir = make_tokenizer(tmp_path / "tok", False, True, chat=False)
    msg = run_cli("--lang", "de", "--out", str(tmp_path / "out"), "--tokenizer", tok_dir,
                  "--locale-dir", make_locale(tmp_path / "locale"))
    assert "no chat template" in msg and tok_dir in msg
    assert not (tmp_path / "out").exists()


def test_cli_success_and_overwrite(tmp_path, capsys):
    loc, out = make_locale(tmp_path / "locale"), str(tmp_path / "out")
    assert main(["data", "gettext", "--lang", "de", "--out", out, "--locale-dir", loc, "--test-size", "2"]) == 0
    printed = capsys.readouterr().out
    assert f"-> {len(GOOD)} pairs" in printed and out in printed and "train 5, test 2" in printed
    msg = run_cli("--lang", "de", "--out", out, "--locale-dir", loc, "--test-size", "3")
    assert out in msg and "--overwrite" in msg
    assert len(read_jsonl(os.path.join(out, "test.jsonl"))) == 2  # untouched
    assert main(["data", "gettext", "--lang", "de", "--out", out, "--locale-dir", loc, "--test-size", "3",
                 "--overwrite"]) == 0
    assert len(read_jsonl(os.path.join(out, "test.jsonl"))) == 3
    assert sorted(os.listdir(out)) == ["meta.json", "test.jsonl", "train.jsonl"] and no_temp_left(tmp_path)


def test_existing_foreign_folder_is_left_untouched(tmp_path):
    loc, out = make_locale(tmp_path / "locale"), tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    for extra in ([], ["--overwrite"]):  # --overwrite replaces only a folder this command wrote
        msg = run_cli("--lang", "de", "--out", str(out), "--locale-dir", loc, *extra)
        assert str(out) in msg
        assert os.listdir(out) == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    assert no_temp_left(tmp_path)


def test_bad_inputs(tmp_path):
    loc = make_locale(tmp_path / "locale")
    write_mo(str(tmp_path / "locale" / "fr" / "LC_MESSAGES" / "x.mo"), HEADER)
    os.makedirs(tmp_path / "locale" / "it" / "LC_MESSAGES")  # no .mo: not a language with catalogs
    out = str(tmp_path / "out")
    msg = run_cli("--lang", "xx", "--out", out, "--locale-dir", loc)
    assert "'xx'" in msg and os.path.join(loc, "xx", "LC_MESSAGES") in msg and msg.endswith(": de, fr")
    msg = run_cli("--lang", "../de", "--out", out, "--locale-dir", loc)
    assert "'../de'" in msg
    msg = run_cli("--lang", "de", "--out", out, "--locale-dir", loc, "--test-size", "7")
    assert f"only {len(GOOD)} pairs" in msg and "--test-size 7" in msg and "at least 8" in msg
    msg = run_cli("--lang", "de", "--out", out, "--locale-dir", loc, "--min-words", "9", "--max-words", "5")
    assert "--max-words" in msg and "5" in msg and "(9)" in msg
    msg = run_cli("--lang", "de", "--out", out, "--locale-dir", loc, "--test-size", "-1")
    assert "--test-size" in msg and "-1" in msg
    msg = run_cli("--lang", "de", "--out", out, "--locale-dir", loc, "--min-words", "0")
    assert "--min-words" in msg and "0" in msg
    msg = run_cli("--lang", "de", "--out", out, "--locale-dir", str(tmp_path / "nowhere"))
    assert "nowhere" in msg
    assert "--out" in run_cli("--lang", "de", "--out", "", "--locale-dir", loc)  # never the current folder
    assert not os.path.exists(out) and no_temp_left(tmp_path)


SYSTEM_DE = "/usr/share/locale/de/LC_MESSAGES"


@pytest.mark.skipif(not os.path.isdir(SYSTEM_DE), reason=f"no {SYSTEM_DE}")
def test_system_catalogs_de(tmp_path):
    meta = build_gettext_pairs("de", str(tmp_path / "out"))
    assert meta["pairs"] >= 5000 and meta["test"] == 500  # 13764 on Debian bookworm with 86 catalogs
    rec = read_jsonl(tmp_path / "out" / "test.jsonl")[0]
    assert rec["prefix"].startswith("English: ") and rec["prefix"].endswith("\nGerman:\n")
