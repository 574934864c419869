"""Synthetic samples -> training tensors: images, chat sequences with answer-only labels, batches.

Sample `i` of a stage is `make_sample(split, offset + i, config)`, so the data of a step is a
pure function of the step index (resume and determinism need nothing else). Batches are
length-bucketed: a window of `bucket` batches is generated, sorted by length and cut into
batches, which are then taken in a seeded order; padding is on the right, so a causal
decoder needs no attention mask (real tokens never look ahead at the padding).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

from ..data import DataConfig, make_sample
from ..data.mirror import mirror_sample

IGNORE = -100


def images_to_tensor(images, mean, std) -> torch.Tensor:
    """Square PIL images already at the tower's size -> (N, 3, H, W) float32, normalised.

    The same numbers as LlavaProcessor.preprocess for images of the crop size (its resize is
    then a copy): rescale in float64, cast to float32, then (x - mean) / std in float32."""
    x = np.stack([np.asarray(im.convert("RGB")) for im in images])  # (N, H, W, 3) uint8
    x = torch.from_numpy(x).to(torch.float64).mul_(1 / 255).to(torch.float32)
    x = (x - torch.tensor(mean, dtype=torch.float32)) / torch.tensor(std, dtype=torch.float32)
    return x.permute(0, 3, 1, 2).contiguous()  # (N, H, W, 3) -> (N, 3, H, W)


def chat_messages(conversation: list[dict]) -> list[dict]:
    """The data's {"role", "content": str} turns -> chat-template messages, the image in turn one."""
    out = []
    for i, m in enumerate(conversation):
        content = [{"type": "text", "text": m["content"]}]
        if i == 0:
            content = [{"type": "image"}] + content
        out.append({"role": m["role"], "content": content})
    return out


@dataclass
class Encoded:
    ids: list[int]  # image placeholder expanded to n_image_tokens ids
    labels: list[int]  # IGNORE except on assistant tokens (answers and their end marker)
    segments: list[int] | None = None  # packed independent turns: 0 shared prefix, k turn k


def encode_conversation(processor, conversation: list[dict], max_len: int | None = None) -> Encoded:
    """Render with the processor's chat template; label the assistant turns only.

    An assistant turn's tokens are those starting between the end of the prompt that asks for
    it (rendered with add_generation_prompt) and the end of the conversation rendered up to
    and including it, so the template's end-of-turn marker is learnt too."""
    msgs = chat_messages(conversation)
    full = processor.apply_chat_template(msgs, add_generation_prompt=False)
    spans = []
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        prompt = processor.apply_chat_template(msgs[:i], add_generation_prompt=True)
        upto = processor.apply_chat_template(msgs[:i + 1], add_generation_prompt=False)
        if not full.startswith(prompt) or not full.startswith(upto):
            raise ValueError("the chat template does not render conversations prefix by prefix; "
                             f"cannot find the answer of turn {i} in {full!r}")
        spans.append((len(prompt), len(upto)))
    tok = processor.tokenizer
    enc = tok(full, add_special_tokens=True, return_offsets_mapping=True)
    n_img = processor.cfg.num_image_tokens
    image_id = processor.image_token_id
    ids, labels = [], []
    for t, (a, _) in zip(enc["input_ids"], enc["offset_mapping"]):
        if t == image_id:
            ids += [t] * n_img
            labels += [IGNORE] * n_img
            continue
        ids.append(t)
        labels.append(t if any(s <= a < e for s, e in spans) else IGNORE)
    if ids.count(image_id) != n_img:
        raise ValueError(f"expected one image placeholder in {full!r}, found {ids.count(image_id) // n_img}")
    if max_len is not None and len(ids) > max_len:
        ids, labels = ids[:max_len], labels[:max_len]
    return Encoded(ids, labels)


def encode_turns(processor, conversation: list[dict], max_len: int | None = None) -> Encoded:
    """Independent questions about one image -> one sequence that answers each as if alone.

    Each (question, answer) pair is encoded as its own one-turn conversation; the tokens all
    of them start with (system prompt, image, ...) are kept once as segment 0, then each
    turn's remaining tokens follow as segment k. With llama.segment_mask every turn reads the
    prefix and itself at the positions it would have alone: k answers for the price of one
    image prefix, and no turn can copy from another."""
    if len(conversation) < 2 or len(conversation) % 2:
        raise ValueError(f"encode_turns: expected (user, assistant) pairs, got {len(conversation)} messages")
    singles = [encode_conversation(processor, conversation[i:i + 2]) for i in range(0, len(conversation), 2)]
    n = min(len(e.ids) for e in singles)
    for e in singles[1:]:  # the longest common prefix ...
        n = next((i for i in range(n) if e.ids[i] != singles[0].ids[i]), n)
    # ... cut before the token that predicts each turn's first answer token
    n = min([n] + [next(i for i, t in enumerate(e.labels) if t != IGNORE) - 1 for e in singles])
    ids, labels, segments = singles[0].ids[:n], [IGNORE] * n, [0] * n
    for k, e in enumerate(singles, 1):
        ids += e.ids[n:]
        labels += e.labels[n:]
        segments += [k] * (len(e.ids) - n)
    if max_len is not None and len(ids) > max_len:
        ids, labels, segments = ids[:max_len], labels[:max_len], segments[:max_len]
    return Encoded(ids, labels, segments)


def encode_sample(processor, sample: dict, max_len: int | None = None) -> Encoded:
    if sample.get("independent"):
        return encode_turns(processor, sample["conversation"], max_len)
    return encode_conversation(processor, sample["conversation"], max_len)


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T), right-padded
    labels: torch.Tensor  # (B, T), IGNORE on prompt, image and padding tokens
    pixel_values: torch.Tensor  # (B, 3, H, W)
    qtypes: list[str]
    segments: torch.Tensor | None = None  # (B, T) when a sample packs independent turns

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]


def collate(encoded: list[Encoded], pixel_values: torch.Tensor, pad_id: int, qtypes: list[str]) -> Batch:
    T = max(len(e.ids) for e in encoded)
    ids = torch.full((len(encoded), T), pad_id, dtype=torch.long)
    labels = torch.full((len(encoded), T), IGNORE, dtype=torch.long)
    segments = None
    if any(e.segments for e in encoded):  # plain samples and padding: segment 0, plain causal
        segments = torch.zeros((len(encoded), T), dtype=torch.long)
    for b, e in enumerate(encoded):
        ids[b, :len(e.ids)] = torch.tensor(e.ids)
        labels[b, :len(e.labels)] = torch.tensor(e.labels)
        if e.segments:  # then segments was made above
            segments[b, :len(e.segments)] = torch.tensor(e.segments)
    return Batch(ids, labels, pixel_values, qtypes, segments)


class ChatBatches:
    """Batch `step` for this rank: samples of `split` from index `offset` on, bucketed by length.

    `mix_at(step)` gives the DataConfig mix for a step (a curriculum); samples of one bucket
    window share the mix of the window's first step. With `mirror_twins`, each odd-numbered
    sample after a shape scene is that scene mirrored left to right, its text saying so
    (data/mirror.py): twins are about equally long, so they mostly share a batch."""

    def __init__(self, processor, data: DataConfig, batch_size: int, mix_at=None, split: str = "train",
                 offset: int = 0, bucket: int = 8, max_len: int | None = None, seed: int = 0,
                 rank: int = 0, world: int = 1, turns: int = 1, mirror_twins: bool = False):
        self.processor, self.data, self.batch_size, self.turns = processor, data, batch_size, turns
        self.mirror_twins = mirror_twins
        self.mix_at = mix_at
        self.split, self.offset, self.bucket, self.max_len = split, offset, bucket, max_len
        self.seed, self.rank, self.world = seed, rank, world
        ic = processor.image_cfg
        self.mean, self.std = ic.image_mean, ic.image_std
        pad = processor.pad_token_id
        self.pad_id = pad if pad is not None else 0
        self._window: tuple[int, list[Batch]] | None = None

    def _config(self, step: int) -> DataConfig:
        if self.mix_at is None:
            return self.data
        from dataclasses import replace
        return replace(self.data, mix=dict(self.mix_at(step)))

    def __call__(self, step: int) -> Batch:
        w = step // self.bucket
        if self._window is None or self._window[0] != w:
            self._window = (w, self._make_window(w))
        return self._window[1][step % self.bucket]

    def _make_window(self, w: int) -> list[Batch]:
        cfg = self._config(w * self.bucket)
        n = self.batch_size * self.bucket
        first = self.offset + (w * self.world + self.rank) * n
        samples = []
        for i in range(n):
            twin = self.mirror_twins and i % 2 and samples[-1]["meta"]["kind"] == "shapes"
            samples.append(mirror_sample(samples[-1]) if twin else make_sample(self.split, first + i, cfg, self.turns))
        enc = [encode_sample(self.processor, s, self.max_len) for s in samples]
        order = sorted(range(n), key=lambda i: (len(enc[i].ids), i))
        chunks = [order[k:k + self.batch_size] for k in range(0, n, self.batch_size)]
        random.Random(f"{self.seed}:{w}").shuffle(chunks)
        out = []
        for idx in chunks:
            px = images_to_tensor([samples[i]["image"] for i in idx], self.mean, self.std)
            out.append(collate([enc[i] for i in idx], px, self.pad_id, [samples[i]["qtype"] for i in idx]))
        return out


def answer_loss(model, batch: Batch, image_features: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Cross-entropy on the labelled tokens only, the lm_head run only at those positions.

    Per-answer normalisation: the mean over each answer's tokens (a run of labelled tokens),
    then the mean over answers, so a long caption weighs as much as a one-word answer and a
    conversation of eight answers as much as eight single-answer samples."""
    ids, labels = batch.input_ids, batch.labels
    embeds = model.embed(ids, image_features=image_features)  # (B, T, C)
    hidden = model.language_model(embeds, segments=batch.segments)  # (B, T, C); right padding: causal suffices
    targets = labels[:, 1:]  # position t predicts token t+1
    sel = targets != IGNORE  # (B, T-1)
    h = hidden[:, :-1][sel]  # (N, C), N labelled tokens
    logits = model.logits(h).float()  # (N, V)
    tok_loss = torch.nn.functional.cross_entropy(logits, targets[sel], reduction="none")  # (N,)
    starts = sel & ~torch.nn.functional.pad(sel[:, :-1], (1, 0))  # (B, T-1) first token of each answer
    answer = (starts.flatten().cumsum(0) - 1).view_as(sel)[sel]  # (N,) answer index of each token
    n_answers = int(starts.sum())
    per_answer = torch.bincount(answer, minlength=n_answers)  # (n_answers,) tokens of each answer
    loss = (tok_loss / per_answer[answer].to(tok_loss.dtype)).sum() / max(1, n_answers)
    with torch.no_grad():
        correct = (logits.argmax(-1) == targets[sel])
        wrong = torch.zeros(n_answers, dtype=torch.long, device=answer.device).index_add_(0, answer, (~correct).long())
        exact = wrong == 0
    return loss, {"token_acc": round(float(correct.float().mean()), 4),
                  "exact": round(float(exact.float().mean()), 4) if n_answers else 0.0,
                  "tokens": int(sel.sum()), "answers": n_answers}
