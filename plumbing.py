"""
The run plumbing shared by every script: the command line from config dataclasses, device and
precision, checkpoints, the out_dir lock, DDP helpers and signal handling. Nothing here is about
Transformers; mini_transformer.py, vit.py, sample.py, bench.py and plot.py import from this file.
"""

import argparse
import contextlib
import inspect
import math
import os
import re
import signal
import statistics
import sys
import time
from dataclasses import asdict, fields, replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

try:
    import fcntl  # file locks (POSIX)
except ImportError:
    fcntl = None

# ----------------------------------------------------------------------------------------------------
# Command line


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 2, instead of argparse's whole usage block
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def finite(text):
    """float() for flags, refusing nan and inf, which would slip through every `x >= 0` check."""
    if not math.isfinite(value := float(text)):
        raise ValueError(text)
    return value


def field_comments(cls):
    """{field name: its trailing comment} of a config dataclass, read from its source: the flags' help."""
    return dict(re.findall(r"^\s+(\w+):[^#\n]*#\s*(.*)$", inspect.getsource(cls), re.M))


def parse_config(*defaults, argv=None, description=None):
    """A CLI from config dataclasses: every field is --field (bools: --field/--no-field), typed by its
    default, with the field's trailing comment as help; description (the script's docstring, with its
    example commands) heads --help as written. Returns (configs, flags given, parser)."""
    parser = _ArgumentParser(description=description and description.strip(),
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    for cfg in defaults:
        group = parser.add_argument_group(type(cfg).__name__)
        comments = field_comments(type(cfg))
        for f in fields(cfg):
            value = getattr(cfg, f.name)
            kinds = {bool: {"action": argparse.BooleanOptionalAction}, float: {"type": finite}}
            kind = kinds.get(type(value), {"type": type(value)})
            helptext = f"{comments.get(f.name, '')} (default: {value!r})".replace("%", "%%")
            group.add_argument(f"--{f.name}", default=argparse.SUPPRESS, help=helptext, **kind)
    given = vars(parser.parse_args(argv))  # only the flags actually typed (SUPPRESS leaves out the rest)
    try:  # replace() re-runs __post_init__, so a bad combination becomes one parser error
        configs = [replace(c, **{f.name: given[f.name] for f in fields(c) if f.name in given}) for c in defaults]
        return configs, given, parser
    except ValueError as e:
        parser.error(str(e))


def run_main(main):
    """main() with stdout line-buffered, so that progress shows as it happens in a file or a pipe;
    Ctrl-C outside the training loop ends with one line and status 130, a closed pipe quietly."""
    sys.stdout.reconfigure(line_buffering=True)
    try:
        main()
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # `python sample.py | head`: the exit's own flush must not fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


# ----------------------------------------------------------------------------------------------------
# Device and precision


def get_device(name="auto"):
    """cuda, then mps, then cpu for 'auto'; otherwise the named device, checked to exist."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available.get(re.sub(r":\d+$", "", name), False):
        sys.exit(f"error: device '{name}' is unknown or not available here (use auto, cpu, cuda, cuda:N or mps)")
    if name.startswith("cuda"):  # TF32 matmuls on fp32 tensors: 10-bit mantissa products, fp32 sums
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return torch.device(name)


def sync(device):
    """Wait for queued GPU work, so that a clock read measures it. A no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def choose_precision(device, precision, cfg, tokens, clock=time.perf_counter):
    """(precision, a note for the run's first line). bf16 or fp32 as asked; auto: bf16 on CUDA GPUs
    that support it, elsewhere only where a short race of the model's own matmuls, (tokens, d_model) x
    (d_model, 3 d_model) and x (d_model, d_ff), finds bf16 at least 1.3x faster than fp32. CPU flags do
    not tell: CPUs with AVX512-BF16 have run bf16 much faster than fp32, and others slower (EXPERIMENTS.md)."""
    if precision != "auto" or device.type == "cuda":
        choice = precision if precision != "auto" else "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        return choice, f"{choice} ({'as asked' if precision != 'auto' else 'CUDA'})"
    x = torch.randn(tokens, cfg.d_model, device=device)
    ws = [torch.randn(n, cfg.d_model, device=device) for n in (3 * cfg.d_model, cfg.d_ff)]
    seconds, t_end = {torch.float32: [], torch.bfloat16: []}, clock() + 0.2
    for i in range(50):  # round 0 warms both up (bf16 kernels are set up on first use) and is not counted
        for dtype, times in seconds.items():
            a, b = x.to(dtype), [w.to(dtype) for w in ws]
            sync(device)
            t0 = clock()
            for w in b:
                F.linear(a, w)
            sync(device)
            times.append(clock() - t0 if i else None)
        if i > 3 and clock() > t_end:
            break
    ratios = [f / max(b, 1e-9) for f, b in zip(*seconds.values()) if b is not None]
    speedup = torch.tensor(statistics.median(ratios), dtype=torch.float64)
    if dist.is_initialized():  # rank 0's measurement decides for every process
        dist.broadcast(speedup, 0)
    choice = "bf16" if speedup.item() >= 1.3 else "fp32"
    return choice, f"{choice} (bf16 matmuls measured {speedup.item():.2f}x as fast as fp32 here)"


def autocast(device, precision):
    """bf16 autocast (matmuls in bf16; softmax, LayerNorm and the loss in fp32; fp32 weights) or plain
    fp32. fp16 would need a GradScaler; bf16 has fp32's range and does not."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()


# ----------------------------------------------------------------------------------------------------
# Files and checkpoints


def write_file(path, text, rank=0, mode="w"):
    """Write or append text on rank 0; a folder in the way or a full disk ends the run with one line."""
    try:
        if rank == 0:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            with open(path, mode, encoding="utf-8") as f:
                f.write(text)
    except OSError as e:
        sys.exit(f"error: cannot write {path} ({e.strerror})")


def training_state(model, optimizers, tcfg, step, best_val, batch_gen, meta):
    """Everything a run needs to continue exactly: tensors and plain Python only (weights_only loads)."""
    rng = {"torch": torch.get_rng_state(), "batches": batch_gen.get_state(),
           "cuda": torch.cuda.get_rng_state_all() if next(model.parameters()).is_cuda else []}
    return {"model": model.state_dict(), "optimizer": [o.state_dict() for o in optimizers],
            "train_config": asdict(tcfg), "step": step, "best_val_loss": best_val, "rng": rng, **meta}


def restore_state(ckpt, model, optimizers, batch_gen, tcfg):
    """Load a training_state() dict back; returns (step, best val loss)."""
    try:
        model.load_state_dict(ckpt["model"])
        if len(ckpt["optimizer"]) != len(optimizers):
            raise ValueError(f"its optimizer is not --optimizer {tcfg.optimizer}")
        for opt, saved in zip(optimizers, ckpt["optimizer"]):
            # load_state_dict brings back the moments, but also the saved groups' settings (lr, decay, betas):
            # this run's are put back, or a flag changed on --resume would be silently ignored
            settings = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
            opt.load_state_dict(saved)
            for group, ours in zip(opt.param_groups, settings):
                group.update(ours)
        torch.set_rng_state(ckpt["rng"]["torch"].cpu())
        batch_gen.set_state(ckpt["rng"]["batches"].cpu())
        if ckpt["rng"]["cuda"] and next(model.parameters()).is_cuda:
            torch.cuda.set_rng_state_all([s.cpu() for s in ckpt["rng"]["cuda"]])
        step, best_val = int(ckpt["step"]), float(ckpt["best_val_loss"])
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as e:
        reason = f"{type(e).__name__}: {str(e).splitlines()[0]}"
        sys.exit(f"error: cannot resume from {Path(tcfg.out_dir) / 'ckpt.pt'} ({reason})")
    if 0 < tcfg.max_steps < step:
        sys.exit(f"error: the checkpoint is at step {step}, past --max_steps {tcfg.max_steps} (give a larger one)")
    return step, best_val


def save_checkpoint(path, state, rank=0):
    """On rank 0, torch.save to a temporary file, then rename: a kill mid-write leaves the old file
    intact, and a failed write ends the run with one line, the old file still intact."""
    tmp = f"{path}.tmp"
    try:
        if rank == 0:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:  # opened here, so that a permission error is reported as one
                torch.save(state, f)
            os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save may report a failed write as a RuntimeError
        with contextlib.suppress(OSError):
            os.remove(tmp)
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
        sys.exit(f"error: cannot write {path} ({reason}); the previous checkpoint, if any, is unchanged")


def load_checkpoint(path, device="cpu", trainer="mini_transformer.py"):
    """Read a checkpoint of tensors and plain Python (weights_only=True: no code runs on load)."""
    if not Path(path).exists():
        sys.exit(f"error: {path} not found (train a model first: python {trainer})")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # truncated or foreign file: torch's first sentence, not a traceback
        reason = f"{type(e).__name__}: {str(e).splitlines()[0].split('. ')[0]}"
        sys.exit(f"error: {path} is not a readable checkpoint ({reason})")


def checkpoint_and_config(tcfg, key, cls, given, parser):
    """For --resume (ckpt.pt) or --eval_only (best.pt): (checkpoint, its model config saved under key as
    cls, tcfg as resumed_config() makes it). The model's shape comes from the checkpoint: a flag typed
    for one of its fields with another value is a CLI error."""
    script, path = Path(sys.argv[0]).name, Path(tcfg.out_dir) / ("ckpt.pt" if tcfg.resume else "best.pt")
    ckpt = load_checkpoint(path, trainer=script)
    saved = ckpt.get(key) if isinstance(ckpt, dict) else None
    if not isinstance(saved, dict) or "model" not in ckpt:  # another script's checkpoint, or a stripped one
        sys.exit(f"error: {path} is not a {script} checkpoint (it has no model or {key}); point --out_dir at one")
    clash = [f"--{k} {given[k]} (checkpoint: {saved[k]})" for k in saved if k in given and given[k] != saved[k]]
    if clash:
        parser.error("the model's shape comes from the checkpoint; remove " + ", ".join(clash))
    try:
        model_cfg = cls(**saved)
    except (TypeError, ValueError) as e:  # a field this version does not know, or a bad value
        sys.exit(f"error: {path} comes from another version of {script} ({e})")
    try:
        return ckpt, model_cfg, resumed_config(tcfg, ckpt, given)
    except ValueError as e:  # a flag typed now that does not fit the saved run, such as a warmup past its end
        parser.error(str(e))


LAUNCH_FIELDS = ("out_dir", "device", "compile", "resume", "overwrite", "eval_only")  # never taken from a checkpoint


def resumed_config(tcfg, ckpt, given):
    """A resumed run goes on with the training config it was saved with, max_steps and warmup as its time
    budget fixed them, except for the flags typed now; a new --max_steps brings its own default warmup.
    Where and how this launch runs (LAUNCH_FIELDS) is this launch's."""
    if not tcfg.resume:
        return tcfg
    known = {f.name for f in fields(tcfg)} - set(LAUNCH_FIELDS) - set(given)
    saved = {k: v for k, v in ckpt.get("train_config", {}).items() if k in known}
    if "max_steps" in given and "warmup_steps" not in given:
        saved.pop("warmup_steps", None)
    return replace(tcfg, **saved)


def claim_out_dir(tcfg):
    """Before anything is written: refuse an out_dir that holds a run unless --resume or --overwrite,
    then lock it for this run (rank 0) so that two runs never write one folder. The lock is an flock,
    which the system drops when the process ends, by kill -9 too. A fresh run starts a fresh log.
    Returns a context manager: the lock holds until its with-block ends."""
    out, lock = Path(tcfg.out_dir), None
    found = [n for n in ("ckpt.pt", "best.pt") if (out / n).exists()]
    if found and not (tcfg.resume or tcfg.overwrite or tcfg.eval_only):
        sys.exit(f"error: {out} already holds a run ({', '.join(found)}); continue it with --resume, "
                 "or start over with --overwrite")
    if tcfg.eval_only or os.environ.get("RANK", "0") != "0":
        return contextlib.nullcontext()
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = open(out / "lock", "a+", encoding="utf-8")
        if fcntl:  # POSIX; on Windows runs go unlocked
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lock.truncate(0)
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        if not tcfg.resume:
            (out / "log.jsonl").unlink(missing_ok=True)
    except BlockingIOError:
        lock.seek(0)
        sys.exit(f"error: {out} is in use by another run (PID {lock.read().strip() or '?'}); wait for it "
                 "or give another --out_dir")
    except OSError as e:  # a file in the way, no permission, a read-only disk
        sys.exit(f"error: cannot write to {out} ({e.strerror})")
    return lock


# ----------------------------------------------------------------------------------------------------
# Signals and DDP


@contextlib.contextmanager
def stop_flag():
    """Within the block, Ctrl-C (SIGINT) and kill (SIGTERM) append (time, signal) to the yielded list,
    and the loop saves at the next step; another one a second later stops at once. A SIGINT ignored at
    launch (a background job of a shell script) stays ignored."""
    interrupted = []

    def on_signal(signum, frame):
        if interrupted and time.monotonic() - interrupted[0][0] > 1.0:  # torchrun's copy of the first comes at once
            sys.exit("interrupted twice: stopped without saving")
        interrupted.append((time.monotonic(), signum))

    caught = [s for s in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(s) is not signal.SIG_IGN]
    previous = {s: signal.signal(s, on_signal) for s in caught}
    try:
        yield interrupted
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def setup_ddp(tcfg):
    """The device and, under torchrun (it sets RANK, LOCAL_RANK, WORLD_SIZE), a seat in the process group:
    one GPU per process with NCCL, or CPU processes with gloo. Returns (rank, world_size, device)."""
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
        sys.exit(f"error: batch_size {tcfg.batch_size} must divide by processes x grad_accum "
                 f"= {world * tcfg.grad_accum}")
    return rank, world, device


def print0(*args, **kwargs):
    """print() on rank 0 only, so that N processes do not print every line N times."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, **kwargs)


def minutes(seconds):
    """1234.5 -> '20m35s'. Rounded to whole seconds first, so 59.6 s is 1m00s, not 0m60s."""
    return f"{round(seconds) // 60}m{round(seconds) % 60:02d}s"
