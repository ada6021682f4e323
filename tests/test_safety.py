"""Nothing lost, nothing exposed, every failure one clear line — end to end through the CLI
with real Ray, DeepSpeed and the tiny model: a run never overwrites, prunes or resumes from
another run's files; a corrupt checkpoint, a torn metrics line, a full disk and Ctrl-C each
leave a resumable run and one line saying how to continue; a local run listens on loopback
only; bad input ends in one line naming the key or path and the fix."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from tests.test_cli import rlhf

ROOT = Path(__file__).resolve().parents[1]
DPO = "configs/quickstart/dpo_tiny.yaml"
# 16 pairs = 2 steps an epoch: max_steps=4 takes 2 passes (max_steps wins over epochs).
SMALL = ["data.train.limit=16", "data.eval=null", "checkpoint.every_steps=2"]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _one_error_line(result: subprocess.CompletedProcess, code: int = 2) -> str:
    assert result.returncode == code, result.stdout[-2000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr + result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def test_an_output_dir_belongs_to_one_run(tmp_path):
    out = tmp_path / "out"
    first = rlhf("train", DPO, f"output_dir={out}", "train.max_steps=4", *SMALL)
    assert first.returncode == 0, first.stderr[-3000:]
    both = first.stdout + first.stderr
    # max_steps wins over epochs, and says so.
    assert "train.max_steps=4 wins over train.epochs=1: 2.00 passes over the data" in both
    # Noise: the data summary once, no library chatter, a plain progress line (not a TTY),
    # and a last line that labels wall time, start-up and steady-state throughput.
    assert both.count("data: builtin:reviews") == 1
    for chatter in (
        "Setting accelerator to CPU",
        "RAY_AUTH_MODE",
        "Loading weights",
        "gemm_4bit",
        "built successfully",
        "\r",
    ):
        assert chatter not in both, chatter
    assert "step 2/4, loss" in first.stderr and "step 4/4, loss" in first.stderr
    done = next(line for line in first.stdout.splitlines() if line.startswith("done:"))
    assert "wall time" in done and "first step done after" in done and "steady-state" in done
    rows = _rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    steps = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    assert steps == ["step_2", "step_4"]
    run_id = json.loads((out / "run.json").read_text())["run_id"]
    kept = {p: _digest(p) for p in [out / "metrics.jsonl", out / "final" / "model.safetensors"]}

    # Another run into the same directory: refused, nothing touched.
    again = rlhf("train", DPO, f"output_dir={out}", "train.max_steps=4", *SMALL)
    line = _one_error_line(again)
    assert f"output_dir={out} holds another run" in line
    assert "checkpoint.resume=auto" in line and "checkpoint.overwrite=true" in line
    # Continuing with a setting that changes what the checkpoint means: refused, named.
    changed = rlhf(
        "train", DPO, f"output_dir={out}", "train.max_steps=4", *SMALL,
        "checkpoint.resume=auto", "train.lr=1e-3",
    )  # fmt: skip
    line = _one_error_line(changed)
    assert "written with another config (train.lr 0.0005 -> 0.001)" in line
    assert "checkpoint.allow_changes=[train.lr]" in line
    assert {p: _digest(p) for p in kept} == kept
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == steps

    # A checkpoint of another run in the directory, a truncated file in the newest one, and a
    # half-written last metrics line: resume skips both checkpoints (saying why), starts from
    # step 2, drops the torn line, and prunes only its own checkpoints.
    foreign = out / "checkpoints" / "step_100"
    shutil.copytree(out / "checkpoints" / "step_2", foreign)
    state = json.loads((foreign / "trainer_state.json").read_text())
    (foreign / "trainer_state.json").write_text(json.dumps({**state, "run_id": "another"}))
    weights = out / "checkpoints" / "step_4" / "mp_rank_00_model_states.pt"
    with weights.open("r+b") as f:
        f.truncate(1000)
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "loss": 0.')
    more = rlhf(
        "train", DPO, f"output_dir={out}", "train.max_steps=8", *SMALL, "checkpoint.resume=auto"
    )
    assert more.returncode == 0, more.stderr[-3000:]
    said = more.stdout + more.stderr
    assert "checkpoint step_100 skipped: written by another run (another)" in said
    assert (
        "checkpoint step_4 skipped: mp_rank_00_model_states.pt has 1,000 bytes, " in said
        and "(truncated?)" in said
    )
    assert "resuming from step_2, the newest whole checkpoint" in said
    assert "resuming with changed settings: train.max_steps 4 -> 8" in said
    assert "dropped 1 half-written line(s)" in said
    resumed = _rows(out)
    assert [r["step"] for r in resumed] == list(range(1, 9))
    assert resumed[2]["loss"] == rows[2]["loss"] and resumed[3]["loss"] == rows[3]["loss"]
    assert json.loads((out / "run.json").read_text())["run_id"] == run_id
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == [
        "step_100",  # another run's: never pruned
        "step_6",
        "step_8",
    ]

    # Starting over is explicit, and removes the previous run's outputs first.
    over = rlhf(
        "train", DPO, f"output_dir={out}", "train.max_steps=2", *SMALL, "checkpoint.overwrite=true"
    )
    assert over.returncode == 0, over.stderr[-3000:]
    assert f"checkpoint.overwrite=true: removed the previous run in {out}" in over.stdout
    assert [r["step"] for r in _rows(out)] == [1, 2]
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_2"]
    assert json.loads((out / "run.json").read_text())["run_id"] != run_id


FULL_DISK = """
set -u
mount -t tmpfs -o size=9m tmpfs "$DISK"
"$PY" -m launch train {dpo} output_dir="$DISK/out" train.max_steps=6 {small} 2> "$DISK.err1"
echo "first=$?"
mount -o remount,size=64m "$DISK"
cont=$(grep '^Continue with: rlhf ' "$DISK.err1" | sed 's/^Continue with: rlhf //')
eval "\\"$PY\\" -m launch $cont"
echo "second=$?"
ls "$DISK/out/checkpoints"
"""


def test_a_full_disk_stops_with_one_line_and_the_run_continues(tmp_path):
    """A tmpfs of 9 MiB in a private mount namespace holds the first checkpoint (~6 MiB) but
    not the second: the run stops naming the disk, the path and the free space, removes the
    partial checkpoint, and the command it prints continues the run once there is room."""
    if subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode != 0:
        pytest.skip("needs a private mount namespace (unshare -rm) for a small tmpfs")
    disk = tmp_path / "disk"
    disk.mkdir()
    script = FULL_DISK.format(dpo=DPO, small=" ".join(SMALL))
    env = {**os.environ, "DISK": str(disk), "PY": sys.executable, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        ["unshare", "-rm", "bash", "-c", script],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    err1 = Path(f"{disk}.err1").read_text()
    assert "first=3" in done.stdout, done.stdout + err1
    assert "Traceback" not in err1
    errors = [line for line in err1.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err1
    assert errors[0].startswith(
        f"error: no space left on device: saving checkpoint {disk}/out/checkpoints/step_4 "
        f"failed; the disk at {disk} has "
    )
    assert errors[0].endswith(
        "MiB free. Free some space or set output_dir on a larger disk; "
        f"the last checkpoint is {disk}/out/checkpoints/step_2"
    )
    assert "second=0" in done.stdout, done.stdout + done.stderr[-3000:]
    # The partial step_4 was removed, and the continued run wrote its own.
    assert done.stdout.split("second=0")[1].split() == ["latest", "step_4", "step_6"]


def _ppo_config(tmp_path: Path) -> Path:
    cfg = {
        "algorithm": "ppo",
        "output_dir": str(tmp_path / "out"),
        "data": {"train": {"path": "builtin:reviews"}, "max_length": 48},
        "train": {"global_batch_size": 4, "micro_batch_size": 8, "max_steps": 400},
        "roles": {
            "reward": {"type": "function", "function": "tests.reward_fns:letter_e"},
            "rollout": {"max_new_tokens": 8, "n_samples_per_prompt": 2},
        },
        "ppo": {"estimator": "rloo", "kl_coef": 0.05},
        "checkpoint": {"every_steps": 2},
    }
    path = tmp_path / "ppo.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


def _listening(root: psutil.Process) -> dict[str, set[str]]:
    """process name -> addresses its TCP sockets listen on, for root and its descendants (Ray's
    GCS, raylet and agents, and the actors, run under the driver)."""
    found: dict[str, set[str]] = {}
    for proc in [root, *root.children(recursive=True)]:
        try:
            conns = proc.net_connections(kind="inet")
            name = proc.name()
        except psutil.Error:
            continue
        for c in conns:
            if c.status == psutil.CONN_LISTEN:
                found.setdefault(name, set()).add(c.laddr.ip)
    return found


def test_local_run_listens_on_loopback_and_ctrl_c_says_how_to_continue(tmp_path):
    """A PPO run with a separate rollout engine (so the training and weight-sync groups both
    rendezvous): every listening socket of the run's processes is on the loopback. Ctrl-C
    then ends it with exit 130, the last checkpoint and the exact command to continue, which
    does continue it."""
    config = _ppo_config(tmp_path)
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "launch", "train", str(config), "logging.progress=false"]
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # As in a terminal: a runner that started the tests in the background (a shell's `&`)
        # leaves SIGINT ignored, and Python keeps an inherited SIG_IGN.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + 300
        while not (out / "checkpoints" / "step_2" / "COMPLETE").exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.2)
        listening = _listening(psutil.Process(proc.pid))
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    addresses = {ip for ips in listening.values() for ip in ips}
    assert {"gcs_server", "raylet"} <= set(listening), listening
    assert sum(len(ips) for ips in listening.values()) >= 5, listening
    assert addresses <= LOOPBACK, listening

    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr
    whole = [p for p in (out / "checkpoints").glob("step_*") if (p / "COMPLETE").exists()]
    last = max(whole, key=lambda p: int(p.name[5:]))
    # Interrupted mid-save, the partial checkpoint is gone, not left for a later resume.
    assert all((p / "COMPLETE").exists() for p in (out / "checkpoints").glob("step_*"))
    assert f"interrupted; the last checkpoint is {last}." in stderr
    hint = [line for line in stderr.splitlines() if line.startswith("Continue with: ")]
    assert hint == [
        f"Continue with: rlhf train {config} logging.progress=false checkpoint.resume=auto"
    ]
    step = int(last.name[5:])
    words = shlex.split(hint[0].removeprefix("Continue with: rlhf "))
    more = rlhf(*words, f"train.max_steps={step + 2}")
    assert more.returncode == 0, more.stderr[-3000:]
    assert f"resumed from {last} at step {step}" in more.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", DPO, "output_dir={tmp}/afile"], "output_dir={tmp}/afile is a file"),
        (
            ["train", DPO, "output_dir={tmp}/afile/sub"],
            "output_dir={tmp}/afile/sub is not writable (Not a directory)",
        ),
        (
            ["train", DPO, "output_dir={tmp}/o", "model.name_or_path={tmp}/no/such/model"],
            "model.name_or_path: {tmp}/no/such/model: no such directory",
        ),
        (
            ["train", DPO, "output_dir={tmp}/o", "model.name_or_path=builtin:tinyy"],
            "model.name_or_path: 'builtin:tinyy' is not a builtin model (there are builtin:tiny",
        ),
        (
            ["train", DPO, "output_dir={tmp}/o", "model.name_or_path=nobody/no-such-model"],
            "not in the Hugging Face cache while the hub is offline (HF_HUB_OFFLINE=1)",
        ),
        (
            ["train", DPO, "output_dir={tmp}/o", "model.lora.target_modules=[q_projx]"],
            "model.lora.target_modules: 'q_projx' is not a module of builtin:tiny; its layers "
            "are named down_proj, embed_tokens, gate_proj",
        ),
        (["train", DPO, "lr=1e-4"], "unknown key 'lr' (did you mean train.lr?)"),
        (
            ["eval", DPO, "--model", "{tmp}/no/such/checkpoint"],
            "--model: {tmp}/no/such/checkpoint: no such directory",
        ),
        (
            ["train", DPO, "output_dir={tmp}/o", "checkpoint.resume={tmp}/afile"],
            "checkpoint.resume={tmp}/afile: cannot resume from it: no COMPLETE marker",
        ),
    ],
    ids=[
        "output-dir-is-a-file",
        "output-dir-not-writable",
        "model-path-missing",
        "builtin-misspelled",
        "hub-id-offline",
        "lora-target-missing",
        "bare-lr",
        "eval-model-missing",
        "resume-path-not-a-checkpoint",
    ],
)
def test_bad_input_is_one_line(args, message, tmp_path, capsys, monkeypatch):
    """Each ends before any actor starts, with exit 2 and one line naming the key or path and
    the fix; nothing is written where the run would have written."""
    from launch.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "afile").write_text("not a directory")
    code = main([a.replace("{tmp}", str(tmp_path)) for a in args])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert message.replace("{tmp}", str(tmp_path)) in lines[0]
    assert not (tmp_path / "o").exists()


def test_version_and_help_on_every_option(capsys):
    from launch.cli import build_parser, main

    with pytest.raises(SystemExit) as ended:
        main(["--version"])
    assert ended.value.code == 0 and capsys.readouterr().out.startswith("rlhf 0.")

    def parsers(p):
        yield p
        for action in p._actions:
            if isinstance(action.choices, dict):  # subcommands
                for sub in action.choices.values():
                    yield from parsers(sub)

    missing = [
        f"{p.prog} {'/'.join(a.option_strings) or a.dest}"
        for p in parsers(build_parser())
        for a in p._actions
        if not a.help and a.dest != "help" and not isinstance(a.choices, dict)
    ]
    assert missing == []


def test_secrets_in_urls_are_redacted_wherever_the_config_is_written(tmp_path):
    """A reward URL's ?api_key=, &access_token=, &key= (and the password) never reach
    `rlhf config`, config.yaml (also each checkpoint's) or the wandb config."""
    from rlhf.config import config_to_dict, dump_config, load_config, redact

    url = "https://user:pw1@host/score?api_key=S3CRET&model=m&access_token=T0KEN&key=K3Y#x"
    overrides = ["algorithm=ppo", "roles.reward.type=http", f"roles.reward.url={url}"]
    shown = rlhf("config", DPO, *overrides)
    assert shown.returncode == 0, shown.stderr
    cfg = load_config(ROOT / DPO, overrides)
    written = dump_config(cfg, tmp_path / "config.yaml") + (tmp_path / "config.yaml").read_text()
    logged = json.dumps(redact(config_to_dict(cfg)))  # what wandb receives
    for text in (shown.stdout, written, logged):
        for secret in ("pw1", "S3CRET", "T0KEN", "K3Y"):
            assert secret not in text
        assert "model=m" in text and "api_key=**REDACTED**" in text


def test_truncated_prompts_are_counted(tmp_path):
    """A 100,000-character prompt is cut to its last tokens (data.truncation_mode=keep_end),
    counted per field in the data summary instead of silently."""
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"prompt": "Review the movie Up."}, {"prompt": "word " * 20_000}] * 2
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = rlhf(
        "check", DPO, "algorithm=ppo", f"data.train.path={prompts}", "data.eval=null",
        "roles.reward.type=function", "roles.reward.function=tests.reward_fns:letter_e",
        "train.global_batch_size=4", "train.micro_batch_size=4",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "4 of 4 rows usable (prompt), truncated to fit data.max_length: 2 prompt" in (
        result.stdout
    )
