"""llava_core: LLaVA rebuilt from its parts (open_clip ViT, MLP projector, LLaMA decoder).

The public surface, documented in the README:
    load_pretrained(path, dtype=None, device="cpu") -> LlavaModel
    LlavaProcessor.from_pretrained(path)
    generate(model, processor, prompts, images, **sampling) / stream(...)
    ChatSession(model, processor, images)
Names are imported on first use, so `llava-core --help` does not wait for torch.
"""

__version__ = "0.1.0"

_PUBLIC = {
    "load_pretrained": "loader",
    "CheckpointError": "loader",
    "LlavaProcessor": "processor",
    "LlavaModel": "llava",
    "LlavaConfig": "config",
    "ConfigError": "config",
    "KVCache": "kv_cache",
    "SamplingParams": "generate",
    "generate": "assistant",
    "stream": "assistant",
    "ChatSession": "chat",
    "quantize_int8": "llama",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name):
    if name in _PUBLIC:
        import importlib
        return getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    raise AttributeError(f"module 'llava_core' has no attribute {name!r}")


def _keep_generate_public() -> None:
    """`llava_core.generate` is the function (assistant.generate), as documented, although a
    submodule has the same name: importing a submodule sets it as an attribute of its package,
    which would replace the function by the module. This property reads the function and lets
    that attribute write go; `from llava_core.generate import ...` still finds the module in
    sys.modules."""
    import sys
    import types

    class _Package(types.ModuleType):
        @property
        def generate(self):
            from .assistant import generate
            return generate

        @generate.setter
        def generate(self, value):
            pass

    sys.modules[__name__].__class__ = _Package


_keep_generate_public()
