"""Overhead of the /vqa path over calling the same transformers model directly.

Measured in one run, on the same tiny-vlm weights, image file and question, greedy decoding with
a fixed number of new tokens:

* workbench: ``tabs.vqa.answer_once`` -- the plain function the /vqa handler calls (input checks,
  image validation, manager.use pinning, adapter switch, chat template, generate, decode);
* direct: PIL open + ``processor.apply_chat_template`` + ``processor(...)`` + ``model.generate`` +
  decode on a model loaded with AutoModelForImageTextToText/AutoProcessor;
* streaming (for information): ``tabs.vqa.chat_turn``, the UI path with its generation thread.

The three run interleaved after a warm-up; the median of several repetitions is compared.
Run: ``HF_HUB_OFFLINE=1 .venv/bin/python bench/vqa_overhead.py [--reps 15] [--tokens 48]``.
This prints ratios; it never fails on a slow day.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

QUESTION = "What color is the square?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--tokens", type=int, default=48)
    args = parser.parse_args()

    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from models.catalog import Catalog
    from models.families import resolve_location
    from models.manager import ModelManager
    from models.settings import Settings
    from tabs import vqa

    torch.set_num_threads(1)  # fewer threads, less noise from other work on a small machine
    cache = Path(tempfile.mkdtemp(prefix="vqa-bench-"))
    settings = Settings(cache_dir=cache, models_dir=ROOT / ".cache" / "offline-models", offline=True,
                        offline_reason="bench", device="cpu")
    manager = ModelManager(Catalog.load(), settings)
    image_path = vqa.example_pairs(settings)[0][0]
    location = resolve_location(manager.catalog.get("tiny-vlm"), settings)

    processor = AutoProcessor.from_pretrained(location)
    model = AutoModelForImageTextToText.from_pretrained(location).eval()
    tokenizer = processor.tokenizer

    def direct() -> str:
        image = Image.open(image_path).convert("RGB")
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = processor(images=[image], text=prompt, return_tensors="pt")
        with torch.inference_mode():
            output = model.generate(**inputs, max_new_tokens=args.tokens, min_new_tokens=args.tokens,
                                    do_sample=False, pad_token_id=tokenizer.pad_token_id)
        return tokenizer.decode(output[0, inputs["input_ids"].shape[-1]:], skip_special_tokens=True)

    def workbench() -> str:
        return vqa.answer_once(manager, settings, image_path, QUESTION, "tiny-vlm", args.tokens, 0.0)

    def streaming() -> str:
        *_, (history, _, _) = vqa.chat_turn(manager, settings, image_path, QUESTION, [], [], "tiny-vlm",
                                            args.tokens, 0.0, 1.0, "", "none", False)
        return history[-1]["content"]

    # The tiny model rarely emits its end token, but make both paths produce exactly args.tokens.
    with manager.use("tiny-vlm") as handle:
        handle.model.generation_config.min_new_tokens = args.tokens
    del handle  # the manager must hold the only reference, or unloading reports a leak
    model.generation_config.min_new_tokens = args.tokens

    paths = {"direct": direct, "workbench": workbench, "streaming": streaming}
    answers = {name: fn() for name, fn in paths.items()}  # warm-up
    if len(set(answers.values())) != 1:
        print(f"warning: the paths answered differently: {answers}")
    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(args.reps):
        for name, fn in paths.items():
            started = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - started)
    median = {name: statistics.median(values) for name, values in times.items()}
    print(f"tiny-vlm, {args.tokens} new tokens, greedy, {args.reps} reps, medians: "
          + ", ".join(f"{name} {value * 1000:.1f} ms" for name, value in median.items()))
    print(f"streaming ratio (UI path / direct): {median['streaming'] / median['direct']:.2f}")
    print(f"overhead ratio (/vqa function / direct): {median['workbench'] / median['direct']:.2f}")
    manager.unload_all()


if __name__ == "__main__":
    main()
