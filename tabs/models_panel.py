"""Models tab: what is loaded, how much of the budget it takes, and Unload / Unload all."""

from __future__ import annotations

import datetime
import json
from types import SimpleNamespace

import gradio as gr

from models.errors import InvalidRequest
from tabs.common import user_errors

COLUMNS = ["id", "task", "device", "precision", "size (MB)", "load (s)", "last used", "in use"]
PREP_COLUMNS = ["id", "first-use preparation", "seconds", "message"]
REFRESH_SECONDS = 3
DISK_REFRESH_SECONDS = 30  # walking the cache folders costs more than reading the manager


def snapshot_rows(snapshot: list[dict]) -> list[list]:
    return [
        [m["id"], m["task"], m["device"], m["precision"], round(m["bytes"] / 1024**2, 1), m["load_seconds"],
         datetime.datetime.fromtimestamp(m["last_used"]).strftime("%H:%M:%S"), "yes" if m["pinned"] else ""]
        for m in snapshot
    ]


def preparation_rows(snapshot: list[dict]) -> list[list]:
    return [[p["id"], p["state"], p["seconds"] or "", p["message"][:200]] for p in snapshot]


def disk_markdown(settings) -> str:
    """One line: what each area of the cache takes on disk, and the retention limit."""
    from models.limits import format_bytes
    from models.retention import disk_usage

    usage = disk_usage(settings)
    parts = " · ".join(f"{name.replace('_', ' ')} {format_bytes(size)}" for name, size in usage.items())
    return (f"**Disk:** {parts}. Generated images, finished runs and uploads beyond {settings.retention_gb:g} GB "
            "are removed oldest first (--retention-gb); adapters are kept.")


def budget_meter_html(used: int, budget: int) -> str:
    share = min(100.0, 100.0 * used / budget) if budget else 0.0
    return (f"<div><b>Memory budget</b>: {used / 1024**3:.2f} GB of {budget / 1024**3:.2f} GB used "
            f"({share:.1f}%)</div><div class='wb-meter'><div style='width:{share:.1f}%'></div></div>")


def models_json(manager) -> str:
    """The snapshot as JSON text (the /models endpoint)."""
    return json.dumps({"models": manager.snapshot(), "used_bytes": manager.used_bytes(),
                       "budget_bytes": manager.budget})


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


def build(manager, settings) -> None:
    ui = _layout(manager)
    ui.disk = gr.Markdown(disk_markdown(settings), elem_id="models-disk")
    ui.disk_timer = gr.Timer(DISK_REFRESH_SECONDS)
    ui.disk_timer.tick(lambda: disk_markdown(settings), outputs=ui.disk, show_progress="hidden",
                       api_visibility="private", queue=False)
    _wire(manager, ui)


def _layout(manager) -> SimpleNamespace:
    """The tab's components, by name."""
    ui = SimpleNamespace()
    with gr.Row():
        ui.meter = gr.HTML(budget_meter_html(0, manager.budget), elem_id="budget-meter")
    ui.table = gr.Dataframe(headers=COLUMNS, value=[], interactive=False, elem_id="models-table",
                            label="Loaded models (refreshes every few seconds)")
    with gr.Row():
        ui.choice = gr.Dropdown(choices=[], label="Loaded model", allow_custom_value=True, scale=3)
        ui.unload = gr.Button("Unload", scale=1)
        ui.unload_all = gr.Button("Unload all", variant="stop", scale=1, elem_id="unload-all")
    ui.status = gr.Markdown(elem_id="models-status")
    ui.prepared = gr.Dataframe(headers=PREP_COLUMNS, value=preparation_rows(manager.preparation.snapshot()),
                               interactive=False, elem_id="models-preparation",
                               label="Offline models: one-time preparation (build or convert into the cache)")
    ui.timer = gr.Timer(REFRESH_SECONDS)
    return ui


def _wire(manager, ui: SimpleNamespace) -> None:
    """The refresh timer, Unload and Unload all, and the /models, /unload, /unload_all endpoints."""
    shown = [ui.table, ui.meter, ui.choice, ui.prepared]

    def refresh():
        snap = manager.snapshot()
        ids = [m["id"] for m in snap]
        return (snapshot_rows(snap), budget_meter_html(manager.used_bytes(), manager.budget),
                gr.update(choices=ids, value=ids[0] if ids else None),
                preparation_rows(manager.preparation.snapshot()))

    @user_errors
    def unload(model_id: str) -> str:
        """Unload one model (idempotent); returns what happened."""
        return unload_message(manager, model_id)

    def models() -> dict:
        """Loaded models (id, task, device, precision, bytes, load seconds, last use, pinned) and budget."""
        return json.loads(models_json(manager))

    ui.timer.tick(refresh, outputs=shown, show_progress="hidden", api_visibility="private", queue=False)
    ui.unload.click(unload, inputs=ui.choice, outputs=ui.status, api_name="unload").then(
        refresh, outputs=shown, api_visibility="private")
    ui.unload_all.click(lambda: unload_all_message(manager), outputs=ui.status, api_name="unload_all").then(
        refresh, outputs=shown, api_visibility="private")
    gr.api(models, api_name="models", queue=False)
