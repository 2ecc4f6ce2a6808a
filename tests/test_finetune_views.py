"""The fine-tune tab's plain functions, without a browser or training.

The form and its YAML are two views of one RunConfig (round trip, typed YAML, broken YAML keeps the
form, presets apply when chosen, Start builds one config and refuses when the views disagree); what
the runs list, its menus and buttons show for a run; which models training unloads and what it says;
a resumed run's progress without a stale ETA.
"""

from __future__ import annotations

import dataclasses

import pytest

from finetune.config import PRESETS, RunConfig, matching_preset, parse_training_text, with_preset
from finetune.examples import INVENTED_FACTS
from finetune.runner import TrainingRunner, plan_unloads, summarize, training_need_bytes, unload_note
from models.errors import InvalidRequest
from models.limits import Limits
from models.manager import ModelBusyError
from tabs import finetune as tab

LIMITS = Limits()
CONFIGS = {
    "defaults": RunConfig(),
    "targets": RunConfig(base_model="tiny-vlm", target_modules=["q_proj", "v_proj"], max_steps=7, epochs=2.5,
                         learning_rate=3e-5, gradient_checkpointing=False, adapter_name="vlm-1"),
    "example": tab.example_config(INVENTED_FACTS),
    **{name: with_preset(RunConfig(adapter_name="p"), name) for name in PRESETS},
}


def form(config: RunConfig) -> list:
    """The form's values as the browser sends them: gr.Number sends floats."""
    return [float(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in tab.config_to_form(config)]


def at(values: list, name: str):
    return values[tab.FORM_FIELDS.index(name)]


def with_field(values: list, name: str, value) -> list:
    values = list(values)
    values[tab.FORM_FIELDS.index(name)] = value
    return values


# ---- form <-> YAML ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_the_form_and_its_yaml_round_trip(name, catalog):
    config = CONFIGS[name]
    synced = tab.form_edited(form(config), catalog)
    assert synced.note == "" and synced.yaml == tab.config_yaml(config)
    back = tab.yaml_edited(synced.yaml, catalog, LIMITS)
    assert back.note == "" and back.form == tab.config_to_form(config)
    assert tab.form_to_config(*back.form) == config
    assert synced.preset == back.preset == matching_preset(config)
    assert tab.config_from_views(form(config), synced.yaml, catalog, LIMITS) == config


def test_typed_yaml_fills_in_the_form_and_keys_left_out_take_their_defaults(catalog):
    synced = tab.yaml_edited("base_model: tiny-chat\nlearning_rate: 1e-3\nmax_steps: 9\n"
                             "target_modules: [q_proj, v_proj]\n", catalog, LIMITS)
    assert synced.note == "" and synced.preset is None
    expected = dataclasses.replace(RunConfig(), learning_rate=0.001, max_steps=9, target_modules=["q_proj", "v_proj"])
    assert synced.form == tab.config_to_form(expected)
    assert at(synced.form, "target_modules") == "q_proj, v_proj" and at(synced.form, "lora_r") == RunConfig().lora_r
    # YAML 1.2 numbers: 1e-4 is a float, not the string PyYAML's YAML 1.1 rules make of it
    assert parse_training_text("learning_rate: 2e-4\nepochs: 1E1", LIMITS)[0].learning_rate == 2e-4
    assert parse_training_text("learning_rate: 2e-4\nepochs: 1E1", LIMITS)[0].epochs == 10.0


@pytest.mark.parametrize("text, words", [
    ("max_steps: [\n", "not valid YAML: line 2, column 1: while parsing a flow node, expected the node content, "
                      "but found '&lt;stream end&gt;'"),  # one line, and what PyYAML quotes is shown, not taken as HTML
    ("max_steps: 5\nlora_r: 0\n", "lora_r must be"),
    ("max_steps: 5\nlearning_rat: 0.1\n", "unknown config keys ['learning_rat']"),
    ("- max_steps\n- 5\n", "mapping of settings"),
    ("max_steps: &n 5\nsave_steps: *n\n", "anchor or alias (&amp;name or \\*name)"),
    ("base_model: tiny-sd\n", "fine-tuning supports chat and VQA models"),
    ("adapter_name: ../up\n", "adapter_name"),
    ("x" * 70_000, "limit"),
])
def test_yaml_that_is_not_a_valid_config_says_why_and_leaves_the_form(text, words, catalog):
    synced = tab.yaml_edited(text, catalog, LIMITS)
    assert synced.form is None and synced.preset is None
    assert synced.note.startswith("⚠️ **Not applied to the form:**") and words in synced.note, synced.note
    assert len(synced.note) < 600


def test_path_keys_in_yaml_are_named_and_not_applied(catalog):
    synced = tab.yaml_edited("max_steps: 3\ndataset: /data/train.jsonl\nrun_dir: /tmp/x\n", catalog, LIMITS)
    assert at(synced.form, "max_steps") == 3
    assert "Ignored dataset, run_dir: the app fills in paths" in synced.note
    assert "/data" not in tab.config_yaml(tab.form_to_config(*synced.form))


def test_a_half_typed_number_leaves_the_yaml_and_a_wrong_one_is_named(catalog):
    values = form(RunConfig())
    assert tab.form_edited(with_field(values, "max_steps", float("nan")), catalog) is None
    assert tab.form_edited(with_field(values, "lora_r", float("inf")), catalog) is None
    synced = tab.form_edited(with_field(values, "lora_r", 0.0), catalog)
    assert "lora_r: 0" in synced.yaml and "lora_r must be ≥ 1" in synced.note and "Start refuses" in synced.note


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_a_preset_applies_when_chosen_and_is_shown_while_the_config_matches_it(name, catalog):
    values = form(CONFIGS["targets"])
    applied = tab.preset_applied(name, values)
    config = tab.form_to_config(*applied)
    assert all(getattr(config, key) == value for key, value in PRESETS[name].items())
    for kept in ("base_model", "adapter_name", "target_modules", "quantization"):  # the user's, not the preset's
        assert at(applied, kept) == at(values, kept)
    assert tab.form_edited(applied, catalog).preset == name
    changed = with_field(applied, "learning_rate", PRESETS[name]["learning_rate"] * 3)
    assert tab.form_edited(changed, catalog).preset is None
    with pytest.raises(InvalidRequest, match="Unknown preset"):
        tab.preset_applied("fastest", values)


def test_start_runs_the_form_and_refuses_when_the_yaml_says_something_else(catalog):
    values = form(with_preset(RunConfig(base_model="tiny-chat", adapter_name="mine"), "quick test (tiny models)"))
    text = tab.config_yaml(tab.form_to_config(*values))
    config = tab.config_from_views(values, text, catalog, LIMITS)
    assert config.adapter_name == "mine" and config.max_steps == 30 and isinstance(config.max_steps, int)
    # a YAML edit that has not reached the form yet
    with pytest.raises(InvalidRequest, match=r"The form and the YAML differ \(max_steps\)"):
        tab.config_from_views(values, text.replace("max_steps: 30", "max_steps: 31"), catalog, LIMITS)
    # a form edit whose YAML has not come back yet
    with pytest.raises(InvalidRequest, match=r"differ \(lora_r\)"):
        tab.config_from_views(with_field(values, "lora_r", 4.0), text, catalog, LIMITS)
    with pytest.raises(InvalidRequest, match="The YAML does not match the form: config is not valid YAML"):
        tab.config_from_views(values, text + "oops: [\n", catalog, LIMITS)
    with pytest.raises(InvalidRequest, match="lora_r must be"):
        tab.config_from_views(with_field(values, "lora_r", 0.0), text.replace("lora_r: 8", "lora_r: 0"), catalog,
                              LIMITS)


# ---- the runs list ---------------------------------------------------------------------------------

def status(state="completed", step=4, total=4, checkpoints=(2, 4), **extra) -> dict:
    return {"run_id": "20250131-235959-a1b2c3", "state": state, "step": step, "total": total, "loss": 0.5,
            "adapter": "/cache/adapters/mine" if state in ("completed", "stopped") else None,
            "checkpoint": f"/runs/checkpoint-{step}", "message": "", "memory_note": "", "eta_s": 12.0,
            "tokens_per_s": 100.0, "checkpoints": [{"name": f"checkpoint-{s}", "step": s} for s in checkpoints],
            **extra}


def test_run_rows_menus_and_the_run_to_show():
    runs = [{"run_id": "20250201-000000-bbbbbb", "state": "running", "step": 3, "total": 0, "loss": None,
             "adapter_name": "b", "adapter": None, "base_model": "tiny-chat", "started": "2025-02-01 00:00"},
            {"run_id": "20250131-235959-a1b2c3", "state": "completed", "step": 4, "total": 4, "loss": 0.51234,
             "adapter_name": "a", "adapter": "/x/a", "base_model": "tiny-vlm", "started": "2025-01-31 23:59"}]
    assert tab.run_rows(runs) == [
        ["20250201-000000-bbbbbb", "running", "3 / ?", "", "b", "tiny-chat", "2025-02-01 00:00"],
        ["20250131-235959-a1b2c3", "completed", "4 / 4", "0.5123", "a (saved)", "tiny-vlm", "2025-01-31 23:59"]]
    assert tab.run_choices(runs)[1] == ("20250131-235959-a1b2c3 · a", "20250131-235959-a1b2c3")
    ids = [run["run_id"] for run in runs]
    assert tab.pick_run(runs, ids[1], ids[0]) == ids[1]  # the user's choice while it exists
    assert tab.pick_run(runs, "20240101-000000-cccccc", ids[1]) == ids[1]  # else the run training
    assert tab.pick_run(runs, None, None) == ids[0]  # else the newest
    assert tab.pick_run([], None, None) is None


def test_checkpoint_menu_offers_latest_then_each_checkpoint():
    choices, value = tab.checkpoint_choices(status(checkpoints=(2, 4, 6)))
    assert choices == [("latest (checkpoint-6)", "latest"), ("checkpoint-6", "checkpoint-6"),
                       ("checkpoint-4", "checkpoint-4"), ("checkpoint-2", "checkpoint-2")]
    assert value == "latest"
    assert tab.checkpoint_choices(status(checkpoints=(2, 4)), "checkpoint-2")[1] == "checkpoint-2"
    assert tab.checkpoint_choices(status(checkpoints=(2, 4)), "checkpoint-9")[1] == "latest"
    assert tab.checkpoint_choices(status(checkpoints=())) == ([], None)
    assert tab.checkpoint_choices(None) == ([], None)


@pytest.mark.parametrize("run, actions", [
    (None, (False, False, False)),
    (status("running", 2, 4), (True, False, False)),
    (status("stopping", 2, 4), (True, False, False)),
    (status("completed", 4, 4, (4,)), (False, False, True)),  # all steps done: only train more
    (status("completed", 4, 4, (2, 4)), (False, True, True)),  # or train again from checkpoint-2
    (status("stopped", 3, 10, (3,)), (False, True, True)),
    (status("failed", 1, 10, ()), (False, False, False)),  # nothing to resume from
])
def test_the_run_buttons_that_apply(run, actions):
    got = tab.run_actions(run)
    assert (got["stop"], got["resume"], got["train_more"]) == actions


def test_status_messages_say_what_comes_next_and_running_ones_name_no_outcome():
    assert tab.status_message(status()).startswith("Run 20250131-235959-a1b2c3 completed 4 steps. Adapter saved")
    assert "**Train more** continues it" in tab.status_message(status())
    assert "completed 1 step." in tab.status_message(status(step=1, total=1, checkpoints=(1,)))
    assert "**Resume from checkpoint** continues it to step 10" in tab.status_message(status("stopped", 3, 10))
    note = "No model was unloaded: training on the CPU takes about 1.00 GB of the 4.00 GB memory budget."
    assert tab.status_message(status(memory_note=note)).endswith(f"from its last checkpoint.\n\n{note}")
    failed = tab.status_message(status("failed", message="out of memory"))
    assert "failed: out of memory. **Resume from checkpoint**" in failed
    running = tab.status_message(status("running", memory_note="Unloaded tiny-vlm from the GPU: training needs it."))
    assert running == "Run 20250131-235959-a1b2c3 is running.\n\nUnloaded tiny-vlm from the GPU: training needs it."
    for state in ("starting", "running", "stopping", "finishing"):  # the browser walk waits for these words
        note = unload_note("cpu", [], [], 10**9, 4 * 1024**3)
        text = tab.status_message(status(state, memory_note=note))
        assert not any(word in text for word in ("completed", "failed", "stopped")), text
    assert "ETA 12 s" in tab.progress_html(status("running", 2, 4))
    assert "ETA" not in tab.progress_html(status()) and "tokens/s" not in tab.progress_html(status())


def test_a_resumed_run_shows_its_checkpoint_step_not_a_stale_eta():
    steps = [{"event": "step", "step": s, "total_steps": 4, "loss": 2.0 - s / 10, "eta_s": 4.0 - s, "tokens_per_s": 50}
             for s in (1, 2, 3, 4)]
    first = [{"event": "launch", "from_step": 0, "total_steps": 4}, {"event": "process"},
             {"event": "start", "step": 0, "total_steps": 4}, *steps,
             {"event": "done", "state": "completed", "adapter": "/a", "checkpoint": "/c/checkpoint-4"}]
    done = summarize(first, 0)
    assert (done["state"], done["step"], done["eta_s"], len(done["loss_history"])) == ("completed", 4, 0.0, 4)
    # train again from checkpoint-2 up to 6: before the new process logs a step, nothing of the old ETA shows
    relaunch = [*first, {"event": "launch", "from_step": 2, "total_steps": 6, "checkpoint": "checkpoint-2",
                         "unloaded": ["tiny-vlm"], "note": "Unloaded tiny-vlm."}]
    resumed = summarize(relaunch, None)
    assert (resumed["state"], resumed["step"], resumed["total"]) == ("starting", 2, 6)
    assert resumed["eta_s"] is None and resumed["tokens_per_s"] is None and resumed["adapter"] is None
    assert [p["step"] for p in resumed["loss_history"]] == [1, 2] and resumed["loss"] == pytest.approx(1.8)
    assert resumed["unloaded"] == ["tiny-vlm"] and resumed["memory_note"] == "Unloaded tiny-vlm."
    started = summarize([*relaunch, {"event": "process"}, {"event": "start", "step": 2, "total_steps": 6}], None)
    assert (started["state"], started["step"], started["eta_s"]) == ("running", 2, None)
    stepped = summarize([*relaunch, {"event": "process"}, {"event": "step", "step": 3, "total_steps": 6, "loss": 1.0,
                                                            "eta_s": 9.0, "tokens_per_s": 70}], None)
    assert (stepped["step"], stepped["eta_s"], stepped["tokens_per_s"]) == (3, 9.0, 70)
    assert [p["loss"] for p in stepped["loss_history"]] == [1.9, 1.8, 1.0]  # step 3 anew, the old 4 left out


# ---- which models training unloads --------------------------------------------------------------------

GB = 1024**3


def loaded(model_id, device="cpu", nbytes=GB, last_used=0.0, pinned=False) -> dict:
    return {"id": model_id, "device": device, "bytes": nbytes, "last_used": last_used, "pinned": pinned}


def test_on_a_gpu_training_unloads_the_models_on_it_and_names_those_in_use():
    models = [loaded("vlm", "cuda", last_used=2), loaded("chat", "cuda", pinned=True), loaded("whisper", "cpu")]
    assert plan_unloads(models, "cuda", budget=100 * GB, used=3 * GB, need=0) == (["vlm"], ["chat"])
    assert plan_unloads([loaded("whisper")], "cuda", 100 * GB, GB, 0) == ([], [])
    note = unload_note("cuda", ["vlm"], ["chat"], 0, 8 * GB)
    assert note == ("Unloaded vlm from the GPU: training needs its memory (it loads again on next use). "
                    "Kept chat: answering a request, so training may run short of memory.")
    assert unload_note("cuda", [], [], 0, 8 * GB) == "No model was on the GPU; none was unloaded."
    assert unload_note("mps", ["a", "b", "c"], [], 0, 8 * GB).startswith("Unloaded a, b and c from MPS:")


def test_on_the_cpu_training_unloads_only_what_the_budget_requires_least_recently_used_first():
    models = [loaded("newest", last_used=3), loaded("oldest", last_used=1), loaded("busy", last_used=0, pinned=True),
              loaded("middle", last_used=2), loaded("remote", nbytes=0, last_used=0)]
    assert plan_unloads(models, "cpu", budget=8 * GB, used=4 * GB, need=4 * GB) == ([], [])  # fits as it is
    assert plan_unloads(models, "cpu", budget=8 * GB, used=4 * GB, need=5 * GB) == (["oldest"], [])
    assert plan_unloads(models, "cpu", budget=8 * GB, used=4 * GB, need=6 * GB) == (["oldest", "middle"], [])
    # even with every idle model gone it does not fit: the models in use are named
    assert plan_unloads(models, "cpu", budget=8 * GB, used=4 * GB, need=9 * GB) == (
        ["oldest", "middle", "newest"], ["busy"])
    assert unload_note("cpu", [], [], GB, 4 * GB) == (
        "No model was unloaded: training on the CPU takes about 1.00 GB of the 4.00 GB memory budget, and that fits "
        "with what is loaded.")
    assert unload_note("cpu", ["oldest", "middle"], ["busy"], 6 * GB, 8 * GB) == (
        "Unloaded oldest and middle (least recently used) so that training fits in the budget: it takes about "
        "6.00 GB of the 8.00 GB memory budget. busy stays loaded (answering a request), over the budget.")


def test_the_cpu_estimate_grows_with_the_model_and_the_processes(catalog):
    tiny, small = catalog.get("tiny-chat"), catalog.get("smollm2-135m")
    # measured peaks on 2 CPU cores: 0.85 GB (tiny-chat), 1.74 GB (smollm2-135m in nf4); the estimate covers them
    assert 0.85 * 1e9 < training_need_bytes(tiny) < 1.2 * 1e9
    assert 1.74 * 1e9 < training_need_bytes(small) < 2.5 * 1e9
    assert training_need_bytes(small, processes=2) == 2 * training_need_bytes(small)


class FakeManager:
    """The manager calls the runner makes before a launch, with one model taken by a request meanwhile."""

    def __init__(self, catalog, device, models, budget, busy=()):
        self.catalog, self.device, self.budget, self.models, self.busy = catalog, device, budget, models, busy
        self.unloaded: list[str] = []

    def snapshot(self):
        return [dict(m) for m in self.models]

    def used_bytes(self):
        return sum(m["bytes"] for m in self.models)

    def unload(self, model_id):
        if model_id in self.busy:
            raise ModelBusyError(f"{model_id} is answering a request right now")
        self.unloaded.append(model_id)
        self.models = [m for m in self.models if m["id"] != model_id]
        return True


def test_the_runner_unloads_what_the_plan_says_and_reports_it(settings, catalog):
    manager = FakeManager(catalog, "cuda", [loaded("vlm", "cuda", last_used=1), loaded("chat", "cuda", last_used=2),
                                            loaded("asr", "cpu")], budget=8 * GB, busy=("chat",))
    freed = TrainingRunner(settings, manager)._make_room(RunConfig(base_model="tiny-chat"))
    assert manager.unloaded == ["vlm"] and freed["unloaded"] == ["vlm"] and freed["kept"] == ["chat"]
    assert freed["note"].startswith("Unloaded vlm from the GPU") and "Kept chat" in freed["note"]
    manager = FakeManager(catalog, "cpu", [loaded("vlm", last_used=1), loaded("chat", last_used=2)],
                          budget=int(2.5 * GB))  # both models (2 GB) and training (about 1 GB) do not fit
    freed = TrainingRunner(settings, manager)._make_room(RunConfig(base_model="tiny-chat"))
    assert manager.unloaded == ["vlm"] and freed["device"] == "cpu"
    assert TrainingRunner(settings, catalog=catalog)._make_room(RunConfig())["note"] == ""
