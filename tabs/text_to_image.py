"""Placeholder while the text_to_image tab is being built (replaced by its issue's work)."""

import gradio as gr


def build(manager, settings) -> None:
    gr.Markdown("Not built yet.")
