"""What the commands share: the model and sampling options, loading a model named on the
command line, and the rule that bad input is one line on stderr (exit 1), not a traceback.

Heavy imports (torch, open_clip) happen inside the functions, so `--help` and bad arguments
answer at once.
"""

from __future__ import annotations

import sys
from pathlib import Path

PROG = "llava-core"
DTYPES = ("auto", "float32", "bfloat16", "float16")
TASK_NAMES = ("vqa", "caption", "detailed_caption", "ocr", "document")  # runtime.generate.TASKS


def is_user_error(e: BaseException) -> bool:
    """Bad input rather than a bug: reported in one line without a traceback."""
    if isinstance(e, (OSError, ValueError)):  # ConfigError, ProcessorError, ... are ValueErrors
        return True
    loader = sys.modules.get("llava_core.checkpoints.loader")  # only imported once a command loads weights
    return loader is not None and isinstance(e, loader.CheckpointError)


def torch_dtype(name: str):
    import torch
    return None if name == "auto" else getattr(torch, name)


def checkpoint_folder(path: str) -> Path:
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such checkpoint folder")
    return folder


def add_model_args(p, image: str | None = "image") -> None:
    p.add_argument("model", help="a llava-hf checkpoint folder, or 'default' for the embedded model")
    if image:
        p.add_argument(image, help="an image file")
    p.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="auto: as stored on GPU; on CPU fp16 checkpoints run in bf16")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--template", choices=("checkpoint", "llava15", "vicuna_v1"), default=None,
                   help="chat format (default: the checkpoint's own, else llava15)")
    p.add_argument("--int8", action="store_true",
                   help="weight-only int8 decoder (faster CPU decode, small accuracy cost; inference only)")


def add_sampling_args(p, max_new_tokens: int = 256) -> None:
    g = p.add_argument_group("sampling (greedy unless --temperature > 0)")
    g.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")


def sampling_options(args) -> dict:
    from ..runtime.decode import SamplingParams

    s = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
             top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
             stop_strings=args.stop)
    SamplingParams(**s)  # bad values fail here, before the model loads
    return s


def check_device(name: str):
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device (cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name!r}: only cpu and cuda are supported")
    return device


def load_model(args):
    """(model, processor) for the command's model argument ('default' or a folder)."""
    from ..checkpoints.loader import load_pretrained
    from ..default.cache import resolve_model
    from ..model.next_config import LlavaNextConfig, read_config
    from ..model.processor import LlavaProcessor
    from ..model.processor_next import LlavaNextProcessor

    device = check_device(args.device)
    folder = resolve_model(args.model)
    cfg = read_config(folder)  # config errors before the slow load; LLaVA-1.5 or LLaVA-NeXT
    processor_class = LlavaNextProcessor if isinstance(cfg, LlavaNextConfig) else LlavaProcessor
    processor = processor_class.from_pretrained(folder, template=args.template)
    model = load_pretrained(folder, dtype=torch_dtype(args.dtype), device=device)
    if getattr(args, "int8", False):
        from ..model.quantize import quantize_int8
        quantize_int8(model.language_model)
    return model, processor


def check_image(path: str):
    from ..model.processor import load_image
    return load_image(path)


def question_of(args) -> str:
    from ..model.text_guard import check_utf8
    from ..runtime.generate import task_prompt

    if args.question is not None:  # undecodable argv bytes: refused before the model loads
        check_utf8(args.question, "the question")
    return task_prompt(args.task, args.question)
