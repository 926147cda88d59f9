"""
Throughput benchmark, read against this machine's own matmul peak measured in the same run.

    python bench.py                              # everything that applies here, about a minute on 2 CPU cores
    python bench.py --only matmul,train --json bench.json
    python bench.py --gpu_recipe                 # also the 10.7M-parameter GPU recipe (default on CUDA)
    python bench.py --device cuda --compile

Sections: matmul (dense peak), train (the training loop's train_step), attention (explicit vs SDPA),
generate (plain vs KV cache), vit (vit.py's train_step). Each figure is the median of --repeats timed runs after warm-up, with min
and max; the device is synchronised before every clock read. A fraction of the peak is the median over
pairs of one timed step and one timed peak matmul, so that a drift in the machine's speed cancels.
The peak is the fastest dense matmul in the step's precision: on the CPU, fp32 steps are read against
the faster of PyTorch's a @ b and oneDNN's fp32 matmul (see onednn_fp32_matmul()), and against the
other one too, so both readings come from the same run.
"""

import contextlib
import ctypes
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

try:
    import resource  # the process's peak RSS; Unix only
except ImportError:  # Windows: the CPU peak memory is left out
    resource = None

from mini_transformer import (CausalSelfAttention, MiniTransformer, TrainConfig, TransformerConfig, autocast, check_precision,
                              get_device, has_fast_bf16, keep_freed_memory, make_optimizer, parse_config, precision_name,
                              run_main, sync, train_step)
from vit import TRAIN_DEFAULTS, ViT, ViTConfig, image_batch

SECTIONS = ("matmul", "train", "attention", "generate", "vit")


@dataclass
class BenchConfig:
    only: str = ",".join(SECTIONS)  # comma-separated sections to run
    batch_size: int = 64  # sequences per training step (the lab's)
    repeats: int = 10  # timed repeats per figure
    warmup: int = 3  # untimed runs first (more with --compile)
    gpu_recipe: bool = False  # also time the GPU Shakespeare recipe (always on CUDA)
    gen_chars: int = 500  # characters generated in the generate section
    device: str = "auto"  # auto (cuda > mps > cpu), cpu, cuda, cuda:1 or mps
    compile: bool = False  # torch.compile the model for the train section (CUDA only)
    precision: str = "auto"  # as the scripts' --precision: auto (bf16 where the hardware has it), bf16 or fp32
    json: str = ""  # also write every figure to this file as a list of records

    def __post_init__(self):
        unknown = set(self.only.split(",")) - set(SECTIONS)
        if unknown:
            raise ValueError(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
        check_precision(self.precision)
        if min(self.batch_size, self.repeats, self.gen_chars) < 1 or self.warmup < 0:
            raise ValueError("batch_size, repeats and gen_chars must be >= 1, warmup >= 0")
        if self.json and not Path(self.json).resolve().parent.is_dir():  # found out before the run, not after
            raise ValueError(f"the folder of --json {self.json} does not exist")


GPU_RECIPE = TransformerConfig(vocab_size=65, block_size=256, n_layers=6, n_heads=6, d_model=384, d_ff=1536, dropout=0.2)


def train_flops(model, batch_size, seq_len):
    """Model FLOPs of one training step on batch_size sequences of seq_len tokens, counted
    analytically: backward costs twice the forward.

    Forward, per token: 2 FLOPs (multiply and add) per weight of every Linear layer (q/k/v/out, the
    feed-forward matrices and the V x C head), plus attention's two T x T products per layer, QK^T and
    att @ V, 2 * 2 * T * C, counted in full (a causal kernel may skip the masked half). Embedding
    lookups, LayerNorm, softmax and the optimizer are left out, as is usual. For the ViT, whose head
    sees one pooled vector per image and whose patch projection needs no input gradient, this
    over-counts by under 1%.
    """
    cfg = model.cfg
    linear_weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    per_token = 2 * linear_weights + cfg.n_layers * 2 * 2 * seq_len * cfg.d_model
    return 3 * per_token * batch_size * seq_len


def timed(fn, device, repeats, warmup):
    """Median, min and max seconds of fn() over repeats, after warmup untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times), max(times)


def timed_against_peak(fn, flops, peaks, device, repeats, warmup):
    """timed(fn) plus the record fields of fn's fraction of each peak. peaks: (name, matmul, its FLOPs),
    fastest first. After every timed fn() each peak matmul is timed too, and a fraction is the median
    over these pairs. A shared machine's speed drifts (15-30% on our VM, within a run), and a drift
    then hits both sides of a ratio alike. frac_peak is the fraction of the fastest; frac_by_peak
    lists them all (on the CPU in fp32 also the fraction of PyTorch's own a @ b, see bench_matmul())."""
    fractions = {name: [] for name, _, _ in peaks}

    def pair():
        t = timed(fn, device, 1, 0)[0]
        for name, matmul, matmul_flops in peaks:
            fractions[name].append((flops / t) / (matmul_flops / timed(matmul, device, 1, 0)[0]))
        return t

    times = [pair() for _ in range(warmup + repeats)][warmup:]
    by_peak = {name: statistics.median(f[warmup:]) for name, f in fractions.items()}
    fields = {"frac_peak": by_peak[peaks[0][0]], "peak": peaks[0][0], "frac_by_peak": by_peak}
    return statistics.median(times), min(times), max(times), fields


def reset_peak_memory(device):
    """Start a new peak-memory window, so that each figure reports its own peak, not the run's so far.
    CUDA: the allocator's counter. Linux: hand freed heap memory back to the OS (keep_freed_memory()
    makes glibc hold on to it) and reset the process's RSS high-water mark, VmHWM (writing 5 to
    /proc/self/clear_refs). Elsewhere nothing can be reset, and the peak is the process's so far."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
    except (OSError, AttributeError):
        pass


def peak_memory_mb(device):
    """Peak memory since reset_peak_memory(): max allocated tensors on CUDA, else the process's peak
    RSS (VmHWM on Linux, max RSS elsewhere); {} on Windows."""
    if device.type == "cuda":
        return {"peak_mem_mb": torch.cuda.max_memory_allocated(device) / 2**20}
    try:
        hwm = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM:"))
        return {"peak_mem_mb": int(hwm.split()[1]) / 2**10}  # in kB
    except (OSError, StopIteration):
        pass
    if resource is None:
        return {}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return {"peak_mem_mb": rss / 2**20 if sys.platform == "darwin" else rss / 2**10}


def onednn_fp32_matmul(a, b):
    """a @ b.T in fp32 through oneDNN, the library PyTorch's bf16 CPU matmuls already use, or None
    where this PyTorch has no oneDNN. PyTorch's own fp32 a @ b calls MKL, which on AMD CPUs runs its
    AVX2 code: on our Zen 5 VM it reached about 200 GFLOP/s where oneDNN's AVX-512 code, still strict
    fp32, reached about 450. A peak read from MKL alone would flatter every fp32 fraction 2x there.
    torch.ops.mkldnn._linear_pointwise is the private op torch.compile's CPU backend emits."""
    try:
        op = torch.ops.mkldnn._linear_pointwise
        op(a[:8, :8], b[:8, :8], None, "none", [], "")
    except (AttributeError, RuntimeError, TypeError, NotImplementedError):  # no oneDNN, or the op changed
        return None
    return lambda: op(a, b, None, "none", [], "")


def bench_matmul(device, cfg):
    """Dense square matmul throughput: the peak the other figures are read against. Returns the
    records and, for timed_against_peak(), (name, matmul, FLOPs) of every matmul in the precision the
    other sections run in, fastest first: a bf16 step is read against the bf16 peak, an fp32 step
    against the fp32 one, and on the CPU the fp32 peak is the faster of PyTorch's a @ b and oneDNN's."""
    n = 8192 if device.type == "cuda" else 2048  # big enough to reach the sustained peak (1024 reads ~20% low on the CPU)
    dtypes = [torch.float32] + ([torch.bfloat16] if has_fast_bf16(device) or cfg.precision == "bf16" else [])
    records, peaks = [], {"fp32": [], "bf16": []}  # precision -> [(GFLOP/s, name, matmul)]
    for dtype in dtypes:
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        precision = "fp32" if dtype == torch.float32 else "bf16"
        matmuls = {f"matmul/{precision}": lambda a=a, b=b: a @ b}
        onednn = onednn_fp32_matmul(a, b) if dtype == torch.float32 and device.type == "cpu" else None
        if onednn:
            matmuls["matmul/fp32-onednn"] = onednn
        for name, matmul in matmuls.items():
            med, lo, hi = timed(matmul, device, cfg.repeats * 2, cfg.warmup + 2)
            gflops = 2 * n**3 / med / 1e9
            records.append({"name": name, "ms_median": med * 1e3, "ms_min": lo * 1e3, "ms_max": hi * 1e3,
                            "gflops": gflops, "size": n})
            peaks[precision].append((gflops, name, matmul))
    fastest_first = sorted(peaks[precision_name(device, cfg.precision)], key=lambda p: -p[0])
    return records, [(name, matmul, 2 * n**3) for _, name, matmul in fastest_first]


def bench_train(device, cfg, mcfg, name, peaks):
    """ms per train_step() of the training loop, on random tokens, with its fraction of the peak."""
    reset_peak_memory(device)
    torch.manual_seed(0)
    model = MiniTransformer(mcfg).to(device)
    optimizer = make_optimizer(model, TrainConfig())
    fwd = torch.compile(model) if cfg.compile and device.type == "cuda" else model
    x = torch.randint(mcfg.vocab_size, (cfg.batch_size, mcfg.block_size), device=device)
    batch = (x, torch.roll(x, -1, dims=1))
    ctx = autocast(device, cfg.precision)
    warmup = cfg.warmup + (5 if fwd is not model else 0)
    flops = train_flops(model, cfg.batch_size, mcfg.block_size)
    med, lo, hi, fracs = timed_against_peak(lambda: train_step(fwd, optimizer, batch, 1, ctx, 1.0), flops, peaks, device,
                                           cfg.repeats, warmup)
    return {"name": f"train/{name}", "ms_median": med * 1e3, "ms_min": lo * 1e3, "ms_max": hi * 1e3,
            "tokens_per_s": cfg.batch_size * mcfg.block_size / med, "flops_per_step": flops,
            "gflops": flops / med / 1e9, **fracs, **peak_memory_mb(device),
            "precision": precision_name(device, cfg.precision), "config": asdict(mcfg)}


def bench_attention(device, cfg, mcfg):
    """The attention layer alone, forward + backward, explicit path vs SDPA at the same shapes, both
    without dropout and, on the CPU, in fp32: there attention with dropout or under bf16 autocast is
    always computed by hand (see CausalSelfAttention.forward), and both figures would time that."""
    records = []
    for path in ("explicit", "sdpa"):
        torch.manual_seed(0)
        layer = CausalSelfAttention(replace(mcfg, attn=path, dropout=0.0)).to(device)
        x = torch.randn(cfg.batch_size, mcfg.block_size, mcfg.d_model, device=device, requires_grad=True)

        def step():
            with autocast(device, cfg.precision) if device.type != "cpu" else contextlib.nullcontext():
                layer(x).sum().backward()

        med, lo, hi = timed(step, device, cfg.repeats, cfg.warmup)
        records.append({"name": f"attention/{path}", "ms_median": med * 1e3, "ms_min": lo * 1e3, "ms_max": hi * 1e3,
                        "tokens_per_s": cfg.batch_size * mcfg.block_size / med})
    records[1]["speedup_vs_explicit"] = records[0]["ms_median"] / records[1]["ms_median"]
    return records


def bench_generate(device, cfg, mcfg):
    """Characters per second for gen_chars new characters from a one-character prompt, plain vs cache,
    with the model shape of the train section (by default mini_transformer.py's default model). Plain
    and cached runs alternate, so a drift in the machine's speed hits both, and the speedup is the
    median of the per-pair ratios."""
    torch.manual_seed(0)
    model = MiniTransformer(replace(mcfg, dropout=0.0)).to(device)
    prompt = torch.zeros(1, 1, dtype=torch.long, device=device)

    def gen(use_cache):
        for _ in model.stream(prompt, cfg.gen_chars, temperature=1.0, generator=torch.Generator(device).manual_seed(0),
                              kv_cache=use_cache):
            pass

    seconds = {False: [], True: []}  # use_cache -> one time per repeat
    for repeat in range(1 + max(1, cfg.repeats // 2)):  # repeat 0 warms up
        for use_cache in (False, True):
            t = timed(lambda: gen(use_cache), device, 1, 0)[0]
            if repeat:
                seconds[use_cache].append(t)
    records = []
    for use_cache, times in seconds.items():
        med = statistics.median(times)
        records.append({"name": f"generate/{'kv_cache' if use_cache else 'plain'}", "ms_median": med * 1e3,
                        "ms_min": min(times) * 1e3, "ms_max": max(times) * 1e3, "chars_per_s": cfg.gen_chars / med})
    records[1]["speedup_vs_plain"] = statistics.median(p / c for p, c in zip(seconds[False], seconds[True]))
    return records


def bench_vit(device, cfg, peaks):
    """vit.py's training step at its defaults (ViTConfig and its batch) on random images, as images/s
    and a fraction of the peak. The batch is drawn once, with vit.py's random shifts, outside the clock."""
    torch.manual_seed(0)
    vcfg, batch_size = ViTConfig(), TRAIN_DEFAULTS.batch_size
    model = ViT(vcfg).to(device)
    optimizer = make_optimizer(model, TRAIN_DEFAULTS)
    images = torch.randint(256, (1000, 28, 28), dtype=torch.uint8, device=device)
    split = (images, torch.randint(10, (1000,), device=device))
    batch = image_batch(split, batch_size, torch.Generator().manual_seed(0), vcfg.max_shift)
    flops = train_flops(model, batch_size, (28 // vcfg.patch_size) ** 2)
    med, lo, hi, fracs = timed_against_peak(lambda: train_step(model, optimizer, batch, 1, autocast(device, cfg.precision), 1.0), flops, peaks,
                                           device, cfg.repeats, cfg.warmup)
    return [{"name": "vit/train", "ms_median": med * 1e3, "ms_min": lo * 1e3, "ms_max": hi * 1e3,
             "images_per_s": batch_size / med, "flops_per_step": flops, "gflops": flops / med / 1e9,
             **fracs, "precision": precision_name(device, cfg.precision), "config": asdict(vcfg)}]


def show(record):
    extra = [f"{record[k] / 1e3:.1f}k tok/s" for k in ("tokens_per_s",) if k in record]
    extra += [f"{record['images_per_s']:.0f} images/s"] if "images_per_s" in record else []
    extra += [f"{record['chars_per_s']:.0f} chars/s"] if "chars_per_s" in record else []
    extra += [f"{record['gflops']:.1f} GFLOP/s"] if "gflops" in record else []
    extra += [f"{frac:.2f} of {peak}" for peak, frac in record.get("frac_by_peak", {}).items()]
    extra += [f"peak mem {record['peak_mem_mb']:.0f} MB"] if "peak_mem_mb" in record else []
    extra += [f"{record[k]:.2f}x" for k in ("speedup_vs_explicit", "speedup_vs_plain") if k in record]
    print(f"{record['name']:<20} {record['ms_median']:9.2f} ms (min {record['ms_min']:.2f}, max {record['ms_max']:.2f}) | "
          + " | ".join(extra), flush=True)


def main():
    # The course lab's model: mini_transformer.py's default shape (context 128) with the lab's dropout 0.1
    lab = TransformerConfig(vocab_size=65, dropout=0.1)
    (cfg, mcfg), _, _ = parse_config(BenchConfig(), lab, description=__doc__.strip().split("\n")[0])
    device = get_device(cfg.device)
    keep_freed_memory()  # as fit() does, so the steps are timed as the scripts run them
    sections = set(cfg.only.split(","))
    print(f"device {device} | torch {torch.__version__} | {torch.get_num_threads()} CPU threads | "
          f"training steps in {precision_name(device, cfg.precision)}")
    records = []

    def add(new):  # kept before shown: a Ctrl-C right after a figure is printed still keeps it
        for r in new:
            r["device"] = str(device)
        records.extend(new)
        for r in new:
            show(r)

    interrupted = False
    try:
        peaks = None
        if sections & {"matmul", "train", "vit"}:
            matmul_records, peaks = bench_matmul(device, cfg)
            add(matmul_records)
        if "train" in sections:
            add([bench_train(device, cfg, mcfg, "lab", peaks), bench_train(device, cfg, replace(mcfg, dropout=0.0), "lab-no-dropout", peaks)])
            if cfg.gpu_recipe or device.type == "cuda":
                add([bench_train(device, cfg, GPU_RECIPE, "gpu-recipe", peaks)])
        if "attention" in sections:
            add(bench_attention(device, cfg, mcfg))
        if "generate" in sections:
            add(bench_generate(device, cfg, mcfg))
        if "vit" in sections:
            add(bench_vit(device, cfg, peaks))
    except KeyboardInterrupt:  # Ctrl-C: keep the figures measured so far
        interrupted = True
    if cfg.json:
        try:
            Path(cfg.json).write_text(json.dumps(records, indent=1), encoding="utf-8")
        except OSError as e:  # the figures are printed above, so only the file is lost
            sys.exit(f"error: cannot write {cfg.json}: {e.strerror}")
    if interrupted:  # one line and the status of a program stopped by Ctrl-C, as every script here
        print(f"interrupted: {len(records)} figures measured" + (f", written to {cfg.json}" if cfg.json else ""), file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    run_main(main)
