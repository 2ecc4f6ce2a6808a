"""Helpers shared by the tab builders: error mapping, the GPU queue, ZeroGPU, model choices."""

from __future__ import annotations

import functools
import inspect
import logging

import gradio as gr

log = logging.getLogger(__name__)

# Events that run a model share one queue, so model calls are serialized on the device.
GPU_QUEUE = {"concurrency_id": "gpu", "concurrency_limit": 1}

# Errors from models/ and finetune/ whose message is meant for the user.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, RuntimeError, OSError, TypeError)


def user_errors(fn):
    """Turn the core's ValueError/RuntimeError into ``gr.Error`` with the same concise message.

    Works for plain functions and generators; anything else propagates as a bug.
    """
    def to_gr(exc: BaseException) -> gr.Error:
        log.info("%s: %s", fn.__name__, exc)
        return gr.Error(str(exc) or exc.__class__.__name__, print_exception=False)

    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def gen_wrapper(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except gr.Error:
                raise
            except USER_ERRORS as exc:
                raise to_gr(exc) from exc
        return gen_wrapper

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except USER_ERRORS as exc:
            raise to_gr(exc) from exc
    return wrapper


def gpu(fn=None, *, duration: int = 60):
    """Decorate with ``spaces.GPU`` on ZeroGPU Spaces; a no-op everywhere else."""
    def wrap(func):
        try:
            import spaces  # noqa: PLC0415 - only present on Hugging Face Spaces
        except ImportError:
            return func
        return spaces.GPU(duration=duration)(func)
    return wrap(fn) if fn is not None else wrap


def model_choices(manager, task: str) -> list[tuple[str, str]]:
    """(label, id) pairs for a model dropdown; offline tiny models are labelled as such."""
    return [(spec.label, spec.id) for spec in manager.catalog.for_task(task)]


def default_model(manager, settings, task: str) -> str:
    return manager.catalog.default_for(task, settings.offline)


def adapter_choices(settings) -> list[str]:
    """'none' plus every saved adapter folder (those with adapter_config.json)."""
    folder = settings.adapters_dir
    names = sorted(p.name for p in folder.iterdir() if (p / "adapter_config.json").is_file()) if folder.is_dir() else []
    return ["none"] + names
