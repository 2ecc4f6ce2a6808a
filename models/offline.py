"""Helpers for building the project's tiny deterministic random-weight models.

The families' ``build_tiny`` functions use them; where the files come from, and building them once
into the cache, is ``models.sources``. This module imports neither.
"""

from __future__ import annotations

SEED = 1234

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
