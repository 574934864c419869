"""`llava-core`: the command line.

One function per subcommand (`cmd_<name>(args) -> exit code`), registered here through
`add_<name>`; each command group lives in its own file beside this one (info, ask/chat,
caption, eval/export, attention/lens, ablate, token-order, convert, train). Heavy imports
(torch, open_clip) happen inside the commands, so `--help` and bad arguments answer at once.
Bad input (a missing folder, a broken checkpoint, an unsupported config) is one line on
stderr and exit status 1, never a traceback; usage errors exit 2.
"""

from __future__ import annotations

import argparse
import logging
import sys

from . import ablate, ask, caption, convert, eval, info, probe, serve, token_order, train
from .common import PROG, is_user_error


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (argparse would print the whole usage first)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="LLaVA rebuilt from its parts.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO) to stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    info.add_info(sub)
    ask.add_ask(sub)
    ask.add_chat(sub)
    caption.add_caption(sub)
    eval.add_eval(sub)
    eval.add_export(sub)
    convert.add_commands(sub)
    probe.add_commands(sub)  # attention, lens
    token_order.add_token_order(sub)
    train.add_train(sub)
    ablate.add_ablate_args(sub)
    serve.add_serve(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    head = next((i for i, a in enumerate(argv) if not a.startswith("-")), len(argv))
    if argv[head:head + 1] == ["train"]:  # the recipe parses its own options
        return train.main(argv[head + 1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format=f"{PROG}: %(levelname)s: %(message)s")
    try:
        return args.run(args)
    except Exception as e:  # bad input becomes one line; anything else is a bug and re-raised
        if not is_user_error(e):
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
