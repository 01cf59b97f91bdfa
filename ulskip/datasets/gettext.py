"""English->X translation pairs from this machine's gettext catalogs, as `ulskip train` / `ulskip eval`
records.

`/usr/share/locale/<lang>/LC_MESSAGES/*.mo` hold Debian packages' UI strings translated by people: real
parallel text, offline. Only the plain `<lang>` folder is read, never `<lang>_*` region variants as a
fallback (`de_CH` spells differently, `zh_CN`/`zh_TW` are different scripts): ask for the variant by its
own code.

Each catalog entry goes through the filters of FILTERS in order and is counted under the first that
drops it; then exact pairs are deduplicated, and a source with several translations keeps the most
frequent one (ties: lexicographically first), so the result does not depend on the order of the files.
The unique pairs are sorted, shuffled with `seed`, and the first `test_size` are the test split.

A record is {"prefix", "text", "source", "reference", "lang"}: prefix/text are what training reads
(ulskip/train/data.py: prefix tokenized with special tokens, text without, then EOS); source/reference
are the raw pair for BLEU. With a tokenizer folder the prefix is its chat template around
INSTRUCTION; without one it is the plain PLAIN_PREFIX.
"""
from __future__ import annotations

import collections
import glob
import gettext
import hashlib
import json
import os
import random
import re
import secrets
import shutil
import struct
import unicodedata

BUILDER = "ulskip data gettext"
INSTRUCTION = "Translate from English to {language}:\n{source}"
# Ends at a newline: the prefix/response token boundary then falls where tokenizers split anyway.
PLAIN_PREFIX = "English: {source}\n{language}:\n"

# Names for the instruction, for languages that have catalogs on Debian; other codes are used as is.
LANGUAGE_NAMES = {
    "af": "Afrikaans", "ar": "Arabic", "ast": "Asturian", "be": "Belarusian", "bg": "Bulgarian",
    "bn": "Bengali", "bs": "Bosnian", "ca": "Catalan", "cs": "Czech", "cy": "Welsh", "da": "Danish",
    "de": "German", "de_CH": "Swiss German", "el": "Greek", "en_GB": "British English", "eo": "Esperanto",
    "es": "Spanish", "et": "Estonian", "eu": "Basque", "fa": "Persian", "fi": "Finnish", "fr": "French",
    "ga": "Irish", "gl": "Galician", "he": "Hebrew", "hi": "Hindi", "hr": "Croatian", "hu": "Hungarian",
    "id": "Indonesian", "is": "Icelandic", "it": "Italian", "ja": "Japanese", "ka": "Georgian",
    "kk": "Kazakh", "ko": "Korean", "lt": "Lithuanian", "lv": "Latvian", "mk": "Macedonian",
    "ms": "Malay", "nb": "Norwegian Bokmål", "nl": "Dutch", "nn": "Norwegian Nynorsk", "pa": "Punjabi",
    "pl": "Polish", "pt": "Portuguese", "pt_BR": "Brazilian Portuguese", "ro": "Romanian",
    "ru": "Russian", "sk": "Slovak", "sl": "Slovenian", "sq": "Albanian", "sr": "Serbian",
    "sv": "Swedish", "ta": "Tamil", "th": "Thai", "tr": "Turkish", "uk": "Ukrainian",
    "vi": "Vietnamese", "zh_CN": "Simplified Chinese", "zh_HK": "Traditional Chinese (Hong Kong)",
    "zh_TW": "Traditional Chinese",
}

# printf (%s %d %1$s %-10s %lu %%), Python (%(name)s), brace ({0} {name} {}), shell ($VAR ${VAR}).
_FORMAT = re.compile(r"%(\d+\$)?[-+#0']*(\*|\d+)?(\.(\*|\d+))?(hh|h|ll|l|L|q|j|z|Z|t|I64|I32|I)?"
                     r"[diouxXeEfFgGaAcspnmCS%]|%\([^)]*\)|\{[^{}\s]*\}|\$\{?[A-Za-z_]")
_MARKUP = re.compile(r"<[A-Za-z/!?][^>]*>|&(#\d+|#x[0-9A-Fa-f]+|[A-Za-z]+);")
# GTK/Qt mnemonics (_File, Sa_ve, &Open); an underscore in a word is otherwise a code identifier.
_MNEMONIC = re.compile(r"_[^\W_]|[^\W_]_|&[^\W_]")
_LANG_CODE = re.compile(r"[A-Za-z]{2,8}([_@][A-Za-z0-9]+)*")

# (name, why) in the order they are applied; meta.json counts the entries each one drops.
FILTERS = [
    ("header", "the catalog header (msgid '')"),
    ("plural", "plural forms (several translations, one per count)"),
    ("context", "msgid with a msgctxt (same text, other meaning)"),
    ("empty", "empty translation"),
    ("multiline", "a newline or tab on either side"),
    ("format", "a printf/Python/brace/shell slot on either side"),
    ("markup", "an HTML/XML tag or entity on either side"),
    ("mnemonic", "a menu mnemonic (_File, &Open) or identifier underscore on either side"),
    ("layout", "runs of spaces (column-aligned --help text)"),
    ("length", "English side outside min_words..max_words words"),
    ("identical", "translation equal to the source"),
]


def _drop_reason(msgid, msgstr, min_words, max_words):
    """The first filter that drops this entry, or None (keep). Trailing-colon labels are kept: with
    4+ words ("Enter the new password:") they translate like sentences."""
    if isinstance(msgid, tuple):
        return "plural"
    if msgid == "":
        return "header"
    if "\x04" in msgid:
        return "context"
    src, tgt = msgid.strip(), msgstr.strip()
    both = src + "\n" + tgt
    if not tgt:
        return "empty"
    if "\n" in src or "\n" in tgt or "\t" in both or "\r" in both:
        return "multiline"
    if _FORMAT.search(src) or _FORMAT.search(tgt):
        return "format"
    if _MARKUP.search(src) or _MARKUP.search(tgt):
        return "markup"
    if _MNEMONIC.search(src) or _MNEMONIC.search(tgt):
        return "mnemonic"
    if "  " in src or "  " in tgt:
        return "layout"
    if not min_words <= len(src.split()) <= max_words:
        return "length"
    if src == tgt:
        return "identical"
    return None


def available_languages(locale_dir: str) -> list[str]:
    """Sorted codes of the folders of locale_dir that hold at least one LC_MESSAGES/*.mo."""
    return sorted(d for d in os.listdir(locale_dir) if glob.glob(os.path.join(locale_dir, d, "LC_MESSAGES", "*.mo")))


def _read_catalogs(lang, locale_dir):
    """[(file name, {msgid: msgstr})] sorted by name, and {file name: error} for unreadable ones."""
    if not _LANG_CODE.fullmatch(lang):
        raise ValueError(f"--lang {lang!r} is not a locale code (e.g. de, fr, pt_BR, sr@latin)")
    if not os.path.isdir(locale_dir):
        raise ValueError(f"--locale-dir {locale_dir!r} is not a folder")
    folder = os.path.join(locale_dir, lang, "LC_MESSAGES")
    paths = sorted(glob.glob(os.path.join(folder, "*.mo")))
    if not paths:
        langs = available_languages(locale_dir)
        raise ValueError(f"no gettext catalogs for --lang {lang!r}: {folder} holds no *.mo files; languages "
                         f"with catalogs in {locale_dir}: {', '.join(langs) if langs else 'none'}")
    catalogs, unreadable = [], {}
    for path in paths:
        try:
            with open(path, "rb") as f:
                catalogs.append((os.path.basename(path), gettext.GNUTranslations(f)._catalog))
        except (OSError, UnicodeError, struct.error, IndexError, ValueError) as e:
            # e.g. Debian's net-tools de catalog: latin-1 bytes under a UTF-8 header. Skip, report.
            unreadable[os.path.basename(path)] = f"{type(e).__name__}: {e}"
    return folder, catalogs, unreadable


def collect_pairs(catalogs, min_words=4, max_words=30):
    """Filtered, deduplicated, sorted [(source, translation)] and the counts of each step."""
    dropped = collections.Counter()
    seen = collections.defaultdict(collections.Counter)  # source -> Counter(translation)
    total = kept = 0
    for _, catalog in catalogs:
        for msgid, msgstr in catalog.items():
            total += 1
            if not isinstance(msgid, tuple):
                msgid, msgstr = unicodedata.normalize("NFC", msgid), unicodedata.normalize("NFC", msgstr)
            reason = _drop_reason(msgid, msgstr, min_words, max_words)
            if reason:
                dropped[reason] += 1
                continue
            kept += 1
            seen[msgid.strip()][msgstr.strip()] += 1
    steps, left = [{"step": "entries", "left": total}], total
    for name, _ in FILTERS:
        left -= dropped[name]
        steps.append({"step": name, "dropped": dropped[name], "left": left})
    unique_pairs = sum(len(c) for c in seen.values())
    steps.append({"step": "duplicate_pair", "dropped": kept - unique_pairs, "left": unique_pairs})
    steps.append({"step": "other_translation", "dropped": unique_pairs - len(seen), "left": len(seen)})
    # Most frequent translation, ties to the lexicographically first: independent of file order.
    pairs = sorted((src, min(c.items(), key=lambda kv: (-kv[1], kv[0]))[0]) for src, c in seen.items())
    return pairs, steps


def _chat_tokenizer(path):
    if not os.path.isdir(path):
        raise ValueError(f"--tokenizer {path!r} is not a folder (give a local checkpoint or tokenizer folder)")
    from transformers import AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"--tokenizer {path!r}: cannot load a tokenizer ({e})") from None
    if not getattr(tok, "chat_template", None):
        raise ValueError(f"--tokenizer {path!r}: the tokenizer has no chat template; give a chat/instruct "
                         f"checkpoint, or leave out --tokenizer for the plain 'English: ...' format")
    return tok


def _leading_bos(tok, text):
    ids = tok(text, add_special_tokens=True)["input_ids"]
    n = 0
    while n < len(ids) and ids[n] == tok.bos_token_id:
        n += 1
    return n


def _chat_prefixer(tok, language):
    """source -> prefix through the chat template, and whether a template BOS is stripped.

    Training tokenizes the prefix WITH special tokens: a template that writes the BOS text itself,
    with a tokenizer that also adds BOS, would give two. Then the template's copy is dropped."""
    bos = tok.bos_token if tok.bos_token_id is not None else None
    adds_bos = bos is not None and tok("a", add_special_tokens=True)["input_ids"][:1] == [tok.bos_token_id] \
        and tok("a", add_special_tokens=False)["input_ids"][:1] != [tok.bos_token_id]

    def raw(source):
        msgs = [{"role": "user", "content": INSTRUCTION.format(language=language, source=source)}]
        return tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)

    strip = adds_bos and raw("Hello world.").startswith(bos)

    def render(source):
        prefix = raw(source)
        return prefix[len(bos):] if strip and prefix.startswith(bos) else prefix

    n = _leading_bos(tok, render("Hello world.")) if bos is not None else 0
    if n > 1:
        raise ValueError(f"the chat template of the tokenizer gives {n} BOS tokens once tokenized with special "
                         f"tokens; cannot build records with exactly one")
    return render, strip


def _check_out_dir(out_dir, overwrite):
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"--out {out_dir!r} exists and is not a folder")
    if not os.path.isdir(out_dir) or not os.listdir(out_dir):
        return
    if not overwrite:
        raise ValueError(f"--out {out_dir!r} exists and is not empty; give --overwrite to replace it")
    # --overwrite deletes the folder: only one this builder wrote, never e.g. a home folder by a typo.
    try:
        with open(os.path.join(out_dir, "meta.json"), encoding="utf-8") as f:
            ours = json.load(f).get("builder") == BUILDER
    except (OSError, ValueError, AttributeError):
        ours = False
    if not ours:
        raise ValueError(f"--out {out_dir!r} is not empty and was not written by '{BUILDER}' (no meta.json "
                         f"of ours); --overwrite only replaces such folders, remove it yourself if meant")


def _write_atomically(out_dir, files: dict[str, bytes], overwrite):
    """Write the files into a temporary sibling folder, then swap it in: never a half-written out_dir."""
    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(out_dir)}.tmp-{secrets.token_hex(4)}")
    os.mkdir(tmp)
    old = None
    try:
        for name, data in files.items():
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(data)
        _check_out_dir(out_dir, overwrite)  # again: it may have been filled meanwhile
        if os.path.isdir(out_dir):
            if os.listdir(out_dir):
                old = tmp + ".old"
                os.rename(out_dir, old)
            else:
                os.rmdir(out_dir)
        try:
            os.rename(tmp, out_dir)
        except OSError:
            if old:
                os.rename(old, out_dir)
                old = None
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old:
        shutil.rmtree(old, ignore_errors=True)


def build_gettext_pairs(lang: str, out_dir: str, tokenizer_path: str | None = None,
                        locale_dir: str = "/usr/share/locale", test_size: int = 500, seed: int = 0,
                        min_words: int = 4, max_words: int = 30, overwrite: bool = False) -> dict:
    """Write train.jsonl, test.jsonl and meta.json into out_dir; return the meta dict.
    Every bad input is a ValueError naming the value."""
    if isinstance(min_words, bool) or not isinstance(min_words, int) or min_words < 1:
        raise ValueError(f"--min-words must be an integer >= 1, got {min_words!r}")
    if isinstance(max_words, bool) or not isinstance(max_words, int) or max_words < min_words:
        raise ValueError(f"--max-words must be an integer >= --min-words ({min_words}), got {max_words!r}")
    if isinstance(test_size, bool) or not isinstance(test_size, int) or test_size < 0:
        raise ValueError(f"--test-size must be an integer >= 0, got {test_size!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"--seed must be an integer, got {seed!r}")
    if not isinstance(out_dir, str) or not out_dir.strip():
        raise ValueError(f"--out must name an output folder, got {out_dir!r}")
    _check_out_dir(out_dir, overwrite)
    language = LANGUAGE_NAMES.get(lang, lang)
    render, bos_stripped = (_chat_prefixer(_chat_tokenizer(tokenizer_path), language)
                            if tokenizer_path is not None else (None, False))
    folder, catalogs, unreadable = _read_catalogs(lang, locale_dir)

    pairs, steps = collect_pairs(catalogs, min_words, max_words)
    if len(pairs) <= test_size:
        raise ValueError(f"only {len(pairs)} pairs for --lang {lang!r} after filtering ({len(catalogs)} "
                         f"catalogs in {folder}); --test-size {test_size} needs at least {test_size + 1} "
                         f"({test_size} test + 1 train)")
    random.Random(seed).shuffle(pairs)  # pairs are sorted: the split depends on seed only

    def record(src, tgt):
        prefix = render(src) if render else PLAIN_PREFIX.format(source=src, language=language)
        return json.dumps({"prefix": prefix, "text": tgt, "source": src, "reference": tgt, "lang": lang},
                          ensure_ascii=False) + "\n"

    test = "".join(record(*p) for p in pairs[:test_size]).encode("utf-8")
    train = "".join(record(*p) for p in pairs[test_size:]).encode("utf-8")
    meta = {
        "builder": BUILDER, "lang": lang, "language": language, "catalog_folder": folder,
        "catalogs": len(catalogs), "catalogs_unreadable": unreadable, "filters": steps,
        "pairs": len(pairs), "train": len(pairs) - test_size, "test": test_size,
        "seed": seed, "test_size": test_size, "min_words": min_words, "max_words": max_words,
        "format": "chat" if render else "plain",
        "instruction": INSTRUCTION if render else PLAIN_PREFIX,
        "tokenizer": os.path.abspath(tokenizer_path) if tokenizer_path is not None else None,
        "bos_stripped": bos_stripped,
        "sha256": {"train.jsonl": hashlib.sha256(train).hexdigest(),
                   "test.jsonl": hashlib.sha256(test).hexdigest()},
    }
    _write_atomically(out_dir, {"train.jsonl": train, "test.jsonl": test,
                                "meta.json": (json.dumps(meta, indent=2, ensure_ascii=False) + "\n").encode()},
                      overwrite)
    return meta
