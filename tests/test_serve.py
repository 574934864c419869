"""`llava-core serve` through the official openai client and raw HTTP, on loopback, on the tiny
checkpoint: answers equal `generate`'s, streams, concurrent streams, a client that goes away,
every limit as a 4xx in OpenAI's error shape, the API key, and --allow-dir's walls."""

import base64
import io
import json
import struct
import threading
import time
import zlib

import pytest
import torch
from PIL import Image

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from test_serve_engine import image  # noqa: E402

from llava_core.checkpoints.loader import load_pretrained  # noqa: E402
from llava_core.model.processor import LlavaProcessor  # noqa: E402
from llava_core.research.probe import image_attention  # noqa: E402
from llava_core.runtime.batching import BatchEngine  # noqa: E402
from llava_core.runtime.generate import generate, stream  # noqa: E402
from llava_core.serve.app import create_app  # noqa: E402
from llava_core.serve.protocol import Limits  # noqa: E402
from llava_core.serve.server import ServerThread, check_exposure  # noqa: E402

LIMITS = dict(max_tokens=1800, max_body_bytes=2 * 2 ** 20, max_image_pixels=1000 * 1000, max_images=2)


@pytest.fixture(scope="module")
def stack(tiny_ckpt, tmp_path_factory):
    model, processor = load_pretrained(tiny_ckpt), LlavaProcessor.from_pretrained(tiny_ckpt)
    engine = BatchEngine(model, processor.tokenizer, max_batch=4, max_len=2048).start()
    allowed = tmp_path_factory.mktemp("allowed")
    image(1).save(allowed / "one.png")
    outside = tmp_path_factory.mktemp("outside")
    image(2).save(outside / "secret.png")
    (allowed / "link.png").symlink_to(outside / "secret.png")
    limits = Limits(context=engine.max_len, **LIMITS)
    open_server = ServerThread(create_app(engine, processor, model_name="tiny", limits=limits,
                                          allow_dir=allowed)).start()
    keyed = ServerThread(create_app(engine, processor, model_name="tiny", limits=limits, api_key="sekrit")).start()
    yield dict(model=model, processor=processor, engine=engine, url=open_server.url, keyed=keyed.url,
               allowed=allowed, outside=outside)
    open_server.stop()
    keyed.stop()
    engine.stop()


@pytest.fixture(scope="module")
def client(stack):
    return openai.OpenAI(base_url=stack["url"] + "/v1", api_key="unused", max_retries=0, timeout=60)


def data_url(im, fmt="PNG") -> str:
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def ask(text, url=None):
    content = [{"type": "text", "text": text}]
    if url:
        content.append({"type": "image_url", "image_url": {"url": url}})
    return [{"role": "user", "content": content}]


def test_plain_answer_equals_generate(stack, client):
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Describe the picture."}],
                                       max_tokens=8)
    want = generate(stack["model"], stack["processor"], "Describe the picture.", max_new_tokens=8)
    assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant"
    assert r.object == "chat.completion" and r.model == "tiny"
    u = r.usage
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens and u.completion_tokens <= 8
    assert r.choices[0].finish_reason == ("length" if u.completion_tokens == 8 else "stop")
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_image_data_url_answer_equals_generate(stack, client):
    r = client.chat.completions.create(model="tiny", messages=ask("What is in the image?", data_url(image(1))),
                                       max_tokens=10)
    want = generate(stack["model"], stack["processor"], "What is in the image?", image(1), max_new_tokens=10)
    assert r.choices[0].message.content == want
    assert r.usage.prompt_tokens > stack["model"].cfg.num_image_tokens


def stream_text(client, messages, **kw):
    pieces, finish, usage = [], None, None
    for chunk in client.chat.completions.create(model="tiny", messages=messages, stream=True,
                                                stream_options={"include_usage": True}, **kw):
        assert chunk.object == "chat.completion.chunk"
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            pieces.append(c.delta.content or "")
            finish = c.finish_reason or finish
    return "".join(pieces), finish, usage


def test_streaming_equals_the_plain_answer(stack, client):
    url = data_url(image(3), "JPEG")
    text, finish, usage = stream_text(client, ask("What is in the image?", url), max_tokens=12)
    plain = client.chat.completions.create(model="tiny", messages=ask("What is in the image?", url), max_tokens=12)
    assert finish == plain.choices[0].finish_reason
    jpeg = Image.open(io.BytesIO(base64.b64decode(url.split(",")[1])))
    want = "".join(stream(stack["model"], stack["processor"], "What is in the image?", jpeg, max_new_tokens=12))
    assert text == want.lstrip()  # the pieces runtime.generate.stream yields
    assert usage.completion_tokens == plain.usage.completion_tokens
    assert usage.prompt_tokens_details.cached_tokens > 0  # the second ask reused the first one's prefix


def test_two_concurrent_streams_share_the_batch(stack, client):
    engine = stack["engine"]
    engine.stats["max_active"] = 0
    qs = [("Describe the picture.", image(4)), ("How many shapes are there?", image(5, (200, 320)))]
    out = [None, None]

    def run(i):
        q, im = qs[i]
        out[i] = stream_text(client, ask(q, data_url(im)), max_tokens=300)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for (q, im), (text, _, _) in zip(qs, out):
        assert text == "".join(stream(stack["model"], stack["processor"], q, im, max_new_tokens=300)).lstrip()
    assert engine.stats["max_active"] == 2  # both decoded in one batch at some point


def test_a_client_that_leaves_mid_stream_frees_its_row(stack):
    engine = stack["engine"]
    cancelled = engine.stats["cancelled"]
    # ignore_eos: the tiny model's sampled answer may end within a few tokens, before the client
    # has read its first words, and then there is no running row to free (seen as a flaky failure)
    body = {"model": "tiny", "messages": ask("Describe the picture."), "max_tokens": 1800, "stream": True,
            "ignore_eos": True}
    with httpx.Client(timeout=30) as h, h.stream("POST", stack["url"] + "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():  # the role chunk, then the first words
            if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                break
        assert engine.active == 1, dict(engine.stats)
    end = time.monotonic() + 10
    while (engine.active or engine.stats["cancelled"] == cancelled) and time.monotonic() < end:
        time.sleep(0.02)
    assert engine.active == 0 and engine.stats["cancelled"] == cancelled + 1, dict(engine.stats)


def test_a_client_that_drops_a_plain_request_frees_its_row(stack):
    engine = stack["engine"]
    cancelled = engine.stats["cancelled"]
    body = {"model": "tiny", "messages": ask("Describe the picture."), "max_tokens": 1800, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(stack["url"] + "/v1/chat/completions", json=body, timeout=httpx.Timeout(30, read=0.3))
    end = time.monotonic() + 10
    while (engine.active or engine.stats["cancelled"] == cancelled) and time.monotonic() < end:
        time.sleep(0.02)
    assert engine.active == 0 and engine.stats["cancelled"] == cancelled + 1, dict(engine.stats)


def raw(stack, body=None, content=None, url=None, headers=None):
    r = httpx.post((url or stack["url"]) + "/v1/chat/completions", json=body, content=content,
                   headers=headers, timeout=30)
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return r.status_code, err


def bomb_png(w=30000, h=30000) -> bytes:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b""))


def test_every_limit_is_a_4xx_in_openai_shape(stack):
    big = "x" * (3 * 2 ** 20)
    assert raw(stack, content=big, headers={"content-type": "application/json"})[0] == 413
    for w, h, said in [(5000, 5000, "5000x5000"), (30000, 30000, "over the limit of 1000000")]:
        bomb = "data:image/png;base64," + base64.b64encode(bomb_png(w, h)).decode()  # ~100 bytes
        status, err = raw(stack, {"messages": ask("hi", bomb)})
        assert status == 400 and err["code"] == "image_too_large" and said in err["message"]
    three = [{"type": "image_url", "image_url": {"url": data_url(image(i, (40, 40)))}} for i in range(3)]
    status, err = raw(stack, {"messages": [{"role": "user", "content": three + [{"type": "text", "text": "hi"}]}]})
    assert err["code"] == "too_many_images"
    long_prompt = " ".join(["shapes"] * 2100)
    assert raw(stack, {"messages": ask(long_prompt)})[1]["code"] == "context_length_exceeded"
    status, err = raw(stack, {"messages": ask("hi"), "max_tokens": 100000})
    assert err["code"] == "max_tokens_too_large" and err["param"] == "max_tokens"
    status, err = raw(stack, {"messages": ask("hi " * 300), "max_tokens": 1800})
    assert err["code"] == "context_length_exceeded"  # fine alone, not with this prompt


@pytest.mark.parametrize("body, param", [
    ("{not json", None),
    ([1, 2], None),
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "  "}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, "messages[0].content[0].type"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, "messages[1].role"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_p": 0}, "top_p"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, "n"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": [1]}, "stop"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": True}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "seed": -1}, "seed"),
    ({"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, "stream"),
    ({"messages": ask("hi", "data:text/plain;base64,aGVsbG8=")}, "messages[0].content[1].image_url.url"),
    ({"messages": ask("hi", "data:image/png;base64,bm90IGFuIGltYWdl")}, "messages[0].content[1].image_url.url"),
    ({"messages": ask("hi", "data:image/png;base64,@@@")}, "messages[0].content[1].image_url.url"),
    ({"messages": ask("hi", "http://example.com/cat.png")}, "messages[0].content[1].image_url.url"),
    ({"messages": [{"role": "user", "content": "what is <image> here?"}]}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": 3}},
                                                {"type": "text", "text": "hi"}]}]}, None),
])
def test_bad_input_is_a_400_naming_the_field(stack, body, param):
    status, err = raw(stack, content=body) if isinstance(body, str) else raw(stack, body)
    assert status == 400 and err["type"] == "invalid_request_error"
    if param:
        assert err["param"] == param


def test_http_urls_are_refused_with_a_clear_message(stack):
    _, err = raw(stack, {"messages": ask("hi", "https://example.com/cat.png")})
    assert err["code"] == "unsupported_image_url" and "no network" in err["message"]


def test_allow_dir_serves_inside_and_refuses_outside(stack, client):
    allowed, outside = stack["allowed"], stack["outside"]
    r = client.chat.completions.create(model="tiny", messages=ask("What is in the image?", "one.png"), max_tokens=4)
    r2 = client.chat.completions.create(model="tiny", messages=ask("What is in the image?", f"file://{allowed}/one.png"),
                                        max_tokens=4)
    assert r.choices[0].message.content == r2.choices[0].message.content
    for url in ["../" + outside.name + "/secret.png", f"{allowed}/../{outside.name}/secret.png",
                "link.png", f"file://{outside}/secret.png", str(outside / "secret.png")]:
        status, err = raw(stack, {"messages": ask("hi", url)})
        assert err["code"] == "path_not_allowed", url
    assert raw(stack, {"messages": ask("hi", "missing.png")})[1]["code"] == "image_not_found"
    # the keyed server was started without --allow-dir: no local files at all
    status, err = raw(stack, {"messages": ask("hi", "one.png")}, url=stack["keyed"],
                      headers={"Authorization": "Bearer sekrit"})
    assert err["code"] == "local_files_disabled"


def test_the_api_key_is_checked_on_every_request(stack):
    wrong = openai.OpenAI(base_url=stack["keyed"] + "/v1", api_key="guess", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model="tiny", messages=ask("hi"), max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    status, err = raw(stack, {"messages": ask("hi")}, url=stack["keyed"])
    assert status == 401 and err["type"] == "authentication_error"
    right = openai.OpenAI(base_url=stack["keyed"] + "/v1", api_key="sekrit", max_retries=0)
    assert right.chat.completions.create(model="tiny", messages=ask("hi"), max_tokens=2).choices[0].finish_reason
    assert httpx.get(stack["keyed"] + "/health").json()["auth"] is True
    check_exposure("127.0.0.1", None)
    check_exposure("::1", None)
    with pytest.raises(ValueError, match="--api-key"):
        check_exposure("0.0.0.0", None)
    check_exposure("0.0.0.0", "k")


def test_the_cli_refuses_an_open_host_before_loading(capsys):
    from llava_core.cli.main import main
    assert main(["serve", "/no/such/model", "--host", "0.0.0.0"]) == 1
    assert "--api-key" in capsys.readouterr().err


def test_attention_maps_average_to_the_probe(stack):
    im = image(7)
    answer = "A red circle is to the left of a blue square"
    body = {"messages": ask("What is in the image?", data_url(im)), "answer": answer}
    r = httpx.post(stack["url"] + "/v1/attention", json=body, timeout=60)
    assert r.status_code == 200, r.text
    got = r.json()
    ids = stack["processor"].tokenizer.encode(answer, add_special_tokens=False)
    assert len(got["tokens"]) == len(ids) and "".join(got["tokens"]) == answer
    maps = torch.tensor(got["maps"])  # (n, gh, gw)
    assert maps.shape == (len(ids), 24, 24) and bool((maps >= 0).all()) and bool((maps.sum((1, 2)) <= 1 + 1e-4).all())
    probe = image_attention(stack["model"], stack["processor"], im, "What is in the image?", answer_tokens=ids)
    torch.testing.assert_close(maps.mean(0), probe.map, atol=1e-5, rtol=0)
    assert raw_attention(stack, {"messages": ask("hi"), "answer": "x"}) == 400  # no image
    assert raw_attention(stack, {"messages": ask("hi", data_url(im))}) == 400  # no answer


def raw_attention(stack, body):
    r = httpx.post(stack["url"] + "/v1/attention", json=body, timeout=30)
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    return r.status_code


def test_a_data_url_is_turned_by_its_exif_orientation_as_a_file_is(tmp_path):
    """A JPEG whose EXIF says "rotate 90 degrees clockwise to view" (orientation 6) comes out of
    the server as open_image_file gives the same bytes from disk: turned, 48x64 from 64x48."""
    import numpy as np

    from llava_core.model.image_io import open_image_file
    from llava_core.serve.images import load_image_url
    img = Image.new("RGB", (64, 48), (255, 255, 255))
    img.paste((200, 0, 0), (0, 0, 16, 16))  # a red block in the top left corner
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif, quality=95)
    (tmp_path / "turned.jpg").write_bytes(buf.getvalue())
    url = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
    got = load_image_url(url, Limits(), None, "image_url")
    want = open_image_file(tmp_path / "turned.jpg")
    assert got.size == want.size == (48, 64)
    assert np.array_equal(np.asarray(got), np.asarray(want.convert("RGB")))
    assert np.asarray(got)[:16, -16:, 0].mean() > 150  # the block now in the top right corner


def test_a_16_bit_data_url_is_scaled_as_the_library_scales_it():
    """A 16-bit grayscale PNG sent as a data URL becomes the same RGB image as the same file given
    to the library (scaled to 8 bits; Pillow's own convert would clip almost every pixel to 255)."""
    import numpy as np

    from llava_core.model.image_io import to_rgb
    from llava_core.serve.images import load_image_url
    ramp = (np.arange(64 * 32, dtype=np.uint16).reshape(32, 64) * 32)  # 0 .. 65504
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    got = np.asarray(load_image_url(url, Limits(), None, "image_url"))
    want = np.asarray(to_rgb(Image.open(io.BytesIO(buf.getvalue()))))
    assert Image.open(io.BytesIO(buf.getvalue())).mode.startswith("I")  # really a 16-bit image
    assert np.array_equal(got, want) and (got == 255).mean() < 0.01
