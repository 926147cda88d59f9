"""
Pictures of a run, each written as a PNG into the run's folder: loss curves from log.jsonl, and from
best.pt the attention of every head, the similarity of the character embeddings, what a ViT looks at.

    python plot.py                                  # out/loss.png: train and val loss, the lr schedule
    python plot.py --x flops                        # against training FLOPs (also: tokens, time)
    python plot.py out out_swiglu                   # runs overlaid, labelled by how their configs differ
    python plot.py --attention "ROMEO: But, soft!"  # out/attention.png: one panel per layer and head
    python plot.py --embeddings                     # out/embeddings.png: cosine similarity of characters
    python plot.py --vit 8                          # out/vit/vit_rollout.png and out/vit/vit_pos_emb.png

Run folders come first, flags after them. Needs matplotlib (pip install matplotlib); no other script does.
"""

import json
import math
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from mini_transformer import MiniTransformer, TransformerConfig
from plumbing import load_checkpoint, parse_config, run_main
from vit import ViT, ViTConfig, load_mnist, to_input


@dataclass
class PlotConfig:
    x: str = "steps"  # horizontal axis of the loss plot: steps, tokens (images for a ViT), time (s) or flops
    attention: str = ""  # a prompt: draw the attention of every layer and head on it; "" = off
    embeddings: bool = False  # draw the cosine similarity of the character embeddings
    vit: int = 0  # draw this many test digits with where a ViT looks, and its position embeddings; 0 = off
    ckpt: str = "best.pt"  # the checkpoint in the run folder that --attention, --embeddings and --vit read
    seed: int = 1337  # picks the --vit digits (1337: the same ones as vit.py --predict)

    def __post_init__(self):
        if self.x not in ("steps", "tokens", "time", "flops"):
            raise ValueError(f"x must be steps, tokens, time or flops, got {self.x}")
        if self.vit < 0:
            raise ValueError(f"vit must be >= 0, got {self.vit}")
        if bool(self.attention) + self.embeddings + (self.vit > 0) > 1:
            raise ValueError("give one of --attention, --embeddings and --vit at a time")


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no window). Imported when a picture is drawn,
    so that nothing else in the project needs matplotlib."""
    try:
        import matplotlib
    except ImportError:
        sys.exit("plot.py needs matplotlib: pip install matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save(fig, path):
    """Write fig as a PNG at 100 dpi (legible in a README at its own size) and say where."""
    fig.savefig(path, dpi=100)
    pyplot().close(fig)
    print(f"wrote {path}")


def glyph(c):
    """A character as it can be seen on an axis or in a printed list."""
    return {" ": "\u2423", "\n": "\u21b5", "\t": "\u21e5"}.get(c, c)


# ----------------------------------------------------------------------------------------------------
# Loss curves

# Fields that do not change what is trained, left out when runs are compared.
BOOKKEEPING = {"out_dir", "resume", "overwrite", "eval_only", "log_interval", "eval_interval", "eval_batches",
               "sample_chars"}


def read_run(run):
    """A run folder's config.json and its log.jsonl as (progress records, evaluation records), each in
    step order. A resumed run logs again the steps after its last checkpoint: the last record of a step
    wins, the one the run went on from. Its clock (elapsed_s) restarts at its launch: its times are
    counted on from the last time logged before."""
    for name in ("config.json", "log.jsonl"):
        if not (run / name).exists():
            sys.exit(f"error: {run / name} not found (is {run} the out_dir of a training run?)")
    config = json.loads((run / "config.json").read_text(encoding="utf-8"))
    logs, offset, last = {"train": {}, "eval": {}}, 0.0, 0.0
    for n, line in enumerate((run / "log.jsonl").read_text(encoding="utf-8").splitlines(), 1):
        try:
            record = json.loads(line) if line.strip() else {}
        except json.JSONDecodeError:
            sys.exit(f"error: {run / 'log.jsonl'} line {n} is not JSON")
        if "elapsed_s" in record:
            offset, last = offset + (last if record["elapsed_s"] < last else 0), record["elapsed_s"]
            record["elapsed_s"] += offset
        logs.get(record.get("kind"), {})[record.get("step")] = record
    return config, *(sorted(logs[kind].values(), key=lambda r: r["step"]) for kind in ("train", "eval"))


def per_step(config, x):
    """Steps, tokens (a ViT: images) or model FLOPs of one optimizer step of the run."""
    batch = config["train_config"]["batch_size"]
    if x == "steps":
        return 1
    if x == "tokens":
        return batch if "vit_config" in config else batch * config["model_config"]["block_size"]
    from bench import train_flops  # bench.py's analytic count, so both report the same FLOPs
    if "vit_config" in config:
        cfg = ViTConfig(**config["vit_config"])
        return train_flops(ViT(cfg), batch, (28 // cfg.patch_size) ** 2)  # the sequence is the patches
    cfg = TransformerConfig(**config["model_config"])
    return train_flops(MiniTransformer(cfg), batch, cfg.block_size)


def along(records, x, scale):
    """Each record's place on the horizontal axis: seconds since the start, or its step x scale."""
    return [r["elapsed_s"] if x == "time" else r["step"] * scale for r in records]


def run_labels(runs, configs):
    """Each run's folder, followed by the config fields in which the runs differ: "out_swiglu: ffn=swiglu"."""
    flat = [{k: v for part in ("model_config", "vit_config", "train_config") for k, v in c.get(part, {}).items()
             if k not in BOOKKEEPING} for c in configs]
    differ = [k for k in dict.fromkeys(k for f in flat for k in f) if len({f.get(k) for f in flat}) > 1]
    return [f"{run}: " + ", ".join(f"{k}={f.get(k)}" for k in differ) if differ else str(run)
            for run, f in zip(runs, flat)]


def loss_range(curves):
    """(bottom, top) of the loss axis for curves [(xs, losses)]: from just below the lowest loss to the
    highest once each run is a tenth of the way through. The end, where runs differ by hundredths, then
    fills the picture, and the first fall from ln(vocab_size) runs off the top."""
    low = min(v for _, vs in curves for v in vs)
    high = max(v for xs, vs in curves for x, v in zip(xs, vs) if x >= 0.1 * xs[-1])
    pad = 0.05 * max(high - low, 1e-3)
    return low - pad, high + pad


def plot_loss(runs, x):
    """Train loss (progress lines, thin) and val loss (evaluations, dots) of each run against x; dotted, on a
    second axis, the learning-rate schedule as a fraction of the peak, which every optimizer of the run follows
    (Muon's peak differs from AdamW's). The legend below gives each run's colour. Written into the first run's
    folder."""
    plt = pyplot()
    logs = [read_run(run) for run in runs]
    labels = [textwrap.fill(label, 110) for label in run_labels(runs, [c for c, _, _ in logs])]  # may be long
    height = 4.8 + 0.16 * sum(label.count("\n") + 1 for label in labels)  # room for the legend below
    fig, ax = plt.subplots(figsize=(8, height), layout="constrained")
    lr_ax, handles, curves = ax.twinx(), [], []
    styles = {"train loss": {"lw": 1, "alpha": 0.5}, "val loss": {"lw": 2, "marker": "o", "ms": 4},
              "lr / peak lr (right)": {"lw": 1, "ls": ":"}}
    for i, ((config, train, evals), label) in enumerate(zip(logs, labels)):
        scale = 0 if x == "time" else per_step(config, x)
        curves += [(along(train, x, scale), [r["loss"] for r in train]),
                   (along(evals, x, scale), [r["val_loss"] for r in evals])]
        ax.plot(*curves[-2], color=f"C{i}", label=f"{label}: train", **styles["train loss"])
        handles += ax.plot(*curves[-1], color=f"C{i}", label=f"{label}: val", **styles["val loss"])
        peak = config["train_config"]["learning_rate"]
        lr_ax.plot(curves[-2][0], [r["lr"] / peak for r in train], color=f"C{i}", **styles["lr / peak lr (right)"])
    keys = [ax.plot([], [], color="0.4", **style)[0] for style in styles.values()]  # empty lines: a key to the styles
    unit = "images" if "vit_config" in logs[0][0] else "tokens"
    ax.set_xlabel({"steps": "step", "tokens": f"{unit} seen", "time": "seconds since the start",
                   "flops": "training FLOPs (bench.py's analytic count)"}[x])
    ax.set_ylabel("loss (nats per token)" if unit == "tokens" else "loss (nats per image)")
    ax.set_ylim(*loss_range([c for c in curves if c[0]]))
    lr_ax.set_ylabel("learning rate / peak")
    lr_ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(keys, list(styles), loc="upper right", fontsize=8)
    fig.legend(handles, labels, loc="outside lower center", fontsize=8)
    stem = "loss" + ("_compare" if len(runs) > 1 else "") + ("" if x == "steps" else f"_{x}")
    save(fig, runs[0] / f"{stem}.png")


# ----------------------------------------------------------------------------------------------------
# Inside the model


def load_model(run, name, key):
    """The model in run/name, in eval mode (no dropout), and its checkpoint. key is the config the
    checkpoint must hold: model_config (mini_transformer.py) or vit_config (vit.py)."""
    path, trainer = run / name, "vit.py" if key == "vit_config" else "mini_transformer.py"
    ckpt = load_checkpoint(path, trainer=trainer)  # one line if missing or broken
    if not isinstance(ckpt, dict) or key not in ckpt:
        hint = ("--vit is for a vit.py run, such as out/vit" if key == "vit_config"
                else "--attention and --embeddings are for a language model; for a ViT: --vit 8")
        sys.exit(f"error: {path} is not a {trainer} checkpoint ({hint})")
    config_cls, model_cls = (ViTConfig, ViT) if key == "vit_config" else (TransformerConfig, MiniTransformer)
    try:
        model = model_cls(config_cls(**ckpt[key]))
        model.load_state_dict(ckpt["model"])
    except (TypeError, ValueError, KeyError, RuntimeError) as e:  # an unknown config field, no weights, other shapes
        reason = f"{type(e).__name__}: {str(e).splitlines()[0]}"
        sys.exit(f"error: {path} is not a {trainer} checkpoint of this version ({reason})")
    return model.eval(), ckpt


def blocks_with_weights(blocks, x):
    """TransformerBlock.forward through every block, keeping each layer's attention weights, which
    CausalSelfAttention returns from its explicit path: x (B, T, C) -> (x, [att (B, H, T, T) per layer])."""
    maps = []
    for block in blocks:
        y, att = block.attn(block.ln1(x), return_weights=True)
        x = x + y
        x = x + block.ffn(block.ln2(x))
        maps.append(att)
    return x, maps


def lm_attention(model, idx):
    """MiniTransformer.forward in eval mode with the weights kept: idx (B, T) -> (logits (B, T, V), maps)."""
    x = model.token_emb(idx) + model.pos_emb.weight[: idx.size(1)]  # (B, T, C)
    x, maps = blocks_with_weights(model.blocks, x)
    return model.lm_head(model.ln_final(x)), maps


def vit_attention(model, images):
    """ViT.forward in eval mode with the weights kept: images (B, 1, 28, 28) -> (logits (B, 10), maps)."""
    x, maps = blocks_with_weights(model.blocks, model.patch_emb(images) + model.pos_emb)  # (B, N, C)
    return model.head(model.ln_final(x).mean(dim=1)), maps  # mean pooling over the patches, as ViT.forward


@torch.no_grad()
def plot_attention(run, name, prompt):
    """One panel per layer (rows) and head (columns): query characters down, key characters across."""
    plt = pyplot()
    model, ckpt = load_model(run, name, "model_config")
    vocab = ckpt["vocab"]
    unknown = "".join(sorted(set(prompt) - set(vocab)))
    if unknown:
        sys.exit(f"error: the prompt has characters outside the vocabulary: {unknown!r}")
    if len(prompt) > model.cfg.block_size:
        sys.exit(f"error: the prompt has {len(prompt)} characters, more than block_size {model.cfg.block_size}")
    att = torch.cat(lm_attention(model, torch.tensor([[vocab.index(c) for c in prompt]]))[1])  # (L, H, T, T)
    L, H, T, _ = att.shape
    # Entropy of each query's weights, averaged over the queries: 0 when every query looks at one key;
    # query i spreading evenly over the i + 1 keys it may see has ln(i + 1).
    entropy = torch.special.entr(att).sum(-1).mean(-1)  # (L, H), in nats
    even = torch.arange(1, T + 1).float().log().mean()
    print(f"mean attention entropy per head, in nats (spread evenly over the visible keys: {even:.2f})")
    for layer, row in enumerate(entropy):
        print(f"layer {layer}: " + "  ".join(f"head {h} {e:.2f}" for h, e in enumerate(row.tolist())))
    side = max(2.2, 0.15 * T)  # inches per panel: room for T characters at 7 points
    fig, axes = plt.subplots(L, H, figsize=(side * H + 0.9, (side + 0.3) * L + 0.6), sharex=True, sharey=True,
                             squeeze=False, layout="constrained")
    ticks = [glyph(c) for c in prompt]
    for (layer, h), ax in zip([(a, b) for a in range(L) for b in range(H)], axes.flat):
        image = ax.imshow(att[layer, h].numpy(), cmap="Blues", vmin=0, vmax=1)
        ax.set_title(f"layer {layer} head {h}: {entropy[layer, h]:.2f} nats", fontsize=8)
        ax.set_xticks(range(T), ticks, fontsize=7)  # shared axes: only the outer panels show them
        ax.set_yticks(range(T), ticks, fontsize=7)
    fig.supxlabel("key (attended to)")
    fig.supylabel("query")
    fig.suptitle(f"Row i: where character i looks. The number: the mean entropy of a row's weights in nats "
                 f"(natural-log units), 0 for one key, {even:.2f} for weights spread evenly", fontsize=9)
    fig.colorbar(image, ax=axes, shrink=0.5, label="attention weight")
    save(fig, run / "attention.png")


GROUPS = ("letters", "digits", "punctuation", "whitespace")


def group(c):
    """The index of c's group in GROUPS."""
    return 0 if c.isalpha() else 1 if c.isdigit() else 3 if c.isspace() else 2


@torch.no_grad()
def plot_embeddings(run, name):
    """Cosine similarity of the character embeddings, grouped; prints each character's 3 nearest. The
    matrix is tied to the head (Press & Wolf), so it holds what a character predicts as well as reads."""
    plt = pyplot()
    model, ckpt = load_model(run, name, "model_config")
    vocab = ckpt["vocab"]
    order = sorted(range(len(vocab)), key=lambda i: (group(vocab[i]), vocab[i]))  # rows past len(vocab) pad the table
    chars = [vocab[i] for i in order]
    emb = F.normalize(model.token_emb.weight[order], dim=-1)  # (V, C), unit rows
    sim = emb @ emb.T  # (V, V) cosine similarity
    top = (sim - 3 * torch.eye(len(chars))).topk(min(3, len(chars) - 1), dim=-1)  # a character is not its own neighbour
    print("nearest neighbours by cosine similarity of the embeddings:")
    for c, values, ids in zip(chars, top.values.tolist(), top.indices.tolist()):
        print(f"{glyph(c)}  " + "  ".join(f"{glyph(chars[j])} {v:+.2f}" for v, j in zip(values, ids)))
    V = len(chars)
    fig, ax = plt.subplots(figsize=(max(5, 0.11 * V + 1.5), max(4.5, 0.11 * V + 1)), layout="constrained")
    scale = sim.masked_fill(torch.eye(V, dtype=torch.bool), 0).abs().max().item()  # off the diagonal, which is 1
    image = ax.imshow(sim.numpy(), cmap="RdBu_r", vmin=-scale, vmax=scale)
    ax.set_xticks(range(V), [glyph(c) for c in chars], fontsize=6)
    ax.set_yticks(range(V), [glyph(c) for c in chars], fontsize=6)
    counts = [sum(group(c) == g for c in chars) for g in range(len(GROUPS))]
    edges = [sum(counts[:g]) for g in range(len(GROUPS) + 1)]
    for e in edges[1:-1]:
        ax.axhline(e - 0.5, color="k", lw=0.5)
        ax.axvline(e - 0.5, color="k", lw=0.5)
    top_axis = ax.secondary_xaxis("top")
    named = [g for g in range(len(GROUPS)) if counts[g]]
    middles = [(edges[g] + edges[g + 1] - 1) / 2 for g in named]
    top_axis.set_xticks(middles, [GROUPS[g] for g in named], fontsize=8, rotation=90)
    fig.colorbar(image, ax=ax, shrink=0.6, label="cosine similarity")
    save(fig, run / "embeddings.png")


def rollout(maps):
    """Attention rollout (Abnar & Zuidema 2020): how much each output token draws on each input patch
    through all the layers. Heads are averaged and the residual stream counts as half of each layer
    (0.5 A + 0.5 I); the product of these row-stochastic matrices is row-stochastic too.
    maps: [att (B, H, N, N) per layer] -> (B, N, N)."""
    eye = torch.eye(maps[0].size(-1))
    r = eye
    for att in maps:  # first layer first
        r = (0.5 * att.mean(dim=1) + 0.5 * eye) @ r
    return r


@torch.no_grad()
def plot_vit(run, name, n, seed):
    """n test digits, each with where the ViT looks over its patches and its guess, and then
    plot_pos_emb()."""
    plt = pyplot()
    model, ckpt = load_model(run, name, "vit_config")
    images, labels = load_mnist(ckpt["train_config"]["data_dir"], "cpu")["test"]
    picks = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))[:n]  # as vit.py --predict
    logits, maps = vit_attention(model, to_input(images[picks]))
    guesses = logits.argmax(dim=-1).tolist()
    g = 28 // model.cfg.patch_size  # patches per side
    # Rollout rather than the last layer's attention: by the last layer every token is already a mix of
    # patches, so its weights say which mixes it reads, not which pixels. Mean pooling has no CLS row to
    # read: the classifier sees the average of all tokens, so its share of each patch is the average row.
    looks = rollout(maps).mean(dim=1).view(-1, g, g)  # (n, g, g)
    print("where the model looks: attention rollout (Abnar & Zuidema 2020), heads averaged, rows averaged "
          "over the patches as the mean pooling does")
    cols = min(n, 8)
    fig, axes = plt.subplots(math.ceil(n / cols), cols, figsize=(1.6 * cols, 1.8 * math.ceil(n / cols)), squeeze=False,
                             layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    for ax, i, look, guess in zip(axes.flat, picks.tolist(), looks, guesses):
        label = labels[i].item()
        ax.imshow(look.numpy(), cmap="inferno", extent=(-0.5, 27.5, 27.5, -0.5))  # a square per patch, own scale
        ax.contour(images[i].numpy(), levels=[128], colors="white", linewidths=0.8)  # the digit's outline
        ax.set_title(f"pred {guess} / true {label}", fontsize=9, color="black" if guess == label else "red")
        print(f"test image {i}: predicted {guess}, true {label}{'' if guess == label else '  <- wrong'}")
    save(fig, run / "vit_rollout.png")
    plot_pos_emb(run, model)


@torch.no_grad()
def plot_pos_emb(run, model):
    """The cosine similarity of a ViT's learned position embeddings, one small grid per patch, as in
    Dosovitskiy et al. 2020 (figure 7); trained, nearby patches and those of one row or column come out alike."""
    plt = pyplot()
    g = 28 // model.cfg.patch_size  # patches per side
    pos = F.normalize(model.pos_emb[0], dim=-1)  # (N, C), unit rows
    sim = (pos @ pos.T).view(g, g, g, g)  # [row, col of a patch, row, col of another]
    # One mosaic: panel (r, c) holds patch (r, c)'s similarity to every patch, a blank line between panels.
    mosaic = F.pad(sim, (0, 1, 0, 1), value=float("nan")).permute(0, 2, 1, 3).reshape(g * (g + 1), g * (g + 1))
    fig, ax = plt.subplots(figsize=(5.5, 4.8), layout="constrained")
    image = ax.imshow(mosaic[:-1, :-1].numpy(), cmap="viridis", vmin=-1, vmax=1)
    ax.axis("off")
    ax.set_title("position embeddings: panel (r, c) is patch (r, c)'s\ncosine similarity to every patch", fontsize=10)
    fig.colorbar(image, ax=ax, shrink=0.8)
    save(fig, run / "vit_pos_emb.png")


# ----------------------------------------------------------------------------------------------------


def main():
    # The run folders come before the first flag; parse_config reads flags only.
    n = next((i for i, a in enumerate(sys.argv[1:]) if a.startswith("-")), len(sys.argv) - 1)
    (cfg,), _, _ = parse_config(PlotConfig(), argv=sys.argv[n + 1 :], description=__doc__)
    runs = [Path(r) for r in sys.argv[1 : n + 1] or ["out/vit" if cfg.vit else "out"]]
    if not (cfg.attention or cfg.embeddings or cfg.vit):
        return plot_loss(runs, cfg.x)
    for run in runs:  # one picture per run
        if cfg.attention:
            plot_attention(run, cfg.ckpt, cfg.attention)
        elif cfg.embeddings:
            plot_embeddings(run, cfg.ckpt)
        else:
            plot_vit(run, cfg.ckpt, cfg.vit, cfg.seed)


if __name__ == "__main__":
    run_main(main)
