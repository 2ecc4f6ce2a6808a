"""Settings from flags and environment variables; auth parsing; secrets stay out of reprs."""

from __future__ import annotations

from pathlib import Path

import pytest

from models.settings import Settings, parse_auth, settings_from_args, with_hub_probe

ENV_VARS = ("WORKBENCH_HOST", "GRADIO_SERVER_NAME", "WORKBENCH_PORT", "GRADIO_SERVER_PORT", "WORKBENCH_SHARE",
            "WORKBENCH_AUTH", "WORKBENCH_MEMORY_BUDGET", "WORKBENCH_DEVICE", "WORKBENCH_OFFLINE",
            "WORKBENCH_CACHE_DIR", "WORKBENCH_MODELS_FILE", "WORKBENCH_MAX_UPLOAD_MB", "WORKBENCH_MODELS_DIR",
            "HF_HUB_OFFLINE")


@pytest.fixture
def clean_env(monkeypatch):
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.usefixtures("clean_env")
def test_defaults_are_local_and_conservative():
    settings = settings_from_args([])
    assert settings.host == "127.0.0.1"
    assert settings.port == 7860
    assert settings.share is False
    assert settings.auth is None
    assert settings.memory_budget_gb == 8.0
    assert settings.device == "auto"
    assert settings.offline is False and settings.offline_reason == ""
    assert settings.max_upload_mb == 50
    assert settings.cache_dir == Path(".cache").resolve()
    assert settings.offline_models_dir == settings.cache_dir / "offline-models"


@pytest.mark.usefixtures("clean_env")
def test_flags(tmp_path):
    models_file = tmp_path / "extra.yaml"
    settings = settings_from_args([
        "--host", "0.0.0.0", "--port", "9000", "--share", "--auth", "ann:pw", "--memory-budget", "2.5",
        "--device", "cpu", "--offline", "--cache-dir", str(tmp_path), "--models-file", str(models_file),
        "--max-upload-mb", "7",
    ])
    assert (settings.host, settings.port, settings.share) == ("0.0.0.0", 9000, True)
    assert settings.auth == ("ann", "pw")
    assert settings.memory_budget_bytes == int(2.5 * 1024**3)
    assert settings.device == "cpu"
    assert settings.offline and settings.offline_reason == "--offline was given"
    assert settings.cache_dir == tmp_path.resolve()
    assert settings.adapters_dir == tmp_path.resolve() / "adapters"
    assert settings.runs_dir == tmp_path.resolve() / "runs"
    assert settings.outputs_dir == tmp_path.resolve() / "outputs"
    assert settings.models_file == models_file
    assert settings.max_upload_mb == 7


def test_environment_variables(clean_env, tmp_path):
    env = {"WORKBENCH_HOST": "10.0.0.5", "WORKBENCH_PORT": "8123", "WORKBENCH_SHARE": "yes",
           "WORKBENCH_AUTH": "bob:a:b:c", "WORKBENCH_MEMORY_BUDGET": "3", "WORKBENCH_DEVICE": "cpu",
           "WORKBENCH_OFFLINE": "true", "WORKBENCH_CACHE_DIR": str(tmp_path), "WORKBENCH_MAX_UPLOAD_MB": "12",
           "WORKBENCH_MODELS_DIR": str(tmp_path / "models")}
    for name, value in env.items():
        clean_env.setenv(name, value)
    settings = settings_from_args([])
    assert (settings.host, settings.port, settings.share) == ("10.0.0.5", 8123, True)
    assert settings.auth == ("bob", "a:b:c")  # the password may contain colons
    assert settings.memory_budget_gb == 3.0
    assert settings.offline and settings.max_upload_mb == 12
    assert settings.offline_models_dir == (tmp_path / "models").resolve()


def test_flags_win_over_environment(clean_env):
    clean_env.setenv("WORKBENCH_PORT", "8123")
    clean_env.setenv("WORKBENCH_HOST", "10.0.0.5")
    settings = settings_from_args(["--port", "9001", "--host", "127.0.0.1"])
    assert (settings.host, settings.port) == ("127.0.0.1", 9001)


def test_spaces_variables_are_honoured(clean_env):
    clean_env.setenv("GRADIO_SERVER_NAME", "0.0.0.0")
    clean_env.setenv("GRADIO_SERVER_PORT", "7861")
    settings = settings_from_args([])
    assert (settings.host, settings.port) == ("0.0.0.0", 7861)
    clean_env.setenv("WORKBENCH_HOST", "127.0.0.1")  # the workbench's own variable wins
    assert settings_from_args([]).host == "127.0.0.1"


def test_hf_hub_offline_implies_offline(clean_env):
    clean_env.setenv("HF_HUB_OFFLINE", "1")
    settings = settings_from_args([])
    assert settings.offline and "HF_HUB_OFFLINE" in settings.offline_reason


def test_hub_probe_marks_unreachable_hub_offline(clean_env):
    clean_env.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens there
    settings = with_hub_probe(settings_from_args([]), timeout=0.5)
    assert settings.offline and "cannot be reached" in settings.offline_reason
    already = Settings(offline=True, offline_reason="--offline was given")
    assert with_hub_probe(already) is already  # no probe when already offline


@pytest.mark.parametrize("value, expected", [
    ("ann:pw", ("ann", "pw")),
    ("ann:p:w", ("ann", "p:w")),
    ("", None),
    (None, None),
])
def test_parse_auth(value, expected):
    assert parse_auth(value) == expected


@pytest.mark.parametrize("value", ["annpw", ":pw", "ann:", ":"])
def test_parse_auth_rejects_malformed(value):
    with pytest.raises(ValueError, match="user:password"):
        parse_auth(value)


@pytest.mark.usefixtures("clean_env")
def test_bad_budget_is_refused():
    with pytest.raises(SystemExit, match="memory-budget"):
        settings_from_args(["--memory-budget", "0"])


@pytest.mark.usefixtures("clean_env")
def test_bad_device_is_refused(capsys):
    with pytest.raises(SystemExit):
        settings_from_args(["--device", "tpu"])
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.usefixtures("clean_env")
def test_auth_is_not_in_repr():
    settings = settings_from_args(["--auth", "ann:hunter2-secret"])
    assert settings.auth == ("ann", "hunter2-secret")
    assert "hunter2-secret" not in repr(settings)
    assert "hunter2-secret" not in str(settings)
