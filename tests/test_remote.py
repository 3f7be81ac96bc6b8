"""Tests of the NDIF layer: real nnsight traces on a stand-in sent through nnsight's remote paths.

Three routes carry a trace here:

- ``remote="local"``: nnsight serializes the block, deserializes it with local modules hidden
  and runs it in this process.
- A loopback NDIF on 127.0.0.1 (``LoopbackNdif`` below) that implements the endpoints nnsight
  0.8.1 uses: ``GET /status``, the ``/subscribe`` websocket and ``POST /request``. It
  deserializes each request and runs it against the stand-in the way the ndif 0.1.2 server does,
  so only the values the block saved come back. It also replays the server's error responses.
- The plain local trace, as the reference.

The real ndif server cannot run here (it needs Python 3.12, Ray, Redis, an object store and Hub
access to resolve and load the model), so what the loopback server does not cover is the real
service's queueing, deployment and authentication.
"""

from __future__ import annotations

import asyncio
import io
import json
import linecache
import logging
import os
import threading
import traceback
import uuid
import warnings

import nnsight
import pytest
import torch

from lrsafety import remote
from lrsafety.models import load_model

SENTINEL_KEY = "sentinel-key-7f3c9a1e-do-not-print"
REPO_ID = "lrsafety-test/tiny-qwen2"
MODEL_KEY = 'nnsight.modeling.transformers.TransformersModel:{"repo_id": "%s", "revision": null, "task": "text-generation"}' % REPO_ID


# ---------------------------------------------------------------------------------------------
# A loopback NDIF


class LoopbackNdif:
    """A minimal NDIF API on 127.0.0.1 that runs requests against a local nnsight model.

    ``answers`` lists what the next requests get, one entry per ``POST /request`` (a request past
    the end runs normally): ``("run",)``, ``("http", status, detail)``, ``("error", text)`` (a
    job that ends in ERROR), ``("received-error", text)`` (ERROR in the HTTP answer itself, as
    older servers sent), ``("silent",)`` (queued, never finishes) or ``("close",)`` (the
    websocket drops).
    """

    def __init__(self, model, deployments: dict | None = None) -> None:
        self.model = model
        self.answers: list[tuple] = []
        self.requests: list[dict] = []
        self.deployments = deployments if deployments is not None else {
            "tiny": {"repo_id": REPO_ID, "revision": "main", "deployment_level": "HOT", "application_state": "RUNNING"},
        }
        self.status_code = 200
        self.sessions: dict[str, object] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        self.port: int | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "LoopbackNdif":
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("loopback NDIF did not start")
        return self

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)

    def _serve(self) -> None:
        import tornado.httpserver
        import tornado.netutil
        import tornado.web
        import tornado.websocket

        server = self

        class Status(tornado.web.RequestHandler):
            def get(self):
                self.set_status(server.status_code)
                self.write({"deployments": server.deployments})

        class Subscribe(tornado.websocket.WebSocketHandler):
            def open(self):
                session_id = uuid.uuid4().hex
                server.sessions[session_id] = self
                self.write_message(json.dumps({"session_id": session_id}))

        class Request(tornado.web.RequestHandler):
            async def post(self):
                metadata = json.loads(self.get_body_argument("data"))
                blob = self.request.files["blob"][0]["body"]
                server.requests.append({"headers": dict(self.request.headers), "metadata": metadata, "blob": blob})
                answer = server.answers.pop(0) if server.answers else ("run",)
                job_id = uuid.uuid4().hex

                if answer[0] == "http":
                    self.set_status(answer[1])
                    self.write({"detail": answer[2]})
                    return
                if answer[0] == "received-error":
                    self.write(_response(job_id, "ERROR", answer[1]))
                    return
                self.write(_response(job_id, "RECEIVED", "Your job has been received and is waiting to be queued."))
                socket = server.sessions[metadata["session_id"]]
                asyncio.get_running_loop().create_task(server._job(socket, job_id, answer, metadata, blob))

        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        sockets = tornado.netutil.bind_sockets(0, "127.0.0.1")
        application = tornado.web.Application([(r"/status", Status), (r"/subscribe", Subscribe), (r"/request", Request)])
        tornado.httpserver.HTTPServer(application).add_sockets(sockets)
        self.port = sockets[0].getsockname()[1]
        self._ready.set()
        self.loop.run_forever()

    async def _job(self, socket, job_id: str, answer: tuple, metadata: dict, blob: bytes) -> None:
        await socket.write_message(_response(job_id, "QUEUED", "Added to Queue at position 1."))
        if answer[0] == "silent":
            return
        if answer[0] == "close":
            socket.close()
            return
        await socket.write_message(_response(job_id, "RUNNING", "Your job has started running."))
        if answer[0] == "error":
            await socket.write_message(_response(job_id, "ERROR", answer[1]))
            return
        try:
            result = await asyncio.get_running_loop().run_in_executor(None, self._execute, blob, metadata["compress"])
        except Exception as error:
            text = f"{type(error).__name__}: {error}\n{traceback.format_exc()}"
            await socket.write_message(_response(job_id, "ERROR", text))
            return
        from nnsight.schema.response import ResponseModel, Status

        await socket.write_message(ResponseModel(id=job_id, status=Status.COMPLETED, data=result).pickle(), binary=True)

    def _execute(self, blob: bytes, compress: bool) -> bytes:
        # What the ndif 0.1.2 model actor does: rebuild the tracer against the live model, run it
        # in a trace scope and return the frame's values that the block marked with save().
        from nnsight.schema.request import RequestModel
        from nnsight.tracing.globals import BLOCKS, SOURCES
        from nnsight.tracing.tracer import _saves, dec, inc

        # Deserializing registers the block's source under the client's file name; this process
        # is also the client, so its caches are restored afterwards.
        snapshots = [(cache, dict(cache)) for cache in (linecache.cache, SOURCES, BLOCKS)]
        # A fresh server process has read no source yet. The client's cached copy of its own file
        # would make nested ``with`` blocks look up the wrong lines.
        SOURCES.clear()
        BLOCKS.clear()
        try:
            tracer = RequestModel.deserialize(blob, self.model._remoteable_persistent_objects(), compress=compress)
            inc()
            try:
                with torch.no_grad():
                    tracer.execute(tracer.info.code)
                saves = _saves()
                saved = {name: value for name, value in tracer.info.frame.f_locals.items() if id(value) in saves}
            finally:
                dec()
        finally:
            for cache, snapshot in snapshots:
                cache.clear()
                cache.update(snapshot)

        buffer = io.BytesIO()
        torch.save(saved, buffer)
        data = buffer.getvalue()
        if compress:
            import zstandard

            data = zstandard.ZstdCompressor(level=6).compress(data)
        return data


def _response(job_id: str, status: str, description: str) -> str:
    return json.dumps({"id": job_id, "status": status, "description": description})


# ---------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def loaded():
    return load_model("tiny-qwen2")


@pytest.fixture()
def ndif(loaded, monkeypatch):
    server = LoopbackNdif(loaded.model).start()
    # trace_options writes the host and key into nnsight's in-memory config; undo that afterwards.
    monkeypatch.setattr(nnsight.CONFIG.API, "APIKEY", nnsight.CONFIG.API.APIKEY)
    monkeypatch.setattr(nnsight.CONFIG.API, "HOST", nnsight.CONFIG.API.HOST)
    monkeypatch.setenv(remote.API_KEY_VARIABLE, SENTINEL_KEY)
    monkeypatch.setenv(remote.HOST_VARIABLE, server.url)
    monkeypatch.delenv(remote.SKIP_STATUS_CHECK_VARIABLE, raising=False)
    remote._SERVED.clear()
    yield server
    server.stop()
    remote._SERVED.clear()


def _batch(loaded):
    ids = torch.tensor([[7, 8, 9, 10, 11], [0, 0, 12, 13, 14]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    return ids, mask


def _last_token_states(loaded, mode, **options):
    """Block outputs of layers 0..3 at the last position, in the remote-safe form (saved list)."""
    ids, mask = _batch(loaded)
    blocks = loaded.layers
    n_layers = loaded.spec.n_layers
    with torch.no_grad():
        with loaded.model.trace(input_ids=ids, attention_mask=mask, **remote.trace_options(loaded, mode, **options)):
            # The list itself is saved: a server sends back only values marked with save().
            states = nnsight.save([blocks[layer].output[:, -1, :] for layer in range(n_layers)])
    return torch.stack([state.detach().cpu() for state in states], dim=1)


def _steered_generation(loaded, mode, vector, nnsight_remote=None, **options):
    """Greedy ids and per-step layer-1 outputs with ``vector`` added to layer 1 at every step.

    ``nnsight_remote`` passes ``remote=`` to nnsight directly instead of using trace_options.
    """
    ids, mask = _batch(loaded)
    block = loaded.layers[1]
    settings = {"max_new_tokens": 3, "min_new_tokens": 3, "do_sample": False, "pad_token_id": loaded.tokenizer.pad_token_id}
    if nnsight_remote is None:
        settings.update(remote.trace_options(loaded, mode, **options))
    else:
        settings["remote"] = nnsight_remote
    # An open ``tracer.iter[:]`` loop ends with a warning by design when generation stops.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*was never reached", category=UserWarning)
        with loaded.model.generate(**settings) as tracer:
            with tracer.invoke(input_ids=ids, attention_mask=mask):
                # Saved before the loop because code after an open ``tracer.iter`` loop does not run.
                steps = nnsight.save([])
                for step in tracer.iter[:]:
                    hidden = block.output
                    block.output = hidden + vector.to(hidden.device, hidden.dtype)
                    steps.append(block.output.detach().clone())
            with tracer.invoke():
                output_ids = tracer.result.save()
    return torch.as_tensor(output_ids).cpu(), [step.cpu() for step in steps]


# ---------------------------------------------------------------------------------------------
# remote="local" and the loopback round trip give the local results


def test_local_simulation_matches_local_trace(loaded):
    local = _last_token_states(loaded, False)
    simulated = _last_token_states(loaded, "local")
    assert local.shape == (2, loaded.spec.n_layers, loaded.spec.d_model)
    assert torch.equal(simulated, local)


def test_local_simulation_matches_steered_generation(loaded):
    vector = torch.linspace(-1.0, 1.0, loaded.spec.d_model)
    local_ids, local_steps = _steered_generation(loaded, False, vector)
    simulated_ids, simulated_steps = _steered_generation(loaded, "local", vector)
    _, unsteered_steps = _steered_generation(loaded, False, torch.zeros(loaded.spec.d_model))
    assert local_ids.shape == (2, 8)
    assert len(local_steps) == 3
    assert torch.equal(simulated_ids, local_ids)
    assert len(simulated_steps) == len(local_steps)
    assert all(torch.equal(a, b) for a, b in zip(simulated_steps, local_steps))
    # The edit reached the forward pass: on the prompt pass the block output moved by the vector.
    assert torch.allclose(local_steps[0], unsteered_steps[0] + vector, atol=1e-5)


def test_loopback_trace_matches_local_trace(loaded, ndif):
    local = _last_token_states(loaded, False)
    remote_states = remote.remote_call(
        lambda: _last_token_states(loaded, True, model_key=MODEL_KEY, progress=False),
        remote=True, description="test trace",
    )
    assert torch.equal(remote_states, local)
    assert len(ndif.requests) == 1


def test_loopback_generation_matches_local(loaded, ndif):
    vector = torch.linspace(-1.0, 1.0, loaded.spec.d_model)
    local_ids, local_steps = _steered_generation(loaded, False, vector)
    remote_ids, remote_steps = remote.remote_call(
        lambda: _steered_generation(loaded, True, vector, model_key=MODEL_KEY, progress=False),
        remote=True, description="test generation",
    )
    assert torch.equal(remote_ids, local_ids)
    assert len(remote_steps) == len(local_steps)
    assert all(torch.equal(a, b) for a, b in zip(remote_steps, local_steps))


def test_unsaved_list_comes_back_empty(loaded, ndif):
    # A local run fills a list built outside the block with saved tensors. A server returns only
    # values that are themselves marked with save(), and remote="local" here does the same.
    ids, mask = _batch(loaded)
    lengths = {}
    for mode in (False, "local", True):
        collected = []
        with torch.no_grad():
            with loaded.model.trace(input_ids=ids, attention_mask=mask,
                                    **remote.trace_options(loaded, mode, model_key=MODEL_KEY, progress=False)):
                collected.append(loaded.layers[0].output.save())
        lengths[mode] = len(collected)
    assert lengths[False] == 1
    assert lengths["local"] == 0
    assert lengths[True] == 0


def test_nnsight_local_simulation_differs_from_server(loaded):
    # Why trace_options does not pass remote="local" to nnsight 0.8.1. Its simulation fills the
    # unsaved list, where a server returns nothing. And it runs the block rebuilt from its AST
    # (comments dropped, so lines shift) against this process's cached copy of the file, so the
    # loop inside _steered_generation's invoke is looked up on the wrong line. A server reads the
    # rebuilt source itself.
    ids, mask = _batch(loaded)
    collected = []
    with torch.no_grad():
        with loaded.model.trace(input_ids=ids, attention_mask=mask, remote="local"):
            collected.append(loaded.layers[0].output.save())
    assert len(collected) == 1

    from nnsight.tracing.tracer import WithBlockNotFoundError

    vector = torch.ones(loaded.spec.d_model)
    with pytest.raises(WithBlockNotFoundError):
        _steered_generation(loaded, None, vector, nnsight_remote="local")
    simulated_ids, _ = _steered_generation(loaded, "local", vector)
    assert torch.equal(simulated_ids, _steered_generation(loaded, False, vector)[0])


def test_request_carries_no_api_key_in_payload(loaded, ndif):
    _last_token_states(loaded, True, model_key=MODEL_KEY, progress=False)
    request = ndif.requests[0]
    assert request["headers"].get("Ndif-Api-Key") == SENTINEL_KEY
    assert SENTINEL_KEY.encode() not in request["blob"]
    assert SENTINEL_KEY not in json.dumps(request["metadata"])
    assert request["metadata"]["model_key"] == MODEL_KEY


# ---------------------------------------------------------------------------------------------
# Server errors, mapped to the RemoteError classes


def _trace_through_ndif(loaded, timeout_s=remote.DEFAULT_TIMEOUT_S, **call_options):
    return remote.remote_call(
        lambda: _last_token_states(loaded, True, model_key=MODEL_KEY, progress=False, timeout_s=timeout_s),
        remote=True, description="layer states", **call_options,
    )


def test_missing_key_names_variable(loaded, ndif, monkeypatch):
    monkeypatch.delenv(remote.API_KEY_VARIABLE)
    calls = []
    with pytest.raises(remote.MissingApiKeyError) as raised:
        remote.remote_call(lambda: calls.append(1), remote=True, description="layer states")
    assert "NDIF_API_KEY" in str(raised.value)
    assert "https://login.ndif.us" in str(raised.value)
    assert calls == []
    with pytest.raises(remote.MissingApiKeyError):
        remote.trace_options(loaded, True, model_key=MODEL_KEY)
    assert ndif.requests == []


def test_model_missing_from_status_list(loaded, ndif):
    ndif.deployments = {
        "gpt2": {"repo_id": "openai-community/gpt2", "revision": "main", "deployment_level": "HOT", "application_state": "RUNNING"},
    }
    with pytest.raises(remote.ModelNotServedError) as raised:
        _trace_through_ndif(loaded, backoff_s=0.0)
    message = str(raised.value)
    assert REPO_ID in message
    assert "openai-community/gpt2" in message
    assert remote.SKIP_STATUS_CHECK_VARIABLE in message
    assert ndif.requests == []


def test_cold_model_passes_status_check(loaded, ndif, caplog):
    ndif.deployments["tiny"]["deployment_level"] = "COLD"
    with caplog.at_level(logging.WARNING, logger="lrsafety"):
        states = _trace_through_ndif(loaded)
    assert states.shape == (2, loaded.spec.n_layers, loaded.spec.d_model)
    assert "not running" in caplog.text


def test_unreadable_status_list_says_so(loaded, ndif):
    ndif.status_code = 503
    with pytest.raises(remote.RemoteUnavailableError) as raised:
        _trace_through_ndif(loaded, attempts=2, backoff_s=0.0)
    assert "/status" in str(raised.value)
    assert ndif.requests == []


def test_skip_status_check_variable(loaded, ndif, monkeypatch):
    ndif.deployments = {}
    monkeypatch.setenv(remote.SKIP_STATUS_CHECK_VARIABLE, "1")
    states = _trace_through_ndif(loaded)
    assert states.shape == (2, loaded.spec.n_layers, loaded.spec.d_model)


def test_server_cannot_deploy_model(loaded, ndif):
    ndif.answers = [("error", "Could not deploy this model. 404 Client Error. Repository Not Found for url: "
                              "https://huggingface.co/api/models/lrsafety-test/tiny-qwen2.")]
    with pytest.raises(remote.ModelNotServedError) as raised:
        _trace_through_ndif(loaded, backoff_s=0.0)
    assert "Could not deploy this model" in str(raised.value)
    assert str(raised.value).startswith("layer states: ")
    assert len(ndif.requests) == 1


def test_forbidden_key_is_rejected(loaded, ndif):
    ndif.answers = [("http", 403, "Invalid API key.")]
    with pytest.raises(remote.RequestRejectedError) as raised:
        _trace_through_ndif(loaded, backoff_s=0.0)
    assert "HTTP 403" in str(raised.value)
    assert len(ndif.requests) == 1


def test_old_server_error_in_http_answer(loaded, ndif):
    ndif.answers = [("received-error", "Traceback (most recent call last): ...\nException: Client python version "
                                       "3.11 does not match server version: 3.12")]
    with pytest.raises(remote.RequestRejectedError) as raised:
        _trace_through_ndif(loaded, backoff_s=0.0)
    assert "python version" in str(raised.value)


def test_failed_block_is_execution_error(loaded, ndif):
    ids, mask = _batch(loaded)

    def out_of_range_position():
        with torch.no_grad():
            with loaded.model.trace(input_ids=ids, attention_mask=mask,
                                    **remote.trace_options(loaded, True, model_key=MODEL_KEY, progress=False)):
                value = loaded.layers[0].output[:, 99, :].save()
        return value

    with pytest.raises(remote.RemoteExecutionError) as raised:
        remote.remote_call(out_of_range_position, remote=True, description="bad position", backoff_s=0.0)
    assert "IndexError" in str(raised.value)
    assert len(ndif.requests) == 1


def test_transient_failures_are_retried(loaded, ndif, caplog):
    ndif.answers = [
        ("error", "Replica was evicted while processing your request. Sorry for the inconvenience. Please try again later."),
        ("http", 503, "Service temporarily unavailable: compute backend is reconnecting. Please try again in a few minutes."),
    ]
    with caplog.at_level(logging.WARNING, logger="lrsafety"):
        states = _trace_through_ndif(loaded, attempts=3, backoff_s=0.01)
    assert torch.equal(states, _last_token_states(loaded, False))
    assert len(ndif.requests) == 3
    assert caplog.text.count("retrying") == 2


def test_retries_stop_after_attempts(loaded, ndif):
    ndif.answers = [("close",), ("close",), ("close",)]
    with pytest.raises(remote.RemoteUnavailableError):
        _trace_through_ndif(loaded, attempts=2, backoff_s=0.0)
    assert len(ndif.requests) == 2


def test_client_deadline_raises_timeout(loaded, ndif):
    ndif.answers = [("silent",)]
    with pytest.raises(remote.RemoteTimeoutError) as raised:
        _trace_through_ndif(loaded, timeout_s=1.0, backoff_s=0.0)
    assert "within 1 s" in str(raised.value)
    assert "QUEUED" in str(raised.value)
    assert len(ndif.requests) == 1


def test_server_execution_timeout(loaded, ndif):
    ndif.answers = [("error", "Your job exceeded the execution timeout of 5.0s.")]
    with pytest.raises(remote.RemoteTimeoutError):
        _trace_through_ndif(loaded, backoff_s=0.0)
    assert len(ndif.requests) == 1


def test_refused_connection_is_unavailable(loaded, ndif, monkeypatch):
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    monkeypatch.setenv(remote.HOST_VARIABLE, f"http://127.0.0.1:{closed_port}")
    monkeypatch.setenv(remote.SKIP_STATUS_CHECK_VARIABLE, "1")
    with pytest.raises(remote.RemoteUnavailableError) as raised:
        _trace_through_ndif(loaded, attempts=2, backoff_s=0.0)
    assert "could not reach NDIF" in str(raised.value)


def test_local_errors_pass_through_once(loaded, ndif):
    calls = []

    def broken():
        calls.append(1)
        raise KeyError("a bug in the caller")

    with pytest.raises(KeyError):
        remote.remote_call(broken, remote=True, description="bug", backoff_s=0.0)
    assert calls == [1]


# ---------------------------------------------------------------------------------------------
# No secret in any output


def test_sentinel_key_never_printed(loaded, ndif, caplog, capsys):
    ndif.answers = [
        ("http", 400, f"Invalid API key format: '{SENTINEL_KEY}'. API keys must be in the format: "
                      "xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx."),
        ("error", f"Traceback ...\nValueError: bad header {SENTINEL_KEY}"),
    ]
    texts = []
    with caplog.at_level(logging.DEBUG):
        for expected in (remote.RequestRejectedError, remote.RemoteExecutionError):
            with pytest.raises(expected) as raised:
                _trace_through_ndif(loaded, backoff_s=0.0)
            texts.append("".join(traceback.format_exception(raised.value)))
        states = remote.remote_call(
            lambda: _last_token_states(loaded, True, model_key=MODEL_KEY, progress=True),
            remote=True, description="layer states",
        )
    assert states.shape[0] == 2
    assert "<NDIF_API_KEY>" in texts[0]
    texts.append(json.dumps(remote.remote_description(loaded, True)))
    texts.append(repr(remote.read_settings()))
    texts.append(caplog.text)
    captured = capsys.readouterr()
    texts.extend([captured.out, captured.err])
    for text in texts:
        assert SENTINEL_KEY not in text


def test_configure_nnsight_writes_no_file(monkeypatch, tmp_path):
    config_file = tmp_path / "nnsight" / "config.yaml"
    monkeypatch.setenv("NNSIGHT_CONFIG", str(config_file))
    monkeypatch.setenv(remote.API_KEY_VARIABLE, SENTINEL_KEY)
    monkeypatch.setenv(remote.HOST_VARIABLE, "http://127.0.0.1:9")
    monkeypatch.setattr(nnsight.CONFIG.API, "APIKEY", None)
    monkeypatch.setattr(nnsight.CONFIG.API, "HOST", remote.DEFAULT_HOST)
    settings = remote.configure_nnsight()
    assert nnsight.CONFIG.API.APIKEY == SENTINEL_KEY
    assert nnsight.CONFIG.API.HOST == "http://127.0.0.1:9"
    assert settings.host == "http://127.0.0.1:9"
    assert not config_file.exists()
    assert list(tmp_path.iterdir()) == []


def test_description_modes_and_host(loaded, monkeypatch):
    monkeypatch.setenv(remote.API_KEY_VARIABLE, SENTINEL_KEY)
    monkeypatch.setenv(remote.HOST_VARIABLE, "https://user:secret@ndif.example.org:8443")
    ndif_description = remote.remote_description(loaded.spec.to_dict(), "true")
    assert ndif_description["mode"] == "ndif"
    assert ndif_description["host"] == "https://ndif.example.org:8443"
    assert ndif_description["api_key_set"] is True
    assert ndif_description["revision"] == "main"
    assert ndif_description["model"] == loaded.spec.source
    assert "secret" not in json.dumps(ndif_description)
    assert remote.remote_description(loaded, "local")["mode"] == "local-simulation"
    local_description = remote.remote_description(loaded.spec, False)
    assert local_description["mode"] == "local"
    assert "host" not in local_description


# ---------------------------------------------------------------------------------------------
# Parameters and request sizes


@pytest.mark.parametrize(
    ("value", "expected"),
    [(False, False), (True, True), ("local", "local"), ("LOCAL", "local"), ("true", True), (" False ", False)],
)
def test_normalize_remote_accepts(value, expected):
    assert remote.normalize_remote(value) == expected


@pytest.mark.parametrize("value", [None, 1, 0, "yes", "", "remote", ["local"]])
def test_normalize_remote_rejects(value):
    with pytest.raises(ValueError, match="invalid remote="):
        remote.normalize_remote(value)


def test_remote_batches_local_is_plain_chunks():
    assert remote.remote_batches([5] * 5, batch_size=2, remote=False) == [[0, 1], [2, 3], [4]]


def test_remote_batches_token_budget():
    lengths = [10, 10, 30, 10, 10]
    batches = remote.remote_batches(lengths, batch_size=8, remote=True, max_batch_size=4, max_padded_tokens=60)
    assert [index for batch in batches for index in batch] == list(range(5))
    for batch in batches:
        assert len(batch) <= 4
        assert len(batch) * max(lengths[index] for index in batch) <= 60
    assert batches == [[0, 1], [2, 3], [4]]


def test_remote_batches_extra_tokens_and_row_cap():
    batches = remote.remote_batches([4] * 10, batch_size=16, remote="local", extra_tokens=4,
                                    max_batch_size=3, max_padded_tokens=1000)
    assert batches == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    tight = remote.remote_batches([4] * 4, batch_size=16, remote=True, extra_tokens=4, max_padded_tokens=16)
    assert tight == [[0, 1], [2, 3]]


def test_remote_batches_long_prompt_alone(caplog):
    with caplog.at_level(logging.WARNING, logger="lrsafety"):
        batches = remote.remote_batches([5, 500, 5], batch_size=8, remote=True, max_padded_tokens=100)
    assert batches == [[0], [1], [2]]
    assert "Prompt 1 needs 500 tokens" in caplog.text


def test_load_model_local_simulation_loads_weights():
    simulated = load_model("tiny-qwen2", remote="local")
    assert simulated.spec.remote is False
    with pytest.raises(ValueError, match="stand-in"):
        load_model("tiny-qwen2", remote="true")
