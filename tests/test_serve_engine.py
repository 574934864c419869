"""The continuous-batching engine: requests that join a running batch (also while others are
mid-decode, with longer prompts that shift the batch, and past a full cache that must compact)
get exactly the tokens `generate` gives each of them alone (greedy, and seeded sampling)."""

import pytest
import torch

from llava_core.model.kv_cache import ContextOverflowError
from llava_core.runtime.batching import BatchEngine, Job, image_digest
from llava_core.runtime.decode import SamplingParams, generate_tokens
from llava_core.testing import random_image

image = random_image


def make_job(processor, question, images=(), ignore_eos=False, **sampling):
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": question}]
    ids = processor.tokenize(processor.apply_chat_template([{"role": "user", "content": content}]))
    px = processor.preprocess(list(images)) if images else None
    keys = tuple(image_digest(p) for p in px) if px is not None else ()
    return Job(ids, SamplingParams(**sampling), px, keys, ignore_eos=ignore_eos)


def alone(model, job):
    """The reference: `generate_tokens` for this one prompt, cut at EOS."""
    ids = torch.tensor([job.prompt_ids])
    out = []
    for step in generate_tokens(model, ids, job.params, model.cfg.text.eos_token_ids, job.pixel_values):
        if int(step[0]) in model.cfg.text.eos_token_ids:
            break
        out.append(int(step[0]))
    return out


def run_until_done(engine, jobs, max_steps=2000):
    for _ in range(max_steps):
        if all(j.finish_reason for j in jobs):
            return
        engine.step()
    raise AssertionError("the engine did not finish")


def test_joining_requests_match_one_at_a_time(model, processor):
    engine = BatchEngine(model, processor.tokenizer, max_batch=4)
    first = [make_job(processor, "What is in the image?", [image(1)], max_new_tokens=20),
             make_job(processor, "Describe the picture.", max_new_tokens=14)]
    late = [make_job(processor, "How many shapes are there? Read all the text in the image.", [image(2, (200, 300))],
                     max_new_tokens=16),  # longer than the running batch: shifts it right
            make_job(processor, "yes or no?", max_new_tokens=9),  # shorter: right-aligned in its row
            make_job(processor, "What is the total?", [image(3)], max_new_tokens=12)]  # waits for a free row
    for j in first:
        engine.submit(j)
    for _ in range(5):  # both admitted and decoding
        engine.step()
    assert engine.active == 2 and all(j.output_ids for j in first)
    for j in late:
        engine.submit(j)
    run_until_done(engine, first + late)
    assert engine.stats["prefills"] == 5 and engine.active == 0
    assert engine.stats["shifts"] >= 1  # a longer prompt joined mid-decode
    assert engine.stats["resizes"] >= 2 and engine.stats["max_active"] == 4  # widened 1 -> 2 -> 4 while decoding
    for j in first + late:
        assert j.output_ids == alone(model, j)
        assert j.finish_reason in ("stop", "length")
        assert (j.finish_reason == "length") == (len(j.output_ids) == j.params.max_new_tokens)


def test_a_full_cache_compacts_and_answers_stay_equal(model, processor):
    engine = BatchEngine(model, processor.tokenizer, max_batch=3, max_len=64, prefix_entries=0)
    jobs = [make_job(processor, q, max_new_tokens=n) for q, n in
            [("What is in the image?", 30), ("yes", 25), ("Describe the picture in one sentence.", 20),
             ("left or right?", 28)]]
    engine.submit(jobs[0])
    for j in jobs[1:]:
        for _ in range(7):
            engine.step()
        engine.submit(j)
    lengths = []
    for _ in range(500):
        if all(j.finish_reason for j in jobs):
            break
        engine.step()
        lengths.append(engine.cache.length)
    assert max(lengths) == 64 and engine.stats["compactions"] >= 1  # it filled and compacted
    for j in jobs:
        assert j.output_ids == alone(model, j)


def test_the_cache_grows_from_a_few_slots_and_shrinks_when_idle(model, processor):
    engine = BatchEngine(model, processor.tokenizer, max_batch=2, prefix_entries=0, slots=16)
    assert engine.cache.max_len == 16
    jobs = [make_job(processor, "Describe the picture in one sentence.", max_new_tokens=20),  # outgrows 16 slots
            make_job(processor, "What is in the image?", [image(1)], max_new_tokens=12)]  # joins: a longer prompt
    engine.submit(jobs[0])
    for _ in range(8):
        engine.step()
    engine.submit(jobs[1])
    sizes = []
    while not all(j.finish_reason for j in jobs):
        engine.step()
        sizes.append(engine.cache.max_len)
    need = max(len(j.prompt_ids) + len(j.output_ids) for j in jobs)
    assert engine.stats["grows"] >= 2 and need <= max(sizes) < 2 * need  # doubled as needed, not to the context
    assert engine.cache.max_len == 16 and engine.cache.length == 0  # idle: back to its first size
    for j in jobs:
        assert j.output_ids == alone(model, j)


def test_engine_rejects_zero_slots(model, processor):
    with pytest.raises(ValueError, match="slots=0"):
        BatchEngine(model, processor.tokenizer, slots=0)


def test_seeded_sampling_rows_beside_greedy_rows(model, processor):
    engine = BatchEngine(model, processor.tokenizer, max_batch=3)
    sampled = make_job(processor, "What is in the image?", [image(4)], max_new_tokens=15, temperature=0.9,
                       top_p=0.9, seed=7)
    greedy = make_job(processor, "Describe the picture.", [image(5)], max_new_tokens=15)
    engine.submit(greedy)
    engine.step()
    engine.submit(sampled)
    run_until_done(engine, [sampled, greedy])
    assert sampled.output_ids == alone(model, sampled)
    assert greedy.output_ids == alone(model, greedy)


def test_a_later_turn_reuses_the_cached_prefix(model, processor):
    engine = BatchEngine(model, processor.tokenizer, max_batch=2)
    im = image(6)
    first = make_job(processor, "What is in the image?", [im], max_new_tokens=6)
    engine.submit(first)
    run_until_done(engine, [first])
    answer = processor.tokenizer.decode(first.output_ids, skip_special_tokens=True)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]},
                {"role": "assistant", "content": answer},
                {"role": "user", "content": "And the colours?"}]
    ids = processor.tokenize(processor.apply_chat_template(messages))
    px = processor.preprocess([im])
    second = Job(ids, SamplingParams(max_new_tokens=8), px, (image_digest(px[0]),))
    other = Job(ids, SamplingParams(max_new_tokens=8), processor.preprocess([image(7)]), ("another",))
    engine.submit(second)
    run_until_done(engine, [second])
    engine.submit(other)
    run_until_done(engine, [other])
    assert second.cached_tokens >= len(first.prompt_ids)  # at least the whole first prompt, image included
    assert other.cached_tokens < ids.index(model.cfg.image_token_index) + 1  # a different image: not reused
    assert second.output_ids == alone(model, second)


def test_cancel_frees_the_row_and_limits_are_checked(model, processor):
    engine = BatchEngine(model, processor.tokenizer, max_batch=2, max_len=64)
    events = []
    job = make_job(processor, "Describe the picture.", max_new_tokens=20)
    job.on_event = events.append
    engine.submit(job)
    engine.step()
    engine.step()
    assert engine.active == 1
    engine.cancel(job)
    engine.step()
    assert engine.active == 0 and job.finish_reason == "cancelled" and events[-1].finish_reason == "cancelled"
    with pytest.raises(ContextOverflowError, match="context holds 64"):
        engine.submit(make_job(processor, "Describe the picture.", max_new_tokens=60))
    with pytest.raises(ValueError, match="repetition penalty"):
        engine.submit(make_job(processor, "hi", max_new_tokens=4, repetition_penalty=1.2))


def test_the_thread_serves_calls_between_steps(model, processor):
    engine = BatchEngine(model, processor.tokenizer, max_batch=2).start()
    try:
        job = make_job(processor, "What is in the image?", max_new_tokens=5)
        got = []
        done = __import__("threading").Event()
        job.on_event = lambda e: (got.append(e), e.finish_reason and done.set())
        engine.submit(job)
        assert engine.call(lambda: 41 + 1).result(timeout=10) == 42
        assert done.wait(10)
        assert "".join(e.text for e in got) == processor.tokenizer.decode(job.output_ids, skip_special_tokens=True)
    finally:
        engine.stop()


def test_stopping_tells_every_job_why(model, processor):
    engine = BatchEngine(model, processor.tokenizer, max_batch=1).start()
    running, waiting = (make_job(processor, "Describe the picture.", max_new_tokens=1000, ignore_eos=True)
                        for _ in range(2))
    heard = {}
    for name, job in (("running", running), ("waiting", waiting)):
        job.on_event = lambda e, name=name: e.finish_reason and heard.setdefault(name, e.finish_reason)
        engine.submit(job)
    for _ in range(500):
        if running.output_ids:
            break
        __import__("time").sleep(0.01)
    engine.stop()
    assert heard == {"running": "cancelled", "waiting": "cancelled"} and engine.active == 0
