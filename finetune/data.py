"""Fine-tuning datasets: safe unpacking, line-numbered validation, token statistics, split, encoding.

One JSON object per line, in one of three formats (never mixed within a file):

* VQA: ``{"image": "imgs/1.png", "question": "...", "answer": "..."}`` (``image_path`` also accepted)
* Instruction: ``{"instruction": "...", "input": "optional", "output": "..."}``
  or ``{"prompt": "...", "response": "..."}``
* Chat: ``{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}``

Image paths are relative to the folder of the JSONL file and may not leave it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import shutil
import stat
import zipfile
from pathlib import Path

from models.errors import InvalidRequest

FORMATS = ("vqa", "instruction", "chat")
ROLES = ("system", "user", "assistant")
MAX_PROBLEMS_LISTED = 200
MAX_ZIP_FILES = 20_000
MAX_ZIP_BYTES = 4 * 1024**3
PREVIEW_ROWS = 5
IGNORED_ZIP_PREFIXES = ("__MACOSX/",)


@dataclasses.dataclass
class Example:
    """One valid row, normalised to chat messages; the last assistant turn(s) are the answer."""

    line: int
    format: str
    messages: list[dict]
    image: Path | None = None


@dataclasses.dataclass
class Problem:
    line: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}" if self.line else self.message


@dataclasses.dataclass
class ParsedDataset:
    path: Path
    format: str | None
    examples: list[Example]
    problems: list[Problem]
    lines: int

    @property
    def ok(self) -> bool:
        return not self.problems and bool(self.examples)


class DatasetError(InvalidRequest):
    """The dataset has problems; ``problems`` lists them with line numbers."""

    def __init__(self, problems: list[Problem], total: int | None = None):
        self.problems = problems
        total = total if total is not None else len(problems)
        shown = "\n".join(str(p) for p in problems[:20])
        more = f"\n... and {total - 20} more" if total > 20 else ""
        super().__init__(f"The dataset has {total} problem(s); nothing was started:\n{shown}{more}")


# ---- unpacking ------------------------------------------------------------------------------------

def prepare_dataset(upload: str | Path, dest: Path, max_bytes: int = MAX_ZIP_BYTES,
                    max_files: int = MAX_ZIP_FILES) -> Path:
    """Copy a ``.jsonl`` or safely extract a ``.zip`` into ``dest``; return the JSONL path inside it."""
    upload = Path(upload)
    if not upload.is_file():
        raise InvalidRequest(f"dataset file {upload.name!r} does not exist; upload a .jsonl or .zip file")
    dest.mkdir(parents=True, exist_ok=True)
    suffix = upload.suffix.lower()
    if suffix == ".jsonl":
        target = dest / "data.jsonl"
        shutil.copyfile(upload, target)
        return target
    if suffix == ".zip":
        return extract_zip(upload, dest, max_bytes=max_bytes, max_files=max_files)
    raise InvalidRequest(f"dataset must be a .jsonl file or a .zip holding one, got {upload.name!r}")


def extract_zip(archive: Path, dest: Path, max_bytes: int = MAX_ZIP_BYTES, max_files: int = MAX_ZIP_FILES) -> Path:
    """Extract with zip-slip, symlink, size and file-count checks; return the one JSONL inside."""
    root = dest.resolve()
    try:
        with zipfile.ZipFile(archive) as bundle:
            members = [m for m in bundle.infolist() if not m.filename.startswith(IGNORED_ZIP_PREFIXES)]
            files = [m for m in members if not m.is_dir()]
            if len(files) > max_files:
                raise InvalidRequest(f"the zip holds {len(files)} files; at most {max_files} are accepted")
            total = sum(m.file_size for m in files)
            if total > max_bytes:
                raise InvalidRequest(f"the zip unpacks to {total / 1024**2:.0f} MB; at most "
                                 f"{max_bytes / 1024**2:.0f} MB are accepted")
            for member in members:
                target = (root / member.filename).resolve()
                if member.filename.startswith(("/", "\\")) or (target != root and root not in target.parents):
                    raise InvalidRequest(f"zip entry {member.filename!r} points outside the dataset folder")
                if stat.S_ISLNK(member.external_attr >> 16):
                    raise InvalidRequest(f"zip entry {member.filename!r} is a symbolic link; links are not accepted")
            for member in members:
                bundle.extract(member, root)
    except zipfile.BadZipFile as exc:
        raise InvalidRequest(f"{archive.name} is not a valid zip file: {exc}") from None
    jsonl = sorted(p for p in root.rglob("*.jsonl") if "__MACOSX" not in p.parts)
    if not jsonl:
        raise InvalidRequest("the zip holds no .jsonl file; put the dataset's JSONL next to its images")
    if len(jsonl) > 1:
        names = ", ".join(str(p.relative_to(root)) for p in jsonl)
        raise InvalidRequest(f"the zip holds several .jsonl files ({names}); keep exactly one")
    return jsonl[0]


# ---- validation -----------------------------------------------------------------------------------

def row_format(row: dict) -> str | None:
    if "messages" in row:
        return "chat"
    if "image" in row or "image_path" in row or "question" in row:
        return "vqa"
    if {"instruction", "output", "prompt", "response"} & set(row):
        return "instruction"
    return None


def _text(row: dict, key: str, problems: list[str], required: bool = True) -> str:
    if key not in row or row[key] is None:
        if required:
            problems.append(f"missing field {key!r}")
        return ""
    value = row[key]
    if not isinstance(value, str):
        problems.append(f"field {key!r} must be a string, got {type(value).__name__}")
        return ""
    if required and not value.strip():
        problems.append(f"field {key!r} is empty")
    return value


def check_image(value: str, folder: Path) -> tuple[Path | None, str]:
    """Resolve an image path inside ``folder`` and verify it decodes; (path, "") or (None, problem)."""
    if Path(value).is_absolute() or value.startswith(("\\", "~")):
        return None, f"image path {value!r} must be relative to the dataset folder"
    root = folder.resolve()
    path = (root / value).resolve()
    if root not in path.parents:
        return None, f"image path {value!r} escapes the dataset folder"
    if not path.is_file():
        return None, f"image {value!r} is missing (upload a .zip holding the JSONL and its images)"
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        return None, f"image {value!r} is unreadable ({exc.__class__.__name__})"
    return path, ""


def _example(row: dict, fmt: str, line: int, folder: Path) -> tuple[Example | None, list[str]]:
    problems: list[str] = []
    if fmt == "vqa":
        key = "image" if "image" in row else "image_path"
        image_value = _text(row, key, problems)
        question = _text(row, "question", problems)
        answer = _text(row, "answer", problems)
        image = None
        if image_value.strip():
            image, problem = check_image(image_value, folder)
            if problem:
                problems.append(problem)
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
                    {"role": "assistant", "content": answer}]
        return (None if problems else Example(line, fmt, messages, image)), problems
    if fmt == "instruction":
        if "instruction" in row or "output" in row:
            instruction = _text(row, "instruction", problems)
            extra = _text(row, "input", problems, required=False)
            answer = _text(row, "output", problems)
            prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        else:
            prompt = _text(row, "prompt", problems)
            answer = _text(row, "response", problems)
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
        return (None if problems else Example(line, fmt, messages)), problems
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        return None, ["field 'messages' must be a non-empty list of {role, content}"]
    clean = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            problems.append(f"messages[{index}] must be an object with role and content")
            continue
        if message.get("role") not in ROLES:
            problems.append(f"messages[{index}].role must be one of {', '.join(ROLES)}, got {message.get('role')!r}")
        content = message.get("content")
        if not isinstance(content, str):
            problems.append(f"messages[{index}].content must be a string, got {type(content).__name__}")
        elif not content.strip():
            problems.append(f"messages[{index}].content is empty")
        clean.append({"role": message.get("role"), "content": content})
    roles = [m["role"] for m in clean]
    if not problems and "assistant" not in roles:
        problems.append("messages has no assistant turn to learn from")
    if not problems and "user" not in roles:
        problems.append("messages has no user turn")
    return (None if problems else Example(line, fmt, clean)), problems


def parse_dataset(path: Path) -> ParsedDataset:
    """Read every line; collect normalised examples and every problem with its line number."""
    path = Path(path)
    folder = path.parent
    problems: list[Problem] = []
    examples: list[Example] = []
    seen: dict[str, int] = {}
    dataset_format: str | None = None
    format_line = 0
    try:
        raw_lines = path.read_bytes().splitlines()
    except OSError as exc:
        raise InvalidRequest(f"cannot read dataset {path.name}: {exc.strerror}") from None
    for number, raw in enumerate(raw_lines, start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            problems.append(Problem(number, "not UTF-8 text"))
            continue
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as exc:
            problems.append(Problem(number, f"invalid JSON ({exc.msg} at column {exc.colno})"))
            continue
        if not isinstance(row, dict):
            problems.append(Problem(number, f"expected a JSON object, got {type(row).__name__}"))
            continue
        fmt = row_format(row)
        if fmt is None:
            problems.append(Problem(number, "unknown row format: expected image/question/answer, "
                                            "instruction/output, prompt/response or messages"))
            continue
        if dataset_format is None:
            dataset_format, format_line = fmt, number
        elif fmt != dataset_format:
            article = "an" if dataset_format[0] in "aeiou" else "a"
            problems.append(Problem(number, f"{fmt} row in {article} {dataset_format} dataset (line {format_line} "
                                            "set the format); formats cannot be mixed in one file"))
            continue
        digest = hashlib.sha1(json.dumps(row, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
        if digest in seen:
            problems.append(Problem(number, f"duplicate of line {seen[digest]}"))
            continue
        seen[digest] = number
        example, row_problems = _example(row, fmt, number, folder)
        problems.extend(Problem(number, p) for p in row_problems)
        if example is not None:
            examples.append(example)
    if not examples and not problems:
        problems.append(Problem(0, "the dataset has no rows"))
    return ParsedDataset(path=path, format=dataset_format, examples=examples, problems=problems,
                         lines=len(raw_lines))


def split_examples(examples: list[Example], val_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """A seeded shuffle split; at least one training row, and one validation row when asked for any."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_val = round(len(examples) * val_fraction)
    if val_fraction > 0 and len(examples) >= 2:
        n_val = max(1, n_val)
    n_val = min(n_val, len(examples) - 1)
    val = sorted(order[:n_val])
    train = sorted(order[n_val:])
    return [examples[i] for i in train], [examples[i] for i in val]


# ---- tokenisation ---------------------------------------------------------------------------------

def load_text_processor(model_id: str, settings, catalog):
    """(tokenizer or processor, is_vlm) for a catalog model, without loading its weights."""
    from models.families import resolve_location

    spec = catalog.get(model_id)
    location = resolve_location(spec, settings)
    if spec.family == "vlm":
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(location, trust_remote_code=spec.trust_remote_code), True
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(location, trust_remote_code=spec.trust_remote_code), False


def _render(processor, messages: list[dict], generation_prompt: bool) -> str:
    owner = processor if getattr(processor, "chat_template", None) else getattr(processor, "tokenizer", processor)
    return owner.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _ids(processor, text: str, image, is_vlm: bool) -> tuple[list[int], object]:
    if is_vlm:
        from models.images import load_image

        images = [load_image(image)[0]] if image is not None else None
        batch = processor(text=[text], images=images, return_tensors="pt", add_special_tokens=False)
        return batch["input_ids"][0].tolist(), batch.get("pixel_values")
    return processor(text, add_special_tokens=False)["input_ids"], None


def _text_only(messages: list[dict]) -> list[dict]:
    """Text models get VQA-style part lists flattened to strings."""
    flat = []
    for message in messages:
        content = message["content"]
        if not isinstance(content, str):
            content = "".join(part.get("text", "") for part in content if part.get("type") == "text")
        flat.append({"role": message["role"], "content": content})
    return flat


def encode_example(example: Example, processor, max_length: int, is_vlm: bool) -> dict:
    """Token ids and labels where only assistant answers count (everything else is -100).

    Returns ``input_ids``, ``labels``, ``pixel_values`` (VLM with image, else None), ``prompt_tokens``
    (tokens before the first answer), ``tokens`` (before truncation) and ``truncated``.
    """
    if example.image is not None and not is_vlm:
        raise InvalidRequest(f"line {example.line}: image rows need a VQA model; choose one of the vqa models")
    messages = example.messages if is_vlm else _text_only(example.messages)
    image = example.image
    full_ids, pixel_values = _ids(processor, _render(processor, messages, False), image, is_vlm)
    labels = [-100] * len(full_ids)
    prompt_tokens = None
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, _ = _ids(processor, _render(processor, messages[:index], True), image, is_vlm)
        through, _ = _ids(processor, _render(processor, messages[:index + 1], False), image, is_vlm)
        if full_ids[:len(through)] != through or through[:len(before)] != before:
            raise InvalidRequest(f"line {example.line}: the model's chat template does not render turns as a "
                             "stable prefix, so answer tokens cannot be located")
        labels[len(before):len(through)] = full_ids[len(before):len(through)]
        if prompt_tokens is None:
            prompt_tokens = len(before)
    total = len(full_ids)
    return {
        "input_ids": full_ids[:max_length],
        "labels": labels[:max_length],
        "pixel_values": pixel_values,
        "prompt_tokens": prompt_tokens or 0,
        "tokens": total,
        "truncated": total > max_length,
    }


def encode_all(examples: list[Example], processor, max_length: int, is_vlm: bool) -> list[dict]:
    """Encode every example; a prompt that does not fit in ``max_length`` is a config error."""
    encoded = []
    too_long = []
    for example in examples:
        item = encode_example(example, processor, max_length, is_vlm)
        if item["prompt_tokens"] >= max_length:
            too_long.append(Problem(example.line, f"prompt is {item['prompt_tokens']} tokens, max_length is "
                                                  f"{max_length}: no answer token would be trained"))
        encoded.append(item)
    if too_long:
        raise InvalidRequest(f"max_length {max_length} is below the prompt length of {len(too_long)} row(s) "
                         f"(longest prompt {max(e['prompt_tokens'] for e in encoded)} tokens); raise max_length. "
                         + "; ".join(str(p) for p in too_long[:5]))
    return encoded


def token_stats(encoded: list[dict], max_length: int) -> dict:
    lengths = sorted(item["tokens"] for item in encoded)
    if not lengths:
        return {}
    return {
        "min": lengths[0],
        "mean": round(sum(lengths) / len(lengths), 1),
        "p95": lengths[min(len(lengths) - 1, int(0.95 * len(lengths)))],
        "max": lengths[-1],
        "max_length": max_length,
        "truncated_rows": sum(item["truncated"] for item in encoded),
        "longest_prompt": max(item["prompt_tokens"] for item in encoded),
    }


# ---- report ---------------------------------------------------------------------------------------

def preview_rows(examples: list[Example], count: int = PREVIEW_ROWS) -> list[dict]:
    rows = []
    for example in examples[:count]:
        prompt = _text_only([m for m in example.messages if m["role"] != "assistant"])
        answers = [m["content"] for m in example.messages if m["role"] == "assistant"]
        rows.append({"line": example.line, "prompt": "\n".join(m["content"] for m in prompt),
                     "answer": "\n".join(answers), "image": str(example.image) if example.image else None})
    return rows


def validate(path: Path, val_fraction: float = 0.1, seed: int = 42, processor=None, is_vlm: bool = False,
             max_length: int = 512) -> dict:
    """The JSON report for a JSONL file: problems with line numbers, counts, token stats, preview.

    Token statistics need ``processor`` (the chosen model's tokenizer or processor); without it they
    are left out.
    """
    parsed = parse_dataset(path)
    report: dict = {
        "ok": parsed.ok,
        "format": parsed.format,
        "lines": parsed.lines,
        "valid_rows": len(parsed.examples),
        "problem_count": len(parsed.problems),
        "problems": [{"line": p.line, "message": p.message} for p in parsed.problems[:MAX_PROBLEMS_LISTED]],
        "preview": preview_rows(parsed.examples),
    }
    if parsed.examples:
        train, val = split_examples(parsed.examples, val_fraction, seed)
        report["split"] = {"train": len(train), "validation": len(val), "seed": seed, "val_fraction": val_fraction}
    if processor is not None and parsed.ok:
        try:
            encoded = [encode_example(e, processor, max_length, is_vlm) for e in parsed.examples]
        except ValueError as exc:
            report.update(ok=False, problem_count=1, problems=[{"line": 0, "message": str(exc)}])
            return report
        report["tokens"] = token_stats(encoded, max_length)
        over = [e.line for e, item in zip(parsed.examples, encoded, strict=True) if item["prompt_tokens"] >= max_length]
        if over:
            report["ok"] = False
            report["problems"].append({"line": over[0], "message": f"{len(over)} prompt(s) do not fit in "
                                       f"max_length {max_length}; raise max_length"})
            report["problem_count"] += 1
    return report


def require_valid(parsed: ParsedDataset) -> None:
    if parsed.problems:
        raise DatasetError(parsed.problems)
