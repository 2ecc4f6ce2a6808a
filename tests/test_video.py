"""Text to video (issue #13): AnimateDiff, tiny-motion on tiny-sd; the MP4, the GIF, the recipe, Stop, /txt2video."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading

import numpy as np
import pytest
from helpers import single_torch_thread

from models.errors import UserError

ADAPTER, BASE = "tiny-motion", "tiny-sd"
QUICK = dict(motion_adapter=ADAPTER, model=BASE, width=64, height=64, frames=8, fps=8, steps=2, guidance=5.0)

pytestmark = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="video needs ffmpeg (make test installs it)")


one_torch_thread = pytest.fixture(autouse=True, scope="module")(single_torch_thread)


def make_video(manager, settings, prompt="a paper boat on a pond", *, stop=None, on_step=None, **values):
    """/txt2video's path: a request built from values, then the run."""
    from models.text_to_video import Txt2VideoRequest, txt2video

    request = Txt2VideoRequest.build(manager, settings, prompt=prompt, **{**QUICK, **values})
    return txt2video(manager, settings, request, stop=stop, on_step=on_step)


def probe(path) -> dict:
    """The first video stream as ffprobe reports it, with its frames counted by decoding."""
    done = subprocess.run(["ffprobe", "-v", "error", "-count_frames", "-select_streams", "v:0", "-show_entries",
                           "stream=codec_name,profile,pix_fmt,width,height,nb_read_frames,avg_frame_rate",
                           "-of", "json", str(path)], capture_output=True, text=True, check=True)
    return json.loads(done.stdout)["streams"][0]


def decode_mp4(path, width: int, height: int) -> np.ndarray:
    """Every frame of an MP4 as RGB bytes, decoded by ffmpeg."""
    done = subprocess.run(["ffmpeg", "-v", "error", "-i", str(path), "-f", "rawvideo", "-pix_fmt", "rgb24", "-"],
                          capture_output=True, check=True)
    return np.frombuffer(done.stdout, np.uint8).reshape(-1, height, width, 3)


def decode_gif(path) -> tuple[np.ndarray, list[int]]:
    """(frames as RGB, each frame's duration in ms)."""
    from PIL import Image, ImageSequence

    with Image.open(path) as gif:
        frames = [(np.array(frame.convert("RGB")), frame.info.get("duration")) for frame in ImageSequence.Iterator(gif)]
    return np.stack([f for f, _ in frames]), [d for _, d in frames]


def nothing_pinned(manager) -> bool:
    return not any(entry["pinned"] for entry in manager.snapshot())


def outputs(settings) -> list:
    return sorted(settings.outputs_dir.rglob("*")) if settings.outputs_dir.exists() else []


# ---- the run, the files, the recipe ---------------------------------------------------------------

def test_video_has_its_frames_and_plays_as_mp4_and_gif(manager, settings):
    from models.text_to_video import gif_frame_ms, read_recipe

    progress = []
    mp4, gif, info = make_video(manager, settings, frames=10, fps=12, seed=5,
                                on_step=lambda done, total: progress.append((done, total)))
    stream = probe(mp4)
    assert (stream["codec_name"], stream["pix_fmt"]) == ("h264", "yuv420p"), "what Chromium plays"
    assert (stream["width"], stream["height"], int(stream["nb_read_frames"])) == (64, 64, 10)
    assert stream["avg_frame_rate"] == "12/1" and info["duration_seconds"] == pytest.approx(10 / 12, abs=1e-3)
    gif_frames, durations = decode_gif(gif)
    assert gif_frames.shape == (10, 64, 64, 3) and set(durations) == {gif_frame_ms(12)} == {80}
    video_frames = decode_mp4(mp4, 64, 64)
    assert video_frames.shape == (10, 64, 64, 3)
    # H.264 (4:2:0) and the GIF's 256 colours are lossy (random-weight frames are noise, their worst case),
    # but both hold the same frames in the same order: each MP4 frame is nearest the GIF frame of its index
    distance = np.abs(video_frames[:, None].astype(int) - gif_frames[None].astype(int)).mean(axis=(2, 3, 4))
    assert distance.argmin(axis=1).tolist() == list(range(10)) and distance.diagonal().mean() < 30
    assert np.abs(np.diff(gif_frames.astype(int), axis=0)).mean() > 5, "the frames move"
    # denoising steps, then the VAE's chunks of 4 frames; the bar ends at exactly 100 %
    assert progress == [(done, 2 + 3) for done in range(1, 6)] and info["steps_done"] == 2
    recipe = read_recipe(mp4)
    assert recipe == read_recipe(info["recipe_file"]) and recipe["frames"] == 10 and recipe["seed"] == 5
    assert {path.suffix for path in outputs(settings) if path.is_file()} == {".mp4", ".gif", ".json"}
    assert nothing_pinned(manager) and not info["stopped"]


def test_same_seed_same_frames_and_the_recipe_remakes_them(manager, settings):
    from models.families import diffusion
    from models.text_to_video import read_recipe, recipe_controls

    mp4, gif, info = make_video(manager, settings, "a lantern 🏮", negative_prompt="blurry", style="watercolor",
                                seed=21)
    values, notices = recipe_controls(manager, read_recipe(info["recipe_file"]))
    assert not notices and values == {"prompt": "a lantern 🏮", "negative_prompt": "blurry", "style": "watercolor",
                                      "motion_adapter": ADAPTER, "model": BASE, "frames": 8, "fps": 8, "steps": 2,
                                      "guidance": 5.0, "seed": 21, "width": 64, "height": 64}
    again_mp4, again_gif, _ = make_video(manager, settings, **values)
    assert np.array_equal(decode_gif(gif)[0], decode_gif(again_gif)[0]), "the recipe re-makes the same frames"
    # and at the family level, before any encoding: same seed, same frames; another seed, others
    spec = manager.catalog.get
    request, _ = diffusion.check_video_request(spec(ADAPTER), spec(BASE), prompt="x", frames=8, steps=2, seed=3)
    other, _ = diffusion.check_video_request(spec(ADAPTER), spec(BASE), prompt="x", frames=8, steps=2, seed=4)
    with manager.use(ADAPTER) as motion, manager.use(BASE) as base:
        first, second = diffusion.animate(base, motion, request), diffusion.animate(base, motion, request)
        third = diffusion.animate(base, motion, other)
    assert first.frames.shape == (8, 64, 64, 3) and first.frames.dtype == np.uint8
    assert np.array_equal(first.frames, second.frames) and not np.array_equal(first.frames, third.frames)
    assert nothing_pinned(manager)


def test_the_motion_unet_shares_the_models_weights(manager):
    """AnimateDiff's motion UNet is built over the loaded base and adapter, with no copy of either."""
    from diffusers import UNetMotionModel

    from models.families import diffusion

    with manager.use(ADAPTER) as motion, manager.use(BASE) as base:
        pipe = diffusion.video_pipeline(base, motion)
        unet = pipe.unet
        assert isinstance(unet, UNetMotionModel) and type(pipe.scheduler).__name__ == "DDIMScheduler"
        assert pipe.scheduler.config.beta_schedule == "linear" and pipe.scheduler.config.timestep_spacing == "linspace"
        owners = {tensor.data_ptr() for module in (base.pipe.unet, motion.adapter)
                  for tensor in (*module.parameters(), *module.buffers())}
        copies = [name for name, tensor in (*unet.named_parameters(), *unet.named_buffers())
                  if tensor.data_ptr() not in owners]
        assert copies == [], f"copied instead of shared: {copies[:5]}"
        assert pipe.vae is base.pipe.vae and pipe.text_encoder is base.pipe.text_encoder
        del pipe, unet
    del motion, base  # the test's own references, which the leak check would count
    assert manager.unload(BASE) and manager.unload(ADAPTER) and not manager.leaks


# ---- Stop ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(("stop_at", "message"), [
    (1, "Stopped at step 1 of 2; no video was kept"),
    (3, "Stopped at step 2 of 2 (while decoding the frames); no video was kept"),
])
def test_stop_ends_the_run_and_keeps_nothing_half_made(manager, settings, stop_at, message):
    stop = threading.Event()
    seen = []

    def on_step(done, total):
        seen.append(done)
        if done == stop_at:
            stop.set()

    mp4, gif, info = make_video(manager, settings, seed=1, stop=stop, on_step=on_step)
    assert (mp4, gif, info["files"]) == (None, None, []) and info["stopped"] and seen[-1] == stop_at
    assert any(message in notice for notice in info["notices"]), info["notices"]
    assert outputs(settings) == [], "no MP4, GIF, recipe or partial folder is left behind"
    assert nothing_pinned(manager)
    stop.clear()
    mp4, _, info = make_video(manager, settings, seed=1, stop=stop)
    assert mp4 and not info["stopped"], "the models keep serving after a stop"
    assert manager.unload(BASE) and manager.unload(ADAPTER) and not manager.leaks


# ---- bad input, before anything loads ---------------------------------------------------------------

BAD_VIDEO = [
    ({"frames": 7}, "frames must be between 8 and 32"),
    ({"frames": 33}, "frames must be between 8 and 32"),
    ({"frames": 8.5}, "frames must be a whole number"),
    ({"fps": 3}, "fps must be between 4 and 30"),
    ({"fps": 31}, "fps must be between 4 and 30"),
    ({"fps": "fast"}, "fps must be a number"),
    ({"steps": 51}, "steps must be between 1 and 50 for tiny-motion"),
    ({"width": 100}, "multiple of 8"),
    ({"model": "stabilityai/stable-diffusion-xl-base-1.0"},
     r"for Stable Diffusion 1.5, and stabilityai/stable-diffusion-xl-base-1.0 is an SDXL model"),
    ({"model": "stabilityai/sd-turbo"}, "is an SD 2.1 model"),
    ({"model": "stable-diffusion-v1-5/stable-diffusion-v1-5"}, "random-weight test adapter sized for tiny-sd"),
    ({"motion_adapter": "guoyww/animatediff-motion-adapter-v1-5-2"}, "needs a real SD 1.5 model"),
    ({"motion_adapter": "ByteDance/AnimateDiff-Lightning", "model": "stable-diffusion-v1-5/stable-diffusion-v1-5",
      "steps": 9}, "steps must be between 1 and 8 for ByteDance/AnimateDiff-Lightning"),
    ({"motion_adapter": "tiny-sd"}, "tiny-sd is a text-to-image model"),
    ({"model": "tiny-motion"}, "tiny-motion is a text-to-video model"),
    ({"prompt": "a cat \udcff"}, "invalid Unicode"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD_VIDEO, ids=[m[:40] for _, m in BAD_VIDEO])
def test_bad_input_is_refused_before_anything_loads(manager, settings, overrides, message):
    with pytest.raises(UserError, match=message):
        make_video(manager, settings, **overrides)
    assert manager.snapshot() == []


def test_frames_beyond_the_budget_get_a_clear_message(manager, settings, catalog):
    from models.families import diffusion

    adapter, base = catalog.get(ADAPTER), catalog.get(BASE)
    weights = adapter.estimate_bytes("fp32") + base.estimate_bytes("fp32")
    need_16 = weights + diffusion.video_activation_bytes(base, "fp32", 512, 512, 16)
    need_12 = weights + diffusion.video_activation_bytes(base, "fp32", 512, 512, 12)
    manager.budget = (need_12 + need_16) // 2  # room for 12 frames at 512x512, not 16
    with pytest.raises(UserError, match=r"16 frames at 512x512 need about .* memory budget \(at 512x512 the budget "
                                        r"holds 1[2-5] frames\)\. Use fewer frames"):
        make_video(manager, settings, width=512, height=512, frames=16)
    assert manager.snapshot() == []
    request, _ = diffusion.check_video_request(adapter, base, width=512, height=512, frames=12,
                                               budget_bytes=manager.budget)
    assert request.frames == 12
    assert diffusion.video_activation_bytes(base, "fp32", 512, 512, 16) > diffusion.video_activation_bytes(
        base, "fp32", 512, 512, 8) > diffusion.video_activation_bytes(base, "fp32", 256, 256, 8), "frames x size"


def test_without_ffmpeg_the_video_is_refused_before_loading(manager, settings, monkeypatch):
    import models.text_to_video as text_to_video

    monkeypatch.setattr(text_to_video.shutil, "which", lambda name: None)
    with pytest.raises(UserError, match="Video needs ffmpeg"):
        make_video(manager, settings)
    assert manager.snapshot() == []


# ---- Video info: recipes read back, hand-edited ones refused --------------------------------------------

@pytest.fixture
def saved_recipe(tmp_path):
    """A recipe file as the workbench writes it (no model run needed)."""
    from models import __version__
    from models.text_to_video import make_recipe

    recipe = make_recipe(prompt="a kite", negative_prompt="", style="none", motion_adapter=ADAPTER, model=BASE,
                         frames=8, fps=8, steps=2, guidance=5.0, seed=9, width=64, height=64,
                         workbench_version=__version__)
    path = tmp_path / "clip.json"
    path.write_text(json.dumps(recipe))
    return path, recipe


def _edit(path, change) -> None:
    recipe = json.loads(path.read_text())
    change(recipe)
    path.write_text(json.dumps(recipe))


EDITS = [
    (lambda r: r.update(frames="16"),
     r"clip.json: the recipe's frames must be a whole number from 1 to 1000, got '16'"),
    (lambda r: r.update(fps=True), r"fps must be a whole number .* got True"),
    (lambda r: r.update(guidance=[1]), r"guidance must be a number"),
    (lambda r: r.update(seed=-4), r"seed must be a whole number from 0"),
    (lambda r: r.update(prompt=7), r"prompt must be text, got int"),
    (lambda r: r.update(model="x" * 300), r"model is 300 characters; the limit is 200"),
    (lambda r: r.pop("fps"), r"the video recipe lacks fps"),
    (lambda r: r.update(format="workbench-recipe/1"), r"not a workbench video recipe .*use PNG Info"),
    (lambda r: r.update(format="workbench-video-recipe/9"), r"not a workbench video recipe"),
]


@pytest.mark.parametrize(("edit", "message"), EDITS, ids=[m[:30] for _, m in EDITS])
def test_a_hand_edited_recipe_gets_a_clear_message(saved_recipe, edit, message):
    from models.text_to_video import read_recipe

    path, recipe = saved_recipe
    assert read_recipe(path) == recipe
    _edit(path, edit)
    with pytest.raises(UserError, match=message):
        read_recipe(path)


def test_files_that_are_not_video_recipes(tmp_path, saved_recipe):
    from models.text_to_video import encode_mp4, read_recipe

    path, _ = saved_recipe
    path.write_text(path.read_text()[:-5])
    with pytest.raises(UserError, match="clip.json: its video recipe is not valid JSON"):
        read_recipe(path)
    path.write_text("[1, 2]")
    with pytest.raises(UserError, match="is a JSON list, not an object"):
        read_recipe(path)
    path.write_text(json.dumps({"format": "workbench-video-recipe/1", "prompt": "x" * 400_000}))
    with pytest.raises(UserError, match="[Tt]he workbench never writes one that large"):
        read_recipe(path)
    plain = tmp_path / "plain.mp4"
    encode_mp4(np.zeros((8, 16, 16, 3), np.uint8), 8, plain)
    with pytest.raises(UserError, match="plain.mp4 carries no workbench recipe"):
        read_recipe(plain)
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 100)
    with pytest.raises(UserError, match="broken.mp4 is not a readable MP4"):
        read_recipe(broken)
    with pytest.raises(UserError, match="Video info reads the .mp4"):
        read_recipe(tmp_path / "photo.png")
    with pytest.raises(UserError, match="Drop a video made by the workbench"):
        read_recipe(None)


def test_recipe_of_models_this_catalog_lacks(manager, saved_recipe):
    from models.text_to_video import read_recipe, recipe_controls

    path, _ = saved_recipe
    _edit(path, lambda r: r.update(motion_adapter="someone/motion", model="someone/base"))
    values, notices = recipe_controls(manager, read_recipe(path))
    assert values["motion_adapter"] is None and values["model"] is None and len(notices) == 2
    assert "someone/motion, which is not in this workbench's catalog" in notices[0]


# ---- the launched app ----------------------------------------------------------------------------

def test_txt2video_endpoint(client, app_server):
    from gradio_client import handle_file

    _, manager, settings = app_server
    mp4, gif, info = client.predict(prompt="a red kite", motion_adapter=ADAPTER, model=BASE, width=64, height=64,
                                    frames=8, fps=10, steps=2, guidance=5.0, seed=77, api_name="/txt2video")
    info = info if isinstance(info, dict) else json.loads(info)
    assert mp4.endswith(".mp4") and gif.endswith(".gif") and info["seed"] == 77 and info["frames"] == 8
    stream = probe(mp4)
    assert (stream["codec_name"], stream["pix_fmt"], int(stream["nb_read_frames"])) == ("h264", "yuv420p", 8)
    assert decode_gif(gif)[0].shape == (8, 64, 64, 3)
    recipe = client.predict(handle_file(mp4), api_name="/video_info")
    assert recipe["seed"] == 77 and recipe["fps"] == 10, "the served MP4 keeps its recipe"
    assert nothing_pinned(manager)


@pytest.mark.parametrize(("overrides", "message"), [
    ({"frames": 40}, "greater than maximum value 32"),  # Gradio's own slider check, before ours
    ({"fps": 2}, "less than minimum value 4"),
    ({"model": "stabilityai/stable-diffusion-xl-base-1.0"}, "is an SDXL model"),
    ({"steps": 60}, "steps must be between 1 and 50 for tiny-motion"),
])
def test_txt2video_endpoint_bad_input(client, app_server, overrides, message):
    from gradio_client.exceptions import AppError

    values = dict(prompt="x", motion_adapter=ADAPTER, model=BASE, width=64, height=64, frames=8, fps=8, steps=2,
                  guidance=5.0, seed=1)
    with pytest.raises(AppError, match=message):
        client.predict(**{**values, **overrides}, api_name="/txt2video")
    assert nothing_pinned(app_server[1])


# ---- CUDA only ---------------------------------------------------------------------------------

@pytest.mark.gpu
def test_cuda_animatediff_fp16_and_release(tmp_path):
    import torch
    from conftest import make_settings

    from models.catalog import Catalog
    from models.manager import ModelManager

    settings = make_settings(tmp_path, device="cuda")
    manager = ModelManager(Catalog.load(), settings)
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()
    mp4, gif, info = make_video(manager, settings, frames=16, seed=3)
    assert (info["device"], info["precision"]) == ("cuda", "fp16") and info["attention_backend"] in ("SDPA",
                                                                                                      "xformers")
    frames = decode_mp4(mp4, 64, 64)
    assert frames.shape == (16, 64, 64, 3) and frames.std() > 1, "fp16 draws something, not NaN black"
    with manager.use(ADAPTER, "fp16") as motion:
        assert next(motion.adapter.parameters()).dtype == torch.float16
    again, _, _ = make_video(manager, settings, frames=16, seed=3)
    assert np.array_equal(decode_mp4(again, 64, 64), frames), "the same seed gives the same frames on CUDA"
    manager.unload_all()
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() - baseline < 8 * 1024**2 and not manager.leaks
