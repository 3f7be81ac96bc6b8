"""The LLM judge against a local chat-completions server that sends good, malformed, partial,
slow and failing replies. The API key must never leave the Authorization header."""

from __future__ import annotations

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from lrsafety.cli import main
from lrsafety.judges import JudgeItem, get_judge
from lrsafety.judges.llm import RUBRIC, JudgeReplyError, parse_refusal_reply

SENTINEL_KEY = "sk-test-SENTINEL-7f3a9c51d2e8"


class FakeEndpoint:
    """State of the local server: requests seen per case, headers, in-flight requests."""

    def __init__(self):
        self.lock = threading.Lock()
        self.calls: dict[str, int] = {}
        self.payloads: list[dict] = []
        self.authorization: list[str | None] = []
        self.in_flight = 0
        self.max_in_flight = 0


def make_handler(state: FakeEndpoint):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep pytest output quiet
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            case = body["messages"][1]["content"].split("\n")[1]
            authorization = self.headers.get("Authorization")
            with state.lock:
                state.calls[case] = state.calls.get(case, 0) + 1
                attempt = state.calls[case]
                state.payloads.append(body)
                state.authorization.append(authorization)
                state.in_flight += 1
                state.max_in_flight = max(state.max_in_flight, state.in_flight)
            try:
                self.answer(case, attempt, authorization)
            finally:
                with state.lock:
                    state.in_flight -= 1

        def answer(self, case, attempt, authorization):
            contents = {
                "good-1": '{"refusal": 1}',
                "good-0": ' {"refusal":0}\n',
                "prose": "The response is a refusal.",
                "extra-key": '{"refusal": 1, "reason": "declines"}',
                "boolean": '{"refusal": true}',
                "string": '{"refusal": "1"}',
                "two": '{"refusal": 2}',
                "partial": '{"refusal": ',
                "echo-key": f"Your header was {authorization}",
            }
            if case in contents:
                self.send_json(200, {"choices": [{"message": {"role": "assistant", "content": contents[case]}}]})
            elif case == "slow":
                time.sleep(1.0)
                self.send_json(200, {"choices": [{"message": {"content": '{"refusal": 1}'}}]})
            elif case == "busy":
                time.sleep(0.15)
                self.send_json(200, {"choices": [{"message": {"content": '{"refusal": 0}'}}]})
            elif case == "flaky":
                if attempt == 1:
                    self.send_json(503, {"error": "overloaded"})
                else:
                    self.send_json(200, {"choices": [{"message": {"content": '{"refusal": 1}'}}]})
            elif case == "always-500":
                self.send_json(500, {"error": "internal"})
            elif case == "unauthorized":
                self.send_json(401, {"error": f"invalid key {authorization}"})
            elif case == "not-completion":
                self.send_json(200, {"oops": 1})
            else:
                self.send_json(400, {"error": f"unknown case {case}"})

        def send_json(self, status, payload):
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    return Handler


@pytest.fixture
def endpoint():
    state = FakeEndpoint()
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(state))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.base_url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    yield state
    server.shutdown()
    server.server_close()


@pytest.fixture
def api_key(monkeypatch):
    monkeypatch.setenv("LRSAFETY_JUDGE_API_KEY", SENTINEL_KEY)
    return SENTINEL_KEY


def make_judge(endpoint, **options):
    settings = {"base_url": endpoint.base_url, "model": "judge-model", "timeout_s": 0.4, "backoff_s": 0.01,
                "max_attempts": 3, "max_concurrency": 4}
    settings.update(options)
    return get_judge("llm", **settings)


def item(case: str) -> JudgeItem:
    # The fake server reads the case name from the first line of the instruction.
    return JudgeItem(prompt=case, response="some response", language="en")


def test_parse_refusal_reply_strict():
    assert parse_refusal_reply('{"refusal": 1}') == 1
    assert parse_refusal_reply(' {"refusal":0} ') == 0
    for reply in ['{"refusal": true}', '{"refusal": "1"}', '{"refusal": 2}', '{"refusal": 1, "why": "x"}',
                  '{"Refusal": 1}', "[1]", "refusal: 1", '{"refusal": ', "", '```json\n{"refusal": 1}\n```']:
        with pytest.raises(JudgeReplyError):
            parse_refusal_reply(reply)


def test_good_replies_and_request_payload(endpoint, api_key):
    judge = make_judge(endpoint)
    results = judge.judge([item("good-1"), item("good-0")])
    assert [result.refusal for result in results] == [1, 0]
    assert all(result.error is None for result in results)

    payload = endpoint.payloads[0]
    assert payload["model"] == "judge-model"
    assert payload["temperature"] == 0
    assert payload["max_tokens"] == 32
    assert payload["response_format"] == {"type": "json_object"}
    assert payload["messages"][0] == {"role": "system", "content": RUBRIC}
    assert payload["messages"][1]["content"] == "Instruction:\ngood-1\n\nResponse:\nsome response"
    assert set(endpoint.authorization) == {f"Bearer {SENTINEL_KEY}"}


@pytest.mark.parametrize("case", ["prose", "extra-key", "boolean", "string", "two", "partial"])
def test_malformed_and_partial_replies_are_errors(endpoint, api_key, case):
    judge = make_judge(endpoint)
    result = judge.judge([item(case)])[0]
    assert result.refusal is None
    assert result.error.startswith("invalid judge reply")
    # A reply that arrived but is invalid is not retried.
    assert endpoint.calls[case] == 1


def test_timeout_retried_then_reported(endpoint, api_key):
    judge = make_judge(endpoint, timeout_s=0.3, max_attempts=2)
    result = judge.judge([item("slow")])[0]
    assert result.refusal is None
    assert result.error == "gave up after 2 attempts: request timed out after 0.3 s"
    assert endpoint.calls["slow"] == 2


def test_server_errors_retried_with_backoff(endpoint, api_key):
    judge = make_judge(endpoint)
    flaky, failing = judge.judge([item("flaky"), item("always-500")])
    assert flaky.refusal == 1
    assert endpoint.calls["flaky"] == 2
    assert failing.refusal is None
    assert failing.error == "gave up after 3 attempts: HTTP 500 from the judge endpoint"
    assert endpoint.calls["always-500"] == 3


def test_reply_that_is_not_a_completion(endpoint, api_key):
    result = make_judge(endpoint).judge([item("not-completion")])[0]
    assert result.refusal is None
    assert result.error.startswith("reply is not a chat completion")


def test_concurrency_limit(endpoint, api_key):
    judge = make_judge(endpoint, max_concurrency=2)
    results = judge.judge([item("busy") for _ in range(6)])
    assert [result.refusal for result in results] == [0] * 6
    assert endpoint.max_in_flight == 2


def test_missing_key_variable_named():
    with pytest.raises(ValueError, match="environment variable LRSAFETY_NO_SUCH_KEY is not set"):
        get_judge("llm", base_url="http://127.0.0.1:9/v1", model="m", api_key_env="LRSAFETY_NO_SUCH_KEY")


def test_key_never_in_outputs_or_logs(endpoint, api_key, tmp_path, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    judge = make_judge(endpoint, timeout_s=0.3, max_attempts=2)
    results = judge.judge([item(case) for case in ("good-1", "echo-key", "unauthorized", "slow", "always-500")])
    assert results[0].refusal == 1
    assert "[redacted]" in results[1].error
    assert results[2].error.startswith("HTTP 401")
    assert "[redacted]" in results[2].error
    assert "LRSAFETY_JUDGE_API_KEY" in results[2].error

    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(json.dumps({"prompt": case, "response": "r", "language": "en"})
                                for case in ("good-0", "echo-key", "unauthorized")) + "\n")
    target = tmp_path / "out.jsonl"
    status = main(["judge", "--input", str(source), "--judge", "llm", "--out", str(target), "--no-progress",
                   "--base-url", endpoint.base_url, "--llm-model", "judge-model", "--timeout", "2"])
    assert status == 0
    captured = capsys.readouterr()

    texts = [
        repr(results), repr(judge), json.dumps(judge.describe()), caplog.text, captured.out, captured.err,
        target.read_text(), (tmp_path / "out.jsonl.meta.json").read_text(),
    ]
    for text in texts:
        assert SENTINEL_KEY not in text
        assert SENTINEL_KEY[:16] not in text
    assert [json.loads(line)["refusal"] for line in target.read_text().splitlines()] == [0, None, None]
