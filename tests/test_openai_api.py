"""The OpenAI-compatible /v1 routes, driven by the official `openai` client against the running app."""

from __future__ import annotations

import base64
import io
import json
import threading
import urllib.error
import urllib.request

import pytest
from helpers import normalize
from PIL import Image

openai = pytest.importorskip("openai")
QUIET = {"noise_scale": 0, "noise_w": 0}  # Piper without sampling noise: the same text gives the same audio

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def api(app_server):
    url, _, _ = app_server
    return openai.OpenAI(base_url=f"{url}v1", api_key="not-needed", max_retries=0, timeout=120)


def png_data_url(color="red", size=(32, 32)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def post(url: str, body: bytes, content_type: str = "application/json") -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def test_models_lists_the_catalog_with_tasks_and_what_is_loaded(api, app_server):
    _, manager, _ = app_server
    manager.unload_all()
    with manager.use("tiny-chat"):
        models = {model.id: model for model in api.models.list().data}
    assert models["tiny-chat"].loaded and not models["tiny-sd"].loaded
    assert {"smollm2-135m", "tiny-vlm", "tiny-sd", "whisper-tiny.en", "piper-joe"} <= set(models)
    assert models["smollm2-135m"].task == "chat" and models["tiny-sd"].task == "text-to-image"
    assert "tiny-smolvlm" not in models, "architecture twins are not offered"


def test_chat_names_paris_streaming_and_not(api):
    question = [{"role": "user", "content": "What is the capital of France?"}]
    whole = api.chat.completions.create(model="smollm2-135m", messages=question, temperature=0, max_tokens=30)
    assert "Paris" in whole.choices[0].message.content and whole.choices[0].finish_reason == "stop"
    assert whole.usage.prompt_tokens > 5 and 0 < whole.usage.completion_tokens <= 30
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    chunks = list(api.chat.completions.create(model="smollm2-135m", messages=question, temperature=0, max_tokens=30,
                                              stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content, "streaming and not give the same greedy answer"
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) >= 3, "it streamed"
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_stop_max_tokens_and_seed(api):
    question = [{"role": "user", "content": "What is the capital of France?"}]
    stopped = api.chat.completions.create(model="smollm2-135m", messages=question, temperature=0, max_tokens=30,
                                          stop=["Paris"])
    assert "Paris" not in stopped.choices[0].message.content and stopped.choices[0].finish_reason == "stop"
    short = api.chat.completions.create(model="smollm2-135m", messages=question, temperature=0, max_tokens=2)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 2
    story = [{"role": "user", "content": "Tell me a story about a cat."}]
    first, second = (api.chat.completions.create(model="smollm2-135m", messages=story, temperature=1.0, seed=7,
                                                 max_tokens=12).choices[0].message.content for _ in range(2))
    assert first == second, "the same seed samples the same reply"


def test_a_vision_message_goes_to_the_vqa_model(api):
    message = [{"role": "user", "content": [{"type": "text", "text": "What colour is it?"},
                                            {"type": "image_url", "image_url": {"url": png_data_url()}}]}]
    reply = api.chat.completions.create(model="tiny-vlm", messages=message, temperature=0, max_tokens=6)
    assert reply.choices[0].message.content and reply.usage.prompt_tokens > 0
    with pytest.raises(openai.UnprocessableEntityError, match="is a chat model"):
        api.chat.completions.create(model="smollm2-135m", messages=message, max_tokens=4)


def test_images_carry_their_recipe(api, tmp_path):
    from models.pnginfo import read_recipe

    result = api.images.generate(model="tiny-sd", prompt="a red square", size="64x64", n=2,
                                 extra_body={"steps": 2, "seed": 42, "negative_prompt": "blue"})
    assert len(result.data) == 2
    for index, image in enumerate(result.data):
        path = tmp_path / f"{index}.png"
        path.write_bytes(base64.b64decode(image.b64_json))
        recipe = read_recipe(path)
        assert recipe["prompt"] == "a red square" and recipe["seed"] == 42 + index and recipe["width"] == 64
        assert recipe["negative_prompt"] == "blue" and recipe["steps"] == 2


def test_speech_and_transcription_on_the_offline_voice_models(api, tmp_path):
    speech = api.audio.speech.create(model="piper-joe", voice="alloy", input="The train leaves at nine.",
                                     response_format="wav", extra_body=QUIET)
    wav = tmp_path / "speech.wav"
    wav.write_bytes(speech.content)
    with open(wav, "rb") as file:
        text = api.audio.transcriptions.create(model="whisper-1", file=file).text
    assert {"train", "leaves", "nine"} <= set(normalize(text)), text
    with open(wav, "rb") as file:
        verbose = api.audio.transcriptions.create(model="whisper-base", file=file, response_format="verbose_json",
                                                  timestamp_granularities=["word"])
    assert verbose.language == "en" and len(verbose.words) >= 4
    assert [w.start for w in verbose.words] == sorted(w.start for w in verbose.words)
    with open(wav, "rb") as file:
        srt = api.audio.transcriptions.create(model="whisper-tiny.en", file=file, response_format="srt")
    assert "-->" in srt and "," in srt.split("-->")[0]
    flac = api.audio.speech.create(model="piper-joe", voice="alloy", input="Hello.", response_format="flac")
    assert flac.content[:4] == b"fLaC"


# ---- bad input --------------------------------------------------------------------------------------

BAD_CHAT = [
    ({"model": "smollm2-135m", "messages": []}, 400, "messages must be a non-empty list"),
    ({"model": "smollm2-135m", "messages": "hello"}, 400, "messages must be a non-empty list"),
    ({"model": "smollm2-135m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 100000}, 400,
     "max_tokens must be between 1 and"),
    ({"model": "smollm2-135m", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, 400,
     "temperature must be a number"),
    ({"model": "smollm2-135m", "messages": [{"role": "user", "content": "x"}], "n": 3}, 400, "n must be between 1"),
    ({"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404, "Unknown model 'nope'"),
    ({"model": "tiny-sd", "messages": [{"role": "user", "content": "x"}]}, 422, "is a text-to-image model"),
    ({"model": "tiny-vlm", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@not-base64"}}]}]}, 400,
     "base64 payload is broken"),
    ({"model": "tiny-vlm", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://127.0.0.1:1/cat.png"}}]}]}, 400,
     "Remote image URLs are off"),
    ({"model": "tiny-vlm", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://localhost/cat.png"}}]}]}, 400, "Remote image URLs are off"),
]


@pytest.mark.parametrize("body,status,message", BAD_CHAT)
def test_bad_chat_requests_get_openai_errors(app_server, body, status, message):
    url, manager, _ = app_server
    code, reply = post(f"{url}v1/chat/completions", json.dumps(body).encode())
    assert code == status and message in reply["error"]["message"], reply
    assert set(reply["error"]) == {"message", "type", "param", "code"}
    assert not any(entry["pinned"] for entry in manager.snapshot())


def test_malformed_json_and_bad_media_requests(app_server):
    url, _, _ = app_server
    assert post(f"{url}v1/chat/completions", b"{not json")[0] == 400
    code, reply = post(f"{url}v1/images/generations", json.dumps({"prompt": "x", "model": "tiny-sd", "n": 9}).encode())
    assert code == 400 and "number of images must be between 1 and" in reply["error"]["message"]
    code, reply = post(f"{url}v1/images/generations", json.dumps({"prompt": "x", "response_format": "url"}).encode())
    assert code == 400 and "b64_json" in reply["error"]["message"]
    code, reply = post(f"{url}v1/audio/speech", json.dumps({"model": "piper-joe", "input": "hi",
                                                            "response_format": "mp3"}).encode())
    assert code == 400 and "response_format must be one of" in reply["error"]["message"]
    boundary = "workbench"
    form = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n"
            f"--{boundary}--\r\n").encode()
    code, reply = post(f"{url}v1/audio/transcriptions", form, f"multipart/form-data; boundary={boundary}")
    assert code == 400 and "needs a file" in reply["error"]["message"]
    text_file = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n"
                 f"Content-Type: audio/wav\r\n\r\nthis is not audio\r\n--{boundary}--\r\n").encode()
    code, reply = post(f"{url}v1/audio/transcriptions", text_file, f"multipart/form-data; boundary={boundary}")
    assert code == 400 and "not audio" in reply["error"]["message"]
    with urllib.request.urlopen(f"{url}health", timeout=10) as response:
        assert response.status == 200


def test_remote_image_urls_to_local_addresses_are_refused_even_when_allowed(settings):
    import dataclasses

    from api.errors import ApiError
    from api.images import save_image_url

    allowed = dataclasses.replace(settings, allow_remote_images=True)
    for url in ("http://127.0.0.1:9/cat.png", "http://localhost/cat.png", "https://[::1]/x.png",
                "http://169.254.169.254/latest/meta-data", "http://10.0.0.1/x.png"):
        with pytest.raises(ApiError, match="loopback, private, link-local or reserved"):
            save_image_url(url, allowed)
    with pytest.raises(ApiError, match="data: URL or an http"):
        save_image_url("file:///etc/passwd", allowed)


def test_api_key_and_closed_api(tmp_path):
    """--api-key requires a Bearer token on /v1; --auth without a key closes /v1."""
    from conftest import free_port

    import app

    for flags, headers, status in ((["--api-key", "s3cret"], {}, 401),
                                   (["--api-key", "s3cret"], {"Authorization": "Bearer wrong"}, 401),
                                   (["--api-key", "s3cret"], {"Authorization": "Bearer s3cret"}, 200),
                                   (["--auth", "u:p"], {"Authorization": "Bearer anything"}, 401)):
        port = free_port()
        settings, manager, demo = app.create(["--offline", "--cache-dir", str(tmp_path), "--port", str(port),
                                              "--device", "cpu", *flags])
        demo.launch(prevent_thread_lock=True, quiet=True, **app.launch_kwargs(settings, manager))
        try:
            request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/models", headers=headers)
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    code, body = response.status, json.load(response)
            except urllib.error.HTTPError as error:
                code, body = error.code, json.load(error)
            assert code == status, (flags, headers, body)
            if status == 401:
                assert body["error"]["code"] in ("invalid_api_key", "api_closed")
        finally:
            demo.close()


def test_api_and_ui_calls_at_once_share_the_budget(api, client, app_server):
    """Concurrent /v1 and gradio_client calls on the same model: nothing fails, and the budget holds."""
    _, manager, _ = app_server
    errors, peaks = [], []

    def through_api():
        try:
            api.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "hi"}],
                                        max_tokens=8, temperature=0)
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    def through_ui():
        try:
            client.predict("hi", [], "tiny-chat", "", 8, 0.0, "none", api_name="/chat")
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=fn) for fn in (through_api, through_ui) * 3]
    for thread in threads:
        thread.start()
    while any(thread.is_alive() for thread in threads):
        peaks.append(manager.used_bytes())
        threads[0].join(0.02)
    for thread in threads:
        thread.join()
    assert errors == []
    assert max(peaks) <= manager.budget
    assert not any(entry["pinned"] for entry in manager.snapshot())
