"""Fine-tune (QLoRA) tab: validate a dataset, configure a run, follow, stop, resume or extend it, try the adapter.

Training runs in its own process (finetune.train) driven by finetune.runner.TrainingRunner; this
module only turns widget values into plain values and back. ``_layout`` places the components;
``_wire_dataset``, ``_wire_example``, ``_wire_config``, ``_wire_runs``, ``_wire_try`` and ``_wire_api``
connect their events.

The run settings have one source of truth, the form; the YAML box is a second view of the same
``RunConfig``. A form edit rewrites the YAML at once; a YAML edit is parsed as it is typed and, when it
is a valid config, fills in the form (else its problem is shown under it and nothing is overwritten).
Start, Save and Show command build one config from the form, and refuse when the YAML says something
else (an edit still on its way to the other view).
"""

from __future__ import annotations

import atexit
from types import SimpleNamespace
from typing import NamedTuple

import gradio as gr

from finetune.config import (
    PRESETS,
    QUANTIZATIONS,
    SCHEDULERS,
    TRAINABLE_TASKS,
    RunConfig,
    command_help,
    matching_preset,
    parse_training_text,
    read_config_text,
    with_preset,
)
from finetune.examples import INVENTED_FACTS, ExampleDataset
from finetune.runner import ACTIVE_STATES, LATEST, TrainingRunner
from models import adapters
from models.checks import check_number
from models.errors import InvalidRequest, UserError
from tabs.common import GPU_QUEUE, model_call, user_errors

POLL_SECONDS = 2
LOSS_COLORS = {"train": "#6366f1", "eval": "#f59e0b"}
# Form fields in widget order; each one is a RunConfig attribute.
FORM_FIELDS = ("base_model", "adapter_name", "quantization", "lora_r", "lora_alpha", "lora_dropout",
               "target_modules", "learning_rate", "epochs", "max_steps", "batch_size", "grad_accum",
               "max_length", "warmup_steps", "scheduler", "seed", "gradient_checkpointing", "eval_steps",
               "save_steps", "val_fraction", "processes")
INTEGER_FIELDS = ("lora_r", "lora_alpha", "max_steps", "batch_size", "grad_accum", "max_length", "warmup_steps",
                  "seed", "eval_steps", "save_steps", "processes")
RUN_COLUMNS = ["run", "state", "steps", "loss", "adapter", "base model", "started"]
DEFAULT_MORE_STEPS = 50
# "Try the adapter": greedy answers, long enough for a sentence or two, short enough to come back quickly on a CPU.
TRY_MAX_NEW_TOKENS = 64


def upload_path(dataset) -> str | None:
    """A server path from what the UI or the API sends (a path, a FileData dict or object).

    Only files that were uploaded to Gradio are accepted: an API caller cannot name other server files.
    """
    from pathlib import Path

    from gradio.utils import get_upload_folder

    if dataset is None:
        return None
    path = dataset.get("path") if isinstance(dataset, dict) else getattr(dataset, "path", dataset)
    if not isinstance(path, str) or not path:
        raise InvalidRequest("dataset must be an uploaded .jsonl or .zip file")
    uploads = Path(get_upload_folder()).resolve()
    if uploads not in Path(path).resolve().parents:
        raise InvalidRequest("dataset must be a file uploaded to this app (use handle_file(...) with gradio_client)")
    return path


# ---- the form and its YAML: two views of one RunConfig ----------------------------------------------

def form_to_config(*values) -> RunConfig:
    """The config the form shows (not validated: a half-typed form still has a YAML view)."""
    raw = dict(zip(FORM_FIELDS, values, strict=True))
    targets = str(raw["target_modules"] or "").strip()
    raw["target_modules"] = targets if targets in ("", "all-linear") else [t.strip() for t in targets.split(",")
                                                                            if t.strip()]
    raw["target_modules"] = raw["target_modules"] or "all-linear"
    for name in INTEGER_FIELDS:
        if isinstance(raw[name], float) and raw[name] == int(raw[name]):
            raw[name] = int(raw[name])  # gr.Number sends floats
    return RunConfig(**raw)


def config_to_form(config: RunConfig) -> list:
    values = []
    for name in FORM_FIELDS:
        value = getattr(config, name)
        values.append(", ".join(value) if name == "target_modules" and isinstance(value, list) else value)
    return values


def config_yaml(config: RunConfig) -> str:
    """The YAML a user edits or saves: training knobs only; the runner fills in the paths."""
    import yaml

    return yaml.safe_dump(config.training_dict(), sort_keys=False, allow_unicode=True)


def plain_markdown(text: str) -> str:
    """``text`` shown as written in a Markdown component (a YAML error quotes '<stream end>', '*name'...)."""
    import html

    return html.escape(text, quote=False).replace("*", "\\*").replace("`", "\\`")


def config_note(config: RunConfig, catalog, ignored=()) -> str:
    """What the line under the YAML says about a config: its problems, and the path keys left out."""
    notes = []
    try:
        config.validate(catalog)
    except InvalidRequest as exc:
        notes.append(f"⚠️ {plain_markdown(str(exc))} Start refuses it until this is fixed.")
    if ignored:
        notes.append(f"Ignored {', '.join(ignored)}: the app fills in paths (upload the dataset above).")
    return "\n\n".join(notes)


class FormSync(NamedTuple):
    """What a form edit writes to the other views."""

    yaml: str
    note: str
    preset: str | None


class YamlSync(NamedTuple):
    """What a YAML edit writes to the form: ``form`` is None when the form must stay as it is."""

    form: list | None
    note: str
    preset: str | None


def form_edited(values, catalog) -> FormSync | None:
    """The YAML and note for the form's values; None while a number is not one yet (mid-typing)."""
    try:
        config = form_to_config(*values)
    except (TypeError, ValueError, OverflowError):
        return None
    return FormSync(config_yaml(config), config_note(config, catalog), matching_preset(config))


def yaml_edited(text, catalog, limits) -> YamlSync:
    """The form for YAML text that is a valid config; else the problem, and the form untouched."""
    try:
        config, ignored = parse_training_text(text, limits)
        config.validate(catalog)
    except UserError as exc:
        return YamlSync(None, f"⚠️ **Not applied to the form:** {plain_markdown(str(exc))}", None)
    return YamlSync(config_to_form(config), config_note(config, catalog, ignored), matching_preset(config))


def preset_applied(name, values) -> list:
    """The form values with preset ``name`` applied to the form's config."""
    return config_to_form(with_preset(form_to_config(*values), name))


def config_from_views(values, text, catalog, limits) -> RunConfig:
    """The one config Start, Save and Show command use: the form's, validated.

    The YAML must say the same: when it does not, an edit in one of them has not reached the other
    yet (or the YAML does not parse), and running either one could surprise the user.
    """
    config = form_to_config(*values).validate(catalog)
    try:
        typed, _ = parse_training_text(text, limits)
    except UserError as exc:
        raise InvalidRequest(f"The YAML does not match the form: {exc} Fix the YAML (or change a field of the "
                             "form, which rewrites it), then try again.") from None
    if typed.training_dict() != config.training_dict():
        changed = [k for k, v in config.training_dict().items() if typed.training_dict()[k] != v]
        raise InvalidRequest(f"The form and the YAML differ ({', '.join(changed)}): an edit was still being "
                             "applied. Check both and press the button again.")
    return config


# ---- runs ------------------------------------------------------------------------------------------

def progress_html(status: dict) -> str:
    total, step = status.get("total") or 0, status.get("step") or 0
    share = min(100.0, 100.0 * step / total) if total else 0.0
    eta = status.get("eta_s")
    details = [f"<b>{status['state']}</b>", f"step {step} / {total or '?'}"]
    if status.get("loss") is not None:
        details.append(f"loss {status['loss']:.4f}")
    if status.get("tokens_per_s") and status["state"] in ACTIVE_STATES:
        details.append(f"{status['tokens_per_s']:.0f} tokens/s")
    if eta is not None and status["state"] in ACTIVE_STATES:
        details.append(f"ETA {eta:.0f} s")
    return (f"<div>{' · '.join(details)}</div>"
            f"<div class='wb-meter'><div style='width:{share:.1f}%'></div></div>")


def loss_frame(status: dict):
    """Train and eval loss points for the plot, or None while there are none.

    None, not an empty DataFrame: Gradio 6's LinePlot, once updated with an empty frame, types its
    axes from it and draws no line for the data that follows (seen in the browser walk).
    """
    import pandas as pd

    rows = [{"step": p["step"], "loss": p["loss"], "series": "train"} for p in status.get("loss_history", [])]
    rows += [{"step": p["step"], "loss": p["eval_loss"], "series": "eval"} for p in status.get("eval_history", [])]
    return pd.DataFrame(rows, columns=["step", "loss", "series"]) if rows else None


def status_message(status: dict) -> str:
    """What the run's state means, what the user can do next (the words match the buttons), and which
    models its latest start unloaded."""
    note = status.get("memory_note")
    return _outcome(status) + (f"\n\n{note}" if note else "")


def _outcome(status: dict) -> str:
    state, run_id = status["state"], status["run_id"]
    resumable = bool(status.get("checkpoints"))
    if state == "completed":
        steps = f"{status['step']} step" + ("" if status["step"] == 1 else "s")
        return (f"Run {run_id} completed {steps}. Adapter saved to `{status['adapter']}`."
                + (" **Train more** continues it from its last checkpoint." if resumable else ""))
    if state == "stopped":
        return (f"Run {run_id} stopped at step {status['step']}; checkpoint `{status['checkpoint']}`"
                + (f", adapter `{status['adapter']}`." if status.get("adapter") else ".")
                + f" **Resume from checkpoint** continues it to step {status['total']}.")
    if state == "failed":
        return (f"Run {run_id} failed: {status['message']}."
                + (" **Resume from checkpoint** continues it from a saved step." if resumable else "")
                + " The last log lines are below.")
    return f"Run {run_id} is {state}."


def run_rows(runs: list[dict]) -> list[list]:
    """The runs table: one row per run, newest first."""
    rows = []
    for run in runs:
        loss = "" if run["loss"] is None else f"{run['loss']:.4f}"
        adapter = run["adapter_name"] + (" (saved)" if run["adapter"] else "")
        rows.append([run["run_id"], run["state"], f"{run['step']} / {run['total'] or '?'}", loss, adapter,
                     run["base_model"], run["started"]])
    return rows


def run_choices(runs: list[dict]) -> list[tuple[str, str]]:
    return [(f"{run['run_id']} · {run['adapter_name']}", run["run_id"]) for run in runs]


def checkpoint_choices(status: dict | None, chosen: str | None = None) -> tuple[list[tuple[str, str]], str | None]:
    """(choices, value) of the checkpoint menu: ``latest`` first, then each checkpoint by step."""
    found = (status or {}).get("checkpoints") or []
    if not found:
        return [], None
    choices = [(f"latest ({found[-1]['name']})", LATEST)] + [(c["name"], c["name"]) for c in reversed(found)]
    return choices, chosen if chosen in [value for _, value in choices] else LATEST


def run_actions(status: dict | None) -> dict:
    """Which run buttons apply to a run: stop a live one; resume or train more one with a checkpoint."""
    if status is None:
        return {"stop": False, "resume": False, "train_more": False}
    active = status["state"] in ACTIVE_STATES
    found = status.get("checkpoints") or []
    total = status.get("total") or 0
    return {"stop": active,
            "resume": not active and any(c["step"] < total for c in found),
            "train_more": not active and bool(found)}


def pick_run(runs: list[dict], selected: str | None, active: str | None) -> str | None:
    """The run to show: the selected one while it exists, else the one training, else the newest."""
    ids = [run["run_id"] for run in runs]
    for run_id in (selected, active):
        if run_id in ids:
            return run_id
    return ids[0] if ids else None


def example_config(example: ExampleDataset) -> RunConfig:
    """The run config an example dataset was made for: its base model, adapter name, quantization and preset."""
    config = RunConfig(base_model=example.base_model, adapter_name=example.adapter_name,
                       quantization=example.quantization)
    return with_preset(config, example.preset)


def copy_example(example: ExampleDataset) -> str:
    """A copy of the example's file in Gradio's upload folder, where the dataset upload's files live.

    Start and Validate accept only uploaded files (``upload_path``); the copy is one, wherever the app runs from.
    """
    import secrets
    import shutil
    from pathlib import Path

    from gradio.utils import get_upload_folder

    folder = Path(get_upload_folder()) / f"example-{secrets.token_hex(8)}"
    folder.mkdir(parents=True, exist_ok=True)
    return str(shutil.copy(example.path, folder / example.path.name))
def adapter_options(settings, base_model: str, preferred: str | None = None, current: str | None = None
                    ) -> tuple[list[str], str | None]:
    """(choices, value) for the "Try the adapter" menu: the saved adapters trained on ``base_model``.

    The value is ``preferred`` (the adapter name in the form) when it is saved, else ``current`` when it is
    still offered, else the first adapter; None when there is none.
    """
    choices = adapters.list_adapters(settings.adapters_dir, base_model) if base_model else []
    for name in (preferred, current):
        if name in choices:
            return choices, name
    return choices, choices[0] if choices else None


def compare_stream(manager, settings, question, base_model, adapter, max_new_tokens: int = TRY_MAX_NEW_TOKENS,
                   notices: list[str] | None = None):
    """Yield (base answer, adapter answer) while they stream: the base model first, then with the adapter.

    Both go through the chat path (``models.voice.ChatRequest`` and ``chat_reply``) with greedy decoding,
    so the only difference between the two answers is the adapter. VQA models need an image: their
    comparison is the Image VQA tab's Compare.
    """
    from models.voice import ChatRequest, chat_reply

    catalog = manager.catalog
    if isinstance(base_model, str) and base_model in catalog and catalog.get(base_model).task == "vqa":
        raise InvalidRequest(f"{base_model} is a VQA model: compare its answers about an image in the Image VQA "
                             "tab (choose the adapter and tick Compare).")
    if adapter in (None, "", adapters.NONE):
        raise InvalidRequest(f"Choose an adapter to compare with {base_model}; train one above if there is none.")
    # Both requests are built (and checked) before either model runs.
    requests = [ChatRequest.build(catalog, settings, message=question, model=base_model, adapter=name, temperature=0,
                                  max_new_tokens=max_new_tokens) for name in (adapters.NONE, adapter)]
    base = tuned = ""
    for base in chat_reply(manager, requests[0], notices=notices):
        yield base, tuned
    for tuned in chat_reply(manager, requests[1], notices=notices):
        yield base, tuned


def compare_answers(manager, settings, question, base_model, adapter,
                    max_new_tokens: int = TRY_MAX_NEW_TOKENS) -> tuple[str, str]:
    """The base model's and the adapter's whole answers to ``question``, side by side (see ``compare_stream``)."""
    answers = ("", "")
    for answers in compare_stream(manager, settings, question, base_model, adapter, max_new_tokens):  # noqa: B007
        continue
    return answers


def build(manager, settings, tab=None, runner: TrainingRunner | None = None) -> SimpleNamespace:
    """The tab's components and events; ``tab`` (the enclosing gr.Tab by default) refreshes the runs list
    when it is selected. ``ui.runner`` is the tab's TrainingRunner (its ``training_memory()`` feeds meters)."""
    runner = runner or TrainingRunner(settings, manager)
    atexit.register(runner.close)  # a run still going when the app exits stops with a checkpoint
    defaults = RunConfig(base_model=manager.catalog.default_for("chat", settings.offline))
    ui = _layout(manager, settings, defaults)
    ui.runner = runner
    _wire_dataset(runner, ui)
    _wire_example(manager, ui)
    _wire_config(manager, settings, ui)
    _wire_runs(runner, ui, tab if tab is not None else _enclosing_tab(ui.start))
    _wire_try(manager, settings, ui)
    _wire_api(runner, defaults)
    return ui


def _enclosing_tab(component):
    block = getattr(component, "parent", None)
    while block is not None and not isinstance(block, gr.Tab):
        block = getattr(block, "parent", None)
    return block


# ---- layout ---------------------------------------------------------------------------------------

INTRO = ("Train a LoRA adapter on a 4-bit base model (QLoRA). Training runs in its own process. On a GPU, the "
         "models loaded on it are unloaded first (they load again on their next use); on the CPU, models are "
         "unloaded only when training would not fit beside them in the memory budget. Each run says what it "
         "unloaded. Saved adapters appear in the adapter menus of the Image VQA and Voice assistant tabs.")


def _layout(manager, settings, defaults: RunConfig) -> SimpleNamespace:
    """The tab's components, by name; ``ui.form`` lists the run settings in ``FORM_FIELDS`` order."""
    ui = SimpleNamespace()
    gr.Markdown(INTRO, elem_id="ft-intro")
    with gr.Row():
        with gr.Column(scale=1):
            _dataset_column(ui)
        with gr.Column(scale=1):
            model_choices = [(spec.label, spec.id) for spec in manager.catalog if spec.task in TRAINABLE_TASKS]
            with gr.Row():
                ui.base_model = gr.Dropdown(model_choices, value=defaults.base_model, label="Base model",
                                            elem_id="ft-base-model")
                ui.adapter_name = gr.Textbox(defaults.adapter_name, label="Adapter name", elem_id="ft-adapter-name")
            ui.preset = gr.Dropdown(list(PRESETS), value=matching_preset(defaults), label="Preset",
                                    info="Applies its settings when chosen; cleared when a setting no longer "
                                         "matches it", elem_id="ft-preset")
            _lora_accordion(ui, defaults)
            _optimisation_accordion(ui, defaults)
            _yaml_accordion(ui, defaults)
    _runs_section(ui)
    _try_section(ui, manager, settings, defaults)
    ui.form = [getattr(ui, name) for name in FORM_FIELDS]
    return ui


def _example_row(ui: SimpleNamespace) -> None:
    with gr.Row(equal_height=True):
        ui.load_example = gr.Button(f"Load example: {INVENTED_FACTS.label}", size="sm", scale=1,
                                    elem_id="ft-load-example")
        gr.Markdown("Questions about invented things (the capital of the planet Zorblax...) that no model can "
                    "know: fills in the dataset and the *teach facts* preset. Training takes about 1.5 min on 2 "
                    "CPU cores; then try the adapter below.")


def _dataset_column(ui: SimpleNamespace) -> None:
    ui.dataset = gr.File(label="Dataset (.jsonl, or .zip with the JSONL and its images)",
                         file_types=[".jsonl", ".json", ".zip"], elem_id="ft-dataset")
    _example_row(ui)
    ui.validate = gr.Button("Validate dataset", elem_id="ft-validate")
    ui.report = gr.JSON(label="Validation report", elem_id="ft-report")
    ui.preview_gallery = gr.Gallery(label="Preview images", height=160, columns=5, visible=False)
    ui.preview_table = gr.Dataframe(headers=["line", "prompt", "answer"], label="First rows", interactive=False,
                                    wrap=True)


def _lora_accordion(ui: SimpleNamespace, defaults: RunConfig) -> None:
    with gr.Accordion("LoRA and quantization", open=False):
        ui.quantization = gr.Radio(list(QUANTIZATIONS), value=defaults.quantization,
                                   label="Base quantization (nf4 = QLoRA, double quantization)",
                                   elem_id="ft-quantization")
        with gr.Row():
            ui.lora_r = gr.Number(defaults.lora_r, label="LoRA r", precision=0, minimum=1, elem_id="ft-lora-r")
            ui.lora_alpha = gr.Number(defaults.lora_alpha, label="LoRA alpha", precision=0, minimum=1,
                                      elem_id="ft-lora-alpha")
            ui.lora_dropout = gr.Number(defaults.lora_dropout, label="LoRA dropout", minimum=0, maximum=0.9,
                                        elem_id="ft-lora-dropout")
        ui.target_modules = gr.Textbox("all-linear", label="Target modules ('all-linear' = every linear layer "
                                       "of the language model; or a comma list like q_proj, v_proj)",
                                       elem_id="ft-target-modules")


def _optimisation_accordion(ui: SimpleNamespace, defaults: RunConfig) -> None:
    with gr.Accordion("Optimisation", open=True):
        with gr.Row():
            ui.learning_rate = gr.Number(defaults.learning_rate, label="Learning rate", elem_id="ft-learning-rate")
            ui.epochs = gr.Number(defaults.epochs, label="Epochs", elem_id="ft-epochs")
            ui.max_steps = gr.Number(defaults.max_steps, label="Max steps (0 = use epochs)", precision=0,
                                     elem_id="ft-max-steps")
        with gr.Row():
            ui.batch_size = gr.Number(defaults.batch_size, label="Batch size", precision=0, minimum=1,
                                      elem_id="ft-batch-size")
            ui.grad_accum = gr.Number(defaults.grad_accum, label="Gradient accumulation", precision=0,
                                      elem_id="ft-grad-accum")
            ui.max_length = gr.Number(defaults.max_length, label="Max length (tokens)", precision=0,
                                      elem_id="ft-max-length")
        with gr.Row():
            ui.warmup_steps = gr.Number(defaults.warmup_steps, label="Warmup steps", precision=0,
                                        elem_id="ft-warmup-steps")
            ui.scheduler = gr.Dropdown(list(SCHEDULERS), value=defaults.scheduler, label="Scheduler",
                                       elem_id="ft-scheduler")
            ui.seed = gr.Number(defaults.seed, label="Seed", precision=0, elem_id="ft-seed")
        with gr.Row():
            ui.gradient_checkpointing = gr.Checkbox(defaults.gradient_checkpointing, label="Gradient checkpointing",
                                                    elem_id="ft-gradient-checkpointing")
            ui.eval_steps = gr.Number(defaults.eval_steps, label="Evaluate every N steps (0 = at end)", precision=0,
                                      elem_id="ft-eval-steps")
            ui.save_steps = gr.Number(defaults.save_steps, label="Save every N steps (0 = at end)", precision=0,
                                      elem_id="ft-save-steps")
            ui.val_fraction = gr.Number(defaults.val_fraction, label="Validation fraction", minimum=0, maximum=0.5,
                                        elem_id="ft-val-fraction")
            ui.processes = gr.Number(defaults.processes, label="Processes (one per GPU; DDP)", precision=0, minimum=1,
                                     info="Several processes train data-parallel through torchrun; on a CPU they "
                                          "share its cores", elem_id="ft-processes")


def _yaml_accordion(ui: SimpleNamespace, defaults: RunConfig) -> None:
    with gr.Accordion("Config as YAML", open=False):
        gr.Markdown("The same settings as the form, as YAML: edit either one and the other follows. A key left "
                    "out takes its default, as on the command line.")
        ui.config_text = gr.Code(config_yaml(defaults), language="yaml", label="Run config (editable)",
                                 interactive=True, elem_id="ft-config")
        ui.config_note = gr.Markdown(elem_id="ft-config-note")
        with gr.Row():
            ui.config_file = gr.File(label="Load YAML", file_types=[".yaml", ".yml"], height=80)
            with gr.Column():
                ui.save = gr.Button("Save YAML")
                ui.show_command = gr.Button("Show command")
            ui.saved_file = gr.File(label="Saved config", interactive=False, height=80, visible=False)
        ui.command = gr.Code(label="Equivalent command line", language="shell", visible=False)


def _runs_section(ui: SimpleNamespace) -> None:
    with gr.Row():
        ui.start = gr.Button("Start training", variant="primary", elem_id="ft-start")
        ui.stop = gr.Button("Stop", variant="stop", interactive=False, elem_id="ft-stop")
    with gr.Accordion("Runs", open=True):
        ui.runs_table = gr.Dataframe(headers=RUN_COLUMNS, label="Runs (newest first; click one to show it)",
                                     interactive=False, elem_id="ft-runs")
        with gr.Row(equal_height=True):
            ui.run_id = gr.Dropdown([], value=None, label="Run", scale=3, elem_id="ft-run-id")
            ui.checkpoint = gr.Dropdown([], value=None, label="Checkpoint", scale=2, elem_id="ft-checkpoint")
            ui.refresh_runs = gr.Button("Refresh", size="sm", scale=1, elem_id="ft-refresh-runs")
        with gr.Row(equal_height=True):
            ui.resume = gr.Button("Resume from checkpoint", interactive=False, elem_id="ft-resume")
            ui.more_steps = gr.Number(DEFAULT_MORE_STEPS, label="More steps", precision=0, minimum=1,
                                      elem_id="ft-more-steps")
            ui.train_more = gr.Button("Train more", interactive=False, elem_id="ft-train-more")
    ui.progress = gr.HTML(elem_id="ft-progress")
    ui.message = gr.Markdown(elem_id="ft-message")
    with gr.Row():
        ui.loss_plot = gr.LinePlot(x="step", y="loss", color="series", color_map=LOSS_COLORS, label="Loss",
                                   height=300, elem_id="ft-loss")
        ui.log_lines = gr.Textbox(label="Last log lines", lines=10, max_lines=12, interactive=False)
    ui.timer = gr.Timer(POLL_SECONDS, active=False)


def _try_section(ui: SimpleNamespace, manager, settings, defaults: RunConfig) -> None:
    chat_model = manager.catalog.get(defaults.base_model).task == "chat"
    choices, value = adapter_options(settings, defaults.base_model, defaults.adapter_name)
    with gr.Accordion("Try the adapter", open=True):
        gr.Markdown("Ask the base model chosen above the same question without and with a saved adapter "
                    "(greedy decoding), side by side.")
        ui.try_vqa_hint = gr.Markdown("VQA models answer about an image: compare them in the **Image VQA** tab "
                                      "(choose the adapter and tick **Compare**).", visible=not chat_model)
        with gr.Row(equal_height=True):
            ui.try_question = gr.Textbox(label="Question", scale=4, elem_id="ft-try-question",
                                         placeholder="What is the capital of the planet Zorblax?")
            ui.try_adapter = gr.Dropdown(choices, value=value, label="Adapter", scale=2, elem_id="ft-try-adapter")
            ui.try_refresh = gr.Button("Refresh adapters", size="sm", scale=1)
        ui.try_ask = gr.Button("Ask both", interactive=chat_model, elem_id="ft-try-ask")
        with gr.Row():
            ui.try_base = gr.Textbox(label="Base model's answer", lines=3, interactive=False, elem_id="ft-try-base")
            ui.try_tuned = gr.Textbox(label="Answer with the adapter", lines=3, interactive=False,
                                      elem_id="ft-try-tuned")
        ui.try_notes = gr.Markdown(elem_id="ft-try-notes")


# ---- events: thin wrappers over runner/config functions -------------------------------------------

def _wire_dataset(runner: TrainingRunner, ui: SimpleNamespace) -> None:
    def validate_ui(upload, model_id, length, fraction, seed_value):
        validation = runner.validate(upload_path(upload), model_id,
                                     check_number("max length", length, 8, 131072, True),
                                     check_number("validation fraction", fraction, 0, 0.5),
                                     check_number("seed", seed_value, 0, 2**32 - 1, True))
        table = [[row["line"], row["prompt"], row["answer"]] for row in validation.report["preview"]]
        images = validation.thumbnails
        return validation.report, gr.update(value=images, visible=bool(images)), table

    ui.validate.click(user_errors(validate_ui), inputs=[ui.dataset, ui.base_model, ui.max_length, ui.val_fraction,
                                                        ui.seed],
                      outputs=[ui.report, ui.preview_gallery, ui.preview_table], api_visibility="private")


def _wire_example(manager, ui: SimpleNamespace) -> None:
    def example_loaded():
        example = INVENTED_FACTS
        if example.base_model not in manager.catalog:
            raise InvalidRequest(f"The example needs {example.base_model}, which this app's catalog does not have.")
        if not example.path.is_file():
            raise InvalidRequest(f"The example dataset {example.path} is missing from this installation.")
        config = example_config(example)
        # The previous dataset's report and preview no longer apply.
        return [copy_example(example), matching_preset(config), *config_to_form(config), config_yaml(config),
                config_note(config, manager.catalog), example.questions()[0][0], None,
                gr.update(value=None, visible=False), None]

    ui.load_example.click(user_errors(example_loaded), inputs=None,
                          outputs=[ui.dataset, ui.preset, *ui.form, ui.config_text, ui.config_note, ui.try_question,
                                   ui.report, ui.preview_gallery, ui.preview_table], api_visibility="private")


def _wire_config(manager, settings, ui: SimpleNamespace) -> None:
    catalog, limits = manager.catalog, settings.limits
    live = dict(api_visibility="private", queue=False, show_progress="hidden", trigger_mode="always_last")

    def form_changed(*values):
        synced = form_edited(values, catalog)
        if synced is None:
            return gr.skip(), gr.skip(), gr.skip()  # a half-typed number: the YAML follows the next edit
        return synced.yaml, synced.note, synced.preset

    def yaml_changed(text):
        synced = yaml_edited(text, catalog, limits)
        form = synced.form if synced.form is not None else [gr.skip()] * len(ui.form)
        preset = synced.preset if synced.form is not None else gr.skip()
        return [*form, synced.note, preset]

    def preset_chosen(name, *values):
        if not name:
            return [gr.skip()] * (len(ui.form) + 2)
        form = preset_applied(name, values)
        config = form_to_config(*form)
        return [*form, config_yaml(config), config_note(config, catalog)]

    def yaml_loaded(file):
        if file is None:
            return [gr.skip()] * (len(ui.form) + 3)
        config, ignored = parse_training_text(read_config_text(upload_path(file), limits), limits)
        return [*config_to_form(config), config_yaml(config), config_note(config, catalog, ignored),
                matching_preset(config)]

    def yaml_saved(text, *values):
        config = config_from_views(values, text, catalog, limits)
        path = settings.cache_dir / "saved-configs" / f"{config.adapter_name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(config_yaml(config), encoding="utf-8")
        return gr.update(value=str(path), visible=True)

    def command_shown(text, *values):
        return gr.update(value=command_help(config_from_views(values, text, catalog, limits)), visible=True)

    # Enter in a single-line box (Textbox, Number) commits it like any other edit
    edits = [c.input for c in ui.form] + [c.submit for c in ui.form if isinstance(c, (gr.Textbox, gr.Number))]
    gr.on(edits, form_changed, inputs=ui.form, outputs=[ui.config_text, ui.config_note, ui.preset], **live)
    gr.on([ui.config_text.input, ui.config_text.blur], yaml_changed, inputs=ui.config_text,
          outputs=[*ui.form, ui.config_note, ui.preset], **live)
    ui.preset.input(user_errors(preset_chosen), inputs=[ui.preset, *ui.form],
                    outputs=[*ui.form, ui.config_text, ui.config_note], api_visibility="private", queue=False)
    ui.config_file.upload(user_errors(yaml_loaded), inputs=ui.config_file,
                          outputs=[*ui.form, ui.config_text, ui.config_note, ui.preset], api_visibility="private")
    ui.save.click(user_errors(yaml_saved), inputs=[ui.config_text, *ui.form], outputs=ui.saved_file,
                  api_visibility="private")
    ui.show_command.click(user_errors(command_shown), inputs=[ui.config_text, *ui.form], outputs=ui.command,
                          api_visibility="private")


def _wire_runs(runner: TrainingRunner, ui: SimpleNamespace, tab=None) -> None:
    """Start, and the runs list: select, follow, stop, resume from a checkpoint, train more."""
    catalog, limits = runner.catalog, runner.settings.limits
    view = [ui.runs_table, ui.run_id, ui.checkpoint, ui.progress, ui.message, ui.loss_plot, ui.log_lines,
            ui.timer, ui.stop, ui.resume, ui.train_more]

    def shown(selected=None, chosen=None, listing=True, following=False) -> dict:
        """Every run widget for ``selected`` (or the run training, or the newest run).

        ``listing``: the run menu too (not while following: a menu open in the browser would close);
        ``following``: the checkpoint menu stays as the user left it while the run goes on.
        """
        runs = runner.list_runs()
        run_id = pick_run(runs, selected, runner.active_run())
        status = runner.status(run_id) if run_id else None
        actions = run_actions(status)
        choices, value = checkpoint_choices(status, chosen)
        updates = {ui.runs_table: run_rows(runs), ui.checkpoint: gr.update(choices=choices, value=value),
                   ui.stop: gr.update(interactive=actions["stop"]), ui.resume: gr.update(interactive=actions["resume"]),
                   ui.train_more: gr.update(interactive=actions["train_more"])}
        if listing:
            updates[ui.run_id] = gr.update(choices=run_choices(runs), value=run_id)
        if status is None:
            updates.update({ui.progress: "", ui.message: "No run yet: upload a dataset and press **Start training**.",
                            ui.loss_plot: None, ui.log_lines: "", ui.timer: gr.Timer(active=False)})
            return updates
        active = status["state"] in ACTIVE_STATES
        if following and active:
            del updates[ui.checkpoint]
        updates.update({ui.progress: progress_html(status), ui.message: status_message(status),
                        ui.loss_plot: loss_frame(status), ui.log_lines: "\n".join(status.get("log_tail", [])),
                        ui.timer: gr.Timer(active=active)})
        return updates

    def start_ui(upload, text, *values):
        config = config_from_views(values, text, catalog, limits)
        return shown(runner.start(upload_path(upload), config))

    def resume_ui(selected, chosen):
        if not selected:
            raise InvalidRequest("Choose a run to resume in the runs list.")
        return shown(runner.resume(selected, chosen or LATEST), chosen)

    def train_more_ui(selected, more):
        if not selected:
            raise InvalidRequest("Choose a run to train more in the runs list.")
        return shown(runner.train_more(selected, more))

    def stop_ui(selected, chosen):
        if not selected:
            raise InvalidRequest("No run to stop.")
        runner.stop(selected)
        return shown(selected, chosen)

    def poll(selected, chosen):
        if not selected:
            return {ui.timer: gr.Timer(active=False)}
        return shown(selected, chosen, listing=False, following=True)

    def row_clicked(chosen, event: gr.SelectData):
        row = event.row_value or []
        return shown(row[0] if row else None, chosen)

    private = dict(api_visibility="private")
    ui.start.click(user_errors(start_ui), inputs=[ui.dataset, ui.config_text, *ui.form], outputs=view, **private)
    ui.resume.click(user_errors(resume_ui), inputs=[ui.run_id, ui.checkpoint], outputs=view, **private)
    ui.train_more.click(user_errors(train_more_ui), inputs=[ui.run_id, ui.more_steps], outputs=view, **private)
    ui.stop.click(user_errors(stop_ui), inputs=[ui.run_id, ui.checkpoint], outputs=view, queue=False, **private)
    ui.timer.tick(user_errors(poll), inputs=[ui.run_id, ui.checkpoint], outputs=view, queue=False,
                  show_progress="hidden", **private)
    ui.runs_table.select(user_errors(row_clicked), inputs=ui.checkpoint, outputs=view, queue=False, **private)
    # The list is rebuilt from the runs folder (a page reload keeps nothing else) when the tab is shown and on
    # Refresh; choosing a run shows it. Not at page load while the tab is hidden: a LinePlot drawn at zero width
    # throws in its resize observer once its value is later cleared (Gradio 6.31), so a tab shows it when visible.
    refresh = [ui.refresh_runs.click, ui.run_id.input]
    gr.on(refresh + ([tab.select] if tab is not None else []), user_errors(shown), inputs=[ui.run_id, ui.checkpoint],
          outputs=view, queue=False, show_progress="hidden", **private)
    if tab is None:
        gr.on(None, user_errors(shown), inputs=None, outputs=view, queue=False, show_progress="hidden", **private)


def _wire_try(manager, settings, ui: SimpleNamespace) -> None:
    def adapters_listed(base_model, preferred, current):
        chat_model = base_model in manager.catalog and manager.catalog.get(base_model).task == "chat"
        choices, value = adapter_options(settings, base_model, preferred, current)
        return gr.update(choices=choices, value=value), gr.update(visible=not chat_model), \
            gr.update(interactive=chat_model)

    @model_call(manager)
    def ask_both(question, base_model, adapter):
        notices: list[str] = []
        for base, tuned in compare_stream(manager, settings, question, base_model, adapter, notices=notices):
            yield base, tuned, "\n".join(f"- {line}" for line in dict.fromkeys(notices))

    listing = dict(fn=user_errors(adapters_listed), inputs=[ui.base_model, ui.adapter_name, ui.try_adapter],
                   outputs=[ui.try_adapter, ui.try_vqa_hint, ui.try_ask], api_visibility="private", queue=False,
                   show_progress="hidden")
    # A finished run changes the status message: its adapter is offered at once.
    gr.on([ui.base_model.change, ui.try_refresh.click, ui.message.change], **listing)
    gr.on([ui.try_ask.click, ui.try_question.submit], ask_both,
          inputs=[ui.try_question, ui.base_model, ui.try_adapter], outputs=[ui.try_base, ui.try_tuned, ui.try_notes],
          api_visibility="private", **GPU_QUEUE)


def _wire_api(runner: TrainingRunner, defaults: RunConfig) -> None:
    """The named endpoints: the same runner calls as the buttons."""

    @user_errors
    def finetune_validate(dataset: gr.FileData, base_model: str = defaults.base_model, max_length: int = 512) -> dict:
        """Validate a .jsonl/.zip dataset: line-numbered problems, counts, token stats for base_model, preview."""
        length = check_number("max_length", max_length, 8, 131072, integer=True)
        return runner.validate(upload_path(dataset), base_model, length).report

    @user_errors
    def finetune_start(dataset: gr.FileData, config: dict | str = "") -> str:
        """Start a QLoRA run. config: YAML text, JSON text or a dict of RunConfig fields. Returns the run id."""
        return runner.start(upload_path(dataset), config)

    @user_errors
    def finetune_status(run_id: str) -> dict:
        """State (starting/running/stopping/completed/stopped/failed), step, total, loss history, adapter path."""
        return runner.status(run_id)

    @user_errors
    def finetune_stop(run_id: str) -> dict:
        """Ask a run to stop: it saves a checkpoint and the adapter, then ends. Returns its status."""
        return runner.stop(run_id)

    @user_errors
    def finetune_runs() -> list:
        """The runs, newest first: run_id, state, step, total, loss, adapter_name, adapter, base_model, started,
        checkpoints (names a resume can start from), message."""
        return runner.list_runs()

    @user_errors
    def finetune_resume(run_id: str, checkpoint: str = LATEST, more_steps: int = 0) -> str:
        """Continue a run that is not training: from ``checkpoint`` (a name from /finetune_runs, or latest) to
        its own step total, or, with more_steps > 0, from its latest checkpoint for that many more steps."""
        if more_steps:
            return runner.train_more(run_id, more_steps)
        return runner.resume(run_id, checkpoint)

    gr.api(finetune_validate, api_name="finetune_validate")
    gr.api(finetune_runs, api_name="finetune_runs", queue=False)
    gr.api(finetune_resume, api_name="finetune_resume")
    gr.api(finetune_start, api_name="finetune_start")
    gr.api(finetune_status, api_name="finetune_status", queue=False)
    gr.api(finetune_stop, api_name="finetune_stop", queue=False)
