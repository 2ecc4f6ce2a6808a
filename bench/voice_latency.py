"""Voice assistant latency on the real offline models (whisper-tiny.en, smollm2-135m, piper-joe).

For one spoken question whose answer runs to three sentences or more, it measures, in rounds that
alternate so that a busy moment of the machine hits every side alike:

* the streamed turn (each sentence spoken as soon as it is written) against the same turn run
  stage after stage (the whole reply written, then spoken): the ratio of their time to first
  audio (goal <= 0.6);
* the workbench's streamed turn against calling the same three models directly, one after the
  other, through the families: the overhead ratio of total time;
* per-stage times, tokens per second and the voice's real-time factor.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/voice_latency.py [--rounds 5]

Not a test: it prints numbers and ratios, and never fails on a slow day.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

QUESTION = "Tell me three short facts about the Moon."
SYSTEM = "Answer in three short sentences."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    args = parser.parse_args()

    from models import voice
    from models.audio import load_audio, write_wav
    from models.catalog import Catalog
    from models.families import asr, chat, piper
    from models.generation import GenerationParams
    from models.manager import ModelManager
    from models.settings import Settings

    cache = Path(tempfile.mkdtemp(prefix="voice-bench-"))
    settings = Settings(cache_dir=cache, models_dir=ROOT / ".cache" / "offline-models", offline=True,
                        offline_reason="bench", device="cpu", memory_budget_gb=4.0)
    manager = ModelManager(Catalog.load(), settings)
    (rate, samples), _ = voice.speak_text(manager, voice.SpeakRequest.build(manager.catalog, settings, text=QUESTION))
    question = write_wav(cache / "question.wav", samples / 32767, rate)
    turn = voice.VoiceTurnRequest.build(
        manager.catalog, settings, audio=str(question), asr_model="whisper-tiny.en", chat_model="smollm2-135m",
        tts_model="piper-joe", system_prompt=SYSTEM, max_new_tokens=args.max_new_tokens, temperature=0.0)
    params = GenerationParams(max_new_tokens=args.max_new_tokens, temperature=0.0)

    def direct_turn() -> float:
        """The same three models through the families, stage after stage, without the workbench around them."""
        started = time.perf_counter()
        with manager.use("whisper-tiny.en") as asr_handle, manager.use("smollm2-135m") as chat_handle, \
                manager.use("piper-joe") as voice_handle:
            text = asr.transcribe(asr_handle, load_audio(question).samples).text
            messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}]
            reply = list(chat.reply(chat_handle, messages, params))[-1]
            piper.speak(voice_handle, reply)
        return time.perf_counter() - started

    voice.last(voice.voice_turn(manager, settings, turn))  # warm up: every model loaded once
    streamed, staged, direct = [], [], []
    for _ in range(args.rounds):
        streamed.append(voice.last(voice.voice_turn(manager, settings, turn)))
        staged.append(voice.last(voice.voice_turn(manager, settings, turn, stream_speech=False)))
        direct.append(direct_turn())

    def median(values):
        return statistics.median(values)

    final = streamed[-1]
    sentences = len(piper.split_sentences(final.reply))
    print(f"voice turn on whisper-tiny.en -> smollm2-135m -> piper-joe, {final.timings.audio_in_seconds:.1f} s "
          f"question, reply of {sentences} sentences ({final.timings.llm_tokens} tokens), {args.rounds} rounds, "
          "medians")
    print(f"  reply: {final.reply!r}")
    print(f"  ASR  {median([t.timings.asr_seconds for t in streamed]):.3f} s")
    print(f"  LLM  {median([t.timings.llm_seconds for t in streamed]):.3f} s, "
          f"{median([t.timings.tokens_per_second for t in streamed]):.1f} tokens/s")
    print(f"  TTS  {median([t.timings.tts_seconds for t in streamed]):.3f} s for "
          f"{median([t.timings.audio_out_seconds for t in streamed]):.2f} s of audio, voice real-time factor "
          f"{median([t.timings.real_time_factor for t in streamed]):.3f}")
    first_streamed = median([t.timings.first_audio_seconds for t in streamed])
    first_staged = median([t.timings.first_audio_seconds for t in staged])
    print(f"time to first audio: streamed {first_streamed:.3f} s, stage after stage {first_staged:.3f} s")
    print(f"time-to-first-audio ratio (streamed / stage after stage): {first_streamed / first_staged:.2f} "
          "(goal <= 0.6)")
    total = median([t.timings.total_seconds for t in streamed])
    print(f"whole turn: workbench streamed {total:.3f} s, direct family calls {median(direct):.3f} s; "
          f"overhead ratio {total / median(direct):.2f}")
    manager.unload_all()


if __name__ == "__main__":
    main()
