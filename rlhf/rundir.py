"""An output_dir belongs to one run. Before anything is written, `claim_output_dir` decides
what a new run may do there: start (an empty or new directory), continue its own run
(`checkpoint.resume=auto`), or start over (`checkpoint.overwrite=true`, which removes the
previous run's outputs and nothing else). A directory holding another run is refused, so
that no run overwrites, prunes or resumes from another run's files.

Checkpoints are sealed with a manifest (size and SHA-256 of every file) before their
COMPLETE marker; resume verifies the newest one against it and falls back to the newest that
is whole, saying what it skipped and why. Pruning removes only the current run's checkpoints.
"""

from __future__ import annotations

import datetime
import errno
import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from rlhf.config import ConfigError, RunConfig, config_to_dict, dump_config, redact

RUN_FILE = "run.json"
COMPLETE = "COMPLETE"
MANIFEST = "MANIFEST.json"
STATE = "trainer_state.json"
#: Everything a run writes into its output_dir: what checkpoint.overwrite=true removes.
RUN_OUTPUTS = (
    RUN_FILE,
    "config.yaml",
    "metrics.jsonl",
    "summary.json",
    "actors.json",
    "samples.json",
    "plot.png",
    "error.log",
    "checkpoints",
    "final",
    "quarantine",
    "tensorboard",
    "wandb",
)
#: What marks a directory as holding a run (config.yaml alone is what `rlhf check` used to write).
RUN_MARKS = ("metrics.jsonl", "checkpoints", "final", "summary.json", RUN_FILE)
#: Config keys a resumed run may change: they do not change what the checkpoint's weights,
#: optimizer and data position mean (prefixes end with a dot).
SAFE_TO_CHANGE = (
    "output_dir",
    "logging.",
    "checkpoint.",
    "cluster.",
    "train.max_steps",
    "train.epochs",
    "train.eval_every",
    "train.max_restarts",
    "train.max_bad_steps",
    "data.eval",
    "data.strict",
    "data.max_bad_fraction",
    "roles.rollout.eval_samples_per_prompt",
    "roles.rollout.hybrid",  # the same samples either way (tested bit for bit)
    "roles.reward.run_in",  # where a function reward is scored, not what it scores
)


class TrainingAborted(RuntimeError):
    """The run stopped (too many bad steps, a dead actor, a full disk); the message names the
    last checkpoint, which `checkpoint.resume=auto` continues from."""


class OutputDirError(ConfigError):
    """The output_dir cannot be used as asked; the message names the path and the fix."""


@dataclass
class Claim:
    """What a run may do in its output_dir: its id, the checkpoint to resume from (None: step
    0), and lines to print (what was removed, skipped or changed)."""

    out: Path
    run_id: str
    resume_from: Path | None = None
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- checkpoints


def checkpoint_step(path: Path) -> int:
    return int(path.name.split("_")[1])


def complete_checkpoints(root: Path) -> list[Path]:
    """Sealed checkpoints under root, oldest first (a crash mid-save leaves no COMPLETE)."""
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step_*") if (p / COMPLETE).exists()]
    return sorted(found, key=checkpoint_step)


def _files(path: Path) -> list[Path]:
    skip = {MANIFEST, COMPLETE}
    return sorted(p for p in path.rglob("*") if p.is_file() and p.name not in skip)


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def seal_checkpoint(cfg: RunConfig, path: Path, state: dict, run_id: str) -> Path:
    """Finish a checkpoint the actors have written: config, coordinator state (with the run
    id), the manifest, then the COMPLETE marker (last: a crash mid-save never looks
    resumable); then prune this run's older checkpoints beyond checkpoint.keep_last."""
    dump_config(cfg, path / "config.yaml")
    (path / STATE).write_text(json.dumps({**state, "run_id": run_id}))
    digest = cfg.checkpoint.verify == "digest"
    manifest = {
        str(f.relative_to(path)): {
            "size": f.stat().st_size,
            **({"sha256": _sha256(f)} if digest else {}),
        }
        for f in _files(path)
    }
    (path / MANIFEST).write_text(json.dumps(manifest, indent=1))
    (path / COMPLETE).write_text("")
    keep = cfg.checkpoint.keep_last
    if keep:
        for old in own_checkpoints(path.parent, run_id)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return path


def own_checkpoints(root: Path, run_id: str) -> list[Path]:
    """The sealed checkpoints this run wrote (its id in trainer_state.json), oldest first."""
    return [p for p in complete_checkpoints(root) if _run_id_of(p) == run_id]


def _run_id_of(path: Path) -> str | None:
    try:
        return json.loads((path / STATE).read_text()).get("run_id")
    except (OSError, ValueError):
        return None


def verify_checkpoint(path: Path) -> str | None:
    """None when every file of the checkpoint matches its manifest, else why not (one line).
    A checkpoint sealed before manifests existed is taken as whole."""
    if not (path / COMPLETE).exists():
        return "no COMPLETE marker (the save did not finish)"
    if not (path / MANIFEST).exists():
        return None
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except ValueError:
        return f"{MANIFEST} is not valid JSON"
    for name, want in manifest.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        size = f.stat().st_size
        if size != want["size"]:
            return f"{name} has {size:,} bytes, {want['size']:,} when it was written (truncated?)"
        if "sha256" in want and _sha256(f) != want["sha256"]:
            return f"{name} does not match its SHA-256 digest (corrupted since it was written)"
    return None


def newest_valid_checkpoint(root: Path, run_id: str | None = None) -> tuple[Path | None, list[str]]:
    """The newest checkpoint under root that verifies (of run `run_id` when given, or from
    before run ids), and a line for each newer one skipped."""
    skipped = []
    for path in reversed(complete_checkpoints(root)):
        owner = _run_id_of(path)
        if run_id is not None and owner not in (run_id, None):
            skipped.append(f"checkpoint {path.name} skipped: written by another run ({owner})")
            continue
        problem = verify_checkpoint(path)
        if problem is None:
            return path, skipped
        skipped.append(f"checkpoint {path.name} skipped: {problem}")
    return None, skipped


def disk_full_message(path: Path, what: str) -> str:
    """One line for a write that ran out of space: the disk (mount point), the path, what is
    free now."""
    probe = _existing(path)
    free = shutil.disk_usage(probe).free
    mount = probe.resolve()
    while not os.path.ismount(mount) and mount != mount.parent:
        mount = mount.parent
    return (
        f"no space left on device: {what} {path} failed; the disk at {mount} has "
        f"{free / 2**20:,.1f} MiB free. Free some space or set output_dir on a larger disk"
    )


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def is_disk_full(err: BaseException, path: Path) -> bool:
    """Whether a write into `path` failed for want of space: ENOSPC anywhere in the error's
    chain or its text (a Ray task error carries its cause as text), or a disk that is full now
    (torch.save reports a full disk as 'iostream error' or 'unexpected pos', no errno): call
    it before removing what the failed write left."""
    if shutil.disk_usage(_existing(path)).free < 2**20:
        return True
    seen = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen = seen.__cause__ or seen.__context__
    text = str(err)
    return "No space left on device" in text or "Errno 28" in text


# ----------------------------------------------------------------------------- the claim


def _flatten(d: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_changes(saved: dict, cfg: RunConfig) -> dict[str, tuple[object, object]]:
    """key -> (saved value, new value) for every key of the saved config whose value differs
    (both redacted). Keys the saved config lacks came with a later version of this project
    and hold their defaults: not a change."""
    old, new = _flatten(saved), _flatten(redact(config_to_dict(cfg)))
    return {k: (v, new.get(k)) for k, v in sorted(old.items()) if new.get(k, v) != v}


def _is_safe(key: str, allowed: list[str]) -> bool:
    return any(key == s or (s.endswith(".") and key.startswith(s)) for s in SAFE_TO_CHANGE) or any(
        key == a or key.startswith(a + ".") for a in allowed
    )


def _shown(changes: dict[str, tuple[object, object]]) -> str:
    return ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items())


def _changes_since(checkpoint: Path, cfg: RunConfig) -> dict[str, tuple[object, object]]:
    saved_file = checkpoint / "config.yaml"
    if not saved_file.exists():
        return {}
    return config_changes(yaml.safe_load(saved_file.read_text()) or {}, cfg)


def _unsafe(changes: dict, cfg: RunConfig) -> dict[str, tuple[object, object]]:
    return {k: v for k, v in changes.items() if not _is_safe(k, cfg.checkpoint.allow_changes)}


def resume_conflicts(checkpoint: Path, cfg: RunConfig) -> dict[str, tuple[object, object]]:
    """The changes from the checkpoint's config that resuming cannot take: keys that are not
    safe to change and not listed in checkpoint.allow_changes."""
    return _unsafe(_changes_since(checkpoint, cfg), cfg)


def _check_config(checkpoint: Path, cfg: RunConfig, notes: list[str]) -> None:
    """Refuse to resume from a checkpoint written with another config (but keys that are safe
    to change, or listed in checkpoint.allow_changes, which are reported)."""
    changes = _changes_since(checkpoint, cfg)
    unsafe = _unsafe(changes, cfg)
    if unsafe:
        raise OutputDirError(
            f"checkpoint {checkpoint} was written with another config ({_shown(unsafe)}): "
            "resuming would mix two runs. Resume with its values, start over with "
            "checkpoint.overwrite=true, use another output_dir, or accept the change with "
            f"checkpoint.allow_changes=[{','.join(unsafe)}]"
        )
    relevant = {k: v for k, v in changes.items() if not k.startswith("checkpoint.")}
    if relevant:
        notes.append(f"resuming with changed settings: {_shown(relevant)}")


def _describe_run(out: Path) -> str:
    found = [name for name in RUN_MARKS if (out / name).exists()]
    steps = [p.name for p in complete_checkpoints(out / "checkpoints")]
    if steps:
        found[found.index("checkpoints")] = f"checkpoints {steps[0]}..{steps[-1]}"
    return ", ".join(found)


def _writable(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"output_dir={out} is a file: set output_dir to a directory path")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        if is_disk_full(err, out):
            raise OutputDirError(disk_full_message(out, "creating output_dir")) from None
        reason = err.strerror or type(err).__name__
        raise OutputDirError(
            f"output_dir={out} is not writable ({reason}): set output_dir to a directory you can write to"
        ) from None


def remove_run(out: Path) -> list[str]:
    """Remove what a run wrote into out (RUN_OUTPUTS only); the names removed."""
    removed = []
    for name in RUN_OUTPUTS:
        p = out / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()
        else:
            continue
        removed.append(name)
    return removed


def _new_run(out: Path, notes: list[str], resume_from: Path | None = None) -> Claim:
    """A new run id, recorded in OUTPUT_DIR/run.json (with the checkpoint it starts from)."""
    run_id = uuid.uuid4().hex[:12]
    info = {"run_id": run_id, "created": datetime.datetime.now().isoformat(timespec="seconds")}
    if resume_from is not None:
        info["resumed_from"] = str(resume_from)
    (out / RUN_FILE).write_text(json.dumps(info, indent=1))
    return Claim(out, run_id, resume_from, notes)


def claim_output_dir(cfg: RunConfig) -> Claim:
    """Decide, before anything is written, what this run may do in cfg.output_dir (see the
    module docstring); raises OutputDirError with the fix when it may not start."""
    out = Path(cfg.output_dir)
    resume, notes = cfg.checkpoint.resume, []
    if resume not in ("never", "auto") and (problem := verify_checkpoint(Path(resume))):
        raise OutputDirError(f"checkpoint.resume={resume}: cannot resume from it: {problem}")
    _writable(out)
    previous = _describe_run(out)
    if cfg.checkpoint.overwrite and previous:
        notes.append(
            f"checkpoint.overwrite=true: removed the previous run in {out} ({', '.join(remove_run(out))})"
        )
        previous = ""
    if resume == "auto":
        return _continue(cfg, out, notes)
    inside = resume != "never" and out.resolve() in Path(resume).resolve().parents
    if previous and inside:  # a checkpoint of this directory's own run
        return _continue(cfg, out, notes, Path(resume))
    if previous:
        raise OutputDirError(
            f"output_dir={out} holds another run ({previous}). Continue it with "
            "checkpoint.resume=auto, start over with checkpoint.overwrite=true (removes it), "
            "or set another output_dir"
        )
    if resume == "never":
        return _new_run(out, notes)
    _check_config(Path(resume), cfg, notes)
    return _new_run(out, notes, Path(resume))


def _continue(cfg: RunConfig, out: Path, notes: list[str], chosen: Path | None = None) -> Claim:
    """This directory's run, from its newest whole checkpoint (resume=auto) or `chosen`."""
    info = {}
    if (out / RUN_FILE).exists():
        info = json.loads((out / RUN_FILE).read_text())
    if chosen is not None:  # verified by claim_output_dir
        path, skipped = chosen, []
    else:
        path, skipped = newest_valid_checkpoint(out / "checkpoints", info.get("run_id"))
    notes += skipped
    if path is None:
        notes.append(
            f"checkpoint.resume=auto: no checkpoint to resume in {out / 'checkpoints'}; "
            "starting from step 0"
        )
        if "run_id" in info:
            return Claim(out, info["run_id"], None, notes)
        return _new_run(out, notes)
    _check_config(path, cfg, notes)
    if skipped:
        notes.append(f"resuming from {path.name}, the newest whole checkpoint")
    run_id = info.get("run_id") or _run_id_of(path)
    if run_id is None:  # a directory from before run ids: this run adopts it
        return _new_run(out, notes, path)
    return Claim(out, run_id, path, notes)
