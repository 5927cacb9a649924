"""``flowsys prepare``: text into the token shards a job trains on, as nanoGPT's prepare.py.

    flowsys prepare SRC [SRC ...] --out DIR [--tokenizer bytes|bpe|PATH/tokenizer.json]
                    [--vocab-size N] [--val-fraction F] [--text-field text]

SRC are text files (any UTF-8: .txt, .md, .py, ...; one document each), directories of them
(recursively, in sorted path order; hidden entries and ``__pycache__`` left out, files that are
not UTF-8 text skipped with a note) and ``.jsonl`` files (one document per line: its
``--text-field``). DIR gets ``train.bin`` and ``val.bin`` (flat token ids, uint16 when the
vocabulary fits, else uint32: ``np.memmap``-able), an end-of-text token after each document's
part; ``meta.json`` (written last: the tokenizer, vocab_size, eot, dtype, token counts, sha256s,
the sources with sizes and mtimes, the options); and, for a BPE, ``tokenizer.json``.

The split: every document gives its tail to val.bin, its last ``⌊f·C_j⌋ − ⌊f·C_j−1⌋`` tokens, where
``C_j`` counts the tokens of documents 1..j. So val.bin holds ``⌊f·N⌋`` of the N text tokens,
drawn from every part of the corpus (a sorted tree's last files are one corner of it), and one
big file splits by position, as nanoGPT splits Shakespeare. Re-running with the same sources
(paths, sizes, mtimes) and options does nothing.

>>> import tempfile
>>> src = Path(tempfile.mkdtemp())
>>> _ = (src / "a.txt").write_text("hello world\\n" * 50)
>>> out = prepare(src, src / "tokens", log=lambda line: None)
>>> meta = json.loads((out / "meta.json").read_text())
>>> meta["tokens"], meta["vocab_size"], meta["eot"], meta["dtype"]
({'train': 541, 'val': 61}, 257, 256, 'uint16')
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tokenizers
from tqdm import tqdm

from flowsys.datasource import FORMAT, FORMAT_VERSION, META, SPLIT_FILES, open_shards, read_meta
from flowsys.errors import ConfigError

EOT_TEXT = "<|endoftext|>"
EOT_NAMES = (EOT_TEXT, "<|end_of_text|>", "</s>", "<eos>")  # what a given tokenizer.json may call it
DEFAULT_BPE_VOCAB = 4096
TOKENIZER_FILE = "tokenizer.json"
_SKIP_DIRS = {"__pycache__"}
_ENCODE_BATCH = 64  # documents per tokenizers.encode_batch call (it encodes them in parallel)


# ------------------------------------------------------------------------------ tokenizers
@dataclass(frozen=True)
class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, and the end-of-text token 256."""

    kind: str = "bytes"
    vocab_size: int = 257
    eot: int = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [self.encode(t) for t in texts]

    def decode(self, tokens) -> str:
        """The text of ``tokens``: end-of-text as ``<|endoftext|>``, an id that is no byte as U+FFFD."""
        ids = np.asarray(tokens, dtype=np.int64).ravel()
        pieces = np.split(ids, np.flatnonzero(ids == self.eot))
        text = [pieces[0]] + [p[1:] for p in pieces[1:]]  # each later piece starts with the eot
        as_bytes = [np.where((p >= 0) & (p < 256), p, 0xFF).astype(np.uint8).tobytes() for p in text]
        return EOT_TEXT.join(b.decode("utf-8", errors="replace") for b in as_bytes)


@dataclass(frozen=True)
class HFTokenizer:
    """A Hugging Face ``tokenizers`` tokenizer: a byte-level BPE trained here ("bpe") or a given
    tokenizer.json ("tokenizer.json")."""

    kind: str
    tokenizer: tokenizers.Tokenizer
    eot: int

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.tokenizer.encode(text).ids, dtype=np.int64)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(e.ids, dtype=np.int64) for e in self.tokenizer.encode_batch(texts)]

    def decode(self, tokens) -> str:
        ids = np.asarray(tokens, dtype=np.int64).ravel().tolist()
        return self.tokenizer.decode(ids, skip_special_tokens=False)


def tokenizer_from_file(path: str | Path, kind: str = "tokenizer.json") -> HFTokenizer:
    """A saved tokenizer.json, with its end-of-text token (one of :data:`EOT_NAMES`)."""
    try:
        tok = tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001 - tokenizers raises plain Exceptions
        raise ConfigError(f"cannot load the tokenizer {path} ({e}); give a Hugging Face tokenizer.json") from None
    eot = next((tok.token_to_id(name) for name in EOT_NAMES if tok.token_to_id(name) is not None), None)
    if eot is None:
        raise ConfigError(f"the tokenizer {path} has no end-of-text token (one of {', '.join(EOT_NAMES)}); "
                          f"add one as a special token")
    return HFTokenizer(kind, tok, eot)


def load_tokenizer(directory: str | Path, meta: dict | None = None) -> ByteTokenizer | HFTokenizer:
    """The tokenizer a token directory was prepared with."""
    meta = meta if meta is not None else read_meta(directory)
    if meta["tokenizer"] == "bytes":
        return ByteTokenizer()
    tok = tokenizer_from_file(Path(directory) / TOKENIZER_FILE, meta["tokenizer"])
    if (tok.eot, tok.vocab_size) != (meta["eot"], meta["vocab_size"]):
        raise ConfigError(f"{Path(directory) / TOKENIZER_FILE} (eot {tok.eot}, vocab {tok.vocab_size}) is not the "
                          f"tokenizer {META} describes (eot {meta['eot']}, vocab {meta['vocab_size']}); "
                          f"run `flowsys prepare` again into {directory}")
    return tok


def train_bpe(texts: Iterable[str], vocab_size: int, show_progress: bool = False) -> HFTokenizer:
    """A byte-level BPE (GPT-2's pre-tokenizer, every byte in its alphabet, so any text encodes
    and decodes back) of ``vocab_size`` tokens trained on ``texts``, end-of-text its id 0."""
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT_TEXT], show_progress=show_progress,
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return HFTokenizer("bpe", tok, tok.token_to_id(EOT_TEXT))


# --------------------------------------------------------------------------------- sources
def find_files(srcs: list[Path], out: Path) -> list[Path]:
    """The files of ``srcs``: each file as given, each directory's files recursively in sorted
    path order (hidden entries, ``__pycache__`` and ``out`` left out)."""
    files = []
    for src in srcs:
        if not src.exists():
            raise ConfigError(f"prepare: SRC {src} does not exist; give text files, directories or .jsonl files")
        if src.is_file():
            files.append(src.resolve())
            continue
        found = []
        for dirpath, dirnames, filenames in os.walk(src):
            here = Path(dirpath)
            dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in _SKIP_DIRS
                           and (here / d).resolve() != out]
            found += [here / f for f in filenames if not f.startswith(".") and (here / f).is_file()]  # no dangling links
        files += [p.resolve() for p in sorted(found, key=lambda p: p.relative_to(src).as_posix())]
    return files


def _as_text(data: bytes) -> str | None:
    """``data`` as text, or None for a file that is not UTF-8 text."""
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise ConfigError(f"prepare: cannot read {path} ({e.strerror})") from None


def _lines(path: Path) -> Iterator[bytes]:
    try:
        with open(path, "rb") as f:
            yield from f
    except OSError as e:
        raise ConfigError(f"prepare: cannot read {path} ({e.strerror})") from None


def documents(files: list[Path], text_field: str, progress=None, skipped: list | None = None) -> Iterator[str]:
    """The non-empty documents of ``files``: a text file's text, each ``.jsonl`` line's
    ``text_field``; files that are not UTF-8 text go to ``skipped``."""
    for path in files:
        if path.suffix == ".jsonl":
            for lineno, line in enumerate(_lines(path), 1):
                if progress is not None:
                    progress.update(len(line))
                if line.strip():
                    text = _jsonl_text(path, lineno, line, text_field)
                    if text:
                        yield text
            continue
        data = _read(path)
        if progress is not None:
            progress.update(len(data))
        text = _as_text(data)
        if text is None:
            if skipped is not None:
                skipped.append(path)
        elif text:
            yield text


def _jsonl_text(path: Path, lineno: int, line: bytes, field: str) -> str:
    try:
        record = json.loads(line)
    except ValueError as e:
        raise ConfigError(f"{path}:{lineno}: not a JSON object ({e}); a .jsonl file holds one per line") from None
    if not isinstance(record, dict) or field not in record:
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise ConfigError(f"{path}:{lineno}: no {field!r} field (has {keys}); name the text's field with --text-field")
    if not isinstance(record[field], str):
        raise ConfigError(f"{path}:{lineno}: the {field!r} field is a {type(record[field]).__name__}, not text")
    return record[field]


def _batched(items: Iterable, n: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


class _Progress:
    """Bytes read: a tqdm bar when stderr is a terminal, else a log line at every tenth."""

    def __init__(self, total: int, what: str, log):
        self.total, self.what, self.log, self.done, self.shown = total, what, log, 0, 0
        self.bar = tqdm(total=total, unit="B", unit_scale=True, desc=what, file=sys.stderr) if sys.stderr.isatty() else None

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        tenth = min(10, self.done * 10 // max(self.total, 1))
        if tenth > self.shown:
            self.shown = tenth
            self.log(f"prepare: {self.what} {tenth * 10}% ({_size(self.done)} of {_size(self.total)})")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _size(n: int) -> str:
    return f"{n / 1e6:,.1f} MB" if n >= 100_000 else f"{n:,} B"


# --------------------------------------------------------------------------------- writing
class _Shard:
    """A split's .bin, written to a temporary name, hashed as it goes, renamed when whole."""

    def __init__(self, path: Path, dtype):
        self.path, self.tmp, self.dtype = path, path.with_name(path.name + ".tmp"), np.dtype(dtype)
        self.sha, self.count = hashlib.sha256(), 0
        self.file = open(self.tmp, "wb")  # noqa: SIM115 - closed by close()

    def write(self, tokens: np.ndarray) -> None:
        data = tokens.astype(self.dtype).tobytes()
        self.file.write(data)
        self.sha.update(data)
        self.count += len(tokens)

    def close(self, keep: bool) -> None:
        self.file.close()
        if keep:
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)


def _write(tok, docs: Iterable[str], shards: dict[str, _Shard], val_fraction: float) -> tuple[int, int]:
    """Each document's head to train.bin and its tail to val.bin, eot after each: the documents
    and text tokens written."""
    n_docs = n_text = 0
    for batch in _batched(docs, _ENCODE_BATCH):
        for ids in tok.encode_batch(batch):
            before, n_text = n_text, n_text + len(ids)
            n_val = int(val_fraction * n_text) - int(val_fraction * before)  # floor(f*C_j) - floor(f*C_j-1)
            for split, part in (("train", ids[: len(ids) - n_val]), ("val", ids[len(ids) - n_val:])):
                if len(part):
                    shards[split].write(np.append(part, tok.eot))
            n_docs += 1
    return n_docs, n_text


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _options(tokenizer: str, vocab_size: int | None, val_fraction: float, text_field: str) -> dict:
    """The options a re-run compares (a given tokenizer.json by its contents), checked."""
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"prepare: --val-fraction must be in (0, 1), got {val_fraction}")
    if tokenizer in ("bytes", "bpe"):
        kind = tokenizer
    elif Path(tokenizer).expanduser().is_file():
        kind = {"tokenizer.json": _sha256(Path(tokenizer).expanduser())}
    else:
        raise ConfigError(f"prepare: --tokenizer {tokenizer!r} is not 'bytes', 'bpe' or an existing tokenizer.json file")
    if kind != "bpe" and vocab_size is not None:
        raise ConfigError(f"prepare: --vocab-size sizes a BPE trained here; it does not apply to --tokenizer {tokenizer}")
    if kind == "bpe":
        vocab_size = DEFAULT_BPE_VOCAB if vocab_size is None else int(vocab_size)
        if vocab_size < 257:
            raise ConfigError(f"prepare: --vocab-size {vocab_size} is too small: a byte-level BPE needs its 256 byte "
                              f"tokens and {EOT_TEXT}, so at least 257")
    return {"tokenizer": kind, "vocab_size": vocab_size, "val_fraction": val_fraction, "text_field": text_field}


def _up_to_date(out: Path, sources: list[dict], options: dict) -> bool:
    """Whether ``out`` holds whole shards prepared from these sources with these options."""
    try:
        meta = read_meta(out)
        open_shards(out, meta)
    except ConfigError:
        return False
    return (meta.get("sources") == sources and meta.get("options") == options
            and (meta["tokenizer"] == "bytes" or (out / TOKENIZER_FILE).is_file()))


def prepare(src, out, tokenizer: str = "bytes", vocab_size: int | None = None, val_fraction: float = 0.1,
            text_field: str = "text", log=print) -> Path:
    """Tokenize ``src`` (a path or a list of them) into ``out``; returns ``out`` (see the module's
    doc for what it writes). Does nothing, and says so, when ``out`` is already up to date."""
    srcs = [Path(s).expanduser() for s in ([src] if isinstance(src, (str, os.PathLike)) else src)]
    out = Path(out).expanduser().resolve()
    options = _options(str(tokenizer), vocab_size, val_fraction, text_field)
    files = find_files(srcs, out)
    stats = [p.stat() for p in files]
    sources = [{"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns} for p, st in zip(files, stats)]
    if _up_to_date(out, sources, options):
        log(f"prepare: {out} is up to date ({len(files)} source files unchanged, same options); nothing to do")
        return out
    if not files:
        raise ConfigError(f"prepare: no files in {', '.join(map(str, srcs))}; give text files, directories or .jsonl files")
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / ".write-test").touch()
        (out / ".write-test").unlink()
    except OSError as e:
        raise ConfigError(f"prepare: cannot write to --out {out} ({e.strerror}); choose a writable directory") from None
    total = sum(st.st_size for st in stats)
    tty = sys.stderr.isatty()

    if options["tokenizer"] == "bytes":
        tok = ByteTokenizer()
    elif options["tokenizer"] == "bpe":
        log(f"prepare: training a byte-level BPE of {options['vocab_size']:,} tokens on {_size(total)}")
        tok = train_bpe(documents(files, text_field), options["vocab_size"], show_progress=tty)
        if tok.vocab_size < options["vocab_size"]:
            log(f"prepare: the corpus gave {tok.vocab_size:,} tokens, fewer than --vocab-size {options['vocab_size']:,}")
    else:
        tok = tokenizer_from_file(Path(tokenizer).expanduser())
    dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32

    skipped: list[Path] = []
    progress = _Progress(total, "tokenizing", log)
    try:
        shards = {split: _Shard(out / name, dtype) for split, name in SPLIT_FILES.items()}
    except OSError as e:
        raise ConfigError(f"prepare: cannot write to --out {out} ({e.strerror}); choose a writable directory") from None
    try:
        n_docs, n_text = _write(tok, documents(files, text_field, progress, skipped), shards, val_fraction)
        progress.close()
        for path in skipped[:10]:
            log(f"prepare: skipped {path}: not UTF-8 text")
        if len(skipped) > 10:
            log(f"prepare: ... and {len(skipped) - 10} more files that are not UTF-8 text")
        if n_docs == 0:
            raise ConfigError(f"prepare: no text in {', '.join(map(str, srcs))} ({len(files)} files, {len(skipped)} not "
                              f"UTF-8 text, the rest empty); give UTF-8 text files, directories of them or .jsonl files")
        for split, shard in shards.items():
            if shard.count == 0:
                raise ConfigError(f"prepare: the {split} split is empty ({n_text:,} tokens, --val-fraction "
                                  f"{val_fraction}); give more text or another --val-fraction")
        (out / META).unlink(missing_ok=True)  # from here until the new meta.json, the directory is not whole
        for shard in shards.values():
            shard.close(keep=True)
        if isinstance(tok, HFTokenizer):
            if tok.kind == "bpe":
                tok.tokenizer.save(str(out / TOKENIZER_FILE))
            else:
                shutil.copyfile(Path(tokenizer).expanduser(), out / TOKENIZER_FILE)
        else:
            (out / TOKENIZER_FILE).unlink(missing_ok=True)  # a BPE's, from an earlier run
        meta = {
            "format": FORMAT, "version": FORMAT_VERSION,
            "tokenizer": tok.kind, "vocab_size": tok.vocab_size, "eot": tok.eot, "dtype": np.dtype(dtype).name,
            "tokens": {split: shard.count for split, shard in shards.items()},
            "text_tokens": n_text, "documents": n_docs,
            "sha256": {shard.path.name: shard.sha.hexdigest() for shard in shards.values()},
            "tokenizer_sha256": _sha256(out / TOKENIZER_FILE) if isinstance(tok, HFTokenizer) else None,
            "val_fraction": val_fraction, "split": "document tails",
            "sources": sources, "skipped": [str(p) for p in skipped], "options": options,
        }
        (out / (META + ".tmp")).write_text(json.dumps(meta, indent=1) + "\n")
        os.replace(out / (META + ".tmp"), out / META)
    except OSError as e:
        raise ConfigError(f"prepare: cannot write to --out {out} ({e.strerror}); choose a writable directory") from None
    finally:
        progress.close()
        for shard in shards.values():
            if not shard.file.closed:
                shard.close(keep=False)
    log(f"prepare: wrote {out}: {n_docs:,} documents from {len(files)} files; train {meta['tokens']['train']:,} and "
        f"val {meta['tokens']['val']:,} tokens ({meta['dtype']}); {tok.kind} tokenizer, vocab {tok.vocab_size:,}, "
        f"end-of-text {tok.eot}")
    return out


# ------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``flowsys prepare``'s arguments."""
    parser.add_argument("src", nargs="+", help="text files, directories of text (recursively), .jsonl files")
    parser.add_argument("--out", required=True, help="the directory to write train.bin, val.bin and meta.json into")
    parser.add_argument("--tokenizer", default="bytes", metavar="bytes|bpe|PATH",
                        help="bytes (UTF-8 bytes and end-of-text, vocab 257), bpe (a byte-level BPE trained on SRC) "
                             "or a Hugging Face tokenizer.json (default: bytes)")
    parser.add_argument("--vocab-size", type=int, default=None,
                        help=f"the BPE's vocabulary size (--tokenizer bpe; default {DEFAULT_BPE_VOCAB})")
    parser.add_argument("--val-fraction", type=float, default=0.1,
                        help="the share of each document's tokens (its tail) held out as val.bin (default 0.1)")
    parser.add_argument("--text-field", default="text", help="the field of each .jsonl line that holds its text")


def main(args: argparse.Namespace) -> int:
    """Run ``flowsys prepare`` with parsed ``args``."""
    prepare(args.src, args.out, args.tokenizer, args.vocab_size, args.val_fraction, args.text_field)
    return 0
