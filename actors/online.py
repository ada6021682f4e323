"""The online loop (PPO and the critic-free estimators GRPO, RLOO, REINFORCE++):

rollout -> reference log-probs || reward || values || old log-probs -> KL-shaped rewards ->
advantages -> ppo_epochs x mini-batches of policy (|| critic) updates -> weight sync.

Independent calls are submitted together and gathered together, so the roles run
concurrently on their own actors.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import ray
import torch

from actors.groups import (
    ActorGroup,
    CriticGroup,
    PolicyGroup,
    ReferenceGroup,
    RewardGroup,
    RolloutGroup,
    SharedWeights,
    TrainerGroup,
    WeightSync,
    gather,
    start_placement,
)
from actors.metrics import MetricsLogger, RolePerf, reduce_metrics
from actors.reward import Scores, make_scorer, required_fields, write_eval_samples
from actors.run import FAULT_EXIT_AFTER_STEP, StepPlan, init_ray, write_actor_pids, write_checkpoint
from rlhf.advantages import RunningMeanStd
from rlhf.config import RunConfig, dump_config
from rlhf.data import load_datasets, make_collator
from rlhf.episodes import episode_metrics, episode_texts, episodes_for, response_texts
from rlhf.experience import compute_advantages, estimator_for
from rlhf.flops import online_step_flops
from rlhf.kl import logp_gap, make_kl_controller
from rlhf.models import load_tokenizer
from rlhf.objectives import KLPenalty
from rlhf.roles import reward_spec
from rlhf.rollout import (
    INFLIGHT,
    Rollout,
    load_rollouts,
    merge_rollouts,
    rank_slices,
    rollout_token_logps,
    save_rollouts,
    select_rows,
    sequences,
)
from rlhf.rundir import Claim
from rlhf.types import Experience
from rlhf.verifiers import pass_metrics

#: The roles of an online run, in the order they are reported.
ROLE_NAMES = ("policy", "rollout", "reward", "critic", "reference")

#: Rollout seed "step" of evaluation generations (fixed: before/after use the same draws).
EVAL_SEED_STEP = 10**6

#: Rollout seed "step" of dynamic sampling's extra round j of step t: 2·10^6 + 64 t + j.
EXTRA_SEED_STEP = 2 * 10**6


def print_before_after(report: dict) -> None:
    """Held-out prompts with the responses (and rewards) before and after training."""
    if not report["eval_after"]:
        return
    for (prompt, before, r0), (_, after, r1) in zip(
        report["eval_before"], report["eval_after"], strict=False
    ):
        question = (
            prompt.rsplit("user\n", 1)[-1].split("<|im_end|>")[0].strip()
            if "user\n" in prompt
            else prompt.strip()
        )
        print(
            f"\nprompt: {question}\n  before ({r0:+.3f}): {before.strip()[:200]}\n  after  ({r1:+.3f}): {after.strip()[:200]}"
        )


def plot_metrics(metrics_file: Path, png: Path) -> Path | None:
    """reward and KL per step (and held-out reward; with verifiable rewards held-out pass@1
    and pass@k) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(x) for x in metrics_file.read_text().splitlines()]
    train = [r for r in rows if "reward/mean" in r]
    evals = [r for r in rows if "eval/reward/mean" in r]
    if not train:
        return None
    passes = sorted(
        {k for r in evals for k in r if k.startswith("eval/pass@")}, key=lambda k: int(k[10:])
    )
    panels = 3 if passes else 2
    fig, axes = plt.subplots(panels, 1, figsize=(7, 3 * panels), sharex=True)
    top, bottom = axes[0], axes[-1]
    if passes:  # verifiable rewards: held-out pass@k (Chen et al. 2021's estimator)
        for key in (passes[0], passes[-1]) if len(passes) > 1 else passes:
            axes[1].plot(
                [r["step"] for r in evals if key in r],
                [r[key] for r in evals if key in r],
                "o-",
                label=f"held-out {key[5:]}",
            )
        axes[1].set_ylabel("pass@k")
        axes[1].set_ylim(0, 1)
        axes[1].legend()
    top.plot(
        [r["step"] for r in train], [r["reward/mean"] for r in train], label="rollout reward (mean)"
    )
    if evals:
        top.errorbar(
            [r["step"] for r in evals],
            [r["eval/reward/mean"] for r in evals],
            yerr=[r.get("eval/reward/std", 0) for r in evals],
            fmt="o-",
            capsize=3,
            label="held-out reward",
        )
    top.set_ylabel("reward")
    top.legend()
    bottom.plot([r["step"] for r in train], [r["kl/seq"] for r in train], color="tab:red")
    bottom.set_ylabel("KL(policy || reference) per sequence")
    bottom.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


def _rows(refs) -> torch.Tensor | None:
    """Per-rank lists of micro-batch outputs, back in row order (None when no group)."""
    return None if refs is None else torch.cat([t for rank in gather(refs) for t in rank])


def _update_key(role: str, key: str) -> str:
    """The metrics row's name of an update's metric `key` (see collect_updates)."""
    if key == "loss":
        return f"{role}/total_loss"
    return key if key.startswith(("policy/", "value/", "rollout/")) else f"{role}/{key}"


class DeferredRows:
    """Rows of per-token outputs an actor group may still be computing (its call's refs: per
    rank, a list of micro-batch tensors); get() waits for them, wherever it is called. Refs
    nested in an argument reach the receiving actor unresolved, so it can start first."""

    def __init__(self, refs: list, rows: torch.Tensor):
        self.refs, self.rows = refs, rows

    def get(self) -> torch.Tensor:
        return _rows(self.refs)[self.rows]


@dataclass
class InFlight:
    """Async: a batch the engines sample (or sampled) ahead of its step: the engines' refs, the
    weights' version that samples it, and the reference forward queued behind it."""

    step: int
    parts: list
    version: int
    reference: list | None = None


class OnlineRun:
    def __init__(self, cfg: RunConfig, claim: Claim):
        self.cfg, self.claim = cfg, claim
        self.out = Path(cfg.output_dir)
        self.tokenizer = load_tokenizer(cfg.model)
        self.prompts, self.eval_prompts = load_datasets(
            cfg.data, "prompt", self.tokenizer, self.out, required_fields(cfg.roles.reward)
        )
        print(f"data: {self.prompts.summary()}", flush=True)
        self.collate = make_collator("prompt", self.tokenizer.pad_token_id)
        env = cfg.roles.rollout.environment
        if env is not None:  # said here, before any actor, when it cannot be built
            episodes_for(env, self.tokenizer)
        t = cfg.train
        self.plan = StepPlan(
            len(self.prompts),
            t.global_batch_size,
            t.global_batch_size,
            1,
            t.epochs,
            t.max_steps,
            cfg.data.seed,
        )
        self.plan.announce("prompts")
        self.updates = self.plan.total_steps * cfg.ppo.ppo_epochs * cfg.ppo.num_mini_batches
        self.kl = make_kl_controller(cfg.ppo.kl_coef, cfg.ppo.kl_target, cfg.ppo.kl_horizon)
        self.normalizer = RunningMeanStd() if cfg.roles.reward.normalize else None
        # The advantage estimator, chosen once (ppo.estimator).
        self.estimator = estimator_for(cfg.ppo)
        self.critic: CriticGroup | None = None
        self.reward: RewardGroup | None = None
        self.scorer = None  # the reward source when it runs in the driver (reward.run_in)
        self.eval_samples: list[list[tuple[str, str, float]]] = []
        self.reference: ReferenceGroup | None = None

    # ------------------------------------------------------------------ set-up

    def start(self) -> None:
        init_ray(self.cfg)
        dump_config(self.cfg, self.out / "config.yaml")
        # The placement plan on the live nodes: printed, refused before any actor if it cannot fit.
        self.placement = placement = start_placement(self.cfg)
        self.policy = PolicyGroup(self.cfg, self.updates, placement)
        # The hybrid engine samples in the policy's own actors, with its weights.
        hybrid = self.cfg.roles.rollout.hybrid
        self.rollout = self.policy if hybrid else RolloutGroup(self.cfg, placement)
        if self.cfg.roles.reward.in_driver:
            self.scorer = make_scorer(reward_spec(self.cfg))
        else:
            self.reward = RewardGroup(self.cfg, placement)
        if self.cfg.needs_critic:
            self.critic = CriticGroup(self.cfg, self.updates, placement)
        if self.cfg.needs_reference:
            self.reference = ReferenceGroup(self.cfg, placement)
        self.weight_sync = (
            SharedWeights()
            if hybrid
            else WeightSync(self.policy, self.rollout, placement.plan.sync_transports())
        )
        roles = ("policy", "rollout", "reference", "critic", "reward")
        self.perf = RolePerf({role: getattr(self, role) for role in roles})
        write_actor_pids(self.out, {role: getattr(self, role) for role in ROLE_NAMES})

    # ------------------------------------------------------------------ checkpoints

    def save(self, step: int, inflight: list | None = None) -> Path:
        """Policy and critic (DeepSpeed, every rank) plus KL controller, reward normaliser and
        step (the prompt position follows from it); rollout weights come from the policy.
        `inflight` (async): the batches sampled ahead (InFlight), kept too."""
        path = self.out / "checkpoints" / f"step_{step}"

        def save_actors():
            refs = self.policy.submit_save(str(path), "policy")
            if self.critic is not None:
                refs += self.critic.submit_save(str(path), "critic")
            gather(refs)
            if inflight:
                items = [(b.step, b.version, self.collect_rollout(b.parts)) for b in inflight]
                save_rollouts(path / INFLIGHT, items)

        state = {
            "step": step,
            "kl": self.kl.state_dict(),
            "normalizer": self.normalizer.state_dict() if self.normalizer else None,
        }
        return write_checkpoint(self.cfg, self.claim, path, save_actors, state)

    def resume(self) -> int:
        path = self.claim.resume_from
        if path is None:
            return 0
        refs = self.policy.submit_load(str(path), "policy")
        if self.critic is not None:
            refs += self.critic.submit_load(str(path), "critic")
        gather(refs)
        state = json.loads((path / "trainer_state.json").read_text())
        self.kl.load_state_dict(state["kl"])
        if self.normalizer is not None and state["normalizer"]:
            self.normalizer.load_state_dict(state["normalizer"])
        print(f"resumed from {path} at step {state['step']}", flush=True)
        return int(state["step"])

    def sync_weights(self) -> None:
        self.weight_sync.push()

    # ------------------------------------------------------------------ one step

    def engine_batches(self, dataset, indices: list[int]) -> list:
        """The prompts `indices` of `dataset`, dealt round-robin into one batch per engine."""
        engines = self.rollout.world_size
        return [self.collate([dataset[i] for i in indices[e::engines]]) for e in range(engines)]

    def submit_generate(self, step: int) -> list:
        """Queue step `step`'s rollout on the engines (behind a queued weight sync, if any)."""
        return self.rollout.generate(
            self.engine_batches(self.prompts, self.plan.step_indices(step)), step
        )

    def collect_rollout(self, refs: list) -> Rollout:
        return merge_rollouts(self.rollout.gather(refs), self.tokenizer.pad_token_id)

    def submit_forwards(self, parts: list, reference: list | None = None) -> dict[str, list | None]:
        """Queue make_experience's per-token forwards on the rollout's own refs (`parts`, one
        per engine): reference log-probs (unless `reference` holds them, queued earlier), the
        policy's old log-probs (when recomputed) and the critic's values, role -> refs (None
        when not needed). Each rank starts when the rollout is done, while the driver still
        collects, decodes and scores it."""
        recompute = self.old_logps_source == "recompute"
        return {
            "reference": reference or self._forward(self.reference, parts),
            "old": self._forward(self.policy, parts) if recompute else None,
            "values": self._forward(self.critic, parts),
        }

    def _forward(self, group: ActorGroup | None, parts: list) -> list | None:
        if group is None:
            return None
        return group.per_token_forward(
            parts, self.tokenizer.pad_token_id, self.cfg.train.micro_batch_size
        )

    def _queue_batch(self, step: int, version: int, parts: list | None = None) -> InFlight:
        """Async: step `step`'s batch on the engines (or `parts`, restored), with the frozen
        reference's forward queued behind it at once: it runs as soon as the batch exists,
        while the policy still trains earlier steps. (The policy's and critic's forwards wait
        for the step itself: they must see its weights.)"""
        parts = parts or self.submit_generate(step)
        return InFlight(step, parts, version, self._forward(self.reference, parts))

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, step: int) -> dict[str, float]:
        """Mean reward of fresh samples on the held-out prompts (the same seed every time, so
        before/after differ by the policy only), and with verifiable rewards pass@k and mean@n
        over roles.rollout.eval_samples_per_prompt samples; every sample goes to
        eval_samples.jsonl with its verdict; keeps the first responses for the report."""
        if self.eval_prompts is None:
            return {}
        batches = self.engine_batches(self.eval_prompts, list(range(len(self.eval_prompts))))
        s = self.cfg.roles.rollout
        sampling = s.model_copy(update={"n_samples_per_prompt": s.eval_samples_per_prompt})
        parts = gather(self.rollout.generate(batches, EVAL_SEED_STEP, sampling))
        r = merge_rollouts(parts, self.tokenizer.pad_token_id)
        rows, prompts, responses, handle = self.submit_scores(r, self.eval_prompts)
        scored = self.fetch_scores(handle)
        scores = scored.values
        # The report keeps the first response of the first 3 prompts.
        first = {}
        for row, i in enumerate(r.prompt_index.tolist()):
            first.setdefault(i, row)
        kept = list(first.values())[:3]
        self.eval_samples.append([(prompts[k], responses[k], scores[k].item()) for k in kept])
        write_eval_samples(
            self.out / "eval_samples.jsonl",
            step,
            prompts,
            rows,
            responses,
            scored,
            episode_texts(r, self.tokenizer),
        )
        out = {
            "eval/reward/mean": scores.mean().item(),
            "eval/reward/std": scores.std().item() if len(scores) > 1 else 0.0,
            **{f"eval/{k}": v for k, v in episode_metrics(r.extras).items()},
        }
        if scored.correct is not None:
            out.update(pass_metrics(r.prompt_index.tolist(), scored.correct))
        return out

    def submit_scores(self, r: Rollout, dataset) -> tuple[list, list[str], list[str], object]:
        """Decode a rollout of `dataset`'s prompts and start scoring it on the reward actor (a
        ref), or score it here when the reward runs in the driver (Scores): call it after the
        actors' work is submitted, so that both overlap. Returns each row's prompt features
        (their fields go to the reward), prompt texts, responses and the scores' handle."""
        rows = [dataset[int(i)] for i in r.prompt_index]
        prompts, responses = [f.prompt_text for f in rows], self._decode(r)
        fields = [f.fields for f in rows]
        env = r.extras.get("env_reward")  # multi-turn: the environment's rewards, added
        if self.scorer is not None:
            return rows, prompts, responses, self.scorer(prompts, responses, fields).plus(env)
        handle = self.reward.score(prompts, responses, fields)
        return rows, prompts, responses, handle if env is None else (handle, env)

    @staticmethod
    def fetch_scores(handle) -> Scores:
        if isinstance(handle, Scores):
            return handle
        if isinstance(handle, tuple):  # (the reward actor's ref, the environment's rewards)
            return gather([handle[0]])[0].plus(handle[1])
        return gather([handle])[0]

    def _decode(self, r: Rollout) -> list[str]:
        return response_texts(r, self.tokenizer)

    @property
    def kl_in_loss(self) -> bool:
        return self.cfg.ppo.kl_penalty == "loss" and self.reference is not None

    @property
    def single_update(self) -> bool:
        """Every row meets exactly one update, from the weights that sampled it: that update's
        own detached log-probs are then the old ones (what TRL's GRPO does with
        num_iterations=1)."""
        return self.cfg.ppo.ppo_epochs == 1 and self.cfg.ppo.num_mini_batches == 1

    @property
    def old_logps_source(self) -> str | None:
        """Where make_experience takes π_old from: None when nothing needs it before the
        updates (one update per row and no KL in the reward), else a policy forward
        ("recompute") or the rollout engine's own log-probs ("rollout", ppo.old_logps)."""
        kl_in_reward = self.reference is not None and not self.kl_in_loss
        if self.single_update and not kl_in_reward:
            return None
        return self.cfg.ppo.old_logps

    def make_experience(
        self, r: Rollout, forwards: dict[str, list | None], scored: Scores | None = None
    ) -> tuple[Experience, dict[str, float]]:
        """Scores (unless `scored` has them), values, old log-probs and advantages of a
        rollout, whose per-token forwards `submit_forwards` already queued. With the KL in the
        loss, the reference's result is not awaited here: `self.pending_ref` holds its refs
        for the updates, which fetch them after their own forward pass."""
        ids, attention, action = sequences(r)
        if scored is None:
            _, prompt_text, responses, scores = self.submit_scores(r, self.prompts)
        else:
            prompt_text = [self.prompts[int(i)].prompt_text for i in r.prompt_index]
            responses, scores = self._decode(r), scored
        ref_refs, old_refs, value_refs = forwards["reference"], forwards["old"], forwards["values"]
        self.pending_ref = ref_refs if self.kl_in_loss else None
        ref = None if self.kl_in_loss else _rows(ref_refs)
        old, values = _rows(old_refs), _rows(value_refs)
        engine = rollout_token_logps(r)
        if self.old_logps_source == "rollout":
            old = engine
        # π_old is the update's own forward when each row meets one update (or none was run).
        own_old = self.single_update or old is None
        # The updates get the engine's log-probs to correct for them (ppo.off_policy_correction)
        # or, with π_old their own forward, to measure the gap; else it is measured here.
        to_update = self.cfg.ppo.off_policy_correction != "none" or (
            self.single_update and old is None
        )
        measured_here = self.old_logps_source == "recompute" and not (own_old and to_update)
        gap = logp_gap(old, engine, action) if old is not None and measured_here else {}
        scored = self.fetch_scores(scores)
        scores = scored.values
        has_eos = torch.tensor([f == "stop" for f in r.finish])
        zeros = torch.zeros(action.shape)
        coef = 0.0 if self.kl_in_loss else self.kl.value
        adv = compute_advantages(
            self.cfg,
            scores,
            action,
            old if old is not None else zeros,
            ref,
            values,
            has_eos,
            coef,
            self.normalizer,
            self.estimator,
        )
        adv.metrics["kl/coef"] = self.kl.value
        adv.metrics.update(gap)
        adv.metrics.update(scored.metrics)
        adv.metrics.update(episode_metrics(r.extras))
        if scored.correct is not None:
            adv.metrics["reward/accuracy"] = sum(scored.correct) / len(scored.correct)
        if self.cfg.ppo.mask_truncated:  # DAPO's overlong filtering: no loss on cut responses
            action = action & has_eos.unsqueeze(1)
            adv.metrics["response/masked_truncated"] = 1.0 - has_eos.float().mean().item()
        exp = Experience(
            ids,
            attention,
            action,
            None if own_old else old * action,
            adv.advantages * action,
            adv.returns * action,
            (values * action) if values is not None else zeros,
            r.prompt_index,
            engine if to_update else None,
        )
        self.samples = list(zip(prompt_text, responses, scores.tolist(), strict=True))
        return exp, adv.metrics

    def submit_updates(self, exp: Experience, step: int) -> dict[str, list]:
        """Queue all ppo_epochs x num_mini_batches updates at once (each actor runs its calls in
        order; the critic's run concurrently with the policy's): role -> result refs."""
        cfg = self.cfg
        rows = exp.input_ids.shape[0]
        per_update = rows // cfg.ppo.num_mini_batches
        g = torch.Generator().manual_seed(cfg.train.seed * 7919 + step)
        refs: dict[str, list] = {"policy": [], "critic": []}
        for _ in range(cfg.ppo.ppo_epochs):
            order = torch.randperm(rows, generator=g)
            for m in range(cfg.ppo.num_mini_batches):
                picked = order[m * per_update : (m + 1) * per_update]
                mini = exp.rows(picked)
                kl = None
                if self.kl_in_loss:
                    kl = (self.kl.value, self.pending_ref, picked)
                refs["policy"] += self._update(self.policy, mini, kl)
                if self.critic is not None:
                    refs["critic"] += self._update(self.critic, mini)
        return refs

    @staticmethod
    def collect_updates(refs: dict[str, list]) -> dict[str, float]:
        """Every update's metrics as one row (reduce_metrics: means, and maxima of *_max);
        policy/*, value/* and rollout/* keep their names, the rest get the role's prefix, and
        the trainer's whole loss is <role>/total_loss (policy/loss is the surrogate's alone)."""
        rows = []
        for role, role_refs in refs.items():
            for result in gather(role_refs):
                rows.append({_update_key(role, k): v for k, v in result.metrics.items()})
        return reduce_metrics(rows)

    def train_on(self, exp: Experience, step: int) -> dict[str, float]:
        return self.collect_updates(self.submit_updates(exp, step))

    def _update(self, group: TrainerGroup, mini: Experience, kl: tuple | None = None) -> list:
        """One update of the group on a mini-batch, split over its ranks in micro-batches.
        kl = (β, reference refs, the mini-batch's rows in the rollout) for the KL in the loss:
        each micro-batch then gets a KLPenalty whose log-probs the trainer fetches itself."""
        world, micro = group.world_size, self.cfg.train.micro_batch_size
        work = []
        for r in range(world):
            chunks = rank_slices(mini.input_ids.shape[0], r, world, micro)
            batches = [mini.rows(torch.arange(s.start, s.stop)) for s in chunks]
            extra = [None] * len(batches)
            if kl is not None:
                coef, ref_refs, rows = kl
                extra = [KLPenalty(coef, DeferredRows(ref_refs, rows[s])) for s in chunks]
            work.append((batches, extra))
        return group.submit_train_step(work)

    def utilisation(self, r: Rollout, step_s: float, train_s: float) -> dict[str, float]:
        """perf/<role>/tflops and /mfu over the step, and the policy's MFU over the update
        phase alone (perf/policy/update_mfu: its updates' FLOPs over timing/train)."""
        prompts, responses = r.prompt_mask.sum(1).tolist(), r.response_mask.sum(1).tolist()
        recompute = self.old_logps_source == "recompute"
        epochs = self.cfg.ppo.ppo_epochs
        flops = online_step_flops(self.perf.shapes, prompts, responses, epochs, recompute)
        out = self.perf.metrics(flops, step_s)
        peak = self.perf.peaks.get("policy")
        if peak and train_s > 0:
            only_updates = online_step_flops(
                {"policy": self.perf.shapes["policy"]}, prompts, responses, epochs
            )
            out["perf/policy/update_mfu"] = only_updates["policy"] / train_s / peak
        return out

    # ------------------------------------------------------------------ the loop

    def run(self) -> dict[str, float]:
        self.start()
        first = self.resume()
        cfg, plan = self.cfg, self.plan
        logger = MetricsLogger(cfg, plan.total_steps, first)
        self.sync_weights()  # also after a resume: the engines start from the initial weights
        if first == 0:
            before = self.evaluate(0)
            if before:
                logger.log(0, before, 0)
        self.step_times: list[float] = []
        self.first_step_done: float | None = None  # perf_counter at the end of the first step
        try:
            if cfg.roles.rollout.max_staleness:
                return self._run_async(first, logger)
            return self._run_sync(first, logger)
        finally:
            logger.close()

    def _boundaries(self, step: int) -> tuple[bool, bool, bool, bool]:
        """(done, evaluates, saves, faults) after 0-based `step`."""
        cfg = self.cfg
        done = step + 1 == self.plan.total_steps
        evaluates = bool(cfg.train.eval_every and (step + 1) % cfg.train.eval_every == 0)
        every = cfg.checkpoint.every_steps
        saves = bool(every and (step + 1) % every == 0) or done
        faults = os.environ.get(FAULT_EXIT_AFTER_STEP) == str(step + 1)
        return done, evaluates or done, saves, faults

    def _collect_updates_into(self, metrics: dict, updates: dict[str, list], exp: Experience):
        """Wait for the updates, add their metrics to the step's, and feed the KL controller
        the step's KL (make_experience's, or with the KL in the loss the updates')."""
        if self.pending_ref is not None:
            gather(self.pending_ref)  # a dead reference is reported by its role
        metrics.update(self.collect_updates(updates))
        if self.kl_in_loss:  # measured by the updates, on the policy before each step
            metrics["kl/seq"] = metrics["policy/kl_seq"]
        # After the updates were queued: with the KL in the loss they carry this step's β.
        self.kl.update(metrics["kl/seq"], exp.input_ids.shape[0])

    def _end_step(
        self,
        step: int,
        metrics: dict,
        logger: MetricsLogger,
        evaluates: bool,
        saves: bool,
        inflight: list | None = None,
    ) -> None:
        """Held-out eval, the metrics row, the checkpoint (with the batches `inflight`, async)
        and the fault hook after `step`."""
        if evaluates:
            metrics.update(self.evaluate(step + 1))
        # samples/s counts responses, as the summary's throughput does
        logger.log(step + 1, metrics, (step + 1) * self.responses_per_step)
        if saves:
            self.save(step + 1, inflight)
        if os.environ.get(FAULT_EXIT_AFTER_STEP) == str(step + 1):
            print(f"fault injection: exiting after step {step + 1}", flush=True)
            os._exit(17)

    def start_rollout(self, step: int) -> tuple[list, dict[str, list | None] | None]:
        """Step `step`'s rollout and, queued behind it, its per-token forwards (with dynamic
        sampling, not yet: they run on the batch it keeps)."""
        parts = self.submit_generate(step)
        return parts, None if self.cfg.ppo.dynamic_sampling else self.submit_forwards(parts)

    def fill_batch(self, step: int, parts: list) -> tuple[Rollout, Scores, dict[str, float]]:
        """DAPO's dynamic sampling (Yu et al. 2025, §3.2): keep the groups whose rewards are
        not all equal; while fewer than the step's prompts are kept, sample another batch of
        prompts (seeded by step and round), at most ppo.dynamic_sampling_max_rounds times; a
        batch still short is filled with dropped groups. Returns the batch, its scores (the
        reward metrics of the first round, the on-policy sample) and dynamic_sampling/*."""
        n, need = self.cfg.roles.rollout.n_samples_per_prompt, self.plan.global_batch
        kept: list[tuple[Rollout, Scores]] = []
        dropped: list[tuple[Rollout, Scores]] = []
        rounds, first_scores = 0, None
        while True:
            r = self.collect_rollout(parts)
            scored = self.fetch_scores(self.submit_scores(r, self.prompts)[3])
            first_scores = first_scores or scored
            groups = scored.values.view(-1, n)
            signal = (groups.amax(1) != groups.amin(1)).tolist()
            for g, informative in enumerate(signal):
                picked = list(range(g * n, (g + 1) * n))
                (kept if informative else dropped).append(
                    (select_rows(r, picked), scored.select(picked))
                )
            if rounds == 0:
                informative_frac = sum(signal) / len(signal)
            if len(kept) >= need or rounds == self.cfg.ppo.dynamic_sampling_max_rounds:
                break
            rounds += 1
            g = torch.Generator().manual_seed(self.cfg.data.seed * 7919 + step * 131 + rounds)
            indices = torch.randperm(len(self.prompts), generator=g)[:need].tolist()
            batches = self.engine_batches(self.prompts, indices)
            parts = self.rollout.generate(batches, EXTRA_SEED_STEP + 64 * step + rounds)
        short = max(0, need - len(kept))
        chosen = (kept + dropped[:short])[:need]
        batch = merge_rollouts([c[0] for c in chosen], self.tokenizer.pad_token_id)
        scores = Scores.cat([c[1] for c in chosen])
        scores.metrics = dict(first_scores.metrics)
        return (
            batch,
            scores,
            {
                "dynamic_sampling/extra_rounds": float(rounds),
                "dynamic_sampling/informative_frac": informative_frac,
                "dynamic_sampling/short_groups": float(short),
            },
        )

    def _run_sync(self, first: int, logger: MetricsLogger) -> dict[str, float]:
        """roles.rollout.max_staleness=0: every batch comes from the current weights."""
        plan = self.plan
        metrics: dict[str, float] = {}
        t0 = time.perf_counter()
        pending = self.start_rollout(first) if first < plan.total_steps else None
        for step in range(first, plan.total_steps):
            done, evaluates, saves, faults = self._boundaries(step)
            if self.cfg.ppo.dynamic_sampling:
                rollout, scored, extra = self.fill_batch(step, pending[0])
                forwards = self.submit_forwards([ray.put(rollout)])
            else:
                rollout, forwards, scored, extra = (
                    self.collect_rollout(pending[0]),
                    pending[1],
                    None,
                    {},
                )
            t1 = time.perf_counter()
            exp, metrics = self.make_experience(rollout, forwards, scored)
            metrics.update(extra)
            t2 = time.perf_counter()
            # Queued back to back: the updates, the weight sync behind them on the policy,
            # and (when nothing runs between the steps) the next rollout behind the sync on
            # the engines, so no actor waits for a driver round trip in between.
            updates = self.submit_updates(exp, step)
            synced = self.weight_sync.submit()
            prefetch = not (done or evaluates or saves or faults)
            pending = self.start_rollout(step + 1) if prefetch else None
            self._collect_updates_into(metrics, updates, exp)
            t3 = time.perf_counter()
            gather(synced)
            t4 = time.perf_counter()
            self._timings(metrics, rollout, t0, t1, t2, t3, t4)
            self._end_step(step, metrics, logger, evaluates, saves)
            # A prefetched rollout started when the sync ended (t4): the bookkeeping above
            # overlapped it. Otherwise the next step starts now, after eval / checkpoint.
            if pending is None and not done:
                t0 = time.perf_counter()
                pending = self.start_rollout(step + 1)
            else:
                t0 = t4
        return metrics

    def _run_async(self, first: int, logger: MetricsLogger) -> dict[str, float]:
        """roles.rollout.max_staleness=k >= 1: the engines run up to k batches ahead of the
        policy. Step t trains on the batch the engines sampled with the weights of version
        max(t - k, first) (version v = after v updates): batch t + k + 1 is queued right
        behind the sync of version t + 1, so the engines sample it while the policy trains
        step t + 1, and the sync waits only for the batches already in flight. The policy's
        (and critic's) per-token forwards run when the step begins, on the current weights:
        π_old is the proximal policy, and ppo.off_policy_correction weighs it against the
        engine's log-probs of the older weights that sampled."""
        plan, k = self.plan, self.cfg.roles.rollout.max_staleness
        metrics: dict[str, float] = {}
        inflight = self._restore_inflight(first)  # in step order
        for s in range(first + len(inflight), min(first + k + 1, plan.total_steps)):
            inflight.append(self._queue_batch(s, first))
        synced: list = []
        t0 = time.perf_counter()
        for step in range(first, plan.total_steps):
            _, evaluates, saves, _ = self._boundaries(step)
            batch = inflight.pop(0)
            assert batch.step == step, f"step {step} got the batch of step {batch.step}"
            parts, version = batch.parts, batch.version
            forwards = self.submit_forwards(parts, batch.reference)
            gather(synced)  # the last step's sync (it ends before this batch's successors)
            sync_s = time.perf_counter() - t0
            rollout = self.collect_rollout(parts)
            t1 = time.perf_counter()
            exp, metrics = self.make_experience(rollout, forwards)
            t2 = time.perf_counter()
            updates = self.submit_updates(exp, step)
            synced = self.weight_sync.submit()  # version step + 1, behind the batches in flight
            if step + k + 1 < plan.total_steps:
                inflight.append(self._queue_batch(step + k + 1, step + 1))
            self._collect_updates_into(metrics, updates, exp)
            t3 = time.perf_counter()
            metrics["rollout/version"] = float(version)
            metrics["rollout/staleness_mean"] = metrics["rollout/staleness_max"] = float(
                step - version
            )
            self._timings(metrics, rollout, t0, t1, t2, t3, t3, sync_s=sync_s)
            self._end_step(step, metrics, logger, evaluates, saves, inflight)
            # Eval and checkpoint time is not step time; the rest of the bookkeeping overlapped
            # the engines' work.
            t0 = time.perf_counter() if evaluates or saves else t3
        gather(synced)
        return metrics

    def _restore_inflight(self, first: int) -> list[InFlight]:
        """The batches a checkpoint had in flight (sampled by weights older than its own, so
        they cannot be regenerated from it), from `first` on, their reference forwards queued."""
        path = self.claim.resume_from
        if path is None or not (path / INFLIGHT).with_suffix(".json").exists():
            return []
        k = self.cfg.roles.rollout.max_staleness
        return [
            self._queue_batch(step, version, [ray.put(r)])
            for step, version, r in load_rollouts(path / INFLIGHT)
            if first <= step <= first + k
        ]

    def _timings(self, metrics, rollout: Rollout, t0, t1, t2, t3, t4, sync_s=None) -> None:
        """timing/* of a step that began at t0: rollout (waiting for it) to t1, make_experience
        to t2, the updates to t3, the weight sync to t4 (async: `sync_s`, the wait for the
        previous step's sync at the start of this one, not counted as rollout); and
        timing/idle/<role>, how long each role's actors ran nothing between t0 and t4."""
        tokens = int(rollout.response_mask.sum())
        metrics.update(
            {
                "timing/rollout": t1 - t0 - (sync_s or 0.0),
                "timing/make_experience": t2 - t1,
                "timing/train": t3 - t2,
                "timing/sync": t4 - t3 if sync_s is None else sync_s,
                "timing/step": t4 - t0,
                "perf/tokens_per_s": tokens / (t4 - t0),
            }
        )
        metrics.update(self.utilisation(rollout, t4 - t0, t3 - t2))
        metrics.update(self.placement.clock.idle(t0, t4))
        self.step_times.append(t4 - t0)
        self.first_step_done = self.first_step_done or t4

    def finish(self) -> Path:
        final = self.out / "final"
        self.policy.export(str(final), merge=self.cfg.checkpoint.export == "merged")
        report = {
            "last_rollout": self.samples[:16],
            "eval_before": self.eval_samples[0] if self.eval_samples else [],
            "eval_after": self.eval_samples[-1] if len(self.eval_samples) > 1 else [],
        }
        (self.out / "samples.json").write_text(json.dumps(report, indent=2))
        print_before_after(report)
        plot_metrics(self.out / "metrics.jsonl", self.out / "plot.png")
        return final

    @property
    def responses_per_step(self) -> int:
        return self.plan.global_batch * self.cfg.roles.rollout.n_samples_per_prompt

    def throughput(self, warmup: int = 2) -> float | None:
        """Responses per second over whole steps after `warmup` (rollout to sync)."""
        times = self.step_times[warmup:]
        return round(self.responses_per_step * len(times) / sum(times), 2) if times else None

    def groups(self) -> dict[str, ActorGroup]:
        """The actor groups this run started, by role (a hybrid rollout is the policy's)."""
        out: dict[str, ActorGroup] = {}
        for name in ROLE_NAMES:
            group = getattr(self, name, None)
            if group is not None and all(group is not g for g in out.values()):
                out[name] = group
        return out

    def memory(self) -> dict[str, list[float]]:
        """Peak RSS (MiB) of each actor process, per role."""
        return {name: group.peak_rss_mb() for name, group in self.groups().items()}

    def shutdown(self) -> None:
        if self.scorer is not None:
            self.scorer.close()
        for group in self.groups().values():
            group.shutdown()
        if getattr(self, "placement", None) is not None:
            self.placement.remove()
            self.placement = None
