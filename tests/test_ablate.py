"""The projector ablation runner on a tiny checkpoint: a few steps per run, every output written."""

import csv

import pytest
import torch
from PIL import Image

from llava_core.checkpoints.loader import load_pretrained
from llava_core.model.config import ConfigError
from llava_core.research.ablate import AblationConfig, markdown_table, run_sweep, summarize, with_projector
from llava_core.testing import make_tiny_checkpoint


@pytest.fixture(autouse=True)
def keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    # 64-px images in 16-px patches: a 4x4 grid, so synthetic samples render quickly
    return make_tiny_checkpoint(tmp_path_factory.mktemp("abl"), seed=2, vision=dict(image_size=64, patch_size=16),
                                image_seq_length=16)


def cfg(**kw):
    return AblationConfig(**{**dict(projectors=["linear", "avgpool2_mlp2x_gelu"], seeds=[0], budget_minutes=None, steps=3,
                                    eval_samples=4, batch_size=2, threads=1), **kw})


def test_sweep_writes_csv_table_and_plot_and_resumes(ckpt, tmp_path):
    out = tmp_path / "abl"
    rows = run_sweep(str(ckpt), out, cfg())
    with open(out / "ablation.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [(r["projector"], r["seed"]) for r in table] == [("linear", "0"), ("avgpool2_mlp2x_gelu", "0")]
    assert [int(r["tokens_per_image"]) for r in table] == [16, 4]  # 2x2 pooling of the 4x4 grid
    for r in table:
        assert int(r["steps"]) == 3
        assert 0.0 <= float(r["acc_overall"]) <= 1.0 and float(r["decode_tok_s"]) > 0
    assert int(table[0]["params"]) < int(table[1]["params"])  # one linear layer vs two
    md = (out / "ablation.md").read_text()
    assert "| linear | 1 | 16 |" in md and "| avgpool2_mlp2x_gelu | 1 | 4 |" in md
    assert Image.open(out / "ablation.png").size == (760, 480)
    assert (out / "runs" / "linear-s0" / "stage1.jsonl").is_file()

    # resume with a second seed: the first two rows are kept as they were, two new ones added
    again = run_sweep(str(ckpt), out, cfg(seeds=[0, 1]), resume=True)
    assert len(again) == 4 and [r["train_s"] for r in again[:2]] == [float(r["train_s"]) for r in rows]
    s = {x["projector"]: x for x in summarize(again)}
    assert s["linear"]["seeds"] == 2 and len(s["linear"]["acc_overall"]) == 2  # (mean, std)
    assert "± " in markdown_table(again)


def test_sweep_runs_seed_by_seed_so_a_cut_sweep_compares_projectors(ckpt, tmp_path, monkeypatch):
    from llava_core.research import ablate

    order = []

    def fake_run(base, processor, kind, seed, cfg, run_dir, resume):
        order.append((kind, seed))
        return {"projector": kind, "seed": seed, "params": 1, "tokens_per_image": 1, "steps": 1, "train_s": 0.0,
                "final_loss": 0.0, "ttft_s": 0.0, "decode_tok_s": 1.0, "acc_overall": 0.5}

    monkeypatch.setattr(ablate, "run_one", fake_run)
    run_sweep(str(ckpt), tmp_path / "abl", cfg(seeds=[0, 1]))
    assert order == [("linear", 0), ("avgpool2_mlp2x_gelu", 0), ("linear", 1), ("avgpool2_mlp2x_gelu", 1)]


def test_unknown_projector_fails_before_any_training(ckpt, tmp_path):
    with pytest.raises(ConfigError, match="nonsense"):
        run_sweep(str(ckpt), tmp_path / "x", cfg(projectors=["linear", "nonsense"]))
    assert not (tmp_path / "x" / "ablation.csv").exists()


def test_with_projector_shares_the_frozen_parts(ckpt):
    base = load_pretrained(ckpt)
    model = with_projector(base, "linear", seed=0)
    assert model.vision_tower is base.vision_tower and model.language_model is base.language_model
    assert model.projector is not base.projector and model.cfg.projector.kind == "linear"
    assert not any(p.is_meta for p in model.parameters())


def test_ablate_command_line(ckpt, tmp_path):
    import subprocess
    import sys

    def run(*args):
        return subprocess.run([sys.executable, "-m", "llava_core.cli.main", "ablate", *map(str, args)],
                              capture_output=True, text=True, timeout=300)

    out = tmp_path / "cli"
    ok = run(ckpt, "--projectors", "linear,resampler4", "--steps", "2", "--eval-samples", "2",
             "--batch-size", "2", "--threads", "1", "--out", out)
    assert ok.returncode == 0, ok.stderr
    assert "| resampler4 | 1 | 4 |" in ok.stdout and (out / "ablation.png").is_file()
    bad = run(ckpt, "--projectors", "linear,bogus9", "--steps", "2", "--out", tmp_path / "bad")
    assert bad.returncode == 1 and "bogus9" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    missing = run(tmp_path / "nowhere", "--projectors", "linear", "--out", tmp_path / "m")
    assert missing.returncode == 1 and "nowhere" in missing.stderr


def test_differences_pair_each_projector_with_the_first_seed_by_seed():
    from llava_core.research.ablate import paired_differences

    def row(kind, seed, acc):
        return {"projector": kind, "seed": seed, "acc_overall": acc, "tokens_per_image": 1, "params": 1,
                "train_s": 1.0, "decode_tok_s": 1.0}

    rows = [row("mlp2x_gelu", 0, 0.50), row("one_token", 0, 0.30), row("mlp2x_gelu", 1, 0.60),
            row("one_token", 1, 0.35), row("one_token", 2, 0.90)]  # seed 2 has no mlp2x_gelu run: left out
    (d,) = paired_differences(rows)
    assert d["projector"] == "one_token" and d["seeds"] == [0, 1]
    assert d["per_seed"] == pytest.approx([-20.0, -25.0]) and d["mean"] == pytest.approx(-22.5)
    md = markdown_table(rows)
    assert "less mlp2x_gelu's" in md and "- one_token: -22.5 (seeds 0, 1: -20.0, -25.0)" in md
