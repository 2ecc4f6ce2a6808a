"""Helpers shared by the tests: text normalisation and word error rate for speech round trips."""

from __future__ import annotations

import re
import unicodedata

_ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
         "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def number_words(number: int) -> str:
    """English words for 0 <= number < 1 000 000 ("forty two", "three hundred five")."""
    if number < 20:
        return _ONES[number]
    if number < 100:
        tens, ones = divmod(number, 10)
        return _TENS[tens] + (f" {_ONES[ones]}" if ones else "")
    if number < 1000:
        hundreds, rest = divmod(number, 100)
        return f"{_ONES[hundreds]} hundred" + (f" {number_words(rest)}" if rest else "")
    thousands, rest = divmod(number, 1000)
    return f"{number_words(thousands)} thousand" + (f" {number_words(rest)}" if rest else "")


_CONTRACTIONS = [(r"\b(what|where|who|how|it|that|there|here|he|she)'s\b", r"\1 is"), (r"\bcan't\b", "cannot"),
                 (r"\bwon't\b", "will not"), (r"n't\b", " not"), (r"'re\b", " are"), (r"\bi'm\b", "i am"),
                 (r"'ll\b", " will"), (r"'ve\b", " have"), (r"'d\b", " would")]


def normalize(text: str) -> list[str]:
    """Lower-case words without punctuation, contractions expanded, digits spelled out.

    "It's 42." -> ["it", "is", "forty", "two"]
    """
    text = unicodedata.normalize("NFKC", text).lower().replace(",", "").replace("’", "'")
    for pattern, replacement in _CONTRACTIONS:
        text = re.sub(pattern, replacement, text)
    text = re.sub(r"\d+", lambda match: f" {number_words(int(match.group()))} ", text)
    text = text.replace("-", " ").replace("'", "")
    return re.sub(r"[^\w\s]", " ", text).split()


def word_error_rate(reference: str, hypothesis: str) -> float:
    """Levenshtein distance over normalised words, divided by the reference's word count."""
    ref, hyp = normalize(reference), normalize(hypothesis)
    previous = list(range(len(hyp) + 1))
    for i, ref_word in enumerate(ref, 1):
        current = [i] + [0] * len(hyp)
        for j, hyp_word in enumerate(hyp, 1):
            current[j] = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ref_word != hyp_word))
        previous = current
    return previous[-1] / max(1, len(ref))


# ---- the voice assistant's core, called as the tab and the API call it -------------------------------

def voice_turn(manager, settings, stream_speech: bool = True, **values):
    """A turn built from flat values (what the tab and /voice send); yields its updates."""
    from models import voice

    request = voice.VoiceTurnRequest.build(manager.catalog, settings, **values)
    return voice.voice_turn(manager, settings, request, stream_speech=stream_speech)


def speak(manager, settings, text, **values):
    """/speak's path: ((rate, int16 samples), seconds)."""
    from models import voice

    return voice.speak_text(manager, voice.SpeakRequest.build(manager.catalog, settings, text=text, **values))


def transcribe(manager, settings, audio, **values):
    """/transcribe's path: (Transcript, seconds)."""
    from models import voice

    request = voice.TranscribeRequest.build(manager.catalog, settings, audio=audio, **values)
    return voice.transcribe_file(manager, settings, request)


def chat(manager, settings, message, **values) -> str:
    """/chat's path: the whole reply."""
    from models import voice

    parts = list(voice.chat_reply(manager, voice.ChatRequest.build(manager.catalog, settings, message=message,
                                                                   **values)))
    return parts[-1] if parts else ""


# ---- hostile inputs: small uploads that would expand to gigabytes or minutes of CPU ---------------------

HOSTILE_CASES = (
    "pixels: 1 x 400 000 PNG",
    "audio: 192 kHz x 8 channels FLAC",
    "audio: 10 min 01 s",
    "dataset: 60 MB of '1' lines in a 62 KB zip",
    "dataset: one row of 4000 messages",
    "fine-tune start with bad data in a zip",
    "YAML aliases in a run config",
    "chat: 10 000 history turns",
    "PNG header declaring 30000 x 30000",
    "PNG recipe whose fields are all [1]",
    "lone surrogate in a chat message",
    "5000-character adapter name",
    "run id with ..",
    "run id with ./",
)


class HostileCase:
    """One hostile request: the endpoint, its arguments, the message expected, and a normal request of its kind."""

    def __init__(self, name: str, api_name: str, kwargs: dict, message: str, normal: dict | None = None):
        self.name, self.api_name, self.kwargs, self.message, self.normal = name, api_name, kwargs, message, normal

    def __repr__(self) -> str:
        return self.name


def _png(path, width: int, height: int, chunks: tuple = ()):
    """A PNG whose header declares ``width`` x ``height``, with one row of real data (never decodable whole)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    body = b"".join(chunk(kind, data) for kind, data in chunks)
    pixels = zlib.compress(b"\x00" + b"\x80" * min(width, 4096))
    with open(path, "wb") as handle:
        handle.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + body + chunk(b"IDAT", pixels)
                     + chunk(b"IEND", b""))
    return path


def _zip_of_lines(path, line: bytes, total_bytes: int):
    import zipfile

    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        with archive.open("data.jsonl", "w") as member:
            block = line * (1024 * 1024 // len(line))
            for _ in range(total_bytes // len(block)):
                member.write(block)
    return path


def hostile_cases(folder) -> list[HostileCase]:
    """The hostile classes of issue #15, built in ``folder`` (each file is small; seconds to build)."""
    import json

    import numpy as np
    import soundfile as sf
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    cases = []
    wide = folder / "wide.png"
    Image.new("L", (400_000, 1), 128).save(wide)
    normal_png = folder / "normal.png"
    Image.new("RGB", (64, 64), "red").save(normal_png)
    cases.append(HostileCase("pixels: 1 x 400 000 PNG", "/vqa",
                             {"image": wide, "question": "What is this?", "model": "tiny-vlm", "max_new_tokens": 4},
                             r"400000.*(limit|at most)", {"image": normal_png, "question": "What is this?",
                                                            "model": "tiny-vlm", "max_new_tokens": 4}))
    flac = folder / "huge.flac"
    with sf.SoundFile(flac, "w", samplerate=192_000, channels=8, format="FLAC") as out:
        quiet = np.zeros((192_000, 8), dtype=np.float32)
        for _ in range(50):  # 50 s x 192 kHz x 8 channels = 77 million samples, a few hundred KB of FLAC
            out.write(quiet)
    normal_wav = folder / "normal.wav"
    sf.write(normal_wav, (0.3 * np.sin(np.arange(16000) / 8)).astype(np.float32), 16000)
    cases.append(HostileCase("audio: 192 kHz x 8 channels FLAC", "/transcribe",
                             {"audio": flac, "model": "tiny-whisper"}, r"million samples.*limit",
                             {"audio": normal_wav, "model": "tiny-whisper"}))
    long_wav = folder / "long.flac"
    sf.write(long_wav, np.tile((0.3 * np.sin(np.arange(8000) / 4)).astype(np.float32), 601), 8000, format="FLAC")
    cases.append(HostileCase("audio: 10 min 01 s", "/transcribe", {"audio": long_wav, "model": "tiny-whisper"},
                             r"10 min 01 s.*10 min 00 s", None))
    ones = _zip_of_lines(folder / "ones.zip", b"1\n", 60 * 1024 * 1024)
    normal_jsonl = folder / "normal.jsonl"
    normal_jsonl.write_text("".join(json.dumps({"prompt": f"{i}+1?", "response": str(i + 1)}) + "\n"
                                    for i in range(20)))
    cases.append(HostileCase("dataset: 60 MB of '1' lines in a 62 KB zip", "/finetune_validate",
                             {"dataset": ones, "base_model": "tiny-chat"}, r"limit",
                             {"dataset": normal_jsonl, "base_model": "tiny-chat"}))
    row = {"messages": [{"role": "user" if i % 2 == 0 else "assistant", "content": "hi"} for i in range(4000)]}
    many = folder / "many_messages.jsonl"
    many.write_text(json.dumps(row) + "\n")
    cases.append(HostileCase("dataset: one row of 4000 messages", "/finetune_validate",
                             {"dataset": many, "base_model": "tiny-chat"}, "", None))
    bad_zip = _zip_of_lines(folder / "bad.zip", b'{"prompt": 1}\n', 8 * 1024 * 1024)
    cases.append(HostileCase("fine-tune start with bad data in a zip", "/finetune_start",
                             {"dataset": bad_zip, "config": "{base_model: tiny-chat, max_steps: 1}"},
                             r"problem|limit", None))
    laughs = "a: &a [x,x,x,x,x,x,x,x,x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},"
        f"*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)}]\n" for i in range(8))
    cases.append(HostileCase("YAML aliases in a run config", "/finetune_start",
                             {"dataset": normal_jsonl, "config": laughs}, r"alias|anchor", None))
    history = [{"role": "user" if i % 2 == 0 else "assistant", "content": "ok"} for i in range(10_000)]
    cases.append(HostileCase("chat: 10 000 history turns", "/chat",
                             {"message": "Hi", "history": history, "model": "tiny-chat", "max_new_tokens": 8,
                              "temperature": 0.0}, "", {"message": "Hi", "history": [], "model": "tiny-chat",
                                                        "max_new_tokens": 8, "temperature": 0.0}))
    bomb = _png(folder / "bomb.png", 30_000, 30_000)
    cases.append(HostileCase("PNG header declaring 30000 x 30000", "/png_info", {"path": bomb},
                             r"30000.*(limit|at most)", None))
    recipe = json.dumps({key: [1] for key in ("prompt", "negative_prompt", "style", "model", "scheduler", "steps",
                                              "guidance", "seed", "width", "height", "workbench_version")})
    typed = _png(folder / "typed.png", 8, 8, ((b"tEXt", b"workbench-recipe\x00" + recipe.encode()),))
    cases.append(HostileCase("PNG recipe whose fields are all [1]", "/png_info", {"path": typed}, r"prompt", None))
    # gradio_client cannot encode a lone surrogate: the case is sent as raw JSON (escaped "\ud800")
    cases.append(HostileCase("lone surrogate in a chat message", "/chat",
                             {"message": "hello \ud800", "history": [], "model": "tiny-chat"}, r"invalid Unicode",
                             None))
    cases.append(HostileCase("5000-character adapter name", "/chat",
                             {"message": "hi", "history": [], "model": "tiny-chat", "adapter": "a" * 5000},
                             r"adapter", None))
    cases.append(HostileCase("run id with ..", "/finetune_status", {"run_id": "../runs/x"}, r"run id", None))
    cases.append(HostileCase("run id with ./", "/finetune_stop", {"run_id": "./x"}, r"run id", None))
    assert tuple(case.name for case in cases) == HOSTILE_CASES
    return cases


def unencodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def raw_call(client, url: str, api_name: str, kwargs: dict):
    """POST the case as JSON (``"\\ud800"`` escapes survive where gradio_client cannot encode them) and read
    the event stream; an error event raises AppError like gradio_client does."""
    import json
    import urllib.request

    from gradio_client.exceptions import AppError

    parameters = client.view_api(print_info=False, return_format="dict")["named_endpoints"][api_name]
    data = [kwargs.get(p["parameter_name"], p.get("parameter_default")) for p in parameters["parameters"]]
    name = api_name.lstrip("/")
    body = json.dumps({"data": data}).encode("ascii")  # ensure_ascii: lone surrogates become escapes
    request = urllib.request.Request(f"{url}gradio_api/call/{name}", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        event_id = json.load(response)["event_id"]
    with urllib.request.urlopen(f"{url}gradio_api/call/{name}/{event_id}", timeout=120) as response:
        lines = response.read().decode("utf-8").splitlines()
    events = [(lines[i].removeprefix("event: "), lines[i + 1].removeprefix("data: "))
              for i in range(len(lines) - 1) if lines[i].startswith("event: ")]
    kind, payload = events[-1]
    if kind == "error":
        raise AppError(json.loads(payload) if payload.startswith('"') else payload)
    return json.loads(payload)


def save_lora(location, adapters_dir, name: str, base_model: str, target_modules, alpha: int = 32,
              vision: bool = False):
    """A real PEFT LoRA on the model at ``location``, saved as the fine-tune tab saves one; returns its folder.

    B is random and non-zero (``init_lora_weights=False``, seeded), so the adapter changes greedy
    answers; ``workbench.json`` records ``base_model`` as a trained adapter's does.
    """
    import json

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    from models.offline import seeded

    seeded()
    model = (AutoModelForImageTextToText if vision else AutoModelForCausalLM).from_pretrained(location)
    config = LoraConfig(r=4, lora_alpha=alpha, init_lora_weights=False, target_modules=target_modules)
    folder = adapters_dir / name
    get_peft_model(model, config).save_pretrained(folder)
    (folder / "workbench.json").write_text(json.dumps({"base_model": base_model}))
    return folder


def single_torch_thread():
    """A module fixture body: torch on one thread for the module's tests, then as before.

    Tiny layers gain nothing from threads, and two OpenMP threads on a busy 2-core machine wait on each other.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
