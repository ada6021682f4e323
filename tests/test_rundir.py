"""rlhf.rundir on its own: checkpoint manifests and what resume verifies, and which config
changes a resume accepts (the end-to-end behaviour is in test_safety.py)."""

from __future__ import annotations

import json

import yaml

from rlhf.config import config_to_dict, load_config, redact
from rlhf.rundir import (
    config_changes,
    newest_valid_checkpoint,
    resume_conflicts,
    seal_checkpoint,
    verify_checkpoint,
)


def _cfg(*extra):
    return load_config(None, ["train.lr=5e-4", "checkpoint.keep_last=null", *extra])


def _checkpoint(root, step, cfg, run_id="r1"):
    path = root / f"step_{step}"
    (path / "global").mkdir(parents=True)
    (path / "global" / "weights.bin").write_bytes(bytes(range(256)) * 40)
    return seal_checkpoint(cfg, path, {"step": step}, run_id)


def test_a_sealed_checkpoint_verifies_and_any_damage_is_named(tmp_path):
    cfg = _cfg()
    path = _checkpoint(tmp_path, 2, cfg)
    manifest = json.loads((path / "MANIFEST.json").read_text())
    assert set(manifest) == {"config.yaml", "trainer_state.json", "global/weights.bin"}
    assert verify_checkpoint(path) is None
    weights = path / "global" / "weights.bin"
    data = bytearray(weights.read_bytes())
    data[5000] ^= 1  # one bit, same size
    weights.write_bytes(bytes(data))
    assert verify_checkpoint(path) == (
        "global/weights.bin does not match its SHA-256 digest (corrupted since it was written)"
    )
    weights.write_bytes(bytes(data[:100]))
    assert verify_checkpoint(path) == (
        "global/weights.bin has 100 bytes, 10,240 when it was written (truncated?)"
    )
    weights.unlink()
    assert verify_checkpoint(path) == "global/weights.bin is missing"
    (path / "COMPLETE").unlink()
    assert verify_checkpoint(path) == "no COMPLETE marker (the save did not finish)"


def test_size_only_manifests_skip_the_digest(tmp_path):
    path = _checkpoint(tmp_path, 2, _cfg("checkpoint.verify=size"))
    assert "sha256" not in json.loads((path / "MANIFEST.json").read_text())["global/weights.bin"]
    weights = path / "global" / "weights.bin"
    data = bytearray(weights.read_bytes())
    data[0] ^= 1
    weights.write_bytes(bytes(data))
    assert verify_checkpoint(path) is None  # what "size" trades away


def test_newest_valid_falls_back_and_skips_other_runs(tmp_path):
    cfg = _cfg()
    for step in (2, 4):
        _checkpoint(tmp_path, step, cfg)
    _checkpoint(tmp_path, 6, cfg, run_id="someone")
    (tmp_path / "step_4" / "global" / "weights.bin").write_bytes(b"x")
    path, skipped = newest_valid_checkpoint(tmp_path, "r1")
    assert path == tmp_path / "step_2"
    assert skipped == [
        "checkpoint step_6 skipped: written by another run (someone)",
        "checkpoint step_4 skipped: global/weights.bin has 1 bytes, 10,240 when it was written "
        "(truncated?)",
    ]


def test_pruning_removes_only_this_runs_checkpoints(tmp_path):
    cfg = _cfg("checkpoint.keep_last=1")
    _checkpoint(tmp_path, 2, cfg, run_id="other")
    _checkpoint(tmp_path, 4, cfg)
    _checkpoint(tmp_path, 6, cfg)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_2", "step_6"]


def test_which_config_changes_a_resume_takes(tmp_path):
    saved = _cfg()
    path = _checkpoint(tmp_path, 2, saved)
    assert resume_conflicts(path, _cfg("train.max_steps=99", "logging.log_every=5")) == {}
    assert resume_conflicts(path, _cfg("train.lr=1e-3")) == {"train.lr": (5e-4, 1e-3)}
    assert resume_conflicts(path, _cfg("train.lr=1e-3", "checkpoint.allow_changes=[train]")) == {}
    # A key the saved config lacks came with a later version, at its default: no change.
    old = redact(config_to_dict(saved))
    del old["ppo"]["scale_rewards"]
    (path / "config.yaml").write_text(yaml.safe_dump(old))
    assert config_changes(old, saved) == {}
    assert resume_conflicts(path, saved) == {}
