"""Image VQA: the vlm family on tiny-vlm, the tab's plain functions, and /vqa through gradio_client."""

from __future__ import annotations

import io
import re
import threading

import pytest
from helpers import save_lora
from PIL import Image

from models import vqa
from models.generation import GenerationParams, StreamStats

GREEDY = {"max_new_tokens": 24, "temperature": 0.0}


def ask(manager, settings, image, question, model="tiny-vlm", max_new_tokens=24, temperature=0.0, **values) -> str:
    """The /vqa path: a request built from values, answered once."""
    request = vqa.VqaRequest.build(manager.catalog, settings, image=image, question=question, model=model,
                                   max_new_tokens=max_new_tokens, temperature=temperature, **values)
    return vqa.answer_once(manager, request)


def turn(manager, settings, image, question, history, base_history, model, max_new_tokens, temperature, top_p,
         system_prompt, adapter, compare, stop=None):
    """The tab's path: one streamed turn of the conversation."""
    request = vqa.VqaRequest.build(
        manager.catalog, settings, image=image, question=question, history=history, base_history=base_history,
        model=model, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
        system_prompt=system_prompt, adapter=adapter, compare=compare)
    return vqa.chat_turn(manager, request, stop=stop)


@pytest.fixture
def picture(settings):
    """The first example image the app draws itself, as a file path."""
    return vqa.example_pairs(settings)[0][0]


def generate_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == "generate" and thread.is_alive()]


def assert_nothing_pinned(manager):
    assert all(not entry["pinned"] for entry in manager.snapshot())


def make_adapter(manager, settings, name: str = "shapes-lora", base_model: str = "tiny-vlm"):
    """A LoRA on tiny-vlm's language model (random, non-zero B so it changes answers), saved like the fine-tune tab."""
    from models.families import resolve_location

    return save_lora(resolve_location(manager.catalog.get("tiny-vlm"), settings), settings.adapters_dir, name,
                     base_model, r".*language_model.*\.(q_proj|v_proj|o_proj)", vision=True)


# ---- the family ---------------------------------------------------------------------------------

def test_tiny_vlm_loads_through_auto_classes(manager):
    with manager.use("tiny-vlm") as handle:
        assert type(handle.model).__name__ == "LlavaForConditionalGeneration"
        assert type(handle.processor).__name__ == "LlavaProcessor"
        assert handle.model_type == "llava" and handle.context_length == 512
    entry = manager.snapshot()[0]
    assert entry["id"] == "tiny-vlm" and entry["precision"] == "fp32" and not entry["pinned"]


def test_streaming_yields_several_times_and_matches_the_api_path(manager, picture):
    from models.families import vlm
    from models.images import load_image

    image, _ = load_image(picture)
    params = GenerationParams(max_new_tokens=40, temperature=0.0)
    stats = StreamStats()
    with manager.use("tiny-vlm") as handle:
        pieces = list(vlm.answer(handle, image, "What color is the square?", params, stats=stats))
        whole = vlm.answer_text(handle, image, "What color is the square?", params)
    assert len(pieces) > 1
    assert all(later.startswith(earlier) for earlier, later in zip(pieces, pieces[1:], strict=False))
    assert pieces[-1] == whole and whole.strip()
    assert stats.new_tokens >= 2 and not stats.stopped
    assert_nothing_pinned(manager)


def test_image_changes_the_answer(manager, settings):
    pairs = vqa.example_pairs(settings)
    answers = {ask(manager, settings, path, "Describe the picture.", "tiny-vlm", **GREEDY)
               for path, _ in pairs}
    assert len(answers) > 1  # the pixels reach the model


def test_stop_mid_answer_leaves_no_thread_and_nothing_pinned(manager, settings, picture):
    stop = threading.Event()
    turns = turn(manager, settings, picture, "What is this?", [], [], "tiny-vlm", 400, 1.0, 1.0, "",
                          "none", False, stop=stop)
    seen = [next(turns) for _ in range(3)]
    assert seen[-1][0][-1]["role"] == "assistant"
    assert any(entry["pinned"] for entry in manager.snapshot())  # in use while streaming
    turns.close()  # what Gradio does on Stop or when the page closes
    assert stop.is_set()
    assert generate_threads() == []
    assert_nothing_pinned(manager)
    del seen, turns
    assert manager.unload_all() == ["tiny-vlm"] and manager.leaks == []  # no thread kept the model alive


def test_multi_turn_history_and_system_prompt(manager, settings, picture):
    first = list(turn(manager, settings, picture, "What is this?", [], [], "tiny-vlm", 16, 0.0, 1.0,
                               "Answer briefly.", "none", False))[-1]
    history, base, notices = first
    assert [m["role"] for m in history] == ["user", "assistant"] and history[0]["content"] == "What is this?"
    assert base == [] and notices == []
    second = list(turn(manager, settings, picture, "And its color?", history, [], "tiny-vlm", 16, 0.0,
                                1.0, "Answer briefly.", "none", False))[-1][0]
    assert [m["role"] for m in second] == ["user", "assistant"] * 2
    assert second[:2] == history


def test_prompt_puts_the_image_in_the_first_turn_only(manager):
    from models.families import vlm

    messages = vlm.build_messages("second?", [{"role": "user", "content": "first?"},
                                              {"role": "assistant", "content": "an answer"}], "Be brief.")
    with manager.use("tiny-vlm") as handle:
        prompt = handle.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt.count("<image>") == 1
    assert prompt.index("Be brief.") < prompt.index("<image>") < prompt.index("first?") < prompt.index("second?")


def test_long_history_is_trimmed_with_a_notice(manager, settings, picture):
    history = []
    for index in range(12):
        history += [{"role": "user", "content": f"Question {index}: " + "what is in this image? " * 6},
                    {"role": "assistant", "content": "A red square on a white background. " * 4}]
    history, _, notices = list(turn(manager, settings, picture, "Last one?", history, [], "tiny-vlm", 8,
                                             0.0, 1.0, "", "none", False))[-1]
    assert any("Left out" in note and "earlier message" in note for note in notices)
    assert history[-1]["role"] == "assistant" and history[-2]["content"] == "Last one?"


def test_question_longer_than_the_context_is_rejected(manager, settings, picture):
    long_question = "Describe the picture in detail please. " * 100
    with pytest.raises(ValueError, match=r"take \d+ tokens; tiny-vlm reads at most 512 tokens"):
        ask(manager, settings, picture, long_question, "tiny-vlm", **GREEDY)
    with pytest.raises(ValueError, match="limit is"):
        ask(manager, settings, picture, "x" * (settings.limits.text_chars + 1), "tiny-vlm", **GREEDY)
    assert_nothing_pinned(manager)


def test_max_new_tokens_beyond_the_context_is_lowered_with_a_notice(manager, settings, picture):
    history, _, notices = list(turn(manager, settings, picture, "What is this?", [], [], "tiny-vlm", 1000,
                                             0.0, 1.0, "", "none", False))[-1]
    assert any("Max new tokens lowered to" in note for note in notices)
    assert history[-1]["role"] == "assistant"


def test_large_image_fits_the_model_limit():
    from models.families import vlm

    image = Image.new("RGB", (3000, 1000), (0, 0, 200))
    fitted, notices = vlm.fit_image(image, 1024 * 1024)
    assert fitted.width * fitted.height <= 1024 * 1024 and notices and "3000x1000" in notices[0]
    assert vlm.fit_image(fitted, 1024 * 1024) == (fitted, [])


# ---- adapters and compare -------------------------------------------------------------------------

def test_compare_shows_base_and_adapter_answers_side_by_side(manager, settings, picture):
    make_adapter(manager, settings)
    assert vqa.adapters_for(settings, "tiny-vlm") == ["none", "shapes-lora"]
    assert vqa.adapters_for(settings, "HuggingFaceTB/SmolVLM-256M-Instruct") == ["none"]
    plain = ask(manager, settings, picture, "What is this?", "tiny-vlm", **GREEDY)
    adapted_once = ask(manager, settings, picture, "What is this?", "tiny-vlm", adapter="shapes-lora",
                                   **GREEDY)
    history, base, _ = list(turn(manager, settings, picture, "What is this?", [], [], "tiny-vlm", 24, 0.0,
                                          1.0, "", "shapes-lora", True))[-1]
    assert base[-1]["content"] == plain
    assert history[-1]["content"] == adapted_once != plain
    # back to the bare base model after an adapter was active
    assert ask(manager, settings, picture, "What is this?", "tiny-vlm", **GREEDY) == plain
    assert_nothing_pinned(manager)
    assert manager.unload_all() == ["tiny-vlm"] and manager.leaks == []  # adapters freed with the model


def test_compare_without_adapter_and_bad_adapters(manager, settings, picture):
    with pytest.raises(ValueError, match="Compare needs an adapter"):
        list(turn(manager, settings, picture, "q?", [], [], "tiny-vlm", 8, 0.0, 1.0, "", "none", True))
    with pytest.raises(ValueError, match="Unknown adapter"):
        ask(manager, settings, picture, "q?", "tiny-vlm", adapter="missing", **GREEDY)
    with pytest.raises(ValueError, match="adapter must be 1 to 64 letters"):
        ask(manager, settings, picture, "q?", "tiny-vlm", adapter="../escape", **GREEDY)
    make_adapter(manager, settings, name="chat-lora", base_model="tiny-chat")
    with pytest.raises(ValueError, match="trained on tiny-chat"):
        ask(manager, settings, picture, "q?", "tiny-vlm", adapter="chat-lora", **GREEDY)


# ---- the tab's checks ---------------------------------------------------------------------------

def test_precision_line_without_torch_import(manager, settings):
    line = vqa.precision_line(manager, settings, "tiny-vlm")
    assert line.startswith("Precision on this device:") and "fp32" in line
    from dataclasses import replace

    auto = vqa.precision_line(manager, replace(settings, device="auto"), "HuggingFaceTB/SmolVLM-256M-Instruct")
    assert "fp32** on CPU" in auto and "nf4** on CUDA" in auto


@pytest.mark.parametrize("model, tokens, temperature, top_p, message", [
    ("no-such-model", 16, 0.0, 0.9, "Unknown model 'no-such-model'. Image VQA models: .*tiny-vlm"),
    ("tiny-chat", 16, 0.0, 0.9, "is a chat model"),
    ("tiny-vlm", 0, 0.0, 0.9, "max_new_tokens must be between 1"),
    ("tiny-vlm", 100_000, 0.0, 0.9, "max_new_tokens must be between 1"),
    ("tiny-vlm", 2.5, 0.0, 0.9, "whole number"),
    ("tiny-vlm", 16, -1, 0.9, "temperature must be between"),
    ("tiny-vlm", 16, 9.0, 0.9, "temperature must be between"),
    ("tiny-vlm", 16, "hot", 0.9, "temperature must be a number"),
    ("tiny-vlm", 16, 0.5, 0.0, "top_p must be above 0"),
])
def test_bad_request_values(manager, settings, picture, model, tokens, temperature, top_p, message):
    with pytest.raises(ValueError, match=message):
        ask(manager, settings, picture, "q?", model, tokens, temperature, top_p=top_p)
    assert manager.snapshot() == []  # rejected before any model was loaded


@pytest.mark.parametrize("question", ["", "   \n\t", None])
def test_empty_question(manager, settings, picture, question):
    with pytest.raises(ValueError, match="Type a question"):
        ask(manager, settings, picture, question, "tiny-vlm", **GREEDY)


def test_no_image(manager, settings):
    with pytest.raises(ValueError, match="Upload, paste or capture"):
        ask(manager, settings, None, "q?", "tiny-vlm", **GREEDY)


# ---- through the launched app -------------------------------------------------------------------

def bad_files(folder) -> dict[str, tuple[str, str]]:
    """name -> (path, expected message) for each kind of unusable upload."""
    buffer = io.BytesIO()
    Image.effect_noise((64, 64), 64).convert("RGB").save(buffer, format="PNG")
    files = {
        "text.png": (b"just some text", "not an image file"),
        "empty.jpg": (b"", "empty file"),
        "truncated.png": (buffer.getvalue()[:300], "corrupt or truncated"),
    }
    paths = {}
    for name, (data, message) in files.items():
        path = folder / name
        path.write_bytes(data)
        paths[name] = (str(path), message)
    return paths


def test_vqa_endpoint_answers_like_the_function(client, manager, settings, picture):
    from gradio_client import handle_file

    answer = client.predict(image=handle_file(picture), question="What color is the square?", model="tiny-vlm",
                            max_new_tokens=24, temperature=0.0, api_name="/vqa")
    assert isinstance(answer, str) and answer.strip()
    # same deterministic weights, greedy decoding: the endpoint adds nothing and loses nothing
    assert answer == ask(manager, settings, picture, "What color is the square?", "tiny-vlm", **GREEDY)
    api = client.view_api(print_info=False, return_format="dict")["named_endpoints"]["/vqa"]
    names = [p["parameter_name"] for p in api["parameters"]]
    assert names[:6] == ["image", "question", "model", "max_new_tokens", "temperature", "adapter"]
    assert {p["parameter_name"]: p.get("parameter_default") for p in api["parameters"]}["adapter"] == "none"


def test_vqa_endpoint_bad_inputs_get_clear_messages_and_the_app_keeps_serving(client, app_server, tmp_path,
                                                                               picture):
    from gradio_client import handle_file

    _, server_manager, _ = app_server
    cases = [(handle_file(path), "q?", "tiny-vlm", 16, 0.0, message) for path, message in bad_files(tmp_path).values()]
    cases += [
        (handle_file(picture), "  ", "tiny-vlm", 16, 0.0, "Type a question"),
        (handle_file(picture), "q?", "tiny-vlm", 0, 0.0, "max_new_tokens must be between 1"),
        (handle_file(picture), "q?", "tiny-vlm", 16, 3.0, "temperature must be between"),
        (handle_file(picture), "q?", "nope", 16, 0.0, "Unknown model 'nope'"),
    ]
    for image, question, model, tokens, temperature, message in cases:
        with pytest.raises(Exception, match=message):
            client.predict(image=image, question=question, model=model, max_new_tokens=tokens,
                           temperature=temperature, api_name="/vqa")
    answer = client.predict(image=handle_file(picture), question="Still there?", model="tiny-vlm",
                            max_new_tokens=8, temperature=0.0, api_name="/vqa")
    assert isinstance(answer, str)
    assert all(not entry["pinned"] for entry in server_manager.snapshot())
    assert generate_threads() == []


# ---- GPU (skipped without CUDA) -----------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.slow
def test_smolvlm_4bit_answers_about_a_generated_image_and_saves_vram():
    """A real SmolVLM in NF4 names the colour of the drawn square; report 4-bit vs fp16 VRAM."""
    import gc

    import torch

    from models.catalog import Catalog
    from models.families import vlm
    from models.images import draw_example
    from models.quantization import Precision

    spec = Catalog.load().get("HuggingFaceTB/SmolVLM-256M-Instruct")
    image = draw_example("red-square.png")
    params = GenerationParams(max_new_tokens=16, temperature=0.0)
    used = {}
    answers = {}
    for name in ("fp16", "nf4"):
        gc.collect()
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        handle = vlm.load(spec, spec.location, Precision(name=name, device="cuda"))
        used[name] = torch.cuda.memory_allocated() - before
        answers[name] = vlm.answer_text(handle, image, "What color is the square? Answer with one word.", params)
        del handle
    ratio = used["nf4"] / used["fp16"]
    print(f"SmolVLM-256M VRAM: fp16 {used['fp16'] / 2**20:.0f} MB, nf4 {used['nf4'] / 2**20:.0f} MB, "
          f"ratio 4-bit/fp16: {ratio:.2f}; answers {answers}")
    assert "red" in answers["nf4"].lower()
    assert ratio < 0.8


# ---- in a real browser ----------------------------------------------------------------------------

@pytest.mark.browser
def test_browser_example_ask_stream_and_stop(app_server):
    """Click an example, ask, watch the answer stream, press Stop: the model is released."""
    import time

    from playwright.sync_api import expect, sync_playwright

    url, server_manager, _ = app_server
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", headless=True,
                                             args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        try:
            page = browser.new_page()
            page.goto(url)
            page.get_by_text("What color is the square?").first.click()
            expect(page.locator("#vqa-question textarea")).to_have_value("What color is the square?")
            expect(page.locator("#vqa-image img")).to_be_visible()
            page.get_by_text("Generation settings").click()
            for elem_id, value in (("vqa-max-new-tokens", "1024"), ("vqa-temperature", "1")):
                box = page.locator(f"#{elem_id} input[type=number]")
                box.fill(value)
                box.press("Enter")
            page.locator("#vqa-ask").click()
            try:
                expect(page.locator("#vqa-chat .bot").first).to_contain_text(re.compile(r"\S"), timeout=60_000)
            except AssertionError:
                page.screenshot(path="/tmp/vqa-fail.png", full_page=True)
                print("TOASTS", page.locator(".toast-body").all_inner_texts())
                raise
            page.locator("#vqa-stop").click()
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and (generate_threads() or any(
                    entry["pinned"] for entry in server_manager.snapshot())):
                time.sleep(0.1)
            assert generate_threads() == []
            assert all(not entry["pinned"] for entry in server_manager.snapshot())
            expect(page.locator("#vqa-chat .user").first).to_contain_text("What color is the square?")
        finally:
            browser.close()
