"""The training loop the three stages share: schedule, logging, checkpoints, resume, plots.

A stage hands `train_loop` a `step_fn(step, total) -> {"loss": float, "samples": int, ...}` that
builds batch `step` (a pure function of the step index, so a resumed run sees the same
data), runs forward and backward; the loop sets the learning rate, clips, steps the
optimizer, writes one JSONL row per step, checkpoints atomically every `ckpt_every`
steps and at the end, and draws the loss curve as a PNG with Pillow.

With a time budget and no fixed step count, the first `calibrate_steps` steps (all inside
the warm-up, so the schedule does not depend on the total yet) are timed and the total
is set from the measured speed; the total is stored in the checkpoint, so a resumed run
follows the same schedule.

Where a process trains (device, process group, DDP, batches drawn ahead): `dist.py`; the
loop takes its `Dist` and only rank 0 logs and writes files.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from ..atomic import atomic_path, atomic_write_text
from .dist import Dist

log = logging.getLogger(__name__)


# --- process setup ---------------------------------------------------------------------

def setup_torch(threads: int | None = 2, seed: int = 0) -> None:
    """Threads (2 on this project's machines; None leaves torch's default) and every RNG seeded."""
    if threads:
        torch.set_num_threads(threads)
    seed_everything(seed)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


# fp16 is left out: without a gradient scaler its small activation gradients underflow
AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16}


def resolve_autocast(name: str | None, device_type: str = "cpu") -> str | None:
    """A stage config's `autocast` setting -> what the step will use: None (fp32), "bfloat16",
    or for "auto" "bfloat16" where the device multiplies bf16 natively (a GPU with bf16, a CPU
    with AVX512-BF16 or AMX: a stage-2 step of the default model took 0.64x the fp32 time
    there) and None where it does not (on AVX2 alone torch's bf16 matmul ran at 1/6 of fp32's
    speed)."""
    from ..model.layers import cpu_has_fast_bf16

    if name == "auto":
        if device_type == "cuda":
            return "bfloat16" if torch.cuda.is_bf16_supported() else None
        return "bfloat16" if cpu_has_fast_bf16() else None
    if name is not None and name not in AUTOCAST_DTYPES:
        raise ValueError(f"autocast={name!r}: expected None, 'auto' or one of {sorted(AUTOCAST_DTYPES)}")
    return name


def autocast_dtype(name: str | None, device_type: str = "cpu") -> torch.dtype | None:
    """A stage config's `autocast` setting -> the dtype to run its forward in (None: off)."""
    name = resolve_autocast(name, device_type)
    return None if name is None else AUTOCAST_DTYPES[name]


def resolve_compile(setting: bool | str | None, device_type: str = "cpu") -> bool:
    """A stage config's `compile` setting -> whether its steps run the decoder's blocks through
    torch.compile: "auto" where inductor can build kernels (a GPU; a CPU with a C++ compiler)
    unless LLAVA_CORE_COMPILE=0. On this project's CPU a stage-2 step took 0.69x the time of
    the eager bf16 one (benchmarks/train_step_dtype.py)."""
    if setting == "auto":
        if os.environ.get("LLAVA_CORE_COMPILE", "1") == "0":
            return False
        return device_type == "cuda" or _cxx() is not None
    if setting in (None, False):
        return False
    if setting is not True:
        raise ValueError(f"compile={setting!r}: expected True, False or 'auto'")
    if device_type == "cpu" and _cxx() is None:
        raise ValueError("compile=True: torch.compile on the CPU needs a C++ compiler (g++ or clang++, "
                         "or $CXX) and none was found; install one or set compile to False")
    return True


def _cxx() -> str | None:
    """The C++ compiler inductor's CPU kernels would be built with, or None."""
    names = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "clang++", "c++"]
    return next((p for p in map(shutil.which, names) if p), None)


@contextlib.contextmanager
def compiled_blocks(decoder: nn.Module, enabled: bool = True):
    """Within the block, each of `decoder.layers` runs a torch.compile'd forward (one graph for
    all: the blocks share their code, dynamic in the sequence length); on leaving, the eager
    forward is back, so evaluation, caches and hooks after training see the plain model.
    Inductor fuses what eager runs as separate kernels (norms, rotary, SwiGLU, bf16 casts)."""
    if not enabled:
        yield
        return
    from ..model.layers import cpu_has_fast_bf16

    cpu_has_fast_bf16()  # known before tracing: the compiled graph reads it as a constant
    for block in decoder.layers:
        block.forward = torch.compile(block.forward, dynamic=True)  # shadows Block.forward
    try:
        yield
    finally:
        for block in decoder.layers:
            del block.forward


def set_trainable(module: nn.Module, trainable: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(trainable)


def trainable_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors of the parameters that require grad (what a stage changes), by name."""
    names = {n for n, p in module.named_parameters() if p.requires_grad}
    return {n: t.detach().clone() for n, t in module.state_dict(keep_vars=True).items() if n in names}


# --- files -----------------------------------------------------------------------------

def atomic_torch_save(obj, path: str | Path) -> None:
    """torch.save, atomically."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


class MetricsLog:
    """One JSON object per line; on resume, rows after the checkpoint's step are dropped."""

    def __init__(self, path: str | Path, enabled: bool = True, resume_step: int | None = None):
        self.path = Path(path)
        self.enabled = enabled
        self.rows: list[dict] = []
        if not enabled:
            return
        if resume_step is not None and self.path.is_file():
            self.rows = [r for r in read_jsonl(self.path) if r.get("step", 0) <= resume_step]
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.rows))
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("")

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        self.rows.append(row)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


def read_jsonl(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


# --- schedule --------------------------------------------------------------------------

def lr_factor(step: int, total: int | None, warmup: int, min_ratio: float) -> float:
    """Linear warm-up over `warmup` steps, then cosine from 1 to `min_ratio` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    if total is None or total <= warmup:
        return 1.0
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))


@dataclass
class LoopConfig:
    steps: int | None = None  # fixed number of optimizer steps; None: set from budget_s
    stop_at: int | None = None  # stop here although the schedule runs to `steps` (replays a budget stop)
    budget_s: float | None = None  # wall-clock budget; the loop also stops when it is spent
    warmup: int = 20  # linear warm-up steps (>= calibrate_steps, so the total is known after it)
    min_lr_ratio: float = 0.05  # cosine floor, as a fraction of each group's lr
    grad_clip: float | None = 1.0
    ckpt_every: int = 200  # steps between checkpoints (and one at the end)
    log_every: int = 25  # steps between logging.info lines (the JSONL gets every step)
    calibrate_steps: int = 6  # steps timed to turn budget_s into a step count (planned again after warm-up)
    progress: bool = True  # tqdm bar

    def __post_init__(self):
        if self.steps is None and self.budget_s is None:
            raise ValueError("LoopConfig: give steps, budget_s, or both")


@dataclass
class LoopResult:
    steps: int  # steps done in total (resumed ones included)
    total: int  # the planned total
    elapsed_s: float
    rows: list[dict]
    stopped_by_budget: bool


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_differences(old: dict, new: dict) -> list[str]:
    """'key: old -> new' for each setting that differs, the loop's budget and step settings aside
    (a resumed run may be given more time). A setting the old record lacks was added to the code
    after that run; new settings are added switched off (False, 0, None), so one that is still
    off matches the record, and one switched on does not."""
    a, b = _flat(old), _flat(new)
    newer_and_off = {k for k in set(b) - set(a) if b[k] in (False, 0, None)}
    keys = sorted(k for k in set(a) | set(b)
                  if ".loop." not in f".{k}" and k not in newer_and_off and a.get(k) != b.get(k))
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys]


def train_loop(name: str, out_dir: str | Path, cfg: LoopConfig, step_fn: Callable[[int, int | None], dict],
               optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter],
               state: Callable[[], dict], load_state: Callable[[dict], None],
               resume: bool = False, dist: Dist | None = None, meta: dict | None = None) -> LoopResult:
    """Run `step_fn` for each step with the schedule; write `{name}.jsonl`, `{name}.png`, `{name}.ckpt`.

    `state()` returns the stage's tensors to checkpoint (its trainable parts) and
    `load_state(d)` puts them back. Each optimizer group's lr is its own "base_lr" (set
    from its "lr" the first time) times the schedule factor.
    """
    dist = dist or Dist()
    out_dir = Path(out_dir)
    ckpt_path = out_dir / f"{name}.ckpt"
    for g in optimizer.param_groups:
        g.setdefault("base_lr", g["lr"])
    start, total, elapsed0, ended = 0, cfg.steps, 0.0, False
    if resume and ckpt_path.is_file():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        differ = config_differences(ck.get("meta", {}), meta or {})
        if differ:
            raise ValueError(f"{ckpt_path}: written by a run with other settings ({'; '.join(differ[:6])}); "
                             "resume with the same recipe, or train into a fresh folder")
        load_state(ck["state"])
        optimizer.load_state_dict(ck["optimizer"])
        set_rng_state(ck["rng"])
        start, total, elapsed0 = ck["step"], ck["total"], ck["elapsed_s"]
        ended = ck.get("done", False)  # the loop had stopped (budget, schedule or stop_at), not crashed
        log.info("%s: resumed from %s at step %d of %s", name, ckpt_path, start, total)
    elif resume:
        log.info("%s: --resume but no %s; starting from step 0", name, ckpt_path)
    metrics = MetricsLog(out_dir / f"{name}.jsonl", enabled=dist.main, resume_step=start if start else None)

    def save(step: int, done: bool = False) -> None:
        if dist.main:
            atomic_torch_save({"step": step, "total": total, "elapsed_s": elapsed0 + time.perf_counter() - t0,
                               "state": state(), "optimizer": optimizer.state_dict(), "rng": rng_state(),
                               "loop": asdict(cfg), "meta": meta or {}, "done": done}, ckpt_path)
        dist.barrier()

    bar = None
    if cfg.progress and dist.main:
        from tqdm import tqdm
        bar = tqdm(total=total, initial=start, desc=name, dynamic_ncols=True, leave=True)
    t0 = time.perf_counter()
    window_t, window_n = t0, 0
    calib_t = None
    replan = cfg.steps is None and start < cfg.warmup
    step, stopped = start, False
    while (total is None or step < total) and (cfg.stop_at is None or step < cfg.stop_at):
        elapsed = elapsed0 + time.perf_counter() - t0
        # a fresh or crashed run takes at least one step; one its budget stopped takes none more
        if cfg.budget_s is not None and dist.from_main(float(elapsed > cfg.budget_s and (step > start or ended))):
            stopped = True
            log.info("%s: time budget %.0f s spent at step %d of %s", name, cfg.budget_s, step, total)
            break
        factor = lr_factor(step, total, cfg.warmup, cfg.min_lr_ratio)
        for g in optimizer.param_groups:
            g["lr"] = g["base_lr"] * factor
        optimizer.zero_grad(set_to_none=True)
        out = step_fn(step, total)
        grad_norm = None
        if cfg.grad_clip:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
        optimizer.step()
        step += 1
        now = time.perf_counter()
        window_n += out.get("samples", 0)
        if step == start + 1:
            calib_t = now  # the first step carries one-off costs; time the ones after it
        # budget mode: plan the total from the steps timed so far, first after calibrate_steps,
        # then again on the last warm-up step over the longer window (warm-up learning rates do
        # not depend on the total, so a replay with the final total repeats every one of them)
        if (total is None or (replan and step == cfg.warmup)) and step - start >= cfg.calibrate_steps + 1:
            per_step = (now - calib_t) / (step - start - 1)
            left = cfg.budget_s - (elapsed0 + now - t0)
            total = int(dist.from_main(step + max(0, int(left / per_step))))
            log.info("%s: %.2f s/step over %d steps -> %d steps in the %.0f s budget",
                     name, per_step, step - start - 1, total, cfg.budget_s)
            if bar is not None:
                bar.total = total
                bar.refresh()
        row = {"step": step, "loss": round(float(out["loss"]), 6), "lr": optimizer.param_groups[0]["lr"],
               "samples": out.get("samples", 0), "elapsed_s": round(elapsed0 + now - t0, 3)}
        if grad_norm is not None:
            row["grad_norm"] = round(grad_norm, 4)
        row.update({k: v for k, v in out.items() if k not in row})
        if step % cfg.log_every == 0 or step == total:
            rate = window_n / max(1e-9, now - window_t)
            row["samples_per_s"] = round(rate, 3)
            window_t, window_n = now, 0
            log.info("%s step %d/%s loss %.4f lr %.2e %.2f samples/s", name, step, total, row["loss"],
                     row["lr"], rate)
        metrics.write(row)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.1e}")
        if cfg.ckpt_every and step % cfg.ckpt_every == 0 and step != total:
            save(step)
    if bar is not None:
        bar.close()
    if total is None:  # stopped by the budget before calibration finished
        total = step
    save(step, done=True)
    elapsed = elapsed0 + time.perf_counter() - t0
    if dist.main:
        plot_curve(metrics.rows, out_dir / f"{name}.png", title=f"{name}: loss per step")
    return LoopResult(steps=step, total=total, elapsed_s=elapsed, rows=metrics.rows, stopped_by_budget=stopped)


# --- the loss curve, drawn with Pillow ---------------------------------------------------

def plot_curve(rows: list[dict], path: str | Path, key: str = "loss", title: str = "",
               size: tuple[int, int] = (800, 480)) -> None:
    """Raw `key` per step in light grey, its moving average in blue, axes with a few ticks."""
    from PIL import Image, ImageDraw

    pts = [(r["step"], r[key]) for r in rows if key in r and r[key] is not None and math.isfinite(r[key])]
    W, H = size
    left, right, top, bottom = 70, 20, 36, 44
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    d.text((left, 10), title or key, fill="black")
    if len(pts) < 2:
        d.text((left, H // 2), "not enough points", fill="black")
        img.save(path)
        return
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if y1 - y0 < 1e-12:
        y0, y1 = y0 - 1, y1 + 1
    pad = 0.05 * (y1 - y0)
    y0, y1 = y0 - pad, y1 + pad

    def to_px(x, y):
        return (left + (x - x0) / max(1e-12, x1 - x0) * (W - left - right),
                top + (y1 - y) / (y1 - y0) * (H - top - bottom))

    d.rectangle((left, top, W - right, H - bottom), outline="black")
    for i in range(5):
        y = y0 + (y1 - y0) * i / 4
        _, py = to_px(x0, y)
        d.line((left - 4, py, left, py), fill="black")
        d.line((left, py, W - right, py), fill=(235, 235, 235))
        d.text((4, py - 6), f"{y:.3g}", fill="black")
        x = x0 + (x1 - x0) * i / 4
        px, _ = to_px(x, y0)
        d.line((px, H - bottom, px, H - bottom + 4), fill="black")
        d.text((px - 12, H - bottom + 8), f"{x:.0f}", fill="black")
    d.text((W // 2 - 10, H - 18), "step", fill="black")
    d.line([to_px(x, y) for x, y in pts], fill=(190, 190, 190), width=1)
    k = max(1, len(pts) // 40)
    smooth = [(xs[i], sum(ys[max(0, i - k + 1):i + 1]) / len(ys[max(0, i - k + 1):i + 1])) for i in range(len(pts))]
    d.line([to_px(x, y) for x, y in smooth], fill=(30, 70, 220), width=2)
    img.save(path)
