"""The generation loop against transformers' `generate` (greedy) and the KV cache against full forwards."""

import pytest
import torch
from test_parity import prompt_ids

from llava_core.checkpoints.loader import load_pretrained
from llava_core.runtime.decode import SamplingParams, TextStream, filter_top_k, filter_top_p, generate_tokens

NEW = 12


@pytest.fixture(scope="module")
def ours(tiny_ckpt):
    return load_pretrained(tiny_ckpt)


def run_ours(model, ids, params, px=None, mask=None, eos=(2,), pad=0):
    steps = list(generate_tokens(model, ids, params, list(eos), pixel_values=px, attention_mask=mask,
                                 pad_token_id=pad))
    return torch.stack(steps, 1)  # (B, new)


def run_hf(hf_model, ids, px, mask=None, eos=2, pad=0):
    out = hf_model.generate(input_ids=ids, pixel_values=px, attention_mask=mask, max_new_tokens=NEW,
                            do_sample=False, eos_token_id=eos, pad_token_id=pad)
    return out[:, ids.shape[1]:]


def test_greedy_matches_transformers_single(ours, hf_model):
    ids = prompt_ids(ours.cfg, batch=1, seed=3)
    px = torch.randn(1, 3, 336, 336, generator=torch.Generator().manual_seed(3))
    got = run_ours(ours, ids, SamplingParams(max_new_tokens=NEW), px, eos=(-5,))
    want = run_hf(hf_model, ids, px, eos=-5)  # an id that never occurs: forces the full length
    assert got.shape == (1, NEW)
    assert torch.equal(got, want)


def test_greedy_matches_transformers_batch_of_different_lengths(ours, hf_model):
    cfg = ours.cfg
    a = prompt_ids(cfg, batch=1, n_text=8, seed=4)[0]
    b = prompt_ids(cfg, batch=1, n_text=30, seed=5)[0]
    pad = cfg.text.pad_token_id
    ids = torch.stack([torch.cat([torch.full((len(b) - len(a),), pad), a]), b])
    mask = torch.ones_like(ids)
    mask[0, :len(b) - len(a)] = 0
    px = torch.randn(2, 3, 336, 336, generator=torch.Generator().manual_seed(6))
    got = run_ours(ours, ids, SamplingParams(max_new_tokens=NEW), px, mask, eos=(-5,), pad=pad)
    want = run_hf(hf_model, ids, px, mask, eos=-5, pad=pad)
    assert torch.equal(got, want)
    # and each row alone gives the same tokens as in the batch
    alone = run_ours(ours, a[None], SamplingParams(max_new_tokens=NEW), px[:1], eos=(-5,))
    assert torch.equal(alone[0], got[0])


def test_greedy_matches_transformers_two_images(ours, hf_model):
    ids = prompt_ids(ours.cfg, batch=1, n_images_per_row=2, seed=7)
    px = torch.randn(2, 3, 336, 336, generator=torch.Generator().manual_seed(7))
    got = run_ours(ours, ids, SamplingParams(max_new_tokens=NEW), px, eos=(-5,))
    want = run_hf(hf_model, ids, px, eos=-5)
    assert torch.equal(got, want)


def test_eos_stops_and_pads_finished_rows(ours):
    ids = prompt_ids(ours.cfg, batch=1, seed=3)
    px = torch.randn(1, 3, 336, 336, generator=torch.Generator().manual_seed(3))
    free = run_ours(ours, ids, SamplingParams(max_new_tokens=NEW), px, eos=(-5,))[0]
    eos = int(free[4])  # pretend the 5th greedy token is EOS
    stopped = run_ours(ours, ids, SamplingParams(max_new_tokens=NEW), px, eos=(eos,))[0]
    first = int((free == eos).nonzero()[0])
    assert stopped.tolist() == free[:first + 1].tolist()


def test_cached_decode_equals_full_forward(ours):
    """Prefill + one-token steps through the cache give the logits of one full forward."""
    ids = prompt_ids(ours.cfg, batch=2, seed=8)
    px = torch.randn(2, 3, 336, 336, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        full = ours(ids, px)
        cache = ours.new_cache(2, ids.shape[1])
        n = ids.shape[1] - 4
        step_logits = [ours(ids[:, :n], px, cache=cache)[:, -1]]
        for t in range(n, ids.shape[1]):
            step_logits.append(ours(ids[:, t:t + 1], cache=cache)[:, -1])
    for i, lg in enumerate(step_logits[:-1]):
        assert (lg - full[:, n - 1 + i]).abs().max() <= 1e-4


def test_fixed_shape_step_equals_the_eager_step(ours):
    """cuda_graph.static_step (full-length masked attention, slot as a tensor) gives the eager
    decode step's logits and cache contents, here on the CPU, for a left-padded batch."""
    from llava_core.runtime.cuda_graph import static_step
    from llava_core.runtime.decode import decode_one, prefill

    cfg = ours.cfg
    a, b = prompt_ids(cfg, batch=1, n_text=6, seed=12)[0], prompt_ids(cfg, batch=1, n_text=14, seed=13)[0]
    ids = torch.stack([torch.cat([torch.full((len(b) - len(a),), cfg.text.pad_token_id), a]), b])
    mask = torch.ones_like(ids)
    mask[0, :len(b) - len(a)] = 0
    px = torch.randn(2, 3, 336, 336, generator=torch.Generator().manual_seed(12))
    eager, fixed = ours.new_cache(2, ids.shape[1] + 8), ours.new_cache(2, ids.shape[1] + 8)
    with torch.inference_mode():
        la = prefill(ours, ids, eager, px, mask)
        lb = prefill(ours, ids, fixed, px, mask)
        for _ in range(5):
            tokens = la.argmax(-1)
            la = decode_one(ours, tokens, eager)
            lb = static_step(ours, tokens, torch.tensor([fixed.length]), fixed)
            fixed.next_pos += 1
            fixed.length += 1
            assert (la - lb).abs().max() <= 1e-5
    n = eager.length
    assert fixed.length == n and torch.equal(fixed.valid, eager.valid)
    assert torch.equal(fixed.next_pos, eager.next_pos)
    assert (fixed.k[:, :, :, :n] - eager.k[:, :, :, :n]).abs().max() <= 1e-6


def test_sampling_is_seeded_and_top_k_1_is_greedy(ours):
    ids = prompt_ids(ours.cfg, batch=2, seed=9)
    px = torch.randn(2, 3, 336, 336, generator=torch.Generator().manual_seed(9))
    p = dict(max_new_tokens=NEW, temperature=1.5, top_p=0.95)
    a = run_ours(ours, ids, SamplingParams(seed=1, **p), px, eos=(-5,))
    b = run_ours(ours, ids, SamplingParams(seed=1, **p), px, eos=(-5,))
    c = run_ours(ours, ids, SamplingParams(seed=2, **p), px, eos=(-5,))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)  # 2 x 12 draws at temperature 1.5 over 416 tokens
    greedy = run_ours(ours, ids, SamplingParams(max_new_tokens=NEW), px, eos=(-5,))
    k1 = run_ours(ours, ids, SamplingParams(max_new_tokens=NEW, temperature=0.7, top_k=1, seed=3), px,
                  eos=(-5,))
    assert torch.equal(greedy, k1)


def test_repetition_penalty_changes_greedy_choice(ours):
    ids = prompt_ids(ours.cfg, batch=1, seed=3)
    px = torch.randn(1, 3, 336, 336, generator=torch.Generator().manual_seed(3))
    plain = run_ours(ours, ids, SamplingParams(max_new_tokens=NEW), px, eos=(-5,))[0]
    huge = run_ours(ours, ids, SamplingParams(max_new_tokens=NEW, repetition_penalty=1e6), px, eos=(-5,))[0]
    # with an overwhelming penalty no token of the prompt or the answer repeats
    prompt = set(ids[0].tolist())
    assert len(set(huge.tolist())) == NEW and not prompt & set(huge.tolist())
    assert not torch.equal(plain, huge) or len(set(plain.tolist())) == NEW


def test_filters_keep_the_right_tokens():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    assert torch.isinf(filter_top_k(logits, 2)).tolist() == [[False, False, True, True]]
    probs = logits.softmax(-1)[0]  # 0.644, 0.237, 0.087, 0.032
    kept = ~torch.isinf(filter_top_p(logits, float(probs[0] + probs[1]) - 1e-3))
    assert kept.tolist() == [[True, True, False, False]]
    assert (~torch.isinf(filter_top_p(logits, 0.5))).tolist() == [[True, False, False, False]]


class FakeTokenizer:
    """Decodes ids as UTF-8 bytes (one byte per id), like a byte-fallback tokenizer would."""

    def decode(self, ids, **_):
        return bytes(ids).decode("utf-8", errors="replace")


def test_text_stream_never_splits_characters_and_cuts_stop_strings():
    text = "naïve 日本 ok STOP more"
    stream = TextStream(FakeTokenizer(), stop_strings=["STOP"])
    pieces = [stream.push(b) for b in text.encode()]
    pieces.append(stream.finish())
    assert "".join(pieces) == "naïve 日本 ok "
    assert all("\ufffd" not in p for p in pieces)
    assert stream.stopped
    # a near-miss of a stop string is released once it can no longer match
    stream = TextStream(FakeTokenizer(), stop_strings=["STOP"])
    pieces = [stream.push(b) for b in "a STOx".encode()] + [stream.finish()]
    assert "".join(pieces) == "a STOx" and pieces[-2] == "STOx"
