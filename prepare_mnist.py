"""
Fetch and verify MNIST, and write it as uint8 arrays for vit.py.

    python prepare_mnist.py                                       # download, trying mirrors in turn
    python prepare_mnist.py --source path/to/mnist/               # a local folder of the four files, offline
    python prepare_mnist.py --source https://example.org/mnist/   # another mirror

Writes <data_dir>/{train,test}_{images,labels}.npy: images (N, 28, 28) and labels (N,), uint8, loaded
with np.load(..., allow_pickle=False), and meta.json with the size and sha256 of each. Each input file
is checked by the sha256 of its decompressed bytes and by its IDX header (magic number, count, 28 x 28).
All or nothing: a failed run leaves the previous files as they were.
"""

import gzip
import io
import struct
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from plumbing import parse_config, run_main
from prepare_shakespeare import DataError, check_sha256, fetch, write_files

# The original host (yann.lecun.com) answers 403 to scripts these days, so it is tried last.
MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)
# name -> (file, sha256 of the decompressed IDX bytes, IDX magic number, number of items)
FILES = {
    "train_images": ("train-images-idx3-ubyte",
                     "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db", 2051, 60000),
    "train_labels": ("train-labels-idx1-ubyte",
                     "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5", 2049, 60000),
    "test_images": ("t10k-images-idx3-ubyte",
                    "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7", 2051, 10000),
    "test_labels": ("t10k-labels-idx1-ubyte",
                    "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2", 2049, 10000),
}


@dataclass
class MnistConfig:
    source: str = "mirrors"  # 'mirrors' (try each known host), a base URL, or a local folder of the files
    data_dir: str = "data/mnist"  # folder to write the four .npy files and meta.json (their sizes and sha256) into


def parse_idx(raw, magic, count, name):
    """The array in an IDX file: big-endian header (magic, count[, rows, cols]), then uint8 data."""
    if len(raw) < 8 or struct.unpack(">II", raw[:8]) != (magic, count):
        found = struct.unpack(">II", raw[:8]) if len(raw) >= 8 else "nothing"
        raise DataError(f"{name}: IDX header (magic, count) is {found}, expected {(magic, count)}")
    shape, offset = (count,), 8
    if magic == 2051:  # images carry two more header fields
        shape, offset = (count, *struct.unpack(">II", raw[8:16])), 16
        if shape[1:] != (28, 28):
            raise DataError(f"{name}: images are {shape[1]} x {shape[2]}, expected 28 x 28")
    if len(raw) != offset + int(np.prod(shape)):
        raise DataError(f"{name}: {len(raw) - offset} bytes of data for shape {shape}: the file is truncated or padded")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(shape)


def load_one(base, file, sha256, magic, count):
    """Fetch base + file (.gz, or uncompressed in a local folder), verify it, return the array."""
    if base.startswith(("http://", "https://")):
        raw = fetch(base.rstrip("/") + f"/{file}.gz")
    else:
        folder = Path(base)
        raw = fetch(str(folder / f"{file}.gz")) if (folder / f"{file}.gz").exists() else fetch(str(folder / file))
    if raw[:2] == b"\x1f\x8b":  # gzip magic
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{file}.gz is not valid gzip data ({e})") from None
    check_sha256(raw, sha256, file)
    return parse_idx(raw, magic, count, file)


def prepare(sources, data_dir, files=FILES):
    """Load and verify all files, trying each source in turn; write them only if all succeed."""
    arrays = {}
    for name, spec in files.items():
        failures = []
        for base in sources:
            try:
                arrays[name] = load_one(base, *spec)
                break
            except DataError as e:
                failures.append(str(e))
        else:
            raise DataError(f"no source gave a valid {spec[0]}: " + " | ".join(failures))
    npy = {}  # file name -> bytes
    for name, array in arrays.items():
        buffer = io.BytesIO()
        np.save(buffer, array, allow_pickle=False)
        npy[f"{name}.npy"] = buffer.getvalue()
    write_files(data_dir, npy, {})
    return {name: array.shape for name, array in arrays.items()}


def main():
    (cfg,), _, _ = parse_config(MnistConfig(), description=__doc__)
    try:
        shapes = prepare(MIRRORS if cfg.source == "mirrors" else (cfg.source,), cfg.data_dir)
    except DataError as e:
        sys.exit(f"error: {e}")
    for name, shape in shapes.items():
        print(f"{name:<13} {' x '.join(map(str, shape))}")
    print(f"wrote 4 verified arrays to {cfg.data_dir}/")


if __name__ == "__main__":
    run_main(main)

# Expected output:
# train_images  60000 x 28 x 28
# train_labels  60000
# test_images   10000 x 28 x 28
# test_labels   10000
# wrote 4 verified arrays to data/mnist/
