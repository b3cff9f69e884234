"""A real Ray head started with `ray start --head` on 127.0.0.1, as a cluster users submit to.

Every listener gets an explicit free port; the head runs with token authentication (Ray 2.60's
default for clusters) and with the S3 variables of the tests in its environment, standing in for
the node role a cloud cluster would have. `stop()` stops this head's processes only (found by
the head's own temp dir in their command lines), never another Ray on the machine.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import tempfile
import time

from s3server import free_port
from support import RAY_LOCAL_ENV

BIN = os.path.dirname(sys.executable)


class RayHead:
    def __init__(self, extra_env: dict[str, str], num_cpus: int = 4):
        self.token = secrets.token_hex(32)
        self.temp_dir = tempfile.mkdtemp(prefix="rayhd-")  # short: Ray's socket paths have a length cap
        self.dashboard_port = free_port()
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        self.env = {**os.environ, **extra_env, **RAY_LOCAL_ENV,
                    "PATH": BIN + os.pathsep + os.environ.get("PATH", ""),  # the job's `python`
                    "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}
        self.env.pop("RAY_ADDRESS", None)
        self.gcs_port = free_port()
        from tmpclean import forkserver_dirs
        self.forkserver_before = forkserver_dirs()  # its dashboard's pymp-* dir is removed by stop()
        cmd = [os.path.join(BIN, "ray"), "start", "--head", "--node-ip-address=127.0.0.1",
               "--dashboard-host=127.0.0.1", f"--port={self.gcs_port}", f"--dashboard-port={self.dashboard_port}",
               f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
               f"--dashboard-agent-grpc-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
               f"--metrics-export-port={free_port()}", f"--node-manager-port={free_port()}",
               f"--object-manager-port={free_port()}", f"--num-cpus={num_cpus}",
               "--object-store-memory=400000000", f"--temp-dir={self.temp_dir}",
               "--include-dashboard=true", "--disable-usage-stats"]
        r = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise RuntimeError(f"ray start failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
        self._wait()

    def _wait(self, timeout: float = 60.0) -> None:
        import requests
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                r = requests.get(f"{self.address}/api/version", timeout=2,
                                 headers={"Authorization": f"Bearer {self.token}"})
                if r.status_code == 200:
                    return
            except Exception:  # noqa: BLE001 - not up yet
                pass
            time.sleep(0.5)
        raise RuntimeError(f"the Ray job server at {self.address} did not answer in {timeout:.0f}s")

    def pids(self) -> list[int]:
        """Every live process of this head: GCS, raylet, dashboard, agents, workers, job drivers.
        Each carries the head's temp dir (or its session dir under it) or its GCS address (the Ray
        client server) on its command line, or descends from one that does."""
        import psutil
        ours = set()
        marks = (self.temp_dir, f"127.0.0.1:{self.gcs_port}")
        for p in psutil.process_iter(["pid", "cmdline"]):
            if any(m in a for a in (p.info["cmdline"] or []) for m in marks):
                ours.add(p.info["pid"])
        for pid in list(ours):
            try:
                ours.update(c.pid for c in psutil.Process(pid).children(recursive=True))
            except psutil.NoSuchProcess:
                pass
        ours.discard(os.getpid())
        return sorted(ours)

    def stop(self, grace: float = 2.0) -> None:
        """SIGTERM to every process of this head, SIGKILL to those left after ``grace`` seconds.
        Measured here: the dashboard and its modules exit within 1.5 s; the raylet takes ~11 s,
        and the GCS and the autoscaler monitor do not exit on SIGTERM at all, so a longer grace
        only waits. The head is thrown away: nothing of it is kept (its temp dir goes too)."""
        import psutil
        procs = []
        for pid in self.pids():
            try:
                procs.append(psutil.Process(pid))
            except psutil.NoSuchProcess:
                pass
        for p in procs:
            try:
                p.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=grace)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=grace)
        import shutil
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        from tmpclean import remove_dead_forkserver_dirs
        remove_dead_forkserver_dirs(self.forkserver_before)
