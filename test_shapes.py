"""
How to test a Transformer: the model of mini_transformer.py (and vit.py's), in the order of that file.

    python test_shapes.py            # these tests; ends with "N passed, N failed, N skipped"
    python test_shapes.py -k cache   # only the tests whose name contains "cache"
    python -m pytest test_shapes.py test_runs.py

Each test compares the code with something simpler that must give the same answer (a per-head loop, PyTorch's
own attention, a full forward instead of the cache, the softmax), or checks a property that a known bug breaks;
its docstring names that bug. Tiny models on the CPU, fixed seeds. test_runs.py tests the runs.
"""

import argparse
import math
import sys
import time
import traceback
import unittest
from unittest import mock

import torch
import torch.nn.functional as F

import mini_transformer as mt
import plumbing
import vit

CPU = torch.device("cpu")
torch.set_num_threads(1)  # tiny models: one thread is faster than two, and not slowed by a busy machine


def tiny_config(**kw):
    """A 2-layer model small enough to run anything in milliseconds: V 17, T 16, C 32, H 4, d_k 8."""
    return mt.TransformerConfig(**{"vocab_size": 17, "block_size": 16, "n_layers": 2, "n_heads": 4, "d_model": 32,
                                   "d_ff": 64, **kw})


def tiny_vit(**kw):
    return vit.ViT(vit.ViTConfig(**{"n_layers": 2, "n_heads": 4, "d_model": 32, "d_ff": 64, **kw}))


def max_diff(a, b):
    return (a - b).abs().max().item()


def skip(reason):
    """End a test that cannot run here as skipped, with its reason (pytest and run_tests() both count it)."""
    raise unittest.SkipTest(reason)


# ----------------------------------------------------------------------------------------------------
# Shapes and the causal mask


def test_shapes_follow_the_readme_table():
    """Each tensor on the way from token ids to logits has the shape of the README's table, and a sequence
    longer than block_size is refused with a message instead of a shape mismatch deep in the position table,
    while generate() crops its context to block_size and goes on."""
    torch.manual_seed(0)
    model, (B, T, C, H, V) = mt.MiniTransformer(tiny_config()).eval(), (3, 16, 32, 4, 17)
    idx = torch.randint(V, (B, T))
    x = model.token_emb(idx) + model.pos_emb.weight[:T]  # the residual stream
    y, att = model.blocks[0].attn(x, return_weights=True)
    logits, loss = model(idx, idx)
    shapes = [tuple(t.shape) for t in (x, model.blocks[0].attn.qkv_proj(x), att, y, model.blocks[0](x), logits, loss)]
    assert shapes == [(B, T, C), (B, T, 3 * C), (B, H, T, T), (B, T, C), (B, T, C), (B, T, V), ()], f"shapes {shapes}"
    try:
        model(torch.zeros(1, T + 1, dtype=torch.long))
        raise AssertionError("a sequence longer than block_size was accepted")
    except ValueError as e:
        assert "block_size" in str(e), f"unhelpful message: {e}"
    assert model.generate(torch.zeros(1, 15, dtype=torch.long), 5, temperature=0).shape == (1, 20)


def test_causal_mask_hides_the_future_and_only_when_causal():
    """A causal mask that is missing, off by one or applied after the softmax lets a later token change the logits
    at earlier positions, on either attention path, in fp32 or under bf16 autocast; one applied regardless of
    causal=False (the ViT's block) keeps the last position from reaching the first."""
    idx = torch.randint(17, (2, 16), generator=torch.Generator().manual_seed(0))
    changed = idx.clone()
    changed[:, 9] = (changed[:, 9] + 1) % 17
    for attn in ("sdpa", "explicit"):
        torch.manual_seed(0)
        model = mt.MiniTransformer(tiny_config(attn=attn)).eval()
        for precision in ("fp32", "bf16"):
            with plumbing.autocast(CPU, precision):
                a, b = model(idx)[0], model(changed)[0]
            assert max_diff(a[:, :9], b[:, :9]) == 0, f"{attn}, {precision}: a later token leaked into earlier logits"
            assert max_diff(a[:, 9:], b[:, 9:]) > 0, f"{attn}, {precision}: the changed token had no effect at all"
        block = mt.TransformerBlock(tiny_config(attn=attn), causal=False).eval()
        x = torch.randn(1, 8, 32)
        y = x.clone()
        y[:, -1] = torch.randn(32)  # random, not a constant shift: LayerNorm removes those
        assert max_diff(block(x)[:, 0], block(y)[:, 0]) > 1e-4, f"{attn}: with causal=False the first ignores the last"


# ----------------------------------------------------------------------------------------------------
# Attention: the fast path, the explicit path and two references compute the same thing


def test_sdpa_matches_explicit_path_and_dropout_is_for_training_only():
    """SDPA computing other outputs or gradients than the explicit path (heads split with a bare view, the wrong
    scale), or drifting from it under bf16 autocast; attention dropout never applied in training or left on in eval
    (SDPA's dropout_p); evaluation and generation in train mode or with autograd, or leaving the model in eval mode.
    The CPU avoids SDPA under bf16 autocast and with dropout (slower there): sdpa_on_cpu tests it there too."""
    torch.manual_seed(0)
    idx, targets = torch.randint(17, (3, 16)), torch.randint(17, (3, 16))
    explicit = mt.MiniTransformer(tiny_config(attn="explicit"))
    sdpa = mt.MiniTransformer(tiny_config(attn="sdpa"))
    sdpa.load_state_dict(explicit.state_dict())
    assert max_diff(explicit(idx)[0], sdpa(idx)[0]) < 1e-5, "the train-mode forwards differ"
    explicit(idx, targets)[1].backward()
    sdpa(idx, targets)[1].backward()
    for (name, p), q in zip(explicit.named_parameters(), sdpa.parameters()):
        assert max_diff(p.grad, q.grad) < 1e-5, f"the gradient of {name} differs by {max_diff(p.grad, q.grad):.2e}"
    sdpa_everywhere = mock.patch.object(mt.CausalSelfAttention, "sdpa_on_cpu", True)
    with sdpa_everywhere, torch.no_grad(), plumbing.autocast(CPU, "bf16"):
        low = [m(idx)[0] for m in (explicit, sdpa)]
    assert low[0].dtype == torch.bfloat16, f"bf16 autocast left the logits in {low[0].dtype}"
    assert 0 < max_diff(low[0].float(), low[1].float()) < 0.05, "under bf16 autocast the two paths differ (or are one)"
    assert max_diff(low[1].float(), sdpa(idx)[0]) < 0.05, "bf16 logits differ from fp32 beyond rounding"
    explicit, sdpa = (mt.MiniTransformer(tiny_config(attn=a, dropout=0.5)) for a in ("explicit", "sdpa"))
    sdpa.load_state_dict(explicit.state_dict())
    for model in (explicit, sdpa):
        attn, x = model.blocks[0].attn, torch.randn(2, 8, 32)
        attn.resid_dropout = torch.nn.Identity()  # left: the dropout on the attention weights
        with sdpa_everywhere:
            assert not torch.equal(attn(x), attn(x)), f"{model.cfg.attn}: no attention dropout in training"
        seen = []
        hook = model.register_forward_hook(lambda m, args, out: seen.append((m.training, torch.is_grad_enabled())))
        mt.estimate_loss(model, torch.randint(17, (200,)), 16, 2, n_batches=2)
        model.generate(idx[:1, :4], 3)
        hook.remove()
        assert set(seen) == {(False, False)} and model.training, f"(train mode, autograd) while evaluating: {seen}"
        out = model.eval()(idx)[0]
        assert torch.equal(out, model(idx)[0]), f"{model.cfg.attn}: eval mode is random with dropout > 0"
    assert max_diff(out, explicit(idx)[0]) < 1e-5, "the eval-mode paths differ"


def test_attention_equals_a_per_head_loop_and_pytorchs_attention():
    """Heads split with a bare view (mixing time steps and heads), scores scaled by 1/sqrt(d_model), not 1/sqrt(d_k),
    differ from a plain loop over the heads; with the same weights, both paths differ from nn.MultiheadAttention
    when q, k, v or their biases come from the wrong rows of the fused projection, the mask is wrong (causal or
    not), or the weights are not each head's softmax."""
    torch.manual_seed(0)
    attn = mt.CausalSelfAttention(tiny_config(attn="explicit")).eval()
    x = torch.randn(2, 10, 32)
    wq, wk, wv = attn.qkv_proj.weight.split(32)  # each (C, C): rows are output channels
    d_k, heads = 8, []
    for h in range(4):
        rows = slice(h * d_k, (h + 1) * d_k)
        q, k, v = x @ wq[rows].T, x @ wk[rows].T, x @ wv[rows].T  # (B, T, d_k)
        scores = (q @ k.transpose(1, 2) / math.sqrt(d_k)).masked_fill(torch.ones(10, 10).triu(1).bool(), float("-inf"))
        heads.append(scores.softmax(-1) @ v)
    expected = torch.cat(heads, dim=-1) @ attn.out_proj.weight.T
    y, weights = attn(x, return_weights=True)
    assert max_diff(y, expected) < 1e-5, f"attention differs from the per-head loop by {max_diff(y, expected):.2e}"
    assert max_diff(weights.sum(-1), torch.ones(2, 4, 10)) < 1e-5, "attention rows do not sum to 1"
    attn.path = "sdpa"
    assert max_diff(attn(x), y) < 1e-5, "the SDPA path differs from the per-head loop"
    x = torch.randn(3, 12, 32, generator=torch.Generator().manual_seed(1))
    for causal in (True, False):
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
            attn.path = "sdpa"
            fused = attn(x)
        for name, diff in (("explicit", max_diff(y, expected)), ("weights", max_diff(weights, expected_weights)),
                           ("sdpa", max_diff(fused, expected))):
            assert diff < 1e-5, f"causal={causal}: the {name} path differs from MultiheadAttention by {diff:.2e}"


# ----------------------------------------------------------------------------------------------------
# Initialisation and weight tying


def test_weight_tying_and_a_single_init():
    """The head and the embedding come untied (or untie after .to() and loading), the tied matrix is initialised
    twice (the module visited last wins), num_params() counts it twice, or bias=False leaves a bias somewhere."""
    model = mt.MiniTransformer(tiny_config())
    assert model.lm_head.weight is model.token_emb.weight, "lm_head and token_emb are not tied"
    assert not [n for n, _ in model.named_parameters() if n.endswith("bias")], "bias=False, and yet biases"
    with mock.patch.object(torch.nn.init, "normal_", wraps=torch.nn.init.normal_) as normal:
        mt.init_weights(model, model.cfg.n_layers)
    seen = [call.args[0].data_ptr() for call in normal.call_args_list]  # the tensors drawn, by address
    assert len(seen) == len(set(seen)), "a tensor was initialised twice (the tied matrix?)"
    assert model.token_emb.weight.data_ptr() in seen, "the tied matrix was never initialised"
    distinct = {t.data_ptr(): t.numel() for t in model.state_dict().values()}  # the tied matrix under two names
    assert model.num_params() == sum(distinct.values()), "num_params() counts the tied matrix twice"
    copy = mt.MiniTransformer(tiny_config()).to(torch.float64).to(torch.float32)
    copy.load_state_dict(model.state_dict())
    assert copy.lm_head.weight is copy.token_emb.weight, "tying lost after .to() and load_state_dict"
    assert torch.equal(copy.lm_head.weight, model.token_emb.weight), "the loaded tied matrix differs"


def test_scaled_init_on_every_residual_output():
    """The GPT-2 scaled init 0.02/sqrt(2 n_layers) missing a residual output projection (out_proj, or the active
    FFN's down projection: SwiGLU's w2 where only fc2 is looked for) or reaching another layer; a SwiGLU FFN at the
    full d_ff (three matrices) with half again ReLU's parameters; an init so large that a fresh model is confident,
    its loss far from ln(vocab_size), the loss of a uniform guess."""
    torch.manual_seed(0)
    for ffn, down in (("relu", "fc2"), ("swiglu", "w2")):
        model = mt.MiniTransformer(tiny_config(d_model=256, d_ff=1024, n_layers=8, ffn=ffn))
        scaled = 0.02 / math.sqrt(2 * 8)
        for i, block in enumerate(model.blocks):
            for name, m in [(n, m) for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)]:
                std, want = m.weight.std().item(), scaled if name in ("attn.out_proj", f"ffn.{down}") else 0.02
                assert abs(std - want) < 0.05 * want, f"{ffn} block {i} {name}: std {std:.4f}, expected {want:.4f}"
        std = model.token_emb.weight.std().item()
        assert abs(std - 0.02) < 0.002, f"token embedding std {std:.4f}, not 0.02 (left at nn.Embedding's N(0, 1)?)"
    relu, swiglu = (mt.MiniTransformer(mt.TransformerConfig(vocab_size=65, ffn=f)) for f in ("relu", "swiglu"))
    assert abs(swiglu.num_params() / relu.num_params() - 1) < 0.02, f"SwiGLU {swiglu.num_params():,} parameters"
    _, loss = relu(torch.randint(65, (8, 64)), torch.randint(65, (8, 64)))  # a fresh model guesses uniformly
    assert abs(loss.item() - math.log(65)) < 0.3, f"initial loss {loss.item():.3f}, not about ln 65 = 4.17"


# ----------------------------------------------------------------------------------------------------
# Generation: the KV cache and sampling


def test_kv_cache_generates_the_same_tokens():
    """SDPA's top-left causal mask with cached keys (one new query sees only key 0), or a wrong offset
    mask for several new tokens at once, makes cached generation differ from the plain one; a full cache
    must be rebuilt from the last block_size // 2 tokens, the window stream() promises, to go on past block_size."""
    for attn in ("sdpa", "explicit"):
        torch.manual_seed(0)
        model = mt.MiniTransformer(tiny_config(attn=attn)).eval()
        idx = torch.randint(17, (2, 16))
        cache = [{} for _ in model.blocks]  # feed 5 tokens, then 4 at once (offset mask), then one by one
        pieces = [model(idx[:, :5], kv_cache=cache)[0], model(idx[:, 5:9], kv_cache=cache)[0]]
        pieces += [model(idx[:, t : t + 1], kv_cache=cache)[0] for t in range(9, 16)]
        diff = max_diff(torch.cat(pieces, dim=1), model(idx)[0])
        assert diff < 1e-5 and cache[0]["len"] == 16, f"{attn}: cached logits differ from a full forward by {diff:.2e}"
        for n_prompt in (1, 15):
            prompt = torch.randint(17, (2, n_prompt))
            plain, cached = (model.generate(prompt, 16 - n_prompt, temperature=0, kv_cache=c) for c in (False, True))
            assert torch.equal(plain, cached), f"{attn}, prompt {n_prompt}: cached tokens differ from plain ones"
        seen, real_sample = [], mt.sample_next  # seen: the logits each new token was drawn from
        with mock.patch.object(mt, "sample_next", lambda logits, *a: seen.append(logits) or real_sample(logits, *a)):
            long = model.generate(torch.zeros(1, 1, dtype=torch.long), 30, temperature=0)
        # full at 16 tokens, the cache is rebuilt from the last 8: token 17 is read from tokens 9-16, 25 from 9-24
        diffs = [max_diff(seen[t - 1], model(long[:, first:t])[0][:, -1]) for t, first in ((17, 9), (25, 9), (26, 18))]
        assert max(diffs) < 1e-5, f"{attn}: tokens 17, 25, 26 not read from those tokens; logits off by {diffs}"


def test_sampling_follows_the_softmax_to_its_edges():
    """sample_next() drawing with other probabilities than the softmax of logits / temperature (the temperature
    applied twice or not at all) or top_k keeping more or fewer than the k likeliest (40,000 draws
    within 5 standard errors); temperature 0 giving NaN or depending on the seed, a tiny one overflowing to inf, a
    near-tie with the k-th drawn (merged by the rounding of a shift or a division), a top_k beyond the vocabulary
    raising in torch.topk, or ids drawn from a table padded beyond the vocabulary instead of below vocab_limit."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -30.0]]).repeat(40_000, 1)
    for top_k in (0, 3):
        draws = mt.sample_next(logits, 2.0, top_k=top_k, generator=torch.Generator().manual_seed(0)).flatten()
        kept = logits[0, : top_k or 5] / 2.0
        expected = F.pad(kept.softmax(-1), (0, 5 - len(kept)))
        freq = torch.bincount(draws, minlength=5).float() / len(draws)
        tolerance = 5 * (expected * (1 - expected) / len(draws)).sqrt() + 1e-4
        assert ((freq - expected).abs() <= tolerance).all(), f"top_k {top_k}: {freq.tolist()}, not {expected.tolist()}"
    torch.manual_seed(0)
    model, prompt = mt.MiniTransformer(tiny_config(vocab_size=64)), torch.zeros(1, 1, dtype=torch.long)
    greedy = [model.generate(prompt, 20, temperature=0, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    assert torch.equal(*greedy), "temperature 0 depends on the seed"
    assert model.generate(prompt, 5, top_k=1000).shape == (1, 6), "top_k larger than the vocabulary failed"
    for temperature in (1e-39, 1e-30):  # the logits divided by it overflow to inf, and the softmax gives NaN
        token = mt.sample_next(torch.tensor([[3.0, 1.0, 2.0]]), temperature, generator=torch.Generator().manual_seed(0))
        assert token.item() == 0, f"temperature {temperature}: sampled {token.item()}, not the most likely token"
    near = torch.tensor([[5.0, -3.0, -3.0000002]]).expand(50000, 3)  # top_k 2 must never draw token 2
    drawn = mt.sample_next(near, 2.0, top_k=2, generator=torch.Generator().manual_seed(0))[:, 0].bincount(minlength=3)
    assert drawn[1] > 0 and drawn[2] == 0, f"top_k 2 of {near[0].tolist()}: drawn {drawn.tolist()}"
    assert model.generate(prompt, 100, temperature=2.0).max() >= 17, "without a limit, padded ids should come up here"
    for kv_cache in (True, False):
        ids = model.generate(prompt, 100, temperature=2.0, kv_cache=kv_cache, vocab_limit=17)
        assert ids.max() < 17, f"kv_cache={kv_cache}: sampled id {ids.max().item()} beyond the 17 characters"


def test_nucleus_sampling_keeps_the_smallest_likely_set():
    """top_p drawing tokens outside the smallest set of likeliest tokens that holds top_p of the
    probability, or never drawing some inside it; a top_p of 0 or 1e-9 keeping no token at all (NaN, or a
    draw from everything) instead of the most likely one; or of two tokens tied at the edge of the nucleus
    only the one that the sort happened to put first ever drawn."""
    torch.manual_seed(0)
    logits = torch.randn(1, 17) * 3
    probs = logits.softmax(-1)[0].sort(descending=True)
    nucleus = set(probs.indices[: int((probs.values.cumsum(0) < 0.7).sum()) + 1].tolist())  # reaches 0.7
    drawn = {mt.sample_next(logits, 1.0, 0, 0.7, torch.Generator().manual_seed(s)).item() for s in range(200)}
    assert drawn == nucleus and len(nucleus) > 1, f"drew {drawn} from the nucleus {nucleus}"
    for top_p in (0.0, 1e-9):
        got = mt.sample_next(logits.repeat(5, 1), 1.0, 0, top_p, torch.Generator().manual_seed(0))
        assert (got == logits.argmax()).all(), f"top_p={top_p} drew {got.flatten().tolist()}, not the argmax"
    tied = torch.tensor([[9.0, 0, 0, 0], [2.0, 1.0, 1.0, -1.0]]).repeat(4000, 1)  # ~1, 0, 0, 0; 0.56, 0.21, 0.21, 0.03
    drawn = mt.sample_next(tied, 1.0, 0, 0.6, torch.Generator().manual_seed(0)).flatten()
    counts = drawn[1::2].bincount(minlength=4)  # the first row keeps its top token only: each row has its nucleus
    assert counts[3] == 0 and min(counts[1:3]) > 0.7 * max(counts[1:3]), f"top_p 0.6 inside a tie: counts {counts}"
    assert (drawn[::2] == 0).all(), "a row's nucleus decided by another row"


# ----------------------------------------------------------------------------------------------------
# Data: batches and evaluation


def test_batches_are_shifted_windows_and_eval_covers_the_split():
    """Targets that are not the next tokens, windows that never reach an end of the data or run past it; a
    whole-split evaluation skipping or repeating tokens, fixed-batch evaluation drawing other windows at each call
    or from the training RNG, or train mode not restored afterwards."""
    x, y = mt.get_batch(torch.arange(20), 16, 200, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (200, 16) and torch.equal(y, x + 1), "targets are not the next tokens"
    assert y.max() == 19 and x.min() == 0, "the windows never reach one end of the data"
    torch.manual_seed(0)
    model, data = mt.MiniTransformer(tiny_config()), torch.randint(17, (16 * 5 + 7,))
    total, count = 0.0, 0
    for start in range(0, len(data) - 1, 16):  # the same windows, one at a time
        y = data[start + 1 : start + 17][None]
        total += model.eval()(data[start : start + y.size(1)][None], y)[1].item() * y.numel()
        count += y.numel()
    whole = mt.estimate_loss(model.train(), data, 16, 3)
    assert count == len(data) - 1 and abs(whole - total / count) < 1e-5, f"whole split {whole:.5f}, {total / count:.5f}"
    assert model.training, "estimate_loss did not restore train mode"
    state = torch.get_rng_state()
    a, b = (mt.estimate_loss(model, data, 16, 4, n_batches=3) for _ in range(2))
    assert a == b and torch.equal(state, torch.get_rng_state()), "fixed batches differ or use the global RNG"


# ----------------------------------------------------------------------------------------------------
# The optimizers and one training step


def test_muon_orthogonalises_the_momentum():
    """Newton-Schulz that does not converge (coefficients wrong, the norm not scaled first) leaves the singular
    values of Muon's update spread out instead of in the band around 1 where five quintic steps put them, or
    changes the singular vectors, which must stay the momentum's; Muon's step must be its definition written out:
    Nesterov momentum, decoupled weight decay, the shape scaling sqrt(max(1, rows / cols)), the given dtype."""
    torch.manual_seed(0)
    for rows, cols in ((96, 32), (32, 96), (48, 48)):
        n = min(rows, cols)  # a gradient with singular values from 7 down to 0.07
        U, V = torch.linalg.qr(torch.randn(rows, n))[0], torch.linalg.qr(torch.randn(cols, n))[0]
        G = U @ torch.diag(7 * torch.logspace(0, -2, n)) @ V.T
        inner = U.T @ mt.newton_schulz(G) @ V  # diagonal if the result is U S' V^T, S' the new singular values
        s = inner.diagonal()
        assert 0.67 < s.min() and s.max() < 1.21, f"({rows}, {cols}): singular values {s.min():.3f}..{s.max():.3f}"
        assert max_diff(inner, torch.diag(s)) < 1e-4, f"({rows}, {cols}): the singular vectors changed"
        w, want, buf, mu = torch.nn.Parameter(torch.ones(rows, cols)), torch.ones(rows, cols), 0, 0.9
        opt = mt.Muon([w], lr=0.1, momentum=mu, weight_decay=0.5)
        for g in (G, torch.randn(rows, cols)):
            w.grad = g
            opt.step()
            buf = mu * buf + (1 - mu) * g  # the momentum, an average of gradients; Nesterov looks one step ahead:
            update = mt.newton_schulz((1 - mu) * g + mu * buf) * math.sqrt(max(1, rows / cols))
            want = (1 - 0.1 * 0.5) * want - 0.1 * update  # decay first, decoupled from the gradient
        assert max_diff(w.detach(), want) < 1e-5, f"({rows}, {cols}): Muon's step is not its definition"
    w = torch.nn.Parameter(torch.ones(rows, cols))
    w.grad = G  # the loop's last gradient, square
    mt.Muon([w], dtype=torch.bfloat16).step()
    diff = max_diff(w.detach(), 1 - 0.02 * mt.newton_schulz(G))  # lr 0.02, no decay by default
    assert 1e-6 < diff < 1e-3, f"bf16 Newton-Schulz differs from fp32 by {diff:.1e}: not run in bf16, or wrong"


def test_muon_equals_pytorchs_muon_in_bf16():
    """Our Muon is the algorithm of torch.optim.Muon (PyTorch 2.9 on), whose Newton-Schulz steps always
    run in bf16: given dtype bf16, three steps of both, with momentum, Nesterov, decay and the shape
    scaling, must end with the same weights (they do, to the last bit, as long as PyTorch's routine stays as
    it is); in fp32 the two may differ by bf16's rounding only."""
    if not hasattr(torch.optim, "Muon"):
        skip(f"torch.optim.Muon is not in PyTorch {torch.__version__} (2.9 on)")
    torch.manual_seed(0)
    for shape in ((96, 32), (32, 96)):
        start, grads, ends = torch.randn(shape) * 0.02, [torch.randn(shape) for _ in range(3)], []
        for make in (lambda w: torch.optim.Muon([w], lr=0.02, weight_decay=0.1, adjust_lr_fn="original"),
                     lambda w: mt.Muon([w], lr=0.02, weight_decay=0.1, dtype=torch.bfloat16),
                     lambda w: mt.Muon([w], lr=0.02, weight_decay=0.1)):
            w = torch.nn.Parameter(start.clone())
            opt = make(w)
            for g in grads:
                w.grad = g.clone()
                opt.step()
            ends.append(w.detach())
        moved = max_diff(ends[0], start)
        assert max_diff(ends[1], ends[0]) <= 1e-6 * moved, f"{shape}: bf16 steps differ by {max_diff(ends[1], ends[0])}"
        assert max_diff(ends[2], ends[0]) < 0.05 * moved, f"{shape}: fp32 steps differ beyond bf16 rounding"


def test_weight_decay_and_muon_take_the_right_parameters():
    """A parameter missing from the optimizers or updated twice (the tied matrix in two groups or both
    optimizers), LayerNorm gains and biases decayed towards 0, or Muon given embeddings, the tied head or
    1-D tensors, which are not maps between hidden states; or Muon not peaking at --muon_lr."""
    model = mt.MiniTransformer(tiny_config(bias=True, ffn="swiglu"))
    names = {id(p): n for n, p in model.named_parameters()}
    for optimizer in ("adamw", "muon"):
        optimizers = mt.make_optimizer(model, mt.TrainConfig(optimizer=optimizer))
        ids = [id(p) for opt in optimizers for group in opt.param_groups for p in group["params"]]
        assert sorted(ids) == sorted(names), f"{optimizer}: a parameter is missing or in two groups"
        decayed, plain = optimizers[0].param_groups
        assert decayed["weight_decay"] > 0 and plain["weight_decay"] == 0, f"{optimizer}: the plain group is decayed"
        assert all(p.dim() >= 2 for p in decayed["params"]) and all(p.dim() < 2 for p in plain["params"]), \
            f"{optimizer}: 1-D tensors are decayed"
    assert [type(o) for o in optimizers] == [torch.optim.AdamW, mt.Muon], f"--optimizer muon gave {optimizers}"
    in_muon = {names[id(p)] for p in optimizers[1].param_groups[0]["params"]}
    matrices = {n for n, p in model.named_parameters() if n.startswith("blocks.") and p.dim() == 2}
    assert in_muon == matrices, f"Muon has {sorted(in_muon ^ matrices)} wrong"
    assert optimizers[1].param_groups[0]["peak_lr"] == mt.TrainConfig().muon_lr, "Muon does not peak at --muon_lr"
    dtypes = [mt.make_optimizer(model, mt.TrainConfig(precision=p))[1].dtype for p in ("fp32", "bf16")]
    assert dtypes == [torch.float32, torch.bfloat16], f"Muon's Newton-Schulz steps not in the run's precision: {dtypes}"


def test_lr_schedule_edges():
    """The learning rate 0 at step 0, a warmup as long as the run dividing by zero, warmup or decay not
    monotone, the decay not ending at min_lr at max_steps, a run of fewer than 10 steps kept in a warmup of
    100 (its rate only ever rising), or (warmup 0 and a time budget) the rate dropping to min_lr before the
    budget has fixed max_steps and then jumping back to the peak."""
    cfg = mt.TrainConfig(max_steps=100, learning_rate=1e-3, min_lr=1e-4)
    lrs = [mt.get_lr(s, cfg) for s in range(120)]
    assert cfg.warmup() == 10 and lrs[0] > 0 and lrs[10] == 1e-3, f"warmup {cfg.warmup()}, lr {lrs[0]}..{lrs[10]}"
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11])), "warmup is not increasing"
    assert all(a >= b for a, b in zip(lrs[10:100], lrs[11:101])), "the decay is not monotone"
    assert abs(lrs[100] - 1e-4) < 1e-12 and lrs[119] == lrs[100], "the decay does not end at min_lr"
    for n in range(1, 12):
        short = mt.TrainConfig(max_steps=n)
        assert short.warmup() < n and abs(mt.get_lr(n, short) - short.min_lr) < 1e-12, f"--max_steps {n} never decays"
    assert mt.get_lr(0, mt.TrainConfig(max_steps=1, warmup_steps=0)) > 0, "warmup 0 with one step breaks"
    budget = mt.TrainConfig(warmup_steps=0)  # max_steps 0 until the time budget fixes it
    assert [mt.get_lr(s, budget) for s in range(3)] == [budget.learning_rate] * 3, "the decay began before max_steps"
    assert (mt.TrainConfig(max_steps=5000).warmup(), mt.TrainConfig().warmup()) == (100, 100), "warmup not 100"


def test_a_training_step_learns_and_accumulates_exactly():
    """A model or step that cannot learn (gradients not reaching the weights, an optimizer that does not step)
    fails to memorise one fixed batch, with AdamW alone or with Muon; a loss not divided by the accumulation steps
    gives k micro-batches k times the gradient (and clipping threshold) of one batch of the same size."""
    batch = tuple(torch.randint(17, (2, 4, 16), generator=torch.Generator().manual_seed(0)))  # (inputs, targets)
    for optimizer in ("adamw", "muon"):
        torch.manual_seed(0)
        model = mt.MiniTransformer(tiny_config())
        optimizers = mt.make_optimizer(model, mt.TrainConfig(optimizer=optimizer, learning_rate=1e-2, weight_decay=0.0))
        first = mt.train_step(model, optimizers, batch)[0].item()
        for _ in range(150):
            last = mt.train_step(model, optimizers, batch, grad_clip=1.0)[0].item()
        assert first > 2.5 and last < 0.2, f"{optimizer} could not overfit one batch: loss {first:.3f} -> {last:.3f}"
    results = []
    for accum in (1, 4):
        torch.manual_seed(1)
        model = mt.MiniTransformer(tiny_config())
        sgd = torch.optim.SGD(model.parameters(), lr=0.5)  # SGD: unlike Adam or Muon, it shows a scale error
        loss, norm = mt.train_step(model, [sgd], batch, grad_accum=accum)
        results.append((loss, norm, torch.cat([p.flatten() for p in model.parameters()])))
    (l1, n1, p1), (l4, n4, p4) = results
    assert abs(l1 - l4) < 1e-5 and abs(n1 - n4) < 1e-5, f"loss {l1:.5f} vs {l4:.5f}, gradient norm {n1:.5f} vs {n4:.5f}"
    assert max_diff(p1, p4) < 1e-6, f"parameters differ by {max_diff(p1, p4):.2e}"


# ----------------------------------------------------------------------------------------------------
# The Vision Transformer: the same block, no mask, patches in and classes out


def test_vit_patches_and_shifted_digits():
    """The strided Conv2d and the explicit reshape + Linear embed patches differently (pixels or patches in another
    order, the kernel rearranged wrongly), patchify() disagrees with an explicit loop, or the augmentation shifts
    images further than max_shift pixels, or loses or adds pixels."""
    torch.manual_seed(0)
    model = tiny_vit(patch_size=4, patch_embed="linear")
    images = torch.randn(3, 1, 28, 28)
    loop = [images[:, 0, 4 * i : 4 * i + 4, 4 * j : 4 * j + 4].reshape(3, 16) for i in range(7) for j in range(7)]
    loop = torch.stack(loop, dim=1)  # (B, 49 patches, 16 pixels)
    assert torch.equal(model.patch_emb.patchify(images), loop), "patchify() orders patches or pixels otherwise"
    linear = model.patch_emb(images)
    model.patch_emb.path = "conv"
    conv = model.patch_emb(images)
    assert linear.shape == (3, 49, 32) and max_diff(linear, conv) < 1e-5, f"conv vs linear {max_diff(linear, conv):.1e}"
    images = torch.zeros(4, 28, 28, dtype=torch.uint8)
    images[:, 10:18, 10:18] = 255
    x, _ = vit.image_batch((images, torch.arange(4)), 64, torch.Generator().manual_seed(0), max_shift=2)
    bright = (x > 0).squeeze(1)  # (B, 28, 28)
    assert x.shape == (64, 1, 28, 28) and bright.sum(dim=(1, 2)).eq(8 * 8).all(), "a shift lost or added pixels"
    corners = torch.stack([bright.any(dim=d).float().argmax(dim=1) for d in (2, 1)])  # (row, column) of each square
    assert corners.min() == 8 and corners.max() == 12, f"shifts reach {corners.min()}..{corners.max()}, not 8..12"


def test_vit_is_not_causal_classifies_and_smooths_labels_in_training_only():
    """A ViT whose attention is causal (the LM's mask reused), whose logits are not (B, 10), or which cannot lower the
    loss on a fixed batch; label smoothing in eval mode too (or evaluation in train mode): a smoothed test loss; an
    evaluation that skips the last partial batch; a training loss other than the cross-entropy with (1 - s) one-hot
    + s/10 everywhere."""
    torch.manual_seed(0)
    model, first_patch = tiny_vit().eval(), []
    model.blocks[-1].register_forward_hook(lambda m, args, out: first_patch.append(out[:, 0]))
    images = torch.randn(2, 1, 28, 28)
    changed = images.clone()
    changed[:, :, 21:, 21:] = torch.randn(2, 1, 7, 7)  # the last 7 x 7 patch only
    assert model(images)[0].shape == (2, 10), f"logits of shape {tuple(model(images)[0].shape)}"
    model(changed)
    assert max_diff(*first_patch) > 1e-4, "the first patch does not see the last: the ViT's attention is causal"
    optimizers = mt.make_optimizer(model.train(), mt.TrainConfig(learning_rate=3e-3))
    batch = (torch.randn(16, 1, 28, 28), torch.randint(10, (16,)))
    first = mt.train_step(model, optimizers, batch)[0].item()
    for _ in range(30):
        last = mt.train_step(model, optimizers, batch)[0].item()
    assert last < 0.5 * first, f"loss went from {first:.3f} to {last:.3f} in 30 steps on one batch"
    torch.manual_seed(0)
    model = tiny_vit(label_smoothing=0.2)
    images, targets = torch.randn(5, 1, 28, 28), torch.randint(10, (5,))
    logits, loss = model.eval()(images, targets)
    log_p = logits.log_softmax(dim=-1)
    plain = -log_p[torch.arange(5), targets].mean()
    assert max_diff(loss, plain) < 1e-6, f"eval loss {loss.item():.5f}, not the cross-entropy {plain.item():.5f}"
    _, smoothed = model.train()(images, targets)  # dropout is 0: the same logits
    assert max_diff(smoothed, 0.8 * plain - 0.2 * log_p.mean(dim=-1).mean()) < 1e-6, f"train loss {smoothed.item():.5f}"
    split = (torch.randint(256, (7, 28, 28), dtype=torch.uint8), torch.randint(10, (7,)))  # 7 images in batches of 3
    reported, accuracy, _ = vit.evaluate_split(model.train(), split, batch_size=3)
    assert model.training, "evaluate_split did not restore train mode"
    logits, loss = model.eval()(vit.to_input(split[0]), split[1])
    assert abs(reported - loss.item()) < 1e-5, f"test loss {reported:.5f}, not that of every image {loss.item():.5f}"
    assert accuracy == (logits.argmax(-1) == split[1]).float().mean().item(), "the accuracy is not over every image"


# ----------------------------------------------------------------------------------------------------


def run_tests(namespace, argv=None):
    """The plain runner: every test_* function in namespace (with -k TEXT, those whose name contains it),
    one line each, then "N passed, N failed, N skipped"; exits 1 if any failed."""
    parser = argparse.ArgumentParser(description=namespace["__doc__"].strip().split("\n")[0])
    parser.add_argument("-k", default="", help="run only the tests whose name contains this text, e.g. -k cache")
    only, counts = parser.parse_args(argv).k, {"passed": 0, "failed": 0, "skipped": 0}
    for name, fn in [(n, f) for n, f in namespace.items() if n.startswith("test_") and callable(f) and only in n]:
        t0 = time.perf_counter()
        try:
            fn()
            outcome, line = "passed", f"PASS {name} ({time.perf_counter() - t0:.1f}s)"
        except unittest.SkipTest as e:
            outcome, line = "skipped", f"SKIP {name}: {e}"
        except (Exception, SystemExit):  # a test's sys.exit() is its failure, not the runner's end
            outcome, line = "failed", f"FAIL {name}\n{traceback.format_exc()}"
        counts[outcome] += 1
        print(line, flush=True)
    print(", ".join(f"{n} {k}" for k, n in counts.items()))
    sys.exit(1 if counts["failed"] else 0)


if __name__ == "__main__":
    run_tests(globals())
