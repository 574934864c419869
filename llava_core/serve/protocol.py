"""The OpenAI chat-completions format, read strictly: a request body becomes messages in the
processor's form, images and sampling parameters, or an APIError (a 4xx in OpenAI's error shape
`{"error": {"message", "type", "param", "code"}}`) that names the field at fault. No web code
here: app.py turns these into HTTP.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

ROLES = ("system", "developer", "user", "assistant")  # developer: OpenAI's newer name for system


class APIError(Exception):
    def __init__(self, message: str, status: int = 400, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.status, self.type, self.param, self.code = message, status, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class Limits:
    context: int = 2048  # prompt + answer tokens (the engine's cache length)
    max_tokens: int = 1024  # the most a request may ask for
    default_max_tokens: int = 256  # when it asks for nothing (cut to what the context leaves)
    max_body_bytes: int = 20 * 2 ** 20
    max_image_pixels: int = 4096 * 4096
    max_images: int = 4
    max_stop: int = 4


@dataclass
class ChatRequest:
    messages: list[dict]  # {"role", "content": [{"type": "image"} | {"type": "text", "text"}]}
    images: list = field(default_factory=list)  # PIL images in reading order
    sampling: dict = field(default_factory=dict)  # SamplingParams' fields, max_new_tokens not yet settled
    max_tokens: int | None = None  # as asked
    stream: bool = False
    include_usage: bool = False
    ignore_eos: bool = False  # an extension (vLLM's name): generate max_tokens whatever comes


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def parse_chat(body: object, limits: Limits, load_image) -> ChatRequest:
    """A decoded JSON body -> ChatRequest. load_image(url, param) -> PIL image (images.py)."""
    if not isinstance(body, dict):
        raise APIError("the request body must be a JSON object")
    req = ChatRequest(messages=parse_messages(body.get("messages"), limits, load_image, into := []))
    req.images = into
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise APIError("model must be a string", param="model")
    n = body.get("n", 1)
    if n is not None and (not _is_int(n) or n != 1):
        raise APIError(f"n={n!r}: only n=1 is supported", param="n", code="unsupported_value")
    s = req.sampling
    t = body.get("temperature")
    if t is not None:
        if not _is_number(t) or not 0 <= t <= 2:
            raise APIError(f"temperature={t!r}: must be a number in [0, 2]", param="temperature")
        s["temperature"] = float(t)
    p = body.get("top_p")
    if p is not None:
        if not _is_number(p) or not 0 < p <= 1:
            raise APIError(f"top_p={p!r}: must be a number in (0, 1]", param="top_p")
        s["top_p"] = float(p)
    seed = body.get("seed")
    if seed is not None:
        if not _is_int(seed) or not 0 <= seed < 2 ** 63:
            raise APIError(f"seed={seed!r}: must be a non-negative integer", param="seed")
        s["seed"] = seed
    s["stop_strings"] = _stop(body.get("stop"), limits)
    for name in ("max_completion_tokens", "max_tokens"):
        m = body.get(name)
        if m is None:
            continue
        if not _is_int(m) or m < 1:
            raise APIError(f"{name}={m!r}: must be a positive integer", param=name)
        if m > limits.max_tokens:
            raise APIError(f"{name}={m} is over this server's limit of {limits.max_tokens} (--max-tokens)",
                           param=name, code="max_tokens_too_large")
        req.max_tokens = m
        break
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise APIError("ignore_eos must be true or false", param="ignore_eos")
    req.ignore_eos = ignore_eos
    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise APIError("stream must be true or false", param="stream")
    req.stream = bool(stream)
    opts = body.get("stream_options")
    if opts is not None:
        if not isinstance(opts, dict) or not isinstance(opts.get("include_usage", False), bool):
            raise APIError("stream_options must be an object like {\"include_usage\": true}",
                           param="stream_options")
        req.include_usage = bool(opts.get("include_usage"))
    return req


def _stop(stop, limits: Limits) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if (not isinstance(stops, list) or not all(isinstance(x, str) and x for x in stops)
            or len(stops) > limits.max_stop):
        raise APIError(f"stop must be a non-empty string or a list of at most {limits.max_stop} of them",
                       param="stop")
    return list(stops)


def parse_messages(messages: object, limits: Limits, load_image, images: list) -> list[dict]:
    """OpenAI messages -> the processor's messages; images are loaded into `images` in order."""
    if not isinstance(messages, list) or not messages:
        raise APIError("messages must be a non-empty list", param="messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise APIError(f"{where} must be an object with a role and a content", param=where)
        role = m.get("role")
        if role not in ROLES:
            raise APIError(f"{where}.role={role!r}: expected one of {', '.join(ROLES)}", param=f"{where}.role")
        role = "system" if role == "developer" else role
        parts = _content(m.get("content"), f"{where}.content", role, limits, load_image, images)
        out.append({"role": role, "content": parts})
    if out[-1]["role"] != "user":
        raise APIError(f"the last message is from {out[-1]['role']!r}; the model answers a user message",
                       param=f"messages[{len(out) - 1}].role")
    return out


def _content(content, where: str, role: str, limits: Limits, load_image, images: list) -> list[dict]:
    if isinstance(content, str):
        if role == "user" and not content.strip():
            raise APIError(f"{where} is empty", param=where)
        return [{"type": "text", "text": content}]
    if not isinstance(content, list) or not content:
        raise APIError(f"{where} must be a string or a non-empty list of parts", param=where)
    parts, text = [], []
    for j, part in enumerate(content):
        at = f"{where}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise APIError(f"{at}.text must be a string", param=f"{at}.text")
            text.append(part["text"])
        elif kind == "image_url":
            if role != "user":
                raise APIError(f"{at}: only user messages may hold images", param=at)
            spec = part.get("image_url")
            url = spec.get("url") if isinstance(spec, dict) else spec
            if len(images) >= limits.max_images:
                raise APIError(f"more than {limits.max_images} images in one request (--max-images)",
                               param=at, code="too_many_images")
            images.append(load_image(url, f"{at}.image_url.url"))
            parts.append({"type": "image"})
        else:
            raise APIError(f"{at}.type={kind!r}: expected 'text' or 'image_url'", param=f"{at}.type")
    joined = " ".join(t for t in text if t)
    if role == "user" and not joined.strip():
        raise APIError(f"{where} has no text: ask something", param=where)
    return parts + [{"type": "text", "text": joined}]


def settle_max_tokens(req: ChatRequest, prompt_tokens: int, limits: Limits) -> int:
    """How many tokens the answer may take: as asked (refused if the context cannot hold it), else
    the default cut to what the context leaves."""
    room = limits.context - prompt_tokens
    if room < 1:
        raise APIError(f"the prompt is {prompt_tokens} tokens, but the context holds {limits.context} "
                       "(prompt + answer): shorten the conversation or send fewer images",
                       param="messages", code="context_length_exceeded")
    if req.max_tokens is None:
        return min(limits.default_max_tokens, room)
    if req.max_tokens > room:
        raise APIError(f"the prompt is {prompt_tokens} tokens and max_tokens={req.max_tokens}: "
                       f"{prompt_tokens + req.max_tokens} in all, over the context of {limits.context}",
                       param="max_tokens", code="context_length_exceeded")
    return req.max_tokens


def check_allow_dir(path: str | None) -> Path | None:
    if path is None:
        return None
    p = Path(path).resolve()
    if not p.is_dir():
        raise ValueError(f"--allow-dir {path}: no such directory")
    return p
