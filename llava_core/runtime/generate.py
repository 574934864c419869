"""The jobs of a vision assistant on top of the generation loop: one-shot answers, streams,
batches, and the task prompts (captions, visual questions, OCR, document questions).
"""

from __future__ import annotations

from typing import Iterator

from .decode import SamplingParams, TextStream, find_stop, generate_tokens

# Task prompts: {question} is the user's text; tasks without it take none.
TASKS = {
    "vqa": "{question}",
    "caption": "Describe the image in one short sentence.",
    "detailed_caption": "Describe the image in detail: name every object, its colour and where it is.",
    "ocr": "Read all the text in the image.",
    "document": "Look at the document in the image and answer: {question}",
}


def task_prompt(task: str, question: str | None = None) -> str:
    if task not in TASKS:
        raise ValueError(f"task {task!r} is unknown; known: {', '.join(TASKS)}")
    template = TASKS[task]
    if "{question}" in template:
        if not question or not question.strip():
            raise ValueError(f"task {task!r} needs a question")
        return template.format(question=question.strip())
    return template if not question else f"{template} {question.strip()}"


def _as_batch(prompts, images):
    single = isinstance(prompts, str)
    prompts = [prompts] if single else list(prompts)
    if images is None:
        images = [[] for _ in prompts]
    elif single and not (isinstance(images, list) and len(images) and isinstance(images[0], list)):
        images = [images if isinstance(images, list) else [images]]
    else:
        images = [im if isinstance(im, list) else [im] for im in images]
    if len(images) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(images)} image lists")
    for p in prompts:
        if not p or not p.strip():
            raise ValueError("empty prompt: ask something about the image")
    return single, prompts, images


def _encode(model, processor, prompts, images):
    texts = [processor.prompt(p, len(im)) for p, im in zip(prompts, images)]
    flat = [im for row in images for im in row]
    enc = processor(text=texts, images=flat or None, return_tensors="pt", padding=True)
    dev = model.device
    px, sizes = enc.get("pixel_values"), enc.get("image_sizes")  # image_sizes: llava_next only
    return (enc["input_ids"].to(dev), enc["attention_mask"].to(dev),
            None if px is None else px.to(dev, model.dtype), sizes)


def generate(model, processor, prompts, images=None, **sampling) -> str | list[str]:
    """Answer one prompt (str) or a batch (list of str), each with its image(s).

    images: for one prompt an image or a list of images; for a batch a list with one
    image (or list of images) per prompt. Images are paths, PIL images or arrays.
    Sampling options are SamplingParams' fields (max_new_tokens, temperature, top_k, top_p,
    repetition_penalty, seed, stop_strings)."""
    single, prompts, images = _as_batch(prompts, images)
    params = SamplingParams(**sampling)
    ids, mask, px, sizes = _encode(model, processor, prompts, images)
    tok = processor.tokenizer
    pad = model.cfg.text.pad_token_id if model.cfg.text.pad_token_id is not None else 0
    rows: list[list[int]] = [[] for _ in prompts]
    for tokens in generate_tokens(model, ids, params, model.cfg.text.eos_token_ids, px, mask, pad,
                                  image_sizes=sizes):
        for r, t in enumerate(tokens.tolist()):
            rows[r].append(t)
    answers = []
    for row in rows:
        text = tok.decode(row, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        cut = find_stop(text, params.stop_strings)
        answers.append((text if cut < 0 else text[:cut]).strip())
    return answers[0] if single else answers


def stream(model, processor, prompt: str, images=None, **sampling) -> Iterator[str]:
    """Yield the answer to one prompt as text pieces, each final when yielded."""
    _, prompts, images = _as_batch(prompt, images)
    params = SamplingParams(**sampling)
    ids, mask, px, sizes = _encode(model, processor, prompts, images)
    out = TextStream(processor.tokenizer, params.stop_strings)
    yield from out.follow(generate_tokens(model, ids, params, model.cfg.text.eos_token_ids, px, mask,
                                          image_sizes=sizes))
