"""RewardModel: scores (prompt, response) text pairs for online RL. Three sources, chosen
once at setup: an HF sequence classifier, a Python function `module:function`, or an HTTP
endpoint. Shaping (baseline, normalisation, clipping, EOS penalty) is the coordinator's, in
rlhf.advantages.shape_scores."""

from __future__ import annotations

import importlib
import json
import math
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable

import torch

from actors.base import RankInfo, Worker
from rlhf.config import ModelConfig, RewardConfig
from rlhf.roles import RewardSpec


class RewardError(RuntimeError):
    """A reward source failed or answered nonsense; the message names the source."""


def _check(scores: list, n: int, source: str) -> torch.Tensor:
    if not isinstance(scores, list | tuple) or len(scores) != n:
        got = f"{len(scores)} values" if isinstance(scores, list | tuple) else type(scores).__name__
        raise RewardError(f"{source} returned {got} for {n} responses")
    try:
        values = [float(s) for s in scores]
    except (TypeError, ValueError) as err:
        raise RewardError(f"{source} returned a non-number: {err}") from None
    bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
    if bad:
        raise RewardError(
            f"{source} returned a non-finite reward for response {bad[0]}: {values[bad[0]]}"
        )
    return torch.tensor(values, dtype=torch.float32)


class FunctionScorer:
    def __init__(self, spec: str):
        module, _, name = spec.partition(":")
        try:
            self.fn: Callable = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as err:
            raise RewardError(f"reward.function={spec!r} cannot be imported: {err}") from None
        self.source = f"reward function {spec}"

    def __call__(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        return _check(self.fn(prompts, responses), len(responses), self.source)


class HTTPScorer:
    """POST {"prompts": [...], "responses": [...]} -> {"rewards": [...]}, with a timeout,
    retries (exponential back-off) and a bearer token read from an environment variable."""

    def __init__(self, rc: RewardConfig):
        self.url, self.timeout, self.retries = rc.url, rc.timeout_s, rc.retries
        self.headers = {"Content-Type": "application/json", **rc.headers}
        if rc.token_env:
            token = os.environ.get(rc.token_env)
            if not token:
                raise RewardError(
                    f"reward.token_env={rc.token_env}: that environment variable is not set"
                )
            self.headers["Authorization"] = f"Bearer {token}"
        self.source = f"reward endpoint {rc.url}"

    def __call__(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        body = json.dumps({"prompts": prompts, "responses": responses}).encode()
        last = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(0.5 * 2 ** (attempt - 1), 8.0))
            request = urllib.request.Request(
                self.url, data=body, headers=self.headers, method="POST"
            )
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as reply:
                    payload = json.loads(reply.read().decode())
                if not isinstance(payload, dict) or "rewards" not in payload:
                    raise RewardError(
                        f"{self.source} answered without a 'rewards' list: {str(payload)[:200]}"
                    )
                return _check(payload["rewards"], len(responses), self.source)
            except urllib.error.HTTPError as err:
                last = f"HTTP {err.code} {err.reason}"
                if 400 <= err.code < 500 and err.code != 429:
                    break  # the request itself is wrong: retrying cannot help
            except (urllib.error.URLError, TimeoutError, OSError) as err:
                reason = getattr(err, "reason", err)
                last = (
                    f"timed out after {self.timeout:g}s"
                    if isinstance(reason, TimeoutError) or "timed out" in str(reason)
                    else str(reason)
                )
            except json.JSONDecodeError as err:
                last = f"answer is not JSON ({err.msg})"
        raise RewardError(f"{self.source} failed after {attempt + 1} attempt(s): {last}")


class ModelScorer:
    """An HF sequence classifier on prompt + response text. One score: that logit; two or more
    classes: log-odds of the last class (the "positive" label) against the first."""

    def __init__(
        self,
        model_cfg: ModelConfig,
        device: str,
        max_length: int = 512,
        batch_size: int = 16,
        precision: str | None = None,
    ):
        from rlhf.models import load_model, load_tokenizer

        self.tokenizer = load_tokenizer(model_cfg)
        self.model = load_model(
            model_cfg,
            "classifier",
            num_labels=_num_labels(model_cfg),
            device=device,
            trainable=False,
            pad_token_id=self.tokenizer.pad_token_id,
            precision=precision,
        )
        self.device, self.max_length, self.batch_size = device, max_length, batch_size
        self.source = f"reward model {model_cfg.name_or_path}"

    @torch.no_grad()
    def __call__(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        out = []
        texts = [p + r for p, r in zip(prompts, responses, strict=True)]
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(
                texts[i : i + self.batch_size],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=self.max_length,
            )
            logits = self.model(**{k: v.to(self.device) for k, v in enc.items()}).logits.float()
            out.append(logits[:, 0] if logits.shape[1] == 1 else logits[:, -1] - logits[:, 0])
        return torch.cat(out).cpu()


def _num_labels(model_cfg: ModelConfig) -> int:
    from transformers import AutoConfig

    from rlhf.assets import resolve_model_path

    config = AutoConfig.from_pretrained(
        resolve_model_path(model_cfg.name_or_path), trust_remote_code=model_cfg.trust_remote_code
    )
    return getattr(config, "num_labels", 1) or 1


def make_scorer(spec: RewardSpec, device: str = "cpu"):
    """The reward source of roles.reward (a function, an HTTP endpoint or an HF model)."""
    rc = spec.reward
    if rc.type == "function":
        return FunctionScorer(rc.function)  # type: ignore[arg-type]
    if rc.type == "http":
        return HTTPScorer(rc)
    if rc.type == "model":
        return ModelScorer(  # type: ignore[arg-type]
            rc.model, device, spec.max_length, precision=spec.precision
        )
    raise RewardError("roles.reward.type=none: this run has no reward source")


class RewardModel(Worker):
    def __init__(self, info: RankInfo, spec: RewardSpec):
        super().__init__(info)
        self.scorer = make_scorer(spec, self.device)

    def score(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        return self.scorer(prompts, responses)

    def perf_module(self):
        model = getattr(self.scorer, "model", None)
        return (model, model.dtype) if model is not None else (None, None)
