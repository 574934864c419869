"""`llava-core ask` (one question, streamed) and `llava-core chat` (turns that keep the KV cache)."""

from __future__ import annotations

import json
import sys

from .common import (PROG, TASK_NAMES, add_model_args, add_sampling_args, check_image, load_model, question_of,
                     sampling_options)


def add_ask(sub) -> None:
    p = sub.add_parser("ask", help="answer one question about an image, streaming the answer",
                       description="Answer a question about an image; the answer streams to stdout.")
    add_model_args(p)
    p.add_argument("question", nargs="?", default=None, help="the question (optional for caption/ocr tasks)")
    p.add_argument("--task", choices=TASK_NAMES, default="vqa",
                   help="vqa (default), caption, detailed_caption, ocr, document")
    add_sampling_args(p)
    p.set_defaults(run=cmd_ask)


def cmd_ask(args) -> int:
    question = question_of(args)
    sampling = sampling_options(args)
    image = check_image(args.image)
    model, processor = load_model(args)
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
    add_model_args(p, image=None)
    p.add_argument("images", nargs="*", help="image files for the first message")
    p.add_argument("--max-context", type=int, default=None, help="tokens the conversation may use")
    add_sampling_args(p)
    p.set_defaults(run=cmd_chat)


def cmd_chat(args) -> int:
    sampling = sampling_options(args)
    images = [check_image(path) for path in args.images]
    model, processor = load_model(args)
    from ..model.kv_cache import ContextOverflowError
    from ..runtime.chat import ChatSession

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
