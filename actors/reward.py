"""RewardModel: scores (prompt, response) text pairs for online RL. Three sources, chosen
once at setup: an HF sequence classifier, a Python function `module:function`, or an HTTP
endpoint. Shaping (baseline, normalisation, clipping, EOS penalty) is the coordinator's, in
rlhf.advantages.shape_scores."""

from __future__ import annotations

import inspect
import itertools
import json
import math
import multiprocessing
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from actors.base import RankInfo, Worker
from rlhf.config import ModelConfig, RewardConfig, import_object
from rlhf.roles import RewardSpec
from rlhf.verifiers import score_chunk

#: Per sample: the prompt row's extra fields (rlhf.data: PromptFeatures.fields).
Fields = list[dict]


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


@dataclass
class Scores:
    """What a reward source returns for a batch: the rewards, and for verifiable rewards each
    sample's verdict (correct: the first verifier gave 1) and reasons; metrics for the step's
    row (reward/<verifier>, timing/reward)."""

    values: torch.Tensor
    correct: list[bool] | None = None
    reasons: list[str] | None = None
    metrics: dict[str, float] = field(default_factory=dict)

    def select(self, rows: list[int]) -> Scores:
        """These rows' scores (the metrics stay the whole batch's)."""
        pick = lambda xs: None if xs is None else [xs[i] for i in rows]  # noqa: E731
        index = torch.tensor(rows, dtype=torch.long)
        return Scores(self.values[index], pick(self.correct), pick(self.reasons), self.metrics)

    def plus(self, env_reward: torch.Tensor | None) -> Scores:
        """The scores with multi-turn episodes' environment rewards added (None: as they are;
        rollout/env_reward reports them)."""
        if env_reward is None:
            return self
        values = self.values + env_reward.to(self.values.dtype)
        return Scores(values, self.correct, self.reasons, self.metrics)

    @staticmethod
    def cat(parts: list[Scores]) -> Scores:
        """Scores of several batches, in order (the metrics are the first batch's)."""
        joined = lambda name: (  # noqa: E731
            None
            if getattr(parts[0], name) is None
            else [x for p in parts for x in getattr(p, name)]
        )
        values = torch.cat([p.values for p in parts])
        return Scores(values, joined("correct"), joined("reasons"), dict(parts[0].metrics))


def write_eval_samples(
    path: Path,
    step: int,
    prompts: list[str],
    rows: list,
    responses: list[str],
    scored: Scores,
    episodes: list[str] | None = None,
) -> None:
    """Append one JSON line per held-out sample: step, prompt, fields, response, reward and,
    for verifiable rewards, the verdict and its reasons; for a multi-turn episode, the
    response is its last turn and `episode` the whole exchange after the prompt."""
    with path.open("a") as f:
        for k, response in enumerate(responses):
            record = {
                "step": step,
                "prompt": prompts[k],
                "fields": rows[k].fields,
                "response": response,
                "reward": round(scored.values[k].item(), 6),
            }
            if scored.correct is not None:
                record["correct"] = scored.correct[k]
            if scored.reasons is not None:
                record["reason"] = scored.reasons[k]
            if episodes is not None:
                record["episode"] = episodes[k]
            f.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")


def _import_function(spec: str) -> Callable:
    return import_object(spec, "reward.function", RewardError)


def function_fields(fn: Callable) -> tuple[tuple[str, ...], bool]:
    """(the row fields a reward function names as parameters after (prompts, responses),
    whether it takes **kwargs, i.e. every field). Named parameters without a default are
    required: a row without one is quarantined."""
    params = list(inspect.signature(fn).parameters.values())[2:]
    named = tuple(
        p.name
        for p in params
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.default is p.empty
    )
    return named, any(p.kind == p.VAR_KEYWORD for p in params)


def required_fields(rc: RewardConfig) -> tuple[str, ...]:
    """The prompt-row fields the reward needs (a row missing one is bad input)."""
    if rc.type == "function":
        return function_fields(_import_function(rc.function))[0]  # type: ignore[arg-type]
    if rc.type == "verifiable":
        return tuple(dict.fromkeys(v.ground_truth for v in rc.verifiers if v.ground_truth))
    return ()


class FunctionScorer:
    def __init__(self, spec: str):
        self.fn = _import_function(spec)
        self.named, self.takes_all = function_fields(self.fn)
        self.source = f"reward function {spec}"

    def __call__(
        self, prompts: list[str], responses: list[str], fields: Fields | None = None
    ) -> torch.Tensor:
        rows = fields or [{} for _ in responses]
        keys = sorted({k for r in rows for k in r}) if self.takes_all else self.named
        kwargs = {k: [r.get(k) for r in rows] for k in keys}
        return _check(self.fn(prompts, responses, **kwargs), len(responses), self.source)


class VerifiableScorer:
    """roles.reward.verifiers over each response and its row's ground truth, in `workers`
    processes (spawned once; each gets an equal chunk of the batch), or in this process when
    workers is 0. A verifier that fails on a response scores 0 with the error as its reason."""

    def __init__(self, rc: RewardConfig):
        self.verifiers = [v.model_dump() for v in rc.verifiers]
        for v, cfg in zip(self.verifiers, rc.verifiers, strict=True):
            v["field"] = cfg.ground_truth
        self.names = _verifier_names(rc)
        self.workers = rc.workers
        self.pool: ProcessPoolExecutor | None = None

    def __call__(self, prompts: list[str], responses: list[str], fields: Fields | None) -> Scores:
        rows = fields or [{} for _ in responses]
        if self.workers and len(responses) > 1:
            if self.pool is None:
                # spawn: a fork of a process with Ray's threads could deadlock.
                context = multiprocessing.get_context("spawn")
                self.pool = ProcessPoolExecutor(self.workers, mp_context=context)
            n = min(self.workers, len(responses))
            bounds = [len(responses) * i // n for i in range(n + 1)]
            futures = [
                self.pool.submit(score_chunk, self.verifiers, responses[lo:hi], rows[lo:hi])
                for lo, hi in itertools.pairwise(bounds)
            ]
            results = [x for f in futures for x in f.result()]
        else:
            results = score_chunk(self.verifiers, responses, rows)
        totals = torch.tensor([r[0] for r in results], dtype=torch.float32)
        parts = torch.tensor([r[1] for r in results], dtype=torch.float32).view(len(results), -1)
        metrics = {f"reward/{name}": parts[:, i].mean().item() for i, name in enumerate(self.names)}
        return Scores(
            totals, [bool(r[1][0] >= 1.0) for r in results], [r[2] for r in results], metrics
        )

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)
            self.pool = None


def _verifier_names(rc: RewardConfig) -> list[str]:
    """reward/<name> of each verifier: its kind, numbered when a kind repeats."""
    kinds = [v.kind for v in rc.verifiers]
    return [
        k if kinds.count(k) == 1 else f"{k}_{kinds[: i + 1].count(k)}" for i, k in enumerate(kinds)
    ]


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

    def __call__(
        self, prompts: list[str], responses: list[str], fields: Fields | None = None
    ) -> torch.Tensor:
        """`fields` are not sent: the endpoint's protocol is {prompts, responses}."""
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
    def __call__(
        self, prompts: list[str], responses: list[str], fields: Fields | None = None
    ) -> torch.Tensor:
        """Scores the text alone (a classifier reads no row fields)."""
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


class Reward:
    """The reward source of roles.reward, called as reward(prompts, responses, fields) ->
    Scores; its time is timing/reward. `source` is the scorer: a function, an HTTP endpoint,
    an HF model (tensors) or the verifiers (Scores)."""

    def __init__(self, source):
        self.source = source
        self.model = getattr(source, "model", None)

    def __call__(
        self, prompts: list[str], responses: list[str], fields: Fields | None = None
    ) -> Scores:
        start = time.perf_counter()
        out = self.source(prompts, responses, fields)
        scores = out if isinstance(out, Scores) else Scores(out)
        scores.metrics["timing/reward"] = time.perf_counter() - start
        return scores

    def close(self) -> None:
        """Stops the verifiers' processes (the other sources hold none)."""
        if isinstance(self.source, VerifiableScorer):
            self.source.close()


def make_scorer(spec: RewardSpec, device: str = "cpu") -> Reward:
    """The reward source of roles.reward (a function, an HTTP endpoint, an HF model or the
    verifiers)."""
    rc = spec.reward
    if rc.type == "function":
        return Reward(FunctionScorer(rc.function))  # type: ignore[arg-type]
    if rc.type == "verifiable":
        return Reward(VerifiableScorer(rc))
    if rc.type == "http":
        return Reward(HTTPScorer(rc))
    if rc.type == "model":
        return Reward(
            ModelScorer(rc.model, device, spec.max_length, precision=spec.precision)  # type: ignore[arg-type]
        )
    raise RewardError("roles.reward.type=none: this run has no reward source")


class RewardModel(Worker):
    def __init__(self, info: RankInfo, spec: RewardSpec):
        super().__init__(info)
        self.scorer = make_scorer(spec, self.device)

    def score(
        self, prompts: list[str], responses: list[str], fields: Fields | None = None
    ) -> Scores:
        return self.scorer(prompts, responses, fields)

    def perf_module(self):
        model = self.scorer.model
        return (model, model.dtype) if model is not None else (None, None)
