"""Text-to-image tab: prompt + style presets -> gallery of PNGs that carry their recipe; PNG Info reads it back."""

from __future__ import annotations

import threading

import gradio as gr

from models.errors import InvalidRequest
from tabs.common import GPU_QUEUE, default_model, gpu, model_choices, user_errors

TASK = "text-to-image"
PRECISIONS = ("auto", "fp32", "fp16", "nf4")
BACKEND_PLACEHOLDER = ("**Attention backend:** shown after the first image (PyTorch SDPA, or xformers when it "
                       "imports and passes a probe on CUDA).")
SAFETY_HELP = ("On by default, as in diffusers: when the model repo ships a safety checker (SD 1.5, SD-Turbo) it "
               "is loaded and flagged images are blacked out. tiny-sd and the SDXL models have none, so the box "
               "changes nothing for them.")


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


# ---- plain functions (what the tests and the bench call) ----------------------------------------

def model_defaults(manager, model_id: str) -> dict:
    """Sizes, steps and guidance the model was made for, and the limits the controls allow."""
    from models.families import diffusion

    spec = manager.catalog.get(model_id)
    if spec.task != TASK:
        raise InvalidRequest(f"{model_id} is not a text-to-image model. "
                         f"Choose one of: {', '.join(manager.catalog.ids(TASK))}")
    defaults = diffusion.defaults_for(spec)
    return {"width": defaults.width, "height": defaults.height, "steps": defaults.steps,
            "guidance": defaults.guidance, "max_steps": defaults.max_steps, "max_side": defaults.max_side,
            "sizes": list(defaults.sizes), "variant": diffusion.variant_of(spec)}


def precision_for(manager, model_id: str, precision: str) -> str | None:
    """The quant to ask the manager for (None = the catalog's default for this device)."""
    if precision in (None, "", "auto"):
        return None
    if precision not in PRECISIONS:
        raise InvalidRequest(f"Unknown precision {precision!r}. Choose one of: {', '.join(PRECISIONS)}")
    if precision == "nf4" and manager.device != "cuda":
        raise InvalidRequest(f"4-bit (nf4) needs CUDA; this workbench runs on {manager.device}. Choose auto or fp32.")
    return precision


def txt2img(manager, settings, prompt: str = "", negative_prompt: str = "", style: str = "none",
            model: str | None = None, width=None, height=None, steps=None, guidance=None, seed=-1,
            num_images=1, scheduler: str | None = None, precision: str = "auto", attention_slicing: bool = False,
            vae_tiling: bool = False, cpu_offload: bool = False, safety_checker: bool = True, *,
            stop: threading.Event | None = None, on_step=None) -> tuple[list[tuple[str, str]], dict]:
    """Generate images, save them as PNGs with their recipe, and return (gallery items, info).

    Everything is validated before the model is loaded. ``None`` for width/height/steps/guidance
    means the model's default; seed -1 picks one at random (``info["seed"]`` is the one used).
    """
    from models import __version__, pnginfo
    from models.catalog import UnknownModelError
    from models.families import diffusion
    from models.quantization import choose

    # 1. Check inputs: model, precision, styles, then every number and text
    model = model or default_model(manager, settings, TASK)
    try:
        spec = manager.catalog.get(model)
    except UnknownModelError:
        raise InvalidRequest(f"Unknown model {model!r}. Text-to-image models: "
                         f"{', '.join(manager.catalog.ids(TASK))}") from None
    if spec.task != TASK:
        raise InvalidRequest(f"{model} is not a text-to-image model. Choose one of: {', '.join(manager.catalog.ids(TASK))}")
    quant = precision_for(manager, model, precision)
    precision_name = choose(spec, manager.device, quant).name
    styles = diffusion.load_styles(settings.cache_dir)
    request, notices = diffusion.check_request(
        spec, prompt=prompt, negative_prompt=negative_prompt, style=style, width=width, height=height, steps=steps,
        guidance=guidance, seed=seed, num_images=num_images, scheduler=scheduler or diffusion.DEFAULT_SCHEDULER,
        attention_slicing=attention_slicing, vae_tiling=vae_tiling, cpu_offload=cpu_offload,
        safety_checker=safety_checker, styles=styles, budget_bytes=manager.budget, precision_name=precision_name)
    # 2. Generate with the model pinned only for the call
    with manager.use(model, quant) as handle:
        result = diffusion.generate(handle, request, styles=styles, stop=stop, on_step=on_step, notices=notices)
        has_checker = handle.has_safety_checker
        device, loaded_precision = handle.device, handle.precision
    # 3. Save every image with its full recipe
    gallery, files = [], []
    for index, (image, image_seed) in enumerate(zip(result.images, result.seeds, strict=False)):
        recipe = pnginfo.make_recipe(
            prompt=request.prompt, negative_prompt=request.negative_prompt, style=request.style, model=spec.id,
            scheduler=request.scheduler, steps=request.steps, guidance=request.guidance, seed=image_seed,
            width=request.width, height=request.height, workbench_version=__version__)
        path = pnginfo.save_png(image, recipe, settings.outputs_dir, index)
        files.append(str(path))
        gallery.append((str(path), f"seed {image_seed}"))
    info = {
        "model": spec.id, "seed": request.seed, "seeds": result.seeds, "width": request.width,
        "height": request.height, "steps": request.steps, "steps_done": result.steps_done,
        "guidance": request.guidance, "scheduler": request.scheduler, "style": request.style,
        "num_images": request.num_images, "stopped": result.stopped, "files": files,
        "attention_backend": result.attention_backend, "device": device, "precision": loaded_precision,
        "safety_checker": "on" if (request.safety_checker and has_checker) else
        ("off" if has_checker else f"none ({spec.id} ships no safety checker)"),
        "nsfw_flagged": result.nsfw_flagged, "notices": result.notices, "seconds": round(result.seconds, 3),
    }
    return gallery, info


def png_info(path) -> dict:
    """The recipe stored in a workbench PNG (ValueError for other PNGs and damaged files)."""
    from models import pnginfo

    if isinstance(path, dict):  # gradio_client sends FileData
        path = path.get("path")
    return pnginfo.read_recipe(path)


def recipe_controls(manager, recipe: dict) -> tuple[dict, list[str]]:
    """Control values that reproduce ``recipe`` (one image with its own seed) and notices."""
    notices = []
    model = recipe["model"]
    if model not in manager.catalog:
        notices.append(f"This image was made with {model}, which is not in this workbench's catalog; "
                       "the model choice was left as it is.")
        model = None
    values = {key: recipe[key] for key in ("prompt", "negative_prompt", "style", "scheduler", "steps",
                                           "guidance", "seed", "width", "height")}
    return {**values, "model": model, "num_images": 1}, notices


def backend_markdown(info: dict) -> str:
    return f"**Attention backend:** {info.get('attention_backend', '?')} · device {info.get('device', '?')} · " \
           f"{info.get('precision', '?')}"


# ---- UI ------------------------------------------------------------------------------------------

def build(manager, settings) -> None:
    from models.families import diffusion

    first_model = default_model(manager, settings, TASK)
    defaults = model_defaults(manager, first_model)
    try:
        style_names = list(diffusion.load_styles(settings.cache_dir))
        styles_note = f"Styles from {diffusion.styles_file(settings.cache_dir)}"
    except ValueError as exc:  # a broken user file must not stop the app; the run reports it again
        style_names, styles_note = ["none"], f"⚠ {exc}"
    schedulers = list(diffusion.SCHEDULERS)
    # Gradio checks slider bounds on the server against the initial config, for API calls too, so
    # the bounds cover every model; check_request enforces each model's own limits.
    max_side = max(v.max_side for v in diffusion.VARIANTS.values())
    max_steps = max(v.max_steps for v in diffusion.VARIANTS.values())

    with gr.Row():
        with gr.Column(scale=3):
            prompt = gr.Textbox(label="Prompt", lines=3, placeholder="a lighthouse at dawn, mist over the sea",
                                elem_id="t2i-prompt")
            negative_prompt = gr.Textbox("", label="Negative prompt", lines=2, placeholder="blurry, low quality")
            with gr.Row():
                style = gr.Dropdown(style_names, value="none", label="Style", info=styles_note)
                model = gr.Dropdown(model_choices(manager, TASK), value=first_model, label="Model")
            with gr.Row():
                size_preset = gr.Dropdown(defaults["sizes"] + ["custom"], value=defaults["sizes"][0],
                                          label="Size preset")
                width = gr.Slider(diffusion.MIN_SIDE, max_side, value=defaults["width"], step=8, label="Width")
                height = gr.Slider(diffusion.MIN_SIDE, max_side, value=defaults["height"], step=8, label="Height")
            with gr.Row():
                steps = gr.Slider(1, max_steps, value=defaults["steps"], step=1, label="Steps",
                                  info=f"up to {defaults['max_steps']} for this model")
                guidance = gr.Slider(0.0, diffusion.MAX_GUIDANCE, value=defaults["guidance"], step=0.5,
                                     label="Guidance (CFG)")
                scheduler = gr.Dropdown(schedulers, value=diffusion.DEFAULT_SCHEDULER, label="Scheduler")
            with gr.Row():
                seed = gr.Number(-1, label="Seed (-1 = random)", precision=0)
                num_images = gr.Slider(1, diffusion.MAX_IMAGES, value=1, step=1, label="Number of images")
            with gr.Accordion("Memory and safety", open=False):
                with gr.Row():
                    precision = gr.Dropdown(list(PRECISIONS), value="auto", label="Precision",
                                            info="auto: fp16 on CUDA, fp32 on CPU; nf4 = 4-bit, CUDA only")
                    attention_slicing = gr.Checkbox(False, label="Attention slicing")
                    vae_tiling = gr.Checkbox(False, label="VAE tiling")
                    cpu_offload = gr.Checkbox(False, label="Model CPU offload (CUDA)")
                safety_checker = gr.Checkbox(diffusion.SAFETY_DEFAULT, label="Safety checker", info=SAFETY_HELP)
            backend = gr.Markdown(BACKEND_PLACEHOLDER, elem_id="t2i-backend")
            with gr.Row():
                run_btn = gr.Button("Generate", variant="primary", elem_id="t2i-generate")
                stop_btn = gr.Button("Stop", variant="stop", elem_id="t2i-stop")
        with gr.Column(scale=3):
            gallery = gr.Gallery(label="Images (PNG with the recipe inside)", columns=2, height="auto",
                                 elem_id="t2i-gallery", format="png")
            info = gr.JSON(label="Run info", elem_id="t2i-info")
            with gr.Accordion("PNG Info: drop a workbench PNG to reuse its settings", open=False):
                png_file = gr.File(label="Workbench PNG", file_types=[".png"], type="filepath")
                recipe_json = gr.JSON(label="Recipe")
    stops = StopRegistry()
    controls = [prompt, negative_prompt, style, model, width, height, steps, guidance, seed, num_images, scheduler,
                precision, attention_slicing, vae_tiling, cpu_offload, safety_checker]

    @gpu
    @user_errors
    def generate(prompt, negative_prompt, style, model, width, height, steps, guidance, seed, num_images, scheduler,
                 precision, attention_slicing, vae_tiling, cpu_offload, safety_checker, request: gr.Request = None,
                 progress=gr.Progress()):
        """Generate images; returns the gallery and an info dict with the seed actually used."""
        session = getattr(request, "session_hash", None) or f"anonymous-{threading.get_ident()}"
        stop = stops.start(session)
        progress((0, None), desc="Loading model")
        try:
            items, run_info = txt2img(
                manager, settings, prompt, negative_prompt, style, model, width, height, steps, guidance, seed,
                num_images, scheduler, precision, attention_slicing, vae_tiling, cpu_offload, safety_checker,
                stop=stop, on_step=lambda done, total: progress((done, total), desc="Denoising", unit="steps"))
        finally:
            stops.finish(session, stop)
        for notice in run_info["notices"]:
            gr.Info(notice)
        return items, run_info

    def request_stop(request: gr.Request = None):
        if not stops.stop(getattr(request, "session_hash", None) or ""):
            gr.Info("Nothing is running.")

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

    def read_png(path) -> dict:
        """The recipe stored in a workbench PNG (prompt, model, seed, size...)."""
        return png_info(path)

    def apply_recipe(recipe):
        if not recipe:
            return [gr.update()] * 12
        values, notices = recipe_controls(manager, recipe)
        for notice in notices:
            gr.Warning(notice)
        gr.Info("Settings from the PNG are in the controls; press Generate to reproduce the image.")
        keep = gr.update()
        return (values["prompt"], values["negative_prompt"],
                values["style"] if values["style"] in style_names else keep,
                values["model"] or keep, "custom", values["width"], values["height"], values["steps"],
                values["guidance"], values["seed"], values["num_images"], values["scheduler"])

    run_event = run_btn.click(generate, inputs=controls, outputs=[gallery, info], api_name="txt2img",
                              **GPU_QUEUE)
    run_event.then(backend_markdown, inputs=info, outputs=backend, api_visibility="private", queue=False)
    prompt.submit(generate, inputs=controls, outputs=[gallery, info], api_visibility="private",
                  **GPU_QUEUE).then(backend_markdown, inputs=info, outputs=backend, api_visibility="private",
                                    queue=False)
    # Stop must not wait behind the run it interrupts, so it skips the GPU queue.
    stop_btn.click(request_stop, api_visibility="private", queue=False)
    # .input (not .change) so that a recipe loaded from a PNG is not reset to the model's defaults.
    model.input(user_errors(on_model_change), inputs=model, outputs=[size_preset, width, height, steps, guidance],
                 api_visibility="private", queue=False)
    size_preset.input(on_size_preset, inputs=size_preset, outputs=[width, height], api_visibility="private",
                       queue=False)
    # The recipe goes to the controls in a second step, so /png_info returns just the recipe.
    png_file.upload(user_errors(read_png), inputs=png_file, outputs=recipe_json, api_name="png_info").success(
        apply_recipe, inputs=recipe_json, api_visibility="private",
        outputs=[prompt, negative_prompt, style, model, size_preset, width, height, steps, guidance, seed,
                 num_images, scheduler])
