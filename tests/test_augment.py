"""Stage-0 augmentation: a pure function of its generator, images left alone where not drawn,
and moved objects still under their labels after the zoom-out."""

from dataclasses import replace

import torch

from llava_core.data import COLOURS, DataConfig, make_sample
from llava_core.model.processor import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from llava_core.train.augment import augment_batch
from llava_core.train.batches import images_to_tensor
from llava_core.train.recipe import Recipe
from llava_core.train.stage0_clip import PairBatches
from llava_core.train.stage0_heads import cell_targets, patch_targets

SIZE = 224


def _batch(n=24, seed=3):
    cfg = DataConfig(image_size=SIZE, seed=seed, mix={"caption_detailed": 0.7, "ocr": 0.3})
    samples = [make_sample("train", i, cfg) for i in range(n)]
    x = images_to_tensor([s["image"] for s in samples], (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # (n, 3, S, S) in [0, 1]
    return x, samples


def test_same_generator_seed_same_batch_and_p0_changes_nothing():
    x, samples = _batch()
    a, sa = augment_batch(x, samples, 0.5, torch.Generator().manual_seed(7))
    b, sb = augment_batch(x, samples, 0.5, torch.Generator().manual_seed(7))
    c, _ = augment_batch(x, samples, 0.5, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and [s["meta"] for s in sa] == [s["meta"] for s in sb]
    assert not torch.equal(a, c)
    same, s0 = augment_batch(x, samples, 0.0, torch.Generator().manual_seed(7))
    assert torch.equal(same, x) and s0 == samples
    assert a.min() >= 0 and a.max() <= 1


def test_images_not_drawn_are_untouched_and_drawn_ones_leave_white_paper():
    x, samples = _batch(32)
    y, _ = augment_batch(x, samples, 0.5, torch.Generator().manual_seed(1))
    changed = (y != x).flatten(1).any(1)  # (B,)
    assert 0 < int(changed.sum()) < len(x)
    corner = y[changed][:, :, :4, :4].mean((2, 3))  # (n, 3): the canvas corners are background
    white_bg = x[changed][:, :, :4, :4].mean((2, 3)).min(1).values > 0.99
    assert (corner[white_bg] < 0.995).any(1).all(), "augmented white paper must change colour"
    assert (corner[white_bg] > 228 / 255 - 8 / 255 - 0.05).all()


def test_zoomed_objects_keep_their_colour_at_their_new_centre():
    """The zoom's geometry is checked against the pixels: at each moved object's mapped centre
    the augmented image has that object's colour (blur sigma <= 1 px and noise <= 6 grey levels
    move it little; tolerance 0.12 per channel), and the patch targets follow the objects."""
    x, samples = _batch(48, seed=5)
    y, out = augment_batch(x, samples, 1.0, torch.Generator().manual_seed(2))
    zoomed = [b for b, s in enumerate(out) if s["meta"].get("zoomed")]
    assert len(zoomed) >= 5
    checked = 0
    for b in zoomed:
        for o, o0 in zip(out[b]["meta"]["objects"], samples[b]["meta"]["objects"]):
            assert o["r"] < o0["r"] or o0["r"] == o["r"] == 0
            if o["r"] < 6:
                continue
            px = y[b, :, int(o["cy"]), int(o["cx"])]
            want = torch.tensor(COLOURS[o["colour"]], dtype=torch.float32) / 255
            assert (px - want).abs().max() < 0.12, (b, o["colour"], px, want)
            checked += 1
    assert checked >= 10
    vision = Recipe().vision
    cells = cell_targets(out)
    assert (cells["colour"][zoomed] == -100).all(), "zoomed scenes' cells no longer match their labels"
    moved = patch_targets(out, vision)["colour"]
    assert not torch.equal(moved[zoomed], patch_targets([samples[b] for b in zoomed], vision)["colour"])


def test_pair_batches_augment_only_when_asked():
    r = Recipe()
    plain = PairBatches(r.vision, replace(r.stage0, batch_size=8))
    aug = PairBatches(r.vision, replace(r.stage0, batch_size=8, augment=1.0))
    px0, text0, _ = plain(3)
    px1, text1, _ = aug(3)
    px2, _, _ = aug(3)
    assert torch.equal(text0, text1), "augmentation changes pixels, not captions"
    assert torch.equal(px1, px2) and not torch.equal(px0, px1)
    mean = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    unit = px1 * std + mean
    assert unit.min() > -1e-4 and unit.max() < 1 + 1e-4
