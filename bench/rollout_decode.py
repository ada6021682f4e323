"""The HF rollout engine's two decode paths side by side, interleaved in one process: the lean
decode loop and transformers' `generate` (what every rollout fell back to while the lean loop
was off), on the quickstart's rollout (16 rows = 4 prompts x 4 samples, 32 new tokens).

    .venv/bin/python -m bench.rollout_decode [--model builtin:smollm2-135m-instruct] [--repeats 7]

Prints a table: median seconds per rollout call for each path, and generate / lean. Each path
draws tokens as it does in runs (the lean loop by inverse CDF, generate by torch.multinomial);
the first call of each path is a warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import time

from bench._common import versions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--prompts", type=int, default=4)
    args = parser.parse_args(argv)

    import torch

    from actors.rollout import HFBackend
    from launch.cli import QUICKSTART
    from rlhf.config import load_config
    from rlhf.data import load_split, make_collator
    from rlhf.models import load_tokenizer
    from rlhf.roles import engine_spec

    torch.set_num_threads(1)
    cfg = load_config(QUICKSTART, [f"model.name_or_path={args.model}"])
    tokenizer = load_tokenizer(cfg.model, padding_side="left")
    prompts = load_split(cfg.data.train, cfg.data, "prompt", tokenizer)
    batch = make_collator("prompt", tokenizer.pad_token_id)(
        [prompts[i] for i in range(args.prompts)]
    )
    engine = HFBackend(engine_spec(cfg), "cpu")
    assert engine.lean, "the lean loop is off for this model: see the log line saying why"
    sampling = cfg.roles.rollout
    times: dict[str, list[float]] = {"lean": [], "generate": []}
    for repeat in range(args.repeats + 1):
        for path in ("lean", "generate"):
            engine.lean = path == "lean"
            tick = time.perf_counter()
            engine.generate(batch, sampling, seed=repeat)
            if repeat:  # the first call of each path warms up
                times[path].append(time.perf_counter() - tick)
    lean, gen = statistics.median(times["lean"]), statistics.median(times["generate"])
    rows = args.prompts * sampling.n_samples_per_prompt
    print(f"{args.model}: {rows} rows x {sampling.max_new_tokens} new tokens, 1 thread")
    print(f"{versions(('torch', 'transformers'))}")
    print("| path | median s per call | every call |")
    print("|---|---|---|")
    for path, median in (("lean decode loop", lean), ("transformers generate", gen)):
        key = "lean" if path.startswith("lean") else "generate"
        print(f"| {path} | {median:.3f} | {', '.join(f'{t:.2f}' for t in times[key])} |")
    print(f"generate / lean: {gen / lean:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
