"""
Fetch tiny Shakespeare (or any UTF-8 text) and write it as character tokens for mini_transformer.py.

    python prepare_shakespeare.py                                               # download (1.1 MB)
    python prepare_shakespeare.py --source ../shared/data/tinyshakespeare.txt   # a local copy, offline
    python prepare_shakespeare.py --source my_corpus.txt --data_dir data/mine   # your own text

Writes <data_dir>/train.bin and val.bin (uint16 token ids, a 90/10 split) and meta.json (the
vocabulary, built from the whole text before splitting, so val has no unknown characters).
"""

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import requests

from mini_transformer import parse_config, run_main

URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"  # of the text's bytes


@dataclass
class PrepareConfig:
    source: str = URL  # URL or local file of UTF-8 text (the checksum is checked for the default URL only)
    data_dir: str = "data/shakespeare"  # folder to write train.bin, val.bin and meta.json into
    val_fraction: float = 0.1  # share of the text, taken from its end, held out for validation

    def __post_init__(self):
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be between 0 and 1, got {self.val_fraction}")


class DataError(Exception):
    """A problem with the input that the user can fix; main() prints it as one line."""


def fetch(source, timeout=30):
    """The bytes behind a URL or a local path. HTTP errors and HTML pages (a proxy's login or error page
    served with status 200) raise DataError instead of being written out as data."""
    if not source.startswith(("http://", "https://")):
        try:
            return Path(source).read_bytes()
        except OSError as e:
            raise DataError(f"cannot read {source}: {e.strerror}") from None
    try:
        response = requests.get(source, timeout=timeout)
        response.raise_for_status()
    except requests.HTTPError as e:
        raise DataError(f"download of {source} failed: HTTP {e.response.status_code}") from None
    except requests.RequestException as e:  # no network, DNS, timeout
        raise DataError(f"cannot download {source} ({type(e).__name__}; offline? point --source at a local copy)") from None
    if "text/html" in response.headers.get("Content-Type", "") or response.content.lstrip()[:15].lower().startswith((b"<!doctype html", b"<html")):
        raise DataError(f"{source} returned an HTML page, not the data")
    return response.content


def check_sha256(content, expected, name):
    actual = hashlib.sha256(content).hexdigest()
    if actual != expected:
        raise DataError(f"checksum mismatch for {name}: sha256 {actual[:16]}..., expected {expected[:16]}...")


def write_atomic(path, content):
    """Write bytes to a temporary file, then rename it over path: a reader never sees half a file."""
    tmp = Path(f"{path}.tmp")
    tmp.write_bytes(content)
    os.replace(tmp, path)


def write_files(data_dir, files):
    """Write {file name: bytes} into data_dir (created if needed), each file atomically."""
    if Path(data_dir).is_file():
        raise DataError(f"cannot write to {data_dir}: it is a file, not a folder")
    try:
        Path(data_dir).mkdir(parents=True, exist_ok=True)
        for name, content in files.items():
            write_atomic(Path(data_dir) / name, content)
    except OSError as e:  # data_dir is a file, not writable, the disk is full, ...
        raise DataError(f"cannot write to {data_dir}: {e.strerror}") from None


def prepare(source, data_dir, val_fraction=0.1, sha256=""):
    """Tokenise the text at source into data_dir; returns the numbers it prints. Raises DataError."""
    raw = fetch(source)
    if sha256:
        check_sha256(raw, sha256, source)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{source} is not UTF-8 text (byte {e.start})") from None
    vocab = "".join(sorted(set(text)))  # every distinct character, from the whole text
    if len(vocab) > 2**16:
        raise DataError(f"{source} has {len(vocab):,} distinct characters; uint16 token ids hold 65,536")
    split = int(len(text) * (1 - val_fraction))  # 1,003,854 / 111,540 for tiny Shakespeare
    if min(split, len(text) - split) < 2:
        raise DataError(f"{source} has {len(text)} characters: too short to split into train and val")
    stoi = {c: i for i, c in enumerate(vocab)}
    ids = np.array([stoi[c] for c in text], dtype=np.uint16)
    meta = {"vocab_size": len(vocab), "vocab": vocab, "source": source}
    write_files(data_dir, {"train.bin": ids[:split].tobytes(), "val.bin": ids[split:].tobytes(),
                           "meta.json": (json.dumps(meta, ensure_ascii=False, indent=1) + "\n").encode("utf-8")})
    return {"chars": len(text), "vocab_size": len(vocab), "train": split, "val": len(ids) - split}


def main():
    (cfg,), _, _ = parse_config(PrepareConfig(), description=__doc__.strip().split("\n")[0])
    try:
        stats = prepare(cfg.source, cfg.data_dir, cfg.val_fraction, SHA256 if cfg.source == URL else "")
    except DataError as e:
        sys.exit(f"error: {e}")
    print(f"{stats['chars']:,} characters, vocabulary of {stats['vocab_size']}")
    print(f"wrote {stats['train']:,} train and {stats['val']:,} val tokens to {cfg.data_dir}/")


if __name__ == "__main__":
    run_main(main)

# Expected output for tiny Shakespeare:
# 1,115,394 characters, vocabulary of 65
# wrote 1,003,854 train and 111,540 val tokens to data/shakespeare/
