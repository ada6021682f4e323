"""Time the policy -> rollout weight sync alone: `WeightSync.push()` between one policy actor
and one HF rollout actor, the same wiring as an online run.

    .venv/bin/python -m bench.sync_push [--model builtin:smollm2-135m-instruct] [--pushes 7]

Prints the number of tensors and the median (and every) push time. Run it from two checkouts
(e.g. a `git worktree` of an older commit) one after the other to compare versions.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--pushes", type=int, default=7)
    args = parser.parse_args(argv)

    from actors.groups import PolicyGroup, RolloutGroup, WeightSync
    from actors.run import init_ray
    from rlhf.config import load_config

    out = tempfile.mkdtemp(prefix="sync-push-")
    cfg = load_config(
        None,
        [
            "algorithm=ppo",
            f"model.name_or_path={args.model}",
            "roles.reward.type=function",
            "roles.reward.function=rlhf.rewards:vader_sentiment",
            "roles.rollout.backend=hf",
            "train.precision=fp32",
            f"output_dir={out}",
        ],
    )
    init_ray(cfg)
    policy, rollout = PolicyGroup(cfg, 10), RolloutGroup(cfg)
    try:
        sync = WeightSync(policy, rollout)
        sync.push()  # warm-up
        times = []
        for _ in range(args.pushes):
            started = time.perf_counter()
            sync.push()
            times.append(time.perf_counter() - started)
    finally:
        policy.shutdown()
        rollout.shutdown()
    shown = ", ".join(f"{t:.3f}" for t in times)
    print("| model | tensors | median push s | pushes s |\n|---|---|---|---|")
    print(f"| {args.model} | {len(sync.specs)} | {statistics.median(times):.3f} | {shown} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
