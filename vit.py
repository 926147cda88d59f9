"""
A Vision Transformer (Dosovitskiy et al. 2020) that classifies MNIST digits with the very block of
mini_transformer.py, run without the causal mask. Only what is specific to images lives here: patches,
pooling, the classifier head, image batches and accuracy.

    python prepare_mnist.py && python vit.py    # downloads MNIST, then trains for about 5 minutes
    python prepare_mnist.py --source path/to/mnist/   # offline: a folder with the four MNIST files
    python vit.py --predict 8                # 8 test digits as ASCII art with the model's guesses
    python vit.py --resume                   # continue from out/vit/ckpt.pt
    torchrun --standalone --nproc_per_node 2 vit.py
"""

import contextlib
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from mini_transformer import TrainConfig, TransformerBlock, check_block_fields, fit, init_weights, to_device
from plumbing import (autocast, checkpoint_and_config, choose_precision, claim_out_dir, parse_config, print0, run_main,
                      setup_ddp)

MEAN, STD = 0.1307, 0.3081  # of MNIST's training pixels scaled to [0, 1]: inputs get mean 0, std 1


@dataclass
class ViTConfig:
    patch_size: int = 7  # side of a square patch in pixels; must divide 28 (7: 16 patches, 4: 49)
    n_layers: int = 4  # Transformer blocks
    n_heads: int = 4  # attention heads; d_model is split evenly among them
    d_model: int = 128  # width of the residual stream
    d_ff: int = 256  # hidden width of the feed-forward network (2 * d_model: a cheaper step, more epochs)
    dropout: float = 0.0  # dropout probability on attention and residual branches
    bias: bool = False  # biases in Linear and LayerNorm layers
    ffn: str = "relu"  # feed-forward type: relu or swiglu
    attn: str = "sdpa"  # attention path: sdpa or explicit
    patch_embed: str = "conv"  # conv (one strided Conv2d) or linear (explicit reshape into patches, then Linear)
    max_shift: int = 2  # training augmentation: random shifts of up to this many pixels; 0 = none
    label_smoothing: float = 0.0  # training targets give this much probability mass to all 10 classes evenly

    def __post_init__(self):
        check_block_fields(self)
        if self.patch_size < 1 or 28 % self.patch_size:
            raise ValueError(f"patch_size must divide 28, got {self.patch_size}")
        if self.patch_embed not in ("conv", "linear") or not 0 <= self.max_shift < 28 \
                or not 0 <= self.label_smoothing < 1:
            raise ValueError("patch_embed must be conv or linear, max_shift in [0, 28) and label_smoothing in [0, 1)")


# The training settings of the default run (TrainConfig's defaults are the language model's): Muon at half the
# language model's rate, AdamW for the patch embedding, positions, head, gains and biases (EXPERIMENTS.md).
TRAIN_DEFAULTS = TrainConfig(data_dir="data/mnist", out_dir="out/vit", optimizer="muon", muon_lr=0.01, batch_size=128,
                             learning_rate=1e-3, min_lr=1e-5, weight_decay=0.05, beta2=0.99, eval_interval=1000,
                             eval_batches=4, sample_chars=0)


@dataclass
class PredictConfig:
    predict: int = 0  # show this many test digits as ASCII art with best.pt's guesses, then exit

    def __post_init__(self):
        if self.predict < 0:
            raise ValueError(f"predict must be >= 0, got {self.predict}")


# ----------------------------------------------------------------------------------------------------
# The model


class PatchEmbedding(nn.Module):
    """Cut images (B, 1, 28, 28) into N = (28 / p)^2 patches of p x p pixels and project each one to
    d_model: (B, N, d_model). One weight, two paths that compute the same thing (a test checks)."""

    def __init__(self, cfg):
        super().__init__()
        self.p, self.path = cfg.patch_size, cfg.patch_embed
        self.proj = nn.Linear(cfg.patch_size**2, cfg.d_model, bias=cfg.bias)  # one input channel

    def patchify(self, images):
        """(B, C, H, W) -> (B, N, p*p*C): patches in row-major order, pixels (row, col, channel) inside."""
        B, C, H, W = images.shape
        p = self.p
        x = images.view(B, C, H // p, p, W // p, p)  # split rows and columns into (block, offset)
        return x.permute(0, 2, 4, 3, 5, 1).reshape(B, (H // p) * (W // p), p * p * C)

    def forward(self, images):
        if self.path == "linear":
            return self.proj(self.patchify(images))  # (B, N, d_model)
        # The same projection as a convolution whose stride equals its kernel: the Linear weight
        # (d, p*p*C), ordered (row, col, channel), becomes the kernel (d, C, p, p).
        d, C = self.proj.out_features, images.size(1)
        kernel = self.proj.weight.view(d, self.p, self.p, C).permute(0, 3, 1, 2)
        y = F.conv2d(images, kernel, self.proj.bias, stride=self.p)  # (B, d, H/p, W/p)
        return y.flatten(2).transpose(1, 2)  # (B, N, d_model)


class ViT(nn.Module):
    """images (B, 1, 28, 28) -> class logits (B, 10)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        n_patches = (28 // cfg.patch_size) ** 2
        self.patch_emb = PatchEmbedding(cfg)
        self.pos_emb = nn.Parameter(torch.zeros(1, n_patches, cfg.d_model))  # learned, one per patch
        self.drop = nn.Dropout(cfg.dropout)
        # causal=False: every patch attends to every other; an image has no "future".
        self.blocks = nn.ModuleList(TransformerBlock(cfg, causal=False) for _ in range(cfg.n_layers))
        self.ln_final = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.head = nn.Linear(cfg.d_model, 10, bias=True)
        init_weights(self, cfg.n_layers)  # GPT-2 init, as the language model; pos_emb gets std 0.02

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def forward(self, images, targets=None):
        x = self.drop(self.patch_emb(images) + self.pos_emb)  # (B, N, C)
        for block in self.blocks:
            x = block(x)
        # Mean pooling over patches instead of a CLS token: no extra token, every patch gets a direct
        # gradient, and at this scale it trains as well or better (Beyer et al. 2022, "Better plain ViT
        # baselines for ImageNet-1k").
        logits = self.head(self.ln_final(x).mean(dim=1))  # (B, 10)
        smoothing = self.cfg.label_smoothing if self.training else 0.0  # test loss stays the plain one
        loss = None if targets is None else F.cross_entropy(logits, targets, label_smoothing=smoothing)
        return logits, loss


# ----------------------------------------------------------------------------------------------------
# Data


def load_mnist(data_dir, device):
    """{split: (images uint8 (N, 28, 28), labels int64 (N,))} on the device, from prepare_mnist.py's arrays."""
    path = Path(data_dir)
    if not (path / "test_labels.npy").exists():
        sys.exit(f"error: MNIST arrays not found in {path} (run: python prepare_mnist.py --data_dir {data_dir})")
    try:
        arrays = {name: torch.from_numpy(np.load(path / f"{name}.npy", allow_pickle=False)).to(device)
                  for name in ("train_images", "train_labels", "test_images", "test_labels")}
    except (OSError, ValueError) as e:  # a missing or cut-short file
        sys.exit(f"error: the data in {path} is damaged: {str(e).splitlines()[0]} "
                 f"(run: python prepare_mnist.py --data_dir {data_dir})")
    return {s: (arrays[f"{s}_images"], arrays[f"{s}_labels"].long()) for s in ("train", "test")}


def to_input(images):
    """uint8 (B, 28, 28) -> normalised float (B, 1, 28, 28)."""
    return ((images.float() / 255 - MEAN) / STD).unsqueeze(1)


def image_batch(split, batch_size, generator, max_shift=0):
    """batch_size random images (B, 1, 28, 28) and labels (B,), each image shifted by up to max_shift
    pixels in x and y (zeros fill the border): a digit moved a little is still the same digit."""
    images, labels = split
    idx = to_device(torch.randint(len(labels), (batch_size,), generator=generator), labels.device)
    x = images[idx]  # (B, 28, 28)
    if max_shift:
        s = max_shift
        padded = F.pad(x, (s, s, s, s))  # (B, 28 + 2s, 28 + 2s)
        dy, dx = to_device(torch.randint(2 * s + 1, (2, batch_size, 1), generator=generator), x.device)
        rows = (dy + torch.arange(28, device=x.device))[:, :, None]  # (B, 28, 1)
        cols = (dx + torch.arange(28, device=x.device))[:, None, :]  # (B, 1, 28)
        x = padded[torch.arange(batch_size, device=x.device)[:, None, None], rows, cols]
    return to_input(x), labels[idx]


@torch.no_grad()
def evaluate_split(model, split, batch_size=1000, ctx=contextlib.nullcontext()):
    """Loss, accuracy and per-class accuracy on every image of split, in eval mode."""
    was_training = model.training
    model.eval()
    images, labels = split
    total, predictions = 0.0, []
    for i in range(0, len(labels), batch_size):
        with ctx:
            logits, loss = model(to_input(images[i : i + batch_size]), labels[i : i + batch_size])
        total += loss.float() * len(logits)
        predictions.append(logits.argmax(dim=-1))
    model.train(was_training)
    correct = torch.cat(predictions) == labels
    per_class = [correct[labels == c].float().mean().item() for c in range(10)]
    return (total / len(labels)).item(), correct.float().mean().item(), per_class


def ascii_digit(image):
    """A 28 x 28 uint8 image as 14 text lines (two pixel rows per line, darker = denser)."""
    shades = " .:-=+*#%@"
    pairs = image.view(14, 2, 28).float().mean(dim=1)  # (14, 28)
    return ["".join(shades[int(v) * len(shades) // 256] for v in row) for row in pairs]


# ----------------------------------------------------------------------------------------------------


def main():
    launched = time.perf_counter()
    (vcfg, tcfg, pcfg), given, parser = parse_config(ViTConfig(), TRAIN_DEFAULTS, PredictConfig(), description=__doc__)
    tcfg = replace(tcfg, eval_only=tcfg.eval_only or pcfg.predict > 0)  # --predict only reads best.pt
    ckpt = None
    if tcfg.resume or tcfg.eval_only:
        ckpt, vcfg, tcfg = checkpoint_and_config(tcfg, "vit_config", ViTConfig, given, parser)
    with claim_out_dir(tcfg):  # only once the checkpoint is known good: a refused run leaves no trace
        train(vcfg, tcfg, pcfg, ckpt, launched)


def train(vcfg, tcfg, pcfg, ckpt, launched):
    """Train the ViT (or evaluate, or show predictions of, its best.pt), as the flags say."""
    try:
        _, world, device = setup_ddp(tcfg)
        torch.manual_seed(tcfg.seed)
        data = load_mnist(tcfg.data_dir, device)
        model = ViT(vcfg).to(device)
        tokens = tcfg.batch_size * (28 // vcfg.patch_size) ** 2 // world  # per process and step
        precision, why = choose_precision(device, tcfg.precision, vcfg, tokens)
        tcfg, ctx = replace(tcfg, precision=precision), autocast(device, precision)
        if tcfg.eval_only or pcfg.predict:
            model.load_state_dict(ckpt["model"])
        if pcfg.predict:
            images, labels = data["test"]
            picks = torch.randperm(len(labels), generator=torch.Generator().manual_seed(tcfg.seed))[: pcfg.predict]
            with torch.no_grad():
                guesses = model.eval()(to_input(images[picks]))[0].argmax(dim=-1)
            for i, guess, label in zip(picks.tolist(), guesses.tolist(), labels[picks].tolist()):
                print("\n".join(ascii_digit(images[i].cpu())))
                print(f"test image {i}: predicted {guess}, true {label}{'' if guess == label else '  <- wrong'}\n")
            return

        # MNIST has no validation split: the test set plays that role (best.pt), and the accuracy we
        # report is the last step's. The train loss is taken on the same first images every time.
        n_train = min(500 * tcfg.eval_batches, len(data["train"][1]))
        train_subset = (data["train"][0][:n_train], data["train"][1][:n_train])

        def evaluate(m):
            test_loss, test_acc, _ = evaluate_split(m, data["test"], ctx=ctx)
            train_loss = evaluate_split(m, train_subset, ctx=ctx)[0]
            return {"train_loss": train_loss, "val_loss": test_loss, "test_acc": test_acc}

        def next_batch(generator):
            return image_batch(data["train"], tcfg.batch_size, generator, vcfg.max_shift)

        if tcfg.eval_only:
            loss, acc, _ = evaluate_split(model, data["test"], ctx=ctx)
            print0(f"step {ckpt.get('step', '?')} | test loss {loss:.4f} | test accuracy {100 * acc:.2f}% "
                   f"on {len(data['test'][1]):,} images")
            return
        print0(f"{model.num_params():,} parameters | device {device} x {world} | {why} | "
               f"{len(data['train'][1]):,} training images")
        fit(model, tcfg, next_batch, evaluate, {"vit_config": asdict(vcfg)}, ("img", tcfg.batch_size), ckpt, launched)
        _, acc, per_class = evaluate_split(model, data["test"], ctx=ctx)
        print0(f"test accuracy {100 * acc:.2f}% ({round((1 - acc) * 10000)} of 10,000 wrong) | per class: "
               + " ".join(f"{c}:{100 * a:.1f}" for c, a in enumerate(per_class)))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    run_main(main)
