"""Diffusion family: Stable Diffusion 1.5, SD-Turbo, SDXL and SDXL-Turbo through AutoPipelineForText2Image.

Defaults follow the catalog ``variant`` (sd15 | turbo | sdxl | sdxl-turbo | tiny). Requests are
validated before anything is loaded (``check_request``), so bad input never pins a model.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path

from models.catalog import ModelSpec
from models.checks import check_flag, check_number, check_text
from models.errors import InvalidRequest, TooLarge
from models.limits import format_bytes
from models.quantization import Precision, diffusers_kwargs

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class VariantDefaults:
    """What a model variant was trained for: size, steps, guidance, and the limits we allow."""

    width: int
    height: int
    steps: int
    guidance: float
    max_steps: int
    max_side: int
    sizes: tuple[str, ...]
    activation_bytes_per_pixel: int  # rough fp16 peak per output pixel, for the budget check


VARIANTS = {
    "tiny": VariantDefaults(64, 64, 4, 5.0, 50, 512, ("64x64", "128x128", "128x64", "64x128"), 64),
    "sd15": VariantDefaults(512, 512, 25, 7.5, 100, 1024, ("512x512", "512x768", "768x512", "640x640", "768x768"),
                            3000),
    "turbo": VariantDefaults(512, 512, 1, 0.0, 10, 1024, ("512x512", "512x768", "768x512"), 3000),
    "sdxl": VariantDefaults(1024, 1024, 30, 7.0, 100, 2048,
                            ("1024x1024", "1152x896", "896x1152", "1216x832", "832x1216", "1344x768", "768x1344"),
                            4000),
    "sdxl-turbo": VariantDefaults(512, 512, 1, 0.0, 10, 1024, ("512x512", "768x768", "1024x1024"), 4000),
}
MIN_SIDE = 64
MAX_IMAGES = 4
MAX_GUIDANCE = 30.0
MAX_SEED = 2**32 - 1
MAX_PROMPT_CHARS = 4000
DEFAULT_SCHEDULER = "Default (model's own)"
# name -> (diffusers class, extra config); built from the loaded scheduler's config so that the
# model's beta schedule and timestep spacing (trailing for Turbo) are kept.
SCHEDULERS = {
    DEFAULT_SCHEDULER: (None, {}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "Euler": ("EulerDiscreteScheduler", {}),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}),
    "DDIM": ("DDIMScheduler", {}),
}
BUILTIN_STYLES = Path(__file__).resolve().parent.parent / "styles.yaml"
STYLES_ENV = "WORKBENCH_STYLES_FILE"
SAFETY_DEFAULT = True  # diffusers' own default: check images when the repo ships a checker


def variant_of(spec: ModelSpec) -> str:
    variant = spec.variant or ("tiny" if spec.source == "offline" else "sd15")
    if variant not in VARIANTS:
        raise InvalidRequest(f"{spec.id}: unknown diffusion variant {variant!r}; use one of {', '.join(VARIANTS)}")
    return variant


def defaults_for(spec: ModelSpec) -> VariantDefaults:
    return VARIANTS[variant_of(spec)]


# ---- style presets ---------------------------------------------------------------------------

def styles_file(cache_dir: Path | None) -> Path:
    """Which styles file is in effect: $WORKBENCH_STYLES_FILE, else <cache>/styles.yaml, else the built-in one."""
    override = os.environ.get(STYLES_ENV, "").strip()
    if override:
        return Path(override).expanduser()
    if cache_dir is not None and (Path(cache_dir) / "styles.yaml").is_file():
        return Path(cache_dir) / "styles.yaml"
    return BUILTIN_STYLES


def load_styles(cache_dir: Path | None = None) -> dict[str, dict[str, str]]:
    """Style name -> {"prompt": template with {prompt}, "negative": text}, read from the styles file."""
    import yaml

    path = styles_file(cache_dir)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise InvalidRequest(f"Cannot read the styles file {path}: {exc}") from exc
    entries = data.get("styles") if isinstance(data, dict) else None
    if not isinstance(entries, dict) or not entries:
        raise InvalidRequest(f"{path}: expected a mapping of style names under 'styles:'")
    styles = {}
    for name, entry in entries.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("prompt", ""), str) \
                or "{prompt}" not in entry.get("prompt", ""):
            raise InvalidRequest(f"{path}: style {name!r} needs a 'prompt' text that contains {{prompt}}")
        negative = entry.get("negative") or ""
        if not isinstance(negative, str):
            raise InvalidRequest(f"{path}: the 'negative' of style {name!r} must be text")
        styles[str(name)] = {"prompt": entry["prompt"], "negative": negative}
    styles.setdefault("none", {"prompt": "{prompt}", "negative": ""})
    return styles


def apply_style(styles: dict, style: str, prompt: str, negative_prompt: str) -> tuple[str, str]:
    """The prompt and negative prompt after the style preset is applied."""
    if style not in styles:
        raise InvalidRequest(f"Unknown style {style!r}. Styles: {', '.join(styles)}")
    preset = styles[style]
    styled = preset["prompt"].replace("{prompt}", prompt).strip(" ,") if prompt.strip() else prompt
    negative = ", ".join(part for part in (preset["negative"], negative_prompt.strip()) if part)
    return styled, negative


# ---- request validation (no torch) -----------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ImageRequest:
    """One validated text-to-image request; ``seed`` is the seed of the first image."""

    prompt: str
    negative_prompt: str
    style: str
    width: int
    height: int
    steps: int
    guidance: float
    seed: int
    num_images: int = 1
    scheduler: str = DEFAULT_SCHEDULER
    attention_slicing: bool = False
    vae_tiling: bool = False
    cpu_offload: bool = False
    safety_checker: bool = SAFETY_DEFAULT

    @property
    def seeds(self) -> list[int]:
        return [(self.seed + index) % (MAX_SEED + 1) for index in range(self.num_images)]


def clean_text(name: str, value) -> str:
    """A prompt from the UI or the API: text of at most MAX_PROMPT_CHARS that can be written as UTF-8."""
    return check_text(f"The {name}", "" if value is None else value, MAX_PROMPT_CHARS, required=False)


def activation_bytes(spec: ModelSpec, precision_name: str, width: int, height: int, num_images: int,
                     attention_slicing: bool, vae_tiling: bool) -> int:
    """Rough peak working memory of one run beyond the weights (latents, attention, VAE decode)."""
    per_pixel = defaults_for(spec).activation_bytes_per_pixel * (2 if precision_name == "fp32" else 1)
    if attention_slicing or vae_tiling:
        per_pixel //= 2
    return int(width * height * num_images * per_pixel)


def check_request(spec: ModelSpec, *, prompt="", negative_prompt="", style="none", width=None, height=None,
                  steps=None, guidance=None, seed=-1, num_images=1, scheduler=DEFAULT_SCHEDULER,
                  attention_slicing=False, vae_tiling=False, cpu_offload=False, safety_checker=SAFETY_DEFAULT,
                  styles: dict | None = None, budget_bytes: int | None = None, precision_name: str = "fp32",
                  ) -> tuple[ImageRequest, list[str]]:
    """Validate raw UI/API values for ``spec`` and return the request plus notices for the user.

    ``None`` for width, height, steps or guidance means the model's default. A seed of -1 picks a
    random seed; the request holds the one actually used.

    Raises:
        ValueError: with a message that says what to change.
    """
    if spec.family != "diffusion":
        raise InvalidRequest(f"{spec.id} is not a text-to-image model")
    defaults = defaults_for(spec)
    notices: list[str] = []
    prompt = clean_text("prompt", prompt)
    negative_prompt = clean_text("negative prompt", negative_prompt)
    attention_slicing = check_flag("attention_slicing", attention_slicing)
    vae_tiling = check_flag("vae_tiling", vae_tiling)
    cpu_offload, safety_checker = check_flag("cpu_offload", cpu_offload), check_flag("safety_checker", safety_checker)
    if not prompt.strip():
        notices.append("The prompt is empty: the model draws from noise alone (unconditional generation).")
    if not isinstance(style, str) or not style:
        style = "none"
    if styles is not None and style not in styles:
        raise InvalidRequest(f"Unknown style {style!r}. Styles: {', '.join(styles)}")
    if not isinstance(scheduler, str) or scheduler not in SCHEDULERS:
        raise InvalidRequest(f"Unknown scheduler {scheduler!r}. Schedulers: {', '.join(SCHEDULERS)}")
    side_hint = f" for {spec.id} (and a multiple of 8)"
    width = check_number("width", defaults.width if width is None else width, MIN_SIDE, defaults.max_side,
                         True, side_hint)
    height = check_number("height", defaults.height if height is None else height, MIN_SIDE, defaults.max_side,
                          True, side_hint)
    for name, side in (("width", width), ("height", height)):
        if side % 8:
            raise InvalidRequest(f"{name} must be a multiple of 8, got {side}; try {side - side % 8} or "
                             f"{side - side % 8 + 8}")
    steps = check_number("steps", defaults.steps if steps is None else steps, 1, defaults.max_steps, True,
                         f" for {spec.id}")
    guidance = check_number("guidance", defaults.guidance if guidance is None else guidance, 0.0, MAX_GUIDANCE, False)
    num_images = check_number("number of images", num_images, 1, MAX_IMAGES, True)
    seed = check_number("seed", -1 if seed is None else seed, -1, MAX_SEED, True, " (-1 picks a random seed)")
    if seed == -1:
        seed = secrets.randbelow(MAX_SEED + 1)
    if budget_bytes is not None:
        needed = spec.estimate_bytes(precision_name) + activation_bytes(
            spec, precision_name, width, height, num_images, attention_slicing, vae_tiling)
        if needed > budget_bytes:
            raise TooLarge(
                f"{width}x{height} x {num_images} image(s) needs about {format_bytes(needed)} with {spec.id}, "
                f"more than the {format_bytes(budget_bytes)} memory budget. Lower the size or the number of "
                "images, enable attention slicing / VAE tiling, or raise --memory-budget.")
    if guidance <= 1.0 and negative_prompt.strip():
        notices.append("Guidance is at most 1, so classifier-free guidance is off and the negative prompt "
                       "has no effect.")
    request = ImageRequest(prompt=prompt, negative_prompt=negative_prompt, style=style, width=width, height=height,
                           steps=steps, guidance=guidance, seed=seed, num_images=num_images, scheduler=scheduler,
                           attention_slicing=attention_slicing, vae_tiling=vae_tiling, cpu_offload=cpu_offload,
                           safety_checker=safety_checker)
    return request, notices


# ---- loading ---------------------------------------------------------------------------------

@dataclasses.dataclass(eq=False)
class DiffusionHandle:
    """A loaded pipeline and the state of its memory options (toggled per request)."""

    pipe: object
    spec_id: str
    variant: str
    device: str
    precision: str
    attention_backend: str
    safety_checker: object | None = None  # kept here so the per-request checkbox can detach it
    default_scheduler: object | None = None
    attention_slicing: bool = False
    vae_tiling: bool = False
    offloaded: bool = False

    @property
    def has_safety_checker(self) -> bool:
        return self.safety_checker is not None


def probe_xformers(device: str) -> str:
    """"" when xformers imports and a probe attention call succeeds on CUDA, else the reason it is not used."""
    if device != "cuda":
        return "xformers needs CUDA"
    try:
        import torch
        import xformers.ops

        query = torch.randn(1, 8, 2, 16, device="cuda", dtype=torch.float16)
        xformers.ops.memory_efficient_attention(query, query, query)
        torch.cuda.synchronize()
    except ImportError as exc:
        return f"xformers is not installed ({exc.name})"
    except Exception as exc:  # noqa: BLE001 - a broken CUDA extension raises many kinds of error
        return f"xformers failed its probe ({exc.__class__.__name__}: {str(exc)[:120]})"
    return ""


def select_attention(pipe, device: str) -> str:
    """Use xformers when it imports and works on this GPU; PyTorch SDPA otherwise. Returns the backend name."""
    reason = probe_xformers(device)
    if not reason:
        try:
            pipe.enable_xformers_memory_efficient_attention()
            return "xformers"
        except Exception as exc:  # noqa: BLE001 - fall back to SDPA on any xformers failure
            reason = f"xformers could not be enabled ({exc.__class__.__name__})"
    log.info("attention backend: SDPA (%s)", reason)
    return "SDPA"


def load(spec: ModelSpec, location: str, precision: Precision) -> DiffusionHandle:
    from diffusers import AutoPipelineForText2Image

    if precision.name == "nf4" and precision.device != "cuda":
        raise InvalidRequest("4-bit (nf4) diffusion needs CUDA; choose fp32 on this machine")
    kwargs = diffusers_kwargs(precision)
    pipe = AutoPipelineForText2Image.from_pretrained(location, **kwargs)
    pipe.to(precision.device)
    pipe.set_progress_bar_config(disable=True)
    return DiffusionHandle(pipe=pipe, spec_id=spec.id, variant=variant_of(spec), device=precision.device,
                           precision=precision.name, attention_backend=select_attention(pipe, precision.device),
                           safety_checker=getattr(pipe, "safety_checker", None),
                           default_scheduler=pipe.scheduler)


def release(handle: DiffusionHandle) -> None:
    """Undo model CPU offload (accelerate hooks keep references) and drop the handle's references."""
    pipe = handle.pipe
    if pipe is not None:
        if handle.offloaded:
            pipe.maybe_free_model_hooks()
            pipe.remove_all_hooks()
            handle.offloaded = False
        if hasattr(pipe, "safety_checker"):
            pipe.safety_checker = handle.safety_checker
    handle.pipe = None
    handle.safety_checker = None
    handle.default_scheduler = None


def build_tiny(folder: Path) -> None:
    """A deterministic random-weight Stable Diffusion pipeline: 64x64 images in a fraction of a second."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from models.offline import seeded

    tokenizer = tiny_clip_tokenizer()
    seeded()
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16, norm_num_groups=4, attention_head_dim=(2, 4))
    vae = AutoencoderKL(
        block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), sample_size=64)
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=77, layer_norm_eps=1e-5, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    text_encoder = CLIPTextModel(text_config)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       timestep_spacing="leading", steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)


def tiny_clip_tokenizer():
    """A CLIP BPE tokenizer over single bytes (no merges): every character is one token, 77 at most."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())  # the 256 byte symbols CLIP's BPE starts from
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for symbol in symbols + [f"{s}</w>" for s in symbols]:
        vocab.setdefault(symbol, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


# ---- generation ------------------------------------------------------------------------------

@dataclasses.dataclass
class GenerationResult:
    images: list
    seeds: list[int]
    steps_done: int
    stopped: bool
    nsfw_flagged: list[bool]
    notices: list[str]
    attention_backend: str
    seconds: float


def token_overflow(tokenizer, text: str) -> str:
    """The part of ``text`` the text encoder does not read (its 77-token window), or ""."""
    if not text:
        return ""
    limit = int(getattr(tokenizer, "model_max_length", 77) or 77)
    ids = tokenizer(text, truncation=False, add_special_tokens=False)["input_ids"]
    room = limit - 2  # start and end tokens take two places
    if len(ids) <= room:
        return ""
    return tokenizer.decode(ids[room:], skip_special_tokens=True).strip() or f"{len(ids) - room} tokens"


def use_scheduler(handle: DiffusionHandle, name: str) -> None:
    """Swap the pipeline's scheduler; built from the model's own config so its schedule is kept."""
    import diffusers

    class_name, extra = SCHEDULERS[name]
    if class_name is None:
        handle.pipe.scheduler = handle.default_scheduler
        return
    config = handle.default_scheduler.config
    if type(handle.pipe.scheduler).__name__ != class_name or any(
            handle.pipe.scheduler.config.get(k) != v for k, v in extra.items()):
        handle.pipe.scheduler = getattr(diffusers, class_name).from_config(config, **extra)


def apply_memory_options(handle: DiffusionHandle, request: ImageRequest, notices: list[str]) -> None:
    """Toggle attention slicing, VAE tiling and model CPU offload to what the request asks."""
    pipe = handle.pipe
    if request.attention_slicing != handle.attention_slicing:
        if request.attention_slicing:
            pipe.enable_attention_slicing()
        else:
            pipe.disable_attention_slicing()
            if handle.attention_backend == "xformers":  # disabling slicing restores the default processor
                pipe.enable_xformers_memory_efficient_attention()
        handle.attention_slicing = request.attention_slicing
    if request.vae_tiling != handle.vae_tiling:
        (pipe.vae.enable_tiling if request.vae_tiling else pipe.vae.disable_tiling)()
        handle.vae_tiling = request.vae_tiling
    wants_offload = request.cpu_offload and handle.device == "cuda"
    if request.cpu_offload and handle.device != "cuda":
        notices.append(f"Model CPU offload only applies on CUDA; ignored on {handle.device}.")
    if wants_offload != handle.offloaded:
        if wants_offload:
            pipe.enable_model_cpu_offload(device=handle.device)
        else:
            pipe.remove_all_hooks()
            pipe.to(handle.device)
        handle.offloaded = wants_offload


def attention_label(handle: DiffusionHandle) -> str:
    return f"{handle.attention_backend} + attention slicing" if handle.attention_slicing else handle.attention_backend


def generate(handle: DiffusionHandle, request: ImageRequest, *, styles: dict | None = None,
             stop: threading.Event | None = None, on_step: Callable[[int, int], None] | None = None,
             notices: list[str] | None = None) -> GenerationResult:
    """Run the pipeline for a validated request.

    Image *i* is drawn with a CPU ``torch.Generator`` seeded ``seed + i``, so the same model,
    settings and seed give the same pixels on any device, and each image can be re-made alone.
    ``stop`` is checked after every denoising step; once set, the remaining steps are skipped and only
    images that finished before it are returned.
    """
    import torch

    started = time.perf_counter()
    notices = list(notices or [])
    pipe = handle.pipe
    # 1. Prompts after the style preset, and what the 77-token text encoder will not read
    styles = styles if styles is not None else load_styles(None)
    prompt, negative = apply_style(styles, request.style, request.prompt, request.negative_prompt)
    for label, text in (("prompt", prompt), ("negative prompt", negative)):
        cut = token_overflow(pipe.tokenizer, text)
        if cut:
            notices.append(f"The {label} is longer than the text encoder's {pipe.tokenizer.model_max_length} "
                           f"tokens; this part was cut: \"{cut}\"")
    # 2. Scheduler, memory options, safety checker
    use_scheduler(handle, request.scheduler)
    apply_memory_options(handle, request, notices)
    if hasattr(pipe, "safety_checker"):
        pipe.safety_checker = handle.safety_checker if request.safety_checker else None
    # 3. One pipeline call per image, each with its own CPU generator: batching changes the float
    #    rounding, so only this way does a PNG's recipe (one seed) re-make exactly the same pixels.
    total = request.steps * request.num_images
    steps_done = 0
    images, flagged = [], []

    def on_step_end(pipeline, step, timestep, callback_kwargs):
        nonlocal steps_done
        steps_done += 1
        if on_step is not None:
            on_step(steps_done, total)
        if stop is not None and stop.is_set():
            pipeline._interrupt = True  # diffusers skips the remaining steps
        return callback_kwargs

    # 4. Denoise and decode
    kwargs = {"negative_prompt": negative or None} if request.guidance > 1.0 else {}
    try:
        with torch.inference_mode():
            for seed in request.seeds:
                if stop is not None and stop.is_set():
                    break
                output = pipe(prompt=prompt, width=request.width, height=request.height,
                              num_inference_steps=request.steps, guidance_scale=request.guidance,
                              num_images_per_prompt=1, generator=torch.Generator("cpu").manual_seed(seed),
                              callback_on_step_end=on_step_end, output_type="pil", **kwargs)
                if stop is not None and stop.is_set():
                    break  # this image was cut short: its pixels are half-denoised noise
                images.extend(output.images)
                flagged.extend(getattr(output, "nsfw_content_detected", None) or [False] * len(output.images))
    finally:
        pipe.maybe_free_model_hooks()
    stopped = bool(stop is not None and stop.is_set())
    if any(flagged):
        notices.append("The safety checker blacked out flagged image(s).")
    if stopped:
        notices.append(f"Stopped after {steps_done} of {total} steps; kept {len(images)} finished image(s).")
    return GenerationResult(images=images, seeds=request.seeds,
                            steps_done=steps_done, stopped=stopped, nsfw_flagged=[bool(f) for f in flagged],
                            notices=notices, attention_backend=attention_label(handle),
                            seconds=time.perf_counter() - started)
