"""`rlhf submit` and `rlhf job …`: run a config as a Ray job on a cluster.

`rlhf submit CONFIG [key=value …]` validates the config here, then submits
`python -m launch train CONFIG key=value …` through Ray's job API (what `ray job submit` does)
with the project as the job's working_dir, the project's forwarded settings and the secrets as
runtime_env env_vars, and follows the logs until the job ends. `rlhf job status|logs|stop|list`
control jobs afterwards.

Secrets (WANDB_API_KEY, HF_TOKEN, HUGGING_FACE_HUB_TOKEN, roles.reward.token_env and
`--secret-env NAME`) travel from this environment to the job only inside the runtime_env: never
on the entrypoint (which Ray shows to everyone who can list jobs) and never in what this module
prints (values are replaced by REDACTED; job logs are scrubbed of the secret values known
here). Ray itself keeps the runtime_env in its job table: docs/cluster.md says who can still
read it.

The cluster address comes from `--address` or RAY_ADDRESS (the job API: http://HEAD:8265);
token authentication is Ray's own (RAY_AUTH_MODE=token with RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH
or ~/.ray/auth_token), picked up by its JobSubmissionClient.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import sys
import time
from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path

from rlhf.config import REDACTED, ConfigError, is_overlay_file, load_config, redact

#: The project checkout: the default working_dir of a job.
PROJECT_ROOT = Path(__file__).resolve().parents[1]
#: Secrets passed to every job when they are set here (add more with --secret-env NAME).
SECRET_ENV = ("WANDB_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
#: Never uploaded with the working_dir (gitignore syntax; Ray also honours .gitignore/.rayignore).
EXCLUDES = (
    ".git",
    ".venv*",
    "venv",
    ".cache",
    "__pycache__",
    "*.pyc",
    "*.egg-info",
    ".pytest_cache",
    ".ruff_cache",
    "outputs",
    "checkpoints",
    "wandb",
    "/build",
    "/dist",
    "*.safetensors",
    "*.bin",
    "*.pt",
    "*.pth",
    "*.ckpt",
    "*.gguf",
    "*.whl",
    ".env",
    ".env.*",
)
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
_META_SECRETS = "rlhf_secret_env"


class ClusterError(RuntimeError):
    """The cluster could not be reached, refused the request, or does not know the job."""


# ----------------------------------------------------------------------------- secrets


class Scrubber:
    """Replaces known secret values in text meant for the terminal."""

    def __init__(self, values: Iterable[str]):
        # Longest first, so a secret containing another is replaced whole.
        self.values = sorted({v for v in values if len(v) >= 4}, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for value in self.values:
            text = text.replace(value, REDACTED)
        return text


def secret_names(extra: Iterable[str] = (), cfgs: Iterable = ()) -> list[str]:
    """Default secret names, --secret-env names, and the configs' roles.reward.token_env."""
    names = [*SECRET_ENV, *extra]
    names += [c.roles.reward.token_env for c in cfgs if c.roles.reward.token_env]
    return list(dict.fromkeys(names))


def check_overrides(overrides: list[str]) -> None:
    """A secret on the entrypoint is visible to everyone who can list jobs: refuse it."""
    for item in overrides:
        key, _, value = item.partition("=")
        leaf = key.rsplit(".", 1)[-1]
        if redact({leaf: value}) != {leaf: value}:
            raise ConfigError(
                f"override {key}=… looks like a secret: it would be shown with the job's "
                "entrypoint. Put it in an environment variable and pass the variable's name "
                "instead (e.g. roles.reward.token_env=NAME with --secret-env NAME)."
            )


def _forwarded_env() -> tuple[str, ...]:
    from actors.run import FORWARDED_ENV  # imports ray and torch: only when needed

    return FORWARDED_ENV


def show_env_value(name: str) -> bool:
    """Values printed as they are: the project's forwarded settings; all others redacted."""
    return name in _forwarded_env()


def redact_runtime_env(runtime_env: dict | None) -> dict:
    """The runtime_env for printing: env_vars values redacted unless known to be settings."""
    out = redact(dict(runtime_env or {}))
    env = out.get("env_vars")
    if isinstance(env, dict):
        out["env_vars"] = {k: (v if show_env_value(k) else REDACTED) for k, v in env.items()}
    return out


# ----------------------------------------------------------------------------- the job


def build_runtime_env(
    working_dir: Path,
    secrets: dict[str, str],
    pip: list[str] | None = None,
    extra: dict | None = None,
    excludes: Iterable[str] = (),
) -> dict:
    """working_dir + excludes, env_vars (forwarded settings, secrets, merge switch), pip."""
    extra = dict(extra or {})
    env = {k: os.environ[k] for k in _forwarded_env() if k in os.environ}
    env.update(extra.pop("env_vars", {}))
    env.update(secrets)
    runtime_env = {
        "working_dir": str(working_dir),
        "excludes": [*EXCLUDES, *excludes, *extra.pop("excludes", [])],
        "env_vars": env,
    }
    if pip:
        # One existing requirements file is passed as a path (Ray reads it here).
        runtime_env["pip"] = pip[0] if len(pip) == 1 and Path(pip[0]).is_file() else list(pip)
    runtime_env.update(extra)
    return runtime_env


def build_entrypoint(python: str, config_rel: str, overrides: list[str]) -> str:
    return shlex.join([*shlex.split(python), "-m", "launch", "train", config_rel, *overrides])


def _relative_config(config: Path, working_dir: Path) -> str:
    """`config` as the job sees it: relative to its working dir (where it starts)."""
    try:
        return config.resolve().relative_to(working_dir).as_posix()
    except ValueError:
        raise ConfigError(
            f"{config} is outside the working dir {working_dir}: the job only sees files "
            "uploaded with the working dir (move the config there, or pass --working-dir)"
        ) from None


# ----------------------------------------------------------------------------- the client


def connect(address: str | None):
    """A JobSubmissionClient for --address or RAY_ADDRESS (the dashboard's job API)."""
    import logging

    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    # The SDK logs request bodies (the runtime_env, with secrets) at DEBUG: never show them.
    logging.getLogger("ray.dashboard.modules.dashboard_sdk").setLevel(logging.INFO)
    # Packaging chatter: every .gitignore it honours, and Ray's default excludes (ours too).
    logging.getLogger("ray._private.runtime_env.packaging").setLevel(logging.WARNING)
    logging.getLogger("ray._private.runtime_env.working_dir").setLevel(logging.ERROR)
    logging.getLogger("ray.dashboard.modules.job.sdk").setLevel(logging.WARNING)
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not address:
        raise ClusterError("no cluster address: pass --address http://HEAD:8265 or set RAY_ADDRESS")
    # Ray lets these variables override the argument; --address must win.
    os.environ["RAY_API_SERVER_ADDRESS"] = address
    try:
        return JobSubmissionClient(address)
    except AuthenticationError as err:
        raise ClusterError(_auth_message(err, address)) from None
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise ClusterError(f"cannot reach the Ray job API at {address}: {err}") from None


def _auth_message(err, address: str) -> str:
    first = str(getattr(err, "message", err)).splitlines()[0]
    mode = os.environ.get("RAY_AUTH_MODE", "unset")
    return (
        f"the cluster at {address} refused the request ({first}). It uses token "
        f"authentication (RAY_AUTH_MODE here: {mode}): export RAY_AUTH_MODE=token and the "
        "cluster's token as RAY_AUTH_TOKEN, or in a file named by RAY_AUTH_TOKEN_PATH "
        "(default ~/.ray/auth_token)."
    )


def _call(client, fn: Callable, *args):
    """A client call with Ray's errors turned into one clear line."""
    from ray.exceptions import AuthenticationError

    try:
        return fn(*args)
    except AuthenticationError as err:
        raise ClusterError(_auth_message(err, client.get_address())) from None
    except (ConnectionError, RuntimeError) as err:
        raise ClusterError(str(err).strip()) from None


def _status(info) -> str:
    return getattr(info.status, "value", str(info.status))


def _time(ms: int | None) -> str:
    return datetime.fromtimestamp(ms / 1000).isoformat(sep=" ", timespec="seconds") if ms else "-"


def describe(info, scrub: Scrubber) -> str:
    """Job info for the terminal: status, entrypoint, times and the redacted runtime_env."""
    lines = [
        f"job {info.submission_id or info.job_id}: {_status(info)}",
        f"  message:     {scrub(info.message or '')}",
        f"  entrypoint:  {scrub(info.entrypoint or '')}",
        f"  started:     {_time(info.start_time)}   ended: {_time(info.end_time)}",
    ]
    env = redact_runtime_env(info.runtime_env)
    env.pop("excludes", None)
    lines.append(f"  runtime_env: {scrub(json.dumps(env, sort_keys=True))}")
    return "\n".join(lines)


def wait_terminal(client, job_id: str, timeout_s: float = 60.0):
    """The job info once the job is SUCCEEDED, FAILED or STOPPED (or at the timeout)."""
    deadline = time.monotonic() + timeout_s
    while True:
        info = _call(client, client.get_job_info, job_id)
        if _status(info) in TERMINAL or time.monotonic() > deadline:
            return info
        time.sleep(1.0)


def follow(client, job_id: str, scrub: Scrubber) -> int:
    """Stream the job's logs until it ends; 0 if it SUCCEEDED, 1 otherwise."""

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            sys.stdout.write(scrub(chunk))
            sys.stdout.flush()

    try:
        _call(client, asyncio.run, tail())
    except KeyboardInterrupt:
        print(
            f"\nstopped following; the job keeps running. rlhf job stop {job_id}",
            file=sys.stderr,
        )
        return 130
    info = wait_terminal(client, job_id)
    print(f"job {job_id}: {_status(info)}" + (f" ({scrub(info.message)})" if info.message else ""))
    return 0 if _status(info) == "SUCCEEDED" else 1


def _job_scrubber(info=None, extra: Iterable[str] = ()) -> Scrubber:
    """Secret values known here: the default names, --secret-env names and the job's own list."""
    names = [*SECRET_ENV, *extra]
    if info is not None and info.metadata:
        names += [n for n in info.metadata.get(_META_SECRETS, "").split(",") if n]
    return Scrubber(os.environ[n] for n in names if os.environ.get(n))


# ----------------------------------------------------------------------------- commands


def load_run(config: Path, overrides: list[str]) -> tuple[list, Path]:
    """Validate here what `rlhf train` will load there: (run configs, output dir)."""
    from rlhf.pipeline import is_pipeline_file, load_pipeline

    if is_pipeline_file(config):
        pipeline = load_pipeline(config, overrides)
        return [s.config for s in pipeline.stages if s.config is not None], pipeline.out
    cfg = load_config(config, overrides)
    return [cfg], Path(cfg.output_dir)


def cmd_submit(args) -> int:
    working_dir = (args.working_dir or PROJECT_ROOT).resolve()
    check_overrides(args.overrides)  # first: a config error message may quote the value
    cfgs, output_dir = load_run(args.config, args.overrides)  # a bad config fails here (exit 2)
    config_rel = _relative_config(args.config, working_dir)
    # Overlay files are read in the job, relative to its copy of the working dir.
    overrides = [
        _relative_config(Path(o), working_dir) if is_overlay_file(o) else o for o in args.overrides
    ]
    names = secret_names(args.secret_env, cfgs)
    secrets = {n: os.environ[n] for n in names if os.environ.get(n)}
    scrub = Scrubber(secrets.values())
    try:
        extra = json.loads(args.runtime_env_json) if args.runtime_env_json else None
    except json.JSONDecodeError as err:
        raise ConfigError(f"--runtime-env-json: not JSON ({err})") from None
    runtime_env = build_runtime_env(working_dir, secrets, args.pip, extra, args.exclude)
    entrypoint = build_entrypoint(args.python, config_rel, overrides)
    if not output_dir.is_absolute():
        print(
            f"note: output_dir={output_dir} is relative: on the cluster it lands inside "
            "the job's temporary copy of the working dir; use an absolute path on storage "
            "the nodes share.",
            file=sys.stderr,
        )
    client = connect(args.address)
    print(f"submitting to {client.get_address()}: {scrub(entrypoint)}")
    print(f"  working_dir: {working_dir}")
    print(f"  runtime_env: {scrub(json.dumps(_summary(runtime_env), sort_keys=True))}")
    job_id = _call(
        client,
        lambda: client.submit_job(
            entrypoint=entrypoint,
            runtime_env=runtime_env,
            submission_id=args.submission_id,
            metadata={"rlhf_config": config_rel, _META_SECRETS: ",".join(sorted(secrets))},
            entrypoint_num_cpus=args.entrypoint_num_cpus,
        ),
    )
    print(f"submitted job {job_id}")
    if not args.follow:
        print(f"  status: rlhf job status {job_id}")
        print(f"  logs:   rlhf job logs {job_id} --follow")
        print(f"  stop:   rlhf job stop {job_id}")
        return 0
    return follow(client, job_id, scrub)


def _summary(runtime_env: dict) -> dict:
    out = redact_runtime_env(runtime_env)
    out["excludes"] = f"{len(runtime_env.get('excludes', []))} patterns"
    return out


def cmd_job_status(args) -> int:
    client = connect(args.address)
    info = _call(client, client.get_job_info, args.job_id)
    print(describe(info, _job_scrubber(info, args.secret_env)))
    return 0


def cmd_job_logs(args) -> int:
    client = connect(args.address)
    info = _call(client, client.get_job_info, args.job_id)
    scrub = _job_scrubber(info, args.secret_env)
    if args.follow:
        return follow(client, args.job_id, scrub)
    sys.stdout.write(scrub(_call(client, client.get_job_logs, args.job_id)))
    return 0


def cmd_job_stop(args) -> int:
    client = connect(args.address)
    stopped = _call(client, client.stop_job, args.job_id)
    if not stopped:
        info = _call(client, client.get_job_info, args.job_id)
        print(f"job {args.job_id} was not running: {_status(info)}")
        return 0
    if not args.wait:
        print(f"stop requested for job {args.job_id}")
        return 0
    info = wait_terminal(client, args.job_id, args.timeout)
    print(f"job {args.job_id}: {_status(info)}")
    return 0 if _status(info) in TERMINAL else 1


def cmd_job_list(args) -> int:
    client = connect(args.address)
    jobs = sorted(_call(client, client.list_jobs), key=lambda j: j.start_time or 0)
    scrub = _job_scrubber(None, args.secret_env)
    print(f"{'SUBMISSION ID':<30} {'STATUS':<10} {'STARTED':<19}  ENTRYPOINT")
    for j in jobs:
        ident = j.submission_id or f"(driver {j.job_id})"
        print(
            f"{ident:<30} {_status(j):<10} {_time(j.start_time):<19}  {scrub(j.entrypoint or '')}"
        )
    return 0


def _cluster_command(fn: Callable) -> Callable:
    """Cluster errors end the command with one line on stderr and exit status 1."""

    def run(args) -> int:
        try:
            return fn(args)
        except ClusterError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1

    return run


# ----------------------------------------------------------------------------- parsers


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--address",
        help="the cluster's job API, http://HEAD:8265 (default: RAY_ADDRESS)",
    )
    p.add_argument(
        "--secret-env",
        action="append",
        default=[],
        metavar="NAME",
        help=f"another secret variable (always: {', '.join(SECRET_ENV)})",
    )


def add_parsers(sub) -> None:
    """Register `rlhf submit` and `rlhf job {status,logs,stop,list}` on the `rlhf` parser."""
    p = sub.add_parser("submit", help="run the config as a Ray job on a cluster (ray job submit)")
    p.add_argument("config", type=Path, help="YAML config or pipeline (inside the working dir)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, or overlay .yaml files")
    _common(p)
    p.add_argument("--working-dir", type=Path, help=f"uploaded to the job (default {PROJECT_ROOT})")
    p.add_argument("--exclude", action="append", default=[], help="another upload exclude")
    p.add_argument(
        "--pip",
        action="append",
        default=[],
        help="runtime_env pip: a package (repeatable) or one requirements file",
    )
    p.add_argument("--runtime-env-json", help="more runtime_env fields, as JSON (merged)")
    p.add_argument("--python", default="python", help="the job's Python command (default python)")
    p.add_argument("--submission-id", help="the job's id (default: Ray picks one)")
    p.add_argument(
        "--entrypoint-num-cpus", type=float, help="CPUs reserved for the driver (default 0)"
    )
    p.add_argument(
        "--follow",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="stream logs until the job ends; exit 0 only if it SUCCEEDED (default)",
    )
    p.add_argument(
        "--no-wait", dest="follow", action="store_false", help="print the job id and return"
    )
    p.set_defaults(fn=_cluster_command(cmd_submit))

    job = sub.add_parser("job", help="status, logs, stop and list of Ray jobs")
    jsub = job.add_subparsers(dest="job_command", required=True)
    for name, fn, helptext in (
        ("status", cmd_job_status, "a job's status and (redacted) runtime_env"),
        ("logs", cmd_job_logs, "a job's logs (secrets known here are scrubbed)"),
        ("stop", cmd_job_stop, "stop a job and wait until it has stopped"),
    ):
        p = jsub.add_parser(name, help=helptext)
        p.add_argument("job_id", help="submission id (raysubmit_…)")
        _common(p)
        p.set_defaults(fn=_cluster_command(fn))
    jsub.choices["logs"].add_argument(
        "--follow", action="store_true", help="stream until the job ends"
    )
    jsub.choices["stop"].add_argument(
        "--no-wait", dest="wait", action="store_false", help="return after asking"
    )
    jsub.choices["stop"].add_argument(
        "--timeout", type=float, default=60.0, help="seconds to wait for STOPPED"
    )
    p = jsub.add_parser("list", help="every job on the cluster")
    _common(p)
    p.set_defaults(fn=_cluster_command(cmd_job_list))
