"""
A decoder-only Transformer language model on characters, and its training loop, in one file.

Read it top to bottom: configuration, attention, feed-forward, block, model, generation, data, the optimizers,
training, main(). The run plumbing (command line, device and precision, checkpoints, DDP, signals) is in
plumbing.py, which a learner may skip; the other scripts and the tests import from this file.

    python prepare_shakespeare.py && python mini_transformer.py     # trains for about 5 minutes
    python mini_transformer.py --help                               # every config field is a flag
    python mini_transformer.py --max_steps 2000                     # a fixed number of steps instead
    python mini_transformer.py --resume                             # continue from out/ckpt.pt
    python mini_transformer.py --eval_only                          # val loss of out/best.pt
    torchrun --standalone --nproc_per_node 2 mini_transformer.py    # DDP: 2 processes (GPUs or CPU)
"""

import contextlib
import hashlib
import json
import math
import shlex
import signal
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from plumbing import (autocast, checkpoint_and_config, choose_precision, claim_out_dir, minutes, parse_config, print0,
                      restore_state, run_main, save_checkpoint, setup_ddp, stop_flag, sync, training_state, write_file)

# ----------------------------------------------------------------------------------------------------
# Configuration: one dataclass per concern; parse_config() turns every field into a --flag.


@dataclass
class TransformerConfig:
    vocab_size: int = 0  # tokens in the vocabulary; 0 = the data's (meta.json), more pads the table
    block_size: int = 128  # context length T in tokens
    n_layers: int = 4  # Transformer blocks
    n_heads: int = 4  # attention heads; d_model is split evenly among them
    d_model: int = 128  # width of the residual stream
    d_ff: int = 512  # hidden width of the feed-forward network (usually 4 * d_model)
    dropout: float = 0.0  # dropout probability on attention and residual branches
    bias: bool = False  # biases in Linear and LayerNorm layers (off, as in LLaMA)
    ffn: str = "relu"  # feed-forward type: relu or swiglu (Shazeer 2020)
    attn: str = "sdpa"  # attention path: sdpa (fused kernel) or explicit (mask + softmax, as taught)

    def __post_init__(self):
        check_block_fields(self)
        if self.block_size < 1 or self.vocab_size < 0:
            raise ValueError("block_size must be positive and vocab_size not negative")


def check_block_fields(cfg):
    """Validate the fields that TransformerBlock reads (shared with vit.py's config)."""
    if min(cfg.n_layers, cfg.n_heads, cfg.d_model, cfg.d_ff) < 1 or cfg.d_model % cfg.n_heads:
        raise ValueError(f"n_layers, n_heads, d_model, d_ff must be positive and d_model ({cfg.d_model}) "
                         f"divisible by n_heads ({cfg.n_heads})")
    if not 0 <= cfg.dropout < 1 or cfg.ffn not in ("relu", "swiglu") or cfg.attn not in ("sdpa", "explicit"):
        raise ValueError(f"need dropout in [0, 1), ffn relu or swiglu, attn sdpa or explicit; got {cfg.dropout}, "
                         f"{cfg.ffn}, {cfg.attn}")


@dataclass
class TrainConfig:
    data_dir: str = "data/shakespeare"  # folder of the prepared data (prepare_shakespeare.py; vit.py: prepare_mnist.py)
    out_dir: str = "out"  # folder for ckpt.pt, best.pt, config.json and log.jsonl
    time_budget: float = 300.0  # seconds from launch to the end, when max_steps is 0; 0 = off
    max_steps: int = 0  # optimizer steps; 0 = as many as fit in time_budget (timed during the warmup)
    batch_size: int = 16  # sequences per optimizer step (the global batch)
    grad_accum: int = 1  # micro-batches per step, to fit a large batch in memory
    optimizer: str = "muon"  # muon (Muon for the blocks' matrices, AdamW for the rest) or adamw
    learning_rate: float = 3e-3  # peak learning rate of AdamW, reached after warmup
    muon_lr: float = 0.02  # peak learning rate of Muon (--optimizer muon)
    min_lr: float = 1e-4  # AdamW's learning rate at the end of the cosine decay (Muon's is scaled alike)
    warmup_steps: int = -1  # steps of linear warmup; -1 = a tenth of max_steps, at most 100
    weight_decay: float = 0.1  # decoupled weight decay, on matrices and embeddings only
    beta2: float = 0.99  # AdamW second-moment decay (beta1 is 0.9)
    grad_clip: float = 1.0  # clip the global gradient norm to this; 0 = no clipping
    eval_interval: int = 1000  # steps between evaluations and checkpoints
    eval_batches: int = 20  # fixed train batches per evaluation (val is always the whole split)
    log_interval: int = 100  # steps between progress lines
    sample_chars: int = 300  # characters generated at the end of training; 0 = none (language model only)
    seed: int = 1337  # seeds the init, dropout and the order of batches
    device: str = "auto"  # auto (cuda > mps > cpu), cpu, cuda, cuda:1 or mps
    compile: bool = False  # torch.compile the model (CUDA only; the first steps are slow)
    precision: str = "auto"  # auto (bf16 where measured faster), bf16 or fp32
    resume: bool = False  # continue from out_dir/ckpt.pt (the model's shape comes from the checkpoint)
    overwrite: bool = False  # start afresh in an out_dir that holds another run's checkpoints
    eval_only: bool = False  # report the val loss of out_dir/best.pt and exit

    def __post_init__(self):
        least = {"batch_size": 1, "grad_accum": 1, "eval_interval": 1, "log_interval": 1, "eval_batches": 1,
                 "weight_decay": 0, "grad_clip": 0, "sample_chars": 0}
        below = [f"{k} {getattr(self, k)} (at least {m})" for k, m in least.items() if getattr(self, k) < m]
        if below:
            raise ValueError("too small: " + ", ".join(below))
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size ({self.batch_size}) must divide by grad_accum ({self.grad_accum})")
        if self.max_steps < 0:
            raise ValueError(f"max_steps must be >= 0 (0: as many as fit in time_budget), got {self.max_steps}")
        if self.warmup_steps < -1:
            raise ValueError(f"warmup_steps must be >= -1 (-1: a tenth of max_steps), got {self.warmup_steps}")
        if self.max_steps == 0 and self.time_budget <= 0:
            raise ValueError("give --max_steps or a --time_budget above 0")
        if 0 < self.max_steps <= self.warmup_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be below max_steps ({self.max_steps})")
        if not (0 < self.min_lr <= self.learning_rate and self.muon_lr > 0):
            raise ValueError(f"need 0 < min_lr ({self.min_lr}) <= learning_rate ({self.learning_rate}), muon_lr > 0")
        if not 0 <= self.beta2 < 1:
            raise ValueError(f"beta2 must be in [0, 1), got {self.beta2}")
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be in [0, 2**63), got {self.seed}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision must be auto, bf16 or fp32, got {self.precision}")
        if self.optimizer not in ("adamw", "muon"):
            raise ValueError(f"optimizer must be adamw or muon, got {self.optimizer}")

    def warmup(self):
        """The warmup in steps: warmup_steps, or for -1 a tenth of max_steps, at most 100."""
        default = min(100, self.max_steps // 10) if self.max_steps else 100
        return self.warmup_steps if self.warmup_steps >= 0 else default


# ----------------------------------------------------------------------------------------------------
# The model


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention: x (B, T, d_model) -> (B, T, d_model).

    One fused projection makes q, k and v: a single large matmul reads x once and keeps the hardware
    busier than three small ones. causal=False lets every position see every other (vit.py)."""

    sdpa_on_cpu = False  # True: SDPA on the CPU even where it is slower there (the tests compare it everywhere)

    def __init__(self, cfg, causal=True):
        super().__init__()
        self.n_heads, self.causal, self.path, self.dropout = cfg.n_heads, causal, cfg.attn, cfg.dropout
        self.block_size = getattr(cfg, "block_size", 0)  # the KV cache's capacity (the ViT has none)
        self.qkv_proj = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias)
        self.out_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.attn_dropout = nn.Dropout(cfg.dropout)
        self.resid_dropout = nn.Dropout(cfg.dropout)
        if causal:  # mask[i, j]: may query i see key j (j <= i)? Derived, so not saved (persistent=False)
            mask = torch.ones(cfg.block_size, cfg.block_size, dtype=torch.bool).tril()
            self.register_buffer("mask", mask, persistent=False)

    def forward(self, x, return_weights=False, kv_cache=None):
        """kv_cache: a dict that keeps this layer's keys and values between calls during generation;
        x then holds only the new positions, which come after the cached ones. return_weights: also
        return the attention weights (B, H, T, T0 + T) of the explicit path."""
        B, T, C = x.shape  # batch, time, channels (d_model)
        # Heads: view the 3C channels as (q/k/v, H, d_k), then move those two axes in front of T:
        # (B, T, 3, H, d_k) -> (3, B, H, T, d_k). A direct view as (B, H, T, d_k) would silently mix
        # time steps and heads.
        qkv = self.qkv_proj(x).view(B, T, 3, self.n_heads, C // self.n_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, H, T, d_k)
        T0 = 0  # positions already cached: queries are T0..T0+T-1, keys 0..T0+T-1
        if kv_cache is not None:  # room for block_size positions, filled in place as generation goes on
            if not kv_cache:
                shape = (B, self.n_heads, self.block_size, C // self.n_heads)
                kv_cache.update(len=0, k=k.new_empty(shape), v=v.new_empty(shape))
            T0 = kv_cache["len"]
            kv_cache["k"][:, :, T0 : T0 + T], kv_cache["v"][:, :, T0 : T0 + T] = k, v
            kv_cache["len"] = T0 + T
            k, v = kv_cache["k"][:, :, : T0 + T], kv_cache["v"][:, :, : T0 + T]  # (B, H, T0 + T, d_k)
        # SDPA is the fast path, except on the CPU under bf16 autocast or with dropout in training,
        # where its kernels are slower than the explicit computation below (EXPERIMENTS.md).
        cpu_slow = x.device.type == "cpu" and not self.sdpa_on_cpu and (
            torch.is_autocast_enabled("cpu") or self.training and self.dropout > 0)
        if self.path == "sdpa" and not return_weights and not cpu_slow:
            # The same computation in one fused kernel. SDPA does not know train/eval, so dropout_p
            # must be switched off by hand in eval. Its is_causal mask is aligned top-left, right only
            # when queries and keys start together (T0 = 0); one new query may see every cached key.
            p = self.dropout if self.training else 0.0
            offset_mask = self.mask[T0 : T0 + T, : T0 + T] if self.causal and T0 and T > 1 else None
            is_causal = self.causal and not T0
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=offset_mask, dropout_p=p, is_causal=is_causal)
        else:
            # att[b, h, i, j]: how strongly query i attends to key j in head h. Dividing by sqrt(d_k)
            # keeps the scores' variance near 1, so the softmax does not saturate.
            att = (q / math.sqrt(k.size(-1))) @ k.transpose(-2, -1)  # (B, H, T, T0 + T): the quadratic cost
            if self.causal:  # -inf before the softmax gives future keys exactly zero weight
                att = att.masked_fill(~self.mask[T0 : T0 + T, : T0 + T], float("-inf"))
            att = F.softmax(att, dim=-1)
            y = self.attn_dropout(att) @ v  # (B, H, T, d_k)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # heads side by side again
        y = self.resid_dropout(self.out_proj(y))
        return (y, att) if return_weights else y


class FeedForward(nn.Module):
    """The original Transformer's position-wise MLP: d_model -> d_ff -> d_model with ReLU. (B, T, C) -> (B, T, C)."""

    def __init__(self, cfg):
        super().__init__()
        self.fc1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.fc2 = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.dropout(self.fc2(F.relu(self.fc1(x))))


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
        self.dropout = nn.Dropout(cfg.dropout)

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
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layers))
        # Pre-LN leaves the stream a growing sum of un-normalised branch outputs: one LayerNorm before the head
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
        T = idx.size(1)
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

    @torch.inference_mode()  # no autograd bookkeeping at all; the tokens it yields cannot enter a backward
    def stream(self, idx, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, generator=None, kv_cache=True,
               vocab_limit=0):
        """Yield max_new_tokens next tokens, each (B, 1), continuing idx (B, T).

        With kv_cache the context is encoded once and each new token costs one position's work. The
        positions are learned and absolute, so a full cache cannot slide: it is rebuilt from the last
        block_size // 2 tokens, and the context then grows back to block_size. Without kv_cache every
        token re-reads the last block_size tokens. vocab_limit > 0 samples only ids below it: a table
        padded beyond the data's vocabulary (--vocab_size) has rows that no character stands for.
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
                    logits = self(idx[:, -1:], kv_cache=cache)[0][:, -1]  # one new position
                next_id = sample_next(logits[:, : vocab_limit or None], temperature, top_k, top_p, generator)  # (B, 1)
                idx = torch.cat([idx, next_id], dim=1)
                yield next_id
        finally:
            self.train(was_training)

    def generate(self, idx, max_new_tokens, **kwargs):
        """idx (B, T) extended by max_new_tokens tokens -> (B, T + max_new_tokens); kwargs as stream()."""
        return torch.cat([idx, *self.stream(idx, max_new_tokens, **kwargs)], dim=1)


def sample_next(logits, temperature=1.0, top_k=0, top_p=1.0, generator=None):
    """Pick the next token from logits (B, vocab_size) -> (B, 1).

    temperature 0 is greedy; top_k 0 keeps every token (a top_k beyond the vocabulary is clamped);
    top_p < 1 keeps the smallest set of most likely tokens whose probabilities add up to top_p (nucleus
    sampling, Holtzman et al. 2019). Both keep every token tied with the last one kept, and top_p keeps
    at least the most likely token.
    """
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    if top_k:  # on the raw logits: the order does not depend on the temperature, and no rounding merges near-ties
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))  # -inf, not a small number
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature  # max at 0: a tiny temperature cannot overflow
    if top_p < 1.0:
        probs = F.softmax(logits, dim=-1)
        sorted_probs = probs.sort(dim=-1, descending=True).values  # (B, V)
        ahead = sorted_probs.cumsum(dim=-1) - sorted_probs  # the mass of the more likely tokens
        n_keep = (ahead < top_p).sum(dim=-1, keepdim=True).clamp(min=1)  # (B, 1)
        edge = sorted_probs.gather(-1, n_keep - 1)  # the least likely kept probability
        logits = logits.masked_fill(probs < edge, float("-inf"))
    return torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)


# ----------------------------------------------------------------------------------------------------
# Data


def load_data(data_dir, device):
    """The train and val token ids as int64 tensors on the device (tiny Shakespeare is 8 MB), and the
    vocabulary string (token i is vocab[i]). meta.json records the size and sha256 of the .bin files
    written with it, so a half-replaced dataset is refused instead of trained on."""
    path, hint = Path(data_dir), f"(run: python prepare_shakespeare.py --data_dir {data_dir})"
    if not (path / "meta.json").exists():
        sys.exit(f"error: {path / 'meta.json'} not found {hint}")
    try:
        meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
        vocab, raw = meta["vocab"], {s: (path / f"{s}.bin").read_bytes() for s in ("train", "val")}
        if not isinstance(vocab, str) or not vocab:
            raise ValueError("meta.json's vocab is not a string of characters")
        for s, want in meta.get("files", {}).items():
            got = raw[s.removesuffix(".bin")]
            if len(got) != want["bytes"] or hashlib.sha256(got).hexdigest() != want["sha256"]:
                raise ValueError(f"{s} is not the file meta.json was written with (an interrupted prepare?)")
        data = {s: np.frombuffer(b, dtype=np.uint16) for s, b in raw.items()}  # an odd size raises
        if any(d.max(initial=0) >= len(vocab) for d in data.values()):
            raise ValueError("a .bin file has token ids beyond the vocabulary")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:  # missing, broken or mixed files
        sys.exit(f"error: the data in {path} is damaged: {str(e).splitlines()[0]} {hint}")
    return {s: torch.from_numpy(d.astype(np.int64)).to(device) for s, d in data.items()}, vocab


def to_device(t, device):
    """A small CPU tensor (batch indices) onto device. On CUDA through pinned memory, so that the copy
    is queued like a kernel instead of waiting for every queued kernel first."""
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)


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


def newton_schulz(G, steps=5, dtype=torch.float32):
    """The orthogonal factor of G (rows, cols), approximately: if G = U S V^T, then U V^T, which keeps
    G's directions and sets every singular value to about 1.

    An odd polynomial of X, aX + b(XX^T)X + c(XX^T)^2 X, keeps U and V and maps each singular value s to
    p(s) = as + bs^3 + cs^5. Scaled by its norm, G has every s in [0, 1], and repeating p pulls them all
    towards 1. Keller Jordan's coefficients make the slope at 0 large (a = 3.4445), so that even small s
    grow fast; the price is that they settle between about 0.7 and 1.2 instead of at 1, which trains as
    well. Five steps of small matmuls, in dtype (the run's precision)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.to(dtype)
    tall = X.size(0) > X.size(1)
    X = X.mT if tall else X  # (rows <= cols): X X^T is then the smaller of the two Gram matrices
    X = X / X.norm().clamp(min=1e-7)  # the Frobenius norm bounds the largest singular value
    for _ in range(steps):
        A = X @ X.mT  # (rows, rows)
        B = torch.addmm(A, A, A, beta=b, alpha=c)  # b A + c A A, in one call
        X = torch.addmm(X, B, X, beta=a)  # a X + B X = a X + b (X X^T) X + c (X X^T)^2 X
    return X.mT if tall else X


class Muon(torch.optim.Optimizer):
    """Muon (Keller Jordan et al. 2024) for 2-D weights: SGD with Nesterov momentum whose update is orthogonalised
    by newton_schulz(). A gradient matrix is dominated by a few directions; the orthogonalised update moves the
    weight as much along the rare ones. dtype: the precision of the Newton-Schulz matmuls."""

    def __init__(self, params, lr=0.02, momentum=0.95, weight_decay=0.0, dtype=torch.float32):
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay})
        self.dtype = dtype

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, mu = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p not in self.state:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p)
                buf = self.state[p]["momentum_buffer"]
                buf.lerp_(p.grad, 1 - mu)  # an average of past gradients
                update = newton_schulz(p.grad.lerp(buf, mu), dtype=self.dtype)  # Nesterov: a step beyond it
                # the entries of an orthogonal (rows, cols) have RMS 1/sqrt(max(rows, cols)); now 1/sqrt(cols)
                scale = math.sqrt(max(1.0, p.size(0) / p.size(1)))
                p.mul_(1 - lr * group["weight_decay"])  # decoupled weight decay, as in AdamW
                p.add_(update, alpha=-lr * scale)


def make_optimizer(model, cfg):
    """A list of optimizers that together update every parameter once (the tied matrix too). AdamW
    decays only tensors of 2+ dims: pulling LayerNorm gains and biases towards 0 only hurts.
    --optimizer muon: Muon for the blocks' matrices, maps from one hidden state to another.
    Embeddings, the tied head, gains and biases are not such maps: AdamW. Muon's matmuls run in the
    run's precision (cfg.precision): an fp32 run makes no bf16 tensor anywhere."""
    named = list(model.named_parameters())  # de-duplicated: the tied matrix appears once
    muon = [p for n, p in named if cfg.optimizer == "muon" and n.startswith("blocks.") and p.dim() == 2]
    rest = [p for _, p in named if all(p is not m for m in muon)]
    matrices, vectors = [p for p in rest if p.dim() >= 2], [p for p in rest if p.dim() < 2]
    groups = [{"params": matrices, "weight_decay": cfg.weight_decay, "peak_lr": cfg.learning_rate},
              {"params": vectors, "weight_decay": 0.0, "peak_lr": cfg.learning_rate}]
    fused = next(model.parameters()).device.type in ("cuda", "cpu")  # one kernel for the whole update
    optimizers = [torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(0.9, cfg.beta2), fused=fused)]
    if muon:
        dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
        group = {"params": muon, "peak_lr": cfg.muon_lr}
        optimizers.append(Muon([group], lr=cfg.muon_lr, weight_decay=cfg.weight_decay, dtype=dtype))
    return optimizers


def get_lr(step, cfg):
    """Linear warmup to learning_rate, then cosine decay to min_lr at max_steps. Warmup starts at
    learning_rate / (warmup + 1), so step 0 already learns, and no branch divides by zero. Until the
    time budget has fixed max_steps (0 before), the decay has not begun."""
    warmup = cfg.warmup()
    if step < warmup:
        return cfg.learning_rate * (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1, cfg.max_steps - warmup)) if cfg.max_steps else 0.0
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.learning_rate - cfg.min_lr)


def train_step(model, optimizers, batch, grad_accum=1, ctx=contextlib.nullcontext(), grad_clip=0.0):
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
    for opt in optimizers:
        opt.step()
        opt.zero_grad(set_to_none=True)
    return total / grad_accum, norm


def fit(model, tcfg, next_batch, evaluate, meta, unit, ckpt=None, launched=0.0, clock=time.perf_counter):
    """The training loop, shared by the language model and vit.py. next_batch(generator) -> the global
    batch (x, y) of a step; evaluate(model) -> metrics with "val_loss" (best.pt keeps the lowest); meta:
    plain data for every checkpoint; unit: (name, items per step); launched: clock() at launch, from
    which time_budget counts. Returns (last evaluation, tcfg with max_steps fixed)."""
    device, out = next(model.parameters()).device, Path(tcfg.out_dir)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    optimizers, batch_gen = make_optimizer(model, tcfg), torch.Generator().manual_seed(tcfg.seed)  # batch order
    # resume: weights, optimizer, step, best, RNG streams
    step, best_val = restore_state(ckpt, model, optimizers, batch_gen, tcfg) if ckpt else (0, float("inf"))
    if rank:  # other dropout masks on each rank; rank 0 keeps the stream a single process would have
        torch.manual_seed(tcfg.seed + 1000 * rank + step)
    # wrap: compile (CUDA only; saves use the raw model), DDP, autocast; config.json beside the checkpoints
    fwd = torch.compile(model) if tcfg.compile and device.type == "cuda" else model
    fwd = DDP(fwd, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else fwd
    ctx, start, stop, result, eval_s, timer = autocast(device, tcfg.precision), step, False, {}, 0.0, None
    budget = not tcfg.max_steps  # sized by the time budget: max_steps is fixed, and fixed again, as steps are timed
    write_file(out / "config.json", json.dumps({**meta, "train_config": asdict(tcfg)}, indent=2), rank)
    with stop_flag() as interrupted:
        while True:
            last = 0 < tcfg.max_steps == step  # max_steps 0: not yet fixed by the time budget
            # evaluate (every rank, the same data: they agree on the best and on a NaN), checkpoint, log
            if last or (step % tcfg.eval_interval == 0 and (step > start or start == 0)):
                sync(device)  # queued steps belong to the steps' time, not the eval's
                t_eval = clock()
                result = {"kind": "eval", "step": step, **evaluate(model)}  # eager: no recompile for eval mode
                check_finite(result["val_loss"], "val loss", step, out)
                improved, best_val = result["val_loss"] < best_val, min(best_val, result["val_loss"])
                state = training_state(model, optimizers, tcfg, step, best_val, batch_gen, meta)
                for name in ("ckpt.pt", "best.pt") if improved else ("ckpt.pt",):
                    save_checkpoint(out / name, state, rank)
                eval_s = clock() - t_eval
                timer = (timer[0] + eval_s, timer[1]) if timer else None  # the clock skips evals: they are not timed
                result.update(best_val_loss=best_val, eval_s=round(eval_s, 2), elapsed_s=round(clock() - launched, 1))
                write_file(out / "log.jsonl", json.dumps(result) + "\n", rank, mode="a")
                shown = [f"{k.removesuffix('_loss').replace('_', ' ')} {v:.4f}" for k, v in result.items()
                         if k.endswith(("loss", "ppl", "acc"))]
                print0(f"step {step} | " + " | ".join(shown))
            if last or stop:
                break
            # one optimizer step on this rank's slice of the global batch
            lr = get_lr(step, tcfg)
            for group in (g for opt in optimizers for g in opt.param_groups):
                group["lr"] = group["peak_lr"] * lr / tcfg.learning_rate  # one schedule for every optimizer
            batch = [t.chunk(world)[rank] for t in next_batch(batch_gen)]  # (x, y) of this rank
            loss, norm = train_step(fwd, optimizers, batch, tcfg.grad_accum, ctx, tcfg.grad_clip)
            step += 1
            stop = bool(interrupted) if world == 1 else stop  # several processes agree at log steps below
            if timer is None:  # the first step warms up (and compiles): the clock starts after it
                sync(device)
                timer = (clock(), step)
                continue
            if step % tcfg.log_interval and (tcfg.max_steps or step < tcfg.warmup()):
                continue
            # time budget: at every line, fix max_steps (and where the cosine ends) from the speed since the last
            sync(device)
            dt, timer = (clock() - timer[0]) / (step - timer[1]), (clock(), step)  # s/step since the last line
            if budget:
                tcfg = fix_max_steps(tcfg, step, dt, eval_s, clock() - launched, device)
                write_file(out / "config.json", json.dumps({**meta, "train_config": asdict(tcfg)}, indent=2), rank)
            # progress line and log record (rank 0); stop on NaN
            if world > 1:
                dist.all_reduce(loss)  # a sum: gloo has no average
                loss /= world
                flag = torch.tensor(float(bool(interrupted)), device=device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # a Ctrl-C on any rank stops them all here
                stop = flag.item() > 0
            loss, left = check_finite(loss.item(), "loss", step, out), tcfg.max_steps - step
            record = {"kind": "train", "step": step, "loss": round(loss, 4), "lr": lr}
            record.update(ms_per_step=round(1e3 * dt, 2), seen=step * unit[1], elapsed_s=round(clock() - launched, 1))
            write_file(out / "log.jsonl", json.dumps(record) + "\n", rank, mode="a")
            eta = dt * left + eval_s * (left // tcfg.eval_interval + 1)
            print0(f"step {step}/{tcfg.max_steps} | loss {loss:.4f} | lr {lr:.1e} | norm {norm.item():.2f} | "
                   f"{1000 * dt:.0f} ms/step | {unit[1] / dt / 1000:.1f}k {unit[0]}/s | eta {minutes(eta)}")
    # stopped by Ctrl-C or kill: save, print the command that resumes, exit 130 (143 for a kill)
    if stop or interrupted:
        save_checkpoint(out / "ckpt.pt", training_state(model, optimizers, tcfg, step, best_val, batch_gen, meta), rank)
        launcher = ["torchrun", "--standalone", f"--nproc_per_node={world}"] if world > 1 else ["python"]
        command = " ".join(launcher + [shlex.quote(a) for a in sys.argv if a != "--resume"])
        print0(f"interrupted: saved step {step} to {out / 'ckpt.pt'}; continue with:\n  {command} --resume")
        sys.exit(128 + (interrupted[0][1] if interrupted else signal.SIGINT))  # told by another rank: as Ctrl-C
    print0(f"trained steps {start} to {step}; {minutes(clock() - launched)} since launch")
    return result, tcfg


BUDGET_RESERVE = 0.02  # the share of time_budget kept for what follows the last evaluation


def fix_max_steps(tcfg, step, dt, eval_s, elapsed, device):
    """tcfg with max_steps set so that the run ends within time_budget: dt seconds per step, an eval
    of eval_s every eval_interval steps and one at the end, a small reserve for the final sample. The first
    time, the default warmup becomes a tenth of those steps (at most 100), so that a short budget is not spent
    warming up. Under torchrun rank 0's choice is broadcast, so that every process stops at the same step."""
    left = tcfg.time_budget * (1 - BUDGET_RESERVE) - elapsed - eval_s
    n = max(step + 1, tcfg.warmup_steps + 1, step + int(left / (dt + eval_s / tcfg.eval_interval)))
    n = torch.tensor(n, device=device)
    if dist.is_initialized():
        dist.broadcast(n, 0)
    if not tcfg.max_steps:
        print0(f"~{1000 * dt:.0f} ms/step here: {n.item():,} steps fit in {minutes(tcfg.time_budget)}")
    fixed = replace(tcfg, max_steps=n.item())
    return replace(fixed, warmup_steps=fixed.warmup())


def check_finite(value, name, step, out):
    """value, or exit with one line when it is NaN or infinite (the learning rate is usually too high)."""
    if not math.isfinite(value):
        sys.exit(f"error: {name} is {value} at step {step}; {out / 'ckpt.pt'} keeps the last good state "
                 "(try a lower --learning_rate)")
    return value


def train(mcfg, tcfg, ckpt=None, launched=0.0):
    """Train the language model on tcfg.data_dir (continuing from ckpt if given); returns the last eval."""
    rank, world, device = setup_ddp(tcfg)
    torch.manual_seed(tcfg.seed)  # the same init on every rank
    data, vocab = load_data(tcfg.data_dir, device)
    if ckpt is None and 0 < mcfg.vocab_size < len(vocab):
        sys.exit(f"error: the data has {len(vocab)} distinct tokens, more than --vocab_size {mcfg.vocab_size}")
    if ckpt is not None and ckpt.get("vocab") != vocab:
        sys.exit(f"error: the vocabulary in {tcfg.data_dir} differs from the checkpoint's")
    if min(len(d) for d in data.values()) <= mcfg.block_size:
        sys.exit(f"error: a split of {tcfg.data_dir} is shorter than block_size {mcfg.block_size}")
    mcfg = replace(mcfg, vocab_size=mcfg.vocab_size or len(vocab))
    model, block_size, batch_size = MiniTransformer(mcfg).to(device), mcfg.block_size, tcfg.batch_size
    precision, why = choose_precision(device, tcfg.precision, mcfg, batch_size * block_size // world)
    tcfg, ctx = replace(tcfg, precision=precision), autocast(device, precision)

    def evaluate(m):  # train loss on fixed batches, val loss on the whole split
        train_loss = estimate_loss(m, data["train"], block_size, batch_size, tcfg.eval_batches, ctx)
        val = estimate_loss(m, data["val"], block_size, batch_size, 0, ctx)
        return {"train_loss": train_loss, "val_loss": val, "val_ppl": math.exp(val)}

    if tcfg.eval_only:
        model.load_state_dict(ckpt["model"])
        val, step = evaluate(model)["val_loss"], ckpt.get("step", "?")  # one stripped to its weights has no step
        print0(f"step {step} | val {val:.4f} | val ppl {math.exp(val):.2f} | {len(data['val']):,} tokens")
        return {"step": step, "val_loss": val}
    print0(f"{model.num_params():,} parameters | device {device} x {world} | {why} | "
           f"{len(data['train']):,} train tokens")
    meta = {"model_config": asdict(mcfg), "vocab": vocab}
    result, tcfg = fit(model, tcfg, lambda g: get_batch(data["train"], block_size, batch_size, g), evaluate, meta,
                       ("tok", batch_size * block_size), ckpt, launched)
    if tcfg.sample_chars and rank == 0:
        prompt = torch.tensor([[vocab.find("\n") if "\n" in vocab else 0]], device=device)
        ids = model.generate(prompt, tcfg.sample_chars, temperature=0.8, vocab_limit=len(vocab),
                             generator=torch.Generator(device).manual_seed(tcfg.seed))  # own RNG stream
        print("-" * 40 + "\n" + "".join(vocab[i] for i in ids[0, 1:].tolist()) + "\n" + "-" * 40)
    return result


# ----------------------------------------------------------------------------------------------------
# main(). The run plumbing it calls (command line, device and precision, checkpoints, the out_dir lock,
# DDP, signals) is in plumbing.py: nothing there is about Transformers.


def main():
    launched = time.perf_counter()
    (mcfg, tcfg), given, parser = parse_config(TransformerConfig(), TrainConfig(), description=__doc__)
    ckpt = None
    if tcfg.resume or tcfg.eval_only:  # the model's shape comes from the checkpoint, the rest from the flags
        ckpt, mcfg, tcfg = checkpoint_and_config(tcfg, "model_config", TransformerConfig, given, parser)
    with claim_out_dir(tcfg):  # only once the checkpoint is known good: a refused run leaves no trace
        try:
            train(mcfg, tcfg, ckpt, launched)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()


if __name__ == "__main__":
    run_main(main)
