"""Fine-tune (QLoRA) tab: validate a dataset, configure a run, follow its loss, stop or resume it, try the adapter.

Training runs in its own process (finetune.train) driven by finetune.runner.TrainingRunner; this
module only turns widget values into plain values and back. ``_layout`` places the components;
``_wire_dataset``, ``_wire_config``, ``_wire_run``, ``_wire_try`` and ``_wire_api`` connect their events.
"""

from __future__ import annotations

import atexit
import dataclasses
from types import SimpleNamespace

import gradio as gr

from finetune.config import (
    PRESETS,
    QUANTIZATIONS,
    SCHEDULERS,
    TRAINABLE_TASKS,
    RunConfig,
    command_help,
    parse_config,
    with_preset,
)
from finetune.examples import INVENTED_FACTS, ExampleDataset
from finetune.runner import ACTIVE_STATES, TrainingRunner
from models import adapters
from models.checks import check_number
from models.errors import InvalidRequest
from tabs.common import GPU_QUEUE, model_call, user_errors

POLL_SECONDS = 2
LOSS_COLORS = {"train": "#6366f1", "eval": "#f59e0b"}
# Form fields in widget order; each one is a RunConfig attribute.
FORM_FIELDS = ("base_model", "adapter_name", "quantization", "lora_r", "lora_alpha", "lora_dropout",
               "target_modules", "learning_rate", "epochs", "max_steps", "batch_size", "grad_accum",
               "max_length", "warmup_steps", "scheduler", "seed", "gradient_checkpointing", "eval_steps",
               "save_steps", "val_fraction", "processes")
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


def form_to_config(*values) -> RunConfig:
    raw = dict(zip(FORM_FIELDS, values, strict=True))
    targets = str(raw["target_modules"] or "").strip()
    raw["target_modules"] = targets if targets in ("", "all-linear") else [t.strip() for t in targets.split(",")
                                                                            if t.strip()]
    raw["target_modules"] = raw["target_modules"] or "all-linear"
    for name in ("lora_r", "lora_alpha", "max_steps", "batch_size", "grad_accum", "max_length", "warmup_steps",
                 "seed", "eval_steps", "save_steps"):
        if isinstance(raw[name], float) and raw[name] == int(raw[name]):
            raw[name] = int(raw[name])
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


def progress_html(status: dict) -> str:
    total, step = status.get("total") or 0, status.get("step") or 0
    share = min(100.0, 100.0 * step / total) if total else 0.0
    eta = status.get("eta_s")
    details = [f"<b>{status['state']}</b>", f"step {step} / {total or '?'}"]
    if status.get("loss") is not None:
        details.append(f"loss {status['loss']:.4f}")
    if status.get("tokens_per_s"):
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
    state = status["state"]
    if state == "completed":
        return f"Run {status['run_id']} completed. Adapter saved to `{status['adapter']}`."
    if state == "stopped":
        return (f"Run {status['run_id']} stopped at step {status['step']}; checkpoint `{status['checkpoint']}`"
                + (f", adapter `{status['adapter']}`." if status.get("adapter") else "."))
    if state == "failed":
        return f"Run {status['run_id']} failed: {status['message']}. The last log lines are below."
    return f"Run {status['run_id']} is {state}."


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
    comparison is the VQA tab's Compare.
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


def build(manager, settings) -> None:
    runner = TrainingRunner(settings, manager)
    atexit.register(runner.close)  # a run still going when the app exits stops with a checkpoint
    defaults = RunConfig(base_model=manager.catalog.default_for("chat", settings.offline))
    ui = _layout(manager, settings, defaults)
    _wire_dataset(runner, ui)
    _wire_example(manager, ui)
    _wire_config(manager, settings, ui)
    _wire_run(runner, ui)
    _wire_try(manager, settings, ui)
    _wire_api(runner, defaults)


# ---- layout ---------------------------------------------------------------------------------------

def _layout(manager, settings, defaults: RunConfig) -> SimpleNamespace:
    """The tab's components, by name; ``ui.form`` lists the run settings in ``FORM_FIELDS`` order."""
    ui = SimpleNamespace()
    gr.Markdown("Train a LoRA adapter on a 4-bit base model (QLoRA). Training runs in its own process; "
                "the chat and VQA models are unloaded first. Saved adapters appear in the VQA and chat tabs.")
    with gr.Row():
        with gr.Column(scale=1):
            _dataset_column(ui)
        with gr.Column(scale=1):
            model_choices = [(spec.label, spec.id) for spec in manager.catalog if spec.task in TRAINABLE_TASKS]
            with gr.Row():
                ui.base_model = gr.Dropdown(model_choices, value=defaults.base_model, label="Base model")
                ui.adapter_name = gr.Textbox(defaults.adapter_name, label="Adapter name")
            with gr.Row():
                ui.preset = gr.Dropdown(list(PRESETS), value=None, label="Preset", scale=3)
                ui.apply_preset = gr.Button("Apply preset", scale=1)
            _lora_accordion(ui, defaults)
            _optimisation_accordion(ui, defaults)
            _yaml_accordion(ui, defaults)
    _run_section(ui)
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
                                   label="Base quantization (nf4 = QLoRA, double quantization)")
        with gr.Row():
            ui.lora_r = gr.Number(defaults.lora_r, label="LoRA r", precision=0, minimum=1)
            ui.lora_alpha = gr.Number(defaults.lora_alpha, label="LoRA alpha", precision=0, minimum=1)
            ui.lora_dropout = gr.Number(defaults.lora_dropout, label="LoRA dropout", minimum=0, maximum=0.9)
        ui.target_modules = gr.Textbox("all-linear", label="Target modules ('all-linear' = every linear layer "
                                       "of the language model; or a comma list like q_proj, v_proj)")


def _optimisation_accordion(ui: SimpleNamespace, defaults: RunConfig) -> None:
    with gr.Accordion("Optimisation", open=True):
        with gr.Row():
            ui.learning_rate = gr.Number(defaults.learning_rate, label="Learning rate")
            ui.epochs = gr.Number(defaults.epochs, label="Epochs")
            ui.max_steps = gr.Number(defaults.max_steps, label="Max steps (0 = use epochs)", precision=0)
        with gr.Row():
            ui.batch_size = gr.Number(defaults.batch_size, label="Batch size", precision=0, minimum=1)
            ui.grad_accum = gr.Number(defaults.grad_accum, label="Gradient accumulation", precision=0)
            ui.max_length = gr.Number(defaults.max_length, label="Max length (tokens)", precision=0)
        with gr.Row():
            ui.warmup_steps = gr.Number(defaults.warmup_steps, label="Warmup steps", precision=0)
            ui.scheduler = gr.Dropdown(list(SCHEDULERS), value=defaults.scheduler, label="Scheduler")
            ui.seed = gr.Number(defaults.seed, label="Seed", precision=0)
        with gr.Row():
            ui.gradient_checkpointing = gr.Checkbox(defaults.gradient_checkpointing, label="Gradient checkpointing")
            ui.eval_steps = gr.Number(defaults.eval_steps, label="Evaluate every N steps (0 = at end)", precision=0)
            ui.save_steps = gr.Number(defaults.save_steps, label="Save every N steps (0 = at end)", precision=0)
            ui.val_fraction = gr.Number(defaults.val_fraction, label="Validation fraction", minimum=0, maximum=0.5)
            ui.processes = gr.Number(defaults.processes, label="Processes (one per GPU; DDP)", precision=0, minimum=1,
                                     info="Several processes train data-parallel through torchrun; on a CPU they "
                                          "share its cores")


def _yaml_accordion(ui: SimpleNamespace, defaults: RunConfig) -> None:
    with gr.Accordion("Config as YAML", open=False):
        ui.config_text = gr.Code(config_yaml(defaults), language="yaml", label="Run config (editable)",
                                 interactive=True, elem_id="ft-config")
        with gr.Row():
            ui.config_file = gr.File(label="Load YAML", file_types=[".yaml", ".yml"], height=80)
            with gr.Column():
                ui.save = gr.Button("Save YAML")
                ui.show_command = gr.Button("Show command")
            ui.saved_file = gr.File(label="Saved config", interactive=False, height=80, visible=False)
        ui.command = gr.Code(label="Equivalent command line", language="shell", visible=False)


def _run_section(ui: SimpleNamespace) -> None:
    with gr.Row():
        ui.start = gr.Button("Start training", variant="primary", elem_id="ft-start")
        ui.stop = gr.Button("Stop", variant="stop", elem_id="ft-stop")
        ui.resume = gr.Button("Resume from checkpoint", elem_id="ft-resume")
        ui.run_id = gr.Textbox(label="Run id", interactive=False, elem_id="ft-run-id")
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
        return [copy_example(example), example.preset, *config_to_form(config), config_yaml(config),
                example.questions()[0][0], None, gr.update(value=None, visible=False), None]

    ui.load_example.click(user_errors(example_loaded), inputs=None,
                          outputs=[ui.dataset, ui.preset, *ui.form, ui.config_text, ui.try_question, ui.report,
                                   ui.preview_gallery, ui.preview_table], api_visibility="private")


def _wire_config(manager, settings, ui: SimpleNamespace) -> None:
    def form_changed(*values):
        try:
            return config_yaml(form_to_config(*values))
        except (TypeError, ValueError):
            return gr.skip()  # a half-typed value: the YAML catches up with the next change

    def preset_applied(name, *values):
        return config_to_form(with_preset(form_to_config(*values), name))

    def yaml_loaded(file):
        if file is None:
            return [gr.skip()] * (len(ui.form) + 1)
        config = dataclasses.replace(RunConfig.load(upload_path(file), settings.limits), resume_from="")
        return [*config_to_form(config), config_yaml(config)]

    def yaml_saved(text):
        config = parse_config(text, settings.limits).validate(manager.catalog)
        path = settings.runs_dir / "saved-configs" / f"{config.adapter_name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(config_yaml(config), encoding="utf-8")
        return gr.update(value=str(path), visible=True)

    def command_shown(text):
        return gr.update(value=command_help(parse_config(text, settings.limits).validate(manager.catalog)),
                         visible=True)

    gr.on([c.change for c in ui.form], form_changed, inputs=ui.form, outputs=ui.config_text, api_visibility="private",
          show_progress="hidden", queue=False)
    ui.apply_preset.click(user_errors(preset_applied), inputs=[ui.preset, *ui.form], outputs=ui.form,
                          api_visibility="private")
    ui.config_file.upload(user_errors(yaml_loaded), inputs=ui.config_file, outputs=[*ui.form, ui.config_text],
                          api_visibility="private")
    ui.save.click(user_errors(yaml_saved), inputs=ui.config_text, outputs=ui.saved_file, api_visibility="private")
    ui.show_command.click(user_errors(command_shown), inputs=ui.config_text, outputs=ui.command,
                          api_visibility="private")


def _wire_run(runner: TrainingRunner, ui: SimpleNamespace) -> None:
    def show(status: dict):
        active = status["state"] in ACTIVE_STATES
        return (progress_html(status), status_message(status), loss_frame(status),
                "\n".join(status.get("log_tail", [])), gr.Timer(active=active))

    def start_ui(upload, text):
        new_id = runner.start(upload_path(upload), text)
        return (new_id, *show(runner.status(new_id)))

    def resume_ui(current):
        new_id = runner.resume(current)
        return (new_id, *show(runner.status(new_id)))

    def poll(current):
        if not current:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.Timer(active=False)
        return show(runner.status(current))

    def stop_ui(current):
        if not current:
            raise InvalidRequest("No run to stop.")
        return show(runner.stop(current))

    outputs = [ui.progress, ui.message, ui.loss_plot, ui.log_lines, ui.timer]
    ui.start.click(user_errors(start_ui), inputs=[ui.dataset, ui.config_text], outputs=[ui.run_id, *outputs],
                   api_visibility="private")
    ui.resume.click(user_errors(resume_ui), inputs=ui.run_id, outputs=[ui.run_id, *outputs], api_visibility="private")
    ui.stop.click(user_errors(stop_ui), inputs=ui.run_id, outputs=outputs, api_visibility="private", queue=False)
    ui.timer.tick(user_errors(poll), inputs=ui.run_id, outputs=outputs, api_visibility="private", queue=False,
                  show_progress="hidden")


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

    gr.api(finetune_validate, api_name="finetune_validate")
    gr.api(finetune_start, api_name="finetune_start")
    gr.api(finetune_status, api_name="finetune_status", queue=False)
    gr.api(finetune_stop, api_name="finetune_stop", queue=False)
