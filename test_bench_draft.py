"""
Tests of bench.py, to replace test_shapes.py's test_bench_flop_count_and_json (same conventions).

    python test_bench_draft.py
    python -m pytest test_bench_draft.py

Tiny models on the CPU; the timing logic is checked with a fake clock, so no figure depends on the machine.
"""

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F

import bench
import mini_transformer as mt
import plumbing

HERE = Path(__file__).resolve().parent
TINY = ["--repeats", "1", "--warmup", "0", "--batch_size", "2", "--n_layers", "1", "--d_model", "32", "--block_size", "16",
        "--matmul_size", "64", "--gen_chars", "20"]


def tiny_config(**kw):
    return mt.TransformerConfig(**{"vocab_size": 17, "block_size": 16, "n_layers": 2, "n_heads": 4, "d_model": 32, "d_ff": 64, **kw})


def run_bench(args):
    """bench.main() in this process with args as its command line -> (what it printed, its JSON records)."""
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()) as out:
        with mock.patch.object(sys, "argv", ["bench.py", "--device", "cpu", "--json", f"{tmp}/out.json", *TINY, *args]):
            bench.main()
        return out.getvalue(), json.loads(Path(tmp, "out.json").read_text(encoding="utf-8"))


def test_bench_flop_count():
    """train_flops() counts a training step's FLOPs wrongly: a Linear layer or attention's two T x T
    products left out or counted twice (the tied head), or the backward not counted as twice the forward.
    Checked against a count by hand and against PyTorch's own FLOP counter."""
    from torch.utils.flop_counter import FlopCounterMode

    model = mt.MiniTransformer(tiny_config(attn="explicit"))
    weights = 2 * (4 * 32 * 32 + 2 * 32 * 64) + 17 * 32  # per layer q, k, v, out, fc1, fc2; then the head
    by_hand = 3 * (2 * weights + 2 * 2 * 2 * 16 * 32) * 2 * 16  # 3 x (weights + 2 layers of QK^T, att V) x B T
    assert bench.train_flops(model, 2, 16) == by_hand, f"{bench.train_flops(model, 2, 16)} FLOPs, by hand {by_hand}"
    counter = FlopCounterMode(display=False)
    with counter:
        model(torch.randint(17, (2, 16)), torch.randint(17, (2, 16)))[1].backward()
    assert counter.get_total_flops() == by_hand, f"PyTorch counts {counter.get_total_flops()}, by hand {by_hand}"


def test_bench_peak_is_the_fastest_matmul_of_the_step_precision():
    """The steps are read against the wrong peak: the first or the largest matmul instead of the fastest,
    or the fastest of another precision. A fake clock makes the middle size the fastest in bf16 and fp32
    faster than bf16 throughout."""
    rates = {(torch.float32, 16): 5, (torch.float32, 32): 9, (torch.float32, 64): 8,  # GFLOP/s of the fake clock
             (torch.bfloat16, 16): 2, (torch.bfloat16, 32): 4, (torch.bfloat16, 64): 3}

    def fake_seconds(fn, device):
        out = fn()
        return 2 * out.shape[0] ** 3 / (rates[out.dtype, out.shape[0]] * 1e9)

    cfg = bench.BenchConfig(repeats=1, warmup=0, matmul_size=64)
    with mock.patch.object(bench, "seconds", fake_seconds):
        records, (name, matmul, flops) = bench.bench_matmul(torch.device("cpu"), cfg, "bf16")
    gflops = {r["name"]: round(r["gflops"]) for r in records}
    assert gflops == {f"matmul/{p}-{n}": rates[d, n] for p, d in (("fp32", torch.float32), ("bf16", torch.bfloat16))
                      for n in (16, 32, 64)}, f"the matmul figures are not the fake clock's: {gflops}"
    assert name == "matmul/bf16-32", f"bf16 steps read against {name}, not the fastest bf16 matmul, matmul/bf16-32"
    product = matmul()
    assert product.dtype == torch.bfloat16 and product.shape == (32, 32) and flops == 2 * 32**3, \
        f"the peak named {name} times another matmul: {product.dtype} {tuple(product.shape)}, {flops} FLOPs"


def test_bench_fraction_of_peak_pairs_each_step_with_a_matmul():
    """A step's fraction of the peak is wrong: turned upside down, taken as the median step over the median
    matmul (which lets a drift in the machine's speed into the ratio) instead of the median over pairs of
    a step and the matmul timed right after it, or counting the warm-up pair. A fake clock gives the times."""
    step_times, peak_times = iter([0.001, 0.01, 0.01, 0.03]), iter([1.0, 0.02, 0.06, 0.06])  # the first pair warms up

    def peak_matmul():  # a stand-in, told apart from the step by identity
        return None

    def fake_seconds(fn, device):
        fn()
        return next(peak_times) if fn is peak_matmul else next(step_times)

    mcfg, cfg = tiny_config(vocab_size=65), bench.BenchConfig(repeats=3, warmup=1)
    x = torch.randint(65, (2, 16))
    flops = bench.train_flops(mt.MiniTransformer(mcfg), 2, 16)
    with mock.patch.object(bench, "seconds", fake_seconds):
        r = bench.bench_step(torch.device("cpu"), cfg, "train/tiny", mt.MiniTransformer, mcfg, mt.TrainConfig(), (x, x.roll(-1, 1)),
                             16, ("fp32", "fp32 (as asked)"), ("matmul/fake", peak_matmul, flops))
    # Pairs (10 ms, 20 ms), (10, 60), (30, 60) at equal FLOPs: fractions 2, 6 and 2; the medians alone would give 6.
    assert abs(r["frac_peak"] - 2) < 1e-9 and r["peak"] == "matmul/fake", f"fraction of the peak {r['frac_peak']}, expected 2"
    assert abs(r["ms_median"] - 10) < 1e-9 and abs(r["tokens_per_s"] - 32 / 0.01) < 1e-6, f"step figures {r}"
    assert r["flops_per_step"] == flops and abs(r["gflops"] - flops / 0.01 / 1e9) < 1e-9, f"FLOP figures {r}"


def test_bench_records_the_precision_decision_and_only_its_sections():
    """bench.py decides the precision apart from the training scripts (it must report choose_precision()'s
    decision for the lab model, and time its steps in it), or runs and records sections --only left out."""
    calls, contexts = [], []

    def decide(device, precision, cfg, tokens):  # a decision the machine would not take by itself
        calls.append((device.type, precision, cfg.d_model, cfg.d_ff, tokens))
        return "bf16", "bf16 (decided in the test)"

    def autocast(device, precision):
        contexts.append(precision)
        return plumbing.autocast(device, precision)

    with mock.patch.object(bench, "choose_precision", decide), mock.patch.object(bench, "autocast", autocast):
        out, records = run_bench(["--only", "train,vit"])
    _, others = run_bench(["--only", "attention,generate", "--precision", "fp32"])
    assert calls[0] == ("cpu", "auto", 32, 512, 2 * 16), f"choose_precision() asked about {calls[0]}, not the lab model's shapes"
    assert "training steps in bf16 (decided in the test)" in out.splitlines()[0], f"the header does not report it: {out}"
    names = [r["name"] for r in records]
    assert {n.split("/")[0] for n in names} == {"matmul", "train", "vit"} and names[-1] == "vit/train", f"--only train,vit: {names}"
    steps = [r for r in records if r["name"].startswith(("train/", "vit/"))]
    assert [(r["precision"], r["precision_note"]) for r in steps] == [("bf16", "bf16 (decided in the test)")] * 3, steps
    assert set(contexts) == {"bf16"}, f"the steps ran in {contexts}, not in the decided bf16"
    bf16 = [r for r in records if r["name"].startswith("matmul/bf16-")]
    assert bf16 and all(r["peak"] == max(bf16, key=lambda m: m["gflops"])["name"] for r in steps), "not read against the bf16 peak"
    assert all(r["peak_mem_mb"] > 0 for r in steps) or not Path("/proc/self/status").exists(), "no peak memory on Linux"
    assert [r["name"] for r in others] == ["attention/explicit", "attention/sdpa", "generate/plain", "generate/kv_cache"], others
    assert all({"name", "device", "ms_median", "ms_min", "ms_max"} <= set(r) for r in records + others), "a record lacks its times"


def test_bench_json_and_config_errors():
    """A bad --json or --precision is found only after minutes of timing, or ends in a traceback instead of one line."""
    for bad in ({"json": "no/such/folder/out.json"}, {"precision": "fp16"}, {"only": "train,gpu"}):
        try:
            bench.BenchConfig(**bad)
            raise AssertionError(f"BenchConfig({bad}) was accepted")
        except ValueError:
            pass
    with tempfile.TemporaryDirectory() as tmp:
        try:
            with mock.patch.object(sys, "argv", ["bench.py", "--only", "matmul", "--device", "cpu", "--precision", "fp32", "--json", tmp,
                                                 *TINY]), contextlib.redirect_stdout(io.StringIO()):
                bench.main()
            raise AssertionError("--json naming a folder was accepted")
        except SystemExit as e:
            assert str(e.code).startswith(f"error: cannot write {tmp}") and "\n" not in str(e.code), f"--json a folder: {e.code!r}"


def test_bench_peak_memory_is_each_figure_own():
    """Each figure's peak memory is the process's peak so far instead of its own (Linux: VmHWM is reset)."""
    cpu = torch.device("cpu")
    if not Path("/proc/self/clear_refs").exists():
        return
    torch.ones(2**26).sum()  # 256 MB, freed again at once
    before = bench.peak_memory_mb(cpu)["peak_mem_mb"]  # reading it starts a new window
    after = bench.peak_memory_mb(cpu)["peak_mem_mb"]
    assert after < before - 200, f"peak memory {before:.0f} MB, then {after:.0f} MB in the next window"


def test_bench_attention_times_both_paths():
    """The attention section times the same computation twice: its sdpa figure never calls the fused kernel."""
    sdpa = F.scaled_dot_product_attention
    with mock.patch.object(F, "scaled_dot_product_attention", side_effect=sdpa) as fused:
        records = bench.bench_attention(torch.device("cpu"), bench.BenchConfig(batch_size=2, repeats=1, warmup=0),
                                        tiny_config(dropout=0.1), "fp32")
    assert [r["name"] for r in records] == ["attention/explicit", "attention/sdpa"] and fused.called, "SDPA never ran"


def test_bench_ctrl_c_keeps_the_figures():
    """Ctrl-C during a long bench.py run loses the figures measured so far, or ends in a traceback instead
    of one line and exit status 130."""
    with tempfile.TemporaryDirectory() as tmp:
        run = subprocess.Popen([sys.executable, HERE / "bench.py", "--only", "matmul,generate", "--device", "cpu", "--precision", "fp32",
                                "--json", "cut.json", *TINY, "--gen_chars", "1000000"], cwd=tmp, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
        try:
            for line in run.stdout:  # Ctrl-C once the first figure is out, during the long generation
                if line.startswith("matmul/"):
                    break
            else:
                raise AssertionError(f"bench.py ended before its first figure: {run.stderr.read()}")
            time.sleep(0.2)
            run.send_signal(signal.SIGINT)
            _, err = run.communicate(timeout=60)
        finally:
            run.kill()
        cut = json.loads((Path(tmp) / "cut.json").read_text(encoding="utf-8"))
    assert run.returncode == 130 and err.strip() == "interrupted", f"Ctrl-C: {run.returncode} {err!r}"
    assert cut and all(r["name"].startswith("matmul/") for r in cut), f"the figures measured before Ctrl-C were not kept: {cut}"


if __name__ == "__main__":
    failed = 0
    for name, test in [(n, f) for n, f in globals().items() if n.startswith("test_")]:
        try:
            test()
            print(f"ok   {name}")
        except Exception as e:  # report every failure, then the count
            failed += 1
            print(f"FAIL {name}: {type(e).__name__}: {e}")
    print(f"{failed} failed")
    sys.exit(1 if failed else 0)
