"""Reward sources: a Python function, an HTTP endpoint served on 127.0.0.1 inside the test
(with bearer token, timeout and failures), and an HF sequence classifier — in-process and
as a Ray actor."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from actors.reward import FunctionScorer, HTTPScorer, ModelScorer, RewardError
from rlhf.config import ModelConfig, RewardConfig

PROMPTS = ["Review:", "Review:"]
RESPONSES = ["great great film", "dull film"]


def test_function_scorer():
    scores = FunctionScorer("tests.reward_fns:count_great")(PROMPTS, RESPONSES)
    assert scores.tolist() == [2.0, 0.0]
    with pytest.raises(RewardError, match="returned 1 values for 2 responses"):
        FunctionScorer("tests.reward_fns:wrong_length")(PROMPTS, RESPONSES)
    with pytest.raises(RewardError, match="non-finite reward for response 0"):
        FunctionScorer("tests.reward_fns:not_finite")(PROMPTS, RESPONSES)
    with pytest.raises(RewardError, match="cannot be imported"):
        FunctionScorer("tests.reward_fns:missing")


class Handler(BaseHTTPRequestHandler):
    mode = "ok"
    calls = 0

    def log_message(self, *args):  # keep test output clean
        pass

    def do_POST(self):
        type(self).calls += 1
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.headers.get("Authorization") != "Bearer s3cret":
            return self._send(401, {"error": "no token"})
        if self.mode == "slow":
            time.sleep(1.5)
        if self.mode == "fail":
            return self._send(503, {"error": "down"})
        return self._send(200, {"rewards": [len(r) / 10 for r in body["responses"]]})

    def _send(self, code, payload):
        data = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    Handler.mode, Handler.calls = "ok", 0
    yield f"http://127.0.0.1:{httpd.server_address[1]}/score"
    httpd.shutdown()
    httpd.server_close()


def _http(url, **kw):
    return HTTPScorer(RewardConfig(type="http", url=url, token_env="RM_TOKEN", **kw))


def test_http_scorer(server, monkeypatch):
    monkeypatch.setenv("RM_TOKEN", "s3cret")
    assert _http(server)(PROMPTS, RESPONSES).tolist() == pytest.approx([1.6, 0.9])


def test_http_timeout_and_failures_are_clear(server, monkeypatch):
    monkeypatch.setenv("RM_TOKEN", "s3cret")
    Handler.mode = "slow"
    with pytest.raises(
        RewardError, match=r"reward endpoint .* failed after 1 attempt\(s\): timed out after 0.3s"
    ):
        _http(server, timeout_s=0.3, retries=0)(PROMPTS, RESPONSES)
    Handler.mode, Handler.calls = "fail", 0
    with pytest.raises(RewardError, match=r"failed after 3 attempt\(s\): HTTP 503"):
        _http(server, retries=2)(PROMPTS, RESPONSES)
    assert Handler.calls == 3, "a server error is retried"
    monkeypatch.setenv("RM_TOKEN", "wrong")
    Handler.mode, Handler.calls = "ok", 0
    with pytest.raises(RewardError, match="HTTP 401"):
        _http(server, retries=2)(PROMPTS, RESPONSES)
    assert Handler.calls == 1, "a client error is not retried"
    monkeypatch.delenv("RM_TOKEN")
    with pytest.raises(RewardError, match="RM_TOKEN: that environment variable is not set"):
        _http(server)


def test_http_unreachable_endpoint():
    from actors.net import free_port

    scorer = HTTPScorer(
        RewardConfig(type="http", url=f"http://127.0.0.1:{free_port()}/x", retries=1, timeout_s=1)
    )
    with pytest.raises(RewardError, match=r"failed after 2 attempt\(s\): .*refused"):
        scorer(PROMPTS, RESPONSES)


def test_model_scorer_scores_each_text_alone(tiny_path, tiny_tokenizer, tmp_path):
    from rlhf.models import load_model, save_model

    clf = load_model(
        ModelConfig(name_or_path=str(tiny_path)),
        "classifier",
        num_labels=2,
        pad_token_id=tiny_tokenizer.pad_token_id,
    )
    folder = save_model(clf, tiny_tokenizer, tmp_path / "rm")
    scorer = ModelScorer(ModelConfig(name_or_path=str(folder)), "cpu")
    scores = scorer(PROMPTS, RESPONSES)
    for i, text in enumerate(p + r for p, r in zip(PROMPTS, RESPONSES, strict=True)):
        ids = tiny_tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            logits = scorer.model(**ids).logits[0]
        assert scores[i].item() == pytest.approx((logits[1] - logits[0]).item(), abs=1e-5)
