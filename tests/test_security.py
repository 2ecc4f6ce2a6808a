"""Secure defaults: local binding, auth that works and is never logged, upload limits, file access,
safe deserialization, no remote code, and ZeroGPU decoration."""

from __future__ import annotations

import ast
import sys
import types
from pathlib import Path

import httpx
import pytest
from conftest import ROOT, make_settings
from test_startup import app_env, running_app

PASSWORD = "s3cret-Pa55:with-colon"
OWN_CODE_DIRS = ("app.py", "models", "tabs", "finetune", "bench", "tests")


def own_python_files() -> list[Path]:
    files = []
    for name in OWN_CODE_DIRS:
        path = ROOT / name
        files += [path] if path.is_file() else sorted(path.rglob("*.py"))
    return files


def calls(tree: ast.AST):
    return (node for node in ast.walk(tree) if isinstance(node, ast.Call))


def keyword(call: ast.Call, name: str) -> ast.keyword | None:
    return next((kw for kw in call.keywords if kw.arg == name), None)


# ---- binding and auth ------------------------------------------------------------------------


def test_binds_localhost_unless_a_host_is_given(monkeypatch):
    import app
    from models.settings import settings_from_args

    for name in ("WORKBENCH_HOST", "GRADIO_SERVER_NAME", "WORKBENCH_SHARE", "WORKBENCH_AUTH"):
        monkeypatch.delenv(name, raising=False)
    settings = settings_from_args([])
    assert settings.host == "127.0.0.1" and not settings.share

    from models.catalog import Catalog
    from models.manager import ModelManager

    def Manager():  # noqa: N802 - a real manager: launch_kwargs hands it to /health and the /v1 routes
        return ModelManager(Catalog.load(), settings)

    kwargs = app.launch_kwargs(settings, Manager())
    assert kwargs["server_name"] == "127.0.0.1"
    assert kwargs["share"] is False and kwargs["auth"] is None
    assert app.launch_kwargs(settings_from_args(["--host", "0.0.0.0"]), Manager())["server_name"] == "0.0.0.0"


def test_open_binding_without_auth_warns(tmp_path):
    with running_app(["--offline", "--host", "0.0.0.0"], tmp_path) as app:
        app.wait_for_line("without --auth")
    assert "WARNING" in app.output and "anyone on the network" in app.output


def test_auth_is_required_and_never_logged(tmp_path):
    env = app_env(tmp_path, WORKBENCH_AUTH=f"ann:{PASSWORD}")
    with running_app(["--offline", "--host", "0.0.0.0"], tmp_path, env=env) as app:
        app.wait_until_ready()
        base = app.url
        with httpx.Client(base_url=base, timeout=10) as anonymous:
            assert anonymous.get("config").status_code == 401
            assert anonymous.get("gradio_api/info").status_code == 401
            wrong = anonymous.post("login", data={"username": "ann", "password": "guess"})
            assert wrong.status_code == 400
        with httpx.Client(base_url=base, timeout=10) as user:
            assert user.post("login", data={"username": "ann", "password": PASSWORD}).status_code == 200
            assert user.get("config").status_code == 200
        assert app.get("/health")[0] == 200  # probes stay open for Spaces and containers
    assert "without --auth" not in app.output
    assert "auth on" in app.output
    assert PASSWORD not in app.output and "s3cret" not in app.output


# ---- uploads and file access -----------------------------------------------------------------


def test_upload_limit_comes_from_the_settings(tmp_path):
    import app
    from models.catalog import Catalog
    from models.manager import ModelManager

    settings = make_settings(tmp_path, max_upload_mb=7)
    kwargs = app.launch_kwargs(settings, ModelManager(Catalog.load(), settings))
    assert kwargs["max_file_size"] == "7mb"
    # at most the folder of generated outputs, never the cache, the models or the working directory
    assert set(kwargs["allowed_paths"]) <= {str(settings.outputs_dir)}


def test_cache_files_other_than_outputs_are_not_served(app_server):
    url, _, settings = app_server
    secret = settings.adapters_dir / "private-adapter" / "adapter_config.json"
    secret.parent.mkdir(parents=True, exist_ok=True)
    secret.write_text('{"secret": "adapter"}')
    response = httpx.get(f"{url}gradio_api/file={secret}", timeout=10)
    assert response.status_code in (403, 404) and "secret" not in response.text


def test_oversize_upload_is_rejected(app_server):
    url, _, settings = app_server
    limit = settings.max_upload_mb * 1024**2
    with httpx.Client(base_url=url, timeout=60) as http:
        small = http.post("gradio_api/upload", files={"files": ("small.txt", b"hello")})
        assert small.status_code == 200, small.text
        big = http.post("gradio_api/upload", files={"files": ("big.bin", b"\0" * (limit + 1024**2))})
        assert big.status_code == 413, big.text
        assert "size" in big.text.lower()


@pytest.mark.parametrize("path", ["/etc/passwd", str(ROOT / "app.py"), str(ROOT / "models" / "catalog.yaml")])
def test_files_outside_the_app_are_not_served(app_server, path):
    url = app_server[0]
    response = httpx.get(f"{url}gradio_api/file={path}", timeout=10)
    assert response.status_code in (403, 404), f"{path} was served"
    assert "root:" not in response.text


# ---- code that deserializes or runs remote code ----------------------------------------------


def test_torch_load_always_uses_weights_only():
    offenders = []
    for path in own_python_files():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for call in calls(tree):
            func = call.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            owner = getattr(func.value, "id", "") if isinstance(func, ast.Attribute) else ""
            if name == "load" and owner == "torch":
                flag = keyword(call, "weights_only")
                if flag is None or not (isinstance(flag.value, ast.Constant) and flag.value.value is True):
                    offenders.append(f"{path.relative_to(ROOT)}:{call.lineno}")
    assert offenders == [], f"torch.load without weights_only=True: {offenders}"


def test_trust_remote_code_only_from_the_catalog(catalog):
    offenders = []
    for path in own_python_files():
        if path.name == "test_security.py":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for call in calls(tree):
            flag = keyword(call, "trust_remote_code")
            if flag is not None and isinstance(flag.value, ast.Constant) and flag.value.value is not False:
                offenders.append(f"{path.relative_to(ROOT)}:{call.lineno}")
    assert offenders == [], f"trust_remote_code hard-coded on: {offenders}"
    assert [spec.id for spec in catalog if spec.trust_remote_code] == []


def test_no_pickle_or_eval_of_user_data():
    offenders = []
    for path in own_python_files():
        if path.name == "test_security.py":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for call in calls(tree):
            func = call.func
            if isinstance(func, ast.Name) and func.id in ("eval", "exec"):
                offenders.append(f"{path.relative_to(ROOT)}:{call.lineno} {func.id}")
            if isinstance(func, ast.Attribute) and getattr(func.value, "id", "") == "pickle" and func.attr == "load":
                offenders.append(f"{path.relative_to(ROOT)}:{call.lineno} pickle.load")
            if isinstance(func, ast.Attribute) and getattr(func.value, "id", "") == "yaml" and func.attr == "load":
                offenders.append(f"{path.relative_to(ROOT)}:{call.lineno} yaml.load (use safe_load)")
    assert offenders == []


# ---- Hugging Face Spaces (ZeroGPU) -----------------------------------------------------------


def fake_spaces_module(record: list):
    module = types.ModuleType("spaces")

    def GPU(duration=60):  # noqa: N802 - the real decorator's name
        def decorate(func):
            def wrapped(*args, **kwargs):
                return func(*args, **kwargs)
            wrapped.zero_gpu_duration = duration
            wrapped.__wrapped__ = func
            record.append(getattr(func, "__qualname__", repr(func)))
            return wrapped
        return decorate

    module.GPU = GPU
    return module


def test_gpu_decorator_is_a_no_op_without_spaces(monkeypatch):
    from tabs.common import gpu

    monkeypatch.setitem(sys.modules, "spaces", None)  # makes `import spaces` raise ImportError

    def answer(x):
        return x + 1

    assert gpu(answer) is answer
    assert gpu(duration=120)(answer) is answer


def test_gpu_decorator_uses_spaces_gpu_on_zerogpu(monkeypatch):
    from tabs.common import gpu

    record: list = []
    monkeypatch.setitem(sys.modules, "spaces", fake_spaces_module(record))

    def answer(x):
        return x + 1

    decorated = gpu(answer)
    assert decorated is not answer and decorated(1) == 2 and decorated.zero_gpu_duration == 60
    assert gpu(duration=120)(answer).zero_gpu_duration == 120
    assert len(record) == 2


MODEL_TABS = ("vqa", "text_to_image", "voice")


def test_model_tabs_decorate_their_handlers_on_zerogpu(monkeypatch, tmp_path, catalog):
    """With a `spaces` module present, every event of a model tab that runs in the GPU queue is wrapped
    in spaces.GPU (ZeroGPU gives a GPU only inside such a call)."""
    import importlib

    import gradio as gr

    from models.manager import ModelManager

    settings = make_settings(tmp_path)
    for tab in MODEL_TABS:
        module = importlib.import_module(f"tabs.{tab}")
        monkeypatch.setitem(sys.modules, "spaces", fake_spaces_module([]))
        try:
            importlib.reload(module)
            with gr.Blocks() as demo:
                module.build(ModelManager(catalog, settings), settings)
        finally:
            monkeypatch.delitem(sys.modules, "spaces")
            importlib.reload(module)
        gpu_events = [fn for fn in demo.fns.values() if fn.concurrency_id == "gpu"]
        assert gpu_events, f"tabs/{tab}.py has no event in the GPU queue"
        unwrapped = [fn.name for fn in gpu_events if not hasattr(fn.fn, "zero_gpu_duration")]
        assert unwrapped == [], f"tabs/{tab}.py: GPU-queue events not wrapped in spaces.GPU: {unwrapped}"
