"""`llava-core serve MODEL`: the OpenAI-compatible server and its web page (llava_core/serve/)."""

from __future__ import annotations

import logging
import os

from .common import PROG, add_model_args, load_model


def add_serve(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible API + image-chat web page, with continuous batching",
                       description="Serve MODEL over HTTP: POST /v1/chat/completions (OpenAI format, streaming), "
                                   "GET /v1/models, GET /health, and an image-chat page at /. See docs/serve.md.")
    add_model_args(p, image=None)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1; others need --api-key)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("LLAVA_CORE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on every API request (default: $LLAVA_CORE_API_KEY)")
    p.add_argument("--allow-dir", default=None, metavar="DIR",
                   help="let requests name image files (file:// or a path) under DIR; refused otherwise")
    p.add_argument("--model-name", default=None, help="the model id the API reports (default: MODEL's folder name)")
    g = p.add_argument_group("batching and limits")
    g.add_argument("--max-batch", type=int, default=8, help="requests decoded together (1: one at a time)")
    g.add_argument("--max-context", type=int, default=2048, help="prompt + answer tokens per request")
    g.add_argument("--max-tokens", type=int, default=1024, help="the most max_tokens a request may ask for")
    g.add_argument("--default-max-tokens", type=int, default=256, help="answer length when a request names none")
    g.add_argument("--max-body-mb", type=float, default=20.0, help="largest request body")
    g.add_argument("--max-image-pixels", type=int, default=4096 * 4096, help="largest image (width x height)")
    g.add_argument("--max-images", type=int, default=4, help="images per request")
    p.set_defaults(run=cmd_serve)


def cmd_serve(args) -> int:
    from ..serve.protocol import Limits, check_allow_dir
    from ..serve.server import check_exposure

    check_exposure(args.host, args.api_key)  # before the slow load
    allow_dir = check_allow_dir(args.allow_dir)
    for name in ("max_batch", "max_context", "max_tokens", "default_max_tokens", "max_images", "max_image_pixels"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if args.max_body_mb <= 0:
        raise ValueError("--max-body-mb must be > 0")

    import uvicorn

    from ..runtime.batching import BatchEngine
    from ..serve.app import create_app

    model, processor = load_model(args)
    engine = BatchEngine(model, processor.tokenizer, max_batch=args.max_batch, max_len=args.max_context)
    limits = Limits(context=engine.max_len, max_tokens=min(args.max_tokens, engine.max_len - 1),
                    default_max_tokens=args.default_max_tokens, max_body_bytes=int(args.max_body_mb * 2 ** 20),
                    max_image_pixels=args.max_image_pixels, max_images=args.max_images)
    name = args.model_name or (args.model if args.model == "default" else os.path.basename(os.path.normpath(args.model)))
    app = create_app(engine, processor, model_name=name, limits=limits, api_key=args.api_key, allow_dir=allow_dir)
    logging.getLogger(__name__).info("serving %s on http://%s:%d (batch %d, context %d)", name, args.host,
                                     args.port, args.max_batch, engine.max_len)
    print(f"{PROG}: serving {name} on http://{args.host}:{args.port}/ (Ctrl-C stops)", flush=True)
    engine.start()
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        engine.stop()
    return 0
