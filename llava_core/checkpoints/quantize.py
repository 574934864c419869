"""Low-memory loading: `load_pretrained(path, quantize="int8" | "nf4", device="cuda")`.

As the original LLaVA builder's load_8bit / load_4bit (bitsandbytes through transformers'
BitsAndBytesConfig): the decoder's seven projections per block are quantized, while the
embedding, the norms, the lm_head, the vision tower and the projector stay in fp16.
  int8  bitsandbytes LLM.int8 (`Linear8bitLt`): int8 weights with one absmax scale per row, and
        activation columns above the outlier threshold 6.0 multiplied in fp16;
  nf4   bitsandbytes 4-bit NormalFloat (`Linear4bit`), blocks of 64 weights, the block scales
        quantized again (double quantization), products computed in fp16.
The checkpoint is read into CPU memory in fp16 and each projection is quantized as it moves to
the GPU, so the GPU never holds the fp16 decoder: its peak is the quantized model.

On the CPU, quantize="int8" is llava_core's own weight-only int8 (`model.quantize.quantize_int8`,
what `--int8` does): bitsandbytes targets GPUs, and the CPU path has its own int8 decode kernel.
nf4 has no CPU path here. bitsandbytes is imported only when a CUDA quantization is asked for
(`pip install 'llava_core[gpu]'`).
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn

log = logging.getLogger(__name__)

__all__ = ["QUANTIZE_MODES", "check_quantize", "quantize_bnb", "quantize_loaded"]

QUANTIZE_MODES = ("int8", "nf4")
INT8_THRESHOLD = 6.0  # LLM.int8's outlier threshold, bitsandbytes' and transformers' default


def check_quantize(quantize: str, device: torch.device, dtype: torch.dtype | None = None) -> None:
    """Refuse what cannot run, before any weight is read."""
    if quantize not in QUANTIZE_MODES:
        raise ValueError(f"quantize={quantize!r}: expected None, 'int8' or 'nf4'")
    if device.type == "cpu":
        if quantize == "nf4":
            raise ValueError("quantize='nf4' needs a CUDA device (bitsandbytes 4-bit kernels); on the CPU use "
                             "quantize='int8' (llava_core's weight-only int8) or no quantization")
        return
    if device.type != "cuda":
        raise ValueError(f"quantize={quantize!r} runs on CUDA (bitsandbytes) or, for int8, the CPU; "
                         f"device={str(device)!r} is neither")
    if not torch.cuda.is_available():
        raise ValueError(f"quantize={quantize!r} on device={str(device)!r}, but torch sees no CUDA device "
                         f"(torch {torch.__version__}, CUDA build {torch.version.cuda})")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise ImportError(f"quantize={quantize!r} on CUDA needs bitsandbytes, which is not importable ({e}); "
                          "pip install 'llava_core[gpu]' (or bitsandbytes)") from None
    if dtype not in (None, torch.float16, torch.bfloat16):
        raise ValueError(f"quantize={quantize!r}: dtype={dtype} for the unquantized parts; expected float16 "
                         "(the default, as the original builder) or bfloat16")


def quantize_bnb(decoder: nn.Module, mode: str, device: torch.device,
                 compute_dtype: torch.dtype = torch.float16) -> nn.Module:
    """Replace each block's projections by bitsandbytes layers on `device`, in place, one at a time.
    The projections' weights may sit anywhere; they are quantized on their way to the GPU."""
    import bitsandbytes as bnb

    for block in decoder.layers:
        for parent in (block.self_attn, block.mlp):
            for name, lin in list(parent.named_children()):
                if not isinstance(lin, nn.Linear):
                    continue
                w = lin.weight.detach().to("cpu", torch.float16)  # bitsandbytes quantizes CPU -> GPU moves
                if mode == "int8":
                    q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=False, has_fp16_weights=False,
                                            threshold=INT8_THRESHOLD, device="meta")
                    q.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
                else:
                    q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False, compute_dtype=compute_dtype,
                                          compress_statistics=True, quant_type="nf4", device="meta")
                    q.weight = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=True, quant_type="nf4",
                                                 module=q)
                setattr(parent, name, q.to(device))
                del lin, w
    return decoder


def quantize_loaded(model, quantize: str, device: torch.device, dtype: torch.dtype | None):
    """`load_pretrained(..., quantize=...)`, after the unquantized load (onto the CPU for CUDA: the
    GPU never holds the fp16 decoder): quantize the decoder's projections and place the rest."""
    if device.type == "cpu":
        from ..model.quantize import quantize_int8

        quantize_int8(model.language_model)
        return model
    dtype = dtype or torch.float16
    import bitsandbytes as bnb

    quantize_bnb(model.language_model, quantize, device, compute_dtype=dtype)
    for module in model.modules():  # the rest, in fp16: embedding, norms, lm_head, vision tower, projector
        if not isinstance(module, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit)):  # already placed, and their
            module._apply(lambda t: t.to(device), recurse=False)  # .to would re-wrap the quantized weights
    log.info("the decoder's projections in %s on %s", quantize, device)
    return model.eval()
