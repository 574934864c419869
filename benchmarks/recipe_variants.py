"""Variants of the default recipe, each pinned to the shipped run's optimizer steps, trained
from nothing, then scored on the synthetic suite: a recipe ablation in one command per variant.

    python benchmarks/recipe_variants.py run shipped --out runs/variants --device cuda --workers 3
    python benchmarks/recipe_variants.py run content_route --out runs/variants --device cuda --workers 3
    python benchmarks/recipe_variants.py table runs/variants
    python benchmarks/recipe_variants.py paired runs/variants/shipped/predictions.jsonl \
        runs/variants/content_route/predictions.jsonl
    python benchmarks/recipe_variants.py run shipped --out runs/s2 --from runs/r9 --steps-scale 2
    python benchmarks/recipe_variants.py sweep shipped,reader --seeds 0,1,2 --parallel 4 --out runs/v \
        --device cuda --workers 3     # every arm x seed, four runs at a time, then the table
    python benchmarks/recipe_variants.py sweep shipped,newline --base quick --seeds 0,1,2 --out runs/q

`run NAME` replays weights/training.json (the shipped run's step counts, times --steps-scale),
applies the variant's change, trains into OUT/NAME (`run_recipe`), and scores the parts with
`llava-core eval OUT/NAME/parts --suite synthetic --dtype float32` into OUT/NAME/eval.json
and predictions.jsonl. `table` prints each variant's overall and per-type test accuracy and
its right answers over test, held-out and shifted.

`--from RUN` trains stages 2 and 3 alone, from RUN/train's stage-0 tower and stage-1 projector (a
finished run's), into OUT/NAME_from-RUN: `--steps-scale` and `--seed` then apply to stages 2-3
only. The tower and projector are then the same in every arm, so arms differ less than full
trainings do; a variant that changes stage 0 or 1 is refused there.

`--base quick` starts from the quick recipe instead (stages 1-3 on weights/'s tower, fresh
projector and LoRA, ~24 minutes on 2 CPU cores): the test bed a CPU-only session can afford three
seeds an arm on. It keeps quick's 28-minute budget, which plans each stage's steps from its
measured speed, so a variant pays for slower steps in fewer of them; run the arms one after
another on an otherwise idle machine (`--parallel 1`), since other work on the cores takes
steps away. Variants that change stage 0 or set step counts are refused there.

A GPU run trains on the same batches as a CPU run but its arithmetic differs, so its numbers
are not the CPU run's: compare variants trained on the same device, with `shipped` as that
device's baseline. Two trainings of one recipe differed by 35-56 of 569 right answers
(weights/README.md), so run each arm with several `--seed`s before calling one better.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def content_route(r) -> None:
    """Stage-0 heads that ask each patch token for its own row and column (so a token's content
    says where it is), together with run r12's stage-2 mix (twice the position answers)."""
    r.stage0.aux_position = True
    r.stage2.mix.update(position=2.0, relation=1.5, ocr=0.5)


def position_heads(r) -> None:
    """The stage-0 position heads alone, the shipped stage-2 mix."""
    r.stage0.aux_position = True


def position_mix(r) -> None:
    """Run r12's stage-2 mix alone (position 2.0, relation 1.5, OCR 0.5)."""
    r.stage2.mix.update(position=2.0, relation=1.5, ocr=0.5)


def mirror_twins(r) -> None:
    """Stage 2 on mirror twins: each shape scene followed by its mirror image, "left" and
    "right" swapped in its text (data/mirror.py), so pairs differ only in the sides.
    Measured once from r6 (weights/README.md): no left/right separation, and within seed noise
    of the recipe overall."""
    r.stage2.mirror_twins = True


def reading_light(r) -> None:
    """A quarter of the stage-2 reading answers (OCR and documents 0.25, and OCR 0.25 in the
    easy mix): the shipped model reads almost nothing (OCR 0%, documents 12%), so the ~19% of
    stage 2's answers spent on reading go to the types it does learn."""
    r.stage2.mix.update(ocr=0.25, document=0.25)
    r.stage2.easy_mix.update(ocr=0.25)


def lora_r16(r) -> None:
    """LoRA rank 16 instead of 8, alpha 32 (the same alpha / r scale): stage 2 fits only ~2/3 of
    its own training answers exactly by its last steps, so the adapters' capacity may be what
    stops it."""
    r.stage2.lora_r, r.stage2.lora_alpha = 16, 32


def pos_projector(r) -> None:
    """The projector with a learned row and column embedding per image token (mlp2x_gelu_pos):
    the decoder reads a token's row from its place in the sequence but never its column
    (`llava-core token-order default`); this puts both in the token's content."""
    r.projector = "mlp2x_gelu_pos"


def reader(r) -> None:
    """A 2-block caption reader on the tower's patch tokens in stage 0 (Stage0Config.reader):
    the tower is asked to let a small causal transformer read each caption, OCR words and
    document rows spelt out, in the order the decoder will read the tokens."""
    r.stage0.reader = 2


def reader_reading_mix(r) -> None:
    """The reader, and three times stage 2's OCR and document scenes (OCR 3.0, documents 3.0):
    the shipped mix gives stage 2 about 350 word-reading answers in all, little to learn the
    decoder's side of reading from."""
    reader(r)
    r.stage2.mix.update(ocr=3.0, document=3.0)


def reader_patch16_shuffle(r) -> None:
    """The reader on a tower of 16-px patches (a 14x14 grid, 4x the tower's tokens), and the
    `shuffle2_mlp2x_gelu` projector, so that the decoder still sees 49 tokens, each carrying
    a 2x2 block of patches' features."""
    reader(r)
    r.vision = replace(r.vision, patch_size=16)
    r.projector = "shuffle2_mlp2x_gelu"


def reader_patch16(r) -> None:
    """The reader on a tower of 16-px patches, every one of its 196 tokens to the decoder through
    LLaVA-1.5's MLP (the llava-hf layout transformers loads; 4x the image tokens per answer)."""
    reader(r)
    r.vision = replace(r.vision, patch_size=16)


def pages(r) -> None:
    """Three tenths of each stage-0 batch are character pages (data/page.py): lines of random
    capitals and digits at the OCR scenes' type sizes, about four times the labelled glyphs of
    an OCR scene per image, for the per-patch character head."""
    r.stage0.pages = 0.3


def pages_reading_mix(r) -> None:
    """Pages in stage 0, and three times stage 2's OCR and document scenes: a tower that names
    glyphs still leaves the decoder only ~350 word-reading answers to learn to spell them from."""
    pages(r)
    r.stage2.mix.update(ocr=3.0, document=3.0)


def natural(r) -> None:
    """Stage 2 also answers the natural questions the instruct mix leaves out (`data/questions.py`):
    "What shapes are in the image?" (list 0.5), "Is there a star?" (a shape or colour alone,
    presence 0.5) and "What colour is the circle?" when there is none (absent 0.25). The README's
    first command asks the first of these; the shipped weights answer it with one shape."""
    r.stage2.mix.update(list=0.5, presence=0.5, absent=0.25)


def natural_light(r) -> None:
    """`natural` with a fifth of its absent weight (0.05): at 0.25 the model answered "There is no
    circle." to 12 colour questions whose circle was there (benchmarks/default_model.md)."""
    natural(r)
    r.stage2.mix["absent"] = 0.05


def long_pages(r) -> None:
    """The issue's larger budget (150 CPU minutes) spent where the measurements pointed: from the
    sixth weights' recipe, stage 0 three times as long with pages (the tower was what could not
    read, and pages teach glyphs twice as fast), stage 1 twice, stage 2 1.5x with twice the OCR
    and document scenes and `natural_light`'s questions. It became the seventh weights' recipe,
    so it now changes nothing (steps set, not scaled: 3,810 / 210 of 242 / 1,080)."""
    pages(r)
    natural_light(r)
    r.stage2.mix.update(ocr=2.0, document=2.0)
    for cfg, (steps, stop_at) in ((r.stage0, (3810, 3810)), (r.stage1, (242, 210)), (r.stage2, (1080, 1080))):
        cfg.loop = replace(cfg.loop, steps=steps, stop_at=stop_at)


def long_pages_cols(r) -> None:
    """`long_pages` with the projector's tokens sent twice, row-major and then column-major
    (`mlp2x_gelu_cols`, 98 image tokens): a column becomes a run of neighbouring places, which is
    how the decoder already reads a row. Its parameters are mlp2x_gelu's, so it can start stage 2
    from a `long_pages` run's stage-1 projector (`--from RUN --from-variant long_pages`)."""
    long_pages(r)
    r.projector = "mlp2x_gelu_cols"


def reading_frozen_tower(r) -> None:
    """Stage 3 (reading) with the tower frozen, as LLaVA keeps it: only the projector and LoRA
    learn to read (the eighth weights' stage 3 also trains the tower's last block)."""
    r.stage3.train_tower_blocks = 0


def no_reading(r) -> None:
    """No stage 3: the seventh weights' recipe."""
    r.stage3 = None


def reading_long(r) -> None:
    """Half of stage 2's steps given to stage 3 (1,080 / 800 -> 540 / 1,340: as many steps in
    all, each about as dear): stage 2 saturates (six variants of it tied), and 800 more stage-3
    steps from the shipped weights read twice the test words (4 -> 8 of 21; one training,
    benchmarks/default_model.md, 2026-12-07). Ready for three seeds on a GPU."""
    r.stage2.loop = replace(r.stage2.loop, steps=540, stop_at=540)
    r.stage3.loop = replace(r.stage3.loop, steps=1340, stop_at=1340)


def kind_questions(r) -> None:
    """Stages 2 and 3 also ask what kind of image it is and whether it holds text (qtype
    "kind", data/kind.py, weight 0.3: ~7% of the answers): two of the questions on the example
    images that the eighth weights miss ("Is there any text in the image?" -> "STORM", "What
    kind of image is this?" -> "red key") are asked by no other training question."""
    r.stage2.mix["kind"] = 0.3
    r.stage3.mix["kind"] = 0.3


def newline(r) -> None:
    """LLaVA-NeXT's learned `image_newline` after each row of the 7x7 grid (`mlp2x_gelu_newline`,
    56 image tokens): a token's column becomes its distance from the last newline before it, a
    relative place of the kind the rotary positions carry, from which the decoder already reads
    rows. Its projector has a tensor mlp2x_gelu's lacks, so it trains from stage 1 (from nothing,
    or `--base quick`), not `--from` a run's stage-1 projector."""
    r.projector = "mlp2x_gelu_newline"


VARIANTS = {"shipped": lambda r: None, "content_route": content_route, "position_heads": position_heads,
            "position_mix": position_mix, "mirror_twins": mirror_twins, "reading_light": reading_light,
            "lora_r16": lora_r16, "pos_projector": pos_projector,
            "reader": reader, "reader_reading_mix": reader_reading_mix,
            "reader_patch16_shuffle": reader_patch16_shuffle, "reader_patch16": reader_patch16, "pages": pages,
            "pages_reading_mix": pages_reading_mix, "natural": natural,
            "natural_light": natural_light, "long_pages": long_pages,
            "long_pages_cols": long_pages_cols, "reading_frozen_tower": reading_frozen_tower,
            "no_reading": no_reading, "reading_long": reading_long, "kind_questions": kind_questions,
            "newline": newline}


def variant_recipe(name: str, steps_scale: float = 1.0, seed: int | None = None, base: str = "default"):
    if name not in VARIANTS:
        raise SystemExit(f"unknown variant {name!r}; choose from {sorted(VARIANTS)}")
    if base == "quick":
        return quick_variant(name, steps_scale, seed)
    from llava_core.train.recipe import default_recipe

    recipe = default_recipe().replay(json.loads((ROOT / "weights" / "training.json").read_text()))
    VARIANTS[name](recipe)
    for cfg in recipe.stage_configs().values():
        loop = cfg.loop
        cfg.loop = replace(loop, steps=max(1, round(loop.steps * steps_scale)),
                           stop_at=max(1, round(loop.stop_at * steps_scale)),
                           warmup=min(loop.warmup, max(1, round(loop.steps * steps_scale)) - 1))
    if seed is not None:
        recipe.set_seed(seed)  # after the replay, which refuses seeds other than the recorded one
    recipe.probe, recipe.eval_samples = False, 0
    return recipe


def quick_variant(name: str, steps_scale: float, seed: int | None):
    """The quick recipe (its budget, weights/'s tower) with variant `name` applied."""
    from llava_core.train.recipe import quick_recipe

    recipe = quick_recipe()
    loops = {s: cfg.loop for s, cfg in recipe.stage_configs().items()}
    try:
        VARIANTS[name](recipe)
    except AttributeError as e:  # the variant reached for recipe.stage0, which is None here
        raise SystemExit(f"--base quick: variant {name!r} changes stage 0, which the quick recipe does not "
                         f"train (its tower is weights/'s): {e}") from e
    if steps_scale != 1 or any(recipe.stage_configs()[s].loop != loop for s, loop in loops.items()):
        raise SystemExit(f"--base quick plans each stage's steps from its {recipe.budget_minutes:g}-minute budget; "
                         f"variant {name!r} or --steps-scale {steps_scale:g} sets them")
    if seed is not None:
        recipe.set_seed(seed)
    recipe.probe, recipe.eval_samples = False, 0
    return recipe


STAGE2_INPUTS = ("stage0_visual.safetensors", "stage1_projector.safetensors")


def start_from(run: Path, out: Path, name: str, base: str = "shipped") -> None:
    """Put RUN's stage-0 tower and stage-1 projector where run_recipe(out, stages=(2, 3)) reads
    them; refuse a variant that differs from `base` (the variant RUN was trained with) anywhere
    but in stages 2-3 (its tower, projector or stages 0-1 would not be what RUN trained), except a
    projector kind whose parameters are the base's (mlp2x_gelu -> mlp2x_gelu_cols)."""
    from llava_core.train.common import config_differences
    from llava_core.train.recipe import _jsonable

    was, now = variant_recipe(base), variant_recipe(name)
    differ = [d for d in config_differences(_jsonable(asdict(was)), _jsonable(asdict(now)))
              if not d.startswith(("stage2.", "stage3"))
              and not (d.startswith("projector:") and same_projector_parameters(was, now))]
    if differ:
        raise SystemExit(f"--from: variant {name!r} changes stage 0 or 1 of {base!r}, which --from does not run "
                         f"({'; '.join(differ)})")
    missing = [f for f in STAGE2_INPUTS if not (run / "train" / f).is_file()]
    if missing:
        raise SystemExit(f"--from {run}: no {', '.join(missing)} under {run / 'train'}")
    (out / "train").mkdir(parents=True, exist_ok=True)
    for f in STAGE2_INPUTS:
        shutil.copyfile(run / "train" / f, out / "train" / f)


def same_projector_parameters(a, b) -> bool:
    """Do recipes a and b build projectors with the same tensor names and shapes (so that one's
    stage-1 projector loads into the other's)? The text width does not change the answer."""
    from llava_core.model.config import ProjectorConfig
    from llava_core.model.projector import build_projector

    def shapes(r) -> dict:
        proj = build_projector(ProjectorConfig(kind=r.projector), r.vision.hidden_size, 8, r.vision.num_patches)
        return {k: v.shape for k, v in proj.state_dict().items()}

    return shapes(a) == shapes(b)


def run(args) -> None:
    from llava_core.train.recipe import STAGES, run_recipe

    if args.base == "quick" and args.start is not None:
        raise SystemExit("--from and --base quick: the quick recipe takes its tower from weights/, not from a run")
    name = ("quick-" if args.base == "quick" else "") + args.name
    name += "" if args.steps_scale == 1 else f"_x{args.steps_scale:g}"
    name += "" if args.start is None else f"_from-{args.start.name}"
    out = args.out / (name if args.seed is None else f"{name}_seed{args.seed}")
    recipe = variant_recipe(args.name, args.steps_scale, args.seed, args.base)
    recipe.threads = args.threads or recipe.threads  # how a step computes, not what: not a variant
    stages = STAGES
    if args.start is not None:
        start_from(args.start, out, args.name, args.from_variant)
        stages = (2, 3)
    summary = run_recipe(out, recipe, stages=stages, device=args.device, workers=args.workers, resume=args.resume)
    print(f"{out.name}: trained in {summary['elapsed_s']:.0f} s on {summary['device']}", flush=True)
    subprocess.run([sys.executable, "-m", "llava_core.cli.main", "eval", str(out / "parts"), "--suite", "synthetic",
                    "-n", str(args.n), "--device", args.device, "--dtype", "float32",
                    "--out", str(out / "eval.json"), "--predictions", str(out / "predictions.jsonl")],
                   check=True, cwd=ROOT)


def sweep(args) -> None:
    """`run` for every arm and seed, `--parallel` at a time (each in its own process, its output in
    OUT/logs/ARM_seedS.log); runs already scored are skipped, interrupted ones resumed. Then the table.
    Seed by seed (every arm's seed 0 before any seed 1), so that a sweep cut short still pairs its arms."""
    import time

    arms = [a for a in args.arms.split(",") if a]
    unknown = [a for a in arms if a not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {sorted(VARIANTS)}")
    jobs = [(a, int(s)) for s in args.seeds.split(",") for a in arms]
    for a in arms:
        variant_recipe(a, base=args.base)  # a variant the base refuses stops the sweep before any run
    prefix = "quick-" if args.base == "quick" else ""
    (args.out / "logs").mkdir(parents=True, exist_ok=True)
    todo = [(a, s) for a, s in jobs if not (args.out / f"{prefix}{a}_seed{s}" / "eval.json").is_file()]
    running, failed = [], []
    while todo or running:
        while todo and len(running) < args.parallel:
            a, s = todo.pop(0)
            log = open(args.out / "logs" / f"{prefix}{a}_seed{s}.log", "w")
            cmd = [sys.executable, __file__, "run", a, "--seed", str(s), "--out", str(args.out), "--device",
                   args.device, "--workers", str(args.workers), "-n", str(args.n), "--resume", "--base", args.base]
            cmd += ["--threads", str(args.threads)] if args.threads else []
            running.append(((a, s), subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT), log))
            print(f"started {a} seed {s}", flush=True)
        time.sleep(5)
        for job in [j for j in running if j[1].poll() is not None]:
            running.remove(job)
            job[2].close()
            print(f"{job[0][0]} seed {job[0][1]}: {'done' if job[1].returncode == 0 else 'FAILED'}", flush=True)
            if job[1].returncode:
                failed.append(job[0])
    table(args)
    if failed:
        raise SystemExit(f"failed runs (see {args.out / 'logs'}): {failed}")


def table(args) -> None:
    """Accuracy in % per split (overall) and per question type on test; `right`: answers right
    over the three splits (the count the model card compares runs by)."""
    splits = ("test", "heldout", "shifted")
    results = {f.parent.name: json.loads(f.read_text()) for f in sorted(args.out.glob("*/eval.json"))}
    if not results:
        raise SystemExit(f"{args.out}: no */eval.json")
    qtypes = [q for q in next(iter(results.values()))["test"] if q != "overall"]
    print("variant".ljust(22) + "".join(s.rjust(8) for s in splits) + "   right "
          + " ".join(q[:7].rjust(7) for q in qtypes))
    for name, res in results.items():
        right = sum(round(res[s]["overall"]["acc"] * res[s]["overall"]["n"]) for s in splits)
        print(name.ljust(22) + "".join(f"{100 * res[s]['overall']['acc']:8.1f}" for s in splits) + f"{right:8d} "
              + " ".join(f"{100 * res['test'][q]['acc']:7.1f}" if q in res["test"] else "      -" for q in qtypes))
    arms: dict[str, list[dict]] = {}
    for name, res in results.items():
        arms.setdefault(name.rsplit("_seed", 1)[0] if "_seed" in name else name, []).append(res)
    if any(len(runs) > 1 for runs in arms.values()):
        print("\narm (seeds): mean ± std".ljust(22) + "".join(s.rjust(14) for s in splits) + "right".rjust(15)
              + " " + " ".join(q[:7].rjust(7) for q in qtypes) + "  (per type: test, mean)")
        for arm, runs in arms.items():
            cells = [_mean_std([100 * r[s]["overall"]["acc"] for r in runs]) for s in splits]
            right = _mean_std([sum(round(r[s]["overall"]["acc"] * r[s]["overall"]["n"]) for s in splits) for r in runs])
            types = [[100 * r["test"][q]["acc"] for r in runs if q in r["test"]] for q in qtypes]
            print(f"{arm} ({len(runs)})".ljust(22) + "".join(c.rjust(14) for c in cells) + right.rjust(15) + " "
                  + " ".join(f"{sum(t) / len(t):7.1f}" if t else "      -" for t in types))


def _mean_std(values: list[float]) -> str:
    m = sum(values) / len(values)
    sd = (sum((v - m) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
    return f"{m:.1f} ± {sd:.1f}"


def paired(args) -> None:
    """Question by question, B against A (captions left out, as in `overall`): how many B gets
    right that A gets wrong and the reverse, and the two-sided sign test's p on those."""
    from llava_core.eval import CAPTION_QTYPES
    from llava_core.train.common import read_jsonl

    a, b = ({(r["split"], r["index"]): r for r in read_jsonl(f)} for f in (args.a, args.b))
    keys = [k for k in a if k in b and a[k]["qtype"] not in CAPTION_QTYPES]
    if not keys:
        raise SystemExit(f"{args.a} and {args.b} share no questions")
    better = sum(b[k]["score"] > a[k]["score"] for k in keys)
    worse = sum(b[k]["score"] < a[k]["score"] for k in keys)
    n = better + worse
    p = min(1.0, 2 * sum(math.comb(n, i) for i in range(min(better, worse) + 1)) / 2 ** n) if n else 1.0
    print(f"{len(keys)} questions: B right where A wrong {better}, A right where B wrong {worse}, "
          f"sign test p = {p:.3f}")


def reading(args) -> None:
    """Per predictions file and split, the "read the word" answers (task ocr_read, multi-turn
    ones included): how many, how many read whole (exact match), and the mean share of
    characters read (eval.char_accuracy: 1 - edit distance / length)."""
    from llava_core.eval import char_accuracy
    from llava_core.train.common import read_jsonl

    for f in args.predictions:
        rows = [r for r in read_jsonl(f) if r["task"] == "ocr_read"]
        if not rows:
            raise SystemExit(f"{f}: no ocr_read answers")
        for split in dict.fromkeys(r["split"] for r in rows):
            rs = [r for r in rows if r["split"] == split]
            chars = 100 * sum(char_accuracy(r["prediction"], r["answer"]) for r in rs) / len(rs)
            whole = sum(r["score"] == 1.0 for r in rs)
            print(f"{f} {split}: {len(rs)} words, {whole} read whole, characters {chars:.1f}%")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="train one variant and score it")
    r.add_argument("name", choices=sorted(VARIANTS))
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--device", default="cpu")
    r.add_argument("--workers", type=int, default=0, help="processes drawing stage 0's batches ahead")
    r.add_argument("--steps-scale", type=float, default=1.0, help="times the shipped run's steps in every stage")
    r.add_argument("--seed", type=int, help="every stage's seed (default: the shipped run's, 0)")
    r.add_argument("--from", dest="start", type=Path, metavar="RUN",
                   help="train stages 2-3 alone, from RUN/train's stage-0 tower and stage-1 projector")
    r.add_argument("--from-variant", default="shipped", metavar="NAME",
                   help="the variant RUN was trained with (default: shipped)")
    r.add_argument("-n", type=int, default=200, help="questions per split")
    r.add_argument("--resume", action="store_true", help="continue an interrupted run in OUT/NAME")
    r.add_argument("--threads", type=int, help="torch threads per run (default: the recipe's, 2)")
    r.add_argument("--base", choices=("default", "quick"), default="default",
                   help="the recipe the variant changes: the shipped run's steps, or quick's budget")
    r.set_defaults(func=run)
    w = sub.add_parser("sweep", help="run arms x seeds, several at a time, then print the table")
    w.add_argument("arms", help="comma-separated variant names")
    w.add_argument("--seeds", default="0,1,2")
    w.add_argument("--parallel", type=int, default=1, help="runs at once")
    w.add_argument("--out", type=Path, required=True)
    w.add_argument("--device", default="cpu")
    w.add_argument("--workers", type=int, default=0, help="per run: processes drawing stage 0's batches ahead")
    w.add_argument("-n", type=int, default=200, help="questions per split")
    w.add_argument("--threads", type=int, help="torch threads per run (default: the recipe's, 2)")
    w.add_argument("--base", choices=("default", "quick"), default="default",
                   help="the recipe the variants change: the shipped run's steps, or quick's budget")
    w.set_defaults(func=sweep)
    t = sub.add_parser("table", help="print the scores of every variant under OUT")
    t.add_argument("out", type=Path)
    t.set_defaults(func=table)
    c = sub.add_parser("paired", help="compare two predictions.jsonl question by question")
    c.add_argument("a", type=Path)
    c.add_argument("b", type=Path)
    c.set_defaults(func=paired)
    g = sub.add_parser("reading", help="words read whole and characters read, per predictions.jsonl and split")
    g.add_argument("predictions", type=Path, nargs="+")
    g.set_defaults(func=reading)
    args = p.parse_args()
    import logging
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args.func(args)


if __name__ == "__main__":
    main()
