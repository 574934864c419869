"""The HTTP side of `llava-core serve`: an OpenAI-compatible API and the image-chat web page.

Endpoints: POST /v1/chat/completions (JSON or server-sent events), GET /v1/models, GET /health,
POST /v1/attention (the web page's heat maps), GET / (the page; files in static/).
Requests are read and checked here (protocol.py, images.py: every bad input is a 4xx in OpenAI's
error shape), their images decoded and tokenised in a worker thread, then handed to the
BatchEngine, whose thread owns the model; its events come back through the event loop with
call_soon_threadsafe, so the loop never waits on the model. A client that goes away (a closed
stream, or a dropped connection during a plain request) has its job cancelled: its batch row is
freed at the engine's next step.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from ..model.kv_cache import ContextOverflowError
from ..runtime.batching import BatchEngine, Event, Job, image_digest
from ..runtime.decode import SamplingParams, find_stop
from .attention import answer_attention
from .images import load_image_url
from .protocol import APIError, ChatRequest, Limits, parse_chat, settle_max_tokens

log = logging.getLogger(__name__)
STATIC = Path(__file__).with_name("static")


def create_app(engine: BatchEngine, processor, *, model_name: str = "llava-core", limits: Limits | None = None,
               api_key: str | None = None, allow_dir: Path | None = None) -> FastAPI:
    limits = limits or Limits(context=engine.max_len)
    app = FastAPI(title="llava-core", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine

    @app.exception_handler(APIError)
    async def api_error(_request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def http_error(_request, e: HTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(APIError(str(e.detail), e.status_code, kind).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def server_error(_request, e: Exception):
        log.exception("unhandled error")
        return JSONResponse(APIError(f"internal error: {type(e).__name__}", 500, "server_error").body(), 500)

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError("missing or wrong API key: send 'Authorization: Bearer <key>'", 401,
                           "authentication_error", code="invalid_api_key")

    def prepare(body) -> tuple[ChatRequest, Job]:
        """In a worker thread: parse, decode images, tokenise, settle the token budget."""
        req = parse_chat(body, limits, lambda url, param: load_image_url(url, limits, allow_dir, param))
        try:
            ids = processor.tokenize(processor.apply_chat_template(req.messages))
            px = processor.preprocess(req.images) if req.images else None
        except ValueError as e:  # the processor's own refusals (templates, images)
            raise APIError(str(e), param="messages") from None
        per_image = engine.model.cfg.num_image_tokens
        if ids.count(processor.image_token_id) != per_image * len(req.images):
            raise APIError(f"the text holds the image placeholder {processor.image_token!r}: write it otherwise "
                           "and send images as image_url parts", param="messages", code="invalid_text")
        max_new = settle_max_tokens(req, len(ids), limits)
        keys = () if px is None else tuple(image_digest(p) for p in px)
        return req, Job(ids, SamplingParams(max_new_tokens=max_new, **req.sampling), px, keys,
                        ignore_eos=req.ignore_eos)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorize(request)
        req, job = await asyncio.to_thread(prepare, await read_json(request, limits.max_body_bytes))
        queue: asyncio.Queue[Event] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        job.on_event = lambda ev: loop.call_soon_threadsafe(queue.put_nowait, ev)
        try:
            engine.submit(job)
        except (ContextOverflowError, ValueError) as e:
            raise APIError(str(e), param="messages", code="context_length_exceeded") from None
        head = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": model_name}
        if req.stream:
            return StreamingResponse(_sse(engine, job, queue, head, req.include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        getter, looked = None, time.monotonic()
        try:
            while True:  # wait for the last event, looking every 0.5 s whether the client is still there
                getter = getter or asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({getter}, timeout=0.5)  # (wait_for could drop an event)
                if time.monotonic() - looked >= 0.5:
                    looked = time.monotonic()
                    if await request.is_disconnected():
                        return JSONResponse(APIError("client closed the request", 499).body(), 499)
                if not done:
                    continue
                ev, getter = getter.result(), None
                if ev.error:
                    raise APIError(ev.error, 500, "server_error")
                if ev.finish_reason:
                    break
        finally:
            if getter is not None:
                getter.cancel()
            if job.finish_reason is None:
                engine.cancel(job)
        # the whole answer decoded at once, as `generate` does (pieces of broken UTF-8 may differ)
        text = processor.tokenizer.decode(job.output_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        cut = find_stop(text, job.params.stop_strings)
        message = {"role": "assistant", "content": (text if cut < 0 else text[:cut]).strip()}
        return {**head, "object": "chat.completion", "system_fingerprint": None,
                "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": job.finish_reason}],
                "usage": _usage(job)}

    @app.post("/v1/attention")
    async def attention(request: Request):
        """{"messages": [... ending with the question], "answer": text} -> answer_attention's maps."""
        authorize(request)
        body = await read_json(request, limits.max_body_bytes)
        answer = body.get("answer") if isinstance(body, dict) else None
        if not isinstance(answer, str) or not answer.strip():
            raise APIError("answer must be the non-empty text of the answer to look from", param="answer")
        req, job = await asyncio.to_thread(prepare, {k: v for k, v in body.items() if k != "answer"})
        if job.pixel_values is None:
            raise APIError("the conversation holds no image to look at", param="messages")
        answer_ids = processor.tokenizer.encode(answer.strip(), add_special_tokens=False)
        if len(answer_ids) > limits.max_tokens or len(job.prompt_ids) + len(answer_ids) > limits.context:
            raise APIError(f"the answer is {len(answer_ids)} tokens: too long for this conversation's context",
                           param="answer", code="context_length_exceeded")
        fut = engine.call(lambda: answer_attention(engine.model, processor, job.prompt_ids, job.pixel_values,
                                                   answer_ids, req.images[-1]))
        return await asyncio.wrap_future(fut)

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "llava-core"}]}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "active": engine.active, "waiting": engine.waiting,
                "max_batch": engine.max_batch, "context": limits.context, "auth": api_key is not None}

    @app.get("/")
    async def index():
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


async def read_json(request: Request, limit: int):
    """The body as JSON, refused (413) once it passes `limit` bytes, before it is all read."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise APIError(f"the request body is {declared} bytes, over the limit of {limit} (--max-body-mb)", 413,
                       code="request_too_large")
    chunks, n = [], 0
    async for chunk in request.stream():
        n += len(chunk)
        if n > limit:
            raise APIError(f"the request body is over the limit of {limit} bytes (--max-body-mb)", 413,
                           code="request_too_large")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(f"the request body is not valid JSON ({e})", code="invalid_json") from None


def _usage(job: Job) -> dict:
    n, m = len(job.prompt_ids), len(job.output_ids)
    return {"prompt_tokens": n, "completion_tokens": m, "total_tokens": n + m,
            "prompt_tokens_details": {"cached_tokens": job.cached_tokens}}


async def _sse(engine: BatchEngine, job: Job, queue: asyncio.Queue, head: dict, include_usage: bool):
    """chat.completion.chunk events, then `data: [DONE]`. Closing the stream cancels the job."""
    def chunk(delta: dict, finish=None, **extra) -> str:
        body = {**head, "object": "chat.completion.chunk", "system_fingerprint": None,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}], **extra}
        return f"data: {json.dumps(body)}\n\n"

    started = False
    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            ev = await queue.get()
            if ev.error:
                yield f"data: {json.dumps(APIError(ev.error, 500, 'server_error').body())}\n\n"
                return
            text = ev.text if started else ev.text.lstrip()
            if text:
                started = True
                yield chunk({"content": text})
            if ev.finish_reason:
                yield chunk({}, ev.finish_reason)
                if include_usage:
                    body = {**head, "object": "chat.completion.chunk", "choices": [], "usage": _usage(job)}
                    yield f"data: {json.dumps(body)}\n\n"
                yield "data: [DONE]\n\n"
                return
    finally:
        if job.finish_reason is None:
            engine.cancel(job)
