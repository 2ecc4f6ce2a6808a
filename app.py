"""Multimodal Workbench entry point: flags/env -> Settings -> ModelManager -> Gradio app.

Importing this module does no work; ``main()`` does. The model stack (torch, transformers,
diffusers, TTS) is imported only when a model is first loaded.
"""

from __future__ import annotations

import logging
import sys

log = logging.getLogger("workbench")
MAX_LOG_LINE = 4000  # characters; a request that echoes a huge value must not write a huge log line
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class ShortLines(logging.Formatter):
    """A formatter that cuts every line of a record (tracebacks included) to MAX_LOG_LINE characters."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return "\n".join(line if len(line) <= MAX_LOG_LINE else f"{line[:MAX_LOG_LINE]}… ({len(line):,} characters)"
                         for line in text.split("\n"))


def configure_logging(settings) -> None:
    """INFO to stderr and to <cache-dir>/logs/workbench.log (rotated at 5 MB, 3 kept), lines cut short."""
    from logging.handlers import RotatingFileHandler

    folder = settings.cache_dir / "logs"
    folder.mkdir(parents=True, exist_ok=True)
    handlers = [logging.StreamHandler(), RotatingFileHandler(folder / "workbench.log", maxBytes=5 * 1024**2,
                                                             backupCount=3, encoding="utf-8")]
    for handler in handlers:
        handler.setFormatter(ShortLines(LOG_FORMAT))
    logging.basicConfig(level=logging.INFO, handlers=handlers, force=True)


def create(argv: list[str] | None = None):
    """Build (settings, manager, demo) without launching; used by main() and the tests."""
    from models.catalog import Catalog
    from models.manager import ModelManager
    from models.settings import settings_from_args, with_hub_probe

    settings = with_hub_probe(settings_from_args(argv))
    catalog = Catalog.for_settings(settings)
    manager = ModelManager(catalog, settings)
    from tabs import build_app  # imports gradio: after the flags are known to be valid

    demo = build_app(manager, settings)
    return settings, manager, demo


def launch_kwargs(settings, manager) -> dict:
    """Keyword arguments for ``demo.launch``, including the /health route and secure defaults."""
    import api
    from tabs import CSS, JS, THEME, health_route

    return {
        "server_name": settings.host,
        "server_port": settings.port,
        "share": settings.share,
        "auth": [settings.auth] if settings.auth else None,
        "max_file_size": f"{settings.max_upload_mb}mb",
        # generated images are served from outputs_dir as saved, so their PNG recipe chunks survive
        "allowed_paths": [str(settings.outputs_dir)],
        "show_error": True,
        "theme": THEME,
        "css": CSS,
        "js": JS,
        # /health and the OpenAI-compatible /v1 routes live next to the Gradio app, on the same server
        "app_kwargs": {"routes": [health_route(manager), *api.routes(manager, settings)]},
        "ssr_mode": False,
    }


def main(argv: list[str] | None = None) -> None:
    settings, manager, demo = create(argv)
    configure_logging(settings)
    if settings.host in ("0.0.0.0", "::") and not settings.auth:
        log.warning("binding %s without --auth: anyone on the network can use this workbench "
                    "and its models", settings.host)
    if settings.offline:
        log.info("offline mode: %s; offline models are preselected", settings.offline_reason)
    log.info("memory budget %.1f GB, device %s, cache %s, auth %s, API %s", settings.memory_budget_gb,
             settings.device, settings.cache_dir, "on" if settings.auth else "off",
             "key required" if settings.api_key else "closed (--auth without --api-key)" if settings.auth else "open")
    # Anything `make run` did not prepare (a fresh cache, a new models file) is prepared now, in the
    # background, so that nobody waits on a conversion at their first click; the Models tab shows it.
    manager.preparation.start()
    manager.start_idle_unload()  # --idle-unload: frees models no call has used for that long (off by default)
    from models import retention

    removed = retention.enforce(settings)  # generated files beyond --retention-gb, oldest first
    if removed:
        log.info("retention: removed %d old generated file(s) or folder(s)", len(removed))
    try:
        manager.preload(settings.preload)
    except ValueError as exc:
        raise SystemExit(f"--preload: {exc}") from None
    demo.queue(default_concurrency_limit=4)
    demo.launch(**launch_kwargs(settings, manager))


if __name__ == "__main__":
    sys.exit(main())
