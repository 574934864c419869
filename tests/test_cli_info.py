"""`llava-core info`, run as a user runs it (a subprocess), checked against transformers' model.

Every subprocess starts at once in the `results` fixture and the tests read their outcome. A
command that loads weights pays ~6 s of imports, so the broken-weights cases run in-process
through `main()` instead (a traceback there would fail the test just the same).
"""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from llava_core.testing import make_tiny_checkpoint

SCRIPT = Path(sys.executable).parent / "llava-core"  # the console script pyproject.toml installs
MODULE = [sys.executable, "-m", "llava_core.cli.main"]


@pytest.fixture(scope="module")
def tied_ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tied"), seed=2,
                                text={"tie_word_embeddings": True}, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def broken(tmp_path_factory, tiny_ckpt):
    """Copies of the tiny checkpoint, each broken one way."""
    root = tmp_path_factory.mktemp("broken")
    out = {}
    for name in ("truncated", "mismatch", "bad_config", "no_config"):
        out[name] = root / name
        shutil.copytree(tiny_ckpt, out[name])
    f = out["truncated"] / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-999])
    f = out["mismatch"] / "model.safetensors"
    sd = load_file(str(f))
    sd["multi_modal_projector.linear_1.bias"] = torch.zeros(5)
    sd["extra.weight"] = sd.pop("language_model.model.norm.weight")
    save_file(sd, str(f), metadata={"format": "pt"})
    cfg = out["bad_config"] / "config.json"
    cfg.write_text(cfg.read_text().replace('"hidden_act": "silu"', '"hidden_act": "gelu"'))
    (out["no_config"] / "config.json").unlink()
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory, tiny_ckpt, tied_ckpt, broken):
    """Run every command concurrently; {name: (returncode, stdout, stderr)}."""
    commands = {
        "json": MODULE + ["info", str(tiny_ckpt), "--json"],
        "table_tied_bf16": ([str(SCRIPT)] if SCRIPT.exists() else MODULE)
        + ["info", str(tied_ckpt), "--dtype", "bfloat16"],
        "missing_folder": MODULE + ["info", str(tmp_path_factory.getbasetemp() / "no_such_checkpoint")],
        "no_arguments": MODULE + ["info"],
        **{name: MODULE + ["info", str(broken[name])] for name in ("bad_config", "no_config")},
    }
    procs = {name: subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, argv in commands.items()}
    return {name: (p.wait(timeout=120), p.stdout.read(), p.stderr.read()) for name, p in procs.items()}


def hf_counts(folder) -> dict:
    """Parameter counts per component of transformers' model on the same files."""
    from transformers import LlavaForConditionalGeneration

    hf = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)

    def count(*modules):  # a tensor shared between modules (tied embeddings) counts once
        return sum(p.numel() for p in {id(p): p for m in modules for p in m.parameters()}.values())
    return {"vision_tower": count(hf.model.vision_tower), "projector": count(hf.model.multi_modal_projector),
            "decoder": count(hf.model.language_model, hf.lm_head), "total": count(hf)}


def test_info_json_counts_match_transformers(results, tiny_ckpt, hf_model):
    code, out, err = results["json"]
    assert code == 0, err
    info = json.loads(out)
    assert info["parameters"] == hf_counts(tiny_ckpt)
    assert info["parameters"]["total"] == sum(p.numel() for p in hf_model.parameters())
    c = hf_model.config
    assert info["image_tokens_per_image"] == 576
    assert info["vocab_size"] == c.text_config.vocab_size
    assert info["context_length"] == c.text_config.max_position_embeddings
    assert info["image_token_index"] == c.image_token_index
    assert (info["dtype"], info["stored_dtype"]) == ("float32", "float32")
    assert info["weight_bytes"] == 4 * info["parameters"]["total"]


def test_info_table_for_tied_bf16(results, tied_ckpt):
    code, out, err = results["table_tied_bf16"]
    assert code == 0, err
    counts = {name: int(n.replace(",", "")) for name, n in
              re.findall(r"^(vision tower|projector|decoder|total)\s+([\d,]+) parameters", out, re.M)}
    want = hf_counts(tied_ckpt)
    assert counts == {"vision tower": want["vision_tower"], "projector": want["projector"],
                      "decoder": want["decoder"], "total": want["total"]}
    assert re.search(r"^dtype\s+bfloat16 on cpu \(stored as float32\)", out, re.M)
    assert "tied embeddings" in out
    assert re.search(r"^image tokens\s+576 per image", out, re.M)
    assert re.search(r"^vocabulary\s+416 tokens", out, re.M)
    assert re.search(r"^context\s+2,048 tokens", out, re.M)


def assert_one_line_error(code, out, err, fragments):
    assert code == 1
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llava-core: error: "), err
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.mark.parametrize("name, fragments", [
    ("missing_folder", ["no_such_checkpoint", "no such checkpoint folder"]),
    ("bad_config", ["config.json", "text_config.hidden_act"]),
    ("no_config", ["config.json"]),
])
def test_bad_input_is_one_line_without_traceback(results, name, fragments):
    assert_one_line_error(*results[name], fragments)


@pytest.mark.parametrize("name, fragments", [
    ("truncated", ["model.safetensors", "truncated"]),
    ("mismatch", ["1 missing", "1 unexpected", "1 shape mismatches", "-v lists them"]),
])
def test_broken_weights_are_one_line_in_process(capsys, broken, name, fragments):
    from llava_core.cli.main import main
    code = main(["info", str(broken[name])])
    assert_one_line_error(code, *capsys.readouterr(), fragments)


def test_verbose_lists_the_whole_report(capsys, broken):
    from llava_core.cli.main import main
    assert main(["-v", "info", str(broken["mismatch"])]) == 1
    err = capsys.readouterr().err
    assert "multi_modal_projector.linear_1.bias (in model.safetensors): checkpoint [5]" in err
    assert "extra.weight (in model.safetensors)" in err


def test_usage_error_exits_2(results):
    code, _, err = results["no_arguments"]
    assert code == 2 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and "error:" in err and "--help" in err


def test_main_returns_exit_code_in_process(capsys, tmp_path):
    from llava_core.cli.main import main
    assert main(["info", str(tmp_path / "nothing_here")]) == 1
    assert capsys.readouterr().err.startswith("llava-core: error: ")
