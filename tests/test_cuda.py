"""fp16 on CUDA against transformers fp16 on CUDA, same checkpoint. Skipped without a GPU.

Tolerances: fp16 keeps ~3 significant digits and the two libraries order their reductions
differently, so logits are compared relative to their range (1%), not absolutely.
"""

import pytest
import torch
from test_parity import max_diff, prompt_ids

from llava_core.checkpoints.loader import load_pretrained
from llava_core.model.processor import LlavaProcessor
from llava_core.runtime.chat import ChatSession
from llava_core.runtime.decode import SamplingParams, generate_tokens
from llava_core.testing import make_tiny_checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

REL_TOL = 1e-2  # of the reference logits' range
NEW = 12


@pytest.fixture(scope="module")
def fp16_ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("fp16"), seed=11, dtype=torch.float16)


@pytest.fixture(scope="module")
def ours(fp16_ckpt):
    return load_pretrained(fp16_ckpt, device="cuda")


@pytest.fixture(scope="module")
def hf(fp16_ckpt):
    from transformers import LlavaForConditionalGeneration
    return LlavaForConditionalGeneration.from_pretrained(fp16_ckpt, dtype=torch.float16).to("cuda").eval()


def test_fp16_checkpoint_loads_as_fp16_on_cuda(ours):
    assert ours.dtype == torch.float16
    assert {p.device.type for p in ours.parameters()} == {"cuda"}
    cache = ours.new_cache(1, 64)
    assert cache.k.dtype == torch.float16 and cache.k.device.type == "cuda"


def test_logits_match_transformers_fp16_cuda(ours, hf):
    ids = prompt_ids(ours.cfg, seed=21).cuda()
    px = torch.randn(2, 3, 336, 336, generator=torch.Generator().manual_seed(21)).cuda().half()
    with torch.inference_mode():
        ref = hf(input_ids=ids, pixel_values=px).logits
        out = ours(ids, px)
    span = (ref.float().max() - ref.float().min()).item()
    assert out.dtype == torch.float16
    assert max_diff(out, ref) <= REL_TOL * span


@pytest.mark.parametrize("cuda_graph", [True, False], ids=["graphed", "eager"])
def test_greedy_fp16_cuda_matches_transformers(ours, hf, cuda_graph):
    ids = prompt_ids(ours.cfg, batch=1, seed=22).cuda()
    px = torch.randn(1, 3, 336, 336, generator=torch.Generator().manual_seed(22)).cuda().half()
    with torch.inference_mode():
        steps = list(generate_tokens(ours, ids, SamplingParams(max_new_tokens=NEW), [-5], pixel_values=px,
                                     cuda_graph=cuda_graph))
        want = hf.generate(input_ids=ids, pixel_values=px, max_new_tokens=NEW, do_sample=False,
                           eos_token_id=-5, pad_token_id=0)[:, ids.shape[1]:]
    got = torch.stack(steps, 1)
    assert got.shape == want.shape == (1, NEW)
    assert torch.equal(got, want)


def test_graphed_batch_of_different_lengths_matches_eager(ours):
    """Left-padded batch: the CUDA-graph step gives the eager step's tokens, and sampling with a
    seed draws the same tokens through both."""
    cfg = ours.cfg
    a = prompt_ids(cfg, batch=1, n_text=8, seed=23)[0]
    b = prompt_ids(cfg, batch=1, n_text=30, seed=24)[0]
    ids = torch.stack([torch.cat([torch.full((len(b) - len(a),), cfg.text.pad_token_id), a]), b]).cuda()
    mask = torch.ones_like(ids)
    mask[0, :len(b) - len(a)] = 0
    px = torch.randn(2, 3, 336, 336, generator=torch.Generator().manual_seed(23)).cuda().half()
    for params in (SamplingParams(max_new_tokens=NEW), SamplingParams(max_new_tokens=NEW, temperature=0.8, seed=4)):
        runs = [torch.stack(list(generate_tokens(ours, ids, params, [-5], pixel_values=px, attention_mask=mask,
                                                 pad_token_id=cfg.text.pad_token_id, cuda_graph=g)), 1)
                for g in (True, False)]
        assert torch.equal(runs[0], runs[1])


def test_chat_turn_two_fp16_cuda_equals_full_prefill(ours, fp16_ckpt):
    from PIL import Image

    processor = LlavaProcessor.from_pretrained(fp16_ckpt)
    img = Image.fromarray(torch.randint(0, 256, (200, 300, 3), dtype=torch.uint8,
                                        generator=torch.Generator().manual_seed(5)).numpy())
    chat = ChatSession(ours, processor, images=img)
    chat.ask("what is this?", max_new_tokens=6)
    chat.messages.append({"role": "user", "content": [{"type": "text", "text": "and the colour?"}]})
    kept = chat.prefill(chat.prompt_ids())  # (1, V): the last position's logits
    ids = torch.tensor([chat.prompt_ids()], device="cuda")
    with torch.inference_mode():
        full = ours(ids, processor.preprocess(chat.images).cuda().half())[:, -1]
    span = (full.float().max() - full.float().min()).item()
    assert max_diff(kept, full) <= REL_TOL * span
