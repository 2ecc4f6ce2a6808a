"""A batch of 4 images in one pipeline call against the same 4 images made in 4 calls.

Both sides run the workbench's own ``diffusion.generate`` on one loaded model with the same prompt,
size, steps, guidance and seeds (image i: seed + i); only ``batch_size`` differs (4 vs 1). Rounds are
interleaved after a warm-up, and the ratio of images per second (batched / one by one) is printed,
with how far the batched images are from the single ones (max and mean, in levels of 255).

The goal on CUDA is a ratio of at least 1.5 for SD 1.5 at 512x512 in fp16. On a CPU, and with the
tiny random-weight model, the ratio is only reported: a CPU is already busy with one image, so a
batch saves little beyond the per-call overhead.

Usage:
  .venv/bin/python bench/t2i_batch.py                        # tiny-sd on CPU
  .venv/bin/python bench/t2i_batch.py --model stable-diffusion-v1-5/stable-diffusion-v1-5 --device cuda \\
      --size 512 --steps 25 --rounds 3                        # needs the model in the local HF cache
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

BATCH = 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-sd")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--guidance", type=float, default=None, help="default: the model's own")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()

    import numpy as np
    import torch

    from models.catalog import Catalog
    from models.families import ModelUnavailableError, diffusion
    from models.manager import ModelManager
    from models.settings import Settings

    torch.set_num_threads(args.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(cache_dir=Path(tmp), models_dir=ROOT / ".cache" / "offline-models", offline=True,
                            offline_reason="bench", device=device, memory_budget_gb=64.0)
        manager = ModelManager(Catalog.load(), settings)
        spec = manager.catalog.get(args.model)
        batched, _ = diffusion.check_request(spec, prompt="a lighthouse at dawn, mist over the sea", width=args.size,
                                             height=args.size, steps=args.steps, guidance=args.guidance, seed=1234,
                                             num_images=BATCH)
        one_by_one = dataclasses.replace(batched, batch_size=1)
        try:
            with manager.use(args.model) as handle:
                results = run(handle, batched, one_by_one, args.rounds, device)
                precision, backend = handle.precision, diffusion.attention_label(handle)
                del handle
        except ModelUnavailableError as exc:
            raise SystemExit(f"{args.model}: {exc}") from None
        manager.unload_all()
    timings, images = results
    together, alone = statistics.median(timings["batched"]), statistics.median(timings["one_by_one"])
    difference = np.abs(np.stack([np.asarray(i, dtype=int) for i in images["batched"]])
                        - np.stack([np.asarray(i, dtype=int) for i in images["one_by_one"]]))
    print(f"{args.model} {args.size}x{args.size}, {batched.steps} steps, guidance {batched.guidance}, {device} "
          f"{precision}, {backend}, {args.rounds} rounds (median)"
          + (f", {args.threads} CPU thread(s)" if device == "cpu" else ""))
    print(f"batch of {BATCH} in one call: {together:.3f} s = {BATCH / together:.2f} images/s")
    print(f"{BATCH} calls of one image:    {alone:.3f} s = {BATCH / alone:.2f} images/s")
    print(f"images per second ratio (batched / one by one): {alone / together:.2f}"
          + ("  (goal on CUDA at 512x512 SD 1.5: >= 1.5)" if device == "cuda" else "  (CPU: reported only)"))
    print(f"batched vs one by one: max {difference.max()} and mean {difference.mean():.4f} levels of 255 "
          f"(tolerance {diffusion.BATCH_TOLERANCE if device == 'cpu' else diffusion.GPU_BATCH_TOLERANCE})")


def run(handle, batched, one_by_one, rounds: int, device: str):
    import torch

    from models.families import diffusion

    def timed(request):
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        result = diffusion.generate(handle, request)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started, result

    images = {"batched": timed(batched)[1].images, "one_by_one": timed(one_by_one)[1].images}  # warm-up
    timings = {"batched": [], "one_by_one": []}
    for _ in range(rounds):  # interleaved, so load on the machine hits both sides alike
        for name, request in (("one_by_one", one_by_one), ("batched", batched)):
            seconds, result = timed(request)
            timings[name].append(seconds)
            assert result.pipeline_calls == (1 if name == "batched" else len(result.images))
    return timings, images


if __name__ == "__main__":
    main()
