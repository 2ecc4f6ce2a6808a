"""The OpenAI-compatible API: ``/v1`` routes mounted next to the Gradio app (see ``app.launch_kwargs``).

It imports ``models/`` (and through it ``finetune/`` where needed), never ``tabs/`` or gradio.
"""

from __future__ import annotations

import hmac

from fastapi import Request
from fastapi.routing import APIRoute

from api.errors import error_response
from api.routes import Routes, wrap


def _authorized(settings, request: Request):
    """None when the request may use /v1, else the 401 response that says why."""
    if settings.api_key:
        sent = request.headers.get("authorization", "")
        scheme, _, token = sent.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(token.strip(), settings.api_key):
            return None
        return error_response(401, "Missing or wrong API key: send 'Authorization: Bearer <key>' with the key "
                                   "given to --api-key / WORKBENCH_API_KEY.", code="invalid_api_key")
    if settings.auth:
        return error_response(401, "The API is closed: this workbench has a UI login (--auth) but no API key. "
                                   "Start it with --api-key (or WORKBENCH_API_KEY) to open /v1.",
                              code="api_closed")
    return None


def routes(manager, settings) -> list[APIRoute]:
    """The /v1 routes for ``app_kwargs={"routes": [...]}``."""
    handlers = Routes(manager, settings)

    def guarded(handler, where: str):
        endpoint = wrap(handler, where)

        async def checked(request: Request):
            refusal = _authorized(settings, request)
            return refusal if refusal is not None else await endpoint(request)
        return checked

    table = [
        ("/v1/models", ["GET"], lambda request: handlers.list_models(), "models"),
        ("/v1/chat/completions", ["POST"], handlers.chat_completions, "chat completions"),
        ("/v1/images/generations", ["POST"], handlers.images, "image generations"),
        ("/v1/audio/transcriptions", ["POST"], lambda request: handlers.audio_text(request, "transcribe"),
         "transcriptions"),
        ("/v1/audio/translations", ["POST"], lambda request: handlers.audio_text(request, "translate"),
         "translations"),
        ("/v1/audio/speech", ["POST"], handlers.speech, "speech"),
    ]
    return [APIRoute(path, guarded(handler, where), methods=methods, include_in_schema=True)
            for path, methods, handler, where in table]
