"""
How to test the runs: the command line, the training loop, checkpoints and resume, DDP, data preparation and
downloads, sample.py, vit.py, plot.py and bench.py, as a user meets them. Tiny models on the CPU, fixed seeds, a
fake clock for time, no network (a server on 127.0.0.1). A script runs in this process, its main() with its
command line, unless a test needs a real process (a pipe, a lock held by another PID, torchrun).

    python test_runs.py                            # these tests; ends with "N passed, N failed, N skipped"
    python test_runs.py -k resume                  # only the tests whose name contains "resume"
    python test_shapes.py && python test_runs.py   # the whole suite
"""

import contextlib
import errno
import functools
import gzip
import hashlib
import http.server
import io
import json
import os
import random
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, fields, replace
from pathlib import Path
from unittest import mock

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import bench
import mini_transformer as mt
import plot
import plumbing
import prepare_mnist as pm
import prepare_shakespeare as ps
import sample
import vit
from test_shapes import CPU, max_diff, run_tests, skip, tiny_config, tiny_vit

HERE = Path(__file__).resolve().parent
# A small synthetic corpus: enough structure to learn, no file or network needed.
TEXT = "".join(random.Random(0).choices(["the cat sat. ", "a dog ran! ", "ROMEO: oh\n", "JULIET: ay?\n"], k=3000))
VOCAB = "".join(sorted(set(TEXT)))
# Some tests press Ctrl-C in this process: SIGINT as Python sets it up, even in a runner started in the background
# (which ignores SIGINT).
signal.signal(signal.SIGINT, signal.default_int_handler)
# The command line of a tiny run, for main() in this process or a child.
TINY = ["--n_layers=1", "--n_heads=2", "--d_model=16", "--d_ff=32", "--block_size=16", "--batch_size=4",
        "--eval_interval=5", "--log_interval=5", "--sample_chars=0", "--precision=fp32", "--device=cpu"]


@contextlib.contextmanager
def workdir(corpus=True):
    """A temporary folder (a Path), with the synthetic corpus prepared in its data/ unless corpus is False."""
    with tempfile.TemporaryDirectory() as tmp:
        if corpus:
            (Path(tmp) / "corpus.txt").write_text(TEXT, encoding="utf-8")
            ps.prepare(str(Path(tmp) / "corpus.txt"), str(Path(tmp) / "data"))
        yield Path(tmp)


def tiny_train_config(tmp, **kw):
    """A 20-step run in fp32 (no precision race, so that two runs of it are the same computation)."""
    kw = {"data_dir": tmp / "data", "out_dir": tmp / "out", "max_steps": 20, "batch_size": 8, "learning_rate": 3e-3,
          "min_lr": 3e-4, "warmup_steps": 5, "eval_interval": 10, "eval_batches": 2, "log_interval": 5,
          "sample_chars": 0, "precision": "fp32", **kw}
    return mt.TrainConfig(**{k: str(v) if isinstance(v, Path) else v for k, v in kw.items()})


def train(tmp, mcfg=None, **kw):
    """mt.train() of mcfg (the tiny model) for tiny_train_config(tmp, **kw), quietly: its last evaluation."""
    with contextlib.redirect_stdout(io.StringIO()):
        return mt.train(mcfg or tiny_config(vocab_size=0), tiny_train_config(tmp, **kw))


def main_here(module, *argv, stdin=""):
    """`python module.py argv`, run in this process through plumbing.run_main() as the script runs it:
    (exit code or sys.exit's message, stdout, stderr)."""
    out, err = (io.TextIOWrapper(io.BytesIO(), encoding="utf-8") for _ in range(2))
    code = 0
    with mock.patch.object(sys, "argv", [f"{module.__name__}.py", *map(str, argv)]), \
            mock.patch.object(sys, "stdin", io.StringIO(stdin)), contextlib.redirect_stdout(out), \
            contextlib.redirect_stderr(err):
        try:
            plumbing.run_main(module.main)
        except SystemExit as e:
            code = e.code
    return (code, *(f.flush() or f.buffer.getvalue().decode() for f in (out, err)))


def one_line(code, err=""):
    """The message of a failed command, sys.exit's text (code) or the parser's (err): one line, no traceback."""
    message = code if isinstance(code, str) else err
    assert code not in (0, None), f"the command succeeded (stderr {err!r})"
    assert message.strip() and "\n" not in message.strip() and "Traceback" not in message, f"not one line: {message!r}"
    return message


def stopped(fn, *args, **kw):
    """(exit code or sys.exit's message, stdout, stderr) of fn(*args, **kw), which must end the program."""
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            fn(*args, **kw)
    except SystemExit as e:
        return e.code, out.getvalue(), err.getvalue()
    raise AssertionError(f"{getattr(fn, '__name__', fn)} went on instead of stopping")


def exit_line(fn, *args, **kw):
    """The one-line message with which fn(*args, **kw) must end the program."""
    code, _, err = stopped(fn, *args, **kw)
    return one_line(code, err)


@contextlib.contextmanager
def child(*args, cwd=HERE, env=None, timeout=120):
    """A python child with args, stdout and stderr piped as text, SIGINT at its default (a runner started in the
    background ignores it, and a child would inherit that); killed when the block ends or after timeout s."""
    proc = subprocess.Popen([sys.executable, *map(str, args)], cwd=cwd, env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    watchdog = threading.Timer(timeout, proc.kill)
    watchdog.start()
    try:
        yield proc
    finally:
        watchdog.cancel()
        proc.kill()
        with proc:  # closes the pipes and reaps the process
            pass


def untrained_checkpoint(path, **extra):
    """A tiny untrained model saved as mini_transformer.py saves one, plus extra keys; returns the dict."""
    cfg = tiny_config(vocab_size=len(VOCAB))
    ckpt = {"model": mt.MiniTransformer(cfg).state_dict(), "model_config": asdict(cfg), "vocab": VOCAB, "step": 0}
    torch.save({**ckpt, **extra}, path)
    return {**ckpt, **extra}


def fit_on_fake_clock(tcfg, step_s=0.25, eval_s=0.0, evaluate=None):
    """mt.fit() of a 1-layer model on random tokens, on a fake clock that each step advances by step_s seconds
    (step_s(n) for the n-th) and each evaluation by eval_s: (what it printed, the config it returns, the fake
    seconds at the end). evaluate(model) may replace the val loss of 1.0."""
    fake, data, steps = [0.0], torch.randint(17, (400,)), []

    def next_batch(generator):
        steps.append(1)
        fake[0] += step_s(len(steps)) if callable(step_s) else step_s
        assert fake[0] < 100 * max(tcfg.time_budget, 1), f"still training after {fake[0]} fake seconds"
        return mt.get_batch(data, 16, 4, generator)

    def timed_evaluate(model):
        fake[0] += eval_s
        return evaluate(model) if evaluate else {"val_loss": 1.0}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        _, fixed = mt.fit(mt.MiniTransformer(tiny_config(n_layers=1)), tcfg, next_batch, timed_evaluate, {},
                          ("tok", 64), clock=lambda: fake[0])
    return out.getvalue(), fixed, fake[0]


def fake_mnist(folder, n=16):
    """n images and labels per split as prepare_mnist.py writes them: digit-like bars, random labels."""
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        images = np.zeros((n, 28, 28), dtype=np.uint8)
        for image, (top, left) in zip(images, rng.integers(4, 12, (n, 2))):
            image[top : top + 12, left : left + 5] = 255
        np.save(folder / f"{split}_images.npy", images)
        np.save(folder / f"{split}_labels.npy", rng.integers(0, 10, n, dtype=np.uint8))


# ----------------------------------------------------------------------------------------------------
# The command line


def test_cli_flags_bools_and_errors():
    """argparse's type=bool turning "False" into True, misspelt flags accepted, values not typed from the
    defaults, a bad combination ending in a traceback or argparse's usage block instead of one line (exit 2)
    naming the flag and its value, --max_steps 40 refused for the default warmup of 100 steps, a config field
    of any script defaulting to None or without the comment that is its help, or a --help without the
    groups, the comments or the script's whole description and example commands."""
    def parse(*argv):
        return plumbing.parse_config(mt.TransformerConfig(), mt.TrainConfig(), argv=list(argv))[0]
    m, t = parse("--n_layers=6", "--bias", "--learning_rate=1e-3", "--ffn", "swiglu", "--compile", "--max_steps=40")
    assert (m.n_layers, m.bias, m.ffn, t.learning_rate, t.compile, t.warmup()) == (6, True, "swiglu", 1e-3, True, 4)
    assert parse("--no-bias", "--no-compile")[0].bias is False, "--no-flag did not turn the bool off"
    for argv, words in [(("--n_layers", "two"), "invalid int"), (("--d_model", "100", "--n_heads", "3"), "divisible"),
                        (("--warmup_steps=100", "--max_steps=40"), "warmup_steps (100) must be below max_steps (40)"),
                        (("--bias", "False"), "unrecognized"), (("--ffn=gelu",), "ffn"), (("--nlayers=2",), "unrecog"),
                        (("--batch_size", "6", "--grad_accum", "4"), "divide"), (("--beta2", "1.5"), "beta2"),
                        (("--weight_decay", "-0.1"), "weight_decay"), (("--eval_batches", "0"), "eval_batches"),
                        (("--optimizer", "sgd"), "optimizer"), (("--precision", "fp16"), "precision"),
                        (("--time_budget", "0"), "time_budget"), (("--max_steps", "-3"), "max_steps must be >= 0"),
                        (("--warmup_steps", "-5"), "warmup_steps must be >= -1"), (("--seed", "-1"), "seed must be in"),
                        (("--seed", "99999999999999999999"), "seed"), (("--grad_clip", "nan"), "grad_clip"),
                        (("--learning_rate", "inf"), "learning_rate"), (("--min_lr", "1"), "min_lr (1.0) <= learning")]:
        code, _, err = stopped(parse, *argv)
        assert code == 2 and words in one_line(code, err), f"{argv}: exit {code}, expected one line with {words!r}"
    for cls in (mt.TransformerConfig, mt.TrainConfig, vit.ViTConfig, vit.PredictConfig, sample.SampleConfig,
                bench.BenchConfig, plot.PlotConfig, pm.MnistConfig, ps.PrepareConfig):
        comments = plumbing.field_comments(cls)  # every field a flag: a plain typed default and a comment
        assert all(type(f.default) in (bool, int, float, str) and comments.get(f.name) for f in fields(cls)), cls
    for module in (ps, pm, vit, sample, bench, plot, mt):
        code, out, _ = main_here(module, "--help")
        missing = [line for line in module.__doc__.strip().splitlines() if line.strip() not in out]
        assert code == 0 and not missing, f"{module.__name__} --help lacks {missing[:2]}"
    assert "TransformerConfig" in out and "context length T in tokens" in out, "--help lacks the groups or comments"


# ----------------------------------------------------------------------------------------------------
# The training loop: time budget, evaluations, precision


def test_time_budget_ends_the_run_in_time():
    """With max_steps 0 the run must end within --time_budget, evaluations and all, and use most of it; fix
    max_steps once steps are timed (with --eval_interval 1 a clock restarted after each evaluation never timed one,
    and the run went on for ever); end its cosine at min_lr; record max_steps for a resume; keep the default warmup
    a tenth of the run; leave --max_steps alone; print the ms/step since the previous line, evaluations left out."""
    with tempfile.TemporaryDirectory() as tmp:
        tcfg = mt.TrainConfig(out_dir=tmp, time_budget=100.0, warmup_steps=4, log_interval=4, eval_interval=8,
                              batch_size=4, sample_chars=0, precision="fp32", optimizer="adamw")
        out, fixed, seconds = fit_on_fake_clock(tcfg, step_s=0.25, eval_s=1.0)  # the last evaluation counted, and
        assert 90 < seconds <= 100 * (1 - mt.BUDGET_RESERVE) + 0.6, f"{seconds} s of 100"  # a reserve (+ rounding)
        assert re.search(r"step 4/\d+ \|", out) and out.count("steps fit in") == 1 and fixed.warmup() == 4, out[:300]
        assert abs(mt.get_lr(fixed.max_steps, fixed) - fixed.min_lr) < 1e-12, "the cosine does not end at min_lr"
        saved = json.loads((Path(tmp) / "config.json").read_text(encoding="utf-8"))["train_config"]
        ckpt = plumbing.load_checkpoint(Path(tmp) / "ckpt.pt")
        assert saved["max_steps"] == ckpt["train_config"]["max_steps"] == ckpt["step"] == fixed.max_steps, "not saved"
        resumed = plumbing.resumed_config(replace(tcfg, resume=True), ckpt, {"resume": True})
        assert (resumed.max_steps, resumed.warmup()) == (fixed.max_steps, 4), f"a resume goes to {resumed.max_steps}"
        _, slowed, seconds = fit_on_fake_clock(tcfg, step_s=lambda n: 0.25 if n < 100 else 0.4, eval_s=1.0)
        assert slowed.max_steps < fixed.max_steps and seconds <= 98.6, f"slower after step 100: {seconds} s of 100"
        tcfg = replace(tcfg, time_budget=10.0)
        _, short, seconds = fit_on_fake_clock(replace(tcfg, warmup_steps=-1, log_interval=2, eval_interval=50))
        assert short.warmup() == short.max_steps // 10 and seconds <= 10, f"warmup {short.warmup()}, {short.max_steps}"
        _, explicit, _ = fit_on_fake_clock(replace(tcfg, max_steps=20), step_s=5.0)  # 100 s against a budget of 10
        assert explicit.max_steps == plumbing.load_checkpoint(Path(tmp) / "ckpt.pt")["step"] == 20, "--max_steps 20"
        every = replace(tcfg, eval_interval=1, log_interval=2, warmup_steps=2)
        out, fixed, seconds = fit_on_fake_clock(every, step_s=0.25, eval_s=0.1)
        assert 0 < fixed.max_steps and seconds <= 10, f"--eval_interval 1: max_steps {fixed.max_steps}, {seconds} s"
        assert f"step 2/{fixed.max_steps} | " in out and "| 250 ms/step |" in out, f"evals timed:\n{out[-600:]}"
        out, _, _ = fit_on_fake_clock(replace(every, max_steps=12, log_interval=4, eval_interval=100),
                                      step_s=lambda n: 0.25 if n < 6 else 1.0)  # slower from the 6th step on
        assert out.split("step 12/12 | ")[1].count("| 1000 ms/step |") == 1, f"not since the last line:\n{out}"


class HalfPrecisionWatch(TorchDispatchMode):
    """While active, records every ATen op (the level below every PyTorch function, fused kernels and the
    optimizers' updates included) whose output holds a bf16 or fp16 tensor."""

    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(getattr(t, "dtype", None) in (torch.bfloat16, torch.float16) for t in tree_flatten(out)[0]):
            self.ops.add(str(func))
        return out


def test_the_chosen_precision_holds_in_every_op():
    """--precision auto on the CPU choosing bf16 where bf16 matmuls are slower (or fp32 where 3x faster), or
    racing when a precision was forced; a run in fp32 making one bf16 or fp16 tensor anywhere in its steps, model,
    loss or optimizer (torch.optim.Muon orthogonalises in bf16 whatever the run chose), for the language model
    with each optimizer and for the ViT; a bf16 choice not reaching the training steps' autocast. A watch over
    every op names the offenders; a bf16 run must show bf16 in its backward passes, or it proves nothing."""
    for fp32_s, bf16_s, want, ratio in ((3, 1, "bf16", "3.00x"), (1, 3, "fp32", "0.33x")):
        fake, real = [0.0], F.linear

        def linear(x, *args, **kw):  # advances the fake clock by the cost of the precision
            fake[0] += bf16_s if x.dtype == torch.bfloat16 else fp32_s
            return real(x, *args, **kw)
        with mock.patch.object(F, "linear", linear):
            name, note = plumbing.choose_precision(CPU, "auto", tiny_config(), 64, clock=lambda: fake[0])
        assert name == want and ratio in note, f"fp32, bf16 costs {fp32_s}, {bf16_s}: chose {name} ({note})"
    with mock.patch.object(F, "linear") as linear:
        assert [plumbing.choose_precision(CPU, p, tiny_config(), 64)[0] for p in ("fp32", "bf16")] == ["fp32", "bf16"]
    assert not linear.called, "a forced precision still ran the race"
    with workdir() as tmp:
        fake_mnist(tmp)
        vit_args = ["--data_dir", tmp, "--n_layers", "1", "--d_model", "16", "--d_ff", "32", "--batch_size", "8",
                    "--max_steps", "2", "--eval_interval", "2", "--device", "cpu"]
        for i, (script, optimizer, precision) in enumerate([("LM", "adamw", "fp32"), ("LM", "muon", "fp32"),
                                                            ("LM", "adamw", "bf16"), ("ViT", "adamw", "fp32"),
                                                            ("ViT", "muon", "fp32"), ("ViT", "adamw", "bf16")]):
            raced = (precision, f"{precision} (bf16 matmuls measured as the test says)")  # what the race decides
            with mock.patch.object(mt, "choose_precision", return_value=raced), \
                    mock.patch.object(vit, "choose_precision", return_value=raced), HalfPrecisionWatch() as watch:
                if script == "LM":
                    train(tmp, precision="auto", optimizer=optimizer, max_steps=2, warmup_steps=0, out_dir=tmp / str(i))
                else:
                    assert main_here(vit, *vit_args, "--optimizer", optimizer, "--out_dir", tmp / str(i))[0] == 0
            stepped = "aten.threshold_backward.default" in watch.ops  # ReLU's gradient: the steps too, not only evals
            assert bool(watch.ops) == stepped == (precision == "bf16"), \
                f"{script}, {optimizer}, {precision}: ops with bf16/fp16 outputs: {sorted(watch.ops)[:5] or 'none'}"


# ----------------------------------------------------------------------------------------------------
# Checkpoints, resume, the out_dir, Ctrl-C and one-line errors


def test_a_resume_equals_the_straight_run_and_typed_flags_win():
    """A resume that does not restore the optimizers (AdamW, or AdamW and Muon), the step, the best val loss or the
    RNG streams replays other batches or masks: a run stopped by Ctrl-C at step 10 and resumed must end with the
    very parameters of 20 steps straight through. A plain --resume went on with the defaults, not the saved run's
    settings (--weight_decay 0.3, in its optimizers too: load_state_dict brought back the saved rates, decay and
    betas while the log showed the flags); a typed flag was ignored or replaced by the saved one; the saved out_dir
    or device replaced this launch's; a flag that does not fit the saved run was not one CLI error."""
    with workdir() as tmp:
        for optimizer in ("adamw", "muon"):
            kw = {"mcfg": tiny_config(vocab_size=0, dropout=0.1), "optimizer": optimizer}
            straight = train(tmp, **kw, out_dir=tmp / optimizer / "straight")
            calls, real_step = [], mt.train_step

            def step_then_ctrl_c(*args):
                calls.append(1)
                if len(calls) == 10:  # a Ctrl-C arriving in the middle of step 9
                    signal.raise_signal(signal.SIGINT)
                return real_step(*args)
            with mock.patch.object(mt, "train_step", step_then_ctrl_c):
                code, _, _ = stopped(train, tmp, **kw, out_dir=tmp / optimizer / "cut")
            ckpt = plumbing.load_checkpoint(tmp / optimizer / "cut" / "ckpt.pt")
            assert code == 130 and ckpt["step"] == 10, f"{optimizer}: Ctrl-C: exit {code}, saved step {ckpt['step']}"
            with contextlib.redirect_stdout(io.StringIO()):
                tcfg = tiny_train_config(tmp, optimizer=optimizer, out_dir=tmp / optimizer / "cut", resume=True)
                resumed = mt.train(mt.TransformerConfig(**ckpt["model_config"]), tcfg, ckpt)
            a, b = (plumbing.load_checkpoint(tmp / optimizer / r / "ckpt.pt")["model"] for r in ("straight", "cut"))
            assert all(torch.equal(a[k], b[k]) for k in a), f"{optimizer}: the weights differ after resume"
            assert resumed["val_loss"] == straight["val_loss"], f"{optimizer}: the final val loss differs after resume"
    saved = mt.TrainConfig(max_steps=500, warmup_steps=20, weight_decay=0.3, batch_size=8, out_dir="old",
                           device="cuda:7", precision="bf16")
    ckpt, now = {"train_config": {**asdict(saved), "a_field_of_a_newer_version": 1}}, mt.TrainConfig(resume=True)
    plain = plumbing.resumed_config(replace(now, out_dir="here"), ckpt, {"resume": True, "out_dir": "here"})
    assert (plain.weight_decay, plain.batch_size, plain.max_steps, plain.warmup_steps, plain.precision, plain.out_dir,
            plain.device) == (0.3, 8, 500, 20, "bf16", "here", "auto"), f"a plain resume: {plain}"
    typed = plumbing.resumed_config(replace(now, learning_rate=1e-3, warmup_steps=50), ckpt,
                                    {"resume": True, "learning_rate": 1e-3, "warmup_steps": 50})
    assert (typed.learning_rate, typed.warmup_steps, typed.max_steps) == (1e-3, 50, 500), f"typed flags: {typed}"
    longer = plumbing.resumed_config(replace(now, max_steps=2000), ckpt, {"resume": True, "max_steps": 2000})
    assert (longer.max_steps, longer.warmup()) == (2000, 100), f"--max_steps 2000 on resume: {longer}"
    with workdir(corpus=False) as tmp:
        untrained_checkpoint(tmp / "ckpt.pt", train_config=asdict(saved))
        code, _, err = main_here(mt, "--out_dir", tmp, "--resume", "--warmup_steps", "600")
    assert "warmup_steps (600) must be below max_steps (500)" in one_line(code, err), f"exit {code}: {err!r}"
    torch.manual_seed(0)
    model, old = mt.MiniTransformer(tiny_config()), mt.TrainConfig(max_steps=10, optimizer="muon")
    optimizers = mt.make_optimizer(model, old)
    mt.train_step(model, optimizers, (torch.randint(17, (4, 16)), torch.randint(17, (4, 16))))
    state = plumbing.training_state(model, optimizers, old, 1, 2.0, torch.Generator(), {})
    new = replace(old, learning_rate=1e-3, muon_lr=0.01, weight_decay=0.0, beta2=0.95)
    adamw, muon = mt.make_optimizer(model, new)
    plumbing.restore_state(state, model, [adamw, muon], torch.Generator(), new)
    groups = adamw.param_groups + muon.param_groups
    assert [(g["peak_lr"], g["weight_decay"]) for g in groups] == [(1e-3, 0), (1e-3, 0), (0.01, 0)], f"{groups}"
    assert all(g["betas"] == (0.9, 0.95) for g in adamw.param_groups), "a changed --beta2 was ignored"
    for opt, saved in zip((adamw, muon), state["optimizer"]):
        got = opt.state_dict()["state"]
        assert all(torch.equal(v, got[k][n]) for k, moments in saved["state"].items() for n, v in moments.items()), \
            f"the {type(opt).__name__} moments were not restored"


def test_checkpoints_load_with_weights_only_and_survive_a_crash():
    """Checkpoints holding objects that weights_only=True refuses, compile/DDP prefixes, the mask buffer; best.pt
    written at every evaluation or ckpt.pt not the latest; log records at other steps than the evaluations and
    progress lines or without their fields; --eval_only failing on weights, config and vocabulary alone; a NaN loss
    not stopping before it saves NaN weights over the last good checkpoint; a crash, Ctrl-C or full disk in the
    middle of torch.save damaging the previous checkpoint, leaving its temporary file or ending in a traceback."""
    vals = iter([3.0, 2.0, 2.5])
    with workdir() as tmp:
        tcfg = mt.TrainConfig(out_dir=str(tmp / "best"), max_steps=4, eval_interval=2, warmup_steps=0, batch_size=4)
        fit_on_fake_clock(tcfg, evaluate=lambda m: {"val_loss": next(vals)})
        best, last = (plumbing.load_checkpoint(tmp / "best" / name) for name in ("best.pt", "ckpt.pt"))
        assert (best["step"], best["best_val_loss"], last["step"], last["best_val_loss"]) == (2, 2.0, 4, 2.0), \
            f"best.pt holds step {best['step']} (not 2, val 2.0), ckpt.pt step {last['step']} (not the last, 4)"
        result = train(tmp)
        for name in ("ckpt.pt", "best.pt"):
            ckpt = torch.load(tmp / "out" / name, weights_only=True)
            assert not any(k.startswith(("_orig_mod.", "module.")) or "mask" in k for k in ckpt["model"]), name
            mt.MiniTransformer(mt.TransformerConfig(**ckpt["model_config"])).load_state_dict(ckpt["model"])
        log = [json.loads(line) for line in (tmp / "out" / "log.jsonl").read_text(encoding="utf-8").splitlines()]
        saved = json.loads((tmp / "out" / "config.json").read_text(encoding="utf-8"))
        (tmp / "bare").mkdir()
        torch.save({k: ckpt[k] for k in ("model", "model_config", "vocab")}, tmp / "bare" / "best.pt")
        code, out, err = main_here(mt, "--eval_only", "--out_dir", tmp / "bare", "--data_dir", tmp / "data")
        real_step = mt.train_step

        def poisoned_step(model, *args):  # from the first step on, the model outputs NaN
            with torch.no_grad():
                next(model.parameters()).fill_(float("nan"))
            return real_step(model, *args)
        with mock.patch.object(mt, "train_step", poisoned_step):
            message = exit_line(train, tmp, max_steps=10, out_dir=tmp / "nan")
        nan = plumbing.load_checkpoint(tmp / "nan" / "ckpt.pt")
    evals, steps = [r for r in log if r["kind"] == "eval"], [r for r in log if r["kind"] == "train"]
    assert [r["step"] for r in evals] == [0, 10, 20] and [r["step"] for r in steps] == [5, 10, 15, 20], f"log: {log}"
    assert all({"loss", "lr", "ms_per_step", "seen", "elapsed_s"} <= set(r) for r in steps), f"{steps[0]}"
    assert all({"train_loss", "val_loss", "best_val_loss", "eval_s", "elapsed_s"} <= set(r) for r in evals), evals[0]
    assert steps[-1]["seen"] == 20 * 8 * 16 and result["best_val_loss"] == min(r["val_loss"] for r in evals)
    assert saved["model_config"]["vocab_size"] == len(VOCAB) and "train_config" in saved, "config.json: no vocab_size"
    assert code == 0 and "val ppl" in out, f"--eval_only on weights, config and vocabulary: exit {code} {err}"
    assert "nan" in message and "ckpt.pt" in message, f"unclear message: {message}"
    assert nan["step"] == 0 and all(torch.isfinite(t).all() for t in nan["model"].values()), "NaN weights saved"

    def crashing_save(obj, f, error=KeyboardInterrupt()):
        f.write(b"PK\x03\x04 half a file")
        raise error
    with workdir(corpus=False) as tmp:
        path = tmp / "ckpt.pt"
        plumbing.save_checkpoint(path, {"step": 1})
        with mock.patch.object(torch, "save", crashing_save), contextlib.suppress(KeyboardInterrupt):
            plumbing.save_checkpoint(path, {"step": 2})
        assert plumbing.load_checkpoint(path)["step"] == 1, "the previous checkpoint was damaged"
        Path(f"{path}.tmp").replace(path)  # now a truncated checkpoint: a clean error, not a traceback
        assert "not a readable checkpoint" in exit_line(plumbing.load_checkpoint, path), "a truncated checkpoint"
        plumbing.save_checkpoint(path, {"step": 3})
        full = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos")  # torch.save, disk full
        with mock.patch.object(torch, "save", functools.partial(crashing_save, error=full)):
            message = exit_line(plumbing.save_checkpoint, path, {"step": 4})
        assert "cannot write" in message and "unchanged" in message, f"a failed torch.save: {message!r}"
        assert plumbing.load_checkpoint(path)["step"] == 3 and not os.path.lexists(f"{path}.tmp"), "old file or space"
        if not Path("/dev/full").exists():
            skip("no /dev/full here to fill a disk for real (the simulated full disk passed)")
        Path(f"{path}.tmp").symlink_to("/dev/full")  # every write to /dev/full fails with ENOSPC
        message = exit_line(plumbing.save_checkpoint, path, {"step": 5, "w": torch.zeros(10_000)})
        assert "No space left on device" in message, f"a full disk: {message!r}"
        assert plumbing.load_checkpoint(path)["step"] == 3 and not os.path.lexists(f"{path}.tmp"), "old or temp file"


def test_a_second_run_does_not_overwrite_the_first():
    """A fresh run into an out_dir holding another run's checkpoints overwrote them and its log instead of one line
    naming --resume and --overwrite (which must start afresh); a refused --resume (no checkpoint, an unreadable or
    foreign one, a clashing shape flag) created the out_dir and left a lock file in it; two runs at once not
    stopped by a lock that names the first one's PID, or a lock left by a killed run (kill -9) blocking for ever."""
    with workdir() as tmp:
        args = [*TINY, "--data_dir", tmp / "data", "--out_dir", tmp / "out"]
        code, out, _ = main_here(mt, *args, "--max_steps", "6", "--sample_chars=30")
        assert code == 0 and re.search(f"-{{40}}\n[{re.escape(VOCAB)}]{{30}}\n-{{40}}\n", out), f"no sample: {out}"
        before = {p.name: p.read_bytes() for p in (tmp / "out").iterdir()}
        assert {"ckpt.pt", "best.pt", "config.json", "log.jsonl"} <= set(before), f"the first run: {sorted(before)}"
        message = one_line(*main_here(mt, *args, "--max_steps", "4")[::2])
        assert "--resume" in message and "--overwrite" in message, f"a second fresh run: {message!r}"
        assert {p.name: p.read_bytes() for p in (tmp / "out").iterdir()} == before, "the refused run changed files"
        assert main_here(mt, *args, "--max_steps", "4", "--overwrite")[0] == 0, "--overwrite failed"
        log = [json.loads(line) for line in (tmp / "out" / "log.jsonl").read_text(encoding="utf-8").splitlines()]
        assert [r["step"] for r in log if r["kind"] == "eval"] == [0, 4], f"--overwrite kept the old log: {log}"
        for name in ("junk", "vit"):
            (tmp / name).mkdir()
            (tmp / name / "ckpt.pt").write_bytes(b"not a checkpoint")
        torch.save({"vit_config": {"patch_size": 7}, "model": {}}, tmp / "vit" / "ckpt.pt")
        for flags, words in [(["--out_dir", tmp / "none"], "not found"), (["--out_dir", tmp / "junk"], "not a readab"),
                             (["--out_dir", tmp / "vit"], "not a mini_transformer.py"),
                             (["--out_dir", tmp / "out", "--d_model", "64"], "d_model")]:
            untouched = sorted(tmp.rglob("*"))
            code, _, err = main_here(mt, *TINY, "--data_dir", tmp / "data", "--resume", *flags)
            assert words in one_line(code, err) and sorted(tmp.rglob("*")) == untouched, f"{flags} left files"
        if plumbing.fcntl is None:
            skip("no fcntl here (Windows): runs go unlocked, as the README says (the rest passed)")
        holder = ("import sys, time\nimport mini_transformer as mt, plumbing\n"
                  "with plumbing.claim_out_dir(mt.TrainConfig(out_dir=sys.argv[1])):\n"
                  "    print('locked', flush=True)\n    time.sleep(120)\n")
        with child("-c", holder, tmp / "busy") as other:  # killed (kill -9) as the block ends
            assert other.stdout.readline() == "locked\n", f"the lock holder failed: {other.stderr.read()}"
            message = exit_line(plumbing.claim_out_dir, mt.TrainConfig(out_dir=str(tmp / "busy")))
            assert f"PID {other.pid}" in message, f"a second run into a busy folder: {message!r}"
        with plumbing.claim_out_dir(mt.TrainConfig(out_dir=str(tmp / "busy"))):
            pid = (tmp / "busy" / "lock").read_text(encoding="utf-8").strip()
    assert pid == str(os.getpid()), f"the lock of a killed run was not taken over (it names {pid})"


def test_ctrl_c_and_kill_at_any_moment():
    """A run started in the background by a shell script (SIGINT ignored) was stopped by a Ctrl-C meant for the
    foreground job, because stop_flag() put its handler over the ignored SIGINT, while kill (SIGTERM) must be
    caught and the handlers restored; a Ctrl-C during the last evaluation was lost (no save, no resume
    command); one during the sample, outside fit(), ended in a traceback instead of one line and exit 130."""
    previous, on_term = signal.signal(signal.SIGINT, signal.SIG_IGN), signal.getsignal(signal.SIGTERM)
    try:
        with plumbing.stop_flag() as interrupted:
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGTERM)
        assert [s for _, s in interrupted] == [signal.SIGTERM], f"ignored SIGINT or SIGTERM: {interrupted}"
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN and signal.getsignal(signal.SIGTERM) is on_term
    finally:
        signal.signal(signal.SIGINT, previous)
    evaluations = []

    def evaluate_then_ctrl_c(model):  # fit() evaluates at steps 0, 10 and 20, where the log says (tested above)
        evaluations.append(1)
        if len(evaluations) == 3:
            signal.raise_signal(signal.SIGINT)
        return {"val_loss": 1.0}
    with workdir() as tmp:
        data = mt.load_data(tmp / "data", CPU)[0]["train"]
        code, out, _ = stopped(mt.fit, mt.MiniTransformer(tiny_config(vocab_size=len(VOCAB))), tiny_train_config(tmp),
                               lambda g: mt.get_batch(data, 16, 8, g), evaluate_then_ctrl_c, {}, ("tok", 128))
        assert code == 130 and "interrupted: saved step 20" in out, f"exit {code}: {out}"
        assert plumbing.load_checkpoint(tmp / "out" / "ckpt.pt")["step"] == 20, "the last step was not saved"
        with mock.patch.object(mt.MiniTransformer, "generate", side_effect=KeyboardInterrupt):
            code, out, err = main_here(mt, *TINY, "--data_dir", tmp / "data", "--out_dir", tmp / "cli",
                                       "--max_steps", "5", "--sample_chars", "100")
    assert code == 130 and err.strip() == "interrupted" and "step 5 | train" in out, f"in the sample: {code} {err!r}"


def unwritable_folder(tmp):
    """A folder where creating a file fails with "Permission denied": a read-only one, or /sys as root ignores
    that; None if neither does here."""
    (tmp / "read_only").mkdir(mode=0o500)
    for folder in (tmp / "read_only", Path("/sys")):
        try:
            (folder / "probe.tmp").open("wb").close()
            (folder / "probe.tmp").unlink()
        except PermissionError:
            return folder
        except OSError:
            continue
    return None


def test_mistakes_and_failures_end_in_one_line():
    """A shape flag that contradicts the checkpoint, missing or damaged data (a .bin cut mid-token, a meta.json
    whose vocab is not a string, a .bin it does not describe), an unknown device, a file as --out_dir, a resume
    past --max_steps, a checkpoint from another version or without training state, a resume with another
    optimizer, a folder in the way of log.jsonl or a checkpoint, or a write without permission (reported as a
    full disk) ended in a traceback, a wrong reason or a run on bad data."""
    with workdir() as tmp:
        assert main_here(mt, *TINY, "--data_dir", tmp / "data", "--out_dir", tmp / "out", "--max_steps", "5")[0] == 0
        good = plumbing.load_checkpoint(tmp / "out" / "ckpt.pt")
        for name, ckpt in {"newer": {**good, "model_config": {**good["model_config"], "rope_theta": 1e4}},
                           "stripped": {k: good[k] for k in ("model", "model_config", "vocab")}, "adamw": good,
                           "unweighted": {k: v for k, v in good.items() if k != "model"}}.items():
            (tmp / name).mkdir()
            torch.save(ckpt, tmp / name / ("best.pt" if name == "unweighted" else "ckpt.pt"))
        originals = {n: (tmp / "data" / n).read_bytes() for n in ("meta.json", "train.bin", "val.bin")}
        meta = json.loads(originals["meta.json"])
        for name, changed in {"cut": {"val.bin": originals["val.bin"][:-1]},  # cut in the middle of a token id
                              "listvocab": {"meta.json": json.dumps({**meta, "vocab": list(meta["vocab"])}).encode()},
                              "mixed": {"train.bin": originals["train.bin"][2:] + originals["train.bin"][:2]}}.items():
            (tmp / name).mkdir()  # mixed: the same size, other tokens than meta.json's sha256 says
            for n, b in {**originals, **changed}.items():
                (tmp / name / n).write_bytes(b)
        resume = ["--data_dir", tmp / "data", "--resume"]
        for args, words in [(["--resume", "--d_model", "64", "--out_dir", tmp / "out"], "d_model"),
                            (["--data_dir", tmp / "nowhere", "--out_dir", tmp / "o1"], "prepare_shakespeare.py"),
                            (["--device", "tpu", "--out_dir", tmp / "o2"], "device"),
                            (["--data_dir", tmp / "data", "--out_dir", tmp / "corpus.txt"], "cannot write to"),
                            (["--data_dir", tmp / "cut", "--out_dir", tmp / "o3"], "is damaged"),
                            (["--data_dir", tmp / "listvocab", "--out_dir", tmp / "o4"], "vocab"),
                            (["--data_dir", tmp / "mixed", "--out_dir", tmp / "o5"], "train.bin"),
                            ([*resume, "--out_dir", tmp / "out", "--max_steps=4", "--warmup_steps=2"], "past --max"),
                            (["--resume", "--out_dir", tmp / "newer"], "another version"),
                            ([*resume, "--out_dir", tmp / "stripped"], "cannot resume"),
                            (["--eval_only", "--out_dir", tmp / "unweighted"], "not a mini_transformer.py checkpoint"),
                            ([*resume, "--out_dir", tmp / "adamw", "--optimizer", "adamw"], "not --optimizer adamw")]:
            code, _, err = main_here(mt, *args)
            assert words in one_line(code, err), f"{args}: expected {words!r} in {err or code!r}"
        (tmp / "log.jsonl").mkdir()
        assert "Is a directory" in exit_line(plumbing.write_file, tmp / "log.jsonl", "{}\n", mode="a"), "log.jsonl"
        for name in ("ckpt.pt", "best.pt", "tmp_in_the_way/ckpt.pt"):
            (tmp / (f"{name}.tmp" if "tmp_" in name else name)).mkdir(parents=True)
            message = exit_line(plumbing.save_checkpoint, tmp / name, {"step": 1})
            assert "cannot write" in message and "Is a directory" in message, f"{name} blocked: {message!r}"
            assert not Path(f"{tmp / name}.tmp").is_file(), f"{name}: a temporary file was left behind"
        locked = unwritable_folder(tmp)
        if locked is None:
            skip("no folder here refuses a write with 'Permission denied' (the other mistakes passed)")
        message = exit_line(plumbing.save_checkpoint, locked / "ckpt.pt", {"step": 1})
        assert "Permission denied" in message and "disk" not in message, f"no permission: {message!r}"


# ----------------------------------------------------------------------------------------------------
# The scripts as a user runs them: a real process where it matters


def test_a_run_from_the_command_line_through_a_pipe():
    """As a user types it, into a pipe (tee, a log collector): progress lines held in stdout's block buffer until
    the run ended, a warning on a clean CPU run (a GradScaler, "CUDA not available"), a first line without the
    precision race, a progress line without loss, ms/step or time left; after Ctrl-C, a resume command that
    drops the folder of the script as typed (so that it fails where the first command ran), or a resumed run
    without its total time; an offline download not one line."""
    with workdir(corpus=False) as tmp:
        (tmp / "corpus.txt").write_text(TEXT, encoding="utf-8")
        assert main_here(ps, "--source", tmp / "corpus.txt", "--data_dir", tmp / "data")[0] == 0, "prepare failed"
        args = ["--data_dir", "data", "--out_dir", "out", "--n_layers", "2", "--d_model", "64", "--d_ff", "256",
                "--block_size", "64", "--batch_size", "8", "--max_steps", "1000", "--log_interval", "10",
                "--eval_interval", "1000", "--warmup_steps", "10", "--sample_chars", "0", "--device", "cpu"]
        env = {**{k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}, "PYTHONWARNINGS": "always"}
        with child(HERE / "mini_transformer.py", *args, cwd=tmp, env=env) as run:  # the script must flush itself
            lines = []
            while not (lines and lines[-1].startswith("step 10/1000 |")):
                lines.append(run.stdout.readline())
                assert lines[-1], f"the run ended before its first progress line came through: {run.stderr.read()}"
            assert run.poll() is None, "the first progress line arrived only as the run ended"
            run.send_signal(signal.SIGINT)
            out, err = run.communicate(timeout=60)
        assert run.returncode == 130 and err == "", f"Ctrl-C: exit {run.returncode}, stderr (warnings?) {err!r}"
        assert "bf16 matmuls measured" in lines[0] and re.fullmatch(r".* loss .* ms/step .* eta \d+m\d\ds\n", lines[-1])
        saved = re.search(r"interrupted: saved step (\d+) to out/ckpt.pt; continue with:\n  (.*)\n", out)
        assert saved and int(saved.group(1)) < 500, f"no resume command, or step 10 came late: {out[-500:]}"
        command, step = shlex.split(saved.group(2)), int(saved.group(1))
        assert command == ["python", str(HERE / "mini_transformer.py"), *args, "--resume"], f"not as typed: {command}"
        cwd = os.getcwd()
        os.chdir(tmp)  # where the first command ran: its relative paths must still hold
        try:
            code, out, err = main_here(mt, *command[2:], "--max_steps", step + 2)
        finally:
            os.chdir(cwd)
    assert code == 0 and re.search(rf"trained steps {step} to {step + 2}; \d+m[0-5]\ds since launch", out), err
    assert "cannot download" in one_line(*main_here(ps, "--source", "http://127.0.0.1:9/x.txt")[::2]), "offline"


def test_ddp_on_two_cpu_processes_equals_one_process_accumulating():
    """DDP with 2 CPU processes (gloo) that initialise differently, skip the no-sync forward, do not divide the
    accumulation by the world size or print from every rank: each taking half of every global batch must end
    with the parameters of one process accumulating the same batch in 4 micro-steps (2 per process), with the
    default optimizer, Muon, in fp32 (its bf16 iterations would magnify last-bit differences); only rank 0 prints."""
    if not (dist.is_available() and dist.is_gloo_available()):
        skip("torch.distributed with gloo is not in this PyTorch build: no second process group")
    with workdir() as tmp:
        args = [*TINY, "--data_dir", tmp / "data", "--batch_size", "8", "--max_steps", "6", "--eval_interval", "3",
                "--log_interval", "2", "--warmup_steps", "1"]  # 2 micro-steps per process: sync on the last only
        assert main_here(mt, *args, "--grad_accum", "4", "--out_dir", tmp / "one")[0] == 0, "one process failed"
        with child("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", HERE / "mini_transformer.py",
                   *args, "--grad_accum=2", f"--out_dir={tmp}/two", env={**os.environ, "OMP_NUM_THREADS": "1"}) as run:
            out, err = run.communicate(timeout=180)
        assert run.returncode == 0, f"torchrun failed: {err[-2000:]}"
        assert out.count("step 6 | train") == 1 and "x 2 |" in out, f"not printed once by rank 0: {out}"
        a, b = (torch.load(tmp / r / "ckpt.pt", weights_only=True)["model"] for r in ("one", "two"))
    for name in a:
        assert max_diff(a[name], b[name]) < 1e-5, f"{name}: DDP and accumulation differ by {max_diff(a[name], b[name])}"


# ----------------------------------------------------------------------------------------------------
# Data preparation, against a local HTTP server


class QuietFiles(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # no line on stderr per request
        pass


@contextlib.contextmanager
def http_server(folder=None, handler=None):
    """Serve the files in folder (or answer with handler) on 127.0.0.1 in a thread; yields the base URL."""
    handler = handler or functools.partial(QuietFiles, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def refused(fn, *args, words="", **kw):
    """The DataError of fn(*args, **kw), which must fail with one line holding words."""
    try:
        fn(*args, **kw)
    except ps.DataError as e:
        assert words in str(e) and "\n" not in str(e), f"expected {words!r} in one line: {e}"
        return str(e)
    raise AssertionError(f"{getattr(fn, '__name__', fn)}{args} did not fail")


def test_prepare_downloads_verifies_and_rejects_bad_input():
    """A download written out whatever it holds (an HTTP error, an HTML page, a wrong checksum, not UTF-8, a
    vocabulary too large for uint16), partial output left, a file taken as --data_dir, a vocabulary from the
    training split only, a split not 90/10; a server sending a byte every 0.2 s (no read ever times out) keeping
    the download going for ever: the whole transfer must stop at its deadline, while a quick one still works."""
    stop = threading.Event()

    class Trickle(QuietFiles):
        def do_GET(self):  # /quick: all at once; otherwise a byte every 0.2 s, till the test ends
            body, step = (b"quick data", 10) if self.path == "/quick" else (b"x" * 1000, 1)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            with contextlib.suppress(OSError):  # the client may hang up first
                for i in range(0, len(body), step):
                    self.wfile.write(body[i : i + step])
                    self.wfile.flush()
                    if stop.wait(0.2):
                        return

    with http_server(handler=Trickle) as url:
        assert ps.fetch(f"{url}/quick", deadline=5) == b"quick data", "a quick download failed under a deadline"
        t0 = time.monotonic()
        refused(ps.fetch, f"{url}/slow", timeout=5, deadline=1, words="1 s")
        seconds = time.monotonic() - t0
        stop.set()
    assert seconds < 3, f"the 1 s deadline stopped the download after {seconds:.1f} s"
    with workdir(corpus=False) as tmp:
        (tmp / "site").mkdir()
        for name, content in {"input.txt": TEXT.encode(), "page.html": b"<body>Rate limited</body>",
                              "empty.txt": b"", "latin1": "caf\xe9".encode("latin-1") * 10,
                              "huge": "".join(chr(c) for c in range(0x10000, 0x10000 + 65537)).encode()}.items():
            (tmp / "site" / name).write_bytes(content)
        with http_server(tmp / "site") as url:
            stats = ps.prepare(f"{url}/input.txt", str(tmp / "ok"), sha256=hashlib.sha256(TEXT.encode()).hexdigest())
            bad = [(f"{url}/x", "", "404"), (f"{url}/page.html", "", "HTML"), (f"{url}/input.txt", "0" * 9, "checksum"),
                   (f"{url}/latin1", "", "UTF-8"), (f"{url}/huge", "", "uint16"), (f"{tmp}/no", "", "cannot read"),
                   (f"{tmp}/site/empty.txt", "", "too short"), ("http://127.0.0.1:9", "", "cannot download")]
            for source, checksum, words in bad:
                refused(ps.prepare, source, str(tmp / "bad"), sha256=checksum, words=words)
                assert not (tmp / "bad").exists(), f"{source} left partial output"
        refused(ps.prepare, str(tmp / "site" / "input.txt"), str(tmp / "site" / "page.html"), words="not a folder")
        meta = json.loads((tmp / "ok" / "meta.json").read_text(encoding="utf-8"))
        train_ids, val_ids = (np.fromfile(tmp / "ok" / f"{s}.bin", dtype=np.uint16) for s in ("train", "val"))
    assert meta["vocab"] == VOCAB and meta["vocab_size"] == stats["vocab_size"], "not the whole text's vocabulary"
    assert len(train_ids) == int(len(TEXT) * 0.9) and len(train_ids) + len(val_ids) == len(TEXT), "not a 90/10 split"
    assert "".join(VOCAB[i] for i in np.concatenate([train_ids, val_ids])) == TEXT, "the tokens do not decode"


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


def test_failed_prepare_keeps_the_old_dataset_whole():
    """A full disk half-way through preparing over a dataset must leave the three old files as they were (not a
    mix of old and new) and no temporary files (they kept the disk full), in prepare_mnist.py too; a folder in
    the way of a file must be refused before anything is renamed; and files left by a swap cut between two
    renames must not match meta.json's sizes and sha256, so that the trainer refuses them."""
    with workdir(corpus=False) as tmp:
        data, old_text, new_text = tmp / "data", TEXT[:3000], TEXT[3000:6000]
        (tmp / "old.txt").write_text(old_text, encoding="utf-8")
        (tmp / "new.txt").write_text(new_text, encoding="utf-8")
        ps.prepare(str(tmp / "old.txt"), str(data))
        old = {p.name: p.read_bytes() for p in data.iterdir()}
        assert set(old) == {"train.bin", "val.bin", "meta.json"}, f"a clean run wrote {set(old)}"
        for n in (1, 2, 3):  # the disk fills while writing train.bin, val.bin, then meta.json
            with full_disk_at(n):
                refused(ps.prepare, str(tmp / "new.txt"), str(data), words="No space left")
            assert {p.name: p.read_bytes() for p in data.iterdir()} == old, f"a full disk at write {n} changed files"
        with full_disk_at(2):
            refused(ps.prepare, str(tmp / "old.txt"), str(tmp / "fresh"), words="No space left")
        labels = b"\x00\x00\x08\x01" + (10).to_bytes(4, "big") + bytes(range(10))
        (tmp / "mnist").mkdir()
        (tmp / "mnist" / "tr-lab").write_bytes(labels)
        with full_disk_at(1):
            files = {"train_labels": ("tr-lab", hashlib.sha256(labels).hexdigest(), 2049, 10)}
            refused(pm.prepare, [str(tmp / "mnist")], str(tmp / "digits"), files, words="No space left")
        assert not (tmp / "fresh").exists() and not (tmp / "digits").exists(), "a failed first prepare left files"
        (data / "val.bin").rename(tmp / "val.bin")
        (data / "val.bin").mkdir()  # a folder in the way
        refused(ps.prepare, str(tmp / "new.txt"), str(data), words="val.bin")
        assert (data / "train.bin").read_bytes() == old["train.bin"], "a folder in the way: train.bin replaced anyway"
        (data / "val.bin").rmdir()
        (tmp / "val.bin").rename(data / "val.bin")
        real_replace = os.replace

        def replace_then_killed(src, dst):  # as if the run were killed after renaming train.bin into place
            if Path(dst).name != "train.bin":
                raise OSError(errno.EIO, "killed")
            real_replace(src, dst)
        with mock.patch.object(os, "replace", replace_then_killed):
            refused(ps.prepare, str(tmp / "new.txt"), str(data))
        assert (data / "train.bin").read_bytes() != old["train.bin"], "the cut swap did not rename train.bin"
        assert "train.bin" in exit_line(mt.load_data, str(data), CPU), "the trainer loaded a half-replaced dataset"
        ps.prepare(str(tmp / "new.txt"), str(data))
        vocab = json.loads((data / "meta.json").read_text(encoding="utf-8"))["vocab"]
        ids = np.concatenate([np.fromfile(data / name, dtype=np.uint16) for name in ("train.bin", "val.bin")])
        assert "".join(vocab[i] for i in ids) == new_text, "a clean run after the failures wrote the wrong data"
        assert {p.name for p in data.iterdir()} == {"train.bin", "val.bin", "meta.json"}, "temporary files were left"


def test_prepare_mnist_mirrors_checksums_and_idx_headers():
    """prepare_mnist.py giving up when the first mirror fails although the second serves, writing out HTML
    pages, corrupted or truncated files or wrong IDX headers, or leaving partial output behind."""
    pixels = np.random.default_rng(0).integers(0, 256, 7840, dtype=np.uint8).tobytes()
    raw = {"images": b"\x00\x00\x08\x03" + (10).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + pixels,
           "labels": b"\x00\x00\x08\x01" + (10).to_bytes(4, "big") + bytes(range(10))}
    files = {"train_images": ("tr-img", hashlib.sha256(raw["images"]).hexdigest(), 2051, 10),
             "train_labels": ("tr-lab", hashlib.sha256(raw["labels"]).hexdigest(), 2049, 10)}
    with workdir(corpus=False) as tmp:
        for mirror, transform in [("good", gzip.compress), ("html", lambda b: b"<!DOCTYPE html><html>403</html>"),
                                  ("corrupt", lambda b: gzip.compress(b[:-1] + b"\x07")),
                                  ("truncated", lambda b: gzip.compress(b)[:-20])]:
            (tmp / mirror).mkdir()
            for kind, name in (("images", "tr-img"), ("labels", "tr-lab")):
                (tmp / mirror / f"{name}.gz").write_bytes(transform(raw[kind]))
        with http_server(tmp) as url:
            shapes = pm.prepare([f"{url}/missing/", f"{url}/good/"], str(tmp / "out"), files)
            assert shapes == {"train_images": (10, 28, 28), "train_labels": (10,)}, f"shapes {shapes}"
            for mirror, words in [("html", "HTML"), ("corrupt", "checksum"), ("truncated", "gzip")]:
                refused(pm.prepare, [f"{url}/{mirror}/"], str(tmp / "bad"), files, words=words)
                assert not (tmp / "bad").exists(), f"the {mirror} mirror left partial output"
        assert pm.prepare([str(tmp / "good")], str(tmp / "local"), files) == shapes, "a local folder failed"
        loaded = np.load(tmp / "out" / "train_images.npy", allow_pickle=False)
        assert {p.name for p in (tmp / "out").iterdir()} == {"train_images.npy", "train_labels.npy", "meta.json"}
    assert loaded.dtype == np.uint8 and loaded.tobytes() == pixels, "the written images differ"
    refused(pm.parse_idx, b"\x00\x00\x08\x02" + raw["labels"][4:], 2049, 10, "labels", words="magic")
    refused(pm.parse_idx, raw["labels"][:-1], 2049, 10, "labels", words="truncated")
    refused(pm.parse_idx, raw["labels"] + b"\x00", 2049, 10, "labels", words="padded")


# ----------------------------------------------------------------------------------------------------
# sample.py, vit.py and plot.py


def test_sample_script_prompts_errors_and_interactive_loop():
    """Greedy output depending on the seed or the cache; a bad input (an unknown character, top_p 0, a negative
    temperature or top_k, nan, an empty prompt file, a foreign, stripped or newer checkpoint, a vocabulary not a
    string), a Ctrl-C (exit 130) or `sample.py | head -c 20` not ending in one line or quietly; the interactive
    loop not stopping at quit; a vocabulary without newline refusing the default prompt and every typed line."""
    with workdir() as tmp:
        train(tmp, max_steps=10)
        ckpt, good = ["--out_dir", tmp / "out", "--device", "cpu"], plumbing.load_checkpoint(tmp / "out" / "best.pt")
        with mock.patch.object(mt.MiniTransformer, "stream", autospec=True, side_effect=mt.MiniTransformer.stream) as s:
            greedy = [main_here(sample, *ckpt, "--prompt", "the", "--temperature", "0", "--max_new_tokens", "13",
                                "--seed", seed, *cache) for seed, cache in (("1", []), ("2", ["--no-kv_cache"]))]
        assert [c.kwargs["kv_cache"] for c in s.call_args_list] == [True, False], "--no-kv_cache was not passed on"
        assert greedy[0][0] == 0 and "chars/s" in greedy[0][2], f"sample.py failed: {greedy[0][2]}"
        assert greedy[0][1] == greedy[1][1] and len(greedy[0][1]) == 3 + 13 + 1, "greedy output varies"
        code, out, _ = main_here(sample, *ckpt, "--num_samples", "3", "--max_new_tokens", "10", "--top_k", "100")
        assert code == 0 and out.count("-" * 40) == 2, f"three samples: {out!r}"
        (tmp / "empty.txt").write_text("", encoding="utf-8")
        for name, content in (("tensor", torch.zeros(3)), ("stripped", {"model": good["model"]}),
                              ("newer", {**good, "model_config": {**good["model_config"], "rope_base": 1e4}}),
                              ("listvocab", {**good, "vocab": list(good["vocab"])})):
            torch.save(content, tmp / f"{name}.pt")
        for args, words in [(["--prompt", "xyz\u00e9"], "'\u00e9'"), (["--top_p", "0"], "top_p"),
                            (["--temperature", "-1"], "temperature"), (["--temperature", "nan"], "temperature"),
                            (["--top_k", "-1"], "top_k"), (["--max_new_tokens", "0"], "max_new_tokens"),
                            (["--seed=-1"], "seed"), (["--prompt_file", tmp / "empty.txt"], "empty"),
                            (["--out_dir", tmp], "mini_transformer"),
                            (["--ckpt", tmp / "corpus.txt"], "readable"), (["--ckpt", tmp / "tensor.pt"], "Tensor"),
                            (["--ckpt", tmp / "stripped.pt"], "model_config"), (["--ckpt", tmp / "newer.pt"], "rope"),
                            (["--ckpt", tmp / "listvocab.pt"], "vocab")]:
            assert words in one_line(*main_here(sample, *ckpt, *args)[::2]), f"{args}: expected {words!r}"
        typed = "temp 0\nlen 7\ntemp hot\nthe cat\nno \u00e9\nquit\nthe dog\n"
        code, out, err = main_here(sample, *ckpt, "--interactive", stdin=typed)
        assert code == 0 and "temperature = 0.0" in out and "max_new_tokens = 7" in out, f"interactive: {err}{out}"
        assert out.count("hint:") == 2 and out.count("> ") == 6, f"hints, or the loop did not stop at quit: {out!r}"
        real_stream = mt.MiniTransformer.stream

        def stream_then_ctrl_c(*args, **kw):  # Ctrl-C after 5 characters
            for i, token in enumerate(real_stream(*args, **kw)):
                if i == 5:
                    raise KeyboardInterrupt
                yield token
        with mock.patch.object(mt.MiniTransformer, "stream", stream_then_ctrl_c):
            code, _, err = main_here(sample, *ckpt)
        assert code == 130 and err.strip() == "interrupted", f"Ctrl-C while sampling: {code} {err!r}"
        untrained_checkpoint(tmp / "letters.pt", vocab="abcdefghijklmnopq")
        argv = ["--ckpt", tmp / "letters.pt", "--device", "cpu", "--temperature", "2", "--max_new_tokens", "200"]
        for extra, typed in (([], ""), (["--interactive"], "abc\n\nquit\n")):
            code, out, err = main_here(sample, *argv, *extra, stdin=typed)
            samples = [line.removeprefix("> ") for line in out.splitlines()[1 if extra else 0 :] if line.strip("> ")]
            assert code == 0 and "hint" not in out, f"{extra}: a prompt was refused: {err}{out}"
            assert len(samples) == (2 if extra else 1) and all(len(t) >= 200 and set(t) <= set("abcdefghijklmnopq")
                                                               for t in samples), f"{extra}: samples {samples}"
        with child(HERE / "sample.py", *argv[:-1], "1000000") as run:
            first = run.stdout.read(20)
            run.stdout.close()  # what head does once it has its 20 bytes
            run.wait(timeout=60)
            err = run.stderr.read()
    assert len(first) == 20 and err == "", f"a closed pipe was not a quiet exit (status {run.returncode}): {err}"


def test_vit_trains_predicts_and_guards_its_out_dir():
    """vit.py's default run not sized by the time budget, a short run failing to train, save and report its
    accuracy, --predict (which only reads best.pt) refused as a second run into that folder, a fresh run allowed
    to overwrite the first, or a bad value (a patch that does not divide 28, a negative --predict, shift or
    smoothing out of range, an array file cut short) ending in a traceback instead of one line."""
    assert vit.TRAIN_DEFAULTS.max_steps == 0 and vit.TRAIN_DEFAULTS.time_budget > 0, "a fixed length by default"
    with workdir(corpus=False) as tmp:
        fake_mnist(tmp)
        args = ["--data_dir", tmp, "--out_dir", tmp / "out", "--n_layers", "1", "--n_heads", "2", "--d_model", "16",
                "--d_ff", "32", "--batch_size", "8", "--max_steps", "4", "--eval_interval", "2", "--log_interval", "2",
                "--precision", "fp32", "--device", "cpu"]
        code, out, err = main_here(vit, *args)
        assert code == 0 and "test accuracy" in out and (tmp / "out" / "best.pt").exists(), f"vit.py failed: {err}"
        code, out, err = main_here(vit, "--data_dir", tmp, "--out_dir", tmp / "out", "--predict", "2", "--device=cpu")
        assert code == 0 and out.count("predicted") == 2, f"--predict failed: {err or out}"
        assert "--overwrite" in one_line(*main_here(vit, *args)[::2]), "a second fresh vit.py run was not refused"
        for flags, words in [(["--patch_size", "5"], "divide 28"), (["--predict", "-3"], "predict"),
                             (["--max_shift", "-1"], "max_shift"), (["--label_smoothing", "1"], "label_smoothing")]:
            assert words in one_line(*main_here(vit, *flags)[::2]), f"{flags} was not one parser line"
        (tmp / "test_images.npy").write_bytes((tmp / "test_images.npy").read_bytes()[:-10])
        assert "is damaged" in exit_line(vit.load_mnist, tmp, CPU), "a cut-short array file"
        assert "not found" in one_line(*main_here(vit, "--resume", "--out_dir", tmp / "none")[::2]), "no checkpoint"
        assert not (tmp / "none").exists(), "a refused --resume created its out_dir"


def lm_run(folder, **kw):
    """A language-model run as training leaves it: best.pt (a tiny untrained model), config.json, and a log.jsonl
    of a run stopped after step 40 and resumed from its checkpoint at step 20."""
    folder.mkdir(parents=True)
    torch.manual_seed(0)
    cfg = tiny_config(vocab_size=len(VOCAB), n_heads=2, d_model=16, d_ff=32, **kw)
    config = {"model_config": asdict(cfg), "vocab": VOCAB, "train_config": asdict(mt.TrainConfig(batch_size=4))}
    torch.save({"model": mt.MiniTransformer(cfg).state_dict(), "step": 0, **config}, folder / "best.pt")
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    # (kind, step, loss, seconds since launch): stopped after step 40, resumed from step 20 in a new process
    log = [("eval", 0, 4.2, 0.0), ("train", 10, 3.1, 1.0), ("train", 20, 2.9, 2.0), ("eval", 20, 2.8, 2.25),
           ("train", 30, 2.7, 3.0), ("train", 40, 2.6, 4.0),
           ("train", 30, 2.75, 1.5), ("train", 40, 2.65, 2.5), ("train", 50, 2.5, 3.5), ("eval", 50, 2.4, 3.75)]
    peak = config["train_config"]["learning_rate"]
    lines = [{"kind": k, "step": s, "loss": v, "lr": peak * (1 - s / 100), "elapsed_s": t} if k == "train" else
             {"kind": k, "step": s, "val_loss": v, "elapsed_s": t} for k, s, v, t in log]
    (folder / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines), encoding="utf-8")
    return cfg


def assert_png(*paths):
    for path in paths:
        data = Path(path).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) < 150_000, f"{path}: not a PNG, or too large"
        height, width, _ = plot.pyplot().imread(path).shape
        assert min(height, width) >= 150, f"{path} is {width} x {height} pixels, too small to read"


def test_plot_loss_overlays_runs():
    """`python plot.py a b --x X` reads the run folders before the flags and draws both runs, labelled by the
    config field in which they differ; a resumed run's repeated steps keep their last record and its clock goes
    on from before; --x flops is bench.py's train_flops per step; the learning rate is each run's fraction of
    its own peak; the loss axis shows the end of the runs, not the fall from ln(vocab); PNGs in a's folder."""
    with workdir(corpus=False) as tmp:
        a, b = tmp / "a", tmp / "b"
        lm_run(a)
        cfg_b = lm_run(b, ffn="swiglu")
        drawn, real_save = {}, plot.save

        def keep(fig, path):  # each picture's lines by label, and its loss axis's range
            lines = [line for ax in fig.axes for line in ax.get_lines() if len(line.get_xdata())]
            drawn[path.name] = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in lines}
            drawn[path.name]["ylim"] = fig.axes[0].get_ylim()
            real_save(fig, path)
        with mock.patch.object(plot, "save", keep):
            for x in ("steps", "tokens", "time", "flops"):
                name = "loss_compare.png" if x == "steps" else f"loss_compare_{x}.png"
                assert main_here(plot, a, b, "--x", x)[1] == f"wrote {a / name}\n", f"--x {x}: not written"
            assert main_here(plot, a)[0] == 0
        assert_png(a / "loss.png", *(a / name for name in drawn))
        assert {k for k in drawn["loss.png"] if k[0] not in "_y"} == {f"{a}: train", f"{a}: val"}, "one run's labels"
        lines = drawn["loss_compare_flops.png"]
        assert {f"{r}: ffn={f}: {k}" for r, f in ((a, "relu"), (b, "swiglu")) for k in ("train", "val")} <= set(lines)
        assert lines[f"{b}: ffn=swiglu: val"][0][-1] == 50 * bench.train_flops(mt.MiniTransformer(cfg_b), 4, 16)
        train_a = drawn["loss_compare_tokens.png"][f"{a}: ffn=relu: train"]
        assert train_a == ([640, 1280, 1920, 2560, 3200], [3.1, 2.9, 2.75, 2.65, 2.5]), f"tokens or resume: {train_a}"
        times = drawn["loss_compare_time.png"]
        assert (times[f"{a}: ffn=relu: train"][0], times[f"{a}: ffn=relu: val"][0]) == \
            ([1.0, 2.0, 5.5, 6.5, 7.5], [0.0, 2.25, 7.75]), f"the resumed run's clock does not go on: {times}"
        rates = [ys for label, (_, ys) in lines.items() if label.startswith("_") and len(ys) == 5]
        assert rates and all(ys == [0.9, 0.8, 0.7, 0.6, 0.5] for ys in rates), f"lr not a fraction of peak: {rates}"
        bottom, top = lines["ylim"]
        assert bottom < 2.4 and 2.75 <= top < 4.2, f"the loss axis spans {bottom:.2f}..{top:.2f}, not the end"


def test_plot_pictures_of_the_models_and_mistakes():
    """The weights drawn must be the model's own: the blocks run by hand give the model's logits (LM on both paths
    with dropout set; ViT), rows sum to 1, no query sees a later character, every patch sees every patch. The
    pictures are PNGs, with entropies per head, 3 neighbours per character, each digit's true label. A mistake is
    one line: a prompt outside the vocabulary or block_size, a checkpoint of the other script, another version or
    without weights, no checkpoint or log.jsonl, no matplotlib (before any other work), bad flags."""
    torch.manual_seed(0)
    idx, images = torch.randint(len(VOCAB), (2, 16)), torch.randn(3, 1, 28, 28)
    runs = [(mt.MiniTransformer(tiny_config(vocab_size=len(VOCAB), dropout=0.1, attn=a)), idx, plot.lm_attention)
            for a in ("sdpa", "explicit")] + [(tiny_vit(), images, plot.vit_attention)]
    with torch.no_grad():
        for model, x, draw in runs:
            logits, maps = draw(model.eval(), x)
            assert max_diff(logits, model(x)[0]) < 1e-5, f"{draw.__name__}: the block loop's logits differ"
            assert all(torch.allclose(att.sum(-1), torch.ones(att.shape[:-1])) for att in maps), "rows do not sum to 1"
            later = torch.ones(maps[0].shape[-2:], dtype=torch.bool).triu(1)  # [i, j]: j comes after i
            assert all((att[..., later].min() > 0) == (draw is plot.vit_attention) for att in maps), "who sees whom"
    (a1, a2), eye = torch.rand(2, 1, 2, 16, 16).softmax(-1), torch.eye(16)  # 2 layers of (B, H, N, N) weights
    want = (0.5 * a2.mean(1) + 0.5 * eye) @ (0.5 * a1.mean(1) + 0.5 * eye)  # each layer's mix, first layer first
    assert max_diff(plot.rollout([a1, a2]), want) < 1e-6, "the rollout is not the product of the layers' mixes"
    with workdir(corpus=False) as tmp:
        lm, vt, bare = tmp / "lm", tmp / "vit", tmp / "bare"
        lm_run(lm)
        (vt / "mnist").mkdir(parents=True)
        fake_mnist(vt / "mnist", n=12)
        torch.manual_seed(0)
        cfg = vit.ViTConfig(n_layers=2, n_heads=2, d_model=16, d_ff=32)
        torch.save({"model": vit.ViT(cfg).state_dict(), "vit_config": asdict(cfg), "step": 0,
                    "train_config": asdict(mt.TrainConfig(data_dir=str(vt / "mnist")))}, vt / "best.pt")
        code, out, err = main_here(plot, lm, "--attention", "ROMEO: the cat")
        layers = [line for line in out.splitlines() if line.startswith("layer")]
        assert len(layers) == 2 and all(len(re.findall(r"head \d \d+\.\d\d", line)) == 2 for line in layers), out + err
        neighbours = main_here(plot, lm, "--embeddings")[1].splitlines()[1:-1]
        assert len(neighbours) == len(VOCAB) and all(len(line.split()) == 7 for line in neighbours), neighbours
        shown = re.findall(r"test image (\d+): predicted \d, true (\d)", main_here(plot, vt, "--vit", "5")[1])
        labels = np.load(vt / "mnist" / "test_labels.npy")
        assert len(shown) == 5 and all(labels[int(i)] == int(t) for i, t in shown), f"digits and labels: {shown}"
        assert_png(lm / "attention.png", lm / "embeddings.png", vt / "vit_rollout.png", vt / "vit_pos_emb.png")
        bare.mkdir()
        (bare / "config.json").write_text((lm / "config.json").read_text(encoding="utf-8"), encoding="utf-8")
        ckpt = torch.load(lm / "best.pt", weights_only=True)
        torch.save({**ckpt, "model_config": {**ckpt["model_config"], "rope": True}}, bare / "newer.pt")
        torch.save({k: v for k, v in ckpt.items() if k != "model"}, bare / "stripped.pt")
        for args, words in [((lm, "--attention", "ROMEO: \u00e9"), "outside the vocabulary: '\u00e9'"),
                            ((bare, "--embeddings", "--ckpt", "newer.pt"), "checkpoint of this version (TypeError"),
                            ((bare, "--embeddings", "--ckpt", "stripped.pt"), "checkpoint of this version (KeyError"),
                            ((lm, "--attention", "the cat sat. a dog"), "more than block_size 16"),
                            ((vt, "--attention", "ROMEO"), "not a mini_transformer.py checkpoint"),
                            ((vt, "--embeddings"), "not a mini_transformer.py checkpoint"),
                            ((lm, "--vit", "4"), "not a vit.py"), ((lm, "--embeddings", "--ckpt=x"), "x not "),
                            ((bare,), "log.jsonl not found"), (("--embeddings", "--vit", "2"), "one of"),
                            (("--x", "epochs"), "x must be"), (("--vit", "-1"), "vit must be")]:
            assert words in one_line(*main_here(plot, *args)[::2]), f"{args}: expected {words!r}"
        with mock.patch.dict(sys.modules, {"matplotlib": None}):  # as if it were not installed
            code, _, _ = main_here(plot, bare)
    assert code == "plot.py needs matplotlib: pip install matplotlib", f"without matplotlib: {code!r}"


# ----------------------------------------------------------------------------------------------------
# bench.py
BENCH_TINY = ["--repeats", "1", "--warmup", "0", "--batch_size", "2", "--n_layers", "1", "--d_model", "32",
              "--block_size", "16", "--matmul_size", "64", "--gen_chars", "20", "--device", "cpu"]


def test_bench_counts_flops_and_times_the_named_optimizer_against_its_peak():
    """train_flops() counting a Linear layer or attention's T x T products other than once (the tied head twice) or
    the backward other than as twice the forward (by hand and by PyTorch's counter); the peak not the fastest
    matmul of the steps' precision; the step timed with another optimizer than --optimizer names; Muon's extra cost
    not its difference with AdamW at the same shapes; a fraction of the peak upside down, taken as median step over
    median matmul (letting a drift of the machine's speed in), not over pairs of a step and the next matmul, or
    counting the warm-up. Fake clocks give the times."""
    from torch.utils.flop_counter import FlopCounterMode

    model = mt.MiniTransformer(tiny_config(attn="explicit"))
    weights = 2 * (4 * 32 * 32 + 2 * 32 * 64) + 17 * 32  # per layer q, k, v, out, fc1, fc2; then the head
    by_hand = 3 * (2 * weights + 2 * 2 * 2 * 16 * 32) * 2 * 16  # 3 x (weights + 2 layers of QK^T, att V) x B T
    with FlopCounterMode(display=False) as counter:
        model(torch.randint(17, (2, 16)), torch.randint(17, (2, 16)))[1].backward()
    assert bench.train_flops(model, 2, 16) == by_hand == counter.get_total_flops(), f"FLOPs, by hand {by_hand}"
    rates = {(torch.float32, 16): 5, (torch.float32, 32): 9, (torch.float32, 64): 8,  # GFLOP/s of the fake clock
             (torch.bfloat16, 16): 2, (torch.bfloat16, 32): 4, (torch.bfloat16, 64): 3}

    def fake_seconds(fn, device):
        out = fn()
        return 2 * out.shape[0] ** 3 / (rates[out.dtype, out.shape[0]] * 1e9)
    with mock.patch.object(bench, "seconds", fake_seconds):
        records, (name, matmul, flops) = bench.bench_matmul(CPU, bench.BenchConfig(matmul_size=64), "bf16")
    names = {torch.float32: "fp32", torch.bfloat16: "bf16"}
    gflops = {r["name"]: round(r["gflops"]) for r in records}
    assert gflops == {f"matmul/{names[d]}-{n}": v for (d, n), v in rates.items()}, f"not the fake clock's: {gflops}"
    product = matmul()
    assert (name, product.dtype, product.shape, flops) == ("matmul/bf16-32", torch.bfloat16, (32, 32), 2 * 32**3), \
        f"bf16 steps read against {name}, which times {product.dtype} {tuple(product.shape)}, not matmul/bf16-32"
    mcfg, x = tiny_config(vocab_size=65), torch.randint(65, (2, 16))
    flops, real_step = bench.train_flops(mt.MiniTransformer(mcfg), 2, 16), bench.train_step
    for optimizer, ms in (("adamw", [20, 20, 20, 20]), ("muon", [30, 30, 30, 30]), ("adamw", [1, 10, 10, 30])):
        kinds, steps, peak_ms = [], iter(ms), iter([1, 20, 60, 60])  # the first of each warms up

        def recording_step(model, optimizers, *args, **kw):
            kinds.append(tuple(type(o).__name__ for o in optimizers))
            return real_step(model, optimizers, *args, **kw)

        def fake_seconds(fn, device):  # the peak matmul calls no train_step; AdamW beside Muon takes 20 ms
            n = len(kinds)
            fn()
            beside_muon = optimizer == "muon" and kinds[-1] == ("AdamW",)
            return (next(peak_ms) if len(kinds) == n else 20 if beside_muon else next(steps)) / 1e3
        with mock.patch.multiple(bench, train_step=recording_step, seconds=fake_seconds):
            r = bench.bench_step(CPU, bench.BenchConfig(repeats=3, warmup=1), "train/tiny", mt.MiniTransformer, mcfg,
                                 mt.TrainConfig(optimizer=optimizer), (x, x.roll(-1, 1)), 16, ("fp32", ""),
                                 ("matmul/fake", lambda: None, flops))
        want = ("AdamW", "Muon") if optimizer == "muon" else ("AdamW",)
        assert r["optimizer"] == optimizer and set(kinds[:: len(set(kinds))]) == {want}, f"{optimizer} timed {kinds}"
        assert abs(r.get("muon_extra_ms", 0) - (10 if optimizer == "muon" else 0)) < 1e-9, f"Muon's extra cost: {r}"
        assert r["ms_median"] == statistics.median(ms[1:]) and r["flops_per_step"] == flops, f"step figures {r}"
        fraction = statistics.median([p / s for s, p in zip(ms[1:], [20, 60, 60])])  # the last: 2, 6, 2
        assert abs(r["frac_peak"] - fraction) < 1e-9 and r["peak"] == "matmul/fake", f"{r['frac_peak']}, not {fraction}"
        step_s = r["ms_median"] / 1e3
        assert (r["tokens_per_s"], r["gflops"]) == (2 * 16 / step_s, flops / step_s / 1e9), f"tokens/s or GFLOP/s: {r}"


def test_bench_records_the_precision_decision_and_only_its_sections():
    """bench.py deciding the precision apart from the training scripts (it must report choose_precision()'s
    decision for the lab model and time its steps in it), running or recording sections --only left out, a bad
    --json, --precision, --optimizer or section found only after minutes of timing, or --vocab_size 0 (the
    scripts' "from the data") ending in a traceback: bench.py has no data."""
    calls, contexts = [], []

    def decide(device, precision, cfg, tokens):  # a decision the machine would not take by itself
        calls.append((device.type, precision, cfg.d_model, cfg.d_ff, tokens))
        return "bf16", "bf16 (decided in the test)"

    def autocast(device, precision):
        contexts.append(precision)
        return plumbing.autocast(device, precision)
    with workdir(corpus=False) as tmp:
        with mock.patch.object(bench, "choose_precision", decide), mock.patch.object(bench, "autocast", autocast):
            _, out, _ = main_here(bench, *BENCH_TINY, "--only=train,vit", "--optimizer=adamw", "--json", tmp / "a")
        main_here(bench, *BENCH_TINY, "--only", "attention,generate", "--json", tmp / "b")
        records, others = (json.loads((tmp / n).read_text(encoding="utf-8")) for n in "ab")
        code, _, err = main_here(bench, *BENCH_TINY, "--only", "matmul", "--json", tmp)
        assert str(code).startswith(f"error: cannot write {tmp}") and "\n" not in str(code), f"--json a folder {code}"
    assert calls[0] == ("cpu", "auto", 32, 512, 2 * 16), f"choose_precision() asked about {calls[0]}, not the lab's"
    assert "training steps in bf16 (decided in the test)" in out.splitlines()[0], f"the header does not say: {out}"
    names = [r["name"] for r in records]
    assert {n.split("/")[0] for n in names} == {"matmul", "train", "vit"} and names[-1] == "vit/train", names
    steps = [r for r in records if r["name"].startswith(("train/", "vit/"))]
    assert {(r["precision"], r["precision_note"], r["optimizer"]) for r in steps} == \
        {("bf16", "bf16 (decided in the test)", "adamw")} and set(contexts) == {"bf16"}, f"{steps}, autocast {contexts}"
    linux = Path("/proc/self/status").exists()  # bench.py reports its own peak memory where Linux tells it
    assert all(("peak_mem_mb" in r) == linux for r in steps), f"peak memory in {steps} with /proc {linux}"
    bf16 = [r for r in records if r["name"].startswith("matmul/bf16-")]
    assert bf16 and all(r["peak"] == max(bf16, key=lambda m: m["gflops"])["name"] for r in steps), "not the bf16 peak"
    want = ["attention/explicit", "attention/sdpa", "generate/plain", "generate/kv_cache"]
    assert [r["name"] for r in others] == want, f"--only attention,generate: {others}"
    assert all({"name", "device", "ms_median", "ms_min", "ms_max"} <= set(r) for r in records + others), "no times"
    for flags, words in ((["--json", "no/such/folder/out.json"], "json"), (["--precision", "fp16"], "precision"),
                         (["--optimizer", "sgd"], "optimizer"), (["--only", "train,gpu"], "sections"),
                         (["--vocab_size", "0"], "vocab_size")):
        assert words in one_line(*main_here(bench, *flags)[::2]), f"{flags} was not one parser line"


def test_bench_attention_ctrl_c_and_peak_memory():
    """The attention section timing the same computation twice (its sdpa figure never calls the fused kernel); a
    Ctrl-C during a long run losing the figures measured so far, or ending in a traceback, not one line and 130;
    a figure's peak memory the process's so far instead of its own (Linux: VmHWM is reset)."""
    with mock.patch.object(F, "scaled_dot_product_attention", side_effect=F.scaled_dot_product_attention) as fused:
        records = bench.bench_attention(CPU, bench.BenchConfig(batch_size=2, repeats=1, warmup=0), tiny_config(), "")
    assert [r["name"] for r in records] == ["attention/explicit", "attention/sdpa"] and fused.called, "SDPA never ran"
    with workdir(corpus=False) as tmp, mock.patch.object(bench, "bench_generate", side_effect=KeyboardInterrupt):
        code, _, err = main_here(bench, *BENCH_TINY, "--only", "matmul,generate", "--json", tmp / "cut.json")
        cut = json.loads((tmp / "cut.json").read_text(encoding="utf-8"))
    assert code == 130 and err.strip() == "interrupted", f"Ctrl-C: {code} {err!r}"
    assert cut and all(r["name"].startswith("matmul/") for r in cut), f"the figures before Ctrl-C were lost: {cut}"
    if not (Path("/proc/self/status").exists() and Path("/proc/self/clear_refs").exists()):
        skip("no /proc/self/status and clear_refs (Linux only): no peak memory to test (the rest passed)")
    torch.ones(2**26).sum()  # 256 MB, freed again at once
    before, after = (bench.peak_memory_mb(CPU)["peak_mem_mb"] for _ in range(2))  # each reading starts a new window
    assert after < before - 200, f"peak memory {before:.0f} MB, then {after:.0f} MB in the next window"


if __name__ == "__main__":
    run_tests(globals())
