"""Browser walk through every tab on the offline models, in Debian's Chromium driven by Playwright.

Asks a question about an example image, generates an image, sends a typed message and an uploaded
audio file (the question, spoken by the offline Piper voice) to the voice assistant, validates a
dataset and runs a two-step training, then unloads everything from the Models tab. Each step asserts
on what the page shows and takes a screenshot of its tab; with WORKBENCH_SCREENSHOTS=1 they are
saved into docs/screenshots/<tab>.png (used by the README), otherwise into the system's temporary
folder, so a test run leaves the repository unchanged.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from pathlib import Path

import pytest
from conftest import ROOT

SCREENSHOTS = (ROOT / "docs" / "screenshots" if os.environ.get("WORKBENCH_SCREENSHOTS") == "1"
               else Path(tempfile.gettempdir()) / "workbench-screenshots")
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-quic",
                 "--no-first-run", "--disable-component-update", "--disable-sync"]
MODEL_STEP_MS = 90_000  # a model step on 2 shared cores, first load included
TRAINING_MS = 150_000

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def open_tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()
    page.wait_for_timeout(300)


def screenshot(page, name: str) -> None:
    """Save the tab as a 256-colour PNG: the random-weight images would make full-colour ones large."""
    from PIL import Image

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path))
    with Image.open(path) as image:
        small = image.convert("RGB").quantize(colors=256)
    small.save(path, optimize=True)


def chat_messages(page, chat_id: str, role: str):
    return page.locator(f"#{chat_id} [data-testid='{role}']")


def pick(page, label: str, value: str) -> None:
    """Choose ``value`` in the visible Gradio dropdown labelled ``label``."""
    box = page.get_by_label(label, exact=True).locator("visible=true").first
    box.click()
    box.fill(value)
    page.get_by_role("option", name=value).first.click()  # the label contains the id (a substring match)
    page.wait_for_timeout(200)


def set_number(page, label: str, value) -> None:
    box = page.get_by_label(label, exact=True).locator("visible=true").first
    box.fill(str(value))
    box.press("Tab")
    page.wait_for_timeout(200)


# ---- steps, one per tab ------------------------------------------------------------------------


def walk_vqa(page) -> None:
    open_tab(page, "Image VQA")
    page.locator("[data-testid='dataset-cell-0-0']").first.click()  # the first example: image and question
    question = page.locator("#vqa-question textarea")
    page.wait_for_function("() => document.querySelector('#vqa-question textarea').value.length > 0")
    asked = question.input_value()
    page.locator("#vqa-image img").first.wait_for(timeout=10_000)
    page.locator("#vqa-ask").click()
    chat_messages(page, "vqa-chat", "bot").first.wait_for(timeout=MODEL_STEP_MS)
    page.wait_for_selector("#vqa-ask:not([disabled])")
    page.wait_for_function("() => !document.querySelector('#vqa-chat .generating, #vqa-chat .pending')",
                           timeout=MODEL_STEP_MS)
    assert asked[:20] in chat_messages(page, "vqa-chat", "user").first.inner_text()
    assert chat_messages(page, "vqa-chat", "bot").first.inner_text().strip(), "no answer was shown"
    assert "fp32" in page.locator("#vqa-precision").inner_text()  # the precision chosen for the CPU
    screenshot(page, "vqa")


def walk_text_to_image(page) -> None:
    open_tab(page, "Text to image")
    page.locator("#t2i-prompt textarea").fill("a red square on a white background, watercolor")
    page.locator("#t2i-generate").click()
    page.locator("#t2i-gallery img").first.wait_for(timeout=MODEL_STEP_MS)
    page.wait_for_function("() => document.querySelector('#t2i-info').innerText.includes('seed')",
                           timeout=MODEL_STEP_MS)
    info = page.locator("#t2i-info").inner_text()
    assert "tiny-sd" in info and "seed" in info
    assert page.locator("#t2i-gallery img").first.get_attribute("src")
    screenshot(page, "text_to_image")


def walk_voice(page, question_wav) -> None:
    """The offline defaults are real: whisper-tiny.en hears, smollm2-135m answers, piper-joe speaks."""
    open_tab(page, "Voice assistant")
    page.get_by_text("Reply", exact=True).click()  # the accordion: greedy decoding keeps the walk deterministic
    set_number(page, "number input for Temperature", 0)
    page.get_by_label("…or type a message").fill("What is the capital of France?")
    page.get_by_role("button", name="Send", exact=True).click()
    chat_messages(page, "voice-chat", "bot").first.wait_for(timeout=MODEL_STEP_MS)
    page.locator("#voice-reply-audio audio").first.wait_for(timeout=MODEL_STEP_MS, state="attached")
    assert "capital of France" in chat_messages(page, "voice-chat", "user").first.inner_text()
    assert "Paris" in chat_messages(page, "voice-chat", "bot").first.inner_text()
    assert "First audio" in page.locator("#voice-timings").inner_text()
    if page.locator("#voice-reply-stream").is_visible():  # ffmpeg present: the reply was streamed as spoken
        page.locator("#voice-reply-stream audio").first.wait_for(state="attached")

    # The same question in a new conversation, spoken by the offline voice into a file and uploaded
    page.get_by_role("button", name="Clear conversation").click()
    page.wait_for_function("() => !document.querySelector('#voice-chat [data-testid=\"bot\"]')")
    bots_before = 0
    audio_block = page.locator(".block", has_text="Speak or upload audio").last
    audio_block.get_by_role("button", name="Upload file").click()
    audio_block.locator("input[type=file]").set_input_files(str(question_wav))
    audio_block.locator("audio").first.wait_for(state="attached")
    page.get_by_role("button", name="Send", exact=True).click()
    page.wait_for_function(
        f"() => document.querySelectorAll('#voice-chat [data-testid=\"bot\"]').length > {bots_before}",
        timeout=MODEL_STEP_MS)
    audio_block.locator("audio").first.wait_for(state="detached", timeout=MODEL_STEP_MS)  # cleared when the turn ends
    transcript = page.locator("#voice-transcript textarea").input_value()
    assert "capital of france" in transcript.lower(), transcript
    assert transcript.strip()[:20] in chat_messages(page, "voice-chat", "user").last.inner_text()
    assert "Paris" in chat_messages(page, "voice-chat", "bot").last.inner_text()
    screenshot(page, "voice")


def walk_finetune(page, dataset_path) -> None:
    open_tab(page, "Fine-tune (QLoRA)")
    page.locator("#ft-dataset input[type=file]").set_input_files(str(dataset_path))
    page.wait_for_timeout(500)
    page.locator("#ft-validate").click()
    page.wait_for_function("() => document.querySelector('#ft-report').innerText.includes('valid_rows')",
                           timeout=60_000)
    report = re.sub(r"\s+", "", page.locator("#ft-report").inner_text())  # the JSON view puts tokens on lines
    assert '"ok":true' in report and '"format":"instruction"' in report and '"valid_rows":6' in report
    pick(page, "Base model", "tiny-chat")
    set_number(page, "Max steps (0 = use epochs)", 2)
    page.get_by_text("Config as YAML").click()  # the run starts from this YAML, which the form keeps in step
    page.wait_for_function("() => document.querySelector('#ft-config')?.innerText.includes('max_steps: 2')",
                           timeout=10_000)
    assert "base_model: tiny-chat" in page.locator("#ft-config").inner_text()
    page.locator("#ft-start").click()
    page.wait_for_function("() => document.querySelector('#ft-run-id textarea, #ft-run-id input').value",
                           timeout=30_000)
    page.wait_for_function("() => /completed|failed|stopped/.test(document.querySelector('#ft-message').innerText)",
                           timeout=TRAINING_MS)
    message = page.locator("#ft-message").inner_text()
    assert "completed" in message, message
    assert "Adapter saved" in message
    # the loss curve is drawn: a line in the train colour (#6366f1) through the logged steps, not empty axes
    page.wait_for_function("""() => Array.from(document.querySelectorAll('#ft-loss path')).some(
        p => /L/.test(p.getAttribute('d') || '') && getComputedStyle(p).stroke === 'rgb(99, 102, 241)')""",
                           timeout=15_000)
    screenshot(page, "finetune")


def walk_models(page, manager) -> None:
    if not manager.snapshot():  # fine-tuning frees the chat and VQA models before it trains: ask again
        open_tab(page, "Image VQA")
        page.locator("[data-testid='dataset-cell-1-0']").first.click()
        page.locator("#vqa-ask").click()
        deadline = time.monotonic() + MODEL_STEP_MS / 1000
        while not manager.snapshot() and time.monotonic() < deadline:
            page.wait_for_timeout(250)
    open_tab(page, "Models")
    page.wait_for_function("() => document.querySelector('#models-table').innerText.includes('tiny-')",
                           timeout=15_000)
    loaded = [m["id"] for m in manager.snapshot()]
    assert loaded, "the earlier steps should have left models loaded"
    table = page.locator("#models-table").inner_text()
    assert all(model_id in table for model_id in loaded)
    screenshot(page, "models")
    page.locator("#unload-all").click()
    page.wait_for_function("() => document.querySelector('#models-status').innerText.includes('Unloaded')",
                           timeout=30_000)
    assert re.search(r"Unloaded \d+ model", page.locator("#models-status").inner_text())
    page.wait_for_function("() => !document.querySelector('#models-table').innerText.includes('tiny-')",
                           timeout=15_000)
    assert manager.snapshot() == [] and manager.used_bytes() == 0


# ---- the walk --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser_page():
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.set_default_timeout(30_000)
        yield page
        browser.close()


@pytest.fixture(scope="module")
def walk_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("walk")
    dataset = folder / "capitals.jsonl"
    rows = [{"instruction": f"What is the capital of {country}?", "output": capital}
            for country, capital in [("France", "Paris"), ("Italy", "Rome"), ("Spain", "Madrid"),
                                     ("Japan", "Tokyo"), ("China", "Beijing"), ("Peru", "Lima")]]
    dataset.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return dataset


@pytest.fixture(scope="module")
def opened(app_server, browser_page):
    url, manager, _ = app_server
    manager.unload_all()
    errors: list[str] = []
    browser_page.on("pageerror", lambda error: errors.append(str(error)))
    browser_page.goto(url)
    browser_page.get_by_role("heading", name="Multimodal Workbench").wait_for()
    assert "Offline mode" in browser_page.locator("#offline-banner").inner_text()
    yield browser_page, manager, errors
    assert errors == [], f"JavaScript errors on the page: {errors}"


def test_walk_vqa(opened):
    walk_vqa(opened[0])


def test_walk_text_to_image(opened):
    walk_text_to_image(opened[0])


def test_walk_voice(opened, tmp_path):
    from helpers import speak

    from models.audio import write_wav

    (rate, samples), _ = speak(opened[1], opened[1].settings, "What is the capital of France?", model="piper-joe")
    question = write_wav(tmp_path / "question.wav", samples / 32767, rate)
    walk_voice(opened[0], question)


def test_walk_finetune(opened, walk_files):
    walk_finetune(opened[0], walk_files)


def test_walk_models_unload_all(opened):
    walk_models(opened[0], opened[1])
