"""The command-line jobs, run as a user runs them: in a subprocess."""

import json
import subprocess
import sys

import pytest
from PIL import Image

from llava_core.checkpoints.loader import load_pretrained
from llava_core.cli.caption import read_done
from llava_core.cli.common import TASK_NAMES
from llava_core.model.processor import LlavaProcessor
from llava_core.runtime.generate import TASKS, generate, task_prompt


def run(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "llava_core.cli.main", *map(str, args)], input=stdin,
                          capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("images")
    for i, colour in enumerate(["red", "green", "blue", "yellow", "purple"]):
        Image.new("RGB", (200 + 40 * i, 180), colour).save(d / f"img{i}.png")
    (d / "sub").mkdir()
    Image.new("RGB", (100, 300), "black").save(d / "sub" / "tall.jpg")
    (d / "broken.png").write_bytes(b"not a png at all")
    return d


@pytest.fixture(scope="module")
def reference(tiny_ckpt):
    return load_pretrained(tiny_ckpt), LlavaProcessor.from_pretrained(tiny_ckpt)


def test_task_names_match_the_assistant():
    assert set(TASK_NAMES) == set(TASKS)


def test_ask_streams_the_greedy_answer(tiny_ckpt, images, reference):
    r = run("ask", tiny_ckpt, images / "img0.png", "What colour is it?", "--max-new-tokens", 6)
    assert r.returncode == 0, r.stderr
    model, processor = reference
    want = generate(model, processor, "What colour is it?", str(images / "img0.png"), max_new_tokens=6)
    assert r.stdout.strip() == want and want


def test_ask_task_prompt_and_stop_string(tiny_ckpt, images, reference):
    model, processor = reference
    full = generate(model, processor, task_prompt("ocr"), str(images / "img1.png"), max_new_tokens=8)
    stop = full[2:4]  # cut the answer where this text first appears
    r = run("ask", tiny_ckpt, images / "img1.png", "--task", "ocr", "--max-new-tokens", 8, "--stop", stop)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == full[:full.find(stop)].strip()


@pytest.mark.parametrize("args, message", [
    (["ask", "{ckpt}", "{img}", "   "], "needs a question"),
    (["ask", "/no/such/model", "{img}", "q"], "no such checkpoint folder"),
    (["ask", "{ckpt}", "/no/such/image.png", "q"], "no such image file"),
    (["ask", "{ckpt}", "{broken}", "q"], "not a readable image"),
    (["ask", "{ckpt}", "{img}", "q", "--device", "tpu"], "is not a device"),
    (["ask", "{ckpt}", "{img}", "q", "--dtype", "float8"], "invalid choice"),
    (["ask", "{ckpt}", "{img}", "q", "--top-p", "0"], "top_p"),
    (["caption", "{ckpt}", "/no/such/folder", "--out", "x.jsonl"], "no such folder"),
])
def test_bad_input_is_one_line_and_nonzero(tiny_ckpt, images, args, message):
    args = [a.format(ckpt=tiny_ckpt, img=images / "img0.png", broken=images / "broken.png") for a in args]
    r = run(*args)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_piped_multi_turn_chat(tiny_ckpt, images, reference):
    script = "What is this?\nAnd now?\n/image {}\nCompare them.\n/undo\n/history\n/quit\n".format(images / "img2.png")
    r = run("chat", tiny_ckpt, images / "img0.png", "--max-new-tokens", 4, stdin=script)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    model, processor = reference
    # the first answer is the one-shot answer to the same question
    assert lines[0] == generate(model, processor, "What is this?", str(images / "img0.png"), max_new_tokens=4)
    history = json.loads("\n".join(lines[3:]))
    assert [h["text"] for h in history if h["role"] == "user"] == ["What is this?", "And now?"]
    assert "[image added" in r.stderr and "[last turn removed]" in r.stderr


def test_caption_folder_is_batched_resumable_and_skips_broken_images(tiny_ckpt, images, reference, tmp_path):
    out = tmp_path / "captions.jsonl"
    r = run("caption", tiny_ckpt, images, "--out", out, "--batch-size", 3, "--max-new-tokens", 5)
    assert r.returncode == 0, r.stderr
    assert "skipped" in r.stderr and "broken.png" in r.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    names = sorted(rec["image"] for rec in records)
    assert names == ["img0.png", "img1.png", "img2.png", "img3.png", "img4.png", "sub/tall.jpg"]
    model, processor = reference
    alone = generate(model, processor, task_prompt("caption"), str(images / "img3.png"), max_new_tokens=5)
    assert {rec["image"]: rec["caption"] for rec in records}["img3.png"] == alone  # batching changes nothing

    # a crash mid-write leaves a torn last line: the rerun cuts it and does only what is missing
    kept = out.read_text().splitlines()[:2]
    out.write_text("\n".join(kept) + '\n{"image": "img4.pn')
    r = run("caption", tiny_ckpt, images, "--out", out, "--batch-size", 3, "--max-new-tokens", 5)
    assert r.returncode == 0, r.stderr
    again = [json.loads(line) for line in out.read_text().splitlines()]
    assert [rec["image"] for rec in again[:2]] == [json.loads(k)["image"] for k in kept]
    assert sorted(rec["image"] for rec in again) == names  # each image once
    before = out.read_text()
    r = run("caption", tiny_ckpt, images, "--out", out)  # only the broken image is left: tried again
    assert r.returncode == 0 and "wrote 0 captions" in r.stderr and "skipped 1" in r.stderr
    assert out.read_text() == before


def test_read_done_refuses_a_file_that_is_not_captions(tmp_path):
    f = tmp_path / "other.jsonl"
    f.write_text('{"something": 1}\n')
    with pytest.raises(ValueError, match="other.jsonl:1"):
        read_done(f)


def test_export_writes_a_folder_transformers_loads(tiny_ckpt, tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    dst = tmp_path / "exported"
    r = run("export", tiny_ckpt, dst)
    assert r.returncode == 0, r.stderr
    hf = LlavaForConditionalGeneration.from_pretrained(dst)
    ours = load_pretrained(dst)
    assert sum(p.numel() for p in hf.parameters()) == sum(p.numel() for p in ours.parameters())
    assert AutoProcessor.from_pretrained(dst, backend="pil").image_processor.crop_size["height"] == 336
    r = run("export", tiny_ckpt, dst)  # no silent overwrite
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1


def test_train_forwards_its_options_to_the_recipe(capsys):
    from llava_core.cli.main import main

    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0 and "--budget-minutes" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["train", "--recipe", "nonsense", "--out", "x"])
    assert e.value.code == 2 and "nonsense" in capsys.readouterr().err
