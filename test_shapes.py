"""
The test suite: each test names the bug it catches (the letters refer to the pitfall catalogue).

    python test_shapes.py          # runs every test_* function, ends with "N passed, N failed"
    python test_shapes.py -k cache # only the tests whose name contains "cache"
    python -m pytest test_shapes.py

Tiny models on the CPU, fixed seeds, no network: downloads are tested against a local HTTP server.
"""

import argparse
import contextlib
import functools
import http.server
import io
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F

import mini_transformer as mt
import prepare_shakespeare as ps

HERE = Path(__file__).resolve().parent
# A small synthetic corpus: enough structure to learn, no file or network needed.
TEXT = "".join(random.Random(0).choices(["the cat sat. ", "a dog ran! ", "ROMEO: oh\n", "JULIET: ay?\n"], k=3000))


def tiny_config(**kw):
    return mt.TransformerConfig(**{"vocab_size": 17, "block_size": 16, "n_layers": 2, "n_heads": 4, "d_model": 32, "d_ff": 64, **kw})


def tiny_train_config(tmp, **kw):
    return mt.TrainConfig(**{"data_dir": str(tmp / "data"), "out_dir": str(tmp / "out"), "max_steps": 20, "batch_size": 8,
                             "learning_rate": 3e-3, "min_lr": 3e-4, "warmup_steps": 5, "eval_interval": 10,
                             "eval_batches": 2, "log_interval": 5, "sample_chars": 0, **kw})


def write_corpus(tmp):
    (tmp / "corpus.txt").write_text(TEXT, encoding="utf-8")
    ps.prepare(str(tmp / "corpus.txt"), str(tmp / "data"))


def quiet(fn, *args, **kw):
    """Run fn with its stdout swallowed (training prints progress lines)."""
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args, **kw)


def max_diff(a, b):
    return (a - b).abs().max().item()


# ----------------------------------------------------------------------------------------------------
# A. Attention


def test_causal_mask_hides_the_future():
    """A5: changing token t+1 must not change the logits at positions <= t, on both attention paths."""
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
    """A8: the ViT reuses the block with causal=False: the last position must reach the first."""
    torch.manual_seed(0)
    for attn in ("sdpa", "explicit"):
        block = mt.TransformerBlock(tiny_config(attn=attn), causal=False).eval()
        x = torch.randn(1, 8, 32)
        y = x.clone()
        y[:, -1] = torch.randn(32)  # random, not a constant shift: LayerNorm removes those
        assert max_diff(block(x)[:, 0], block(y)[:, 0]) > 1e-4, f"{attn}: non-causal block ignored the last position"


def test_sdpa_matches_explicit_path():
    """A1/A4: the fused SDPA path computes the same outputs and gradients as the explicit one."""
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
    """A4: dropout must change outputs in train mode, on both paths, and never in eval."""
    idx = torch.randint(17, (2, 16))
    for attn in ("sdpa", "explicit"):
        model = mt.MiniTransformer(tiny_config(attn=attn, dropout=0.5))
        assert not torch.equal(model(idx)[0], model(idx)[0]), f"{attn}: dropout had no effect in train mode"
        model.eval()
        assert torch.equal(model(idx)[0], model(idx)[0]), f"{attn}: eval mode is random"


def test_cheap_dropout_is_still_dropout():
    """The CPU Dropout keeps each element with probability 1 - p in every 16-bit lane of its random
    words, scales kept ones by exactly 1 / (1 - p), draws a new mask each call, passes gradients
    through the same mask, and does nothing in eval."""
    torch.manual_seed(0)
    for p in (0.1, 0.5):
        dropout = mt.Dropout(p)
        x = torch.ones(4_000_003)  # not a multiple of 4 lanes; 4M draws pin the rate to about 2e-4
        y = dropout(x)
        keep = y > 0
        for lane in range(4):
            rate = keep[lane::4].float().mean().item()
            assert abs(rate - (1 - p)) < 0.003, f"p={p}: lane {lane} keeps {rate:.4f}, expected {1 - p}"
        rate = keep.float().mean().item()
        assert abs(rate - (1 - p)) < 0.0008, f"p={p}: keeps {rate:.5f}, expected {1 - p} (masks too coarse?)"
        assert torch.allclose(y[keep], torch.tensor(1 / (1 - p)), rtol=1e-4), "kept values are not scaled by 1/(1-p)"
        assert abs(y.mean().item() - 1) < 0.001, f"p={p}: the mean moved to {y.mean().item():.5f}"
        both = (keep[:-1] & keep[1:]).float().mean().item()
        assert abs(both - (1 - p) ** 2) < 0.005, f"p={p}: neighbouring decisions are correlated ({both:.4f})"
        assert not torch.equal(y, dropout(x)), "two calls drew the same mask"
        z = torch.randn(1000, requires_grad=True)
        out = dropout(z)
        out.sum().backward()
        assert torch.allclose(z.grad * z.detach(), out.detach(), atol=1e-6), "the gradient does not follow the mask"
        assert dropout.eval()(x) is x, "dropout is active in eval mode"


def test_attention_in_halves_equals_the_explicit_path():
    """The split causal attention that CPU training with dropout uses is the explicit path exactly:
    for any fixed dropout mask (odd, even and one-position sequences), forward and gradients; and the
    model routes CPU training with dropout through it without letting the future leak in."""
    torch.manual_seed(0)
    for T in (16, 15, 1):
        q, k, v = (torch.randn(2, 3, T, 8, requires_grad=True) for _ in range(3))
        keep = (torch.rand(2, 3, T, T) > 0.3).float() / 0.7  # one fixed dropout mask for the whole (T, T)
        mask = torch.ones(T, T, dtype=torch.bool).tril()
        h = T // 2

        def fixed_dropout(att):  # the same mask, cut to whichever block the function passes in
            return att * (keep[:, :, :h, :h] if att.size(2) == h and att.size(3) == h else keep[:, :, h:])

        att = ((q / math.sqrt(8)) @ k.transpose(-2, -1)).masked_fill(~mask, float("-inf")).softmax(dim=-1)
        want = (att * keep) @ v
        got = mt.causal_attention_in_halves(q, k, v, mask, fixed_dropout)
        assert got.shape == want.shape and max_diff(got, want) < 1e-5, f"T={T}: differs by {max_diff(got, want):.2e}"
        g = torch.randn_like(want)
        grads = torch.autograd.grad(want, (q, k, v), g)
        for name, a, b in zip("qkv", grads, torch.autograd.grad(got, (q, k, v), g)):
            assert max_diff(a, b) < 1e-5, f"T={T}: the gradient of {name} differs by {max_diff(a, b):.2e}"
    model = mt.MiniTransformer(tiny_config(dropout=0.5))  # sdpa asked for; on the CPU in training: halves
    with mock.patch.object(mt, "causal_attention_in_halves", wraps=mt.causal_attention_in_halves) as spy:
        idx = torch.randint(17, (2, 16))
        changed = idx.clone()
        changed[:, 9] = (changed[:, 9] + 1) % 17
        torch.manual_seed(1)
        a = model(idx)[0]
        torch.manual_seed(1)  # the same dropout masks again
        b = model(changed)[0]
        calls = spy.call_count
    assert calls == 2 * len(model.blocks), f"the halves path ran {calls} times, expected once per layer and forward"
    assert max_diff(a[:, :9], b[:, :9]) == 0 and max_diff(a[:, 9:], b[:, 9:]) > 0, "with dropout, a later token leaked"


def test_bf16_autocast_on_the_cpu_computes_the_same_model():
    """--precision: fp32 is plain fp32 and bf16 is autocast with bf16 matmuls. Under CPU autocast the
    causal LM takes the by-hand halves path and the ViT's block the explicit one; both must compute
    what fp32 SDPA does, up to bf16 rounding, and the LM must stay causal."""
    cpu = torch.device("cpu")
    assert isinstance(mt.autocast(cpu, "fp32"), contextlib.nullcontext), "--precision fp32 must not autocast"
    assert (mt.precision_name(cpu, "bf16"), mt.precision_name(cpu, "fp32")) == ("bf16", "fp32"), "--precision must win over detection"
    with mt.autocast(cpu, "bf16"):
        assert torch.nn.Linear(4, 4)(torch.randn(2, 4)).dtype == torch.bfloat16, "bf16 autocast must run matmuls in bf16"
    torch.manual_seed(0)
    model = mt.MiniTransformer(tiny_config())
    idx = torch.randint(17, (2, 16))
    want = model(idx)[0]
    with mock.patch.object(mt, "causal_attention_in_halves", wraps=mt.causal_attention_in_halves) as spy:
        with mt.autocast(cpu, "bf16"):
            got = model(idx)[0]
            changed = idx.clone()
            changed[:, 9] = (changed[:, 9] + 1) % 17
            later = model(changed)[0]
    assert spy.call_count == 2 * len(model.blocks), "under CPU autocast the LM must take the halves path"
    assert max_diff(got.float(), want) < 0.05, f"bf16 logits differ from fp32 by {max_diff(got.float(), want):.3f}"
    assert max_diff(got[:, :9], later[:, :9]) == 0, "under bf16 autocast a later token leaked"
    block = mt.TransformerBlock(tiny_config(), causal=False)
    x = torch.randn(2, 16, 32)
    with mt.autocast(cpu, "bf16"):
        y = block(x)
    assert max_diff(y.float(), block(x)) < 0.05, "the non-causal block differs under bf16 autocast"


def test_heads_match_a_per_head_loop():
    """A1/A2: splitting heads with view+permute and scaling by 1/sqrt(d_k) equals a plain per-head loop."""
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
    attn.attn = "sdpa"
    assert max_diff(attn(x), y) < 1e-5, "the SDPA path differs from the per-head loop"


def test_sequence_longer_than_block_size_is_a_clear_error():
    """A7: T > block_size must raise a readable error, and generate() must crop the context instead."""
    model = mt.MiniTransformer(tiny_config())
    try:
        model(torch.zeros(1, 17, dtype=torch.long))
        raise AssertionError("a sequence longer than block_size was accepted")
    except ValueError as e:
        assert "block_size" in str(e), f"unhelpful message: {e}"
    out = model.generate(torch.zeros(1, 15, dtype=torch.long), 5, temperature=0)
    assert out.shape == (1, 20), f"generate() returned shape {tuple(out.shape)}"


# ----------------------------------------------------------------------------------------------------
# I. Init and weight tying


def test_weight_tying_and_a_single_init():
    """I1/I2: the head and the embedding are one tensor, initialised once, tied after .to() and loading."""
    model = mt.MiniTransformer(tiny_config())
    assert model.lm_head.weight is model.token_emb.weight, "lm_head and token_emb are not tied"
    seen, original = [], torch.nn.init.normal_

    def recording_normal(tensor, *args, **kw):
        seen.append(tensor.data_ptr())
        return original(tensor, *args, **kw)

    torch.nn.init.normal_ = recording_normal
    try:
        mt.init_weights(model, model.cfg.n_layers)
    finally:
        torch.nn.init.normal_ = original
    assert len(seen) == len(set(seen)), "some tensor was initialised twice (the tied matrix?)"
    assert model.token_emb.weight.data_ptr() in seen, "the tied matrix was never initialised"
    n_unique = sum(p.numel() for p in {id(p): p for p in model.state_dict(keep_vars=True).values()}.values())
    assert model.num_params() == n_unique, "num_params() counts the tied matrix twice"
    copy = mt.MiniTransformer(tiny_config()).to(torch.float64).to(torch.float32)
    copy.load_state_dict(model.state_dict())
    assert copy.lm_head.weight is copy.token_emb.weight, "tying lost after .to() and load_state_dict"
    assert torch.equal(copy.lm_head.weight, model.token_emb.weight), "the loaded tied matrix differs"


def test_scaled_init_on_every_residual_output():
    """I3: out_proj and the FFN's down projection (fc2 or SwiGLU's w2) get 0.02/sqrt(2 n_layers)."""
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
    """I5: the SwiGLU hidden width of 2/3 d_ff keeps the parameter count within 2% of the ReLU FFN."""
    relu = mt.MiniTransformer(mt.TransformerConfig(vocab_size=65)).num_params()
    swiglu = mt.MiniTransformer(mt.TransformerConfig(vocab_size=65, ffn="swiglu")).num_params()
    assert abs(swiglu - relu) / relu < 0.02, f"SwiGLU has {swiglu:,} parameters, ReLU {relu:,}"
    expected = 65 * 128 + 128 * 128 + 4 * (4 * 128 * 128 + 2 * 128 * 512 + 2 * 128) + 128
    assert relu == expected, f"the default model has {relu:,} parameters, expected {expected:,}"


def test_weight_decay_only_on_matrices():
    """I4: every parameter sits in exactly one group, and no 1-D tensor (gain or bias) is decayed."""
    model = mt.MiniTransformer(tiny_config(bias=True))
    optimizer = mt.make_optimizer(model, mt.TrainConfig())
    decayed, plain = (group["params"] for group in optimizer.param_groups)
    ids = [id(p) for p in decayed + plain]
    assert len(ids) == len(set(ids)) == len(list(model.parameters())), "a parameter is missing or in two groups"
    assert all(p.dim() >= 2 for p in decayed) and all(p.dim() < 2 for p in plain), "1-D tensors are decayed"
    assert optimizer.param_groups[0]["weight_decay"] > 0 and optimizer.param_groups[1]["weight_decay"] == 0, "1-D group is decayed"


# ----------------------------------------------------------------------------------------------------
# O. Loss, optimiser, learning rate


def test_lr_schedule_edges():
    """O4: no LR of 0 at step 0, no division by zero, monotone warmup and decay, min_lr at the end."""
    cfg = mt.TrainConfig(max_steps=100, warmup_steps=10, learning_rate=1e-3, min_lr=1e-4)
    lrs = [mt.get_lr(s, cfg) for s in range(120)]
    assert lrs[0] > 0, "the learning rate is 0 at step 0"
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11])), "warmup is not increasing"
    assert lrs[10] == 1e-3, f"the peak is {lrs[10]}, not learning_rate"
    assert all(a >= b for a, b in zip(lrs[10:100], lrs[11:101])), "the decay is not monotone"
    assert abs(lrs[100] - 1e-4) < 1e-12 and lrs[119] == lrs[100], "the decay does not end at min_lr"
    assert mt.get_lr(0, mt.TrainConfig(max_steps=1, warmup_steps=0)) > 0, "warmup 0 with one step breaks"


def test_grad_accumulation_equals_one_big_batch():
    """O1: k micro-batches of B/k give the same gradient norm and update as one batch of B."""
    torch.manual_seed(0)
    batch = (torch.randint(17, (8, 16)), torch.randint(17, (8, 16)))
    results = []
    for accum in (1, 4):
        torch.manual_seed(1)
        model = mt.MiniTransformer(tiny_config())
        sgd = torch.optim.SGD(model.parameters(), lr=0.5)  # SGD: unlike Adam, it shows a scale error
        loss, norm = mt.train_step(model, sgd, batch, grad_accum=accum)
        results.append((loss, norm, torch.cat([p.flatten() for p in model.parameters()])))
    (l1, n1, p1), (l4, n4, p4) = results
    assert abs(l1 - l4) < 1e-5, f"logged loss {l1:.5f} vs {l4:.5f}"
    assert abs(n1 - n4) < 1e-5, f"gradient norm {n1:.5f} vs {n4:.5f} (loss not divided by grad_accum?)"
    assert max_diff(p1, p4) < 1e-6, f"parameters differ by {max_diff(p1, p4):.2e}"


# ----------------------------------------------------------------------------------------------------
# E. Evaluation and sanity checks


def test_loss_at_init_is_ln_vocab():
    """E4: a fresh model predicts roughly uniformly, so its loss is close to ln(vocab_size)."""
    torch.manual_seed(0)
    model = mt.MiniTransformer(mt.TransformerConfig(vocab_size=65))
    _, loss = model(torch.randint(65, (8, 64)), torch.randint(65, (8, 64)))
    assert abs(loss.item() - math.log(65)) < 0.3, f"initial loss {loss.item():.3f}, expected about {math.log(65):.3f}"


def test_overfits_one_batch():
    """E4: before any long run, the model must be able to memorise one fixed batch."""
    torch.manual_seed(0)
    model = mt.MiniTransformer(tiny_config())
    optimizer = mt.make_optimizer(model, mt.TrainConfig(learning_rate=1e-2, weight_decay=0.0))
    batch = (torch.randint(17, (4, 16)), torch.randint(17, (4, 16)))
    first = mt.train_step(model, optimizer, batch)[0].item()
    for _ in range(150):
        last = mt.train_step(model, optimizer, batch, grad_clip=1.0)[0].item()
    assert first > 2.5 and last < 0.2, f"could not overfit one batch: loss {first:.3f} -> {last:.3f}"


def test_eval_covers_the_whole_split_and_repeats():
    """E1: whole-split eval predicts every token exactly once; fixed-batch eval repeats and leaves the
    training RNG alone."""
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


def test_batches_are_shifted_windows():
    """D3: y is x shifted by one, and windows reach the last token without running past it."""
    data = torch.arange(20)
    g = torch.Generator().manual_seed(0)
    x, y = mt.get_batch(data, 16, 200, g)
    assert x.shape == y.shape == (200, 16), f"batch shapes {tuple(x.shape)}, {tuple(y.shape)}"
    assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y, x + 1), "targets are not the next tokens"
    assert y.max() == 19 and x.min() == 0, "the windows never reach one end of the data"


# ----------------------------------------------------------------------------------------------------
# S. Sampling


def test_sampling_edges():
    """S1/S4: temperature 0 is greedy and seed-independent; sampled tokens lie in the top-k set; a
    top_k beyond the vocabulary is clamped."""
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


def test_sampling_follows_the_softmax():
    """The exponential race in sample_next() draws each token with its softmax probability (batched,
    temperature applied): 40,000 draws land within 5 standard errors of the expected frequencies."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -30.0]]).repeat(40_000, 1)
    draws = mt.sample_next(logits, 2.0, generator=torch.Generator().manual_seed(0)).flatten()
    expected = (logits[0] / 2.0).softmax(-1)
    freq = torch.bincount(draws, minlength=5).float() / len(draws)
    tolerance = 5 * (expected * (1 - expected) / len(draws)).sqrt() + 1e-4
    assert ((freq - expected).abs() <= tolerance).all(), f"frequencies {freq.tolist()}, expected {expected.tolist()}"


def test_kv_cache_generates_the_same_tokens():
    """A3 / USER_ASKS 5: greedy decoding with the KV cache equals the plain path while the sequence fits
    in block_size (prompts of 1 and block_size - 1 tokens, both attention paths); past it, the cache
    is rebuilt and generation goes on."""
    for attn in ("sdpa", "explicit"):
        torch.manual_seed(0)
        model = mt.MiniTransformer(tiny_config(attn=attn)).eval()
        idx = torch.randint(17, (2, 16))
        cache = [{} for _ in model.blocks]  # feed 5 tokens, then 4 at once (offset mask), then one by one
        pieces = [model(idx[:, :5], kv_cache=cache)[0], model(idx[:, 5:9], kv_cache=cache)[0]]
        pieces += [model(idx[:, t : t + 1], kv_cache=cache)[0] for t in range(9, 16)]
        diff = max_diff(torch.cat(pieces, dim=1), model(idx)[0])
        assert diff < 1e-5, f"{attn}: cached logits differ from a full forward by {diff:.2e}"
        for ffn, bias in (("relu", False), ("swiglu", True)):  # decode(): forward() as bare functions
            torch.manual_seed(0)
            fast = mt.MiniTransformer(tiny_config(attn=attn, ffn=ffn, bias=bias)).eval()
            with torch.no_grad():  # biases start at 0 and gains at 1: make each one matter
                for p in (p for p in fast.parameters() if p.dim() == 1):
                    p.normal_()
            cache, fast_cache = [{} for _ in fast.blocks], [{} for _ in fast.blocks]
            fast(idx[:, :9], kv_cache=cache), fast(idx[:, :9], kv_cache=fast_cache)
            for t in range(9, 16):
                want, got = fast(idx[:, t : t + 1], kv_cache=cache)[0][:, -1], fast.decode(idx[:, t : t + 1], fast_cache)
                diff = max_diff(got, want)
                assert diff < 1e-5, f"{attn}, {ffn}: decode() differs from forward() by {diff:.2e} at position {t}"
            assert fast_cache[0]["len"] == 16, f"decode() left the cache length at {fast_cache[0]['len']}, not 16"
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
    """S2: top_p keeps the smallest set of likeliest tokens holding top_p of the probability."""
    torch.manual_seed(0)
    logits = torch.randn(1, 17) * 3
    probs = logits.softmax(-1)[0].sort(descending=True)
    n = int((probs.values.cumsum(0) < 0.7).sum()) + 1  # tokens needed to reach 0.7
    nucleus = set(probs.indices[:n].tolist())
    drawn = {mt.sample_next(logits, 1.0, 0, 0.7, torch.Generator().manual_seed(s)).item() for s in range(200)}
    assert drawn <= nucleus, f"sampled {drawn - nucleus} outside the nucleus {nucleus}"
    assert len(drawn) == len(nucleus) > 1, f"only {drawn} of the nucleus {nucleus} were ever drawn"
    assert mt.sample_next(logits, 1.0, 0, 1e-9).item() == logits.argmax().item(), "a tiny top_p must keep the top token"


# ----------------------------------------------------------------------------------------------------
# C. Training loop, checkpoints and resume


def test_resume_equals_the_straight_run():
    """C3/C4: a run interrupted by Ctrl-C at step 10 and resumed ends with exactly the parameters of the
    same 20 steps run straight through (dropout on, so the RNG state must be restored too)."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_corpus(tmp)
        mcfg = tiny_config(vocab_size=0, dropout=0.1)
        straight = quiet(mt.train, mcfg, tiny_train_config(tmp, out_dir=str(tmp / "straight")))
        calls, real_step = [], mt.train_step

        def step_then_ctrl_c(*args):
            calls.append(1)
            if len(calls) == 10:  # a Ctrl-C arriving in the middle of step 9
                signal.raise_signal(signal.SIGINT)
            return real_step(*args)

        mt.train_step = step_then_ctrl_c
        try:
            quiet(mt.train, mcfg, tiny_train_config(tmp))
        except SystemExit as e:
            assert e.code == 130, f"a run stopped by Ctrl-C exited with {e.code}, not 130"
        else:
            raise AssertionError("a run stopped by Ctrl-C went on as if it had finished")
        finally:
            mt.train_step = real_step
        ckpt = mt.load_checkpoint(tmp / "out" / "ckpt.pt")
        assert ckpt["step"] == 10, f"the interrupted run saved step {ckpt['step']}, expected 10"
        resumed = quiet(mt.train, mt.TransformerConfig(**ckpt["model_config"]), tiny_train_config(tmp, resume=True), ckpt)
        a = torch.load(tmp / "straight" / "ckpt.pt", weights_only=True)["model"]
        b = torch.load(tmp / "out" / "ckpt.pt", weights_only=True)["model"]
        for name in a:
            assert torch.equal(a[name], b[name]), f"{name} differs after resume by {max_diff(a[name], b[name]):.2e}"
        assert resumed["val_loss"] == straight["val_loss"], "the final val loss differs after resume"


def test_checkpoints_load_with_weights_only_and_no_prefixes():
    """C1/C2/E2: ckpt.pt and best.pt hold plain data, the unwrapped model, and the best val loss."""
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
        assert [r["step"] for r in log] == [0, 10, 20], f"evals at steps {[r['step'] for r in log]}"
        assert result["best_val_loss"] == min(r["val_loss"] for r in log), "best val is not the minimum"
        saved = json.loads((out / "config.json").read_text(encoding="utf-8"))
        assert saved["model_config"]["vocab_size"] == len(set(TEXT)) and "train_config" in saved, "config.json lacks the resolved vocab_size"


def test_interrupted_checkpoint_write_keeps_the_old_file():
    """C4: a crash in the middle of torch.save must leave the previous checkpoint loadable; a full disk
    is one line, keeps the previous checkpoint and removes the half-written file."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ckpt.pt"
        mt.save_checkpoint(path, {"step": 1, "w": torch.ones(3)})
        real_save = torch.save

        def crashing_save(obj, f):
            Path(f).write_bytes(b"PK\x03\x04 half a file")
            raise KeyboardInterrupt

        torch.save = crashing_save
        try:
            mt.save_checkpoint(path, {"step": 2, "w": torch.zeros(3)})
        except KeyboardInterrupt:
            pass
        finally:
            torch.save = real_save
        assert mt.load_checkpoint(path)["step"] == 1, "the previous checkpoint was damaged"
        Path(f"{path}.tmp").replace(path)  # now a truncated checkpoint: a clean error, not a traceback
        try:
            mt.load_checkpoint(path)
            raise AssertionError("a truncated checkpoint loaded")
        except SystemExit as e:
            assert "not a readable checkpoint" in str(e.code), f"unclear message: {e.code}"
        mt.save_checkpoint(path, {"step": 3, "w": torch.ones(3)})

        def full_disk_save(obj, f):  # what torch.save raises when the disk fills up mid-write
            Path(f).write_bytes(b"PK\x03\x04 half a file")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

        torch.save = full_disk_save
        try:
            mt.save_checkpoint(path, {"step": 4, "w": torch.zeros(3)})
            message = "no error"
        except SystemExit as e:
            message = str(e.code)
        finally:
            torch.save = real_save
        assert "disk full" in message and "\n" not in message, f"a full disk: {message!r}"
        assert mt.load_checkpoint(path)["step"] == 3 and not Path(f"{path}.tmp").exists(), "the old file or the disk space was lost"


def test_best_checkpoint_link_survives_later_saves():
    """best.pt is made as a second name (hard link) of ckpt.pt: a later save of ckpt.pt must leave it be."""
    with tempfile.TemporaryDirectory() as tmp:
        ckpt, best = Path(tmp) / "ckpt.pt", Path(tmp) / "best.pt"
        mt.save_checkpoint(ckpt, {"step": 1})
        mt.link_checkpoint(ckpt, best)
        mt.save_checkpoint(ckpt, {"step": 2})
        steps = (mt.load_checkpoint(best)["step"], mt.load_checkpoint(ckpt)["step"])
        assert steps == (1, 2), f"best.pt and ckpt.pt hold steps {steps}, expected (1, 2)"
        mt.link_checkpoint(ckpt, best)  # over an existing best.pt
        assert mt.load_checkpoint(best)["step"] == 2, "best.pt was not replaced"


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint():
    """A NaN loss must stop the run with a message, and no NaN may reach ckpt.pt."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_corpus(tmp)
        real_step = mt.train_step

        def poisoned_step(model, *args):  # from the first step on, the model outputs NaN
            with torch.no_grad():
                next(model.parameters()).fill_(float("nan"))
            return real_step(model, *args)

        mt.train_step = poisoned_step
        try:
            quiet(mt.train, tiny_config(vocab_size=0), tiny_train_config(tmp, max_steps=10))
            raise AssertionError("training went on with a NaN loss")
        except SystemExit as e:
            assert "nan" in str(e.code) and "ckpt.pt" in str(e.code), f"unclear message: {e.code}"
        finally:
            mt.train_step = real_step
        ckpt = mt.load_checkpoint(tmp / "out" / "ckpt.pt")
        assert ckpt["step"] == 0, f"ckpt.pt is from step {ckpt['step']}, expected the good step 0"
        assert all(torch.isfinite(t).all() for t in ckpt["model"].values()), "NaN weights were saved"


# ----------------------------------------------------------------------------------------------------
# K. Command line


def parse(*argv, configs=None):
    """parse_config on the LM's configs (or the given ones); returns (configs, exit code, stderr)."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            cfgs, _, _ = mt.parse_config(*(configs or (mt.TransformerConfig(), mt.TrainConfig())), argv=list(argv))
        return cfgs, 0, ""
    except SystemExit as e:
        return None, e.code, err.getvalue()


def test_cli_flags_bools_and_errors():
    """K1-K4: exact field names, --flag/--no-flag bools, typed values, one-line errors with exit 2."""
    (m, t), code, _ = parse("--n_layers", "6", "--bias", "--learning_rate", "1e-3", "--ffn", "swiglu", "--compile")
    assert code == 0 and (m.n_layers, m.bias, m.ffn, t.learning_rate, t.compile) == (6, True, "swiglu", 1e-3, True)
    (m, t), code, _ = parse("--no-bias", "--no-compile")
    assert (m.bias, t.compile) == (False, False), "--no-flag did not turn the bool off"
    for argv, words in [(("--n_layers", "two"), "invalid int"), (("--d_model", "100", "--n_heads", "3"), "divisible"),
                        (("--warmup_steps", "50", "--max_steps", "50"), "warmup_steps"), (("--bias", "False"), "unrecognized"),
                        (("--ffn", "gelu"), "ffn"), (("--nlayers", "2"), "unrecognized"), (("--batch_size", "6", "--grad_accum", "4"), "divisible"),
                        (("--beta2", "1.5"), "beta2"), (("--weight_decay", "-0.1"), "weight_decay"), (("--eval_batches", "0"), "eval_batches")]:
        _, code, err = parse(*argv)
        assert code == 2, f"{argv}: exit code {code}, expected 2"
        assert words in err and err.count("\n") == 1, f"{argv}: expected one line mentioning {words!r}, got {err!r}"
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        mt.parse_config(mt.TransformerConfig(), mt.TrainConfig(), argv=["--help"])
    assert "TransformerConfig" in out.getvalue() and "--no-bias" in out.getvalue(), "--help lacks groups or bools"
    assert "context length T in tokens" in out.getvalue(), "--help lacks the fields' comments"


# ----------------------------------------------------------------------------------------------------
# D. Data preparation against a local HTTP server


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
    """D1/D2/D4: a download is checked (HTTP errors, HTML pages, checksums) and bad input leaves nothing."""
    import hashlib

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
# X. The scripts as a user runs them


def run_script(*args, cwd):
    env = {**os.environ, "PYTHONWARNINGS": "always"}
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=120)


def run_scripts(calls, cwd):
    """run_script() for each argument list in calls, as many at a time as there are cores: most of a
    short run is Python importing torch (about 3 s), and independent runs need not wait for each other."""
    with ThreadPoolExecutor(os.cpu_count() or 2) as pool:
        return list(pool.map(lambda args: run_script(*args, cwd=cwd), calls))


def test_command_line_runs_cleanly():
    """X1/X3/C5: prepare, train, resume and --eval_only from the command line on the CPU print no
    warnings, and user mistakes end in one line, not a traceback."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "corpus.txt").write_text(TEXT, encoding="utf-8")
        prep = run_script(HERE / "prepare_shakespeare.py", "--source", "corpus.txt", "--data_dir", "data", cwd=tmp)
        assert prep.returncode == 0 and prep.stderr == "", f"prepare failed: {prep.stderr}"
        small = ["--data_dir", "data", "--n_layers", "1", "--d_model", "32", "--block_size", "16", "--batch_size", "4",
                 "--eval_interval", "5", "--log_interval", "5", "--warmup_steps", "2", "--sample_chars", "20", "--device", "cpu"]
        first = run_script(HERE / "mini_transformer.py", *small, "--max_steps", "10", cwd=tmp)
        assert first.returncode == 0 and first.stderr == "", f"training failed or warned: {first.stderr}"
        assert "step 10/10 | loss" in first.stdout and "ms/step" in first.stdout and re.search(r"\| eta \d+m[0-5]\ds\n", first.stdout), first.stdout
        more = run_script(HERE / "mini_transformer.py", *small, "--max_steps", "15", "--resume", cwd=tmp)
        assert more.returncode == 0 and "step 15 | train" in more.stdout, f"resume failed: {more.stderr}"
        assert re.search(r"trained steps 10 to 15 in \d+m[0-5]\ds", more.stdout), f"no total time: {more.stdout}"
        (tmp / "vit").mkdir()
        torch.save({"vit_config": {"patch_size": 7}, "model": {}}, tmp / "vit" / "best.pt")  # another script's checkpoint
        (tmp / "damaged").mkdir()
        for name in ("meta.json", "train.bin", "val.bin"):  # val.bin cut in the middle of a token id
            data = (tmp / "data" / name).read_bytes()
            (tmp / "damaged" / name).write_bytes(data[:-1] if name == "val.bin" else data)
        cases = [(["--resume", "--d_model", "64"], "d_model"), (["--data_dir", "nowhere"], "prepare_shakespeare.py"),
                 (["--device", "tpu"], "device"), (["--eval_only", "--out_dir", "none"], "not found"),
                 (["--eval_only", "--out_dir", "vit"], "not a mini_transformer.py checkpoint"),
                 (["--data_dir", "data", "--out_dir", "corpus.txt"], "cannot write to corpus.txt"),
                 (["--data_dir", "damaged"], "is damaged"),
                 (["--resume", "--data_dir", "data", "--max_steps", "12", "--warmup_steps", "2"], "past --max_steps 12")]
        ev, offline, *bad_runs = run_scripts([[HERE / "mini_transformer.py", "--eval_only", "--data_dir", "data"],
                                              [HERE / "prepare_shakespeare.py", "--source", "http://127.0.0.1:9/x.txt"],
                                              *([HERE / "mini_transformer.py", *args] for args, _ in cases)], cwd=tmp)
        assert ev.returncode == 0 and "val ppl" in ev.stdout, f"--eval_only failed: {ev.stderr}"
        assert offline.returncode == 1 and offline.stderr.count("\n") == 1, f"not one line: {offline.stderr}"
        for (args, words), bad in zip(cases, bad_runs):
            assert bad.returncode != 0 and words in bad.stderr, f"{args}: {bad.stderr}"
            assert "Traceback" not in bad.stderr and bad.stderr.count("\n") == 1, f"{args}: not one line: {bad.stderr}"


def test_sample_script_prompts_errors_and_interactive_loop():
    """S4/S6: sample.py streams from a checkpoint, rejects bad input in one line, and its interactive
    loop takes settings and prompts until quit."""
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
                              capture_output=True, text=True, timeout=60)
        assert loop.returncode == 0, f"interactive loop failed: {loop.stderr}"
        assert "temperature = 0.0" in loop.stdout and "max_new_tokens = 7" in loop.stdout, loop.stdout
        assert loop.stdout.count("hint:") == 2, f"expected hints for 'temp hot' and the unknown character: {loop.stdout}"
        assert loop.stdout.count("> ") == 6, f"the loop did not stop at quit: {loop.stdout!r}"
        long = subprocess.Popen([sys.executable, HERE / "sample.py", *ckpt, "--max_new_tokens", "10000000"], cwd=tmp,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        long.stdout.read(20)  # generation has started
        long.send_signal(signal.SIGINT)
        _, err = long.communicate(timeout=60)
        assert long.returncode == 130 and err.strip() == "interrupted", f"Ctrl-C while sampling: {long.returncode} {err!r}"


def test_ctrl_c_after_the_last_step():
    """C5/X3: a Ctrl-C during the last evaluation is not lost (the run saves, says how to resume and
    skips the end-of-run sample); one during the sample, outside fit(), ends the script with one line
    and exit status 130, not a traceback."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_corpus(tmp)
        calls, real_estimate = [], mt.estimate_loss

        def estimate_then_ctrl_c(*args):
            calls.append(1)
            if len(calls) == 5:  # evaluations at steps 0, 10 and 20 take two calls each: 5 is in the last
                signal.raise_signal(signal.SIGINT)
            return real_estimate(*args)

        out, code = io.StringIO(), None
        mt.estimate_loss = estimate_then_ctrl_c
        try:
            with contextlib.redirect_stdout(out):
                mt.train(tiny_config(vocab_size=0), tiny_train_config(tmp, sample_chars=50))
        except SystemExit as e:
            code = e.code
        finally:
            mt.estimate_loss = real_estimate
        assert "interrupted: saved step 20" in out.getvalue() and "-" * 40 not in out.getvalue(), out.getvalue()
        assert code == 130, f"a run stopped by Ctrl-C exited with {code}, not 130"
        assert mt.load_checkpoint(tmp / "out" / "ckpt.pt")["step"] == 20, "the last step was not saved"
        args = ["--data_dir", "data", "--out_dir", "cli", "--n_layers", "1", "--d_model", "32", "--block_size", "16",
                "--max_steps", "10", "--warmup_steps", "2", "--eval_interval", "10", "--sample_chars", "10000000"]
        run = subprocess.Popen([sys.executable, HERE / "mini_transformer.py", *args], cwd=tmp, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        while not run.stdout.readline().startswith("step 10 | train"):  # the last evaluation; the sample comes next
            assert run.poll() is None, f"the run ended early: {run.stderr.read()}"
        time.sleep(1.0)
        run.send_signal(signal.SIGINT)
        _, err = run.communicate(timeout=60)
        assert run.returncode == 130 and err.strip() == "interrupted", f"Ctrl-C in the sample: {run.returncode} {err!r}"


def test_ddp_on_two_cpu_processes_equals_one_process_accumulating():
    """P1/O1/O2: torchrun with 2 CPU processes (gloo), each taking half of every global batch, ends with
    the parameters of one process accumulating the same batch in 2 micro-steps; only rank 0 prints."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_corpus(tmp)
        args = ["mini_transformer.py", "--data_dir", str(tmp / "data"), "--n_layers", "1", "--d_model", "32", "--block_size", "16",
                "--batch_size", "8", "--max_steps", "6", "--eval_interval", "3", "--log_interval", "2", "--warmup_steps", "1",
                "--sample_chars", "0", "--device", "cpu"]
        one = run_script(*args, "--grad_accum", "2", "--out_dir", str(tmp / "one"), cwd=HERE)
        assert one.returncode == 0, f"single process failed: {one.stderr}"
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args,
                              "--out_dir", str(tmp / "two")], cwd=HERE, capture_output=True, text=True, env=env, timeout=180)
        assert two.returncode == 0, f"torchrun failed: {two.stderr[-2000:]}"
        assert two.stdout.count("step 6 | train") == 1 and "x 2 |" in two.stdout, f"not printed once by rank 0: {two.stdout}"
        a = torch.load(tmp / "one" / "ckpt.pt", weights_only=True)["model"]
        b = torch.load(tmp / "two" / "ckpt.pt", weights_only=True)["model"]
        for name in a:
            assert max_diff(a[name], b[name]) < 1e-5, f"{name} differs between DDP and accumulation by {max_diff(a[name], b[name]):.2e}"


# ----------------------------------------------------------------------------------------------------
# V. The Vision Transformer


def tiny_vit(**kw):
    import vit

    return vit.ViT(vit.ViTConfig(**{"patch_size": 7, "n_layers": 2, "n_heads": 4, "d_model": 32, "d_ff": 64, **kw}))


def test_vit_patch_embedding_paths_agree():
    """V1: the strided Conv2d and the explicit reshape + Linear embed patches identically, and the
    reshape puts pixel (row, col) of patch (i, j) where an explicit loop does."""
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
    """A8/V2: in the ViT the last patch changes the first patch's output (the LM test checks the
    opposite); logits are (B, 10), and a few steps on a fixed batch lower the loss."""
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
    optimizer = mt.make_optimizer(model, mt.TrainConfig(learning_rate=3e-3))
    batch = (torch.randn(16, 1, 28, 28), torch.randint(10, (16,)))
    first = mt.train_step(model, optimizer, batch)[0].item()
    for _ in range(30):
        last = mt.train_step(model, optimizer, batch)[0].item()
    assert last < 0.5 * first, f"loss went from {first:.3f} to {last:.3f} in 30 steps on one batch"


def test_vit_cli_rejects_bad_values():
    """K3 for vit.py: a patch that does not divide 28 or a negative --predict is one line and exit 2;
    a cut-short array file is one line too, not numpy's traceback."""
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
        try:
            vit.load_mnist(tmp, torch.device("cpu"))
            message = "no error"
        except SystemExit as e:
            message = str(e.code)
        assert "is damaged" in message and "\n" not in message, f"cut-short file: {message!r}"


def test_vit_label_smoothing_in_training_only():
    """Label smoothing s trains on targets (1 - s) one-hot + s/10 everywhere; eval mode, and so the
    test loss we report, stays the plain cross-entropy."""
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


def test_vit_shifted_batches_keep_the_digits():
    """Augmentation shifts each image by at most max_shift pixels and keeps every pixel value."""
    import vit

    images = torch.zeros(4, 28, 28, dtype=torch.uint8)
    images[:, 10:18, 10:18] = 255
    x, y = vit.image_batch((images, torch.arange(4)), 64, torch.Generator().manual_seed(0), max_shift=2)
    bright = (x > 0).squeeze(1)  # (B, 28, 28)
    assert x.shape == (64, 1, 28, 28) and bright.sum(dim=(1, 2)).eq(64).all(), "a shift lost or added pixels"
    rows = bright.any(dim=2).float().argmax(dim=1)
    assert rows.min() == 8 and rows.max() == 12, f"shifts reach rows {rows.min()}..{rows.max()}, expected 8..12"


def test_prepare_mnist_mirrors_checksums_and_idx_headers():
    """D4/D5: the first mirror failing and the second serving works; HTML pages, corrupted and
    truncated files and wrong IDX headers are refused, and nothing is written."""
    import gzip
    import hashlib

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


def test_bench_flop_count_and_json():
    """The analytic FLOP count equals a hand count and PyTorch's own counter; the fraction of the peak
    is step FLOP/s over peak FLOP/s, the peak being the fastest matmul of the step's precision (oneDNN's
    fp32 matmul is a @ b.T in fp32); bench.py --only matmul and a one-step --only train,vit run on the
    CPU and write valid JSON records; each figure's peak memory is its own, not the process's so far."""
    import bench
    from torch.utils.flop_counter import FlopCounterMode

    model = mt.MiniTransformer(tiny_config(attn="explicit"))
    weights = 2 * (4 * 32 * 32 + 2 * 32 * 64) + 17 * 32  # per layer q, k, v, out, fc1, fc2; then the head
    by_hand = 3 * (2 * weights + 2 * 2 * 2 * 16 * 32) * 2 * 16  # 3 x (weights + 2 layers of QK^T, att V) x B T
    assert bench.train_flops(model, 2, 16) == by_hand, f"{bench.train_flops(model, 2, 16)} FLOPs, by hand {by_hand}"
    counter = FlopCounterMode(display=False)
    with counter:
        model(torch.randint(17, (2, 16)), torch.randint(17, (2, 16)))[1].backward()
    assert counter.get_total_flops() == by_hand, f"PyTorch counts {counter.get_total_flops()}, by hand {by_hand}"
    # A step of 4 FLOPs in 10 ms against a "peak" of 1 FLOP in 20 ms: 8 times the peak; 16 times one in 40 ms.
    peaks = [("matmul/sleep", lambda: time.sleep(0.02), 1), ("matmul/slower", lambda: time.sleep(0.04), 1)]
    fracs = bench.timed_against_peak(lambda: time.sleep(0.01), 4, peaks, torch.device("cpu"), 3, 1)[3]
    assert fracs["peak"] == "matmul/sleep" and 7 < fracs["frac_peak"] < 9, f"fraction of the peak {fracs}, expected about 8"
    assert 14 < fracs["frac_by_peak"]["matmul/slower"] < 18, f"fraction of the second peak {fracs}, expected about 16"
    a, b = torch.randn(64, 32), torch.randn(48, 32)
    onednn = bench.onednn_fp32_matmul(a, b)
    if onednn:  # where this PyTorch has oneDNN: a @ b.T, in fp32 (bf16 would be off by about 1e-2 here)
        torch.testing.assert_close(onednn(), a @ b.T, rtol=1e-5, atol=1e-5)
    with tempfile.TemporaryDirectory() as tmp:
        tiny = ["--repeats", "1", "--warmup", "0", "--batch_size", "2", "--n_layers", "1", "--d_model", "32", "--block_size", "16"]
        sections = ("matmul", "train,vit")  # the second in fp32: on the CPU it has two matmuls to choose its peak from
        *runs, bad, folder = run_scripts([*([HERE / "bench.py", "--only", only, "--device", "cpu", "--json", f"{i}.json", *tiny,
                                             *(["--precision", "fp32"] if i else [])] for i, only in enumerate(sections)),
                                          [HERE / "bench.py", "--json", "no/such/folder/out.json"],  # refused before any timing
                                          [HERE / "bench.py", "--only", "matmul", "--json", ".", *tiny]], cwd=tmp)  # a folder
        for i, (only, run) in enumerate(zip(sections, runs)):
            assert run.returncode == 0 and run.stderr == "", f"bench.py --only {only} failed: {run.stderr}"
            records = json.loads((Path(tmp) / f"{i}.json").read_text(encoding="utf-8"))
            assert records and all({"name", "device", "ms_median"} <= set(r) for r in records), records
        names = [r["name"] for r in records]
        assert names[:1] == ["matmul/fp32"] and "train/lab" in names, f"records {names}"
        lab = records[names.index("train/lab")]
        assert 0 < lab["frac_peak"], "no fraction of peak for the train step"
        matmuls = [r for r in records if r["name"].startswith(f"matmul/{lab['precision']}")]  # of the step's precision
        fastest = max(matmuls, key=lambda r: r["gflops"])
        assert lab["peak"] == fastest["name"], f"read against {lab['peak']}, not the fastest matmul {fastest['name']}"
        assert set(lab["frac_by_peak"]) == {r["name"] for r in matmuls}, f"not read against each matmul: {lab['frac_by_peak']}"
        assert bench.resource is None or records[names.index("train/lab")]["peak_mem_mb"] > 0, "no peak memory"
        long = subprocess.Popen([sys.executable, HERE / "bench.py", "--only", "matmul,generate", "--device", "cpu", "--json", "cut.json",
                                 "--gen_chars", "1000000", *tiny], cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for line in long.stdout:  # Ctrl-C once the first figure is out, during the long generation
            if line.startswith("matmul/fp32"):
                break
        long.send_signal(signal.SIGINT)
        _, err = long.communicate(timeout=60)
        cut = json.loads((Path(tmp) / "cut.json").read_text(encoding="utf-8"))
        assert long.returncode == 130 and "interrupted" in err and "Traceback" not in err, f"Ctrl-C: {long.returncode} {err!r}"
        assert cut and all(r["name"].startswith("matmul/") for r in cut), f"the figures measured before Ctrl-C were not kept: {cut}"
        assert bad.returncode == 2 and "does not exist" in bad.stderr, f"bad --json folder: {bad.returncode} {bad.stderr!r}"
        assert folder.returncode == 1 and folder.stderr.startswith("error: cannot write .") and folder.stderr.count("\n") == 1, \
            f"--json naming a folder: {folder.returncode} {folder.stderr!r}"
        assert names[-1] == "vit/train" and records[-1]["images_per_s"] > 0, f"no ViT figure in {names}"
    if Path("/proc/self/clear_refs").exists():  # Linux: each figure gets its own peak, not the process's so far
        cpu = torch.device("cpu")
        torch.ones(2**26).sum()  # 256 MB, freed again at once
        before = bench.peak_memory_mb(cpu)["peak_mem_mb"]
        bench.reset_peak_memory(cpu)
        after = bench.peak_memory_mb(cpu)["peak_mem_mb"]
        assert after < before - 200, f"peak memory {before:.0f} MB, {after:.0f} MB after the reset"
    # The attention section must time two different computations: the sdpa figure calls the fused kernel.
    calls, sdpa = [], F.scaled_dot_product_attention
    cfg = bench.BenchConfig(only="attention", batch_size=2, repeats=1, warmup=0)
    try:
        F.scaled_dot_product_attention = lambda *a, **k: calls.append(1) or sdpa(*a, **k)
        records = bench.bench_attention(torch.device("cpu"), cfg, tiny_config(dropout=0.1))
    finally:
        F.scaled_dot_product_attention = sdpa
    assert [r["name"] for r in records] == ["attention/explicit", "attention/sdpa"] and calls, "SDPA never ran"


FAULTS_PER_STEP = """
import resource, torch
import mini_transformer as mt
torch.manual_seed(0)
model = mt.MiniTransformer(mt.TransformerConfig(vocab_size=65))
optimizer = mt.make_optimizer(model, mt.TrainConfig())
batch = (torch.randint(65, (8, 128)), torch.randint(65, (8, 128)))
def faults_per_step(n=8):
    for _ in range(3):
        mt.train_step(model, optimizer, batch)
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(n):
        mt.train_step(model, optimizer, batch)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start) / n
before = faults_per_step()
pinned = mt.keep_freed_memory()
print(before, faults_per_step(), pinned)
"""


def test_training_steps_reuse_freed_memory():
    """After keep_freed_memory() (as fit() and bench.py call it), a training step of the default model
    reuses the memory the previous step freed instead of faulting fresh pages in (Linux with glibc;
    in a fresh process, since the setting is process-wide)."""
    if sys.platform != "linux":
        print("skipped: Linux only")
        return
    run = subprocess.run([sys.executable, "-c", FAULTS_PER_STEP], cwd=HERE, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    before, after, pinned = run.stdout.split()
    if pinned == "False":
        print("skipped: not glibc")
        return
    assert float(after) < 200, f"{float(after):.0f} page faults per step with freed memory kept (before: {float(before):.0f})"


# ----------------------------------------------------------------------------------------------------


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
