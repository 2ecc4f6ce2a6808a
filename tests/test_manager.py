"""ModelManager contract: lazy loads, one load per model, LRU under a budget, pins, clean failures, leaks.

The bookkeeping tests inject a fake family (loader/measure/releaser); the last tests load, evict and
unload real tiny models through the real families.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
import weakref
from collections import Counter

import pytest
from conftest import MODELS_DIR, make_settings

from models.catalog import Catalog, ModelSpec
from models.manager import BudgetBusyError, ModelBusyError, ModelLoadError, ModelManager, ModelTooLargeError

MB = 1024**2
BUDGET_MB = 300


def fake_spec(model_id: str, megabytes: float) -> ModelSpec:
    """A spec whose fp32 estimate is about ``megabytes`` (estimate = params x 4 bytes x 1.1)."""
    return ModelSpec(id=model_id, task="chat", family="chat", source="offline", params_b=megabytes * MB / 4.4e9)


class FakeModel:
    """Stands in for a loaded model: weak-referenceable, with a known size."""

    def __init__(self, model_id: str, nbytes: int):
        self.model_id = model_id
        self.nbytes = nbytes


class FakeFamily:
    """Loader/releaser/measure for the manager, recording what it was asked to do."""

    def __init__(self, sizes_mb: dict[str, float], delay: float = 0.0, fail: dict[str, Exception] | None = None):
        self.sizes_mb = sizes_mb
        self.delay = delay
        self.fail = fail or {}
        self.loads: Counter = Counter()
        self.released: list[str] = []
        self.half_built: list[weakref.ref] = []
        self._lock = threading.Lock()

    def load(self, spec, precision, settings):
        with self._lock:
            self.loads[spec.id] += 1
        time.sleep(self.delay)
        model = FakeModel(spec.id, int(self.sizes_mb[spec.id] * MB))
        if spec.id in self.fail:
            self.half_built.append(weakref.ref(model))
            error = self.fail[spec.id]
            raise type(error)(*error.args)  # a fresh exception: a reused one would keep its old traceback
        return model

    def release(self, spec, handle):
        self.released.append(spec.id)

    @staticmethod
    def measure(handle) -> int:
        return handle.nbytes


def fake_manager(tmp_path, family: FakeFamily, estimates_mb: dict[str, float] | None = None,
                 budget_mb: float = BUDGET_MB) -> ModelManager:
    estimates = {**family.sizes_mb, **(estimates_mb or {})}
    catalog = Catalog([fake_spec(model_id, mb) for model_id, mb in estimates.items()])
    settings = make_settings(tmp_path, memory_budget_gb=budget_mb / 1024)
    manager = ModelManager(catalog, settings, loader=family.load, releaser=family.release, measure=family.measure)
    manager._device = "cpu"  # keep the bookkeeping tests free of torch device probing
    return manager


def use_once(manager: ModelManager, model_id: str) -> None:
    with manager.use(model_id):
        pass
    time.sleep(0.002)  # distinct last-used times for the LRU order


def assert_clean(manager: ModelManager) -> None:
    """Nothing reserved, nothing pinned, and the accounting matches what is loaded."""
    assert manager._reserved == {}
    assert all(not m["pinned"] for m in manager.snapshot())
    assert manager.used_bytes() == sum(m["bytes"] for m in manager.snapshot())
    assert manager.used_bytes() <= manager.budget


# ---- bookkeeping with a fake family ----------------------------------------------------------


def test_nothing_loads_until_asked(tmp_path):
    family = FakeFamily({"a": 100})
    manager = fake_manager(tmp_path, family)
    assert manager.snapshot() == [] and manager.used_bytes() == 0 and not family.loads
    with manager.use("a") as handle:
        assert handle.model_id == "a"
        assert manager.is_loaded("a") and manager.snapshot()[0]["pinned"]
    with manager.use("a") as again:
        assert again is handle
    assert family.loads["a"] == 1 and manager.load_count == {"a": 1}
    assert manager.used_bytes() == 100 * MB
    assert_clean(manager)


def test_concurrent_requests_load_once(tmp_path):
    family = FakeFamily({"a": 100}, delay=0.3)
    manager = fake_manager(tmp_path, family)
    start = threading.Barrier(8)
    handles, errors = [], []

    def worker():
        start.wait()
        try:
            with manager.use("a") as handle:
                handles.append(handle)
                time.sleep(0.01)
        except Exception as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert errors == []
    assert family.loads["a"] == 1
    assert len(handles) == 8 and all(h is handles[0] for h in handles)
    assert_clean(manager)


class MeetingFamily(FakeFamily):
    """Each load waits until the other model's load has started too: it only ends if loads overlap."""

    def __init__(self, sizes_mb: dict[str, float]):
        super().__init__(sizes_mb)
        self.both_loading = threading.Barrier(len(sizes_mb), timeout=5)

    def load(self, spec, precision, settings):
        self.both_loading.wait()  # BrokenBarrierError (a failed load) if the other load cannot start
        return super().load(spec, precision, settings)


def test_concurrent_requests_for_different_models_load_in_parallel(tmp_path):
    family = MeetingFamily({"a": 50, "b": 50})
    manager = fake_manager(tmp_path, family)
    errors = []

    def worker(model_id):
        try:
            use_once(manager, model_id)
        except Exception as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(mid,)) for mid in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert errors == []  # one per-model lock each, not one global lock: both loads were running at once
    assert family.loads == Counter({"a": 1, "b": 1})
    assert_clean(manager)


def test_least_recently_used_is_evicted_first(tmp_path):
    family = FakeFamily({"a": 120, "b": 120, "c": 120})
    manager = fake_manager(tmp_path, family)
    use_once(manager, "a")
    use_once(manager, "b")
    use_once(manager, "a")  # a is now more recent than b
    use_once(manager, "c")
    assert [m["id"] for m in manager.snapshot()] == ["c", "a"]
    assert family.released == ["b"]
    use_once(manager, "b")  # evicts a, the least recently used now
    assert [m["id"] for m in manager.snapshot()] == ["b", "c"]
    assert family.released == ["b", "a"]
    assert_clean(manager)


def test_budget_is_respected_over_a_long_sequence(tmp_path):
    sizes = {"a": 90, "b": 140, "c": 60, "d": 200, "e": 30}
    family = FakeFamily(sizes)
    manager = fake_manager(tmp_path, family)
    for model_id in "abcdeabdcedaebcadbec":
        use_once(manager, model_id)
        assert manager.used_bytes() <= manager.budget
        assert manager.is_loaded(model_id)
    assert sum(family.loads.values()) - len(family.released) == len(manager.snapshot())
    assert_clean(manager)


def test_pinned_models_are_never_evicted(tmp_path):
    family = FakeFamily({"a": 120, "b": 120, "c": 120, "d": 120})
    manager = fake_manager(tmp_path, family)
    with manager.use("a"):
        use_once(manager, "b")
        time.sleep(0.01)
        use_once(manager, "c")  # a is the oldest but pinned: b goes
        assert manager.is_loaded("a") and not manager.is_loaded("b") and manager.is_loaded("c")
        with manager.use("c"):
            with pytest.raises(BudgetBusyError, match="in use \\((a, c|c, a)\\)"):
                with manager.use("d"):
                    pass
            assert manager.is_loaded("a") and manager.is_loaded("c") and not manager.is_loaded("d")
            assert manager.unload_all() == []  # both in use: nothing may go
    assert family.loads["d"] == 0
    assert_clean(manager)
    use_once(manager, "d")  # the pins are gone, so now it fits
    assert manager.is_loaded("d")


def test_model_larger_than_budget_is_refused_before_loading(tmp_path):
    family = FakeFamily({"small": 10, "huge": 400})
    manager = fake_manager(tmp_path, family)
    use_once(manager, "small")
    with pytest.raises(ModelTooLargeError, match="more than the whole memory budget.*--memory-budget"):
        with manager.use("huge"):
            pass
    assert family.loads["huge"] == 0
    assert manager.is_loaded("small")  # nothing was evicted for a hopeless load
    assert_clean(manager)


def test_budget_messages_give_real_numbers_for_small_budgets(tmp_path):
    family = FakeFamily({"a": 10})
    manager = fake_manager(tmp_path, family, budget_mb=1.024)  # --memory-budget 0.001
    with pytest.raises(ModelTooLargeError) as excinfo:
        with manager.use("a"):
            pass
    message = str(excinfo.value)
    assert "needs about 10.0 MB, more than the whole memory budget of 1.0 MB" in message, message
    assert "0.00 GB" not in message


def test_model_measured_larger_than_its_estimate_is_given_up(tmp_path):
    family = FakeFamily({"liar": 400})
    manager = fake_manager(tmp_path, family, estimates_mb={"liar": 10})
    with pytest.raises(ModelTooLargeError, match="once loaded"):
        with manager.use("liar"):
            pass
    assert family.loads["liar"] == 1 and family.released == ["liar"]
    assert not manager.is_loaded("liar") and manager.used_bytes() == 0
    assert_clean(manager)


def test_failing_load_leaves_a_clean_state(tmp_path):
    family = FakeFamily({"ok": 100, "broken": 100}, fail={"broken": RuntimeError("weights are corrupt")})
    manager = fake_manager(tmp_path, family)
    use_once(manager, "ok")
    with pytest.raises(ModelLoadError, match="Could not load broken: weights are corrupt") as excinfo:
        with manager.use("broken"):
            pass
    del excinfo  # the traceback holds the loader's frame
    gc.collect()
    assert not manager.is_loaded("broken")
    assert manager.used_bytes() == 100 * MB  # the reservation for broken was given back
    assert all(ref() is None for ref in family.half_built)  # the half-built model was freed
    assert_clean(manager)
    family.fail.clear()
    use_once(manager, "broken")  # the per-model lock was not left held
    assert manager.is_loaded("broken")


def test_user_errors_from_a_load_pass_through_unchanged(tmp_path):
    family = FakeFamily({"a": 10}, fail={"a": ValueError("a is not cached; run `hf download a`")})
    manager = fake_manager(tmp_path, family)
    with pytest.raises(ValueError, match="hf download") as excinfo:
        with manager.use("a"):
            pass
    assert not isinstance(excinfo.value, ModelLoadError)
    assert_clean(manager)


def test_unload_is_idempotent(tmp_path):
    family = FakeFamily({"a": 100, "b": 100})
    manager = fake_manager(tmp_path, family)
    assert manager.unload("a") is False  # never loaded
    use_once(manager, "a")
    use_once(manager, "b")
    assert manager.unload("a") is True
    assert manager.unload("a") is False
    assert family.released == ["a"]
    assert manager.unload_all() == ["b"]
    assert manager.unload_all() == []
    assert manager.used_bytes() == 0 and manager.snapshot() == []
    assert family.released == ["a", "b"]


def test_unload_refuses_a_model_in_use(tmp_path):
    family = FakeFamily({"a": 100})
    manager = fake_manager(tmp_path, family)
    with manager.use("a"):
        with pytest.raises(ModelBusyError, match="answering a request"):
            manager.unload("a")
        assert manager.is_loaded("a")
    assert manager.unload("a") is True


def test_a_failing_release_hook_does_not_stop_the_unload(tmp_path, caplog):
    family = FakeFamily({"a": 100})
    manager = fake_manager(tmp_path, family)

    def broken_release(spec, handle):
        raise RuntimeError("hook exploded")

    manager._releaser = broken_release
    use_once(manager, "a")
    with caplog.at_level(logging.ERROR, logger="models.manager"):
        assert manager.unload("a") is True
    assert "releasing a raised" in caplog.text
    assert manager.used_bytes() == 0


def test_switching_precision_replaces_the_loaded_copy(tmp_path):
    family = FakeFamily({"a": 100})
    manager = fake_manager(tmp_path, family)
    with manager.use("a", quant="fp32"):
        pass
    with manager.use("a", quant="int8"):
        pass
    assert family.loads["a"] == 2 and family.released == ["a"]
    assert [m["precision"] for m in manager.snapshot()] == ["int8"]
    with manager.use("a"):  # no precision asked: whatever is loaded is fine
        pass
    assert family.loads["a"] == 2


def test_leak_warning_fires_on_a_leaked_reference(tmp_path, caplog):
    family = FakeFamily({"a": 100, "b": 100})
    manager = fake_manager(tmp_path, family)
    leaked = []
    with manager.use("a") as handle:
        leaked.append(handle)  # e.g. a closure or gr.State keeping the model alive
    use_once(manager, "b")
    with caplog.at_level(logging.INFO, logger="models.manager"):
        manager.unload("a")
        manager.unload("b")
    assert "Potential memory leak detected: a still holds memory after unload" in caplog.text
    assert "leak detected: b" not in caplog.text
    assert "unloaded b" in caplog.text
    assert manager.leaks == ["a"]


class FakeCuda:
    """A process-wide CUDA allocator on CPU: fake models add their bytes when loaded, give them back when released."""

    def __init__(self):
        self.allocated = 0

    def __call__(self) -> int:
        return self.allocated


class CudaFamily(FakeFamily):
    """A fake family whose models live on the fake CUDA; ``leak_ids`` keep their memory after a release."""

    def __init__(self, sizes_mb: dict[str, float], cuda: FakeCuda, leak_ids: tuple[str, ...] = (),
                 meet: threading.Barrier | None = None):
        super().__init__(sizes_mb)
        self.cuda = cuda
        self.leak_ids = leak_ids
        self.meet = meet  # when given, a load returns only once every load has allocated its memory

    def load(self, spec, precision, settings):
        assert precision.device == "cuda"
        model = super().load(spec, precision, settings)
        self.cuda.allocated += model.nbytes
        if self.meet is not None:
            self.meet.wait()
        return model

    def release(self, spec, handle):
        super().release(spec, handle)
        if spec.id not in self.leak_ids:  # a leak: e.g. a tensor cached outside the model
            self.cuda.allocated -= handle.nbytes


def cuda_manager(tmp_path, monkeypatch, leak_ids: tuple[str, ...] = (),
                 meet: threading.Barrier | None = None) -> tuple[ModelManager, FakeCuda]:
    cuda = FakeCuda()
    monkeypatch.setattr("models.memory.cuda_allocated", cuda)
    manager = fake_manager(tmp_path, CudaFamily({"a": 60, "b": 100}, cuda, leak_ids, meet))
    manager._device = "cuda"  # the precision says cuda, so every unload runs the CUDA check
    return manager, cuda


def test_cuda_check_does_not_blame_a_model_for_memory_another_model_holds(tmp_path, monkeypatch, caplog):
    manager, cuda = cuda_manager(tmp_path, monkeypatch)
    use_once(manager, "a")
    use_once(manager, "b")
    with caplog.at_level(logging.INFO, logger="models.manager"):
        manager.unload("a")  # b still holds its 100 MB: that is not a's leak
        assert manager.leaks == [] and "unloaded a" in caplog.text
        manager.unload("b")
    assert manager.leaks == [] and cuda.allocated == 0


def test_cuda_check_finds_a_leak_that_another_unload_would_hide(tmp_path, monkeypatch, caplog):
    manager, cuda = cuda_manager(tmp_path, monkeypatch, leak_ids=("a",))
    use_once(manager, "b")
    use_once(manager, "a")  # a's load starts with b's 100 MB already allocated
    with caplog.at_level(logging.WARNING, logger="models.manager"):
        manager.unload("b")  # gives back 100 MB: the total falls below what it was before a's load
        manager.unload("a")  # keeps its 60 MB
    assert manager.leaks == ["a"]
    assert "Potential memory leak detected: a still holds memory after unload (60.0 MB of its 60.0 MB" in caplog.text
    assert cuda.allocated == 60 * MB


def test_cuda_check_counts_only_its_own_bytes_when_two_models_load_at_once(tmp_path, monkeypatch):
    manager, cuda = cuda_manager(tmp_path, monkeypatch, meet=threading.Barrier(2, timeout=5))
    threads = [threading.Thread(target=use_once, args=(manager, mid)) for mid in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert manager.is_loaded("a") and manager.is_loaded("b")  # both loads saw the other's memory arrive
    manager.unload("a")
    manager.unload("b")
    assert manager.leaks == [] and cuda.allocated == 0


# ---- real tiny models through the real families ----------------------------------------------


def test_real_tiny_model_loads_measures_and_unloads(manager, caplog):
    from models.memory import module_bytes

    with manager.use("tiny-chat") as handle:
        model_ref = weakref.ref(handle.model)
        assert type(handle.model).__name__ == "LlamaForCausalLM"
        measured = module_bytes(handle)
    snapshot = manager.snapshot()
    assert snapshot[0]["id"] == "tiny-chat" and snapshot[0]["precision"] == "fp32"
    assert snapshot[0]["bytes"] == measured > 100_000
    del handle
    with caplog.at_level(logging.INFO, logger="models.manager"):
        assert manager.unload("tiny-chat") is True
    assert model_ref() is None, "the model object outlived its unload"
    assert manager.leaks == [] and "unloaded tiny-chat" in caplog.text
    assert manager.used_bytes() == 0


def test_real_concurrent_requests_load_once(manager):
    results = []

    def worker():
        with manager.use("tiny-chat") as handle:
            results.append(id(handle.model))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(results) == 4 and len(set(results)) == 1
    assert manager.load_count["tiny-chat"] == 1


def test_real_models_are_evicted_under_a_small_budget(tmp_path, manager):
    with manager.use("tiny-chat") as handle:  # builds the tiny model once and measures it
        tiny_bytes = manager.snapshot()[0]["bytes"]
    del handle
    manager.unload_all()
    twin = ModelSpec(id="tiny-chat-twin", task="chat", family="chat", source="local",
                     repo=str(MODELS_DIR / "tiny-chat"), params_b=0.0005)
    catalog = Catalog([*Catalog.load(), twin])
    budget = twin.estimate_bytes("fp32") + tiny_bytes // 2  # room for one, not both
    small = ModelManager(catalog, make_settings(tmp_path, memory_budget_gb=budget / 1024**3))
    with small.use("tiny-chat") as first:
        first_ref = weakref.ref(first.model)
    del first
    with small.use("tiny-chat-twin") as second:
        assert second.model.config.num_hidden_layers == 2
    del second
    assert [m["id"] for m in small.snapshot()] == ["tiny-chat-twin"]
    assert first_ref() is None and small.leaks == []
    assert small.used_bytes() <= small.budget
    assert small.unload_all() == ["tiny-chat-twin"]
    assert small.used_bytes() == 0 and small.leaks == []


def test_offline_hub_model_that_is_not_cached_says_what_to_do(manager):
    from models.families import ModelUnavailableError

    with pytest.raises(ModelUnavailableError, match="hf download Qwen/Qwen2.5-0.5B-Instruct") as excinfo:
        with manager.use("Qwen/Qwen2.5-0.5B-Instruct"):
            pass
    assert "offline" in str(excinfo.value) and "tiny-" in str(excinfo.value)
    assert manager.snapshot() == [] and manager._reserved == {}


OTHER_TINY = ["tiny-vlm", "tiny-sd", "tiny-whisper", "tiny-tts"]


@pytest.mark.parametrize("model_id", OTHER_TINY)
def test_other_tiny_models_load_and_unload_cleanly(manager, model_id):
    with manager.use(model_id):
        pass
    assert manager.snapshot()[0]["bytes"] > 0
    assert manager.unload(model_id) is True
    assert manager.leaks == [] and manager.used_bytes() == 0


@pytest.mark.gpu
@pytest.mark.parametrize("quant", ["nf4", "fp16"])
def test_cuda_memory_returns_to_baseline_after_unload(tmp_path, catalog, quant):
    import torch

    from models.manager import CUDA_LEAK_TOLERANCE

    manager = ModelManager(catalog, make_settings(tmp_path, device="cuda"))
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()
    with manager.use("smollm2-135m", quant=quant) as handle:
        assert next(handle.model.parameters()).device.type == "cuda"
        loaded = torch.cuda.memory_allocated()
        if quant == "nf4":
            assert any(type(m).__name__ == "Linear4bit" for m in handle.model.modules())
    del handle
    assert loaded - baseline > 20 * MB
    assert manager.snapshot()[0]["precision"] == quant and manager.snapshot()[0]["device"] == "cuda"
    manager.unload("smollm2-135m")
    assert torch.cuda.memory_allocated() - baseline <= CUDA_LEAK_TOLERANCE
    assert manager.leaks == []


@pytest.mark.gpu
def test_cuda_memory_comes_back_after_each_unload_with_models_interleaved(tmp_path, catalog):
    """tiny-chat (nf4) and tiny-sd (fp16) on CUDA, unloaded in load order and in reverse."""
    import torch

    from models.manager import CUDA_LEAK_TOLERANCE

    manager = ModelManager(catalog, make_settings(tmp_path, device="cuda"))
    warm = torch.ones(8, 8, device="cuda")
    (warm @ warm).sum().item()  # cuBLAS keeps its workspace allocated for good: take it before the baseline
    del warm
    for first, second in (("tiny-chat", "tiny-sd"), ("tiny-sd", "tiny-chat")):
        torch.cuda.synchronize()
        baseline = torch.cuda.memory_allocated()
        with manager.use(first, quant="nf4" if first == "tiny-chat" else "fp16"):
            pass
        with_first = torch.cuda.memory_allocated()
        with manager.use(second, quant="nf4" if second == "tiny-chat" else "fp16"):
            pass
        with_both = torch.cuda.memory_allocated()
        assert with_first > baseline and with_both > with_first
        assert {m["device"] for m in manager.snapshot()} == {"cuda"}
        manager.unload(first)
        assert abs(torch.cuda.memory_allocated() - (with_both - with_first) - baseline) <= CUDA_LEAK_TOLERANCE
        manager.unload(second)
        assert torch.cuda.memory_allocated() - baseline <= CUDA_LEAK_TOLERANCE
        assert manager.leaks == []


def test_tiny_vlm_in_4bit_answers_on_cpu(manager):
    """NF4 on CPU: bitsandbytes' AVX512-BF16 repacking is kept off the layers it cannot repack.

    tiny-vlm has 32-wide layers, narrower than a quantization block; on CPUs with AVX512-BF16 a
    repacked one fails at the first forward ("shape '[32, 0]' is invalid").
    """
    from bitsandbytes.nn import Linear4bit
    from PIL import Image

    from models.families import vlm
    from models.generation import GenerationParams

    with manager.use("tiny-vlm", "nf4") as handle:
        layers = [m for m in handle.model.modules() if isinstance(m, Linear4bit)]
        assert any(m.in_features % 64 for m in layers), "the twin no longer has narrow 4-bit layers"
        assert not [m for m in layers if m.support_avx512bf16_for_cpu and m.in_features % 64]
        answer = list(vlm.answer(handle, Image.new("RGB", (40, 40), "red"), "What colour?",
                                 GenerationParams(max_new_tokens=4, temperature=0.0)))
    assert answer and manager.snapshot()[0]["precision"] == "nf4"
