"""
Tests of plot.py, to be merged into test_shapes.py. Tiny run folders are built by hand in a temporary
folder: untrained models, a hand-written log, a fake MNIST of random pixels.

    python -m pytest -q test_plot_draft.py
"""

import contextlib
import io
import json
import re
import signal
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from unittest import mock

import numpy as np
import torch

import mini_transformer as mt
import plot
import vit

HERE = Path(__file__).resolve().parent
VOCAB = "\n !,.:?BEJLMORTUabehilnorstu"  # the characters of the prompts below, and a few more


def lm_run(folder, **kw):
    """A language-model run as training leaves it: best.pt (a tiny untrained model), config.json, and a
    log.jsonl of a run stopped after step 40 and resumed from its checkpoint at step 20."""
    folder.mkdir(parents=True)
    torch.manual_seed(0)
    cfg = mt.TransformerConfig(vocab_size=len(VOCAB), block_size=16, n_layers=2, n_heads=2, d_model=16, d_ff=32, **kw)
    tcfg = asdict(mt.TrainConfig(out_dir=str(folder), batch_size=4))
    torch.save({"model": mt.MiniTransformer(cfg).state_dict(), "model_config": asdict(cfg), "vocab": VOCAB,
                "train_config": tcfg, "step": 0}, folder / "best.pt")
    (folder / "config.json").write_text(json.dumps({"model_config": asdict(cfg), "vocab": VOCAB, "train_config": tcfg}), encoding="utf-8")
    # (kind, step, loss, seconds since launch): stopped after step 40, resumed from step 20 in a new process
    log = [("eval", 0, 3.3, 0.0), ("train", 10, 3.1, 1.0), ("train", 20, 2.9, 2.0), ("eval", 20, 2.8, 2.25),
           ("train", 30, 2.7, 3.0), ("train", 40, 2.6, 4.0),
           ("train", 30, 2.75, 1.5), ("train", 40, 2.65, 2.5), ("train", 50, 2.5, 3.5), ("eval", 50, 2.4, 3.75)]
    lines = [{"kind": k, "step": s, "loss": v, "lr": 1e-3, "ms_per_step": 5.0, "seen": s * 64, "elapsed_s": t} if k == "train" else
             {"kind": k, "step": s, "train_loss": v, "val_loss": v, "best_val_loss": v, "elapsed_s": t, "val_ppl": 2.7**v}
             for k, s, v, t in log]
    (folder / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines), encoding="utf-8")
    return cfg


def vit_run(folder):
    """A ViT run's best.pt (a tiny untrained model) and a fake MNIST: 12 images per split, each a bar
    somewhere in the middle, with random labels. Returns the test labels."""
    data = folder / "mnist"
    data.mkdir(parents=True)
    rng = np.random.default_rng(0)
    images = np.zeros((12, 28, 28), dtype=np.uint8)
    for i, (top, left) in enumerate(rng.integers(4, 12, (12, 2))):
        images[i, top : top + 12, left : left + 5] = 255
    for split in ("train", "test"):
        np.save(data / f"{split}_images.npy", images)
        np.save(data / f"{split}_labels.npy", rng.integers(0, 10, 12, dtype=np.uint8))
    torch.manual_seed(0)
    cfg = vit.ViTConfig(n_layers=2, n_heads=2, d_model=16, d_ff=32)
    torch.save({"model": vit.ViT(cfg).state_dict(), "vit_config": asdict(cfg), "step": 0,
                "train_config": asdict(mt.TrainConfig(data_dir=str(data), out_dir=str(folder)))}, folder / "best.pt")
    return np.load(data / "test_labels.npy")


def assert_png(path):
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert len(data) < 150_000, f"{path} is {len(data) // 1000} kB, too large for a README"
    height, width, _ = plot.pyplot().imread(path).shape
    assert min(height, width) >= 150, f"{path} is {width} x {height} pixels, too small to read"


def printed(fn, *args):
    """What fn prints."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        fn(*args)
    return out.getvalue()


def exit_message(fn, *args):
    """The message fn exits with; None if it returns."""
    try:
        printed(fn, *args)
    except SystemExit as e:
        return str(e.code)
    return None


def test_plot_draws_the_models_own_attention():
    """The weights drawn must be those the model computes: running the blocks by hand with the weights
    kept gives model(idx)'s logits (both attention paths, eval mode with dropout configured), every row
    of weights sums to 1 and no query attends to a later character. The ViT's loop gives ViT.forward's
    logits, its patches see every patch, and the rollout's rows sum to 1."""
    torch.manual_seed(0)
    idx = torch.randint(len(VOCAB), (2, 16))
    for attn in ("sdpa", "explicit"):
        cfg = mt.TransformerConfig(vocab_size=len(VOCAB), block_size=16, n_layers=2, n_heads=2, d_model=16, d_ff=32,
                                   dropout=0.1, attn=attn)
        model = mt.MiniTransformer(cfg).eval()
        with torch.no_grad():
            logits, maps = plot.lm_attention(model, idx)
            diff = (logits - model(idx)[0]).abs().max().item()
        assert diff < 1e-5, f"{attn}: the block loop's logits differ from the model's by {diff:.2e}"
        assert len(maps) == 2 and maps[0].shape == (2, 2, 16, 16), f"{attn}: weights of shape {maps[0].shape}"
        for layer, att in enumerate(maps):
            assert torch.allclose(att.sum(-1), torch.ones(2, 2, 16)), f"{attn}, layer {layer}: rows do not sum to 1"
            assert att.triu(1).abs().max() == 0, f"{attn}, layer {layer}: a query attends to a later position"
    model = vit.ViT(vit.ViTConfig(n_layers=2, n_heads=2, d_model=16, d_ff=32, dropout=0.1)).eval()
    images = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        logits, maps = plot.vit_attention(model, images)
        diff = (logits - model(images)[0]).abs().max().item()
    assert diff < 1e-5, f"ViT: the block loop's logits differ from the model's by {diff:.2e}"
    later = torch.ones(16, 16, dtype=torch.bool).triu(1)  # [i, j]: patch j comes after patch i
    assert all(att[..., later].min() > 0 for att in maps), "ViT: a patch does not see the patches after it"
    rollout = plot.rollout(maps)  # (3, 16, 16)
    assert torch.allclose(rollout.sum(-1), torch.ones(3, 16), atol=1e-5), "rollout rows do not sum to 1"


def test_plot_loss_overlays_runs():
    """`python plot.py a b --x X` reads the run folders before the flags and draws both runs, each
    labelled by the config field in which it differs; a resumed run's repeated steps keep their last
    record; --x flops is bench.py's train_flops per step; each picture is a PNG in the first run's folder."""
    from bench import train_flops

    with tempfile.TemporaryDirectory() as tmp:
        a, b = Path(tmp) / "a", Path(tmp) / "b"
        lm_run(a)
        cfg_b = lm_run(b, ffn="swiglu")
        _, train, evals = plot.read_run(a)
        assert [r["step"] for r in train] == [10, 20, 30, 40, 50], f"steps {[r['step'] for r in train]}"
        assert train[2]["loss"] == 2.75, "a repeated step kept the record from before the resume"
        assert [r["step"] for r in evals] == [0, 20, 50], f"evaluations at {[r['step'] for r in evals]}"
        drawn, real_save = {}, plot.save

        def keep(fig, path):  # the lines of each picture, by label: x data
            drawn[path.name] = {line.get_label(): list(line.get_xdata()) for line in fig.axes[0].get_lines() if len(line.get_xdata())}
            real_save(fig, path)

        with mock.patch.object(plot, "save", keep):
            for x in ("steps", "tokens", "time", "flops"):
                with mock.patch.object(sys, "argv", ["plot.py", str(a), str(b), "--x", x]):
                    out = printed(plot.main)
                name = "loss_compare.png" if x == "steps" else f"loss_compare_{x}.png"
                assert out == f"wrote {a / name}\n", f"--x {x}: printed {out!r}"
                assert_png(a / name)
            printed(plot.plot_loss, [a], "steps")
        assert_png(a / "loss.png")
        assert set(drawn["loss.png"]) == {f"{a}: train", f"{a}: val"}, f"one run: {drawn['loss.png'].keys()}"
        lines = drawn["loss_compare_flops.png"]
        assert set(lines) == {f"{a}: ffn=relu: train", f"{a}: ffn=relu: val", f"{b}: ffn=swiglu: train", f"{b}: ffn=swiglu: val"}, \
            f"overlay labels: {lines.keys()}"
        flops = 50 * train_flops(mt.MiniTransformer(cfg_b), 4, 16)
        assert lines[f"{b}: ffn=swiglu: val"][-1] == flops, f"FLOPs at step 50: {lines[f'{b}: ffn=swiglu: val'][-1]}, not {flops}"
        assert drawn["loss_compare_tokens.png"][f"{a}: ffn=relu: train"][-1] == 50 * 4 * 16, "tokens are not steps x batch x block"
        times = drawn["loss_compare_time.png"]
        assert times[f"{a}: ffn=relu: train"] == [1.0, 2.0, 5.5, 6.5, 7.5] and times[f"{a}: ffn=relu: val"] == [0.0, 2.25, 7.75], \
            f"the resumed run's clock does not go on from before: {times}"


def test_plot_language_model_pictures():
    """--attention and --embeddings write PNGs from a run's best.pt, print one mean entropy per layer and
    head, and each character's three nearest neighbours."""
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "out"
        lm_run(run)
        out = printed(plot.plot_attention, run, "best.pt", "ROMEO: Be still")
        assert_png(run / "attention.png")
        layers = [line for line in out.splitlines() if line.startswith("layer")]
        assert len(layers) == 2 and all(len(re.findall(r"head \d \d+\.\d\d", line)) == 2 for line in layers), out
        assert out.endswith(f"wrote {run / 'attention.png'}\n"), out
        out = printed(plot.plot_embeddings, run, "best.pt")
        assert_png(run / "embeddings.png")
        neighbours = out.splitlines()[1:-1]
        assert len(neighbours) == len(VOCAB) and all(len(line.split()) == 7 for line in neighbours), out


def test_plot_vit_pictures():
    """--vit writes the rollout and position-embedding PNGs from a ViT run and prints, for each digit,
    the true label of that test image."""
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "vit"
        labels = vit_run(run)
        out = printed(plot.plot_vit, run, "best.pt", 5, 0)
        assert_png(run / "vit_rollout.png")
        assert_png(run / "vit_pos_emb.png")
        shown = re.findall(r"test image (\d+): predicted \d, true (\d)", out)
        assert len(shown) == 5 and all(labels[int(i)] == int(t) for i, t in shown), f"digits and labels: {out}"


def test_plot_mistakes_are_one_line():
    """A user mistake ends with one line naming it, not a traceback: a prompt character outside the
    vocabulary, a prompt longer than block_size, a ViT checkpoint for --attention or --embeddings, a
    language model for --vit, a missing checkpoint or log.jsonl; bad flags are one parser error each."""
    with tempfile.TemporaryDirectory() as tmp:
        lm, vit_folder, bare = Path(tmp) / "lm", Path(tmp) / "vit", Path(tmp) / "bare"
        lm_run(lm)
        vit_run(vit_folder)
        bare.mkdir()
        (bare / "config.json").write_text((lm / "config.json").read_text(encoding="utf-8"), encoding="utf-8")
        cases = [((plot.plot_attention, lm, "best.pt", "ROMEO: \u00e9"), "outside the vocabulary: '\u00e9'"),
                 ((plot.plot_attention, lm, "best.pt", "Be still Be still"), "more than block_size 16"),
                 ((plot.plot_attention, vit_folder, "best.pt", "ROMEO"), "not a mini_transformer.py checkpoint"),
                 ((plot.plot_embeddings, vit_folder, "best.pt"), "not a mini_transformer.py checkpoint"),
                 ((plot.plot_vit, lm, "best.pt", 4, 0), "not a vit.py checkpoint"),
                 ((plot.plot_embeddings, lm, "ckpt.pt"), "ckpt.pt not found"),
                 ((plot.plot_loss, [bare], "steps"), "log.jsonl not found")]
        for args, words in cases:
            message = exit_message(*args)
            assert message and message.startswith("error:") and words in message and "\n" not in message, \
                f"{args[0].__name__}{args[1:]}: {message!r}"
    for flags, words in ((["--embeddings", "--vit", "2"], "one of"), (["--x", "epochs"], "x must be"), (["--vit", "-1"], "vit must be")):
        err = io.StringIO()
        with mock.patch.object(sys, "argv", ["plot.py", *flags]), contextlib.redirect_stderr(err):
            status = exit_message(plot.main)
        assert status == "2" and err.getvalue().count("\n") == 1 and words in err.getvalue(), f"{flags}: {status} {err.getvalue()!r}"


def test_plot_without_matplotlib_is_one_line():
    """Without matplotlib, plot.py says how to install it in one line and exits 1, before any other work
    and without a traceback."""
    code = ("import runpy, sys; sys.modules['matplotlib'] = None; sys.argv = ['plot.py']; "
            "runpy.run_path('plot.py', run_name='__main__')")
    child = subprocess.Popen([sys.executable, "-c", code], cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        _, err = child.communicate(timeout=60)
    finally:
        child.kill()
    assert child.returncode == 1 and err == "plot.py needs matplotlib: pip install matplotlib\n", f"exit {child.returncode}: {err!r}"


if __name__ == "__main__":
    for name, test in list(globals().items()):
        if name.startswith("test_"):
            test()
            print(f"PASS {name}")
