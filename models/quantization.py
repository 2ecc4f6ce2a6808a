"""Precision and bitsandbytes configs, chosen per device.

CUDA: language and vision-language models in 4-bit NF4 (double quantization, bf16 compute) by
default, 8-bit or full precision on request; diffusion in fp16, 4-bit optional. CPU: fp32.
MPS: fp16 where supported. bitsandbytes 4/8-bit also runs on CPU (used by the QLoRA tests).
"""

from __future__ import annotations

import dataclasses

from models.errors import InvalidRequest

BNB_QUANTS = ("nf4", "int8")


@dataclasses.dataclass(frozen=True)
class Precision:
    """What a family needs to load a model at one precision."""

    name: str  # nf4 | int8 | fp16 | bf16 | fp32
    device: str

    @property
    def is_bnb(self) -> bool:
        return self.name in BNB_QUANTS

    def torch_dtype(self):
        import torch

        if self.name == "fp16":
            return torch.float16
        if self.name in ("bf16", "nf4"):
            # nf4 keeps non-quantized layers in bf16 on CUDA, fp32 elsewhere
            return torch.bfloat16 if self.device == "cuda" else torch.float32
        if self.name == "int8":
            return torch.float16 if self.device == "cuda" else torch.float32
        return torch.float32


def choose(spec, device: str, requested: str | None = None) -> Precision:
    """Pick the precision for a spec on a device; ``requested`` overrides the catalog default."""
    name = requested or spec.default_quant(device)
    if name in BNB_QUANTS and device == "mps":
        raise InvalidRequest(f"{name} needs bitsandbytes, which does not support MPS; choose fp16 or fp32")
    if name in ("fp16", "bf16") and device == "cpu":
        name = "fp32"  # half-precision matmuls are slow or missing on CPU
    if name in BNB_QUANTS and spec.family in ("asr", "tts", "piper", "remote"):
        raise InvalidRequest(f"{spec.id}: {spec.family} models are not quantized; choose fp16 or fp32")
    return Precision(name=name, device=device)


def bnb_config(precision: Precision):
    """transformers BitsAndBytesConfig for nf4/int8, or None."""
    if not precision.is_bnb:
        return None
    import torch
    from transformers import BitsAndBytesConfig

    if precision.name == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = torch.bfloat16 if precision.device == "cuda" else torch.float32
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute,
    )


def transformers_kwargs(precision: Precision) -> dict:
    """Keyword arguments for ``from_pretrained`` of a transformers model."""
    kwargs: dict = {"dtype": precision.torch_dtype()}
    config = bnb_config(precision)
    if config is not None:
        kwargs["quantization_config"] = config
        kwargs["device_map"] = {"": 0} if precision.device == "cuda" else precision.device
    return kwargs


def fit_4bit_for_cpu(model, training: bool = False) -> int:
    """Keep bitsandbytes from repacking 4-bit layers where repacking breaks; returns how many were kept.

    On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks a ``Linear4bit`` weight at its first eval
    forward. That fails ("shape '[32, 0]' is invalid") when the layer's input is narrower than the
    quantization block (64), as in tiny models; and a layer repacked during an evaluation then
    breaks the training steps after it (an in-place bias add on a leaf that requires grad). So
    training keeps every layer unpacked, and inference the narrow ones. Unpacked layers compute
    the same result, only slower on that CPU kind.
    """
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return 0
    kept = 0
    for module in model.modules():
        if isinstance(module, Linear4bit) and getattr(module, "support_avx512bf16_for_cpu", False):
            state = module.weight.quant_state
            blocksize = getattr(state, "blocksize", 64) if state is not None else 64
            if training or module.in_features % blocksize:
                module.support_avx512bf16_for_cpu = False
                kept += 1
    return kept


def diffusers_kwargs(precision: Precision) -> dict:
    """Keyword arguments for a diffusers pipeline: fp16, or 4-bit through PipelineQuantizationConfig."""
    kwargs: dict = {"dtype": precision.torch_dtype()}  # diffusers 0.42 deprecates torch_dtype
    if precision.name == "nf4":
        import torch
        from diffusers.quantizers import PipelineQuantizationConfig

        kwargs["quantization_config"] = PipelineQuantizationConfig(
            quant_backend="bitsandbytes_4bit",
            quant_kwargs={
                "load_in_4bit": True,
                "bnb_4bit_quant_type": "nf4",
                "bnb_4bit_compute_dtype": torch.bfloat16 if precision.device == "cuda" else torch.float32,
            },
            components_to_quantize=["unet", "transformer", "text_encoder_2"],
        )
    elif precision.name == "int8":
        raise InvalidRequest("int8 is not offered for diffusion pipelines; choose nf4, fp16 or fp32")
    return kwargs
