"""build_app(manager, settings): the Gradio Blocks with one tab per builder."""

from __future__ import annotations

import gradio as gr

from tabs import finetune, models_panel, text_to_image, voice, vqa
from tabs.common import user_errors

THEME = gr.themes.Soft(primary_hue="indigo")
# One selector per rule: Gradio scopes custom CSS by rewriting each selector, and inside a
# comma-separated list it misplaces ".dark" (".dark .gradio-container ... .dark .wb-banner p"
# matches nothing), which left the banner's text dark on a dark background.
CSS = """
.wb-banner {border-left: 4px solid #d97706; padding: 6px 12px; background: #fffbeb;}
.wb-banner * {color: #1f2937 !important;}
.dark .wb-banner {background: #2a2108;}
.dark .wb-banner * {color: #fde68a !important;}
.wb-meter {height: 14px; background: #e5e7eb; border-radius: 7px; overflow: hidden;}
.dark .wb-meter {background: #374151;}
.wb-meter > div {height: 100%; background: #6366f1;}
"""
TITLE = "Multimodal Workbench"
# Keys and feedback, as users of chat UIs and the Stable Diffusion web UIs expect:
# - Ctrl+Enter (Cmd+Enter on a Mac) generates in the text-to-image tab, from any of its boxes; Enter
#   alone adds a line to a prompt there. Prompt boxes elsewhere are single-line: Enter sends,
#   Shift+Enter adds a line (their hints say so).
# - Acting again (a primary button, or Enter in a prompt box) dismisses the pop-ups of the last
#   attempt, so that errors about a problem the user has since fixed do not pile up.
JS = """
() => {
  window.workbenchKeys = true;
  const dismissPopups = () => document.querySelectorAll('[data-testid="toast-close"]').forEach((b) => b.click());
  document.addEventListener("keydown", (event) => {
    if (event.key !== "Enter" || event.isComposing) return;
    if (event.ctrlKey || event.metaKey) {
      for (const id of ["t2i-generate", "t2v-generate"]) {
        const button = document.getElementById(id);
        if (button && button.offsetParent !== null && !button.disabled) {
          event.preventDefault();
          dismissPopups();
          button.click();
          return;
        }
      }
    } else if (!event.shiftKey && event.target.matches && event.target.matches("textarea, input[type=text]")) {
      dismissPopups();
    }
  }, true);
  document.addEventListener("click", (event) => {
    const button = event.target.closest && event.target.closest("button.primary");
    if (button) dismissPopups();
  }, true);
}
"""


def offline_banner(settings) -> str:
    if not settings.offline:
        return ""
    return (f"**Offline mode** — {settings.offline_reason}. Each tab preselects a model that works offline. "
            "Real models: `whisper-tiny.en` and `whisper-base` (speech), `smollm2-135m` (chat), `piper-joe` "
            "(voice). `tiny-*` models have random weights, for smoke tests: their outputs are noise (VQA, "
            "text to image and video have only these offline). Hub models work only if they are already in the "
            "local cache.")


def build_app(manager, settings) -> gr.Blocks:
    with gr.Blocks(title=TITLE, analytics_enabled=False) as demo:
        gr.Markdown(f"# {TITLE}")
        banner = offline_banner(settings)
        gr.Markdown(banner, visible=bool(banner), elem_classes=["wb-banner"], elem_id="offline-banner")
        with gr.Tabs() as tabs:
            with gr.Tab("Image VQA", id="vqa") as vqa_tab:
                vqa_ui = vqa.build(manager, settings, tab=vqa_tab)
            with gr.Tab("Text to image", id="txt2img"):
                t2i_ui = text_to_image.build(manager, settings)
            with gr.Tab("Voice assistant", id="voice") as voice_tab:
                voice.build(manager, settings, tab=voice_tab)
            with gr.Tab("Fine-tune (QLoRA)", id="finetune"):
                finetune_ui = finetune.build(manager, settings)
            with gr.Tab("Models", id="models"):
                models_panel.build(manager, settings, runner=finetune_ui.runner)
        _hand_on(tabs, t2i_ui, vqa_ui)
    return demo


def _hand_on(tabs, t2i_ui, vqa_ui) -> None:
    """Results handed from one tab to another, wired here so that no tab imports another.

    "Ask about this image" (text to image) opens the VQA tab with the selected image loaded; the
    image box's own check then runs and a new conversation starts, as for an upload.
    """
    def ask_about(selected):
        return text_to_image.selected_image(selected), gr.Tabs(selected="vqa")

    t2i_ui.ask_vqa.click(user_errors(ask_about), inputs=t2i_ui.selected_image, outputs=[vqa_ui.image, tabs],
                         api_visibility="private", concurrency_limit=None)


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
