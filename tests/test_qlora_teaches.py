"""QLoRA teaches a real model: smollm2-135m learns the invented facts of the example dataset.

finetune/examples/invented-facts.jsonl asks 30 questions about things that do not exist. Before
training, smollm2-135m answers at most 10 % of them (greedy, through the app's chat path). Then an
NF4 QLoRA run is started the way /finetune_start and the tab's Start button start one
(``TrainingRunner.start`` with the YAML that the tab's "Load example" button puts in the form), in
its own process. After it, the adapter, chosen by name in a ``ChatRequest`` as the voice tab does,
answers at least 80 % of the same questions, and the tab's "Try the adapter" shows the base model's
wrong answer next to the adapter's right one. Run with ``-s`` to see the scores and the training time.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from finetune.examples import INVENTED_FACTS, is_right
from finetune.runner import ACTIVE_STATES

# The made-up word comes first in a right answer; a base model that knew it would say it early too.
MAX_NEW_TOKENS = 32
TRAINING_TIMEOUT = 600


def answers(manager, settings, adapter: str) -> list[tuple[str, str, str]]:
    """(question, expected word, reply) for every question of the example, greedy, through the chat path."""
    from models.voice import ChatRequest, chat_reply

    results = []
    for question, expected in INVENTED_FACTS.questions():
        request = ChatRequest.build(manager.catalog, settings, message=question, model=INVENTED_FACTS.base_model,
                                    adapter=adapter, temperature=0, max_new_tokens=MAX_NEW_TOKENS)
        reply = ""
        for reply in chat_reply(manager, request):  # noqa: B007 - the whole reply is the last one
            continue
        results.append((question, expected, reply))
    return results


def share_right(results) -> float:
    return sum(is_right(reply, expected) for _, expected, reply in results) / len(results)


def listing(results) -> str:
    return "\n".join(f"{'ok  ' if is_right(reply, expected) else 'MISS'} {expected:<12} <- {reply!r}"
                     for _, expected, reply in results)


def wait_until_finished(runner, run_id) -> dict:
    deadline = time.monotonic() + TRAINING_TIMEOUT
    while time.monotonic() < deadline:
        status = runner.status(run_id)
        if status["state"] not in ACTIVE_STATES:
            return status
        time.sleep(0.5)
    raise AssertionError(f"training did not finish in {TRAINING_TIMEOUT} s; last status: {json.dumps(status)[:2000]}")


def test_the_example_dataset_and_its_preset_are_what_the_tab_offers(runner):
    from gradio.utils import get_upload_folder

    from tabs.finetune import copy_example, example_config, upload_path

    questions = INVENTED_FACTS.questions()
    assert 20 <= len(questions) <= 40
    words = [expected for _, expected in questions]
    assert len(set(map(str.lower, words))) == len(words) and all(" " not in word for word in words)
    config = example_config(INVENTED_FACTS).validate(runner.catalog)
    assert (config.base_model, config.quantization, config.val_fraction) == ("smollm2-135m", "nf4", 0.0)

    # the button's copy is an upload that Validate and Start accept; every row fits max_length whole
    copy = Path(copy_example(INVENTED_FACTS))
    try:
        assert copy.read_bytes() == INVENTED_FACTS.path.read_bytes()
        report = runner.validate(upload_path(str(copy)), config.base_model, config.max_length,
                                 config.val_fraction).report
    finally:
        copy.unlink()
        copy.parent.rmdir()
    assert Path(get_upload_folder()).resolve() in copy.resolve().parents
    assert report["ok"] and report["format"] == "instruction" and report["valid_rows"] == len(questions), report
    assert report["tokens"]["truncated_rows"] == 0, report["tokens"]


def test_try_the_adapter_refuses_what_it_cannot_compare(manager, settings):
    from tabs.finetune import compare_answers

    with pytest.raises(ValueError, match="Image VQA"):
        compare_answers(manager, settings, "What is it?", "tiny-vlm", "some-adapter")
    with pytest.raises(ValueError, match="Choose an adapter"):
        compare_answers(manager, settings, "What is it?", "smollm2-135m", "none")
    with pytest.raises(ValueError, match="Unknown adapter"):
        compare_answers(manager, settings, "What is it?", "smollm2-135m", "never-trained")
    assert manager.snapshot() == [], "a refused comparison loads no model"


@pytest.mark.slow
def test_an_nf4_qlora_run_teaches_smollm2_the_invented_facts(runner, manager, settings):
    from tabs.finetune import compare_answers, config_yaml, example_config

    model, adapter = INVENTED_FACTS.base_model, INVENTED_FACTS.adapter_name

    # 1. Before: the base model cannot know invented facts
    started = time.monotonic()
    before = answers(manager, settings, "none")
    before_seconds = time.monotonic() - started

    # 2. Train in the tab's own training process, with the config the example button fills in
    config = example_config(INVENTED_FACTS)
    started = time.monotonic()
    run_id = runner.start(str(INVENTED_FACTS.path), config_yaml(config))
    launched = runner.status(run_id)
    # Only what must go is unloaded (on the CPU: what does not fit beside training), and the run says so
    assert manager.is_loaded(model) == (model not in launched["unloaded"]), launched["memory_note"]
    assert launched["memory_note"].startswith("Unloaded" if launched["unloaded"] else "No model was unloaded")
    status = wait_until_finished(runner, run_id)
    training_seconds = time.monotonic() - started
    assert status["state"] == "completed", status["message"] + "\n" + "\n".join(status["log_tail"])
    assert status["metrics"]["train_rows"] == len(before) and status["step"] == status["total"] > 0

    # 3. After: the adapter, chosen by name as the voice tab chooses it
    started = time.monotonic()
    after = answers(manager, settings, adapter)
    after_seconds = time.monotonic() - started
    print(f"\nbefore training: {share_right(before):.0%} right ({before_seconds:.0f} s to ask)\n{listing(before)}")
    print(f"NF4 QLoRA run: {training_seconds:.1f} s ({status['step']} steps, trainer {status['metrics']['runtime_s']} s"
          f", final loss {status['loss']:.4f})")
    print(f"after training: {share_right(after):.0%} right ({after_seconds:.0f} s to ask)\n{listing(after)}")
    assert share_right(before) <= 0.10, "the base model already knows the invented facts:\n" + listing(before)
    assert share_right(after) >= 0.80, "the adapter did not learn the facts:\n" + listing(after)

    # 4. The tab's "Try the adapter": both answers side by side, the base wrong and the adapter right
    for question, expected in INVENTED_FACTS.questions():
        base_answer, tuned_answer = compare_answers(manager, settings, question, model, adapter)
        if not is_right(base_answer, expected) and is_right(tuned_answer, expected):
            print(f"side by side: {question!r}\n  base:    {base_answer!r}\n  adapter: {tuned_answer!r}")
            break
    else:
        pytest.fail("Try the adapter showed no question that the base model gets wrong and the adapter right")
