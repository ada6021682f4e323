"""`rlhf check`: a dry run of a config on one process — validate the config, read and
tokenise the data (quarantining bad rows), load the models and compute the loss and metrics
of the first batch. Nothing is trained and nothing is written into output_dir; it fails where a
real run would, before any cluster time is spent."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from actors.reward import required_fields
from rlhf.config import RunConfig, dump_config
from rlhf.data import load_datasets, make_collator
from rlhf.episodes import episodes_for
from rlhf.models import check_run_models, count_parameters, load_model, load_tokenizer
from rlhf.objectives import model_kind, objective_for, reference_logps
from rlhf.placement import plan_placement


def run_check(cfg: RunConfig, show_config: bool = False) -> dict[str, float]:
    """Writes nothing into output_dir (bad rows are listed in a temporary folder)."""
    start = time.perf_counter()
    if show_config:
        print(dump_config(cfg), end="")
    check_run_models(cfg, model_kind(cfg))
    plan = plan_placement(cfg)  # against the declared `cluster` section
    print(plan.table())
    plan.check()
    torch.manual_seed(cfg.train.seed)
    tokenizer = load_tokenizer(cfg.model)
    quarantine = Path(tempfile.mkdtemp(prefix="rlhf-check-"))
    # Online runs: the fields the reward reads are required of every prompt row.
    required = required_fields(cfg.roles.reward) if cfg.algorithm == "ppo" else ()
    train, evaluation = load_datasets(cfg.data, cfg.data_format, tokenizer, quarantine, required)
    for ds in (train, evaluation):
        if ds is not None:
            print(f"-- data: {ds.summary()}")
    if cfg.algorithm == "ppo":
        env = cfg.roles.rollout.environment
        if env is not None:  # built once: its tools, their schemas and its arguments
            episodes_for(env, tokenizer)
            print(f"-- environment: {env.name} (tools: {', '.join(env.tools) or 'none'})")
        print("-- ppo: prompts validated; no step runs here (the online loop needs its actors)")
        return {}
    kind = model_kind(cfg)
    model = load_model(
        cfg.model, kind, num_labels=cfg.data.num_labels, pad_token_id=tokenizer.pad_token_id
    )
    trainable, total = count_parameters(model)
    print(
        f"-- model: {cfg.model.name_or_path} ({kind}), {total / 1e6:.2f}M parameters, {trainable / 1e6:.2f}M trainable"
    )
    pack = cfg.data.max_length if cfg.data.packing else None
    batch = make_collator(cfg.data_format, tokenizer.pad_token_id, pack)(
        train.features[: cfg.train.micro_batch_size]
    )
    ref = None
    if cfg.needs_reference:
        reference = load_model(cfg.roles.reference.model or cfg.model, "causal", trainable=False)
        ref = reference_logps(reference, batch)
        del reference
    model.train()
    loss, metrics = objective_for(cfg)(model, batch, ref)
    loss.backward()
    values = {"loss": loss.item(), **{k: float(v) for k, v in metrics.items()}}
    print("-- first batch: " + ", ".join(f"{k}={v:.4g}" for k, v in values.items()))
    print(f"-- check passed in {time.perf_counter() - start:.1f}s (nothing was trained)")
    return values
