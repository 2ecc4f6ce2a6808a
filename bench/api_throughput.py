"""The OpenAI-compatible API's cost: /v1 tokens per second against a direct ``generate``, and time to the
first streamed token against the tab's own path (/chat through gradio_client), on the same model.

Starts ``python app.py --offline`` in a subprocess, warms the model, then alternates rounds of:
a non-streaming /v1/chat/completions (tokens/s from its ``usage``), a direct ``model.generate`` in
this process on the same prompt and length, a streaming /v1 request and a streaming /chat request
(seconds to the first piece of text).

    HF_HUB_OFFLINE=1 .venv/bin/python bench/api_throughput.py [--model smollm2-135m] [--rounds 5]

Prints medians and the ratios (goal: /v1 tokens/s >= 0.95 x direct). Not a test: never fails on a slow day.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import free_port, wait_http

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "Write a short story about a lighthouse keeper."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()

    import openai
    import torch
    from gradio_client import Client

    from models.catalog import Catalog
    from models.families import chat
    from models.generation import GenerationParams
    from models.manager import ModelManager
    from models.settings import Settings

    threads = os.environ.get("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(threads))
    port = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False", OMP_NUM_THREADS=threads,
               WORKBENCH_MODELS_DIR=str(ROOT / ".cache" / "offline-models"))
    cache = Path(tempfile.mkdtemp(prefix="api-bench-"))
    app = subprocess.Popen([sys.executable, "app.py", "--offline", "--device", "cpu", "--port", str(port),
                            "--cache-dir", str(cache / "app")], cwd=ROOT, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}/"
        wait_http(url + "health")
        api = openai.OpenAI(base_url=url + "v1", api_key="x", max_retries=0, timeout=300)
        ui = Client(url, verbose=False)
        messages = [{"role": "user", "content": PROMPT}]
        settings = Settings(cache_dir=cache / "direct", models_dir=ROOT / ".cache" / "offline-models", offline=True,
                            device="cpu", memory_budget_gb=4.0)
        manager = ModelManager(Catalog.load(), settings)
        params = GenerationParams(max_new_tokens=args.tokens, temperature=0.0)

        def via_api() -> float:
            started = time.perf_counter()
            reply = api.chat.completions.create(model=args.model, messages=messages, temperature=0,
                                                max_tokens=args.tokens)
            return reply.usage.completion_tokens / (time.perf_counter() - started)

        def direct() -> float:
            with manager.use(args.model) as handle:
                inputs, _ = chat.encode(handle, messages, params)
                started = time.perf_counter()
                with torch.inference_mode():
                    output = handle.model.generate(**inputs, **params.generate_kwargs(),
                                                   pad_token_id=handle.tokenizer.eos_token_id)
                return (output.shape[-1] - inputs["input_ids"].shape[-1]) / (time.perf_counter() - started)

        def first_token_api() -> float:
            started = time.perf_counter()
            for chunk in api.chat.completions.create(model=args.model, messages=messages, temperature=0,
                                                     max_tokens=args.tokens, stream=True):
                if chunk.choices and chunk.choices[0].delta.content:
                    return time.perf_counter() - started
            raise RuntimeError("nothing streamed")

        def first_token_tab() -> float:
            started = time.perf_counter()
            job = ui.submit(PROMPT, [], args.model, "", args.tokens, 0.0, "none", api_name="/chat")
            for output in job:
                if output:
                    seconds = time.perf_counter() - started
                    job.result()
                    return seconds
            raise RuntimeError("nothing streamed")

        via_api(), direct(), first_token_api(), first_token_tab()  # warm: models loaded on both sides
        rows = {"api": [], "direct": [], "ttft_api": [], "ttft_tab": []}
        for _ in range(args.rounds):
            rows["api"].append(via_api())
            rows["direct"].append(direct())
            rows["ttft_api"].append(first_token_api())
            rows["ttft_tab"].append(first_token_tab())
        median = {name: statistics.median(values) for name, values in rows.items()}
        print(f"{args.model}, {args.tokens} new tokens, greedy, {args.rounds} alternating rounds, medians, "
              f"{threads} thread(s) per process")
        print(f"  /v1/chat/completions {median['api']:.1f} tokens/s; direct generate {median['direct']:.1f} tokens/s; "
              f"ratio {median['api'] / median['direct']:.2f} (goal >= 0.95)")
        print(f"  time to first token: /v1 streaming {median['ttft_api']:.3f} s; the tab's /chat "
              f"{median['ttft_tab']:.3f} s; ratio {median['ttft_api'] / median['ttft_tab']:.2f}")
        manager.unload_all()
    finally:
        app.terminate()
        app.wait(30)


if __name__ == "__main__":
    main()
