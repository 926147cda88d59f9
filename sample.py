"""
Generate text from a checkpoint of mini_transformer.py. The model's shape and vocabulary come from the
checkpoint; the flags only steer the sampling.

    python sample.py --top_k 50                        # from out/best.pt
    python sample.py --prompt "ROMEO:" --num_samples 3 --max_new_tokens 300 --temperature 0.8 --seed 7
    python sample.py --prompt_file scene.txt --top_p 0.9
    python sample.py --interactive                     # a prompt loop; 'quit' or Ctrl-D leaves
"""

import math
import re
import sys
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch

from mini_transformer import MiniTransformer, TransformerConfig
from plumbing import get_device, load_checkpoint, parse_config, run_main


@dataclass
class SampleConfig:
    out_dir: str = "out"  # folder of the training run
    ckpt: str = ""  # checkpoint file; empty = best.pt in out_dir
    prompt: str = "\n"  # text to continue
    prompt_file: str = ""  # read the prompt from this UTF-8 file instead of --prompt
    num_samples: int = 1  # samples to generate, one after the other
    max_new_tokens: int = 500  # characters generated per sample
    temperature: float = 0.8  # divides the logits: < 1 sharper, > 1 flatter, 0 = always the most likely
    top_k: int = 0  # sample among the k most likely characters only; 0 = all
    top_p: float = 1.0  # sample from the smallest set holding this much probability; 1 = all
    seed: int = 1337  # seeds the sampling, so a run can be repeated
    device: str = "auto"  # auto (cuda > mps > cpu), cpu, cuda, cuda:1 or mps
    kv_cache: bool = True  # reuse keys and values of past positions (--no-kv_cache: re-read the context)
    interactive: bool = False  # read prompts from the terminal, one per line

    def __post_init__(self):
        if self.num_samples < 1 or self.max_new_tokens < 1:
            raise ValueError("num_samples and max_new_tokens must be at least 1")
        if not (math.isfinite(self.temperature) and self.temperature >= 0) or self.top_k < 0:  # nan passes `< 0`
            raise ValueError(f"temperature must be finite and >= 0, top_k >= 0; got {self.temperature}, {self.top_k}")
        if not 0 < self.top_p <= 1:  # refuses nan too: every comparison with nan is False
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be in [0, 2**63), got {self.seed}")


CHECKPOINT_KEYS = ("model", "model_config", "vocab")  # what sample.py reads from mini_transformer.py's checkpoints
COMMANDS = {"temp": "temperature", "topk": "top_k", "topp": "top_p", "len": "max_new_tokens"}  # interactive


def load_model(path, device):
    """The model and vocabulary in a checkpoint of mini_transformer.py. Anything else (a bare tensor or
    state dict, a stripped checkpoint, one with a config field this version does not know) ends the
    script with one line saying what is wrong, not a traceback."""
    ckpt = load_checkpoint(path, device)
    try:
        if not isinstance(ckpt, dict):
            raise ValueError(f"it holds a {type(ckpt).__name__}, not a dict")
        missing = [key for key in CHECKPOINT_KEYS if key not in ckpt]
        if missing:
            raise ValueError(f"it has no {' or '.join(missing)}")
        unknown = sorted(set(map(str, ckpt["model_config"])) - {f.name for f in fields(TransformerConfig)})
        if unknown:
            raise ValueError(f"its model_config has fields this version does not know: {', '.join(unknown)}")
        cfg, vocab = TransformerConfig(**ckpt["model_config"]), ckpt["vocab"]
        if not isinstance(vocab, str) or len(vocab) > cfg.vocab_size:  # longer: ids beyond the embedding table
            raise ValueError(f"its vocab is not a string of at most vocab_size = {cfg.vocab_size} characters")
        model = MiniTransformer(cfg).to(device)
        model.load_state_dict(ckpt["model"])  # weights missing or of another shape: RuntimeError
    except (TypeError, ValueError, RuntimeError) as e:
        sys.exit(f"error: {path} is not a mini_transformer.py checkpoint ({str(e).splitlines()[0]})")
    return model, vocab


def encode(text, vocab):
    """Token ids of text; characters missing from the vocabulary raise ValueError listing them."""
    unknown = sorted(set(text) - set(vocab))
    if unknown:
        raise ValueError(f"the prompt has characters the model never saw: {', '.join(map(repr, unknown))}")
    stoi = {c: i for i, c in enumerate(vocab)}
    return [stoi[c] for c in text]


def write_sample(model, vocab, ids, cfg, generator):
    """Stream one continuation of ids to stdout as it is generated; returns the number of characters."""
    idx = torch.tensor([ids], device=next(model.parameters()).device)
    stream = model.stream(idx, cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                          generator=generator, kv_cache=cfg.kv_cache, vocab_limit=len(vocab))
    for next_id in stream:
        print(vocab[next_id.item()], end="", flush=True)
    print(flush=True)  # flushed, so the chars/s line on stderr never lands inside the text
    return cfg.max_new_tokens


def interact(model, vocab, cfg, generator):
    """A prompt loop: each line typed (with its newline, if the model knows one) is a prompt to continue,
    except the commands temp/topk/topp/len VALUE and quit/exit."""
    print("Type a prompt and press Enter. Settings: temp X, topk N, topp X, len N. Leave: quit or Ctrl-D.")
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        command = re.fullmatch(r"(temp|topk|topp|len)\s+(\S+)", line.strip())
        if line.strip() in ("quit", "exit"):
            return
        if command:
            name, value = COMMANDS[command[1]], command[2]
            try:
                cfg = replace(cfg, **{name: type(getattr(cfg, name))(value)})
                print(f"{name} = {getattr(cfg, name)}")
            except ValueError as e:
                print(f"hint: {command[1]} needs a valid number ({e})")
            continue
        try:
            newline = "\n" if "\n" in vocab else ""  # the Enter typed, if the model knows newlines
            ids = encode(line + newline or vocab[0], vocab)
        except ValueError as e:
            print(f"hint: {e}")
            continue
        try:
            write_sample(model, vocab, ids, cfg, generator)
        except KeyboardInterrupt:  # Ctrl-C stops this sample, not the loop
            print("\n(stopped)")


def main():
    (cfg,), _, _ = parse_config(SampleConfig(), description=__doc__)
    device = get_device(cfg.device)
    model, vocab = load_model(Path(cfg.ckpt or Path(cfg.out_dir) / "best.pt"), device)
    generator = torch.Generator(device).manual_seed(cfg.seed)
    if cfg.interactive:
        return interact(model, vocab, cfg, generator)
    if cfg.prompt_file:
        try:
            prompt = Path(cfg.prompt_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            sys.exit(f"error: cannot read the prompt file {cfg.prompt_file} ({e})")
    else:  # the default prompt, a newline, becomes the first character for a vocabulary without newlines
        prompt = vocab[0] if cfg.prompt == "\n" and "\n" not in vocab else cfg.prompt
    if not prompt:
        sys.exit("error: the prompt is empty (give --prompt TEXT or a non-empty --prompt_file)")
    try:
        ids = encode(prompt, vocab)
    except ValueError as e:
        sys.exit(f"error: {e}")
    t0, chars = time.perf_counter(), 0
    for i in range(cfg.num_samples):
        if i:
            print("-" * 40)
        sys.stdout.write(prompt)
        chars += write_sample(model, vocab, ids, cfg, generator)
    seconds = time.perf_counter() - t0
    print(f"{chars} characters in {seconds:.1f} s ({chars / seconds:.0f} chars/s, kv_cache {cfg.kv_cache})",
          file=sys.stderr)


if __name__ == "__main__":
    run_main(main)
