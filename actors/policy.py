"""PolicyTrainer: a DeepSpeed ZeRO (0/1/2/3) engine on one data-parallel rank.

Offline train steps (SFT, reward models, the DPO family, KTO, ORPO) run the objective chosen
once at setup; an eval step; HF-format export gathered under ZeRO-3; full checkpoint and
resume of model, optimizer, scheduler and RNG state.

A step whose loss is NaN/inf on any rank is skipped on every rank (no optimizer update): the
ranks agree through an all-reduce of the flag, and the optimizer's step is a no-op for it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from actors.base import RankInfo, Worker
from actors.metrics import reduce_metrics
from actors.rollout import HFBackend, SeededSampler
from actors.weight_sync import BucketSender, lora_delta, merged_named_weights, open_channel
from rlhf.config import RolloutConfig, TrainConfig
from rlhf.logs import warn_once
from rlhf.models import load_model, load_tokenizer, merge_lora, write_adapter_info
from rlhf.objectives import (
    KLPenalty,
    RefLogps,
    metric_sums,
    token_logps,
    token_values,
)
from rlhf.optim import make_scheduler
from rlhf.precision import Precision, model_width, resolve_precision
from rlhf.roles import TrainerSpec
from rlhf.rollout import Rollout

log = logging.getLogger(__name__)

#: Test hook: comma-separated optimizer steps (1-based) whose loss is made NaN, to exercise
#: the skip-and-abort path without waiting for a real divergence.
FAULT_NAN_STEPS = "RLHF_FAULT_NAN_STEPS"


def _skippable(cls: type[torch.optim.Optimizer]) -> type[torch.optim.Optimizer]:
    """A subclass of `cls` whose next step() can be cancelled (DeepSpeed calls the innermost
    optimizer's step at the accumulation boundary, under every ZeRO stage)."""

    class Skippable(cls):  # type: ignore[misc, valid-type]
        skip_next = False

        def step(self, closure=None):
            if self.skip_next:
                self.skip_next = False
                return None
            return super().step(closure)

    Skippable.__name__ = f"Skippable{cls.__name__}"
    return Skippable


def _unfusable(params) -> str:
    """Why torch's fused AdamW cannot take `params` ("" when it can): it takes floating
    tensors on one CPU or CUDA device."""
    params = list(params)
    devices = {p.device for p in params}
    if len(devices) != 1:
        return (
            f"the parameters sit on {len(devices)} devices ({', '.join(sorted(map(str, devices)))})"
        )
    if next(iter(devices)).type not in ("cpu", "cuda"):
        return f"the parameters sit on {next(iter(devices))}"
    dtypes = sorted({str(p.dtype) for p in params if not p.is_floating_point()})
    return f"some parameters are not floating point ({', '.join(dtypes)})" if dtypes else ""


def make_optimizer(params, train: TrainConfig) -> torch.optim.Optimizer:
    kwargs = {"lr": train.lr, "betas": tuple(train.adam_betas), "weight_decay": train.weight_decay}
    if train.optimizer == "adamw":
        cls = torch.optim.AdamW
        # The fused kernel (HF Trainer's default, so TRL's): one pass over every tensor; on
        # CPU the tiny model's step takes 0.5 ms instead of 1.5-2 ms. Same update, same state.
        why = _unfusable(params)
        if not why:
            kwargs["fused"] = True
        else:
            warn_once(log, "fused-adamw", f"AdamW runs without its fused kernel (slower): {why}")
    elif train.optimizer == "cpu_adam":
        from deepspeed.ops.adam import DeepSpeedCPUAdam as cls
    else:
        import bitsandbytes as bnb

        cls = {
            "adamw_8bit": bnb.optim.AdamW8bit,
            "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
            "paged_adamw_32bit": bnb.optim.PagedAdamW32bit,
        }[train.optimizer]
    return _skippable(cls)(params, **kwargs)


def deepspeed_config(spec: TrainerSpec, world_size: int, precision: Precision) -> dict:
    """The engine's config. DeepSpeed's bf16/fp16 modes on GPU only: on CPU a mixed-precision
    run computes under autocast over fp32 weights (rlhf.precision)."""
    t, rows = spec.train, spec.rows_per_update
    on_gpu = precision.device_type != "cpu"
    zero: dict = {"stage": t.zero_stage}
    if t.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if t.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "train_batch_size": rows,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": rows // (t.micro_batch_size * world_size),
        "gradient_clipping": t.max_grad_norm or 0.0,
        "zero_optimization": zero,
        "bf16": {"enabled": precision.deepspeed == "bf16"},
        "fp16": {"enabled": precision.deepspeed == "fp16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


@dataclass
class StepResult:
    """What one optimizer step reports back to the coordinator (per rank)."""

    metrics: dict[str, float]
    skipped: bool = False
    bad_indices: list[int] = field(default_factory=list)


class DeepSpeedTrainer(Worker):
    """The engine machinery shared by the policy and (online) critic trainers; the spec says
    which role and model kind this rank trains."""

    def __init__(self, info: RankInfo, spec: TrainerSpec, total_steps: int):
        super().__init__(info)
        import deepspeed

        self.spec, self.role, self.kind = spec, spec.role, spec.kind
        self.init_process_group()
        # Identical initial weights (e.g. freshly initialised heads) on every rank.
        torch.manual_seed(spec.train.seed)
        model_cfg = self.model_cfg = spec.model
        self.tokenizer = load_tokenizer(spec.tokenizer)
        # Trainers load fp32 weights: the masters. DeepSpeed (GPU) casts the module to
        # bf16/fp16; on CPU autocast computes in bf16 from them.
        if not model_cfg.quantization:
            model_cfg = model_cfg.model_copy(update={"dtype": "float32"})
        model = load_model(
            model_cfg,
            self.kind,
            num_labels=spec.num_labels,
            device=self.device,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        width = model_width(model.config)
        self.precision = resolve_precision(spec.train.precision, self.device, width)
        if info.rank == 0:
            print(f"{self.role}: {self.precision}", flush=True)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = make_optimizer(params, spec.train)
        scheduler = make_scheduler(optimizer, spec.train, total_steps)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=deepspeed_config(spec, info.world_size, self.precision),
        )
        self._inner_optimizer = optimizer
        if info.world_size == 1 and spec.train.zero_stage == 0 and not self.precision.deepspeed:
            # One rank: the gradient all-reduce is an identity, but DeepSpeed still flattens
            # every gradient, reduces over a 1-process group and copies back (~20% of a
            # SmolLM2 step on CPU).
            self.engine.enable_backward_allreduce = False
        # The algorithm's loss, chosen once by the driver (rlhf.objectives.OBJECTIVES).
        self.objective = spec.objective
        self.steps_done = 0
        self._nan_steps = {
            int(s) for s in os.environ.get(FAULT_NAN_STEPS, "").split(",") if s.strip()
        }

    def perf_module(self):
        return self.engine.module, self.precision.dtype

    # ------------------------------------------------------------------ steps

    def _agree(self, bad: bool) -> bool:
        """True on every rank when any rank saw a bad value."""
        flag = torch.tensor([1.0 if bad else 0.0], device=self.device)
        if dist.is_initialized() and self.info.world_size > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)

    def train_step(self, micro_batches: list, refs: list[RefLogps | None]) -> StepResult:
        """One optimizer step over this rank's micro-batches (gradient accumulation)."""
        self.engine.train()
        rows: list[dict[str, float]] = []
        bad_indices: list[int] = []
        step_bad = False
        inject = (self.steps_done + 1) in self._nan_steps
        lr = float(self.scheduler.get_last_lr()[0])  # the rate this step's update uses
        for i, (batch, ref) in enumerate(zip(micro_batches, refs, strict=True)):
            batch = batch.to(self.device)
            ref = _ref_to(ref, self.device)
            with self.precision.compute():
                loss, metrics = self.objective(self.engine, batch, ref)
            if inject:
                loss = loss * float("nan")
            if not torch.isfinite(loss):
                bad_indices += _indices(batch)
            step_bad = self._agree(not torch.isfinite(loss).item()) or step_bad
            if i == len(micro_batches) - 1 and step_bad:
                self._inner_optimizer.skip_next = True  # the boundary step below updates nothing
            # Backward even for a bad loss: every rank must join the same collectives.
            self.engine.backward(loss)
            self.engine.step()
            rows.append({k: float(v) for k, v in {"loss": loss.detach(), **metrics}.items()})
        self.steps_done += 1
        out = reduce_metrics(rows)
        out["lr"] = lr
        norm = self.engine.get_global_grad_norm()
        if norm is not None and not step_bad:
            out["grad_norm"] = float(norm)
        return StepResult(out, skipped=step_bad, bad_indices=bad_indices)

    def eval_step(self, micro_batches: list, refs: list[RefLogps | None]) -> dict[str, float]:
        """Metric sums over this rank's eval micro-batches, with the row count under 'n'."""
        self.engine.eval()
        pairs = (
            (batch.to(self.device), _ref_to(ref, self.device))
            for batch, ref in zip(micro_batches, refs, strict=True)
        )
        with self.precision.compute():
            return metric_sums(self.objective, self.engine, pairs)

    @torch.no_grad()
    def forward(
        self, sequences: list[tuple[torch.Tensor, torch.Tensor]], start: int = 0
    ) -> list[torch.Tensor]:
        """Per-token outputs [B, T-1] for (input_ids, attention_mask) pairs, on the CPU: next-token
        log-probs for the policy (0 before column `start`), values for the critic (every
        column). ZeRO-3: every rank must call it."""
        self.engine.eval()
        if self.role == "critic":
            fn = token_values
        else:

            def fn(model, ids, mask):
                return token_logps(model, ids, mask, start)

        with self.precision.compute():
            return [
                fn(self.engine, ids.to(self.device), mask.to(self.device)).float().cpu()
                for ids, mask in sequences
            ]

    per_token = forward

    # ------------------------------------------------------------------ state

    def save_checkpoint(self, path: str, tag: str) -> None:
        """Model, optimizer and scheduler (DeepSpeed, every rank its shard) plus RNG state."""
        self.engine.save_checkpoint(path, tag=tag, client_state={"steps_done": self.steps_done})
        rng = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": np.random.get_state(),
            "python": random.getstate(),
        }
        torch.save(rng, Path(path) / tag / f"rng_rank{self.info.rank}.pt")

    def load_checkpoint(self, path: str, tag: str) -> int:
        # DeepSpeed checkpoints are pickles: load only what this project wrote (our own
        # output directory), never a checkpoint from an untrusted source.
        # 4-bit (QLoRA) modules save their frozen quantisation state (absmax, quant_map) with
        # the weights, but a freshly quantised model does not list those keys: they are
        # rebuilt identically from the base checkpoint, so only they may go unmatched.
        _, client = self.engine.load_checkpoint(
            path,
            tag=tag,
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
            load_module_strict=self.model_cfg.quantization is None,
        )
        self.steps_done = int(client["steps_done"])
        rng = torch.load(Path(path) / tag / f"rng_rank{self.info.rank}.pt", weights_only=False)
        torch.set_rng_state(rng["torch"])
        if rng["cuda"]:
            torch.cuda.set_rng_state_all(rng["cuda"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        return self.steps_done

    def _full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Every parameter and buffer, gathered under ZeRO-3; returned on rank 0 only."""
        import deepspeed

        module = self.engine.module
        zero3 = self.spec.train.zero_stage == 3
        ctx = (
            deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)
            if zero3
            else contextlib.nullcontext()
        )
        with ctx:
            if self.info.rank != 0:
                return None
            return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}

    def export(self, out_dir: str, merge: bool = True) -> str | None:
        """Save the trained model in HF format (safetensors) on rank 0; LoRA adapters are merged
        into their base unless merge=False. Collective: every rank must call it."""
        state = self._full_state_dict()
        if state is None:
            return None
        out = Path(out_dir)
        module = self.engine.module
        if hasattr(module, "peft_config"):
            adapter_dir = out / "adapter" if not merge else out.with_name(out.name + ".adapter")
            # peft keeps only the adapter's (and modules_to_save's) entries of the full state.
            module.save_pretrained(adapter_dir, state_dict=state, safe_serialization=True)
            self.tokenizer.save_pretrained(adapter_dir)
            num_labels = self.spec.num_labels if self.kind == "classifier" else 1
            write_adapter_info(adapter_dir, self.model_cfg.name_or_path, self.kind, num_labels)
            if merge:
                merge_lora(
                    self.model_cfg.name_or_path,
                    str(adapter_dir),
                    out,
                    trust_remote_code=self.model_cfg.trust_remote_code,
                )
                shutil.rmtree(adapter_dir)
        else:
            module.save_pretrained(out, state_dict=state, safe_serialization=True)
            self.tokenizer.save_pretrained(out)
        return str(out)

    # ------------------------------------------------------------------ weight sync

    def weight_specs(self) -> list[tuple[str, list[int], str]]:
        """(name, full shape, dtype) of every weight the rollout engines receive."""
        specs = []
        for name, p, _ in merged_named_weights(self.engine.module):
            shape = list(getattr(p, "ds_shape", p.shape))  # ZeRO-3 keeps the full shape here
            specs.append((name, shape, str(p.dtype).replace("torch.", "")))
        return specs

    def init_weight_sync(self, addr: str, groups: list[tuple[int, int, str]]) -> None:
        """Rank 0 joins each sync group, (port, world size, transport), as its rank 0 (and
        packs the buckets); other ranks only help gather."""
        self.sync_sender = None
        if self.info.rank == 0:
            channels = [
                open_channel(addr, port, world, 0, transport, self.device)
                for port, world, transport in groups
            ]
            self.sync_sender = BucketSender(channels, self.weight_specs(), self.device)

    @torch.no_grad()
    def broadcast_weights(self) -> int:
        """Send every weight to the rollout engines (collective over the training ranks under
        ZeRO-3, which gather one parameter at a time)."""
        import deepspeed

        zero3 = self.spec.train.zero_stage == 3
        sender = self.sync_sender
        if sender is not None:
            sender.begin()
        for _, p, lora in merged_named_weights(self.engine.module):
            params = [p] + (list(_lora_params(lora)) if lora is not None else [])
            ctx = (
                deepspeed.zero.GatheredParameters(params, modifier_rank=None)
                if zero3
                else contextlib.nullcontext()
            )
            with ctx:
                if sender is not None:
                    sender.add(p.data if lora is None else p.data + lora_delta(lora).to(p.dtype))
        return sender.finish() if sender is not None else 0

    @torch.no_grad()
    def greedy_generate(self, prompts, max_new_tokens: int) -> torch.Tensor:
        """The policy's own greedy continuation (ZeRO 0-2), to check rollouts after a sync."""
        module = self.engine.module
        module.eval()
        out = module.generate(
            input_ids=prompts.input_ids.to(self.device),
            attention_mask=prompts.attention_mask.to(self.device),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        return out[:, prompts.input_ids.shape[1] :].cpu()

    def parameter_digest(self) -> list[float]:
        """Sum and L2 norm of every parameter (gathered): cheap fingerprints for tests."""
        state = self._full_state_dict()
        if state is None:
            return []
        return [
            float(sum(v.double().sum() for v in state.values())),
            float(sum(v.double().pow(2).sum() for v in state.values())),
        ]


class CriticTrainer(DeepSpeedTrainer):
    """The PPO value model: one value per token, initialised from the configured critic model,
    else the reward model (when it is an HF model), else the policy (rlhf.roles.trainer_spec)."""


class PolicyTrainer(DeepSpeedTrainer):
    """The trained model (its kind follows the algorithm: causal LM, or a reward model /
    classifier for algorithm: rm). With roles.rollout.hybrid it is also its rank's rollout
    engine."""

    def __init__(self, info: RankInfo, spec: TrainerSpec, total_steps: int):
        super().__init__(info, spec, total_steps)
        self._sampler: SeededSampler | None = None

    @torch.no_grad()
    def generate(
        self, prompts, step: int | None = None, sampling: RolloutConfig | None = None
    ) -> Rollout:
        """The hybrid engine: RolloutGenerator.generate on the trainer's own module (its
        current weights, so nothing to sync), with the same seeds, under a forked RNG so the
        trainer's random stream (dropout, say) is the same as with a separate engine."""
        if self._sampler is None:
            backend = HFBackend(self.spec.engine, self.device, model=self.engine.module)
            self._sampler = SeededSampler(self.spec.engine, self.info.rank, backend)
        self.engine.eval()
        devices = [torch.cuda.current_device()] if self.device != "cpu" else []
        with torch.random.fork_rng(devices=devices):
            return self._sampler.generate(prompts, step, sampling)


def _lora_params(layer):
    for name, p in layer.named_parameters():
        if "lora_" in name:
            yield p


def _indices(batch) -> list[int]:
    index = getattr(batch, "index", None)
    return [int(i) for i in index] if index is not None else []


def _ref_to(ref: RefLogps | KLPenalty | None, device: str) -> RefLogps | KLPenalty | None:
    if ref is None or isinstance(ref, KLPenalty):  # KLPenalty: fetched and moved when used
        return ref
    return RefLogps(ref.logps.to(device), None if ref.kl_logps is None else ref.kl_logps.to(device))
