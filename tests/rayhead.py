"""A real Ray head started with `ray start --head` on 127.0.0.1, as a cluster users submit to.

Every listener gets an explicit free port; the head runs with token authentication (Ray 2.60's
default for clusters) and with the S3 variables of the tests in its environment, standing in for
the node role a cloud cluster would have. `stop()` runs `ray stop`.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import tempfile
import time

from s3server import free_port

BIN = os.path.dirname(sys.executable)


class RayHead:
    def __init__(self, extra_env: dict[str, str], num_cpus: int = 4):
        self.token = secrets.token_hex(32)
        self.temp_dir = tempfile.mkdtemp(prefix="rayhd-")  # short: Ray's socket paths have a length cap
        self.dashboard_port = free_port()
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        self.env = {**os.environ, **extra_env,
                    "PATH": BIN + os.pathsep + os.environ.get("PATH", ""),  # the job's `python`
                    "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token,
                    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
        self.env.pop("RAY_ADDRESS", None)
        cmd = [os.path.join(BIN, "ray"), "start", "--head", "--node-ip-address=127.0.0.1",
               "--dashboard-host=127.0.0.1", f"--port={free_port()}", f"--dashboard-port={self.dashboard_port}",
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

    def stop(self) -> None:
        subprocess.run([os.path.join(BIN, "ray"), "stop"], env=self.env,
                       capture_output=True, timeout=120)
