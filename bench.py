"""
Throughput benchmark, read against this machine's own matmul peak measured in the same run.

    python bench.py                              # every section that applies on this machine
    python bench.py --only matmul,train --json bench.json
    python bench.py --gpu_recipe --optimizer adamw  # also the 10.7M-parameter GPU recipe (on CUDA always)

Sections: matmul (dense peak), train (the training loop's train_step), attention (explicit vs SDPA), generate
(plain vs KV cache), vit (vit.py's train_step); each figure the median of --repeats timed runs after warm-up.
"lab" is the default model at the "Build a Transformer from Scratch" course lab's batch 64 and dropout 0.1. The
steps run in the precision choose_precision() picks for it, as the training scripts decide, and are read
against the fastest a @ b in that precision, of three square sizes timed in this run.
"""

import copy
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from mini_transformer import (CausalSelfAttention, MiniTransformer, TrainConfig, TransformerConfig, make_optimizer,
                              train_step)
from plumbing import autocast, choose_precision, get_device, parse_config, run_main, sync
from vit import TRAIN_DEFAULTS, ViT, ViTConfig, image_batch

SECTIONS = ("matmul", "train", "attention", "generate", "vit")


@dataclass
class BenchConfig:
    only: str = ",".join(SECTIONS)  # comma-separated sections to run
    batch_size: int = 64  # sequences per training step
    repeats: int = 10  # timed repeats per figure
    warmup: int = 3  # untimed runs first (more with --compile)
    matmul_size: int = 0  # side of the largest square matmul (also 1/2, 1/4 of it); 0 = 8192 on CUDA, else 2048
    gpu_recipe: bool = False  # also time the GPU Shakespeare recipe (always on CUDA)
    gen_chars: int = 500  # characters generated in the generate section
    device: str = "auto"  # auto (cuda > mps > cpu), cpu, cuda, cuda:1 or mps
    compile: bool = False  # torch.compile the model for the train and vit sections (CUDA only)
    precision: str = "auto"  # as the scripts' --precision: auto (bf16 where measured faster), bf16 or fp32
    optimizer: str = "muon"  # the train and vit sections' optimizer, as the scripts' --optimizer: muon or adamw
    json: str = ""  # also write every figure to this file as a list of records

    def __post_init__(self):
        if not set(self.only.split(",")) <= set(SECTIONS) or self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"sections are among {', '.join(SECTIONS)}, precision auto, bf16 or fp32; "
                             f"got {self.only}, {self.precision}")
        if self.optimizer not in ("adamw", "muon"):
            raise ValueError(f"optimizer must be adamw or muon, got {self.optimizer}")
        if min(self.batch_size, self.repeats, self.gen_chars) < 1 or min(self.warmup, self.matmul_size) < 0:
            raise ValueError("batch_size, repeats and gen_chars must be >= 1, warmup and matmul_size >= 0")
        if self.json and not Path(self.json).resolve().parent.is_dir():  # found out before the run, not after
            raise ValueError(f"the folder of --json {self.json} does not exist")


GPU_RECIPE = TransformerConfig(vocab_size=65, block_size=256, n_layers=6, n_heads=6, d_model=384, d_ff=1536,
                               dropout=0.2)


def train_flops(model, batch_size, seq_len):
    """Model FLOPs of one training step on batch_size sequences of seq_len tokens; backward costs twice the
    forward. Forward, per token: 2 FLOPs (multiply and add) per weight of every Linear layer (q/k/v/out, the
    feed-forward matrices and the V x C head), plus attention's two T x T products per layer, QK^T and att @ V,
    2 * 2 * T * C, in full (a causal kernel may skip the masked half). Embeddings, LayerNorm, softmax and the
    optimizer are left out, as is usual (for the ViT, whose head sees one pooled vector, a slight over-count)."""
    cfg = model.cfg
    linear_weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    per_token = 2 * linear_weights + cfg.n_layers * 2 * 2 * seq_len * cfg.d_model
    return 3 * per_token * batch_size * seq_len


def seconds(fn, device):
    """Wall-clock seconds of one fn(), the device synchronised before and after: GPU work is queued."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def record(name, times, **fields):
    """A figure as a JSON record: the median, min and max of times (seconds) in ms, then fields."""
    ms = [t * 1e3 for t in times]
    return {"name": name, "ms_median": statistics.median(ms), "ms_min": min(ms), "ms_max": max(ms), **fields}


def peak_memory_mb(device):
    """Peak memory in MB since the previous call, whose window it closes, so that each figure has its
    own: CUDA's allocated tensors, or on Linux the process's RSS high-water mark VmHWM (writing 5 to
    /proc/self/clear_refs resets it). {} elsewhere, where a peak could only be the process's so far."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        torch.cuda.reset_peak_memory_stats(device)
        return {"peak_mem_mb": peak}
    try:
        hwm = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM:"))
        Path("/proc/self/clear_refs").write_text("5")
        return {"peak_mem_mb": int(hwm.split()[1]) / 2**10}  # "VmHWM:  742000 kB"
    except (OSError, StopIteration):
        return {}


def bench_matmul(device, cfg, precision):
    """Square a @ b at three sizes, in fp32 and in the steps' precision. Returns the records and the
    steps' peak, (name, matmul, FLOPs): the fastest matmul of their precision, whichever size it is."""
    n = cfg.matmul_size or (8192 if device.type == "cuda" else 2048)
    records, peak, best = [], None, 0.0
    for dtype in dict.fromkeys(("fp32", precision)):
        for size in (n // 4, n // 2, n):
            torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
            a, b = (torch.randn(size, size, device=device, dtype=torch_dtype) for _ in range(2))
            times = [seconds(lambda: a @ b, device) for _ in range(cfg.warmup + 2 + cfg.repeats * 2)][cfg.warmup + 2 :]
            gflops = 2 * size**3 / statistics.median(times) / 1e9
            records.append(record(f"matmul/{dtype}-{size}", times, gflops=gflops, size=size))
            if dtype == precision and gflops > best:
                best, peak = gflops, (records[-1]["name"], lambda a=a, b=b: a @ b, 2 * size**3)
    return records, peak


def bench_step(device, cfg, name, model_cls, model_cfg, tcfg, batch, seq_len, precision, peak):
    """ms per train_step(), the training loop's step, of model_cls(model_cfg) on batch (x, y) with the optimizer
    tcfg names: targets per second (tokens or images), FLOPs, own peak memory and fraction of peak = (name,
    matmul, FLOPs). Each step is followed by one peak matmul, and the fraction is the median over these pairs: a
    drift of a shared machine's speed hits both alike. With Muon, the same step with AdamW alone follows each pair,
    and muon_extra_ms is the median difference. precision: (bf16 or fp32, a note), from choose_precision()."""
    peak_memory_mb(device)  # opens this step's window
    torch.manual_seed(0)
    precision, note = precision
    tcfg, ctx = replace(tcfg, precision=precision), autocast(device, precision)
    model = model_cls(model_cfg).to(device)
    compiled, runs, steps = cfg.compile and device.type == "cuda", [(model, tcfg)], []
    if tcfg.optimizer == "muon":  # the same step with AdamW for every parameter, on a copy of the model
        runs.append((copy.deepcopy(model), replace(tcfg, optimizer="adamw")))
    for m, c in runs:
        fwd, optimizers = torch.compile(m) if compiled else m, make_optimizer(m, c)
        steps.append(lambda fwd=fwd, optimizers=optimizers: train_step(fwd, optimizers, batch, ctx=ctx, grad_clip=1.0))
    timed = [[seconds(steps[0], device), seconds(peak[1], device), *(seconds(s, device) for s in steps[1:])]
             for _ in range(cfg.warmup + 5 * compiled + cfg.repeats)][-cfg.repeats :]
    step, flops = statistics.median(t[0] for t in timed), train_flops(model, len(batch[1]), seq_len)
    extra = {"muon_extra_ms": statistics.median(1e3 * (t[0] - t[2]) for t in timed)} if len(steps) > 1 else {}
    unit = "tokens" if batch[1].dim() == 2 else "images"  # targets (B, T) or (B,)
    frac = statistics.median(flops / t / (peak[2] / m) for t, m, *_ in timed)
    return record(name, [t[0] for t in timed], **{f"{unit}_per_s": batch[1].numel() / step}, flops_per_step=flops,
                  gflops=flops / step / 1e9, frac_peak=frac, peak=peak[0], **peak_memory_mb(device), **extra,
                  optimizer=tcfg.optimizer, precision=precision, precision_note=note, config=asdict(model_cfg))


def bench_attention(device, cfg, mcfg, precision):
    """The attention layer alone, forward + backward, explicit path vs SDPA at the same shapes, both
    without dropout and, on the CPU, in fp32: there attention with dropout or under bf16 autocast is
    always computed by hand (see CausalSelfAttention.forward), and both figures would time that."""
    records = []
    for path in ("explicit", "sdpa"):
        torch.manual_seed(0)
        layer = CausalSelfAttention(replace(mcfg, attn=path, dropout=0.0)).to(device)
        x = torch.randn(cfg.batch_size, mcfg.block_size, mcfg.d_model, device=device, requires_grad=True)
        with autocast(device, precision if device.type != "cpu" else "fp32"):
            times = [seconds(lambda: layer(x).sum().backward(), device) for _ in range(cfg.warmup + cfg.repeats)]
        times = times[cfg.warmup :]
        records.append(record(f"attention/{path}", times, tokens_per_s=x[..., 0].numel() / statistics.median(times)))
    records[1]["speedup_vs_explicit"] = records[0]["ms_median"] / records[1]["ms_median"]
    return records


def bench_generate(device, cfg, mcfg):
    """Characters per second for gen_chars new characters from a one-character prompt, plain vs KV
    cache, with the train section's model shape. The two alternate, so a drift in the machine's speed
    hits both, and the speedup is the median of the per-pair ratios (the first pair warms up)."""
    torch.manual_seed(0)
    model = MiniTransformer(replace(mcfg, dropout=0.0)).to(device)
    prompt = torch.zeros(1, 1, dtype=torch.long, device=device)

    def gen(kv_cache):  # the same characters on both paths
        model.generate(prompt, cfg.gen_chars, kv_cache=kv_cache, generator=torch.Generator(device).manual_seed(0))
    pairs = [(seconds(lambda: gen(False), device), seconds(lambda: gen(True), device))
             for _ in range(1 + max(1, cfg.repeats // 2))][1:]
    records = [record(f"generate/{path}", times, chars_per_s=cfg.gen_chars / statistics.median(times))
               for path, times in zip(("plain", "kv_cache"), zip(*pairs))]
    records[1]["speedup_vs_plain"] = statistics.median(plain / cached for plain, cached in pairs)
    return records


SHOWN = {"tokens_per_s": "{:.1f}k tok/s", "images_per_s": "{:.0f} images/s", "chars_per_s": "{:.0f} chars/s",
         "gflops": "{:.1f} GFLOP/s", "frac_peak": "{:.2f} of {peak}", "peak_mem_mb": "peak mem {:.0f} MB",
         "muon_extra_ms": "Muon {:+.1f} ms vs AdamW", "speedup_vs_explicit": "{:.2f}x",
         "speedup_vs_plain": "{:.2f}x"}  # a record's fields as printed, in this order


def main():
    lab = TransformerConfig(vocab_size=65, dropout=0.1)  # the course lab's model: the default shape, dropout 0.1
    (cfg, mcfg), _, parser = parse_config(BenchConfig(), lab, description=__doc__)
    if not mcfg.vocab_size:  # the training scripts take 0 from their data; bench.py has none
        parser.error("--vocab_size must be above 0 here")
    device, sections = get_device(cfg.device), set(cfg.only.split(","))
    precision = choose_precision(device, cfg.precision, mcfg, cfg.batch_size * mcfg.block_size)  # (bf16 or fp32, why)
    print(f"device {device} | torch {torch.__version__} | {torch.get_num_threads()} CPU threads | "
          f"training steps in {precision[1]}")
    records = []

    def add(new):  # the file is rewritten before the figures are shown: a Ctrl-C after a figure is out keeps it
        records.extend({**r, "device": str(device)} for r in new)
        try:
            if cfg.json:
                Path(cfg.json).write_text(json.dumps(records, indent=1), encoding="utf-8")
        except OSError as e:
            sys.exit(f"error: cannot write {cfg.json}: {e.strerror}")
        for r in new:
            extra = [fmt.format(r[k] / (1e3 if k == "tokens_per_s" else 1), peak=r.get("peak"))
                     for k, fmt in SHOWN.items() if k in r]
            print(f"{r['name']:<20} {r['ms_median']:9.2f} ms (min {r['ms_min']:.2f}, max {r['ms_max']:.2f})", *extra,
                  sep=" | ", flush=True)

    if sections & {"matmul", "train", "vit"}:
        matmul_records, peak = bench_matmul(device, cfg, precision[0])
        add(matmul_records)
    runs = [("lab", mcfg), ("lab-no-dropout", replace(mcfg, dropout=0.0))]
    runs += [("gpu-recipe", GPU_RECIPE)] if cfg.gpu_recipe or device.type == "cuda" else []
    for name, run_cfg in runs if "train" in sections else []:
        x = torch.randint(run_cfg.vocab_size, (cfg.batch_size, run_cfg.block_size), device=device)  # random tokens
        batch, tcfg = (x, x.roll(-1, 1)), TrainConfig(optimizer=cfg.optimizer)  # targets: the next token (wrapping)
        add([bench_step(device, cfg, f"train/{name}", MiniTransformer, run_cfg, tcfg, batch, x.shape[1], precision,
                        peak)])
    if "attention" in sections:
        add(bench_attention(device, cfg, mcfg, precision[0]))
    if "generate" in sections:
        add(bench_generate(device, cfg, mcfg))
    if "vit" in sections:  # vit.py's defaults on random images, one batch with its random shifts, made untimed
        vcfg, n = ViTConfig(), 1000
        split = (torch.randint(256, (n, 28, 28), dtype=torch.uint8, device=device), torch.randint(10, (n,)).to(device))
        batch = image_batch(split, TRAIN_DEFAULTS.batch_size, torch.Generator().manual_seed(0), vcfg.max_shift)
        tcfg, n_patches = replace(TRAIN_DEFAULTS, optimizer=cfg.optimizer), (28 // vcfg.patch_size) ** 2
        add([bench_step(device, cfg, "vit/train", ViT, vcfg, tcfg, batch, n_patches, precision, peak)])


if __name__ == "__main__":
    run_main(main)
