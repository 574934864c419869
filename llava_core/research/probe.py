"""Probes: look inside a LlavaModel while it runs, without changing what it computes.

`capture(model, ...)` registers forward hooks for the passes run inside it and removes them on
exit, also on an error: vision hidden states at any layer (CLS + patches), the projector's
output, the decoder's residual stream after every block, and attention weights from chosen
query positions to chosen key slots, per layer and head. `scaled_dot_product_attention` does
not return its weights, so they are recomputed beside it with an explicit softmax from the q/k
the model's own projections produced, rotated by the model's `apply_rotary`, paired with KV
heads as `enable_gqa` pairs them, and masked with the model's own mask (or `build_mask` where
the model lets SDPA apply the causal rule). The model's outputs are untouched: hooks only read.

On top of it: `image_attention` (where the answer looked: a (grid_h, grid_w) map, drawn over the
image by drawing.py's `save_attention_png`), `logit_lens` (what each decoder layer would predict if it were
the last; nostalgebraist 2020), and `nearest_tokens` (the vocabulary entries whose input
embeddings lie nearest each projected image token: what the decoder "reads" in each patch).

Numbering: vision layers as transformers' `hidden_states` (0 the embeddings after ln_pre, k the
output of block k, negatives from the end); decoder hidden states likewise (0 the input
embeddings, l the output of block l, before the final norm); attention layers are 0-based
decoder blocks, negatives from the end.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from ..model.llama import apply_rotary, build_mask
from ..model.llava import LlavaModel
from ..model.processor import load_image, resize_size
from ..runtime.decode import SamplingParams, generate_tokens

# --- capture ---------------------------------------------------------------------------------------


@dataclass
class Captured:
    """What the last forward pass inside `capture` left behind (each pass overwrites the previous one).
    Tensors are detached; attention weights are float32, everything else in the model's dtype."""
    vision: dict[int, torch.Tensor] = field(default_factory=dict)  # layer as asked -> (N, 1+P, Dv), CLS first
    projector: torch.Tensor | None = None  # (N, M, C): the image tokens the decoder reads
    decoder: list[torch.Tensor] = field(default_factory=list)  # L+1 of (B, T, C): input, then each block
    attention_layers: list[int] = field(default_factory=list)  # 0-based decoder blocks, in order
    queries: torch.Tensor | None = None  # (Q,) positions among the pass's T new tokens
    keys: torch.Tensor | None = None  # (K,) key slots (with a cache: slots of the whole cache)
    _attention: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)  # block -> (B, H, Q, K)

    @property
    def attention(self) -> torch.Tensor | None:
        """(B, La, H, Q, K) softmax weights of the captured layers; `[0]` is (La, H, Q, K) for batch 1.
        A row sums to 1 over all S key slots, so over the chosen K keys it sums to at most 1."""
        if not self._attention:
            return None
        missing = [i for i in self.attention_layers if i not in self._attention]
        if missing:
            raise RuntimeError(f"attention layers {missing} did not run in the captured pass")
        return torch.stack([self._attention[i] for i in self.attention_layers], dim=1)


def _layer_list(layers, n: int, what: str) -> list[int]:
    """Indices into n things (negatives from the end) -> 0..n-1, each checked."""
    out = []
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise TypeError(f"{what} {layer!r}: must be an int")
        if not -n <= layer < n:
            raise ValueError(f"{what} {layer} is out of range: there are {n} "
                             f"(0..{n - 1}, or {-n}..-1 from the end)")
        out.append(layer % n)
    return out


def _positions(index, n: int, what: str, device) -> torch.Tensor:
    """None -> all n; ints (negatives from the end) -> a (Q,) long tensor, each checked against n."""
    if index is None:
        return torch.arange(n, device=device)
    index = torch.as_tensor(index, dtype=torch.long, device=device).reshape(-1)
    bad = (index < -n) | (index >= n)
    if bool(bad.any()):
        raise ValueError(f"{what} position(s) {index[bad].tolist()} are out of range for {n} {what} slots")
    return index % n


def _attention_hooks(attn, rec: Captured, queries, keys) -> list:
    """Hooks on one Attention module: keep q_proj/k_proj outputs, then after the module ran,
    recompute its softmax weights for the chosen queries and keys."""
    got = {}

    def keep(name):
        def hook(_module, _args, out):
            got[name] = out
        return hook

    @torch.no_grad()
    def weights(mod, args, kwargs, _out):
        a = dict(zip(("x", "cos", "sin", "mask", "cache"), args), **kwargs)
        x, cos, sin, mask, cache = a["x"], a["cos"], a["sin"], a.get("mask"), a.get("cache")
        B, T, _ = x.shape
        H, Hkv, D = mod.n_heads, mod.n_kv, mod.head_dim
        q = apply_rotary(got.pop("q").view(B, T, H, D).transpose(1, 2), cos, sin)  # (B, H, T, D)
        k = got.pop("k")
        if cache is None:
            k = apply_rotary(k.view(B, T, Hkv, D).transpose(1, 2), cos, sin)  # (B, Hkv, S=T, D)
        else:  # the keys the model just read: the cache's slots, this pass's already written
            k = cache.k[mod.layer, :, :, :cache.length + T]  # (B, Hkv, S, D)
        S = k.shape[2]
        qi = _positions(queries, T, "query", x.device)
        ki = _positions(keys, S, "key", x.device)
        if mask is None:  # the model's plain case, SDPA's is_causal (T > 1) or no mask (T == 1)
            mask = build_mask(torch.ones(B, S, dtype=torch.bool, device=x.device), T)  # (B, 1, T, S)
        k = k.repeat_interleave(H // Hkv, dim=1)  # (B, H, S, D): head h reads KV head h // (H / Hkv)
        scores = q[:, :, qi].float() @ k.float().transpose(-1, -2) / math.sqrt(D)  # (B, H, Q, S)
        scores = scores.masked_fill(~mask[:, :, qi], float("-inf"))
        rec._attention[mod.layer] = scores.softmax(dim=-1)[..., ki].detach()  # (B, H, Q, K)
        rec.queries, rec.keys = qi, ki

    return [attn.q_proj.register_forward_hook(keep("q")), attn.k_proj.register_forward_hook(keep("k")),
            attn.register_forward_hook(weights, with_kwargs=True)]


def _vision_hook(layers: list[int], asked: list[int], rec: Captured):
    """After the tower ran, read the asked layers from a second pass over the same pixels
    (the model's own pass stops at its feature layer)."""
    @torch.no_grad()
    def hook(tower, args, _out):
        px = args[0].to(tower.visual.conv1.weight.dtype)  # (N, 3, H, W)
        first = {}
        handle = tower.visual.ln_pre.register_forward_hook(lambda _m, _a, out: first.setdefault(0, out))
        try:
            blocks = [layer for layer in layers if layer != 0]
            states = tower.hidden_states(px, blocks or [1])  # each (N, 1+P, Dv)
        finally:
            handle.remove()
        by_layer = {0: first[0], **dict(zip(blocks, states))}
        rec.vision = {a: by_layer[layer].detach() for a, layer in zip(asked, layers)}
    return hook


@contextlib.contextmanager
def capture(model: LlavaModel, *, vision_layers: Sequence[int] = (), projector: bool = True,
            decoder: bool = True, attention: bool | Sequence[int] = False,
            queries: Sequence[int] | torch.Tensor | None = None,
            keys: Sequence[int] | torch.Tensor | None = None) -> Iterator[Captured]:
    """Record a forward pass of `model` run inside the block:

        with capture(model, vision_layers=[-2], attention=True, queries=[-1], keys=image_positions(...)) as cap:
            logits = model(ids, px)
        cap.vision[-2]   # (N, 1+P, Dv)
        cap.attention[0] # (L, H, Q, K)

    attention: True for every decoder block, or a list of blocks. queries: positions among the
    pass's new tokens (None: all); keys: key slots (None: all). Positions may be negative.
    The weights need (B, H, Q, S) float32 per layer while they are computed."""
    tower_layers = model.cfg.vision.num_hidden_layers
    asked = list(vision_layers)
    vis = _layer_list(asked, tower_layers + 1, "vision layer")
    blocks = model.language_model.layers
    if attention is True:
        attn_layers = list(range(len(blocks)))
    elif attention is False or attention is None:
        attn_layers = []
    else:
        attn_layers = list(dict.fromkeys(_layer_list(list(attention), len(blocks), "decoder layer")))
    rec = Captured(attention_layers=attn_layers)
    handles = []
    try:
        if vis:
            handles.append(model.vision_tower.register_forward_hook(_vision_hook(vis, asked, rec)))
        if projector:
            handles.append(model.projector.register_forward_hook(
                lambda _m, _a, out: setattr(rec, "projector", out.detach())))
        if decoder:
            handles.append(blocks[0].register_forward_pre_hook(
                lambda _m, args: setattr(rec, "decoder", [args[0].detach()])))
            for block in blocks:
                handles.append(block.register_forward_hook(lambda _m, _a, out: rec.decoder.append(out.detach())))
        for i in attn_layers:
            handles += _attention_hooks(blocks[i].self_attn, rec, queries, keys)
        yield rec
    finally:
        for h in handles:
            h.remove()


def image_positions(model: LlavaModel, input_ids: torch.Tensor) -> torch.Tensor:
    """(N*M,) positions of the image tokens of a one-row prompt (ids (T,) or (1, T)), in reading order."""
    ids = input_ids.reshape(-1) if input_ids.dim() == 1 or input_ids.shape[0] == 1 else None
    if ids is None:
        raise ValueError(f"image_positions takes one prompt, got input_ids of shape {tuple(input_ids.shape)}")
    return (ids == model.cfg.image_token_index).nonzero().reshape(-1)


# --- a question, its answer, and the positions that chose the answer ---------------------------------


@dataclass
class AnsweredPrompt:
    input_ids: torch.Tensor  # (1, T + n): the prompt followed by the answer's n tokens
    pixel_values: torch.Tensor  # (1, 3, H, W)
    prompt_len: int  # T
    answer_ids: list[int]  # n tokens, EOS excluded
    answer: str

    @property
    def choosing_positions(self) -> list[int]:
        """The query positions whose logits chose each answer token: T-1 .. T+n-2."""
        return list(range(self.prompt_len - 1, self.prompt_len - 1 + len(self.answer_ids)))


@torch.inference_mode()
def answer_prompt(model: LlavaModel, processor, image, question: str,
                  answer_tokens: Sequence[int] | str | None = None, max_new_tokens: int = 32) -> AnsweredPrompt:
    """Encode one question about one image and append an answer: `answer_tokens` as given (ids, or
    text to tokenize), else the model's greedy answer cut at its first EOS."""
    if not question or not question.strip():
        raise ValueError("the probe needs a question")
    enc = processor(text=processor.prompt(question.strip(), 1), images=[image], return_tensors="pt")
    ids = enc["input_ids"].to(model.device)  # (1, T)
    px = enc["pixel_values"].to(model.device, model.dtype)  # (1, 3, H, W)
    eos = model.cfg.text.eos_token_ids
    if answer_tokens is None:
        params = SamplingParams(max_new_tokens=max_new_tokens)
        tokens = []
        for step in generate_tokens(model, ids, params, eos, px):
            if int(step[0]) in eos:
                break
            tokens.append(int(step[0]))
    elif isinstance(answer_tokens, str):
        tokens = processor.tokenizer.encode(answer_tokens, add_special_tokens=False)
    else:
        tokens = [int(t) for t in answer_tokens]
    if not tokens:
        raise ValueError("the answer is empty (the model stopped at once, or no answer tokens were given); "
                         "there is nothing to probe from")
    vocab = model.cfg.text.vocab_size
    if not all(0 <= t < vocab for t in tokens):
        raise ValueError(f"answer_tokens {tokens}: ids must lie in 0..{vocab - 1}")
    if model.cfg.image_token_index in tokens:
        raise ValueError(f"answer_tokens hold the image token (id {model.cfg.image_token_index}), "
                         "which only the processor may place")
    full = torch.cat([ids, torch.tensor([tokens], dtype=ids.dtype, device=ids.device)], dim=1)  # (1, T + n)
    text = processor.tokenizer.decode(tokens, skip_special_tokens=True).strip()
    return AnsweredPrompt(full, px, ids.shape[1], tokens, text)


# --- attention over the image ---------------------------------------------------------------------


@dataclass
class ImageAttention:
    map: torch.Tensor  # (grid_h, grid_w) float32: mean attention weight per patch
    answer: str
    answer_ids: list[int]
    layers: list[int]  # decoder blocks averaged
    box: tuple[float, float, float, float]  # (left, top, right, bottom) of the grid in the image's pixels


def image_attention(model: LlavaModel, processor, image, question: str, *,
                    answer_tokens: Sequence[int] | str | None = None, layers: Sequence[int] | None = None,
                    heads: Sequence[int] | None = None, max_new_tokens: int = 32) -> ImageAttention:
    """Attention from the answer to the image's patches: the greedy answer (or `answer_tokens`) is
    appended to the prompt and the whole sequence is run once under `capture`; the weights from the
    positions that chose each answer token to the image tokens are averaged over those queries and
    over `layers` (default all) and `heads` (default all)."""
    text = model.cfg.text
    layers = True if layers is None else _layer_list(list(layers), text.num_hidden_layers, "decoder layer")
    head_idx = None if heads is None else _layer_list(list(heads), text.num_attention_heads, "attention head")
    image = load_image(image)
    run = answer_prompt(model, processor, image, question, answer_tokens, max_new_tokens)
    img = image_positions(model, run.input_ids)  # (M,)
    with torch.inference_mode(), capture(model, projector=False, decoder=False, attention=layers,
                                         queries=run.choosing_positions, keys=img) as cap:
        model(run.input_ids, run.pixel_values)
    w = cap.attention[0]  # (La, H, Q, M)
    if head_idx is not None:
        w = w[:, head_idx]
    attn_map = on_grid(model, w.mean(dim=(0, 1, 2))).cpu()  # (M,) -> (grid_h, grid_w)
    return ImageAttention(attn_map, run.answer, run.answer_ids, cap.attention_layers,
                          image_box(processor, image.size))


def on_grid(model, per_token: torch.Tensor) -> torch.Tensor:
    """Values per image token (..., M) laid out on the image's grid (..., g, g), row-major as the
    patches; the "full" strategy's CLS, which has no place on the image, is dropped."""
    if model.vision_tower.keep_cls:
        per_token = per_token[..., 1:]
    n = per_token.shape[-1]
    grid = math.isqrt(n)  # patches, or a pooled grid (avgpool, cabstractor, ldp)
    if grid * grid != n:
        raise ValueError(f"projector {model.cfg.projector.kind!r} emits {n} tokens per image, not a square "
                         "grid: its tokens have no place on the image (e.g. a resampler's queries)")
    return per_token.reshape(*per_token.shape[:-1], grid, grid)


def image_box(processor, size: tuple[int, int]) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) in the original image's pixels of the square the vision tower saw,
    after the processor's pad / resize / centre crop. It may reach past the image's edges."""
    c = processor.image_cfg
    w, h = size
    x0 = y0 = 0.0
    if processor.image_aspect_ratio == "pad" and w != h:  # pasted centred on a square (expand_to_square)
        s = max(w, h)
        x0, y0 = -float((s - w) // 2), -float((s - h) // 2)
        w = h = s
    rw, rh = resize_size((w, h), c.shortest_edge, c.resize_hw) if c.do_resize else (w, h)
    sx, sy = w / rw, h / rh
    if c.do_center_crop:
        ch, cw = c.crop_hw
        left = (rw - cw) // 2 if rw >= cw else -((cw - rw + 1) // 2)  # center_crop's offsets
        top = (rh - ch) // 2 if rh >= ch else -((ch - rh + 1) // 2)
    else:
        left, top, cw, ch = 0, 0, rw, rh
    return (x0 + left * sx, y0 + top * sy, x0 + (left + cw) * sx, y0 + (top + ch) * sy)


# A hand-written colour ramp, dark blue -> cyan -> yellow -> red: (position in [0, 1], RGB).
# --- logit lens -------------------------------------------------------------------------------------


@dataclass
class LogitLens:
    positions: list[int]  # P positions in the sequence
    top_ids: torch.Tensor  # (L+1, P, k): row 0 reads the input embeddings, row l block l's output
    top_probs: torch.Tensor  # (L+1, P, k)
    chosen: torch.Tensor  # (P,) the token the model finally predicts at each position (argmax)
    chosen_probs: torch.Tensor  # (L+1, P) its probability as read at each layer


@torch.inference_mode()
def logit_lens(model: LlavaModel, ids: torch.Tensor, pixel_values: torch.Tensor | None,
               positions: Sequence[int] | torch.Tensor | None, k: int = 5) -> LogitLens:
    """For one prompt (ids (1, T)), apply the final RMSNorm and lm_head to every layer's hidden state
    at `positions` (None: all) -> top-k tokens per layer and the probability of the finally chosen token."""
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise ValueError(f"logit_lens takes one prompt, ids (1, T); got shape {tuple(ids.shape)}")
    dec = model.language_model
    if not 1 <= k <= dec.cfg.vocab_size:
        raise ValueError(f"k={k}: must be in 1..{dec.cfg.vocab_size}")
    pos = _positions(positions, ids.shape[1], "lens", ids.device)  # (P,)
    with capture(model, projector=False) as cap:
        model(ids, pixel_values)
    hs = torch.stack([h[0, pos] for h in cap.decoder])  # (L+1, P, C)
    probs = dec.lm_head(dec.norm(hs)).float().softmax(dim=-1)  # (L+1, P, V)
    top_probs, top_ids = probs.topk(k, dim=-1)  # (L+1, P, k)
    chosen = top_ids[-1, :, 0]  # (P,)
    chosen_probs = probs.gather(-1, chosen.expand(hs.shape[0], -1)[..., None])[..., 0]  # (L+1, P)
    return LogitLens(pos.tolist(), top_ids.cpu(), top_probs.cpu(), chosen.cpu(), chosen_probs.cpu())


# --- nearest vocabulary tokens -------------------------------------------------------------------


@torch.inference_mode()
def nearest_tokens(model: LlavaModel, image_features: torch.Tensor,
                   k: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """For each feature vector (..., C), e.g. the projected image tokens (N, M, C), the k vocabulary
    tokens whose input embeddings are nearest by cosine similarity -> (ids (..., k), cosines (..., k))."""
    emb = model.language_model.embed_tokens.weight  # (V, C)
    V, C = emb.shape
    if image_features.shape[-1] != C:
        raise ValueError(f"features of width {image_features.shape[-1]} cannot be compared with the "
                         f"decoder's {C}-wide token embeddings")
    if not 1 <= k <= V:
        raise ValueError(f"k={k}: must be in 1..{V}")
    f = F.normalize(image_features.reshape(-1, C).to(emb.device).float(), dim=-1)  # (n, C)
    sims = f @ F.normalize(emb.float(), dim=-1).T  # (n, V)
    top, ids = sims.topk(k, dim=-1)  # (n, k)
    shape = (*image_features.shape[:-1], k)
    return ids.reshape(shape), top.reshape(shape)
