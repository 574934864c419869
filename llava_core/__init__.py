"""llava_core: LLaVA rebuilt from its parts (open_clip ViT, MLP projector, LLaMA decoder).

The public surface, documented in the README:
    load_pretrained(path, dtype=None, device="cpu") -> LlavaModel
    LlavaProcessor.from_pretrained(path)  (LlavaNextProcessor.from_pretrained for llava_next folders)
    generate(model, processor, prompts, images, **sampling) / stream(...)
    ChatSession(model, processor, images)
Names are imported on first use, so `llava-core --help` does not wait for torch.

The package is layered; each layer imports only the ones above it in this list:
    model/        the architecture: config, vision tower, projector, decoder, KV cache, processor
    checkpoints/  llava-hf loading and export, GGUF, LoRA
    runtime/      prefill / decode / sampling, the generate API, chat sessions
    default/      the embedded default model (build, trained parts, assembly cache)
    data/ train/ eval/ research/   synthetic data, the training recipe, scoring, probes and ablations
    cli/          the `llava-core` command (nothing imports it)
"""

__version__ = "0.2.0"

_PUBLIC = {
    "load_pretrained": "checkpoints.loader",
    "CheckpointError": "checkpoints.loader",
    "LlavaProcessor": "model.processor",
    "LlavaModel": "model.llava",
    "LlavaNextProcessor": "model.processor_next",  # llava-v1.6: any-resolution tiles
    "LlavaNextModel": "model.llava_next",
    "LlavaNextConfig": "model.next_config",
    "LlavaConfig": "model.config",
    "ConfigError": "model.config",
    "KVCache": "model.kv_cache",
    "SamplingParams": "runtime.decode",
    "generate": "runtime.generate",
    "stream": "runtime.generate",
    "ChatSession": "runtime.chat",
    "quantize_int8": "model.quantize",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name):
    if name in _PUBLIC:
        import importlib
        return getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    raise AttributeError(f"module 'llava_core' has no attribute {name!r}")
