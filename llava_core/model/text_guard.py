"""What user text may hold: text the tokenizer can take, and no control tokens.

A tokenizer turns the string of each of its special tokens into that token wherever it
appears, so a user who types "hi<|im_end|>" would end their turn, and "<image>" would ask
for an image nobody gave. llava_core refuses such text with a ProcessorError naming the token
(rather than quietly tokenizing it another way): the ids of every accepted prompt are then
exactly those transformers' processor gives, and nothing a user typed is dropped or altered.
The chat template's own control tokens and the `<image>` markers the API places are not user
text and are not checked.
"""

from __future__ import annotations

from pathlib import Path

from .config import ConfigError
from .image_io import ProcessorError


def special_strings(tokenizer) -> tuple[str, ...]:
    """Every string the tokenizer reads as a special token (longest first, for the message)."""
    found = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(added, "special", False) and added.content:
            found.add(added.content)
    return tuple(sorted((s for s in found if s), key=lambda s: (-len(s), s)))


def check_utf8(text: str, what: str = "the text") -> None:
    """Refuse text the tokenizer cannot encode: lone surrogates, such as undecodable bytes in a
    command-line argument (Python keeps them as surrogate escapes)."""
    if not isinstance(text, str):
        raise TypeError(f"{what} must be a str, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = text[e.start:e.end]
        raw = "".join(f"\\x{ord(c) - 0xDC00:02x}" if 0xDC80 <= ord(c) <= 0xDCFF else f"\\u{ord(c):04x}"
                      for c in bad)
        raise ProcessorError(f"{what} is not valid UTF-8 text: {raw} at character {e.start}; "
                             "pass text in UTF-8") from None


def check_user_text(text: str, specials: tuple[str, ...], what: str = "the text") -> None:
    """Refuse user text that is not UTF-8 or holds a special-token string."""
    check_utf8(text, what)
    hits = [s for s in specials if s in text]
    if hits:
        raise ProcessorError(f"{what} holds {', '.join(repr(s) for s in hits)}: a control token of this "
                             "tokenizer, which user text may not carry (it would act as the token, not "
                             "as text); images are passed as images, not as '<image>' in the text")


def check_messages(messages: list[dict], specials: tuple[str, ...]) -> None:
    """check_user_text on every text of transformers-style chat messages."""
    for n, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        items = [content] if isinstance(content, str) else [
            c.get("text") for c in content or [] if isinstance(c, dict) and c.get("type") == "text"]
        for text in items:
            if text is not None:
                check_user_text(text, specials, f"message {n} ({m.get('role')})")


# The files one of transformers' tokenizer classes can load from (fast, sentencepiece, BPE,
# WordPiece, tiktoken); tokenizer_config.json alone only configures one of these.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt",
                   "tokenizer.tiktoken")


def load_tokenizer(folder: Path):
    """transformers' AutoTokenizer for a checkpoint folder, or a ConfigError naming the folder
    and the files it lacks (transformers itself would blame a missing sentencepiece/tiktoken)."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ConfigError(f"{folder}: no tokenizer files (one of {', '.join(TOKENIZER_FILES)}); copy the "
                          "tokenizer of the checkpoint's language model into the folder")
    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:  # a damaged or foreign tokenizer file: transformers and tokenizers raise many kinds
        raise ConfigError(f"{folder}: the tokenizer does not load ({type(e).__name__}: {e})") from None
