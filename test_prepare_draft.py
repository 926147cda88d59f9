"""
Tests for the data-safety of the prepare scripts and for sample.py's one-line errors, to be merged
into test_shapes.py. Each test names the bug it catches.

    python test_prepare_draft.py
    python -m pytest -q test_prepare_draft.py
"""

import contextlib
import errno
import hashlib
import http.server
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from unittest import mock

import numpy as np
import torch

import mini_transformer as mt
import prepare_mnist as pm
import prepare_shakespeare as ps
import sample

HERE = Path(__file__).resolve().parent
OLD_TEXT = "".join(random.Random(0).choices(["the cat sat. ", "ROMEO: oh\n"], k=300))
NEW_TEXT = "".join(random.Random(1).choices(["a dog ran! ", "JULIET: ay?\n"], k=300))
DATASET = {"train.bin", "val.bin", "meta.json"}


def default_sigint():
    """preexec_fn of every child: SIGINT back to the default, as a test runner started in the background
    ignores it and children would inherit that."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def snapshot(folder):
    """{name: bytes} of every entry in folder; a folder in it maps to None."""
    return {p.name: p.read_bytes() if p.is_file() else None for p in Path(folder).iterdir()}


def matches_record(folder):
    """True if train.bin and val.bin have the size and sha256 that folder/meta.json records for them."""
    record = json.loads((Path(folder) / "meta.json").read_text(encoding="utf-8"))["files"]
    assert set(record) == {"train.bin", "val.bin"}, f"meta.json records {set(record)}"
    return all(len(data := (Path(folder) / name).read_bytes()) == want["bytes"]
               and hashlib.sha256(data).hexdigest() == want["sha256"] for name, want in record.items())


def full_disk_at(n):
    """Patch Path.write_bytes so that its n-th call writes half the bytes and then fails as a full disk does."""
    real, calls = Path.write_bytes, []

    def write_bytes(path, data):
        calls.append(path)
        if len(calls) == n:
            real(path, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(path, data)

    return mock.patch.object(Path, "write_bytes", write_bytes)


def refused(fn, *args, words="", **kwargs):
    """The DataError message of fn(*args, **kwargs); fails if fn succeeds or the message lacks words."""
    try:
        fn(*args, **kwargs)
    except ps.DataError as e:
        assert words in str(e), f"expected {words!r} in: {e}"
        return str(e)
    raise AssertionError(f"{fn.__name__}{args} did not fail")


def run(*args, cwd):
    """Run python with args to the end: (exit status, stderr). The child is killed in any case."""
    child = subprocess.Popen([sys.executable, *map(str, args)], cwd=cwd, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)
    try:
        err = child.communicate(timeout=60)[1]
        return child.returncode, err
    finally:
        child.kill()


def tiny_checkpoint(folder):
    """Save a small untrained model as mini_transformer.py saves it; returns the checkpoint dict."""
    cfg = mt.TransformerConfig(vocab_size=5, block_size=8, n_layers=1, n_heads=2, d_model=8, d_ff=16)
    ckpt = {"model": mt.MiniTransformer(cfg).state_dict(), "model_config": asdict(cfg), "vocab": "\nabcd"}
    torch.save(ckpt, folder / "good.pt")
    return ckpt


# ----------------------------------------------------------------------------------------------------


def test_failed_prepare_keeps_the_old_dataset_whole():
    """A full disk half-way through preparing over an existing dataset must leave all three old files
    (train.bin, val.bin, meta.json) as they were, not a mix of new and old files; and if the swap is cut
    between two renames, meta.json's record of sizes and sha256 must show the files do not belong
    together, so that the trainer refuses them instead of training on them."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp, data = Path(tmp), Path(tmp) / "data"
        (tmp / "old.txt").write_text(OLD_TEXT, encoding="utf-8")
        (tmp / "new.txt").write_text(NEW_TEXT, encoding="utf-8")
        ps.prepare(str(tmp / "old.txt"), str(data))
        old = snapshot(data)
        assert set(old) == DATASET and matches_record(data), f"a clean run wrote {set(old)}, or a wrong record"
        for n in (1, 2, 3):  # the disk fills while writing train.bin, val.bin, then meta.json
            with full_disk_at(n):
                refused(ps.prepare, str(tmp / "new.txt"), str(data), words="No space left")
            assert snapshot(data) == old, f"a full disk at write {n} changed the old dataset: {sorted(snapshot(data))}"
        real_replace, calls = os.replace, []

        def replace_then_stop(src, dst):  # as if the run were killed after renaming train.bin into place
            calls.append(dst)
            if len(calls) > 1:
                raise OSError(errno.EIO, "killed")
            real_replace(src, dst)

        with mock.patch.object(os, "replace", replace_then_stop):
            refused(ps.prepare, str(tmp / "new.txt"), str(data))
        assert snapshot(data)["train.bin"] != old["train.bin"], "the cut swap did not rename train.bin"
        assert not matches_record(data), "meta.json's record does not tell a half-replaced dataset apart"
        try:
            mt.load_data(str(data), torch.device("cpu"))
            raise AssertionError("the trainer loaded a half-replaced dataset")
        except SystemExit as e:
            assert "train.bin" in str(e.code), f"the trainer's message does not name the mixed file: {e.code}"
        ps.prepare(str(tmp / "new.txt"), str(data))
        meta = json.loads((data / "meta.json").read_text(encoding="utf-8"))
        ids = np.concatenate([np.fromfile(data / name, dtype=np.uint16) for name in ("train.bin", "val.bin")])
        decoded = "".join(meta["vocab"][i] for i in ids)
        assert decoded == NEW_TEXT and matches_record(data), "a clean run after the failures wrote the wrong data"


def test_failed_prepare_leaves_no_temporary_files():
    """A failed write must remove its temporary files: a folder in the way of a target file or a full
    disk used to leave a .tmp behind, and on a full disk that file kept the disk full. Holds for
    prepare_mnist.py too, which writes through the same function."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp, data = Path(tmp), Path(tmp) / "data"
        (tmp / "old.txt").write_text(OLD_TEXT, encoding="utf-8")
        ps.prepare(str(tmp / "old.txt"), str(data))
        (data / "val.bin").unlink()
        (data / "val.bin").mkdir()  # a folder in the way
        before = snapshot(data)
        refused(ps.prepare, str(tmp / "old.txt"), str(data), words="val.bin")
        assert snapshot(data) == before, f"a folder in the way left {sorted(snapshot(data))}"
        with full_disk_at(2):
            refused(ps.prepare, str(tmp / "old.txt"), str(tmp / "new"), words="No space left")
        assert not (tmp / "new").exists(), f"a full disk left {snapshot(tmp / 'new')}"
        labels = b"\x00\x00\x08\x01" + (10).to_bytes(4, "big") + bytes(range(10))
        (tmp / "mnist").mkdir()
        (tmp / "mnist" / "tr-lab").write_bytes(labels)
        files = {"train_labels": ("tr-lab", hashlib.sha256(labels).hexdigest(), 2049, 10)}
        with full_disk_at(1):
            refused(pm.prepare, [str(tmp / "mnist")], str(tmp / "digits"), files, words="No space left")
        assert not (tmp / "digits").exists(), f"prepare_mnist.py on a full disk left {snapshot(tmp / 'digits')}"
        pm.prepare([str(tmp / "mnist")], str(tmp / "digits"), files)
        written = set(snapshot(tmp / "digits"))
        assert written == {"train_labels.npy", "meta.json"}, f"prepare_mnist.py wrote {written}"


def test_download_has_a_deadline_for_the_whole_transfer():
    """A server that sends one byte every 0.2 s never trips the per-read timeout, and used to keep the
    download going for ever; the whole transfer must stop at its deadline with a one-line DataError
    naming it, while a quick download still works."""
    stop = threading.Event()

    class Trickle(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = b"quick data" if self.path == "/quick" else b"x" * 1000
            step = len(body) if self.path == "/quick" else 1  # /slow: a byte every 0.2 s, till the test ends
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            with contextlib.suppress(OSError):  # the client may hang up first
                for i in range(0, len(body), step):
                    self.wfile.write(body[i : i + step])
                    self.wfile.flush()
                    if stop.wait(0.2):
                        return

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Trickle)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        assert ps.fetch(f"{url}/quick", deadline=5) == b"quick data", "a quick download failed under a deadline"
        t0 = time.monotonic()
        message = refused(ps.fetch, f"{url}/slow", timeout=5, deadline=1, words="1 s")
        seconds = time.monotonic() - t0
        assert seconds < 3, f"the 1 s deadline stopped the download after {seconds:.1f} s"
        assert "\n" not in message, f"not one line: {message!r}"
    finally:
        stop.set()
        server.shutdown()
        server.server_close()


def test_sample_refuses_foreign_checkpoints_and_nan_in_one_line():
    """sample.py given a bare tensor, a checkpoint stripped of its config and vocabulary, one with a
    config field this version does not know, or a vocabulary that is not a string used to end in a
    traceback; --temperature nan passed the checks and printed only newlines. Each must be one line on
    stderr and a non-zero exit."""
    for bad in ({"temperature": float("nan")}, {"temperature": float("inf")}, {"top_p": float("nan")},
                {"seed": -1}, {"seed": 2**63}):
        try:
            sample.SampleConfig(**bad)
            raise AssertionError(f"SampleConfig accepted {bad}")
        except ValueError:
            pass
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        good = tiny_checkpoint(tmp)
        torch.save(torch.zeros(3), tmp / "tensor.pt")
        torch.save({"model": good["model"]}, tmp / "stripped.pt")
        torch.save({**good, "model_config": {**good["model_config"], "rope_base": 10000.0}}, tmp / "newer.pt")
        torch.save({**good, "vocab": list(good["vocab"])}, tmp / "listvocab.pt")
        cases = [(["--ckpt", "tensor.pt"], "Tensor"), (["--ckpt", "stripped.pt"], "no model_config"),
                 (["--ckpt", "newer.pt"], "rope_base"), (["--ckpt", "listvocab.pt"], "vocab"),
                 (["--ckpt", "good.pt", "--temperature", "nan"], "temperature")]
        with ThreadPoolExecutor(2) as pool:  # the good checkpoint is run in the next test
            runs = list(pool.map(lambda case: run(HERE / "sample.py", "--device", "cpu", *case[0], cwd=tmp), cases))
        for (args, words), (status, err) in zip(cases, runs):
            assert status != 0 and words in err, f"{args}: exit {status}, {err!r}"
            assert "Traceback" not in err and err.count("\n") == 1, f"{args}: not one line: {err}"


def test_sample_piped_into_head_exits_quietly():
    """`python sample.py | head -c 20` used to end in a BrokenPipeError traceback once head had its bytes
    and closed the pipe; the shell convention is a quiet exit. (Needs run_main() in mini_transformer.py
    to turn a closed stdout into a quiet exit; sample.py only must not catch it itself.)"""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tiny_checkpoint(tmp)
        args = ["--ckpt", "good.pt", "--device", "cpu", "--max_new_tokens", "1000000"]
        child = subprocess.Popen([sys.executable, HERE / "sample.py", *args], cwd=tmp, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, preexec_fn=default_sigint)
        try:
            first = child.stdout.read(20)
            child.stdout.close()  # what head does once it has its 20 bytes
            _, err = child.communicate(timeout=60)
        finally:
            child.kill()
        assert len(first) == 20, f"sample.py wrote only {first!r}"
        assert err.decode() == "", f"a closed pipe was not a quiet exit (status {child.returncode}): {err.decode()}"


if __name__ == "__main__":
    for name, test in list(globals().items()):
        if name.startswith("test_"):
            test()
            print(f"ok {name}")
