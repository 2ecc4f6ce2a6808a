"""The hub and Coqui speech and chat entries, each through its own code path, offline, on its architecture twin.

``twin_catalog`` points every hub/Coqui entry at its twin's folder (a tiny random-weight model of
the same architecture, saved as the real repo is), keeping the entry's id and family:

* chat: Qwen/Qwen2.5-0.5B-Instruct and -1.5B-Instruct -> tiny-qwen2.5 (Qwen2ForCausalLM, Qwen's
  byte-level BPE and special tokens, the real Qwen2.5 chat template, eos <|im_end|>);
* speech-to-text: openai/whisper-tiny and -small -> tiny-whisper; openai/whisper-large-v3-turbo ->
  tiny-whisper-v3 (128 mel bins, <|yue|>, 4 decoder layers);
* text-to-speech: Coqui's LJSpeech VITS -> tiny-vits-ljspeech (espeak phonemes), XTTS v2 ->
  tiny-xtts (GPT + HiFi-GAN decoder, BPE vocab, studio speakers, 17 languages, cloning), Baker
  Tacotron2-DDC-GST -> tiny-tacotron2-gst (Mandarin phonemes, global style tokens, Griffin-Lim).

Each check runs through the user-facing core (``models.voice`` request objects) where one exists.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil
import subprocess
import time

import helpers
import numpy as np
import pytest
from conftest import make_settings
from helpers import save_lora

from models import adapters, voice
from models.errors import InvalidRequest, UserError
from models.families import asr, chat, tts
from models.generation import GenerationParams, StreamStats
from models.sources import ModelUnavailableError

QWEN = ("Qwen/Qwen2.5-0.5B-Instruct", "Qwen/Qwen2.5-1.5B-Instruct")
QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."


@dataclasses.dataclass(frozen=True)
class AsrTwin:
    id: str
    mel_bins: int
    languages: tuple[str, ...]
    no_speech_token: str
    decoder_layers: int

    def __repr__(self) -> str:
        return self.id


OLD_WHISPER = ("de", "en", "es", "fr", "ja", "zh")
ASR_CASES = (
    AsrTwin("openai/whisper-tiny", 80, OLD_WHISPER, "<|nocaptions|>", 1),
    AsrTwin("openai/whisper-small", 80, OLD_WHISPER, "<|nocaptions|>", 1),
    AsrTwin("openai/whisper-large-v3-turbo", 128, (*OLD_WHISPER, "yue"), "<|nospeech|>", 4),
)


@dataclasses.dataclass(frozen=True)
class TtsTwin:
    id: str
    text: str
    sample_rate: int
    speakers: tuple[str, ...] = ()
    languages: tuple[str, ...] = ()
    cloning: bool = False
    style: bool = False
    mandarin: bool = False  # reads through Coqui's zh_cn_phonemizer (see ``mandarin_phonemizer``)

    def __repr__(self) -> str:
        return self.id


TTS_CASES = (
    TtsTwin("tts_models/en/ljspeech/vits", "Hello there. How are you today?", 22_050),
    TtsTwin("tts_models/multilingual/multi-dataset/xtts_v2", "Hello there. How are you today?", 24_000,
            speakers=tts.XTTS_SPEAKERS, languages=tts.XTTS_LANGUAGES, cloning=True),
    TtsTwin("tts_models/zh-CN/baker/tacotron2-DDC-GST", "你好，世界。今天天气很好。", 22_050, style=True,
            mandarin=True),
)
XTTS, = (case for case in TTS_CASES if case.cloning)
TACOTRON, = (case for case in TTS_CASES if case.style)
VITS = TTS_CASES[0]


# ---- fixtures -------------------------------------------------------------------------------------

@pytest.fixture
def chat_twins(twin_catalog, tmp_path):
    """(manager, settings) over the twin catalog, with a budget that admits the 1.5B entry's estimate
    (6.3 GB at fp32: twin_manager's 4 GB refuses it before its tiny twin is looked at)."""
    from models.manager import ModelManager

    settings = make_settings(tmp_path, memory_budget_gb=16.0)
    manager = ModelManager(twin_catalog, settings)
    yield manager, settings
    manager.unload_all()


@pytest.fixture(scope="module")
def recordings(tmp_path_factory):
    """Speech from espeak-ng: a question (for ASR) and two reference voices (for cloning and GST style)."""
    folder = tmp_path_factory.mktemp("twin-audio")
    lines = {"speech": ("en-us", "What is the capital of France? It is Paris."),
             "reference": ("en-us", "This is my voice. Please speak the way I speak, clearly and slowly."),
             "other": ("en+f3", "A second voice, higher and faster, reads another sentence aloud for you.")}
    for name, (espeak_voice, text) in lines.items():
        subprocess.run(["espeak-ng", "-v", espeak_voice, "-w", str(folder / f"{name}.wav"), text], check=True,
                       timeout=30)
    return {name: str(folder / f"{name}.wav") for name in lines}


@pytest.fixture
def mandarin_phonemizer(monkeypatch):
    """A stand-in for Coqui's zh_cn_phonemizer, which needs pypinyin and spacy-pkuseg and downloads
    spacy-pkuseg's segmentation model on first use (none of which this machine has).

    It reads a few characters through a fixed pinyin table and Coqui's own pinyin-to-IPA mapping,
    so the rest of the Baker path (cleaners, phoneme ids, Tacotron2 + GST, Griffin-Lim) runs for real.
    """
    from TTS.tts.utils.text import phonemizers
    from TTS.tts.utils.text.chinese_mandarin.pinyinToPhonemes import PINYIN_DICT
    from TTS.tts.utils.text.phonemizers.base import BasePhonemizer

    pinyin = {"你": "ni3", "好": "hao3", "世": "shi4", "界": "jie4", "今": "jin1", "天": "tian1", "气": "qi4",
              "很": "hen3"}

    class StandIn(BasePhonemizer):
        language = "zh-cn"

        def __init__(self, punctuations="、.,[]()?!〽~『』「」【】", keep_puncs=False, **kwargs):
            super().__init__(self.language, punctuations=punctuations, keep_puncs=keep_puncs)

        @staticmethod
        def name():
            return "zh_cn_phonemizer"

        def _phonemize(self, text, separator):
            phonemes = []
            for char in text:
                syllable = pinyin.get(char)
                phonemes += list(PINYIN_DICT[syllable[:-1]][0] + syllable[-1]) if syllable else [char]
            return separator.join(phonemes)

        @staticmethod
        def supported_languages():
            return {"zh-cn": "Chinese (China)"}

        def version(self):
            return "test stand-in"

        @classmethod
        def is_available(cls):
            return True

    phonemizers._register_phonemizers()
    monkeypatch.setitem(phonemizers.PHONEMIZERS, "zh_cn_phonemizer", StandIn)
    monkeypatch.setattr(phonemizers, "is_phonemizer_available", lambda name: True)


def ready(case: TtsTwin, request) -> None:
    if case.mandarin:
        request.getfixturevalue("mandarin_phonemizer")


def seeded_speak(manager, settings, text, **values):
    """/speak's path with torch and numpy seeded: XTTS samples its codes, Griffin-Lim starts from random phases."""
    import torch

    torch.manual_seed(0)
    np.random.seed(0)
    (rate, samples), _ = helpers.speak(manager, settings, text, **values)
    return rate, samples


# ---- the builds -----------------------------------------------------------------------------------

SPEECH_AND_CHAT_TWINS = ("tiny-qwen2.5", "tiny-whisper-v3", "tiny-vits-ljspeech", "tiny-tacotron2-gst", "tiny-xtts")


@pytest.mark.parametrize("twin", SPEECH_AND_CHAT_TWINS)
def test_twin_builds_are_byte_identical_and_small(tmp_path, twin):
    from models.catalog import Catalog
    from models.families import family_module

    spec = Catalog.load().get(twin)
    builds = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        family_module(spec.family).build_tiny(tmp_path / name, arch=spec.repo)
        builds.append({path.name: path.read_bytes() for path in sorted((tmp_path / name).iterdir())})
    assert builds[0].keys() == builds[1].keys() and builds[0] == builds[1]
    assert sum(len(data) for data in builds[0].values()) < 2_000_000


# ---- chat: Qwen2.5 --------------------------------------------------------------------------------

@pytest.mark.parametrize("model_id", QWEN)
def test_qwen_template_renders_its_default_system_prompt_or_ours_and_its_tool_section(chat_twins, model_id):
    manager, _ = chat_twins
    with manager.use(model_id) as handle:
        assert type(handle.model).__name__ == "Qwen2ForCausalLM" and handle.context_length == 512
        own, _ = chat.encode(handle, [{"role": "user", "content": "Hi"}], GenerationParams(max_new_tokens=8))
        ours, _ = chat.encode(handle, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                              GenerationParams(max_new_tokens=8))
        tools = handle.tokenizer.apply_chat_template(
            [{"role": "user", "content": "Weather?"}], tools=[{"type": "function", "function": {"name": "weather"}}],
            tokenize=False, add_generation_prompt=True)
        decode = handle.tokenizer.decode
        assert decode(own["input_ids"][0]) == (f"<|im_start|>system\n{QWEN_SYSTEM}<|im_end|>\n"
                                               "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
        assert decode(ours["input_ids"][0]) == ("<|im_start|>system\nBe brief.<|im_end|>\n"
                                                "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
        assert tools.startswith(f"<|im_start|>system\n{QWEN_SYSTEM}\n\n# Tools\n") and '"name": "weather"' in tools
        ids = handle.tokenizer.convert_tokens_to_ids
        assert handle.model.generation_config.eos_token_id == [ids("<|im_end|>"), ids("<|endoftext|>")]
        assert handle.tokenizer.bos_token is None and handle.model.config.tie_word_embeddings


@pytest.mark.parametrize("model_id", QWEN)
def test_qwen_history_is_trimmed_at_the_context_limit_with_notices(chat_twins, model_id):
    manager, settings = chat_twins
    history = []
    for index in range(60):
        history += [{"role": "user", "content": f"question {index}"},
                    {"role": "assistant", "content": f"answer {index}"}]
    request = voice.ChatRequest.build(manager.catalog, settings, message="Last?", history=history, model=model_id,
                                      system_prompt="Be brief.", max_new_tokens=16, temperature=0.0)
    notices = []
    assert list(voice.chat_reply(manager, request, notices=notices))
    with manager.use(model_id) as handle:
        inputs, params = chat.encode(handle, request.messages(), request.reply.params)
        prompt = handle.tokenizer.decode(inputs["input_ids"][0])
        long_question, lowered = [], []
        chat.encode(handle, [{"role": "user", "content": "Hi"}], GenerationParams(max_new_tokens=600), notices=lowered)
        with pytest.raises(InvalidRequest, match=f"{model_id} reads at most 512 tokens"):
            chat.encode(handle, [{"role": "user", "content": "word " * 600}], GenerationParams(), long_question)
    kept = prompt.count("question ") + prompt.count("answer ")
    assert kept % 2 == 0 and 0 < kept < 120  # whole exchanges, the newest ones
    assert notices == [f"Left out {120 - kept} earlier messages to fit the 512-token context."]
    assert prompt.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nquestion ")
    assert "question 59" in prompt and "answer 59" in prompt and f"answer {59 - kept // 2}" not in prompt
    assert 512 - 16 - 40 < inputs["input_ids"].shape[-1] <= 512 - 16 and params.max_new_tokens == 16
    assert len(lowered) == 1 and lowered[0].startswith("Max new tokens lowered to ")


@pytest.mark.parametrize("model_id", QWEN)
def test_qwen_reply_stops_at_im_end_and_hides_it(chat_twins, model_id):
    """Random weights never choose <|im_end|>: the output head is made to choose it as the 4th token."""
    manager, settings = chat_twins
    request = voice.ChatRequest.build(manager.catalog, settings, message="Hello", model=model_id, system_prompt="",
                                      max_new_tokens=32, temperature=0.0)
    with manager.use(model_id) as handle:
        im_end = handle.tokenizer.convert_tokens_to_ids("<|im_end|>")
        calls = []

        def choose_im_end_fourth(module, args, logits):
            calls.append(1)
            if len(calls) >= 4:  # one call per new token (the prompt's logits are the first token's)
                logits[..., im_end] = logits.max() + 100.0
            return logits

        hook = handle.model.lm_head.register_forward_hook(choose_im_end_fourth)
        try:
            stats = StreamStats()
            reply = list(voice.chat_reply(manager, request, stats=stats))[-1]
        finally:
            hook.remove()
    assert stats.new_tokens == 4, f"generation went on past <|im_end|> ({stats.new_tokens} tokens)"
    assert reply and "im_end" not in reply and "<|" not in reply


def make_qwen_adapter(manager, settings, base_model: str, name: str):
    """A LoRA on the twin with random, non-zero B (so it changes the greedy reply), saved as the fine-tune tab does."""
    return save_lora(manager.catalog.get(base_model).location, settings.adapters_dir, name, base_model,
                     ["q_proj", "v_proj", "o_proj"], alpha=64)


@pytest.mark.parametrize("model_id", QWEN)
def test_qwen_adapter_changes_the_greedy_reply_through_the_voice_chat_path(chat_twins, model_id):
    manager, settings = chat_twins
    make_qwen_adapter(manager, settings, model_id, "qwen-lora")
    values = dict(model=model_id, max_new_tokens=8, temperature=0.0, system_prompt="")
    base = helpers.chat(manager, settings, "Tell me something", **values)
    tuned = helpers.chat(manager, settings, "Tell me something", adapter="qwen-lora", **values)
    assert tuned != base
    with manager.use(model_id) as handle:
        assert adapters.loaded_adapters(handle.model) == ["qwen-lora"]
    assert helpers.chat(manager, settings, "Tell me something", **values) == base  # adapter "none": the base again
    other = next(m for m in QWEN if m != model_id)
    with pytest.raises(InvalidRequest, match=f"trained on {model_id}, not on {other}"):
        voice.ChatRequest.build(manager.catalog, settings, message="Hi", model=other, adapter="qwen-lora")


def fake_hub_cache(root, manager, model_id: str):
    """The twin's files where ``hf download`` would leave the hub repo (the training process resolves the hub id)."""
    repo = root / f"models--{model_id.replace('/', '--')}"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(manager.catalog.get(model_id).location, repo / "snapshots" / commit,
                    ignore=shutil.ignore_patterns(".complete"))
    return root


@pytest.mark.slow
@pytest.mark.parametrize("model_id", QWEN)
def test_qwen_qlora_two_steps_in_the_training_process_then_its_adapter_loads_in_voice_chat(
        chat_twins, model_id, tmp_path, monkeypatch):
    from finetune.runner import ACTIVE_STATES, TrainingRunner

    manager, settings = chat_twins
    monkeypatch.setenv("HF_HUB_CACHE", str(fake_hub_cache(tmp_path / "hub", manager, model_id)))
    dataset = tmp_path / "d.jsonl"
    dataset.write_text("".join(json.dumps({"prompt": f"What is {i} plus one?", "response": f"{i + 1}."}) + "\n"
                               for i in range(4)))
    runner = TrainingRunner(settings, manager)
    run_id = runner.start(str(dataset), dict(
        base_model=model_id, adapter_name="qwen-qlora", quantization="nf4", max_steps=2, lora_r=8, lora_alpha=16,
        lora_dropout=0.0, learning_rate=1e-2, batch_size=2, scheduler="constant", gradient_checkpointing=False,
        val_fraction=0.0, max_length=128))
    deadline = time.time() + 150
    while (status := runner.status(run_id))["state"] in ACTIVE_STATES and time.time() < deadline:
        time.sleep(0.2)
    if status["state"] in ACTIVE_STATES:
        runner.kill(run_id)
    assert status["state"] == "completed", status["message"] + "\n" + "\n".join(status["log_tail"])
    assert status["step"] == 2
    card = json.loads((settings.adapters_dir / "qwen-qlora" / "workbench.json").read_text())
    assert card["base_model"] == model_id and card["config"]["quantization"] == "nf4"
    records = [json.loads(line) for line in (settings.runs_dir / run_id / "log.jsonl").read_text().splitlines()]
    assert any(r["event"] == "model" and r["precision"] == "nf4" for r in records), records  # the base in 4 bits

    values = dict(model=model_id, max_new_tokens=4, temperature=0.0, system_prompt="")
    assert helpers.chat(manager, settings, "What is 2 plus one?", adapter="qwen-qlora", **values)
    with manager.use(model_id) as handle:
        assert adapters.loaded_adapters(handle.model) == ["qwen-qlora"]
        inputs, _ = chat.encode(handle, [{"role": "user", "content": "What is 2 plus one?"}], GenerationParams())
        tuned = handle.model(**inputs).logits
        adapters.activate(handle.model, None)
        base = handle.model(**inputs).logits
    assert not base.allclose(tuned)


# ---- speech to text: Whisper ---------------------------------------------------------------------

@pytest.mark.parametrize("case", ASR_CASES, ids=repr)
def test_whisper_twin_reports_its_languages_mel_bins_and_special_tokens(twin_manager, case):
    with twin_manager.use(case.id) as handle:
        config, generation = handle.model.config, handle.model.generation_config
        ids = handle.tokenizer.convert_tokens_to_ids
        features = handle.feature_extractor(np.zeros(16_000, np.float32), sampling_rate=16_000,
                                            return_tensors="pt").input_features
        assert sorted(handle.languages) == sorted(case.languages) and handle.multilingual
        assert handle.feature_extractor.feature_size == config.num_mel_bins == case.mel_bins
        assert features.shape[1] == case.mel_bins and config.decoder_layers == case.decoder_layers
        last_language = max(generation.lang_to_id.values())
        assert generation.task_to_id["translate"] == last_language + 1  # <|yue|> shifts every later token in v3
        assert ids(case.no_speech_token) == last_language + 5 == generation.no_timestamps_token_id - 1
        assert all(layer < config.decoder_layers for layer, _ in generation.alignment_heads)


@pytest.mark.parametrize("case", ASR_CASES, ids=repr)
def test_whisper_twin_transcribes_and_translates_with_every_timestamp_mode(twin_manager, settings, recordings, case):
    for task in asr.TASKS:
        for timestamps in asr.TIMESTAMPS:
            transcript, seconds = helpers.transcribe(twin_manager, settings, recordings["speech"], model=case.id,
                                                     task=task, timestamps=timestamps)
            assert transcript.language in case.languages and transcript.chunks == 1 and seconds > 0
            assert transcript.audio_seconds == pytest.approx(3.0, abs=1.5)
            if timestamps == "none":
                assert transcript.segments == []
            elif task == "transcribe":  # greedy, so the same every run (translation may fall back to sampling)
                assert transcript.segments, f"no {timestamps} timestamps from {transcript.text!r}"
            for start, end, _ in transcript.segments:
                assert 0.0 <= start <= end <= transcript.audio_seconds


@pytest.mark.parametrize("case", ASR_CASES, ids=repr)
def test_cantonese_is_offered_by_name_where_the_model_knows_it(twin_manager, settings, recordings, case):
    assert asr.LANGUAGES["cantonese"] == "yue"
    if "yue" in case.languages:
        transcript, _ = helpers.transcribe(twin_manager, settings, recordings["speech"], model=case.id,
                                           language="cantonese")
        assert transcript.language == "yue"
    else:
        with pytest.raises(InvalidRequest, match=f"{case.id} does not support the language 'cantonese'"):
            helpers.transcribe(twin_manager, settings, recordings["speech"], model=case.id, language="cantonese")


# ---- text to speech: Coqui ------------------------------------------------------------------------

@pytest.mark.parametrize("case", TTS_CASES, ids=repr)
def test_coqui_twin_reports_speakers_languages_cloning_and_rate(twin_manager, request, case):
    ready(case, request)
    options = voice.voice_options(twin_manager, case.id)
    assert options == {"speakers": list(case.speakers), "languages": sorted(case.languages),
                       "cloning": case.cloning, "sample_rate": case.sample_rate, "family": "tts"}
    with twin_manager.use(case.id) as handle:
        assert handle.supports_style == case.style


@pytest.mark.parametrize("case", TTS_CASES, ids=repr)
def test_coqui_twin_speed_two_is_shorter_than_half(twin_manager, settings, request, case):
    ready(case, request)
    rate, fast = seeded_speak(twin_manager, settings, case.text, model=case.id, speed=2.0)
    _, slow = seeded_speak(twin_manager, settings, case.text, model=case.id, speed=0.5)
    assert rate == case.sample_rate and 0 < len(fast) < len(slow), (len(fast), len(slow))


@pytest.mark.parametrize("case", TTS_CASES, ids=repr)
def test_coqui_twin_speakers_and_languages_are_checked(twin_manager, settings, request, case):
    ready(case, request)
    speak = dict(model=case.id)
    if case.speakers:
        _, voiced = seeded_speak(twin_manager, settings, case.text, speaker=case.speakers[-1], **speak)
        _, default = seeded_speak(twin_manager, settings, case.text, **speak)
        assert len(voiced) and not np.array_equal(voiced, default)  # the default is the first speaker
    with pytest.raises(InvalidRequest, match=f"{case.id} has no speaker 'Nobody'. Speakers: "
                       + (", ".join(case.speakers) if case.speakers else r"none \(single-speaker model\)")):
        helpers.speak(twin_manager, settings, case.text, speaker="Nobody", **speak)
    if case.languages:
        assert len(seeded_speak(twin_manager, settings, "Bonjour à tous.", language="fr", **speak)[1])
    with pytest.raises(InvalidRequest, match=f"{case.id} does not speak 'xx'. Languages: "
                       + (", ".join(sorted(case.languages)) if case.languages else "none")):
        helpers.speak(twin_manager, settings, case.text, language="xx", **speak)


def test_xtts_clones_the_reference_decoded_by_the_workbench_once_per_file(twin_manager, settings, recordings,
                                                                           monkeypatch):
    import TTS.tts.models.xtts as coqui_xtts

    def coqui_loader(*args, **kwargs):
        raise AssertionError("Coqui's torchaudio loader needs a working torchcodec/FFmpeg")

    monkeypatch.setattr(coqui_xtts, "load_audio", coqui_loader)
    studio = seeded_speak(twin_manager, settings, XTTS.text, model=XTTS.id)[1]
    with twin_manager.use(XTTS.id) as handle:
        encodings = []
        encode = handle.model.get_speaker_embedding
        monkeypatch.setattr(handle.model, "get_speaker_embedding",
                            lambda *args, **kwargs: encodings.append(1) or encode(*args, **kwargs))
        mine = seeded_speak(twin_manager, settings, XTTS.text, model=XTTS.id, reference=recordings["reference"])[1]
        again = seeded_speak(twin_manager, settings, XTTS.text, model=XTTS.id, reference=recordings["reference"])[1]
        assert len(encodings) == 1, "the same reference was encoded again"
        other = seeded_speak(twin_manager, settings, XTTS.text, model=XTTS.id, reference=recordings["other"])[1]
    assert np.array_equal(mine, again)
    assert not np.array_equal(mine, studio) and not np.array_equal(mine, other)


def test_xtts_splits_long_text_at_its_language_character_limit(twin_manager, settings, monkeypatch):
    with twin_manager.use(XTTS.id) as handle:
        read = []
        inference = handle.model.inference
        monkeypatch.setattr(handle.model, "inference",
                            lambda text, *args, **kwargs: read.append(text) or inference(text, *args, **kwargs))
        limit = handle.model.tokenizer.char_limits["ko"]
        text = "안녕하세요 반갑습니다 " * 20  # one 220-character sentence
        helpers.speak(twin_manager, settings, text, model=XTTS.id, language="ko")
    assert limit == 95 and len(read) >= 3 and all(len(piece) <= limit for piece in read), [len(p) for p in read]
    assert " ".join(read).split() == text.split()


@pytest.mark.skipif(importlib.util.find_spec("pypinyin") is not None, reason="pypinyin is installed here")
def test_xtts_chinese_without_pypinyin_says_what_to_install(twin_manager, settings):
    with pytest.raises(ModelUnavailableError, match=r"speaks 'zh-cn' only with pypinyin installed \(pip install"):
        helpers.speak(twin_manager, settings, "你好", model=XTTS.id, language="zh-cn")


@pytest.mark.usefixtures("mandarin_phonemizer")
def test_tacotron_gst_takes_the_speaking_style_from_the_reference(twin_manager, settings, recordings):
    plain = seeded_speak(twin_manager, settings, TACOTRON.text, model=TACOTRON.id)[1]
    styled = seeded_speak(twin_manager, settings, TACOTRON.text, model=TACOTRON.id, reference=recordings["reference"])
    other = seeded_speak(twin_manager, settings, TACOTRON.text, model=TACOTRON.id, reference=recordings["other"])
    assert len(styled[1]) and not np.array_equal(styled[1], plain) and not np.array_equal(styled[1], other[1])


def test_a_voice_without_cloning_or_style_refuses_a_reference(twin_manager, settings, recordings):
    with pytest.raises(InvalidRequest, match="cannot clone a voice or take a speaking style from a recording"):
        helpers.speak(twin_manager, settings, VITS.text, model=VITS.id, reference=recordings["reference"])


def test_phoneme_voice_without_espeak_says_what_to_install(twin_manager, settings, monkeypatch):
    from TTS.tts.utils.text.phonemizers import espeak_wrapper

    monkeypatch.setattr(espeak_wrapper, "_DEF_ESPEAK_LIB", None)
    with pytest.raises(ModelUnavailableError, match=r"phonemes with espeak-ng \(en-us\).*Install espeak-ng"):
        helpers.speak(twin_manager, settings, VITS.text, model=VITS.id)
    assert not twin_manager.is_loaded(VITS.id)


@pytest.mark.skipif(all(importlib.util.find_spec(name) for name in ("pypinyin", "spacy_pkuseg")),
                    reason="Coqui's Mandarin phonemizer is installed here")
def test_mandarin_voice_without_its_phonemizer_says_what_to_install(twin_manager, settings):
    with pytest.raises(ModelUnavailableError, match=r"zh_cn_phonemizer, which needs the pypinyin and spacy-pkuseg"):
        helpers.speak(twin_manager, settings, TACOTRON.text, model=TACOTRON.id)


# ---- models-file entries the family cannot load ---------------------------------------------------

@dataclasses.dataclass(frozen=True)
class BadEntry:
    name: str
    task: str
    family: str
    folder: str  # a catalog id whose folder is copied, or "piper" for a Piper voice's files
    drop: tuple[str, ...]  # files left out of the copy
    message: str

    def __repr__(self) -> str:
        return self.name


BAD_ENTRIES = (
    BadEntry("VLM folder offered as chat", "chat", "chat", "tiny-vlm", (),
             r"holds a 'llava' model \(LlavaForConditionalGeneration\), an image-text model; list it with task: vqa"),
    BadEntry("chat folder without its tokenizer files", "chat", "chat", "tiny-chat", ("tokenizer*",),
             r"has no tokenizer files \(tokenizer.json, "),
    BadEntry("diffusion folder offered as speech-to-text", "speech-to-text", "asr", "tiny-sd", (),
             r"holds a diffusers pipeline, not a Whisper model"),
    BadEntry("chat folder offered as speech-to-text", "speech-to-text", "asr", "tiny-chat", (),
             r"holds a 'llama' model \(LlamaForCausalLM\); the speech-to-text family runs Whisper models"),
    BadEntry("Whisper folder without its feature extractor", "speech-to-text", "asr", "tiny-whisper",
             ("preprocessor_config.json",), r"lacks preprocessor_config.json \(the feature extractor\)"),
    BadEntry("Whisper folder offered as text-to-speech", "text-to-speech", "tts", "tiny-whisper", (),
             r"holds a transformers 'whisper' model, not a Coqui TTS model"),
    BadEntry("Piper voice offered as a Coqui voice", "text-to-speech", "tts", "piper", (),
             r"holds a Piper voice \(use family: piper\)"),
)


@pytest.mark.parametrize("case", BAD_ENTRIES, ids=repr)
def test_models_file_entry_of_another_architecture_gets_a_message_not_a_traceback(tmp_path, recordings, case):
    from models.catalog import Catalog
    from models.families import resolve_location
    from models.manager import ModelManager

    settings = make_settings(tmp_path)
    folder = tmp_path / "model"
    if case.folder == "piper":
        folder.mkdir()
        (folder / "voice.onnx").write_bytes(b"\0" * 16)
        (folder / "voice.onnx.json").write_text("{}")
    else:
        source = resolve_location(Catalog.load().get(case.folder), settings)
        shutil.copytree(source, folder, ignore=shutil.ignore_patterns("*.safetensors", *case.drop))
    models_file = tmp_path / "models.yaml"
    models_file.write_text(json.dumps({"models": [{"id": "my-model", "task": case.task, "family": case.family,
                                                   "source": "local", "repo": str(folder)}]}))
    manager = ModelManager(Catalog.load(models_file), settings)
    call = {"chat": lambda: helpers.chat(manager, settings, "Hi", model="my-model"),
            "speech-to-text": lambda: helpers.transcribe(manager, settings, recordings["speech"], model="my-model"),
            "text-to-speech": lambda: helpers.speak(manager, settings, "Hi", model="my-model")}[case.task]
    with pytest.raises(UserError, match=f"my-model: {folder} {case.message}"):
        call()


# ---- CUDA -----------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("model_id, quant", [(QWEN[0], "nf4"), *((case.id, "fp16") for case in ASR_CASES)])
def test_twins_load_quantized_on_cuda_and_give_the_memory_back(twin_catalog, tmp_path, recordings, model_id, quant):
    import gc

    import torch
    from bitsandbytes.nn import Linear4bit

    from models.manager import ModelManager

    settings = make_settings(tmp_path, device="cuda", memory_budget_gb=16.0)
    manager = ModelManager(twin_catalog, settings)
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()
    with manager.use(model_id, quant) as handle:
        assert next(handle.model.parameters()).is_cuda
        if quant == "nf4":
            assert any(isinstance(module, Linear4bit) for module in handle.model.modules())
    if quant == "nf4":
        assert isinstance(helpers.chat(manager, settings, "Hi", model=model_id, max_new_tokens=4, temperature=0.0), str)
    else:
        with manager.use(model_id) as handle:
            assert handle.model.dtype == torch.float16
        transcript, _ = helpers.transcribe(manager, settings, recordings["speech"], model=model_id, timestamps="word")
        assert transcript.chunks == 1
    manager.unload_all()
    gc.collect()
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == baseline, (torch.cuda.memory_allocated(), baseline)
    assert manager.leaks == []
