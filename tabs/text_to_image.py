"""Text-to-image tab: prompt + style presets -> a gallery of PNGs that carry their recipe, or (Video mode) an
AnimateDiff clip as MP4 + GIF; PNG Info and Video info read recipes back into the controls.

The logic is ``models.text_to_image`` and ``models.text_to_video`` (no gradio); this module lays out
the tab (``_layout``) and wires its events (``_wire_generate``, ``_wire_video``, ``_wire_controls``,
``_wire_results``, ``_wire_png_info``, ``_wire_video_info``). ``build`` returns the components.

Gradio checks slider bounds on the server against a component's config. The visible sliders take
the chosen model's limits, so the API endpoints (/txt2img, /txt2video) read hidden sliders of their
own whose bounds cover every model; the request then enforces the model's limits with its message.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import gradio as gr

from models.errors import InvalidRequest
from models.text_to_image import (
    PRECISIONS,
    TASK,
    Txt2ImgRequest,
    model_defaults,
    png_info,
    recipe_controls,
    txt2img,
)
from models.text_to_video import TASK as VIDEO_TASK
from models.text_to_video import Txt2VideoRequest, check_base, txt2video, video_defaults
from models.text_to_video import recipe_controls as video_recipe_controls
from models.text_to_video import video_info as read_video_info
from tabs.common import (
    GPU_QUEUE,
    StopRegistry,
    default_model,
    inputs_for,
    model_call,
    model_choices,
    session_of,
    user_errors,
)

BACKEND_PLACEHOLDER = ("**Attention backend:** shown after the first image (PyTorch SDPA, or xformers when it "
                       "imports and passes a probe on CUDA).")
INFO_PLACEHOLDER = "*Run info appears here after a run.*"  # must not say "seed": the browser test waits for it
SAFETY_HELP = ("On by default, as in diffusers: when the model repo ships a safety checker (SD 1.5, SD-Turbo) it "
               "is loaded and flagged images are blacked out. tiny-sd and the SDXL models have none, so the box "
               "changes nothing for them.")
MODES = ("Image", "Video")
RECIPE_CONTROLS = ("mode", "prompt", "negative_prompt", "style", "model", "size_preset", "width", "height", "steps",
                   "guidance", "seed", "num_images", "scheduler")
VIDEO_RECIPE_CONTROLS = ("mode", "prompt", "negative_prompt", "style", "motion_adapter", "model", "size_preset",
                         "width", "height", "frames", "fps", "steps", "guidance", "seed")
NO_IMAGE = "Generate an image first: the selected image of the last run is what this button uses."


# ---- plain functions (no gradio): what the buttons show and use --------------------------------------

def backend_markdown(info: dict) -> str:
    return f"**Attention backend:** {info.get('attention_backend', '?')} · device {info.get('device', '?')} · " \
           f"{info.get('precision', '?')}"


def run_summary(info: dict | None) -> str:
    """One readable line for the last run: seed, size, steps, time, model, device, precision, attention."""
    if not info:
        return INFO_PLACEHOLDER
    parts = []
    if info.get("mode") == "video":
        parts.append(f"seed {info['seed']}")
        parts.append(f"{info['frames']} frames at {info['fps']} fps ({info['duration_seconds']:g} s)")
        model = f"{info['motion_adapter']} on {info['model']}"
    else:
        seeds = info.get("seeds") or [info.get("seed")]
        parts.append(f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {seeds[0]}–{seeds[-1]}")
        if len(seeds) > 1:
            calls = info.get("pipeline_calls") or 1
            parts.append(f"{len(seeds)} images in {calls} call{'s' if calls != 1 else ''}")
        model = info.get("model", "?")
    parts += [f"{info.get('width')}×{info.get('height')}", f"{info.get('steps')} steps", f"{info.get('seconds')} s",
              model, f"{info.get('device')} · {info.get('precision')} · {info.get('attention_backend')}"]
    line = " · ".join(str(part) for part in parts)
    return f"**Stopped** · {line}" if info.get("stopped") else line


def selected_image(path) -> str:
    """The gallery image the user selected (the first of the last run by default), as a file path.

    Raises:
        InvalidRequest: nothing was generated yet, or the file is gone (retention, a restart).
    """
    if not path:
        raise InvalidRequest(NO_IMAGE)
    if not Path(path).is_file():
        raise InvalidRequest(f"The selected image ({Path(path).name}) is no longer on disk; generate it again.")
    return str(path)


def seed_to_reuse(info: dict | None, selected: str | None, files: list | None) -> int:
    """The seed of the last run's selected image (or of its video)."""
    if not info or "seed" not in info:
        raise InvalidRequest("Generate an image first: Reuse seed puts the seed of the last run in the Seed box.")
    if info.get("mode") != "video" and selected and files and selected in files:
        return int(info["seeds"][files.index(selected)])
    return int(info["seed"])


def slider_limits(manager, mode: str, model: str, motion_adapter: str | None, fit_base: bool = False) -> dict:
    """Defaults and bounds for the size and steps sliders: the model's, and in Video mode the adapter's steps,
    guidance and frames. ``fit_base``: a model the adapter cannot animate is replaced by its default base."""
    values = {**model_defaults(manager, model), "model": model}
    if mode == "Video" and motion_adapter:
        video = video_defaults(manager, motion_adapter, model)
        values.update(steps=video["steps"], guidance=video["guidance"], max_steps=video["max_steps"],
                      frames=video["frames"])
        if fit_base and video["model"] != model:
            base = model_defaults(manager, video["model"])
            values.update({key: base[key] for key in ("width", "height", "max_side", "sizes")}, model=video["model"])
    return values


# ---- the tab -------------------------------------------------------------------------------------

def build(manager, settings) -> SimpleNamespace:
    """Lay out and wire the tab; returns its components (``ask_vqa`` and ``selected_image`` for tabs/__init__)."""
    ui = _layout(manager, settings)
    stops = StopRegistry()
    _wire_generate(manager, settings, ui, stops)
    _wire_video(manager, settings, ui, stops)
    _wire_controls(manager, ui)
    _wire_results(ui)
    _wire_png_info(manager, settings, ui)
    _wire_video_info(manager, settings, ui)
    return ui


def _layout(manager, settings) -> SimpleNamespace:
    """The tab's components, by name: the prompt and Generate first, the rest in rows and accordions."""
    from models.families import diffusion

    ui = SimpleNamespace()
    first_model = default_model(manager, settings, TASK)
    defaults = model_defaults(manager, first_model)
    adapters = model_choices(manager, VIDEO_TASK)
    first_adapter = default_model(manager, settings, VIDEO_TASK) if adapters else None
    video = video_defaults(manager, first_adapter) if first_adapter else None
    try:
        ui.style_names = list(diffusion.load_styles(settings.cache_dir))
        styles_note = f"Styles from {diffusion.styles_file(settings.cache_dir).name}"
    except ValueError as exc:  # a broken user file must not stop the app; the run reports it again
        ui.style_names, styles_note = ["none"], f"⚠ {exc}"
    with gr.Row(equal_height=False):
        with gr.Column(scale=5):
            with gr.Row(equal_height=True):
                ui.prompt = gr.Textbox(label="Prompt", lines=2, max_lines=6, scale=5, elem_id="t2i-prompt",
                                       placeholder="a lighthouse at dawn, mist over the sea",
                                       info="Ctrl+Enter (⌘+Enter on a Mac) generates · Enter adds a line")
                with gr.Column(scale=1, min_width=150):
                    ui.run = gr.Button("Generate", variant="primary", elem_id="t2i-generate")
                    ui.run_video = gr.Button("Generate video", variant="primary", elem_id="t2v-generate",
                                             visible=False)
                    ui.stop = gr.Button("Stop", variant="stop", elem_id="t2i-stop")
            with gr.Row():
                ui.mode = gr.Radio(list(MODES), value="Image", label="Mode", elem_id="t2i-mode",
                                   info="Video: AnimateDiff" if adapters else "Video: no motion adapter in the catalog",
                                   interactive=bool(adapters))
                ui.model = gr.Dropdown(model_choices(manager, TASK), value=first_model, label="Model",
                                       info="In Video mode, the SD 1.5 base the adapter animates")
                ui.style = gr.Dropdown(ui.style_names, value="none", label="Style", info=styles_note)
            with gr.Row():
                ui.size_preset = gr.Dropdown(defaults["sizes"] + ["custom"], value=defaults["sizes"][0],
                                             label="Size preset")
                ui.width = gr.Slider(diffusion.MIN_SIDE, defaults["max_side"], value=defaults["width"], step=8,
                                     label="Width")
                ui.height = gr.Slider(diffusion.MIN_SIDE, defaults["max_side"], value=defaults["height"], step=8,
                                      label="Height")
            with gr.Row():
                ui.steps = gr.Slider(1, defaults["max_steps"], value=defaults["steps"], step=1, label="Steps")
                ui.guidance = gr.Slider(0.0, diffusion.MAX_GUIDANCE, value=defaults["guidance"], step=0.5,
                                        label="Guidance (CFG)")
                ui.seed = gr.Number(-1, label="Seed (-1 = random)", precision=0)
            with gr.Row() as ui.image_options:
                ui.num_images = gr.Slider(1, diffusion.MAX_IMAGES, value=1, step=1, label="Number of images")
                ui.scheduler = gr.Dropdown(list(diffusion.SCHEDULERS), value=diffusion.DEFAULT_SCHEDULER,
                                           label="Scheduler")
            with gr.Row(visible=False) as ui.video_options:
                ui.motion_adapter = gr.Dropdown(adapters, value=first_adapter, label="Motion adapter",
                                                info="tiny-motion goes with tiny-sd; the real ones with SD 1.5")
                ui.frames = gr.Slider(diffusion.MIN_FRAMES, diffusion.MAX_FRAMES, step=1, label="Frames",
                                      value=video["frames"] if video else 16)
                ui.fps = gr.Slider(diffusion.MIN_FPS, diffusion.MAX_FPS, value=diffusion.DEFAULT_FPS, step=1,
                                   label="Frames per second")
            with gr.Accordion("Negative prompt", open=False):
                ui.negative_prompt = gr.Textbox("", label="Negative prompt", lines=2, placeholder="blurry, low quality")
            _layout_memory(ui, diffusion)
            ui.backend = gr.Markdown(BACKEND_PLACEHOLDER, elem_id="t2i-backend")
        with gr.Column(scale=4):
            ui.gallery = gr.Gallery(label="Images (PNG with the recipe inside)", columns=2, height=360,
                                    elem_id="t2i-gallery", format="png")
            with gr.Row():
                ui.video = gr.Video(label="Video (MP4, H.264)", elem_id="t2i-video", visible=False, autoplay=True,
                                    loop=True, height=300)
                ui.gif = gr.Image(label="GIF", type="filepath", elem_id="t2i-gif", visible=False, height=300)
            ui.info = gr.Markdown(INFO_PLACEHOLDER, elem_id="t2i-info")
            with gr.Row():
                ui.reuse_seed = gr.Button("Reuse seed", size="sm", elem_id="t2i-reuse-seed")
                ui.send_png_info = gr.Button("Send to PNG Info", size="sm", elem_id="t2i-send-png-info")
                ui.ask_vqa = gr.Button("Ask about this image", size="sm", elem_id="t2i-ask-vqa")
            with gr.Accordion("Run details (JSON)", open=False):
                ui.info_json = gr.JSON(label="Run info", elem_id="t2i-info-json")
            with gr.Accordion("PNG Info: drop a workbench PNG to reuse its settings", open=False) as ui.png_box:
                ui.png_file = gr.File(label="Workbench PNG", file_types=[".png"], type="filepath")
                ui.recipe = gr.JSON(label="Recipe")
            with gr.Accordion("Video info: drop a workbench video (.mp4) or its .json recipe", open=False):
                ui.video_file = gr.File(label="Workbench video or recipe", file_types=[".mp4", ".json"],
                                        type="filepath")
                ui.video_recipe = gr.JSON(label="Video recipe")
    ui.selected_image = gr.State(None)  # the path of the selected gallery image (the first of the last run)
    ui.image_files = gr.State([])  # the last image run's PNGs, in gallery order
    _layout_api(ui, diffusion, defaults, video)
    return ui


def _layout_memory(ui: SimpleNamespace, diffusion) -> None:
    with gr.Accordion("Memory and safety", open=False) as ui.memory_options:
        with gr.Row():
            ui.precision = gr.Dropdown(list(PRECISIONS), value="auto", label="Precision",
                                       info="auto: fp16 on CUDA, fp32 on CPU; nf4 = 4-bit, CUDA only")
            ui.attention_slicing = gr.Checkbox(False, label="Attention slicing")
            ui.vae_tiling = gr.Checkbox(False, label="VAE tiling")
            ui.cpu_offload = gr.Checkbox(False, label="Model CPU offload (CUDA)")
        ui.safety_checker = gr.Checkbox(diffusion.SAFETY_DEFAULT, label="Safety checker", info=SAFETY_HELP)


def _layout_api(ui: SimpleNamespace, diffusion, defaults: dict, video: dict | None) -> None:
    """Hidden inputs and outputs of /txt2img and /txt2video: bounds that cover every model, defaults of the
    default model (and, for video, of the default adapter and its base)."""
    max_side = max(v.max_side for v in diffusion.VARIANTS.values())
    max_steps = max(v.max_steps for v in (*diffusion.VARIANTS.values(), *diffusion.MOTION_VARIANTS.values()))
    video = video or {"model": None, "width": defaults["width"], "height": defaults["height"],
                      "steps": defaults["steps"], "guidance": defaults["guidance"]}
    api = SimpleNamespace()
    api.txt2img = gr.Button(visible=False)
    api.width = gr.Slider(diffusion.MIN_SIDE, max_side, value=defaults["width"], step=8, visible=False)
    api.height = gr.Slider(diffusion.MIN_SIDE, max_side, value=defaults["height"], step=8, visible=False)
    api.steps = gr.Slider(1, max_steps, value=defaults["steps"], step=1, visible=False)
    api.txt2video = gr.Button(visible=False)
    api.video_model = gr.Dropdown(ui.model.choices, value=video["model"], visible=False)
    api.video_width = gr.Slider(diffusion.MIN_SIDE, max_side, value=video["width"], step=8, visible=False)
    api.video_height = gr.Slider(diffusion.MIN_SIDE, max_side, value=video["height"], step=8, visible=False)
    api.video_steps = gr.Slider(1, max_steps, value=video["steps"], step=1, visible=False)
    api.video_guidance = gr.Slider(0.0, diffusion.MAX_GUIDANCE, value=video["guidance"], step=0.5, visible=False)
    api.mp4 = gr.File(label="MP4", visible=False)
    api.gif = gr.File(label="GIF", visible=False)
    ui.api = api


def _wire_generate(manager, settings, ui: SimpleNamespace, stops: StopRegistry) -> None:
    """Generate (button, Shift+Enter in the prompt, and /txt2img) and Stop."""
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
        session = session_of(request)
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
        if stops.stop(session_of(request)):
            gr.Info("Stopping after the current step; finished images are kept.")
        else:
            gr.Info("Nothing is running.")

    def after_run(info):
        files = list((info or {}).get("files") or [])
        return run_summary(info), backend_markdown(info or {}), (files[0] if files else None), files

    ui.run.click(generate, inputs=inputs_for(generate, ui), outputs=[ui.gallery, ui.info_json],
                 api_visibility="private", **GPU_QUEUE).then(
        after_run, inputs=ui.info_json, outputs=[ui.info, ui.backend, ui.selected_image, ui.image_files],
        api_visibility="private", queue=False)
    # The API's own event, whose size and steps inputs have bounds that cover every model
    api = ui.api
    ui.api.txt2img.click(generate, inputs=inputs_for(generate, ui, width=api.width, height=api.height,
                                                     steps=api.steps),
                         outputs=[ui.gallery, ui.info_json], api_name="txt2img", **GPU_QUEUE)
    # Shift+Enter in the (multi-line) prompt presses the Generate button of the mode shown
    ui.prompt.submit(None, inputs=ui.mode, js="(mode) => { document.querySelector(mode === 'Video' ? "
                     "'#t2v-generate' : '#t2i-generate')?.click(); }", api_visibility="private", queue=False)
    # Stop must not wait behind the run it interrupts: it skips the GPU queue (queued without a limit,
    # so that its pop-up reaches the page).
    ui.stop.click(request_stop, api_visibility="private", concurrency_limit=None)


def _wire_video(manager, settings, ui: SimpleNamespace, stops: StopRegistry) -> None:
    """Generate video (button and /txt2video): AnimateDiff -> MP4 + GIF with the recipe."""
    @model_call(manager, duration=180)
    def generate_video(prompt, negative_prompt, style, motion_adapter, model, width, height, frames, fps, steps,
                       guidance, seed, request: gr.Request = None, progress=gr.Progress()):
        """Make a video; returns the MP4 path, the GIF path and an info dict (seed, files, timings...)."""
        values = dict(prompt=prompt, negative_prompt=negative_prompt, style=style, motion_adapter=motion_adapter,
                      model=model, width=width, height=height, frames=frames, fps=fps, steps=steps, guidance=guidance,
                      seed=seed)
        run_request = Txt2VideoRequest.build(manager, settings, **values)
        session = session_of(request)
        stop = stops.start(session)
        progress((0, None), desc="Loading the motion adapter and its base")

        def on_step(done, total):
            phase = "Denoising frames" if done <= run_request.video.steps else "Decoding frames"
            progress((done, total), desc=phase, unit="steps")

        try:
            mp4, gif, run_info = txt2video(manager, settings, run_request, stop=stop, on_step=on_step)
        finally:
            stops.finish(session, stop)
        for notice in run_info["notices"]:
            gr.Info(notice)
        return mp4, gif, run_info

    def after_run(info):
        return run_summary(info), backend_markdown(info or {})

    ui.run_video.click(generate_video, inputs=inputs_for(generate_video, ui), outputs=[ui.video, ui.gif, ui.info_json],
                       api_visibility="private", **GPU_QUEUE).then(
        after_run, inputs=ui.info_json, outputs=[ui.info, ui.backend], api_visibility="private", queue=False)
    api = ui.api
    api.txt2video.click(generate_video, inputs=inputs_for(
        generate_video, ui, model=api.video_model, width=api.video_width, height=api.video_height,
        steps=api.video_steps, guidance=api.video_guidance), outputs=[api.mp4, api.gif, ui.info_json],
        api_name="txt2video", **GPU_QUEUE)


def _wire_controls(manager, ui: SimpleNamespace) -> None:
    """Mode, model and adapter changes: defaults and slider bounds follow the model (and the adapter)."""
    def limits_updates(values: dict, model: str | None = None) -> list:
        sizes = values["sizes"] + ["custom"]
        return [gr.update(value=model) if model else gr.update(),
                gr.update(choices=sizes, value=values["sizes"][0]),
                gr.update(value=values["width"], maximum=values["max_side"]),
                gr.update(value=values["height"], maximum=values["max_side"]),
                gr.update(value=values["steps"], maximum=values["max_steps"]), values["guidance"],
                values.get("frames", gr.update())]

    limits_outputs = [ui.model, ui.size_preset, ui.width, ui.height, ui.steps, ui.guidance, ui.frames]

    def on_model_change(mode, model, motion_adapter):
        values = slider_limits(manager, mode, model, motion_adapter)
        if mode != "Video" or not motion_adapter:
            return limits_updates(values)
        try:  # say at once when this base cannot be animated; Generate video would refuse it
            check_base(manager.catalog, motion_adapter, model)
        except InvalidRequest as exc:
            gr.Warning(str(exc))
        return limits_updates(values)[:4] + [gr.update()] * 3  # the adapter's steps, guidance and frames stay

    def on_video_input(mode, model, motion_adapter):
        values = slider_limits(manager, mode, model, motion_adapter, fit_base=True)
        if values["model"] != model:
            gr.Info(f"{motion_adapter} animates SD 1.5 models: the model is now {values['model']}.")
        return limits_updates(values, values["model"] if values["model"] != model else None)

    def show_mode(mode):
        video = mode == "Video"
        return [gr.update(visible=not video), gr.update(visible=video), gr.update(visible=not video),
                gr.update(visible=video), gr.update(visible=not video), gr.update(visible=not video),
                gr.update(visible=video), gr.update(visible=video), gr.update(visible=not video),
                gr.update(visible=not video)]

    def on_size_preset(preset):
        if not preset or preset == "custom":
            return gr.update(), gr.update()
        size_w, size_h = (int(part) for part in preset.split("x"))
        return size_w, size_h

    inputs = [ui.mode, ui.model, ui.motion_adapter]
    # .input (not .change) so that a recipe loaded from a file is not reset to the model's defaults.
    # Queued without a limit: their pop-ups reach the page only from queued events.
    ui.model.input(user_errors(on_model_change), inputs=inputs, outputs=limits_outputs, api_visibility="private",
                   concurrency_limit=None)
    ui.mode.input(user_errors(on_video_input), inputs=inputs, outputs=limits_outputs, api_visibility="private",
                  concurrency_limit=None)
    ui.motion_adapter.input(user_errors(on_video_input), inputs=inputs, outputs=limits_outputs,
                            api_visibility="private", concurrency_limit=None)
    # .change: what is shown follows the mode however it was set (a video recipe sets it too)
    ui.mode.change(show_mode, inputs=ui.mode, outputs=[
        ui.run, ui.run_video, ui.image_options, ui.video_options, ui.memory_options, ui.gallery, ui.video, ui.gif,
        ui.send_png_info, ui.ask_vqa], api_visibility="private", queue=False)
    ui.size_preset.input(on_size_preset, inputs=ui.size_preset, outputs=[ui.width, ui.height],
                         api_visibility="private", queue=False)


def _wire_results(ui: SimpleNamespace) -> None:
    """The selected gallery image, and Reuse seed."""
    def on_select(files, evt: gr.SelectData):
        index = evt.index if isinstance(evt.index, int) else 0
        return files[index] if files and 0 <= index < len(files) else None

    def reuse_seed(info, selected, files):
        return seed_to_reuse(info, selected, files)

    ui.gallery.select(on_select, inputs=ui.image_files, outputs=ui.selected_image, api_visibility="private",
                      queue=False)
    ui.reuse_seed.click(user_errors(reuse_seed), inputs=[ui.info_json, ui.selected_image, ui.image_files],
                        outputs=ui.seed, api_visibility="private", queue=False)


def _recipe_limits(manager, mode: str, model: str | None, motion_adapter: str | None, values: dict) -> dict:
    """Slider updates that carry a recipe's values with the bounds of its model (and adapter)."""
    if not model:
        return {"width": values["width"], "height": values["height"], "steps": values["steps"]}
    limits = slider_limits(manager, mode, model, motion_adapter)
    return {"width": gr.update(value=values["width"], maximum=max(limits["max_side"], values["width"])),
            "height": gr.update(value=values["height"], maximum=max(limits["max_side"], values["height"])),
            "steps": gr.update(value=values["steps"], maximum=max(limits["max_steps"], values["steps"]))}


def _wire_png_info(manager, settings, ui: SimpleNamespace) -> None:
    """PNG Info: /png_info returns the recipe; a second step puts it in the controls. Send to PNG Info does
    the same with the selected gallery image."""
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
        values = {**values, "mode": "Image", "size_preset": "custom", "model": values["model"] or keep,
                  "style": values["style"] if values["style"] in ui.style_names else keep,
                  **_recipe_limits(manager, "Image", values["model"], None, values)}
        return [values[name] for name in RECIPE_CONTROLS]

    def send(selected):
        path = selected_image(selected)
        return path, read_png(path), gr.update(open=True)

    controls = [getattr(ui, name) for name in RECIPE_CONTROLS]
    ui.png_file.upload(user_errors(read_png), inputs=ui.png_file, outputs=ui.recipe, api_name="png_info").success(
        apply_recipe, inputs=ui.recipe, api_visibility="private", outputs=controls)
    ui.send_png_info.click(user_errors(send), inputs=ui.selected_image, outputs=[ui.png_file, ui.recipe, ui.png_box],
                           api_visibility="private", concurrency_limit=None).success(
        apply_recipe, inputs=ui.recipe, api_visibility="private", outputs=controls, concurrency_limit=None)


def _wire_video_info(manager, settings, ui: SimpleNamespace) -> None:
    """Video info: /video_info returns a video's recipe (from the MP4 or its JSON); then the controls take it."""
    def read_video(path) -> dict:
        """The recipe of a workbench video: its .mp4, or the .json saved next to it."""
        return read_video_info(path, settings.limits)

    def apply_recipe(recipe):
        if not recipe:
            return [gr.update()] * len(VIDEO_RECIPE_CONTROLS)
        values, notices = video_recipe_controls(manager, recipe)
        for notice in notices:
            gr.Warning(notice)
        gr.Info("Settings from the video are in the controls (Video mode); press Generate video to make it again.")
        keep = gr.update()
        model, adapter = values["model"], values["motion_adapter"]
        values = {**values, "mode": "Video", "size_preset": "custom", "model": model or keep,
                  "motion_adapter": adapter or keep,
                  "style": values["style"] if values["style"] in ui.style_names else keep,
                  **_recipe_limits(manager, "Video", model, adapter, values)}
        return [values[name] for name in VIDEO_RECIPE_CONTROLS]

    ui.video_file.upload(user_errors(read_video), inputs=ui.video_file, outputs=ui.video_recipe,
                         api_name="video_info").success(
        apply_recipe, inputs=ui.video_recipe, api_visibility="private",
        outputs=[getattr(ui, name) for name in VIDEO_RECIPE_CONTROLS])
