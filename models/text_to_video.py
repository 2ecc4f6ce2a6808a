"""Text to video: an AnimateDiff motion adapter on an SD 1.5-family base -> an MP4 and a GIF with their recipe.

The request is validated (and its memory counted) before anything loads; the run pins the adapter
and the base for the call, and writes the video only when every frame is made: an MP4 (H.264,
yuv420p, which Chromium plays), a GIF and the recipe as JSON, into one new folder of
``settings.outputs_dir`` (moved there whole, so a stopped or failed run leaves nothing behind, and
retention removes a video with its files). The MP4 also carries the recipe in its ``comment`` tag,
so *Video info* reads it back from the MP4 alone or from the JSON beside it.

No gradio here: the text-to-image tab's Video mode and the API call these functions.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

from models import limits, pnginfo, retention
from models.checks import check_model
from models.errors import InvalidRequest, TooLarge, Unavailable, quote
from models.limits import Limits

TASK = "text-to-video"
BASE_TASK = "text-to-image"
RECIPE_FORMAT = "workbench-video-recipe/1"
# Fields a video recipe holds; a hand-edited file is checked field by field, as PNG recipes are.
RECIPE_FIELDS = ("prompt", "negative_prompt", "style", "motion_adapter", "model", "frames", "fps", "steps", "guidance",
                 "seed", "width", "height", "workbench_version")
NAME_CHARS = {"style": 200, "motion_adapter": 200, "model": 200, "workbench_version": 50}
# (integer, low, high): wide enough for every model (the request checks each model's own limits)
NUMBER_RANGES = {"frames": (True, 1, 1000), "fps": (True, 1, 240), "steps": (True, 1, 1000),
                 "guidance": (False, 0.0, 100.0), "seed": (True, 0, 2**32 - 1), "width": (True, 1, None),
                 "height": (True, 1, None)}  # None: the image_side limit
RECIPE_TAG = "comment"  # the MP4 metadata tag that holds the recipe (ffmpeg writes it as the ©cmt atom)
ENCODE_SECONDS = 300
PROBE_SECONDS = 20
SAFETY_NOTE = "none (AnimateDiff runs no safety checker)"


# ---- which models go together ----------------------------------------------------------------------

def compatible_bases(catalog, adapter_id: str) -> list[str]:
    """The text-to-image models ``adapter_id`` can animate (SD 1.5-family bases of its kind), in catalog order."""
    from models.families import diffusion

    adapter = catalog.get(adapter_id)
    fitting = []
    for spec in catalog.for_task(BASE_TASK):
        try:
            diffusion.check_video_base(adapter, spec)
        except InvalidRequest:
            continue
        fitting.append(spec.id)
    return fitting


def check_base(catalog, adapter_id: str, model_id: str) -> None:
    """InvalidRequest, saying which bases fit, when ``adapter_id`` cannot animate ``model_id``."""
    from models.families import diffusion

    diffusion.check_video_base(check_model(catalog, adapter_id, TASK), check_model(catalog, model_id, BASE_TASK),
                               compatible_bases(catalog, adapter_id))


def default_base(catalog, adapter_id: str, offline: bool) -> str:
    """The base a motion adapter starts with: the text-to-image default when it fits, else the first that does."""
    fitting = compatible_bases(catalog, adapter_id)
    if not fitting:
        raise InvalidRequest(f"No text-to-image model in the catalog fits {adapter_id} (an SD 1.5 model is needed).")
    preferred = catalog.default_for(BASE_TASK, offline)
    return preferred if preferred in fitting else fitting[0]


def video_defaults(manager, motion_adapter: str, model: str | None = None) -> dict:
    """What the Video controls start with for an adapter (and a base): steps, guidance, frames, fps, size."""
    from models.families import diffusion

    adapter = check_model(manager.catalog, motion_adapter, TASK)
    motion = diffusion.motion_defaults_for(adapter)
    base_id = model if model in compatible_bases(manager.catalog, adapter.id) else \
        default_base(manager.catalog, adapter.id, manager.settings.offline)
    size = diffusion.defaults_for(manager.catalog.get(base_id))
    return {"steps": motion.steps, "guidance": motion.guidance, "max_steps": motion.max_steps,
            "frames": motion.frames, "fps": diffusion.DEFAULT_FPS, "model": base_id, "width": size.width,
            "height": size.height, "max_side": size.max_side, "sizes": list(size.sizes),
            "bases": compatible_bases(manager.catalog, adapter.id)}


def ffmpeg() -> str:
    """The ffmpeg binary, or Unavailable saying how to get it (checked before any model loads)."""
    path = shutil.which("ffmpeg")
    if path is None:
        raise Unavailable("Video needs ffmpeg to write the MP4, and it is not installed. Install it "
                          "(apt-get install ffmpeg, brew install ffmpeg) and try again; images work without it.")
    return path


# ---- the request ----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Txt2VideoRequest:
    """One text-to-video run: a motion adapter, its base, and the validated values."""

    motion_adapter: str
    model: str  # the base (text-to-image) model
    quant: str  # both models load at this precision (the device's default for diffusion)
    video: object  # models.families.diffusion.VideoRequest
    notices: tuple = ()

    @classmethod
    def build(cls, manager, settings, *, prompt="", negative_prompt="", style="none", motion_adapter=None,
              model=None, width=None, height=None, frames=None, fps=None, steps=None, guidance=None,
              seed=-1) -> Txt2VideoRequest:
        """Check every value (and that the frames fit the memory budget) before anything is loaded.

        ``None`` for the model picks the adapter's default base; for width/height the base's default
        size; for frames, steps and guidance the adapter's defaults. Seed -1 picks one at random.
        """
        from models.families import diffusion
        from models.quantization import choose

        catalog = manager.catalog
        adapter = check_model(catalog, motion_adapter or catalog.default_for(TASK, settings.offline), TASK)
        base = check_model(catalog, model or default_base(catalog, adapter.id, settings.offline), BASE_TASK)
        quant = choose(base, manager.device).name
        video, notices = diffusion.check_video_request(
            adapter, base, prompt=prompt, negative_prompt=negative_prompt, style=style, width=width, height=height,
            frames=frames, fps=fps, steps=steps, guidance=guidance, seed=seed,
            styles=diffusion.load_styles(settings.cache_dir), budget_bytes=manager.budget, precision_name=quant,
            bases=compatible_bases(catalog, adapter.id))
        ffmpeg()
        return cls(motion_adapter=adapter.id, model=base.id, quant=quant, video=video, notices=tuple(notices))


# ---- the run --------------------------------------------------------------------------------------

def txt2video(manager, settings, request: Txt2VideoRequest, *, stop: threading.Event | None = None,
              on_step=None) -> tuple[str | None, str | None, dict]:
    """Make the video, save the MP4, the GIF and the recipe, and return (mp4 path, gif path, info).

    A stopped run returns (None, None, info) and writes nothing.
    """
    from models import __version__
    from models.families import diffusion

    video = request.video
    styles = diffusion.load_styles(settings.cache_dir)
    stop = limits.StopFlag(stop)  # this run's Stop, and the call's (closed connection, time cap)
    # 1. Frames, with both models pinned only for the call
    with (manager.use(request.motion_adapter, request.quant) as motion,
          manager.use(request.model, request.quant) as base):
        result = diffusion.animate(base, motion, video, styles=styles, stop=stop, on_step=on_step,
                                   notices=list(request.notices))
        device, precision = base.device, base.precision
    if result.stopped and (notice := limits.timeout_notice()):
        result.notices.append(notice)
    info = {
        "mode": "video", "motion_adapter": request.motion_adapter, "model": request.model, "seed": video.seed,
        "width": video.width, "height": video.height, "frames": video.frames, "fps": video.fps,
        "duration_seconds": round(video.seconds, 3), "steps": video.steps, "steps_done": result.steps_done,
        "guidance": video.guidance, "style": video.style, "stopped": result.stopped, "video": None, "gif": None,
        "recipe_file": None, "files": [], "attention_backend": result.attention_backend, "device": device,
        "precision": precision, "safety_checker": SAFETY_NOTE, "notices": result.notices,
        "seconds": round(result.seconds, 3),
    }
    if result.stopped:
        return None, None, info
    # 2. The MP4, the GIF and the recipe, all or nothing
    recipe = make_recipe(prompt=video.prompt, negative_prompt=video.negative_prompt, style=video.style,
                         motion_adapter=request.motion_adapter, model=request.model, frames=video.frames,
                         fps=video.fps, steps=video.steps, guidance=video.guidance, seed=video.seed,
                         width=video.width, height=video.height, workbench_version=__version__,
                         limits=settings.limits)
    files = save_video(result.frames, video.fps, recipe, settings.outputs_dir)
    retention.enforce(settings, protect=[files["mp4"].parent])  # older outputs make room, oldest first
    info.update(video=str(files["mp4"]), gif=str(files["gif"]), recipe_file=str(files["json"]),
                files=[str(files[kind]) for kind in ("mp4", "gif", "json")])
    return info["video"], info["gif"], info


def save_video(frames, fps: int, recipe: dict, folder: Path) -> dict[str, Path]:
    """Write ``<stem>/<stem>.mp4``, ``.gif`` and ``.json`` into ``folder``, atomically; returns their paths.

    The stem is ``<UTC time>-<seed>-<prompt slug>-video``; an existing folder is never overwritten.
    """
    from models.pnginfo import slug

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d-%H%M%S")
    stem = f"{stamp}-{int(recipe['seed'])}-{slug(str(recipe['prompt']))}-video"
    partial = Path(tempfile.mkdtemp(prefix=".partial-", dir=folder))
    try:
        text = json.dumps(recipe, ensure_ascii=False, indent=2)
        encode_mp4(frames, fps, partial / f"{stem}.mp4", text)
        encode_gif(frames, fps, partial / f"{stem}.gif")
        (partial / f"{stem}.json").write_text(text + "\n", encoding="utf-8")
        for attempt in range(1000):
            name = stem if attempt == 0 else f"{stem}-{attempt}"
            target = folder / name
            try:
                os.rename(partial, target)  # fails when target exists (non-empty) or is a file
            except OSError:
                if target.exists():
                    continue
                raise
            if name != stem:
                for kind in ("mp4", "gif", "json"):
                    os.rename(target / f"{stem}.{kind}", target / f"{name}.{kind}")
            return {kind: target / f"{name}.{kind}" for kind in ("mp4", "gif", "json")}
        raise RuntimeError(f"could not find a free folder name for {stem} in {folder}")
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def encode_mp4(frames, fps: int, path: Path, comment: str = "") -> None:
    """H.264 in MP4 with yuv420p (what browsers play), ``moov`` first for streaming; ``comment`` in its tags."""
    count, height, width, _ = frames.shape
    if width % 2 or height % 2:
        raise InvalidRequest(f"H.264 in yuv420p needs even sides; got {width}x{height}")
    command = [ffmpeg(), "-hide_banner", "-loglevel", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24",
               "-s", f"{width}x{height}", "-r", str(fps), "-i", "-", "-an", "-c:v", "libx264", "-pix_fmt", "yuv420p",
               "-crf", "18", "-movflags", "+faststart", "-metadata", f"{RECIPE_TAG}={comment}", str(path)]
    try:
        done = subprocess.run(command, input=frames.tobytes(), capture_output=True, timeout=ENCODE_SECONDS,
                              check=False)
    except subprocess.TimeoutExpired:
        raise Unavailable(f"ffmpeg took more than {ENCODE_SECONDS} s to encode {count} frames; nothing was "
                          "kept.") from None
    if done.returncode != 0:
        why = done.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or ["no message"]
        raise Unavailable(f"ffmpeg could not encode the MP4 ({why[0][:200]}); nothing was kept. An ffmpeg "
                          "with libx264 is needed.")


def gif_frame_ms(fps: int) -> int:
    """A GIF frame's duration: GIF timing is in hundredths of a second (12 fps plays at 12.5, 30 at 33)."""
    return max(20, 10 * round(100 / fps))


def encode_gif(frames, fps: int, path: Path) -> None:
    """An endlessly looping GIF."""
    from PIL import Image

    images = [Image.fromarray(frame) for frame in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=gif_frame_ms(fps), loop=0)


# ---- the recipe -----------------------------------------------------------------------------------

def make_recipe(*, limits: Limits | None = None, **values) -> dict:
    """A video recipe with every field in RECIPE_FIELDS, each checked as ``read_recipe`` checks it."""
    pnginfo.require_exactly(values, RECIPE_FIELDS, "video recipe")
    return {"format": RECIPE_FORMAT, **check_fields(values, limits or Limits())}


def check_fields(recipe: dict, limits: Limits, where: str = "The recipe's") -> dict:
    """The RECIPE_FIELDS of ``recipe`` in that order, each of the right type and in range (InvalidRequest)."""
    return pnginfo.check_fields(recipe, limits, where, fields=RECIPE_FIELDS, number_ranges=NUMBER_RANGES,
                                name_chars=NAME_CHARS)


def read_recipe(path, limits: Limits | None = None) -> dict:
    """The recipe of a workbench video: from its ``.json`` file, or from the MP4's ``comment`` tag (ffprobe).

    Raises:
        InvalidRequest: not a workbench video or recipe, damaged or hand-edited into a wrong type or range.
        TooLarge: the recipe is over the size a workbench ever writes.
    """
    from models.pnginfo import max_recipe_bytes

    limits = limits or Limits()
    if isinstance(path, dict):  # gradio_client sends FileData
        path = path.get("path")
    if path is None or str(path) == "":
        raise InvalidRequest("Drop a video made by the workbench (.mp4), or the .json recipe saved next to it.")
    path = Path(path)
    name, suffix = path.name, path.suffix.lower()
    if suffix not in (".json", ".mp4"):
        raise InvalidRequest(f"{name}: Video info reads the .mp4 the workbench saves, or the .json recipe next to it.")
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise InvalidRequest(f"Cannot open {name}: {exc.strerror or exc}") from exc
    cap = max_recipe_bytes(limits)
    if suffix == ".json":
        if size > cap:
            raise TooLarge(f"{name} is {size:,} bytes; a video recipe is at most {cap:,}. The workbench never "
                           "writes one that large.")
        raw = path.read_bytes()
    else:
        raw = _mp4_comment(path, cap)
    try:
        recipe = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # also UnicodeDecodeError
        raise InvalidRequest(f"{name}: its video recipe is not valid JSON ({getattr(exc, 'msg', exc)}).") from None
    if not isinstance(recipe, dict):
        raise InvalidRequest(f"{name}: its video recipe is a JSON {type(recipe).__name__}, not an object.")
    found = recipe.get("format")
    if found != RECIPE_FORMAT:
        hint = " (that is a PNG's recipe: use PNG Info)" if str(found).startswith("workbench-recipe") else ""
        raise InvalidRequest(f"{name}: not a workbench video recipe (format {quote(found, 80)}; this workbench "
                             f"reads {RECIPE_FORMAT}){hint}.")
    missing = [field for field in RECIPE_FIELDS if field not in recipe]
    if missing:
        raise InvalidRequest(f"{name}: the video recipe lacks {', '.join(missing)}.")
    return {"format": RECIPE_FORMAT, **check_fields(recipe, limits, where=f"{name}: the recipe's")}


def _mp4_comment(path: Path, cap: int) -> bytes:
    """The MP4's ``comment`` tag, read by ffprobe from the container's header (no frame is decoded)."""
    probe = shutil.which("ffprobe")
    if probe is None:
        raise Unavailable("Reading a video's recipe from the MP4 needs ffprobe (part of ffmpeg); drop the .json "
                          "file saved next to it instead.")
    command = [probe, "-v", "error", "-show_entries", f"format_tags={RECIPE_TAG}", "-of", "json", str(path)]
    try:
        done = subprocess.run(command, capture_output=True, timeout=PROBE_SECONDS, check=False)
    except subprocess.TimeoutExpired:
        raise InvalidRequest(f"{path.name}: ffprobe could not read it within {PROBE_SECONDS} s.") from None
    if done.returncode != 0:
        raise InvalidRequest(f"{path.name} is not a readable MP4 (ffprobe: "
                             f"{done.stderr.decode('utf-8', 'replace').strip()[:160] or 'no message'}).")
    try:
        tags = json.loads(done.stdout).get("format", {}).get("tags", {})
    except (ValueError, AttributeError):
        tags = {}
    comment = tags.get(RECIPE_TAG) if isinstance(tags, dict) else None
    if not isinstance(comment, str) or not comment.strip().startswith("{"):
        raise InvalidRequest(f"{path.name} carries no workbench recipe: it was not made by the workbench, or its "
                             "metadata was removed (drop the .json saved next to it).")
    data = comment.encode("utf-8")
    if len(data) > cap:
        raise TooLarge(f"{path.name}: its video recipe is {len(data):,} bytes; the limit is {cap:,}.")
    return data


def video_info(path, limits: Limits | None = None) -> dict:
    """The recipe of a workbench video (the API's /video_info)."""
    return read_recipe(path, limits)


def recipe_controls(manager, recipe: dict) -> tuple[dict, list[str]]:
    """Control values that reproduce ``recipe``, and notices for models this catalog lacks."""
    notices = []
    values = {key: recipe[key] for key in ("prompt", "negative_prompt", "style", "motion_adapter", "model", "frames",
                                           "fps", "steps", "guidance", "seed", "width", "height")}
    for key, task in (("motion_adapter", TASK), ("model", BASE_TASK)):
        spec_id = values[key]
        if spec_id not in manager.catalog or manager.catalog.get(spec_id).task != task:
            notices.append(f"This video was made with {spec_id}, which is not in this workbench's catalog; the "
                           f"{key.replace('_', ' ')} choice was left as it is.")
            values[key] = None
    return values, notices
