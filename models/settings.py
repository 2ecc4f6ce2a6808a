"""Settings of one workbench process, read from command-line flags and environment variables."""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

from models.limits import Limits

DEVICES = ("auto", "cuda", "cpu", "mps")
TRUTHY = {"1", "true", "yes", "on"}


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything the app needs to know at start-up; passed down explicitly, never global."""

    host: str = "127.0.0.1"
    port: int = 7860
    share: bool = False
    auth: tuple[str, str] | None = dataclasses.field(default=None, repr=False)
    memory_budget_gb: float = 8.0
    device: str = "auto"
    offline: bool = False
    offline_reason: str = ""
    cache_dir: Path = Path(".cache")
    models_file: Path | None = None
    max_upload_mb: int = 50
    models_dir: Path | None = None  # where built offline models live; cache_dir/offline-models by default
    preload: tuple[str, ...] = ()  # model ids (or "defaults") loaded in the background right after start-up
    limits: Limits = dataclasses.field(default_factory=Limits)  # what one request may cost (models/limits.py)
    retention_gb: float = 5.0  # generated files kept (outputs, finished runs, uploads); adapters are never removed
    api_key: str = dataclasses.field(default="", repr=False)  # required as a Bearer token on /v1 when set
    allow_remote_images: bool = False  # the API may fetch http(s) image URLs (public addresses only)
    idle_unload_minutes: float = 0.0  # free models no call has used for this long (0: never); models in use stay

    @property
    def memory_budget_bytes(self) -> int:
        return int(self.memory_budget_gb * 1024**3)

    @property
    def offline_models_dir(self) -> Path:
        return self.models_dir or self.cache_dir / "offline-models"

    @property
    def adapters_dir(self) -> Path:
        return self.cache_dir / "adapters"

    @property
    def runs_dir(self) -> Path:
        return self.cache_dir / "runs"

    @property
    def outputs_dir(self) -> Path:
        return self.cache_dir / "outputs"


def _env(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name)
    return value if value not in (None, "") else default


def parse_auth(value: str | None) -> tuple[str, str] | None:
    """Parse ``user:password``; the password may itself contain colons."""
    if not value:
        return None
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise ValueError("--auth must look like user:password")
    return (user, password)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="app.py",
        description="Multimodal Workbench: VQA, text-to-image, voice assistant, QLoRA fine-tuning.",
    )
    parser.add_argument("--host", default=_env("WORKBENCH_HOST", _env("GRADIO_SERVER_NAME", "127.0.0.1")),
                        help="interface to bind (env WORKBENCH_HOST or GRADIO_SERVER_NAME, default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=int(_env("WORKBENCH_PORT", _env("GRADIO_SERVER_PORT", "7860"))),
                        help="port (env WORKBENCH_PORT or GRADIO_SERVER_PORT, default 7860)")
    parser.add_argument("--share", action="store_true", default=(_env("WORKBENCH_SHARE", "0").lower() in TRUTHY),
                        help="create a public gradio.live link (env WORKBENCH_SHARE, default off)")
    parser.add_argument("--auth", default=_env("WORKBENCH_AUTH"),
                        help="user:password required to open the UI (env WORKBENCH_AUTH); never logged")
    parser.add_argument("--memory-budget", type=float, default=float(_env("WORKBENCH_MEMORY_BUDGET", "8")),
                        help="GB that loaded models may take together (env WORKBENCH_MEMORY_BUDGET, default 8)")
    parser.add_argument("--device", choices=DEVICES, default=_env("WORKBENCH_DEVICE", "auto"),
                        help="auto|cuda|cpu|mps (env WORKBENCH_DEVICE, default auto)")
    parser.add_argument("--offline", action="store_true",
                        default=(_env("WORKBENCH_OFFLINE", "0").lower() in TRUTHY),
                        help="never contact the model hub (env WORKBENCH_OFFLINE; HF_HUB_OFFLINE=1 implies it)")
    parser.add_argument("--cache-dir", default=_env("WORKBENCH_CACHE_DIR", ".cache"),
                        help="where offline models, adapters, runs and outputs live (env WORKBENCH_CACHE_DIR)")
    parser.add_argument("--models-file", default=_env("WORKBENCH_MODELS_FILE"),
                        help="YAML file with extra catalog entries (env WORKBENCH_MODELS_FILE)")
    parser.add_argument("--max-upload-mb", type=int, default=int(_env("WORKBENCH_MAX_UPLOAD_MB", "50")),
                        help="largest accepted upload in MB (env WORKBENCH_MAX_UPLOAD_MB, default 50)")
    parser.add_argument("--max-call-seconds", type=float, default=None,
                        help="wall-clock cap of one model call; past it the call stops as if Stop was pressed "
                             "(env WORKBENCH_LIMIT_CALL_SECONDS, default 600)")
    parser.add_argument("--retention-gb", type=float, default=float(_env("WORKBENCH_RETENTION_GB", "5")),
                        help="GB of generated files kept (images, finished training runs, uploads); the oldest "
                             "go first, adapters are never removed (env WORKBENCH_RETENTION_GB, default 5)")
    parser.add_argument("--api-key", default=_env("WORKBENCH_API_KEY", ""),
                        help="require 'Authorization: Bearer KEY' on the OpenAI-compatible /v1 routes "
                             "(env WORKBENCH_API_KEY); never logged. With --auth and no key, /v1 is closed")
    parser.add_argument("--allow-remote-images", action="store_true",
                        default=(_env("WORKBENCH_ALLOW_REMOTE_IMAGES", "0").lower() in TRUTHY),
                        help="let /v1 fetch http(s) image URLs; loopback, private and link-local addresses are "
                             "always refused (env WORKBENCH_ALLOW_REMOTE_IMAGES)")
    parser.add_argument("--preload", default=_env("WORKBENCH_PRELOAD", ""),
                        help="comma-separated model ids to load in the background right after start-up; "
                             "'defaults': the voice tab's speech, chat and voice models that work offline; "
                             "'none' (env WORKBENCH_PRELOAD; make run passes 'defaults')")
    parser.add_argument("--idle-unload", type=float, metavar="MINUTES",
                        default=float(_env("WORKBENCH_IDLE_UNLOAD", "0")),
                        help="free models that no call has used for MINUTES, giving a shared GPU back; a model "
                             "answering a request is never unloaded (env WORKBENCH_IDLE_UNLOAD, default 0 = off)")
    return parser


def settings_from_args(argv: list[str] | None = None) -> Settings:
    """Build Settings from flags (which win) and environment variables."""
    args = build_parser().parse_args(argv)
    if args.memory_budget <= 0:
        raise SystemExit("--memory-budget must be a positive number of GB")
    if args.max_call_seconds is not None and args.max_call_seconds <= 0:
        raise SystemExit("--max-call-seconds must be a positive number of seconds")
    if args.retention_gb <= 0:
        raise SystemExit("--retention-gb must be a positive number of GB")
    if not args.idle_unload >= 0:  # also refuses nan
        raise SystemExit("--idle-unload must be a number of minutes (0 = off)")
    try:
        auth = parse_auth(args.auth)
    except ValueError as exc:  # a start-up mistake: a one-line message, not a traceback
        raise SystemExit(str(exc)) from None
    offline, reason = bool(args.offline), "--offline was given" if args.offline else ""
    if not offline and _env("HF_HUB_OFFLINE", "0").lower() in TRUTHY:
        offline, reason = True, "HF_HUB_OFFLINE=1 is set"
    return Settings(
        host=args.host,
        port=args.port,
        share=args.share,
        auth=auth,
        memory_budget_gb=args.memory_budget,
        device=args.device,
        offline=offline,
        offline_reason=reason,
        cache_dir=Path(args.cache_dir).expanduser().resolve(),
        models_file=Path(args.models_file).expanduser() if args.models_file else None,
        max_upload_mb=args.max_upload_mb,
        models_dir=Path(_env("WORKBENCH_MODELS_DIR")).expanduser().resolve() if _env("WORKBENCH_MODELS_DIR") else None,
        preload=tuple(part.strip() for part in args.preload.split(",") if part.strip()),
        limits=Limits.from_env(call_seconds=args.max_call_seconds),
        retention_gb=args.retention_gb,
        api_key=args.api_key or "",
        allow_remote_images=bool(args.allow_remote_images),
        idle_unload_minutes=args.idle_unload,
    )


def probe_hub(timeout: float = 1.5, host: str = "huggingface.co", port: int = 443) -> str:
    """Return "" when the hub answers a TCP connect, else a short reason why it does not."""
    import socket

    endpoint = os.environ.get("HF_ENDPOINT", "")
    if endpoint:
        from urllib.parse import urlparse

        parsed = urlparse(endpoint)
        host, port = parsed.hostname or host, parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return ""
    except OSError as exc:
        return f"the model hub ({host}) cannot be reached: {exc.__class__.__name__}"


def with_hub_probe(settings: Settings, timeout: float = 1.5) -> Settings:
    """Mark settings offline when the hub cannot be reached (skipped when already offline)."""
    if settings.offline:
        return settings
    reason = probe_hub(timeout)
    if not reason:
        return settings
    return dataclasses.replace(settings, offline=True, offline_reason=reason)
