"""Probes (llava_core/probe.py): capture leaves the model alone and reads what transformers reads.

The oracle for attention weights and hidden states is transformers' LlavaForConditionalGeneration
on the same checkpoint, with eager attention (an explicit softmax) and output_attentions /
output_hidden_states. Tolerances: 1e-5 for attention and vision states, 1e-4 for decoder states.
"""

import subprocess
import sys

import pytest
import torch
from PIL import Image

from llava_core.checkpoints.loader import load_pretrained
from llava_core.model.processor import LlavaProcessor
from llava_core.research.drawing import format_lens, save_attention_png, save_lens_png
from llava_core.research.probe import capture, image_attention, image_box, image_positions, logit_lens, nearest_tokens
from llava_core.runtime.generate import generate

QUESTION = "What colour is it?"


@pytest.fixture(scope="module")
def ours(tiny_ckpt):
    return load_pretrained(tiny_ckpt), LlavaProcessor.from_pretrained(tiny_ckpt)


@pytest.fixture(scope="module")
def hf_eager(tiny_ckpt):
    from transformers import LlavaForConditionalGeneration
    return LlavaForConditionalGeneration.from_pretrained(tiny_ckpt, dtype=torch.float32,
                                                         attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def image():
    im = Image.new("RGB", (200, 180), "white")
    im.paste((200, 30, 30), (20, 30, 120, 150))  # something to look at
    return im


@pytest.fixture(scope="module")
def inputs(ours, image):
    _, processor = ours
    enc = processor(text=processor.prompt(QUESTION, 1), images=[image])
    return enc["input_ids"], enc["pixel_values"]  # (1, T), (1, 3, 336, 336)


def max_diff(a, b) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


def hook_state(model):
    """Every module's hooks and any instance-level forward: what capture must leave as it found it."""
    from torch.nn.modules import module as nn_module
    return ([(name, len(m._forward_hooks), len(m._forward_pre_hooks), len(m._forward_hooks_with_kwargs),
              "forward" in m.__dict__) for name, m in model.named_modules()],
            len(nn_module._global_forward_hooks), len(nn_module._global_forward_pre_hooks))


# --- capture -----------------------------------------------------------------------------------------


def test_capture_leaves_the_logits_and_the_model_alone(ours, inputs):
    model, _ = ours
    ids, px = inputs
    before = hook_state(model)
    with torch.no_grad():
        plain = model(ids, px)
        with capture(model, vision_layers=[0, -2, -1], attention=True, queries=[-1, 5], keys=None) as cap:
            probed = model(ids, px)
    assert torch.equal(probed, plain)
    assert hook_state(model) == before
    n_img = model.cfg.num_image_tokens
    L, H, C = model.cfg.text.num_hidden_layers, model.cfg.text.num_attention_heads, model.cfg.text.hidden_size
    Dv, T = model.cfg.vision.hidden_size, ids.shape[1]
    assert {k: tuple(v.shape) for k, v in cap.vision.items()} == {k: (1, 1 + n_img, Dv) for k in (0, -2, -1)}
    assert cap.projector.shape == (1, n_img, C)
    assert len(cap.decoder) == L + 1 and all(h.shape == (1, T, C) for h in cap.decoder)
    assert cap.attention.shape == (1, L, H, 2, T)
    assert cap.queries.tolist() == [T - 1, 5]


def test_capture_removes_its_hooks_after_an_error(ours, inputs):
    model, _ = ours
    ids, px = inputs
    before = hook_state(model)
    with pytest.raises(RuntimeError, match="inside"):
        with capture(model, vision_layers=[1], attention=[0, -1]):
            assert hook_state(model) != before
            raise RuntimeError("an error inside the block")
    assert hook_state(model) == before
    with pytest.raises(ValueError, match="query position"), torch.no_grad():  # an error inside a hook
        with capture(model, attention=True, queries=[10_000]):
            model(ids, px)
    assert hook_state(model) == before


@pytest.mark.parametrize("kwargs, message", [
    (dict(attention=[2]), "decoder layer 2 is out of range"),
    (dict(vision_layers=[4]), "vision layer 4 is out of range"),
    (dict(vision_layers=[-5]), "vision layer -5 is out of range"),
])
def test_capture_names_a_bad_layer(ours, kwargs, message):
    model, _ = ours
    with pytest.raises(ValueError, match=message):
        with capture(model, **kwargs):
            pass


def test_attention_is_a_softmax_over_the_past(ours, inputs):
    model, _ = ours
    ids, px = inputs
    T = ids.shape[1]
    with torch.no_grad(), capture(model, projector=False, decoder=False, attention=True) as cap:
        model(ids, px)
    w = cap.attention[0]  # (L, H, T, T)
    assert w.shape == (model.cfg.text.num_hidden_layers, model.cfg.text.num_attention_heads, T, T)
    assert max_diff(w.sum(-1), torch.ones(w.shape[:-1])) <= 1e-5
    future = torch.ones(T, T, dtype=torch.bool).triu(1)  # key after query
    assert w[..., future].abs().max().item() == 0.0


def test_attention_matches_transformers_eager(ours, hf_eager, inputs):
    model, _ = ours
    ids, px = inputs
    with torch.no_grad():
        ref = hf_eager(input_ids=ids, pixel_values=px, output_attentions=True).attentions  # L of (1, H, T, T)
        with capture(model, projector=False, decoder=False, attention=True) as cap:
            model(ids, px)
        img = image_positions(model, ids)
        with capture(model, projector=False, decoder=False, attention=[-1], queries=[-1, -3], keys=img) as part:
            model(ids, px)
    assert len(ref) == cap.attention.shape[1]
    for layer, r in enumerate(ref):
        assert max_diff(cap.attention[:, layer], r) <= 1e-5, f"layer {layer}"
    assert part.attention_layers == [len(ref) - 1]
    assert part.attention.shape == (1, 1, model.cfg.text.num_attention_heads, 2, model.cfg.num_image_tokens)
    assert max_diff(part.attention[:, 0], ref[-1][:, :, [-1, -3]][..., img]) <= 1e-5


def test_attention_with_left_padding_matches_transformers(ours, hf_eager, image):
    model, processor = ours
    texts = [processor.prompt(QUESTION, 1), processor.prompt("Is there a square in the picture at all?", 1)]
    enc = processor(text=texts, images=[image, image])
    ids, mask, px = enc["input_ids"], enc["attention_mask"], enc["pixel_values"]
    assert not bool(mask.all())  # the first row is padded
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = hf_eager(input_ids=ids, pixel_values=px, attention_mask=mask, position_ids=positions,
                       output_attentions=True).attentions
        with capture(model, projector=False, decoder=False, attention=True) as cap:
            model(ids, px, attention_mask=mask)
    real = mask.bool()  # compare the real query rows; padded rows are never used
    for layer, r in enumerate(ref):
        for b in range(2):
            assert max_diff(cap.attention[b, layer][:, real[b]], r[b][:, real[b]]) <= 1e-5, (layer, b)
            assert torch.count_nonzero(cap.attention[b, layer][:, real[b]][..., ~real[b]]) == 0  # padding unread


def test_attention_of_a_cached_decode_step_matches_the_full_pass(ours, inputs):
    model, _ = ours
    ids, px = inputs
    with torch.no_grad():
        with capture(model, projector=False, decoder=False, attention=True, queries=[-1]) as full:
            model(ids, px)
        cache = model.new_cache(1, ids.shape[1] + 4)
        model(ids[:, :-1], px, cache=cache)
        with capture(model, projector=False, decoder=False, attention=True) as step:
            model(ids[:, -1:], cache=cache)  # one new token; keys come from the cache
    assert step.attention.shape == full.attention.shape
    assert max_diff(step.attention, full.attention) <= 1e-5


# --- hidden states against transformers ------------------------------------------------------------


def test_vision_states_match_transformers(ours, hf_eager, inputs):
    model, _ = ours
    ids, px = inputs
    layers = [0, 1, 2, 3, -1, -2]
    with torch.no_grad():
        ref = hf_eager.model.vision_tower(px, output_hidden_states=True).hidden_states
        with capture(model, vision_layers=layers) as cap:
            model(ids, px)
    for layer in layers:
        assert max_diff(cap.vision[layer], ref[layer]) <= 1e-5, f"vision layer {layer}"


def test_decoder_states_match_transformers(ours, hf_eager, inputs):
    model, _ = ours
    ids, px = inputs
    with torch.no_grad():
        ref = hf_eager(input_ids=ids, pixel_values=px, output_hidden_states=True).hidden_states  # L+1
        with capture(model) as cap:
            model(ids, px)
        assert len(cap.decoder) == len(ref)
        for i in range(len(ref) - 1):
            assert max_diff(cap.decoder[i], ref[i]) <= 1e-4, f"decoder hidden state {i}"
        # transformers' last entry is after the final norm; ours is the block's output
        assert max_diff(model.language_model.norm(cap.decoder[-1]), ref[-1]) <= 1e-4
        assert max_diff(cap.projector, model.image_features(px)) == 0.0


# --- logit lens and nearest tokens ------------------------------------------------------------------


def test_logit_lens_last_layer_is_the_models_prediction(ours, inputs):
    model, processor = ours
    ids, px = inputs
    positions, k = [-1, -4, 7], 4
    lens = logit_lens(model, ids, px, positions, k=k)
    L = model.cfg.text.num_hidden_layers
    assert lens.top_ids.shape == lens.top_probs.shape == (L + 1, 3, k)
    assert lens.chosen_probs.shape == (L + 1, 3)
    with torch.no_grad():
        final = model(ids, px)[0, positions].float().softmax(-1)  # (P, V)
    want_p, want_ids = final.topk(k, dim=-1)
    assert torch.equal(lens.top_ids[-1], want_ids)
    assert max_diff(lens.top_probs[-1], want_p) <= 1e-6
    assert torch.equal(lens.chosen, final.argmax(-1))
    assert max_diff(lens.chosen_probs[-1], want_p[:, 0]) <= 1e-6
    table = format_lens(lens, processor.tokenizer)
    assert table.count("position ") == 3 and len(table.splitlines()) == 3 * (L + 3) + 2


def test_lens_png(ours, inputs, tmp_path):
    model, processor = ours
    ids, px = inputs
    lens = logit_lens(model, ids, px, [-1, -2], k=3)
    path = save_lens_png(lens, processor, tmp_path / "lens.png")
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width > 2 * 100 and im.height > model.cfg.text.num_hidden_layers * 20
    assert [p.name for p in tmp_path.iterdir()] == ["lens.png"]  # no temp file left


def test_nearest_tokens(ours, inputs):
    model, _ = ours
    emb = model.language_model.embed_tokens.weight
    want = torch.tensor([3, 17, 250])
    ids, sims = nearest_tokens(model, emb[want].detach() * 3.0, k=5)  # scale does not matter to a cosine
    assert ids.shape == sims.shape == (3, 5)
    assert torch.equal(ids[:, 0], want)
    assert max_diff(sims[:, 0], torch.ones(3)) <= 1e-5
    assert bool((sims[:, :-1] >= sims[:, 1:]).all())
    with torch.no_grad():
        feats = model.image_features(inputs[1])  # (1, M, C)
    ids, sims = nearest_tokens(model, feats, k=2)
    assert ids.shape == (1, model.cfg.num_image_tokens, 2)
    with pytest.raises(ValueError, match="width"):
        nearest_tokens(model, torch.zeros(4, 7))


# --- attention over the image ------------------------------------------------------------------------


def test_image_attention(ours, image, tmp_path):
    model, processor = ours
    result = image_attention(model, processor, image, QUESTION, max_new_tokens=5)
    assert result.answer == generate(model, processor, QUESTION, image, max_new_tokens=5)
    grid = model.cfg.vision.image_size // model.cfg.vision.patch_size
    assert result.map.shape == (grid, grid)
    assert bool((result.map >= 0).all()) and 0 < result.map.sum().item() <= 1 + 1e-5
    assert result.layers == list(range(model.cfg.text.num_hidden_layers))
    forced = image_attention(model, processor, image, QUESTION, answer_tokens=result.answer_ids)
    assert torch.equal(forced.map, result.map)
    one = image_attention(model, processor, image, QUESTION, answer_tokens=result.answer_ids,
                          layers=[-1], heads=[0])
    assert one.layers == [model.cfg.text.num_hidden_layers - 1] and not torch.equal(one.map, result.map)

    path = save_attention_png(result.map, image, tmp_path / "sub" / "map.png", box=result.box)
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == image.size
        out = im.convert("RGB")
    left, _, right, _ = result.box  # the crop the tower saw leaves the side strips untouched
    assert 0 < left < right < image.width
    assert out.getpixel((0, 90)) == image.getpixel((0, 90))  # left of the box
    assert out.getpixel((10, 100)) != image.getpixel((10, 100))  # inside it


def test_image_box_follows_the_processor(ours):
    _, processor = ours
    # 200x180, shortest edge -> 336: resized to 373x336, centre crop 336 starts at x = 18
    l, t, r, b = image_box(processor, (200, 180))
    assert (t, b) == (0.0, 180.0) and abs(l - 18 * 200 / 373) < 1e-9 and abs(r - 354 * 200 / 373) < 1e-9
    assert image_box(processor, (50, 50)) == pytest.approx((0.0, 0.0, 50.0, 50.0))
    pad = LlavaProcessor(processor.cfg, processor.tokenizer, processor.image_cfg, processor.chat_template,
                         image_aspect_ratio="pad")
    # padded to a 300-px square: the square reaches past both sides
    assert image_box(pad, (100, 300)) == pytest.approx((-100.0, 0.0, 200.0, 300.0))


# --- command line ------------------------------------------------------------------------------------


def run(*args):
    return subprocess.run([sys.executable, "-m", "llava_core.cli.main", *map(str, args)], capture_output=True,
                          text=True, timeout=180)


def test_attention_command_writes_the_overlay(tiny_ckpt, ours, image, tmp_path):
    model, processor = ours
    src = tmp_path / "img.png"
    image.save(src)
    out = tmp_path / "map.png"
    r = run("attention", tiny_ckpt, src, QUESTION, "--out", out, "--max-new-tokens", 4, "--layers", -1, 0)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [generate(model, processor, QUESTION, image, max_new_tokens=4), str(out)]
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == image.size


def test_lens_command_prints_the_table(tiny_ckpt, image, tmp_path):
    src = tmp_path / "img.png"
    image.save(src)
    r = run("lens", tiny_ckpt, src, QUESTION, "--max-new-tokens", 2, "--top-k", 3,
            "--out", tmp_path / "lens.png")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("answer: ") and r.stdout.count("position ") == 2 and "p(chosen)" in r.stdout
    assert (tmp_path / "lens.png").is_file()


@pytest.mark.parametrize("args, message", [
    (["attention", "{ckpt}", "/no/such/image.png", "q", "--out", "{out}"], "no such image file"),
    (["attention", "{ckpt}", "{img}", "q", "--out", "{out}", "--layers", "7"],
     "decoder layer 7 is out of range"),
    (["lens", "{ckpt}", "{img}", "  "], "needs a question"),
])
def test_probe_commands_bad_input_is_one_line(tiny_ckpt, image, tmp_path, args, message):
    src = tmp_path / "img.png"
    image.save(src)
    args = [a.format(ckpt=tiny_ckpt, img=src, out=tmp_path / "map.png") for a in args]
    r = run(*args)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert not (tmp_path / "map.png").exists()


def test_image_attention_map_follows_a_pooling_projector(tiny_ckpt):
    """A token-reducing projector's grid (2x2 average pooling) gives a map a quarter the size;
    a resampler's tokens have no grid and are refused with a message naming the projector."""
    from llava_core.research.ablate import processor_for, with_projector

    base = load_pretrained(tiny_ckpt)
    grid = base.cfg.vision.image_size // base.cfg.vision.patch_size
    img = Image.new("RGB", (90, 70), "red")
    pooled = with_projector(base, "avgpool2_mlp2x_gelu", seed=0)
    att = image_attention(pooled, processor_for(LlavaProcessor.from_pretrained(tiny_ckpt), pooled.cfg), img,
                          "colour?", max_new_tokens=2)
    assert att.map.shape == (grid // 2, grid // 2)
    assert 0 < float(att.map.sum()) <= 1 + 1e-5  # the image keys get a share of each row, at most all
    resampled = with_projector(base, "resampler3", seed=0)
    with pytest.raises(ValueError, match="resampler3"):
        image_attention(resampled, processor_for(LlavaProcessor.from_pretrained(tiny_ckpt), resampled.cfg), img,
                        "colour?", max_new_tokens=2)
