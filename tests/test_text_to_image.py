"""Text-to-image: the diffusion family on tiny-sd, PNG recipes, style presets, the tab's functions and /txt2img."""

from __future__ import annotations

import io
import json
import math
import threading
from pathlib import Path

import pytest

from models import __version__
from models.pnginfo import RECIPE_FIELDS, make_recipe, read_recipe, save_png

TINY = "tiny-sd"


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """tiny-sd's layers are too small to gain from threads, and on a busy 2-core machine two OpenMP
    threads wait on each other: 64x64 took 2.3 s with two threads and 0.13 s with one."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pixels(path):
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        return np.array(image.convert("RGB"))


def nothing_pinned(manager) -> bool:
    return not any(entry["pinned"] for entry in manager.snapshot())


def assert_batch_close(batched, alone, tolerance=None) -> None:
    """An image made in a batch equals the same seed made alone, within the documented tolerance."""
    import numpy as np

    from models.families.diffusion import BATCH_TOLERANCE

    tolerance = tolerance or BATCH_TOLERANCE
    difference = np.abs(np.asarray(batched, dtype=int) - np.asarray(alone, dtype=int))
    assert difference.max() <= tolerance["max"] and difference.mean() <= tolerance["mean"], (
        f"batched vs alone: max {difference.max()}, mean {difference.mean():.4f} (tolerance {tolerance})")


def recipe(**overrides) -> dict:
    values = dict(prompt="a cat 🐱 on a sofa", negative_prompt="blurry", style="none", model=TINY,
                  scheduler="Euler a", steps=2, guidance=5.0, seed=42, width=64, height=64,
                  workbench_version=__version__)
    return make_recipe(**{**values, **overrides})


# ---- PNG recipes ---------------------------------------------------------------------------------

def test_png_recipe_round_trip_and_safe_names(tmp_path):
    from PIL import Image

    stored = recipe(prompt="../../etc/passwd 日本 🐱 " + "x" * 300)
    path = save_png(Image.new("RGB", (8, 8), "red"), stored, tmp_path / "out")
    again = save_png(Image.new("RGB", (8, 8), "red"), stored, tmp_path / "out")
    assert path.parent == tmp_path / "out" and again != path, "a second save must not overwrite the first"
    assert all(ch.isalnum() or ch in "-." for ch in path.name) and len(path.name) < 100
    assert read_recipe(path) == stored
    with Image.open(path) as image:
        assert "Negative prompt: blurry" in image.text["parameters"]


def test_png_info_rejects_foreign_and_damaged_files(tmp_path):
    from PIL import Image

    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    with pytest.raises(ValueError, match="no workbench recipe"):
        read_recipe(plain)
    good = save_png(Image.new("RGB", (8, 8)), recipe(), tmp_path)
    damaged = tmp_path / "damaged.png"
    damaged.write_bytes(good.read_bytes()[:60])
    with pytest.raises(ValueError, match="damaged"):
        read_recipe(damaged)
    jpeg = tmp_path / "photo.png"
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="JPEG")
    jpeg.write_bytes(buffer.getvalue())
    with pytest.raises(ValueError, match="not a PNG"):
        read_recipe(jpeg)
    with pytest.raises(ValueError, match="Cannot open"):
        read_recipe(tmp_path / "missing.png")
    with pytest.raises(ValueError, match="missing"):
        make_recipe(prompt="x")


# ---- styles --------------------------------------------------------------------------------------

def test_styles_builtin_and_user_overrides(tmp_path, monkeypatch):
    from models.families.diffusion import STYLES_ENV, apply_style, load_styles

    monkeypatch.delenv(STYLES_ENV, raising=False)
    builtin = load_styles(tmp_path)
    assert {"none", "photorealistic", "oil painting", "cartoon", "watercolor", "sketch"} <= set(builtin)
    prompt, negative = apply_style(builtin, "watercolor", "a fox", "text")
    assert "a fox" in prompt and prompt != "a fox" and negative.endswith("text")
    assert apply_style(builtin, "none", "a fox", "") == ("a fox", "")

    (tmp_path / "styles.yaml").write_text("styles:\n  neon: {prompt: 'neon {prompt}', negative: dull}\n")
    assert apply_style(load_styles(tmp_path), "neon", "cat", "") == ("neon cat", "dull")
    env_file = tmp_path / "env-styles.yaml"
    env_file.write_text("styles:\n  retro: {prompt: '{prompt}, 1970s'}\n")
    monkeypatch.setenv(STYLES_ENV, str(env_file))
    assert set(load_styles(tmp_path)) == {"retro", "none"}, "the env file wins and 'none' is always there"
    env_file.write_text("styles:\n  broken: {prompt: 'no placeholder'}\n")
    with pytest.raises(ValueError, match=r"contains \{prompt\}"):
        load_styles(tmp_path)
    with pytest.raises(ValueError, match="Unknown style"):
        apply_style(builtin, "baroque", "x", "")


# ---- request checks (no model loaded) ------------------------------------------------------------

def test_defaults_follow_the_model_variant(catalog):
    from models.families.diffusion import check_request

    turbo, _ = check_request(catalog.get("stabilityai/sd-turbo"), prompt="x")
    sdxl, _ = check_request(catalog.get("stabilityai/stable-diffusion-xl-base-1.0"), prompt="x")
    sdxl_turbo, _ = check_request(catalog.get("stabilityai/sdxl-turbo"), prompt="x")
    sd15, _ = check_request(catalog.get("stable-diffusion-v1-5/stable-diffusion-v1-5"), prompt="x")
    assert (turbo.steps, turbo.guidance, turbo.width) == (1, 0.0, 512)
    assert (sdxl_turbo.steps, sdxl_turbo.guidance) == (1, 0.0)
    assert (sdxl.width, sdxl.height) == (1024, 1024) and sdxl.steps > 4
    assert (sd15.width, sd15.guidance) == (512, 7.5)
    with pytest.raises(ValueError, match="steps must be between 1 and 10"):
        check_request(catalog.get("stabilityai/sd-turbo"), prompt="x", steps=20)


BAD_INPUTS = [
    ({"width": 100}, "multiple of 8"),
    ({"height": 36}, "height must be between 64"),
    ({"width": 4096}, "width must be between 64 and 512"),
    ({"steps": 0}, "steps must be between 1 and 50"),
    ({"steps": 51}, "steps must be between 1 and 50"),
    ({"steps": 2.5}, "whole number"),
    ({"guidance": -1}, "guidance must be between 0.0"),
    ({"guidance": math.nan}, "NaN"),
    ({"guidance": "lots"}, "guidance must be a number"),
    ({"num_images": 5}, "number of images must be between 1 and 4"),
    ({"seed": -5}, "seed must be between -1"),
    ({"scheduler": "Heun++"}, "Unknown scheduler"),
    ({"style": "baroque"}, "Unknown style"),
    ({"prompt": "a cat \udcff"}, "invalid Unicode"),
    ({"prompt": b"caf\xe9"}, "must be text, got bytes"),
    ({"negative_prompt": "x" * 5000}, "limit is 4,000"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD_INPUTS, ids=[m for _, m in BAD_INPUTS])
def test_bad_inputs_are_refused_before_loading(catalog, overrides, message):
    from models.families.diffusion import check_request, load_styles

    values = {"prompt": "a cat", **overrides}
    with pytest.raises(ValueError, match=message):
        check_request(catalog.get(TINY), styles=load_styles(None), **values)


def test_budget_and_notices(catalog):
    from models.families.diffusion import check_request

    spec = catalog.get(TINY)
    with pytest.raises(ValueError, match="memory budget"):
        check_request(spec, prompt="x", width=512, height=512, num_images=4, budget_bytes=16 * 1024**2)
    request, _ = check_request(spec, prompt="x", width=512, height=512, num_images=4, budget_bytes=1024**3)
    assert request.seeds == [request.seed + i for i in range(4)]
    request, notices = check_request(spec, prompt="  ", negative_prompt="ugly", guidance=0, seed=-1)
    assert any("prompt is empty" in n for n in notices) and any("no effect" in n for n in notices)
    assert 0 <= request.seed < 2**32


# ---- the family on tiny-sd -----------------------------------------------------------------------

def test_family_end_to_end_deterministic(manager, catalog):
    import numpy as np

    from models.families import diffusion

    spec = catalog.get(TINY)
    request, _ = diffusion.check_request(spec, prompt="a red square", seed=7, steps=2, width=64, height=64)
    other, _ = diffusion.check_request(spec, prompt="a red square", seed=8, steps=2, width=64, height=64)
    with manager.use(TINY) as handle:
        assert type(handle.pipe).__name__ == "StableDiffusionPipeline" and not handle.has_safety_checker
        first = diffusion.generate(handle, request)
        second = diffusion.generate(handle, request)
        third = diffusion.generate(handle, other)
        long_prompt = diffusion.generate(handle, diffusion.check_request(spec, prompt="word " * 30, seed=1,
                                                                         steps=1)[0])
    assert first.images[0].size == (64, 64) and first.steps_done == 2 and first.attention_backend == "SDPA"
    assert np.array_equal(np.array(first.images[0]), np.array(second.images[0])), "same seed, same pixels"
    assert not np.array_equal(np.array(first.images[0]), np.array(third.images[0]))
    assert np.array(first.images[0]).std() > 1, "random weights still draw something, not a blank"
    assert any("this part was cut" in n and "word" in n for n in long_prompt.notices)
    assert nothing_pinned(manager)


def test_every_scheduler_and_memory_option_runs(manager, catalog):
    import numpy as np

    from models.families import diffusion

    spec = catalog.get(TINY)
    with manager.use(TINY) as handle:
        for name in diffusion.SCHEDULERS:
            request, _ = diffusion.check_request(spec, prompt="x", seed=3, steps=2, scheduler=name)
            assert diffusion.generate(handle, request).images
            class_name = diffusion.SCHEDULERS[name][0]
            assert class_name is None or type(handle.pipe.scheduler).__name__ == class_name
        plain_request, _ = diffusion.check_request(spec, prompt="x", seed=3, steps=2, width=96, height=96)
        plain = np.array(diffusion.generate(handle, plain_request).images[0], dtype=int)
        optioned, _ = diffusion.check_request(spec, prompt="x", seed=3, steps=2, width=96, height=96,
                                              attention_slicing=True, vae_tiling=True, cpu_offload=True)
        result = diffusion.generate(handle, optioned)
        assert handle.attention_slicing and handle.vae_tiling and not handle.offloaded
        assert result.attention_backend == "SDPA + attention slicing"
        assert any("only applies on CUDA" in n for n in result.notices)
        # slicing and tiling change how, not what, is computed (tiles are blended at the seams)
        assert np.abs(np.array(result.images[0], dtype=int) - plain).mean() < 8
        back = diffusion.generate(handle, plain_request)
        assert not handle.attention_slicing and not handle.vae_tiling
        assert np.array_equal(np.array(back.images[0], dtype=int), plain), "options switch back off cleanly"


# ---- the core functions the tab and the API call ----------------------------------------------------

def generate(manager, settings, prompt="", *, stop=None, on_step=None, **values):
    """/txt2img's path: a request built from values, then the run."""
    from models.text_to_image import Txt2ImgRequest, txt2img

    request = Txt2ImgRequest.build(manager, settings, prompt=prompt, **values)
    return txt2img(manager, settings, request, stop=stop, on_step=on_step)

def test_txt2img_saves_pngs_that_reproduce(manager, settings):
    from models.text_to_image import png_info, recipe_controls

    gallery, info = generate(manager, settings, "a lighthouse 🌊", negative_prompt="fog", style="watercolor",
                             model=TINY, width=64, height=64, steps=2, guidance=6.5, seed=-1, num_images=2,
                             scheduler="DPM++ 2M Karras")
    assert len(gallery) == 2 and info["seeds"] == [info["seed"], info["seed"] + 1]
    assert info["steps_done"] == 4 and info["safety_checker"].startswith("none")
    stored = png_info(gallery[1][0])
    assert {k: stored[k] for k in RECIPE_FIELDS} == {
        "prompt": "a lighthouse 🌊", "negative_prompt": "fog", "style": "watercolor", "model": TINY,
        "scheduler": "DPM++ 2M Karras", "steps": 2, "guidance": 6.5, "seed": info["seed"] + 1, "width": 64,
        "height": 64, "workbench_version": __version__}
    first = png_info(gallery[0][0])
    values, notices = recipe_controls(manager, first)
    assert values["num_images"] == 1 and not notices
    again, _ = generate(manager, settings, **values)
    assert_batch_close(pixels(gallery[0][0]), pixels(again[0][0]))  # the PNG's recipe re-makes its pixels
    assert nothing_pinned(manager)


def test_a_batch_is_one_call_and_each_image_reproduces_alone(manager, settings):
    """Four images in one pipeline call (the UNet sees 4 x 2 latents with CFG), one CPU generator per image
    seeded seed + i; each image then equals its own single-image run within BATCH_TOLERANCE."""
    from models.text_to_image import png_info, recipe_controls

    values = dict(model=TINY, width=64, height=64, steps=3, guidance=5.0, seed=100, scheduler="Euler a")
    batch_sizes, progress = [], []
    with manager.use(TINY) as handle:
        hook = handle.pipe.unet.register_forward_pre_hook(lambda module, args: batch_sizes.append(args[0].shape[0]))
    del handle
    try:
        gallery, info = generate(manager, settings, "a red boat", negative_prompt="fog", num_images=4, **values,
                                 on_step=lambda done, total: progress.append((done, total)))
        assert (info["pipeline_calls"], info["batch_size"]) == (1, 4) and set(batch_sizes) == {8}
        assert progress == [(4 * step, 12) for step in range(1, 4)], "steps counted per image: 4 per step"
        assert info["seeds"] == [100, 101, 102, 103] and info["steps_done"] == 12
        batch_sizes.clear()
        for index, (path, _) in enumerate(gallery):
            controls, _ = recipe_controls(manager, png_info(path))
            assert controls["seed"] == 100 + index
            alone, _ = generate(manager, settings, **controls)
            assert_batch_close(pixels(path), pixels(alone[0][0]))
        assert set(batch_sizes) == {2}, "a recipe re-makes its image alone"
    finally:
        hook.remove()
    assert not (pixels(gallery[0][0]) == pixels(gallery[1][0])).all(), "seed + 1 draws another image"
    assert nothing_pinned(manager)


def test_a_batch_the_budget_cannot_hold_is_made_in_smaller_calls(manager, settings, catalog):
    from models.families import diffusion

    spec = catalog.get(TINY)
    weights = spec.estimate_bytes("fp32")
    two = weights + diffusion.activation_bytes(spec, "fp32", 128, 128, 4, False, False, batch_size=2)
    three = weights + diffusion.activation_bytes(spec, "fp32", 128, 128, 4, False, False, batch_size=3)
    manager.budget = (two + three) // 2
    gallery, info = generate(manager, settings, "x", model=TINY, width=128, height=128, steps=2, seed=7, num_images=4)
    assert (info["batch_size"], info["pipeline_calls"], len(gallery)) == (2, 2, 4)
    assert any("allows 2 of the 4 images in one pipeline call; they are made in 2 calls" in n for n in info["notices"])
    manager.budget = 10 * three
    whole, info = generate(manager, settings, "x", model=TINY, width=128, height=128, steps=2, seed=7, num_images=4)
    assert (info["batch_size"], info["pipeline_calls"]) == (4, 1)
    for halves, together in zip(gallery, whole, strict=True):
        assert_batch_close(pixels(halves[0]), pixels(together[0]))
    manager.budget = weights + diffusion.activation_bytes(spec, "fp32", 128, 128, 4, False, False) - 1
    with pytest.raises(ValueError, match="memory budget"):
        generate(manager, settings, "x", model=TINY, width=128, height=128, steps=2, num_images=4)


@pytest.mark.parametrize(("batch", "stop_at", "message", "kept"), [
    (1, 13, "Stopped at step 3 of 10 of image 2 of 4; kept 1 finished image.", 1),
    (4, 12, "Stopped at step 3 of 10 of images 1-4 (made together) of 4; kept 0 finished images.", 0),
    (2, 20, "Stopped before image 3 of 4; kept 2 finished images.", 2),
])
def test_stop_says_where_each_image_was(manager, settings, catalog, batch, stop_at, message, kept):
    from models.families import diffusion

    spec = catalog.get(TINY)
    manager.budget = spec.estimate_bytes("fp32") + diffusion.activation_bytes(spec, "fp32", 64, 64, 4, False, False,
                                                                              batch_size=batch)
    stop = threading.Event()

    def on_step(done, total):
        if done >= stop_at:
            stop.set()

    gallery, info = generate(manager, settings, "x", model=TINY, steps=10, seed=1, num_images=4, stop=stop,
                             on_step=on_step)
    assert info["stopped"] and len(gallery) == kept and info["batch_size"] == batch
    assert message in info["notices"], info["notices"]
    assert nothing_pinned(manager)


def test_stop_interrupts_at_the_next_step_and_unpins(manager, settings):
    stop = threading.Event()
    seen = []

    def on_step(done, total):
        seen.append(done)
        if done == 1:
            stop.set()

    gallery, info = generate(manager, settings, "x", model=TINY, steps=10, seed=1, stop=stop, on_step=on_step)
    assert info["stopped"] and info["steps_done"] == 1 and seen == [1]
    assert gallery == [] and "Stopped at step 1 of 10 of image 1 of 1; kept 0 finished images." in info["notices"]
    assert info["stopped_at"] == {"first": 1, "last": 1, "step": 1, "steps": 10}
    assert nothing_pinned(manager)
    stop.clear()
    gallery, info = generate(manager, settings, "x", model=TINY, steps=2, seed=1, stop=stop)
    assert len(gallery) == 1 and not info["stopped"], "the model keeps serving after a stop"
    assert manager.unload(TINY) and not manager.leaks, "nothing the run held outlives the unload"


# ---- the tab: one-line run info, Reuse seed, the selected image, sliders that follow the model ----------

def test_run_summary_is_one_readable_line():
    from tabs.text_to_image import INFO_PLACEHOLDER, run_summary

    image = {"model": TINY, "seed": 42, "seeds": [42], "width": 64, "height": 96, "steps": 4, "seconds": 0.31,
             "device": "cpu", "precision": "fp32", "attention_backend": "SDPA", "stopped": False}
    assert run_summary(image) == "seed 42 · 64×96 · 4 steps · 0.31 s · tiny-sd · cpu · fp32 · SDPA"
    batch = {**image, "seeds": [42, 43, 44], "pipeline_calls": 1, "stopped": True}
    assert run_summary(batch).startswith("**Stopped** · seeds 42–44 · 3 images in 1 call · 64×96")
    video = {**image, "mode": "video", "motion_adapter": "tiny-motion", "frames": 16, "fps": 8,
             "duration_seconds": 2.0}
    assert "16 frames at 8 fps (2 s)" in run_summary(video) and "tiny-motion on tiny-sd" in run_summary(video)
    assert run_summary(None) == INFO_PLACEHOLDER and "seed" not in INFO_PLACEHOLDER, "the browser test waits for it"


def test_reuse_seed_and_the_selected_image(tmp_path):
    from tabs.text_to_image import seed_to_reuse, selected_image

    files = [str(tmp_path / f"{i}.png") for i in range(3)]
    for file in files:
        Path(file).write_bytes(b"png")
    info = {"seed": 10, "seeds": [10, 11, 12], "files": files}
    assert seed_to_reuse(info, files[2], files) == 12, "the selected image's own seed"
    assert seed_to_reuse(info, None, files) == 10 and seed_to_reuse({"mode": "video", "seed": 5}, files[1], files) == 5
    with pytest.raises(ValueError, match="Generate an image first"):
        seed_to_reuse(None, None, [])
    assert selected_image(files[1]) == files[1]
    for nothing in (None, ""):
        with pytest.raises(ValueError, match="Generate an image first"):
            selected_image(nothing)
    Path(files[1]).unlink()
    with pytest.raises(ValueError, match="1.png\\) is no longer on disk"):
        selected_image(files[1])


def test_sliders_take_the_models_limits_and_the_api_keeps_wide_bounds(manager, settings):
    import gradio as gr

    from tabs import text_to_image as tab

    with gr.Blocks() as demo:
        ui = tab.build(manager, settings)
    assert (ui.width.maximum, ui.height.maximum, ui.steps.maximum) == (512, 512, 50), "tiny-sd's own limits"
    assert (ui.api.width.maximum, ui.api.steps.maximum) == (2048, 100), "the API's inputs cover every model"
    assert ui.ask_vqa.elem_id == "t2i-ask-vqa" and isinstance(ui.selected_image, gr.State)
    assert {ui.prompt.elem_id, ui.run.elem_id, ui.gallery.elem_id, ui.info.elem_id, ui.stop.elem_id,
            ui.backend.elem_id} == {"t2i-prompt", "t2i-generate", "t2i-gallery", "t2i-info", "t2i-stop", "t2i-backend"}
    handlers = {fn.fn.__name__: fn.fn for fn in demo.fns.values() if fn.fn is not None}
    updates = handlers["on_model_change"]("Image", "stabilityai/stable-diffusion-xl-base-1.0", "tiny-motion")
    width, height, steps = updates[2], updates[3], updates[4]
    assert (width["value"], width["maximum"], height["maximum"]) == (1024, 2048, 2048)
    assert (steps["value"], steps["maximum"]) == (30, 100)
    updates = handlers["on_model_change"]("Image", TINY, "tiny-motion")
    assert (updates[2]["maximum"], updates[4]["maximum"]) == (512, 50)
    # Video mode: the adapter's steps (Lightning: 4 of at most 8) and a base it can animate
    updates = handlers["on_video_input"]("Video", "stabilityai/sdxl-turbo", "ByteDance/AnimateDiff-Lightning")
    assert updates[0]["value"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert (updates[4]["value"], updates[4]["maximum"], updates[5], updates[6]) == (4, 8, 1.0, 16)
    assert tab.slider_limits(manager, "Video", TINY, "tiny-motion")["frames"] == 8


def test_stop_registry_is_per_session():
    from tabs.common import StopRegistry

    stops = StopRegistry()
    assert not stops.stop("alice"), "nothing running"
    alice, bob = stops.start("alice"), stops.start("bob")
    assert stops.stop("alice") and alice.is_set() and not bob.is_set()
    stops.finish("alice", alice)
    assert not stops.stop("alice")


def test_model_defaults_and_foreign_recipes(manager):
    from models.text_to_image import model_defaults, recipe_controls

    assert model_defaults(manager, "stabilityai/stable-diffusion-xl-base-1.0")["width"] == 1024
    assert model_defaults(manager, "stabilityai/sdxl-turbo")["steps"] == 1
    with pytest.raises(ValueError, match="tiny-chat is a chat model; choose one of: .*tiny-sd"):
        model_defaults(manager, "tiny-chat")
    values, notices = recipe_controls(manager, recipe(model="someone/else-model"))
    assert values["model"] is None and "not in this workbench's catalog" in notices[0]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"model": "no/such-model"}, "Unknown model"),
    ({"model": "tiny-chat"}, "is a chat model"),
    ({"precision": "nf4"}, "needs CUDA"),
    ({"precision": "int3"}, "precision must be one of"),
    ({"width": 4096}, "width must be between"),
])
def test_txt2img_bad_input_leaves_nothing_pinned(manager, settings, kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate(manager, settings, "x", **{"model": TINY, **kwargs})
    assert nothing_pinned(manager)


# ---- the launched app ----------------------------------------------------------------------------

def test_txt2img_endpoint(client, app_server):
    _, manager, settings = app_server
    gallery, info = client.predict(prompt="a red boat", negative_prompt="", style="sketch", model=TINY, width=64,
                                   height=64, steps=2, guidance=5.0, seed=1234, num_images=1, api_name="/txt2img")
    info = info if isinstance(info, dict) else json.loads(info)
    assert info["seed"] == 1234 and info["model"] == TINY and len(gallery) == 1
    served = gallery[0]["image"]
    assert pixels(served).shape == (64, 64, 3)
    recipe_back = read_recipe(served)
    assert recipe_back["seed"] == 1234 and recipe_back["style"] == "sketch", "the served file keeps its recipe"
    assert nothing_pinned(manager)


@pytest.mark.parametrize(("overrides", "message"), [
    ({"width": 100}, "multiple of 8"),
    ({"width": 40}, "less than minimum value 64"),  # Gradio's own slider check, before ours
    ({"width": 1024}, "width must be between 64 and 512 for tiny-sd"),
    ({"steps": 0}, "less than minimum value 1"),
    ({"steps": 70}, "steps must be between 1 and 50 for tiny-sd"),
    ({"guidance": -2}, "less than minimum value 0"),
    ({"num_images": 9}, "greater than maximum value 4"),
    ({"prompt": "x" * 5000}, "limit is 4,000"),
    ({"scheduler": "Warp drive"}, "Warp drive is not in the list of choices"),  # Gradio's dropdown check
    ({"model": "nope"}, "nope is not in the list of choices"),
])
def test_txt2img_endpoint_bad_input(client, app_server, overrides, message):
    from gradio_client.exceptions import AppError

    values = dict(prompt="x", negative_prompt="", style="none", model=TINY, width=64, height=64, steps=2,
                  guidance=5.0, seed=1, num_images=1)
    with pytest.raises(AppError, match=message):
        client.predict(**{**values, **overrides}, api_name="/txt2img")
    assert nothing_pinned(app_server[1])


def test_png_info_endpoint(client, tmp_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError
    from PIL import Image

    made = save_png(Image.new("RGB", (8, 8)), recipe(seed=99), tmp_path)
    assert client.predict(handle_file(str(made)), api_name="/png_info")["seed"] == 99
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    with pytest.raises(AppError, match="no workbench recipe"):
        client.predict(handle_file(str(plain)), api_name="/png_info")


# ---- CUDA only ---------------------------------------------------------------------------------

@pytest.mark.gpu
def test_cuda_fp16_nf4_offload_and_release(tmp_path):
    import torch
    from conftest import make_settings

    from models.catalog import Catalog
    from models.manager import ModelManager
    settings = make_settings(tmp_path, device="cuda")
    manager = ModelManager(Catalog.load(), settings)
    baseline = torch.cuda.memory_allocated()
    _, info = generate(manager, settings, "x", model=TINY, steps=2, seed=5)
    assert info["precision"] == "fp16" and info["device"] == "cuda" and info["attention_backend"] in ("SDPA",
                                                                                                      "xformers")
    _, info = generate(manager, settings, "x", model=TINY, steps=2, seed=5, cpu_offload=True)
    with manager.use(TINY) as handle:
        assert handle.offloaded and handle.pipe._all_hooks
    manager.unload_all()
    assert torch.cuda.memory_allocated() - baseline < 8 * 1024**2 and not manager.leaks
    _, info = generate(manager, settings, "x", model=TINY, steps=2, seed=5, precision="nf4")
    with manager.use(TINY, "nf4") as handle:
        assert any("4bit" in type(m).__name__ for m in handle.pipe.unet.modules())
    manager.unload_all()
    assert not manager.leaks


@pytest.mark.gpu
def test_cuda_batch_matches_single_runs_within_the_gpu_tolerance(tmp_path):
    """fp16 on CUDA rounds more coarsely than fp32 on CPU: a batch of 4 in one call against each image alone."""
    from conftest import make_settings

    from models.catalog import Catalog
    from models.families.diffusion import GPU_BATCH_TOLERANCE
    from models.manager import ModelManager

    settings = make_settings(tmp_path, device="cuda")
    manager = ModelManager(Catalog.load(), settings)
    gallery, info = generate(manager, settings, "a red boat", model=TINY, steps=4, seed=11, num_images=4)
    assert (info["pipeline_calls"], info["precision"], len(gallery)) == (1, "fp16", 4)
    for index, (path, _) in enumerate(gallery):
        alone, _ = generate(manager, settings, "a red boat", model=TINY, steps=4, seed=11 + index)
        assert_batch_close(pixels(path), pixels(alone[0][0]), GPU_BATCH_TOLERANCE)
    manager.unload_all()
    assert not manager.leaks
