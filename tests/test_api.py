"""The public names of README's Python API, as a user calls them."""

import importlib

from PIL import Image

import llava_core as lc


def test_generate_is_the_function_even_after_its_module_is_imported(tiny_ckpt):
    importlib.import_module("llava_core.runtime.generate")  # a module named generate, one level down
    importlib.import_module("llava_core.runtime.chat")
    from llava_core.runtime.decode import prefill  # the module stays importable by name
    assert callable(prefill)
    model, processor = lc.load_pretrained(tiny_ckpt), lc.LlavaProcessor.from_pretrained(tiny_ckpt)
    image = Image.new("RGB", (120, 90), "blue")
    answer = lc.generate(model, processor, "What colour?", image, max_new_tokens=4)
    assert isinstance(answer, str)
    assert answer == lc.generate(model, processor, ["What colour?"], [image], max_new_tokens=4)[0]
    assert "".join(lc.stream(model, processor, "What colour?", image, max_new_tokens=4)).strip() == answer
    assert sorted(lc.__all__) == lc.__all__ and all(getattr(lc, n) is not None for n in lc.__all__)
