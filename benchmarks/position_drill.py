"""Position drill: can the decoder learn left from right through a given projector?

The default model reads a token's row from its place in the sequence and its column not at
all (`llava-core token-order default`). This drill asks, cheaply, whether a projector design
changes that: from the shipped tower and projector (weights/parts.safetensors; a projector
that adds tensors starts them as its own init says), fresh LoRA adapters and the projector
learn position and relation questions alone, with the shipped stage-2 settings, for a fixed
number of steps. It then scores position questions by form (left/right, top/bottom, the
nine-way "where") and relation questions on the test, held-out and shifted splits, and
measures the token-order separations.

    python benchmarks/position_drill.py --arm mlp2x_gelu --steps 150 --out runs/drill
    python benchmarks/position_drill.py --arm mlp2x_gelu_pos --steps 150 --out runs/drill
    python benchmarks/position_drill.py --arm mlp2x_gelu --lora shipped --steps 0   # the shipped model
    python benchmarks/position_drill.py --arm mlp2x_gelu_pos --lora shipped --steps 300 --compile auto

`--lora shipped` keeps the parts' LoRA adapters and trains them on (the shipped model already
reads rows from the token order: does a column signal then come quickly?); `--save-parts` also
writes the trained model to OUT/ARM/parts for `llava-core eval`. Each arm writes
OUT/ARM[_lora-shipped][_seedK]/ (stage2 log and checkpoints, `--resume` continues) and
drill.json. A full training is not what this measures: one seed and a narrow mix, so read
big differences only.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MIX = {"position": 1.0, "relation": 1.0}


def build(arm: str, parts: Path, lora: str = "fresh"):
    """The default model with projector `arm`, the tower and every projector tensor the shipped
    parts have that `arm` has too; tensors only `arm` has keep their initialisation. lora
    "shipped": the parts' LoRA adapters too, unmerged, to train on (else stage 2 adds fresh ones)."""
    import torch

    from llava_core.default.build import build_default_model
    from llava_core.default.parts import load_parts
    from llava_core.train.recipe import default_recipe

    shipped = load_parts(parts)
    r = default_recipe()
    model = build_default_model(r.vision, r.feature_layer, r.strategy, arm, torch.float32, seed=0)
    model.vision_tower.load_state_dict(shipped.vision_tower.state_dict(), strict=True)
    own = model.projector.state_dict()
    given = {k: v for k, v in shipped.projector.state_dict().items() if k in own and own[k].shape == v.shape}
    out = model.projector.load_state_dict(given, strict=False)
    if not given or out.unexpected_keys:
        raise SystemExit(f"--arm {arm}: the shipped projector's tensors do not fit it ({sorted(own)})")
    if lora == "shipped":
        from llava_core.train.stage2_instruct import add_lora_from_parts
        add_lora_from_parts(model.language_model, parts, r.stage2)
    return model.eval(), sorted(out.missing_keys)


def form(row: dict) -> str:
    if row["qtype"] != "position":
        return row["qtype"]
    return {"position_lr": "left/right", "position_tb": "top/bottom"}.get(row["task"], "where")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arm", required=True, help="projector kind, e.g. mlp2x_gelu or mlp2x_gelu_pos")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n", type=int, default=120, help="questions per split")
    ap.add_argument("--parts", type=Path, default=ROOT / "weights")
    ap.add_argument("--out", type=Path, default=Path("runs/drill"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--compile", default="off", choices=("off", "auto"),
                    help="the decoder's blocks through torch.compile (the first drills ran eager)")
    ap.add_argument("--save-parts", action="store_true", help="also write the trained model to OUT/ARM/parts")
    ap.add_argument("--lora", choices=("fresh", "shipped"), default="fresh",
                    help="fresh adapters (the drill as first run), or the parts' own to train on")
    args = ap.parse_args(argv)
    if args.save_parts and args.steps == 0:
        ap.error("--save-parts with --steps 0: nothing is trained, the parts are --parts already")

    from llava_core.data import DataConfig
    from llava_core.default.build import make_default_processor
    from llava_core.eval import evaluate_synthetic
    from llava_core.research.token_order import position_route
    from llava_core.train.common import LoopConfig
    from llava_core.train.recipe import default_recipe
    from llava_core.train.stage2_instruct import train_stage2

    name = args.arm + ("_lora-shipped" if args.lora == "shipped" else "")
    out = args.out / (name if args.seed == 0 else f"{name}_seed{args.seed}")
    model, fresh = build(args.arm, args.parts, args.lora)
    processor = make_default_processor(model.cfg)
    shipped = default_recipe().replay(json.loads((ROOT / "weights" / "training.json").read_text())).stage2
    cfg = replace(shipped, mix=dict(MIX), easy_mix=dict(MIX), curriculum=0.0, seed=args.seed,
                  compile="auto" if args.compile == "auto" else False,
                  loop=LoopConfig(steps=args.steps, warmup=10, ckpt_every=25))
    if args.steps > 0:  # 0: score the starting point only
        _, lcfg = train_stage2(out, model, processor, cfg, resume=args.resume, threads=args.threads)
        if args.save_parts:  # for the whole suite: llava-core eval OUT/ARM/parts --suite synthetic
            from llava_core.default.parts import save_parts
            from llava_core.train.stage2_instruct import lora_state
            save_parts(model, out / "parts", lora_state(model.language_model), lcfg)
    out.mkdir(parents=True, exist_ok=True)

    rows: list = []
    data = DataConfig(image_size=model.cfg.vision.image_size, mix=dict(MIX))
    evaluate_synthetic(model, processor, n_per_split=args.n, data_config=data, predictions=rows)
    table: dict = {}
    for r in rows:
        t = table.setdefault(form(r), {}).setdefault(r["split"], [0, 0])
        t[0] += int(r["score"] == 1)
        t[1] += 1
    route = position_route(model, processor, n=30, modes=("none", "cols_reversed"))
    result = {"arm": args.arm, "lora": args.lora, "steps": args.steps, "seed": args.seed, "fresh_tensors": fresh,
              "right": table, "separation": {m: {a: v["separation"] for a, v in row.items()}
                                             for m, row in route.items()}}
    (out / "drill.json").write_text(json.dumps(result, indent=1))
    print(f"{args.arm} seed {args.seed}, {args.steps} steps (fresh: {fresh or 'none'})")
    for f, splits in sorted(table.items()):
        print(f"  {f:11s} " + "  ".join(f"{s} {k}/{n}" for s, (k, n) in splits.items()))
    for m, row in result["separation"].items():
        print(f"  separation, tokens {m}: " + ", ".join(f"{a} {v:+.2f}" for a, v in row.items()))


if __name__ == "__main__":
    main()
