"""Text to image: the request, its validation, the run that saves PNGs with their recipe, and PNG Info.

No gradio here: the text-to-image tab and the API call these functions.
"""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

from models import limits, retention
from models.checks import check_choice, check_model
from models.errors import InvalidRequest

TASK = "text-to-image"
PRECISIONS = ("auto", "fp32", "fp16", "nf4")


def model_defaults(manager, model_id: str) -> dict:
    """Sizes, steps and guidance the model was made for, and the limits the controls allow (the tab's
    sliders take these when the model changes)."""
    from models.families import diffusion

    spec = check_model(manager.catalog, model_id, TASK)
    defaults = diffusion.defaults_for(spec)
    return {"width": defaults.width, "height": defaults.height, "steps": defaults.steps,
            "guidance": defaults.guidance, "max_steps": defaults.max_steps, "max_side": defaults.max_side,
            "sizes": list(defaults.sizes), "variant": diffusion.variant_of(spec)}


def precision_for(manager, model_id: str, precision: str) -> str | None:
    """The quant to ask the manager for (None = the catalog's default for this device)."""
    if precision in (None, "", "auto"):
        return None
    check_choice("precision", precision, PRECISIONS)
    if precision == "nf4" and manager.device != "cuda":
        raise InvalidRequest(f"4-bit (nf4) needs CUDA; this workbench runs on {manager.device}. Choose auto or fp32.")
    return precision


@dataclasses.dataclass(frozen=True)
class Txt2ImgRequest:
    """One text-to-image run, validated against the model's own limits and the memory budget."""

    model: str
    quant: str | None  # None: the catalog's default for this device
    image: object  # models.families.diffusion.ImageRequest
    notices: tuple = ()

    @classmethod
    def build(cls, manager, settings, *, prompt="", negative_prompt="", style="none", model=None, width=None,
              height=None, steps=None, guidance=None, seed=-1, num_images=1, scheduler=None, precision="auto",
              attention_slicing=False, vae_tiling=False, cpu_offload=False, safety_checker=True) -> Txt2ImgRequest:
        """Check every value before the model is loaded.

        ``None`` for width/height/steps/guidance means the model's default; seed -1 picks one at
        random (the request holds the one used).
        """
        from models.families import diffusion
        from models.quantization import choose

        spec = check_model(manager.catalog, model or manager.catalog.default_for(TASK, settings.offline), TASK)
        quant = precision_for(manager, spec.id, precision)
        image, notices = diffusion.check_request(
            spec, prompt=prompt, negative_prompt=negative_prompt, style=style, width=width, height=height,
            steps=steps, guidance=guidance, seed=seed, num_images=num_images,
            scheduler=scheduler or diffusion.DEFAULT_SCHEDULER, attention_slicing=attention_slicing,
            vae_tiling=vae_tiling, cpu_offload=cpu_offload, safety_checker=safety_checker,
            styles=diffusion.load_styles(settings.cache_dir), budget_bytes=manager.budget,
            precision_name=choose(spec, manager.device, quant).name)
        return cls(model=spec.id, quant=quant, image=image, notices=tuple(notices))


def txt2img(manager, settings, request: Txt2ImgRequest, *, stop: threading.Event | None = None,
            on_step=None) -> tuple[list[tuple[str, str]], dict]:
    """Generate images, save them as PNGs with their recipe, and return (gallery items, info)."""
    from models import __version__, pnginfo
    from models.families import diffusion

    spec, image_request = manager.catalog.get(request.model), request.image
    styles = diffusion.load_styles(settings.cache_dir)
    notices = list(request.notices)
    stop = limits.StopFlag(stop)  # this run's Stop, and the call's (closed connection, time cap)
    # Generate with the model pinned only for the call
    with manager.use(request.model, request.quant) as handle:
        result = diffusion.generate(handle, image_request, styles=styles, stop=stop, on_step=on_step,
                                    notices=notices)
        if result.stopped and (notice := limits.timeout_notice()):
            result.notices.append(notice)
        has_checker = handle.has_safety_checker
        device, loaded_precision = handle.device, handle.precision
    # Save every image with its full recipe
    gallery, files = [], []
    for index, (image, image_seed) in enumerate(zip(result.images, result.seeds, strict=False)):
        recipe = pnginfo.make_recipe(
            prompt=image_request.prompt, negative_prompt=image_request.negative_prompt, style=image_request.style,
            model=spec.id, scheduler=image_request.scheduler, steps=image_request.steps,
            guidance=image_request.guidance, seed=image_seed, width=image_request.width,
            height=image_request.height, workbench_version=__version__, limits=settings.limits)
        path = pnginfo.save_png(image, recipe, settings.outputs_dir, index)
        files.append(str(path))
        gallery.append((str(path), f"seed {image_seed}"))
    retention.enforce(settings, protect=[Path(file) for file in files])  # older images make room, oldest first
    info = {
        "model": spec.id, "seed": image_request.seed, "seeds": result.seeds, "width": image_request.width,
        "height": image_request.height, "steps": image_request.steps, "steps_done": result.steps_done,
        "guidance": image_request.guidance, "scheduler": image_request.scheduler, "style": image_request.style,
        "num_images": image_request.num_images, "batch_size": min(image_request.batch_size, image_request.num_images),
        "pipeline_calls": result.pipeline_calls, "stopped": result.stopped, "stopped_at": result.stopped_at,
        "files": files,
        "attention_backend": result.attention_backend, "device": device, "precision": loaded_precision,
        "safety_checker": "on" if (image_request.safety_checker and has_checker) else
        ("off" if has_checker else f"none ({spec.id} ships no safety checker)"),
        "nsfw_flagged": result.nsfw_flagged, "notices": result.notices, "seconds": round(result.seconds, 3),
    }
    return gallery, info


def png_info(path, limits=None) -> dict:
    """The recipe stored in a workbench PNG (InvalidRequest for other PNGs and damaged files)."""
    from models import pnginfo

    if isinstance(path, dict):  # gradio_client sends FileData
        path = path.get("path")
    return pnginfo.read_recipe(path, limits=limits)


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
