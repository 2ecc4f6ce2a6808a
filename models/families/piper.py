"""Piper family: Piper VITS voices (ONNX) run with onnxruntime, phonemes from the espeak-ng program.

The ``piper-tts`` and ``piper-phonemize`` packages are GPL-3.0, so this module does their two small
jobs itself: it runs the espeak-ng command line for IPA phonemes and maps them to ids the way Piper
trained its voices (``^ _ p _ p _ ... $``). A voice is a ``<name>.onnx`` with ``<name>.onnx.json``
next to it. Long text is split into sentences with the Coqui family's rules, so both text-to-speech
families check text, speed and speakers alike.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
import os
import re
import shutil
import subprocess
import unicodedata
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from models import limits
from models.catalog import ModelSpec
from models.errors import InvalidRequest, Unavailable
from models.families.tts import (
    MAX_TEXT_CHARS,
    PAUSE_SECONDS,
    SPEED_RANGE,
    check_text,
    each_sentence,
    split_sentences,
)
from models.quantization import Precision

if TYPE_CHECKING:
    import numpy as np

__all__ = ["MAX_TEXT_CHARS", "NOISE_RANGE", "EspeakError", "EspeakMissingError", "PiperHandle", "PiperVoiceError",
           "load", "phoneme_ids", "phonemize", "release", "speak", "speak_sentences", "voice_files"]

log = logging.getLogger(__name__)

ESPEAK_ENV = "WORKBENCH_ESPEAK"
ESPEAK_TIMEOUT = 30.0
NOISE_RANGE = (0.0, 1.5)
PAD, BOS, EOS = "_", "^", "$"
DEFAULT_INFERENCE = {"noise_scale": 0.667, "length_scale": 1.0, "noise_w": 0.8}
# Sentence-final marks Piper keeps in its phonemes (espeak's clause terminator); wide forms map to them.
ENDINGS = {".": ".", "!": "!", "?": "?", ",": ",", ";": ";", ":": ":", "。": ".", "！": "!", "？": "?",
           "；": ";", "，": ",", "：": ":", "…": "."}
CLOSERS = "\"'”’»)]}"
# espeak-ng prints "(en)...(de)" around words it reads with another language; the letters would be spoken.
LANGUAGE_SWITCH = re.compile(r"\([a-z]{2,3}(?:-[a-z0-9]+)*\)")
# Clause punctuation followed by a space: espeak-ng starts a new output line at each of these.
CLAUSE_MARK = re.compile(rf"([,;:.!?，；：])(?=[{re.escape(CLOSERS)}]*\s)")
VOICE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_+./-]*")

Progress = Callable[[float, str], None]


class PiperVoiceError(InvalidRequest):
    """A Piper voice's files are missing or invalid."""


class EspeakError(Unavailable):
    """espeak-ng failed to phonemize text."""


class EspeakMissingError(EspeakError):
    """The espeak-ng program is not installed (or the configured path does not exist)."""


@dataclasses.dataclass(eq=False)
class PiperHandle:
    session: object
    config: dict
    spec_id: str
    device: str
    nbytes: int

    @property
    def sample_rate(self) -> int:
        return int(self.config["audio"]["sample_rate"])

    @property
    def speakers(self) -> list[str]:
        """Speaker names ordered by id; [] for a single-speaker voice."""
        id_map = self.config.get("speaker_id_map") or {}
        return sorted(id_map, key=lambda name: id_map[name]) if len(id_map) > 1 else []

    @property
    def languages(self) -> list[str]:
        return []  # one espeak voice per model: nothing to choose

    @property
    def supports_cloning(self) -> bool:
        return False

    @property
    def espeak_voice(self) -> str:
        return str(self.config["espeak"]["voice"])


def voice_files(location: str | Path) -> tuple[Path, Path]:
    """The (model.onnx, model.onnx.json) pair for an .onnx file or a folder holding exactly one .onnx."""
    path = Path(location)
    if not path.exists():
        raise PiperVoiceError(f"Piper voice not found: {path} does not exist")
    if path.is_dir():
        models = sorted(p for p in path.glob("*.onnx") if p.is_file())
        if not models:
            raise PiperVoiceError(f"{path} holds no Piper voice (.onnx file)")
        if len(models) > 1:
            names = ", ".join(p.name for p in models)
            raise PiperVoiceError(f"{path} holds several .onnx files ({names}); point at one of them")
        path = models[0]
    elif path.suffix != ".onnx":
        raise PiperVoiceError(f"{path} is not a Piper voice: expected an .onnx file or a folder holding one")
    config_path = path.with_name(path.name + ".json")
    if not config_path.is_file():
        raise PiperVoiceError(f"{path.name} has no config: expected {config_path} next to it")
    _read_config(config_path)
    return path, config_path


def _read_config(config_path: Path) -> dict:
    """The parsed voice config; PiperVoiceError when it is unreadable or lacks what synthesis needs."""
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PiperVoiceError(f"Cannot read the Piper voice config {config_path}: {exc}") from exc
    if not isinstance(config, dict):
        raise PiperVoiceError(f"{config_path} is not a Piper voice config (expected a JSON object)")
    id_map = config.get("phoneme_id_map")
    if not isinstance(id_map, dict) or not id_map:
        raise PiperVoiceError(f"{config_path} has no phoneme_id_map")
    lacking = [symbol for symbol in (PAD, BOS, EOS) if symbol not in id_map]
    if lacking:
        raise PiperVoiceError(f"{config_path}: phoneme_id_map lacks {', '.join(map(repr, lacking))}")
    audio, espeak = config.get("audio"), config.get("espeak")
    rate = audio.get("sample_rate") if isinstance(audio, dict) else None
    if isinstance(rate, bool) or not isinstance(rate, int) or rate <= 0:
        raise PiperVoiceError(f"{config_path} has no valid audio.sample_rate")
    voice = espeak.get("voice") if isinstance(espeak, dict) else None
    if not isinstance(voice, str) or not VOICE_NAME.fullmatch(voice):
        raise PiperVoiceError(f"{config_path} has no valid espeak.voice")
    return config


def load(spec: ModelSpec, location: str, precision: Precision) -> PiperHandle:
    import onnxruntime as ort

    model_path, config_path = voice_files(location)
    config = _read_config(config_path)
    options = ort.SessionOptions()
    options.intra_op_num_threads = _threads()
    options.log_severity_level = 3  # errors only: ORT warns about unused initializers in every Piper export
    providers = ["CPUExecutionProvider"]
    if precision.device == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    session = ort.InferenceSession(str(model_path), sess_options=options, providers=providers)
    device = "cuda" if session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
    return PiperHandle(session=session, config=config, spec_id=spec.id, device=device,
                       nbytes=model_path.stat().st_size)


def _threads() -> int:
    """OMP_NUM_THREADS when set (the test suite and CI pin it), else 0 = onnxruntime's default."""
    try:
        return max(0, int(os.environ.get("OMP_NUM_THREADS", "0")))
    except ValueError:
        return 0


def release(handle: PiperHandle) -> None:
    handle.session = None


def _espeak_binary(binary: str | None = None) -> str:
    """The espeak-ng program: ``binary``, else $WORKBENCH_ESPEAK, else espeak-ng on PATH."""
    chosen = binary or os.environ.get(ESPEAK_ENV) or shutil.which("espeak-ng") or "espeak-ng"
    found = shutil.which(chosen)
    if found is None:
        raise EspeakMissingError(f"espeak-ng was not found ({chosen}); Piper voices need it for phonemes: "
                                 "install espeak-ng (apt-get install espeak-ng)")
    return found


def phonemize(text: str, voice: str, binary: str | None = None) -> list[str]:
    """IPA phonemes of ``text``, one line per clause, from ``espeak-ng -q --ipa -v <voice>``.

    Args:
        text: the text (passed on stdin, so nothing in it is read as an option).
        voice: an espeak-ng voice such as ``en-us``.
        binary: the espeak-ng program; defaults to $WORKBENCH_ESPEAK, then espeak-ng on PATH.
    """
    if not VOICE_NAME.fullmatch(voice or ""):
        raise InvalidRequest(f"{voice!r} is not an espeak-ng voice name")
    program = _espeak_binary(binary)
    try:
        done = subprocess.run([program, "-q", "--ipa", "-b", "1", "-v", voice], input=text.encode("utf-8"),
                              capture_output=True, timeout=ESPEAK_TIMEOUT, check=False)
    except FileNotFoundError as exc:
        raise EspeakMissingError(f"espeak-ng could not be run ({program}): "
                                 "install espeak-ng (apt-get install espeak-ng)") from exc
    except subprocess.TimeoutExpired as exc:
        raise EspeakError(f"espeak-ng took longer than {ESPEAK_TIMEOUT:.0f} s; try a shorter text") from exc
    if done.returncode != 0:
        detail = done.stderr.decode("utf-8", "replace").strip() or f"exit status {done.returncode}"
        raise EspeakError(f"espeak-ng failed for voice {voice!r}: {detail}")
    lines = (LANGUAGE_SWITCH.sub("", line).strip() for line in done.stdout.decode("utf-8", "replace").splitlines())
    return [line for line in lines if line]


def phoneme_ids(lines: list[str], phoneme_id_map: dict, ending: str = "",
                missing: collections.Counter | None = None) -> list[int]:
    """Piper's ids for phoneme lines: ``^ _``, each phoneme's ids then the pad ``_``, and ``$`` last.

    Args:
        lines: IPA lines (clauses) from :func:`phonemize`, joined with a space.
        phoneme_id_map: the voice config's map from phoneme to a list of ids.
        ending: the sentence's final punctuation; added before ``$`` when the map has it, because
            Piper voices are trained with it and use it for intonation (a rising ``?``).
        missing: a Counter that receives the characters the map lacks (they are skipped).
    """
    pad = _ids(phoneme_id_map[PAD])
    # Pad after ^ too, as piper-phonemize did when the voices' training data was prepared.
    ids = _ids(phoneme_id_map[BOS]) + pad
    phonemes = unicodedata.normalize("NFD", " ".join(line.strip() for line in lines if line.strip()))
    if ending and ending in phoneme_id_map:
        phonemes += ending
    for char in phonemes:
        if char not in phoneme_id_map:
            if missing is not None:
                missing[char] += 1
            continue
        ids += _ids(phoneme_id_map[char]) + pad
    return ids + _ids(phoneme_id_map[EOS])


def _ids(value) -> list[int]:
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def _pronounceable(lines: list[str], phoneme_id_map: dict) -> bool:
    """Whether any phoneme (a letter, not stress or punctuation) of ``lines`` is in the map."""
    text = unicodedata.normalize("NFD", "".join(lines))
    return any(char.isalpha() and char in phoneme_id_map and char not in (PAD, BOS, EOS) for char in text)


def _ending(sentence: str) -> str:
    return ENDINGS.get(sentence.rstrip().rstrip(CLOSERS)[-1:], "")


def _mark_clauses(lines: list[str], sentence: str) -> list[str]:
    """Lines with their clause's comma/colon put back (espeak-ng prints a line per clause but drops the mark).

    Piper voices saw ``clause, clause`` in training and pause at the comma. The marks are taken from the
    text in order; when their count does not match the lines (espeak split differently) the lines stay bare.
    """
    marks = [ENDINGS[mark] for mark in CLAUSE_MARK.findall(sentence)]
    if len(lines) < 2 or len(marks) != len(lines) - 1:
        return lines
    return [line + mark for line, mark in zip(lines[:-1], marks, strict=True)] + lines[-1:]


def _check_range(name: str, value, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not low <= value <= high:
        raise InvalidRequest(f"{name} must be between {low} and {high}, got {value!r}")
    return float(value)


def _speaker_id(handle: PiperHandle, speaker) -> int | None:
    """The model's speaker id: None for single-speaker voices, 0 for the default speaker."""
    id_map = handle.config.get("speaker_id_map") or {}
    if speaker in (None, "", "default"):
        return 0 if len(id_map) > 1 else None
    if speaker not in handle.speakers:
        choices = ", ".join(handle.speakers[:20]) if handle.speakers else "none (single-speaker model)"
        raise InvalidRequest(f"{handle.spec_id} has no speaker {speaker!r}. Speakers: {choices}")
    return int(id_map[speaker])


def speak_sentences(handle: PiperHandle, text: str, speaker: str | None = "default", speed: float = 1.0,
                    noise_scale: float | None = None, noise_w: float | None = None,
                    progress: Progress | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """Synthesize ``text`` one sentence at a time; yields (sentence, float32 samples) for streaming.

    Args:
        handle: a loaded Piper handle.
        text: what to say; sentences nothing of which can be pronounced are skipped.
        speaker: a name from ``handle.speakers`` for multi-speaker voices.
        speed: 0.5-2.0, 1.0 is the voice's natural pace.
        noise_scale: 0-1.5, variation in the voice; None takes the voice config's value.
        noise_w: 0-1.5, variation in phoneme durations; None takes the voice config's value.
        progress: called with (fraction done, description) before each sentence.
    """
    import numpy as np

    # 1. Check inputs (before the first sentence, so a streaming caller fails fast)
    text = check_text(text)
    speed = _check_range("speed", speed, *SPEED_RANGE)
    inference = {**DEFAULT_INFERENCE, **(handle.config.get("inference") or {})}
    noise_scale = _check_range("noise_scale", inference["noise_scale"] if noise_scale is None else noise_scale,
                               *NOISE_RANGE)
    noise_w = _check_range("noise_w", inference["noise_w"] if noise_w is None else noise_w, *NOISE_RANGE)
    sid = _speaker_id(handle, speaker)
    if handle.session is None:
        raise RuntimeError(f"{handle.spec_id} was unloaded; load it again")
    id_map = handle.config["phoneme_id_map"]
    scales = np.array([noise_scale, float(inference["length_scale"]) / speed, noise_w], dtype=np.float32)
    takes_sid = any(i.name == "sid" for i in handle.session.get_inputs())

    # 2. Phonemize and synthesize each sentence
    sentences = split_sentences(text)
    missing: collections.Counter = collections.Counter()
    spoken = 0
    for sentence in each_sentence(sentences, progress):
        lines = phonemize(sentence, handle.espeak_voice)
        if not _pronounceable(lines, id_map):
            continue
        ids = phoneme_ids(_mark_clauses(lines, sentence), id_map, _ending(sentence), missing)
        inputs = {"input": np.array([ids], dtype=np.int64),
                  "input_lengths": np.array([len(ids)], dtype=np.int64), "scales": scales}
        if takes_sid:
            inputs["sid"] = np.array([sid or 0], dtype=np.int64)
        audio = handle.session.run(None, inputs)[0]
        spoken += 1
        yield sentence, np.atleast_1d(np.asarray(audio, dtype=np.float32).squeeze())
    if missing:
        log.warning("%s: skipped phonemes its map lacks: %s", handle.spec_id, dict(missing))
    if not spoken and not limits.StopFlag().is_set():
        raise InvalidRequest(f"{handle.spec_id} cannot pronounce any character of this text "
                         f"(it speaks {handle.espeak_voice}); try another voice.")


def speak(handle: PiperHandle, text: str, speaker: str | None = "default", language: str | None = "default",
          reference_wav: str | None = None, speed: float = 1.0, progress: Progress | None = None,
          noise_scale: float | None = None, noise_w: float | None = None) -> tuple[np.ndarray, int]:
    """Synthesize ``text``; returns (float32 samples, sample rate), sentences joined by a short pause.

    Args:
        handle: a loaded Piper handle.
        text: what to say.
        speaker: a name from ``handle.speakers`` for multi-speaker voices.
        language: only "default", "" or "auto": a Piper voice speaks one language.
        reference_wav: must be None; Piper voices cannot clone.
        speed: 0.5-2.0, 1.0 is the voice's natural pace.
        progress: called with (fraction done, description) before each sentence.
        noise_scale: 0-1.5, None takes the voice config's value (0 with noise_w=0 is deterministic).
        noise_w: 0-1.5, None takes the voice config's value.
    """
    import numpy as np

    if language not in (None, "", "default", "auto"):
        raise InvalidRequest(f"{handle.spec_id} speaks only {handle.espeak_voice}; leave the language on default.")
    if reference_wav is not None:
        raise InvalidRequest(f"{handle.spec_id} cannot clone a voice; leave the reference voice empty or choose XTTS.")
    pause = np.zeros(int(PAUSE_SECONDS * handle.sample_rate), dtype=np.float32)
    parts = []
    for _, audio in speak_sentences(handle, text, speaker=speaker, speed=speed, noise_scale=noise_scale,
                                    noise_w=noise_w, progress=progress):
        parts.extend([audio, pause])
    if progress is not None:
        progress(1.0, "spoken")
    # Nothing at all when a stop came before the first sentence
    return (np.concatenate(parts[:-1]) if parts else np.zeros(0, np.float32)), handle.sample_rate
