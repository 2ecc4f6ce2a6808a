"""Models tab: the catalog (where each model's files are, what is loaded), memory, Download / Delete / Add, Unload."""

from __future__ import annotations

import datetime
import json
import logging
from types import SimpleNamespace

import gradio as gr

from models import hub
from models.catalog import TASK_LABELS
from models.errors import InvalidRequest
from models.limits import format_bytes
from tabs.common import user_errors

log = logging.getLogger(__name__)

COLUMNS = ["id", "task", "device", "precision", "size", "load (s)", "last used", "idle", "in use"]
CATALOG_COLUMNS = ["id", "task", "family", "licence", "parameters", "files", "on disk", "loaded", "memory", "idle"]
PREP_COLUMNS = ["id", "first-use preparation", "seconds", "message"]
REFRESH_SECONDS = 3
DISK_REFRESH_SECONDS = 30  # walking the cache folders costs more than reading the manager


# ---- plain functions: what the tab shows ------------------------------------------------------------

def format_idle(seconds: float | None) -> str:
    """"8 s", "3 min", "1 h 05 min"; "" for None (not loaded, or in use)."""
    if seconds is None:
        return ""
    whole = int(seconds)
    if whole < 60:
        return f"{whole} s"
    hours, minutes = divmod(whole // 60, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min"


def format_params(params_b: float) -> str:
    """Parameters in billions as "0.49 B" or "0.5 M" ("" when unknown)."""
    if not params_b:
        return ""
    return f"{params_b:g} B" if params_b >= 0.01 else f"{params_b * 1000:g} M"


def snapshot_rows(snapshot: list[dict], now: float | None = None) -> list[list]:
    now = datetime.datetime.now().timestamp() if now is None else now
    return [
        [m["id"], m["task"], m["device"], m["precision"], format_bytes(m["bytes"]), m["load_seconds"],
         datetime.datetime.fromtimestamp(m["last_used"]).strftime("%H:%M:%S"),
         "" if m["pinned"] else format_idle(now - m["last_used"]), "yes" if m["pinned"] else ""]
        for m in snapshot
    ]


def catalog_rows(entries: list[dict]) -> list[list]:
    """The catalog table: one row per model (``hub.catalog_entries``)."""
    rows = []
    for e in entries:
        files = e["files"]
        if e.get("download"):
            files = f"{hub.progress_words(e['download']['done_bytes'], e['download']['total_bytes'])}…"
        loaded = "in use" if e["in_use"] else "yes" if e["loaded"] else ""
        rows.append([e["id"], TASK_LABELS.get(e["task"], e["task"]), e["family"], e["license"],
                     format_params(e["params_b"]), files,
                     format_bytes(e["disk_bytes"]) if e["disk_bytes"] else "",
                     loaded, format_bytes(e["memory_bytes"]) if e["loaded"] else "", format_idle(e["idle_seconds"])])
    return rows


def preparation_rows(snapshot: list[dict]) -> list[list]:
    return [[p["id"], p["state"], p["seconds"] or "", p["message"][:200]] for p in snapshot]


def disk_markdown(settings) -> str:
    """One line: what each area of the cache takes on disk, and the retention limit."""
    from models.retention import disk_usage

    usage = disk_usage(settings)
    parts = " · ".join(f"{name.replace('_', ' ')} {format_bytes(size)}" for name, size in usage.items())
    return (f"**Disk:** {parts}. Generated images, finished runs and uploads beyond {settings.retention_gb:g} GB "
            "are removed oldest first (--retention-gb); adapters are kept.")


def memory_figures(manager, runner=None) -> dict:
    """The meter's three figures, in bytes.

    ``models_bytes`` of ``budget_bytes``: what the loaded models take of the budget (measured once
    loaded). ``process_rss`` and ``cuda_allocated`` (None without CUDA): what this process really
    holds, models, libraries and all. ``training``: the training process tree
    (``runner.training_memory()``), None when no run is going or the runner cannot tell.
    """
    from models import memory

    training = None
    measure = getattr(runner, "training_memory", None)
    if callable(measure):
        try:
            training = measure()
        except Exception:  # noqa: BLE001 - the meter must keep refreshing; the log says why
            log.warning("training_memory() failed", exc_info=True)
    cuda = memory.cuda_allocated() if memory.torch_loaded() else 0
    return {"models_bytes": manager.used_bytes(), "budget_bytes": manager.budget, "process_rss": memory.process_rss(),
            "cuda_allocated": cuda or None, "training": training if isinstance(training, dict) else None}


def meter_html(figures: dict) -> str:
    """Budget used by loaded models (with a bar), the process's measured memory, and any training process."""
    used, budget = figures["models_bytes"], figures["budget_bytes"]
    share = min(100.0, 100.0 * used / budget) if budget else 0.0
    process = f"{format_bytes(figures['process_rss'])} resident (RSS)"
    if figures.get("cuda_allocated"):
        process += f", {format_bytes(figures['cuda_allocated'])} CUDA allocated"
    lines = [f"<div><b>Loaded models</b>: {format_bytes(used)} of the {format_bytes(budget)} budget ({share:.1f}%)"
             f"</div><div class='wb-meter'><div style='width:{share:.1f}%'></div></div>",
             f"<div><b>This process</b>: {process}</div>"]
    training = figures.get("training") or {}
    rss = training.get("rss") or training.get("rss_bytes")
    if isinstance(rss, (int, float)) and rss > 0:
        detail = [f"run {training['run_id']}"] if training.get("run_id") else []
        if isinstance(training.get("processes"), int) and training["processes"] > 1:
            detail.append(f"{training['processes']} processes")
        cuda = training.get("cuda") or training.get("cuda_bytes")
        text = f"{format_bytes(rss)} resident" + (f", {format_bytes(cuda)} CUDA" if cuda else "")
        lines.append(f"<div><b>Training</b>: {text}" + (f" ({', '.join(detail)})" if detail else "") + "</div>")
    return "".join(lines)


def models_json(manager, runner=None) -> str:
    """The snapshot as JSON text (the /models endpoint), with the meter's figures."""
    return json.dumps({"models": manager.snapshot(), "used_bytes": manager.used_bytes(),
                       "budget_bytes": manager.budget, "memory": memory_figures(manager, runner)})


def unload_message(manager, model_id: str) -> str:
    if not isinstance(model_id, str) or not model_id.strip():
        raise InvalidRequest("Choose a loaded model to unload.")
    if model_id not in manager.catalog:
        raise InvalidRequest(f"Unknown model {model_id!r}.")
    return f"Unloaded {model_id}." if manager.unload(model_id) else f"{model_id} was not loaded."


def unload_all_message(manager) -> str:
    unloaded = manager.unload_all()
    busy = [m["id"] for m in manager.snapshot() if m["pinned"]]
    text = f"Unloaded {len(unloaded)} model(s)" + (f": {', '.join(unloaded)}." if unloaded else ".")
    return text + (f" Still in use: {', '.join(busy)}." if busy else "")


def hub_ids(manager) -> list[str]:
    """The hub models of the catalog (twins left out): what Download and Delete act on."""
    return [spec.id for spec in manager.catalog if spec.source == "hub" and not spec.twin_of]


def stop_message(downloads: hub.Downloads, model_id) -> str:
    if not isinstance(model_id, str) or not model_id.strip():
        raise InvalidRequest("Choose the hub model whose download should stop.")
    if downloads.stop(model_id.strip()):
        return f"Stopping the download of {model_id.strip()} (at its next chunk)…"
    return f"No download of {model_id.strip()} is running."


# ---- the tab ----------------------------------------------------------------------------------------

def build(manager, settings, runner=None) -> None:
    """The Models tab. ``runner`` (a finetune.runner.TrainingRunner) adds the training process to the meter."""
    downloads = hub.Downloads()
    ui = _layout(manager, settings, runner)
    _wire(manager, settings, ui, downloads, runner)
    _wire_files(manager, settings, ui, downloads)


def _layout(manager, settings, runner=None) -> SimpleNamespace:
    """The tab's components, by name."""
    ui = SimpleNamespace()
    with gr.Row():
        ui.meter = gr.HTML(meter_html(memory_figures(manager, runner)), elem_id="budget-meter")
    ui.table = gr.Dataframe(headers=COLUMNS, value=[], interactive=False, elem_id="models-table",
                            label="Loaded models (refreshes every few seconds)")
    with gr.Row():
        ui.choice = gr.Dropdown(choices=[], label="Loaded model", allow_custom_value=True, scale=3)
        ui.unload = gr.Button("Unload", scale=1)
        ui.unload_all = gr.Button("Unload all", variant="stop", scale=1, elem_id="unload-all")
    ui.status = gr.Markdown(elem_id="models-status")

    ui.catalog = gr.Dataframe(headers=CATALOG_COLUMNS, value=catalog_rows(hub.catalog_entries(manager, settings)),
                              interactive=False, elem_id="models-catalog", wrap=True, max_height=420,
                              column_widths=["22%", "9%", "7%", "14%", "7%", "14%", "7%", "6%", "7%", "7%"],
                              label="Catalog: every model, where its files are, whether it is loaded")
    offline = hub.offline_reason(settings)
    with gr.Row():
        ui.hub_model = gr.Dropdown(choices=hub_ids(manager), label="Hub model", scale=3, elem_id="hub-model")
        ui.download = gr.Button("Download", variant="primary", interactive=not offline, scale=1, elem_id="download")
        ui.stop = gr.Button("Stop", scale=1, elem_id="download-stop")
        ui.delete = gr.Button("Delete files…", variant="stop", scale=1, elem_id="delete-cached")
    gr.Markdown(f"Download is off: {offline}. Hub models work when their files are already in the Hugging Face "
                "cache.", visible=bool(offline), elem_id="download-offline")
    ui.download_status = gr.Markdown(elem_id="download-status")
    ui.pending_delete = gr.State("")
    with gr.Row(visible=False) as ui.confirm_row:
        ui.confirm_text = gr.Markdown(elem_id="delete-question")
        ui.confirm = gr.Button("Delete", variant="stop", scale=0, elem_id="delete-confirm")
        ui.cancel = gr.Button("Cancel", scale=0)

    with gr.Accordion("Add a hub model", open=False):
        with gr.Row():
            ui.add_id = gr.Textbox(label="Hub id", placeholder="organisation/name", scale=3, elem_id="add-model-id")
            ui.add_task = gr.Dropdown([(TASK_LABELS[task], task) for task in hub.HUB_FAMILIES], value="chat",
                                      label="Task", scale=1)
            ui.add_family = gr.Dropdown(list(hub.HUB_FAMILIES["chat"]), value="chat", label="Family", scale=1)
            ui.add = gr.Button("Add", scale=1, elem_id="add-model")
        ui.add_status = gr.Markdown(elem_id="add-model-status")
        gr.Markdown(f"Added models go to `{hub.user_models_file(settings).name}` "
                    f"({'--models-file' if settings.models_file else 'in the cache folder'}), read at every start-up, "
                    "and are usable at once through the API; other tabs' menus list them after a restart.")

    ui.prepared = gr.Dataframe(headers=PREP_COLUMNS, value=preparation_rows(manager.preparation.snapshot()),
                               interactive=False, elem_id="models-preparation",
                               label="Offline models: one-time preparation (build or convert into the cache)")
    ui.disk = gr.Markdown(disk_markdown(settings), elem_id="models-disk")
    ui.timer = gr.Timer(REFRESH_SECONDS)
    ui.disk_timer = gr.Timer(DISK_REFRESH_SECONDS)
    return ui


def _wire(manager, settings, ui: SimpleNamespace, downloads: hub.Downloads, runner=None) -> None:
    """The refresh timers, Unload and Unload all, and the /models, /unload, /unload_all endpoints."""
    shown = [ui.table, ui.meter, ui.choice, ui.prepared, ui.catalog]

    def refresh(current=None):
        snap = manager.snapshot()
        ids = [m["id"] for m in snap]
        return (snapshot_rows(snap), meter_html(memory_figures(manager, runner)),
                gr.update(choices=ids, value=current if current in ids else ids[0] if ids else None),
                preparation_rows(manager.preparation.snapshot()),
                catalog_rows(hub.catalog_entries(manager, settings, downloads)))  # a few ms: stat calls

    @user_errors
    def unload(model_id: str) -> str:
        """Unload one model (idempotent); returns what happened."""
        return unload_message(manager, model_id)

    def models() -> dict:
        """Loaded models (id, task, device, precision, bytes, load seconds, last use, pinned), budget and memory."""
        return json.loads(models_json(manager, runner))

    ui.timer.tick(refresh, inputs=ui.choice, outputs=shown, show_progress="hidden", api_visibility="private",
                  queue=False)
    ui.disk_timer.tick(lambda: disk_markdown(settings), outputs=ui.disk, show_progress="hidden",
                       api_visibility="private", queue=False)
    ui.unload.click(unload, inputs=ui.choice, outputs=ui.status, api_name="unload").then(
        refresh, inputs=ui.choice, outputs=shown, api_visibility="private")
    ui.unload_all.click(lambda: unload_all_message(manager), outputs=ui.status, api_name="unload_all").then(
        refresh, inputs=ui.choice, outputs=shown, api_visibility="private")
    gr.api(models, api_name="models", queue=False)


def _wire_files(manager, settings, ui: SimpleNamespace, downloads: hub.Downloads) -> None:
    """Download / Stop, Delete with its confirmation, Add a model, and the /catalog endpoint.

    Downloads are not model calls: they stay out of the GPU queue, one at a time (concurrency_limit=1).
    """
    def refresh_catalog(current=None):
        ids = hub_ids(manager)
        return (catalog_rows(hub.catalog_entries(manager, settings, downloads)),
                gr.update(choices=ids, value=current if current in ids else None))

    catalog_outputs = [ui.catalog, ui.hub_model]

    def catalog() -> dict:
        """Every model but the architecture twins: task, family, license, params_b, where its files are (files,
        state, disk_bytes, url), loaded, in_use, memory_bytes, idle_seconds, and a download in progress."""
        return {"models": hub.catalog_entries(manager, settings, downloads)}

    @user_errors
    def download(model_id: str, progress=gr.Progress()) -> str:
        """Download a hub model's files into the Hugging Face cache; returns when done or stopped."""
        def report(done: int, total: int) -> None:
            progress(done / total if total else 1.0, desc=hub.progress_words(done, total))

        return hub.download(manager.catalog, settings, model_id, downloads, report).message

    @user_errors
    def stop_download(model_id: str) -> str:
        """Stop the download of a hub model at its next chunk; the file being written is removed."""
        return stop_message(downloads, model_id)

    @user_errors
    def delete_cached(model_id: str, confirm: bool = False) -> str:
        """Remove a hub model's files from the Hugging Face cache (not while it is loaded); needs confirm=true."""
        return hub.delete_cached(manager, model_id, confirm=confirm, downloads=downloads)

    @user_errors
    def ask_delete(model_id: str):
        question = hub.delete_preview(manager, model_id, downloads)
        return model_id, gr.update(visible=True), question

    @user_errors
    def confirm_delete(model_id: str):
        return hub.delete_cached(manager, model_id, confirm=True, downloads=downloads), gr.update(visible=False), ""

    @user_errors
    def add_model(repo_id: str, task: str, family: str) -> str:
        """Add a hub model (organisation/name) for a task and family; usable at once, kept in the models file."""
        return hub.add_model(manager, settings, repo_id, task, family)

    def families(task: str):
        choices = list(hub.HUB_FAMILIES.get(task, ()))
        return gr.update(choices=choices, value=choices[0] if choices else None)

    ui.download.click(download, inputs=ui.hub_model, outputs=ui.download_status, api_name="download",
                      concurrency_limit=1, concurrency_id="hub-download").then(
        refresh_catalog, inputs=ui.hub_model, outputs=catalog_outputs, api_visibility="private")
    ui.stop.click(stop_download, inputs=ui.hub_model, outputs=ui.status, api_name="stop_download")
    ui.delete.click(ask_delete, inputs=ui.hub_model, outputs=[ui.pending_delete, ui.confirm_row, ui.confirm_text],
                    api_visibility="private")
    ui.confirm.click(confirm_delete, inputs=ui.pending_delete, outputs=[ui.download_status, ui.confirm_row,
                                                                        ui.pending_delete],
                     api_visibility="private").then(
        refresh_catalog, inputs=ui.hub_model, outputs=catalog_outputs, api_visibility="private")
    ui.cancel.click(lambda: (gr.update(visible=False), ""), outputs=[ui.confirm_row, ui.pending_delete],
                    api_visibility="private", queue=False)
    ui.add_task.change(families, inputs=ui.add_task, outputs=ui.add_family, api_visibility="private", queue=False)
    ui.add.click(add_model, inputs=[ui.add_id, ui.add_task, ui.add_family], outputs=ui.add_status,
                 api_name="add_model").then(
        refresh_catalog, inputs=ui.hub_model, outputs=catalog_outputs, api_visibility="private")
    gr.api(catalog, api_name="catalog", queue=False)
    gr.api(delete_cached, api_name="delete_cached")
