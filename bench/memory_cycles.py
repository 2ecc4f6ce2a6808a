"""Does memory come back after an unload? Load/unload each offline model CYCLES times (default 20).

For each model whose family exists, prints the process RSS after every unload, the slope of a
linear fit over cycles 5..CYCLES (MB per cycle), the ratio of the last RSS to the RSS after cycle 5
(the baseline of the same run), and a verdict: "no upward trend beyond noise" when the growth the
slope predicts over the window stays within the noise of the fit (or under 1 MB in all).

    python bench/memory_cycles.py            # CYCLES=20 by default; MODELS=tiny-chat,tiny-sd to choose

This is a measurement, not a test: it never fails because the machine is slow.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CYCLES = int(os.environ.get("CYCLES", "20"))
FIT_FROM = 5  # the first cycles warm allocator pools and import caches
MODELS = ["tiny-vlm", "tiny-sd", "tiny-whisper", "tiny-chat", "tiny-tts", "smollm2-135m"]
NOISE_FLOOR_MB = 1.0


def trend(rss_mb: list[float]) -> tuple[float, float, float]:
    """(slope MB/cycle, growth over the window predicted by the slope, residual noise) for cycles FIT_FROM.."""
    import numpy as np

    window = np.array(rss_mb[FIT_FROM - 1:])
    cycles = np.arange(FIT_FROM, FIT_FROM + len(window))
    slope, intercept = np.polyfit(cycles, window, 1)
    residuals = window - (slope * cycles + intercept)
    return float(slope), float(slope * (len(window) - 1)), float(2 * residuals.std())


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    models_dir = ROOT / ".cache" / "offline-models"
    if "WORKBENCH_MODELS_DIR" not in os.environ and models_dir.is_dir():
        os.environ["WORKBENCH_MODELS_DIR"] = str(models_dir)  # reuse the prebuilt tiny models
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    from models.catalog import Catalog
    from models.manager import ModelManager
    from models.memory import free_device_memory, process_rss
    from models.settings import settings_from_args

    settings = settings_from_args(["--offline", "--device", "cpu", "--memory-budget", "8"])
    catalog = Catalog.load()
    manager = ModelManager(catalog, settings)
    chosen = os.environ.get("MODELS", ",".join(MODELS)).split(",")
    print(f"{CYCLES} load/unload cycles per model; RSS in MB after each unload (2 shared CPU cores)")
    summary = []
    for model_id in chosen:
        spec = catalog.get(model_id)
        if importlib.util.find_spec(f"models.families.{spec.family}") is None:
            print(f"{model_id}: skipped, the {spec.family} family has not landed yet")
            continue
        with manager.use(model_id):  # build/convert once outside the measured cycles
            pass
        manager.unload(model_id)
        free_device_memory()
        rss_mb, seconds = [], []
        for _ in range(CYCLES):
            started = time.perf_counter()
            with manager.use(model_id):
                pass
            manager.unload(model_id)
            seconds.append(time.perf_counter() - started)
            rss_mb.append(process_rss() / 1024**2)
        slope, growth, noise = trend(rss_mb)
        flat = growth <= max(noise, NOISE_FLOOR_MB)
        verdict = "no upward trend beyond noise" if flat else "UPWARD TREND"
        ratio = rss_mb[-1] / rss_mb[FIT_FROM - 1]
        print(f"\n{model_id}: " + " ".join(f"{value:.0f}" for value in rss_mb))
        print(f"{model_id}: load+unload {sum(seconds) / len(seconds):.2f} s/cycle; slope {slope:+.3f} MB/cycle over "
              f"cycles {FIT_FROM}..{CYCLES} (growth {growth:+.1f} MB, noise {noise:.1f} MB); "
              f"RSS ratio last/cycle {FIT_FROM}: {ratio:.3f}; leaks flagged: {manager.leaks.count(model_id)}; "
              f"{verdict}")
        summary.append((model_id, slope, ratio, verdict))
    print("\nsummary:")
    for model_id, slope, ratio, verdict in summary:
        print(f"  {model_id:14s} slope {slope:+.3f} MB/cycle, RSS ratio {ratio:.3f}: {verdict}")
    print(f"  leak warnings from the manager: {len(manager.leaks)}")


if __name__ == "__main__":
    main()
