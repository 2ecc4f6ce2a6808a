"""Vision-language family: image + question -> streamed answer.

One family for every ``AutoModelForImageTextToText`` model that has a processor with a chat
template: LLaVA-1.5 (llava-hf), Qwen2/2.5-VL, SmolVLM/Idefics3 and Llama-3.2-Vision (Mllama).
Their differences (image size limits, how images enter the prompt, a BOS written by the template,
system prompts, generation defaults) are handled here, so the tab never needs to know which kind of
model it talks to. ``build_tiny`` builds a tiny random twin of each of them, to run all of this offline.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator
from pathlib import Path

from models.catalog import ModelSpec
from models.checks import check_messages, check_text
from models.errors import Busy, InvalidRequest, TooLarge
from models.families.loading import load_pretrained
from models.generation import GenerationParams, StreamStats, stream_generate
from models.limits import Limits
from models.quantization import Precision
from models.sources import ModelUnavailableError

BUSY_TIMEOUT = 120.0
# Re-renders of the prompt after the estimate, at most; then the follow-ups are all left out.
MAX_RECHECKS = 3

# Pixels fed to the processor per model type, where the processor does not say (see image_pixel_limit).
# Processors resize anyway; larger images only cost memory and time before they do.
MAX_IMAGE_PIXELS = {"qwen2_vl": 1024 * 28 * 28, "qwen2_5_vl": 1024 * 28 * 28, "mllama": 4 * 560 * 560,
                    "idefics3": 2048 * 2048, "llava": 1024 * 1024}
DEFAULT_MAX_IMAGE_PIXELS = 1536 * 1536
# Qwen2-VL and Qwen2.5-VL keep the native resolution, one token per (patch x merge)^2 pixels, up to
# 16,384 tokens an image in the hub repos' processors: the workbench caps an image at this many tokens.
MAX_NATIVE_IMAGE_TOKENS = 1024
# Model types whose chat template refuses a system message in a conversation with an image (Llama 3.2
# Vision raises "Prompting with images is incompatible with system messages"): the system prompt
# opens the first user turn instead.
SYSTEM_PROMPT_IN_USER_TURN = ("mllama",)
# Where a model folder keeps its image processor's settings (either file; transformers 5 writes the second).
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
# Processor outputs that carry pixels: cast to the model's dtype (masks, ids and grids keep theirs).
PIXEL_INPUTS = ("pixel_values", "pixel_values_videos")


@dataclasses.dataclass(eq=False)
class VLMHandle:
    """A loaded vision-language model; ``lock`` serializes calls because adapters switch in place."""

    model: object
    processor: object
    spec_id: str
    device: str
    model_type: str
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)

    @property
    def context_length(self) -> int:
        config = self.model.config
        text_config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        return int(getattr(text_config, "max_position_embeddings", 0) or 4096)

    @property
    def max_image_pixels(self) -> int:
        return image_pixel_limit(self.model_type, getattr(self.processor, "image_processor", None))

    @property
    def tokenizer(self):
        return getattr(self.processor, "tokenizer", self.processor)


def image_pixel_limit(model_type: str, image_processor=None) -> int:
    """The most pixels an image should have when it reaches this model's processor.

    Read from the image processor where it bounds the image itself: native-resolution processors
    (Qwen2-VL, Qwen2.5-VL: ``patch_size`` x ``merge_size`` pixels a side per token) get at most
    ``MAX_NATIVE_IMAGE_TOKENS`` tokens; tiling processors with ``max_image_tiles`` (Mllama) their
    largest canvas; Idefics3/SmolVLM, which resize the longest edge to ``size["longest_edge"]`` (2048 in
    SmolVLM-256M, 1536 in SmolVLM-2B) and cut tiles of ``max_image_size``, that edge squared.
    Otherwise ``MAX_IMAGE_PIXELS`` by model type (``model_type`` may be "" when only the processor is known).
    """
    size = getattr(image_processor, "size", None) or {}
    size = {key: value for key, value in dict(size).items() if value is not None}
    patch, merge = getattr(image_processor, "patch_size", None), getattr(image_processor, "merge_size", None)
    if isinstance(patch, int) and isinstance(merge, int):
        factor = patch * merge
        own = size.get("longest_edge") or getattr(image_processor, "max_pixels", None)
        cap = MAX_NATIVE_IMAGE_TOKENS * factor * factor
        return min(cap, int(own)) if own else cap
    tiles = getattr(image_processor, "max_image_tiles", None)
    if tiles and size.get("height") and size.get("width"):
        return int(tiles) * int(size["height"]) * int(size["width"])
    if getattr(image_processor, "max_image_size", None) and size.get("longest_edge"):
        return int(size["longest_edge"]) ** 2
    return MAX_IMAGE_PIXELS.get(model_type, DEFAULT_MAX_IMAGE_PIXELS)


def load(spec: ModelSpec, location: str, precision: Precision) -> VLMHandle:
    """Load an image-text-to-text model and its processor, refusing what cannot answer about images.

    Raises:
        InvalidRequest: the files are not a vision-language model (a text-only model chosen for VQA).
        ModelUnavailableError: its processor has no image processor (files missing) or needs a package
            that is not installed.
    """
    from transformers import AutoModelForImageTextToText

    model_type = _check_architecture(spec, location)
    model, processor = load_pretrained(spec, location, precision, AutoModelForImageTextToText,
                                       _ImageProcessorLoader(spec), kind="chat vision model")
    return VLMHandle(model=model, processor=processor, spec_id=spec.id, device=precision.device,
                     model_type=getattr(model.config, "model_type", "") or model_type)


def _check_architecture(spec: ModelSpec, location: str) -> str:
    """The config's model type, if transformers has an image-text-to-text model for it (read before any weight)."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    try:
        config = AutoConfig.from_pretrained(location, trust_remote_code=spec.trust_remote_code)
    except (OSError, ValueError):
        return ""  # no readable config: from_pretrained below says what is missing
    model_type = getattr(config, "model_type", "")
    remote = "AutoModelForImageTextToText" in (getattr(config, "auto_map", None) or {})
    if model_type not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES and not remote:
        architectures = ", ".join(getattr(config, "architectures", None) or []) or model_type
        raise InvalidRequest(f"{spec.id} is not a vision-language model: its files describe a {model_type!r} model "
                             f"({architectures}), which cannot read images. Choose a VQA model, or point this "
                             "models-file entry at a chat model (task: chat, family: chat).")
    return model_type


class _ImageProcessorLoader:
    """``AutoProcessor`` for ``load_pretrained``, with messages a user can act on when it fails.

    A folder without its processor config fails with transformers' "Can't load image processor";
    Qwen2-VL's processor without torchvision with an ImportError.
    """

    def __init__(self, spec: ModelSpec):
        self.spec = spec

    def from_pretrained(self, location, **kwargs):
        from transformers import AutoProcessor

        try:
            processor = AutoProcessor.from_pretrained(location, **kwargs)
        except ImportError as exc:
            hint = " (pip install torchvision==0.26.0)" if "orchvision" in str(exc) else ""
            first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__).strip()
            raise ModelUnavailableError(f"{self.spec.id}'s processor needs a package that is not installed{hint}: "
                                        f"{first}") from exc
        except OSError as exc:
            folder = Path(location)
            if folder.is_dir() and not any((folder / name).is_file() for name in PROCESSOR_FILES):
                raise ModelUnavailableError(
                    f"{self.spec.id} has no image processor in {location} (preprocessor_config.json or "
                    "processor_config.json is missing), so it cannot read images. Download the model's files "
                    "again or copy the whole folder.") from exc
            raise ModelUnavailableError(f"{self.spec.id}: its processor cannot be read from {location}: {exc}") from exc
        return processor


def release(handle: VLMHandle) -> None:
    """Drop the handle's references so that the model (and any loaded adapters) can be freed."""
    handle.model = None
    handle.processor = None


def build_tiny(folder: Path, arch: str = "") -> None:
    """Write a deterministic random-weight vision-language model into ``folder``.

    ``arch`` "" is tiny-vlm (a LLaVA with a ChatML-style template, for smoke tests). The others are
    twins of the catalog's hub models, built the way transformers' own tests build tiny models: the
    same model, processor, image-processor and tokenizer classes, the same special tokens, chat
    template shape and generation settings as the hub repository, only with tiny sizes.

    * ``llava-1.5``: llava-hf/llava-1.5-7b-hf (LlavaForConditionalGeneration, LlavaProcessor,
      CLIPImageProcessor, LlamaTokenizer; "USER: <image>\\n... ASSISTANT:").
    * ``idefics3``: HuggingFaceTB/SmolVLM-256M-Instruct (Idefics3ForConditionalGeneration,
      Idefics3Processor with image splitting, GPT2Tokenizer; "User:<image>...<end_of_utterance>").
    * ``qwen2_5_vl``: Qwen/Qwen2.5-VL-3B-Instruct (Qwen2_5_VLForConditionalGeneration,
      Qwen2_5_VLProcessor, Qwen2VLImageProcessor with min/max pixels, Qwen2Tokenizer; ChatML).
    * ``mllama``: meta-llama/Llama-3.2-11B-Vision-Instruct (MllamaForConditionalGeneration with
      cross-attention layers, MllamaProcessor, MllamaImageProcessor with tiles, Llama 3 header tokens).
    """
    builders = {"": _build_tiny_vlm, "llava-1.5": _build_llava15, "idefics3": _build_idefics3,
                "qwen2_5_vl": _build_qwen2_5_vl, "mllama": _build_mllama}
    if arch not in builders:
        raise ModelUnavailableError(f"the vlm family builds no tiny {arch!r} model; it builds: "
                                    f"{', '.join(name for name in builders if name)}")
    builders[arch](Path(folder))


def _build_tiny_vlm(folder: Path) -> None:
    """A LLaVA with a 2-layer CLIP vision tower (32 px, patch 8) and a 2-layer Llama, random weights."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    try:  # the PIL-only image processor: no torchvision here
        from transformers import CLIPImageProcessorPil as CLIPImageProcessor
    except ImportError:
        from transformers import CLIPImageProcessor

    from models.offline import CHAT_TEMPLATE, seeded, train_tokenizer

    tokenizer = train_tokenizer(special_tokens=["<image>"], chat_template=CHAT_TEMPLATE,
                                extra_special_tokens={"image_token": "<image>"})
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=CHAT_TEMPLATE)
    seeded()
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8, projection_dim=32)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                         vision_feature_select_strategy="default", vision_feature_layer=-1,
                         pad_token_id=tokenizer.pad_token_id)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    processor.save_pretrained(folder)
    model.save_pretrained(folder, safe_serialization=True)


# ---- architecture twins ---------------------------------------------------------------------------
# Chat templates: the hub repositories' templates (chat_template.json / tokenizer_config.json), with
# the same output for the messages the workbench sends. Sources, read through public copies:
# * llava-hf/llava-1.5-7b-hf chat_template.json, as quoted in openvinotoolkit/openvino.genai's
#   chat_template_fallback_map ("llava-1.5, llava-v1.6-vicuna (chat_template.json)"): roles upper-cased,
#   images first as "<image>\n", no role line for a system message, answers end with a space (no </s>).
# * HuggingFaceTB/SmolVLM-256M-Instruct chat_template.json, as in transformers'
#   tests/models/smolvlm/test_processing_smolvlm.py: "<|im_start|>" then "User:<image>..." with
#   "<end_of_utterance>\n" after each turn. Text and images are read from list content only: a
#   message whose content is a plain string renders as an empty turn (so the family sends lists).
# * Qwen/Qwen2.5-VL-3B-Instruct chat_template.json: ChatML with a default system prompt and
#   "<|vision_start|><|image_pad|><|vision_end|>" per image.
# * meta-llama/Llama-3.2-11B-Vision-Instruct (tokenizer_config.json; the tool-calling branches are
#   left out): BOS, header tokens, a system block with the date only when there is no image, and
#   raise_exception("Prompting with images is incompatible with system messages.") otherwise.
LLAVA15_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{# Render all text next #}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}"
    "{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
SMOLVLM_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}"
    "{% if line['type'] == 'text' %}{{line['text']}}{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}"
    "{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
QWEN25_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MLLAMA_CHAT_TEMPLATE = (
    "{{- bos_token }}\n"
    "{%- if not date_string is defined %}\n"
    "    {%- if strftime_now is defined %}\n"
    "        {%- set date_string = strftime_now(\"%d %b %Y\") %}\n"
    "    {%- else %}\n"
    "        {%- set date_string = \"26 Jul 2024\" %}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- set system_message = messages[0]['content']|trim %}\n"
    "    {%- set messages = messages[1:] %}\n"
    "{%- else %}\n"
    "    {%- set system_message = \"\" %}\n"
    "{%- endif %}\n"
    "{% set image_ns = namespace(has_images=false) %}\n"
    "{%- for message in messages %}\n"
    "    {%- for content in message['content'] %}\n"
    "        {%- if content['type'] == 'image' %}\n"
    "            {%- set image_ns.has_images = true %}\n"
    "        {%- endif %}\n"
    "    {%- endfor %}\n"
    "{%- endfor %}\n"
    "{%- if image_ns.has_images and not system_message == \"\" %}\n"
    "    {{- raise_exception(\"Prompting with images is incompatible with system messages.\") }}\n"
    "{%- endif %}\n"
    "{%- if not image_ns.has_images %}\n"
    "    {{- \"<|start_header_id|>system<|end_header_id|>\\n\\n\" }}\n"
    "    {{- \"Cutting Knowledge Date: December 2023\\n\" }}\n"
    "    {{- \"Today Date: \" + date_string + \"\\n\\n\" }}\n"
    "    {{- system_message }}\n"
    "    {{- \"<|eot_id|>\" }}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}\n"
    "    {%- if message['content'] is string %}\n"
    "        {{- message['content'] }}\n"
    "    {%- else %}\n"
    "        {%- for content in message['content'] %}\n"
    "            {%- if content['type'] == 'image' %}\n"
    "                {{- '<|image|>' }}\n"
    "            {%- elif content['type'] == 'text' %}\n"
    "                {{- content['text'] }}\n"
    "            {%- endif %}\n"
    "        {%- endfor %}\n"
    "    {%- endif %}\n"
    "    {{- '<|eot_id|>' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
    "{%- endif %}\n"
)
# Text the twins' tokenizers are trained on besides models.offline.CORPUS: the templates' own words.
TEMPLATE_WORDS = ["USER: ASSISTANT: User: Assistant: system user assistant", "You are a helpful assistant.",
                  "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"]


def _image_processor_class(name: str):
    """The PIL version of the image processor class the hub repository names (no torchvision needed).

    It saves ``image_processor_type`` as ``name``, so loading picks the backend exactly as it does for
    the hub repository; and the twin's files are the same with or without torchvision.
    """
    import transformers

    return getattr(transformers, f"{name}Pil")


def _train_bpe(pre_tokenizer, specials: list[str], normalizer=None, vocab_size: int = 400,
               alphabet: list[str] | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) of a BPE trained on the offline corpus with ``pre_tokenizer``; deterministic.

    ``specials`` take the first ids, in order (as the hub tokenizers' ``<unk>``, ``<s>``... do).
    """
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from models.offline import CORPUS

    bpe = Tokenizer(models.BPE())
    if normalizer is not None:
        bpe.normalizer = normalizer
    bpe.pre_tokenizer = pre_tokenizer
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=alphabet if alphabet is not None
                                  else pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator((CORPUS + TEMPLATE_WORDS) * 4, trainer=trainer)
    model = json.loads(bpe.to_str())["model"]
    return model["vocab"], [tuple(pair) for pair in model["merges"]]


def _add_special(tokenizer, tokens) -> None:
    from tokenizers import AddedToken

    tokenizer.add_tokens([AddedToken(token, special=True, normalized=False) for token in tokens],
                         special_tokens=True)


def _padded_vocab(tokenizer, multiple: int = 64) -> int:
    """Embedding rows: the tokenizer's size rounded up, as the hub checkpoints pad theirs."""
    return -(-len(tokenizer) // multiple) * multiple


def _open_gates(model) -> None:
    """Give zero-initialised tanh gates a trained-like value, so that every part reaches the output.

    Mllama initialises its cross-attention and tile gates to 0 (tanh(0) = 0): a random twin would
    then ignore the image entirely. Trained checkpoints have non-zero gates.
    """
    import torch

    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.rsplit(".", 1)[-1].endswith("gate") and parameter.numel() == 1:
                parameter.fill_(0.8)


def _save_twin(folder: Path, model, processor) -> None:
    """Processor (one processor_config.json with the image processor inside, the tokenizer files and
    chat_template.jinja) and model, as ``save_pretrained`` writes them."""
    processor.save_pretrained(folder)
    model.save_pretrained(folder, safe_serialization=True)


def _build_llava15(folder: Path) -> None:
    """llava-hf/llava-1.5-7b-hf in miniature.

    As in the hub repo: a Llama tokenizer (SentencePiece-style BPE with byte fallback, BOS added)
    with ``<image>`` and ``<pad>`` added after the vocabulary; a CLIP image processor that resizes the
    shortest edge and centre-crops; ``num_additional_image_tokens=1`` (the CLS token), the "default"
    feature strategy (CLS dropped, second-to-last layer); a 2-layer MLP projector.
    """
    from tokenizers import pre_tokenizers
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlamaTokenizer,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    from models.offline import seeded

    byte_tokens = [f"<0x{value:02X}>" for value in range(256)]
    vocab, merges = _train_bpe(pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first"),
                               ["<unk>", "<s>", "</s>", *byte_tokens], vocab_size=700, alphabet=[])
    tokenizer = LlamaTokenizer(vocab=vocab, merges=merges, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                               add_bos_token=True, add_eos_token=False, legacy=False, model_max_length=4096)
    _add_special(tokenizer, ["<image>", "<pad>"])
    tokenizer.pad_token = "<pad>"
    image_processor = _image_processor_class("CLIPImageProcessor")(
        size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}, resample=3, do_center_crop=True,
        image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711])
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=7,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               image_token="<image>", chat_template=LLAVA15_CHAT_TEMPLATE)
    ids = tokenizer.convert_tokens_to_ids
    seeded()
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=28, patch_size=7, projection_dim=32, hidden_act="quick_gelu")
    text = LlamaConfig(vocab_size=_padded_vocab(tokenizer), hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                       max_position_embeddings=4096, rms_norm_eps=1e-5, bos_token_id=ids("<s>"),
                       eos_token_id=ids("</s>"), pad_token_id=ids("<pad>"), tie_word_embeddings=False)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=ids("<image>"),
                         projector_hidden_act="gelu", vision_feature_select_strategy="default",
                         vision_feature_layer=-2, pad_token_id=ids("<pad>"), tie_word_embeddings=False)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.bos_token_id = ids("<s>")
    model.generation_config.eos_token_id = ids("</s>")
    model.generation_config.pad_token_id = ids("<pad>")
    _save_twin(folder, model, processor)


# SmolVLM's tokens after SmolLM2's vocabulary, in the hub repo's order.
SMOLVLM_ADDED_TOKENS = ("<fake_token_around_image>", "<global-img>",
                        *(f"<row_{row}_col_{col}>" for row in range(1, 7) for col in range(1, 7)),
                        "<image>", "<end_of_utterance>")


def _build_idefics3(folder: Path) -> None:
    """HuggingFaceTB/SmolVLM-256M-Instruct (an Idefics3) in miniature.

    As in the hub repo: SmolLM2's byte-level GPT-2 tokenizer (no BOS added; the template starts with
    ``<|im_start|>``); image splitting into tiles of ``max_image_size`` after resizing the longest edge
    to ``size`` (4 tiles across, plus the global image), a pixel-shuffle connector with
    ``scale_factor`` 4, so ``image_seq_len`` = (tile / patch)^2 / 4^2 tokens per tile; generation stops
    at ``<end_of_utterance>``. Tiles are 64 px here (512 in the hub repo), 4 tokens each (64 there).
    """
    from tokenizers import pre_tokenizers
    from transformers import GPT2Tokenizer, Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor

    from models.offline import seeded

    tile, patch, scale = 64, 8, 4
    image_seq_len = (tile // patch) ** 2 // scale ** 2
    vocab, merges = _train_bpe(pre_tokenizers.ByteLevel(add_prefix_space=False),
                               ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tokenizer = GPT2Tokenizer(vocab=vocab, merges=merges, unk_token="<|endoftext|>", bos_token="<|im_start|>",
                              eos_token="<|im_end|>", pad_token="<|im_end|>", add_prefix_space=False,
                              model_max_length=8192)
    _add_special(tokenizer, SMOLVLM_ADDED_TOKENS)
    image_processor = _image_processor_class("Idefics3ImageProcessor")(
        size={"longest_edge": 4 * tile}, max_image_size={"longest_edge": tile}, do_image_splitting=True,
        resample=1, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=image_seq_len,
                                  chat_template=SMOLVLM_CHAT_TEMPLATE)
    ids = tokenizer.convert_tokens_to_ids
    seeded()
    config = Idefics3Config(
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "image_size": tile, "patch_size": patch},
        text_config={"model_type": "llama", "vocab_size": _padded_vocab(tokenizer), "hidden_size": 64,
                     "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                     "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 8192,
                     "rope_theta": 100000.0, "rms_norm_eps": 1e-5, "bos_token_id": ids("<|im_start|>"),
                     "eos_token_id": ids("<|im_end|>"), "pad_token_id": ids("<|im_end|>"),
                     "tie_word_embeddings": False},
        scale_factor=scale, image_token_id=ids("<image>"), tie_word_embeddings=False)
    model = Idefics3ForConditionalGeneration(config)
    model.generation_config.bos_token_id = ids("<|im_start|>")
    model.generation_config.eos_token_id = ids("<end_of_utterance>")
    model.generation_config.pad_token_id = ids("<|im_end|>")
    _save_twin(folder, model, processor)


# Qwen2.5's added tokens after the BPE vocabulary, in the hub repo's order (special ones first).
QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                       "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                       "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
QWEN_PLAIN_TOKENS = ("<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
                     "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>")


def _build_qwen2_5_vl(folder: Path) -> None:
    """Qwen/Qwen2.5-VL-3B-Instruct in miniature.

    As in the hub repo: Qwen2's byte-level BPE (no BOS) with its added tokens; the image processor
    keeps the native resolution between ``min_pixels`` and ``max_pixels`` in 14-px patches merged
    2x2 (one token per 28x28 pixels); a vision tower with window attention and full-attention
    blocks; M-RoPE sections in the text model; the sampling defaults of its generation_config.json.
    """
    from tokenizers import AddedToken, Regex, normalizers, pre_tokenizers
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2Tokenizer,
        Qwen2VLVideoProcessor,
    )
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    from models.offline import seeded

    vocab, merges = _train_bpe(pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]), [], normalizer=normalizers.NFC())
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, bos_token=None, eos_token="<|im_end|>",
                               pad_token="<|endoftext|>", errors="replace", model_max_length=131072,
                               split_special_tokens=False)
    _add_special(tokenizer, QWEN_SPECIAL_TOKENS)
    tokenizer.add_tokens([AddedToken(token, special=False, normalized=False) for token in QWEN_PLAIN_TOKENS])
    image_processor = _image_processor_class("Qwen2VLImageProcessor")(
        min_pixels=3136, max_pixels=12845056, patch_size=14, temporal_patch_size=2, merge_size=2,
        image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711])
    try:  # the processor needs a video processor, and that one needs torchvision
        video_processor = Qwen2VLVideoProcessor(min_pixels=3136, max_pixels=12845056, patch_size=14,
                                                temporal_patch_size=2, merge_size=2)
        processor = Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                        video_processor=video_processor, chat_template=QWEN25_VL_CHAT_TEMPLATE)
    except ImportError:
        processor = None
    ids = tokenizer.convert_tokens_to_ids
    end_of_text, im_end = ids("<|endoftext|>"), ids("<|im_end|>")
    seeded()
    config = Qwen2_5_VLConfig(
        vision_config={"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 4, "in_channels": 3,
                       "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
                       "out_hidden_size": 64, "fullatt_block_indexes": [1], "hidden_act": "silu"},
        text_config={"vocab_size": _padded_vocab(tokenizer), "hidden_size": 64, "intermediate_size": 128,
                     "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                     "max_position_embeddings": 128000, "rms_norm_eps": 1e-6, "hidden_act": "silu",
                     "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
                     "bos_token_id": end_of_text, "eos_token_id": im_end, "tie_word_embeddings": True},
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=True)
    model = Qwen2_5_VLForConditionalGeneration(config)
    generation = model.generation_config
    generation.bos_token_id, generation.pad_token_id, generation.eos_token_id = end_of_text, end_of_text, [
        im_end, end_of_text]
    generation.do_sample, generation.temperature, generation.top_p, generation.top_k = True, 0.1, 0.001, 1
    generation.repetition_penalty = 1.05
    if processor is not None:
        _save_twin(folder, model, processor)
        return
    _save_qwen_processor_files(folder, image_processor, tokenizer)
    model.save_pretrained(folder, safe_serialization=True)


# Qwen2VLVideoProcessor's settings that its saved config adds to the image processor's (transformers 5.23).
QWEN_VIDEO_SETTINGS = {"do_sample_frames": False, "max_frames": 768, "max_video_tokens": 128000, "min_frames": 4,
                       "return_metadata": False, "video_processor_type": "Qwen2VLVideoProcessor"}


def _save_qwen_processor_files(folder: Path, image_processor, tokenizer) -> None:
    """The files ``Qwen2_5_VLProcessor.save_pretrained`` writes, on a machine without torchvision.

    There the processor cannot be made (its video processor needs torchvision), nor loaded: ``load``
    then says what to install. The twin's files are the same either way, so the cache can be shared.
    """
    import json

    tokenizer._set_processor_class("Qwen2_5_VLProcessor")
    tokenizer.save_pretrained(folder)
    (folder / "chat_template.jinja").write_text(QWEN25_VL_CHAT_TEMPLATE, encoding="utf-8")
    image = image_processor.to_dict()
    video = {key: value for key, value in image.items() if key != "image_processor_type"}
    video.update(QWEN_VIDEO_SETTINGS)
    processor = {"image_processor": image, "processor_class": "Qwen2_5_VLProcessor", "video_processor": video}
    (folder / "processor_config.json").write_text(json.dumps(processor, indent=2, sort_keys=True) + "\n",
                                                  encoding="utf-8")


# Llama 3's reserved tokens that the Vision-Instruct template and processor use.
MLLAMA_SPECIAL_TOKENS = ("<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>", "<|start_header_id|>",
                         "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>")
LLAMA3_PRETOKENIZE_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                            r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _build_mllama(folder: Path) -> None:
    """meta-llama/Llama-3.2-11B-Vision-Instruct (Mllama) in miniature.

    As in the hub repo: a Llama 3 byte-level BPE wrapped as PreTrainedTokenizerFast that adds
    ``<|begin_of_text|>`` (the template writes it too; the processor must not add a second one),
    ``<|image|>`` after the vocabulary; an image processor that fits the image on a canvas of up to
    4 tiles and returns aspect-ratio ids and masks; a vision encoder with gated global layers whose
    intermediate layers are concatenated; cross-attention layers inside the text model that read
    the image; generation stops at ``<|eot_id|>``, ``<|eom_id|>`` or ``<|end_of_text|>``.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import MllamaConfig, MllamaForConditionalGeneration, MllamaProcessor, PreTrainedTokenizerFast

    from models.offline import seeded

    tile, patch = 32, 8
    vocab, merges = _train_bpe(pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)]), [])
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    backend.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    from tokenizers import AddedToken

    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in MLLAMA_SPECIAL_TOKENS])
    bos = backend.token_to_id("<|begin_of_text|>")
    backend.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", bos)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|begin_of_text|>",
                                        eos_token="<|eot_id|>", pad_token="<|finetune_right_pad_id|>",
                                        model_max_length=131072, clean_up_tokenization_spaces=False)
    _add_special(tokenizer, ["<|image|>"])
    image_processor = _image_processor_class("MllamaImageProcessor")(
        size={"height": tile, "width": tile}, max_image_tiles=4, resample=2, do_pad=True,
        image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711])
    processor = MllamaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                chat_template=MLLAMA_CHAT_TEMPLATE)
    ids = tokenizer.convert_tokens_to_ids
    seeded()
    config = MllamaConfig(
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_global_layers": 1,
                       "attention_heads": 4, "image_size": tile, "patch_size": patch, "max_num_tiles": 4,
                       "intermediate_layers_indices": [0], "vision_output_dim": 32},
        text_config={"vocab_size": ids("<|image|>"), "hidden_size": 64, "intermediate_size": 128,
                     "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
                     "cross_attention_layers": [1], "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
                     "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                         "original_max_position_embeddings": 8192},
                     "bos_token_id": bos, "eos_token_id": ids("<|eot_id|>"),
                     "pad_token_id": ids("<|finetune_right_pad_id|>"), "tie_word_embeddings": False},
        image_token_index=ids("<|image|>"))
    model = MllamaForConditionalGeneration(config)
    _open_gates(model)
    generation = model.generation_config
    generation.bos_token_id, generation.pad_token_id = bos, ids("<|finetune_right_pad_id|>")
    generation.eos_token_id = [ids("<|end_of_text|>"), ids("<|eom_id|>"), ids("<|eot_id|>")]
    generation.do_sample, generation.temperature, generation.top_p = True, 0.6, 0.9
    _save_twin(folder, model, processor)


# ---- prompts -----------------------------------------------------------------------------------

def build_messages(question: str, history: list[dict], system_prompt: str = "", model_type: str = "") -> list[dict]:
    """Chat-template messages: the image goes with the first user turn, later turns are text.

    Every content is a list of parts: the llava-1.5 and SmolVLM templates read text only from parts
    and render a plain-string content as an empty turn. For ``SYSTEM_PROMPT_IN_USER_TURN`` model
    types the system prompt opens the first user turn, since their templates refuse it with an image.
    """
    system = system_prompt.strip() if system_prompt else ""
    fold = bool(system) and model_type in SYSTEM_PROMPT_IN_USER_TURN
    messages = []
    if system and not fold:
        messages.append({"role": "system", "content": [{"type": "text", "text": system}]})
    turns = history + [{"role": "user", "content": question}]
    first_user = next(i for i, turn in enumerate(turns) if turn["role"] == "user")
    for index, turn in enumerate(turns):
        parts = [{"type": "text", "text": turn["content"]}]
        if index == first_user:
            if fold:
                parts[0]["text"] = f"{system}\n\n{turn['content']}"
            parts.insert(0, {"type": "image"})
        messages.append({"role": turn["role"], "content": parts})
    return messages


def encode(handle: VLMHandle, image, question: str, params: GenerationParams, history: list[dict] | None = None,
           system_prompt: str = "", limits: Limits | None = None) -> tuple[dict, list[str], GenerationParams]:
    """Processor inputs for one question; drops the oldest follow-up turns when the context is full.

    Returns the inputs (on the model's device, pixels in the model's dtype), notices for the user,
    and the sampling settings, with max_new_tokens lowered if the answer would overflow the context.
    """
    limits = limits or Limits()
    question = check_text("question", question, limits.text_chars,
                          empty_message="Type a question about the image first.")
    history = check_messages(history, limits)
    image, notices = fit_image(image, handle.max_image_pixels)
    system_prompt = check_text("system_prompt", system_prompt, limits.text_chars, required=False)
    context = handle.context_length
    # Room kept for the answer while trimming history; a huge max_new_tokens must not drop everything.
    budget = max(context - params.max_new_tokens, context // 2)
    # Keep the first exchange (it carries the image); drop follow-ups from the oldest, each counted once.
    keep_head = 2 if len(history) >= 2 else len(history)
    head = history[:keep_head]
    tail = history[keep_head:]
    tail = tail[_first_kept(handle, image, question, head, tail, system_prompt, budget):]
    for attempt in range(MAX_RECHECKS + 1):
        inputs = _process(handle, image, build_messages(question, head + tail, system_prompt,
                                                         handle.model_type))
        length = int(inputs["input_ids"].shape[-1])
        if length <= budget or not tail:
            break
        tail = tail[2:] if attempt < MAX_RECHECKS - 1 else []  # bounded re-checks: the last drops them all
    left_out = len(history) - keep_head - len(tail)
    if left_out:
        notices.append(f"Left out {left_out:,} earlier message{'s' if left_out != 1 else ''} to fit the "
                       f"{context}-token context.")
    if length >= context:
        raise TooLarge(f"The question and image take {length} tokens; {handle.spec_id} reads at most {context} "
                       "tokens, answer included. Shorten the question or start a new conversation.")
    if length + params.max_new_tokens > context:
        params = dataclasses.replace(params, max_new_tokens=context - length)
        notices.append(f"Max new tokens lowered to {params.max_new_tokens} to fit the {context}-token context.")
    model = handle.model
    dtype = getattr(model, "dtype", None)
    moved = {}
    for key, value in inputs.items():
        if hasattr(value, "to"):
            value = value.to(model.device)
            if dtype is not None and key in PIXEL_INPUTS and value.is_floating_point():
                value = value.to(dtype)
        moved[key] = value
    return moved, notices, params


def _process(handle: VLMHandle, image, messages: list[dict]) -> dict:
    import jinja2

    try:
        prompt = handle.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except jinja2.TemplateError as exc:
        raise InvalidRequest(f"{handle.spec_id}'s chat template refuses this conversation: {str(exc)[:200]}") from None
    # A template that writes the BOS itself (Llama 3.2 Vision, Idefics3-Llama) must not get a second one
    # from the tokenizer; the others (llava-1.5) rely on the tokenizer for it. transformers'
    # apply_chat_template(tokenize=True) decides the same way.
    bos = getattr(handle.tokenizer, "bos_token", None)
    special = {"add_special_tokens": False} if bos and prompt.startswith(bos) else {}
    return handle.processor(images=[image], text=prompt, return_tensors="pt", **special)


def _first_kept(handle: VLMHandle, image, question: str, head: list[dict], tail: list[dict], system_prompt: str,
                budget: int) -> int:
    """Index in ``tail`` of the oldest follow-up to keep so that the prompt fits ``budget`` (an estimate).

    Each follow-up's tokens are counted once, newest first (one tokenizer call), plus the template's
    tokens around a message, measured once on a probe exchange; the processor runs twice, whatever
    the length of the conversation. Kept follow-ups start at a user message.
    """
    if not tail:
        return 0
    kind = handle.model_type
    bare = int(_process(handle, image, build_messages(question, head, system_prompt, kind))["input_ids"].shape[-1])
    probe = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    with_probe = int(_process(handle, image, build_messages(question, head + probe, system_prompt, kind)
                              )["input_ids"].shape[-1])
    counts = handle.tokenizer([m["content"] for m in probe + tail], add_special_tokens=False)["input_ids"]
    per_message = max(0.0, (with_probe - bare - len(counts[0]) - len(counts[1])) / 2)
    room, used, first = budget - bare, 0.0, len(tail)
    for index in range(len(tail) - 1, -1, -1):
        used += len(counts[index + 2]) + per_message
        if used > room:
            break
        if tail[index]["role"] == "user":
            first = index
    return first


def fit_image(image, max_pixels: int) -> tuple[object, list[str]]:
    """Downscale ``image`` to the model's pixel limit (keeping its aspect ratio), with a notice."""
    from PIL import Image

    if not isinstance(image, Image.Image):
        raise InvalidRequest(f"image must be a PIL image (see models.images.load_image), got {type(image).__name__}")
    if image.width * image.height <= max_pixels:
        return image, []
    scale = (max_pixels / (image.width * image.height)) ** 0.5
    size = (max(1, int(image.width * scale)), max(1, int(image.height * scale)))
    notice = f"Image downscaled from {image.width}x{image.height} to {size[0]}x{size[1]} for this model."
    return image.resize(size, Image.Resampling.LANCZOS), [notice]


# ---- answering ---------------------------------------------------------------------------------

def set_adapter(handle: VLMHandle, adapter_folder: Path | None) -> None:
    """Run the base model (None) or a LoRA adapter; loaded adapters stay next to the base weights."""
    from models.adapters import activate

    activate(handle.model, adapter_folder)


def generation_overrides(model, params: GenerationParams) -> dict:
    """``generate`` arguments that keep a checkpoint's generation_config.json from overriding the request.

    Qwen2.5-VL ships ``top_k: 1`` (with ``do_sample: true``): every sampled answer would be the greedy
    one whatever temperature and top_p the user chose. When sampling, the request's temperature and
    top_p decide alone.
    """
    config = getattr(model, "generation_config", None)
    if params.temperature > 0 and getattr(config, "top_k", None):
        return {"top_k": 0}
    return {}


def answer(handle: VLMHandle, image, question: str, params: GenerationParams, history: list[dict] | None = None,
           system_prompt: str = "", adapter_folder: Path | None = None, stop: threading.Event | None = None,
           stats: StreamStats | None = None, notices: list[str] | None = None) -> Iterator[str]:
    """Stream the answer (accumulated text) to ``question`` about ``image`` (an RGB PIL image).

    Args:
        handle: the loaded model.
        image: RGB ``PIL.Image`` (see models.images.load_image).
        question: the user's question.
        params: sampling settings.
        history: earlier turns about the same image, messages format with text content.
        system_prompt: optional system message.
        adapter_folder: a LoRA adapter folder, or None for the base model.
        stop: set it to end generation after the current token.
        stats: filled with token count and timing.
        notices: if given, receives notices about dropped turns.
    """
    if not handle.lock.acquire(timeout=BUSY_TIMEOUT):
        raise Busy(f"{handle.spec_id} is busy answering another request; try again shortly.")
    try:
        set_adapter(handle, adapter_folder)
        inputs, encode_notices, params = encode(handle, image, question, params, history, system_prompt)
        if notices is not None:
            notices.extend(encode_notices)
        inputs.update(generation_overrides(handle.model, params))
        yield from stream_generate(handle.model, handle.processor, inputs, params, stop=stop, stats=stats)
    finally:
        handle.lock.release()


def answer_text(handle: VLMHandle, image, question: str, params: GenerationParams, history: list[dict] | None = None,
                system_prompt: str = "", adapter_folder: Path | None = None) -> str:
    """The whole answer at once, without a streaming thread (the API path)."""
    import torch

    if not handle.lock.acquire(timeout=BUSY_TIMEOUT):
        raise Busy(f"{handle.spec_id} is busy answering another request; try again shortly.")
    try:
        set_adapter(handle, adapter_folder)
        inputs, _, params = encode(handle, image, question, params, history, system_prompt)
        tokenizer = handle.tokenizer
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        with torch.inference_mode():
            output = handle.model.generate(**inputs, **params.generate_kwargs(),
                                           **generation_overrides(handle.model, params), pad_token_id=pad)
        new_tokens = output[0, inputs["input_ids"].shape[-1]:]
        return tokenizer.decode(new_tokens, skip_special_tokens=True)
    finally:
        handle.lock.release()
