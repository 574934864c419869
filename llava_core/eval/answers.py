"""Answers for scoring: batched greedy generation on the chat template."""

from __future__ import annotations

from ..runtime.decode import SamplingParams, generate_tokens


def answer_batch(model, processor, conversations: list[list[dict]], images: list[list],
                 max_new_tokens: int = 24) -> list[str]:
    """Greedy answers to a batch of conversations (each ending on a user turn), each with its
    images (one list per conversation, in the order its turns show them)."""
    texts = [processor.apply_chat_template(c, add_generation_prompt=True) for c in conversations]
    enc = processor(text=texts, images=images if any(images) else None, return_tensors="pt", padding=True)
    px = enc.get("pixel_values")
    px = None if px is None else px.to(model.device, model.dtype)
    params = SamplingParams(max_new_tokens=max_new_tokens)
    pad = model.cfg.text.pad_token_id if model.cfg.text.pad_token_id is not None else 0
    rows: list[list[int]] = [[] for _ in conversations]
    for tokens in generate_tokens(model, enc["input_ids"].to(model.device), params, model.cfg.text.eos_token_ids,
                                  px, enc["attention_mask"].to(model.device), pad):
        for r, t in enumerate(tokens.tolist()):
            rows[r].append(t)
    return [processor.tokenizer.decode(row, skip_special_tokens=True, clean_up_tokenization_spaces=False).strip()
            for row in rows]


def sample_conversation(sample: dict) -> list[dict]:
    """A synthetic sample's conversation up to its last question, the image in the first user turn."""
    turns = [dict(t) for t in sample["conversation"][:-1]]  # drop the answer being scored
    turns[0]["content"] = [{"type": "image"}, {"type": "text", "text": turns[0]["content"]}]
    return turns


def batches(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]
