"""What a first-time user meets in the browser: clean messages, keys, current menus, readable themes.

Each test drives Debian's Chromium through Playwright on the assembled offline app and asserts on
what the page shows: a file that is not an image is refused by the image box itself with the
core's message; Enter sends; Stop says what it did; an adapter saved while the page is open is
offered in the VQA and voice tabs without a reload, with Compare in both; "Speak the answer" plays
the VQA answer; the offline banner's text is readable (WCAG contrast ≥ 4.5, from the rendered
colours) in light and dark mode.
"""

from __future__ import annotations

import pytest
from conftest import MODELS_DIR
from helpers import save_lora
from test_browser import CHROMIUM, CHROMIUM_ARGS, MODEL_STEP_MS, chat_messages, open_tab, pick, screenshot

pytestmark = [pytest.mark.browser, pytest.mark.slow]

BANNER_COLOURS = """() => {
  const banner = document.querySelector('#offline-banner');
  const text = banner.querySelector('p') || banner;
  let node = text, background = 'rgba(0, 0, 0, 0)';
  while (node && /rgba\\(.*, 0\\)$|transparent/.test(background)) {
    background = getComputedStyle(node).backgroundColor;
    node = node.parentElement;
  }
  return {color: getComputedStyle(text).color, background};
}"""


def _channels(css: str) -> list[float]:
    values = css[css.index("(") + 1:css.index(")")].replace("/", ",").split(",")
    return [float(v) for v in values[:3]]


def contrast_ratio(foreground: str, background: str) -> float:
    """The WCAG 2 contrast ratio of two CSS rgb() colours."""
    def luminance(css: str) -> float:
        linear = [c / 255 / 12.92 if c / 255 <= 0.03928 else ((c / 255 + 0.055) / 1.055) ** 2.4
                  for c in _channels(css)]
        return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]

    lighter, darker = sorted((luminance(foreground), luminance(background)), reverse=True)
    return (lighter + 0.05) / (darker + 0.05)


def test_contrast_ratio_matches_known_pairs():
    assert contrast_ratio("rgb(0, 0, 0)", "rgb(255, 255, 255)") == pytest.approx(21.0)
    assert contrast_ratio("rgb(119, 119, 119)", "rgb(255, 255, 255)") == pytest.approx(4.48, abs=0.01)


@pytest.fixture(scope="module")
def chromium():
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM,
                                             args=CHROMIUM_ARGS + ["--autoplay-policy=no-user-gesture-required"])
        yield browser
        browser.close()


@pytest.fixture
def page(app_server, chromium):
    """A fresh page on the app (light mode unless a test goes to ?__theme=dark); no JavaScript errors allowed."""
    context = chromium.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(30_000)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(app_server[0])
    page.get_by_role("heading", name="Multimodal Workbench").wait_for()
    yield page
    context.close()
    assert errors == [], f"JavaScript errors on the page: {errors}"


def popup_texts(page) -> str:
    return " ".join(page.locator("[data-testid='toast-body']").all_inner_texts())


@pytest.mark.parametrize("theme", ["light", "dark"])
def test_offline_banner_is_readable_in_both_themes(app_server, chromium, theme):
    context = chromium.new_context(viewport={"width": 1280, "height": 900}, color_scheme=theme)
    page = context.new_page()
    page.goto(f"{app_server[0]}?__theme={theme}")
    page.locator("#offline-banner").wait_for()
    is_dark = page.evaluate("() => document.body.classList.contains('dark')")
    assert is_dark == (theme == "dark")
    colours = page.evaluate(BANNER_COLOURS)
    ratio = contrast_ratio(colours["color"], colours["background"])
    assert ratio >= 4.5, f"banner text {colours['color']} on {colours['background']}: contrast {ratio:.2f} in {theme}"
    # The memory meter's track stays darker than white in dark mode (it is drawn in the Models tab)
    open_tab(page, "Models")
    track = page.evaluate("() => { const m = document.querySelector('.wb-meter');"
                          " return m ? getComputedStyle(m).backgroundColor : null; }")
    if track is not None and theme == "dark":
        assert contrast_ratio(track, "rgb(255, 255, 255)") > 3, f"the meter's track is {track} in dark mode"
    open_tab(page, "Image VQA")
    screenshot(page, f"theme_{theme}")
    context.close()


def test_not_an_image_is_refused_by_the_image_box(page, tmp_path):
    open_tab(page, "Image VQA")
    fake = tmp_path / "holiday.png"
    fake.write_text("these are notes, not a picture")
    page.locator("#vqa-image input[type=file]").set_input_files(str(fake))
    page.wait_for_function("() => /not an image file/.test(Array.from(document.querySelectorAll("
                           "'[data-testid=\"toast-body\"]')).map(t => t.innerText).join(' '))", timeout=15_000)
    shown = popup_texts(page)
    assert "'holiday.png' is not an image file this app can read" in shown
    for leak in ("index 0", "/tmp/", "UnidentifiedImageError", "Traceback"):
        assert leak not in shown, shown
    page.wait_for_function("() => !document.querySelector('#vqa-image img')")  # no broken thumbnail left
    # Asking now says what is missing, what the user typed stays, and the last attempt's pop-up goes
    question = page.locator("#vqa-question textarea")
    question.fill("What colour is the sky?")
    assert "not an image file" in popup_texts(page)
    question.press("Enter")
    page.wait_for_function("() => /image first/.test(Array.from(document.querySelectorAll("
                           "'[data-testid=\"toast-body\"]')).map(t => t.innerText).join(' '))", timeout=15_000)
    assert "Upload, paste or capture an image first" in popup_texts(page)
    page.wait_for_function("() => !/not an image file/.test(Array.from(document.querySelectorAll("
                           "'[data-testid=\"toast-body\"]')).map(t => t.innerText).join(' '))", timeout=3_000)
    assert question.input_value() == "What colour is the sky?"


def test_enter_asks_stop_speaks_and_speak_the_answer_plays(page, app_server):
    open_tab(page, "Image VQA")
    page.locator("#vqa-stop").click()
    page.wait_for_function("() => /Nothing is running/.test(Array.from(document.querySelectorAll("
                           "'[data-testid=\"toast-body\"]')).map(t => t.innerText).join(' '))", timeout=10_000)
    page.locator("[data-testid='dataset-cell-0-0']").first.click()  # an example: image and question
    page.locator("#vqa-image img").first.wait_for(timeout=10_000)
    question = page.locator("#vqa-question textarea")
    page.wait_for_function("() => document.querySelector('#vqa-question textarea').value.length > 0")
    asked = question.input_value()
    question.press("Enter")  # Enter asks; the box is single-purpose
    chat_messages(page, "vqa-chat", "bot").first.wait_for(timeout=MODEL_STEP_MS)
    page.wait_for_function("() => document.querySelector('#vqa-question textarea').value === ''",
                           timeout=MODEL_STEP_MS)  # cleared once the answer is complete
    assert asked[:20] in chat_messages(page, "vqa-chat", "user").first.inner_text()
    # Shift+Enter adds a line instead
    question.type("first line")
    question.press("Shift+Enter")
    question.type("second line")
    assert question.input_value() == "first line\nsecond line"
    assert chat_messages(page, "vqa-chat", "user").count() == 1
    question.fill("")
    # The answer, spoken by the chosen voice
    pick(page, "Voice", "piper-joe")
    page.locator("#vqa-speak").click()
    # It plays on arrival: the player's button turns to Pause and its clock runs
    page.locator("#vqa-spoken .play-pause-button[aria-label='Pause']").wait_for(timeout=MODEL_STEP_MS)
    page.wait_for_function("() => document.querySelector('#vqa-spoken #time')?.innerText !== '0:00'", timeout=10_000)
    assert page.locator("#vqa-spoken #duration").inner_text() != "0:00"
    assert "piper-joe" in {entry["id"] for entry in app_server[1].snapshot()}


def save_real_lora(settings, base_model: str, name: str) -> None:
    """A real PEFT LoRA on a tiny model's weights, saved as the fine-tune tab saves one."""
    save_lora(MODELS_DIR / base_model, settings.adapters_dir, name, base_model, r".*\.(q_proj|v_proj)",
              vision=base_model == "tiny-vlm")


def test_an_adapter_saved_while_the_page_is_open_is_offered_in_both_tabs(page, app_server):
    settings = app_server[2]
    open_tab(page, "Image VQA")
    open_tab(page, "Voice assistant")
    save_real_lora(settings, "tiny-vlm", "walk-vqa-lora")
    save_real_lora(settings, "tiny-chat", "walk-chat-lora")
    try:
        open_tab(page, "Image VQA")  # showing the tab reads the adapters folder again
        page.locator("#vqa-adapter input").click()
        options = page.get_by_role("option").all_inner_texts()
        assert "walk-vqa-lora" in options and "walk-chat-lora" not in options, options
        page.keyboard.press("Escape")

        open_tab(page, "Voice assistant")
        page.get_by_text("Reply", exact=True).click()
        pick(page, "Chat model", "tiny-chat")  # the menu follows the chat model
        page.locator("#voice-adapter input").click()
        options = page.get_by_role("option").all_inner_texts()
        assert "walk-chat-lora" in options and "walk-vqa-lora" not in options, options
        page.get_by_role("option", name="walk-chat-lora").click()
        page.locator("#voice-compare input").check()
        text = page.locator("#voice-text textarea")
        text.fill("Say something")
        text.press("Enter")  # Enter sends
        chat_messages(page, "voice-chat", "bot").first.wait_for(timeout=MODEL_STEP_MS)
        chat_messages(page, "voice-base-chat", "bot").first.wait_for(timeout=MODEL_STEP_MS)
        assert page.locator("#voice-base-chat").is_visible()
    finally:
        import shutil

        for name in ("walk-vqa-lora", "walk-chat-lora"):
            shutil.rmtree(settings.adapters_dir / name, ignore_errors=True)


def slider_max(page, label: str) -> float:
    return float(page.get_by_label(f"number input for {label}", exact=True).locator("visible=true").first
                 .get_attribute("max"))


def test_ctrl_enter_generates_within_the_models_limits_and_the_image_goes_to_vqa(page):
    open_tab(page, "Text to image")
    # Nothing generated yet: the hand-over says what is missing
    page.locator("#t2i-ask-vqa").click()
    page.wait_for_function("() => /Generate an image first/.test(Array.from(document.querySelectorAll("
                           "'[data-testid=\"toast-body\"]')).map(t => t.innerText).join(' '))", timeout=10_000)
    # The sliders offer what the chosen model accepts, and follow the model
    assert (slider_max(page, "Width"), slider_max(page, "Steps")) == (512, 50)  # tiny-sd's limits
    pick(page, "Model", "stabilityai/sdxl-turbo")
    page.wait_for_function("() => document.querySelector('input[aria-label=\"number input for Width\"]')"
                           ".getAttribute('max') !== '512'")
    assert slider_max(page, "Width") > 512
    pick(page, "Model", "tiny-sd")
    page.wait_for_function("() => document.querySelector('input[aria-label=\"number input for Width\"]')"
                           ".getAttribute('max') === '512'")
    # Generate is on the first screen, and Ctrl+Enter in the prompt presses it
    assert page.locator("#t2i-generate").bounding_box()["y"] < 900 - 40
    prompt = page.locator("#t2i-prompt textarea")
    prompt.fill("a red square on a white background")
    prompt.press("Enter")  # Enter adds a line in this multi-line prompt
    assert page.locator("#t2i-gallery img").count() == 0
    prompt.press("Control+Enter")
    page.locator("#t2i-gallery img").first.wait_for(timeout=MODEL_STEP_MS)
    page.wait_for_function("() => /seed \\d+/.test(document.querySelector('#t2i-info').innerText)",
                           timeout=MODEL_STEP_MS)
    # "Ask about this image" opens the VQA tab with that image, ready for a question
    page.locator("#t2i-ask-vqa").click()
    page.get_by_role("tab", name="Image VQA", selected=True).wait_for(timeout=10_000)
    page.locator("#vqa-image img").first.wait_for(timeout=10_000)
    question = page.locator("#vqa-question textarea")
    question.fill("What is in this picture?")
    question.press("Enter")
    chat_messages(page, "vqa-chat", "bot").first.wait_for(timeout=MODEL_STEP_MS)
    assert "What is in this picture?" in chat_messages(page, "vqa-chat", "user").first.inner_text()
    screenshot(page, "handoff_vqa")
