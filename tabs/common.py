"""Helpers shared by the tab builders: error mapping, the GPU queue, ZeroGPU, model choices."""

from __future__ import annotations

import functools
import inspect
import logging
import threading

import gradio as gr

from models import limits
from models.errors import UserError

log = logging.getLogger(__name__)

# Events that run a model share one queue, so model calls are serialized on the device.
GPU_QUEUE = {"concurrency_id": "gpu", "concurrency_limit": 1}

INTERNAL_ERROR = ("Internal error ({kind}) in {where}: this is a bug in the workbench, not a problem with what you "
                  "sent. The details are in the server log (logs/workbench.log in the workbench's cache folder).")


def to_gr_error(fn_name: str, exc: BaseException) -> gr.Error:
    """The gr.Error a user sees: the core's own message for a UserError, a short "internal error" otherwise."""
    if isinstance(exc, UserError):
        log.info("%s: %s", fn_name, exc)
        return gr.Error(str(exc) or exc.__class__.__name__, print_exception=False)
    log.error("%s failed", fn_name, exc_info=exc)
    return gr.Error(INTERNAL_ERROR.format(kind=exc.__class__.__name__, where=fn_name), print_exception=False)


def user_errors(fn):
    """Show the core's UserError messages as ``gr.Error``; log anything else with its traceback.

    Works for plain functions and generators. A programming error is never dressed up as bad input:
    the user gets a short "internal error" and the log gets the traceback.
    """
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def gen_wrapper(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except gr.Error:
                raise
            except Exception as exc:  # noqa: BLE001 - sorted into user errors and bugs by to_gr_error
                raise to_gr_error(fn.__name__, exc) from exc
        return gen_wrapper

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except Exception as exc:  # noqa: BLE001 - sorted into user errors and bugs by to_gr_error
            raise to_gr_error(fn.__name__, exc) from exc
    return wrapper


def model_call(manager, duration: int = 60):
    """Decorate a handler that runs models (plain function or generator).

    * One model call at a time on the device: the manager's call lock is held until the work has
      really ended. Gradio frees its queue slot as soon as a client cancels or disconnects, while
      the call may still be running; the next call waits here instead of running beside it.
    * The call's stop flag (``models.limits.Call``) is current around every step of the work, so
      generation and denoising loops stop at the next token or step when the client goes away
      (Gradio then closes the generator) or when ``--max-call-seconds`` has passed.
    * User errors and bugs are sorted as by ``user_errors``; ZeroGPU gets ``spaces.GPU``.
    """
    def decorate(fn):
        handler = user_errors(fn)
        lock, cap = manager.call_lock, manager.settings.limits.call_seconds

        if inspect.isgeneratorfunction(fn):
            @functools.wraps(fn)
            def gen_wrapper(*args, **kwargs):
                yield from limits.exclusive_iter(lock, cap, lambda: handler(*args, **kwargs))
            return gpu(gen_wrapper, duration=duration)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            return limits.exclusive(lock, cap, handler, *args, **kwargs)
        return gpu(wrapper, duration=duration)
    return decorate


def gpu(fn=None, *, duration: int = 60):
    """Decorate with ``spaces.GPU`` on ZeroGPU Spaces; a no-op everywhere else."""
    def wrap(func):
        try:
            import spaces  # noqa: PLC0415 - only present on Hugging Face Spaces
        except ImportError:
            return func
        return spaces.GPU(duration=duration)(func)
    return wrap(fn) if fn is not None else wrap


def checked_image(image: gr.Image, settings) -> gr.State:
    """A State holding the path of ``image``'s current picture, checked as soon as it changes.

    gr.Image opens every upload with Pillow before a handler runs, so a file that is not an image
    failed later with "Could not preprocess input component at index 0" and a server path, and a
    decompression bomb was decoded before the workbench's limits could refuse it. Here the box's
    own change event skips Gradio's preprocessing (``preprocess=False``) and checks the file with
    ``models.images.load_image`` at once: a file that is not a usable image gets the core's message
    and the box is cleared instead of showing a broken thumbnail. Handlers read the State, never
    the box.
    """
    state = gr.State(None)

    def check(payload):
        from models.images import load_image

        path = payload.get("path") if isinstance(payload, dict) else getattr(payload, "path", None)
        if not path:
            return None, gr.update()
        try:
            load_image(path, limits=settings.limits)
        except UserError as exc:
            gr.Warning(str(exc))
            return None, None
        return path, gr.update()

    # Queued (without a limit, so it never waits): pop-ups reach the browser only from queued events
    image.change(check, inputs=image, outputs=[state, image], preprocess=False, api_visibility="private",
                 concurrency_limit=None)
    return state


class StopRegistry:
    """Stop flags of the runs in progress, one per browser or API session (made in build(), not global)."""

    def __init__(self):
        self._events: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def start(self, session: str) -> threading.Event:
        event = threading.Event()
        with self._lock:
            self._events[session] = event
        return event

    def finish(self, session: str, event: threading.Event) -> None:
        with self._lock:
            if self._events.get(session) is event:
                del self._events[session]

    def stop(self, session: str) -> bool:
        """Ask the session's run to stop at its next step; False when nothing is running."""
        with self._lock:
            event = self._events.get(session)
        if event is None:
            return False
        event.set()
        return True


def progress_callback(progress):
    """A core ``progress(fraction, words)`` callback that moves a gr.Progress bar (None stays None)."""
    if progress is None:
        return None
    return lambda fraction, description: progress(fraction, desc=description)


def session_of(request) -> str:
    """The browser or API session a gr.Request belongs to."""
    return getattr(request, "session_hash", None) or f"anonymous-{threading.get_ident()}"


class Form:
    """Named input components: a handler gets ``{name: value}``, so no two inputs can be swapped by position.

    Pass ``form.inputs`` (a set) as an event's inputs; Gradio then calls the handler with one dict
    keyed by component, which ``form.values`` turns into keyword arguments for a request's ``build``.
    """

    def __init__(self, **components):
        self.components = components

    @property
    def inputs(self) -> set:
        return set(self.components.values())

    def values(self, data: dict) -> dict:
        return {name: data[component] for name, component in self.components.items()}


def inputs_for(fn, ui, **components) -> list:
    """The input components of ``fn``'s parameters, in order, found by parameter name.

    A parameter takes the component given for it in ``components``, else ``ui``'s attribute of the
    same name; Gradio's own ``request`` and ``progress`` parameters are skipped. An endpoint's
    parameters and its components cannot be paired up in the wrong order.
    """
    names = [name for name in inspect.signature(fn).parameters if name not in ("request", "progress")]
    return [components[name] if name in components else getattr(ui, name) for name in names]


def model_choices(manager, task: str) -> list[tuple[str, str]]:
    """(label, id) pairs for a model dropdown; offline tiny models are labelled as such.

    A hub model whose files are not in the Hugging Face cache says so, with what its first use
    downloads (or, offline, that it is unavailable). The cache is read from disk only: a few stat
    calls per hub model, no network.
    """
    from models.hub import choice_label

    return [(choice_label(spec, manager.settings), spec.id) for spec in manager.catalog.for_task(task)]


def refresh_model_menus(manager, tab, menus: dict) -> None:
    """When ``tab`` is shown, its model menus ({dropdown: task}) list the catalog as it is now: a model
    added in the Models tab appears, and the "not downloaded" marks follow downloads and deletes."""
    if tab is None:
        return
    tab.select(lambda: [gr.update(choices=model_choices(manager, task)) for task in menus.values()],
               outputs=list(menus), api_visibility="private", queue=False)


def default_model(manager, settings, task: str) -> str:
    return manager.catalog.default_for(task, settings.offline)


def adapter_choices(settings) -> list[str]:
    """'none' plus every saved adapter folder (those with adapter_config.json)."""
    folder = settings.adapters_dir
    names = sorted(p.name for p in folder.iterdir() if (p / "adapter_config.json").is_file()) if folder.is_dir() else []
    return ["none"] + names
