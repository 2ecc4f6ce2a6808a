"""Text-to-image tab: prompt + style presets -> gallery of PNGs that carry their recipe; PNG Info reads it back.

The logic is ``models.text_to_image`` (no gradio); this module lays out the tab (``_layout``) and
wires its events (``_wire_generate``, ``_wire_controls``, ``_wire_png_info``).
"""

from __future__ import annotations

import threading
from types import SimpleNamespace

import gradio as gr

from models.text_to_image import (
    PRECISIONS,
    TASK,
    Txt2ImgRequest,
    model_defaults,
    png_info,
    recipe_controls,
    txt2img,
)
from tabs.common import GPU_QUEUE, default_model, inputs_for, model_call, model_choices, user_errors

BACKEND_PLACEHOLDER = ("**Attention backend:** shown after the first image (PyTorch SDPA, or xformers when it "
                       "imports and passes a probe on CUDA).")
SAFETY_HELP = ("On by default, as in diffusers: when the model repo ships a safety checker (SD 1.5, SD-Turbo) it "
               "is loaded and flagged images are blacked out. tiny-sd and the SDXL models have none, so the box "
               "changes nothing for them.")
RECIPE_CONTROLS = ("prompt", "negative_prompt", "style", "model", "size_preset", "width", "height", "steps",
                   "guidance", "seed", "num_images", "scheduler")


class StopRegistry:
    """Stop flags of the runs in progress, one per browser or API session (made in build(), not global)."""

    def __init__(self):
        self._events: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def start(self, session: str) -> threading.Event:
        event = threading.Event()
        with self._lock:
            self._events[session] = event
        return event

    def finish(self, session: str, event: threading.Event) -> None:
        with self._lock:
            if self._events.get(session) is event:
                del self._events[session]

    def stop(self, session: str) -> bool:
        """Ask the session's run to stop at its next step; False when nothing is running."""
        with self._lock:
            event = self._events.get(session)
        if event is None:
            return False
        event.set()
        return True


def backend_markdown(info: dict) -> str:
    return f"**Attention backend:** {info.get('attention_backend', '?')} · device {info.get('device', '?')} · " \
           f"{info.get('precision', '?')}"


def build(manager, settings) -> None:
    ui = _layout(manager, settings)
    _wire_generate(manager, settings, ui)
    _wire_controls(manager, ui)
    _wire_png_info(manager, settings, ui)


def _layout(manager, settings) -> SimpleNamespace:
    """The tab's components, by name."""
    from models.families import diffusion

    ui = SimpleNamespace()
    first_model = default_model(manager, settings, TASK)
    defaults = model_defaults(manager, first_model)
    try:
        ui.style_names = list(diffusion.load_styles(settings.cache_dir))
        styles_note = f"Styles from {diffusion.styles_file(settings.cache_dir).name}"
    except ValueError as exc:  # a broken user file must not stop the app; the run reports it again
        ui.style_names, styles_note = ["none"], f"⚠ {exc}"
    # Gradio checks slider bounds on the server against the initial config, for API calls too, so
    # the bounds cover every model; the request enforces each model's own limits.
    max_side = max(v.max_side for v in diffusion.VARIANTS.values())
    max_steps = max(v.max_steps for v in diffusion.VARIANTS.values())
    with gr.Row():
        with gr.Column(scale=3):
            ui.prompt = gr.Textbox(label="Prompt", lines=3, placeholder="a lighthouse at dawn, mist over the sea",
                                   elem_id="t2i-prompt")
            ui.negative_prompt = gr.Textbox("", label="Negative prompt", lines=2, placeholder="blurry, low quality")
            with gr.Row():
                ui.style = gr.Dropdown(ui.style_names, value="none", label="Style", info=styles_note)
                ui.model = gr.Dropdown(model_choices(manager, TASK), value=first_model, label="Model")
            with gr.Row():
                ui.size_preset = gr.Dropdown(defaults["sizes"] + ["custom"], value=defaults["sizes"][0],
                                             label="Size preset")
                ui.width = gr.Slider(diffusion.MIN_SIDE, max_side, value=defaults["width"], step=8, label="Width")
                ui.height = gr.Slider(diffusion.MIN_SIDE, max_side, value=defaults["height"], step=8, label="Height")
            with gr.Row():
                ui.steps = gr.Slider(1, max_steps, value=defaults["steps"], step=1, label="Steps",
                                     info=f"up to {defaults['max_steps']} for this model")
                ui.guidance = gr.Slider(0.0, diffusion.MAX_GUIDANCE, value=defaults["guidance"], step=0.5,
                                        label="Guidance (CFG)")
                ui.scheduler = gr.Dropdown(list(diffusion.SCHEDULERS), value=diffusion.DEFAULT_SCHEDULER,
                                           label="Scheduler")
            with gr.Row():
                ui.seed = gr.Number(-1, label="Seed (-1 = random)", precision=0)
                ui.num_images = gr.Slider(1, diffusion.MAX_IMAGES, value=1, step=1, label="Number of images")
            _layout_memory(ui, diffusion)
            ui.backend = gr.Markdown(BACKEND_PLACEHOLDER, elem_id="t2i-backend")
            with gr.Row():
                ui.run = gr.Button("Generate", variant="primary", elem_id="t2i-generate")
                ui.stop = gr.Button("Stop", variant="stop", elem_id="t2i-stop")
        with gr.Column(scale=3):
            ui.gallery = gr.Gallery(label="Images (PNG with the recipe inside)", columns=2, height="auto",
                                    elem_id="t2i-gallery", format="png")
            ui.info = gr.JSON(label="Run info", elem_id="t2i-info")
            with gr.Accordion("PNG Info: drop a workbench PNG to reuse its settings", open=False):
                ui.png_file = gr.File(label="Workbench PNG", file_types=[".png"], type="filepath")
                ui.recipe = gr.JSON(label="Recipe")
    return ui


def _layout_memory(ui: SimpleNamespace, diffusion) -> None:
    with gr.Accordion("Memory and safety", open=False):
        with gr.Row():
            ui.precision = gr.Dropdown(list(PRECISIONS), value="auto", label="Precision",
                                       info="auto: fp16 on CUDA, fp32 on CPU; nf4 = 4-bit, CUDA only")
            ui.attention_slicing = gr.Checkbox(False, label="Attention slicing")
            ui.vae_tiling = gr.Checkbox(False, label="VAE tiling")
            ui.cpu_offload = gr.Checkbox(False, label="Model CPU offload (CUDA)")
        ui.safety_checker = gr.Checkbox(diffusion.SAFETY_DEFAULT, label="Safety checker", info=SAFETY_HELP)


def _wire_generate(manager, settings, ui: SimpleNamespace) -> None:
    """Generate (button, Enter in the prompt, and /txt2img) and Stop."""
    stops = StopRegistry()

    @model_call(manager)
    def generate(prompt, negative_prompt, style, model, width, height, steps, guidance, seed, num_images, scheduler,
                 precision, attention_slicing, vae_tiling, cpu_offload, safety_checker, request: gr.Request = None,
                 progress=gr.Progress()):
        """Generate images; returns the gallery and an info dict with the seed actually used."""
        values = dict(prompt=prompt, negative_prompt=negative_prompt, style=style, model=model, width=width,
                      height=height, steps=steps, guidance=guidance, seed=seed, num_images=num_images,
                      scheduler=scheduler, precision=precision, attention_slicing=attention_slicing,
                      vae_tiling=vae_tiling, cpu_offload=cpu_offload, safety_checker=safety_checker)
        run_request = Txt2ImgRequest.build(manager, settings, **values)
        session = getattr(request, "session_hash", None) or f"anonymous-{threading.get_ident()}"
        stop = stops.start(session)
        progress((0, None), desc="Loading model")
        try:
            items, run_info = txt2img(
                manager, settings, run_request, stop=stop,
                on_step=lambda done, total: progress((done, total), desc="Denoising", unit="steps"))
        finally:
            stops.finish(session, stop)
        for notice in run_info["notices"]:
            gr.Info(notice)
        return items, run_info

    def request_stop(request: gr.Request = None):
        if not stops.stop(getattr(request, "session_hash", None) or ""):
            gr.Info("Nothing is running.")

    inputs = inputs_for(generate, ui)  # the API's parameters are generate's; each finds its control by name
    run_event = ui.run.click(generate, inputs=inputs, outputs=[ui.gallery, ui.info], api_name="txt2img", **GPU_QUEUE)
    run_event.then(backend_markdown, inputs=ui.info, outputs=ui.backend, api_visibility="private", queue=False)
    ui.prompt.submit(generate, inputs=inputs, outputs=[ui.gallery, ui.info], api_visibility="private",
                     **GPU_QUEUE).then(backend_markdown, inputs=ui.info, outputs=ui.backend,
                                       api_visibility="private", queue=False)
    # Stop must not wait behind the run it interrupts, so it skips the GPU queue.
    ui.stop.click(request_stop, api_visibility="private", queue=False)


def _wire_controls(manager, ui: SimpleNamespace) -> None:
    """The model's defaults and the size presets."""
    def on_model_change(model_id):
        values = model_defaults(manager, model_id)
        return (gr.update(choices=values["sizes"] + ["custom"], value=values["sizes"][0]), values["width"],
                values["height"], gr.update(value=values["steps"], info=f"up to {values['max_steps']} for this model"),
                values["guidance"])

    def on_size_preset(preset):
        if not preset or preset == "custom":
            return gr.update(), gr.update()
        size_w, size_h = (int(part) for part in preset.split("x"))
        return size_w, size_h

    # .input (not .change) so that a recipe loaded from a PNG is not reset to the model's defaults.
    ui.model.input(user_errors(on_model_change), inputs=ui.model,
                   outputs=[ui.size_preset, ui.width, ui.height, ui.steps, ui.guidance], api_visibility="private",
                   queue=False)
    ui.size_preset.input(on_size_preset, inputs=ui.size_preset, outputs=[ui.width, ui.height],
                         api_visibility="private", queue=False)


def _wire_png_info(manager, settings, ui: SimpleNamespace) -> None:
    """PNG Info: /png_info returns the recipe; a second step puts it in the controls."""
    def read_png(path) -> dict:
        """The recipe stored in a workbench PNG (prompt, model, seed, size...)."""
        return png_info(path, settings.limits)

    def apply_recipe(recipe):
        if not recipe:
            return [gr.update()] * len(RECIPE_CONTROLS)
        values, notices = recipe_controls(manager, recipe)
        for notice in notices:
            gr.Warning(notice)
        gr.Info("Settings from the PNG are in the controls; press Generate to reproduce the image.")
        keep = gr.update()
        values = {**values, "size_preset": "custom", "model": values["model"] or keep,
                  "style": values["style"] if values["style"] in ui.style_names else keep}
        return [values[name] for name in RECIPE_CONTROLS]

    ui.png_file.upload(user_errors(read_png), inputs=ui.png_file, outputs=ui.recipe, api_name="png_info").success(
        apply_recipe, inputs=ui.recipe, api_visibility="private",
        outputs=[getattr(ui, name) for name in RECIPE_CONTROLS])
