"""Images, transcription, translation and speech end to end with the official openai SDK.

Registry, gateway and two nodes run as their own processes on the session's NATS; the models
are the tiny ones tests/tiny_models.py builds (random weights: outputs are noise, but every
library code path runs). Node "full" has every runtime; node "noimage" runs without diffusers
(``--runtimes``), so it must never be asked for an image.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import wave

import httpx
import pytest
from conftest import Stack, has_llama, wait_until

openai = pytest.importorskip("openai")
pytest.importorskip("multipart")  # python-multipart: Starlette's form parser
pytest.importorskip("PIL")
pytest.importorskip("numpy")
from tiny_models import build_tiny_mmproj, make_mask_png, make_png, make_wav  # noqa: E402

pytestmark = pytest.mark.e2e

SD, WHISPER, VOICE, CHAT, VISION = "mm-sd", "mm-whisper", "mm-voice", "mm-chat", "mm-vision"


@pytest.fixture(scope="module")
def stack(nats_url, sd_dir, whisper_dir, voice_path, tiny_gguf, tmp_path_factory):
    stack = Stack(nats_url, tmp_path_factory.mktemp("mm"), node=False)
    stack.full = stack.start_node("full")
    stack.noimage = stack.start_node("noimage", "--runtimes", "llama_cpp,faster_whisper,piper")
    models = {SD: sd_dir, WHISPER: whisper_dir, VOICE: voice_path}
    if has_llama():
        models[CHAT] = tiny_gguf
        # The same tiny GGUF with a projector beside it (llama.cpp's layout): a vision model.
        vision_dir = tmp_path_factory.mktemp("vision")
        (vision_dir / "tiny-vision.gguf").write_bytes(tiny_gguf.read_bytes())
        build_tiny_mmproj(vision_dir / "mmproj-tiny.gguf")
        models[VISION] = vision_dir / "tiny-vision.gguf"
    for name, path in models.items():
        # Greedy decoding: a random-weight Whisper otherwise beam-searches to its length limit.
        labels = {"beam_size": "1"} if name == WHISPER else {}
        reply = stack.admin("register", {"path": str(path), "name": name, "labels": labels})
        assert reply["ok"], reply
    # Every node loads what its runtimes can run, one model after another: wait for all of them.
    wanted = {stack.full.node_id: set(models), stack.noimage.node_id: set(models) - {SD}}

    def loaded() -> bool:
        nodes = httpx.get(stack.url + "/v0/nodes").json()["data"]
        have = {n["id"]: {m["name"] for m in n["models"] if m["state"] == "ready"} for n in nodes}
        return all(want <= have.get(node, set()) for node, want in wanted.items())

    wait_until(loaded, timeout=90, message="every model served by every node that can run it")
    yield stack
    for node in (stack.full, stack.noimage):
        if node.popen.poll() is None:
            node.stop()
    stack.close()


@pytest.fixture(scope="module")
def client(stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def png_size(data: bytes) -> tuple[int, int]:
    from PIL import Image

    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    image.load()
    return image.size


def bad_request(call, *, param: str, code: str | None = None, status: int = 400):
    with pytest.raises(openai.APIStatusError) as err:
        call()
    assert err.value.status_code == status, err.value.body
    assert err.value.body["param"] == param, err.value.body
    if code is not None:
        assert err.value.body["code"] == code, err.value.body
    return err.value


# ------------------------------------------------------------ discovery


def test_models_and_heartbeats_show_capabilities_and_runtimes(stack, client) -> None:
    caps = {m.id: set(m.model_extra["capabilities"]) for m in client.models.list()}
    assert caps[SD] == {"image"}
    assert caps[WHISPER] == {"transcription", "translation"}
    assert caps[VOICE] == {"speech"}
    nodes = {n["id"]: n for n in httpx.get(stack.url + "/v0/nodes").json()["data"]}
    full = {r["name"]: r for r in nodes[stack.full.node_id]["runtimes"]}
    assert full["diffusers"]["available"] and full["diffusers"]["models"] == [SD]
    assert full["faster_whisper"]["models"] == [WHISPER] and full["piper"]["models"] == [VOICE]
    assert "transcription" in full["faster_whisper"]["capabilities"]
    noimage = nodes[stack.noimage.node_id]
    assert "diffusers" not in {r["name"] for r in noimage["runtimes"]}
    assert SD not in {m["name"] for m in noimage["models"]}


# ------------------------------------------------------------ images


def test_generate_returns_pngs_of_the_requested_size(client) -> None:
    out = client.images.generate(
        model=SD, prompt="a red square", size="64x96", n=2, response_format="b64_json", extra_body={"seed": 3}
    )
    assert len(out.data) == 2
    for item in out.data:
        assert png_size(base64.b64decode(item.b64_json)) == (64, 96)


def test_generate_url_is_served_by_the_gateway(client) -> None:
    out = client.images.generate(model=SD, prompt="a blue circle", size="64x64", response_format="url")
    url = out.data[0].url
    assert "/v0/files/" in url
    got = httpx.get(url)
    assert got.status_code == 200 and got.headers["content-type"] == "image/png"
    assert png_size(got.content) == (64, 64)
    assert httpx.get(url.rsplit("/", 1)[0] + "/" + "0" * 32 + ".png").status_code == 404


def test_edit_and_variation(client) -> None:
    image = make_png(64, 64)
    mask = make_mask_png(64, 64, (16, 16, 48, 48))
    edited = client.images.edit(
        model=SD,
        image=("in.png", image, "image/png"),
        mask=("mask.png", mask, "image/png"),
        prompt="a cat",
        response_format="b64_json",
    )
    assert png_size(base64.b64decode(edited.data[0].b64_json)) == (64, 64)
    varied = client.images.create_variation(
        model=SD, image=("in.png", make_png(96, 64), "image/png"), n=2, response_format="b64_json"
    )
    assert [png_size(base64.b64decode(d.b64_json)) for d in varied.data] == [(96, 64), (96, 64)]


def test_bad_image_requests_are_400_with_param(stack, client) -> None:
    bad_request(lambda: client.images.generate(model=SD, prompt=" ", size="64x64"), param="prompt")
    bad_request(lambda: client.images.generate(model=SD, prompt="x", size="big"), param="size")
    bad_request(lambda: client.images.generate(model=SD, prompt="x", size="100x100"), param="size")  # engine's rule
    bad_request(lambda: client.images.generate(model=SD, prompt="x", size="64x64", n=11), param="n")
    bad_request(
        lambda: client.images.edit(model=SD, image=("x.png", b"not an image", "image/png"), prompt="x"), param="image"
    )
    bad_request(
        lambda: client.images.create_variation(model=SD, image=("x.png", b"\x89PNG broken", "image/png")), param="image"
    )
    no_image = httpx.post(stack.url + "/v1/images/edits", data={"model": SD, "prompt": "x"}, files={"x": ("a", b"b")})
    assert no_image.status_code == 400 and no_image.json()["error"]["param"] == "image"
    no_prompt = httpx.post(stack.url + "/v1/images/edits", data={"model": SD}, files={"image": ("a.png", make_png())})
    assert no_prompt.status_code == 400 and no_prompt.json()["error"]["param"] == "prompt"


def test_only_nodes_with_the_image_runtime_subscribe_to_image_subjects(stack, client, nats_monitor_url) -> None:
    for _ in range(3):
        raw = client.images.with_raw_response.generate(model=SD, prompt="x", size="64x64", response_format="b64_json")
        assert raw.headers["x-node-id"] == stack.full.node_id
    if nats_monitor_url is None:
        pytest.skip("subject check needs the embedded nats-server's monitoring port")
    connz = httpx.get(nats_monitor_url + "/connz", params={"subs": "1", "limit": "1000"}).json()
    subs = {c.get("name"): c.get("subscriptions_list", []) for c in connz["connections"]}
    full, noimage = subs[f"node-{stack.full.node_id}"], subs[f"node-{stack.noimage.node_id}"]
    assert any(s.startswith("infer.image.") for s in full)
    assert not any(s.startswith("infer.image.") for s in noimage), noimage
    assert any(s.startswith("infer.speech.") for s in noimage)  # it does serve the voice


# ------------------------------------------------------------ speech to text


def test_transcription_in_several_formats(client) -> None:
    wav = make_wav(seconds=2.0)
    out = client.audio.transcriptions.create(model=WHISPER, file=("a.wav", wav, "audio/wav"))
    assert isinstance(out.text, str)
    text = client.audio.transcriptions.create(model=WHISPER, file=("a.wav", wav), response_format="text")
    assert isinstance(text, str)
    srt = client.audio.transcriptions.create(model=WHISPER, file=("a.wav", wav), response_format="srt")
    assert isinstance(srt, str) and ("-->" in srt or srt.strip() == "")
    verbose = client.audio.transcriptions.create(
        model=WHISPER,
        file=("a.wav", wav),
        response_format="verbose_json",
        language="en",
        timestamp_granularities=["word", "segment"],
    )
    assert verbose.language == "english" and abs(verbose.duration - 2.0) < 0.01
    assert isinstance(verbose.segments, list) and isinstance(verbose.words, list)
    translated = client.audio.translations.create(model=WHISPER, file=("a.wav", wav))
    assert isinstance(translated.text, str)


async def test_a_large_upload_goes_through_the_object_store_and_is_deleted(stack, client, nats_url) -> None:
    import nats

    wav = make_wav(seconds=70.0)  # 2.24 MB of 16 kHz PCM
    assert len(wav) > 2 * 1024 * 1024
    nc = await nats.connect(nats_url)
    metas: list[dict] = []

    async def collect(msg) -> None:
        metas.append(json.loads(msg.data))

    sub = await nc.subscribe("$O.payloads.M.>", cb=collect)
    try:
        out = await asyncio.to_thread(
            client.audio.transcriptions.create,
            model=WHISPER,
            file=("big.wav", wav, "audio/wav"),
            response_format="verbose_json",
        )
        assert abs(out.duration - 70.0) < 0.01
        await nc.flush()
        uploads = [m for m in metas if m["name"].endswith(".wav") and m.get("size") == len(wav)]
        assert len(uploads) == 1, metas
        name = uploads[0]["name"]
        for _ in range(50):  # the gateway deletes it as the call ends, just before answering
            if any(m["name"] == name and m.get("deleted") for m in metas):
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError(f"the upload's object {name} was not deleted: {metas}")
        store = await nc.jetstream().object_store("payloads")
        with pytest.raises(nats.js.errors.NotFoundError):
            await store.get_info(name)
    finally:
        await sub.unsubscribe()
        await nc.close()


def test_bad_audio_requests(stack, client) -> None:
    wav = make_wav(seconds=1.0)
    bad_request(
        lambda: client.audio.transcriptions.create(model=WHISPER, file=("a.png", make_png(), "image/png")), param="file"
    )
    bad_request(
        lambda: client.audio.transcriptions.create(model=WHISPER, file=("a.wav", wav), response_format="xml"),
        param="response_format",
    )
    bad_request(
        lambda: client.audio.transcriptions.create(model=WHISPER, file=("a.wav", wav), temperature=3),
        param="temperature",
    )
    no_file = httpx.post(stack.url + "/v1/audio/transcriptions", data={"model": WHISPER}, files={"x": ("a", b"b")})
    assert no_file.status_code == 400 and no_file.json()["error"]["param"] == "file"
    too_big = httpx.post(
        stack.url + "/v1/audio/transcriptions",
        data={"model": WHISPER},
        files={"file": ("big.wav", b"\0" * (26 * 1024 * 1024))},
        timeout=60,
    )
    assert too_big.status_code == 413, too_big.text
    bad_request(lambda: client.audio.speech.create(model=VOICE, voice="alloy", input=""), param="input")
    bad_request(lambda: client.audio.speech.create(model=VOICE, voice="alloy", input="hi", speed=9), param="speed")


# ------------------------------------------------------------ text to speech


def test_speech_is_a_wav_at_the_voice_sample_rate(client) -> None:
    audio = client.audio.speech.create(model=VOICE, voice="alloy", input="Hello world.", response_format="wav")
    with wave.open(io.BytesIO(audio.content)) as wav:
        assert wav.getframerate() == 22050 and wav.getnchannels() == 1 and wav.getsampwidth() == 2
        assert wav.getnframes() > 0
    raw = client.audio.speech.with_raw_response.create(model=VOICE, voice="alloy", input="Hi.", response_format="pcm")
    assert raw.headers["content-type"] == "audio/pcm" and len(raw.content) > 0


# ------------------------------------------------------------ capability validation


def test_a_model_on_the_wrong_endpoint_is_400_naming_the_capability(client) -> None:
    err = bad_request(
        lambda: client.images.generate(model=VOICE, prompt="x"), param="model", code="unsupported_capability"
    )
    assert "image generation" in err.message
    err = bad_request(lambda: client.audio.speech.create(model=SD, voice="alloy", input="hi"), param="model")
    assert "text to speech" in err.message
    bad_request(
        lambda: client.audio.transcriptions.create(model=VOICE, file=("a.wav", make_wav(seconds=1.0))),
        param="model",
        code="unsupported_capability",
    )
    err = bad_request(
        lambda: client.chat.completions.create(model=VOICE, messages=[{"role": "user", "content": "x"}]), param="model"
    )
    assert "chat completions" in err.message


def image_messages(size: int = 8) -> list[dict]:
    data_url = "data:image/png;base64," + base64.b64encode(make_png(size, size)).decode()
    return [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "what is this?"},
                {"type": "image_url", "image_url": {"url": data_url}},
            ],
        }
    ]


def test_vision_chat_through_the_tiny_projector(stack, client) -> None:
    if not has_llama():
        pytest.skip("llama-cpp-python is not installed")
    assert "vision" in client.models.retrieve(VISION).model_extra["capabilities"]
    out = client.chat.completions.create(model=VISION, messages=image_messages(40), max_tokens=4)
    assert isinstance(out.choices[0].message.content, str)
    assert out.usage.prompt_tokens > 16  # the 16 image tokens of the projector, plus the text
    text_only = client.chat.completions.create(model=VISION, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert text_only.choices[0].message.role == "assistant"
    nodes = {n["id"]: n for n in httpx.get(stack.url + "/v0/nodes").json()["data"]}
    llama = {r["name"]: r for r in nodes[stack.full.node_id]["runtimes"]}["llama_cpp"]
    assert VISION in llama["models"] and "vision" in llama["capabilities"]


def test_an_image_to_a_text_only_model_is_400(client) -> None:
    if not has_llama():
        pytest.skip("llama-cpp-python is not installed")
    err = bad_request(lambda: client.chat.completions.create(model=CHAT, messages=image_messages()), param="messages")
    assert "does not accept images" in err.message
    # The same model still chats when the message has no image.
    out = client.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert out.choices[0].message.role == "assistant"
