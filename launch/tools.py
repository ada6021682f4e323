"""Model tools, run in this process (no Ray):

rlhf merge-lora ADAPTER OUT [--base B]   adapter + base -> merged safetensors model
rlhf generate [CONFIG] --model A --model B  the same prompts through each model, side by side,
                                         with reward scores
rlhf eval CONFIG [--model M]             reward-model accuracy, DPO-family reward metrics, or
                                         (algorithm: ppo) mean reward on the prompt set
"""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

from rlhf.config import RunConfig, load_config


def _model_override(cfg: RunConfig, path: str) -> RunConfig:
    """cfg with the trained model swapped for a checkpoint (merged weights: no adapter), which
    must exist (one line naming --model when not)."""
    from rlhf.models import check_model_source

    check_model_source("--model", path)
    model = cfg.model.model_copy(update={"name_or_path": path, "lora": None, "quantization": None})
    return cfg.model_copy(update={"model": model})


# ----------------------------------------------------------------------------- merge-lora


def cmd_merge_lora(args) -> int:
    from rlhf.models import adapter_info, merge_lora

    info = adapter_info(args.adapter)
    base = args.base or info["base"]
    print(f"merging {args.adapter} ({info['kind']}) into {base}")
    out = merge_lora(
        args.base,
        args.adapter,
        args.out,
        kind=args.kind,
        trust_remote_code=args.trust_remote_code,
        num_labels=args.num_labels,
    )
    files = sorted(p.name for p in Path(out).iterdir())
    print(f"merged model in {out}: {', '.join(files)}")
    return 0


# ----------------------------------------------------------------------------- generate


def _prompt_set(cfg: RunConfig, limit: int | None):
    """The eval prompts of a config (its train prompts when it has none), tokenised."""
    from actors.reward import required_fields
    from rlhf.data import load_datasets
    from rlhf.models import load_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    required = required_fields(cfg.roles.reward)
    train, evaluation = load_datasets(cfg.data, "prompt", tokenizer, Path(cfg.output_dir), required)
    data = evaluation or train
    n = min(len(data), limit) if limit else len(data)
    return [data[i] for i in range(n)], tokenizer


def sample(
    cfg: RunConfig, features, tokenizer, seed: int, n: int = 1, rollouts: list | None = None
) -> list[str]:
    """`n` greedy-or-sampled responses per prompt (roles.rollout settings), decoded, each
    prompt's adjacent; with roles.rollout.environment each is a multi-turn episode, and the
    response its last turn (`rollouts` collects the rollouts, for the episodes' counts)."""
    from actors.rollout import HFBackend
    from rlhf.data import make_collator
    from rlhf.episodes import episodes_for, response_texts, sample_episodes
    from rlhf.roles import engine_spec

    backend = HFBackend(engine_spec(cfg), "cpu")
    settings = cfg.roles.rollout.model_copy(update={"n_samples_per_prompt": n})
    env = settings.environment
    episodes = episodes_for(env, tokenizer) if env is not None else None
    collate = make_collator("prompt", tokenizer.pad_token_id)
    out = []
    for i in range(0, len(features), 8):
        batch = collate(features[i : i + 8])
        if episodes is None:
            r = backend.generate(batch, settings, seed + i)
        else:
            r = sample_episodes(*episodes, batch, settings, backend.generate, seed + i, tokenizer)
        out += response_texts(r, tokenizer)
        if rollouts is not None:
            rollouts.append(r)
    del backend
    return out


def cmd_generate(args) -> int:
    from actors.reward import make_scorer
    from rlhf.roles import reward_spec

    overrides = list(args.overrides)
    if args.config is not None and "=" in str(args.config):  # no config, only overrides
        overrides.insert(0, str(args.config))
        args.config = None
    if args.prompts:
        overrides += [f"data.eval.path={args.prompts}"]
    if args.reward_model:
        overrides += [
            "roles.reward.type=model",
            f"roles.reward.model.name_or_path={args.reward_model}",
        ]
    elif args.reward:
        overrides += ["roles.reward.type=function", f"roles.reward.function={args.reward}"]
    for key in ("max_new_tokens", "temperature"):
        if getattr(args, key) is not None:
            overrides.append(f"roles.rollout.{key}={getattr(args, key)}")
    base = load_config(args.config, overrides)
    models = args.model or [base.model.name_or_path]
    features, tokenizer = _prompt_set(base, args.limit)
    prompts = [f.prompt_text for f in features]
    scorer = make_scorer(reward_spec(base)) if base.roles.reward.type != "none" else None
    columns: dict[str, tuple[list[str], list[float] | None]] = {}
    for path in models:
        responses = sample(_model_override(base, path), features, tokenizer, args.seed)
        scores = None
        if scorer is not None:
            scores = scorer(prompts, responses, [f.fields for f in features]).values.tolist()
        columns[path] = (responses, scores)
    _print_side_by_side(prompts, columns, args.width)
    report = {
        "prompts": prompts,
        "models": {
            m: {"responses": r, "rewards": s, "mean_reward": _mean(s)}
            for m, (r, s) in columns.items()
        },
    }
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, ensure_ascii=False))
        print(f"written to {args.json}")
    return 0


def _mean(xs: list[float] | None) -> float | None:
    return round(sum(xs) / len(xs), 4) if xs else None


def _print_side_by_side(
    prompts: list[str], columns: dict[str, tuple[list[str], list[float] | None]], width: int
) -> None:
    names = list(columns)
    col = max(20, (width - 3 * (len(names) - 1)) // len(names))
    for i, prompt in enumerate(prompts):
        print(f"--- prompt {i}: {prompt!r}")
        cells = []
        for name in names:
            responses, scores = columns[name]
            head = (
                Path(name).name if Path(name).name != "final" else Path(name).parent.name + "/final"
            )
            if scores is not None:
                head += f"  [reward {scores[i]:+.3f}]"
            body = textwrap.wrap(responses[i].replace("\n", " ") or "(empty)", col)
            cells.append([head[:col], "-" * min(col, len(head)), *body])
        for row in range(max(len(c) for c in cells)):
            print(" | ".join((c[row] if row < len(c) else "").ljust(col) for c in cells).rstrip())
    summary = []
    for name in names:
        mean = _mean(columns[name][1])
        if mean is not None:
            summary.append(f"{name}: mean reward {mean:+.4f}")
    if summary:
        print("=== " + "; ".join(summary))


# ----------------------------------------------------------------------------- eval


def evaluate_offline(cfg: RunConfig, limit: int | None = None) -> dict[str, float]:
    """The algorithm's loss and metrics averaged over its eval set (train set when none), in
    this process: rm -> rm/accuracy; dpo family -> rewards/chosen, rejected, accuracies,
    margins against the reference; sft -> NLL."""
    from rlhf.data import load_datasets, make_collator
    from rlhf.models import load_model, load_tokenizer
    from rlhf.objectives import metric_sums, model_kind, objective_for, reference_logps

    tokenizer = load_tokenizer(cfg.model)
    train, evaluation = load_datasets(cfg.data, cfg.data_format, tokenizer, Path(cfg.output_dir))
    data = evaluation or train
    n = min(len(data), limit) if limit else len(data)
    model = load_model(
        cfg.model,
        model_kind(cfg),
        num_labels=cfg.data.num_labels,
        trainable=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    reference = None
    if cfg.needs_reference:
        reference = load_model(cfg.roles.reference.model or cfg.model, "causal", trainable=False)
    collate = make_collator(cfg.data_format, tokenizer.pad_token_id)
    size = cfg.train.micro_batch_size
    batches = (collate([data[j] for j in range(i, min(i + size, n))]) for i in range(0, n, size))
    pairs = ((b, reference_logps(reference, b) if reference is not None else None) for b in batches)
    # metric_sums runs without gradients, the reference's log-probs (drawn from `pairs`) too.
    sums = metric_sums(objective_for(cfg), model, pairs)
    rows = sums.pop("n")
    return {"rows": int(rows), **{k: v / rows for k, v in sums.items()}}


def evaluate_rewards(
    cfg: RunConfig, limit: int | None, seed: int, samples: Path | None = None
) -> dict[str, float]:
    """Mean and std of the reward of roles.rollout.eval_samples_per_prompt responses per
    prompt (roles.rollout sampling); with verifiable rewards pass@k and mean@n too. `samples`:
    a JSONL file for every response with its reward and verdict."""
    from actors.reward import make_scorer, write_eval_samples
    from rlhf.episodes import episode_metrics, episode_texts
    from rlhf.roles import reward_spec
    from rlhf.rollout import merge_rollouts
    from rlhf.verifiers import pass_metrics

    features, tokenizer = _prompt_set(cfg, limit)
    n = cfg.roles.rollout.eval_samples_per_prompt
    rollouts: list = []
    responses = sample(cfg, features, tokenizer, seed, n, rollouts)
    r = merge_rollouts(rollouts, tokenizer.pad_token_id)
    rows = [f for f in features for _ in range(n)]
    prompts = [f.prompt_text for f in rows]
    scorer = make_scorer(reward_spec(cfg))
    try:
        scored = scorer(prompts, responses, [f.fields for f in rows])
        scored = scored.plus(r.extras.get("env_reward"))
    finally:
        scorer.close()
    scores = scored.values
    out = {
        "rows": len(responses),
        "reward/mean": scores.mean().item(),
        "reward/std": scores.std().item() if len(responses) > 1 else 0.0,
    }
    if scored.correct is not None:
        index = [i for i in range(len(features)) for _ in range(n)]
        out.update(
            {k.removeprefix("eval/"): v for k, v in pass_metrics(index, scored.correct).items()}
        )
    out.update(episode_metrics(r.extras))
    if samples is not None:
        samples.unlink(missing_ok=True)
        episodes = episode_texts(r, tokenizer)
        write_eval_samples(samples, 0, prompts, rows, responses, scored, episodes)
        print(f"samples written to {samples}")
    return out


def cmd_eval(args) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.model:
        if cfg.needs_reference and cfg.roles.reference.model is None and cfg.algorithm != "ppo":
            # The reference stays the config's starting model, not the checkpoint under test.
            ref = cfg.roles.reference.model_copy(update={"model": cfg.model})
            cfg = cfg.model_copy(update={"roles": cfg.roles.model_copy(update={"reference": ref})})
        cfg = _model_override(cfg, args.model)
    if cfg.algorithm == "ppo":
        result = evaluate_rewards(cfg, args.limit, args.seed, args.samples)
    else:
        result = evaluate_offline(cfg, args.limit)
    print(f"eval of {cfg.model.name_or_path} ({cfg.algorithm}):")
    for k, v in result.items():
        print(
            f"  {k:<22} {v:.4f}" if isinstance(v, float) and math.isfinite(v) else f"  {k:<22} {v}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


# ----------------------------------------------------------------------------- parsers


def add_parsers(sub) -> None:
    p = sub.add_parser("merge-lora", help="merge a LoRA adapter into its base (safetensors)")
    p.add_argument("adapter", help="adapter folder (e.g. OUTPUT_DIR/final/adapter)")
    p.add_argument("out", help="folder for the merged model")
    p.add_argument("--base", help="base model (default: the one the adapter records)")
    p.add_argument(
        "--kind",
        choices=["causal", "reward", "classifier", "critic"],
        default=None,
        help="model kind (default: what the adapter records)",
    )
    p.add_argument("--num-labels", type=int, default=None, help="classifier heads: label count")
    p.add_argument(
        "--trust-remote-code", action="store_true", help="allow code shipped with the base model"
    )
    p.set_defaults(fn=cmd_merge_lora)

    p = sub.add_parser(
        "generate", help="sample from one or more models on the same prompts, side by side"
    )
    p.add_argument("config", nargs="?", type=Path, help="config giving prompts, reward, sampling")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    p.add_argument("--model", action="append", help="model folder or name (repeat to compare)")
    p.add_argument("--prompts", help="prompt data (sets data.eval.path)")
    p.add_argument("--limit", type=int, default=4, help="number of prompts (default 4)")
    p.add_argument("--reward", help="reward function 'module:function'")
    p.add_argument("--reward-model", help="reward model folder (sequence classifier)")
    p.add_argument(
        "--max-new-tokens", type=int, default=None, help="default: roles.rollout.max_new_tokens"
    )
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--width", type=int, default=120, help="terminal width of the table")
    p.add_argument("--json", help="also write prompts, responses and rewards here")
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser("eval", help="evaluate a model: RM accuracy, DPO metrics, mean reward")
    p.add_argument("config", type=Path, help="the config the model was trained with")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    p.add_argument("--model", help="checkpoint to evaluate (default: the config's model)")
    p.add_argument("--limit", type=int, default=None, help="evaluate at most this many rows")
    p.add_argument("--seed", type=int, default=0, help="sampling seed for ppo (default 0)")
    p.add_argument("--json", help="also write the metrics here")
    p.add_argument(
        "--samples", type=Path, help="ppo: write every response with its reward and verdict (JSONL)"
    )
    p.set_defaults(fn=cmd_eval)
