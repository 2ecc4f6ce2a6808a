"""Chat family on tiny-chat (512-token context): validation, context fitting, trimming, adapters, loading."""

from __future__ import annotations

import shutil
import threading
import time

import pytest
from conftest import MODELS_DIR
from helpers import save_lora

from models import adapters
from models.errors import Busy, InvalidRequest, TooLarge
from models.families import chat
from models.generation import GenerationParams
from models.limits import Limits

GREEDY = GenerationParams(max_new_tokens=8, temperature=0.0)


@pytest.fixture
def handle(manager):
    with manager.use("tiny-chat") as loaded:
        yield loaded


def exchanges(count: int) -> list[dict]:
    """``count`` short user/assistant exchanges, oldest first."""
    history = []
    for index in range(count):
        history += [{"role": "user", "content": f"question {index}"},
                    {"role": "assistant", "content": f"answer {index}"}]
    return history


def kept_messages(handle, inputs) -> str:
    return handle.tokenizer.decode(inputs["input_ids"][0])


def test_max_new_tokens_beyond_the_context_is_lowered_with_a_notice(handle):
    notices = []
    messages = [{"role": "user", "content": "Hello there"}]
    text = list(chat.reply(handle, messages, GenerationParams(max_new_tokens=600, temperature=0.0), notices=notices))
    assert text, "no reply streamed"
    inputs, params = chat.encode(handle, messages, GenerationParams(max_new_tokens=600))
    assert params.max_new_tokens == 512 - inputs["input_ids"].shape[-1] > 0
    assert notices == [f"Max new tokens lowered to {params.max_new_tokens} to fit the 512-token context."]


def test_one_left_out_message_is_counted_and_told(handle):
    notices = []
    messages = [{"role": "user", "content": "word " * 300}, {"role": "user", "content": "And now?"}]
    inputs, params = chat.encode(handle, messages, GenerationParams(max_new_tokens=16), notices=notices)
    assert notices == ["Left out 1 earlier message to fit the 512-token context."]
    assert "word" not in kept_messages(handle, inputs) and params.max_new_tokens == 16


def test_oldest_exchanges_are_left_out_whole_and_the_newest_kept(handle):
    notices = []
    messages = [{"role": "system", "content": "Be brief."}, *exchanges(60), {"role": "user", "content": "Last?"}]
    inputs, _ = chat.encode(handle, messages, GenerationParams(max_new_tokens=16), notices=notices)
    prompt = kept_messages(handle, inputs)
    kept = prompt.count("question ") + prompt.count("answer ")
    assert kept % 2 == 0 and 0 < kept < 120  # whole exchanges only
    assert notices == [f"Left out {120 - kept} earlier messages to fit the 512-token context."]
    assert "Be brief." in prompt and "question 59" in prompt and "answer 59" in prompt and "Last?" in prompt
    assert f"question {60 - kept // 2}" in prompt and f"answer {59 - kept // 2}" not in prompt
    assert 512 - 16 - 30 < inputs["input_ids"].shape[-1] <= 512 - 16  # filled up to less than an exchange


def test_ten_thousand_turns_are_trimmed_in_linear_time(handle):
    messages = [{"role": "system", "content": "Be brief."}, *exchanges(5000), {"role": "user", "content": "Last?"}]
    notices = []
    started = time.perf_counter()
    inputs, _ = chat.encode(handle, messages, GenerationParams(max_new_tokens=64), notices=notices)
    seconds = time.perf_counter() - started
    print(f"10 000 history turns validated and trimmed in {seconds:.3f} s")
    assert seconds < 10, f"trimming 10 000 turns took {seconds:.1f} s"
    assert inputs["input_ids"].shape[-1] <= 512 - 64 and "question 4999" in kept_messages(handle, inputs)
    assert notices and notices[0].startswith("Left out 9,9")


def test_a_short_estimate_is_corrected_by_a_bounded_number_of_renders(handle, monkeypatch):
    """If the template adds more than estimated, more exchanges go, with at most a few more renders."""
    renders = []
    real_apply = chat._apply_template
    monkeypatch.setattr(chat, "_template_tokens_per_message", lambda *args: 0.0)  # the template seems free
    monkeypatch.setattr(chat, "_apply_template", lambda h, messages: renders.append(1) or real_apply(h, messages))
    messages = [*exchanges(300), {"role": "user", "content": "Last?"}]
    notices = []
    inputs, _ = chat.encode(handle, messages, GenerationParams(max_new_tokens=16), notices=notices)
    assert inputs["input_ids"].shape[-1] <= 512 - 16
    assert len(renders) <= 2 + chat.MAX_RECHECKS + 1  # bare + probe, the estimate, the re-checks
    assert notices and notices[0].startswith("Left out ")


def test_message_longer_than_the_context_is_refused_clearly(handle):
    with pytest.raises(TooLarge, match=r"The message takes \d+ tokens; tiny-chat reads at most 512 tokens") as info:
        chat.encode(handle, [{"role": "user", "content": "word " * 400}], GenerationParams(max_new_tokens=600))
    assert "-" not in str(info.value).split("tokens")[0]


@pytest.mark.parametrize("messages, error, match", [
    ("hello", InvalidRequest, "messages must be a non-empty list"),
    ([], InvalidRequest, "messages must be a non-empty list"),
    ([{"role": "assistant", "content": "Hi"}], InvalidRequest, "The last message must be the user's"),
    ([{"role": "system", "content": "Be brief."}], InvalidRequest, "The last message must be the user's"),
    ([{"role": "user", "content": "   "}], InvalidRequest, "non-empty user message"),
    ([{"role": "user", "content": "Hi"}, {"role": "system", "content": "Late"}, {"role": "user", "content": "Q"}],
     InvalidRequest, r"history message 1 must be \{'role': user \| assistant"),
    ([{"role": "user", "content": 5}, {"role": "user", "content": "Q"}], InvalidRequest,
     "history message 0 must be text"),
    ([{"role": "user", "content": "x" * 21}], TooLarge, "message is 21 characters; the limit is 20"),
    ([*exchanges(2), {"role": "user", "content": "Q"}], TooLarge, "history has 4 messages; the limit is 3"),
])
def test_conversation_is_checked_by_the_shared_validator(messages, error, match):
    with pytest.raises(error, match=match):
        chat.check_conversation(messages, Limits(history_turns=3, text_chars=20))


def test_clean_conversation_keeps_the_system_prompt_first():
    clean = chat.check_conversation([{"role": "system", "content": " Be brief. "}, {"role": "user", "content": "Hi "}])
    assert clean == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]


def make_chat_adapter(settings, name: str = "chat-lora"):
    """A LoRA on tiny-chat with random, non-zero B, so that it changes the greedy reply."""
    return save_lora(MODELS_DIR / "tiny-chat", settings.adapters_dir, name, "tiny-chat",
                     ["q_proj", "v_proj", "o_proj"], alpha=64)


def test_adapter_is_switched_under_the_handle_lock_for_the_whole_reply(handle, settings):
    folder = make_chat_adapter(settings)
    messages = [{"role": "user", "content": "Tell me something"}]
    adapters.activate(handle.model, None)  # no adapter loaded yet: nothing to switch off, no error
    assert adapters.loaded_adapters(handle.model) == []
    base = list(chat.reply(handle, messages, GREEDY))[-1]
    stream = chat.reply(handle, messages, GREEDY, adapter_folder=folder)
    pieces = [next(stream)]
    assert handle.lock.locked(), "the adapter could be switched by another call mid-reply"
    pieces += list(stream)
    tuned = pieces[-1]
    assert not handle.lock.locked()
    assert tuned != base and adapters.loaded_adapters(handle.model) == ["chat-lora"]
    assert list(chat.reply(handle, messages, GREEDY))[-1] == base  # adapter_folder=None: the base model again


def test_a_second_reply_waits_for_the_lock_then_reports_busy(handle, monkeypatch):
    monkeypatch.setattr(chat, "BUSY_TIMEOUT", 0.2)
    messages = [{"role": "user", "content": "Hi"}]
    with handle.lock:  # another reply in progress
        with pytest.raises(Busy, match="tiny-chat is busy"):
            next(chat.reply(handle, messages, GREEDY))
    assert list(chat.reply(handle, messages, GREEDY))


def test_model_without_a_chat_template_is_refused_before_its_weights_are_read(tmp_path, catalog):
    from models.quantization import Precision

    folder = tmp_path / "no-template"
    shutil.copytree(MODELS_DIR / "tiny-chat", folder)
    (folder / "chat_template.jinja").unlink()
    (folder / "model.safetensors").unlink()  # reading the weights would fail with another error
    with pytest.raises(InvalidRequest, match="tiny-chat has no chat template; it is not an instruct/chat model"):
        chat.load(catalog.get("tiny-chat"), str(folder), Precision("fp32", "cpu"))


def test_tiny_chat_in_4bit_replies_on_cpu(manager):
    from bitsandbytes.nn import Linear4bit

    with manager.use("tiny-chat", "nf4") as loaded:
        assert any(isinstance(module, Linear4bit) for module in loaded.model.modules())
        assert list(chat.reply(loaded, [{"role": "user", "content": "Hi"}], GREEDY))


def test_replies_from_two_threads_are_serialized(handle):
    results, errors = [], []

    def worker():
        try:
            results.append(list(chat.reply(handle, [{"role": "user", "content": "Hi"}], GREEDY))[-1])
        except Exception as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == [] and len(results) == 2 and results[0] == results[1]
