"""
A decoder-only Transformer language model on characters, and its training loop, in one file.

The course lab's model in its reading order: config -> attention -> feed-forward -> block -> model
-> data -> training. sample.py, vit.py, bench.py and test_shapes.py import from this file.

    python prepare_shakespeare.py && python mini_transformer.py     # CPU defaults, about 5 minutes
    python mini_transformer.py --help                               # every config field is a flag
    python mini_transformer.py --resume                             # continue from out/ckpt.pt
    python mini_transformer.py --eval_only                          # val loss of out/best.pt
"""

import argparse
import contextlib
import inspect
import json
import math
import os
import re
import shlex
import signal
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------------
# Configuration: one dataclass per concern; parse_config() turns every field into a --flag.


@dataclass
class TransformerConfig:
    vocab_size: int = 0  # tokens in the vocabulary; 0 = the data's (meta.json), more pads the table
    block_size: int = 64  # context length T in tokens (the lab uses 128)
    n_layers: int = 4  # Transformer blocks
    n_heads: int = 4  # attention heads; d_model is split evenly among them
    d_model: int = 128  # width of the residual stream
    d_ff: int = 512  # hidden width of the feed-forward network (4 * d_model)
    dropout: float = 0.0  # dropout probability on attention and residual branches (the lab uses 0.1)
    bias: bool = False  # biases in Linear and LayerNorm layers (off, as in LLaMA)
    ffn: str = "relu"  # feed-forward type: relu (the lab's) or swiglu (Shazeer 2020)
    attn: str = "sdpa"  # attention path: sdpa (fused kernel) or explicit (mask + softmax, as taught)

    def __post_init__(self):
        if min(self.block_size, self.n_layers, self.n_heads, self.d_model, self.d_ff) < 1 or self.vocab_size < 0:
            raise ValueError("sizes must be positive")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.ffn not in ("relu", "swiglu") or self.attn not in ("sdpa", "explicit"):
            raise ValueError(f"ffn must be relu or swiglu and attn sdpa or explicit, got {self.ffn}, {self.attn}")


@dataclass
class TrainConfig:
    data_dir: str = "data/shakespeare"  # folder with train.bin, val.bin, meta.json (prepare_shakespeare.py)
    out_dir: str = "out"  # folder for ckpt.pt, best.pt, config.json and log.jsonl
    max_steps: int = 5000  # optimizer steps
    batch_size: int = 16  # sequences per optimizer step (the global batch)
    grad_accum: int = 1  # micro-batches per step, to fit a large batch in memory
    learning_rate: float = 2e-3  # peak learning rate, reached after warmup
    min_lr: float = 2e-4  # learning rate at the end of the cosine decay
    warmup_steps: int = 100  # steps of linear warmup
    weight_decay: float = 0.1  # AdamW decoupled weight decay, on matrices and embeddings only
    beta2: float = 0.99  # AdamW second-moment decay (beta1 is 0.9)
    grad_clip: float = 1.0  # clip the global gradient norm to this; 0 = no clipping
    eval_interval: int = 1000  # steps between evaluations and checkpoints
    eval_batches: int = 20  # fixed train batches per evaluation (val is always the whole split)
    log_interval: int = 100  # steps between progress lines
    sample_chars: int = 300  # characters generated at the end of training; 0 = none
    seed: int = 1337  # seeds the init, dropout and the order of batches
    device: str = "auto"  # auto (cuda > mps > cpu), cpu, cuda, cuda:1 or mps
    compile: bool = False  # torch.compile the model (CUDA only; the first steps are slow)
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
            helptext = f"{comments.get(f.name, '')} (default: {value})".replace("%", "%%")
            group.add_argument(f"--{f.name}", default=argparse.SUPPRESS, help=helptext, **kind)
    given = vars(parser.parse_args(argv))  # only the flags actually typed (SUPPRESS leaves out the rest)
    try:  # replace() re-runs __post_init__, so a bad combination becomes one parser error
        cfgs = [replace(c, **{f.name: given[f.name] for f in fields(c) if f.name in given}) for c in defaults]
    except ValueError as e:
        parser.error(str(e))
    return cfgs, given, parser


# ----------------------------------------------------------------------------------------------------
# The model


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention: x (B, T, d_model) -> (B, T, d_model).

    One fused projection makes q, k and v: a single large matmul reads x once and keeps the hardware
    busier than three small ones. causal=False lets every position see every other (vit.py).
    """

    def __init__(self, cfg, causal=True):
        super().__init__()
        self.n_heads, self.causal, self.attn, self.dropout = cfg.n_heads, causal, cfg.attn, cfg.dropout
        self.qkv_proj = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias)
        self.out_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.attn_dropout = nn.Dropout(cfg.dropout)
        self.resid_dropout = nn.Dropout(cfg.dropout)
        if causal:  # mask[i, j]: may query i see key j (j <= i)? Derived, so not saved (persistent=False)
            mask = torch.ones(cfg.block_size, cfg.block_size, dtype=torch.bool).tril()
            self.register_buffer("mask", mask, persistent=False)

    def forward(self, x, return_weights=False):
        B, T, C = x.shape  # batch, time, channels (d_model)
        q, k, v = self.qkv_proj(x).split(C, dim=2)  # each (B, T, C)
        # Heads: view the channels as (H, d_k), then move H next to B. A direct view(B, H, T, d_k)
        # would silently mix time steps and heads.
        q, k, v = (t.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2) for t in (q, k, v))  # (B, H, T, d_k)
        if self.attn == "sdpa" and not return_weights:
            # The same computation in one fused kernel. SDPA does not know train/eval, so dropout_p
            # must be switched off by hand in eval.
            p = self.dropout if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=self.causal)
        else:
            # att[b, h, i, j]: how strongly query i attends to key j in head h. Dividing by sqrt(d_k)
            # keeps the scores' variance near 1, so the softmax does not saturate.
            att = q @ k.transpose(-2, -1) / math.sqrt(k.size(-1))  # (B, H, T, T): the quadratic cost
            if self.causal:  # -inf before the softmax gives future keys exactly zero weight
                att = att.masked_fill(~self.mask[:T, :T], float("-inf"))
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

    def forward(self, x):  # (B, T, C) -> (B, T, C)
        x = x + self.attn(self.ln1(x))  # tokens exchange information
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

    def forward(self, idx, targets=None):
        B, T = idx.shape
        if T > self.cfg.block_size:
            raise ValueError(f"sequence of {T} tokens is longer than block_size {self.cfg.block_size}")
        pos = torch.arange(T, device=idx.device)  # (T,)
        x = self.drop(self.token_emb(idx) + self.pos_emb(pos))  # (B, T, C): positions are added
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_final(x))  # (B, T, vocab_size)
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=0, generator=None):
        """Extend idx (B, T) by max_new_tokens sampled tokens -> (B, T + max_new_tokens).

        temperature 0 takes the most likely token (greedy); top_k 0 samples from the whole vocabulary,
        and a top_k beyond it is clamped. Tokens tied with the k-th logit are all kept.
        """
        was_training = self.training
        self.eval()
        for _ in range(max_new_tokens):
            logits, _ = self(idx[:, -self.cfg.block_size :])  # positions exist only up to block_size
            logits = logits[:, -1, :]  # (B, vocab_size): the prediction for the next token
            if temperature == 0:
                next_id = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]  # (B, 1)
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                next_id = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)  # (B, 1)
            idx = torch.cat([idx, next_id], dim=1)
        self.train(was_training)
        return idx


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


def sync(device):
    """Wait for queued GPU work, so that a clock read measures it. A no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def autocast(device):
    """bf16 autocast on CUDA GPUs that support it, fp32 elsewhere: bf16 is many times slower on the
    CPUs we measured, and fp16 would need a GradScaler."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def load_data(data_dir, device):
    """The train and val token ids as int64 tensors on the device (tiny Shakespeare is 8 MB), and the
    vocabulary string (token i is vocab[i])."""
    path = Path(data_dir)
    if not (path / "meta.json").exists():
        sys.exit(f"error: {path / 'meta.json'} not found (run: python prepare_shakespeare.py --data_dir {data_dir})")
    meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
    data = {s: torch.from_numpy(np.fromfile(path / f"{s}.bin", dtype=np.uint16).astype(np.int64)) for s in ("train", "val")}
    return {s: d.to(device) for s, d in data.items()}, meta["vocab"]


def get_batch(data, block_size, batch_size, generator):
    """batch_size random windows: x (B, T) and the targets y (B, T), y[:, t] = x[:, t + 1]."""
    starts = torch.randint(len(data) - block_size, (batch_size, 1), generator=generator)  # last: len-T-1
    chunk = data[(starts + torch.arange(block_size + 1)).to(data.device)]  # (B, T + 1)
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
    # fused=True: one kernel for the whole update instead of a loop over tensors (CPU, CUDA and MPS)
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(0.9, cfg.beta2), fused=True)


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
    for xm, ym in zip(x.chunk(grad_accum), y.chunk(grad_accum)):
        with ctx:
            _, loss = model(xm, ym)
        (loss / grad_accum).backward()  # gradients add up, so each micro-batch counts 1/grad_accum
        total += loss.detach()
    norm = nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total / grad_accum, norm


def save_checkpoint(path, state):
    """torch.save to a temporary file, then rename: a kill mid-write leaves the old file intact."""
    tmp = f"{path}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, device="cpu"):
    """Read a checkpoint of tensors and plain Python (weights_only=True: no code runs on load)."""
    if not Path(path).exists():
        sys.exit(f"error: {path} not found (train a model first: python mini_transformer.py)")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # truncated or foreign file: show the reason, not a traceback
        sys.exit(f"error: {path} is not a readable checkpoint ({str(e).splitlines()[0]})")


def train(mcfg, tcfg, ckpt=None):
    """Train a MiniTransformer (continuing from ckpt if given); returns the final eval as a dict."""
    device = get_device(tcfg.device)
    torch.manual_seed(tcfg.seed)
    data, vocab = load_data(tcfg.data_dir, device)
    if ckpt is None and 0 < mcfg.vocab_size < len(vocab):
        sys.exit(f"error: the data has {len(vocab)} distinct tokens, more than --vocab_size {mcfg.vocab_size}")
    if ckpt is not None and ckpt["vocab"] != vocab:
        sys.exit(f"error: the vocabulary in {tcfg.data_dir} differs from the checkpoint's")
    if min(len(d) for d in data.values()) <= mcfg.block_size:
        sys.exit(f"error: a split of {tcfg.data_dir} is shorter than block_size {mcfg.block_size}")
    mcfg = replace(mcfg, vocab_size=mcfg.vocab_size or len(vocab))
    model = MiniTransformer(mcfg).to(device)
    optimizer = make_optimizer(model, tcfg)
    batch_gen = torch.Generator().manual_seed(tcfg.seed)  # the order of training batches
    step, best_val = 0, float("inf")
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        step, best_val = ckpt["step"], ckpt["best_val_loss"]
        torch.set_rng_state(ckpt["rng"]["torch"].cpu())
        batch_gen.set_state(ckpt["rng"]["batches"].cpu())
        if device.type == "cuda" and ckpt["rng"]["cuda"]:
            torch.cuda.set_rng_state_all([s.cpu() for s in ckpt["rng"]["cuda"]])
        del ckpt  # free its copies of the tensors
    ctx = autocast(device)
    if tcfg.eval_only:
        val = estimate_loss(model, data["val"], mcfg.block_size, tcfg.batch_size, 0, ctx)
        print(f"step {step} | val {val:.4f} | val ppl {math.exp(val):.2f} | {len(data['val']):,} tokens")
        return {"step": step, "val_loss": val}
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    fwd = model
    if tcfg.compile:
        if device.type == "cuda":
            fwd = torch.compile(model)  # checkpoints and sampling use the raw model, without _orig_mod.
        else:
            print("warning: --compile is for CUDA only; running eagerly")
    out = Path(tcfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps({"model": asdict(mcfg), "train": asdict(tcfg)}, indent=2) + "\n")
    print(f"{model.num_params():,} parameters | device {device} | {len(data['train']):,} train tokens")

    def state():
        rng = {"torch": torch.get_rng_state(), "batches": batch_gen.get_state(),
               "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else []}
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "model_config": asdict(mcfg),
                "train_config": asdict(tcfg), "vocab": vocab, "step": step, "best_val_loss": best_val, "rng": rng}

    interrupted = []  # Ctrl-C only raises this flag; the loop saves at the next step boundary

    def on_sigint(signum, frame):
        interrupted.append(signum)
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # a second Ctrl-C stops at once

    previous_handler = signal.signal(signal.SIGINT, on_sigint)
    tokens_per_step = tcfg.batch_size * mcfg.block_size
    start, t0, eval_s, result = step, None, 0.0, {}
    try:
        for step in range(start, tcfg.max_steps + 1):
            last = step == tcfg.max_steps
            if last or (step % tcfg.eval_interval == 0 and (step > start or start == 0)):
                t_eval = time.perf_counter()
                train_loss = estimate_loss(fwd, data["train"], mcfg.block_size, tcfg.batch_size, tcfg.eval_batches, ctx)
                val = estimate_loss(fwd, data["val"], mcfg.block_size, tcfg.batch_size, 0, ctx)
                if not math.isfinite(val):
                    sys.exit(f"error: val loss is {val} at step {step}; {out / 'ckpt.pt'} keeps the last good "
                             "state (try a lower --learning_rate)")
                improved = val < best_val
                best_val = min(best_val, val)
                save_checkpoint(out / "ckpt.pt", state())
                if improved:
                    save_checkpoint(out / "best.pt", state())
                eval_s = time.perf_counter() - t_eval
                result = {"step": step, "train_loss": train_loss, "val_loss": val, "val_ppl": math.exp(val),
                          "best_val_loss": best_val, "eval_s": round(eval_s, 2)}
                with open(out / "log.jsonl", "a", encoding="utf-8") as f:
                    f.write(json.dumps(result) + "\n")
                print(f"step {step} | train {train_loss:.4f} | val {val:.4f} | val ppl {math.exp(val):.2f} | best {best_val:.4f}")
                t0 = None  # the clock restarts after the next step: evals and warm-up are not timed
            if last or interrupted:
                break
            lr = get_lr(step, tcfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = get_batch(data["train"], mcfg.block_size, tcfg.batch_size, batch_gen)
            loss, norm = train_step(fwd, optimizer, batch, tcfg.grad_accum, ctx, tcfg.grad_clip)
            if t0 is None:
                sync(device)
                t0, timed_from = time.perf_counter(), step + 1
            elif (step + 1) % tcfg.log_interval == 0:
                loss = loss.item()  # the one host sync of a logging step
                if not math.isfinite(loss):
                    sys.exit(f"error: loss is {loss} at step {step}; {out / 'ckpt.pt'} keeps the last good "
                             "state (try a lower --learning_rate)")
                dt = (time.perf_counter() - t0) / (step + 1 - timed_from)
                left = tcfg.max_steps - step - 1
                eta = dt * left + eval_s * (left // tcfg.eval_interval + 1)
                print(f"step {step + 1}/{tcfg.max_steps} | loss {loss:.4f} | lr {lr:.1e} | norm {norm.item():.2f} | "
                      f"{1000 * dt:.0f} ms/step | {tokens_per_step / dt / 1000:.1f}k tok/s | eta {eta // 60:.0f}m{eta % 60:02.0f}s")
                t0, timed_from = time.perf_counter(), step + 1
    finally:
        signal.signal(signal.SIGINT, previous_handler)
    if interrupted:
        save_checkpoint(out / "ckpt.pt", state())
        command = " ".join(["python", Path(sys.argv[0]).name] + [shlex.quote(a) for a in sys.argv[1:] if a != "--resume"])
        print(f"interrupted: saved step {step} to {out / 'ckpt.pt'}; continue with:\n  {command} --resume")
        return result
    if tcfg.sample_chars:
        prompt = torch.tensor([[vocab.find("\n") if "\n" in vocab else 0]], device=device)
        ids = model.generate(prompt, tcfg.sample_chars, temperature=0.8, top_k=0,
                             generator=torch.Generator(device).manual_seed(tcfg.seed))  # own RNG stream
        print("-" * 40 + "\n" + "".join(vocab[i] for i in ids[0, 1:].tolist()) + "\n" + "-" * 40)
    return result


def main():
    (mcfg, tcfg), given, parser = parse_config(TransformerConfig(), TrainConfig(), description=__doc__.split("\n\n")[0])
    ckpt = None
    if tcfg.resume or tcfg.eval_only:  # the model's shape comes from the checkpoint, the rest from the flags
        ckpt = load_checkpoint(Path(tcfg.out_dir) / ("ckpt.pt" if tcfg.resume else "best.pt"))
        saved = ckpt["model_config"]
        clash = [f"--{k} {given[k]} (checkpoint: {saved[k]})" for k in saved if k in given and given[k] != saved[k]]
        if clash:
            parser.error("the model's shape comes from the checkpoint; remove " + ", ".join(clash))
        mcfg = TransformerConfig(**saved)
    train(mcfg, tcfg, ckpt)


if __name__ == "__main__":
    main()
