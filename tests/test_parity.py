"""Our model against transformers' LlavaForConditionalGeneration on the same checkpoint files."""

import torch

from llava_core.checkpoints.loader import load_pretrained

FP32_TOL = 1e-4


def prompt_ids(cfg, batch=2, n_text=20, n_images_per_row=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        text = torch.randint(3, cfg.image_token_index, (n_text,), generator=g)
        parts = [text[:3]]
        for i in range(n_images_per_row):
            parts += [torch.full((cfg.num_image_tokens,), cfg.image_token_index), text[3 + i:4 + i]]
        parts.append(text[3 + n_images_per_row:])
        rows.append(torch.cat(parts))
    return torch.stack(rows)


def max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


def test_logits_match_transformers_fp32(tiny_ckpt, hf_model):
    ours = load_pretrained(tiny_ckpt)
    ids = prompt_ids(ours.cfg)
    px = torch.randn(2, 3, 336, 336, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf_model(input_ids=ids, pixel_values=px).logits
        out = ours(ids, px)
    assert out.shape == ref.shape == (2, ids.shape[1], ours.cfg.text.vocab_size)
    assert max_diff(out, ref) <= FP32_TOL


def test_left_padded_batch_matches_transformers(tiny_ckpt, hf_model):
    ours = load_pretrained(tiny_ckpt)
    ids = prompt_ids(ours.cfg)
    pad = torch.full((5,), ours.cfg.text.pad_token_id)
    extra = torch.arange(10, 15)
    ids = torch.stack([torch.cat([pad, ids[0]]), torch.cat([extra, ids[1]])])  # row 0 left-padded by 5
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    px = torch.randn(2, 3, 336, 336, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf_model(input_ids=ids, pixel_values=px, attention_mask=mask).logits
        out = ours(ids, px, attention_mask=mask)
    real = mask.bool()
    assert max_diff(out[real], ref[real]) <= FP32_TOL
