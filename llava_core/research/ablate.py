"""Projector ablations: one projector kind per run on the same frozen tower and decoder, each
scored per question type on the same synthetic test questions.

    llava-core ablate default --projectors linear,mlp2x_gelu,cabstractor,resampler16 --seeds 3 \\
        --out runs/ablation --budget-minutes 90 [--stage2] [--resume]

(The default model's tower gives a 7x7 patch grid: projectors that halve the grid, avgpool2_*, shuffle2_*
and ldp, need an even side and are refused there; cabstractor pools adaptively to 3x3.)

For each (projector, seed) the runner builds the model with a fresh projector of that kind
(its image-token count follows the projector), trains it as stage 1 of the recipe does
(tower and decoder frozen, loss on the answer tokens), optionally adds stage 2 (LoRA on a
copy of the decoder, projector still training), then answers `--eval-samples` test questions
and times greedy decoding. The training data is the instruction mix by default, since the
score is question answering; `--data caption` uses stage 1's caption mix instead.

Writes under --out:
    ablation.csv      one row per run (rewritten whole after each run; --resume skips its rows)
    ablation.md       mean ± std over seeds per projector: accuracy per type, parameters,
                      tokens per image, training time, decode speed
    ablation.png      overall accuracy against visual tokens per image, one point per projector
    runs/<projector>-s<seed>/   each run's metrics log, loss curve and checkpoint
"""

from __future__ import annotations

import copy
import csv
import io
import logging
import math
import statistics
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..atomic import atomic_path, atomic_write_text

log = logging.getLogger(__name__)

FIXED = ["projector", "seed", "params", "tokens_per_image", "steps", "train_s", "final_loss",
         "ttft_s", "decode_tok_s", "acc_overall"]


@dataclass
class AblationConfig:
    projectors: list[str] = field(default_factory=lambda: ["linear", "mlp2x_gelu"])
    seeds: list[int] = field(default_factory=lambda: [0])
    budget_minutes: float | None = 90.0  # the whole sweep; split evenly over the runs
    steps: int | None = None  # fixed optimizer steps per run (overrides the budget's step count)
    train_share: float = 0.75  # of each run's slice of the budget; the rest is evaluation and timing
    stage2: bool = False
    data: str = "instruct"  # or "caption": stage 1's mix
    eval_samples: int = 64
    batch_size: int = 8
    lr: float = 1e-3
    threads: int | None = 2

    def run_budget_s(self) -> float | None:
        if self.budget_minutes is None:
            return None
        return self.budget_minutes * 60 / (len(self.projectors) * len(self.seeds)) * self.train_share


# --- one run ------------------------------------------------------------------------------------

def with_projector(base, kind: str, seed: int):
    """A LlavaModel sharing `base`'s tower and decoder (frozen) with a fresh projector `kind`."""
    from ..model.llava import LlavaModel, projector_for

    cfg = config_with(base.cfg, kind)
    with torch.device("meta"):
        model = LlavaModel(cfg)  # a skeleton; its parts are replaced below
    model.vision_tower, model.language_model = base.vision_tower, base.language_model
    torch.manual_seed(seed)
    model.projector = projector_for(cfg).to(device=base.device, dtype=base.dtype)
    return model


def config_with(cfg, kind: str):
    """cfg with projector `kind`; the image-token count is derived anew (image_seq_length dropped)."""
    return replace(cfg, projector=replace(cfg.projector, kind=kind), image_seq_length=None)


def processor_for(processor, cfg):
    """The same tokenizer and image settings, expanding `<image>` to cfg's token count."""
    p = copy.copy(processor)
    p.cfg = cfg
    return p


def decode_speed(model, processor, new_tokens: int = 16, repeats: int = 3) -> tuple[float, float]:
    """(time to first token s, decode tok/s) for one test image and question, medians."""
    from ..data import DataConfig, make_sample
    from ..eval import sample_conversation
    from ..runtime.decode import SamplingParams, decode_loop, prefill

    s = make_sample("test", 0, DataConfig(image_size=model.cfg.vision.image_size))
    conversation = sample_conversation(s)[:1]  # the first question, with the image
    enc = processor(text=[processor.apply_chat_template(conversation, add_generation_prompt=True)],
                    images=[[s["image"]]])
    ids, px = enc["input_ids"].to(model.device), enc["pixel_values"].to(model.device, model.dtype)
    ttft, tps = [], []
    with torch.inference_mode():
        for _ in range(repeats + 1):
            cache = model.new_cache(1, ids.shape[1] + new_tokens)
            t0 = time.perf_counter()
            steps = decode_loop(model, prefill(model, ids, cache, px), cache,
                                SamplingParams(max_new_tokens=new_tokens), eos_token_ids=[])
            next(steps)
            t1 = time.perf_counter()
            n = sum(1 for _ in steps)
            ttft.append(t1 - t0)
            tps.append(n / (time.perf_counter() - t1))
    return statistics.median(ttft[1:]), statistics.median(tps[1:])


def run_one(base, processor, kind: str, seed: int, cfg: AblationConfig, run_dir: Path, resume: bool) -> dict:
    from ..eval import evaluate_synthetic
    from ..train.common import LoopConfig
    from ..train.stage1_align import Stage1Config, train_stage1

    model = with_projector(base, kind, seed)
    proc = processor_for(processor, model.cfg)
    loop = LoopConfig(steps=cfg.steps, budget_s=None if cfg.steps else cfg.run_budget_s(),
                      warmup=min(15, max(1, (cfg.steps or 60) // 4)), ckpt_every=50, progress=True)
    s1 = Stage1Config(batch_size=cfg.batch_size, lr=cfg.lr, seed=seed, loop=loop)
    if cfg.data == "instruct":
        from ..data import INSTRUCT_MIX
        s1.mix = dict(INSTRUCT_MIX)
    t = time.perf_counter()
    result = train_stage1(run_dir, model, proc, s1, resume=resume, threads=cfg.threads)
    steps, final_loss = result.steps, _tail_loss(result.rows)
    if cfg.stage2:
        from ..train.stage2_instruct import Stage2Config, train_stage2
        model.language_model = copy.deepcopy(base.language_model)  # LoRA goes into a copy
        s2 = Stage2Config(batch_size=cfg.batch_size, seed=seed, loop=replace(loop))
        result = train_stage2(run_dir, model, proc, s2, resume=resume, threads=cfg.threads)
        steps, final_loss = steps + result.steps, _tail_loss(result.rows)
    train_s = time.perf_counter() - t
    model.eval()
    res = evaluate_synthetic(model, proc, splits=("test",), n_per_split=cfg.eval_samples, seed=0)["test"]
    ttft, tps = decode_speed(model, proc)
    row = {"projector": kind, "seed": seed, "params": sum(p.numel() for p in model.projector.parameters()),
           "tokens_per_image": model.cfg.num_image_tokens, "steps": steps, "train_s": round(train_s, 1),
           "final_loss": round(final_loss, 4), "ttft_s": round(ttft, 4), "decode_tok_s": round(tps, 2),
           "acc_overall": round(res["overall"]["acc"], 4)}
    row.update({f"acc_{q}": round(v["acc"], 4) for q, v in res.items() if q != "overall"})
    return row


def _tail_loss(rows: list[dict]) -> float:
    tail = [r["loss"] for r in rows[-max(1, len(rows) // 10):]]
    return sum(tail) / len(tail) if tail else float("nan")


# --- the sweep ----------------------------------------------------------------------------------

def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [_numbers(r) for r in csv.DictReader(f)]


def _numbers(row: dict) -> dict:
    out = {}
    for k, v in row.items():
        try:
            out[k] = int(v) if k in ("seed", "params", "tokens_per_image", "steps") else float(v)
        except (TypeError, ValueError):
            out[k] = v
    return out


def write_rows(rows: list[dict], path: Path) -> None:
    keys = FIXED + sorted({k for r in rows for k in r} - set(FIXED))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys, restval="")
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def run_sweep(model_path: str, out_dir: str | Path, cfg: AblationConfig, resume: bool = False) -> list[dict]:
    """Train and score every (projector, seed); returns the CSV's rows."""
    from ..checkpoints.loader import load_pretrained
    from ..default.cache import resolve_model
    from ..model.config import ConfigError
    from ..model.llava import projector_for
    from ..model.processor import LlavaProcessor
    from ..train.common import set_trainable

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    folder = resolve_model(model_path)
    base = load_pretrained(folder, dtype=torch.float32)
    set_trainable(base, False)
    processor = LlavaProcessor.from_pretrained(folder)
    for kind in cfg.projectors:  # every name checked before hours are spent on the first
        try:
            c = config_with(base.cfg, kind)
            with torch.device("meta"):
                projector_for(c)
        except ConfigError as e:
            raise ConfigError(f"--projectors {kind}: {e}") from None
    csv_path = out / "ablation.csv"
    rows = read_rows(csv_path) if resume else []
    done = {(r["projector"], int(r["seed"])) for r in rows}
    # seed by seed, every projector in each: a sweep its session cuts short leaves comparable rows
    todo = [(k, s) for s in cfg.seeds for k in cfg.projectors if (k, s) not in done]
    log.info("ablation: %d runs to do, %d already in %s", len(todo), len(done), csv_path)
    for i, (kind, seed) in enumerate(todo):
        log.info("ablation run %d/%d: %s seed %d", i + 1, len(todo), kind, seed)
        rows.append(run_one(base, processor, kind, seed, cfg, out / "runs" / f"{kind}-s{seed}", resume))
        write_rows(rows, csv_path)
        write_report(rows, out)
    if not todo:
        write_report(rows, out)
    return rows


# --- the report ---------------------------------------------------------------------------------

def summarize(rows: list[dict]) -> list[dict]:
    """One dict per projector (first-seen order): mean and std over seeds of each number."""
    kinds = list(dict.fromkeys(r["projector"] for r in rows))
    keys = [k for k in FIXED[2:]] + sorted({k for r in rows for k in r if k.startswith("acc_")} - {"acc_overall"})
    out = []
    for kind in kinds:
        runs = [r for r in rows if r["projector"] == kind]
        s = {"projector": kind, "seeds": len(runs)}
        for k in keys:
            vals = [float(r[k]) for r in runs if isinstance(r.get(k), (int, float)) and math.isfinite(float(r[k]))]
            if vals:
                s[k] = (statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0)
        out.append(s)
    return out


def paired_differences(rows: list[dict]) -> list[dict]:
    """Each later projector's overall accuracy less the first projector's, seed by seed (a seed
    gives both runs the same training data; all runs answer the same test questions), over the
    seeds both have: [{"projector", "seeds", "per_seed": [points...], "mean"}]."""
    kinds = list(dict.fromkeys(r["projector"] for r in rows))
    acc = {(r["projector"], int(r["seed"])): 100 * float(r["acc_overall"]) for r in rows}
    out = []
    for kind in kinds[1:]:
        seeds = sorted(s for k, s in acc if k == kind and (kinds[0], s) in acc)
        if seeds:
            diffs = [acc[kind, s] - acc[kinds[0], s] for s in seeds]
            out.append({"projector": kind, "seeds": seeds, "per_seed": diffs, "mean": statistics.mean(diffs)})
    return out


def markdown_table(rows: list[dict]) -> str:
    summary = summarize(rows)
    qtypes = sorted({k for s in summary for k in s if k.startswith("acc_")} - {"acc_overall"})
    head = ["projector", "seeds", "tokens/image", "params", "overall"] + [q[4:] for q in qtypes] + \
           ["train s", "decode tok/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    pct = lambda s, k: f"{100 * s[k][0]:.1f} ± {100 * s[k][1]:.1f}" if k in s else "-"  # noqa: E731
    for s in summary:
        cells = [s["projector"], str(s["seeds"]), f"{s['tokens_per_image'][0]:.0f}", f"{s['params'][0]:,.0f}",
                 pct(s, "acc_overall")] + [pct(s, q) for q in qtypes] + \
                [f"{s['train_s'][0]:.0f}", f"{s['decode_tok_s'][0]:.1f} ± {s['decode_tok_s'][1]:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n\nAccuracy: exact match (%) on the synthetic test split, mean ± std over seeds.\n"
    diffs = paired_differences(rows)
    if diffs:
        first = summary[0]["projector"]
        text += f"\nOverall accuracy less {first}'s, seed by seed (points; the same data and questions per seed):\n\n"
        text += "".join(f"- {d['projector']}: {d['mean']:+.1f} (seeds {', '.join(map(str, d['seeds']))}: "
                        f"{', '.join(f'{x:+.1f}' for x in d['per_seed'])})\n" for d in diffs)
    return text


def plot(rows: list[dict], path: Path, size=(760, 480)) -> None:
    """Overall accuracy (mean ± std over seeds) against visual tokens per image (log2 axis)."""
    from PIL import Image, ImageDraw

    summary = [s for s in summarize(rows) if "acc_overall" in s]
    W, H = size
    left, right, top, bottom = 70, 30, 40, 50
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    d.text((left, 12), "projector ablation: accuracy vs visual tokens per image", fill="black")
    if summary:
        xs = [math.log2(max(1.0, s["tokens_per_image"][0])) for s in summary]
        x0, x1 = min(xs) - 0.5, max(xs) + 0.5
        ys = [100 * s["acc_overall"][0] for s in summary]
        y1 = min(100.0, max(ys) + 10)

        def px(x, y):
            return left + (x - x0) / (x1 - x0) * (W - left - right), top + (y1 - y) / y1 * (H - top - bottom)

        for i in range(6):  # y grid: 0 .. y1
            y = y1 * i / 5
            _, py = px(x0, y)
            d.line((left, py, W - right, py), fill=(235, 235, 235))
            d.text((8, py - 6), f"{y:.0f}%", fill="black")
        for t in range(math.ceil(x0), math.floor(x1) + 1):
            gx, _ = px(t, 0)
            d.line((gx, H - bottom, gx, H - bottom + 4), fill="black")
            d.text((gx - 8, H - bottom + 8), str(2 ** t), fill="black")
        d.text((W // 2 - 60, H - 20), "visual tokens per image (log scale)", fill="black")
        d.rectangle((left, top, W - right, H - bottom), outline="black")
        labels: dict[float, list[float]] = {}  # label heights taken at each token count
        for s, x, y in sorted(zip(summary, xs, ys), key=lambda t: -t[2]):  # top to bottom
            cx, cy = px(x, y)
            sd = 100 * s["acc_overall"][1]
            _, ylo = px(x, max(0.0, y - sd))
            _, yhi = px(x, y + sd)
            d.line((cx, ylo, cx, yhi), fill=(120, 120, 120), width=2)
            d.ellipse((cx - 5, cy - 5, cx + 5, cy + 5), fill=(30, 70, 220))
            name, taken = s["projector"], labels.setdefault(x, [])
            ty = max(cy - 14, taken[-1] + 13) if taken else cy - 14  # no label over another
            taken.append(ty)
            tx = cx + 8 if cx + 8 + d.textlength(name) < W - right else cx - 8 - d.textlength(name)
            d.text((tx, ty), name, fill="black")
    if not summary:
        d.rectangle((left, top, W - right, H - bottom), outline="black")
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")


def write_report(rows: list[dict], out: Path) -> None:
    atomic_write_text(out / "ablation.md", markdown_table(rows))
    plot(rows, out / "ablation.png")
