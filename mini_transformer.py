"""
A decoder-only Transformer language model on characters, and its training loop, in one file.

The course lab's model in its reading order: config -> attention -> feed-forward -> block -> model
-> data -> training. sample.py, vit.py, bench.py and test_shapes.py import from this file.

    python prepare_shakespeare.py && python mini_transformer.py     # CPU defaults, about 5 minutes
    python mini_transformer.py --help                               # every config field is a flag
    python mini_transformer.py --resume                             # continue from out/ckpt.pt
    python mini_transformer.py --eval_only                          # val loss of out/best.pt
    torchrun --standalone --nproc_per_node 2 mini_transformer.py    # DDP: 2 processes (GPUs or CPU)
"""

import argparse
import contextlib
import ctypes
import inspect
import json
import math
import os
import re
import shlex
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

# ----------------------------------------------------------------------------------------------------
# Configuration: one dataclass per concern; parse_config() turns every field into a --flag.


@dataclass
class TransformerConfig:
    vocab_size: int = 0  # tokens in the vocabulary; 0 = the data's (meta.json), more pads the table
    block_size: int = 128  # context length T in tokens (the lab's)
    n_layers: int = 4  # Transformer blocks
    n_heads: int = 4  # attention heads; d_model is split evenly among them
    d_model: int = 128  # width of the residual stream
    d_ff: int = 512  # hidden width of the feed-forward network (4 * d_model)
    dropout: float = 0.0  # dropout probability on attention and residual branches (the lab uses 0.1)
    bias: bool = False  # biases in Linear and LayerNorm layers (off, as in LLaMA)
    ffn: str = "relu"  # feed-forward type: relu (the lab's) or swiglu (Shazeer 2020)
    attn: str = "sdpa"  # attention path: sdpa (fused kernel) or explicit (mask + softmax, as taught)

    def __post_init__(self):
        check_block_fields(self)
        if self.block_size < 1 or self.vocab_size < 0:
            raise ValueError("block_size must be positive and vocab_size not negative")


def check_block_fields(cfg):
    """Validate the fields that TransformerBlock reads (shared with vit.py's config)."""
    if min(cfg.n_layers, cfg.n_heads, cfg.d_model, cfg.d_ff) < 1:
        raise ValueError("n_layers, n_heads, d_model and d_ff must be positive")
    if cfg.d_model % cfg.n_heads:
        raise ValueError(f"d_model ({cfg.d_model}) must be divisible by n_heads ({cfg.n_heads})")
    if not 0 <= cfg.dropout < 1:
        raise ValueError(f"dropout must be in [0, 1), got {cfg.dropout}")
    if cfg.ffn not in ("relu", "swiglu") or cfg.attn not in ("sdpa", "explicit"):
        raise ValueError(f"ffn must be relu or swiglu and attn sdpa or explicit, got {cfg.ffn}, {cfg.attn}")


@dataclass
class TrainConfig:
    data_dir: str = "data/shakespeare"  # folder with train.bin, val.bin, meta.json (prepare_shakespeare.py)
    out_dir: str = "out"  # folder for ckpt.pt, best.pt, config.json and log.jsonl
    max_steps: int = 9000  # optimizer steps
    batch_size: int = 16  # sequences per optimizer step (the global batch)
    grad_accum: int = 1  # micro-batches per step, to fit a large batch in memory
    learning_rate: float = 3e-3  # peak learning rate, reached after warmup
    min_lr: float = 1e-4  # learning rate at the end of the cosine decay
    warmup_steps: int = 100  # steps of linear warmup
    weight_decay: float = 0.1  # AdamW decoupled weight decay, on matrices and embeddings only
    beta2: float = 0.99  # AdamW second-moment decay (beta1 is 0.9)
    grad_clip: float = 1.0  # clip the global gradient norm to this; 0 = no clipping
    eval_interval: int = 1000  # steps between evaluations and checkpoints
    eval_batches: int = 20  # fixed train batches per evaluation (val is always the whole split)
    log_interval: int = 100  # steps between progress lines
    sample_chars: int = 300  # characters generated at the end of training; 0 = none (language model only)
    seed: int = 1337  # seeds the init, dropout and the order of batches
    device: str = "auto"  # auto (cuda > mps > cpu), cpu, cuda, cuda:1 or mps
    compile: bool = False  # torch.compile the model (CUDA only; the first steps are slow)
    precision: str = "auto"  # auto (bf16 where the hardware has it: CUDA, CPUs with AVX512-BF16 or AMX), bf16 or fp32
    resume: bool = False  # continue from out_dir/ckpt.pt (the model's shape comes from the checkpoint)
    eval_only: bool = False  # report the val loss of out_dir/best.pt and exit

    def __post_init__(self):
        if min(self.max_steps, self.batch_size, self.grad_accum, self.eval_interval, self.log_interval) < 1:
            raise ValueError("max_steps, batch_size, grad_accum, eval_interval and log_interval must be >= 1")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size ({self.batch_size}) must be divisible by grad_accum ({self.grad_accum})")
        if not 0 <= self.warmup_steps < self.max_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be below max_steps ({self.max_steps})")
        if not 0 < self.min_lr <= self.learning_rate:
            raise ValueError(f"need 0 < min_lr <= learning_rate, got {self.min_lr} and {self.learning_rate}")
        if not 0 <= self.beta2 < 1:
            raise ValueError(f"beta2 must be in [0, 1), got {self.beta2}")
        check_precision(self.precision)
        if min(self.weight_decay, self.grad_clip, self.sample_chars) < 0 or self.eval_batches < 1:
            raise ValueError("weight_decay, grad_clip and sample_chars must be >= 0, and eval_batches >= 1")


def check_precision(precision):
    """Validate a --precision value (shared with bench.py's config)."""
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"precision must be auto, bf16 or fp32, got {precision}")


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 2, instead of argparse's whole usage block
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parse_config(*defaults, argv=None, description=None):
    """Build a CLI from config dataclasses and parse it.

    Every field becomes --field (bools: --field/--no-field), typed by its default, one help group per
    dataclass, with the field's trailing comment as help. Returns (configs, flags given, parser).
    """
    parser = _ArgumentParser(description=description)
    for cfg in defaults:
        group = parser.add_argument_group(type(cfg).__name__)
        comments = dict(re.findall(r"^\s+(\w+):[^#\n]*#\s*(.*)$", inspect.getsource(type(cfg)), re.M))
        for f in fields(cfg):
            value = getattr(cfg, f.name)
            kind = {"action": argparse.BooleanOptionalAction} if isinstance(value, bool) else {"type": type(value)}
            helptext = f"{comments.get(f.name, '')} (default: {value!r})".replace("%", "%%")
            group.add_argument(f"--{f.name}", default=argparse.SUPPRESS, help=helptext, **kind)
    given = vars(parser.parse_args(argv))  # only the flags actually typed (SUPPRESS leaves out the rest)
    try:  # replace() re-runs __post_init__, so a bad combination becomes one parser error
        cfgs = [replace(c, **{f.name: given[f.name] for f in fields(c) if f.name in given}) for c in defaults]
    except ValueError as e:
        parser.error(str(e))
    return cfgs, given, parser


def run_main(main):
    """Run a script's main(). fit() turns Ctrl-C into a clean stop at a step boundary; anywhere else
    (loading data, the final sample, a download) Ctrl-C ends the script with one line instead of a
    traceback, and the exit status 130 that shells give a program stopped by Ctrl-C."""
    try:
        main()
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)


# ----------------------------------------------------------------------------------------------------
# The model


class Dropout(nn.Module):
    """Dropout (Srivastava et al. 2014): in training, zero each element with probability p and scale
    the rest by 1 / (1 - p); in eval, do nothing. The same as nn.Dropout, cheaper on the CPU.

    On the CPU nn.Dropout draws one random number per element (bernoulli_), and with dropout on, that
    drawing takes about 40% of a training step. Here the mask is cut from 64-bit random words, four
    16-bit lanes per word: a quarter of the draws. Forward and backward over the (B, H, T, T) weights
    of one lab layer took 13.5 ms against nn.Dropout's 34 ms. p is rounded to a multiple of 1/65536
    and the scale uses the rounded value, so the expectation is exact. GPUs already draw masks inside
    one fused kernel, so they keep F.dropout.
    """

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, training=True)
        n, drop = x.numel(), round(self.p * 65536)  # drop: how many of the 65536 lane values are dropped
        # random_(lowest int64, None) hands out the generator's 64-bit words as they are; randint over the
        # same range takes each one modulo 2**64 - 1 and draws about 20% slower.
        words = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(2**63), None)
        lanes = words.view(torch.int16)[:n].view(x.shape)  # uniform over -32768..32767
        scale = (lanes >= drop - 32768).to(x.dtype).mul_(65536 / (65536 - drop))  # kept: 1 / keep rate, else 0
        return x * scale


def causal_attention_in_halves(q, k, v, mask, dropout):
    """Causal attention with dropout on the attention weights, as the explicit path computes it, for
    CPU training with dropout. q, k, v: (B, H, T, d_k); mask: (T, T) bool, True where query i may
    see key j. Returns (B, H, T, d_k).

    Queries in the first half never see keys in the second half, so that quarter of the (T, T) scores
    is all -inf. Split at h = T // 2, the first h queries attend to the first h keys, the rest to all
    T: a quarter fewer scores to compute, softmax, draw dropout masks for and multiply by v (the trick
    behind FlashAttention's causal speed-up, here at the coarsest grain). A (T, T) tensor of 0 and
    -inf is added instead of masked_fill_, whose backward is a second fill: this and the split cut
    a lab layer's attention forward and backward from about 41 to 31 ms.
    """
    h = q.size(2) // 2
    q = q / math.sqrt(k.size(-1))
    bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
    first = F.softmax(q[:, :, :h] @ k[:, :, :h].transpose(-2, -1) + bias[:h, :h], dim=-1)  # (B, H, h, h)
    rest = F.softmax(q[:, :, h:] @ k.transpose(-2, -1) + bias[h:], dim=-1)  # (B, H, T - h, T)
    return torch.cat([dropout(first) @ v[:, :, :h], dropout(rest) @ v], dim=2)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention: x (B, T, d_model) -> (B, T, d_model).

    One fused projection makes q, k and v: a single large matmul reads x once and keeps the hardware
    busier than three small ones. causal=False lets every position see every other (vit.py).
    """

    def __init__(self, cfg, causal=True):
        super().__init__()
        self.n_heads, self.causal, self.attn, self.dropout = cfg.n_heads, causal, cfg.attn, cfg.dropout
        self.block_size = getattr(cfg, "block_size", 0)  # the KV cache's capacity (the ViT has none)
        self.qkv_proj = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias)
        self.out_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.attn_dropout = Dropout(cfg.dropout)
        self.resid_dropout = Dropout(cfg.dropout)
        if causal:  # mask[i, j]: may query i see key j (j <= i)? Derived, so not saved (persistent=False)
            mask = torch.ones(cfg.block_size, cfg.block_size, dtype=torch.bool).tril()
            self.register_buffer("mask", mask, persistent=False)

    def forward(self, x, return_weights=False, kv_cache=None):
        """kv_cache: a dict that keeps this layer's keys and values between calls during generation;
        x then holds only the new positions, which come after the cached ones."""
        B, T, C = x.shape  # batch, time, channels (d_model)
        # Heads: view the 3C channels as (q/k/v, H, d_k), then move those two axes in front of T:
        # (B, T, 3, H, d_k) -> (3, B, H, T, d_k). A direct view as (B, H, T, d_k) would silently mix
        # time steps and heads. One view and one permute: at generation time, when x is one position,
        # this costs a third of splitting q, k, v first and reshaping each.
        q, k, v = self.qkv_proj(x).view(B, T, 3, self.n_heads, C // self.n_heads).permute(2, 0, 3, 1, 4)  # each (B, H, T, d_k)
        T0 = 0  # positions already cached: queries are T0..T0+T-1, keys 0..T0+T-1
        if kv_cache is not None:  # room for block_size positions, filled in place as generation goes on
            if not kv_cache:
                shape = (B, self.n_heads, self.block_size, C // self.n_heads)
                kv_cache.update(len=0, k=k.new_empty(shape), v=v.new_empty(shape))
            T0 = kv_cache["len"]
            kv_cache["k"][:, :, T0 : T0 + T], kv_cache["v"][:, :, T0 : T0 + T] = k, v
            kv_cache["len"] = T0 + T
            k, v = kv_cache["k"][:, :, : T0 + T], kv_cache["v"][:, :, : T0 + T]  # (B, H, T0 + T, d_k)
        # On the CPU, SDPA is the slower way twice: with dropout it leaves its fused kernel and draws
        # masks one number at a time, and under bf16 autocast its kernel took twice as long as the
        # same attention by hand (a lab step: 232 against 101 ms). There attention is computed by
        # hand, with the cheaper Dropout above: in halves when causal, else the explicit way.
        by_hand = x.device.type == "cpu" and (self.training and self.dropout > 0 or torch.is_autocast_enabled("cpu"))
        fast = self.attn == "sdpa" and not return_weights  # the fastest way, not the lab's explicit one
        if fast and by_hand and self.causal and not T0:
            y = causal_attention_in_halves(q, k, v, self.mask[:T, :T], self.attn_dropout)
        elif fast and not by_hand:
            # The same computation in one fused kernel. SDPA does not know train/eval, so dropout_p
            # must be switched off by hand in eval. Its is_causal mask is aligned top-left, right only
            # when queries and keys start together (T0 = 0); one new query may see every cached key.
            p = self.dropout if self.training else 0.0
            offset_mask = self.mask[T0 : T0 + T, : T0 + T] if self.causal and T0 and T > 1 else None
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=offset_mask, dropout_p=p, is_causal=self.causal and not T0)
        else:
            # att[b, h, i, j]: how strongly query i attends to key j in head h. Dividing by sqrt(d_k)
            # keeps the scores' variance near 1, so the softmax does not saturate; dividing q instead of
            # the product touches T x d_k numbers per head instead of T x (T0 + T).
            att = (q / math.sqrt(k.size(-1))) @ k.transpose(-2, -1)  # (B, H, T, T0 + T): the quadratic cost
            if self.causal:  # -inf before the softmax gives future keys exactly zero weight. In place
                # (the trailing _): the product is not needed for the backward, so no copy is made.
                att.masked_fill_(~self.mask[T0 : T0 + T, : T0 + T], float("-inf"))
            att = F.softmax(att, dim=-1)
            y = self.attn_dropout(att) @ v  # (B, H, T, d_k)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # heads side by side again
        y = self.resid_dropout(self.out_proj(y))
        return (y, att) if return_weights else y


class FeedForward(nn.Module):
    """The lab's position-wise MLP: d_model -> d_ff -> d_model with ReLU. (B, T, C) -> (B, T, C)."""

    def __init__(self, cfg):
        super().__init__()
        self.fc1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.fc2 = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)
        self.dropout = Dropout(cfg.dropout)

    def forward(self, x):
        # inplace=True: fc1's output is not needed for the backward, and on the CPU writing the ReLU
        # over it instead of into a fresh (B, T, d_ff) buffer made the ReLU about 3x faster.
        return self.dropout(self.fc2(F.relu(self.fc1(x), inplace=True)))


class SwiGLUFeedForward(nn.Module):
    """Gated MLP (Shazeer 2020; PaLM, LLaMA): w2(silu(w1 x) * w3 x). (B, T, C) -> (B, T, C).

    It has three matrices instead of two, so the hidden width is 2/3 of d_ff (rounded up to a multiple
    of 8) to keep the parameter count of the ReLU version.
    """

    def __init__(self, cfg):
        super().__init__()
        hidden = 8 * math.ceil(2 * cfg.d_ff / 3 / 8)
        self.w1 = nn.Linear(cfg.d_model, hidden, bias=cfg.bias)  # gate
        self.w3 = nn.Linear(cfg.d_model, hidden, bias=cfg.bias)  # value
        self.w2 = nn.Linear(hidden, cfg.d_model, bias=cfg.bias)  # back down to d_model
        self.dropout = Dropout(cfg.dropout)

    def forward(self, x):
        return self.dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class TransformerBlock(nn.Module):
    """Pre-LN block (GPT-2): each sub-layer reads a normalised copy of the residual stream and adds its
    output back. The stream itself is never normalised, so gradients pass the additions untouched."""

    def __init__(self, cfg, causal=True):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg, causal)
        self.ln2 = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.ffn = SwiGLUFeedForward(cfg) if cfg.ffn == "swiglu" else FeedForward(cfg)

    def forward(self, x, kv_cache=None):  # (B, T, C) -> (B, T, C)
        x = x + self.attn(self.ln1(x), kv_cache=kv_cache)  # tokens exchange information
        return x + self.ffn(self.ln2(x))  # each token is transformed on its own


RESIDUAL_OUTPUTS = ("out_proj.weight", "fc2.weight", "w2.weight")  # the layers that add into the stream


def init_weights(model, n_layers):
    """GPT-2 init, once per tensor: N(0, 0.02) for matrices and embeddings, zero biases, and
    N(0, 0.02/sqrt(2 n_layers)) for the residual output projections: the stream is a sum of 2 n_layers
    such outputs, and the scaling keeps its variance from growing with depth. named_parameters() lists
    a tied tensor once, so the shared embedding/head matrix is initialised exactly once."""
    for name, p in model.named_parameters():
        if name.endswith(RESIDUAL_OUTPUTS):
            nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layers))
        elif p.dim() >= 2:
            nn.init.normal_(p, mean=0.0, std=0.02)
        elif name.endswith("bias"):
            nn.init.zeros_(p)  # LayerNorm gains keep their 1


class MiniTransformer(nn.Module):
    """Decoder-only language model: token ids idx (B, T) -> next-token logits (B, T, vocab_size)."""

    def __init__(self, cfg):
        super().__init__()
        if cfg.vocab_size < 1:
            raise ValueError("vocab_size must be set (train() takes it from the data)")
        self.cfg = cfg
        self.token_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.d_model)  # learned absolute positions
        self.drop = Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layers))
        # With Pre-LN the stream is a growing sum of un-normalised branch outputs: it needs one final
        # LayerNorm before the head.
        self.ln_final = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        # Weight tying (Press & Wolf 2017): reading a token in and predicting it out share one matrix.
        # It saves vocab_size * d_model parameters, and every output gradient also trains the embedding.
        self.lm_head.weight = self.token_emb.weight
        init_weights(self, cfg.n_layers)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())  # parameters() counts the tied matrix once

    def forward(self, idx, targets=None, kv_cache=None):
        """idx (B, T) -> (logits (B, T, vocab_size), mean cross-entropy or None). kv_cache: a list of
        one dict per block, filled as generation goes on; idx then holds only the new tokens."""
        B, T = idx.shape
        T0 = kv_cache[0].get("len", 0) if kv_cache else 0  # tokens already cached
        if T0 + T > self.cfg.block_size:
            raise ValueError(f"sequence of {T0 + T} tokens is longer than block_size {self.cfg.block_size}")
        # (B, T, C): each token's embedding plus row T0 + t of the position table, added, not concatenated
        x = self.drop(self.token_emb(idx) + self.pos_emb.weight[T0 : T0 + T])
        for i, block in enumerate(self.blocks):
            x = block(x, kv_cache[i] if kv_cache else None)
        logits = self.lm_head(self.ln_final(x))  # (B, T, vocab_size)
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss

    def decode(self, idx, kv_cache):
        """forward() in eval mode for one new token per sequence, idx (B, 1), after the kv_cache's
        positions -> next-token logits (B, vocab_size), written as bare tensor functions. At one
        position the arithmetic is so small that forward()'s ~50 module calls and branches cost about
        as much; this takes a quarter to a third off each generated character. A test checks that it
        computes what forward() does, for both feed-forward types and both attention paths."""
        B, C, H = idx.size(0), self.cfg.d_model, self.cfg.n_heads
        T0 = kv_cache[0]["len"]  # the new token's position
        x = self.token_emb.weight[idx[:, 0]] + self.pos_emb.weight[T0]  # (B, C)
        for block, cache in zip(self.blocks, kv_cache):
            attn, ffn = block.attn, block.ffn
            h = F.layer_norm(x, (C,), block.ln1.weight, block.ln1.bias)
            qkv = F.linear(h, attn.qkv_proj.weight, attn.qkv_proj.bias)  # (B, 3C)
            q, k, v = qkv.view(B, 3, H, 1, C // H).unbind(1)  # each (B, H, 1, d_k), as forward() splits them
            cache["k"][:, :, T0 : T0 + 1], cache["v"][:, :, T0 : T0 + 1] = k, v
            cache["len"] = T0 + 1
            k, v = cache["k"][:, :, : T0 + 1], cache["v"][:, :, : T0 + 1]  # (B, H, T0 + 1, d_k)
            if attn.attn == "sdpa":  # one query sees every cached key: no mask
                y = F.scaled_dot_product_attention(q, k, v)
            else:
                y = F.softmax((q / math.sqrt(C // H)) @ k.transpose(-2, -1), dim=-1) @ v
            x = x + F.linear(y.reshape(B, C), attn.out_proj.weight, attn.out_proj.bias)  # (B, H, 1, d_k) -> (B, C)
            h = F.layer_norm(x, (C,), block.ln2.weight, block.ln2.bias)
            if isinstance(ffn, SwiGLUFeedForward):
                h = F.silu(F.linear(h, ffn.w1.weight, ffn.w1.bias)) * F.linear(h, ffn.w3.weight, ffn.w3.bias)
                x = x + F.linear(h, ffn.w2.weight, ffn.w2.bias)
            else:
                x = x + F.linear(F.relu(F.linear(h, ffn.fc1.weight, ffn.fc1.bias)), ffn.fc2.weight, ffn.fc2.bias)
        return F.linear(F.layer_norm(x, (C,), self.ln_final.weight, self.ln_final.bias), self.lm_head.weight)

    @torch.inference_mode()  # no autograd bookkeeping at all; the tokens it yields cannot enter a backward
    def stream(self, idx, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, generator=None, kv_cache=True):
        """Yield max_new_tokens next tokens, each (B, 1), continuing idx (B, T).

        With kv_cache the context is encoded once and each new token costs one position's work. The
        positions are learned and absolute, so a full cache cannot slide: it is rebuilt from the last
        block_size // 2 tokens, and the context then grows back to block_size. Without kv_cache every
        token re-reads the last block_size tokens.
        """
        was_training, cache = self.training, None
        self.eval()
        try:
            for _ in range(max_new_tokens):
                if not kv_cache:
                    logits = self(idx[:, -self.cfg.block_size :])[0][:, -1]  # (B, vocab_size)
                elif cache is None or cache[0]["len"] == self.cfg.block_size:
                    keep = self.cfg.block_size if cache is None else max(1, self.cfg.block_size // 2)
                    cache = [{} for _ in self.blocks]
                    logits = self(idx[:, -keep:], kv_cache=cache)[0][:, -1]
                else:
                    logits = self.decode(idx[:, -1:], cache)
                next_id = sample_next(logits, temperature, top_k, top_p, generator)  # (B, 1)
                idx = torch.cat([idx, next_id], dim=1)
                yield next_id
        finally:
            self.train(was_training)

    def generate(self, idx, max_new_tokens, **kwargs):
        """idx (B, T) extended by max_new_tokens tokens -> (B, T + max_new_tokens); kwargs as stream()."""
        return torch.cat([idx, *self.stream(idx, max_new_tokens, **kwargs)], dim=1)


def sample_next(logits, temperature=1.0, top_k=0, top_p=1.0, generator=None):
    """Pick the next token from logits (B, vocab_size) -> (B, 1).

    temperature 0 is greedy; top_k 0 keeps every token (a top_k beyond the vocabulary is clamped, and
    tokens tied with the k-th logit are all kept); top_p < 1 keeps the smallest set of most likely tokens
    whose probabilities add up to top_p (nucleus sampling, Holtzman et al. 2019).
    """
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))  # -inf, not a small number
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
        probs = sorted_logits.softmax(dim=-1)
        drop_sorted = probs.cumsum(dim=-1) - probs >= top_p  # the mass ahead already reaches top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)  # back to vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))  # the most likely token always stays
    # An exponential race: with independent E_i ~ Exp(1), argmax p_i / E_i is token i with probability
    # p_i. torch.multinomial draws one sample the same way (the same tokens for the same generator), but
    # first checks its input, which makes it 2-4x slower per token on the CPU. The clamp keeps
    # 0 / 0 = NaN away from tokens filtered out above.
    probs = F.softmax(logits, dim=-1)  # (B, V)
    race = torch.empty_like(probs).exponential_(generator=generator).clamp_(min=torch.finfo(probs.dtype).tiny)
    return (probs / race).argmax(dim=-1, keepdim=True)


# ----------------------------------------------------------------------------------------------------
# Device and data


def get_device(name="auto"):
    """cuda, then mps, then cpu for 'auto'; otherwise the named device, checked to exist."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        sys.exit(f"error: unknown device '{name}' (use auto, cpu, cuda, cuda:N or mps)")
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available.get(device.type, False):
        sys.exit(f"error: device '{name}' is not available here (try --device auto)")
    return device


def keep_freed_memory():
    """Let glibc keep freed blocks of up to 32 MB for reuse instead of handing them back to the OS.

    A training step frees and allocates the same large buffers every time (activations, gradients).
    By default glibc returns many of them to the OS, and the next step maps them in again, one 4 KB
    page fault per page: at the lab's batch of 64 that was about 20k faults per CPU step on our VM, and
    the median step 8% slower over 7 paired runs. This pins the two thresholds that the environment
    variables MALLOC_MMAP_THRESHOLD_ and MALLOC_TRIM_THRESHOLD_ would set (32 MB is glibc's maximum;
    pinning one switches off glibc's adjustment of both). Without glibc (macOS, Windows, musl) nothing
    happens. The cost: the process keeps its peak memory, which a training loop reaches every step.
    Returns whether the thresholds were set.
    """
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # from <malloc.h>
    return mallopt(M_MMAP_THRESHOLD, 32 * 2**20) == 1 and mallopt(M_TRIM_THRESHOLD, 2**30) == 1  # 1: accepted


def sync(device):
    """Wait for queued GPU work, so that a clock read measures it. A no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def has_fast_bf16(device):
    """Does the device do bf16 arithmetic in hardware? CUDA GPUs that support bf16, and CPUs with the
    AVX512-BF16 or AMX instructions. Elsewhere bf16 is emulated: nanoGPT's training step ran 13x
    slower in bf16 than in fp32 on the EPYC cores this project was first measured on, while on the
    Zen 5 cores of a later VM (with AVX512-BF16) a bf16 matmul ran at 4.3x the fp32 rate."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    cpu = getattr(torch, "cpu", None)  # these checks are private: absent, they count as no
    return device.type == "cpu" and any(getattr(cpu, f, lambda: False)() for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def autocast(device, precision="auto"):
    """The context a forward pass runs in: bf16 autocast (matmuls in bf16, softmax, LayerNorm and the
    loss in fp32; the weights stay fp32) for precision bf16, or auto on hardware with fast bf16;
    otherwise plain fp32. fp16 would need a GradScaler, bf16 has fp32's range and does not."""
    if precision_name(device, precision) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def precision_name(device, precision="auto"):
    """--precision resolved for this device: 'bf16' (autocast) or 'fp32'."""
    return "bf16" if precision == "bf16" or (precision == "auto" and has_fast_bf16(device)) else "fp32"


def load_data(data_dir, device):
    """The train and val token ids as int64 tensors on the device (tiny Shakespeare is 8 MB), and the
    vocabulary string (token i is vocab[i])."""
    path = Path(data_dir)
    if not (path / "meta.json").exists():
        sys.exit(f"error: {path / 'meta.json'} not found (run: python prepare_shakespeare.py --data_dir {data_dir})")
    try:
        vocab = json.loads((path / "meta.json").read_text(encoding="utf-8"))["vocab"]
        data = {s: np.fromfile(path / f"{s}.bin", dtype=np.uint16) for s in ("train", "val")}
        if any((path / f"{s}.bin").stat().st_size % 2 or d.max(initial=0) >= len(vocab) for s, d in data.items()):
            raise ValueError("a .bin file is cut short or has token ids beyond the vocabulary")
    except (OSError, ValueError, KeyError, TypeError) as e:  # a missing file, broken JSON, another run's files
        sys.exit(f"error: the data in {path} is damaged: {str(e).splitlines()[0]} "
                 f"(run: python prepare_shakespeare.py --data_dir {data_dir})")
    return {s: torch.from_numpy(d.astype(np.int64)).to(device) for s, d in data.items()}, vocab


def to_device(t, device):
    """A small CPU tensor (batch indices) onto device without a hidden sync. From ordinary memory a copy
    to the GPU first waits until every queued kernel has run, so the CPU could not queue the next step
    while the GPU works on this one; from page-locked (pinned) memory it is queued like a kernel."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def get_batch(data, block_size, batch_size, generator):
    """batch_size random windows: x (B, T) and the targets y (B, T), y[:, t] = x[:, t + 1]. The starts
    come from a CPU generator, so the batches are the same on every device."""
    starts = torch.randint(len(data) - block_size, (batch_size, 1), generator=generator)  # last: len-T-1
    chunk = data[to_device(starts + torch.arange(block_size + 1), data.device)]  # (B, T + 1)
    return chunk[:, :-1], chunk[:, 1:]


@torch.no_grad()
def estimate_loss(model, data, block_size, batch_size, n_batches=0, ctx=contextlib.nullcontext()):
    """Mean loss on one split, in eval mode. n_batches > 0: that many batches drawn with a fixed seed,
    the same windows at every call; 0: the whole split in consecutive windows, every token once."""
    was_training = model.training
    model.eval()
    if n_batches:
        g = torch.Generator().manual_seed(0)
        batches = [get_batch(data, block_size, batch_size, g) for _ in range(n_batches)]
    else:
        n = (len(data) - 1) // block_size * block_size
        xs, ys = data[:n].view(-1, block_size), data[1 : n + 1].view(-1, block_size)  # (N, T)
        batches = list(zip(xs.split(batch_size), ys.split(batch_size)))
        if len(data) - 1 > n:  # the last, shorter window
            batches.append((data[n:-1][None], data[n + 1 :][None]))
    total, count = 0.0, 0
    for x, y in batches:
        with ctx:
            total += model(x, y)[1].float() * y.numel()
        count += y.numel()
    model.train(was_training)
    return (total / count).item()


# ----------------------------------------------------------------------------------------------------
# Training


def make_optimizer(model, cfg):
    """AdamW, decaying only tensors of 2+ dims: shrinking LayerNorm gains and biases towards 0 only hurts."""
    params = list(model.parameters())  # de-duplicated: the tied matrix appears once
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    # fused: one kernel for the whole update instead of a loop over tensors (12 ms of 62 per CPU step here)
    fused = next(model.parameters()).device.type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(0.9, cfg.beta2), fused=fused)


def get_lr(step, cfg):
    """Linear warmup to learning_rate, then cosine decay to min_lr at max_steps. Warmup starts at
    learning_rate / (warmup_steps + 1), so step 0 already learns, and no branch divides by zero."""
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / (cfg.warmup_steps + 1)
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.learning_rate - cfg.min_lr)


def train_step(model, optimizer, batch, grad_accum=1, ctx=contextlib.nullcontext(), grad_clip=0.0):
    """One optimizer step on batch (x, y), each (B, T), split into grad_accum micro-batches.
    Returns (mean loss, gradient norm before clipping) as tensors: nothing here waits for the device."""
    x, y = batch
    total = 0.0
    for i, (xm, ym) in enumerate(zip(x.chunk(grad_accum), y.chunk(grad_accum))):
        if isinstance(model, DDP):  # all-reduce gradients on the last micro-batch only; set before the forward
            model.require_backward_grad_sync = i == grad_accum - 1
        with ctx:
            _, loss = model(xm, ym)
        (loss / grad_accum).backward()  # gradients add up, so each micro-batch counts 1/grad_accum
        total += loss.detach()
    norm = nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total / grad_accum, norm


def save_checkpoint(path, state):
    """torch.save to a temporary file, then rename: a kill mid-write leaves the old file intact, and a
    failed write (a full disk) ends the run with one line, the old file still intact."""
    tmp = f"{path}.tmp"
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        with contextlib.suppress(OSError):
            os.remove(tmp)
        reason = e.strerror if isinstance(e, OSError) else "is the disk full?"
        sys.exit(f"error: cannot write {path} ({reason}); the previous checkpoint, if any, is unchanged")


def link_checkpoint(src, dst):
    """Make dst a second name for the file src (a hard link): no second copy of the bytes is written,
    and as save_checkpoint replaces files by renaming, a later save to src leaves dst as it was.
    Copies where the file system has no hard links."""
    tmp = f"{dst}.tmp"
    with contextlib.suppress(FileNotFoundError):
        os.remove(tmp)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def load_checkpoint(path, device="cpu", trainer="mini_transformer.py"):
    """Read a checkpoint of tensors and plain Python (weights_only=True: no code runs on load)."""
    if not Path(path).exists():
        sys.exit(f"error: {path} not found (train a model first: python {trainer})")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # truncated or foreign file: show the reason, not a traceback
        reason = str(e).splitlines()[0].split(". ")[0]  # torch's first sentence; the rest is advice
        sys.exit(f"error: {path} is not a readable checkpoint ({type(e).__name__}: {reason})")


def setup_ddp(tcfg):
    """The device of tcfg.device and, under torchrun (it sets RANK, LOCAL_RANK, WORLD_SIZE), a seat in
    the process group: one GPU per process with NCCL, or CPU processes with gloo. Returns (rank,
    world_size, device); (0, 1, device) without torchrun."""
    device, rank, world = get_device(tcfg.device), 0, 1
    if "RANK" in os.environ:
        if device.type == "mps":
            sys.exit("error: torchrun needs CUDA or the CPU (use --device cpu)")
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    if tcfg.batch_size % (world * tcfg.grad_accum):
        sys.exit(f"error: batch_size {tcfg.batch_size} must divide by processes x grad_accum = {world * tcfg.grad_accum}")
    return rank, world, device


def print0(*args, **kwargs):
    """print() on rank 0 only, so that N processes do not print every line N times."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, **kwargs)


def any_rank(flag, device):
    """True on every rank when flag is True on any rank. A collective: every rank must call it."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor(float(flag), device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item() > 0


def fit(model, tcfg, next_batch, evaluate, meta, unit, ckpt=None):
    """The training loop, shared by the language model and vit.py.

    next_batch(generator) -> (x, y): the global batch of a step, drawn from generator (each process of
    torchrun takes its slice); evaluate(model) -> metrics, a dict with "val_loss" (best.pt keeps the
    lowest); meta: plain data saved in every checkpoint (configs, vocabulary); unit: (name, items per
    step) for the throughput. Returns the last evaluation. A run stopped by Ctrl-C or kill saves, prints
    the command that resumes and exits with the status of a stopped program (130, or 143 for a kill), so
    that `python mini_transformer.py && python sample.py` does not go on to sample a half-trained model.
    """
    device = next(model.parameters()).device
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    optimizer = make_optimizer(model, tcfg)
    batch_gen = torch.Generator().manual_seed(tcfg.seed)  # the order of global batches, the same on every rank
    step, best_val = 0, float("inf")
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        step, best_val = ckpt["step"], ckpt["best_val_loss"]
        if step > tcfg.max_steps:
            sys.exit(f"error: the checkpoint is at step {step}, past --max_steps {tcfg.max_steps} "
                     "(to train on, give a larger --max_steps)")
        torch.set_rng_state(ckpt["rng"]["torch"].cpu())
        batch_gen.set_state(ckpt["rng"]["batches"].cpu())
        if device.type == "cuda" and ckpt["rng"]["cuda"]:
            torch.cuda.set_rng_state_all([s.cpu() for s in ckpt["rng"]["cuda"]])
    if rank:  # other dropout masks on each rank; rank 0 keeps the stream a single process would have
        torch.manual_seed(tcfg.seed + 1000 * rank + step)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    keep_freed_memory()
    compiled = model
    if tcfg.compile:
        if device.type == "cuda":
            compiled = torch.compile(model)  # checkpoints and sampling use the raw model, without _orig_mod.
        else:
            print0("warning: --compile is for CUDA only; running eagerly")
    fwd = DDP(compiled, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else compiled
    ctx = autocast(device, tcfg.precision)
    out = Path(tcfg.out_dir)
    if rank == 0:
        try:
            out.mkdir(parents=True, exist_ok=True)
            (out / "config.json").write_text(json.dumps({**meta, "train_config": asdict(tcfg)}, indent=2) + "\n", encoding="utf-8")
        except OSError as e:  # a file of that name, no permission, a read-only disk
            sys.exit(f"error: cannot write to {out}: {e.strerror}")

    def state():
        rng = {"torch": torch.get_rng_state(), "batches": batch_gen.get_state(),
               "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else []}
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "train_config": asdict(tcfg),
                "step": step, "best_val_loss": best_val, "rng": rng, **meta}

    interrupted = []  # (time, signal) of a Ctrl-C or kill; the loop saves at the next step boundary

    def on_signal(signum, frame):
        if interrupted and time.monotonic() - interrupted[0][0] > 1.0:  # torchrun's copy of the first comes at once
            sys.exit("interrupted twice: stopped without saving")
        interrupted.append((time.monotonic(), signum))

    previous_handlers = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    start, t0, eval_s, result, stop = step, None, 0.0, {}, False
    t_start = time.perf_counter()
    try:
        for step in range(start, tcfg.max_steps + 1):
            last = step == tcfg.max_steps
            if last or (step % tcfg.eval_interval == 0 and (step > start or start == 0)):
                # Every rank evaluates the same data: no communication, and all ranks see the same val
                # loss, so they agree on the best checkpoint and on stopping at a NaN.
                t_eval = time.perf_counter()
                result = {"step": step, **evaluate(model)}  # eager: a compiled model would recompile for eval mode
                val = result["val_loss"]
                if not math.isfinite(val):
                    sys.exit(f"error: val loss is {val} at step {step}; {out / 'ckpt.pt'} keeps the last good "
                             "state (try a lower --learning_rate)")
                improved, best_val = val < best_val, min(best_val, val)
                eval_s = time.perf_counter() - t_eval
                result.update(best_val_loss=best_val, eval_s=round(eval_s, 2))
                if rank == 0:
                    save_checkpoint(out / "ckpt.pt", state())
                    if improved:
                        link_checkpoint(out / "ckpt.pt", out / "best.pt")
                    with open(out / "log.jsonl", "a", encoding="utf-8") as f:
                        f.write(json.dumps(result) + "\n")
                metrics = " | ".join(f"{k.replace('_loss', '').replace('_', ' ')} {v:.4f}" for k, v in result.items() if k != "step" and k != "eval_s")
                print0(f"step {step} | {metrics}")
                t0 = None  # the clock restarts after the next step: evals and warm-up are not timed
            if last or stop:
                break
            lr = get_lr(step, tcfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x, y = next_batch(batch_gen)  # the global batch; this rank takes its slice
            loss, norm = train_step(fwd, optimizer, (x.chunk(world)[rank], y.chunk(world)[rank]), tcfg.grad_accum, ctx, tcfg.grad_clip)
            stop = bool(interrupted) if world == 1 else stop  # several processes agree at log steps below
            if t0 is None:
                sync(device)
                t0, timed_from = time.perf_counter(), step + 1
            elif (step + 1) % tcfg.log_interval == 0:
                if world > 1:
                    dist.all_reduce(loss)  # a sum: gloo has no average
                    loss /= world
                    stop = any_rank(bool(interrupted), device)
                loss = loss.item()  # the one host sync of a logging step
                if not math.isfinite(loss):
                    sys.exit(f"error: loss is {loss} at step {step}; {out / 'ckpt.pt'} keeps the last good "
                             "state (try a lower --learning_rate)")
                dt = (time.perf_counter() - t0) / (step + 1 - timed_from)
                left = tcfg.max_steps - step - 1
                eta = dt * left + eval_s * (left // tcfg.eval_interval + 1)
                print0(f"step {step + 1}/{tcfg.max_steps} | loss {loss:.4f} | lr {lr:.1e} | norm {norm.item():.2f} | "
                       f"{1000 * dt:.0f} ms/step | {unit[1] / dt / 1000:.1f}k {unit[0]}/s | eta {minutes(eta)}")
                t0, timed_from = time.perf_counter(), step + 1
    finally:
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)
    stop = stop or bool(interrupted)  # a Ctrl-C during the last evaluation also skips what follows the run
    if stop:
        launcher = ["torchrun", "--standalone", f"--nproc_per_node={world}"] if world > 1 else ["python"]
        command = " ".join(launcher + [Path(sys.argv[0]).name] + [shlex.quote(a) for a in sys.argv[1:] if a != "--resume"])
        if rank == 0:
            save_checkpoint(out / "ckpt.pt", state())
        print0(f"interrupted: saved step {step} to {out / 'ckpt.pt'}; continue with:\n  {command} --resume")
        sys.exit(128 + (interrupted[0][1] if interrupted else signal.SIGINT))  # a rank told by the others: as Ctrl-C
    print0(f"trained steps {start} to {step} in {minutes(time.perf_counter() - t_start)}, evaluations included")
    return result


def minutes(seconds):
    """1234.5 -> '20m35s'. Rounded to whole seconds first, so 59.6 s is 1m00s, not 0m60s."""
    seconds = round(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s"


def train(mcfg, tcfg, ckpt=None):
    """Train the language model on tcfg.data_dir (continuing from ckpt if given); returns the last eval."""
    rank, world, device = setup_ddp(tcfg)
    torch.manual_seed(tcfg.seed)  # the same init on every rank
    data, vocab = load_data(tcfg.data_dir, device)
    if ckpt is None and 0 < mcfg.vocab_size < len(vocab):
        sys.exit(f"error: the data has {len(vocab)} distinct tokens, more than --vocab_size {mcfg.vocab_size}")
    if ckpt is not None and ckpt["vocab"] != vocab:
        sys.exit(f"error: the vocabulary in {tcfg.data_dir} differs from the checkpoint's")
    if min(len(d) for d in data.values()) <= mcfg.block_size:
        sys.exit(f"error: a split of {tcfg.data_dir} is shorter than block_size {mcfg.block_size}")
    mcfg = replace(mcfg, vocab_size=mcfg.vocab_size or len(vocab))
    model = MiniTransformer(mcfg).to(device)
    T, B, ctx = mcfg.block_size, tcfg.batch_size, autocast(device, tcfg.precision)

    def evaluate(m):  # train loss on fixed batches, val loss on the whole split
        val = estimate_loss(m, data["val"], T, B, 0, ctx)
        return {"train_loss": estimate_loss(m, data["train"], T, B, tcfg.eval_batches, ctx), "val_loss": val, "val_ppl": math.exp(val)}

    if tcfg.eval_only:
        model.load_state_dict(ckpt["model"])
        val = evaluate(model)["val_loss"]
        print0(f"step {ckpt['step']} | val {val:.4f} | val ppl {math.exp(val):.2f} | {len(data['val']):,} tokens")
        return {"step": ckpt["step"], "val_loss": val}
    print0(f"{model.num_params():,} parameters | device {device} x {world} | {precision_name(device, tcfg.precision)} | "
           f"{len(data['train']):,} train tokens")
    meta = {"model_config": asdict(mcfg), "vocab": vocab}
    result = fit(model, tcfg, lambda g: get_batch(data["train"], T, B, g), evaluate, meta, ("tok", B * T), ckpt)
    if tcfg.sample_chars and rank == 0:
        prompt = torch.tensor([[vocab.find("\n") if "\n" in vocab else 0]], device=device)
        ids = model.generate(prompt, tcfg.sample_chars, temperature=0.8,
                             generator=torch.Generator(device).manual_seed(tcfg.seed))  # own RNG stream
        print("-" * 40 + "\n" + "".join(vocab[i] for i in ids[0, 1:].tolist()) + "\n" + "-" * 40)
    return result


def checkpoint_and_config(path, key, cls, given, parser):
    """Load a checkpoint and rebuild its model config (saved under key) as cls. The model's shape comes
    from the checkpoint: a flag typed for one of its fields with another value is a CLI error."""
    script = Path(sys.argv[0]).name
    ckpt = load_checkpoint(path, trainer=script)
    saved = ckpt.get(key) if isinstance(ckpt, dict) else None
    if not isinstance(saved, dict):  # another script's checkpoint (vit.py's under out/vit, say)
        sys.exit(f"error: {path} is not a {script} checkpoint (it has no {key}); point --out_dir at one")
    clash = [f"--{k} {given[k]} (checkpoint: {saved[k]})" for k in saved if k in given and given[k] != saved[k]]
    if clash:
        parser.error("the model's shape comes from the checkpoint; remove " + ", ".join(clash))
    return ckpt, cls(**saved)


def main():
    (mcfg, tcfg), given, parser = parse_config(TransformerConfig(), TrainConfig(), description=__doc__.split("\n\n")[0])
    ckpt = None
    if tcfg.resume or tcfg.eval_only:  # the model's shape comes from the checkpoint, the rest from the flags
        path = Path(tcfg.out_dir) / ("ckpt.pt" if tcfg.resume else "best.pt")
        ckpt, mcfg = checkpoint_and_config(path, "model_config", TransformerConfig, given, parser)
    try:
        train(mcfg, tcfg, ckpt)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    run_main(main)
