"""build_app(manager, settings): the Gradio Blocks with one tab per builder."""

from __future__ import annotations

import gradio as gr

from tabs import finetune, models_panel, text_to_image, voice, vqa

THEME = gr.themes.Soft(primary_hue="indigo")
CSS = """
.wb-banner {border-left: 4px solid #f59e0b; padding: 6px 12px; background: #fffbeb;}
.wb-meter {height: 14px; background: #e5e7eb; border-radius: 7px; overflow: hidden;}
.wb-meter > div {height: 100%; background: #6366f1;}
"""
TITLE = "Multimodal Workbench"


def offline_banner(settings) -> str:
    if not settings.offline:
        return ""
    return (f"**Offline mode** — {settings.offline_reason}. Each tab preselects a model that works offline. "
            "Real models: `whisper-tiny.en` and `whisper-base` (speech), `smollm2-135m` (chat), `piper-joe` "
            "(voice). `tiny-*` models have random weights, for smoke tests: their outputs are noise (VQA and "
            "text to image have only these offline). Hub models work only if they are already in the local cache.")


def build_app(manager, settings) -> gr.Blocks:
    with gr.Blocks(title=TITLE, analytics_enabled=False) as demo:
        gr.Markdown(f"# {TITLE}")
        banner = offline_banner(settings)
        gr.Markdown(banner, visible=bool(banner), elem_classes=["wb-banner"], elem_id="offline-banner")
        with gr.Tabs():
            with gr.Tab("Image VQA", id="vqa"):
                vqa.build(manager, settings)
            with gr.Tab("Text to image", id="txt2img"):
                text_to_image.build(manager, settings)
            with gr.Tab("Voice assistant", id="voice"):
                voice.build(manager, settings)
            with gr.Tab("Fine-tune (QLoRA)", id="finetune"):
                finetune.build(manager, settings)
            with gr.Tab("Models", id="models"):
                models_panel.build(manager, settings)
    return demo


def health_route(manager):
    """``GET /health``: JSON for Spaces and container probes (status, loaded models, memory)."""
    from fastapi.routing import APIRoute

    def health() -> dict:
        from models.memory import device_summary

        return {
            "status": "ok",
            "loaded": [entry["id"] for entry in manager.snapshot()],
            "used_bytes": manager.used_bytes(),
            "budget_bytes": manager.budget,
            "memory": device_summary(),
        }

    return APIRoute("/health", health, methods=["GET"])
