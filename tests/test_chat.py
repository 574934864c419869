"""Multi-turn chat: the kept cache gives the same logits as re-running the whole conversation."""

import pytest
import torch

from llava_core.model.kv_cache import ContextOverflowError
from llava_core.runtime.chat import ChatSession
from llava_core.runtime.generate import generate
from llava_core.testing import random_image

TOL = 1e-4  # fp32


image = random_image


def full_logits(model, processor, session):
    """Last-position logits of one fresh forward over the whole conversation."""
    ids = torch.tensor([session.prompt_ids()])
    px = processor.preprocess(session.images)
    with torch.no_grad():
        return model(ids, px)[:, -1]


def count_tower_calls(model):
    calls = []
    original = model.vision_tower.forward
    model.vision_tower.forward = lambda px: calls.append(px.shape[0]) or original(px)
    return calls, lambda: setattr(model.vision_tower, "forward", original)


def test_turn_two_through_kept_cache_equals_full_prefill(model, processor):
    chat = ChatSession(model, processor, images=image(0))
    chat.ask("What is in the image?", max_new_tokens=6)
    used = chat.tokens_used
    calls, restore = count_tower_calls(model)
    try:
        chat.messages.append({"role": "user", "content": [{"type": "text", "text": "And the colour?"}]})
        cached = chat.prefill(chat.prompt_ids())
    finally:
        restore()
    assert calls == []  # the image was not encoded again
    assert chat.tokens_used > used
    assert (cached - full_logits(model, processor, chat)).abs().max() <= TOL


def test_image_added_in_a_later_turn(model, processor):
    chat = ChatSession(model, processor, images=image(1))
    chat.ask("Describe it.", max_new_tokens=4)
    calls, restore = count_tower_calls(model)
    try:
        chat.messages.append({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "And this?"}]})
        chat.images.append(image(2))
        cached = chat.prefill(chat.prompt_ids())
    finally:
        restore()
    assert calls == [1]  # only the new image went through the tower
    assert (cached - full_logits(model, processor, chat)).abs().max() <= TOL


def test_first_turn_equals_one_shot_generate(model, processor):
    im = image(3)
    chat = ChatSession(model, processor, images=im)
    assert chat.ask("What is this?", max_new_tokens=8) == generate(model, processor, "What is this?", im,
                                                                  max_new_tokens=8)


def test_regenerate_and_undo_roll_back_to_the_same_greedy_answer(model, processor):
    chat = ChatSession(model, processor, images=image(4))
    chat.ask("First question?", max_new_tokens=5)
    second = chat.ask("Second question?", max_new_tokens=7)
    length = chat.tokens_used
    assert chat.regenerate(max_new_tokens=7) == second
    assert chat.tokens_used == length
    chat.undo()
    assert [h["role"] for h in chat.history()] == ["user", "assistant"]
    assert chat.ask("Second question?", max_new_tokens=7) == second


def test_undo_of_a_turn_with_an_image_forgets_that_image(model, processor):
    chat = ChatSession(model, processor, images=image(5))
    chat.ask("One?", max_new_tokens=3)
    chat.ask("Two?", image=image(6), max_new_tokens=3)
    chat.undo()
    assert len(chat.images) == 1 and len(chat.features) == 1
    chat.messages.append({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Two?"}]})
    chat.images.append(image(7))  # another picture where the undone one was
    cached = chat.prefill(chat.prompt_ids())
    assert (cached - full_logits(model, processor, chat)).abs().max() <= TOL


def test_history_is_plain_data_and_reset_forgets(model, processor):
    chat = ChatSession(model, processor, images=image(8))
    answer = chat.ask("Hi?", max_new_tokens=3)
    assert chat.history() == [{"role": "user", "text": "Hi?", "images": 1},
                              {"role": "assistant", "text": answer, "images": 0}]
    chat.reset()
    assert chat.history() == [] and chat.tokens_used == 0 and chat.images == []


def test_context_overflow_names_the_counts(model, processor):
    chat = ChatSession(model, processor, images=image(9), max_context=600)
    with pytest.raises(ContextOverflowError, match=r"uses \d+ tokens .* 600 are allowed"):
        chat.ask("What is in the image?", max_new_tokens=64)
    assert chat.history() == []  # the turn that did not fit is not kept


def test_empty_message_is_refused(model, processor):
    with pytest.raises(ValueError, match="empty"):
        ChatSession(model, processor).ask("   ")
