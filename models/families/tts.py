"""Text-to-speech family: Coqui TTS (``TTS.api.TTS``) — VITS, Tacotron, XTTS voice cloning.

Long text is split into sentences here (not by Coqui) so that every sentence is checked, long
ones are cut at commas or spaces, and the pieces are joined with a short pause.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from pathlib import Path

from models import limits
from models.catalog import ModelSpec
from models.errors import InvalidRequest
from models.quantization import Precision

MAX_TEXT_CHARS = 3000
MAX_PIECE_CHARS = 250
PAUSE_SECONDS = 0.2
SPEED_RANGE = (0.5, 2.0)
CHECKPOINT_NAMES = ("model.pth", "model_file.pth", "best_model.pth", "checkpoint.pth")
SENTENCE_END = re.compile(r"(?<=[.!?;。！？；])\s+|(?<=[。！？；])")
TINY_SAMPLE_RATE = 22_050

Progress = Callable[[float, str], None]


@dataclasses.dataclass(eq=False)
class TtsHandle:
    tts: object
    spec_id: str
    device: str

    @property
    def sample_rate(self) -> int:
        return int(self.tts.synthesizer.output_sample_rate)

    @property
    def speakers(self) -> list[str]:
        return list(self.tts.speakers or [])

    @property
    def languages(self) -> list[str]:
        return list(self.tts.languages or [])

    @property
    def supports_cloning(self) -> bool:
        return bool(getattr(self.tts.synthesizer.tts_model.config, "supports_cloning", False))


def _checkpoint(folder: Path) -> Path:
    for name in CHECKPOINT_NAMES:
        if (folder / name).is_file():
            return folder / name
    raise InvalidRequest(f"{folder} holds no Coqui checkpoint ({', '.join(CHECKPOINT_NAMES)})")


def load(spec: ModelSpec, location: str, precision: Precision) -> TtsHandle:
    from TTS.api import TTS

    folder = Path(location)
    if (folder / "config.json").is_file():
        # XTTS loads from its folder; the others from their checkpoint file. Coqui's loader uses
        # torch.load(weights_only=True) with its own safe globals, which our {"model": state_dict} passes.
        is_xtts = "xtts" in spec.location.lower() or (folder / "speakers_xtts.pth").is_file()
        model_path = str(folder) if is_xtts else str(_checkpoint(folder))
        tts = TTS(model_path=model_path, config_path=str(folder / "config.json"), progress_bar=False)
    else:  # a Coqui model name: Coqui's own model manager downloads it once, then reuses its copy
        tts = TTS(spec.location, progress_bar=False)
    tts.to(precision.device)
    tts.eval()
    return TtsHandle(tts=tts, spec_id=spec.id, device=precision.device)


def build_tiny(folder: Path) -> None:
    """A small VITS on characters (use_phonemes=False, so no espeak), saved as config.json + model.pth."""
    import torch
    from TTS.config.shared_configs import BaseAudioConfig
    from TTS.tts.configs.shared_configs import CharactersConfig
    from TTS.tts.configs.vits_config import VitsConfig
    from TTS.tts.models.vits import Vits, VitsArgs

    from models.offline import seeded

    characters = CharactersConfig(
        characters_class="TTS.tts.models.vits.VitsCharacters", pad="<PAD>", eos="<EOS>", bos="<BOS>",
        blank="<BLNK>", characters="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789",
        punctuations="!'(),-.:;? ", phonemes=None)
    args = VitsArgs(hidden_channels=16, hidden_channels_ffn_text_encoder=32, num_heads_text_encoder=2,
                    num_layers_text_encoder=1, num_layers_posterior_encoder=1, num_layers_flow=1, out_channels=129,
                    resblock_kernel_sizes_decoder=[3], resblock_dilation_sizes_decoder=[[1, 3, 5]],
                    upsample_rates_decoder=[8, 8, 4], upsample_initial_channel_decoder=16,
                    upsample_kernel_sizes_decoder=[16, 16, 8], init_discriminator=False, use_sdp=False)
    audio = BaseAudioConfig(sample_rate=TINY_SAMPLE_RATE, fft_size=256, win_length=256, hop_length=256, num_mels=40)
    config = VitsConfig(model_args=args, audio=audio, use_phonemes=False, characters=characters,
                        text_cleaner="basic_cleaners", add_blank=True)
    seeded()
    model = Vits(config)
    # Only tensors in the checkpoint, so Coqui's torch.load(weights_only=True) accepts it.
    torch.save({"model": model.state_dict()}, folder / "model.pth")
    config.save_json(str(folder / "config.json"))


def split_sentences(text: str, max_chars: int = MAX_PIECE_CHARS) -> list[str]:
    """Sentences of at most ``max_chars``; longer ones are cut at commas, then at spaces.

    A piece without letters ("1." of a numbered list) is joined to the sentence after it.
    """
    pieces: list[str] = []
    carry = ""
    for sentence in SENTENCE_END.split(text.strip()):
        sentence = " ".join(f"{carry} {sentence}".split())
        carry = ""
        if sentence and not re.search(r"[^\W\d_]", sentence):
            carry = sentence
            continue
        while len(sentence) > max_chars:
            window = sentence[:max_chars]
            cut = max(window.rfind(", "), window.rfind("，"))
            cut = cut + 1 if cut > max_chars // 3 else window.rfind(" ")
            cut = cut if cut > 0 else max_chars
            pieces.append(sentence[:cut].strip())
            sentence = sentence[cut:].strip()
        if sentence:
            pieces.append(sentence)
    if carry:
        pieces.append(carry)
    return pieces


def each_sentence(sentences: list[str], progress: Progress | None = None):
    """The sentences one by one, with progress before each; ends early when the call is stopped
    (a closed connection, or the time cap): what was spoken so far is kept."""
    stop = limits.StopFlag()
    for index, sentence in enumerate(sentences):
        if stop.is_set():
            return
        if progress is not None:
            progress(index / len(sentences), f"speaking sentence {index + 1} of {len(sentences)}")
        yield sentence


def check_text(text) -> str:
    """The stripped text; ValueError for non-text, empty, letterless (punctuation/emoji) or too long."""
    if not isinstance(text, str) or not text.strip():
        raise InvalidRequest("Type some text to speak.")
    text = text.strip()
    if len(text) > MAX_TEXT_CHARS:
        raise InvalidRequest(f"The text is {len(text)} characters; the limit is {MAX_TEXT_CHARS}. Shorten it.")
    if not re.search(r"[^\W_]", text):
        raise InvalidRequest("The text has no letters or digits to speak (only punctuation, symbols or emoji).")
    return text


def _pronounceable(handle: TtsHandle, sentence: str, language: str | None) -> bool:
    """Whether the model's own tokenizer keeps any letter of ``sentence`` (it drops unknown characters)."""
    tokenizer = getattr(handle.tts.synthesizer.tts_model, "tokenizer", None)
    if tokenizer is None or not hasattr(tokenizer, "text_to_ids") or not hasattr(tokenizer, "characters"):
        return bool(re.search(r"[^\W_]", sentence))  # XTTS and others: their tokenizers cover their languages
    ids = tokenizer.text_to_ids(sentence, language=language)
    return any(tokenizer.characters.id_to_char(i).isalnum() for i in ids)


def speak(handle: TtsHandle, text: str, speaker: str | None = None, language: str | None = None,
          reference_wav: str | None = None, speed: float = 1.0, progress: Progress | None = None):
    """Synthesize ``text``; returns (float32 samples, sample rate).

    Args:
        handle: a loaded TTS handle.
        text: what to say (split into sentences, each synthesized, joined with a short pause).
        speaker: a name from ``handle.speakers`` for multi-speaker models.
        language: a code from ``handle.languages`` for multilingual models.
        reference_wav: a voice to clone (XTTS and other cloning models).
        speed: 0.5-2.0, 1.0 is the model's natural pace.
        progress: called with (fraction done, description) before each sentence.
    """
    import numpy as np

    # 1. Check inputs
    text = check_text(text)
    if isinstance(speed, bool) or not isinstance(speed, (int, float)) or not SPEED_RANGE[0] <= speed <= SPEED_RANGE[1]:
        raise InvalidRequest(f"speed must be between {SPEED_RANGE[0]} and {SPEED_RANGE[1]}, got {speed!r}")
    speaker, language = _voice(handle, speaker, language, reference_wav)

    # 2. Split into sentences the model can pronounce
    sentences = [s for s in split_sentences(text) if _pronounceable(handle, s, language)]
    if not sentences:
        raise InvalidRequest(f"{handle.spec_id} cannot pronounce any character of this text; "
                         "try another model or language.")

    # 3. Synthesize each sentence and join them
    model = handle.tts.synthesizer.tts_model
    native_speed = hasattr(model, "length_scale")  # VITS: duration scale; XTTS takes speed= itself
    extra = {} if native_speed else {"speed": float(speed)}
    pause = np.zeros(int(PAUSE_SECONDS * handle.sample_rate), dtype=np.float32)
    parts = []
    saved_scale = getattr(model, "length_scale", None)
    try:
        if native_speed:
            model.length_scale = saved_scale / float(speed)
        for sentence in each_sentence(sentences, progress):
            wav = handle.tts.tts(sentence, speaker=speaker, language=language, speaker_wav=reference_wav,
                                 split_sentences=False, **extra)
            parts.extend([np.asarray(wav, dtype=np.float32), pause])
    finally:
        if native_speed:
            model.length_scale = saved_scale
    if progress is not None:
        progress(1.0, "spoken")
    # Nothing at all when a stop came before the first sentence
    return (np.concatenate(parts[:-1]) if parts else np.zeros(0, np.float32)), handle.sample_rate


def _voice(handle: TtsHandle, speaker, language, reference_wav) -> tuple[str | None, str | None]:
    """Validated (speaker, language) for this model, with defaults where the model needs one."""
    speakers, languages = handle.speakers, handle.languages
    if speaker in ("", "default"):
        speaker = None
    if language in ("", "default", "auto"):
        language = None
    if speaker is not None and speaker not in speakers:
        choices = ", ".join(speakers[:20]) if speakers else "none (single-speaker model)"
        raise InvalidRequest(f"{handle.spec_id} has no speaker {speaker!r}. Speakers: {choices}")
    if language is not None and language not in languages:
        choices = ", ".join(languages) if languages else "none (single-language model)"
        raise InvalidRequest(f"{handle.spec_id} does not speak {language!r}. Languages: {choices}")
    if languages and language is None:
        language = "en" if "en" in languages else languages[0]
    if reference_wav is not None and not handle.supports_cloning:
        raise InvalidRequest(f"{handle.spec_id} cannot clone a voice; leave the reference voice empty or choose XTTS.")
    if handle.supports_cloning and reference_wav is None and speaker is None:
        if not speakers:
            raise InvalidRequest(f"{handle.spec_id} clones a voice: add a reference voice file.")
        speaker = speakers[0]
    elif speakers and speaker is None and not handle.supports_cloning:
        speaker = speakers[0]
    return speaker, language
