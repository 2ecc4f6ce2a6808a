"""Device detection and memory accounting: the only module that touches torch.cuda memory APIs.

torch is imported inside the functions, so importing this module costs nothing at start-up.
"""

from __future__ import annotations

import gc
import logging
import os
import sys

from models.errors import InvalidRequest

log = logging.getLogger(__name__)


def torch_loaded() -> bool:
    return "torch" in sys.modules


def resolve_device(requested: str) -> str:
    """Turn auto|cuda|cpu|mps into the device that will actually be used."""
    import torch

    if requested == "cuda" and not torch.cuda.is_available():
        raise InvalidRequest("--device cuda was requested but CUDA is not available on this machine")
    if requested == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise InvalidRequest("--device mps was requested but MPS is not available on this machine")
    if requested != "auto":
        return requested
    if torch.cuda.is_available():
        return "cuda"
    if hasattr(torch.backends, "mps") and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def cuda_allocated() -> int:
    """Bytes currently allocated by torch on CUDA, or 0 when CUDA is not in use."""
    if not torch_loaded():
        return 0
    import torch

    return int(torch.cuda.memory_allocated()) if torch.cuda.is_available() else 0


def module_bytes(obj: object) -> int:
    """Bytes held by the torch tensors reachable from a loaded-model handle.

    Looks at the handle itself and its attributes one level down (model, pipeline components,
    Coqui synthesizer); each storage is counted once even when modules share weights. A handle
    that holds no torch modules (an onnxruntime session) states its size in ``nbytes``.
    """
    declared = getattr(obj, "nbytes", 0)
    total = declared if isinstance(declared, int) else 0
    if not torch_loaded():
        return total
    seen: set[int] = set()
    for module in iter_modules(obj):
        for tensor in list(module.parameters()) + list(module.buffers()):
            if tensor.device.type == "meta":
                continue
            key = tensor.untyped_storage().data_ptr() if tensor.numel() else id(tensor)
            if key in seen:
                continue
            seen.add(key)
            total += tensor.untyped_storage().nbytes() if tensor.numel() else 0
    return total


def iter_modules(obj: object):
    """Yield the distinct torch modules a handle holds (itself, attributes, pipeline components)."""
    import torch

    seen: set[int] = set()
    candidates = [obj]
    for value in list(vars(obj).values()) if hasattr(obj, "__dict__") else []:
        candidates.append(value)
    components = getattr(obj, "components", None)
    if isinstance(components, dict):
        candidates.extend(components.values())
    for candidate in candidates:
        if isinstance(candidate, torch.nn.Module) and id(candidate) not in seen:
            seen.add(id(candidate))
            yield candidate
        elif candidate is not obj and hasattr(candidate, "components") and isinstance(candidate.components, dict):
            for component in candidate.components.values():
                if isinstance(component, torch.nn.Module) and id(component) not in seen:
                    seen.add(id(component))
                    yield component


def process_rss() -> int:
    """Resident set size of this process in bytes."""
    import psutil

    return int(psutil.Process(os.getpid()).memory_info().rss)


def free_device_memory() -> None:
    """Collect garbage and hand cached CUDA/MPS blocks back to the driver."""
    gc.collect()
    if not torch_loaded():
        return
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.ipc_collect()
    if hasattr(torch, "mps") and hasattr(torch.backends, "mps") and torch.backends.mps.is_available():
        torch.mps.empty_cache()
    _trim_malloc()


def _trim_malloc() -> None:
    """Ask glibc to return freed heap pages to the OS so RSS reflects an unload."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def device_summary() -> dict:
    """Total/free memory of the active accelerator, or of the machine for CPU."""
    import psutil

    vm = psutil.virtual_memory()
    summary = {"ram_total": int(vm.total), "ram_available": int(vm.available), "rss": process_rss()}
    if torch_loaded():
        import torch

        if torch.cuda.is_available():
            free, total = torch.cuda.mem_get_info()
            summary.update(cuda_total=int(total), cuda_free=int(free), cuda_allocated=cuda_allocated())
    return summary
