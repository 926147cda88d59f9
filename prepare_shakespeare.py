"""
Fetch tiny Shakespeare (or any UTF-8 text) and write it as character tokens for mini_transformer.py.

    python prepare_shakespeare.py                                               # download (1.1 MB)
    python prepare_shakespeare.py --source path/to/input.txt                    # a local copy, offline
    python prepare_shakespeare.py --source my_corpus.txt --data_dir data/mine   # your own text

Writes <data_dir>/train.bin and val.bin (uint16 token ids, a 90/10 split) and meta.json (the
vocabulary, built from the whole text before splitting, so val has no unknown characters, and the
size and sha256 of each .bin file). All or nothing: a failed run leaves the previous files as they were.
"""

import contextlib
import hashlib
import json
import os
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import requests

from plumbing import parse_config, run_main

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


def fetch(source, timeout=30, deadline=600):
    """The bytes behind a URL or a local path. HTTP errors, HTML pages (a proxy's login or error page
    served with status 200) and a download still running after deadline seconds raise DataError
    instead of being written out as data."""
    if not source.startswith(("http://", "https://")):
        try:
            return Path(source).read_bytes()
        except OSError as e:
            raise DataError(f"cannot read {source}: {e.strerror}") from None
    try:
        response = download(source, timeout, deadline)
        response.raise_for_status()
    except requests.HTTPError as e:
        raise DataError(f"download of {source} failed: HTTP {e.response.status_code}") from None
    except requests.RequestException as e:  # no network, DNS, timeout
        raise DataError(f"cannot download {source} ({type(e).__name__}; offline? point --source at a local copy)") \
            from None
    starts_as_html = response.content.lstrip()[:15].lower().startswith((b"<!doctype html", b"<html"))
    if "text/html" in response.headers.get("Content-Type", "") or starts_as_html:
        raise DataError(f"{source} returned an HTML page, not the data")
    return response.content


def download(url, timeout, deadline):
    """requests.get(url), given up after deadline seconds in all. The timeout bounds each read from the
    socket, so a server that sends a byte now and then would keep the download going for ever, and a
    deadline checked between iter_content chunks comes too late: a chunk waits until it is full. So the
    request runs in a daemon thread, which is left behind at the deadline and ends with the script."""
    outcome = []  # the response, or the exception the request raised

    def get():
        try:
            outcome.append(requests.get(url, timeout=timeout))
        except Exception as e:  # raised again below, in the caller's thread
            outcome.append(e)

    worker = threading.Thread(target=get, daemon=True)
    worker.start()
    worker.join(deadline)
    if worker.is_alive():
        raise DataError(f"download of {url} took longer than {deadline} s (a stalled server? "
                        "point --source at a local copy)")
    if isinstance(outcome[0], Exception):
        raise outcome[0]
    return outcome[0]


def check_sha256(content, expected, name):
    actual = hashlib.sha256(content).hexdigest()
    if actual != expected:
        raise DataError(f"checksum mismatch for {name}: sha256 {actual[:16]}..., expected {expected[:16]}...")


def write_files(data_dir, files, meta):
    """Write {file name: bytes} and meta.json (meta plus the size and sha256 of each file) into data_dir,
    all or nothing. Everything is written to a temporary folder inside data_dir first, so a failure (a
    full disk) leaves the old files as they were and the temporary folder is removed, not left filling
    the disk. Then each file is renamed into place, meta.json last: a run killed between two renames
    leaves files that do not match meta.json's record, which the trainer refuses."""
    folder = Path(data_dir)
    if folder.is_file():
        raise DataError(f"cannot write to {data_dir}: it is a file, not a folder")
    in_the_way = [name for name in [*files, "meta.json"] if (folder / name).is_dir()]
    if in_the_way:  # checked first, as a rename onto it would fail half-way through the swap
        raise DataError(f"cannot write {folder / in_the_way[0]}: it is a folder, not a file")
    record = {name: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()} for name, data in files.items()}
    meta_json = json.dumps({**meta, "files": record}, ensure_ascii=False, indent=1) + "\n"
    files = {**files, "meta.json": meta_json.encode("utf-8")}
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # inside data_dir, so the renames stay on one file system, where they are atomic
        with tempfile.TemporaryDirectory(dir=folder, prefix=".prepare-", suffix=".tmp") as tmp:
            for name, content in files.items():
                (Path(tmp) / name).write_bytes(content)
            for name in files:
                os.replace(Path(tmp) / name, folder / name)
    except OSError as e:  # not writable, the disk is full, ...
        if created:  # a failed first run leaves nothing behind
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise DataError(f"cannot write to {data_dir}: {e.strerror or e}") from None


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
    write_files(data_dir, {"train.bin": ids[:split].tobytes(), "val.bin": ids[split:].tobytes()},
                {"vocab_size": len(vocab), "vocab": vocab, "source": source})
    return {"chars": len(text), "vocab_size": len(vocab), "train": split, "val": len(ids) - split}


def main():
    (cfg,), _, _ = parse_config(PrepareConfig(), description=__doc__)
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
