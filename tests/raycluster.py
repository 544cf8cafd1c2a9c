"""A throwaway multi-node Ray cluster on this machine for the tests and bench/bench_ray.py: a head and further nodes,
each a `ray start --block` process in its own process group, with its own CPUs, a custom resource naming it
(`node0`, `node1`, ...), its own ports (free loopback ports, so another Ray on the machine is never joined) and a
temporary folder of its own. `kill_node(i)` kills node i's whole process group (its raylet, object manager and
workers: a machine lost); `stop()` ends them all and removes the folders.

`RayCluster.why_not()` says in one line why none can be started here, for a skip.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RayCluster:
    def __init__(self, env: dict[str, str] | None = None):
        self.ray = str(Path(sys.executable).parent / "ray")
        # the nodes' workers import this checkout's agent package, as an installed dxagent would on a real node
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
                    "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", **(env or {})}
        self.env.pop("RAY_ADDRESS", None)
        self.dir = Path(tempfile.mkdtemp(prefix="dxagent-ray-"))
        self.gcs_port = 0
        self.nodes: list[subprocess.Popen] = []
        self.taken: set[int] = set()  # the ports this cluster's nodes were given
        self.ranges: list[tuple[int, int]] = []  # each node's worker port range

    @staticmethod
    def why_not() -> str | None:
        try:
            import ray  # noqa: F401
        except ImportError:
            return "Ray is not installed (pip install 'dxagent[ray]')"
        if not (Path(sys.executable).parent / "ray").exists():
            return f"no `ray` command next to {sys.executable}"
        return None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    def add_node(self, cpus: int = 1) -> int:
        """Start one more node (the first is the head) and wait until the cluster has it; returns its index."""
        i = len(self.nodes)
        # a worker port range of this node's own, clear of every port this cluster's nodes listen on, and its other
        # ports drawn outside every node's worker range: a free port the OS handed out inside the range once made
        # `ray start` refuse ("worker_ports is trying to use a port number ... used by other components")
        lo = 20000 + (os.getpid() * 97 + i * 211) % 30000
        while any(lo <= p <= lo + 40 for p in self.taken):
            lo = 20000 + (lo + 41 - 20000) % 30000
        self.ranges.append((lo, lo + 40))
        ports: list[int] = []
        while len(ports) < 8:
            p = free_port()
            if p not in ports and p not in self.taken and not any(a <= p <= b for a, b in self.ranges):
                ports.append(p)
        self.taken.update(ports)
        cmd = [self.ray, "start", "--block", "--disable-usage-stats", f"--num-cpus={cpus}", "--num-gpus=0",
               f'--resources={{"node{i}": 100}}', "--node-ip-address=127.0.0.1",
               "--object-store-memory=80000000", f"--node-manager-port={ports[0]}", f"--dashboard-port={ports[7]}",
               f"--object-manager-port={ports[1]}", f"--metrics-export-port={ports[2]}",
               f"--dashboard-agent-listen-port={ports[3]}", f"--dashboard-agent-grpc-port={ports[4]}",
               f"--runtime-env-agent-port={ports[5]}", f"--min-worker-port={lo}", f"--max-worker-port={lo + 40}"]
        if i == 0:
            self.gcs_port = ports[6]
            cmd += ["--head", f"--port={self.gcs_port}", "--include-dashboard=false",
                    f"--temp-dir={self.dir / 'head'}"]
        else:
            cmd += [f"--address={self.address}", f"--temp-dir={self.dir / 'head'}"]
        log = open(self.dir / f"node{i}.log", "wb")
        self.nodes.append(subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=self.dir,
                                           start_new_session=True))
        self._wait_for(i)
        return i

    def _wait_for(self, i: int, timeout: float = 120) -> None:
        """`ray start` says "Ray runtime started" once its node has registered with the head."""
        log, p = self.dir / f"node{i}.log", self.nodes[i]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "Ray runtime started" in log.read_text(errors="replace"):
                return
            if p.poll() is not None:
                raise RuntimeError(f"ray node {i} exited ({p.returncode}): " + log.read_text(errors="replace")[-1500:])
            time.sleep(0.5)
        raise RuntimeError(f"Ray node {i} did not start in {timeout:.0f} s")

    def kill_node(self, i: int) -> None:
        """Node i lost: SIGKILL to every process below its `ray start` (raylet, its workers, its agents - some start
        sessions of their own, so the process group alone once left the raylet alive and Ray ran the retried case on
        the "killed" node) and to its process group."""
        try:
            import psutil

            tree = psutil.Process(self.nodes[i].pid).children(recursive=True)
        except Exception:  # psutil missing or the process gone: the group is all there is to kill
            tree = []
        _killpg(self.nodes[i], signal.SIGKILL)
        for proc in tree:
            try:
                proc.kill()
            except Exception:
                pass

    def stop(self) -> None:
        """Every node's process group killed (nothing of this cluster is kept), the folders removed."""
        for p in reversed(self.nodes):
            _killpg(p, signal.SIGKILL)
        for p in self.nodes:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
        shutil.rmtree(self.dir, ignore_errors=True)


def _killpg(p: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(p.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
