"""A cancelled call really stops: generation ends, the model is unpinned, and the next call waits for it."""

from __future__ import annotations

import contextlib
import threading
import time

import psutil
import pytest

pytestmark = pytest.mark.slow

STORY = "Write a very long story about a brave little dragon who learns to fly, with many chapters."


def generate_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == "generate" and thread.is_alive()]


@contextlib.contextmanager
def recorded_uses(manager):
    """Record (event, model id, monotonic time) for every manager.use in the app while the block runs."""
    events: list[tuple[str, str, float]] = []
    original = manager.use

    @contextlib.contextmanager
    def use(model_id, *args, **kwargs):
        with original(model_id, *args, **kwargs) as handle:
            events.append(("enter", model_id, time.monotonic()))
            try:
                yield handle
            finally:
                events.append(("exit", model_id, time.monotonic()))

    manager.use = use
    try:
        yield events
    finally:
        manager.use = original


def wait_until(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_cancelled_chat_stops_unpins_and_the_next_call_waits(client, app_server):
    _, manager, _ = app_server
    with recorded_uses(manager) as events:
        job = client.submit(STORY, [], "smollm2-135m", "", 2000, 0.0, "none", api_name="/chat")
        assert wait_until(lambda: len(job.outputs()) >= 3, 120), "the chat never started streaming"
        job.cancel()
        second = client.submit("Hi", [], "tiny-chat", "", 8, 0.0, "none", api_name="/chat")
        # The cancelled generation ends within a few seconds: no generate thread, nothing pinned, CPU idle
        assert wait_until(lambda: not generate_threads() and not any(m["pinned"] for m in manager.snapshot()), 10)
        stopped_at = time.monotonic()
        second.result(timeout=120)
    process = psutil.Process()
    before = process.cpu_times()
    time.sleep(1.0)
    after = process.cpu_times()
    assert (after.user + after.system) - (before.user + before.system) < 0.5, "a core is still busy after Stop"
    first_exit = next(t for kind, model, t in events if kind == "exit" and model == "smollm2-135m")
    second_enter = next(t for kind, model, t in events if kind == "enter" and model == "tiny-chat")
    assert first_exit <= second_enter, "the second call ran beside the cancelled one"
    assert first_exit <= stopped_at + 0.5
    smollm = manager.snapshot()
    assert not any(m["pinned"] for m in smollm)


def test_time_cap_stops_a_call_and_says_why(manager, settings):
    """--max-call-seconds: generation stops as if Stop had been pressed, and the user is told why."""
    import dataclasses

    from models import limits, voice

    request = voice.ChatRequest.build(manager.catalog, settings, message=STORY, model="smollm2-135m",
                                      max_new_tokens=2000, temperature=0.0, system_prompt="")
    warm = dataclasses.replace(request, reply=dataclasses.replace(
        request.reply, params=dataclasses.replace(request.reply.params, max_new_tokens=1)))
    list(voice.chat_reply(manager, warm))  # loaded first: the load is not part of the cap being tested
    call = limits.Call(1.5)
    notices: list[str] = []
    started = time.monotonic()
    with limits.active(call):
        reply = list(voice.chat_reply(manager, request, notices=notices))[-1]
    call.end()
    assert time.monotonic() - started < 6, "generation ran past the cap"
    assert reply and any("one model call may run for at most 1.5 s" in note for note in notices), notices
    assert not any(m["pinned"] for m in manager.snapshot())


def test_the_next_call_waits_until_an_abandoned_call_has_really_ended(manager):
    """Gradio frees its queue slot when a client cancels, while the handler may still be inside a step;
    model_call's lock makes the next model call wait until that work has ended and the generator is closed."""
    from models import limits
    from tabs.common import model_call

    timeline: list[tuple[str, float]] = []
    stops: list[bool] = []

    @model_call(manager)
    def long_handler():
        yield "first"
        time.sleep(1.0)  # a long step: a model call that does not yield for a while
        stops.append(limits.current().stop.is_set())
        yield "second"

    @model_call(manager)
    def next_handler():
        timeline.append(("next call starts", time.monotonic()))
        return "ok"

    abandoned = long_handler()
    assert next(abandoned) == "first"
    step = threading.Thread(target=lambda: next(abandoned))
    step.start()  # the client has gone; the step goes on
    time.sleep(0.1)
    waiter = threading.Thread(target=next_handler)
    waiter.start()
    step.join()
    timeline.append(("abandoned step ended", time.monotonic()))
    abandoned.close()  # what Gradio does once the running step has returned
    waiter.join(5)
    assert [name for name, _ in sorted(timeline, key=lambda item: item[1])] == [
        "abandoned step ended", "next call starts"]
    assert stops == [False], "the call's stop flag was set before anyone stopped it"
    assert not manager.call_lock.locked()
