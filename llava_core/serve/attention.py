"""Where each answer token looked in the image: the web page's heat maps.

The conversation (its prompt ids) and the answer's tokens are run once under the probes'
`capture` (research/probe.py); for each answer token the attention weights from the position
that chose it to the last image's tokens are averaged over every layer and head and laid out on
the patch grid. Must run in the engine's thread (BatchEngine.call): the probe hooks the model.
"""

from __future__ import annotations

import torch

from ..model.llava import LlavaModel
from ..research.probe import capture, image_box, image_positions, on_grid


@torch.inference_mode()
def answer_attention(model: LlavaModel, processor, prompt_ids: list[int], pixel_values: torch.Tensor,
                     answer_ids: list[int], image) -> dict:
    """-> {"tokens": [piece per answer token], "maps": (n, grid_h, grid_w) as lists, "grid": [gh, gw],
    "box": [left, top, right, bottom] of the grid in the last image's pixels, "image_size": [w, h]}."""
    if not answer_ids:
        raise ValueError("the answer has no tokens to look from")
    ids = torch.tensor([prompt_ids + answer_ids], device=model.device)  # (1, T + n)
    M = model.cfg.num_image_tokens
    img = image_positions(model, ids)[-M:]  # (M,) the last image's tokens
    T = len(prompt_ids)
    queries = list(range(T - 1, T - 1 + len(answer_ids)))  # position t chose token t + 1
    with capture(model, projector=False, decoder=False, attention=True, queries=queries, keys=img) as cap:
        model(ids, pixel_values.to(model.device, model.dtype))
    maps = on_grid(model, cap.attention[0].mean(dim=(0, 1)))  # (La, H, Q, M) -> (Q, M) -> (Q, gh, gw)
    grid = maps.shape[-1]
    tok = processor.tokenizer
    pieces, before = [], ""
    for i in range(len(answer_ids)):  # each token's text as the answer's decoded text grows
        text = tok.decode(answer_ids[:i + 1], skip_special_tokens=True, clean_up_tokenization_spaces=False)
        pieces.append(text[len(before):] if text.startswith(before) else text)
        before = text
    return {"tokens": pieces, "maps": [[[round(float(x), 6) for x in row] for row in m] for m in maps.cpu()],
            "grid": [grid, grid], "box": [round(v, 2) for v in image_box(processor, image.size)],
            "image_size": list(image.size)}
