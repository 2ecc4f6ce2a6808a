"""The fine-tune tab in Debian's Chromium (Playwright), on its own app with an empty cache folder.

1. The form and the YAML are two views of one config: a form edit rewrites the YAML, typed YAML fills
   in the form, broken YAML is reported and overwrites nothing, a preset applies when it is chosen,
   and Enter in a single-line box keeps what was typed.
2. Runs are a list built from disk: a run started from typed YAML trains exactly those settings, its
   row survives a page reload, and it trains more steps and resumes from a chosen checkpoint; a run
   still training is followed and stopped after a reload, then resumed.
"""

from __future__ import annotations

import json
import os
import re

import pytest
from conftest import MODELS_DIR, free_port

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-quic",
                 "--no-first-run", "--disable-component-update", "--disable-sync"]
TRAINING_MS = 150_000
# tests/test_finetune_train.py's FAST settings, as a user types them into the YAML box
FAST_YAML = """base_model: tiny-chat
adapter_name: browser-run
lora_r: 8
lora_alpha: 16
lora_dropout: 0.0
learning_rate: 1e-2
batch_size: 4
scheduler: constant
gradient_checkpointing: false
val_fraction: 0.0
max_length: 128
max_steps: 2
"""
ROWS = [{"prompt": "What is the capital of France?", "response": "Paris is the capital of France."},
        {"prompt": "Say hello.", "response": "Hello! How can I help you today?"},
        {"prompt": "What does LoRA train?", "response": "Small adapter matrices."},
        {"prompt": "Name a shape.", "response": "A green triangle."}]

pytestmark = [pytest.mark.browser, pytest.mark.slow]


@pytest.fixture(scope="module")
def ft_app(tmp_path_factory):
    """An app of its own (an empty runs folder), launched like conftest's app_server: (url, settings)."""
    import app

    cache = tmp_path_factory.mktemp("ft-app-cache")
    port = free_port()
    os.environ["WORKBENCH_MODELS_DIR"] = str(MODELS_DIR)
    settings, manager, demo = app.create(["--offline", "--cache-dir", str(cache), "--port", str(port),
                                          "--device", "cpu", "--memory-budget", "4"])
    demo.queue(default_concurrency_limit=4)
    demo.launch(prevent_thread_lock=True, quiet=True, **app.launch_kwargs(settings, manager))
    yield f"http://127.0.0.1:{port}/", settings
    demo.close()
    manager.unload_all()


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(ft_app, browser):
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.set_default_timeout(30_000)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(f"{error} {error.stack}"))
    open_tab(page, ft_app[0])
    yield page
    page.close()
    assert errors == [], f"JavaScript errors on the page: {errors}"


def open_tab(page, url: str | None = None) -> None:
    if url:
        page.goto(url)
    page.get_by_role("heading", name="Multimodal Workbench").wait_for()
    page.get_by_role("tab", name="Fine-tune (QLoRA)").click()
    page.locator("#ft-start").wait_for(state="visible")


def yaml_text(page) -> str:
    return page.locator("#ft-config .cm-content").inner_text()


def wait_yaml(page, words: str, timeout: int = 10_000) -> None:
    page.wait_for_function("(words) => document.querySelector('#ft-config .cm-content')?.innerText.includes(words)",
                           arg=words, timeout=timeout)


def type_yaml(page, text: str) -> None:
    """Replace the YAML box's text as a user would: select all, then type (paste) the new text."""
    editor = page.locator("#ft-config .cm-content")
    editor.click()
    page.keyboard.press("Control+a")
    page.keyboard.insert_text(text)


def field(page, name: str):
    return page.locator(f"#ft-{name} input, #ft-{name} textarea").first


def wait_field(page, name: str, value: str, timeout: int = 10_000, prefix: bool = False) -> None:
    """Wait until the box ``#ft-name`` shows ``value`` (a dropdown shows its choice's label: ``prefix``)."""
    page.wait_for_function(
        "([name, value, prefix]) => { const box = document.querySelector(`#ft-${name} input, #ft-${name} textarea`);"
        " return prefix ? box?.value.startsWith(value) : box?.value === value; }",
        arg=[name, value, prefix], timeout=timeout)


def set_field(page, name: str, value) -> None:
    box = field(page, name)
    box.fill(str(value))
    box.press("Tab")


def pick(page, elem_id: str, option: str) -> None:
    """Choose ``option`` in the Gradio dropdown ``#elem_id`` as a user does: open it, click the option."""
    page.locator(f"#{elem_id} input").click()
    page.get_by_role("option", name=re.compile(re.escape(option))).first.click()


def open_yaml(page) -> None:
    page.get_by_text("Config as YAML").click()
    page.locator("#ft-config .cm-content").wait_for(state="visible")


def message(page) -> str:
    return page.locator("#ft-message").inner_text()


def wait_message(page, pattern: str, timeout: int = TRAINING_MS) -> str:
    page.wait_for_function("(pattern) => new RegExp(pattern).test(document.querySelector('#ft-message').innerText)",
                           arg=pattern, timeout=timeout)
    return message(page)


def run_row(page, run_id: str) -> list[str]:
    """The cells of a run's row in the runs table: run, state, steps, loss, adapter, base model, started."""
    cells = [line.strip() for line in page.locator("#ft-runs").inner_text().splitlines() if line.strip()]
    return cells[cells.index(run_id):][:7] if run_id in cells else []


def wait_row(page, run_id: str, state: str, steps: str) -> list[str]:
    page.wait_for_function("([id, state, steps]) => { const cells = document.querySelector('#ft-runs').innerText"
                           ".split('\\n').map(c => c.trim()).filter(Boolean); const at = cells.indexOf(id);"
                           " return at >= 0 && cells[at + 1] === state && cells[at + 2] === steps; }",
                           arg=[run_id, state, steps], timeout=30_000)
    return run_row(page, run_id)


def launches(settings, run_id: str) -> list[dict]:
    log = settings.runs_dir / run_id / "log.jsonl"
    return [r for r in map(json.loads, log.read_text().splitlines()) if r["event"] == "launch"]


# ---- 1. one config, two views ------------------------------------------------------------------------

def test_the_form_and_the_yaml_follow_each_other_and_presets_apply_when_chosen(page):
    assert page.get_by_role("button", name="Apply preset").count() == 0
    open_yaml(page)

    # a form edit shows in the YAML at once
    set_field(page, "max-steps", 7)
    wait_yaml(page, "max_steps: 7")

    # typed YAML fills in the form (1e-3 is a number, as in YAML 1.2)
    type_yaml(page, yaml_text(page).replace("max_steps: 7", "max_steps: 9").replace("learning_rate: 0.0002",
                                                                                    "learning_rate: 1e-3"))
    wait_field(page, "max-steps", "9")
    wait_field(page, "learning-rate", "0.001")
    assert page.locator("#ft-config-note").inner_text().strip() == ""

    # broken YAML says why under the box, and the form keeps its values
    type_yaml(page, "max_steps: [\n")
    page.wait_for_function("() => document.querySelector('#ft-config-note').innerText.includes('Not applied')")
    assert "not valid YAML" in page.locator("#ft-config-note").inner_text()
    page.wait_for_timeout(500)
    assert field(page, "max-steps").input_value() == "9" and field(page, "learning-rate").input_value() == "0.001"
    # a valid YAML with a wrong value is not applied either
    type_yaml(page, "max_steps: 4\nlora_dropout: 2\n")
    page.wait_for_function("() => document.querySelector('#ft-config-note').innerText.includes('lora_dropout')")
    assert field(page, "max-steps").input_value() == "9"

    # the next form edit rewrites the YAML from the form
    set_field(page, "max-steps", 3)
    wait_yaml(page, "max_steps: 3")
    assert "learning_rate: 0.001" in yaml_text(page) and "[" not in yaml_text(page)
    page.wait_for_function("() => !document.querySelector('#ft-config-note').innerText.trim()")

    # a preset applies when chosen: form and YAML at once
    pick(page, "ft-preset", "quick test (tiny models)")
    wait_field(page, "max-steps", "30")
    wait_yaml(page, "max_steps: 30")
    assert "learning_rate: 0.01" in yaml_text(page) and field(page, "learning-rate").input_value() == "0.01"
    # a setting that leaves the preset clears the menu; the preset's other settings stay
    set_field(page, "max-steps", 5)
    wait_yaml(page, "max_steps: 5")
    page.wait_for_function("() => document.querySelector('#ft-preset input').value === ''")
    assert field(page, "learning-rate").input_value() == "0.01"

    # Enter in a single-line box keeps what was typed, and counts as an edit
    box = field(page, "adapter-name")
    box.fill("enter-kept")
    box.press("Enter")
    steps = field(page, "max-steps")
    steps.fill("6")
    steps.press("Enter")
    set_field(page, "seed", 7)  # its YAML comes back after whatever the two Enters started
    wait_yaml(page, "seed: 7")
    page.wait_for_timeout(500)
    assert box.input_value() == "enter-kept" and steps.input_value() == "6"
    assert "adapter_name: enter-kept" in yaml_text(page) and "max_steps: 6" in yaml_text(page)


# ---- 2. runs are a list ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    path = tmp_path_factory.mktemp("ft-data") / "memorise.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS), encoding="utf-8")
    return path


def start_from_yaml(page, dataset, text: str) -> str:
    page.locator("#ft-dataset input[type=file]").set_input_files(str(dataset))
    page.wait_for_timeout(500)
    open_yaml(page)
    type_yaml(page, text)
    wait_field(page, "base-model", "tiny-chat —", prefix=True)
    wait_field(page, "max-steps", re.search(r"max_steps: (\d+)", text).group(1))
    before = field(page, "run-id").input_value()  # the run shown until now (an earlier test's), or ""
    page.locator("#ft-start").click()
    page.wait_for_function("(before) => { const value = document.querySelector('#ft-run-id input').value; "
                           "return value !== before && /^\\d{8}-\\d{6}-[0-9a-f]{6}/.test(value); }", arg=before)
    return field(page, "run-id").input_value().split(" ")[0]


def test_runs_survive_a_reload_train_more_and_resume_from_a_chosen_checkpoint(page, ft_app, dataset):
    url, settings = ft_app
    run_id = start_from_yaml(page, dataset, FAST_YAML)
    done = wait_message(page, f"^Run {run_id} (completed|failed|stopped)")
    assert f"Run {run_id} completed 2 steps" in done and "Adapter saved" in done, done
    # it trained what the YAML said, through the form
    config = (settings.runs_dir / run_id / "config.yaml").read_text()
    assert "learning_rate: 0.01" in config and "lora_r: 8" in config and "adapter_name: browser-run" in config
    assert launches(settings, run_id)[0]["unloaded"] == []
    wait_row(page, run_id, "completed", "2 / 2")

    # a reload keeps the list: it is built from the runs folder
    open_tab(page, url)
    row = wait_row(page, run_id, "completed", "2 / 2")
    assert row[4:6] == ["browser-run (saved)", "tiny-chat"], row
    assert field(page, "run-id").input_value().startswith(run_id)
    assert f"Run {run_id} completed" in message(page)

    # train more: two steps past the end, from the last checkpoint
    set_field(page, "more-steps", 2)
    page.locator("#ft-train-more").click()
    wait_message(page, f"^Run {run_id} is ", timeout=30_000)
    done = wait_message(page, f"^Run {run_id} (completed 4 steps|failed)")
    assert "completed 4 steps" in done, done + "\n" + page.locator("textarea").last.input_value()
    wait_row(page, run_id, "completed", "4 / 4")
    assert launches(settings, run_id)[-1] | {"time": 0} == launches(settings, run_id)[-1] | {
        "time": 0, "kind": "train_more", "checkpoint": "checkpoint-2", "from_step": 2, "total_steps": 4}

    # resume from an earlier checkpoint, chosen in the menu: steps 3 and 4 are trained again
    pick(page, "ft-checkpoint", "checkpoint-2")
    page.locator("#ft-resume").click()
    wait_message(page, f"^Run {run_id} is ", timeout=30_000)
    done = wait_message(page, f"^Run {run_id} (completed 4 steps|failed)")
    assert "completed 4 steps" in done, done
    last = launches(settings, run_id)[-1]
    assert (last["kind"], last["checkpoint"], last["from_step"], last["total_steps"]) == (
        "resume", "checkpoint-2", 2, 4)
    steps = [r["step"] for r in map(json.loads, (settings.runs_dir / run_id / "log.jsonl").read_text().splitlines())
             if r["event"] == "step"]
    assert steps == [1, 2, 3, 4, 3, 4], steps


def test_a_run_in_progress_is_followed_and_stopped_after_a_reload_then_resumed(page, ft_app, dataset):
    url, settings = ft_app
    run_id = start_from_yaml(page, dataset, FAST_YAML.replace("max_steps: 2", "max_steps: 100000")
                             .replace("browser-run", "long-run"))
    page.wait_for_function("() => /step [1-9]\\d* \\//.test(document.querySelector('#ft-progress').innerText)",
                           timeout=TRAINING_MS)

    open_tab(page, url)  # a reload while it trains: the tab finds it and follows it
    page.wait_for_function("(id) => document.querySelector('#ft-run-id input').value.startsWith(id)", arg=run_id)
    wait_message(page, f"^Run {run_id} is running", timeout=30_000)
    assert "No model was unloaded" in message(page)
    first = int(re.search(r"step (\d+)", page.locator("#ft-progress").inner_text()).group(1))
    page.wait_for_function("(first) => +/step (\\d+)/.exec(document.querySelector('#ft-progress').innerText)[1] "
                           "> first", arg=first, timeout=30_000)
    assert page.locator("#ft-stop").is_enabled() and not page.locator("#ft-train-more").is_enabled()
    page.locator("#ft-stop").click()
    stopped = wait_message(page, f"^Run {run_id} (stopped at step|failed|completed)")
    assert f"Run {run_id} stopped at step" in stopped, stopped
    at = int(re.search(r"stopped at step (\d+)", stopped).group(1))
    wait_row(page, run_id, "stopped", f"{at} / 100000")

    # resumed from its latest checkpoint: it goes on from the step it stopped at, then is stopped again
    assert page.locator("#ft-resume").is_enabled()
    page.locator("#ft-resume").click()
    wait_message(page, f"^Run {run_id} is (starting|running)", timeout=30_000)
    page.wait_for_function("(at) => +/step (\\d+)/.exec(document.querySelector('#ft-progress').innerText)[1] > at",
                           arg=at, timeout=TRAINING_MS)
    assert "ETA" in page.locator("#ft-progress").inner_text()
    page.locator("#ft-stop").click()
    wait_message(page, f"^Run {run_id} (stopped at step|failed|completed)")
    last = launches(settings, run_id)[-1]
    assert (last["kind"], last["checkpoint"], last["from_step"]) == ("resume", f"checkpoint-{at}", at)

    # a run another app left in the folder appears on Refresh; clicking its row shows it
    old = "20240101-000000-abcdef"
    (settings.runs_dir / old / "checkpoints").mkdir(parents=True)
    (settings.runs_dir / old / "config.yaml").write_text("base_model: tiny-chat\nadapter_name: from-disk\n")
    (settings.runs_dir / old / "log.jsonl").write_text(
        json.dumps({"event": "step", "step": 5, "total_steps": 5, "loss": 0.5}) + "\n"
        + json.dumps({"event": "done", "state": "completed", "adapter": "/elsewhere/from-disk"}) + "\n")
    page.locator("#ft-refresh-runs").click()
    assert wait_row(page, old, "completed", "5 / 5")[4] == "from-disk (saved)"
    page.locator("#ft-runs").get_by_text(old, exact=True).click()
    page.wait_for_function("(id) => document.querySelector('#ft-run-id input').value.startsWith(id)", arg=old)
    assert wait_message(page, f"^Run {old} completed").startswith(f"Run {old} completed 5 steps")
    assert not page.locator("#ft-train-more").is_enabled() and not page.locator("#ft-resume").is_enabled()
