"""Diffusion family: Stable Diffusion 1.5, SD-Turbo, SDXL and SDXL-Turbo through AutoPipelineForText2Image.

Defaults follow the catalog ``variant`` (sd15 | turbo | sdxl | sdxl-turbo | tiny). Requests are
validated before anything is loaded (``check_request``), so bad input never pins a model; a folder
that is not a complete text-to-image pipeline is refused before its weights load. ``build_tiny``
builds tiny-sd and the random-weight twins of the four hub architectures (``TWIN_ARCHS``).
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
    """Rough peak working memory of one request beyond the weights (latents, attention, VAE decode).

    ``generate`` makes the images one pipeline call at a time, so the peak is one image's work plus
    the finished images it keeps (3 bytes a pixel). VAE tiling only helps for images larger than the
    VAE's tile (1024 px for SDXL), attention slicing always does.
    """
    defaults = defaults_for(spec)
    per_pixel = defaults.activation_bytes_per_pixel * (2 if precision_name == "fp32" else 1)
    if attention_slicing or (vae_tiling and max(width, height) > defaults.vae_tile):
        per_pixel //= 2
    return int(width * height * (per_pixel + 3 * num_images))


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


def load(spec: ModelSpec, location: str, precision: Precision) -> DiffusionHandle:
    from diffusers import AutoPipelineForText2Image

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


def build_tiny(folder: Path, arch: str = "") -> None:
    """A deterministic random-weight pipeline: ``tiny-sd`` (arch "") or the twin of a hub architecture.

    ``arch`` is one of TWIN_ARCHS. A twin has the hub repo's pipeline class, component classes,
    model_index.json entries and scheduler_config.json, with layers shrunk the way diffusers' own
    tests shrink them, so that loading it runs the hub model's code path: 64x64 in about a second.
    """
    if not arch:
        build_tiny_sd(folder)
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
    # 1. Prompts after the style preset, and what each text encoder (SDXL has two) will not read
    styles = styles if styles is not None else load_styles(None)
    prompt, negative = apply_style(styles, request.style, request.prompt, request.negative_prompt)
    notices.extend(overflow_notices(pipe, prompt, negative))
    # 2. Scheduler, memory options, safety checker
    use_scheduler(handle, request.scheduler)
    apply_memory_options(handle, request, notices)
    if hasattr(pipe, "safety_checker"):
        pipe.safety_checker = handle.safety_checker if request.safety_checker else None
    # 3. One pipeline call per image, each with its own CPU generator: batching changes the float
    #    rounding, so only this way does a PNG's recipe (one seed) re-make exactly the same pixels.
    total = denoising_steps(pipe.scheduler, request.steps) * request.num_images
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
