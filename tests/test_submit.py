"""`rlhf submit` and `rlhf job …` against a real Ray cluster: `ray start --head` on 127.0.0.1
with token authentication, its own temp dir and ports, started and torn down by this module
(only its own processes: they carry a marker variable; other tests' clusters are left alone).

The CLI runs as a subprocess, as a user would run it. A secret set in the submitting
environment must reach the job's driver process but never its command line, the CLI's
output, the printed job info or the job logs.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from actors.net import free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv: its `ray`, and the `python` jobs run with
MARKER = "RLHF_TEST_SUBMIT_CLUSTER"
SECRET = "sk-test-" + secrets.token_hex(12)
OTHER_SECRET = "other-" + secrets.token_hex(12)
JOB_TIMEOUT_S = 300
#: The quickstart SFT config, cut to 2 steps without eval (runs in ~1 min on 2 loaded cores).
SFT = ["configs/quickstart/sft_tiny.yaml", "logging.progress=false", "data.eval=null"]


@dataclass
class Cluster:
    address: str
    env: dict[str, str]
    """Environment of a user who holds the token (the secret not yet set)."""
    temp_dir: str
    jobs: dict[str, str]
    """Job ids by test, for the tests after."""


def _ports(n: int) -> list[int]:
    ports: set[int] = set()
    while len(ports) < n:
        ports.add(free_port())
    return sorted(ports)


def _api_ready(address: str, token: str) -> bool:
    req = urllib.request.Request(
        f"{address}/api/version", headers={"Authorization": f"Bearer {token}"}
    )
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


def _marked(marker: str) -> list[psutil.Process]:
    """This cluster's processes: the ones whose environment carries its marker."""
    found = []
    for p in psutil.process_iter():
        if p.pid == os.getpid():
            continue
        with contextlib.suppress(psutil.Error, OSError):
            if p.uids().real == os.getuid() and p.environ().get(MARKER) == marker:
                found.append(p)
    return found


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    """Those still running (a zombie has exited; its parent, also stopping, reaps it)."""
    out = []
    for p in procs:
        with contextlib.suppress(psutil.Error):
            if p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
    return out


def _stop_cluster(proc: subprocess.Popen, marker: str) -> None:
    """SIGTERM every process of this cluster at once: the `ray start --block` session and
    whatever carries the marker (workers and job drivers sit in process groups of their own);
    SIGKILL what still runs after 5 s (`ray start --block`, the raylet and the autoscaler
    monitor take longer or wait for a second signal; nothing here needs a clean exit)."""
    procs = _marked(marker)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    deadline = time.monotonic() + 5
    while _alive(procs) and time.monotonic() < deadline:
        time.sleep(0.5)
    for p in _alive([*procs, *_marked(marker)]):
        with contextlib.suppress(psutil.Error):
            p.kill()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)
    deadline = time.monotonic() + 10
    while _alive(_marked(marker)) and time.monotonic() < deadline:
        time.sleep(0.5)


@pytest.fixture(scope="module")
def cluster():
    # A short temp dir: Ray's Unix sockets live under it (the path limit is ~107 bytes).
    temp_dir = tempfile.mkdtemp(prefix="rs", dir="/tmp")
    token = secrets.token_hex(16)
    gcs, dash, client, agent, agent_grpc, metrics, rt_agent, node_mgr, obj_mgr = _ports(9)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "WANDB_"))}
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=token,
        RAY_USAGE_STATS_ENABLED="0",
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
    )
    env.pop("HF_TOKEN", None)
    env.pop("HUGGING_FACE_HUB_TOKEN", None)
    # The ray start command line
    cmd = [
        str(BIN / "ray"), "start", "--head", "--block", "--disable-usage-stats",
        "--node-ip-address", "127.0.0.1", "--port", str(gcs), "--num-cpus", "4",
        "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
        "--dashboard-port", str(dash), "--ray-client-server-port", str(client),
        "--dashboard-agent-listen-port", str(agent),
        "--dashboard-agent-grpc-port", str(agent_grpc),
        "--metrics-export-port", str(metrics), "--runtime-env-agent-port", str(rt_agent),
        "--node-manager-port", str(node_mgr), "--object-manager-port", str(obj_mgr),
        "--temp-dir", temp_dir,
    ]  # fmt: skip
    log = open(Path(temp_dir) / "ray-start.log", "w")  # noqa: SIM115 (closed at teardown)
    proc = subprocess.Popen(
        cmd,
        env={**env, MARKER: temp_dir},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        cwd=temp_dir,
    )
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 180
        while not _api_ready(address, token):
            if proc.poll() is not None or time.monotonic() > deadline:
                text = (Path(temp_dir) / "ray-start.log").read_text()[-3000:]
                pytest.fail(f"ray start did not come up (rc={proc.poll()}):\n{text}")
            time.sleep(1)
        yield Cluster(address, env, temp_dir, {})
    finally:
        _stop_cluster(proc, temp_dir)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def rlhf(cluster: Cluster, *args: str, env: dict | None = None, timeout: float = 120):
    """`python -m launch ARGS --address …` as a user would run it."""
    cmd = [sys.executable, "-m", "launch", *args, "--address", cluster.address]
    return subprocess.run(
        cmd,
        env=env if env is not None else cluster.env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _job_id(stdout: str) -> str:
    m = re.search(r"submitted job (\S+)", stdout)
    assert m, stdout
    return m.group(1)


def _no_secret(*texts: str) -> None:
    for text in texts:
        assert SECRET not in text
        assert OTHER_SECRET not in text


# ----------------------------------------------------------------------------- refusals


def test_bad_config_fails_before_submission(cluster):
    r = rlhf(cluster, "submit", *SFT, "train.max_stepz=2", "--no-wait")
    assert r.returncode == 2, r.stderr
    assert "error:" in r.stderr and "max_stepz" in r.stderr
    assert "submitted job" not in r.stdout


def test_secret_override_is_refused(cluster):
    r = rlhf(
        cluster, "submit", *SFT, f"roles.reward.headers.Authorization=Bearer {SECRET}", "--no-wait"
    )
    assert r.returncode == 2
    assert "looks like a secret" in r.stderr and "token_env" in r.stderr
    _no_secret(r.stdout, r.stderr)


def test_submission_without_the_token_is_refused(cluster, tmp_path):
    no_token = {k: v for k, v in cluster.env.items() if not k.startswith("RAY_AUTH")}
    wrong = {**cluster.env, "RAY_AUTH_TOKEN": "not-the-token"}
    for env, why in ((no_token, "Missing authentication token"), (wrong, "Invalid")):
        out = tmp_path / "never"
        r = rlhf(cluster, "submit", *SFT, f"output_dir={out}", "--no-wait", env=env)
        assert r.returncode == 1, r.stdout + r.stderr
        assert "refused the request" in r.stderr and why in r.stderr
        assert "RAY_AUTH_TOKEN" in r.stderr  # the fix is named
        assert "submitted job" not in r.stdout


# ----------------------------------------------------------------------------- a run


def test_submit_follows_a_run_to_success(cluster, tmp_path):
    out = tmp_path / "sft"
    env = {**cluster.env, "WANDB_API_KEY": SECRET}
    r = rlhf(
        cluster, "submit", *SFT, "train.max_steps=2", f"output_dir={out}",
        env=env, timeout=JOB_TIMEOUT_S,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    job = _job_id(r.stdout)
    cluster.jobs["sft"] = job
    assert f"job {job}: SUCCEEDED" in r.stdout
    assert "done: 2 steps" in r.stdout  # the job's own log, streamed
    assert '"WANDB_API_KEY": "**REDACTED**"' in r.stdout  # named, value hidden
    _no_secret(r.stdout, r.stderr)
    assert (out / "config.yaml").is_file()
    assert (out / "metrics.jsonl").read_text().strip()
    assert (out / "final").is_dir()
    _no_secret((out / "config.yaml").read_text(), (out / "metrics.jsonl").read_text())

    status = rlhf(cluster, "job", "status", job)
    assert status.returncode == 0, status.stderr
    assert f"job {job}: SUCCEEDED" in status.stdout
    assert '"WANDB_API_KEY": "**REDACTED**"' in status.stdout
    assert "python -m launch train configs/quickstart/sft_tiny.yaml" in status.stdout
    logs = rlhf(cluster, "job", "logs", job)
    assert logs.returncode == 0 and "done: 2 steps" in logs.stdout
    _no_secret(status.stdout, status.stderr, logs.stdout, logs.stderr)


def _driver(marker: str, out: Path, timeout_s: float) -> psutil.Process:
    """The job's driver process (`python -m launch train … output_dir=OUT`)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for p in _marked(marker):
            with contextlib.suppress(psutil.Error):
                cmd = p.cmdline()
                if cmd[1:4] == ["-m", "launch", "train"] and f"output_dir={out}" in cmd:
                    return p
        time.sleep(1)
    pytest.fail(f"no driver process for {out} within {timeout_s}s")


def test_secrets_reach_the_job_and_stop_ends_it(cluster, tmp_path):
    out = tmp_path / "long"
    env = {**cluster.env, "WANDB_API_KEY": SECRET, "RLHF_TEST_TOKEN2": OTHER_SECRET}
    r = rlhf(
        cluster, "submit", *SFT, "train.epochs=10000", "train.max_steps=100000", f"output_dir={out}",
        "--secret-env", "RLHF_TEST_TOKEN2", "--no-wait", env=env,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    job = _job_id(r.stdout)
    assert f"rlhf job stop {job}" in r.stdout
    _no_secret(r.stdout, r.stderr)

    driver = _driver(cluster.temp_dir, out, timeout_s=120)
    environ = driver.environ()
    assert environ["WANDB_API_KEY"] == SECRET  # through the runtime_env, not the command line
    assert environ["RLHF_TEST_TOKEN2"] == OTHER_SECRET
    _no_secret(" ".join(driver.cmdline()))

    status = rlhf(cluster, "job", "status", job)
    assert re.search(rf"job {job}: (PENDING|RUNNING)", status.stdout), status.stdout
    assert '"RLHF_TEST_TOKEN2": "**REDACTED**"' in status.stdout
    listing = rlhf(cluster, "job", "list")
    assert job in listing.stdout and cluster.jobs.get("sft", "") in listing.stdout
    _no_secret(status.stdout, listing.stdout)

    stop = rlhf(cluster, "job", "stop", job)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert f"job {job}: STOPPED" in stop.stdout
    psutil.wait_procs([driver], timeout=30)
    assert not driver.is_running()
    # With the secrets in this environment, the logs are scrubbed of them too.
    logs = rlhf(cluster, "job", "logs", job, env=env)
    assert logs.returncode == 0 and "launch train" in logs.stdout
    _no_secret(logs.stdout, logs.stderr)
