"""
The test suite: each test's docstring states the bug it catches.

    python test_shapes.py          # runs every test_* function, ends with "N passed, N failed"
    python test_shapes.py -k cache # only the tests whose name contains "cache"
    python -m pytest test_shapes.py

Tiny models on the CPU, fixed seeds, no network: downloads are tested against a local HTTP server.
Child processes start with SIGINT at its default and are killed when their test ends.
"""

import argparse
import contextlib
import errno
import functools
import hashlib
import http.server
import io
import json
import math
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, fields, replace
from pathlib import Path
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F

import mini_transformer as mt
import plumbing
import bench
import plot
import prepare_mnist as pm
import prepare_shakespeare as ps
import sample
import vit

HERE = Path(__file__).resolve().parent
CPU = torch.device("cpu")
# A small synthetic corpus: enough structure to learn, no file or network needed.
TEXT = "".join(random.Random(0).choices(["the cat sat. ", "a dog ran! ", "ROMEO: oh\n", "JULIET: ay?\n"], k=3000))


def tiny_config(**kw):
    return mt.TransformerConfig(**{"vocab_size": 17, "block_size": 16, "n_layers": 2, "n_heads": 4, "d_model": 32, "d_ff": 64, **kw})


def tiny_train_config(tmp, **kw):
    """A 20-step run in fp32: no precision race, so that two runs of it are the same computation."""
    return mt.TrainConfig(**{"data_dir": str(tmp / "data"), "out_dir": str(tmp / "out"), "max_steps": 20, "batch_size": 8,
                             "learning_rate": 3e-3, "min_lr": 3e-4, "warmup_steps": 5, "eval_interval": 10,
                             "eval_batches": 2, "log_interval": 5, "sample_chars": 0, "precision": "fp32", **kw})


# The command-line form of a tiny model and run, for main() in this process or a child.
TINY_FLAGS = ["--n_layers", "1", "--n_heads", "2", "--d_model", "16", "--d_ff", "32", "--block_size", "16"]
TINY_RUN = ["--batch_size", "4", "--eval_interval", "5", "--log_interval", "5", "--sample_chars", "0", "--precision", "fp32",
            "--device", "cpu"]


def write_corpus(tmp):
    (tmp / "corpus.txt").write_text(TEXT, encoding="utf-8")
    ps.prepare(str(tmp / "corpus.txt"), str(tmp / "data"))


def quiet(fn, *args, **kw):
    """Run fn with its stdout swallowed (training prints progress lines)."""
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args, **kw)


def assert_refused(config_class, *bad_fields):
    """Each dict of bad field values must make config_class raise ValueError (one parser line on the CLI)."""
    for bad in bad_fields:
        try:
            config_class(**bad)
        except ValueError:
            continue
        raise AssertionError(f"{config_class.__name__} accepted {bad}")


def max_diff(a, b):
    return (a - b).abs().max().item()


def one_line(code, err=""):
    """The message of a failed command, which must be one line and no traceback: sys.exit's text
    (code), or what parser.error() wrote to stderr (err)."""
    message = code if isinstance(code, str) else err
    assert code not in (0, None), f"the command succeeded (stderr {err!r})"
    assert message.strip() and "\n" not in message.strip() and "Traceback" not in message, f"not one line: {message!r}"
    return message


def exit_line(fn, *args, **kw):
    """The one-line message with which fn(*args, **kw) must end the program."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            fn(*args, **kw)
    except SystemExit as e:
        return one_line(e.code, err.getvalue())
    raise AssertionError(f"{getattr(fn, '__name__', fn)} went on instead of stopping")


def main_here(module, *argv):
    """module.main() in this process, with argv as its command line: (exit code or sys.exit's message,
    stdout, stderr). As a child process would, but without a second of importing torch."""
    out, err, code = io.StringIO(), io.StringIO(), 0
    with mock.patch.object(sys, "argv", [f"{module.__name__}.py", *map(str, argv)]):
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                module.main()
            except SystemExit as e:
                code = e.code
    return code, out.getvalue(), err.getvalue()


@contextlib.contextmanager
def ctrl_c_handled():
    """SIGINT as Python sets it up, for the tests that press Ctrl-C in this process: a test runner
    started in the background ignores it, and stop_flag() rightly leaves an ignored SIGINT ignored."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def default_sigint():
    """preexec_fn of every child: SIGINT back to the default. A test runner started in the background
    ignores SIGINT, and its children would inherit that and never see a Ctrl-C."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@contextlib.contextmanager
def child(*args, cwd, timeout=120, **kw):
    """A python child process with args, stdout and stderr piped as text. It is killed when the block
    ends, or after timeout seconds (so that a read from a hung child ends too)."""
    proc = subprocess.Popen([sys.executable, *map(str, args)], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=default_sigint, **kw)
    watchdog = threading.Timer(timeout, proc.kill)
    watchdog.start()
    try:
        yield proc
    finally:
        watchdog.cancel()
        proc.kill()
        with proc:  # closes the pipes and reaps the process
            pass


# ----------------------------------------------------------------------------------------------------
# Attention


def test_causal_mask_hides_the_future():
    """A causal mask that is missing, off by one or applied after the softmax lets a later token change
    the logits at earlier positions, on either attention path."""
    for attn in ("sdpa", "explicit"):
        torch.manual_seed(0)
        model = mt.MiniTransformer(tiny_config(attn=attn)).eval()
        idx = torch.randint(17, (2, 16))
        changed = idx.clone()
        changed[:, 9] = (changed[:, 9] + 1) % 17
        a, b = model(idx)[0], model(changed)[0]
        assert max_diff(a[:, :9], b[:, :9]) == 0, f"{attn}: a later token leaked into earlier logits"
        assert max_diff(a[:, 9:], b[:, 9:]) > 0, f"{attn}: the changed token had no effect at all"


def test_non_causal_block_sees_every_position():
    """The ViT reuses the block with causal=False: a mask applied regardless of the flag would keep
    the last position from reaching the first."""
    torch.manual_seed(0)
    for attn in ("sdpa", "explicit"):
        block = mt.TransformerBlock(tiny_config(attn=attn), causal=False).eval()
        x = torch.randn(1, 8, 32)
        y = x.clone()
        y[:, -1] = torch.randn(32)  # random, not a constant shift: LayerNorm removes those
        assert max_diff(block(x)[:, 0], block(y)[:, 0]) > 1e-4, f"{attn}: non-causal block ignored the last position"


def test_sdpa_matches_explicit_path():
    """The fused SDPA path computes other outputs or gradients than the explicit one (heads split
    with a bare view, the wrong scale), or keeps its dropout on in eval mode."""
    torch.manual_seed(0)
    idx, targets = torch.randint(17, (3, 16)), torch.randint(17, (3, 16))
    explicit = mt.MiniTransformer(tiny_config(attn="explicit"))
    sdpa = mt.MiniTransformer(tiny_config(attn="sdpa"))
    sdpa.load_state_dict(explicit.state_dict())
    # train mode, dropout off: forward and backward agree
    (la, _), (lb, _) = explicit(idx), sdpa(idx)
    assert max_diff(la, lb) < 1e-5, f"train forward differs by {max_diff(la, lb):.2e}"
    explicit(idx, targets)[1].backward()
    sdpa(idx, targets)[1].backward()
    for (name, p), q in zip(explicit.named_parameters(), sdpa.parameters()):
        assert max_diff(p.grad, q.grad) < 1e-5, f"gradient of {name} differs by {max_diff(p.grad, q.grad):.2e}"
    # eval mode with dropout on: the two paths agree and repeat exactly
    explicit = mt.MiniTransformer(tiny_config(attn="explicit", dropout=0.5)).eval()
    sdpa = mt.MiniTransformer(tiny_config(attn="sdpa", dropout=0.5)).eval()
    sdpa.load_state_dict(explicit.state_dict())
    out = sdpa(idx)[0]
    assert torch.equal(out, sdpa(idx)[0]), "eval mode is not deterministic with dropout > 0 (SDPA dropout_p in eval?)"
    assert max_diff(out, explicit(idx)[0]) < 1e-5, "eval-mode SDPA and explicit paths differ"


def test_dropout_is_active_in_train_mode_only():
    """Dropout that is never applied in train mode (on either path), or still applied in eval mode, or
    evaluation and generation called on a model in train mode (dropout on) or building an autograd graph."""
    idx = torch.randint(17, (2, 16))
    for attn in ("sdpa", "explicit"):
        model = mt.MiniTransformer(tiny_config(attn=attn, dropout=0.5))
        assert not torch.equal(model(idx)[0], model(idx)[0]), f"{attn}: dropout had no effect in train mode"
        model.eval()
        assert torch.equal(model(idx)[0], model(idx)[0]), f"{attn}: eval mode is random"
        # evaluation and generation switch to eval mode themselves, build no autograd graph, and restore train mode
        seen, hook = [], model.register_forward_hook(lambda m, args, out: seen.append((m.training, torch.is_grad_enabled())))
        try:
            mt.estimate_loss(model.train(), torch.randint(17, (200,)), 16, 2, n_batches=2)
            model.generate(idx[:1, :4], 3)
        finally:
            hook.remove()
        assert seen and set(seen) == {(False, False)}, f"{attn}: (train mode, autograd) during evaluation and generation: {set(seen)}"
        assert model.training, f"{attn}: train mode was not restored"


def test_bf16_autocast_on_the_cpu_computes_the_same_model():
    """--precision fp32 autocasting anyway, bf16 autocast leaving the matmuls in fp32, or the attention
    under CPU autocast taking the fused kernel (slower there than the explicit path) or computing
    something else than fp32 does beyond bf16 rounding, or letting the future leak in."""
    assert isinstance(plumbing.autocast(CPU, "fp32"), contextlib.nullcontext), "--precision fp32 must not autocast"
    with plumbing.autocast(CPU, "bf16"):
        assert torch.nn.Linear(4, 4)(torch.randn(2, 4)).dtype == torch.bfloat16, "bf16 autocast must run matmuls in bf16"
    torch.manual_seed(0)
    model = mt.MiniTransformer(tiny_config())  # attn="sdpa"
    idx = torch.randint(17, (2, 16))
    changed = idx.clone()
    changed[:, 9] = (changed[:, 9] + 1) % 17
    with mock.patch.object(F, "scaled_dot_product_attention", wraps=F.scaled_dot_product_attention) as sdpa:
        want = model(idx)[0]
        fp32_calls = sdpa.call_count
        with plumbing.autocast(CPU, "bf16"):
            got, later = model(idx)[0], model(changed)[0]
    assert fp32_calls == len(model.blocks), "the spy on the fused kernel does not see the fp32 forward"
    assert sdpa.call_count == fp32_calls, "under CPU autocast the attention took the fused kernel, not the explicit path"
    assert got.dtype == torch.bfloat16, f"logits under bf16 autocast are {got.dtype}"
    assert max_diff(got.float(), want) < 0.05, f"bf16 logits differ from fp32 by {max_diff(got.float(), want):.3f}"
    assert max_diff(got[:, :9], later[:, :9]) == 0, "under bf16 autocast a later token leaked"
    block = mt.TransformerBlock(tiny_config(), causal=False)
    x = torch.randn(2, 16, 32)
    with plumbing.autocast(CPU, "bf16"):
        y = block(x)
    assert max_diff(y.float(), block(x)) < 0.05, "the non-causal block differs under bf16 autocast"


def timed_linear(fake, fp32_cost, bf16_cost):
    """Patch F.linear to advance the fake clock fake[0] by fp32_cost per fp32 call, bf16_cost per bf16 one."""
    real = F.linear

    def linear(x, *args, **kw):
        fake[0] += bf16_cost if x.dtype == torch.bfloat16 else fp32_cost
        return real(x, *args, **kw)

    return mock.patch.object(F, "linear", linear)


def test_precision_race_picks_the_faster_and_is_honoured():
    """--precision auto on the CPU chose bf16 where bf16 matmuls are slower (or fp32 where they are
    3x faster), raced even when a precision was forced, or picked bf16 and then trained in fp32 anyway
    because the choice never reached the autocast around the forward."""
    cfg = tiny_config()
    for costs, want, ratio in (((3, 1), "bf16", "3.00x"), ((1, 3), "fp32", "0.33x")):
        fake = [0.0]
        with timed_linear(fake, *costs):
            name, note = plumbing.choose_precision(CPU, "auto", cfg, 64, clock=lambda: fake[0])
        assert name == want and ratio in note, f"fp32, bf16 costs {costs}: chose {name} ({note}), expected {want} at {ratio}"
    with mock.patch.object(F, "linear") as linear:
        for forced in ("fp32", "bf16"):
            assert plumbing.choose_precision(CPU, forced, cfg, 64)[0] == forced, f"--precision {forced} was not taken"
    assert not linear.called, "a forced precision still ran the race"
    seen = []

    def spy(module, args, output):  # every forward of the language model: (autocast on?, logits dtype)
        if isinstance(module, mt.MiniTransformer):
            seen.append((torch.is_autocast_enabled("cpu"), output[0].dtype))

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_corpus(tmp)
        for costs, dtype in (((3, 1), torch.bfloat16), ((1, 3), torch.float32)):
            fake, out = [0.0], io.StringIO()
            race = functools.partial(plumbing.choose_precision, clock=lambda: fake[0])
            hook = torch.nn.modules.module.register_module_forward_hook(spy)
            try:
                with timed_linear(fake, *costs), mock.patch.object(mt, "choose_precision", race), contextlib.redirect_stdout(out):
                    mt.train(tiny_config(vocab_size=0), tiny_train_config(tmp, precision="auto", max_steps=2, warmup_steps=0,
                                                                         out_dir=str(tmp / str(dtype))))
            finally:
                hook.remove()
            want = dtype == torch.bfloat16
            assert seen and all(s == (want, dtype) for s in seen), f"chose {dtype}, but the forwards ran as {set(seen)}"
            assert ("bf16" if want else "fp32") + " (bf16 matmuls measured" in out.getvalue(), f"the run's first line: {out.getvalue()}"
            seen.clear()


def test_heads_match_a_per_head_loop():
    """Heads split with a bare view (mixing time steps and heads) or scores scaled by 1/sqrt(d_model)
    instead of 1/sqrt(d_k) differ from a plain per-head loop."""
    torch.manual_seed(0)
    cfg = tiny_config(attn="explicit")
    attn = mt.CausalSelfAttention(cfg).eval()
    x = torch.randn(2, 10, 32)
    wq, wk, wv = attn.qkv_proj.weight.split(32)  # each (C, C): rows are output channels
    d_k, heads = 32 // cfg.n_heads, []
    for h in range(cfg.n_heads):
        rows = slice(h * d_k, (h + 1) * d_k)
        q, k, v = x @ wq[rows].T, x @ wk[rows].T, x @ wv[rows].T  # (B, T, d_k)
        scores = q @ k.transpose(1, 2) / math.sqrt(d_k)
        scores = scores.masked_fill(torch.ones(10, 10).triu(1).bool(), float("-inf"))
        heads.append(scores.softmax(-1) @ v)
    expected = torch.cat(heads, dim=-1) @ attn.out_proj.weight.T
    y, weights = attn(x, return_weights=True)
    assert max_diff(y, expected) < 1e-5, f"attention differs from the per-head loop by {max_diff(y, expected):.2e}"
    assert max_diff(weights.sum(-1), torch.ones(2, 4, 10)) < 1e-5, "attention rows do not sum to 1"
    assert weights.triu(1).abs().max() == 0, "attention weights on future keys are not zero"
    attn.path = "sdpa"
    assert max_diff(attn(x), y) < 1e-5, "the SDPA path differs from the per-head loop"


def test_attention_equals_pytorchs_multihead_attention():
    """Given the same weights, attention differs from PyTorch's nn.MultiheadAttention: q, k, v or their
    biases read from the wrong rows of the fused projection, heads split another way, the wrong scale or
    mask (causal or not), or weights that are not each head's softmax."""
    x = torch.randn(3, 12, 32, generator=torch.Generator().manual_seed(1))
    for causal in (True, False):
        torch.manual_seed(0)
        attn = mt.CausalSelfAttention(tiny_config(attn="explicit", bias=True), causal=causal).eval()
        for p in attn.parameters():  # biases are zero at init, which would hide a mix-up of theirs
            torch.nn.init.normal_(p, std=0.3)
        mha = torch.nn.MultiheadAttention(32, 4, batch_first=True).eval()
        mha.load_state_dict({"in_proj_weight": attn.qkv_proj.weight, "in_proj_bias": attn.qkv_proj.bias,
                             "out_proj.weight": attn.out_proj.weight, "out_proj.bias": attn.out_proj.bias})
        mask = torch.ones(12, 12, dtype=torch.bool).triu(1) if causal else None  # True: may not attend
        with torch.no_grad():
            expected, expected_weights = mha(x, x, x, attn_mask=mask, average_attn_weights=False)
            y, weights = attn(x, return_weights=True)
            assert max_diff(y, expected) < 1e-5, f"causal={causal}: explicit path differs from MHA by {max_diff(y, expected):.2e}"
            assert max_diff(weights, expected_weights) < 1e-6, f"causal={causal}: attention weights differ from MHA's"
            attn.path = "sdpa"
            assert max_diff(attn(x), expected) < 1e-5, f"causal={causal}: SDPA path differs from MHA by {max_diff(attn(x), expected):.2e}"


def test_sequence_longer_than_block_size_is_a_clear_error():
    """A sequence longer than block_size ended in an index error deep in the position table, and
    generate() failed past block_size instead of cropping its context."""
    model = mt.MiniTransformer(tiny_config())
    try:
        model(torch.zeros(1, 17, dtype=torch.long))
        raise AssertionError("a sequence longer than block_size was accepted")
    except ValueError as e:
        assert "block_size" in str(e), f"unhelpful message: {e}"
    out = model.generate(torch.zeros(1, 15, dtype=torch.long), 5, temperature=0)
    assert out.shape == (1, 20), f"generate() returned shape {tuple(out.shape)}"


# ----------------------------------------------------------------------------------------------------
# Init and weight tying


def test_weight_tying_and_a_single_init():
    """The head and the embedding come untied (or untie after .to() and loading), the tied matrix is
    initialised twice (the module visited last wins), or num_params() counts it twice."""
    model = mt.MiniTransformer(tiny_config())
    assert model.lm_head.weight is model.token_emb.weight, "lm_head and token_emb are not tied"
    seen = []
    original = torch.nn.init.normal_

    def recording_normal(tensor, *args, **kw):
        seen.append(tensor.data_ptr())
        return original(tensor, *args, **kw)

    with mock.patch.object(torch.nn.init, "normal_", recording_normal):
        mt.init_weights(model, model.cfg.n_layers)
    assert len(seen) == len(set(seen)), "some tensor was initialised twice (the tied matrix?)"
    assert model.token_emb.weight.data_ptr() in seen, "the tied matrix was never initialised"
    n_unique = sum(p.numel() for p in {id(p): p for p in model.state_dict(keep_vars=True).values()}.values())
    assert model.num_params() == n_unique, "num_params() counts the tied matrix twice"
    copy = mt.MiniTransformer(tiny_config()).to(torch.float64).to(torch.float32)
    copy.load_state_dict(model.state_dict())
    assert copy.lm_head.weight is copy.token_emb.weight, "tying lost after .to() and load_state_dict"
    assert torch.equal(copy.lm_head.weight, model.token_emb.weight), "the loaded tied matrix differs"


def test_scaled_init_on_every_residual_output():
    """The GPT-2 scaled init 0.02/sqrt(2 n_layers) misses a residual output projection: out_proj, or
    the active FFN's down projection (SwiGLU's w2 where only fc2 is looked for)."""
    torch.manual_seed(0)
    for ffn, down in (("relu", "fc2"), ("swiglu", "w2")):
        cfg = tiny_config(d_model=256, d_ff=1024, n_layers=8, ffn=ffn)
        model = mt.MiniTransformer(cfg)
        scaled = 0.02 / math.sqrt(2 * cfg.n_layers)
        for i, block in enumerate(model.blocks):
            for name in ("attn.out_proj", f"ffn.{down}"):
                std = block.get_submodule(name).weight.std().item()
                assert abs(std - scaled) < 0.05 * scaled, f"{ffn} block {i} {name}: std {std:.4f}, expected {scaled:.4f}"
            std = block.attn.qkv_proj.weight.std().item()
            assert abs(std - 0.02) < 0.001, f"{ffn} block {i} qkv_proj: std {std:.4f}, expected 0.02"
        std = model.token_emb.weight.std().item()
        assert abs(std - 0.02) < 0.002, f"token embedding std {std:.4f}, expected 0.02 (initialised twice?)"


def test_swiglu_keeps_the_parameter_count():
    """A SwiGLU FFN at the full d_ff (three matrices instead of two) has half again the parameters of
    the ReLU one, so the two cannot be compared; and the default model's count drifts unnoticed."""
    relu = mt.MiniTransformer(mt.TransformerConfig(vocab_size=65)).num_params()
    swiglu = mt.MiniTransformer(mt.TransformerConfig(vocab_size=65, ffn="swiglu")).num_params()
    assert abs(swiglu - relu) / relu < 0.02, f"SwiGLU has {swiglu:,} parameters, ReLU {relu:,}"
    expected = 65 * 128 + 128 * 128 + 4 * (4 * 128 * 128 + 2 * 128 * 512 + 2 * 128) + 128
    assert relu == expected, f"the default model has {relu:,} parameters, expected {expected:,}"


def test_weight_decay_only_on_matrices():
    """A parameter missing from the optimizer or in two groups (the tied matrix), or LayerNorm gains
    and biases decayed towards 0."""
    model = mt.MiniTransformer(tiny_config(bias=True))
    optimizers = mt.make_optimizer(model, mt.TrainConfig(optimizer="adamw"))
    assert len(optimizers) == 1 and isinstance(optimizers[0], torch.optim.AdamW), f"--optimizer adamw gave {optimizers}"
    decayed, plain = (group["params"] for group in optimizers[0].param_groups)
    ids = [id(p) for p in decayed + plain]
    assert len(ids) == len(set(ids)) == len(list(model.parameters())), "a parameter is missing or in two groups"
    assert all(p.dim() >= 2 for p in decayed) and all(p.dim() < 2 for p in plain), "1-D tensors are decayed"
    groups = optimizers[0].param_groups
    assert groups[0]["weight_decay"] > 0 and groups[1]["weight_decay"] == 0, "the 1-D group is decayed"


def test_muon_takes_exactly_the_blocks_matrices():
    """--optimizer muon updated a parameter twice (the tied matrix in both optimizers) or not at all,
    or gave Muon the embeddings, the tied head or 1-D gains and biases, which are not maps between
    hidden states to orthogonalise; or Muon did not get its own peak learning rate."""
    model = mt.MiniTransformer(tiny_config(bias=True, ffn="swiglu"))
    tcfg = mt.TrainConfig(optimizer="muon")
    optimizers = mt.make_optimizer(model, tcfg)
    assert [type(o) for o in optimizers] == [torch.optim.AdamW, torch.optim.Muon], f"--optimizer muon gave {optimizers}"
    ids = [id(p) for opt in optimizers for group in opt.param_groups for p in group["params"]]
    assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in model.parameters()}, "a parameter is missing or updated twice"
    assert ids.count(id(model.token_emb.weight)) == 1, "the tied matrix is not updated exactly once"
    matrices = {n for n, p in model.named_parameters() if n.startswith("blocks.") and p.dim() == 2}
    by_id = {id(p): n for n, p in model.named_parameters()}
    in_muon = {by_id[id(p)] for group in optimizers[1].param_groups for p in group["params"]}
    assert in_muon == matrices, f"Muon has {sorted(in_muon ^ matrices)} wrong"
    assert all(g["peak_lr"] == tcfg.muon_lr for g in optimizers[1].param_groups), "Muon does not peak at --muon_lr"


# ----------------------------------------------------------------------------------------------------
# Loss, optimiser, learning rate


def test_lr_schedule_edges():
    """The learning rate is 0 at step 0, a warmup as long as the run divides by zero, warmup or decay
    is not monotone, the decay does not end at min_lr at max_steps, or (warmup 0 and a time budget)
    it drops to min_lr before the budget has fixed max_steps and then jumps back to the peak."""
    cfg = mt.TrainConfig(max_steps=100, learning_rate=1e-3, min_lr=1e-4)
    warmup = cfg.warmup()
    assert warmup == 10, f"the default warmup of a 100-step run is {warmup}, not a tenth"
    lrs = [mt.get_lr(s, cfg) for s in range(120)]
    assert lrs[0] > 0, "the learning rate is 0 at step 0"
    assert all(a < b for a, b in zip(lrs[:warmup], lrs[1 : warmup + 1])), "warmup is not increasing"
    assert lrs[warmup] == 1e-3, f"the peak is {lrs[warmup]}, not learning_rate"
    assert all(a >= b for a, b in zip(lrs[warmup:100], lrs[warmup + 1 : 101])), "the decay is not monotone"
    assert abs(lrs[100] - 1e-4) < 1e-12 and lrs[119] == lrs[100], "the decay does not end at min_lr"
    assert mt.get_lr(0, mt.TrainConfig(max_steps=1, warmup_steps=0)) > 0, "warmup 0 with one step breaks"
    budget = mt.TrainConfig(warmup_steps=0)  # max_steps 0 until the time budget fixes it after the first timed steps
    assert [mt.get_lr(s, budget) for s in range(3)] == [budget.learning_rate] * 3, "with warmup 0, the decay ran before max_steps was known"
    assert (mt.TrainConfig(max_steps=5000).warmup(), mt.TrainConfig().warmup()) == (100, 100), "the warmup is not capped at 100"


def test_short_runs_still_end_their_schedule():
    """A short run never reaches min_lr, or dies: --max_steps below 10 kept the warmup of 100 steps
    (the learning rate only ever rose), and a time budget fixed at an early log step, before the
    default warmup of 100 steps had ended, set max_steps below the warmup and stopped with a ValueError."""
    for n in range(1, 12):
        cfg = mt.TrainConfig(max_steps=n)
        lr = mt.get_lr(n, cfg)
        assert cfg.warmup() < n and abs(lr - cfg.min_lr) < 1e-12, f"--max_steps {n}: warmup {cfg.warmup()}, last lr {lr:.2e}"
    fake = [0.0]
    data = torch.randint(17, (400,))

    def next_batch(g):  # 0.25 s a step on the fake clock: 10 s fit about 40 steps
        fake[0] += 0.25
        return mt.get_batch(data, 16, 4, g)

    with tempfile.TemporaryDirectory() as tmp:
        tcfg = mt.TrainConfig(out_dir=tmp, time_budget=10.0, log_interval=2, eval_interval=50, batch_size=4, sample_chars=0,
                              precision="fp32")
        _, fixed = quiet(mt.fit, mt.MiniTransformer(tiny_config()), tcfg, next_batch, lambda m: {"val_loss": 1.0}, {}, ("tok", 64),
                         clock=lambda: fake[0])
    lr = mt.get_lr(fixed.max_steps, fixed)
    assert fixed.warmup() < fixed.max_steps and abs(lr - fixed.min_lr) < 1e-12, \
        f"time budget: max_steps {fixed.max_steps}, warmup {fixed.warmup()}, last lr {lr:.2e}"


def test_time_budget_sets_max_steps_once_the_warmup_is_timed():
    """With max_steps 0 the run is sized by --time_budget: max_steps was not fixed right after the timed
    warmup, or to more steps than fit (the evaluations left out), or not recorded in config.json and
    the later checkpoints, so that the cosine never reached min_lr or a resume ran to another length;
    and an explicit max_steps must never be changed by the clock."""
    D, E, budget = 0.25, 0.5, 10.0  # fake seconds per step and per evaluation
    torch.manual_seed(0)
    data, fake, cost, saves = torch.randint(17, (400,)), [0.0], [D], []

    def next_batch(g):
        fake[0] += cost[0]
        return mt.get_batch(data, 16, 4, g)

    def evaluate(model):
        fake[0] += E
        return {"val_loss": mt.estimate_loss(model, data, 16, 4, n_batches=1)}

    real_save = mt.save_checkpoint  # the name fit() calls

    def recording_save(path, state, rank=0):
        saves.append((state["step"], state["train_config"]["max_steps"]))
        return real_save(path, state, rank)

    cfg, out = tiny_config(n_layers=1), io.StringIO()
    with tempfile.TemporaryDirectory() as tmp, mock.patch.object(mt, "save_checkpoint", recording_save):
        tmp = Path(tmp)
        tcfg = mt.TrainConfig(out_dir=str(tmp / "budget"), time_budget=budget, warmup_steps=4, log_interval=4, eval_interval=8,
                              batch_size=4, sample_chars=0, precision="fp32")
        assert tcfg.max_steps == 0, "the default run is not sized by the time budget"
        with contextlib.redirect_stdout(out):
            _, fixed = mt.fit(mt.MiniTransformer(cfg), tcfg, next_batch, evaluate, {"model_config": asdict(cfg)}, ("tok", 64),
                              clock=lambda: fake[0])
        # At step 4 the clock has seen the evaluation at step 0 and 4 steps. What is left of the budget,
        # less one evaluation at the end, pays for steps that cost D each plus their share of the
        # evaluations every 8 steps.
        left = budget * (1 - mt.BUDGET_RESERVE) - (E + 4 * D) - E
        want = 4 + int(left / (D + E / 8))
        assert (fixed.max_steps, fixed.warmup()) == (want, 4), f"max_steps {fixed.max_steps}, warmup {fixed.warmup()}; expected {want}, 4"
        assert f"step 4/{want} |" in out.getvalue(), f"max_steps was not fixed right after the warmup:\n{out.getvalue()}"
        assert fake[0] <= budget * (1 - mt.BUDGET_RESERVE), f"the run took {fake[0]} s of a budget of {budget} s"
        assert abs(mt.get_lr(want, fixed) - fixed.min_lr) < 1e-12, "the cosine does not end at min_lr on the last step"
        saved = json.loads((tmp / "budget" / "config.json").read_text(encoding="utf-8"))["train_config"]
        assert saved["max_steps"] == want, f"config.json records max_steps {saved['max_steps']}, not {want}"
        later = [(step, n) for step, n in saves if step > 4]
        assert later and later[-1][0] == want and all(n == want for _, n in later), f"checkpoints (step, max_steps): {saves}"
        ckpt = plumbing.load_checkpoint(tmp / "budget" / "ckpt.pt")
        resumed = plumbing.resumed_config(replace(tcfg, resume=True), ckpt, {"resume": True})
        assert (resumed.max_steps, resumed.warmup()) == (want, 4), f"a resume goes to {resumed.max_steps} steps, not {want}"
        longer = plumbing.resumed_config(replace(tcfg, resume=True, max_steps=want + 10), ckpt, {"resume": True, "max_steps": want + 10})
        assert longer.max_steps == want + 10, "a resume with --max_steps ignored it"
        fake[0], cost[0] = 0.0, 5.0  # 20 steps of 5 s are far beyond the budget of 10 s
        _, explicit = quiet(mt.fit, mt.MiniTransformer(cfg), replace(tcfg, max_steps=20, out_dir=str(tmp / "explicit")), next_batch,
                            evaluate, {"model_config": asdict(cfg)}, ("tok", 64), clock=lambda: fake[0])
        assert explicit.max_steps == 20, f"an explicit --max_steps 20 became {explicit.max_steps}"
        assert plumbing.load_checkpoint(tmp / "explicit" / "ckpt.pt")["step"] == 20, "the explicit run did not end at step 20"


def test_evaluating_every_step_still_times_logs_and_ends():
    """With --eval_interval 1 every step came right after an evaluation, and the clock, restarted after
    each one, never timed a step: the time budget never fixed max_steps, so the run went on for ever
    without a progress line (and under torchrun a Ctrl-C was never agreed on). The ms/step of a progress
    line must be that of the steps since the previous line, not an average that lags a slowdown."""
    fake, data = [0.0], torch.randint(17, (400,))

    def next_batch(g):  # 0.25 s a step on the fake clock
        fake[0] += 0.25
        if fake[0] > 100:
            raise RuntimeError("a run with a budget of 10 s was still training after 100 s")
        return mt.get_batch(data, 16, 4, g)

    def evaluate(model):  # 0.1 s an evaluation
        fake[0] += 0.1
        return {"val_loss": 1.0}

    with tempfile.TemporaryDirectory() as tmp:
        tcfg = mt.TrainConfig(out_dir=tmp, time_budget=10.0, eval_interval=1, log_interval=2, warmup_steps=2, batch_size=4, sample_chars=0,
                              precision="fp32")
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            _, fixed = mt.fit(mt.MiniTransformer(tiny_config(n_layers=1)), tcfg, next_batch, evaluate, {}, ("tok", 64),
                              clock=lambda: fake[0])
    assert 0 < fixed.max_steps and fake[0] <= 10.0, f"max_steps {fixed.max_steps}, {fake[0]} s of a budget of 10 s"
    assert f"step 2/{fixed.max_steps} | " in out.getvalue() and "| 250 ms/step |" in out.getvalue(), \
        f"no progress line, or evaluations counted in the step time:\n{out.getvalue()[-600:]}"
    fake[0], calls = 0.0, []

    def slower_later(g):  # 0.25 s a step, then 1 s from the 6th step on
        calls.append(1)
        fake[0] += 0.25 if len(calls) < 6 else 1.0
        return mt.get_batch(data, 16, 4, g)

    with tempfile.TemporaryDirectory() as tmp:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            mt.fit(mt.MiniTransformer(tiny_config(n_layers=1)), replace(tcfg, out_dir=tmp, max_steps=12, log_interval=4, eval_interval=100),
                   slower_later, evaluate, {}, ("tok", 64), clock=lambda: fake[0])
    assert "step 12/12 | " in out.getvalue() and out.getvalue().split("step 12/12 | ")[1].count("| 1000 ms/step |") == 1, \
        f"ms/step is not the time of the steps since the last progress line:\n{out.getvalue()}"


def test_grad_accumulation_equals_one_big_batch():
    """A loss not divided by the accumulation steps gives k micro-batches k times the gradient (and
    the clipping threshold) of one batch of the same size."""
    torch.manual_seed(0)
    batch = (torch.randint(17, (8, 16)), torch.randint(17, (8, 16)))
    results = []
    for accum in (1, 4):
        torch.manual_seed(1)
        model = mt.MiniTransformer(tiny_config())
        sgd = torch.optim.SGD(model.parameters(), lr=0.5)  # SGD: unlike Adam, it shows a scale error
        loss, norm = mt.train_step(model, [sgd], batch, grad_accum=accum)
        results.append((loss, norm, torch.cat([p.flatten() for p in model.parameters()])))
    (l1, n1, p1), (l4, n4, p4) = results
    assert abs(l1 - l4) < 1e-5, f"logged loss {l1:.5f} vs {l4:.5f}"
    assert abs(n1 - n4) < 1e-5, f"gradient norm {n1:.5f} vs {n4:.5f} (loss not divided by grad_accum?)"
    assert max_diff(p1, p4) < 1e-6, f"parameters differ by {max_diff(p1, p4):.2e}"


# ----------------------------------------------------------------------------------------------------
# Evaluation and sanity checks


def test_loss_at_init_is_ln_vocab():
    """A badly scaled init makes a fresh model confident, so its loss is far from ln(vocab_size)."""
    torch.manual_seed(0)
    model = mt.MiniTransformer(mt.TransformerConfig(vocab_size=65))
    _, loss = model(torch.randint(65, (8, 64)), torch.randint(65, (8, 64)))
    assert abs(loss.item() - math.log(65)) < 0.3, f"initial loss {loss.item():.3f}, expected about {math.log(65):.3f}"


def test_overfits_one_batch():
    """A model or training step that cannot learn (gradients not reaching the weights, the optimizer
    not stepping) fails to memorise one fixed batch."""
    torch.manual_seed(0)
    model = mt.MiniTransformer(tiny_config())
    optimizers = mt.make_optimizer(model, mt.TrainConfig(learning_rate=1e-2, weight_decay=0.0))
    batch = (torch.randint(17, (4, 16)), torch.randint(17, (4, 16)))
    first = mt.train_step(model, optimizers, batch)[0].item()
    for _ in range(150):
        last = mt.train_step(model, optimizers, batch, grad_clip=1.0)[0].item()
    assert first > 2.5 and last < 0.2, f"could not overfit one batch: loss {first:.3f} -> {last:.3f}"


def test_eval_covers_the_whole_split_and_repeats():
    """Whole-split evaluation skipping or repeating tokens, fixed-batch evaluation drawing other
    windows at each call or from the training RNG, or train mode not restored afterwards."""
    torch.manual_seed(0)
    model = mt.MiniTransformer(tiny_config())
    data = torch.randint(17, (16 * 5 + 7,))
    total, count = 0.0, 0
    for start in range(0, len(data) - 1, 16):  # the same windows, one at a time
        x, y = data[start : start + 16][None], data[start + 1 : start + 17][None]
        x = x[:, : y.size(1)]
        total += model.eval()(x, y)[1].item() * y.numel()
        count += y.numel()
    assert count == len(data) - 1
    whole = mt.estimate_loss(model.train(), data, 16, 3)
    assert abs(whole - total / count) < 1e-5, f"whole-split loss {whole:.5f}, expected {total / count:.5f}"
    assert model.training, "estimate_loss did not restore train mode"
    state = torch.get_rng_state()
    a, b = mt.estimate_loss(model, data, 16, 4, n_batches=3), mt.estimate_loss(model, data, 16, 4, n_batches=3)
    assert a == b, "fixed-batch evaluations differ between calls"
    assert torch.equal(state, torch.get_rng_state()), "evaluation consumed the global RNG"


def test_best_checkpoint_holds_the_lowest_val_loss():
    """best.pt written at every evaluation, so that it held the last model instead of the best one, or
    ckpt.pt not kept as the latest."""
    vals, data = iter([3.0, 2.0, 2.5]), torch.randint(17, (400,))
    with tempfile.TemporaryDirectory() as tmp:
        tcfg = mt.TrainConfig(out_dir=tmp, max_steps=4, eval_interval=2, warmup_steps=0, batch_size=4, sample_chars=0, precision="fp32")
        quiet(mt.fit, mt.MiniTransformer(tiny_config(n_layers=1)), tcfg, lambda g: mt.get_batch(data, 16, 4, g),
              lambda m: {"val_loss": next(vals)}, {}, ("tok", 64))
        best, last = (plumbing.load_checkpoint(Path(tmp) / name) for name in ("best.pt", "ckpt.pt"))
    assert (best["step"], best["best_val_loss"]) == (2, 2.0), f"best.pt holds step {best['step']}, not step 2 (val 2.0)"
    assert (last["step"], last["best_val_loss"]) == (4, 2.0), f"ckpt.pt holds step {last['step']}, not the last step 4"


def test_batches_are_shifted_windows():
    """Targets that are not the next tokens, or windows that never reach the end of the data or run
    past it."""
    data = torch.arange(20)
    g = torch.Generator().manual_seed(0)
    x, y = mt.get_batch(data, 16, 200, g)
    assert x.shape == y.shape == (200, 16), f"batch shapes {tuple(x.shape)}, {tuple(y.shape)}"
    assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y, x + 1), "targets are not the next tokens"
    assert y.max() == 19 and x.min() == 0, "the windows never reach one end of the data"


# ----------------------------------------------------------------------------------------------------
# Sampling


def test_sampling_edges():
    """Temperature 0 giving NaN or depending on the seed, a tiny temperature overflowing the logits to
    inf (NaN probabilities), tokens drawn from outside the top k (a near-tie merged with the k-th by the
    rounding of a shift or a division), or a top_k beyond the vocabulary raising in torch.topk."""
    torch.manual_seed(0)
    model = mt.MiniTransformer(tiny_config())
    prompt = torch.zeros(1, 1, dtype=torch.long)
    greedy = [model.generate(prompt, 20, temperature=0, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    assert torch.equal(*greedy), "temperature 0 depends on the seed"
    top3 = model(prompt)[0][0, -1].topk(3).indices.tolist()
    for seed in range(30):
        token = model.generate(prompt, 1, temperature=2.0, top_k=3, generator=torch.Generator().manual_seed(seed))[0, 1]
        assert token.item() in top3, f"sampled token {token.item()} is outside the top 3 {top3}"
    out = model.generate(prompt, 5, top_k=1000)
    assert out.shape == (1, 6), "top_k larger than the vocabulary failed"
    logits = torch.tensor([[3.0, 1.0, 2.0]])
    for temperature in (1e-39, 1e-30):  # the logits divided by it overflow to inf, and the softmax gives NaN
        token = mt.sample_next(logits, temperature, generator=torch.Generator().manual_seed(0))
        assert token.item() == 0, f"temperature {temperature}: sampled {token.item()}, not the most likely token"
    near = torch.tensor([[5.0, -3.0, -3.0000002]]).expand(50000, 3)  # top_k 2 must never draw token 2
    drawn = mt.sample_next(near, 2.0, top_k=2, generator=torch.Generator().manual_seed(0))[:, 0].bincount(minlength=3).tolist()
    assert drawn[1] > 0 and drawn[2] == 0, f"top_k 2 of {near[0].tolist()}: drawn {drawn}"


def test_sampling_follows_the_softmax():
    """sample_next() draws tokens with other probabilities than the softmax of logits / temperature
    (the temperature applied twice or not at all, the rows of a batch mixed up): 40,000 draws must
    land within 5 standard errors of the expected frequencies."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -30.0]]).repeat(40_000, 1)
    draws = mt.sample_next(logits, 2.0, generator=torch.Generator().manual_seed(0)).flatten()
    expected = (logits[0] / 2.0).softmax(-1)
    freq = torch.bincount(draws, minlength=5).float() / len(draws)
    tolerance = 5 * (expected * (1 - expected) / len(draws)).sqrt() + 1e-4
    assert ((freq - expected).abs() <= tolerance).all(), f"frequencies {freq.tolist()}, expected {expected.tolist()}"


def test_kv_cache_generates_the_same_tokens():
    """SDPA's top-left causal mask with cached keys (one new query sees only key 0), or a wrong offset
    mask for several new tokens at once, makes cached generation differ from the plain one; and a full
    cache must be rebuilt so that generation goes on past block_size."""
    for attn in ("sdpa", "explicit"):
        torch.manual_seed(0)
        model = mt.MiniTransformer(tiny_config(attn=attn)).eval()
        idx = torch.randint(17, (2, 16))
        cache = [{} for _ in model.blocks]  # feed 5 tokens, then 4 at once (offset mask), then one by one
        pieces = [model(idx[:, :5], kv_cache=cache)[0], model(idx[:, 5:9], kv_cache=cache)[0]]
        pieces += [model(idx[:, t : t + 1], kv_cache=cache)[0] for t in range(9, 16)]
        diff = max_diff(torch.cat(pieces, dim=1), model(idx)[0])
        assert diff < 1e-5, f"{attn}: cached logits differ from a full forward by {diff:.2e}"
        assert cache[0]["len"] == 16, f"the cache holds {cache[0]['len']} positions, not 16"
        model.train()
        for n_prompt in (1, 15):
            prompt = torch.randint(17, (2, n_prompt))
            plain = model.generate(prompt, 16 - n_prompt, temperature=0, kv_cache=False)
            cached = model.generate(prompt, 16 - n_prompt, temperature=0, kv_cache=True)
            assert torch.equal(plain, cached), f"{attn}, prompt {n_prompt}: cached tokens differ from plain ones"
        long = model.generate(torch.zeros(1, 1, dtype=torch.long), 50, temperature=0)
        assert long.shape == (1, 51) and long.max() < 17, "generation past block_size failed"
        assert model.training, "generate() did not restore train mode"


def test_nucleus_sampling_stays_in_the_nucleus():
    """top_p drawing tokens outside the smallest set of likeliest tokens that holds top_p of the
    probability, or never drawing some of the tokens inside it."""
    torch.manual_seed(0)
    logits = torch.randn(1, 17) * 3
    probs = logits.softmax(-1)[0].sort(descending=True)
    n = int((probs.values.cumsum(0) < 0.7).sum()) + 1  # tokens needed to reach 0.7
    nucleus = set(probs.indices[:n].tolist())
    drawn = {mt.sample_next(logits, 1.0, 0, 0.7, torch.Generator().manual_seed(s)).item() for s in range(200)}
    assert drawn <= nucleus, f"sampled {drawn - nucleus} outside the nucleus {nucleus}"
    assert len(drawn) == len(nucleus) > 1, f"only {drawn} of the nucleus {nucleus} were ever drawn"


def test_nucleus_keeps_the_top_token_and_ties_at_its_edge():
    """A top_p of 0 or 1e-9 kept no token at all (NaN probabilities, or a draw from everything) instead
    of the most likely one; and of two tokens tied at the edge of the nucleus only the one that the
    sort happened to put first could ever be drawn."""
    torch.manual_seed(0)
    logits = torch.randn(3, 17) * 3
    for top_p in (0.0, 1e-9):
        for seed in range(5):
            got = mt.sample_next(logits, 1.0, 0, top_p, torch.Generator().manual_seed(seed))
            assert torch.equal(got, logits.argmax(-1, keepdim=True)), f"top_p={top_p} drew {got.flatten().tolist()}, not the argmax"
    tied = torch.tensor([[2.0, 1.0, 1.0, -1.0]]).repeat(4000, 1)  # probabilities 0.56, 0.21, 0.21, 0.03
    draws = mt.sample_next(tied, 1.0, 0, 0.6, torch.Generator().manual_seed(0)).flatten()  # 0.6 ends inside the tie
    counts = torch.bincount(draws, minlength=4).tolist()
    assert counts[3] == 0, f"a token outside the nucleus was drawn: counts {counts}"
    assert min(counts[1], counts[2]) > 0.7 * max(counts[1], counts[2]), f"the tied tokens are not drawn alike: counts {counts}"


# ----------------------------------------------------------------------------------------------------
# Training loop, checkpoints and resume


def test_resume_equals_the_straight_run():
    """A resume that does not restore the optimizers (AdamW, or AdamW and Muon), the step, the best val
    loss or the RNG states (dropout, batch order) replays other batches or masks; a run interrupted by
    Ctrl-C at step 10 and resumed must end with exactly the parameters of 20 steps run straight
    through, and its checkpoints must load with weights_only=True."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_corpus(tmp)
        mcfg = tiny_config(vocab_size=0, dropout=0.1)
        for optimizer in ("adamw", "muon"):
            runs = tmp / optimizer
            straight = quiet(mt.train, mcfg, tiny_train_config(tmp, optimizer=optimizer, out_dir=str(runs / "straight")))
            calls, real_step = [], mt.train_step

            def step_then_ctrl_c(*args):
                calls.append(1)
                if len(calls) == 10:  # a Ctrl-C arriving in the middle of step 9
                    signal.raise_signal(signal.SIGINT)
                return real_step(*args)

            interrupted = tiny_train_config(tmp, optimizer=optimizer, out_dir=str(runs / "cut"))
            with mock.patch.object(mt, "train_step", step_then_ctrl_c), ctrl_c_handled():
                code = exit_code(quiet, mt.train, mcfg, interrupted)
            assert code == 130, f"{optimizer}: a run stopped by Ctrl-C ended with {code}, not exit 130"
            ckpt = torch.load(runs / "cut" / "ckpt.pt", weights_only=True)
            assert ckpt["step"] == 10, f"{optimizer}: the interrupted run saved step {ckpt['step']}, expected 10"
            assert isinstance(ckpt["optimizer"], list) and len(ckpt["optimizer"]) == (2 if optimizer == "muon" else 1), \
                f"{optimizer}: the checkpoint holds {type(ckpt['optimizer']).__name__} as its optimizer state"
            resumed = quiet(mt.train, mt.TransformerConfig(**ckpt["model_config"]), replace(interrupted, resume=True), ckpt)
            a = torch.load(runs / "straight" / "ckpt.pt", weights_only=True)["model"]
            b = torch.load(runs / "cut" / "ckpt.pt", weights_only=True)["model"]
            for name in a:
                assert torch.equal(a[name], b[name]), f"{optimizer}: {name} differs after resume by {max_diff(a[name], b[name]):.2e}"
            assert resumed["val_loss"] == straight["val_loss"], f"{optimizer}: the final val loss differs after resume"


def test_a_plain_resume_keeps_the_runs_settings_and_typed_flags_win():
    """A plain --resume went on with the defaults instead of the saved run's settings (a run with
    --weight_decay 0.3 --batch_size 8 lost both, its optimizer too), a typed --warmup_steps was replaced by
    the saved one, the saved out_dir or device replaced this launch's, or a typed flag that does not
    fit the saved run ended as "another version" instead of one CLI error."""
    saved = mt.TrainConfig(max_steps=500, warmup_steps=20, weight_decay=0.3, batch_size=8, out_dir="old", device="cuda:7", precision="bf16")
    ckpt = {"train_config": {**asdict(saved), "a_field_of_a_newer_version": 1}}
    now = mt.TrainConfig(out_dir="here", resume=True)
    plain = plumbing.resumed_config(now, ckpt, {"resume": True, "out_dir": "here"})
    assert (plain.weight_decay, plain.batch_size, plain.max_steps, plain.warmup_steps, plain.precision) == (0.3, 8, 500, 20, "bf16"), \
        f"a plain resume: {plain}"
    assert (plain.out_dir, plain.device, plain.resume) == ("here", "auto", True), f"this launch's out_dir or device replaced: {plain}"
    typed = plumbing.resumed_config(replace(now, learning_rate=1e-3, warmup_steps=50), ckpt,
                                    {"resume": True, "learning_rate": 1e-3, "warmup_steps": 50})
    assert (typed.learning_rate, typed.warmup_steps, typed.max_steps) == (1e-3, 50, 500), f"flags typed with --resume: {typed}"
    longer = plumbing.resumed_config(replace(now, max_steps=2000), ckpt, {"resume": True, "max_steps": 2000})
    assert (longer.max_steps, longer.warmup()) == (2000, 100), f"--max_steps 2000 on resume: {longer}"
    with tempfile.TemporaryDirectory() as tmp:
        cfg = tiny_config()
        torch.save({"model": mt.MiniTransformer(cfg).state_dict(), "model_config": asdict(cfg), "train_config": asdict(saved)},
                   Path(tmp) / "ckpt.pt")
        (_, tcfg), given, parser = plumbing.parse_config(mt.TransformerConfig(), mt.TrainConfig(),
                                                         argv=["--out_dir", tmp, "--resume", "--warmup_steps", "600"])
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = exit_code(plumbing.checkpoint_and_config, tcfg, "model_config", mt.TransformerConfig, given, parser)
    assert code == 2 and "warmup_steps (600) must be below max_steps (500)" in err.getvalue() and err.getvalue().count("\n") == 1, \
        f"a warmup past the saved run's end: exit {code}, {err.getvalue()!r}"


def test_resume_applies_changed_optimizer_flags():
    """On --resume the optimizers' load_state_dict brought back the saved learning rates, weight decay
    and betas, so a changed --learning_rate, --muon_lr, --weight_decay or --beta2 was silently ignored
    while the progress line and config.json showed the new values. The moments must still come back."""
    torch.manual_seed(0)
    model, old = mt.MiniTransformer(tiny_config()), mt.TrainConfig(max_steps=10, optimizer="muon")
    optimizers = mt.make_optimizer(model, old)
    mt.train_step(model, optimizers, (torch.randint(17, (4, 16)), torch.randint(17, (4, 16))))
    state = plumbing.training_state(model, optimizers, old, 1, 2.0, torch.Generator(), {})
    new = replace(old, learning_rate=1e-3, muon_lr=0.01, weight_decay=0.0, beta2=0.95)
    adamw, muon = mt.make_optimizer(model, new)
    plumbing.restore_state(state, model, [adamw, muon], torch.Generator(), new)
    peaks = [g["peak_lr"] for g in adamw.param_groups + muon.param_groups]
    assert peaks == [1e-3, 1e-3, 0.01], f"peak learning rates after resume: {peaks}, not the flags' 1e-3, 1e-3, 0.01"
    assert all(g["weight_decay"] == 0.0 for g in adamw.param_groups + muon.param_groups), "a changed --weight_decay was ignored"
    assert all(g["betas"] == (0.9, 0.95) for g in adamw.param_groups), "a changed --beta2 was ignored"
    saved, got = state["optimizer"][0]["state"], adamw.state_dict()["state"]
    assert saved.keys() == got.keys() and all(torch.equal(saved[k]["exp_avg"], got[k]["exp_avg"]) for k in saved), \
        "the AdamW moments were not restored"


def exit_code(fn, *args, **kw):
    """The exit code (or message) with which fn(*args, **kw) ends the program; fails if it returns."""
    try:
        fn(*args, **kw)
    except SystemExit as e:
        return e.code
    raise AssertionError(f"{getattr(fn, '__name__', fn)} returned instead of exiting")


def test_checkpoints_load_with_weights_only_and_no_prefixes():
    """Checkpoints holding objects that weights_only=True refuses, compile/DDP prefixes on the keys,
    the causal mask buffer, a best val loss that is the last instead of the lowest, or a log.jsonl
    whose train and eval records lack their fields."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_corpus(tmp)
        result = quiet(mt.train, tiny_config(vocab_size=0), tiny_train_config(tmp))
        out = tmp / "out"
        for name in ("ckpt.pt", "best.pt"):
            ckpt = torch.load(out / name, weights_only=True)
            assert not any(k.startswith(("_orig_mod.", "module.")) for k in ckpt["model"]), f"{name} has prefixes"
            model = mt.MiniTransformer(mt.TransformerConfig(**ckpt["model_config"]))
            model.load_state_dict(ckpt["model"])
        assert "mask" not in "".join(ckpt["model"]), "the causal mask buffer was saved"
        log = [json.loads(line) for line in (out / "log.jsonl").read_text(encoding="utf-8").splitlines()]
        evals, steps = [r for r in log if r["kind"] == "eval"], [r for r in log if r["kind"] == "train"]
        assert [r["step"] for r in evals] == [0, 10, 20], f"evals at steps {[r['step'] for r in evals]}"
        assert [r["step"] for r in steps] == [5, 10, 15, 20], f"train records at steps {[r['step'] for r in steps]}"
        assert all({"loss", "lr", "ms_per_step", "seen", "elapsed_s"} <= set(r) for r in steps), f"train record {steps[0]}"
        assert all({"train_loss", "val_loss", "best_val_loss", "eval_s", "elapsed_s"} <= set(r) for r in evals), f"eval record {evals[0]}"
        assert steps[-1]["seen"] == 20 * 8 * 16, f"tokens seen by step 20: {steps[-1]['seen']}"
        assert result["best_val_loss"] == min(r["val_loss"] for r in evals), "best val is not the minimum"
        saved = json.loads((out / "config.json").read_text(encoding="utf-8"))
        assert saved["model_config"]["vocab_size"] == len(set(TEXT)) and "train_config" in saved, "config.json lacks the resolved vocab_size"


def test_interrupted_checkpoint_write_keeps_the_old_file():
    """A crash or Ctrl-C in the middle of torch.save damaged the previous checkpoint (written in place),
    a truncated checkpoint loaded into a traceback, and a full disk ended in a traceback or left the
    half-written temporary file behind, filling the disk further."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ckpt.pt"
        plumbing.save_checkpoint(path, {"step": 1, "w": torch.ones(3)})

        def crashing_save(obj, f):
            f.write(b"PK\x03\x04 half a file")
            raise KeyboardInterrupt

        with mock.patch.object(torch, "save", crashing_save), contextlib.suppress(KeyboardInterrupt):
            plumbing.save_checkpoint(path, {"step": 2, "w": torch.zeros(3)})
        assert plumbing.load_checkpoint(path)["step"] == 1, "the previous checkpoint was damaged"
        Path(f"{path}.tmp").replace(path)  # now a truncated checkpoint: a clean error, not a traceback
        assert "not a readable checkpoint" in exit_line(plumbing.load_checkpoint, path), "a truncated checkpoint: unclear message"
        plumbing.save_checkpoint(path, {"step": 3, "w": torch.ones(3)})

        def full_disk_save(obj, f):  # what torch.save may raise when the disk fills up mid-write
            f.write(b"PK\x03\x04 half a file")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

        with mock.patch.object(torch, "save", full_disk_save):
            message = exit_line(plumbing.save_checkpoint, path, {"step": 4, "w": torch.zeros(3)})
        assert "cannot write" in message and "unchanged" in message, f"a failed torch.save: {message!r}"
        assert plumbing.load_checkpoint(path)["step"] == 3 and not os.path.lexists(f"{path}.tmp"), "the old file or the disk space was lost"
        if Path("/dev/full").exists():  # a real full disk: every write to /dev/full fails with ENOSPC
            Path(f"{path}.tmp").symlink_to("/dev/full")
            message = exit_line(plumbing.save_checkpoint, path, {"step": 5, "w": torch.zeros(10_000)})
            assert "No space left on device" in message, f"a full disk: {message!r}"
            assert plumbing.load_checkpoint(path)["step"] == 3 and not os.path.lexists(f"{path}.tmp"), "the old file or the temporary one"


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint():
    """A NaN loss went on training (and saved NaN weights over the last good checkpoint) instead of
    stopping with a message."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_corpus(tmp)
        real_step = mt.train_step

        def poisoned_step(model, *args):  # from the first step on, the model outputs NaN
            with torch.no_grad():
                next(model.parameters()).fill_(float("nan"))
            return real_step(model, *args)

        with mock.patch.object(mt, "train_step", poisoned_step):
            message = exit_line(mt.train, tiny_config(vocab_size=0), tiny_train_config(tmp, max_steps=10))
        assert "nan" in message and "ckpt.pt" in message, f"unclear message: {message}"
        ckpt = plumbing.load_checkpoint(tmp / "out" / "ckpt.pt")
        assert ckpt["step"] == 0, f"ckpt.pt is from step {ckpt['step']}, expected the good step 0"
        assert all(torch.isfinite(t).all() for t in ckpt["model"].values()), "NaN weights were saved"


def test_stop_flag_leaves_an_ignored_sigint_ignored():
    """A run started in the background by a shell script (SIGINT ignored, as the shell sets it) was
    stopped by a Ctrl-C meant for the foreground job, because stop_flag() put its handler over the
    ignored SIGINT; kill (SIGTERM) must still be caught, and the handlers restored afterwards."""
    previous, on_term = signal.signal(signal.SIGINT, signal.SIG_IGN), signal.getsignal(signal.SIGTERM)
    try:
        with plumbing.stop_flag() as interrupted:
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN, "stop_flag() replaced an ignored SIGINT"
            signal.raise_signal(signal.SIGINT)
            assert not interrupted, "an ignored SIGINT stopped the run"
            signal.raise_signal(signal.SIGTERM)
            assert [s for _, s in interrupted] == [signal.SIGTERM], f"SIGTERM was not caught: {interrupted}"
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN, "SIGINT is not ignored after the block"
        assert signal.getsignal(signal.SIGTERM) is on_term, "the SIGTERM handler was not restored"
    finally:
        signal.signal(signal.SIGINT, previous)


def tiny_checkpoint_run(tmp):
    """A 2-step run on the synthetic corpus in tmp/data; returns its ckpt.pt as a dict."""
    quiet(mt.train, tiny_config(vocab_size=0), tiny_train_config(tmp, max_steps=2, warmup_steps=0, eval_interval=2, optimizer="adamw"))
    return torch.load(tmp / "out" / "ckpt.pt", weights_only=True)


def test_mistakes_and_failures_end_in_one_line():
    """A folder in the way of log.jsonl, ckpt.pt or best.pt, a write without permission (reported as a
    full disk), a checkpoint from another version or stripped of its weights or training state, a
    resume with another optimizer, nan or out-of-range flags, a meta.json whose vocab is not a
    string, and .bin files that meta.json does not describe ended in a traceback, a wrong reason or
    a run on bad data, instead of one line saying what is wrong."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # files that cannot be written
        (tmp / "log.jsonl").mkdir()
        message = exit_line(plumbing.write_file, tmp / "log.jsonl", "{}\n", mode="a")
        assert "cannot write" in message and "Is a directory" in message, f"log.jsonl a folder: {message!r}"
        for name in ("ckpt.pt", "best.pt", "tmp_in_the_way/ckpt.pt"):
            path = tmp / name
            (tmp / (f"{name}.tmp" if "tmp_" in name else name)).mkdir(parents=True)
            message = exit_line(plumbing.save_checkpoint, path, {"step": 1})
            assert "cannot write" in message and "Is a directory" in message, f"{name} blocked by a folder: {message!r}"
            assert not Path(f"{path}.tmp").is_file(), f"{name}: a temporary file was left behind"
        with mock.patch.object(plumbing, "open", create=True, side_effect=PermissionError(13, "Permission denied")):
            message = exit_line(plumbing.save_checkpoint, tmp / "locked" / "ckpt.pt", {"step": 1})
        assert "Permission denied" in message and "disk" not in message, f"no permission: {message!r}"
        # checkpoints from another version, stripped ones, another optimizer's
        write_corpus(tmp)
        good = tiny_checkpoint_run(tmp)
        variants = {"newer": ("best.pt", {**good, "model_config": {**good["model_config"], "rope_theta": 10000.0}}, "another version"),
                    "no_model": ("best.pt", {k: v for k, v in good.items() if k != "model"}, "not a mini_transformer.py checkpoint"),
                    "stripped": ("ckpt.pt", {k: good[k] for k in ("model", "model_config", "vocab")}, "cannot resume"),
                    "adamw": ("ckpt.pt", good, "not --optimizer muon")}
        for folder, (name, ckpt, words) in variants.items():
            (tmp / folder).mkdir()
            torch.save(ckpt, tmp / folder / name)
            flags = ["--eval_only"] if name == "best.pt" else ["--resume", "--optimizer", "muon" if folder == "adamw" else "adamw"]
            code, _, err = main_here(mt, *flags, "--out_dir", tmp / folder, "--data_dir", tmp / "data", "--precision", "fp32")
            message = one_line(code, err)
            assert words in message, f"{folder} checkpoint: expected {words!r} in {message!r}"
        # flags
        for argv, words in [(("--grad_clip", "nan"), "grad_clip"), (("--weight_decay", "nan"), "weight_decay"),
                            (("--learning_rate", "inf"), "learning_rate"), (("--seed", "99999999999999999999"), "seed"),
                            (("--seed", "-1"), "seed")]:
            _, code, err = parse(*argv)
            assert code == 2 and words in err and err.count("\n") == 1, f"{argv}: exit {code}, stderr {err!r}"
        # data that does not match its meta.json
        data = tmp / "tokens"
        data.mkdir()
        bins = {f"{s}.bin": (np.arange(n) % 3).astype(np.uint16).tobytes() for s, n in (("train", 200), ("val", 50))}
        record = {name: {"bytes": len(b), "sha256": hashlib.sha256(b).hexdigest()} for name, b in bins.items()}
        for name, b in bins.items():
            (data / name).write_bytes(b)
        meta = data / "meta.json"
        meta.write_text(json.dumps({"vocab": "abc", "files": record}), encoding="utf-8")
        assert mt.load_data(data, CPU)[1] == "abc", "a dataset that matches its meta.json was refused"
        meta.write_text(json.dumps({"vocab": ["a", "b", "c"], "files": record}), encoding="utf-8")
        message = exit_line(mt.load_data, data, CPU)
        assert "damaged" in message and "vocab" in message, f"a vocab that is a list: {message!r}"
        meta.write_text(json.dumps({"vocab": "abc", "files": record}), encoding="utf-8")
        (data / "train.bin").write_bytes(bins["train.bin"][2:] + bins["train.bin"][:2])  # same size, other tokens
        message = exit_line(mt.load_data, data, CPU)
        assert "damaged" in message and "train.bin" in message, f"a train.bin that meta.json does not describe: {message!r}"


def test_a_second_run_does_not_overwrite_the_first():
    """A fresh run into an out_dir that holds another run's checkpoints overwrote them and added to
    its log, instead of stopping with one line naming --resume and --overwrite and touching nothing;
    --overwrite must start afresh with a new log; two runs into one folder at once must be stopped by
    a lock naming the first one's PID, and a lock left by a killed run (kill -9) must not block the
    folder for ever."""
    holder = "import sys, time\nimport mini_transformer as mt, plumbing\n" \
             "with plumbing.claim_out_dir(mt.TrainConfig(out_dir=sys.argv[1])):\n    print('locked', flush=True)\n    time.sleep(120)\n"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        with child("-c", holder, tmp / "busy", cwd=HERE) as other:  # it imports torch while the first part runs
            write_corpus(tmp)
            args = [*TINY_FLAGS, *TINY_RUN, "--data_dir", tmp / "data", "--out_dir", tmp / "out"]
            code, out, err = main_here(mt, *args, "--max_steps", "6")
            assert code == 0, f"the first run failed: {code} {err}"

            def state():
                return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in (tmp / "out").iterdir() if p.name != "lock"}

            before = state()
            assert {"ckpt.pt", "best.pt", "config.json", "log.jsonl"} <= set(before), f"the first run wrote {sorted(before)}"
            code, _, err = main_here(mt, *args, "--max_steps", "4")
            message = one_line(code, err)
            assert "--resume" in message and "--overwrite" in message, f"a second fresh run: {message!r}"
            assert state() == before, "the refused run changed the folder"
            code, _, err = main_here(mt, *args, "--max_steps", "4", "--overwrite")
            assert code == 0, f"--overwrite failed: {code} {err}"
            log = [json.loads(line) for line in (tmp / "out" / "log.jsonl").read_text(encoding="utf-8").splitlines()]
            assert [r["step"] for r in log if r["kind"] == "eval"] == [0, 4], f"--overwrite kept the old log: {log}"
            assert other.stdout.readline() == "locked\n", f"the lock holder failed: {other.stderr.read()}"
            message = exit_line(plumbing.claim_out_dir, mt.TrainConfig(out_dir=str(tmp / "busy")))
            assert f"PID {other.pid}" in message, f"a second run into a busy folder: {message!r}"
            other.kill()  # kill -9: no clean-up in the holder
            other.wait()
        with plumbing.claim_out_dir(mt.TrainConfig(out_dir=str(tmp / "busy"))):
            pid = (tmp / "busy" / "lock").read_text().strip()
        assert pid == str(os.getpid()), f"the lock of a killed run was not taken over (it names {pid})"


# ----------------------------------------------------------------------------------------------------
# Command line


def parse(*argv, configs=None):
    """parse_config on the LM's configs (or the given ones); returns (configs, exit code, stderr)."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            cfgs, _, _ = plumbing.parse_config(*(configs or (mt.TransformerConfig(), mt.TrainConfig())), argv=list(argv))
        return cfgs, 0, ""
    except SystemExit as e:
        return None, e.code, err.getvalue()


def test_cli_flags_bools_and_errors():
    """argparse's type=bool turning "False" into True, misspelt flags accepted, values not typed from
    the defaults, bad combinations ending in a traceback or argparse's usage block instead of one
    line with exit 2 that names the flag at fault and its value, or --help without the groups and the
    fields' comments; a config field of any script defaulting to None (no type for its flag) or lacking
    the comment that is its help."""
    (m, t), code, _ = parse("--n_layers", "6", "--bias", "--learning_rate", "1e-3", "--ffn", "swiglu", "--compile")
    assert code == 0 and (m.n_layers, m.bias, m.ffn, t.learning_rate, t.compile) == (6, True, "swiglu", 1e-3, True)
    (m, t), code, _ = parse("--no-bias", "--no-compile")
    assert (m.bias, t.compile) == (False, False), "--no-flag did not turn the bool off"
    for argv, words in [(("--n_layers", "two"), "invalid int"), (("--d_model", "100", "--n_heads", "3"), "divisible"),
                        (("--warmup_steps", "50", "--max_steps", "50"), "warmup_steps"), (("--bias", "False"), "unrecognized"),
                        (("--ffn", "gelu"), "ffn"), (("--nlayers", "2"), "unrecognized"), (("--batch_size", "6", "--grad_accum", "4"), "divide"),
                        (("--beta2", "1.5"), "beta2"), (("--weight_decay", "-0.1"), "weight_decay"), (("--eval_batches", "0"), "eval_batches"),
                        (("--optimizer", "sgd"), "optimizer"), (("--precision", "fp16"), "precision"),
                        (("--time_budget", "0"), "time_budget"), (("--max_steps", "-3"), "max_steps must be >= 0"),
                        (("--warmup_steps", "-5"), "warmup_steps must be >= -1 (-1: a tenth of max_steps, at most 100), got -5"), (("--seed", "-1"), "seed must be in [0, 2**63), got -1"),
                        (("--min_lr", "1"), "min_lr (1.0) <= learning_rate (0.003)")]:
        _, code, err = parse(*argv)
        assert code == 2, f"{argv}: exit code {code}, expected 2"
        assert words in err and err.count("\n") == 1, f"{argv}: expected one line mentioning {words!r}, got {err!r}"
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        plumbing.parse_config(mt.TransformerConfig(), mt.TrainConfig(), argv=["--help"])
    assert "TransformerConfig" in out.getvalue() and "--no-bias" in out.getvalue(), "--help lacks groups or bools"
    assert "context length T in tokens" in out.getvalue(), "--help lacks the fields' comments"
    configs = (mt.TransformerConfig, mt.TrainConfig, vit.ViTConfig, vit.PredictConfig, sample.SampleConfig, bench.BenchConfig,
               plot.PlotConfig, pm.MnistConfig, ps.PrepareConfig)
    for cls in configs:  # every field a flag: a plain typed default (never None) and a comment for its help
        comments = plumbing.field_comments(cls)
        for f in fields(cls):
            assert type(f.default) in (bool, int, float, str) and comments.get(f.name), f"{cls.__name__}.{f.name}: {f.default!r}, no comment"


def test_max_steps_alone_shrinks_the_warmup():
    """--max_steps 40 alone was refused because the default warmup (100 steps) is longer, while an
    explicit --warmup_steps 100 with --max_steps 40 was accepted: a run that never leaves its warmup."""
    cfgs, code, err = parse("--max_steps", "40")
    assert code == 0, f"--max_steps 40 alone was refused: {err!r}"
    assert cfgs[1].warmup() == 4, f"the warmup of a 40-step run is {cfgs[1].warmup()}, not a tenth"
    cfgs, code, _ = parse("--max_steps", "40", "--warmup_steps", "0")
    assert code == 0 and cfgs[1].warmup() == 0, "an explicit --warmup_steps 0 was not kept"
    _, code, err = parse("--warmup_steps", "100", "--max_steps", "40")
    assert code == 2 and "warmup_steps" in err and err.count("\n") == 1, f"--warmup_steps 100 --max_steps 40: {code} {err!r}"


# ----------------------------------------------------------------------------------------------------
# Data preparation against a local HTTP server


@contextlib.contextmanager
def http_server(folder):
    """Serve folder on 127.0.0.1 (a free port) in a thread; yields the base URL."""
    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_prepare_downloads_verifies_and_rejects_bad_input():
    """A download written out whatever it holds (an HTTP error, an HTML page, a wrong checksum, text
    that is not UTF-8, a vocabulary too large for uint16), partial output left behind, a vocabulary
    built from the training split only, or a split that is not 90/10."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        site = tmp / "site"
        site.mkdir()
        (site / "input.txt").write_text(TEXT, encoding="utf-8")
        (site / "page.html").write_text("<!DOCTYPE html><html>Rate limited</html>", encoding="utf-8")
        (site / "latin1.txt").write_bytes("caf\xe9".encode("latin-1") * 10)
        (site / "empty.txt").write_bytes(b"")
        (site / "huge_vocab.txt").write_text("".join(chr(c) for c in range(0x10000, 0x10000 + 65537)), encoding="utf-8")
        sha = hashlib.sha256(TEXT.encode("utf-8")).hexdigest()
        with http_server(site) as url:
            stats = ps.prepare(f"{url}/input.txt", str(tmp / "ok"), sha256=sha)
            bad = [(f"{url}/missing.txt", "", "404"), (f"{url}/page.html", "", "HTML"),
                   (f"{url}/input.txt", "0" * 64, "checksum"), (f"{url}/latin1.txt", "", "UTF-8"),
                   (str(site / "empty.txt"), "", "too short"), (str(site / "nothing.txt"), "", "cannot read"),
                   (f"{url}/huge_vocab.txt", "", "uint16"), ("http://127.0.0.1:9/input.txt", "", "cannot download")]
            for source, checksum, words in bad:
                try:
                    ps.prepare(source, str(tmp / "bad"), sha256=checksum)
                    raise AssertionError(f"{source} was accepted")
                except ps.DataError as e:
                    assert words in str(e), f"{source}: expected {words!r} in {e}"
                assert not (tmp / "bad").exists(), f"{source} left partial output"
            (tmp / "a_file").write_text("not a folder", encoding="utf-8")
            try:
                ps.prepare(str(site / "input.txt"), str(tmp / "a_file"))
                raise AssertionError("a file as --data_dir was accepted")
            except ps.DataError as e:
                assert "not a folder" in str(e), f"--data_dir that is a file: {e}"
        meta = json.loads((tmp / "ok" / "meta.json").read_text(encoding="utf-8"))
        train = np.fromfile(tmp / "ok" / "train.bin", dtype=np.uint16)
        val = np.fromfile(tmp / "ok" / "val.bin", dtype=np.uint16)
        assert meta["vocab"] == "".join(sorted(set(TEXT))) and meta["vocab_size"] == stats["vocab_size"]
        assert len(train) == int(len(TEXT) * 0.9) and len(train) + len(val) == len(TEXT), "not a 90/10 split"
        decoded = "".join(meta["vocab"][i] for i in np.concatenate([train, val]))
        assert decoded == TEXT, "the token files do not decode back to the text"


# ----------------------------------------------------------------------------------------------------
# The scripts as a user runs them


def run_script(*args, cwd):
    """Run python with args to the end (killed after 120 s): a CompletedProcess with text output."""
    env = {**os.environ, "PYTHONWARNINGS": "always"}
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=120,
                          preexec_fn=default_sigint)


def run_scripts(calls, cwd):
    """run_script() for each argument list in calls, as many at a time as there are cores: most of a
    short run is Python importing torch (about 3 s), and independent runs need not wait for each other."""
    with ThreadPoolExecutor(os.cpu_count() or 2) as pool:
        return list(pool.map(lambda args: run_script(*args, cwd=cwd), calls))


def test_command_line_runs_cleanly():
    """prepare, train (with the precision race), resume and --eval_only from the command line on the
    CPU printed warnings or lost their progress and total-time lines, and user mistakes (a shape flag
    that contradicts the checkpoint, missing or damaged data, an unknown device, a file as --out_dir,
    a resume past --max_steps) ended in a traceback instead of one line."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "corpus.txt").write_text(TEXT, encoding="utf-8")
        prep = run_script(HERE / "prepare_shakespeare.py", "--source", "corpus.txt", "--data_dir", "data", cwd=tmp)
        assert prep.returncode == 0 and prep.stderr == "", f"prepare failed: {prep.stderr}"
        small = ["--data_dir", "data", "--n_layers", "1", "--d_model", "32", "--block_size", "16", "--batch_size", "4",
                 "--eval_interval", "5", "--log_interval", "5", "--warmup_steps", "2", "--sample_chars", "20", "--device", "cpu"]
        first = run_script(HERE / "mini_transformer.py", *small, "--max_steps", "10", cwd=tmp)
        assert first.returncode == 0 and first.stderr == "", f"training failed or warned: {first.stderr}"
        assert "bf16 matmuls measured" in first.stdout, f"no precision race on the CPU: {first.stdout}"
        assert "step 10/10 | loss" in first.stdout and "ms/step" in first.stdout and re.search(r"\| eta \d+m[0-5]\ds\n", first.stdout), first.stdout
        more, ev, offline = run_scripts([[HERE / "mini_transformer.py", *small, "--max_steps", "15", "--resume"],
                                         [HERE / "mini_transformer.py", "--eval_only", "--data_dir", "data"],
                                         [HERE / "prepare_shakespeare.py", "--source", "http://127.0.0.1:9/x.txt"]], cwd=tmp)
        assert more.returncode == 0 and more.stderr == "" and "step 15 | train" in more.stdout, f"resume failed: {more.stderr}"
        assert re.search(r"trained steps 10 to 15; \d+m[0-5]\ds since launch", more.stdout), f"no total time: {more.stdout}"
        assert ev.returncode == 0 and ev.stderr == "" and "val ppl" in ev.stdout, f"--eval_only failed: {ev.stderr}"
        assert offline.returncode == 1 and offline.stderr.count("\n") == 1, f"not one line: {offline.stderr}"
        (tmp / "vit").mkdir()
        torch.save({"vit_config": {"patch_size": 7}, "model": {}}, tmp / "vit" / "best.pt")  # another script's checkpoint
        (tmp / "damaged").mkdir()
        for name in ("meta.json", "train.bin", "val.bin"):  # val.bin cut in the middle of a token id
            data = (tmp / "data" / name).read_bytes()
            (tmp / "damaged" / name).write_bytes(data[:-1] if name == "val.bin" else data)
        cases = [(["--resume", "--d_model", "64", "--out_dir", tmp / "out"], "d_model"),
                 (["--data_dir", tmp / "nowhere", "--out_dir", tmp / "o1"], "prepare_shakespeare.py"),
                 (["--device", "tpu", "--out_dir", tmp / "o2"], "device"), (["--eval_only", "--out_dir", tmp / "none"], "not found"),
                 (["--eval_only", "--out_dir", tmp / "vit"], "not a mini_transformer.py checkpoint"),
                 (["--data_dir", tmp / "data", "--out_dir", tmp / "corpus.txt"], "cannot write to"),
                 (["--data_dir", tmp / "damaged", "--out_dir", tmp / "o3"], "is damaged"),
                 (["--resume", "--data_dir", tmp / "data", "--out_dir", tmp / "out", "--max_steps", "12", "--warmup_steps", "2"],
                  "past --max_steps 12")]
        for args, words in cases:  # in this process: the same main(), without a second of importing torch each
            code, _, err = main_here(mt, *args)
            message = one_line(code, err)
            assert words in message, f"{args}: expected {words!r} in {message!r}"


def test_progress_reaches_a_pipe_and_ctrl_c_prints_a_working_resume_command():
    """Progress lines sat in stdout's block buffer when stdout is a pipe (tee, a log collector), so
    that nothing showed until the run ended; and the command printed after a Ctrl-C dropped the folder
    of the script as typed (python /path/to/mini_transformer.py became python mini_transformer.py), so
    that it failed when run where the first command was."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_corpus(tmp)
        script = HERE / "mini_transformer.py"  # typed with its folder, from another working directory
        args = ["--data_dir", "data", "--out_dir", "out", "--n_layers", "2", "--d_model", "64", "--d_ff", "256", "--block_size", "64",
                "--batch_size", "8", "--max_steps", "1000", "--log_interval", "10", "--eval_interval", "1000", "--warmup_steps", "10",
                "--sample_chars", "0", "--precision", "fp32", "--device", "cpu"]
        env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # the script must flush by itself
        with child(script, *args, cwd=tmp, env=env) as run:
            lines = []
            while not (lines and lines[-1].startswith("step 10/1000 |")):
                lines.append(run.stdout.readline())
                assert lines[-1], f"the run ended before its first progress line came through the pipe: {run.stderr.read()}"
            assert run.poll() is None, "the first progress line arrived only as the run ended"
            run.send_signal(signal.SIGINT)
            out, err = run.communicate(timeout=60)
        assert run.returncode == 130 and err == "", f"Ctrl-C: exit {run.returncode}, stderr {err!r}"
        saved = re.search(r"interrupted: saved step (\d+) to out/ckpt.pt; continue with:\n  (.*)\n", out)
        assert saved, f"no resume command after Ctrl-C: {out!r}"
        step = int(saved.group(1))  # a block buffer of 8 kB holds the progress lines of several hundred steps
        assert step < 500, f"the line of step 10 came through the pipe only at step {step}"
        command = shlex.split(saved.group(2))
        assert command == ["python", str(script), *args, "--resume"], f"the resume command is not the one typed: {command}"
        resumed = run_script(*command[1:], "--max_steps", str(step + 2), cwd=tmp)  # the same command, two more steps
        assert resumed.returncode == 0 and f"trained steps {step} to {step + 2};" in resumed.stdout, f"the command failed: {resumed.stderr}"


def test_sample_script_prompts_errors_and_interactive_loop():
    """sample.py failing to stream from a checkpoint, greedy output depending on the seed or the cache,
    bad input (an unknown character, top_p 0, a negative temperature, an empty prompt file, a foreign
    checkpoint) ending in a traceback, or the interactive loop not stopping at quit; a Ctrl-C must end
    it with one line and exit 130."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_corpus(tmp)
        quiet(mt.train, tiny_config(vocab_size=0), tiny_train_config(tmp, max_steps=10))
        ckpt = ["--out_dir", str(tmp / "out"), "--device", "cpu"]
        (tmp / "empty.txt").write_text("", encoding="utf-8")
        cases = [(["--prompt", "xyz\u00e9"], "'\u00e9'"), (["--top_p", "0"], "top_p"), (["--temperature", "-1"], "temperature"),
                 (["--max_new_tokens", "0"], "max_new_tokens"), (["--prompt_file", "empty.txt"], "empty"),
                 (["--ckpt", "corpus.txt"], "not a readable checkpoint"), (["--out_dir", "none"], "mini_transformer.py")]
        greedy = [[HERE / "sample.py", *ckpt, "--prompt", "the", "--temperature", "0", "--max_new_tokens", "13", "--seed", seed, *cache]
                  for seed, cache in (("1", []), ("2", ["--no-kv_cache"]))]
        three = [HERE / "sample.py", *ckpt, "--num_samples", "3", "--max_new_tokens", "10", "--top_k", "100"]
        cached, plain, three, *bad_runs = run_scripts([*greedy, three, *([HERE / "sample.py", *ckpt, *args] for args, _ in cases)], cwd=tmp)
        assert cached.returncode == 0 and "chars/s" in cached.stderr, f"sample.py failed: {cached.stderr}"
        # within block_size (3 + 13 = 16) greedy output is the same with and without the cache, for any seed
        assert cached.stdout == plain.stdout and len(cached.stdout) == 3 + 13 + 1, "greedy output varies"
        assert three.returncode == 0 and three.stdout.count("-" * 40) == 2, f"three samples: {three.stdout!r}"
        for (args, words), bad in zip(cases, bad_runs):
            assert bad.returncode != 0 and words in bad.stderr, f"{args}: {bad.stderr}"
            assert "Traceback" not in bad.stderr and bad.stderr.count("\n") == 1, f"{args}: not one line: {bad.stderr}"
        session = "temp 0\nlen 7\ntemp hot\nthe cat\nno \u00e9\nquit\nthe dog\n"
        loop = subprocess.run([sys.executable, HERE / "sample.py", *ckpt, "--interactive"], input=session, cwd=tmp,
                              capture_output=True, text=True, timeout=60, preexec_fn=default_sigint)
        assert loop.returncode == 0, f"interactive loop failed: {loop.stderr}"
        assert "temperature = 0.0" in loop.stdout and "max_new_tokens = 7" in loop.stdout, loop.stdout
        assert loop.stdout.count("hint:") == 2, f"expected hints for 'temp hot' and the unknown character: {loop.stdout}"
        assert loop.stdout.count("> ") == 6, f"the loop did not stop at quit: {loop.stdout!r}"
        with child(HERE / "sample.py", *ckpt, "--max_new_tokens", "10000000", cwd=tmp) as long:
            long.stdout.read(20)  # generation has started
            long.send_signal(signal.SIGINT)
            _, err = long.communicate(timeout=60)
        assert long.returncode == 130 and err.strip() == "interrupted", f"Ctrl-C while sampling: {long.returncode} {err!r}"


def test_sample_handles_padded_and_newline_free_vocabularies():
    """Generation drew ids of a table padded beyond the vocabulary (--vocab_size), so sample.py and the
    sample after training failed with an IndexError; and with a vocabulary that has no newline, sample.py
    refused its own default prompt and every line typed in --interactive (each ends with a newline)."""
    torch.manual_seed(0)
    model, prompt, vocab = mt.MiniTransformer(tiny_config(vocab_size=64)), torch.zeros(1, 1, dtype=torch.long), "abcdefghijklmnopq"
    assert model.generate(prompt, 100, temperature=2.0).max() >= len(vocab), "without a limit, padded ids should come up here"
    for kv_cache in (True, False):
        ids = model.generate(prompt, 100, temperature=2.0, kv_cache=kv_cache, vocab_limit=len(vocab))
        assert ids.max() < len(vocab), f"kv_cache={kv_cache}: sampled id {ids.max().item()}, beyond the {len(vocab)} characters"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "best.pt"
        torch.save({"model": model.state_dict(), "model_config": asdict(model.cfg), "vocab": vocab}, path)
        argv = ["sample.py", "--ckpt", str(path), "--device", "cpu", "--max_new_tokens", "200", "--temperature", "2"]
        for extra, typed in (([], []), (["--interactive"], ["abc", "", "quit"])):
            out = io.StringIO()
            with mock.patch.object(sys, "argv", argv + extra), mock.patch("builtins.input", side_effect=typed), \
                    contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
                sample.main()
            text = out.getvalue().splitlines()
            samples = [line for line in text if not line.startswith(("Type", "> "))] if extra else text
            assert not any("hint" in line for line in text), f"{extra}: a prompt was refused: {text}"
            assert len(samples) == (2 if extra else 1) and all(len(s) >= 200 and set(s) <= set(vocab) for s in samples), \
                f"{extra}: expected samples of 200 characters from the vocabulary, got {text}"


def test_ctrl_c_after_the_last_step():
    """A Ctrl-C during the last evaluation was lost (the run went on to the end-of-run sample without
    saving or saying how to resume), and one during the sample, outside fit(), ended the script in a
    KeyboardInterrupt traceback instead of one line and exit status 130."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_corpus(tmp)
        calls, real_estimate = [], mt.estimate_loss

        def estimate_then_ctrl_c(*args):
            calls.append(1)
            if len(calls) == 5:  # evaluations at steps 0, 10 and 20 take two calls each: 5 is in the last
                signal.raise_signal(signal.SIGINT)
            return real_estimate(*args)

        out = io.StringIO()
        with mock.patch.object(mt, "estimate_loss", estimate_then_ctrl_c), contextlib.redirect_stdout(out), ctrl_c_handled():
            code = exit_code(mt.train, tiny_config(vocab_size=0), tiny_train_config(tmp, sample_chars=50))
        assert "interrupted: saved step 20" in out.getvalue() and "-" * 40 not in out.getvalue(), out.getvalue()
        assert code == 130, f"a run stopped by Ctrl-C exited with {code}, not 130"
        assert plumbing.load_checkpoint(tmp / "out" / "ckpt.pt")["step"] == 20, "the last step was not saved"
        args = ["--data_dir", "data", "--out_dir", "cli", "--n_layers", "1", "--d_model", "32", "--block_size", "16", "--precision", "fp32",
                "--max_steps", "10", "--warmup_steps", "2", "--eval_interval", "10", "--sample_chars", "10000000"]
        with child(HERE / "mini_transformer.py", *args, cwd=tmp) as run:
            while not run.stdout.readline().startswith("step 10 | train"):  # the last evaluation; the sample comes next
                assert run.poll() is None, f"the run ended early: {run.stderr.read()}"
            time.sleep(1.0)
            run.send_signal(signal.SIGINT)
            _, err = run.communicate(timeout=60)
        assert run.returncode == 130 and err.strip() == "interrupted", f"Ctrl-C in the sample: {run.returncode} {err!r}"


def test_ddp_on_two_cpu_processes_equals_one_process_accumulating():
    """DDP with 2 CPU processes (gloo) that initialise differently, skip the no-sync forward, do not
    divide the accumulation by the world size or print from every rank: each process taking half of
    every global batch must end with the parameters of one process accumulating the same batch in 2
    micro-steps, and only rank 0 prints."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_corpus(tmp)
        args = ["mini_transformer.py", "--data_dir", str(tmp / "data"), "--n_layers", "1", "--d_model", "32", "--block_size", "16",
                "--batch_size", "8", "--max_steps", "6", "--eval_interval", "3", "--log_interval", "2", "--warmup_steps", "1",
                "--sample_chars", "0", "--device", "cpu", "--precision", "fp32"]
        one = run_script(*args, "--grad_accum", "2", "--out_dir", str(tmp / "one"), cwd=HERE)
        assert one.returncode == 0, f"single process failed: {one.stderr}"
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args,
                              "--out_dir", str(tmp / "two")], cwd=HERE, capture_output=True, text=True, env=env, timeout=180,
                             preexec_fn=default_sigint)
        assert two.returncode == 0, f"torchrun failed: {two.stderr[-2000:]}"
        assert two.stdout.count("step 6 | train") == 1 and "x 2 |" in two.stdout, f"not printed once by rank 0: {two.stdout}"
        a = torch.load(tmp / "one" / "ckpt.pt", weights_only=True)["model"]
        b = torch.load(tmp / "two" / "ckpt.pt", weights_only=True)["model"]
        for name in a:
            assert max_diff(a[name], b[name]) < 1e-5, f"{name} differs between DDP and accumulation by {max_diff(a[name], b[name]):.2e}"


# ----------------------------------------------------------------------------------------------------
# The Vision Transformer


def tiny_vit(**kw):
    import vit

    return vit.ViT(vit.ViTConfig(**{"patch_size": 7, "n_layers": 2, "n_heads": 4, "d_model": 32, "d_ff": 64, **kw}))


def test_vit_patch_embedding_paths_agree():
    """The strided Conv2d and the explicit reshape + Linear embed patches differently (pixels or patches
    in another order, the kernel rearranged wrongly), or patchify() disagrees with an explicit loop."""
    torch.manual_seed(0)
    model = tiny_vit(patch_size=4, patch_embed="linear")
    images = torch.randn(3, 1, 28, 28)
    patches = model.patch_emb.patchify(images)
    loop = torch.stack([images[:, 0, 4 * i : 4 * i + 4, 4 * j : 4 * j + 4].reshape(3, 16) for i in range(7) for j in range(7)], 1)
    assert torch.equal(patches, loop), "patchify() orders patches or pixels differently from an explicit loop"
    linear = model.patch_emb(images)
    model.patch_emb.path = "conv"
    conv = model.patch_emb(images)
    assert linear.shape == (3, 49, 32) and max_diff(linear, conv) < 1e-5, f"conv and linear paths differ by {max_diff(linear, conv):.2e}"


def test_vit_is_not_causal_and_classifies():
    """A ViT whose attention is causal (the LM's mask reused), whose logits are not (B, 10), or which
    cannot lower the loss on a fixed batch in a few steps."""
    torch.manual_seed(0)
    model = tiny_vit().eval()
    images = torch.randn(2, 1, 28, 28)
    changed = images.clone()
    changed[:, :, 21:, 21:] = torch.randn(2, 1, 7, 7)  # the last 7 x 7 patch only

    def first_patch_output(x):
        h = model.patch_emb(x) + model.pos_emb
        for block in model.blocks:
            h = block(h)
        return h[:, 0]

    assert max_diff(first_patch_output(images), first_patch_output(changed)) > 1e-4, "the ViT's attention is causal"
    logits, loss = model(images, torch.tensor([3, 7]))
    assert logits.shape == (2, 10), f"logits of shape {tuple(logits.shape)}"
    model.train()
    optimizers = mt.make_optimizer(model, mt.TrainConfig(learning_rate=3e-3))
    batch = (torch.randn(16, 1, 28, 28), torch.randint(10, (16,)))
    first = mt.train_step(model, optimizers, batch)[0].item()
    for _ in range(30):
        last = mt.train_step(model, optimizers, batch)[0].item()
    assert last < 0.5 * first, f"loss went from {first:.3f} to {last:.3f} in 30 steps on one batch"


def test_vit_cli_rejects_bad_values():
    """vit.py accepting a patch that does not divide 28, a negative --predict, shift or smoothing out of
    range, or ending in numpy's traceback on a cut-short array file instead of one line."""
    import vit

    for argv, words in [(("--patch_size", "5"), "divide 28"), (("--predict", "-3"), "predict"), (("--max_shift", "-1"), "max_shift"),
                        (("--label_smoothing", "1"), "label_smoothing")]:
        _, code, err = parse(*argv, configs=(vit.ViTConfig(), vit.TRAIN_DEFAULTS, vit.PredictConfig()))
        assert code == 2 and words in err and err.count("\n") == 1, f"{argv}: exit {code}, stderr {err!r}"
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("train_images", "train_labels", "test_images", "test_labels"):
            np.save(Path(tmp) / f"{name}.npy", np.zeros((4, 28, 28) if "images" in name else 4, dtype=np.uint8))
        cut = Path(tmp) / "test_images.npy"
        cut.write_bytes(cut.read_bytes()[:-10])
        message = exit_line(vit.load_mnist, tmp, CPU)
        assert "is damaged" in message, f"cut-short file: {message!r}"


def test_vit_trains_predicts_and_guards_its_out_dir():
    """vit.py's default run not sized by the time budget, a short run failing to train, save and report
    its accuracy, --predict (which only reads best.pt) refused as a second run into that folder, or a
    fresh run into it allowed to overwrite the first."""
    import vit

    assert vit.TRAIN_DEFAULTS.max_steps == 0 and vit.TRAIN_DEFAULTS.time_budget > 0, "vit.py's default run has a fixed length"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rng = np.random.default_rng(0)
        for split, n in (("train", 64), ("test", 32)):
            np.save(tmp / f"{split}_images.npy", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
            np.save(tmp / f"{split}_labels.npy", rng.integers(0, 10, n, dtype=np.uint8))
        args = ["--data_dir", tmp, "--out_dir", tmp / "out", "--n_layers", "1", "--n_heads", "2", "--d_model", "16", "--d_ff", "32",
                "--batch_size", "8", "--max_steps", "4", "--eval_interval", "2", "--log_interval", "2", "--precision", "fp32",
                "--device", "cpu"]
        code, out, err = main_here(vit, *args)
        assert code == 0 and "test accuracy" in out and (tmp / "out" / "best.pt").exists(), f"vit.py failed: {code} {err}"
        code, out, err = main_here(vit, "--data_dir", tmp, "--out_dir", tmp / "out", "--predict", "2", "--device", "cpu")
        assert code == 0 and out.count("predicted") == 2, f"--predict failed: {code} {err or out}"
        code, _, err = main_here(vit, *args)
        assert "--overwrite" in one_line(code, err), "a second fresh vit.py run was not refused"


def test_vit_label_smoothing_in_training_only():
    """Label smoothing applied in eval mode too (or evaluation run in train mode) makes the reported test
    loss a smoothed one, and an evaluation must cover every image, the last partial batch too; in
    training the loss must equal (1 - s) one-hot + s/10 everywhere."""
    torch.manual_seed(0)
    model = tiny_vit(label_smoothing=0.2)
    images, targets = torch.randn(5, 1, 28, 28), torch.randint(10, (5,))
    logits, loss = model.eval()(images, targets)
    log_p = logits.log_softmax(dim=-1)
    plain = -log_p[torch.arange(5), targets].mean()
    assert max_diff(loss, plain) < 1e-6, f"eval loss {loss.item():.5f} is not the plain cross-entropy {plain.item():.5f}"
    _, smoothed = model.train()(images, targets)  # dropout is 0: the same logits
    expected = 0.8 * plain - 0.2 * log_p.mean(dim=-1).mean()
    assert max_diff(smoothed, expected) < 1e-6, f"train loss {smoothed.item():.5f}, expected {expected.item():.5f}"
    split = (torch.randint(256, (7, 28, 28), dtype=torch.uint8), torch.randint(10, (7,)))  # 7 images in batches of 3
    reported, accuracy, _ = vit.evaluate_split(model.train(), split, batch_size=3)
    assert model.training, "evaluate_split did not restore train mode"
    logits, loss = model.eval()(vit.to_input(split[0]), split[1])
    assert abs(reported - loss.item()) < 1e-5, f"test loss {reported:.5f}, not the plain loss over every image {loss.item():.5f}"
    assert accuracy == (logits.argmax(-1) == split[1]).float().mean().item(), "the accuracy is not over every image"


def test_vit_shifted_batches_keep_the_digits():
    """Augmentation that shifts images further than max_shift pixels, or loses or adds pixels."""
    import vit

    images = torch.zeros(4, 28, 28, dtype=torch.uint8)
    images[:, 10:18, 10:18] = 255
    x, y = vit.image_batch((images, torch.arange(4)), 64, torch.Generator().manual_seed(0), max_shift=2)
    bright = (x > 0).squeeze(1)  # (B, 28, 28)
    assert x.shape == (64, 1, 28, 28) and bright.sum(dim=(1, 2)).eq(64).all(), "a shift lost or added pixels"
    rows = bright.any(dim=2).float().argmax(dim=1)
    assert rows.min() == 8 and rows.max() == 12, f"shifts reach rows {rows.min()}..{rows.max()}, expected 8..12"


def test_prepare_mnist_mirrors_checksums_and_idx_headers():
    """prepare_mnist.py giving up when the first mirror fails although the second serves, writing out
    HTML pages, corrupted or truncated files or wrong IDX headers, or leaving partial output behind."""
    import gzip

    import prepare_mnist as pm

    rng = np.random.default_rng(0)
    raw = {"images": b"\x00\x00\x08\x03" + (10).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + rng.integers(0, 256, 7840, dtype=np.uint8).tobytes(),
           "labels": b"\x00\x00\x08\x01" + (10).to_bytes(4, "big") + rng.integers(0, 10, 10, dtype=np.uint8).tobytes()}
    files = {"train_images": ("tr-img", hashlib.sha256(raw["images"]).hexdigest(), 2051, 10),
             "train_labels": ("tr-lab", hashlib.sha256(raw["labels"]).hexdigest(), 2049, 10)}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for mirror, transform in [("good", gzip.compress), ("html", lambda b: b"<!DOCTYPE html><html>403</html>"),
                                  ("corrupt", lambda b: gzip.compress(b[:-1] + b"\x07")), ("truncated", lambda b: gzip.compress(b)[:-20])]:
            (tmp / mirror).mkdir()
            for kind, name in (("images", "tr-img"), ("labels", "tr-lab")):
                (tmp / mirror / f"{name}.gz").write_bytes(transform(raw[kind]))
        with http_server(tmp) as url:
            shapes = pm.prepare([f"{url}/missing/", f"{url}/good/"], str(tmp / "out"), files)
            assert shapes == {"train_images": (10, 28, 28), "train_labels": (10,)}, f"shapes {shapes}"
            for mirror, words in [("html", "HTML"), ("corrupt", "checksum"), ("truncated", "gzip")]:
                try:
                    pm.prepare([f"{url}/{mirror}/"], str(tmp / "bad"), files)
                    raise AssertionError(f"the {mirror} mirror was accepted")
                except ps.DataError as e:
                    assert words in str(e), f"{mirror}: expected {words!r} in {e}"
                assert not (tmp / "bad").exists(), f"the {mirror} mirror left partial output"
        local = pm.prepare([str(tmp / "good")], str(tmp / "local"), files)  # a local folder works too
        assert local == shapes
        loaded = np.load(tmp / "out" / "train_images.npy", allow_pickle=False)
        assert loaded.dtype == np.uint8 and loaded.tobytes() == raw["images"][16:], "written images differ"
    for bad, words in [(b"\x00\x00\x08\x02" + raw["labels"][4:], "magic"), (raw["labels"][:-1], "truncated")]:
        try:
            pm.parse_idx(bad, 2049, 10, "labels")
            raise AssertionError("a bad IDX file was parsed")
        except ps.DataError as e:
            assert words in str(e), f"unclear message: {e}"

# ----------------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------------
# prepare
OLD_TEXT = "".join(random.Random(0).choices(["the cat sat. ", "ROMEO: oh\n"], k=300))
NEW_TEXT = "".join(random.Random(1).choices(["a dog ran! ", "JULIET: ay?\n"], k=300))
DATASET = {"train.bin", "val.bin", "meta.json"}


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
    traceback; --temperature nan passed the checks and printed only newlines, and a negative --top_k
    ended in torch.topk. Each must be one line on stderr and a non-zero exit."""
    assert_refused(sample.SampleConfig, {"temperature": float("nan")}, {"temperature": float("inf")}, {"top_p": float("nan")},
                   {"seed": -1}, {"seed": 2**63}, {"top_k": -1})
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


# ----------------------------------------------------------------------------------------------------
# plot
VOCAB = "\n !,.:?BEJLMORTUabehilnorstu"  # the characters of the prompts below, and a few more


def lm_run(folder, **kw):
    """A language-model run as training leaves it: best.pt (a tiny untrained model), config.json, and a
    log.jsonl of a run stopped after step 40 and resumed from its checkpoint at step 20."""
    folder.mkdir(parents=True)
    torch.manual_seed(0)
    cfg = mt.TransformerConfig(vocab_size=len(VOCAB), block_size=16, n_layers=2, n_heads=2, d_model=16, d_ff=32, **kw)
    tcfg = asdict(mt.TrainConfig(out_dir=str(folder), batch_size=4))
    torch.save({"model": mt.MiniTransformer(cfg).state_dict(), "model_config": asdict(cfg), "vocab": VOCAB,
                "train_config": tcfg, "step": 0}, folder / "best.pt")
    (folder / "config.json").write_text(json.dumps({"model_config": asdict(cfg), "vocab": VOCAB, "train_config": tcfg}), encoding="utf-8")
    # (kind, step, loss, seconds since launch): stopped after step 40, resumed from step 20 in a new process
    log = [("eval", 0, 3.3, 0.0), ("train", 10, 3.1, 1.0), ("train", 20, 2.9, 2.0), ("eval", 20, 2.8, 2.25),
           ("train", 30, 2.7, 3.0), ("train", 40, 2.6, 4.0),
           ("train", 30, 2.75, 1.5), ("train", 40, 2.65, 2.5), ("train", 50, 2.5, 3.5), ("eval", 50, 2.4, 3.75)]
    lines = [{"kind": k, "step": s, "loss": v, "lr": 1e-3, "ms_per_step": 5.0, "seen": s * 64, "elapsed_s": t} if k == "train" else
             {"kind": k, "step": s, "train_loss": v, "val_loss": v, "best_val_loss": v, "elapsed_s": t, "val_ppl": 2.7**v}
             for k, s, v, t in log]
    (folder / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines), encoding="utf-8")
    return cfg


def vit_run(folder):
    """A ViT run's best.pt (a tiny untrained model) and a fake MNIST: 12 images per split, each a bar
    somewhere in the middle, with random labels. Returns the test labels."""
    data = folder / "mnist"
    data.mkdir(parents=True)
    rng = np.random.default_rng(0)
    images = np.zeros((12, 28, 28), dtype=np.uint8)
    for i, (top, left) in enumerate(rng.integers(4, 12, (12, 2))):
        images[i, top : top + 12, left : left + 5] = 255
    for split in ("train", "test"):
        np.save(data / f"{split}_images.npy", images)
        np.save(data / f"{split}_labels.npy", rng.integers(0, 10, 12, dtype=np.uint8))
    torch.manual_seed(0)
    cfg = vit.ViTConfig(n_layers=2, n_heads=2, d_model=16, d_ff=32)
    torch.save({"model": vit.ViT(cfg).state_dict(), "vit_config": asdict(cfg), "step": 0,
                "train_config": asdict(mt.TrainConfig(data_dir=str(data), out_dir=str(folder)))}, folder / "best.pt")
    return np.load(data / "test_labels.npy")


def assert_png(path):
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert len(data) < 150_000, f"{path} is {len(data) // 1000} kB, too large for a README"
    height, width, _ = plot.pyplot().imread(path).shape
    assert min(height, width) >= 150, f"{path} is {width} x {height} pixels, too small to read"


def printed(fn, *args):
    """What fn prints."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        fn(*args)
    return out.getvalue()


def exit_message(fn, *args):
    """The message fn exits with; None if it returns."""
    try:
        printed(fn, *args)
    except SystemExit as e:
        return str(e.code)
    return None


def test_plot_draws_the_models_own_attention():
    """The weights drawn must be those the model computes: running the blocks by hand with the weights
    kept gives model(idx)'s logits (both attention paths, eval mode with dropout configured), every row
    of weights sums to 1 and no query attends to a later character. The ViT's loop gives ViT.forward's
    logits, its patches see every patch, and the rollout's rows sum to 1."""
    torch.manual_seed(0)
    idx = torch.randint(len(VOCAB), (2, 16))
    for attn in ("sdpa", "explicit"):
        cfg = mt.TransformerConfig(vocab_size=len(VOCAB), block_size=16, n_layers=2, n_heads=2, d_model=16, d_ff=32,
                                   dropout=0.1, attn=attn)
        model = mt.MiniTransformer(cfg).eval()
        with torch.no_grad():
            logits, maps = plot.lm_attention(model, idx)
            diff = (logits - model(idx)[0]).abs().max().item()
        assert diff < 1e-5, f"{attn}: the block loop's logits differ from the model's by {diff:.2e}"
        assert len(maps) == 2 and maps[0].shape == (2, 2, 16, 16), f"{attn}: weights of shape {maps[0].shape}"
        for layer, att in enumerate(maps):
            assert torch.allclose(att.sum(-1), torch.ones(2, 2, 16)), f"{attn}, layer {layer}: rows do not sum to 1"
            assert att.triu(1).abs().max() == 0, f"{attn}, layer {layer}: a query attends to a later position"
    model = vit.ViT(vit.ViTConfig(n_layers=2, n_heads=2, d_model=16, d_ff=32, dropout=0.1)).eval()
    images = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        logits, maps = plot.vit_attention(model, images)
        diff = (logits - model(images)[0]).abs().max().item()
    assert diff < 1e-5, f"ViT: the block loop's logits differ from the model's by {diff:.2e}"
    later = torch.ones(16, 16, dtype=torch.bool).triu(1)  # [i, j]: patch j comes after patch i
    assert all(att[..., later].min() > 0 for att in maps), "ViT: a patch does not see the patches after it"
    rollout = plot.rollout(maps)  # (3, 16, 16)
    assert torch.allclose(rollout.sum(-1), torch.ones(3, 16), atol=1e-5), "rollout rows do not sum to 1"


def test_plot_loss_overlays_runs():
    """`python plot.py a b --x X` reads the run folders before the flags and draws both runs, each
    labelled by the config field in which it differs; a resumed run's repeated steps keep their last
    record; --x flops is bench.py's train_flops per step; each picture is a PNG in the first run's folder."""
    from bench import train_flops

    with tempfile.TemporaryDirectory() as tmp:
        a, b = Path(tmp) / "a", Path(tmp) / "b"
        lm_run(a)
        cfg_b = lm_run(b, ffn="swiglu")
        _, train, evals = plot.read_run(a)
        assert [r["step"] for r in train] == [10, 20, 30, 40, 50], f"steps {[r['step'] for r in train]}"
        assert train[2]["loss"] == 2.75, "a repeated step kept the record from before the resume"
        assert [r["step"] for r in evals] == [0, 20, 50], f"evaluations at {[r['step'] for r in evals]}"
        drawn, real_save = {}, plot.save

        def keep(fig, path):  # the lines of each picture, by label: x data
            drawn[path.name] = {line.get_label(): list(line.get_xdata()) for line in fig.axes[0].get_lines() if len(line.get_xdata())}
            real_save(fig, path)

        with mock.patch.object(plot, "save", keep):
            for x in ("steps", "tokens", "time", "flops"):
                with mock.patch.object(sys, "argv", ["plot.py", str(a), str(b), "--x", x]):
                    out = printed(plot.main)
                name = "loss_compare.png" if x == "steps" else f"loss_compare_{x}.png"
                assert out == f"wrote {a / name}\n", f"--x {x}: printed {out!r}"
                assert_png(a / name)
            printed(plot.plot_loss, [a], "steps")
        assert_png(a / "loss.png")
        assert set(drawn["loss.png"]) == {f"{a}: train", f"{a}: val"}, f"one run: {drawn['loss.png'].keys()}"
        lines = drawn["loss_compare_flops.png"]
        assert set(lines) == {f"{a}: ffn=relu: train", f"{a}: ffn=relu: val", f"{b}: ffn=swiglu: train", f"{b}: ffn=swiglu: val"}, \
            f"overlay labels: {lines.keys()}"
        flops = 50 * train_flops(mt.MiniTransformer(cfg_b), 4, 16)
        assert lines[f"{b}: ffn=swiglu: val"][-1] == flops, f"FLOPs at step 50: {lines[f'{b}: ffn=swiglu: val'][-1]}, not {flops}"
        assert drawn["loss_compare_tokens.png"][f"{a}: ffn=relu: train"][-1] == 50 * 4 * 16, "tokens are not steps x batch x block"
        times = drawn["loss_compare_time.png"]
        assert times[f"{a}: ffn=relu: train"] == [1.0, 2.0, 5.5, 6.5, 7.5] and times[f"{a}: ffn=relu: val"] == [0.0, 2.25, 7.75], \
            f"the resumed run's clock does not go on from before: {times}"


def test_plot_language_model_pictures():
    """--attention and --embeddings write PNGs from a run's best.pt, print one mean entropy per layer and
    head, and each character's three nearest neighbours."""
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "out"
        lm_run(run)
        out = printed(plot.plot_attention, run, "best.pt", "ROMEO: Be still")
        assert_png(run / "attention.png")
        layers = [line for line in out.splitlines() if line.startswith("layer")]
        assert len(layers) == 2 and all(len(re.findall(r"head \d \d+\.\d\d", line)) == 2 for line in layers), out
        assert out.endswith(f"wrote {run / 'attention.png'}\n"), out
        out = printed(plot.plot_embeddings, run, "best.pt")
        assert_png(run / "embeddings.png")
        neighbours = out.splitlines()[1:-1]
        assert len(neighbours) == len(VOCAB) and all(len(line.split()) == 7 for line in neighbours), out


def test_plot_vit_pictures():
    """--vit writes the rollout and position-embedding PNGs from a ViT run and prints, for each digit,
    the true label of that test image."""
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "vit"
        labels = vit_run(run)
        out = printed(plot.plot_vit, run, "best.pt", 5, 0)
        assert_png(run / "vit_rollout.png")
        assert_png(run / "vit_pos_emb.png")
        shown = re.findall(r"test image (\d+): predicted \d, true (\d)", out)
        assert len(shown) == 5 and all(labels[int(i)] == int(t) for i, t in shown), f"digits and labels: {out}"


def test_plot_mistakes_are_one_line():
    """A user mistake ends with one line naming it, not a traceback: a prompt character outside the
    vocabulary, a prompt longer than block_size, a ViT checkpoint for --attention or --embeddings, a
    language model for --vit, a checkpoint with a config field this version does not know or without
    weights, a missing checkpoint or log.jsonl; bad flags are one parser error each."""
    with tempfile.TemporaryDirectory() as tmp:
        lm, vit_folder, bare = Path(tmp) / "lm", Path(tmp) / "vit", Path(tmp) / "bare"
        lm_run(lm)
        vit_run(vit_folder)
        bare.mkdir()
        (bare / "config.json").write_text((lm / "config.json").read_text(encoding="utf-8"), encoding="utf-8")
        ckpt = torch.load(lm / "best.pt", weights_only=True)
        torch.save({**ckpt, "model_config": {**ckpt["model_config"], "rope": True}}, bare / "newer.pt")
        torch.save({k: v for k, v in ckpt.items() if k != "model"}, bare / "stripped.pt")
        cases = [((plot.plot_attention, lm, "best.pt", "ROMEO: \u00e9"), "outside the vocabulary: '\u00e9'"),
                 ((plot.plot_embeddings, bare, "newer.pt"), "not a mini_transformer.py checkpoint of this version (TypeError"),
                 ((plot.plot_embeddings, bare, "stripped.pt"), "not a mini_transformer.py checkpoint of this version (KeyError"),
                 ((plot.plot_attention, lm, "best.pt", "Be still Be still"), "more than block_size 16"),
                 ((plot.plot_attention, vit_folder, "best.pt", "ROMEO"), "not a mini_transformer.py checkpoint"),
                 ((plot.plot_embeddings, vit_folder, "best.pt"), "not a mini_transformer.py checkpoint"),
                 ((plot.plot_vit, lm, "best.pt", 4, 0), "not a vit.py checkpoint"),
                 ((plot.plot_embeddings, lm, "ckpt.pt"), "ckpt.pt not found"),
                 ((plot.plot_loss, [bare], "steps"), "log.jsonl not found")]
        for args, words in cases:
            message = exit_message(*args)
            assert message and message.startswith("error:") and words in message and "\n" not in message, \
                f"{args[0].__name__}{args[1:]}: {message!r}"
    for flags, words in ((["--embeddings", "--vit", "2"], "one of"), (["--x", "epochs"], "x must be"), (["--vit", "-1"], "vit must be")):
        err = io.StringIO()
        with mock.patch.object(sys, "argv", ["plot.py", *flags]), contextlib.redirect_stderr(err):
            status = exit_message(plot.main)
        assert status == "2" and err.getvalue().count("\n") == 1 and words in err.getvalue(), f"{flags}: {status} {err.getvalue()!r}"


def test_plot_without_matplotlib_is_one_line():
    """Without matplotlib, plot.py says how to install it in one line and exits 1, before any other work
    and without a traceback."""
    code = ("import runpy, sys; sys.modules['matplotlib'] = None; sys.argv = ['plot.py']; "
            "runpy.run_path('plot.py', run_name='__main__')")
    child = subprocess.Popen([sys.executable, "-c", code], cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        _, err = child.communicate(timeout=60)
    finally:
        child.kill()
    assert child.returncode == 1 and err == "plot.py needs matplotlib: pip install matplotlib\n", f"exit {child.returncode}: {err!r}"


# ----------------------------------------------------------------------------------------------------
# bench
TINY = ["--repeats", "1", "--warmup", "0", "--batch_size", "2", "--n_layers", "1", "--d_model", "32", "--block_size", "16",
        "--matmul_size", "64", "--gen_chars", "20"]




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
    """A bad --json or --precision is found only after minutes of timing, or ends in a traceback instead of one line;
    --vocab_size 0 (the training scripts' "take it from the data") ended in a traceback, bench.py having no data."""
    assert_refused(bench.BenchConfig, {"json": "no/such/folder/out.json"}, {"precision": "fp16"}, {"only": "train,gpu"})
    with tempfile.TemporaryDirectory() as tmp:
        try:
            with mock.patch.object(sys, "argv", ["bench.py", "--only", "matmul", "--device", "cpu", "--precision", "fp32", "--json", tmp,
                                                 *TINY]), contextlib.redirect_stdout(io.StringIO()):
                bench.main()
            raise AssertionError("--json naming a folder was accepted")
        except SystemExit as e:
            assert str(e.code).startswith(f"error: cannot write {tmp}") and "\n" not in str(e.code), f"--json a folder: {e.code!r}"
    err = io.StringIO()
    with mock.patch.object(sys, "argv", ["bench.py", "--only", "generate", "--vocab_size", "0"]), contextlib.redirect_stderr(err):
        code = exit_code(bench.main)
    assert code == 2 and "vocab_size" in err.getvalue() and err.getvalue().count("\n") == 1, f"--vocab_size 0: {code}, {err.getvalue()!r}"


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


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().split("\n")[0])
    parser.add_argument("-k", default="", help="run only the tests whose name contains this text, e.g. -k cache")
    only = parser.parse_args().k
    tests = [(name, fn) for name, fn in globals().items() if name.startswith("test_") and callable(fn) and only in name]
    passed = failed = 0
    for name, fn in tests:
        t0 = time.perf_counter()
        try:
            fn()
            passed += 1
            print(f"PASS {name} ({time.perf_counter() - t0:.1f}s)", flush=True)
        except Exception:
            failed += 1
            print(f"FAIL {name}\n{traceback.format_exc()}", flush=True)
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
