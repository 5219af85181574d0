"""Issue 13: KServe's model repository extension (load / unload / index) is not served, readiness
follows the models the server started with, and the API key accepts the ``bearer`` scheme in any
case. Two real servers (``python -m runtime`` on 127.0.0.1, the tiny Qwen2): one without an API
key (the default, where an unload used to stop the model) and one with a key."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from server_harness import ServerProcess, server_env

from runtime import v2_grpc_predict_pb2 as pb
from runtime import v2_grpc_predict_pb2_grpc as pb_grpc

API_KEY = "repo-key-456"
MODEL = "tiny"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
REPOSITORY_PATHS = (f"/v2/repository/models/{MODEL}/unload", f"/v2/repository/models/{MODEL}/load",
                    "/v2/repository/index")


class Server(ServerProcess):
    def __init__(self, model_dir: Path, log_path: Path, api_key: str | None) -> None:
        args = ["--dtype", "float32", "--device", "cpu", "--max_model_len", "1024"]
        super().__init__(model_dir, log_path, MODEL, args, server_env(api_key=api_key))

    def stub(self) -> tuple[grpc.Channel, pb_grpc.GRPCInferenceServiceStub]:
        channel = grpc.insecure_channel(f"127.0.0.1:{self.grpc_port}")
        return channel, pb_grpc.GRPCInferenceServiceStub(channel)


@pytest.fixture(scope="module")
def servers(tiny_qwen2, tmp_path_factory) -> Iterator[tuple[Server, Server]]:
    logs = tmp_path_factory.mktemp("repository")
    # Both start before either is awaited: the two loads overlap.
    open_srv = Server(tiny_qwen2, logs / "open.log", api_key=None)
    keyed_srv = Server(tiny_qwen2, logs / "keyed.log", api_key=API_KEY)
    try:
        open_srv.wait_ready()
        keyed_srv.wait_ready()
        yield open_srv, keyed_srv
    finally:
        open_srv.stop()
        keyed_srv.stop()


@pytest.fixture(scope="module")
def open_server(servers) -> Server:
    return servers[0]


@pytest.fixture(scope="module")
def keyed_server(servers) -> Server:
    return servers[1]


def _assert_serving(server: Server, headers: dict[str, str] | None = None) -> None:
    """Ready, and actually answering chat (readiness must not claim more or less than that)."""
    assert httpx.get(f"{server.url}/v2/health/ready", timeout=5).status_code == 200
    assert httpx.get(f"{server.url}/v2/models/{MODEL}/ready", timeout=5).status_code == 200
    r = httpx.post(f"{server.url}/v1/chat/completions", json=CHAT, headers=headers, timeout=60)
    assert r.status_code == 200, r.text


def _assert_refused(resp: httpx.Response) -> None:
    assert resp.status_code == 405, resp.text
    assert "one model loaded at start-up" in resp.json()["error"], resp.text


def test_unload_without_api_key_is_refused(open_server):
    for path in REPOSITORY_PATHS:
        _assert_refused(httpx.post(open_server.url + path, json={}, timeout=30))
    _assert_serving(open_server)


def test_server_metadata_does_not_advertise_repository_extension(open_server):
    meta = httpx.get(f"{open_server.url}/v2", timeout=5).json()
    assert "model_repository_extension" not in meta["extensions"], meta


def test_grpc_repository_rpcs_are_unimplemented(open_server):
    channel, stub = open_server.stub()
    with channel:
        for call, request in ((stub.RepositoryModelUnload, pb.RepositoryModelUnloadRequest(model_name=MODEL)),
                              (stub.RepositoryModelLoad, pb.RepositoryModelLoadRequest(model_name=MODEL))):
            with pytest.raises(grpc.RpcError) as err:
                call(request, timeout=30)
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
            assert "one model loaded at start-up" in err.value.details()
        assert stub.ModelReady(pb.ModelReadyRequest(name=MODEL), timeout=30).ready
    _assert_serving(open_server)


def test_repository_routes_with_api_key(keyed_server):
    path = f"/v2/repository/models/{MODEL}/unload"
    assert httpx.post(keyed_server.url + path, timeout=30).status_code == 401
    _assert_refused(httpx.post(keyed_server.url + path, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30))
    _assert_serving(keyed_server, {"Authorization": f"Bearer {API_KEY}"})


def test_bearer_scheme_is_case_insensitive(keyed_server):
    for scheme in ("bearer", "BEARER", "Bearer", "bEaReR"):
        r = httpx.get(f"{keyed_server.url}/v1/models", headers={"Authorization": f"{scheme} {API_KEY}"}, timeout=5)
        assert r.status_code == 200, (scheme, r.text)
    for value in (f"bearer {API_KEY}x", f"Basic {API_KEY}", API_KEY, "bearer"):
        r = httpx.get(f"{keyed_server.url}/v1/models", headers={"Authorization": value}, timeout=5)
        assert r.status_code == 401, (value, r.text)
    channel, stub = keyed_server.stub()
    with channel:
        request = pb.ModelMetadataRequest(name=MODEL)
        for scheme in ("bearer", "BEARER"):
            assert stub.ModelMetadata(request, metadata=(("authorization", f"{scheme} {API_KEY}"),),
                                      timeout=30).name == MODEL
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelMetadata(request, metadata=(("authorization", f"bearer {API_KEY}x"),), timeout=30)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_readiness_counts_models_missing_from_registry():
    """A model the server started with that is no longer in KServe's registry (however it got
    removed) makes the server and that model unready (503), instead of silently not counting."""
    import kserve

    from runtime.server import ServerConfig, VLMModelServer

    srv = VLMModelServer(ServerConfig(enable_grpc=False))
    model = kserve.Model(MODEL)
    model.ready = True
    model.served_names = [MODEL]
    srv.register_model(model, MODEL)  # as VLMModelServer.start does
    srv.models.append(model)
    assert asyncio.run(srv.dataplane.ready())
    assert asyncio.run(srv.dataplane.model_ready(MODEL))

    del srv.registered_models.get_models()[MODEL]  # the model object itself still says ready
    assert not asyncio.run(srv.dataplane.ready())
    assert not asyncio.run(srv.dataplane.model_ready(MODEL))
