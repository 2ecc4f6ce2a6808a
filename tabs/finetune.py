"""Placeholder while the finetune tab is being built (replaced by its issue's work)."""

import gradio as gr


def build(manager, settings) -> None:
    gr.Markdown("Not built yet.")
