"""A Ray worker node with a disk of its own, as another machine of a real cluster has.

The node's processes run in their own mount namespace (`unshare --mount`, root on these machines),
with an empty tmpfs over each hidden directory: files the tests write there on this machine are
not seen by the node, and what the node writes there stays on the node. It joins the tests'
cluster over 127.0.0.1 with a custom resource that pins work to it. `stop()` ends this node's
processes only (its own process group) and waits until the cluster sees it gone.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time



class PrivateNode:
    def __init__(self, gcs_address: str, hidden: list[str], resource: str, num_cpus: int = 1):
        import tempfile
        self.resource = resource
        node = [sys.executable, os.path.abspath(__file__), gcs_address, resource, str(num_cpus)]
        script = " && ".join([*(f"mount -t tmpfs tmpfs {shlex.quote(d)}" for d in hidden),
                              "exec " + " ".join(shlex.quote(a) for a in node)])
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(["unshare", "--mount", "--fork", "--propagation", "private", "sh", "-c", script],
                                     start_new_session=True, stdout=self.log, stderr=subprocess.STDOUT,
                                     cwd=os.path.dirname(os.path.abspath(__file__)))
        self.node_id = self._wait(alive=True)

    def _nodes(self):
        import ray
        return [n for n in ray.nodes() if self.resource in n.get("Resources", {})]

    def _wait(self, alive: bool, timeout: float = 90.0):
        deadline = time.time() + timeout
        while time.time() < deadline:
            live = [n for n in self._nodes() if n.get("Alive")]
            if alive and live:
                return live[0]["NodeID"]
            if not alive and not live:
                return None
            if alive and self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"the private node exited: {self.log.read().decode()[-2000:]}")
            time.sleep(0.5)
        raise RuntimeError(f"the private node did not {'join' if alive else 'leave'} in {timeout:.0f}s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # the node's own processes, by their process group
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._wait(alive=False)
        self.log.close()


def _serve(gcs_address: str, resource: str, num_cpus: int) -> None:
    """Inside the namespace: a worker node started the way ray.cluster_utils.Cluster adds one
    (`ray start` refuses a second node on a loopback address)."""
    from ray._private.node import Node
    from ray._private.parameter import RayParams
    params = RayParams(node_ip_address="127.0.0.1", gcs_address=gcs_address, num_cpus=num_cpus, num_gpus=0,
                       resources={resource: 100}, object_store_memory=200 * 2**20, min_worker_port=0,
                       max_worker_port=0, include_log_monitor=False, node_manager_port=0)
    params.dashboard_agent_listen_port = None  # a free one, not the head's
    node = Node(params, head=False, shutdown_at_exit=True, spawn_reaper=True)

    def bye(*_):
        node.kill_all_processes(check_alive=False, allow_graceful=True)
        os._exit(0)
    signal.signal(signal.SIGTERM, bye)
    print("node up", flush=True)
    while True:
        time.sleep(1)


if __name__ == "__main__":
    _serve(sys.argv[1], sys.argv[2], int(sys.argv[3]))
