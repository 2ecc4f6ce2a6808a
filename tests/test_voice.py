"""Voice assistant: asr/tts families on tiny models, the turn pipeline, and /transcribe /chat /speak /voice."""

from __future__ import annotations

import subprocess

import helpers
import numpy as np
import pytest
import soundfile as sf

from models import voice

QUESTION = "What is the capital of France?"


def sine(rate=48000, seconds=1.5, channels=2):
    t = np.arange(int(rate * seconds)) / rate
    signal = 0.3 * np.sin(2 * np.pi * 220 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))
    return np.stack([signal] * channels, axis=1).astype(np.float32) if channels > 1 else signal.astype(np.float32)


@pytest.fixture(scope="module")
def audio_files(tmp_path_factory):
    """Speech from espeak-ng (when installed), stereo 48 kHz, 8 kHz, and each kind of bad file."""
    folder = tmp_path_factory.mktemp("voice-audio")
    files = {}
    sf.write(folder / "stereo48k.wav", sine(48000), 48000)
    sf.write(folder / "mono8k.flac", sine(8000, channels=1), 8000, format="FLAC")
    sf.write(folder / "silent.wav", np.zeros(16000, dtype=np.float32), 16000)
    (folder / "empty.wav").write_bytes(b"")
    (folder / "text.ogg").write_text("definitely not audio\n" * 50)
    good = (folder / "stereo48k.wav").read_bytes()
    (folder / "corrupt.wav").write_bytes(good[:8] + b"XXXXjunk" + b"\x00" * 28 + good[44:])
    sf.write(folder / "long.flac", np.tile(sine(8000, 10.0, 1), 61), 8000, format="FLAC")  # 10 min 10 s
    for name in ("stereo48k", "mono8k", "silent", "empty", "text", "corrupt", "long"):
        files[name] = next(str(p) for p in folder.iterdir() if p.stem == name)
    speech = folder / "speech.wav"  # espeak-ng is installed by `make test`
    subprocess.run(["espeak-ng", "-w", str(speech), QUESTION], check=True, timeout=30)
    files["speech"] = str(speech)
    return files


# ---- families on the tiny models ------------------------------------------------------------------

def test_asr_family_transcribes_chunks_with_timestamps_and_checks_language(manager):
    from models.families import asr

    seconds = 65  # three 30 s chunks
    samples = np.tile(sine(16000, 1.0, 1), seconds)
    calls = []
    with manager.use("tiny-whisper") as handle:
        assert {"en", "zh"} <= set(handle.languages)
        result = asr.transcribe(handle, samples, "english", "transcribe", "segment",
                                progress=lambda fraction, text: calls.append(fraction))
        translated = asr.transcribe(handle, samples[:16000 * 3], "chinese", "translate", "word")
        with pytest.raises(ValueError, match="does not support the language 'korean'"):
            asr.transcribe(handle, samples, "korean")
        with pytest.raises(ValueError, match="task must be"):
            asr.transcribe(handle, samples, "auto", "summarize")
    assert isinstance(result.text, str) and result.chunks == 3 and result.audio_seconds == seconds
    assert calls[0] == 0.0 and calls[-1] == 1.0 and len(calls) == 4
    assert all(0 <= start <= end <= seconds + 0.01 for start, end, _ in result.segments)
    assert isinstance(translated.text, str) and translated.language == "zh"
    assert not manager.snapshot()[0]["pinned"]


def test_tts_family_speaks_sentences_at_model_rate(manager):
    from models.families import tts

    text = "Hello there. How are you today? " + "This sentence is rather long, " * 12 + "and it ends."
    assert len(tts.split_sentences(text)) >= 4
    assert all(len(piece) <= tts.MAX_PIECE_CHARS for piece in tts.split_sentences(text))
    with manager.use("tiny-tts") as handle:
        one, rate = tts.speak(handle, "Hello there.")
        many, _ = tts.speak(handle, text, speed=1.5)
        again, _ = tts.speak(handle, "Hello there.")
        assert rate == handle.sample_rate == tts.TINY_SAMPLE_RATE
        assert handle.tts.synthesizer.tts_model.length_scale == 1  # speed is restored after the call
        for bad, message in [("?!... ---", "no letters"), ("🙂🎉👍", "no letters"), ("x" * 3001, "limit is 3000"),
                             ("你好", "cannot pronounce"), ("   ", "Type some text")]:
            with pytest.raises(ValueError, match=message):
                tts.speak(handle, bad)
        with pytest.raises(ValueError, match="speed"):
            tts.speak(handle, "Hello", speed=5)
        with pytest.raises(ValueError, match="no speaker"):
            tts.speak(handle, "Hello", speaker="alice")
        with pytest.raises(ValueError, match="does not speak"):
            tts.speak(handle, "Hello", language="fr")
    assert one.dtype == np.float32 and len(one) > rate * 0.1 and np.isfinite(one).all()
    assert len(many) > len(one)
    assert len(again) == len(one)


def test_tiny_builds_are_deterministic(tmp_path):
    import torch

    from models.families import asr, tts

    for family, weights in ((tts, "model.pth"), (asr, "model.safetensors")):
        first, second = tmp_path / f"{family.__name__}-a", tmp_path / f"{family.__name__}-b"
        first.mkdir()
        second.mkdir()
        family.build_tiny(first)
        family.build_tiny(second)
        if weights.endswith(".pth"):
            a, b = (torch.load(f / weights, weights_only=True)["model"] for f in (first, second))
        else:
            from safetensors.torch import load_file

            a, b = (load_file(f / weights) for f in (first, second))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- the turn pipeline (plain functions) ----------------------------------------------------------

def test_voice_turn_stages_in_order_and_unpinned(manager, settings, audio_files):
    updates = []
    for update in helpers.voice_turn(manager, settings, audio=audio_files["speech"], history=[],
                                   asr_model="whisper-tiny.en", chat_model="tiny-chat", tts_model="tiny-tts",
                                   max_new_tokens=12, temperature=0.0):
        updates.append((update.stage, update.transcript, update.reply, update.audio is not None))
        pinned = {m["id"] for m in manager.snapshot() if m["pinned"]}
        allowed = {"transcribing": {"whisper-tiny.en"}, "replying": {"tiny-chat", "tiny-tts"},
                   "speaking": {"tiny-tts"}}.get(update.stage, set())
        assert pinned <= allowed, f"{pinned} pinned while {update.stage}"
    stages = [stage for stage, *_ in updates]
    assert stages[0] == "transcribing" and "replying" in stages and stages[-1].startswith("done")
    assert "capital of france" in updates[0][1].lower() and not updates[0][2] and not updates[0][3]  # transcript first
    assert not any(has_whole for *_, has_whole in updates[:-1])  # the whole WAV only at the end
    final = update
    assert final.history[-2]["role"] == "user" and final.history[-1] == {"role": "assistant", "content": final.reply}
    assert final.timings.asr_seconds > 0 and final.timings.llm_tokens > 0
    # Greedy tiny-chat noise for this input holds letters, so the voice speaks it
    assert final.stage == "done" and final.audio[0] == 22050 and len(final.audio[1]) > 0
    assert not any(m["pinned"] for m in manager.snapshot())


def test_typed_turn_speaks_the_reply(manager, settings):
    final = voice.last(helpers.voice_turn(manager, settings, text="hello", chat_model="tiny-chat", max_new_tokens=12,
                                        temperature=0.0, tts_model="tiny-tts", stream_speech=False))
    assert final.stage == "done" and final.reply
    rate, samples = final.audio
    assert rate == 22050 and samples.dtype == np.int16 and len(samples) > 0
    assert final.timings.tts_seconds > 0 and final.timings.audio_out_seconds > 0
    assert final.timings.real_time_factor > 0 and "real-time factor" in final.timings.markdown()
    assert {"tiny-chat", "tiny-tts"} <= {m["id"] for m in manager.snapshot()}
    assert not any(m["pinned"] for m in manager.snapshot())


def test_typed_text_skips_asr_and_history_carries_over(manager, settings):
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    final = voice.last(helpers.voice_turn(manager, settings, text="  Tell me more.  ", history=history,
                                        chat_model="tiny-chat", tts_model="tiny-tts", max_new_tokens=8,
                                        temperature=0.0))
    assert final.transcript == "Tell me more." and final.timings.asr_seconds == 0
    assert final.history[:2] == history and len(final.history) == 4
    assert not manager.is_loaded("tiny-whisper")


@pytest.mark.parametrize("name,message", [("silent", "silent"), ("empty", "0 bytes"), ("text", "damaged or not audio"),
                                          ("corrupt", "damaged"), ("long", "limit is 10 min 00 s")])
def test_bad_audio_is_refused_before_any_model_loads(manager, settings, audio_files, name, message):
    with pytest.raises(ValueError, match=message):
        voice.last(helpers.voice_turn(manager, settings, audio=audio_files[name], asr_model="tiny-whisper",
                                    chat_model="tiny-chat", tts_model="tiny-tts"))
    assert not any(m["pinned"] for m in manager.snapshot())


def test_bad_arguments(manager, settings):
    cases = [
        (dict(text=""), "No input"),
        (dict(text="hi", chat_model="no-such-model"), "Unknown model 'no-such-model'"),
        (dict(text="hi", chat_model="tiny-whisper"), "is a speech-to-text model"),
        (dict(text="hi", chat_model="tiny-chat", history=[{"role": "robot", "content": "x"}]), "history message 0"),
        (dict(text="hi", chat_model="tiny-chat", temperature=9), "temperature"),
        (dict(text="hi", chat_model="tiny-chat", adapter="missing"), "Unknown adapter"),
        (dict(text="hi", chat_model="tiny-chat", speed=3.0), "speed must be between"),
        (dict(text="hi", chat_model="tiny-chat", tts_model="tiny-chat"), "is a chat model"),
        (dict(text="hi", chat_model="tiny-chat", timestamps="sometimes"), "timestamps must be"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            voice.last(helpers.voice_turn(manager, settings, **{"tts_model": "tiny-tts", **kwargs}))
    with pytest.raises(ValueError, match="task must be one of"):
        helpers.transcribe(manager, settings, "x.wav", model="tiny-whisper", task="dance")
    with pytest.raises(ValueError, match="no letters"):
        helpers.speak(manager, settings, "¡¿…!?", model="tiny-tts")
    assert not any(m["pinned"] for m in manager.snapshot())


# ---- the assembled app through gradio_client --------------------------------------------------------

def test_endpoints_are_named(client):
    names = set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    assert {"/transcribe", "/chat", "/speak", "/voice"} <= names


def test_voice_endpoint_end_to_end(client, audio_files):
    from gradio_client import handle_file

    transcript, reply, audio_path, timings = client.predict(
        audio=handle_file(audio_files["speech"]), text="", history=[], asr_model="whisper-tiny.en", language="auto",
        chat_model="tiny-chat", system_prompt="Be brief.", tts_model="tiny-tts", temperature=0.0, api_name="/voice")
    assert "capital of france" in transcript.lower() and reply.strip()
    assert timings["asr_seconds"] > 0 and timings["llm_tokens"] > 0
    data, rate = sf.read(audio_path)  # greedy tiny-chat noise for this question holds letters: it is spoken
    assert rate == 22050 and len(data) > 0
    typed = client.predict(audio=None, text="hello", history=[], chat_model="tiny-chat", tts_model="tiny-tts",
                           max_new_tokens=12, temperature=0.0, api_name="/voice")
    assert typed[0] == "hello" and typed[3]["asr_seconds"] == 0 and typed[3]["tts_seconds"] > 0
    assert sf.info(typed[2]).samplerate == 22050


def test_transcribe_real_speech(client, audio_files):
    from gradio_client import handle_file

    text = client.predict(audio=handle_file(audio_files["speech"]), language="english", model="whisper-tiny.en",
                          api_name="/transcribe")
    assert "capital of france" in text.lower(), text
    # The stereo 48 kHz file reaches the random-weight model as 16 kHz mono, with segment timestamps
    stereo = client.predict(audio=handle_file(audio_files["stereo48k"]), language="auto", model="tiny-whisper",
                            task="translate", timestamps="segment", api_name="/transcribe")
    assert isinstance(stereo, str)


def test_chat_smollm2_knows_paris(client):
    reply = client.predict(message=QUESTION, history=[], model="smollm2-135m",
                           system_prompt=voice.DEFAULT_SYSTEM_PROMPT, temperature=0.0, max_new_tokens=40,
                           api_name="/chat")
    assert "Paris" in reply


def test_speak_returns_wav_at_model_rate(client):
    path = client.predict(text="Hello world. This is the workbench speaking.", model="tiny-tts", api_name="/speak")
    info = sf.info(path)
    assert info.format == "WAV" and info.samplerate == 22050 and info.frames > 22050 * 0.2


def test_bad_inputs_through_the_api_keep_the_app_serving(client, app_server, audio_files):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    _, manager, _ = app_server
    cases = [
        (dict(audio=handle_file(audio_files["silent"]), api_name="/transcribe"), "silent"),
        (dict(audio=handle_file(audio_files["empty"]), api_name="/transcribe"), "is empty"),
        (dict(audio=handle_file(audio_files["text"]), api_name="/transcribe"), "damaged or not audio"),
        (dict(audio=handle_file(audio_files["corrupt"]), api_name="/transcribe"), "damaged"),
        (dict(audio=handle_file(audio_files["stereo48k"]), language="klingon", model="tiny-whisper",
              api_name="/transcribe"), "does not support the language"),
        (dict(audio=handle_file(audio_files["stereo48k"]), model="whisper-9000", api_name="/transcribe"),
         "Unknown model"),
        (dict(text="🙂🙂🙂", model="tiny-tts", api_name="/speak"), "no letters"),
        (dict(text="word " * 700, model="tiny-tts", api_name="/speak"), "limit is 3000"),
        (dict(message="", history=[], model="tiny-chat", api_name="/chat"), "Say or type"),
        (dict(audio=None, text="", api_name="/voice"), "No input"),
    ]
    for kwargs, message in cases:
        with pytest.raises(AppError, match=message):
            client.predict(**kwargs)
    assert not any(m["pinned"] for m in manager.snapshot())
    assert client.predict(text="Still here.", model="tiny-tts", api_name="/speak")
