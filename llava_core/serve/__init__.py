"""`llava-core serve`: an OpenAI-compatible server over the continuous-batching engine
(runtime/batching.py), with a web page for image chat and attention heat maps.
Needs the `serve` extra (fastapi, uvicorn)."""
