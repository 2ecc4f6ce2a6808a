"""Text-to-speech family: Coqui TTS (``TTS.api.TTS``) — VITS, Tacotron, XTTS voice cloning.

Long text is split into sentences here (not by Coqui) so that every sentence is checked, long
ones are cut at commas or spaces, and the pieces are joined with a short pause.

XTTS is driven through its model (conditioning latents computed once per voice from audio this
module decodes, then ``inference`` per sentence), and a GST model's style reference through its
``synthesize``: Coqui's own paths load reference audio with torchaudio (which needs a working
torchcodec/FFmpeg) and drop ``style_wav`` on the way to the model.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

from models import limits
from models.catalog import ModelSpec
from models.errors import InvalidRequest
from models.families.loading import folder_config
from models.quantization import Precision
from models.sources import ModelUnavailableError

MAX_TEXT_CHARS = 3000
MAX_PIECE_CHARS = 250
PAUSE_SECONDS = 0.2
SPEED_RANGE = (0.5, 2.0)
CHECKPOINT_NAMES = ("model.pth", "model_file.pth", "best_model.pth", "checkpoint.pth")
SENTENCE_END = re.compile(r"(?<=[.!?;。！？；])\s+|(?<=[。！？；])")
TINY_SAMPLE_RATE = 22_050
# What a phonemizer is asked to read once at load, so that a missing espeak-ng or package is told then.
PHONEMIZER_PROBES = {"zh-cn": "你好", "zh": "你好", "cmn": "你好", "ja-jp": "こんにちは", "ko-kr": "안녕"}
# Packages XTTS's text front-end imports for some languages (Coqui's zh and ja extras; a base install lacks them).
XTTS_LANGUAGE_PACKAGES = {"zh": "pypinyin", "ja": "cutlet 'fugashi[unidic-lite]'"}
MIN_REFERENCE_SECONDS = 1.0

Progress = Callable[[float, str], None]


@dataclasses.dataclass(eq=False)
class TtsHandle:
    tts: object
    spec_id: str
    device: str
    # The last cloned voice: (reference path, size, mtime) -> XTTS conditioning, so that a voice turn,
    # which speaks sentence by sentence, reads and encodes its reference once.
    voice_cache: dict = dataclasses.field(default_factory=dict, repr=False)

    @property
    def model(self):
        return self.tts.synthesizer.tts_model

    @property
    def is_xtts(self) -> bool:
        return self.model.config.model == "xtts"

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
        return bool(getattr(self.model.config, "supports_cloning", False))

    @property
    def supports_style(self) -> bool:
        """Global style tokens: a reference recording sets the speaking style (not the voice)."""
        config = self.model.config
        return bool(getattr(config, "use_gst", False) and getattr(config, "gst", None))

    @property
    def native_speed(self) -> bool:
        """Whether the model paces itself (VITS's duration scale, XTTS's latent stretch)."""
        return self.is_xtts or hasattr(self.model, "length_scale")


def _checkpoint(folder: Path) -> Path:
    for name in CHECKPOINT_NAMES:
        if (folder / name).is_file():
            return folder / name
    raise ModelUnavailableError(f"{folder} holds no Coqui checkpoint ({', '.join(CHECKPOINT_NAMES)})")


def _coqui_config(spec: ModelSpec, folder: Path) -> dict:
    """The folder's Coqui config.json, or a message that says what the folder holds instead."""
    piper = any(folder.glob("*.onnx.json"))
    config = folder_config(spec, str(folder), "a Coqui TTS folder (config.json and a checkpoint such as model.pth)",
                           missing_config="a Piper voice (use family: piper)" if piper else "")
    if not isinstance(config.get("model"), str):
        kind = config.get("model_type")
        what = f"a transformers {kind!r} model" if kind else "a config.json without Coqui's 'model' field"
        raise ModelUnavailableError(f"{spec.id}: {folder} holds {what}, not a Coqui TTS model.")
    return config


def _check_phonemizer(spec: ModelSpec, config: dict) -> None:
    """Refuse, before any weight is read, a model whose phonemizer cannot run here (with what to install)."""
    if not config.get("use_phonemes") or config.get("phonemizer") == "multi_phonemizer":
        return
    from TTS.tts.utils.text.phonemizers import get_default_phonemizer, get_phonemizer_by_name

    language = config.get("phoneme_language") or ""
    name = config.get("phonemizer") or ""
    try:
        name = name or get_default_phonemizer(language)
        get_phonemizer_by_name(name, language=language).phonemize(PHONEMIZER_PROBES.get(language.lower(), "a"),
                                                                  separator="")
    except (ImportError, ValueError, OSError, subprocess.SubprocessError) as exc:
        raise ModelUnavailableError(_phonemizer_problem(spec, name, language, exc)) from exc


def _phonemizer_problem(spec: ModelSpec, name: str, language: str, exc: Exception) -> str:
    detail = " ".join(str(exc).split()) or type(exc).__name__
    if name == "espeak":
        return (f"{spec.id} turns text into phonemes with espeak-ng ({language}), which cannot run here ({detail}). "
                "Install espeak-ng (apt-get install espeak-ng, brew install espeak-ng) and restart the app.")
    if name == "zh_cn_phonemizer" and isinstance(exc, ImportError):
        return (f"{spec.id} reads Mandarin with Coqui's zh_cn_phonemizer, which needs the pypinyin and spacy-pkuseg "
                "packages: pip install 'coqui-tts[zh]'. spacy-pkuseg then downloads its word-segmentation model "
                "(spacy_ontonotes, from GitHub) on first use, so run it once with network access.")
    if name == "zh_cn_phonemizer":
        return (f"{spec.id} reads Mandarin with Coqui's zh_cn_phonemizer, whose spacy-pkuseg could not load its "
                f"word-segmentation model ({detail}); it downloads it from GitHub on first use (kept in ~/.pkuseg), "
                "so run it once with network access.")
    return f"{spec.id} needs the {name or 'default'} phonemizer for {language!r}, which cannot run here: {detail}"


def load(spec: ModelSpec, location: str, precision: Precision) -> TtsHandle:
    from TTS.api import TTS

    folder = Path(location)
    if folder.is_dir():
        config = _coqui_config(spec, folder)
        _check_phonemizer(spec, config)
        # XTTS loads from its folder (vocab.json, speakers_xtts.pth beside the weights); the others
        # from their checkpoint file. Coqui's loader uses torch.load(weights_only=True).
        model_path = folder if config["model"] == "xtts" else _checkpoint(folder)

        def make():
            return TTS(model_path=str(model_path), config_path=str(folder / "config.json"), progress_bar=False)
    elif folder.exists():
        raise ModelUnavailableError(f"{spec.id}: {folder} is a file; point the entry at the folder that holds the "
                                    "Coqui config.json and checkpoint.")
    else:  # a Coqui model name: Coqui's own model manager downloads it once, then reuses its copy
        def make():
            return TTS(spec.location, progress_bar=False)
    try:
        tts = make()
    except ImportError as exc:  # a phonemizer or front-end package of a model Coqui downloaded just now
        raise ModelUnavailableError(f"{spec.id} needs a package that is not installed: {' '.join(str(exc).split())}"
                                    ) from exc
    tts.to(precision.device)
    tts.eval()
    return TtsHandle(tts=tts, spec_id=spec.id, device=precision.device)


def build_tiny(folder: Path, arch: str = "") -> None:
    """A deterministic random-weight Coqui model in ``folder``, saved as Coqui saves it (config.json + model.pth).

    ``arch`` "" is tiny-tts (a character VITS, no espeak); the twins of the Coqui catalog entries are
    "vits-ljspeech" (VITS on espeak phonemes), "tacotron2-gst" (Tacotron2 with DDC and GST on Mandarin
    phonemes, Griffin-Lim) and "xtts" (XTTS v2: GPT, HiFi-GAN decoder, BPE vocab, speakers, 17 languages).
    """
    builders = {"": _build_vits_chars, "vits-ljspeech": _build_vits_ljspeech, "tacotron2-gst": _build_tacotron2_gst,
                "xtts": _build_xtts}
    if arch not in builders:
        from models.sources import ModelUnavailableError

        raise ModelUnavailableError(f"the tts family builds no tiny {arch!r} model; it builds: "
                                    f"{', '.join(name for name in builders if name)}")
    builders[arch](folder)


def _tiny_vits_args():
    from TTS.tts.models.vits import VitsArgs

    return VitsArgs(hidden_channels=16, hidden_channels_ffn_text_encoder=32, num_heads_text_encoder=2,
                    num_layers_text_encoder=1, num_layers_posterior_encoder=1, num_layers_flow=1, out_channels=129,
                    resblock_kernel_sizes_decoder=[3], resblock_dilation_sizes_decoder=[[1, 3, 5]],
                    upsample_rates_decoder=[8, 8, 4], upsample_initial_channel_decoder=16,
                    upsample_kernel_sizes_decoder=[16, 16, 8], init_discriminator=False, use_sdp=False)


def _save_coqui(model, config, folder: Path, compact: bool = False) -> None:
    """config.json + model.pth holding only tensors, so Coqui's torch.load(weights_only=True) accepts it.

    ``compact`` (see ``_compact``) keeps the file small for the architectures whose widths Coqui
    fixes whatever the config says (Tacotron2's 1024-wide decoder LSTMs, XTTS's 512-channel HiFi-GAN).
    """
    import torch

    state = model.state_dict()
    if compact:
        state = {key: _compact(value) for key, value in state.items()}
    torch.save({"model": state}, folder / "model.pth")
    config.save_json(str(folder / "config.json"))


def _compact(tensor):
    """``tensor``'s own first values, laid out so that a storage of ``sum(shape) - ndim + 1`` backs it all.

    Element ``[i, j, ...]`` is ``pool[i + j + ...]`` (a Hankel layout): the values keep their
    initialisation's distribution, torch.save writes only the pool, and loading copies them into
    full-size float32 parameters as it would a real checkpoint. Random weights stay random enough.
    """
    if tensor.dim() < 2 or not tensor.is_floating_point():
        return tensor
    size = sum(tensor.shape) - tensor.dim() + 1
    if size >= tensor.numel():
        return tensor
    return tensor.flatten()[:size].clone().as_strided(tensor.shape, (1,) * tensor.dim())


def _build_vits_chars(folder: Path) -> None:
    """tiny-tts: a small VITS on characters (use_phonemes=False, so no espeak)."""
    from TTS.config.shared_configs import BaseAudioConfig
    from TTS.tts.configs.shared_configs import CharactersConfig
    from TTS.tts.configs.vits_config import VitsConfig
    from TTS.tts.models.vits import Vits

    from models.offline import seeded

    characters = CharactersConfig(
        characters_class="TTS.tts.models.vits.VitsCharacters", pad="<PAD>", eos="<EOS>", bos="<BOS>",
        blank="<BLNK>", characters="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789",
        punctuations="!'(),-.:;? ", phonemes=None)
    audio = BaseAudioConfig(sample_rate=TINY_SAMPLE_RATE, fft_size=256, win_length=256, hop_length=256, num_mels=40)
    config = VitsConfig(model_args=_tiny_vits_args(), audio=audio, use_phonemes=False, characters=characters,
                        text_cleaner="basic_cleaners", add_blank=True)
    seeded()
    _save_coqui(Vits(config), config, folder)


def _build_vits_ljspeech(folder: Path) -> None:
    """tts_models/en/ljspeech/vits in miniature: VITS on IPA phonemes from espeak (en-us), English cleaners,
    LJSpeech's 22 050 Hz audio settings, one speaker."""
    from TTS.config.shared_configs import BaseAudioConfig
    from TTS.tts.configs.shared_configs import CharactersConfig
    from TTS.tts.configs.vits_config import VitsConfig
    from TTS.tts.models.vits import Vits
    from TTS.tts.utils.text.characters import _characters, _phonemes, _punctuations

    from models.offline import seeded

    characters = CharactersConfig(characters_class="TTS.tts.models.vits.VitsCharacters", pad="_", eos="", bos="",
                                  blank=None, characters=_characters, punctuations=_punctuations, phonemes=_phonemes,
                                  is_unique=False, is_sorted=True)
    audio = BaseAudioConfig(sample_rate=22_050, win_length=256, hop_length=256, fft_size=256, num_mels=40,
                            mel_fmin=0.0, mel_fmax=None)
    config = VitsConfig(model_args=_tiny_vits_args(), audio=audio, run_name="vits_ljspeech", use_phonemes=True,
                        phonemizer="espeak", phoneme_language="en-us", text_cleaner="english_cleaners",
                        characters=characters, add_blank=True, phoneme_cache_path=None)
    seeded()
    _save_coqui(Vits(config), config, folder)


# The Baker voice's phoneme set (Coqui's pinyin-to-IPA mapping writes tones as the digits 1-5).
MANDARIN_PHONEMES = ("12345iyɨʉɯuɪʏʊeøɘəɵɤoɛœɜɞʌɔæɐaɶɑɒᵻʘɓǀɗǃʄǂɠǁʛpbtdʈɖcɟkɡqɢʔɴŋɲɳnɱmʙrʀⱱɾɽɸβfvθðszʃʒʂʐçʝxɣχʁħʕh"
                     "ɦɬɮʋɹɻjɰlɭʎʟˈˌːˑʍwɥʜʢʡɕʑɺɧɚ˞ɫ")


def _build_tacotron2_gst(folder: Path) -> None:
    """tts_models/zh-CN/baker/tacotron2-DDC-GST in miniature.

    Tacotron2 with double decoder consistency (a coarse decoder at r=6) and global style tokens,
    reading Mandarin through Coqui's zh_cn_phonemizer (pypinyin + spacy-pkuseg), vocoded with
    Griffin-Lim (the catalog's model names no vocoder). Coqui fixes the embedding and encoder
    widths (512), the decoders' LSTMs (1024) and the postnet's (512), so this twin has ~47M
    parameters whatever the config says; ``_compact`` keeps their file under a megabyte.
    """
    from TTS.config.shared_configs import BaseAudioConfig
    from TTS.tts.configs.shared_configs import CharactersConfig, GSTConfig
    from TTS.tts.configs.tacotron2_config import Tacotron2Config
    from TTS.tts.models.tacotron2 import Tacotron2

    from models.offline import seeded

    characters = CharactersConfig(
        characters_class="TTS.tts.utils.text.characters.IPAPhonemes", pad="_", eos="~", bos="^", blank=None,
        characters="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz!'(),-.:;? ",
        punctuations="，。？！～：；*——-（）【】!'(),-.:;? ", phonemes=MANDARIN_PHONEMES, is_unique=False,
        is_sorted=True)
    audio = BaseAudioConfig(sample_rate=22_050, fft_size=256, win_length=256, hop_length=64, num_mels=40,
                            mel_fmin=0.0, mel_fmax=8000.0, griffin_lim_iters=10, signal_norm=True,
                            do_trim_silence=False)
    config = Tacotron2Config(
        run_name="tacotron2-DDC-GST-baker", audio=audio, r=2, double_decoder_consistency=True, ddc_r=6,
        use_gst=True, gst=GSTConfig(gst_embedding_dim=32, gst_num_heads=2, gst_num_style_tokens=4),
        encoder_in_features=512, decoder_in_features=512, decoder_output_dim=40, out_channels=40,
        max_decoder_steps=48, use_phonemes=True, phonemizer="zh_cn_phonemizer", phoneme_language="zh-cn",
        text_cleaner="chinese_mandarin_cleaners", characters=characters, enable_eos_bos_chars=True,
        phoneme_cache_path=None)
    seeded()
    # The weights do not depend on the phonemizer, which may be missing here (the loader says so
    # when the model is used): build from the same phoneme set without it.
    model = Tacotron2(dataclasses.replace(config, use_phonemes=False))
    config.num_chars = model.config.num_chars
    _save_coqui(model, config, folder, compact=True)


XTTS_LANGUAGES = ("en", "es", "fr", "de", "it", "pt", "pl", "tr", "ru", "nl", "cs", "ar", "zh-cn", "hu", "ko", "ja",
                  "hi")
# Three of XTTS v2's 58 studio voices (speakers_xtts.pth); their latents here are random.
XTTS_SPEAKERS = ("Claribel Dervla", "Daisy Studious", "Ana Florence")
XTTS_TINY_AUDIO_TOKENS = 24  # codes of 1024 samples each: random weights rarely stop, so keep their noise short


def _build_xtts(folder: Path) -> None:
    """tts_models/multilingual/multi-dataset/xtts_v2 in miniature, with the files of its repo.

    config.json (XttsConfig, the 17 languages), model.pth (a 1-layer GPT of width 32 with the
    perceiver resampler, and the HiFi-GAN decoder with its speaker encoder), vocab.json (a BPE
    with [STOP]/[UNK]/[SPACE]/[START] and one token per language) and speakers_xtts.pth (studio
    voices: GPT conditioning latents and speaker embeddings). Coqui fixes the decoder's widths
    (512 channels, a 512-d ResNet speaker encoder): ``_compact`` keeps the file small.
    """
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from TTS.tts.configs.xtts_config import XttsArgs, XttsAudioConfig, XttsConfig
    from TTS.tts.models.xtts import Xtts

    from models.offline import CORPUS, seeded

    specials = ["[STOP]", "[UNK]", "[SPACE]", *(f"[{code}]" for code in XTTS_LANGUAGES), "[START]"]
    bpe = Tokenizer(models.BPE(unk_token="[UNK]"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    alphabet = list("abcdefghijklmnopqrstuvwxyz0123456789.,!?'-:;\"()")
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials, initial_alphabet=alphabet,
                                  show_progress=False)
    bpe.train_from_iterator([line.lower() for line in CORPUS] * 4, trainer=trainer)
    bpe.save(str(folder / "vocab.json"))

    args = XttsArgs(gpt_layers=1, gpt_n_model_channels=32, gpt_n_heads=2, gpt_max_audio_tokens=XTTS_TINY_AUDIO_TOKENS,
                    gpt_max_text_tokens=402, gpt_max_prompt_tokens=70, gpt_num_audio_tokens=1026,
                    gpt_start_audio_token=1024, gpt_stop_audio_token=1025, gpt_use_perceiver_resampler=True,
                    decoder_input_dim=32, d_vector_dim=512)
    config = XttsConfig(model_args=args, audio=XttsAudioConfig(sample_rate=22_050, output_sample_rate=24_000),
                        languages=list(XTTS_LANGUAGES), temperature=0.75, length_penalty=1.0, repetition_penalty=5.0,
                        top_k=50, top_p=0.85, gpt_cond_len=30, gpt_cond_chunk_len=4, max_ref_len=30)
    seeded()
    model = Xtts(config)
    model.tokenizer.tokenizer = bpe
    model.init_models()  # the GPT's text embedding sized from the vocabulary, as load_checkpoint does
    _save_coqui(model, config, folder, compact=True)
    latent_shape = (1, 32, args.gpt_n_model_channels)  # the perceiver's 32 latents
    speakers = {name: {"gpt_cond_latent": torch.randn(latent_shape),
                       "speaker_embedding": torch.nn.functional.normalize(torch.randn(1, 512, 1), dim=1)}
                for name in XTTS_SPEAKERS}
    torch.save(speakers, folder / "speakers_xtts.pth")


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
        reference_wav: a voice to clone (XTTS and other cloning models), or the speaking style for a
            model with global style tokens (Tacotron2-GST).
        speed: 0.5-2.0, 1.0 is the model's natural pace (models that cannot pace themselves are
            time-stretched, which keeps the pitch).
        progress: called with (fraction done, description) before each sentence.
    """
    import numpy as np

    # 1. Check inputs
    text = check_text(text)
    if isinstance(speed, bool) or not isinstance(speed, (int, float)) or not SPEED_RANGE[0] <= speed <= SPEED_RANGE[1]:
        raise InvalidRequest(f"speed must be between {SPEED_RANGE[0]} and {SPEED_RANGE[1]}, got {speed!r}")
    speed = float(speed)
    speaker, language = _voice(handle, speaker, language, reference_wav)

    # 2. Split into sentences the model can pronounce (XTTS reads fewer characters at once in some languages)
    sentences = [s for s in split_sentences(text, _piece_chars(handle, language))
                 if _pronounceable(handle, s, language)]
    if not sentences:
        raise InvalidRequest(f"{handle.spec_id} cannot pronounce any character of this text; "
                         "try another model or language.")

    # 3. Synthesize each sentence and join them
    say = _sayer(handle, speaker, language, reference_wav, speed)
    pause = np.zeros(int(PAUSE_SECONDS * handle.sample_rate), dtype=np.float32)
    parts = []
    model = handle.model
    paced = not handle.is_xtts and hasattr(model, "length_scale")  # VITS: the duration predictor's scale
    saved_scale = getattr(model, "length_scale", None)
    try:
        if paced:
            model.length_scale = saved_scale / speed
        for sentence in each_sentence(sentences, progress):
            wav = np.asarray(say(sentence), dtype=np.float32).reshape(-1)
            if not handle.native_speed and speed != 1.0:
                wav = _time_stretch(wav, speed)
            parts.extend([wav, pause])
    finally:
        if paced:
            model.length_scale = saved_scale
    if progress is not None:
        progress(1.0, "spoken")
    # Nothing at all when a stop came before the first sentence
    return (np.concatenate(parts[:-1]) if parts else np.zeros(0, np.float32)), handle.sample_rate


def _sayer(handle: TtsHandle, speaker, language, reference_wav, speed: float) -> Callable[[str], object]:
    """A function from one sentence to its waveform, for this model and voice."""
    studio = getattr(handle.model, "speaker_manager", None)
    if handle.is_xtts and (reference_wav is not None or (studio is not None and speaker in studio.speakers)):
        latent, embedding = _xtts_voice(handle, speaker, reference_wav)
        return lambda sentence: _xtts_say(handle, sentence, language, latent, embedding, speed)
    if reference_wav is not None and handle.supports_style and not handle.supports_cloning:
        return lambda sentence: _styled_say(handle, sentence, speaker, language, reference_wav)
    extra = {"speed": speed} if handle.is_xtts else {}  # a voice Coqui cloned earlier and keeps in its voice folder
    return lambda sentence: handle.tts.tts(sentence, speaker=speaker, language=language, speaker_wav=reference_wav,
                                           split_sentences=False, **extra)


def _piece_chars(handle: TtsHandle, language: str | None) -> int:
    """Longest piece to synthesize at once: XTTS truncates its audio past a per-language limit (82 for Chinese)."""
    if not handle.is_xtts or language is None:
        return MAX_PIECE_CHARS
    limits_by_language = getattr(handle.model.tokenizer, "char_limits", {})
    return min(MAX_PIECE_CHARS, limits_by_language.get(language.split("-")[0], MAX_PIECE_CHARS))


def _time_stretch(wav, speed: float):
    """``wav`` played ``speed`` times as fast, at the same pitch (a phase vocoder)."""
    import librosa

    if len(wav) < 2048:  # too short to stretch by frames; say it as it is
        return wav
    return librosa.effects.time_stretch(wav, rate=speed).astype("float32")


def _xtts_voice(handle: TtsHandle, speaker, reference_wav):
    """(GPT conditioning latent, speaker embedding): a studio voice's, or computed from the reference recording.

    The reference is decoded by ``models.audio`` (any format it reads, checked for length and
    silence), not by torchaudio, and kept for the next sentence of the same file.
    """
    import torch

    model = handle.model
    if reference_wav is None:  # a studio voice: (latent, embedding) in that order, as Coqui's synthesize reads it
        latent, embedding = model.speaker_manager.speakers[speaker].values()
        return latent, embedding
    path = Path(reference_wav)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key in handle.voice_cache:
        return handle.voice_cache[key]
    from models.audio import load_audio

    config = model.config
    rate = int(config.audio.sample_rate)
    clip = load_audio(path, max_seconds=60, target_rate=rate)
    if clip.seconds < MIN_REFERENCE_SECONDS:
        raise InvalidRequest(f"The reference voice holds {clip.seconds:.1f} s of sound; {handle.spec_id} needs at "
                             f"least {MIN_REFERENCE_SECONDS:.0f} s (3-10 s of clear speech clone best).")
    audio = torch.from_numpy(clip.samples[: int(config.max_ref_len) * rate]).unsqueeze(0)
    latent = model.get_gpt_cond_latents(audio, rate, length=config.gpt_cond_len, chunk_length=config.gpt_cond_chunk_len)
    embedding = model.get_speaker_embedding(audio, rate)
    handle.voice_cache.clear()
    handle.voice_cache[key] = (latent, embedding)
    return latent, embedding


def _xtts_say(handle: TtsHandle, sentence: str, language: str, latent, embedding, speed: float):
    config = handle.model.config
    out = handle.model.inference(sentence, language, latent, embedding, temperature=config.temperature,
                                 length_penalty=config.length_penalty, repetition_penalty=config.repetition_penalty,
                                 top_k=config.top_k, top_p=config.top_p, speed=speed)
    return out["wav"]


def _styled_say(handle: TtsHandle, sentence: str, speaker, language, style_wav: str):
    """One sentence in the style of ``style_wav`` (GST), vocoded as Coqui's synthesizer would."""
    synthesizer = handle.tts.synthesizer
    griffin_lim = synthesizer.vocoder_model is None
    outputs = synthesizer.tts_model.synthesize(text=sentence, speaker=speaker, language=language,
                                               use_griffin_lim=griffin_lim, style_wav=str(style_wav))
    if griffin_lim:
        return outputs["wav"]
    device = next(synthesizer.vocoder_model.parameters()).device
    wav = synthesizer._run_vocoder(outputs["outputs"]["model_outputs"][0], device)
    return wav.detach().cpu().numpy() if hasattr(wav, "detach") else wav


def _check_xtts_language(handle: TtsHandle, language: str) -> None:
    """XTTS reads Chinese through pypinyin and Japanese through cutlet; say which package is missing."""
    code = language.split("-")[0]
    try:
        handle.model.tokenizer.preprocess_text("a", code)
    except ImportError as exc:
        package = XTTS_LANGUAGE_PACKAGES.get(code, getattr(exc, "name", None) or "its text front-end")
        raise ModelUnavailableError(f"{handle.spec_id} speaks {language!r} only with {package} installed "
                                    f"(pip install {package}); it is missing here.") from exc


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
    if reference_wav is not None and not (handle.supports_cloning or handle.supports_style):
        raise InvalidRequest(f"{handle.spec_id} cannot clone a voice or take a speaking style from a recording; "
                             "leave the reference voice empty or choose XTTS.")
    if handle.supports_cloning and reference_wav is None and speaker is None:
        if not speakers:
            raise InvalidRequest(f"{handle.spec_id} clones a voice: add a reference voice file.")
        speaker = speakers[0]
    elif speakers and speaker is None and not handle.supports_cloning:
        speaker = speakers[0]
    if handle.is_xtts and language is not None:
        _check_xtts_language(handle, language)
    return speaker, language
