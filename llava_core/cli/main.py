"""`llava-core`: the command line.

One function per subcommand (`cmd_<name>(args) -> exit code`), registered in `build_parser`
through `add_<name>`; a new subcommand (ask, chat, caption, ...) is one more pair of the same
shape. Heavy imports (torch, open_clip) happen inside the commands, so `--help` and bad
arguments answer at once. Bad input (a missing folder, a broken checkpoint, an unsupported
config) is one line on stderr and exit status 1, never a traceback; usage errors exit 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

PROG = "llava-core"
DTYPES = ("auto", "float32", "bfloat16", "float16")
TASK_NAMES = ("vqa", "caption", "detailed_caption", "ocr", "document")  # assistant.TASKS


def _is_user_error(e: BaseException) -> bool:
    """Bad input rather than a bug: reported in one line without a traceback."""
    if isinstance(e, (OSError, ValueError)):  # ConfigError, ProcessorError, ... are ValueErrors
        return True
    loader = sys.modules.get("llava_core.checkpoints.loader")  # only imported once a command loads weights
    return loader is not None and isinstance(e, loader.CheckpointError)


def _torch_dtype(name: str):
    import torch
    return None if name == "auto" else getattr(torch, name)


def _checkpoint_folder(path: str) -> Path:
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such checkpoint folder")
    return folder


# --- info ----------------------------------------------------------------------------------------


def add_info(sub) -> None:
    p = sub.add_parser("info", help="load a checkpoint and describe it",
                       description="Load a llava-hf checkpoint folder and print its components, parameter "
                                   "counts, dtype, image tokens per image, vocabulary and context length.")
    p.add_argument("path", help="llava-hf checkpoint folder (config.json + safetensors)")
    p.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="dtype to load in (auto: as stored; fp16 becomes bf16 on CPU)")
    p.add_argument("--device", default="cpu", help="torch device to load onto (default: cpu)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(run=cmd_info)


def describe(model, folder: Path) -> dict:
    """Components, parameter counts and the numbers a user of the checkpoint needs."""
    from ..checkpoints.loader import checkpoint_dtype

    cfg = model.cfg

    def count(module) -> int:
        return sum(p.numel() for p in module.parameters())  # parameters() counts a tied tensor once

    v, t = cfg.vision, cfg.text
    parts = {
        "vision_tower": count(model.vision_tower),
        "projector": count(model.projector),
        "decoder": count(model.language_model),
    }
    return {
        "checkpoint": str(folder),
        "dtype": str(model.dtype).removeprefix("torch."),
        "stored_dtype": str(checkpoint_dtype(folder)).removeprefix("torch."),
        "device": str(model.device),
        "components": {
            "vision_tower": f"CLIP ViT (open_clip), {v.image_size}px, patch {v.patch_size}, "
                            f"{v.num_hidden_layers} layers, width {v.hidden_size}, {v.num_attention_heads} heads",
            "projector": f"{cfg.projector.kind}, {cfg.vision_feature_dim} -> {t.hidden_size}",
            "decoder": f"LLaMA, {t.num_hidden_layers} layers, width {t.hidden_size}, {t.num_attention_heads} heads "
                       f"({t.num_key_value_heads} KV), MLP {t.intermediate_size}"
                       + (", tied embeddings" if t.tie_word_embeddings else ""),
        },
        "parameters": {**parts, "total": count(model)},
        "weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "vision_feature_layer": cfg.vision_feature_layer,
        "vision_feature_select_strategy": cfg.vision_feature_select_strategy,
        "image_tokens_per_image": cfg.num_image_tokens,
        "image_token_index": cfg.image_token_index,
        "vocab_size": t.vocab_size,
        "context_length": t.max_position_embeddings,
        "rope": {"theta": t.rope_theta, "scaling": t.rope_scaling},
    }


def format_info(info: dict) -> str:
    n = info["parameters"]
    rope = f"theta {info['rope']['theta']:g}" + (f", {info['rope']['scaling']}" if info["rope"]["scaling"] else "")
    rows = [
        ("checkpoint", info["checkpoint"]),
        ("dtype", f"{info['dtype']} on {info['device']} (stored as {info['stored_dtype']})"),
        ("vision tower", f"{n['vision_tower']:>15,} parameters  {info['components']['vision_tower']}"),
        ("projector", f"{n['projector']:>15,} parameters  {info['components']['projector']}"),
        ("decoder", f"{n['decoder']:>15,} parameters  {info['components']['decoder']}"),
        ("total", f"{n['total']:>15,} parameters  {info['weight_bytes'] / 2**20:,.1f} MiB of weights"),
        ("image tokens", f"{info['image_tokens_per_image']} per image (token id {info['image_token_index']}; "
                         f"vision layer {info['vision_feature_layer']}, "
                         f"{info['vision_feature_select_strategy']} strategy)"),
        ("vocabulary", f"{info['vocab_size']:,} tokens"),
        ("context", f"{info['context_length']:,} tokens, rope {rope}"),
    ]
    return "\n".join(f"{name:<13} {value}" for name, value in rows)


def cmd_info(args) -> int:
    folder = _checkpoint_folder(args.path)
    from ..model.config import LlavaConfig
    LlavaConfig.from_json(folder)  # config errors before the slow imports
    from ..checkpoints.loader import load_pretrained

    model = load_pretrained(folder, dtype=_torch_dtype(args.dtype), device=args.device)
    info = describe(model, folder)
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


# --- shared options for the commands that generate -------------------------------------------


def _add_model_args(p, image: str | None = "image") -> None:
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


def _add_sampling_args(p, max_new_tokens: int = 256) -> None:
    g = p.add_argument_group("sampling (greedy unless --temperature > 0)")
    g.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")


def _sampling(args) -> dict:
    from ..runtime.decode import SamplingParams

    s = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
             top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
             stop_strings=args.stop)
    SamplingParams(**s)  # bad values fail here, before the model loads
    return s


def _device(name: str):
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


def _load(args):
    """(model, processor) for the command's model argument ('default' or a folder)."""
    device = _device(args.device)
    folder = _resolve(args.model)
    from ..model.config import LlavaConfig
    LlavaConfig.from_json(folder)  # config errors before the slow load
    from ..checkpoints.loader import load_pretrained
    from ..model.processor import LlavaProcessor

    processor = LlavaProcessor.from_pretrained(folder, template=args.template)
    model = load_pretrained(folder, dtype=_torch_dtype(args.dtype), device=device)
    if getattr(args, "int8", False):
        from ..model.quantize import quantize_int8
        quantize_int8(model.language_model)
    return model, processor


def _resolve(name: str) -> Path:
    if name == "default" or (Path(name) / "parts.safetensors").is_file():
        from ..default.cache import resolve_model
        return resolve_model(name)
    return _checkpoint_folder(name)


def _check_image(path: str):
    from ..model.processor import load_image
    return load_image(path)


def _question(args) -> str:
    from ..runtime.generate import task_prompt
    return task_prompt(args.task, args.question)


# --- ask -----------------------------------------------------------------------------------------


def add_ask(sub) -> None:
    p = sub.add_parser("ask", help="answer one question about an image, streaming the answer",
                       description="Answer a question about an image; the answer streams to stdout.")
    _add_model_args(p)
    p.add_argument("question", nargs="?", default=None, help="the question (optional for caption/ocr tasks)")
    p.add_argument("--task", choices=TASK_NAMES, default="vqa",
                   help="vqa (default), caption, detailed_caption, ocr, document")
    _add_sampling_args(p)
    p.set_defaults(run=cmd_ask)


def cmd_ask(args) -> int:
    question = _question(args)
    sampling = _sampling(args)
    image = _check_image(args.image)
    model, processor = _load(args)
    from ..runtime.generate import stream

    for piece in stream(model, processor, question, image, **sampling):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


# --- chat ----------------------------------------------------------------------------------------

CHAT_HELP = "/image PATH adds an image to your next message; /undo, /regenerate, /reset, /history, /quit"


def add_chat(sub) -> None:
    p = sub.add_parser("chat", help="multi-turn chat about one or more images",
                       description="Chat about images; the KV cache is kept between turns. Reads one "
                                   "message per line (also from a pipe). " + CHAT_HELP)
    _add_model_args(p, image=None)
    p.add_argument("images", nargs="*", help="image files for the first message")
    p.add_argument("--max-context", type=int, default=None, help="tokens the conversation may use")
    _add_sampling_args(p)
    p.set_defaults(run=cmd_chat)


def cmd_chat(args) -> int:
    sampling = _sampling(args)
    images = [_check_image(path) for path in args.images]
    model, processor = _load(args)
    from ..runtime.chat import ChatSession
    from ..model.kv_cache import ContextOverflowError

    chat = ChatSession(model, processor, images=images, max_context=args.max_context)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"chatting with {args.model}. {CHAT_HELP}", file=sys.stderr)
    while True:
        if interactive:
            print("you> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            return 0
        line = line.strip()
        if not line:
            continue
        try:
            if line.startswith("/"):
                if _chat_command(chat, line, sampling):
                    return 0
                continue
            for piece in chat.stream(line, **sampling):
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
            sys.stdout.flush()
        except (ContextOverflowError, ValueError, OSError) as e:
            print(f"{PROG}: {e}", file=sys.stderr)


def _chat_command(chat, line: str, sampling: dict) -> bool:
    """Run a /command; True means quit."""
    cmd, _, rest = line.partition(" ")
    if cmd in ("/quit", "/exit"):
        return True
    if cmd == "/image":
        if not rest.strip():
            raise ValueError("/image needs a path")
        chat.add_image(rest.strip())
        print(f"[image added: {rest.strip()}]", file=sys.stderr)
    elif cmd == "/reset":
        chat.reset()
        print("[conversation reset]", file=sys.stderr)
    elif cmd == "/undo":
        chat.undo()
        print("[last turn removed]", file=sys.stderr)
    elif cmd == "/regenerate":
        print(chat.regenerate(**sampling), flush=True)
    elif cmd == "/history":
        print(json.dumps(chat.history(), indent=1), flush=True)
    else:
        raise ValueError(f"unknown command {cmd}; {CHAT_HELP}")
    return False


# --- eval and export -----------------------------------------------------------------------------


def add_eval_args(parser) -> None:
    """Arguments of `llava-core eval MODEL --suite synthetic | --jsonl FILE [--out results.json]`."""
    parser.add_argument("model", help="'default', a llava-hf checkpoint folder or a parts folder")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--suite", choices=["synthetic"], help="the synthetic test/heldout/shifted splits")
    what.add_argument("--jsonl", type=Path, help="lines of {image, question, answers}: VQA soft accuracy")
    parser.add_argument("--splits", default="test,heldout,shifted", help="synthetic splits, comma-separated")
    parser.add_argument("-n", "--n-per-split", type=int, default=200, help="synthetic questions per split")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0, help="synthetic data seed")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--predictions", type=Path, help="write every question and prediction as JSONL here")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])


def add_eval(sub) -> None:
    p = sub.add_parser("eval", help="accuracy per question type (synthetic suite) or on your JSONL",
                       description="Score a model on the synthetic test/heldout/shifted splits (exact match "
                                   "per question type) or on a JSONL of {image, question, answers} "
                                   "(VQA-style soft accuracy).")
    add_eval_args(p)
    p.set_defaults(run=cmd_eval)


def cmd_eval(args) -> int:
    from ..eval.synthetic import run_eval
    _device(args.device)
    run_eval(args)
    return 0


def add_export(sub) -> None:
    p = sub.add_parser("export", help="write a model as a llava-hf folder transformers can load",
                       description="Write MODEL ('default' or a folder) to DST as a llava-hf checkpoint "
                                   "that transformers' LlavaForConditionalGeneration and LlavaProcessor load.")
    p.add_argument("model", help="'default', a parts folder or a llava-hf checkpoint folder")
    p.add_argument("dst", help="destination folder (must not exist, unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint folder at DST")
    p.set_defaults(run=cmd_export)


def cmd_export(args) -> int:
    from ..default.cache import export_model
    dst = export_model(args.model, args.dst, overwrite=args.overwrite)
    print(f"{PROG}: wrote {dst}", file=sys.stderr)
    return 0


# --- train -----------------------------------------------------------------------------------------


def add_train(sub) -> None:
    # Listed for --help only: main() hands `train ...` to the recipe's own parser
    # (`python -m llava_core.train.recipe --help`: --recipe, --out, --budget-minutes, --stage, --resume).
    sub.add_parser("train", help="run LLaVA's training recipe for the default model (stages 0-2)")


# --- entry point ---------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (argparse would print the whole usage first)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="LLaVA rebuilt from its parts.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO) to stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_info(sub)
    add_ask(sub)
    add_chat(sub)
    from .caption import add_caption  # caption
    add_caption(sub)
    add_eval(sub)
    add_export(sub)
    from .convert import add_commands as add_convert  # convert
    add_convert(sub)
    from .probe import add_commands as add_probes  # attention, lens
    add_probes(sub)
    add_train(sub)
    from ..research.ablate import add_ablate_args  # ablate
    add_ablate_args(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    head = next((i for i, a in enumerate(argv) if not a.startswith("-")), len(argv))
    if argv[head:head + 1] == ["train"]:  # the recipe parses its own options
        from ..train.recipe import main as train_main
        return train_main(argv[head + 1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format=f"{PROG}: %(levelname)s: %(message)s")
    try:
        return args.run(args)
    except Exception as e:  # bad input becomes one line; anything else is a bug and re-raised
        if not _is_user_error(e):
            raise
        print(f"{PROG}: error: {_one_line(str(e) or type(e).__name__, args.verbose)}", file=sys.stderr)
        return 1


def _one_line(message: str, verbose: bool) -> str:
    """A loader report (header, '  N missing ...:' counts, '    key' items) as its header and counts;
    with -v the whole report."""
    lines = message.splitlines()
    if verbose or len(lines) == 1:
        return message
    counts = [line.strip().rstrip(":") for line in lines[1:] if not line.startswith("    ")]
    return f"{lines[0]}: {'; '.join(counts)} (-v lists them)"


if __name__ == "__main__":
    sys.exit(main())
