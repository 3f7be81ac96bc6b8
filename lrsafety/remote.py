"""Remote execution on NDIF through nnsight: settings, request sizes, retries and clear errors.

NDIF runs the paper's 7B-9B models on its own GPUs; nnsight ships each traced block there when a
trace gets ``remote=True``. This module is the layer between the package's traces and that
service:

- ``normalize_remote`` reads the notebook parameter ``remote`` (``False``, ``True``, ``"local"``,
  or the strings ``"true"``/``"false"``).
- ``read_settings`` / ``configure_nnsight`` take the host and API key from the environment
  variables ``NDIF_HOST`` and ``NDIF_API_KEY`` only, so no key is ever a notebook parameter.
- ``trace_options`` returns the keyword arguments for one ``model.trace``/``model.generate``
  call: nothing for local runs, a ``LocalRoundTripBackend`` for ``"local"`` (the request is
  serialized, deserialized and run here the way the NDIF server runs it), and an
  ``NdifBackend`` for NDIF (checks the key and that NDIF serves the model, enforces a wait
  deadline, logs job status changes).

Code inside a remote trace must ``save()`` every value it needs afterwards, containers included:
NDIF returns only saved values, so a list filled inside the block but not itself saved comes
back empty.
- ``remote_call`` runs one traced step, maps nnsight's failures to the ``RemoteError`` classes
  below and retries the transient ones with exponential backoff.
- ``remote_batches`` splits prompts into requests that stay within the request-size budget.
- ``remote_description`` is the manifest entry: mode, host, model, revision, never the key.
"""

from __future__ import annotations

import contextlib
import io
import json
import linecache
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit, urlunsplit

import nnsight
import pydantic
import torch
from nnsight.intervention.backends.display import StatusDisplay
from nnsight.intervention.backends.local import LocalSimulationBackend
from nnsight.intervention.backends.remote import RemoteBackend
from nnsight.intervention.backends.remote import RemoteError as NnsightRemoteError
from nnsight.schema.request import RequestModel
from nnsight.schema.response import Status
from nnsight.tracing.globals import BLOCKS, SOURCES
from nnsight.tracing.tracer import _saves, save
from nnsight.tracing.util import push

logger = logging.getLogger("lrsafety")

T = TypeVar("T")
RemoteMode = bool | Literal["local"]

API_KEY_VARIABLE = "NDIF_API_KEY"
HOST_VARIABLE = "NDIF_HOST"
# Hot-swapping keys may run models that NDIF's status list does not show; this skips the check.
SKIP_STATUS_CHECK_VARIABLE = "LRSAFETY_NDIF_SKIP_STATUS_CHECK"

# The default of nnsight 0.8.1 (``nnsight.schema.config.ApiConfig.HOST``).
DEFAULT_HOST = "https://api.ndif.us"
API_KEY_PAGE = "https://login.ndif.us"
STATUS_PAGE = "https://nnsight.net/status/"

# NOTE: NDIF publishes no request-size limit. The ndif 0.1.2 server measures the payload but does
# not cap it, and its per-deployment execution timeout is configurable (unset by default). These
# two budgets are estimates that keep one request to a few seconds of GPU time on an 8B model and
# its saved activations to tens of MB, so a failure costs little to retry.
REMOTE_MAX_BATCH_SIZE = 32
REMOTE_MAX_PADDED_TOKENS = 8192

# Seconds the client waits for one job, queueing and model deployment included.
DEFAULT_TIMEOUT_S = 1800.0
DEFAULT_ATTEMPTS = 3
# Seconds before the second attempt; doubled before each later one.
DEFAULT_BACKOFF_S = 10.0

_DEPLOYED_LEVELS = {"HOT", "WARM"}
_TRUE_STRINGS = {"true"}
_FALSE_STRINGS = {"false"}


# ---------------------------------------------------------------------------------------------
# Errors


class RemoteError(RuntimeError):
    """A remote (NDIF) request could not run. ``retryable`` is True when sending it again may help."""

    retryable = False


class MissingApiKeyError(RemoteError):
    """``NDIF_API_KEY`` is not set."""


class ModelNotServedError(RemoteError):
    """NDIF does not serve the requested model (or cannot deploy it)."""


class RequestRejectedError(RemoteError):
    """NDIF refused the request before running it: invalid key, client version, malformed request."""


class RemoteTimeoutError(RemoteError):
    """The job did not finish within the client's deadline or the server's execution timeout."""


class RemoteExecutionError(RemoteError):
    """The traced block failed on the server (its traceback is in the message)."""


class RemoteUnavailableError(RemoteError):
    """NDIF could not be reached or failed transiently (connection, 5xx, evicted replica)."""

    retryable = True


# ---------------------------------------------------------------------------------------------
# Parameter and settings


def normalize_remote(value: Any) -> RemoteMode:
    """Return ``False``, ``True`` or ``"local"`` for a ``remote`` parameter value.

    Accepts the booleans, ``"local"`` (nnsight's in-process simulation of the remote path) and the
    strings ``"true"``/``"false"`` in any case, as papermill or YAML may pass them.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "local":
            return "local"
        if text in _TRUE_STRINGS:
            return True
        if text in _FALSE_STRINGS:
            return False
    raise ValueError(
        f"invalid remote={value!r}; expected False (run here), True (run on NDIF) or "
        "'local' (simulate the NDIF round trip in this process)"
    )


@dataclass(frozen=True)
class NdifSettings:
    """The NDIF host and API key, read from the environment."""

    host: str
    api_key: str = field(repr=False)


def read_settings() -> NdifSettings:
    """Read ``NDIF_HOST`` (optional) and ``NDIF_API_KEY`` from the environment.

    Raises MissingApiKeyError when the key is not set, and ValueError for a host that is not an
    http(s) URL.
    """
    api_key = os.environ.get(API_KEY_VARIABLE, "").strip()
    if not api_key:
        raise MissingApiKeyError(
            f"remote=True needs an NDIF API key, but the environment variable {API_KEY_VARIABLE} "
            f"is not set. Create a key at {API_KEY_PAGE}, then run "
            f"'export {API_KEY_VARIABLE}=<your key>' in the shell that starts Jupyter or "
            "'lrsafety run' (keys are never passed as notebook parameters)."
        )
    host = os.environ.get(HOST_VARIABLE, "").strip().rstrip("/") or DEFAULT_HOST
    if not host.startswith(("http://", "https://")):
        raise ValueError(f"{HOST_VARIABLE}={public_host(host)!r} is invalid; it must start with http:// or https://")
    return NdifSettings(host=host, api_key=api_key)


def configure_nnsight(settings: NdifSettings | None = None) -> NdifSettings:
    """Point nnsight's ``CONFIG.API`` at the environment's host and key, for this process only.

    Sets the values in memory. ``CONFIG.save()`` and ``CONFIG.set_default_api_key()`` would write
    the key into nnsight's user config file, so this module never calls them.
    """
    settings = settings or read_settings()
    nnsight.CONFIG.API.HOST = settings.host
    nnsight.CONFIG.API.APIKEY = settings.api_key
    return settings


def public_host(host: str) -> str:
    """Return ``host`` without any user name or password embedded in the URL."""
    parts = urlsplit(host)
    if parts.username is None and parts.password is None:
        return host
    netloc = parts.hostname or ""
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def remote_description(model: Any, remote: Any) -> dict[str, Any]:
    """Describe where a run executes, for the manifest: mode, host, model and revision.

    ``model`` is a ``LoadedModel``, a ``ModelSpec`` or a spec dict (``model.json``). The API key
    is never included, only whether ``NDIF_API_KEY`` is set.
    """
    mode = normalize_remote(remote)
    spec = getattr(model, "spec", model)
    if isinstance(spec, Mapping):
        source, revision = spec.get("source"), spec.get("revision")
    else:
        source, revision = spec.source, spec.revision

    description: dict[str, Any] = {
        "mode": {False: "local", True: "ndif", "local": "local-simulation"}[mode],
        "model": source,
        "revision": revision or "main",
        "nnsight": nnsight.__version__,
    }
    if mode is True:
        host = os.environ.get(HOST_VARIABLE, "").strip().rstrip("/") or DEFAULT_HOST
        description["host"] = public_host(host)
        description["api_key_variable"] = API_KEY_VARIABLE
        description["api_key_set"] = bool(os.environ.get(API_KEY_VARIABLE, "").strip())
    return description


# ---------------------------------------------------------------------------------------------
# Request sizes


def remote_batches(
    lengths: Sequence[int],
    *,
    batch_size: int,
    remote: Any,
    extra_tokens: int = 0,
    max_batch_size: int = REMOTE_MAX_BATCH_SIZE,
    max_padded_tokens: int = REMOTE_MAX_PADDED_TOKENS,
) -> list[list[int]]:
    """Split prompt indices, in order, into batches of at most ``batch_size`` prompts.

    For ``remote=True`` and ``"local"`` each batch also contains at most ``max_batch_size`` prompts
    and at most ``max_padded_tokens`` padded tokens: rows x (longest prompt + ``extra_tokens``).
    Generation passes ``max_new_tokens`` as ``extra_tokens``. A prompt longer than the token
    budget on its own gets a batch of its own, with a warning.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if any(length < 0 for length in lengths):
        raise ValueError("prompt lengths must be non-negative")
    if normalize_remote(remote) is False:
        return [list(range(start, min(start + batch_size, len(lengths)))) for start in range(0, len(lengths), batch_size)]

    rows_limit = min(batch_size, max_batch_size)
    batches: list[list[int]] = []
    current: list[int] = []
    current_longest = 0
    for index, length in enumerate(lengths):
        tokens = int(length) + extra_tokens
        longest = max(current_longest, tokens)
        if current and (len(current) + 1 > rows_limit or (len(current) + 1) * longest > max_padded_tokens):
            batches.append(current)
            current, longest = [], tokens
        if not current and tokens > max_padded_tokens:
            logger.warning(
                "Prompt %d needs %d tokens, more than the remote budget of %d padded tokens per "
                "request; sending it alone", index, tokens, max_padded_tokens,
            )
        current.append(index)
        current_longest = longest
    if current:
        batches.append(current)
    return batches


# ---------------------------------------------------------------------------------------------
# Trace options and the NDIF backend


def trace_options(
    loaded: Any,
    remote: Any,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    progress: bool = True,
    description: str = "",
    model_key: str | None = None,
) -> dict[str, Any]:
    """Return the keyword arguments that route one ``trace``/``generate`` call.

    ``{}`` for a local run, a ``LocalRoundTripBackend`` for ``"local"`` (the NDIF round trip
    in this process), and an ``NdifBackend`` for NDIF. Call it once per trace, because a
    backend serves one job. For NDIF it first checks ``NDIF_API_KEY`` and that NDIF lists the
    model. ``model_key`` overrides the key nnsight builds from the model, which queries the
    Hugging Face Hub.
    """
    mode = normalize_remote(remote)
    if mode is False:
        return {}
    if mode == "local":
        return {"backend": LocalRoundTripBackend(loaded.model)}

    settings = configure_nnsight()
    if model_key is None:
        model_key = _model_key(loaded)
    repo_id, revision = _repo_of_model_key(model_key)
    check_model_served(repo_id, revision, settings=settings)
    backend = NdifBackend(
        model_key,
        settings=settings,
        # The per-request state nnsight itself would send (attention implementation, adapter).
        env=loaded.model._remoteable_get_env(),
        timeout_s=timeout_s,
        progress=progress,
        description=description or repo_id,
    )
    return {"backend": backend}


class NdifBackend(RemoteBackend):
    """nnsight's blocking NDIF backend with a wait deadline and job status logging.

    The job is sent and awaited exactly as ``remote=True`` does (one ``/subscribe`` websocket,
    status updates, result pushed back into the caller's frame). nnsight's status line is shown
    when ``progress`` is set; status changes are logged either way.

    NOTE: the deadline is checked while the job is awaited. Opening the websocket and reading
    its first message have no timeout in nnsight 0.8.1, so a server that accepts the connection
    and then stays silent can still block the caller there.
    """

    def __init__(
        self,
        model_key: str,
        *,
        settings: NdifSettings,
        env: dict | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        progress: bool = True,
        description: str = "",
    ) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        super().__init__(model_key, host=settings.host, api_key=settings.api_key, env=env, blocking=True)
        self.display = _JobDisplay(timeout_s=timeout_s, progress=progress, description=description)

    def __call__(self, tracer=None):
        self.display.start_clock()
        return super().__call__(tracer)


class _JobDisplay(StatusDisplay):
    # nnsight wakes an enabled display every 0.1 s while it waits on the websocket, and that wake-up
    # is where the deadline is checked. So the display stays enabled and only drawing follows
    # ``progress``.

    def __init__(self, *, timeout_s: float, progress: bool, description: str) -> None:
        super().__init__(enabled=True, verbose=False)
        self.timeout_s = timeout_s
        self.progress = progress
        self.description = description
        self.deadline: float | None = None
        self.job_id: str | None = None
        self.last_status: Status | None = None

    def start_clock(self) -> None:
        self.deadline = time.monotonic() + self.timeout_s

    def update(self, response) -> None:
        self.job_id = response.id
        if response.status is Status.LOG or response.status is not self.last_status:
            # An ERROR's description is the server traceback; it reaches the caller in the exception.
            detail = "" if response.status is Status.ERROR else response.description
            logger.info("NDIF job %s (%s): %s %s", response.id, self.description, response.status.value, detail)
        if response.status is not Status.LOG:
            self.last_status = response.status
        if self.progress:
            super().update(response)
        if response.status not in (Status.COMPLETED, Status.ERROR):
            self._check_deadline()

    def refresh(self) -> None:
        if self.progress:
            super().refresh()
        self._check_deadline()

    def _check_deadline(self) -> None:
        if self.deadline is None or time.monotonic() <= self.deadline:
            return
        status = self.last_status.value if self.last_status else "no status yet"
        raise RemoteTimeoutError(
            f"NDIF job {self.job_id or '(not yet accepted)'} for {self.description} did not finish "
            f"within {self.timeout_s:.0f} s (last status: {status}). The server may still run it, "
            "but its result is discarded. Raise timeout_s, send smaller batches, or retry when "
            f"the queue is shorter ({STATUS_PAGE})."
        )


class LocalRoundTripBackend(LocalSimulationBackend):
    """The NDIF round trip in this process: serialize, deserialize, run, return only saved values.

    nnsight 0.8.1's own ``remote="local"`` (``LocalSimulationBackend``) runs the deserialized block
    against the caller's live frame and this process's source caches. That differs from a server
    in two ways that matter here. It fills lists and dicts that were never saved, where a server
    returns only values marked with ``save()``. And it raises WithBlockNotFoundError on a nested
    ``with`` block (``tracer.invoke`` inside ``generate``), because its caches hold the caller's
    file where a server holds the block's own source. This backend runs the block the way the
    ndif 0.1.2 server does, in fresh source caches, and returns the saved values through
    ``torch.save`` bytes like a server result.
    """

    def __call__(self, tracer) -> None:
        from nnsight.ndif import pull_env

        pull_env()
        blob = RequestModel.serialize(tracer, compress=False)
        persistent = self.model._remoteable_persistent_objects()
        with _fresh_source_caches():
            hidden = self._hide_local_modules()
            try:
                restored = RequestModel.deserialize(blob, persistent, compress=False)
            finally:
                self._restore(hidden)
            restored.execute(restored.info.code)
            saves = _saves()
            saved = {name: value for name, value in restored.info.frame.f_locals.items() if id(value) in saves}

        buffer = io.BytesIO()
        torch.save(saved, buffer)
        buffer.seek(0)
        result = torch.load(buffer, map_location="cpu", weights_only=False)
        # As nnsight's remote backend does: mark the values for enclosing traces, then write them
        # into the caller's frame.
        for value in result.values():
            save(value)
        push(tracer.info.frame, result)


@contextlib.contextmanager
def _fresh_source_caches():
    # Deserializing puts the block's source into linecache under the caller's file name, and nnsight
    # memoizes sources and parsed blocks per file. A server process starts with neither.
    snapshots = [(cache, dict(cache)) for cache in (linecache.cache, SOURCES, BLOCKS)]
    SOURCES.clear()
    BLOCKS.clear()
    try:
        yield
    finally:
        for cache, snapshot in snapshots:
            cache.clear()
            cache.update(snapshot)


def _model_key(loaded: Any) -> str:
    try:
        return loaded.model.to_model_key()
    except Exception as error:  # The Hub lookup raises many types; all mean "no key".
        raise RemoteUnavailableError(
            f"could not build NDIF's model key for {loaded.spec.source!r}: nnsight resolves the "
            f"repo id on the Hugging Face Hub and that failed ({type(error).__name__}: {error})"
        ) from None


def _repo_of_model_key(model_key: str) -> tuple[str, str]:
    # Keys look like 'nnsight.modeling.transformers.TransformersModel:{"repo_id": ..., "revision": ...}'.
    try:
        data = json.loads(model_key.split(":", 1)[1])
        return str(data["repo_id"]), data.get("revision") or "main"
    except (IndexError, ValueError, KeyError, TypeError):
        raise ValueError(f"model key {model_key!r} is not of the form 'import.path.Class:{{\"repo_id\": ...}}'") from None


# ---------------------------------------------------------------------------------------------
# Which models NDIF serves


# Successful checks, keyed by (host, repo id, revision), so each process queries NDIF once per model.
_SERVED: set[tuple[str, str, str]] = set()


def check_model_served(repo_id: str, revision: str = "main", *, settings: NdifSettings | None = None) -> None:
    """Raise ModelNotServedError unless NDIF's status list contains ``repo_id`` at ``revision``.

    A listed model that is not running yet (deploying, or cached but cold) passes with a warning,
    because NDIF deploys it on request. Raises RemoteUnavailableError when the status list cannot be
    read. Setting ``LRSAFETY_NDIF_SKIP_STATUS_CHECK=1`` skips the check.
    """
    settings = settings or read_settings()
    if os.environ.get(SKIP_STATUS_CHECK_VARIABLE, "").strip().lower() in {"1", "true", "yes"}:
        return
    cache_key = (settings.host, repo_id.lower(), revision)
    if cache_key in _SERVED:
        return

    deployments = _read_status(settings)
    matches = [
        entry for entry in deployments.values()
        if str(entry.get("repo_id") or "").lower() == repo_id.lower()
        and (entry.get("revision") or "main") == revision
    ]
    if not matches:
        served = sorted({
            str(entry.get("repo_id")) for entry in deployments.values()
            if entry.get("deployment_level") in _DEPLOYED_LEVELS and entry.get("repo_id")
        })
        listing = ", ".join(served) if served else "none"
        raise ModelNotServedError(
            f"NDIF at {public_host(settings.host)} does not serve {repo_id} (revision {revision}). "
            f"Models it serves now: {listing}. See {STATUS_PAGE} for the schedule; run this model "
            "on a local GPU (remote=False), or, if your key has hot-swapping access, set "
            f"{SKIP_STATUS_CHECK_VARIABLE}=1 to send the requests anyway."
        )

    running = [
        entry for entry in matches
        if entry.get("deployment_level") in _DEPLOYED_LEVELS and entry.get("application_state") == "RUNNING"
    ]
    if not running:
        states = ", ".join(
            f"{entry.get('deployment_level', '?')}/{entry.get('application_state', '?')}" for entry in matches
        )
        logger.warning(
            "NDIF lists %s but it is not running (%s); the first request waits for it to deploy", repo_id, states
        )
    _SERVED.add(cache_key)


def _read_status(settings: NdifSettings) -> dict[str, dict]:
    import httpx

    url = f"{settings.host}/status"
    try:
        response = httpx.get(url, timeout=httpx.Timeout(10.0, read=60.0))
        response.raise_for_status()
        payload = response.json()
    except (httpx.HTTPError, ValueError) as error:
        raise RemoteUnavailableError(
            f"could not read the list of served models from {public_host(url)} "
            f"({_redact(f'{type(error).__name__}: {error}', settings.api_key)}). NDIF may be down "
            f"(see {STATUS_PAGE}); set {SKIP_STATUS_CHECK_VARIABLE}=1 to send requests without this check."
        ) from None
    deployments = payload.get("deployments") if isinstance(payload, dict) else None
    if not isinstance(deployments, dict):
        raise RemoteUnavailableError(f"{public_host(url)} returned no 'deployments' table; is {HOST_VARIABLE} an NDIF API host?")
    return deployments


# ---------------------------------------------------------------------------------------------
# Running a traced step and mapping its failures


def remote_call(
    fn: Callable[[], T],
    *,
    remote: Any,
    description: str,
    attempts: int = DEFAULT_ATTEMPTS,
    backoff_s: float = DEFAULT_BACKOFF_S,
) -> T:
    """Run ``fn`` (one traced step) and return its result, retrying transient NDIF failures.

    Local runs and ``"local"`` simulations call ``fn`` once and let its errors through unchanged.
    With ``remote=True`` a failure that nnsight or NDIF reports is raised as a ``RemoteError``
    subclass whose message names ``description``; RemoteUnavailableError is retried up to
    ``attempts`` times in all, waiting ``backoff_s``, then twice as long before each later try.
    Only retry idempotent steps (a forward pass or a generation that writes nothing): the last
    failure is always raised, so a caller never marks a failed step as done.
    """
    if attempts < 1:
        raise ValueError(f"attempts must be at least 1, got {attempts}")
    if normalize_remote(remote) is not True:
        return fn()

    api_key = read_settings().api_key
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except RemoteError as error:
            mapped = error
        except Exception as error:
            mapped = classify_error(error, api_key=api_key, description=description)
            if mapped is None:
                raise
        if mapped.retryable and attempt < attempts:
            delay = backoff_s * 2 ** (attempt - 1)
            logger.warning(
                "%s failed on attempt %d of %d; retrying in %.0f s: %s", description, attempt, attempts, delay, mapped
            )
            time.sleep(delay)
            continue
        # The original exception can quote the key (NDIF echoes a malformed one), so it is dropped.
        raise mapped from None
    raise AssertionError("unreachable")


# Server messages, matched case-insensitively, from the ndif server 0.1.x and its predecessors.
_NOT_SERVED_PATTERNS = (
    "could not deploy this model",
    "not a scheduled model",
    "hotswapping is not supported",
    "cannot accommodate deployment",
    "cannot be accomodated",
    "cannot be accommodated",
    "unavailable for deployment",
    "repository not found",
)
_REJECTED_PATTERNS = (
    "invalid api key",
    "client nnsight version",
    "client python version",
)
_TIMEOUT_PATTERNS = ("exceeded the execution timeout",)
_TRANSIENT_PATTERNS = (
    "please try again",
    "try again later",
    "evicted",
    "preempted",
    "temporarily unavailable",
    "re-sending it usually resolves",
    "queue service is not ready",
)
_HINTS = (
    ("out of memory", "The server ran out of GPU memory: send fewer prompts per request."),
    ("doesn't match the one your code was traced against",
     "Compare the package versions with nnsight.compare() and align transformers and torch."),
    ("no module named", "The block uses a module the server does not have; pass plain tensors into traces."),
)


def classify_error(error: BaseException, *, api_key: str | None = None, description: str = "") -> RemoteError | None:
    """Map an exception from an nnsight remote trace to a RemoteError, or None if it is not one.

    Reads what nnsight 0.8.1 raises: its ``RemoteError`` with the server's message (an HTTP
    failure keeps the ``httpx.HTTPStatusError`` as ``__cause__``), ``httpx`` and ``websocket``
    transport errors, and ``OSError`` for refused connections. ``api_key`` is removed from the
    message wherever the server quoted it.
    """
    import httpx
    import websocket

    prefix = f"{description}: " if description else ""

    def build(kind: type[RemoteError], text: str) -> RemoteError:
        text = _redact(text.strip(), api_key)
        for needle, hint in _HINTS:
            if needle in text.lower():
                text = f"{text}\n{hint}"
        return kind(prefix + text)

    if isinstance(error, NnsightRemoteError):
        message = str(error)
        status_code = _status_code(error.__cause__)
        if status_code is not None:
            return build(_kind_of_status(status_code, message), f"NDIF answered HTTP {status_code}. {message}")
        if isinstance(error.__cause__, httpx.TimeoutException):
            return build(RemoteUnavailableError, f"the request to NDIF timed out. {message}")
        if isinstance(error.__cause__, httpx.TransportError):
            return build(RemoteUnavailableError, f"could not reach NDIF. {message}")
        return build(_kind_of_message(message), message)

    if isinstance(error, websocket.WebSocketBadStatusException):
        status_code = error.status_code
        return build(_kind_of_status(status_code, str(error)), f"NDIF refused the status connection (HTTP {status_code}). {error}")
    if isinstance(error, httpx.HTTPStatusError):
        status_code = error.response.status_code
        return build(_kind_of_status(status_code, str(error)), f"NDIF answered HTTP {status_code}. {error}")
    if isinstance(error, (httpx.TransportError, websocket.WebSocketException, ConnectionError, TimeoutError)):
        return build(RemoteUnavailableError, f"could not reach NDIF ({type(error).__name__}: {error})")
    if isinstance(error, OSError) and error.errno is not None:
        return build(RemoteUnavailableError, f"could not reach NDIF ({type(error).__name__}: {error})")
    if isinstance(error, pydantic.ValidationError) and error.title == "ResponseModel":
        # nnsight parses each websocket message as a ResponseModel; a closed socket yields ''.
        inputs = [item.get("input") for item in error.errors()]
        if inputs == [""]:
            return build(RemoteUnavailableError, "NDIF closed the status connection before the job finished")
        return build(RemoteUnavailableError, f"NDIF sent a status message nnsight could not read ({error})")
    return None


def _status_code(cause: BaseException | None) -> int | None:
    response = getattr(cause, "response", None)
    return getattr(response, "status_code", None)


def _kind_of_status(status_code: int, message: str) -> type[RemoteError]:
    lowered = message.lower()
    if status_code == 429 or status_code >= 500:
        return RemoteUnavailableError
    if any(pattern in lowered for pattern in _NOT_SERVED_PATTERNS):
        return ModelNotServedError
    return RequestRejectedError


def _kind_of_message(message: str) -> type[RemoteError]:
    # A job that reached the server and ended in ERROR. The order matters because "Could not deploy
    # this model" ends in HuggingFace's own advice, which may suggest trying again.
    lowered = message.lower()
    if any(pattern in lowered for pattern in _NOT_SERVED_PATTERNS):
        return ModelNotServedError
    if any(pattern in lowered for pattern in _REJECTED_PATTERNS):
        return RequestRejectedError
    if any(pattern in lowered for pattern in _TIMEOUT_PATTERNS):
        return RemoteTimeoutError
    if any(pattern in lowered for pattern in _TRANSIENT_PATTERNS):
        return RemoteUnavailableError
    return RemoteExecutionError


def _redact(text: str, api_key: str | None) -> str:
    if api_key:
        text = text.replace(api_key, f"<{API_KEY_VARIABLE}>")
    return text


__all__ = [
    "API_KEY_VARIABLE",
    "DEFAULT_ATTEMPTS",
    "DEFAULT_BACKOFF_S",
    "DEFAULT_HOST",
    "DEFAULT_TIMEOUT_S",
    "HOST_VARIABLE",
    "MissingApiKeyError",
    "ModelNotServedError",
    "NdifBackend",
    "LocalRoundTripBackend",
    "NdifSettings",
    "REMOTE_MAX_BATCH_SIZE",
    "REMOTE_MAX_PADDED_TOKENS",
    "RemoteError",
    "RemoteExecutionError",
    "RemoteMode",
    "RemoteTimeoutError",
    "RemoteUnavailableError",
    "RequestRejectedError",
    "SKIP_STATUS_CHECK_VARIABLE",
    "check_model_served",
    "classify_error",
    "configure_nnsight",
    "normalize_remote",
    "public_host",
    "read_settings",
    "remote_batches",
    "remote_call",
    "remote_description",
    "trace_options",
]
