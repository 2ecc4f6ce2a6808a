"""Diffusion family: Stable Diffusion 1.5, SD-Turbo, SDXL and SDXL-Turbo through AutoPipelineForText2Image.

Defaults follow the catalog ``variant`` (sd15 | turbo | sdxl | sdxl-turbo | tiny). Requests are
validated before anything is loaded (``check_request``), so bad input never pins a model; a folder
that is not a complete text-to-image pipeline is refused before its weights load. ``build_tiny``
builds tiny-sd and the random-weight twins of the four hub architectures (``TWIN_ARCHS``).

Text to video: the catalog's ``text-to-video`` entries of this family are AnimateDiff motion
adapters (``MotionAdapter``; variant animatediff | lightning | tiny). ``animate`` runs one on a
loaded SD 1.5-family pipeline through ``AnimateDiffPipeline``, whose motion UNet shares the base
UNet's and the adapter's weights (nothing is copied); ``build_tiny`` builds ``tiny-motion``.
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
    vae_tile: int = 512  # the VAE's sample_size: VAE tiling only tiles images larger than this


VARIANTS = {
    "tiny": VariantDefaults(64, 64, 4, 5.0, 50, 512, ("64x64", "128x128", "128x64", "64x128"), 64,
                            vae_tile=64),
    "sd15": VariantDefaults(512, 512, 25, 7.5, 100, 1024, ("512x512", "512x768", "768x512", "640x640", "768x768"),
                            3000),
    "turbo": VariantDefaults(512, 512, 1, 0.0, 10, 1024, ("512x512", "512x768", "768x512"), 3000, vae_tile=768),
    "sdxl": VariantDefaults(1024, 1024, 30, 7.0, 100, 2048,
                            ("1024x1024", "1152x896", "896x1152", "1216x832", "832x1216", "1344x768", "768x1344"),
                            4000, vae_tile=1024),
    "sdxl-turbo": VariantDefaults(512, 512, 1, 0.0, 10, 1024, ("512x512", "768x768", "1024x1024"), 4000,
                                  vae_tile=1024),
}
MIN_SIDE = 64
MAX_IMAGES = 4
# How far an image made in a batch may differ from the same seed made alone, in levels of 255 per
# channel. Batched convolutions and matmuls sum in another order, so the float results differ by
# rounding (about 2e-6 in fp32), which moves a few pixels across a rounding boundary: measured on
# the tiny models on CPU in fp32, at most 1 level in under 0.01 % of the values. fp16 on CUDA
# rounds more coarsely (``GPU_BATCH_TOLERANCE``, checked by a gpu-marked test).
BATCH_TOLERANCE = {"max": 2, "mean": 0.05}
GPU_BATCH_TOLERANCE = {"max": 32, "mean": 1.0}
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
    batch_size: int = MAX_IMAGES  # images per pipeline call (fewer when the memory budget says so)

    @property
    def seeds(self) -> list[int]:
        return [(self.seed + index) % (MAX_SEED + 1) for index in range(self.num_images)]

    @property
    def batches(self) -> list[list[int]]:
        """The seeds of each pipeline call, in order."""
        size = max(1, min(self.batch_size, self.num_images))
        return [self.seeds[start:start + size] for start in range(0, self.num_images, size)]


def clean_text(name: str, value) -> str:
    """A prompt from the UI or the API: text of at most MAX_PROMPT_CHARS that can be written as UTF-8."""
    return check_text(f"The {name}", "" if value is None else value, MAX_PROMPT_CHARS, required=False)


def activation_bytes(spec: ModelSpec, precision_name: str, width: int, height: int, num_images: int,
                     attention_slicing: bool, vae_tiling: bool, batch_size: int = 1) -> int:
    """Rough peak working memory of one request beyond the weights (latents, attention, VAE decode).

    ``generate`` makes ``batch_size`` images in each pipeline call, so the peak is that many images'
    work plus the finished images it keeps (3 bytes a pixel). VAE tiling only helps for images larger
    than the VAE's tile (1024 px for SDXL), attention slicing always does.
    """
    defaults = defaults_for(spec)
    per_pixel = defaults.activation_bytes_per_pixel * (2 if precision_name == "fp32" else 1)
    if attention_slicing or (vae_tiling and max(width, height) > defaults.vae_tile):
        per_pixel //= 2
    return int(width * height * (per_pixel * batch_size + 3 * num_images))


def batch_size_for(spec: ModelSpec, precision_name: str, width: int, height: int, num_images: int,
                   attention_slicing: bool, vae_tiling: bool, budget_bytes: int | None) -> int:
    """The most images one pipeline call may make within the budget (0: not even one fits)."""
    if budget_bytes is None:
        return num_images
    weights = spec.estimate_bytes(precision_name)
    for size in range(num_images, 0, -1):
        if weights + activation_bytes(spec, precision_name, width, height, num_images, attention_slicing,
                                      vae_tiling, size) <= budget_bytes:
            return size
    return 0


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
    batch_size = batch_size_for(spec, precision_name, width, height, num_images, attention_slicing, vae_tiling,
                                budget_bytes)
    if not batch_size:
        needed = spec.estimate_bytes(precision_name) + activation_bytes(
            spec, precision_name, width, height, num_images, attention_slicing, vae_tiling)
        raise TooLarge(
            f"{width}x{height} x {num_images} image(s) needs about {format_bytes(needed)} with {spec.id}, "
            f"more than the {format_bytes(budget_bytes)} memory budget. Lower the size or the number of "
            "images, enable attention slicing / VAE tiling, or raise --memory-budget.")
    if batch_size < num_images:
        calls = -(-num_images // batch_size)
        notices.append(f"The memory budget allows {batch_size} of the {num_images} images in one pipeline call; "
                       f"they are made in {calls} calls.")
    if guidance <= 1.0 and negative_prompt.strip():
        notices.append("Guidance is at most 1, so classifier-free guidance is off and the negative prompt "
                       "has no effect.")
    request = ImageRequest(prompt=prompt, negative_prompt=negative_prompt, style=style, width=width, height=height,
                           steps=steps, guidance=guidance, seed=seed, num_images=num_images, scheduler=scheduler,
                           attention_slicing=attention_slicing, vae_tiling=vae_tiling, cpu_offload=cpu_offload,
                           safety_checker=safety_checker, batch_size=batch_size)
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


TURBO_VARIANTS = ("turbo", "sdxl-turbo")  # distilled for 1-4 steps, which only work with trailing timesteps
# a fast tokenizer, a BPE (CLIP), a SentencePiece model (T5) or a WordPiece vocabulary
TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"), ("spiece.model",), ("tokenizer.model",),
                   ("vocab.txt",))


def text_to_image_classes() -> set[str]:
    """Pipeline class names that turn a prompt into an image (what AutoPipelineForText2Image loads)."""
    from diffusers.pipelines.auto_pipeline import AUTO_TEXT2IMAGE_PIPELINES_MAPPING

    return {cls.__name__ for cls in AUTO_TEXT2IMAGE_PIPELINES_MAPPING.values()}


def check_text_to_image(spec: ModelSpec, class_name: str) -> None:
    """WrongTask unless ``class_name`` (model_index.json's ``_class_name``) is a text-to-image pipeline."""
    from models.errors import WrongTask

    if class_name not in text_to_image_classes():
        kind = ("an image-to-image" if "Img2Img" in class_name else "an inpainting" if "Inpaint" in class_name
                else "not a text-to-image")
        raise WrongTask(f"{spec.id} is {kind} pipeline ({class_name}), which text-to-image cannot run. Point the "
                        "entry at the model's text-to-image pipeline (such as StableDiffusionPipeline or "
                        "StableDiffusionXLPipeline), or remove it.")


def check_pipeline_folder(spec: ModelSpec, location: str) -> None:
    """Refuse, with a message that says what to do, a folder that is not a complete text-to-image pipeline.

    AutoPipelineForText2Image would otherwise turn an image-to-image or inpainting repo into a
    text-to-image pipeline (an inpainting UNet then fails at the first step), and diffusers loads a
    folder that lacks a component (or a tokenizer without its vocabulary) with a warning, after which
    the first generation dies on an obscure error. Of a hub id (online) only the pipeline class is
    checked, from its model_index.json, before anything else is downloaded.
    """
    import json

    from models.errors import WrongTask
    from models.sources import ModelUnavailableError

    folder = Path(location)
    if not folder.is_dir():  # a hub id, online: its model_index.json alone says what it is
        from diffusers import DiffusionPipeline

        try:
            check_text_to_image(spec, DiffusionPipeline.load_config(location)["_class_name"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            if isinstance(exc, WrongTask):
                raise
            log.info("%s: model_index.json not read ahead (%s); from_pretrained will say why", spec.id, exc)
        return
    index_path = folder / "model_index.json"
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
        class_name = index["_class_name"]
    except FileNotFoundError:
        raise ModelUnavailableError(f"{spec.id}: {folder} has no model_index.json, so it is not a diffusers "
                                    "pipeline folder (save one with save_pretrained, or download the whole hub "
                                    "repo)") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelUnavailableError(f"{spec.id}: {index_path} cannot be read as a pipeline index "
                                    f"({exc.__class__.__name__}: {exc})") from None
    check_text_to_image(spec, class_name)
    components = {name: value[1] for name, value in index.items() if not name.startswith("_")
                  and isinstance(value, list) and len(value) == 2 and value[0] is not None}
    missing = [f"{name}/ ({cls})" for name, cls in components.items() if not (folder / name).is_dir()]
    missing += [f"the vocabulary of {name}/ (such as tokenizer.json, or vocab.json and merges.txt)"
                for name, cls in components.items() if (folder / name).is_dir() and "Tokenizer" in cls
                and not any(all((folder / name / file).is_file() for file in files) for files in TOKENIZER_FILES)]
    if missing:
        raise ModelUnavailableError(f"{spec.id}: the folder {folder} lacks {', '.join(missing)}, which its "
                                    "model_index.json lists. Copy or download the complete model folder.")


def check_tokenizers(spec: ModelSpec, pipe) -> None:
    """Each tokenizer must fit its text encoder's window (a tokenizer_config.json without
    model_max_length makes diffusers ask for 10^30 positions at the first prompt)."""
    from models.sources import ModelUnavailableError

    for name in ("tokenizer", "tokenizer_2"):
        tokenizer = getattr(pipe, name, None)
        encoder = getattr(pipe, name.replace("tokenizer", "text_encoder"), None)
        if tokenizer is None or encoder is None:
            continue
        window = getattr(encoder.config, "max_position_embeddings", None)
        if window and not 2 < tokenizer.model_max_length <= window:
            raise ModelUnavailableError(
                f"{spec.id}: {name} reads {tokenizer.model_max_length} tokens but its text encoder has "
                f"{window} positions; set \"model_max_length\": {window} in {name}/tokenizer_config.json")


def load(spec: ModelSpec, location: str, precision: Precision) -> DiffusionHandle | MotionHandle:
    from diffusers import AutoPipelineForText2Image

    if spec.task == VIDEO_TASK:
        return load_motion_adapter(spec, location, precision)
    if precision.name == "nf4" and precision.device != "cuda":
        raise InvalidRequest("4-bit (nf4) diffusion needs CUDA; choose fp32 on this machine")
    variant = variant_of(spec)
    check_pipeline_folder(spec, location)
    kwargs = diffusers_kwargs(precision)
    pipe = AutoPipelineForText2Image.from_pretrained(location, **kwargs)
    check_tokenizers(spec, pipe)
    pipe.to(precision.device)
    pipe.set_progress_bar_config(disable=True)
    if variant in TURBO_VARIANTS and pipe.scheduler.config.get("timestep_spacing") != "trailing":
        # sdxl-turbo's first published scheduler_config.json said "linspace": one step then denoises
        # at timestep 0 and returns noise. Turbo models are distilled on trailing timesteps.
        log.info("%s: %s timesteps -> trailing (a Turbo model)", spec.id, pipe.scheduler.config.get("timestep_spacing"))
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, timestep_spacing="trailing")
    return DiffusionHandle(pipe=pipe, spec_id=spec.id, variant=variant, device=precision.device,
                           precision=precision.name, attention_backend=select_attention(pipe, precision.device),
                           safety_checker=getattr(pipe, "safety_checker", None),
                           default_scheduler=pipe.scheduler)


def release(handle: DiffusionHandle | MotionHandle) -> None:
    """Undo model CPU offload (accelerate hooks keep references) and drop the handle's references."""
    if isinstance(handle, MotionHandle):
        handle.adapter = None
        return
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


def build_tiny(folder: Path, arch: str = "") -> None:
    """A deterministic random-weight pipeline: ``tiny-sd`` (arch "") or the twin of a hub architecture.

    ``arch`` is one of TWIN_ARCHS. A twin has the hub repo's pipeline class, component classes,
    model_index.json entries and scheduler_config.json, with layers shrunk the way diffusers' own
    tests shrink them, so that loading it runs the hub model's code path: 64x64 in about a second.
    """
    if not arch:
        build_tiny_sd(folder)
        return
    if arch in MOTION_ARCHS:
        build_tiny_motion(folder, arch)
        return
    if arch not in TWIN_ARCHS:
        raise ValueError(f"unknown diffusion twin architecture {arch!r}; use one of {', '.join(TWIN_ARCHS)}")
    if arch.startswith("sdxl"):
        build_sdxl_twin(folder, arch)
    else:
        build_sd_twin(folder, arch)


def build_tiny_sd(folder: Path) -> None:
    """tiny-sd: a Stable Diffusion pipeline without safety checker, 64x64 images in a fraction of a second."""
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


def tiny_clip_tokenizer(pad_token: str = "<|endoftext|>"):
    """A CLIP BPE tokenizer over single bytes (no merges): every character is one token, 77 at most.

    ``pad_token`` as the hub repos have it: "<|endoftext|>" for OpenAI CLIP (SD 1.x, SDXL's first
    encoder), "!" for OpenCLIP (SD 2.x, SDXL's second encoder).
    """
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())  # the 256 byte symbols CLIP's BPE starts from
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for symbol in symbols + [f"{s}</w>" for s in symbols]:
        vocab.setdefault(symbol, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77, pad_token=pad_token)


# ---- architecture twins of the hub models ------------------------------------------------------

TWIN_ARCHS = ("sd15", "sd-turbo", "sdxl", "sdxl-turbo")
_SCHEDULER_COMMON = {"beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
                     "num_train_timesteps": 1000, "prediction_type": "epsilon", "set_alpha_to_one": False,
                     "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None}
# scheduler/scheduler_config.json as each hub repo ships it (keys the class does not take are kept
# on purpose: DDIM, for one, reads set_alpha_to_one and clip_sample from them when it is swapped in).
TWIN_SCHEDULERS = {
    "sd15": {"_class_name": "PNDMScheduler", **_SCHEDULER_COMMON, "clip_sample_range": 1.0,
             "dynamic_thresholding_ratio": 0.995, "sample_max_value": 1.0, "thresholding": False},
    "sd-turbo": {"_class_name": "EulerDiscreteScheduler", **_SCHEDULER_COMMON, "interpolation_type": "linear",
                 "sample_max_value": 1.0, "timestep_spacing": "trailing", "use_karras_sigmas": False},
    "sdxl": {"_class_name": "EulerDiscreteScheduler", **_SCHEDULER_COMMON, "interpolation_type": "linear",
             "sample_max_value": 1.0, "timestep_spacing": "leading", "use_karras_sigmas": False},
    "sdxl-turbo": {"_class_name": "EulerAncestralDiscreteScheduler", **_SCHEDULER_COMMON,
                   "interpolation_type": "linear", "sample_max_value": 1.0, "timestep_spacing": "trailing"},
}
TWIN_WIDTH = 16  # text encoder width; the UNet's cross-attention width follows from it


def _tiny_text_encoder(tokenizer, hidden_act: str, with_projection: bool = False):
    """A 2-layer CLIP text encoder (SDXL reads the penultimate layer, so one layer would leave it unused)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TWIN_WIDTH, intermediate_size=2 * TWIN_WIDTH, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, layer_norm_eps=1e-5, hidden_act=hidden_act,
        projection_dim=TWIN_WIDTH, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def _tiny_vae(scaling_factor: float, force_upcast: bool):
    """Four blocks like the real VAE, so latents are 1/8 of the image; sample_size 64 so that VAE
    tiling really tiles above 64 px (the real VAEs tile above 512, 768 or 1024 px)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(8, 8, 16, 16), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=4,
        layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        sample_size=64, scaling_factor=scaling_factor, force_upcast=force_upcast)


def _write_hub_files(folder: Path, arch: str) -> None:
    """Make the saved folder read like the hub repo: its scheduler_config.json, its tokenizers as
    vocab.json + merges.txt (the files the hub has, so loading converts them the same way), and the
    feature extractor class its model_index.json names."""
    import json

    import diffusers
    from transformers import CLIPTokenizer

    folder = Path(folder)
    config = {"_class_name": TWIN_SCHEDULERS[arch]["_class_name"], "_diffusers_version": diffusers.__version__,
              **{k: v for k, v in TWIN_SCHEDULERS[arch].items() if k != "_class_name"}}
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    for name in ("tokenizer", "tokenizer_2"):
        target = folder / name
        if not target.is_dir():
            continue
        tokenizer = CLIPTokenizer.from_pretrained(target)
        for file in target.iterdir():
            file.unlink()
        specials = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": tokenizer.pad_token,
                    "unk_token": "<|endoftext|>"}
        (target / "vocab.json").write_text(json.dumps(tokenizer.get_vocab(), ensure_ascii=False))
        (target / "merges.txt").write_text("#version: 0.2\n")  # no merges: one token per byte
        (target / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
        (target / "tokenizer_config.json").write_text(json.dumps(
            {"add_prefix_space": False, "do_lower_case": True, "errors": "replace", "model_max_length": 77,
             "tokenizer_class": "CLIPTokenizer", **specials}, indent=2))
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text())
    if index.get("feature_extractor", [None])[0]:  # transformers names the PIL fallback when torchvision is absent
        index["feature_extractor"] = ["transformers", "CLIPImageProcessor"]
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True))


def _twin_scheduler(arch: str):
    import diffusers

    config = dict(TWIN_SCHEDULERS[arch])
    return getattr(diffusers, config.pop("_class_name")).from_config(config)


def build_sd_twin(folder: Path, arch: str) -> None:
    """SD 1.5 (``sd15``) or SD-Turbo (``sd-turbo``, the SD 2.1 architecture) as a StableDiffusionPipeline.

    SD 1.5: OpenAI CLIP text encoder (quick_gelu), UNet with conv projections in its transformers, PNDM,
    and a safety checker with its CLIPImageProcessor. SD 2.1: OpenCLIP text encoder (gelu, pad "!"),
    linear projections and per-block head counts; SD-Turbo ships no safety checker and Euler with
    trailing timesteps.
    """
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from models.offline import seeded

    sd2 = arch == "sd-turbo"
    tokenizer = tiny_clip_tokenizer(pad_token="!" if sd2 else "<|endoftext|>")
    seeded()
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=64, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TWIN_WIDTH, norm_num_groups=4,
        attention_head_dim=(2, 4) if sd2 else 2, use_linear_projection=sd2)
    vae = _tiny_vae(scaling_factor=0.18215, force_upcast=True)
    text_encoder = _tiny_text_encoder(tokenizer, "gelu" if sd2 else "quick_gelu")
    safety_checker = feature_extractor = None
    if not sd2:
        safety_checker, feature_extractor = _tiny_safety_checker()
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=_twin_scheduler(arch), safety_checker=safety_checker,
                                   feature_extractor=feature_extractor, requires_safety_checker=True)
    pipe.save_pretrained(folder, safe_serialization=True)
    _write_hub_files(folder, arch)


def _tiny_safety_checker():
    """SD 1.5's StableDiffusionSafetyChecker (a CLIP vision tower and concept embeddings) and its
    CLIPImageProcessor, at 32 px. Its concept thresholds stay at 1.0, so random weights flag nothing."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    config = CLIPConfig(
        text_config={"hidden_size": TWIN_WIDTH, "intermediate_size": 2 * TWIN_WIDTH, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "vocab_size": 600,
                     "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1},
        vision_config={"hidden_size": TWIN_WIDTH, "intermediate_size": 2 * TWIN_WIDTH, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
        projection_dim=TWIN_WIDTH)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return StableDiffusionSafetyChecker(config), processor


def build_sdxl_twin(folder: Path, arch: str) -> None:
    """SDXL (``sdxl``) or SDXL-Turbo (``sdxl-turbo``) as a StableDiffusionXLPipeline.

    Two text encoders (CLIPTextModel, quick_gelu; CLIPTextModelWithProjection, gelu, whose pooled
    projection conditions the UNet), two tokenizers, a UNet with ``text_time`` additional embeddings
    (its input width = 6 size/crop numbers x addition_time_embed_dim + the pooled width) and
    cross-attention over both encoders' widths, and a VAE that asks to be upcast in fp16.
    """
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    from models.offline import seeded

    tokenizer, tokenizer_2 = tiny_clip_tokenizer(), tiny_clip_tokenizer(pad_token="!")
    seeded()
    time_embed_dim = 8
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=128, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 2),
        addition_embed_type="text_time", addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=6 * time_embed_dim + TWIN_WIDTH,
        cross_attention_dim=2 * TWIN_WIDTH, norm_num_groups=4)
    vae = _tiny_vae(scaling_factor=0.13025, force_upcast=True)
    text_encoder = _tiny_text_encoder(tokenizer, "quick_gelu")
    text_encoder_2 = _tiny_text_encoder(tokenizer_2, "gelu", with_projection=True)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet,
                                     scheduler=_twin_scheduler(arch), force_zeros_for_empty_prompt=True,
                                     add_watermarker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    _write_hub_files(folder, arch)


# ---- generation ------------------------------------------------------------------------------

@dataclasses.dataclass
class GenerationResult:
    images: list
    seeds: list[int]
    steps_done: int  # denoising steps summed over the images (a batch of 4 counts 4 per step)
    stopped: bool
    nsfw_flagged: list[bool]
    notices: list[str]
    attention_backend: str
    seconds: float
    pipeline_calls: int = 0
    stopped_at: dict | None = None  # where Stop cut the run: first/last image (1-based), step, steps


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


def overflow_notices(pipe, prompt: str, negative: str) -> list[str]:
    """One notice per part of a prompt that a text encoder does not read, naming the encoder where SDXL's two differ."""
    tokenizers = [(label, getattr(pipe, name, None)) for label, name in (("text encoder", "tokenizer"),
                                                                       ("second text encoder", "tokenizer_2"))]
    tokenizers = [(label, tokenizer) for label, tokenizer in tokenizers if tokenizer is not None]
    notices = []
    for label, text in (("prompt", prompt), ("negative prompt", negative)):
        seen = set()
        for encoder, tokenizer in tokenizers:
            cut = token_overflow(tokenizer, text)
            if cut and cut not in seen:
                seen.add(cut)
                notices.append(f"The {label} is longer than the {encoder}'s {tokenizer.model_max_length} tokens; "
                               f"this part was cut: \"{cut}\"")
    return notices


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


def denoising_steps(scheduler, steps: int) -> int:
    """How many denoising passes ``steps`` makes: PNDM (SD 1.5's own scheduler) repeats one, 25 -> 26."""
    scheduler.set_timesteps(steps)
    return len(scheduler.timesteps)


def attention_label(handle: DiffusionHandle) -> str:
    return f"{handle.attention_backend} + attention slicing" if handle.attention_slicing else handle.attention_backend


def stop_notice(stopped_at: dict, num_images: int, kept: int) -> str:
    """What Stop cut, per image: "Stopped at step 3 of 10 of image 2 of 4; kept 1 finished image."."""
    first, last, step, steps = (stopped_at[key] for key in ("first", "last", "step", "steps"))
    kept_words = f"kept {kept} finished image{'' if kept == 1 else 's'}"
    if step == 0:
        return f"Stopped before image {first} of {num_images}; {kept_words}."
    which = f"image {first}" if first == last else f"images {first}-{last} (made together)"
    return f"Stopped at step {step} of {steps} of {which} of {num_images}; {kept_words}."


def generate(handle: DiffusionHandle, request: ImageRequest, *, styles: dict | None = None,
             stop: threading.Event | None = None, on_step: Callable[[int, int], None] | None = None,
             notices: list[str] | None = None) -> GenerationResult:
    """Run the pipeline for a validated request.

    The images are made ``request.batch_size`` at a time in one pipeline call, each with its own CPU
    ``torch.Generator`` seeded ``seed + i``: image *i* starts from the same noise as a single-image
    run of seed + *i*, so its recipe re-makes it alone (a batch changes the float rounding, not the
    picture: see ``BATCH_TOLERANCE``), and the same model, settings and seed give the same pixels on
    any device. ``on_step(done, total)`` counts denoising steps over all images (a batch of 4 adds 4
    per step). ``stop`` is checked after every step; once set, the remaining steps are skipped and
    only images that finished before it are returned.
    """
    import torch

    started = time.perf_counter()
    notices = list(notices or [])
    pipe = handle.pipe
    # 1. Prompts after the style preset, and what each text encoder (SDXL has two) will not read
    styles = styles if styles is not None else load_styles(None)
    prompt, negative = apply_style(styles, request.style, request.prompt, request.negative_prompt)
    notices.extend(overflow_notices(pipe, prompt, negative))
    # 2. Scheduler, memory options, safety checker
    use_scheduler(handle, request.scheduler)
    apply_memory_options(handle, request, notices)
    if hasattr(pipe, "safety_checker"):
        pipe.safety_checker = handle.safety_checker if request.safety_checker else None
    # 3. One pipeline call per batch, one CPU generator per image
    per_image = denoising_steps(pipe.scheduler, request.steps)
    total = per_image * request.num_images
    progress = {"done": 0, "step": 0, "batch": 1}
    images, flagged, stopped_at, calls = [], [], None, 0

    def on_step_end(pipeline, step, timestep, callback_kwargs):
        progress["step"] += 1
        progress["done"] += progress["batch"]
        if on_step is not None:
            on_step(progress["done"], total)
        if stop is not None and stop.is_set():
            pipeline._interrupt = True  # diffusers skips the remaining steps
        return callback_kwargs

    # 4. Denoise and decode
    kwargs = {"negative_prompt": negative or None} if request.guidance > 1.0 else {}
    try:
        with torch.inference_mode():
            for seeds in request.batches:
                first = len(images) + 1
                if stop is not None and stop.is_set():
                    stopped_at = {"first": first, "last": first, "step": 0, "steps": per_image}
                    break
                progress.update(step=0, batch=len(seeds))
                output = pipe(prompt=prompt, width=request.width, height=request.height,
                              num_inference_steps=request.steps, guidance_scale=request.guidance,
                              num_images_per_prompt=len(seeds),
                              generator=[torch.Generator("cpu").manual_seed(seed) for seed in seeds],
                              callback_on_step_end=on_step_end, output_type="pil", **kwargs)
                calls += 1
                if progress["step"] < per_image:  # cut short: these pixels are half-denoised noise
                    stopped_at = {"first": first, "last": first + len(seeds) - 1, "step": progress["step"],
                                  "steps": per_image}
                    break
                images.extend(output.images)
                flagged.extend(getattr(output, "nsfw_content_detected", None) or [False] * len(output.images))
    finally:
        pipe.maybe_free_model_hooks()
    stopped = stopped_at is not None
    if any(flagged):
        notices.append("The safety checker blacked out flagged image(s).")
    if stopped:
        notices.append(stop_notice(stopped_at, request.num_images, len(images)))
    return GenerationResult(images=images, seeds=request.seeds,
                            steps_done=progress["done"], stopped=stopped, nsfw_flagged=[bool(f) for f in flagged],
                            notices=notices, attention_backend=attention_label(handle),
                            seconds=time.perf_counter() - started, pipeline_calls=calls, stopped_at=stopped_at)


# ---- text to video: AnimateDiff motion adapters on an SD 1.5-family base ----------------------------

VIDEO_TASK = "text-to-video"


@dataclasses.dataclass(frozen=True)
class MotionDefaults:
    """What a motion adapter was made for: steps, guidance, its scheduler, and where its weights are."""

    steps: int
    guidance: float
    max_steps: int
    scheduler: str  # diffusers class, built from the base model's scheduler config with ``scheduler_config``
    scheduler_config: tuple[tuple[str, object], ...]
    frames: int = 16
    checkpoint: str = ""  # a single-file state dict in the repo, loaded into MotionAdapter (else a diffusers folder)
    checkpoint_repo: str = ""  # the hub repo that publishes it (for the download hint)


# AnimateDiff v1.5: DDIM with linear betas and linspace timesteps (its model card). Lightning: the
# distilled 4-step checkpoint wants Euler with trailing timesteps, linear betas and no CFG.
_ANIMATEDIFF_DDIM = (("beta_schedule", "linear"), ("clip_sample", False), ("timestep_spacing", "linspace"),
                     ("steps_offset", 1))
MOTION_VARIANTS = {
    "animatediff": MotionDefaults(25, 7.5, 100, "DDIMScheduler", _ANIMATEDIFF_DDIM),
    "lightning": MotionDefaults(4, 1.0, 8, "EulerDiscreteScheduler",
                                (("timestep_spacing", "trailing"), ("beta_schedule", "linear")),
                                checkpoint="animatediff_lightning_4step_diffusers.safetensors",
                                checkpoint_repo="ByteDance/AnimateDiff-Lightning"),
    "tiny": MotionDefaults(4, 5.0, 50, "DDIMScheduler", _ANIMATEDIFF_DDIM, frames=8),
}
MOTION_ARCHS = ("motion", "motion-lightning")  # offline entries' ``repo``: tiny-motion and the Lightning twin
MIN_FRAMES, MAX_FRAMES = 8, 32  # AnimateDiff's motion modules hold 32 positions (motion_max_seq_length)
MIN_FPS, MAX_FPS, DEFAULT_FPS = 4, 30, 8
DECODE_CHUNK = 4  # frames the VAE decodes at once
VIDEO_BASE_VARIANTS = ("sd15", "tiny")  # SD 1.5 UNets (tiny-sd is one, shrunk)
BASE_KINDS = {"turbo": "an SD 2.1 model (SD-Turbo)", "sdxl": "an SDXL model", "sdxl-turbo": "an SDXL model"}


def motion_variant_of(spec: ModelSpec) -> str:
    variant = spec.variant or ("tiny" if spec.source == "offline" else "animatediff")
    if variant not in MOTION_VARIANTS:
        raise InvalidRequest(f"{spec.id}: unknown motion adapter variant {variant!r}; use one of "
                             f"{', '.join(MOTION_VARIANTS)}")
    return variant


def motion_defaults_for(spec: ModelSpec) -> MotionDefaults:
    return MOTION_VARIANTS[motion_variant_of(spec)]


def check_video_base(adapter: ModelSpec, base: ModelSpec, bases: list[str] | None = None) -> None:
    """InvalidRequest unless ``base`` is an SD 1.5-family model that ``adapter`` fits (checked before loading).

    The random-weight adapter (variant tiny) is sized for tiny-sd, the real ones for SD 1.5 itself.
    """
    variant = variant_of(base)
    choose = f" Choose one of: {', '.join(bases)}." if bases else ""
    if variant not in VIDEO_BASE_VARIANTS:
        raise InvalidRequest(f"{adapter.id} is an AnimateDiff motion adapter for Stable Diffusion 1.5, and "
                             f"{base.id} is {BASE_KINDS.get(variant, variant)}.{choose}")
    tiny_adapter, tiny_base = motion_variant_of(adapter) == "tiny", variant == "tiny"
    if tiny_adapter != tiny_base:
        what = ("a random-weight test adapter sized for tiny-sd" if tiny_adapter
                else "a real motion adapter, which needs a real SD 1.5 model")
        raise InvalidRequest(f"{adapter.id} is {what}; {base.id} does not fit it.{choose}")


@dataclasses.dataclass(frozen=True)
class VideoRequest:
    """One validated text-to-video request."""

    prompt: str
    negative_prompt: str
    style: str
    width: int
    height: int
    frames: int
    fps: int
    steps: int
    guidance: float
    seed: int

    @property
    def seconds(self) -> float:
        return self.frames / self.fps


def video_activation_bytes(base: ModelSpec, precision_name: str, width: int, height: int, frames: int) -> int:
    """Rough peak working memory of a video beyond the weights.

    The UNet denoises every frame at once (about half an image's peak per frame: the VAE is not in
    it), the VAE then decodes DECODE_CHUNK frames at a time, and the decoded frames are held in float
    and in bytes (16 bytes a pixel).
    """
    per_pixel = defaults_for(base).activation_bytes_per_pixel * (2 if precision_name == "fp32" else 1)
    return int(width * height * ((frames + DECODE_CHUNK) * per_pixel // 2 + 16 * frames))


def check_video_request(adapter: ModelSpec, base: ModelSpec, *, prompt="", negative_prompt="", style="none",
                        width=None, height=None, frames=None, fps=DEFAULT_FPS, steps=None, guidance=None, seed=-1,
                        styles: dict | None = None, budget_bytes: int | None = None,
                        precision_name: str = "fp32", bases: list[str] | None = None,
                        ) -> tuple[VideoRequest, list[str]]:
    """Validate raw UI/API values for a video of ``adapter`` on ``base``; (request, notices).

    ``None`` for width/height (the base's default size), frames, steps or guidance (the adapter's
    defaults). The budget counts both models' weights and every frame's working memory.
    """
    check_video_base(adapter, base, bases)
    motion, size = motion_defaults_for(adapter), defaults_for(base)
    notices: list[str] = []
    prompt = clean_text("prompt", prompt)
    negative_prompt = clean_text("negative prompt", negative_prompt)
    if not prompt.strip():
        notices.append("The prompt is empty: the model draws from noise alone (unconditional generation).")
    if not isinstance(style, str) or not style:
        style = "none"
    if styles is not None and style not in styles:
        raise InvalidRequest(f"Unknown style {style!r}. Styles: {', '.join(styles)}")
    side_hint = f" for {base.id} (and a multiple of 8)"
    width = check_number("width", size.width if width is None else width, MIN_SIDE, size.max_side, True, side_hint)
    height = check_number("height", size.height if height is None else height, MIN_SIDE, size.max_side, True,
                          side_hint)
    for name, side in (("width", width), ("height", height)):
        if side % 8:
            raise InvalidRequest(f"{name} must be a multiple of 8, got {side}; try {side - side % 8} or "
                                 f"{side - side % 8 + 8}")
    frames = check_number("frames", motion.frames if frames is None else frames, MIN_FRAMES, MAX_FRAMES, True,
                          " (AnimateDiff's motion modules hold 32)")
    fps = check_number("fps", DEFAULT_FPS if fps is None else fps, MIN_FPS, MAX_FPS, True)
    steps = check_number("steps", motion.steps if steps is None else steps, 1, motion.max_steps, True,
                         f" for {adapter.id}")
    guidance = check_number("guidance", motion.guidance if guidance is None else guidance, 0.0, MAX_GUIDANCE, False)
    seed = check_number("seed", -1 if seed is None else seed, -1, MAX_SEED, True, " (-1 picks a random seed)")
    if seed == -1:
        seed = secrets.randbelow(MAX_SEED + 1)
    if budget_bytes is not None:
        weights = base.estimate_bytes(precision_name) + adapter.estimate_bytes(precision_name)
        needed = weights + video_activation_bytes(base, precision_name, width, height, frames)
        if needed > budget_bytes:
            fixed = video_activation_bytes(base, precision_name, width, height, 0)  # the VAE's chunk
            per_frame = video_activation_bytes(base, precision_name, width, height, 1) - fixed
            fits = max(0, (budget_bytes - weights - fixed) // max(1, per_frame))
            room = (f"at {width}x{height} the budget holds {fits} frames" if fits >= MIN_FRAMES
                    else f"even {MIN_FRAMES} frames do not fit at {width}x{height}")
            raise TooLarge(
                f"{frames} frames at {width}x{height} need about {format_bytes(needed)} with {adapter.id} on "
                f"{base.id}, more than the {format_bytes(budget_bytes)} memory budget ({room}). Use fewer frames "
                "or a smaller size, or raise --memory-budget.")
    if guidance <= 1.0 and negative_prompt.strip():
        notices.append("Guidance is at most 1, so classifier-free guidance is off and the negative prompt "
                       "has no effect.")
    request = VideoRequest(prompt=prompt, negative_prompt=negative_prompt, style=style, width=width, height=height,
                           frames=frames, fps=fps, steps=steps, guidance=guidance, seed=seed)
    return request, notices


@dataclasses.dataclass(eq=False)
class MotionHandle:
    """A loaded AnimateDiff MotionAdapter (the motion modules alone; a base model supplies the rest)."""

    adapter: object
    spec_id: str
    variant: str
    device: str
    precision: str


def load_motion_adapter(spec: ModelSpec, location: str, precision: Precision) -> MotionHandle:
    """A diffusers MotionAdapter folder or hub repo, or (Lightning) one checkpoint file of a repo.

    A checkpoint is loaded into ``MotionAdapter()`` with the default (SD 1.5) configuration, as its
    model card does, or into the configuration of a ``config.json`` beside it (the offline twin's).
    """
    from diffusers import MotionAdapter

    from models.sources import ModelUnavailableError

    if precision.name not in ("fp16", "bf16", "fp32"):
        raise InvalidRequest(f"Motion adapters load in fp16 or fp32, not {precision.name}.")
    variant = motion_variant_of(spec)
    checkpoint, checkpoint_repo = MOTION_VARIANTS[variant].checkpoint, MOTION_VARIANTS[variant].checkpoint_repo
    dtype = precision.torch_dtype()
    if not checkpoint:
        adapter = MotionAdapter.from_pretrained(location, dtype=dtype)
    else:
        from safetensors.torch import load_file

        folder = Path(location)
        if folder.is_dir():
            path = folder / checkpoint
            if not path.is_file():
                raise ModelUnavailableError(
                    f"{spec.id}: {folder} lacks {checkpoint}. Download it with `hf download {checkpoint_repo} "
                    f"{checkpoint}`.")
            config = MotionAdapter.load_config(folder) if (folder / "config.json").is_file() else {}
        else:
            from huggingface_hub import hf_hub_download

            path, config = Path(hf_hub_download(location, checkpoint)), {}
        adapter = MotionAdapter.from_config(config)
        try:
            adapter.load_state_dict(load_file(str(path)), strict=True)
        except RuntimeError as exc:
            raise ModelUnavailableError(f"{spec.id}: {checkpoint} is not a motion adapter of the expected shape "
                                        f"({str(exc).splitlines()[0][:200]})") from None
        if next(adapter.parameters()).dtype != dtype:
            adapter.to(dtype=dtype)
    adapter.to(precision.device).eval()
    return MotionHandle(adapter=adapter, spec_id=spec.id, variant=variant, device=precision.device,
                        precision=precision.name)


def build_tiny_motion(folder: Path, arch: str) -> None:
    """tiny-motion: a MotionAdapter with tiny-sd's block widths (8, 16) and one motion layer per block, as
    diffusers' AnimateDiff tests build one. ``motion-lightning`` writes it as the Lightning repo does, one
    checkpoint file, plus the config.json the repo does not need (its checkpoints use the default sizes)."""
    from diffusers import MotionAdapter
    from safetensors.torch import save_file

    from models.offline import seeded

    seeded()
    adapter = MotionAdapter(block_out_channels=(8, 16), motion_layers_per_block=1, motion_norm_num_groups=2,
                            motion_num_attention_heads=2, motion_max_seq_length=MAX_FRAMES)
    if arch == "motion":
        adapter.save_pretrained(folder, safe_serialization=True)
        return
    adapter.save_config(folder)
    save_file({key: value.contiguous() for key, value in adapter.state_dict().items()},
              str(Path(folder) / MOTION_VARIANTS["lightning"].checkpoint))


def motion_scheduler(base: DiffusionHandle, variant: str):
    """The adapter's scheduler, built from the base model's own scheduler config (its betas' range)."""
    import diffusers

    defaults = MOTION_VARIANTS[variant]
    return getattr(diffusers, defaults.scheduler).from_config(base.default_scheduler.config,
                                                              **dict(defaults.scheduler_config))


def check_motion_fits(base: DiffusionHandle, motion: MotionHandle) -> None:
    """The adapter's blocks must match the base UNet's (a user's folder may hold another size)."""
    unet, adapter = base.pipe.unet.config, motion.adapter.config
    layers = adapter.motion_layers_per_block
    if (list(unet.block_out_channels) != list(adapter.block_out_channels)
            or (isinstance(layers, int) and layers != unet.layers_per_block)):
        raise InvalidRequest(f"{motion.spec_id} (blocks {tuple(adapter.block_out_channels)}) does not fit "
                             f"{base.spec_id}'s UNet (blocks {tuple(unet.block_out_channels)}): choose an SD 1.5 "
                             "base of the adapter's size (tiny-motion goes with tiny-sd).")


def video_pipeline(base: DiffusionHandle, motion: MotionHandle):
    """An AnimateDiffPipeline over the base's components whose motion UNet *shares* the base UNet's and the
    adapter's tensors (built on the meta device, then given theirs), so it costs no memory and no copy.

    diffusers' own ``UNetMotionModel.from_unet2d`` copies the UNet's weights (1.7 GB in fp16 for SD 1.5).
    """
    from accelerate import init_empty_weights
    from diffusers import AnimateDiffPipeline, UNetMotionModel

    check_motion_fits(base, motion)
    if base.offloaded:  # accelerate's hooks move the UNet's weights; the motion UNet shares them in place
        base.pipe.remove_all_hooks()
        base.pipe.to(base.device)
        base.offloaded = False
    unet = base.pipe.unet
    with init_empty_weights():
        motion_unet = UNetMotionModel.from_unet2d(unet, motion.adapter, load_weights=False)
    motion_unet.load_state_dict({**unet.state_dict(), **motion.adapter.state_dict()}, strict=True, assign=True)
    motion_unet.to(device=base.device).eval()  # every tensor is the base's or the adapter's: nothing moves
    pipe = AnimateDiffPipeline(vae=base.pipe.vae, text_encoder=base.pipe.text_encoder, tokenizer=base.pipe.tokenizer,
                               unet=motion_unet, motion_adapter=motion.adapter,
                               scheduler=motion_scheduler(base, motion.variant))
    pipe.set_progress_bar_config(disable=True)
    if base.attention_backend == "xformers":
        pipe.enable_xformers_memory_efficient_attention()
    return pipe


@dataclasses.dataclass
class VideoResult:
    frames: object | None  # uint8 array (frames, height, width, 3); None when stopped
    steps_done: int
    stopped: bool
    notices: list[str]
    attention_backend: str
    seconds: float


def animate(base: DiffusionHandle, motion: MotionHandle, request: VideoRequest, *, styles: dict | None = None,
            stop: threading.Event | None = None, on_step: Callable[[int, int], None] | None = None,
            notices: list[str] | None = None) -> VideoResult:
    """Make a video's frames for a validated request.

    The noise of every frame comes from one CPU ``torch.Generator`` seeded ``seed``, so the same models,
    settings and seed give the same frames. ``on_step(done, total)`` counts the denoising steps, then
    the VAE's chunks of frames. ``stop`` is checked after every step and chunk; a stopped video keeps
    no frames (a half-denoised or half-decoded video is not kept).
    """
    import torch

    started = time.perf_counter()
    notices = list(notices or [])
    # 1. Prompts after the style preset, and what the text encoder will not read
    styles = styles if styles is not None else load_styles(None)
    prompt, negative = apply_style(styles, request.style, request.prompt, request.negative_prompt)
    notices.extend(overflow_notices(base.pipe, prompt, negative))
    # 2. The AnimateDiff pipeline over the base, with the adapter's scheduler
    pipe = video_pipeline(base, motion)
    steps = denoising_steps(pipe.scheduler, request.steps)
    chunks = -(-request.frames // DECODE_CHUNK)
    total, done = steps + chunks, 0

    def stopped() -> bool:
        return stop is not None and stop.is_set()

    def on_step_end(pipeline, step, timestep, callback_kwargs):
        nonlocal done
        done += 1
        if on_step is not None:
            on_step(done, total)
        if stopped():
            pipeline._interrupt = True
        return callback_kwargs

    # 3. Denoise all frames together, then decode them a few at a time
    kwargs = {"negative_prompt": negative or None} if request.guidance > 1.0 else {}
    frames = None
    try:
        with torch.inference_mode():
            latents = pipe(prompt=prompt, num_frames=request.frames, width=request.width, height=request.height,
                           num_inference_steps=request.steps, guidance_scale=request.guidance,
                           generator=torch.Generator("cpu").manual_seed(request.seed), output_type="latent",
                           callback_on_step_end=on_step_end, **kwargs).frames
            steps_done = done
            if done == steps and not stopped():
                frames = _decode_frames(pipe, latents, stopped, lambda: on_step_end(pipe, 0, 0, {}))
    finally:
        pipe.maybe_free_model_hooks()
    if frames is None:
        notices.append(f"Stopped at step {min(steps_done, steps)} of {steps}"
                       + (" (while decoding the frames)" if steps_done == steps else "")
                       + "; no video was kept (a half-made one is noise).")
    return VideoResult(frames=frames, steps_done=steps_done, stopped=frames is None, notices=notices,
                       attention_backend=base.attention_backend, seconds=time.perf_counter() - started)


def _decode_frames(pipe, latents, stopped: Callable[[], bool], chunk_done: Callable[[], object]):
    """uint8 frames (frames, height, width, 3) from (1, channels, frames, h, w) latents, DECODE_CHUNK at a time;
    None when stopped in between. Same arithmetic as AnimateDiffPipeline.decode_latents + postprocess."""
    import torch

    latents = latents / pipe.vae.config.scaling_factor
    batch, channels, count, height, width = latents.shape
    latents = latents.permute(0, 2, 1, 3, 4).reshape(batch * count, channels, height, width)
    pieces = []
    for start in range(0, count, DECODE_CHUNK):
        if stopped():
            return None
        sample = pipe.vae.decode(latents[start:start + DECODE_CHUNK]).sample.float()
        pieces.append(((sample / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu())
        chunk_done()
    return torch.cat(pieces).numpy()
