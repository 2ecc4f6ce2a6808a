"""Voice assistant latency: each stage and the real-time factor on the offline models, and the
workbench's overhead against calling the same three models directly, measured side by side.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/voice_latency.py [--rounds 5] [--chat-model tiny-chat]

Not a test: it prints numbers and a ratio (goal: overhead ratio <= 1.05), and never fails on a slow day.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--chat-model", default="tiny-chat", help="tiny-chat or smollm2-135m")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    args = parser.parse_args()

    import numpy as np

    from models.audio import load_audio, to_int16, write_wav
    from models.catalog import Catalog
    from models.families import asr, chat, tts
    from models.generation import GenerationParams
    from models.manager import ModelManager
    from models.settings import Settings
    from tabs import voice

    cache = Path(tempfile.mkdtemp(prefix="voice-bench-"))
    settings = Settings(cache_dir=cache, models_dir=ROOT / ".cache" / "test-models", offline=True,
                        offline_reason="bench", device="cpu", memory_budget_gb=4.0)
    manager = ModelManager(Catalog.load(), settings)
    rate = 16000
    t = np.arange(rate * 3) / rate
    speech_like = 0.3 * np.sin(2 * np.pi * 180 * t) * (1 + 0.6 * np.sin(2 * np.pi * 4 * t))
    audio_file = write_wav(cache / "question.wav", speech_like, rate)
    params = GenerationParams(max_new_tokens=args.max_new_tokens, temperature=0.0)

    # Warm up: build/load every model once, so that both sides time the same warm models.
    voice.last(voice.voice_turn(manager, settings, audio=str(audio_file), chat_model=args.chat_model,
                                max_new_tokens=args.max_new_tokens, temperature=0.0))

    def direct_turn() -> None:
        """The same three models through the families, without the tab's validation or the manager."""
        with manager.use("tiny-whisper") as asr_handle, manager.use(args.chat_model) as chat_handle, \
                manager.use("tiny-tts") as tts_handle:
            clip = load_audio(audio_file)
            text = asr.transcribe(asr_handle, clip.samples).text or "hello"
            partials = list(chat.reply(chat_handle, [{"role": "user", "content": text}], params))
            reply = partials[-1] if partials else ""
            try:
                samples, _ = tts.speak(tts_handle, reply)
                to_int16(samples)
            except ValueError:  # a random-weight reply may have nothing to pronounce, as in the workbench turn
                pass

    def workbench_turn():
        return voice.last(voice.voice_turn(manager, settings, audio=str(audio_file), chat_model=args.chat_model,
                                           system_prompt="", max_new_tokens=args.max_new_tokens, temperature=0.0))

    direct_times, workbench_times, stages = [], [], []
    for _ in range(args.rounds):  # interleaved, so a slow moment hits both sides alike
        started = time.perf_counter()
        direct_turn()
        direct_times.append(time.perf_counter() - started)
        started = time.perf_counter()
        final = workbench_turn()
        workbench_times.append(time.perf_counter() - started)
        stages.append(final.timings)

    def median(values):
        return statistics.median(values)

    print(f"voice turn on offline models (tiny-whisper, {args.chat_model}, tiny-tts), 3 s of input audio, "
          f"{args.rounds} rounds, medians")
    print(f"  ASR  {median([s.asr_seconds for s in stages]):.3f} s")
    print(f"  LLM  {median([s.llm_seconds for s in stages]):.3f} s, "
          f"{median([s.tokens_per_second for s in stages]):.1f} tokens/s")
    spoken = [s for s in stages if s.audio_out_seconds]
    if spoken:
        print(f"  TTS  {median([s.tts_seconds for s in spoken]):.3f} s for "
              f"{median([s.audio_out_seconds for s in spoken]):.2f} s of audio")
        print(f"  real-time factor {median([s.real_time_factor for s in spoken]):.3f}")
    else:
        print("  TTS  skipped: the random-weight reply held nothing to pronounce")
    print(f"direct calls: {median(direct_times):.3f} s per turn; workbench turn: {median(workbench_times):.3f} s")
    print(f"overhead ratio: {median(workbench_times) / median(direct_times):.2f}")
    manager.unload_all()


if __name__ == "__main__":
    main()
