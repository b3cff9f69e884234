"""`mae submit` / `mae jobs` against a real Ray head (`ray start --head`, token auth on), the jobs
writing to the tests' S3 server; then `mae ckpt list | pull | export` on what the job wrote.

The head is stopped by its own processes' PIDs: the shared test cluster lives on beside it.
"""

import contextlib
import json
import os
import subprocess
import sys

import pytest
from support import tiny_overrides

from pipeline.storage import fsspec_fs

pytestmark = [pytest.mark.ray, pytest.mark.s3, pytest.mark.slow]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def head(s3):
    from rayhead import RayHead
    h = RayHead(extra_env=s3.env())
    yield h
    h.stop()


def test_ports_given_to_a_head_are_never_the_same_twice():
    """`ray start --head` gets eight explicit ports; the kernel may give bind(0) a port it gave a
    moment before, and a head once failed to start here on a port listed twice (Ray: "port ...
    used by other components")."""
    from s3server import free_port
    ports = [free_port() for _ in range(500)]
    assert len(set(ports)) == len(ports)


def test_the_s3_server_listens_only_on_the_ports_the_tests_chose(s3):
    """SeaweedFS's Iceberg and Lance catalogs listened on fixed ports (8181, 9101): a second server
    on the machine (another checkout's suite, a second pytest worker) failed to start."""
    import psutil
    from s3server import _handed_out
    conns = psutil.Process(s3.proc.pid).net_connections("inet")
    listening = {(c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN}
    assert listening and {ip for ip, _ in listening} == {"127.0.0.1"}
    assert {port for _, port in listening} <= _handed_out, sorted(listening)


def test_a_stopped_s3_server_leaves_nothing_in_the_temp_dir():
    """`weed mini` puts its services' local sockets in /tmp (seaweedfs-s3-<port>.sock,
    seaweedfs-<service>-grpc-<port>.sock) and left them there when it stopped, and its logger wrote
    its log files to the temp dir (weed.<host>.<user>.log.<LEVEL>.<time>.<pid>, with weed.INFO,
    weed.WARNING, weed.ERROR pointing at them): more files in /tmp for every suite a developer ran.
    The server keeps its logs in its own directory and removes the sockets named by its ports."""
    import tempfile

    from s3server import S3Server
    tmp = tempfile.gettempdir()
    before = set(os.listdir(tmp))
    server = S3Server()
    try:
        assert "Buckets" in server.client().list_buckets()
    finally:
        server.stop()
    mine = ({os.path.basename(server.dir), f".{server.proc.pid}"} |
            {f"-{port}.sock" for port in server.ports.values()})
    def its(f):
        path = os.path.join(tmp, f)
        target = os.readlink(path) if os.path.islink(path) else f  # weed.INFO -> weed.<...>.<pid>
        return any(n == m or n.endswith(m) for n in (f, target) for m in mine)
    left = {f for f in set(os.listdir(tmp)) - before if its(f)}
    assert not left, left  # (the session's own server may add its sockets meanwhile: not counted)


def mae(*args, token=None, home=None, timeout=600):
    """Run the `mae` CLI as a user would; -> CompletedProcess (stdout, stderr, returncode)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    env["HOME"] = home or env.get("HOME", "/tmp")
    if token:
        env["RAY_AUTH_TOKEN"] = token
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def mae_here(*args, token=None):
    """The same `mae` command line run in this process (its main(), as the console script calls
    it): for the inspecting commands after a job, which need no interpreter of their own; the
    submissions and the refused ones above run as a user runs them. -> CompletedProcess."""
    import io

    from jobs.cli import main
    out, err = io.StringIO(), io.StringIO()
    with auth_token(token), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    return subprocess.CompletedProcess(["mae", *args], code, out.getvalue(), err.getvalue())


@contextlib.contextmanager
def auth_token(token: str | None):
    """This process's Ray token variables while in the block: ``token`` alone (or none), as a user
    who exported only it; the ones before are back after."""
    saved = {k: os.environ.pop(k) for k in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH") if k in os.environ}
    if token:
        os.environ["RAY_AUTH_TOKEN"] = token
    try:
        yield
    finally:
        os.environ.pop("RAY_AUTH_TOKEN", None)
        os.environ.update(saved)


@contextlib.contextmanager
def job_client(head):
    """The project's job client for the head, in this process, with the head's token (only while in use)."""
    from jobs.submit import client
    with auth_token(head.token):
        yield client(head.address)


def test_refused_without_the_token_with_a_clear_line(head, tmp_path):
    r = mae("jobs", "--address", head.address, "list", home=str(tmp_path))  # no token anywhere
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "RAY_AUTH_TOKEN" in err[0] and "Traceback" not in r.stderr
    r = mae("jobs", "--address", head.address, "list", token="0" * 64)
    assert r.returncode == 2 and "refused" in r.stderr and "0" * 64 not in r.stderr


def test_submit_prepare_and_pretrain_then_list_pull_export(head, s3, bucket, labeled_dir, tmp_path):
    shards = f"s3://{bucket}/submit/shards"
    r = mae("submit", "--address", head.address, "--follow", "--", "prepare", labeled_dir, shards,
            "--shard-size-mb", "0.05", token=head.token)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "prepared 96 images" in r.stdout

    # an official-layout .pth on S3 to start from: exercises init_from's single-file download
    import torch

    from mae_model import (
        MaskedAutoencoder,
        mae_vit_micro_patch4,
        to_official_state_dict,
    )
    torch.manual_seed(1)
    init = tmp_path / "init.pth"
    torch.save({"model": to_official_state_dict(MaskedAutoencoder(mae_vit_micro_patch4()))}, init)
    fs, _ = fsspec_fs(shards)
    fs.put_file(str(init), f"{bucket}/submit/init.pth")

    runs = f"s3://{bucket}/submit/runs"
    r = mae("submit", "--address", head.address, "--follow", "--", "pretrain",
            *tiny_overrides(shards, runs, "submitted", f"model.init_from=s3://{bucket}/submit/init.pth",
                            "train.max_steps=8", "train.ckpt_every=4", "train.log_every=2", "scaling.strategy=fsdp",
                            "optim.base_lr=1.5e-4", "optim.clip_grad=0"),
            token=head.token)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    sid = r.stdout.splitlines()[0].strip()
    assert sid.startswith("mae-pretrain-")
    assert "init_from s3://" in out and "loaded" in out  # the run started from the .pth
    assert "SUCCEEDED" in r.stderr

    # the job list, status and logs
    r = mae_here("jobs", "--address", head.address, "list", token=head.token)
    assert r.returncode == 0
    rows = [line.split() for line in r.stdout.splitlines()[1:]]
    assert [row[1] for row in rows].count("SUCCEEDED") == 2 and sid in {row[0] for row in rows}
    r = mae_here("jobs", "--address", head.address, "status", sid, token=head.token)
    assert r.returncode == 0 and "SUCCEEDED" in r.stdout
    r = mae_here("jobs", "--address", head.address, "logs", sid, token=head.token)
    assert r.returncode == 0 and "[mae] checkpoint" in r.stdout

    # credentials stayed out of the job's environment; the endpoint went in
    with job_client(head) as c:
        info = c.get_job_info(sid)
    env_vars = info.runtime_env.get("env_vars", {})
    assert "AWS_ENDPOINT_URL" in env_vars
    assert not {"AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID"} & set(env_vars)
    assert s3.env()["AWS_SECRET_ACCESS_KEY"] not in json.dumps(info.runtime_env)

    # checkpoints out of object storage
    run = f"{runs}/submitted"
    r = mae_here("ckpt", "list", run)
    assert r.returncode == 0, r.stderr
    states = {line.split()[0]: line.split()[2] for line in r.stdout.splitlines()[1:]}
    assert states == {"checkpoint_00000004": "complete", "checkpoint_00000008": "complete"}
    r = mae_here("ckpt", "pull", run, "--latest", "--quiet", str(tmp_path / "pulled"))
    assert r.returncode == 0, r.stderr
    local = r.stdout.strip()
    assert local.endswith("checkpoint_00000008") and os.path.exists(os.path.join(local, "COMPLETE"))
    assert {"__0_0.distcp", "__1_0.distcp"} <= set(os.listdir(local))  # both ranks' shards
    r = mae_here("ckpt", "export", local, str(tmp_path / "enc"), "--format", "timm")
    assert r.returncode == 0, r.stderr
    from safetensors.torch import load_file
    sd = load_file(r.stdout.strip())
    assert sd["patch_embed.proj.weight"].shape == (64, 3, 4, 4) and sd["pos_embed"].shape == (1, 65, 64)

    # a shard missing on the store is caught on pull, in one line, naming the file
    p = f"{bucket}/submit/runs/submitted/checkpoint_00000004/__1_0.distcp"
    fs.rm(p)
    r = mae_here("ckpt", "pull", run, "--step", "4", "--quiet", str(tmp_path / "p2"))
    assert r.returncode == 2 and "__1_0.distcp" in r.stderr and "missing" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_failed_and_stopped_jobs_exit_with_their_status(head, bucket, labeled_dir):
    # a bad config is refused here, before a job exists (tests/test_cli.py); data the cluster
    # cannot find fails the job, with the one-line error in its logs; --follow exits 1
    r = mae("submit", "--address", head.address, "--follow", "--", "pretrain", "model.preset=mae_vit_micro_patch4",
            f"data.source=s3://{bucket}/submit/no-such-shards", "scaling.num_workers=1",
            f"run.storage_path=s3://{bucket}/submit/runs", "run.name=no-data", token=head.token)
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    assert "mae pretrain: error:" in r.stdout and "no-such-shards" in r.stdout and "FAILED" in r.stderr

    # a job stopped while it runs: `mae jobs logs --follow` exits 3 (stopped)
    r = mae("submit", "--address", head.address, "--", "pretrain",
            *tiny_overrides(labeled_dir, f"s3://{bucket}/submit/runs", "stopped", "train.max_steps=100000",
                            "scaling.num_workers=1", short_run=False),
            token=head.token)
    assert r.returncode == 0, r.stderr
    sid = r.stdout.strip()
    import time
    with job_client(head) as c:  # the wait polls in this process (a `mae` per poll: ~3 s each)
        for _ in range(240):
            if str(c.get_job_status(sid)).endswith("RUNNING"):
                break
            time.sleep(0.5)
    r = mae("jobs", "--address", head.address, "stop", sid, token=head.token)
    assert r.returncode == 0 and "stop requested" in r.stdout
    r = mae("jobs", "--address", head.address, "logs", sid, "--follow", token=head.token)
    assert r.returncode == 3 and "STOPPED" in r.stderr


def test_a_job_ships_the_project_allowlist_not_the_checkout():
    import shutil

    from jobs.submit import build_submission
    sub = build_submission(["pretrain", "data.source=s3://b/shards", "train.max_steps=1"], env_names=[],
                           working_dir=None, pip=[],
                           entrypoint_num_cpus=None, entrypoint_num_gpus=None, submission_id=None)
    wd = sub["kwargs"]["runtime_env"]["working_dir"]
    try:
        assert wd != ROOT and sorted(os.listdir(wd)) == ["jobs", "mae_model", "pipeline", "pyproject.toml"]
        shipped = [os.path.join(d, f) for d, _, fs in os.walk(wd) for f in fs]
        assert os.path.join(wd, "jobs", "core", "trainer.py") in shipped
        assert not [f for f in shipped if "__pycache__" in f or f.endswith(".pyc")]
    finally:
        shutil.rmtree(wd)


def test_a_command_started_with_ray_address_runs_the_shipped_code_and_env(ray_cluster, s3):
    """`RAY_ADDRESS=... mae pretrain` (no `mae submit`): the cluster's workers get the same
    allowlisted code and storage settings as a submitted job, and no credential."""
    import ray
    probe = ("import json, os, ray; from jobs.core.common import init_ray; init_ray()\n"
             "f = ray.remote(lambda: (sorted(os.listdir('.')), ray.get_runtime_context().runtime_env['env_vars']))\n"
             "print(json.dumps(ray.get(f.remote())))")
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    r = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    listing, job_env = json.loads(r.stdout.strip().splitlines()[-1])
    assert listing == ["jobs", "mae_model", "pipeline", "pyproject.toml"]  # the task runs in the shipped code
    from jobs.core.ship import ENV_ALLOW
    # the allow-listed settings set here (storage; the tests' WANDB_MODE), no keys
    assert job_env == {k: os.environ[k] for k in ENV_ALLOW if os.environ.get(k)}
    assert {k: v for k, v in s3.env().items() if k in ENV_ALLOW}.items() <= job_env.items()
    assert "AWS_SECRET_ACCESS_KEY" not in job_env and "AWS_ACCESS_KEY_ID" not in job_env


def test_stopping_the_head_stops_its_processes_and_no_other_ray(head, ray_cluster):
    """Last in this module: the head goes (the fixture's teardown then finds nothing to stop)."""
    import psutil
    import ray
    mine = head.pids()
    assert len(mine) >= 3  # GCS, raylet, dashboard at least
    others = [p.pid for p in psutil.process_iter(["cmdline"])
              if any("raylet" in a or "gcs_server" in a for a in (p.info["cmdline"] or [])) and p.pid not in mine]
    assert others  # the shared cluster's
    from tmpclean import forkserver_dirs
    made = forkserver_dirs() - head.forkserver_before  # the head dashboard's pymp-* dir, the shared cluster's
    head.stop()
    assert not [p for p in mine if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert all(psutil.pid_exists(p) for p in others)
    left = forkserver_dirs() - head.forkserver_before
    assert left < made, (made, left)  # the head's went with it; a live dashboard's (the cluster's) stays
    assert ray.get(ray.remote(lambda: 41 + 1).remote(), timeout=60) == 42  # the shared cluster still works
