"""Fine-tuning datasets: safe unpacking, line-numbered validation, token statistics, split, encoding.

One JSON object per line (JSON Lines), in one of three formats (never mixed within a file):

* VQA: ``{"image": "imgs/1.png", "question": "...", "answer": "..."}`` (``image_path`` also accepted)
* Instruction: ``{"instruction": "...", "input": "optional", "output": "..."}``
  or ``{"prompt": "...", "response": "..."}``
* Chat: ``{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}``

Files from common editors and spreadsheet exports are read as they are:

* UTF-8 with or without a byte-order mark, and UTF-16 or UTF-32 with one (Excel's and Notepad's
  "Unicode"). Other encodings (Windows-1252, Latin-1...) are never guessed: each line that is not
  UTF-8 is a problem that says so and asks for the file to be saved as UTF-8.
* Lines end with LF, CRLF or a lone CR, and the last one may have no ending. Blank and
  whitespace-only lines are skipped; whitespace around a row is ignored.
* A ``.json`` upload is read the same way (many ".json" exports are JSON Lines). A file holding one
  JSON array of rows is refused with the command that converts it: problems are reported by line,
  and an array would have to be read into memory whole before its first row could be checked.

Image paths are relative to the folder of the JSONL file and may not leave it.

Every cost is bounded by ``models.limits.Limits`` before or while the work is done: the file's bytes
(``dataset_bytes``) and lines (``dataset_rows``), what a zip expands to (``extracted_bytes``,
``extracted_files``, read from its directory and counted again while writing), each row's messages and
characters (the limits ``check_messages`` applies), image pixels, and the tokens counted for
statistics (``dataset_tokens``). The first ``dataset_problems`` problems are kept; the rest are counted.
"""

from __future__ import annotations

import codecs
import dataclasses
import hashlib
import json
import random
import re
import shutil
import stat
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path

from models.checks import CHAT_ROLES, check_messages, check_text
from models.errors import InvalidRequest, TooLarge, quote
from models.limits import Limits, format_bytes

FORMATS = ("vqa", "instruction", "chat")
ROLES = CHAT_ROLES
PREVIEW_ROWS = 5
PREVIEW_CHARS = 500  # of a preview row's prompt and answer: a report stays small whatever the rows hold
IGNORED_ZIP_PREFIXES = ("__MACOSX/",)
DATASET_SUFFIXES = (".jsonl", ".json")
ZIP_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA)
_READ_BYTES = 64 * 1024
# A JSON line may spell a character as "\ud83d\ude00" (12 bytes); longer lines cannot hold an acceptable row.
_LINE_CHARS_PER_CHAR = 12
# Byte-order marks, UTF-32 first: its little-endian mark starts with UTF-16's.
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32-le"), (codecs.BOM_UTF32_BE, "utf-32-be"), (codecs.BOM_UTF8, "utf-8"),
         (codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be"))
_NEWLINE = re.compile(r"\r\n|\r|\n")
_NOT_UTF8 = re.compile("[\udc80-\udcff]")  # what errors="surrogateescape" makes of bytes that are not UTF-8
SAVE_AS_UTF8 = "save the file as UTF-8 (in Excel: CSV UTF-8 or Unicode Text; in editors: Save with Encoding, UTF-8)"
# Short rows get the reference labelling (every prefix rendered); longer ones must pass the linear one.
_EXACT_MAX_MESSAGES = 16


@dataclasses.dataclass
class Example:
    """One valid row, normalised to chat messages; the last assistant turn(s) are the answer."""

    line: int
    format: str
    messages: list[dict]
    image: Path | None = None
    image_name: str = ""  # the path as the row wrote it, for reports (never a server path)


@dataclasses.dataclass
class Problem:
    line: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}" if self.line else self.message


class Problems:
    """Problems in the order found: the first ``keep`` are listed, the rest only counted."""

    def __init__(self, keep: int):
        self.keep = keep
        self.listed: list[Problem] = []
        self.count = 0

    def add(self, line: int, message: str) -> Problem:
        self.count += 1
        problem = Problem(line, message)
        if len(self.listed) < self.keep:
            self.listed.append(problem)
        return problem


@dataclasses.dataclass
class ParsedDataset:
    path: Path
    format: str | None
    examples: list[Example]
    problems: list[Problem]  # the first ``limits.dataset_problems``
    lines: int
    problem_count: int = 0  # all of them

    @property
    def ok(self) -> bool:
        return not self.problem_count and bool(self.examples)


class DatasetError(InvalidRequest):
    """The dataset has problems; ``problems`` lists them with line numbers."""

    def __init__(self, problems: list[Problem], total: int | None = None):
        self.problems = problems
        total = total if total is not None else len(problems)
        shown = "\n".join(str(p) for p in problems[:20])
        more = f"\n... and {total - 20:,} more" if total > 20 else ""
        super().__init__(f"The dataset has {total:,} problem(s); nothing was started:\n{shown}{more}")


# ---- unpacking ------------------------------------------------------------------------------------

def prepare_dataset(upload: str | Path, dest: Path, limits: Limits | None = None) -> Path:
    """Copy a ``.jsonl``/``.json`` or safely extract a ``.zip`` into ``dest``; return the dataset file inside it."""
    limits = limits or Limits()
    upload = Path(upload)
    if not upload.is_file():
        raise InvalidRequest(f"dataset file {quote(upload.name, 100)} does not exist; upload a .jsonl or .zip file")
    suffix = upload.suffix.lower()
    if suffix not in (*DATASET_SUFFIXES, ".zip"):
        raise InvalidRequest(f"dataset must be a .jsonl file or a .zip holding one, got {quote(upload.name, 100)}")
    dest.mkdir(parents=True, exist_ok=True)
    if suffix == ".zip":
        return extract_zip(upload, dest, limits)
    check_dataset_size(upload.name, upload.stat().st_size, limits)
    target = dest / "data.jsonl"
    shutil.copyfile(upload, target)
    return target


def check_dataset_size(name: str, size: int, limits: Limits) -> None:
    if size > limits.dataset_bytes:
        raise TooLarge(f"{quote(name, 100)} is {format_bytes(size)}; the limit for a dataset file is "
                       f"{format_bytes(limits.dataset_bytes)}. Split it into smaller datasets.")


def extract_zip(archive: Path, dest: Path, limits: Limits | None = None) -> Path:
    """Extract with zip-slip, symlink, size and file-count checks; return the one JSONL inside.

    The directory's sizes are checked before anything is written, and the bytes written are counted
    again (a directory can lie), so that no zip costs more than ``limits.extracted_bytes`` of disk.
    """
    limits = limits or Limits()
    root = dest.resolve()
    _check_entry_count(archive, limits)
    try:
        with zipfile.ZipFile(archive) as bundle:
            members = [m for m in bundle.infolist() if not m.filename.startswith(IGNORED_ZIP_PREFIXES)]
            _check_members(members, root, limits)
            dataset = _dataset_member(members, limits)
            budget = limits.extracted_bytes
            for member in members:
                budget -= _extract_member(bundle, member, root, budget)
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        raise InvalidRequest(f"{quote(archive.name, 100)} is not a valid zip file ({str(exc)[:200]}); "
                             "create it again") from None
    return (root / dataset.filename).resolve()


def _check_entry_count(archive: Path, limits: Limits) -> None:
    """Refuse a zip with too many entries from its end record, before its directory is read into memory.

    ``zipfile`` builds an object per entry on opening (400 MB for the 700,000 entries a 60 MB zip can hold).
    """
    try:
        with open(archive, "rb") as handle:
            end = zipfile._EndRecData(handle)  # the stdlib's own reader of the end record
    except OSError:
        return  # zipfile reports an unreadable file itself
    entries = end[zipfile._ECD_ENTRIES_TOTAL] if end is not None else 0
    if entries > limits.extracted_files:
        raise TooLarge(f"the zip holds {entries:,} entries; the limit is {limits.extracted_files:,} files. "
                       "Leave out what the dataset does not use.")


def _check_members(members: list[zipfile.ZipInfo], root: Path, limits: Limits) -> None:
    files = [m for m in members if not m.is_dir()]
    if len(files) > limits.extracted_files:
        raise TooLarge(f"the zip holds {len(files):,} files; the limit is {limits.extracted_files:,}. "
                       "Leave out what the dataset does not use.")
    total = sum(m.file_size for m in files)
    if total > limits.extracted_bytes:
        raise TooLarge(f"the zip unpacks to {format_bytes(total)}; the limit is "
                       f"{format_bytes(limits.extracted_bytes)}. Leave out what the dataset does not use, or split it.")
    for member in members:
        name = quote(member.filename, 100)
        target = (root / member.filename).resolve()
        if member.filename.startswith(("/", "\\")) or (target != root and root not in target.parents):
            raise InvalidRequest(f"zip entry {name} points outside the dataset folder")
        if stat.S_ISLNK(member.external_attr >> 16):
            raise InvalidRequest(f"zip entry {name} is a symbolic link; links are not accepted")
        if member.flag_bits & 0x1:
            raise InvalidRequest(f"zip entry {name} is encrypted; upload a zip without a password")
        if member.compress_type not in ZIP_METHODS:
            raise InvalidRequest(f"zip entry {name} uses a compression method this app cannot read; "
                                 "create the zip again with the usual (deflate) compression")


def _dataset_member(members: list[zipfile.ZipInfo], limits: Limits) -> zipfile.ZipInfo:
    datasets = [m for m in members if not m.is_dir() and m.filename.lower().endswith(".jsonl")]
    if not datasets:
        jsons = [m.filename for m in members if m.filename.lower().endswith(".json")]
        hint = (f" (found {quote(', '.join(jsons), 100)}: save it as JSON Lines, one object per line, named .jsonl)"
                if jsons else "")
        raise InvalidRequest(f"the zip holds no .jsonl file{hint}; put the dataset's JSONL next to its images")
    if len(datasets) > 1:
        names = ", ".join(m.filename for m in datasets[:5])
        raise InvalidRequest(f"the zip holds several .jsonl files ({quote(names, 200)}); keep exactly one")
    check_dataset_size(datasets[0].filename, datasets[0].file_size, limits)
    return datasets[0]


def _extract_member(bundle: zipfile.ZipFile, member: zipfile.ZipInfo, root: Path, budget: int) -> int:
    """Write one entry; returns the bytes written (TooLarge past ``budget``)."""
    target = root / member.filename
    if member.is_dir():
        target.mkdir(parents=True, exist_ok=True)
        return 0
    target.parent.mkdir(parents=True, exist_ok=True)
    with bundle.open(member) as source, open(target, "wb") as sink:
        return copy_bounded(source, sink, budget)


def copy_bounded(source, sink, budget: int) -> int:
    """Copy ``source`` to ``sink``; TooLarge as soon as more than ``budget`` bytes come out."""
    written = 0
    while block := source.read(1024 * 1024):
        written += len(block)
        if written > budget:
            raise TooLarge("the zip expands to more than its directory declares and past the limit of what a "
                           "dataset may unpack to; create the zip again")
        sink.write(block)
    return written


# ---- reading lines --------------------------------------------------------------------------------

def read_lines(path: Path, limits: Limits) -> Iterator[tuple[int, str | None]]:
    """``(line number, text)`` for each line; text is None for a line too long to hold a row.

    Bytes that are not UTF-8 stay in the text as lone surrogates (U+DC80-U+DCFF) for the caller to
    report with the line's number.
    """
    check_dataset_size(path.name, path.stat().st_size, limits)
    number = 0
    with open(path, "rb") as handle:
        encoding, mark = _encoding(handle.read(4))
        handle.seek(mark)
        try:
            for number, text in enumerate(_split_lines(_decoded(handle, encoding),
                                                       limits.history_chars * _LINE_CHARS_PER_CHAR), start=1):
                if number > limits.dataset_rows:
                    raise TooLarge(f"the dataset has more than {limits.dataset_rows:,} lines, the limit; "
                                   "split it into smaller datasets")
                yield number, text
        except UnicodeDecodeError:  # only UTF-16 and UTF-32: UTF-8 keeps bad bytes for a per-line problem
            raise InvalidRequest(f"line {number + 1} is not valid {encoding.upper()}, the encoding the file's "
                                 f"byte-order mark names; {SAVE_AS_UTF8}") from None


def _encoding(head: bytes) -> tuple[str, int]:
    """The encoding a byte-order mark names and the mark's length; UTF-8 without one."""
    for mark, name in _BOMS:
        if head.startswith(mark):
            return name, len(mark)
    return "utf-8", 0


def _decoded(handle, encoding: str) -> Iterator[str]:
    """Text read in blocks; on a decoding error, the text before it comes out first (for the line number)."""
    errors = "surrogateescape" if encoding == "utf-8" else "strict"
    decoder = codecs.getincrementaldecoder(encoding)(errors)
    try:
        while block := handle.read(_READ_BYTES):
            yield decoder.decode(block)
        yield decoder.decode(b"", final=True)
    except UnicodeDecodeError as exc:
        yield codecs.decode(exc.object[:exc.start], encoding)
        raise


def _split_lines(chunks: Iterator[str], max_chars: int) -> Iterator[str | None]:
    """Lines ended by LF, CRLF or a lone CR (not by U+2028 and the like, which JSON strings may hold).

    A line longer than ``max_chars`` is not kept in memory: it comes out as None.
    """
    pieces: list[str] = []
    size, after_cr = 0, False
    for chunk in chunks:
        if after_cr and chunk.startswith("\n"):
            chunk, after_cr = chunk[1:], False  # the LF of a CRLF that fell into the next chunk
        if not chunk:
            continue
        after_cr = chunk.endswith("\r")
        *ended, rest = _NEWLINE.split(chunk)
        for part in ended:
            yield None if size + len(part) > max_chars else "".join(pieces) + part
            pieces, size = [], 0
        size += len(rest)
        if size > max_chars:
            pieces = []
        elif rest:
            pieces.append(rest)
    if size:
        yield None if size > max_chars else "".join(pieces)


# ---- validation -----------------------------------------------------------------------------------

def row_format(row: dict) -> str | None:
    if "messages" in row:
        return "chat"
    if "image" in row or "image_path" in row or "question" in row:
        return "vqa"
    if {"instruction", "output", "prompt", "response"} & set(row):
        return "instruction"
    return None


def _text(row: dict, key: str, problems: list[str], limits: Limits, required: bool = True) -> str:
    value = row.get(key)
    if value is None:
        if required:
            problems.append(f"missing field {key!r}")
        return ""
    if not isinstance(value, str):
        problems.append(f"field {key!r} must be a string, got {type(value).__name__}")
        return ""
    if required and not value.strip():
        problems.append(f"field {key!r} is empty")
        return value
    try:
        check_text(f"field {key!r}", value, limits.text_chars, required=False)
    except InvalidRequest as exc:
        problems.append(str(exc))
    return value


def check_image(value: str, folder: Path, limits: Limits | None = None) -> tuple[Path | None, str]:
    """Resolve an image path inside ``folder`` and check its size and data; (path, "") or (None, problem)."""
    from PIL import Image, UnidentifiedImageError

    limits = limits or Limits()
    name = quote(value, 100)
    if "\x00" in value:
        return None, f"image path {name} holds a NUL character"
    if Path(value).is_absolute() or value.startswith(("\\", "~")):
        return None, f"image path {name} must be relative to the dataset folder"
    root = folder.resolve()
    try:
        path = (root / value).resolve()
        found = root in path.parents and path.is_file()
    except OSError as exc:  # a name too long for the file system, a loop of links
        return None, f"image path {name} cannot be used ({exc.strerror})"
    if root not in path.parents:
        return None, f"image path {name} escapes the dataset folder"
    if not found:
        return None, f"image {name} is missing (upload a .zip holding the JSONL and its images)"
    too_big = (f"image {name} is larger than the limits of {limits.image_pixels:,} pixels and "
               f"{limits.image_side:,} pixels a side; resize it")
    try:
        with Image.open(path) as image:
            width, height = image.size
            if width * height > limits.image_pixels or max(width, height) > limits.image_side:
                return None, f"{too_big} (it is {width}x{height})"
            image.verify()
    except Image.DecompressionBombError:  # Pillow's own ceiling, far above ours: the header declares a huge canvas
        return None, f"{too_big} (its header declares a huge canvas: a decompression bomb?)"
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        return None, f"image {name} is unreadable ({exc.__class__.__name__})"
    return path, ""


def _vqa_example(row: dict, line: int, folder: Path, limits: Limits) -> tuple[Example | None, list[str]]:
    problems: list[str] = []
    key = "image" if "image" in row else "image_path"
    image_value = _text(row, key, problems, limits)
    usable_path = image_value.strip() and not problems
    question = _text(row, "question", problems, limits)
    answer = _text(row, "answer", problems, limits)
    image = None
    if usable_path:
        image, problem = check_image(image_value, folder, limits)
        if problem:
            problems.append(problem)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
                {"role": "assistant", "content": answer}]
    return (None if problems else Example(line, "vqa", messages, image, image_value)), problems


def _instruction_example(row: dict, line: int, limits: Limits) -> tuple[Example | None, list[str]]:
    problems: list[str] = []
    if "instruction" in row or "output" in row:
        instruction = _text(row, "instruction", problems, limits)
        extra = _text(row, "input", problems, limits, required=False)
        answer = _text(row, "output", problems, limits)
        prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    else:
        prompt = _text(row, "prompt", problems, limits)
        answer = _text(row, "response", problems, limits)
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    return (None if problems else Example(line, "instruction", messages)), problems


def _chat_example(row: dict, line: int, limits: Limits) -> tuple[Example | None, list[str]]:
    """A chat row is checked by ``check_messages``, the rules every conversation in the app follows."""
    messages = row.get("messages")
    if isinstance(messages, list):  # the row's own size limits first, with advice that fits a dataset
        if len(messages) > limits.history_turns:
            return None, [f"messages has {len(messages):,} messages; the limit is {limits.history_turns:,}. "
                          "Split the conversation into several rows."]
        chars = sum(len(m["content"]) for m in messages if isinstance(m, dict) and isinstance(m.get("content"), str))
        if chars > limits.history_chars:
            return None, [f"messages hold {chars:,} characters; the limit is {limits.history_chars:,}. "
                          "Split the conversation into several rows."]
    try:
        check_messages(messages, limits, roles=ROLES, what="messages", required=True)
    except InvalidRequest as exc:
        return None, [str(exc)]
    clean = [{"role": m["role"], "content": m.get("content")} for m in messages]  # as written: whitespace is data
    empty = [index for index, m in enumerate(clean) if not isinstance(m["content"], str) or not m["content"].strip()]
    if empty:
        return None, [f"messages[{empty[0]}].content is empty"]
    roles = {m["role"] for m in clean}
    if "assistant" not in roles:
        return None, ["messages has no assistant turn to learn from"]
    if "user" not in roles:
        return None, ["messages has no user turn"]
    return Example(line, "chat", clean), []


def _example(row: dict, fmt: str, line: int, folder: Path, limits: Limits) -> tuple[Example | None, list[str]]:
    if fmt == "vqa":
        return _vqa_example(row, line, folder, limits)
    if fmt == "instruction":
        return _instruction_example(row, line, limits)
    return _chat_example(row, line, limits)


def _json_array_error() -> InvalidRequest:
    return InvalidRequest("the file holds a JSON array of rows ([{...}, {...}]); this app reads JSON Lines, one "
                          "JSON object per line. Convert it, e.g. jq -c '.[]' data.json > data.jsonl, or in "
                          "pandas df.to_json('data.jsonl', orient='records', lines=True)")


class _Parser:
    """The state of one pass over a file: examples, problems, the format and where other formats start."""

    def __init__(self, folder: Path, limits: Limits):
        self.folder, self.limits = folder, limits
        self.problems = Problems(limits.dataset_problems)
        self.examples: list[Example] = []
        self.format: str | None = None
        self.format_line = 0
        self.mixed: dict[str, tuple[Problem, list[int]]] = {}  # other format -> its first problem, its lines
        self.seen: dict[str, int] = {}
        self.rows = 0

    def line(self, number: int, text: str | None) -> None:
        if text is None:
            self.problems.add(number, f"the line is longer than a row may be ({self.limits.history_chars:,} "
                                      "characters of text); split it into several rows")
            return
        bad = _NOT_UTF8.search(text)
        if bad:
            self.problems.add(number, f"not UTF-8 text (byte 0x{ord(bad.group()) - 0xDC00:02X} at character "
                                      f"{bad.start() + 1}); {SAVE_AS_UTF8}")
            return
        stripped = text.strip()
        if not stripped:
            return
        if "\x00" in stripped:
            raise InvalidRequest(f"line {number} holds NUL characters: the file looks like UTF-16 without a "
                                 f"byte-order mark, or is not text; {SAVE_AS_UTF8}")
        row = self._json(number, stripped)
        if row is not None:
            self._row(number, row)

    def _json(self, number: int, text: str) -> dict | None:
        first = not self.rows
        self.rows += 1
        try:
            row = json.loads(text)
        except json.JSONDecodeError as exc:
            if first and text.startswith("["):
                raise _json_array_error() from None
            self.problems.add(number, f"invalid JSON ({exc.msg} at column {exc.colno})")
            return None
        except RecursionError:
            self.problems.add(number, "invalid JSON (nested too deeply)")
            return None
        if first and isinstance(row, list) and any(isinstance(item, dict) for item in row):
            raise _json_array_error()
        if not isinstance(row, dict):
            self.problems.add(number, f"expected a JSON object, got {type(row).__name__}")
            return None
        return row

    def _row(self, number: int, row: dict) -> None:
        fmt = row_format(row)
        if fmt is None:
            self.problems.add(number, "unknown row format: expected image/question/answer, instruction/output, "
                                      "prompt/response or messages")
            return
        if self.format is None:
            self.format, self.format_line = fmt, number
        elif fmt != self.format:
            self._mixed(number, fmt)
            return
        text = json.dumps(row, sort_keys=True, ensure_ascii=False)
        digest = hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()  # lone surrogates: checked below
        if digest in self.seen:
            self.problems.add(number, f"duplicate of line {self.seen[digest]}")
            return
        self.seen[digest] = number
        example, row_problems = _example(row, fmt, number, self.folder, self.limits)
        for problem in row_problems:
            self.problems.add(number, problem)
        if example is not None:
            self.examples.append(example)

    def _mixed(self, number: int, fmt: str) -> None:
        """One problem where another format starts (not one per row): that line is what needs fixing."""
        if fmt in self.mixed:
            self.mixed[fmt][1].append(number)
            return
        self.mixed[fmt] = (self.problems.add(number, ""), [number])

    def finish(self) -> None:
        for fmt, (problem, lines) in self.mixed.items():
            more = f" ({len(lines):,} {fmt} rows in all, the last at line {lines[-1]})" if len(lines) > 1 else ""
            problem.message = (f"{_a(fmt)} {fmt} row starts here{more}, but line {self.format_line} made this "
                               f"{_a(self.format)} {self.format} dataset; formats cannot be mixed in one file: "
                               "keep one format per file")
        if not self.examples and not self.problems.count:
            self.problems.add(0, "the dataset has no rows")


def _a(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def parse_dataset(path: Path, limits: Limits | None = None) -> ParsedDataset:
    """Read every line; collect normalised examples and the problems with their line numbers."""
    limits = limits or Limits()
    path = Path(path)
    parser = _Parser(path.parent, limits)
    lines = 0
    try:
        for lines, text in read_lines(path, limits):
            parser.line(lines, text)
    except OSError as exc:
        raise InvalidRequest(f"cannot read dataset {quote(path.name, 100)}: {exc.strerror}") from None
    parser.finish()
    return ParsedDataset(path=path, format=parser.format, examples=parser.examples, problems=parser.problems.listed,
                         lines=lines, problem_count=parser.problems.count)


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
        from models.families.vlm import fit_image, image_pixel_limit
        from models.images import load_image

        # The image at the size the VQA path gives the model (Qwen2-VL would otherwise spend thousands of tokens)
        images = [fit_image(load_image(image)[0], image_pixel_limit("", processor.image_processor))[0]
                  ] if image is not None else None
        batch = processor(text=[text], images=images, return_tensors="pt", add_special_tokens=False)
        # Every image input the model needs besides the ids: pixel_values, and image_grid_thw (Qwen2-VL),
        # pixel_attention_mask (Idefics3), aspect ratios and cross_attention_mask (Mllama)...
        return batch["input_ids"][0].tolist(), {key: value for key, value in batch.items()
                                                if key not in ("input_ids", "attention_mask")} or None
    return processor(text, add_special_tokens=False)["input_ids"], None


def _as_parts(messages: list[dict]) -> list[dict]:
    """Questions and answers as lists of parts: the llava-1.5 and SmolVLM templates render a string content as
    nothing. System messages stay strings (Llama 3.2 Vision's template reads them only as strings)."""
    return [{**message, "content": [{"type": "text", "text": message["content"]}]}
            if isinstance(message["content"], str) and message["role"] != "system" else message
            for message in messages]


def _text_only(messages: list[dict]) -> list[dict]:
    """Text models get VQA-style part lists flattened to strings."""
    flat = []
    for message in messages:
        content = message["content"]
        if not isinstance(content, str):
            content = "".join(part.get("text", "") for part in content if part.get("type") == "text")
        flat.append({"role": message["role"], "content": content})
    return flat


UNSTABLE_TEMPLATE = ("the model's chat template does not render turns as a stable prefix, so answer tokens cannot "
                     "be located")


def _answer_spans_exact(processor, messages: list[dict], image, is_vlm: bool):
    """(ids, pixel values, answer spans) by rendering the prefix before and through every answer.

    The reference labelling, but its cost grows with the square of the row's length: short rows only.
    """
    full_ids, pixel_values = _ids(processor, _render(processor, messages, False), image, is_vlm)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, _ = _ids(processor, _render(processor, messages[:index], True), image, is_vlm)
        through, _ = _ids(processor, _render(processor, messages[:index + 1], False), image, is_vlm)
        if full_ids[:len(through)] != through or through[:len(before)] != before:
            raise InvalidRequest(UNSTABLE_TEMPLATE)
        spans.append((len(before), len(through)))
    return full_ids, pixel_values, spans


def _turn_segments(processor, messages: list[dict]) -> tuple[list[str], set[int]] | None:
    """The row's rendering cut at turn boundaries, and which pieces are answers; None if it does not cut.

    Each turn is rendered after the turn or two before it (so that role checks in templates pass): the
    text it adds is that turn's piece. An answer's piece is split after the generation prompt.
    """
    segments, answers = [_render(processor, messages[:1], False)], set()
    for index in range(1, len(messages)):
        start = index - 1 if messages[index - 1]["role"] != "assistant" else max(index - 2, 0)
        head = _render(processor, messages[start:index], False)
        whole = _render(processor, messages[start:index + 1], False)
        if not whole.startswith(head):
            return None
        piece = whole[len(head):]
        if messages[index]["role"] != "assistant":
            segments.append(piece)
            continue
        prompt = _render(processor, messages[start:index], True)
        prompt = prompt[len(head):] if prompt.startswith(head) else None
        if prompt is None or not piece.startswith(prompt):
            return None
        segments.append(prompt)
        answers.add(len(segments))
        segments.append(piece[len(prompt):])
    return segments, answers


def _answer_spans_linear(processor, messages: list[dict], is_vlm: bool):
    """The same spans as ``_answer_spans_exact`` in time linear in the row's length, or None.

    The row is rendered and tokenized once; each turn is rendered in a small window. The pieces must
    add up to the whole rendering, and their tokens to the whole row's tokens, or None is returned.
    """
    import jinja2

    if messages[0]["role"] == "assistant":
        return None
    try:
        cut = _turn_segments(processor, messages)
    except jinja2.TemplateError:  # the template refused a window (a role order it checks)
        return None
    full_text = _render(processor, messages, False)
    if cut is None or "".join(cut[0]) != full_text:
        return None
    segments, answers = cut
    full_ids, _ = _ids(processor, full_text, None, is_vlm)
    tokenizer = getattr(processor, "tokenizer", processor)
    pieces = tokenizer(segments, add_special_tokens=False)["input_ids"]
    if [token for piece in pieces for token in piece] != full_ids:
        return None
    spans, position = [], 0
    for index, piece in enumerate(pieces):
        if index in answers:
            spans.append((position, position + len(piece)))
        position += len(piece)
    return full_ids, None, spans


def _answer_spans(processor, messages: list[dict], image, is_vlm: bool):
    """(ids, pixel values, answer spans): linear when the template allows it, else exact for short rows."""
    import jinja2

    try:
        found = _answer_spans_linear(processor, messages, is_vlm) if image is None else None
        if found is not None:
            return found
        if len(messages) > _EXACT_MAX_MESSAGES:
            raise InvalidRequest(f"the row has {len(messages):,} messages, and the model's chat template cannot be "
                                 f"checked turn by turn; rows of more than {_EXACT_MAX_MESSAGES} messages need a "
                                 "template that renders each turn on its own. Split the conversation into rows.")
        return _answer_spans_exact(processor, messages, image, is_vlm)
    except jinja2.TemplateError as exc:  # e.g. a template that requires user and assistant turns to alternate
        raise InvalidRequest(f"the model's chat template refuses this row: {str(exc)[:200]}") from None


def _encode(example: Example, processor, max_length: int, is_vlm: bool) -> dict:
    if example.image is not None and not is_vlm:
        raise InvalidRequest("image rows need a VQA model; choose one of the vqa models")
    messages = _as_parts(example.messages) if is_vlm else _text_only(example.messages)
    full_ids, image_inputs, spans = _answer_spans(processor, messages, example.image, is_vlm)
    labels = [-100] * len(full_ids)
    for start, end in spans:
        labels[start:end] = full_ids[start:end]
    total = len(full_ids)
    return {
        "input_ids": full_ids[:max_length],
        "labels": labels[:max_length],
        "image_inputs": image_inputs,
        "prompt_tokens": spans[0][0] if spans else 0,
        "tokens": total,
        "truncated": total > max_length,
    }


def encode_example(example: Example, processor, max_length: int, is_vlm: bool) -> dict:
    """Token ids and labels where only assistant answers count (everything else is -100).

    Returns ``input_ids``, ``labels``, ``image_inputs`` (VLM with image: the processor's outputs besides
    the ids, such as ``pixel_values``; else None), ``prompt_tokens`` (tokens before the first answer),
    ``tokens`` (before truncation) and ``truncated``.
    """
    try:
        return _encode(example, processor, max_length, is_vlm)
    except InvalidRequest as exc:
        raise InvalidRequest(f"line {example.line}: {exc}") from None


def _count_tokens(total: int, limits: Limits) -> None:
    if total > limits.dataset_tokens:
        raise TooLarge(f"the dataset holds more than {limits.dataset_tokens:,} tokens, the limit; "
                       "split it into smaller datasets")


def _prompts_too_long(lengths: list[tuple[int, int]], max_length: int) -> Problem | None:
    """One problem for every row whose prompt leaves no room for an answer: ``lengths`` is (line, prompt tokens)."""
    over = [(line, prompt) for line, prompt in lengths if prompt >= max_length]
    if not over:
        return None
    return Problem(over[0][0], f"max_length {max_length} is below the prompt length of {len(over):,} row(s) "
                               f"(longest prompt {max(p for _, p in over)} tokens): no answer token would be "
                               "trained; raise max_length")


def encode_all(examples: list[Example], processor, max_length: int, is_vlm: bool,
               limits: Limits | None = None) -> list[dict]:
    """Encode every example for training; a prompt that does not fit in ``max_length`` is a config error."""
    limits = limits or Limits()
    encoded, total = [], 0
    for example in examples:
        item = encode_example(example, processor, max_length, is_vlm)
        total += item["tokens"]
        _count_tokens(total, limits)
        encoded.append(item)
    problem = _prompts_too_long([(e.line, item["prompt_tokens"]) for e, item in zip(examples, encoded, strict=True)],
                                max_length)
    if problem is not None:
        raise InvalidRequest(str(problem))
    return encoded


def token_lengths(examples: list[Example], processor, max_length: int, is_vlm: bool, limits: Limits,
                  problems: Problems) -> list[dict]:
    """Per row: line, tokens, prompt tokens, truncated (no ids: a report needs only lengths).

    A row that cannot be encoded is a problem; past ``limits.dataset_tokens`` tokens, TooLarge.
    """
    lengths, total = [], 0
    for example in examples:
        try:
            item = _encode(example, processor, max_length, is_vlm)
        except InvalidRequest as exc:
            problems.add(example.line, str(exc))
            continue
        total += item["tokens"]
        _count_tokens(total, limits)
        lengths.append({"line": example.line, "tokens": item["tokens"], "prompt_tokens": item["prompt_tokens"],
                        "truncated": item["truncated"]})
    return lengths


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
        rows.append({"line": example.line, "prompt": _cut("\n".join(m["content"] for m in prompt)),
                     "answer": _cut("\n".join(answers)), "image": example.image_name or None})
    return rows


def _cut(text: str, limit: int = PREVIEW_CHARS) -> str:
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text):,} characters)"


def preview_images(examples: list[Example], count: int = PREVIEW_ROWS, side: int = 256) -> list[tuple[object, str]]:
    """Small in-memory copies of the preview rows' images with their captions (the files may go away)."""
    from PIL import Image

    thumbnails = []
    for example in examples[:count]:
        if example.image is None:
            continue
        with Image.open(example.image) as image:
            image.thumbnail((side, side))
            thumbnails.append((image.convert("RGB"), f"line {example.line}"))
    return thumbnails


def validate(path: Path, val_fraction: float = 0.1, seed: int = 42, processor=None, is_vlm: bool = False,
             max_length: int = 512, limits: Limits | None = None, base_model: str = "") -> dict:
    """The JSON report for a dataset file: problems with line numbers, counts, token stats, preview.

    The same judgement decides whether a run may start (``report["ok"]``). Token statistics need
    ``processor`` (the chosen model's tokenizer or processor); without it they are left out.
    """
    limits = limits or Limits()
    return report(parse_dataset(path, limits), val_fraction, seed, processor, is_vlm, max_length, limits,
                  base_model)


def report(parsed: ParsedDataset, val_fraction: float, seed: int, processor, is_vlm: bool, max_length: int,
           limits: Limits, base_model: str = "") -> dict:
    """The report of an already parsed dataset (see ``validate``)."""
    problems = Problems(limits.dataset_problems)
    problems.listed, problems.count = list(parsed.problems), parsed.problem_count
    if processor is not None and parsed.format == "vqa" and not is_vlm:
        problems.listed.insert(0, Problem(0, f"{base_model or 'the model'} is a text model but the rows have "
                                             "images; choose a VQA model"))
        problems.count += 1
    result: dict = {"format": parsed.format, "lines": parsed.lines, "valid_rows": len(parsed.examples),
                    "preview": preview_rows(parsed.examples)}
    if parsed.examples:
        train, val = split_examples(parsed.examples, val_fraction, seed)
        result["split"] = {"train": len(train), "validation": len(val), "seed": seed, "val_fraction": val_fraction}
    if processor is not None and not problems.count and parsed.examples:
        lengths = token_lengths(parsed.examples, processor, max_length, is_vlm, limits, problems)
        result["tokens"] = token_stats(lengths, max_length)
        too_long = _prompts_too_long([(item["line"], item["prompt_tokens"]) for item in lengths], max_length)
        if too_long is not None:
            problems.add(too_long.line, too_long.message)
    if base_model:
        result["base_model"] = base_model
    return {"ok": not problems.count and bool(parsed.examples), **result, "problem_count": problems.count,
            "problems": [{"line": p.line, "message": p.message} for p in problems.listed]}


def require_ok(result: dict) -> None:
    """Raise DatasetError when a report says the dataset cannot be trained on."""
    if not result["ok"]:
        problems = [Problem(p["line"], p["message"]) for p in result["problems"]]
        raise DatasetError(problems, result["problem_count"])


def require_valid(parsed: ParsedDataset) -> None:
    if parsed.problem_count:
        raise DatasetError(parsed.problems, parsed.problem_count)
