"""The OpenAI-compatible ``/v1`` routes, over the same manager, requests and validation as the tabs.

Each route turns OpenAI's JSON (or multipart form) into the workbench's own request object
(``models.voice``, ``models.vqa``, ``models.text_to_image``), runs it as one model call (the
manager's call lock: one call at a time on the device, with the UI's calls too), and answers in
OpenAI's shapes. Bad input gets OpenAI's error JSON with the right status (``api.errors``).
"""

from __future__ import annotations

import base64
import io
import json
import secrets
import time
from pathlib import Path

import anyio
from fastapi import Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from api.errors import ApiError, to_response
from api.images import save_image_url
from models import limits
from models.checks import check_choice, check_flag, check_number, check_text

# OpenAI's own model names, for clients that send them unchanged: the workbench's defaults stand in.
ALIASES = {"whisper-1": "speech-to-text", "gpt-4o-transcribe": "speech-to-text", "tts-1": "text-to-speech",
           "tts-1-hd": "text-to-speech", "gpt-4o-mini-tts": "text-to-speech"}
OPENAI_VOICES = ("alloy", "ash", "ballad", "coral", "echo", "fable", "nova", "onyx", "sage", "shimmer", "verse")
TRANSCRIPT_FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
SPEECH_FORMATS = {"wav": ("WAV", "audio/wav"), "flac": ("FLAC", "audio/flac")}
MAX_STOP_SEQUENCES = 4


class Routes:
    """The handlers, bound to one manager and its settings (no module-level state)."""

    def __init__(self, manager, settings):
        self.manager, self.settings = manager, settings
        self.catalog = manager.catalog

    # ---- helpers -----------------------------------------------------------------------------

    async def json_body(self, request: Request) -> dict:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ApiError(400, "The request body is not valid JSON.") from None
        if not isinstance(body, dict):
            raise ApiError(400, "The request body must be a JSON object.")
        return body

    def model_id(self, value, task: str) -> tuple[str, str]:
        """(model id, adapter) from ``model`` ("<id>" or "<id>:<adapter>"); OpenAI's names map to defaults."""
        if value in (None, ""):
            raise ApiError(400, "model is required", param="model")
        if not isinstance(value, str):
            raise ApiError(400, "model must be a string", param="model")
        if value in ALIASES and ALIASES[value] == task:
            return self.catalog.default_for(task, self.settings.offline), "none"
        model, _, adapter = value.rpartition(":") if ":" in value else (value, "", "none")
        return model, adapter or "none"

    def run(self, fn, *args):
        """``fn(*args)`` as one model call."""
        return limits.exclusive(self.manager.call_lock, self.settings.limits.call_seconds, fn, *args)

    # ---- /v1/models --------------------------------------------------------------------------

    def list_models(self) -> dict:
        loaded = {entry["id"] for entry in self.manager.snapshot()}
        data = [{"id": spec.id, "object": "model", "created": 0, "owned_by": "multimodal-workbench",
                 "task": spec.task, "family": spec.family, "loaded": spec.id in loaded,
                 "works_offline": spec.works_offline, **({"url": spec.base_url} if spec.base_url else {})}
                for spec in self.catalog if not spec.twin_of]
        return {"object": "list", "data": data}

    # ---- /v1/chat/completions ----------------------------------------------------------------

    def chat_plan(self, body: dict):
        """The request object, whether it is VQA, the stop strings, and the stream flags."""
        from models.voice import ChatRequest
        from models.vqa import VqaRequest

        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "messages must be a non-empty list", param="messages")
        if check_number("n", body.get("n", 1), 1, 1, integer=True) != 1:
            raise ApiError(400, "n must be 1", param="n")
        system, turns, image_urls = [], [], []
        for index, message in enumerate(messages):
            role, text, urls = _message_parts(message, index)
            image_urls += urls
            if role in ("system", "developer"):
                system.append(text)
            else:
                turns.append({"role": role, "content": text})
        if not turns or turns[-1]["role"] != "user":
            raise ApiError(400, "The last message must be the user's.", param="messages")
        question, history = turns[-1]["content"], turns[:-1]
        from models.generation import MAX_NEW_TOKENS

        max_tokens = check_number("max_tokens", body.get("max_completion_tokens", body.get("max_tokens", 256)), 1,
                                  MAX_NEW_TOKENS, integer=True)
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or len(stop) > MAX_STOP_SEQUENCES or not all(
                isinstance(s, str) and s for s in stop):
            raise ApiError(400, f"stop must be a string or a list of at most {MAX_STOP_SEQUENCES} non-empty strings",
                           param="stop")
        sampling = dict(max_new_tokens=max_tokens, temperature=body.get("temperature", 1.0),
                        top_p=body.get("top_p", 1.0), seed=body.get("seed"))
        task = "vqa" if image_urls else "chat"
        model, adapter = self.model_id(body.get("model"), task)
        if image_urls:
            path = save_image_url(image_urls[-1], self.settings)
            try:
                request = VqaRequest.build(self.catalog, self.settings, image=path, question=question, model=model,
                                           history=history, system_prompt="\n".join(system), adapter=adapter,
                                           **sampling)
            finally:
                path.unlink(missing_ok=True)
        else:
            request = ChatRequest.build(self.catalog, self.settings, message=question, history=history, model=model,
                                        system_prompt="\n".join(system), adapter=adapter, **sampling)
        stream = check_flag("stream", body.get("stream", False))
        include_usage = bool((body.get("stream_options") or {}).get("include_usage")) if stream else False
        return request, bool(image_urls), stop, stream, include_usage

    def texts(self, request, is_vqa: bool, stats):
        """The accumulated reply, growing with each token."""
        from models import voice, vqa

        if is_vqa:
            for history, _, _ in vqa.chat_turn(self.manager, request, stats=stats):
                yield history[-1]["content"]
        else:
            yield from voice.chat_reply(self.manager, request, stats=stats)

    async def chat_completions(self, request: Request):
        from models.generation import StreamStats

        body = await self.json_body(request)
        plan, is_vqa, stop, stream, include_usage = await anyio.to_thread.run_sync(self.chat_plan, body)
        model = plan.model if is_vqa else plan.reply.model
        stats, ident, created = StreamStats(), f"chatcmpl-{secrets.token_hex(12)}", int(time.time())

        def pieces():
            """(new text, finish reason or None) as the reply grows; stops at a stop string."""
            shown, cut = "", -1
            texts = self.texts(plan, is_vqa, stats)
            try:
                for text in texts:
                    cut = min((text.find(s) for s in stop if s in text), default=-1)
                    text = text[:cut] if cut >= 0 else text
                    if len(text) > len(shown):
                        yield text[len(shown):], None
                        shown = text
                    if cut >= 0:
                        break
            finally:
                texts.close()  # at a stop string: generation ends at the next token
            yield "", "length" if cut < 0 and stats.hit_length_limit else "stop"

        lock, cap = self.manager.call_lock, self.settings.limits.call_seconds
        if not stream:
            parts = await anyio.to_thread.run_sync(lambda: list(limits.exclusive_iter(lock, cap, pieces)))
            return {"id": ident, "object": "chat.completion", "created": created, "model": model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(p for p, _ in parts)},
                                 "logprobs": None, "finish_reason": parts[-1][1]}],
                    "usage": _usage(stats)}

        def events():
            def chunk(delta: dict, finish: str | None) -> str:
                return _sse({"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
                             "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]})

            yield chunk({"role": "assistant", "content": ""}, None)
            for text, finish in limits.exclusive_iter(lock, cap, pieces):
                yield chunk({"content": text} if text else {}, finish)
            if include_usage:
                yield _sse({"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
                            "choices": [], "usage": _usage(stats)})
            yield "data: [DONE]\n\n"

        return StreamingResponse(closing_stream(events()), media_type="text/event-stream")

    # ---- /v1/images/generations ----------------------------------------------------------------

    def generate_images(self, body: dict) -> dict:
        from models.text_to_image import Txt2ImgRequest, txt2img

        if body.get("response_format", "b64_json") != "b64_json":
            raise ApiError(400, "response_format must be b64_json (the workbench returns the PNG itself, with "
                                "its recipe inside)", param="response_format")
        model, _ = self.model_id(body.get("model") or self.catalog.default_for("text-to-image", self.settings.offline),
                                 "text-to-image")
        size = body.get("size")
        width = height = None
        if size not in (None, "", "auto"):
            if not isinstance(size, str) or size.count("x") != 1:
                raise ApiError(400, "size must look like 512x512", param="size")
            width, height = (check_number(name, part, 8, 4096, integer=True)
                             for name, part in zip(("width", "height"), size.split("x"), strict=True))
        prompt = check_text("prompt", body.get("prompt"), self.settings.limits.text_chars,
                            empty_message="prompt is required")
        request = Txt2ImgRequest.build(
            self.manager, self.settings, prompt=prompt, negative_prompt=body.get("negative_prompt", ""),
            style=body.get("style", "none"), model=model, width=width, height=height, steps=body.get("steps"),
            guidance=body.get("guidance"), seed=body.get("seed", -1), num_images=body.get("n", 1),
            scheduler=body.get("scheduler"))
        gallery, info = self.run(txt2img, self.manager, self.settings, request)
        data = [{"b64_json": base64.b64encode(Path(path).read_bytes()).decode("ascii"), "seed": seed}
                for (path, _), seed in zip(gallery, info["seeds"], strict=False)]
        return {"created": int(time.time()), "data": data, "notices": info["notices"]}

    async def images(self, request: Request):
        body = await self.json_body(request)
        return await anyio.to_thread.run_sync(self.generate_images, body)

    # ---- /v1/audio ------------------------------------------------------------------------------

    async def upload(self, form, name: str = "file") -> Path:
        file = form.get(name)
        if file is None or isinstance(file, str):
            raise ApiError(400, "The multipart upload needs a file field named 'file'.", param="file")
        limit = self.settings.max_upload_mb * 1024**2
        data = await file.read(limit + 1)
        if len(data) > limit:
            raise ApiError(413, f"The file is over the {self.settings.max_upload_mb} MB upload limit.", param="file")
        folder = self.settings.cache_dir / "uploads"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"api-audio-{secrets.token_hex(8)}{Path(file.filename or '').suffix[:8]}"
        path.write_bytes(data)
        return path

    async def audio_text(self, request: Request, task: str):
        from models.voice import TranscribeRequest, transcribe_file

        try:
            form = await request.form()
        except Exception:  # noqa: BLE001 - a body that is not multipart/form-data
            raise ApiError(400, "Send the audio as multipart/form-data with a 'file' field.") from None
        path = await self.upload(form)
        try:
            fmt = check_choice("response_format", form.get("response_format", "json"), TRANSCRIPT_FORMATS)
            words = "word" in form.getlist("timestamp_granularities[]") + form.getlist("timestamp_granularities")
            timestamps = "word" if words and fmt == "verbose_json" else "segment" if fmt != "json" and fmt != "text" \
                else "none"
            model, _ = self.model_id(form.get("model") or "whisper-1", "speech-to-text")
            transcribe = TranscribeRequest.build(self.catalog, self.settings, audio=str(path), model=model,
                                                 language=form.get("language") or "auto", task=task,
                                                 timestamps=timestamps)
            result, _ = await anyio.to_thread.run_sync(self.run, transcribe_file, self.manager, self.settings,
                                                       transcribe)
        finally:
            path.unlink(missing_ok=True)
        return _transcript_response(result, fmt, task, words)

    async def speech(self, request: Request):
        body = await self.json_body(request)
        return await anyio.to_thread.run_sync(self.speak, body)

    def speak(self, body: dict) -> Response:
        import soundfile as sf

        from models.voice import SpeakRequest, speak_text, voice_options

        fmt = body.get("response_format", "wav")
        if fmt not in SPEECH_FORMATS:
            raise ApiError(400, f"response_format must be one of {sorted(SPEECH_FORMATS)}", param="response_format")
        model, _ = self.model_id(body.get("model") or "tts-1", "text-to-speech")
        voice = body.get("voice", "default")
        if voice not in ("default", "", None, *OPENAI_VOICES):
            speakers = self.run(voice_options, self.manager, model)["speakers"]
            if voice not in speakers:
                raise ApiError(400, f"voice must be one of {speakers or ['default']} for {model} (OpenAI's voice "
                                    "names pick its default voice)", param="voice")
        else:
            voice = "default"
        request = SpeakRequest.build(self.catalog, self.settings, text=body.get("input"), model=model, speaker=voice,
                                     speed=body.get("speed", 1.0), noise_scale=body.get("noise_scale"),
                                     noise_w=body.get("noise_w"))
        (rate, samples), _ = self.run(speak_text, self.manager, request)
        buffer = io.BytesIO()
        sf.write(buffer, samples, rate, format=SPEECH_FORMATS[fmt][0])
        return Response(buffer.getvalue(), media_type=SPEECH_FORMATS[fmt][1])


def _message_parts(message, index: int) -> tuple[str, str, list[str]]:
    """(role, text, image URLs) of one OpenAI message."""
    if not isinstance(message, dict):
        raise ApiError(400, f"messages[{index}] must be an object with role and content", param="messages")
    role = message.get("role")
    if role not in ("system", "developer", "user", "assistant"):
        raise ApiError(400, f"messages[{index}].role must be system, user or assistant, got {role!r}"[:300],
                       param="messages")
    content = message.get("content")
    if isinstance(content, str):
        return role, content, []
    if not isinstance(content, list):
        raise ApiError(400, f"messages[{index}].content must be a string or a list of parts", param="messages")
    texts, urls = [], []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url" and role == "user":
            image = part.get("image_url")
            urls.append(image.get("url") if isinstance(image, dict) else image)
        else:
            raise ApiError(400, f"messages[{index}] has a part the workbench does not take (text and, in user "
                                "messages, image_url)", param="messages")
    return role, "\n".join(texts), urls


def _usage(stats) -> dict:
    return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.new_tokens,
            "total_tokens": stats.prompt_tokens + stats.new_tokens}


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


async def closing_stream(iterator):
    """Serve a sync iterator from worker threads, and close it when the client goes away.

    Closing waits for a step still running in its thread (a generator cannot be closed while it
    runs), so the model call's lock is released only when its work has ended.
    """
    done = object()
    try:
        while True:
            item = await anyio.to_thread.run_sync(next, iterator, done)
            if item is done:
                return
            yield item
    finally:
        with anyio.CancelScope(shield=True):
            while True:
                try:
                    iterator.close()
                    break
                except ValueError:  # "generator already executing": its step is still running
                    await anyio.sleep(0.05)


def _transcript_response(result, fmt: str, task: str, words: bool):
    if fmt == "text":
        return PlainTextResponse(result.text)
    if fmt in ("srt", "vtt"):
        return PlainTextResponse(_subtitles(result.segments, fmt), media_type="text/plain")
    if fmt == "json":
        return {"text": result.text}
    segments = [] if words else [{"id": index, "start": start, "end": end, "text": text}
                                 for index, (start, end, text) in enumerate(result.segments)]
    body = {"task": task, "language": result.language, "duration": round(result.audio_seconds, 2),
            "text": result.text, "segments": segments}
    if words:
        body["words"] = [{"word": text, "start": start, "end": end} for start, end, text in result.segments]
    return JSONResponse(body)


def _subtitles(segments, fmt: str) -> str:
    def stamp(seconds: float) -> str:
        hours, rest = divmod(seconds, 3600)
        minutes, secs = divmod(rest, 60)
        separator = "," if fmt == "srt" else "."
        return f"{int(hours):02d}:{int(minutes):02d}:{int(secs):02d}{separator}{int(round(secs % 1 * 1000)):03d}"

    blocks = [f"{index + 1}\n{stamp(start)} --> {stamp(end)}\n{text}\n" if fmt == "srt"
              else f"{stamp(start)} --> {stamp(end)}\n{text}\n" for index, (start, end, text) in enumerate(segments)]
    return ("WEBVTT\n\n" if fmt == "vtt" else "") + "\n".join(blocks)


def wrap(handler, where: str):
    """An endpoint that turns every exception into OpenAI's error JSON."""
    async def endpoint(request: Request):
        try:
            result = handler(request)
            if hasattr(result, "__await__"):
                result = await result
            return result if isinstance(result, Response) else JSONResponse(result)
        except Exception as exc:  # noqa: BLE001 - sorted into user errors and bugs by to_response
            return to_response(exc, where)
    return endpoint
