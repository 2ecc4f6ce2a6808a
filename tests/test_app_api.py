"""API contract of the assembled app: the named endpoints, the shared GPU queue, the Models endpoints, /health."""

from __future__ import annotations

import httpx
import pytest
from gradio_client.exceptions import AppError

ENDPOINTS_BY_TAB = {
    "vqa": ["/vqa"],
    "text_to_image": ["/txt2img", "/txt2video"],
    "voice": ["/transcribe", "/chat", "/speak", "/voice"],
    "finetune": ["/finetune_validate", "/finetune_runs", "/finetune_resume", "/finetune_start", "/finetune_status",
                 "/finetune_stop"],
    "models_panel": ["/models", "/unload", "/unload_all", "/catalog", "/download", "/stop_download", "/delete_cached",
                     "/add_model"],
}
# Endpoints that run a model in-process and must therefore wait in the one "gpu" queue.
MODEL_ENDPOINTS = ["vqa", "txt2img", "txt2video", "transcribe", "chat", "speak", "voice"]
ENDPOINT_TAB = {endpoint: tab for tab, endpoints in ENDPOINTS_BY_TAB.items() for endpoint in endpoints}


@pytest.fixture(scope="module")
def named_endpoints(client) -> dict:
    return client.view_api(return_format="dict", print_info=False)["named_endpoints"]


@pytest.fixture(scope="module")
def built_demo(tmp_path_factory):
    """The app's Blocks built in-process (not launched), to inspect how events are queued."""
    import app

    cache = tmp_path_factory.mktemp("contract-cache")
    return app.create(["--offline", "--cache-dir", str(cache), "--device", "cpu"])[2]


@pytest.mark.parametrize("endpoint", list(ENDPOINT_TAB))
def test_named_endpoint_exists(named_endpoints, endpoint):
    assert endpoint in named_endpoints, f"{endpoint} missing; the app offers {sorted(named_endpoints)}"


# Extra endpoints that tabs document on purpose, beyond the contract above.
DOCUMENTED_EXTRAS = {"/png_info", "/video_info"}


def test_no_unexpected_public_endpoints(named_endpoints):
    """Internal events stay private: only the documented API is offered (a callable gr.State value, for
    example, would add a public load endpoint named after it)."""
    unexpected = sorted(set(named_endpoints) - set(ENDPOINT_TAB) - DOCUMENTED_EXTRAS)
    assert unexpected == [], f"undocumented public endpoints: {unexpected}"


@pytest.mark.parametrize("api_name", MODEL_ENDPOINTS)
def test_model_endpoints_share_the_gpu_queue(built_demo, api_name):
    functions = [fn for fn in built_demo.fns.values() if fn.api_name == api_name]
    if not functions:
        pytest.fail(f"/{api_name} is not wired")
    (fn,) = functions
    assert (fn.concurrency_id, fn.concurrency_limit) == ("gpu", 1)
    assert fn.queue, "a model event must go through the queue"


def test_every_gpu_event_has_limit_one(built_demo):
    gpu_events = [fn for fn in built_demo.fns.values() if fn.concurrency_id == "gpu"]
    assert {fn.api_name for fn in gpu_events} >= set(MODEL_ENDPOINTS), "a model endpoint is outside the GPU queue"
    assert all(fn.concurrency_limit == 1 for fn in gpu_events)


def test_models_endpoint_lists_loaded_models_and_unloads(app_server, client):
    _, manager, _ = app_server
    manager.unload_all()
    assert client.predict(api_name="/models")["models"] == []
    with manager.use("tiny-chat"):
        busy = client.predict(api_name="/models")
        assert busy["models"][0]["id"] == "tiny-chat" and busy["models"][0]["pinned"] is True
        with pytest.raises(AppError, match="answering a request"):
            client.predict("tiny-chat", api_name="/unload")
    listing = client.predict(api_name="/models")
    (entry,) = listing["models"]
    assert entry["id"] == "tiny-chat" and entry["task"] == "chat" and entry["pinned"] is False
    assert entry["device"] == "cpu" and entry["precision"] == "fp32" and entry["bytes"] > 0
    assert listing["used_bytes"] == entry["bytes"] and listing["budget_bytes"] == manager.budget

    assert client.predict("tiny-chat", api_name="/unload") == "Unloaded tiny-chat."
    assert client.predict("tiny-chat", api_name="/unload") == "tiny-chat was not loaded."
    assert client.predict(model_id="tiny-chat", api_name="/unload") == "tiny-chat was not loaded."
    assert client.predict(api_name="/models")["models"] == [] and manager.used_bytes() == 0


@pytest.mark.parametrize("bad, message", [("no/such-model", "Unknown model"), ("", "Choose a loaded model")])
def test_unload_rejects_bad_input_clearly(client, bad, message):
    with pytest.raises(AppError, match=message):
        client.predict(bad, api_name="/unload")
    assert client.predict(api_name="/models")["budget_bytes"] > 0  # still serving


def test_unload_all_endpoint(app_server, client):
    _, manager, _ = app_server
    manager.unload_all()
    with manager.use("tiny-chat"):
        pass
    assert client.predict(api_name="/unload_all") == "Unloaded 1 model(s): tiny-chat."
    assert client.predict(api_name="/unload_all") == "Unloaded 0 model(s)."
    assert not manager.is_loaded("tiny-chat")


def test_health_route(app_server):
    url, manager, _ = app_server
    manager.unload_all()
    response = httpx.get(url + "health", timeout=10)
    assert response.status_code == 200 and response.headers["content-type"].startswith("application/json")
    health = response.json()
    assert health["status"] == "ok" and health["loaded"] == [] and health["used_bytes"] == 0
    assert health["budget_bytes"] == manager.budget
    assert health["memory"]["rss"] > 0 and health["memory"]["ram_total"] >= health["memory"]["ram_available"]
    with manager.use("tiny-chat"):
        assert httpx.get(url + "health", timeout=10).json()["loaded"] == ["tiny-chat"]
    manager.unload_all()


def test_uncached_hub_model_offline_says_what_to_do(app_server, client):
    with pytest.raises(AppError, match="hf download Qwen/Qwen2.5-0.5B-Instruct"):
        client.predict(message="Hello", history=[], model="Qwen/Qwen2.5-0.5B-Instruct", api_name="/chat")
    assert not app_server[1].is_loaded("Qwen/Qwen2.5-0.5B-Instruct") and app_server[1]._reserved == {}


# What an API caller must pass; every other parameter has the UI's default. (/chat's message and /speak's
# text share the voice tab's text box, whose default is ""; leaving them out gets a clear error.)
REQUIRED_PARAMETERS = {
    "/vqa": ["image", "question"], "/txt2img": ["prompt"], "/txt2video": ["prompt"], "/png_info": ["path"],
    "/video_info": ["path"], "/transcribe": ["audio"],
    "/chat": [], "/speak": [], "/voice": [], "/finetune_validate": ["dataset"],
    "/finetune_start": ["dataset"], "/finetune_runs": [], "/finetune_resume": ["run_id"],
    "/finetune_status": ["run_id"], "/finetune_stop": ["run_id"],
    "/unload": ["model_id"], "/unload_all": [], "/models": [], "/catalog": [], "/download": [], "/stop_download": [],
    "/delete_cached": ["model_id"], "/add_model": ["repo_id"],
}


def test_only_the_essential_parameters_are_required(named_endpoints):
    required = {name: [p["parameter_name"] for p in info["parameters"] if not p.get("parameter_has_default")]
                for name, info in named_endpoints.items()}
    assert required == REQUIRED_PARAMETERS
