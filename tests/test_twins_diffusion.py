"""The hub text-to-image models, each run offline through its own architecture (issue #11).

``twin_manager`` serves every hub entry from its random-weight twin's folder with the entry's own id,
variant and family code, so ``model="stabilityai/stable-diffusion-xl-base-1.0"`` runs what the hub
model would run, in milliseconds. Every contract below is parametrized over one table of cases.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import single_torch_thread

from models.errors import UserError
from models.families.diffusion import BATCH_TOLERANCE

# The hub entries keep the real models' sizes (1.1-3.5 B parameters, 4.8-15 GB in fp32), which the
# tests' 4 GB budget refuses before anything loads; their twins take a few MB.
ROOMY_BUDGET = 64 * 1024**3


@dataclasses.dataclass(frozen=True)
class Case:
    """A hub entry and what its hub repo says (model_index.json, scheduler_config.json, the model card)."""

    model: str
    arch: str  # its twin's architecture, the twin entry's ``repo``
    pipeline: str
    img2img: str  # the image-to-image pipeline of the same architecture
    scheduler: str
    spacing: str | None  # timestep_spacing in the repo's scheduler_config.json (None: each scheduler's own)
    size: tuple[int, int]  # default width, height
    steps: int
    guidance: float
    safety_checker: bool

    @property
    def turbo(self) -> bool:
        return self.arch.endswith("turbo")

    @property
    def sdxl(self) -> bool:
        return self.pipeline == "StableDiffusionXLPipeline"

    @property
    def quick_steps(self) -> int | None:
        """The model's own steps where they are few (Turbo), else 2."""
        return None if self.turbo else 2


CASES = [
    Case("stable-diffusion-v1-5/stable-diffusion-v1-5", "sd15", "StableDiffusionPipeline",
         "StableDiffusionImg2ImgPipeline", "PNDMScheduler", None, (512, 512), 25, 7.5, True),
    Case("stabilityai/sd-turbo", "sd-turbo", "StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline",
         "EulerDiscreteScheduler", "trailing", (512, 512), 1, 0.0, False),
    Case("stabilityai/stable-diffusion-xl-base-1.0", "sdxl", "StableDiffusionXLPipeline",
         "StableDiffusionXLImg2ImgPipeline", "EulerDiscreteScheduler", "leading", (1024, 1024), 30, 7.0, False),
    Case("stabilityai/sdxl-turbo", "sdxl-turbo", "StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline",
         "EulerAncestralDiscreteScheduler", "trailing", (512, 512), 1, 0.0, False),
]
each_case = pytest.mark.parametrize("case", CASES, ids=[case.arch for case in CASES])
each_sdxl = pytest.mark.parametrize("case", [c for c in CASES if c.sdxl], ids=[c.arch for c in CASES if c.sdxl])
each_turbo = pytest.mark.parametrize("case", [c for c in CASES if c.turbo], ids=[c.arch for c in CASES if c.turbo])


one_torch_thread = pytest.fixture(autouse=True, scope="module")(single_torch_thread)


@pytest.fixture
def twins(twin_manager):
    """``twin_manager`` with room for the hub entries' estimated sizes."""
    twin_manager.budget = ROOMY_BUDGET
    return twin_manager


def generate(manager, settings, prompt="", on_step=None, **values):
    """/txt2img's path: a request built from values, then the run."""
    from models.text_to_image import Txt2ImgRequest, txt2img

    request = Txt2ImgRequest.build(manager, settings, prompt=prompt, **values)
    return txt2img(manager, settings, request, on_step=on_step)


def pixels(path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.array(image.convert("RGB"))


def nothing_pinned(manager) -> bool:
    return not any(entry["pinned"] for entry in manager.snapshot())


def small_size(width: int, height: int) -> tuple[int, int]:
    """A preset's orientation at about 128 px: sides that are multiples of 8 but not always of 16 or 64."""
    scale = 128 / max(width, height)
    return max(64, 8 * round(width * scale / 8)), max(64, 8 * round(height * scale / 8))


def unet_timesteps(pipe) -> tuple[list[float], object]:
    """(list that collects the UNet's timestep at each call, hook handle to remove)."""
    seen: list[float] = []

    def hook(module, args, kwargs):
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        seen.append(float(timestep.flatten()[0]) if hasattr(timestep, "flatten") else float(timestep))

    return seen, pipe.unet.register_forward_pre_hook(hook, with_kwargs=True)


# ---- the twin is the hub architecture --------------------------------------------------------------

@each_case
def test_twin_has_the_hub_architecture(case, twin_catalog, twins):
    folder = Path(twin_catalog.get(case.model).repo)
    index = json.loads((folder / "model_index.json").read_text())
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert index["_class_name"] == case.pipeline and scheduler["_class_name"] == case.scheduler
    assert scheduler.get("timestep_spacing") == case.spacing and scheduler["prediction_type"] == "epsilon"
    assert scheduler["steps_offset"] == 1 and scheduler["set_alpha_to_one"] is False, "the repo's keys, kept"
    tokenizers = ("tokenizer", "tokenizer_2") if case.sdxl else ("tokenizer",)
    assert all((folder / name / "vocab.json").is_file() and (folder / name / "merges.txt").is_file()
               for name in tokenizers), "tokenizers as the hub ships them"
    assert sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) < 3 * 1024**2
    with twins.use(case.model) as handle:
        pipe = handle.pipe
        assert type(pipe).__name__ == case.pipeline and type(pipe.scheduler).__name__ == case.scheduler
        assert handle.has_safety_checker == case.safety_checker and pipe.vae_scale_factor == 8
        unet, text = pipe.unet.config, pipe.text_encoder.config
        if case.sdxl:
            text_2 = pipe.text_encoder_2.config
            assert type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
            assert unet.addition_embed_type == "text_time" and unet.use_linear_projection
            time_ids_width = 6 * unet.addition_time_embed_dim  # original size, crop corner, target size
            assert unet.projection_class_embeddings_input_dim == time_ids_width + text_2.projection_dim
            assert unet.cross_attention_dim == text.hidden_size + text_2.hidden_size
            assert (text.hidden_act, text_2.hidden_act) == ("quick_gelu", "gelu")
            assert (pipe.tokenizer.pad_token, pipe.tokenizer_2.pad_token) == ("<|endoftext|>", "!")
            assert pipe.vae.config.force_upcast and pipe.config.force_zeros_for_empty_prompt
        else:
            sd2 = case.arch == "sd-turbo"  # SD 2.1: OpenCLIP text encoder, linear projections in the UNet
            assert unet.addition_embed_type is None and unet.use_linear_projection == sd2
            assert text.hidden_act == ("gelu" if sd2 else "quick_gelu") and unet.cross_attention_dim == text.hidden_size
            assert (type(pipe.feature_extractor).__name__.startswith("CLIPImageProcessor")) == case.safety_checker


# ---- defaults, sizes, schedulers ------------------------------------------------------------------

@each_case
def test_variant_defaults_and_every_size_preset(case, twins, settings):
    from models.text_to_image import Txt2ImgRequest, model_defaults

    defaults = model_defaults(twins, case.model)
    assert (defaults["width"], defaults["height"], defaults["steps"], defaults["guidance"]) == (
        *case.size, case.steps, case.guidance)
    for preset in defaults["sizes"]:
        width, height = map(int, preset.split("x"))
        request = Txt2ImgRequest.build(twins, settings, prompt="x", model=case.model, width=width, height=height)
        assert (request.image.width, request.image.height) == (width, height), f"{preset} passes the model's checks"
        small = small_size(width, height)
        gallery, info = generate(twins, settings, "a lighthouse", model=case.model, width=small[0], height=small[1],
                                 steps=1, seed=1)
        assert pixels(gallery[0][0]).shape == (small[1], small[0], 3), f"{preset} at {small}"
    # the model's own steps and guidance, at a size the twin draws quickly; progress ends at exactly 100 %
    progress = []
    gallery, info = generate(twins, settings, "a lighthouse", model=case.model, width=64, height=64, seed=1,
                             on_step=lambda done, total: progress.append((done, total)))
    assert (info["steps"], info["guidance"]) == (case.steps, case.guidance)
    assert progress[-1] == (info["steps_done"], info["steps_done"]), "PNDM makes 26 passes of 25 steps"
    with twins.use(case.model) as handle:
        scheduler = handle.pipe.scheduler
        assert scheduler.config.timestep_spacing == (case.spacing or "leading")
        if case.turbo:  # one step from pure noise: trailing timesteps, as the model was distilled
            assert scheduler.timesteps.tolist() == [999]
    assert nothing_pinned(twins)


@each_case
def test_every_scheduler_keeps_the_model_schedule(case, twins, settings):
    from models.families.diffusion import SCHEDULERS

    with twins.use(case.model) as handle:
        seen, hook = unet_timesteps(handle.pipe)
    try:
        for name, (class_name, _) in SCHEDULERS.items():
            seen.clear()
            gallery, info = generate(twins, settings, "a red boat", model=case.model, width=64, height=64, seed=3,
                                     scheduler=name, steps=case.quick_steps)
            assert info["steps_done"] == len(seen) >= info["steps"] and pixels(gallery[0][0]).std() > 1, name
            with twins.use(case.model) as handle:
                config = handle.pipe.scheduler.config
                assert type(handle.pipe.scheduler).__name__ == (class_name or case.scheduler), name
            assert config.prediction_type == "epsilon", name
            if case.spacing:
                assert config.timestep_spacing == case.spacing, f"{name} keeps the repo's {case.spacing} timesteps"
            if case.turbo:
                assert seen[0] >= 900, f"{name}: a Turbo step must start from noise (timestep {seen[0]})"
    finally:
        hook.remove()


@each_turbo
def test_turbo_gets_trailing_timesteps_from_any_snapshot(case, twin_catalog, tmp_path):
    """sdxl-turbo's first scheduler_config.json said "linspace": one step then denoised at timestep 0."""
    from models.families import diffusion
    from models.quantization import Precision

    folder = tmp_path / "snapshot"
    shutil.copytree(twin_catalog.get(case.model).repo, folder)
    config_path = folder / "scheduler" / "scheduler_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "timestep_spacing": "linspace"}))
    spec = dataclasses.replace(twin_catalog.get(case.model), repo=str(folder))
    handle = diffusion.load(spec, str(folder), Precision("fp32", "cpu"))
    seen, hook = unet_timesteps(handle.pipe)
    request, _ = diffusion.check_request(spec, prompt="x", width=64, height=64, seed=1)
    diffusion.generate(handle, request)
    hook.remove()
    assert handle.pipe.scheduler.config.timestep_spacing == "trailing" and seen == [999.0]
    diffusion.release(handle)


def test_schedulers_keep_v_prediction_and_spacing():
    """SD 2.x 768 models predict v: a swapped scheduler that predicted noise would draw garbage."""
    from types import SimpleNamespace

    from diffusers import EulerDiscreteScheduler

    from models.families.diffusion import SCHEDULERS, DiffusionHandle, use_scheduler

    default = EulerDiscreteScheduler(prediction_type="v_prediction", timestep_spacing="trailing", steps_offset=1)
    handle = DiffusionHandle(pipe=SimpleNamespace(scheduler=default), spec_id="v", variant="sd15", device="cpu",
                             precision="fp32", attention_backend="SDPA", default_scheduler=default)
    for name, (_, extra) in SCHEDULERS.items():
        use_scheduler(handle, name)
        config = handle.pipe.scheduler.config
        assert (config.prediction_type, config.timestep_spacing) == ("v_prediction", "trailing"), name
        assert all(config[key] == value for key, value in extra.items()), name


# ---- the same recipe, the same pixels -----------------------------------------------------------

@each_case
def test_same_seed_same_pixels_and_the_png_recipe_remakes_them(case, twins, settings):
    from models.text_to_image import png_info, recipe_controls

    values = dict(negative_prompt="blurry", style="watercolor", model=case.model, width=64, height=72, seed=11,
                  num_images=2, scheduler="Euler a", steps=case.quick_steps)
    gallery, info = generate(twins, settings, "a cat 🐱 on a sofa", **values)
    again, _ = generate(twins, settings, "a cat 🐱 on a sofa", **values)
    first, second = pixels(gallery[0][0]), pixels(gallery[1][0])
    assert first.shape == (72, 64, 3) and not np.array_equal(first, second), "seed + 1 draws another image"
    assert np.array_equal(first, pixels(again[0][0])) and np.array_equal(second, pixels(again[1][0]))
    recipe = png_info(gallery[1][0])
    controls, notices = recipe_controls(twins, recipe)
    assert controls["model"] == case.model and controls["seed"] == info["seed"] + 1 and not notices
    remade, _ = generate(twins, settings, **controls)
    # the PNG's recipe re-makes its image alone; batching changes only the float rounding
    difference = np.abs(pixels(remade[0][0]).astype(int) - second.astype(int))
    assert difference.max() <= BATCH_TOLERANCE["max"] and difference.mean() <= BATCH_TOLERANCE["mean"]
    assert nothing_pinned(twins)


@each_case
def test_negative_prompt_only_counts_with_guidance_above_one(case, twins, settings):
    base = dict(model=case.model, width=64, height=64, seed=9, steps=case.quick_steps)
    off_with, off_info = generate(twins, settings, "a house", negative_prompt="a blue sky", guidance=1.0, **base)
    off_without, _ = generate(twins, settings, "a house", guidance=1.0, **base)
    assert any("has no effect" in n for n in off_info["notices"])
    assert np.array_equal(pixels(off_with[0][0]), pixels(off_without[0][0]))
    on_with, _ = generate(twins, settings, "a house", negative_prompt="a blue sky", guidance=4.0, **base)
    on_without, _ = generate(twins, settings, "a house", guidance=4.0, **base)
    assert not np.array_equal(pixels(on_with[0][0]), pixels(on_without[0][0])), "guidance > 1 reads the negative"


# ---- what each architecture reads -----------------------------------------------------------------

@each_sdxl
def test_sdxl_reads_its_second_text_encoder_and_size_conditioning(case, twins, monkeypatch):
    import torch

    from models.families import diffusion

    spec = twins.catalog.get(case.model)
    request, _ = diffusion.check_request(spec, prompt="a red boat", width=80, height=64, seed=5,
                                         steps=case.quick_steps)
    with twins.use(case.model) as handle:
        pipe = handle.pipe
        pooled, unet_inputs = [], []
        encoder_hook = pipe.text_encoder_2.register_forward_hook(
            lambda module, args, output: pooled.append(output.text_embeds.detach().clone()))
        unet_hook = pipe.unet.register_forward_pre_hook(
            lambda module, args, kwargs: unet_inputs.append((kwargs["encoder_hidden_states"].shape[-1], {
                key: value.clone() for key, value in kwargs["added_cond_kwargs"].items()})), with_kwargs=True)
        try:
            plain = diffusion.generate(handle, request)
        finally:
            encoder_hook.remove()
            unet_hook.remove()
        assert pooled, "text_encoder_2 never ran"
        width, added = unet_inputs[0]
        assert width == pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
        assert torch.equal(added["text_embeds"][-1], pooled[0][0]), "the UNet gets text_encoder_2's pooled prompt"
        assert added["time_ids"][-1].tolist() == [64, 80, 0, 0, 64, 80], "original size, crop, target size (h, w)"
        # and the micro-conditioning reaches the pixels: told the original was 1024x1024, it draws another image
        add_time_ids = pipe._get_add_time_ids
        monkeypatch.setattr(pipe, "_get_add_time_ids",
                            lambda original_size, *args, **kwargs: add_time_ids((1024, 1024), *args, **kwargs))
        resized = diffusion.generate(handle, request)
    assert not np.array_equal(np.array(plain.images[0]), np.array(resized.images[0]))


@each_case
def test_prompt_overflow_is_reported_for_each_text_encoder(case, twins, monkeypatch):
    from models.families import diffusion

    spec = twins.catalog.get(case.model)
    # the twins' tokenizers read one token per character: 75 fit between the start and end tokens
    long_prompt, _ = diffusion.check_request(spec, prompt="x" * 75 + " tail end", seed=1, width=64, height=64,
                                             steps=1)
    with twins.use(case.model) as handle:
        result = diffusion.generate(handle, long_prompt)
        assert [n for n in result.notices if "this part was cut" in n] == [
            "The prompt is longer than the text encoder's 77 tokens; this part was cut: \"tail end\""]
        if case.sdxl:  # both encoders are read: where their windows differ, each cut is reported
            monkeypatch.setattr(handle.pipe.tokenizer_2, "model_max_length", 20)
            notices = diffusion.overflow_notices(handle.pipe, "x" * 18 + " blue sea", "")
            assert notices == ["The prompt is longer than the second text encoder's 20 tokens; this part was cut: "
                               "\"blue sea\""], notices


@each_case
def test_safety_checker_runs_where_the_repo_ships_one(case, twins, settings, monkeypatch):
    values = dict(model=case.model, width=64, height=64, seed=2, steps=case.quick_steps)
    with twins.use(case.model) as handle:
        checker = handle.safety_checker
    if not case.safety_checker:
        assert checker is None
        assert generate(twins, settings, "x", **values)[1]["safety_checker"].startswith("none")
        return
    calls = []
    checker.register_forward_pre_hook(lambda module, args: calls.append(1))
    _, info = generate(twins, settings, "x", **values)
    assert info["safety_checker"] == "on" and info["nsfw_flagged"] == [False] and calls
    calls.clear()
    _, info = generate(twins, settings, "x", safety_checker=False, **values)
    assert info["safety_checker"] == "off" and not calls
    monkeypatch.setattr(checker.concept_embeds_weights, "data", checker.concept_embeds_weights.data - 3)
    gallery, info = generate(twins, settings, "x", **values)  # every concept now scores above its threshold
    assert info["nsfw_flagged"] == [True] and any("blacked out" in n for n in info["notices"])
    assert not pixels(gallery[0][0]).any()


@each_case
def test_attention_slicing_and_vae_tiling(case, twins, monkeypatch):
    from diffusers.models.attention_processor import SlicedAttnProcessor

    from models.families import diffusion

    spec = twins.catalog.get(case.model)
    plain_request, _ = diffusion.check_request(spec, prompt="x", seed=3, width=96, height=96, steps=case.quick_steps)
    options, _ = diffusion.check_request(spec, prompt="x", seed=3, width=96, height=96, steps=case.quick_steps,
                                         attention_slicing=True, vae_tiling=True)
    with twins.use(case.model) as handle:
        vae = handle.pipe.vae
        tiles = []
        tiled_decode = vae.tiled_decode
        monkeypatch.setattr(vae, "tiled_decode", lambda *a, **k: tiles.append(1) or tiled_decode(*a, **k))
        plain = np.array(diffusion.generate(handle, plain_request).images[0], dtype=int)
        assert not tiles
        result = diffusion.generate(handle, options)
        assert tiles and result.attention_backend == "SDPA + attention slicing"
        assert any(isinstance(p, SlicedAttnProcessor) for p in handle.pipe.unet.attn_processors.values())
        # slicing and tiling change how, not what, is computed (tiles are blended at the seams)
        assert np.abs(np.array(result.images[0], dtype=int) - plain).mean() < 12
        tiles.clear()
        back = diffusion.generate(handle, plain_request)
        assert not tiles and not handle.attention_slicing and not handle.vae_tiling
        assert np.array_equal(np.array(back.images[0], dtype=int), plain), "options switch back off cleanly"


@each_case
def test_memory_estimate_counts_the_images_of_one_call(case, twin_catalog):
    from models.families.diffusion import activation_bytes, batch_size_for, check_request, defaults_for

    spec = twin_catalog.get(case.model)
    width, height = case.size
    one = activation_bytes(spec, "fp16", width, height, 1, False, False)
    four_in_one_call = activation_bytes(spec, "fp16", width, height, 4, False, False, batch_size=4)
    four_one_by_one = activation_bytes(spec, "fp16", width, height, 4, False, False, batch_size=1)
    assert one < four_one_by_one < 1.05 * one < 3.5 * one < four_in_one_call, "a call's peak grows with its batch"
    tile = defaults_for(spec).vae_tile
    untiled = activation_bytes(spec, "fp16", tile, tile, 1, False, False)
    assert activation_bytes(spec, "fp16", tile, tile, 1, False, True) == untiled, "no tiles at or below the VAE's tile"
    assert activation_bytes(spec, "fp16", tile + 64, tile, 1, False, True) < untiled
    weights = spec.estimate_bytes("fp16")
    for batch in (4, 3, 2, 1):
        budget = weights + activation_bytes(spec, "fp16", width, height, 4, False, False, batch_size=batch)
        assert batch_size_for(spec, "fp16", width, height, 4, False, False, budget) == batch
        request, _ = check_request(spec, prompt="x", num_images=4, budget_bytes=budget, precision_name="fp16")
        assert request.batch_size == batch and [len(seeds) for seeds in request.batches] == {
            4: [4], 3: [3, 1], 2: [2, 2], 1: [1, 1, 1, 1]}[batch]
    with pytest.raises(ValueError, match="memory budget"):
        check_request(spec, prompt="x", num_images=4, budget_bytes=weights + four_one_by_one - 1024**2,
                      precision_name="fp16")


# ---- folders that are not what the entry says -------------------------------------------------------

def _img2img(folder: Path, case: Case) -> None:
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": case.img2img}))


def _no_tokenizer(folder: Path, case: Case) -> None:
    shutil.rmtree(folder / ("tokenizer_2" if case.sdxl else "tokenizer"))


def _no_vocabulary(folder: Path, case: Case) -> None:
    for name in ("vocab.json", "merges.txt"):
        (folder / "tokenizer" / name).unlink()


def _no_max_length(folder: Path, case: Case) -> None:
    config_path = folder / "tokenizer" / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    del config["model_max_length"]
    config_path.write_text(json.dumps(config))


def _no_index(folder: Path, case: Case) -> None:
    (folder / "model_index.json").unlink()


FAULTS = [
    (_img2img, r"is an image-to-image pipeline \(StableDiffusion(XL)?Img2ImgPipeline\), which text-to-image cannot"),
    (_no_tokenizer, r"lacks tokenizer(_2)?/ \(CLIPTokenizer\), which its model_index.json lists"),
    (_no_vocabulary, r"lacks the vocabulary of tokenizer/"),
    (_no_max_length, r"tokenizer reads \d+ tokens but its text encoder has 77 positions; set \"model_max_length\": 77"),
    (_no_index, r"has no model_index.json, so it is not a diffusers pipeline folder"),
]


@each_case
@pytest.mark.parametrize(("fault", "message"), FAULTS, ids=[fault.__name__.strip("_") for fault, _ in FAULTS])
def test_a_broken_models_file_entry_gets_a_clear_message(case, fault, message, twin_catalog, settings, tmp_path):
    from models.catalog import Catalog
    from models.manager import ModelManager

    folder = tmp_path / "model"
    shutil.copytree(twin_catalog.get(case.model).repo, folder)
    fault(folder, case)
    models_file = tmp_path / "models.yaml"
    models_file.write_text(f"models:\n  - {{id: mine/broken, task: text-to-image, family: diffusion, source: local, "
                           f"repo: '{folder}', variant: {twin_catalog.get(case.model).variant}, params_b: 0.0003}}\n")
    manager = ModelManager(Catalog.load(models_file), settings)
    with pytest.raises(UserError, match=message):
        generate(manager, settings, "x", model="mine/broken", width=64, height=64, steps=1)
    assert not manager.is_loaded("mine/broken") and nothing_pinned(manager)


def test_an_image_to_image_hub_repo_is_refused_before_its_weights_download(twin_catalog, monkeypatch):
    from diffusers import AutoPipelineForText2Image, DiffusionPipeline

    from models.families import diffusion
    from models.quantization import Precision

    index = {"_class_name": "StableDiffusionXLImg2ImgPipeline"}
    monkeypatch.setattr(DiffusionPipeline, "load_config", classmethod(lambda cls, location, **kwargs: index))
    monkeypatch.setattr(AutoPipelineForText2Image, "from_pretrained",
                        classmethod(lambda cls, *args, **kwargs: pytest.fail("weights were downloaded")))
    spec = dataclasses.replace(twin_catalog.get("stabilityai/sdxl-turbo"), id="someone/sdxl-img2img", repo="")
    with pytest.raises(UserError, match=r"someone/sdxl-img2img is an image-to-image pipeline"):
        diffusion.load(spec, "someone/sdxl-img2img", Precision("fp32", "cpu"))


# ---- motion adapters (text to video) on the SD 1.5 twin ----------------------------------------------

SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"


@dataclasses.dataclass(frozen=True)
class MotionCase:
    """A hub motion adapter and what its repo and model card say."""

    adapter: str
    files: tuple[str, ...]  # what its folder holds (the Lightning twin adds the config.json its repo lacks)
    scheduler: str
    scheduler_config: dict
    steps: int
    guidance: float


MOTION_CASES = [
    MotionCase("guoyww/animatediff-motion-adapter-v1-5-2", ("config.json", "diffusion_pytorch_model.safetensors"),
               "DDIMScheduler", {"beta_schedule": "linear", "timestep_spacing": "linspace", "clip_sample": False,
                                 "steps_offset": 1}, 25, 7.5),
    MotionCase("ByteDance/AnimateDiff-Lightning", ("animatediff_lightning_4step_diffusers.safetensors", "config.json"),
               "EulerDiscreteScheduler", {"beta_schedule": "linear", "timestep_spacing": "trailing"}, 4, 1.0),
]
each_motion = pytest.mark.parametrize("case", MOTION_CASES, ids=["animatediff", "lightning"])


@each_motion
def test_motion_adapter_twin_animates_sd15_through_its_own_code_path(case, twins, twin_catalog, settings):
    import subprocess

    from models.families import diffusion
    from models.text_to_video import Txt2VideoRequest, txt2video, video_defaults

    if shutil.which("ffmpeg") is None:
        pytest.skip("video needs ffmpeg")
    folder = Path(twin_catalog.get(case.adapter).repo)
    assert tuple(sorted(f.name for f in folder.iterdir() if not f.name.startswith("."))) == case.files
    defaults = video_defaults(twins, case.adapter)
    assert (defaults["steps"], defaults["guidance"], defaults["model"]) == (case.steps, case.guidance, SD15)
    with twins.use(case.adapter) as motion, twins.use(SD15) as base:
        pipe = diffusion.video_pipeline(base, motion)
        config = pipe.scheduler.config
        assert type(pipe.scheduler).__name__ == case.scheduler and type(base.pipe.scheduler).__name__ == "PNDMScheduler"
        assert {key: config[key] for key in case.scheduler_config} == case.scheduler_config
        assert config.beta_start == base.default_scheduler.config.beta_start, "the base's betas' range is kept"
        del pipe
    del motion, base
    request = Txt2VideoRequest.build(twins, settings, prompt="a windmill", motion_adapter=case.adapter, width=64,
                                     height=64, frames=8, steps=2, seed=4)
    assert request.model == SD15 and request.video.guidance == case.guidance
    mp4, _, info = txt2video(twins, settings, request)
    frames = subprocess.run(["ffprobe", "-v", "error", "-count_frames", "-show_entries", "stream=nb_read_frames",
                             "-of", "csv=p=0", mp4], capture_output=True, text=True, check=True).stdout.strip()
    assert frames == "8" and info["model"] == SD15 and info["motion_adapter"] == case.adapter
    assert nothing_pinned(twins)


def test_lightning_checkpoint_missing_or_of_another_shape(twin_catalog, monkeypatch, tmp_path):
    import huggingface_hub
    from diffusers import MotionAdapter
    from safetensors.torch import save_file

    from models.families import diffusion
    from models.quantization import Precision

    spec = twin_catalog.get("ByteDance/AnimateDiff-Lightning")
    checkpoint = diffusion.MOTION_VARIANTS["lightning"].checkpoint
    folder = tmp_path / "snapshot"
    shutil.copytree(spec.repo, folder)
    # online: the one file is downloaded, and the adapter gets the default (SD 1.5) configuration
    seen = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download",
                        lambda repo, filename: seen.append((repo, filename)) or str(folder / filename))
    tiny_config = MotionAdapter.load_config(folder)
    real_from_config = MotionAdapter.from_config.__func__
    monkeypatch.setattr(MotionAdapter, "from_config", classmethod(
        lambda cls, config, **kwargs: seen.append(dict(config)) or real_from_config(cls, tiny_config)))
    handle = diffusion.load(dataclasses.replace(spec, repo=""), "ByteDance/AnimateDiff-Lightning",
                            Precision("fp32", "cpu"))
    assert seen == [("ByteDance/AnimateDiff-Lightning", checkpoint), {}] and handle.variant == "lightning"
    monkeypatch.undo()
    save_file({"down_blocks.0.motion_modules.0.norm.weight": __import__("torch").zeros(3)}, str(folder / checkpoint))
    with pytest.raises(UserError, match=f"{checkpoint} is not a motion adapter of the expected shape"):
        diffusion.load(spec, str(folder), Precision("fp32", "cpu"))
    (folder / checkpoint).unlink()
    with pytest.raises(UserError, match=f"lacks {checkpoint}. Download it with `hf download "
                                        f"ByteDance/AnimateDiff-Lightning {checkpoint}`"):
        diffusion.load(spec, str(folder), Precision("fp32", "cpu"))


# ---- CUDA only ---------------------------------------------------------------------------------

@pytest.mark.gpu
@each_case
def test_cuda_fp16_twin_generates_and_unloads_to_baseline(case, twin_catalog, tmp_path):
    import torch
    from conftest import make_settings

    from models.manager import ModelManager

    settings = make_settings(tmp_path, device="cuda")
    manager = ModelManager(twin_catalog, settings)
    manager.budget = ROOMY_BUDGET
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()
    gallery, info = generate(manager, settings, "a red boat", model=case.model, width=64, height=64, seed=5,
                             steps=case.quick_steps)
    assert (info["precision"], info["device"]) == ("fp16", "cuda")
    with manager.use(case.model) as handle:
        assert handle.pipe.unet.dtype == torch.float16 and handle.pipe.vae.dtype == torch.float16
    assert pixels(gallery[0][0]).std() > 1, "fp16 (and SDXL's upcast VAE) draws something, not NaN black"
    manager.unload_all()
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() - baseline < 8 * 1024**2 and not manager.leaks
