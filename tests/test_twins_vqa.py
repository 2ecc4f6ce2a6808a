"""Every hub VQA entry of the catalog, run offline through its own architecture (issue #11).

``twin_catalog`` points each hub entry at its twin's folder (a tiny random model of the same model,
processor, image-processor and tokenizer classes), so asking ``HuggingFaceTB/SmolVLM-256M-Instruct``
through ``twin_manager`` runs exactly that entry's code: vlm.load, the shared loader, the family's
prompt, image and generation handling, the adapters, and the training process. One table, ``CASES``,
says what each architecture must look like; every test runs over all four.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
import shutil
import threading
import time
import zipfile
from pathlib import Path

import pytest
from helpers import save_lora
from PIL import Image

from models import vqa
from models.generation import GenerationParams

HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None
NEEDS_TORCHVISION = pytest.mark.skipif(
    not HAS_TORCHVISION, reason="Qwen2.5-VL's processor needs torchvision (its video processor imports it): "
                                "pip install torchvision==0.26.0 (see shared/ENVIRONMENT.md)")


@dataclasses.dataclass(frozen=True)
class Twin:
    """What a hub VQA entry must look like once loaded, and where LoRA may go."""

    hub: str
    twin: str
    model_type: str
    model_class: str
    processor_class: str
    image_processor: str  # the hub repo's class; without torchvision its PIL variant (name + "Pil")
    tokenizer_class: str  # as saved in tokenizer_config.json, like the hub repo's
    prompt: str  # the first turn with the image, as the chat template renders it
    image_marker: str  # where the image goes in the rendered prompt
    image_inputs: tuple[str, ...]  # what the processor adds to the ids for the model
    context_length: int
    pixel_limit: int  # pixels an image may have when it reaches the twin's processor
    language_model: str  # module prefix of the language model: the only place LoRA may go
    frozen: tuple[str, ...]  # module prefixes that must never get LoRA


SMOLVLM = Twin(
    hub="HuggingFaceTB/SmolVLM-256M-Instruct", twin="tiny-smolvlm", model_type="idefics3",
    model_class="Idefics3ForConditionalGeneration", processor_class="Idefics3Processor",
    image_processor="Idefics3ImageProcessor", tokenizer_class="GPT2Tokenizer",
    prompt="<|im_start|>User:<image>What is this?<end_of_utterance>\nAssistant:", image_marker="<image>",
    image_inputs=("pixel_values", "pixel_attention_mask"), context_length=8192, pixel_limit=256 * 256,
    language_model="model.text_model.", frozen=("model.vision_model.", "model.connector.", "lm_head"))
QWEN25_VL = Twin(
    hub="Qwen/Qwen2.5-VL-3B-Instruct", twin="tiny-qwen2.5-vl", model_type="qwen2_5_vl",
    model_class="Qwen2_5_VLForConditionalGeneration", processor_class="Qwen2_5_VLProcessor",
    image_processor="Qwen2VLImageProcessor", tokenizer_class="Qwen2Tokenizer",
    prompt="<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
           "<|vision_start|><|image_pad|><|vision_end|>What is this?<|im_end|>\n<|im_start|>assistant\n",
    image_marker="<|image_pad|>",
    image_inputs=("pixel_values", "image_grid_thw"), context_length=128000, pixel_limit=1024 * 28 * 28,
    language_model="model.language_model.", frozen=("model.visual.", "lm_head"))
LLAVA15 = Twin(
    hub="llava-hf/llava-1.5-7b-hf", twin="tiny-llava", model_type="llava",
    model_class="LlavaForConditionalGeneration", processor_class="LlavaProcessor",
    image_processor="CLIPImageProcessor", tokenizer_class="LlamaTokenizer",
    prompt="USER: <image>\nWhat is this? ASSISTANT:", image_marker="<image>", image_inputs=("pixel_values",),
    context_length=4096,
    pixel_limit=1024 * 1024, language_model="model.language_model.",
    frozen=("model.vision_tower.", "model.multi_modal_projector.", "lm_head"))
MLLAMA = Twin(
    hub="meta-llama/Llama-3.2-11B-Vision-Instruct", twin="tiny-mllama", model_type="mllama",
    model_class="MllamaForConditionalGeneration", processor_class="MllamaProcessor",
    image_processor="MllamaImageProcessor", tokenizer_class="TokenizersBackend",
    prompt="<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<|image|>What is this?<|eot_id|>"
           "<|start_header_id|>assistant<|end_header_id|>\n\n", image_marker="<|image|>",
    image_inputs=("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask", "cross_attention_mask"),
    context_length=131072, pixel_limit=4 * 32 * 32, language_model="model.language_model.",
    # layer 1 of the twin's text model is its cross-attention layer: the vision adapter stays frozen
    frozen=("model.vision_model.", "model.multi_modal_projector.", "model.language_model.layers.1.", "lm_head"))
CASES = [pytest.param(SMOLVLM, id="smolvlm"), pytest.param(QWEN25_VL, id="qwen2.5-vl", marks=NEEDS_TORCHVISION),
         pytest.param(LLAVA15, id="llava-1.5"), pytest.param(MLLAMA, id="mllama")]
GREEDY = {"max_new_tokens": 24, "temperature": 0.0}


@pytest.fixture
def settings(tmp_path):
    """conftest's settings with room for the hub entries' estimates (params_b of 0.3B to 11B at fp32):
    the manager checks the estimate before it loads; the twins themselves take a few MB."""
    from conftest import make_settings

    return make_settings(tmp_path, memory_budget_gb=64.0)


def picture(color=(200, 40, 40), size=(64, 48)) -> Image.Image:
    """A square on white, within every twin's pixel limit (Mllama's 4 tiles of 32 px: 4,096 pixels)."""
    image = Image.new("RGB", size, (255, 255, 255))
    image.paste(Image.new("RGB", (size[0] // 2, size[1] // 2), color), (size[0] // 4, size[1] // 4))
    return image


def request(catalog, settings, model, question="What is this?", image=None, **values):
    values = {**GREEDY, **values}
    return vqa.VqaRequest.build(catalog, settings, image=image if image is not None else picture(),
                                question=question, model=model, **values)


def assert_nothing_pinned(manager):
    assert all(not entry["pinned"] for entry in manager.snapshot()), manager.snapshot()


def generate_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == "generate" and thread.is_alive()]


def make_adapter(case: Twin, twin_catalog, settings, name: str = "twin-lora"):
    """A LoRA on the language model's attention (random, non-zero B: it changes answers), saved like the tab."""
    return save_lora(twin_catalog.get(case.hub).location, settings.adapters_dir, name, case.hub,
                     rf"^{re.escape(case.language_model)}.*\.(q_proj|v_proj|o_proj)$", vision=True)


class ProcessorSpy:
    """Stands in for a handle's processor and records the size of every image given to it."""

    def __init__(self, wrapped):
        self.wrapped = wrapped
        self.sizes: list[tuple[int, int]] = []

    def __call__(self, *args, images=None, **kwargs):
        self.sizes += [image.size for image in images or []]
        return self.wrapped(*args, images=images, **kwargs)

    def __getattr__(self, name):
        return getattr(self.wrapped, name)


# ---- the architecture, as loaded through the hub entry ---------------------------------------------

@pytest.mark.parametrize("case", CASES)
def test_hub_entry_loads_its_own_architecture(case, twin_catalog, twin_manager):
    spec = twin_catalog.get(case.hub)
    assert spec.source == "local" and spec.family == "vlm" and spec.twin == case.twin
    assert twin_catalog.get(case.twin).twin_of == case.hub
    with twin_manager.use(case.hub) as handle:
        assert type(handle.model).__name__ == case.model_class
        assert type(handle.processor).__name__ == case.processor_class
        assert type(handle.processor.image_processor).__name__ in (case.image_processor, f"{case.image_processor}Pil")
        saved = json.loads((Path(spec.location) / "tokenizer_config.json").read_text())
        assert saved["tokenizer_class"] == case.tokenizer_class
        assert handle.model_type == case.model_type
        assert handle.context_length == case.context_length
        assert handle.max_image_pixels == case.pixel_limit
        parameters = sum(p.numel() for p in handle.model.parameters())
        assert parameters < 2_000_000, f"the twin should stay tiny, has {parameters:,} parameters"


@pytest.mark.parametrize("case", CASES)
def test_prompt_image_tokens_and_pixels_reach_the_model(case, twin_manager):
    """The hub template's shape, one BOS at most, the image inputs the model needs, and pixels that matter."""
    import torch

    from models.families import vlm

    with twin_manager.use(case.hub) as handle:
        messages = vlm.build_messages("What is this?", [], "", handle.model_type)
        prompt = handle.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert prompt == case.prompt
        # a follow-up: every earlier turn and the system prompt are in it, the image once, in the first turn
        earlier = [{"role": "user", "content": "What is this?"}, {"role": "assistant", "content": "A red square."}]
        messages = vlm.build_messages("And its color?", earlier, "Be brief.", handle.model_type)
        prompt = handle.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert prompt.count(case.image_marker) == 1
        assert max(prompt.index("Be brief."), prompt.index(case.image_marker)) < prompt.index("What is this?") \
            < prompt.index("A red square.") < prompt.index("And its color?")
        params = GenerationParams(max_new_tokens=8, temperature=0.0)
        red, _, _ = vlm.encode(handle, picture((200, 40, 40)), "What is this?", params)
        blue, _, _ = vlm.encode(handle, picture((30, 60, 220), size=(48, 64)), "What is this?", params)
        assert set(case.image_inputs) <= set(red), sorted(red)
        ids = red["input_ids"][0].tolist()
        tokenizer = handle.tokenizer
        if tokenizer.bos_token_id is not None:
            assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id, ids[:4]
        assert tokenizer.convert_tokens_to_ids(case.image_marker) in ids
        with torch.inference_mode():
            logits = [handle.model(**inputs).logits[0, -1] for inputs in (red, blue)]
    assert not torch.allclose(*logits), "the image does not change the model's output"


# ---- answering --------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES)
def test_streamed_answer_then_a_follow_up_turn(case, twin_catalog, twin_manager, settings):
    texts, last = [], None  # texts read while streaming: the turn is one list, updated in place
    for last in vqa.chat_turn(twin_manager, request(twin_catalog, settings, case.hub, system_prompt="Be brief.")):
        texts.append(last[0][-1]["content"])
    history, _, notices = last
    assert len(set(texts)) >= 3, texts  # the empty turn, then the answer growing
    assert all(later.startswith(earlier) for earlier, later in zip(texts, texts[1:], strict=False))
    assert [m["role"] for m in history] == ["user", "assistant"] and history[-1]["content"]
    assert notices == []
    second = list(vqa.chat_turn(twin_manager, request(twin_catalog, settings, case.hub, "And its color?",
                                                      history=history, system_prompt="Be brief.")))[-1][0]
    assert [m["role"] for m in second] == ["user", "assistant"] * 2
    assert second[:2] == [{**m, "content": m["content"].strip()} for m in history]  # as the request keeps it
    assert second[-1]["content"]
    assert_nothing_pinned(twin_manager)


@pytest.mark.parametrize("case", CASES)
def test_stop_ends_generation_and_unpins(case, twin_catalog, twin_manager, settings):
    stop = threading.Event()
    # greedy: the twins' greedy answers run to max_new_tokens (a sampled one may draw the end token early)
    turns = vqa.chat_turn(twin_manager, request(twin_catalog, settings, case.hub, max_new_tokens=400), stop=stop)
    seen = [next(turns) for _ in range(3)]
    assert seen[-1][0][-1]["content"] and any(entry["pinned"] for entry in twin_manager.snapshot())
    stop.set()
    after = list(turns)  # the generator ends by itself once the current token is out
    assert len(after) <= 3, f"generation went on after Stop: {len(after)} more pieces"
    assert generate_threads() == []
    assert_nothing_pinned(twin_manager)
    del seen, after, turns
    assert twin_manager.unload_all() == [case.hub] and twin_manager.leaks == []


@pytest.mark.parametrize("case", CASES)
def test_sampling_follows_the_request_not_the_checkpoint(case, twin_manager):
    """Qwen2.5-VL's generation_config.json says top_k=1: sampling at temperature 1 must still vary."""
    import torch

    from models.families import vlm

    params = GenerationParams(max_new_tokens=16, temperature=1.0, top_p=1.0)
    answers = set()
    with twin_manager.use(case.hub) as handle:
        for seed in (1, 2, 3):
            torch.manual_seed(seed)
            answers.add(vlm.answer_text(handle, picture(), "What is this?", params))
    assert len(answers) > 1, answers


@pytest.mark.parametrize("case", CASES)
def test_adapter_compare_gives_base_and_adapter_answers(case, twin_catalog, twin_manager, settings):
    make_adapter(case, twin_catalog, settings)
    assert vqa.adapters_for(settings, case.hub) == ["none", "twin-lora"]
    plain = vqa.answer_once(twin_manager, request(twin_catalog, settings, case.hub))
    history, base, _ = list(vqa.chat_turn(twin_manager, request(twin_catalog, settings, case.hub,
                                                                adapter="twin-lora", compare=True)))[-1]
    assert base[-1]["content"] == plain
    assert history[-1]["content"] != plain
    assert vqa.answer_once(twin_manager, request(twin_catalog, settings, case.hub)) == plain  # back to the base
    assert_nothing_pinned(twin_manager)
    assert twin_manager.unload_all() == [case.hub] and twin_manager.leaks == []


# ---- images -----------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES)
def test_image_reaching_the_processor_respects_the_pixel_limit(case, twin_catalog, twin_manager, settings):
    large = picture(size=(1600, 1200))
    assert large.width * large.height > case.pixel_limit
    with twin_manager.use(case.hub) as handle:
        spy = ProcessorSpy(handle.processor)
        handle.processor = spy
        try:
            history, _, notices = list(vqa.chat_turn(twin_manager, request(twin_catalog, settings, case.hub,
                                                                           image=large, max_new_tokens=4)))[-1]
        finally:
            handle.processor = spy.wrapped
    assert spy.sizes and all(width * height <= case.pixel_limit for width, height in spy.sizes), spy.sizes
    assert max(width * height for width, height in spy.sizes) > case.pixel_limit * 0.9  # not shrunk further
    assert any("1600x1200" in note and "for this model" in note for note in notices), notices
    assert history[-1]["role"] == "assistant"


@pytest.mark.parametrize("case", CASES)
def test_an_image_far_larger_than_the_limit_still_answers(case, twin_catalog, twin_manager, settings):
    huge = Image.new("RGB", (4000, 3000), (20, 160, 60))
    started = time.perf_counter()
    answer = vqa.answer_once(twin_manager, request(twin_catalog, settings, case.hub, image=huge, max_new_tokens=8))
    assert answer and time.perf_counter() - started < 60


def test_pixel_limits_follow_the_hub_processors():
    """The limits the hub repos' processor settings give (PIL processors: no download, no torchvision)."""
    from transformers import (
        CLIPImageProcessorPil,
        Idefics3ImageProcessorPil,
        MllamaImageProcessorPil,
        Qwen2VLImageProcessorPil,
    )

    from models.families.vlm import image_pixel_limit

    smolvlm_256m = Idefics3ImageProcessorPil(size={"longest_edge": 2048}, max_image_size={"longest_edge": 512})
    assert image_pixel_limit("idefics3", smolvlm_256m) == 2048 * 2048
    qwen = Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=12845056, patch_size=14, merge_size=2)
    assert image_pixel_limit("qwen2_5_vl", qwen) == 1024 * 28 * 28  # 1,024 tokens, not the repo's 16,384
    small_qwen = Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=256 * 28 * 28, patch_size=14, merge_size=2)
    assert image_pixel_limit("qwen2_5_vl", small_qwen) == 256 * 28 * 28  # a processor's own lower bound wins
    mllama = MllamaImageProcessorPil(size={"height": 560, "width": 560}, max_image_tiles=4)
    assert image_pixel_limit("mllama", mllama) == 4 * 560 * 560
    llava = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    assert image_pixel_limit("llava", llava) == 1024 * 1024


# ---- what the family refuses ----------------------------------------------------------------------

def models_file_catalog(tmp_path, entry: dict):
    """The built-in catalog plus one entry from a --models-file, as the app reads it."""
    import yaml

    from models.catalog import Catalog

    path = tmp_path / "my-models.yaml"
    path.write_text(yaml.safe_dump({"models": [entry]}))
    return Catalog.load(path)


def test_a_text_only_model_offered_as_vqa_is_refused_clearly(tmp_path, settings):
    from models.catalog import Catalog
    from models.errors import InvalidRequest
    from models.families import resolve_location
    from models.manager import ModelManager

    folder = resolve_location(Catalog.load().get("tiny-chat"), settings)
    catalog = models_file_catalog(tmp_path, {"id": "my-text-model", "task": "vqa", "family": "vlm",
                                             "source": "local", "repo": str(folder)})
    manager = ModelManager(catalog, settings)
    with pytest.raises(InvalidRequest, match=r"my-text-model is not a vision-language model: .*'llama'.*cannot "
                                             r"read images"):
        vqa.answer_once(manager, request(catalog, settings, "my-text-model"))
    assert manager.snapshot() == [] and manager.leaks == []


def test_a_twin_folder_without_its_processor_files_is_refused_clearly(tmp_path, twin_catalog, settings):
    from models.errors import Unavailable
    from models.manager import ModelManager

    copy = tmp_path / "smolvlm-copy"
    shutil.copytree(twin_catalog.get(SMOLVLM.hub).location, copy,
                    ignore=shutil.ignore_patterns("preprocessor_config.json", "processor_config.json"))
    catalog = models_file_catalog(tmp_path, {"id": "my-smolvlm", "task": "vqa", "family": "vlm", "source": "local",
                                             "repo": str(copy)})
    manager = ModelManager(catalog, settings)
    with pytest.raises(Unavailable, match=r"my-smolvlm has no image processor in .*smolvlm-copy "
                                          r"\(preprocessor_config.json or processor_config.json is missing\)"):
        vqa.answer_once(manager, request(catalog, settings, "my-smolvlm"))
    assert manager.snapshot() == []


@pytest.mark.skipif(HAS_TORCHVISION, reason="checks the message shown where torchvision is missing")
def test_qwen_without_torchvision_says_what_to_install(twin_catalog, twin_manager, settings):
    from models.errors import Unavailable

    with pytest.raises(Unavailable, match=r"Qwen/Qwen2.5-VL-3B-Instruct's processor needs a package that is not "
                                          r"installed \(pip install torchvision==0.26.0\)"):
        vqa.answer_once(twin_manager, request(twin_catalog, settings, QWEN25_VL.hub))


# ---- QLoRA on each architecture, through the training process ---------------------------------------

@pytest.mark.parametrize("case", CASES)
def test_training_rows_label_the_answer_and_batch_every_image_input(case, tmp_path, twin_catalog):
    """What the training process feeds the model: the answer's tokens as labels (not an empty turn), and
    all the processor's image inputs batched for two images of different shapes, for a finite loss."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from finetune import data
    from finetune.train import Collator

    write_color_dataset(tmp_path)
    examples = data.parse_dataset(tmp_path / "colors.jsonl").examples[:2]
    location = twin_catalog.get(case.hub).location
    processor = AutoProcessor.from_pretrained(location)
    items = data.encode_all(examples, processor, 512, is_vlm=True)
    for item, color in zip(items, ("red", "blue"), strict=True):
        answer = [token for token, label in zip(item["input_ids"], item["labels"], strict=True) if label != -100]
        assert processor.tokenizer.decode(answer, skip_special_tokens=True).strip() == f"It is {color}."
        assert set(case.image_inputs) <= set(item["image_inputs"])
    tokenizer = processor.tokenizer
    batch = Collator(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)(items)
    assert set(case.image_inputs) <= set(batch) and batch["input_ids"].shape[0] == 2
    model = AutoModelForImageTextToText.from_pretrained(location)
    loss = model(**batch).loss
    assert torch.isfinite(loss) and loss > 0

def write_color_dataset(folder):
    """A zipped VQA dataset: three coloured squares of different shapes (so the tile counts differ)."""
    (folder / "imgs").mkdir(parents=True, exist_ok=True)
    rows = []
    for index, (color, name, size) in enumerate([((255, 0, 0), "red", (40, 40)), ((0, 0, 255), "blue", (90, 30)),
                                                 ((0, 200, 0), "green", (30, 70))]):
        Image.new("RGB", size, color).save(folder / "imgs" / f"{index}.png")
        rows.append({"image": f"imgs/{index}.png", "question": "What color is this?", "answer": f"It is {name}."})
    (folder / "colors.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    dataset = folder / "colors.zip"
    with zipfile.ZipFile(dataset, "w") as bundle:
        for path in [folder / "colors.jsonl", *sorted((folder / "imgs").iterdir())]:
            bundle.write(path, path.relative_to(folder))
    return dataset


def wait_until_finished(runner, run_id, timeout=240):
    from finetune.runner import ACTIVE_STATES

    deadline = time.time() + timeout
    while time.time() < deadline:
        status = runner.status(run_id)
        if status["state"] not in ACTIVE_STATES:
            return status
        time.sleep(0.25)
    raise AssertionError(f"the run did not finish in {timeout}s: {json.dumps(status)[:2000]}")


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_qlora_two_steps_on_the_twin_then_the_adapter_answers(case, tmp_path, twin_catalog, twin_manager, settings):
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForImageTextToText

    from finetune.runner import TrainingRunner
    from models import adapters

    runner = TrainingRunner(settings, twin_manager)
    config = {"base_model": case.twin, "adapter_name": "colors", "quantization": "nf4", "max_steps": 2,
              "batch_size": 2, "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "learning_rate": 5e-2,
              "scheduler": "constant", "gradient_checkpointing": True, "val_fraction": 0.0, "max_length": 512}
    try:
        run_id = runner.start(str(write_color_dataset(tmp_path / "data")), config)
        status = wait_until_finished(runner, run_id)
    finally:
        if runner.active_run():
            runner.kill()
    assert status["state"] == "completed", status["message"] + "\n" + "\n".join(status["log_tail"])
    assert status["step"] == 2 and len(status["loss_history"]) == 2
    assert all(point["loss"] == point["loss"] and point["loss"] > 0 for point in status["loss_history"])

    # LoRA went to the language model's linear layers only: by the saved pattern, and by the saved weights
    folder = adapters.resolve(settings.adapters_dir, "colors", case.twin)
    pattern = json.loads((folder / "adapter_config.json").read_text())["target_modules"]
    model = AutoModelForImageTextToText.from_pretrained(twin_catalog.get(case.hub).location)  # the twin folder
    targeted = [name for name, module in model.named_modules()
                if isinstance(module, torch.nn.Linear) and re.fullmatch(pattern, name)]
    linear_in_lm = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)
                    and name.startswith(case.language_model) and not name.startswith(case.frozen)]
    assert targeted == linear_in_lm, set(targeted) ^ set(linear_in_lm)
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as weights:
        modules = {key.removeprefix("base_model.model.").split(".lora_")[0] for key in weights.keys()}
    assert modules == set(linear_in_lm)
    del model

    # the adapter loads on the twin in the VQA path: compare gives both answers, and it changes the output
    history, base, _ = list(vqa.chat_turn(twin_manager, request(twin_catalog, settings, case.twin,
                                                                "What color is this?", adapter="colors",
                                                                compare=True, max_new_tokens=8)))[-1]
    assert base[-1]["role"] == history[-1]["role"] == "assistant"
    from models.families import vlm

    with twin_manager.use(case.twin) as handle:
        inputs, _, _ = vlm.encode(handle, picture(), "What color is this?", GenerationParams(max_new_tokens=4))
        with torch.inference_mode():
            adapters.activate(handle.model, None)
            plain = handle.model(**inputs).logits
            adapters.activate(handle.model, folder)
            tuned = handle.model(**inputs).logits
            adapters.activate(handle.model, None)
    assert not torch.allclose(plain, tuned)
    assert_nothing_pinned(twin_manager)


# ---- CUDA (skipped without a GPU) -----------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES)
def test_twin_in_nf4_on_cuda_answers_and_gives_its_memory_back(case, tmp_path, twin_catalog):
    import gc

    import torch
    from bitsandbytes.nn import Linear4bit
    from conftest import make_settings

    from models.manager import ModelManager

    settings = make_settings(tmp_path, device="cuda", memory_budget_gb=64.0)
    manager = ModelManager(twin_catalog, settings)

    def load_answer_unload() -> int:
        with manager.use(case.hub, "nf4") as handle:
            assert any(isinstance(module, Linear4bit) for module in handle.model.modules())
            assert next(handle.model.parameters()).device.type == "cuda"
            loaded = torch.cuda.memory_allocated()
        answer = vqa.answer_once(manager, request(twin_catalog, settings, case.hub, max_new_tokens=8))
        assert answer and manager.snapshot()[0]["precision"] == "nf4"
        assert manager.unload_all() == [case.hub] and manager.leaks == []
        gc.collect()
        torch.cuda.empty_cache()
        return loaded

    load_answer_unload()  # the first CUDA use keeps process-wide buffers (cuBLAS workspace): not the model's
    baseline = torch.cuda.memory_allocated()
    assert load_answer_unload() > baseline
    assert torch.cuda.memory_allocated() == baseline
