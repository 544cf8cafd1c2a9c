"""`dxagent batch|eval --executor ray`: the same cases on a Ray cluster (`pip install 'dxagent[ray]'`).

With --ray-address (or $RAY_ADDRESS; a cluster started with `ray start`) the run joins that cluster; otherwise it
starts a local Ray instance on this machine's cores. Each case is one Ray task running
`agent.app.executors.run_one` (eval: `eval_one`), exactly as a local worker process does, so reports, result.json
files and the resume rules are the same. Ray reuses its worker processes, and each loads the planner model and the
tools once (`init_worker`, on its first case). Tasks are spread over the nodes (SPREAD) and each asks for its share
of the CPUs, so a node runs as many cases at once as it has cores for.

Losing a worker or a whole node is Ray's to handle: a task whose worker died is retried once by Ray (`max_retries=1`),
on any node that is alive; a case whose task died twice is recorded as failed. A case that was mid-run on the lost
node left a run "running" in the trace store; the retry marks it "interrupted" and names the run that replaced it
(`start_attempt`), so a case never has two current runs. Finished cases are files under --out and rows in the store:
a lost node takes none of them with it. The driver (this process, usually on the head node) owns the tasks: if it
or the head dies, run the same command again, which skips what is complete.

Shared state: every worker writes its case's files under --out and its trace events to the trace store. On one
machine that is the SQLite file under --out/traces (WAL, with a busy timeout). On a multi-node cluster --out must be
a shared filesystem, dxagent must be installed on every node, and the trace store must be a database every node
reaches (`--db-url postgresql://...`): SQLite over a network filesystem is not safe.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from agent.app.executors import CaseSpec, failed_record

_READY: dict[str, bool] = {}  # in a Ray worker process: the planner and tools loaded (init_worker), per llm


def _run_task(fn: Callable[[dict, dict], dict], spec: dict[str, Any], opts: dict[str, Any], threads: int) -> dict:
    from agent.app.executors import init_worker

    llm = opts.get("llm", "local")
    if not _READY.get(llm):
        init_worker(threads, llm)
        _READY[llm] = True
    return fn(spec, opts)


def task_cpus(node_cpus: list[float], workers: int) -> int:
    """CPUs per case: the cluster's CPUs shared by `workers` cases at once, but never more than the largest node has
    (a task asking for more than any one node has would wait for ever)."""
    largest = int(max(node_cpus, default=1))
    return max(1, min(int(sum(node_cpus)) // workers, largest))


def connect(address: str | None) -> bool:
    """Join the cluster at `address` ($RAY_ADDRESS when None), or start a local instance; True when this call did
    (and the caller shuts it down). A cluster that cannot be reached is one line."""
    import ray

    from agent.core.errors import ManifestError

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    if not address:
        kw.update(num_cpus=os.cpu_count() or 1, object_store_memory=128 * 2**20)
    env = {k: v for k, v in os.environ.items() if k.startswith(("DXAGENT_", "HF_", "OPENAI_"))}
    if env:  # the workers of a cluster's nodes do not inherit this shell's settings
        kw["runtime_env"] = {"env_vars": env}
    if address and address != "auto" and "://" not in address:  # Ray itself retries an absent head for minutes
        host, _, port = address.rpartition(":")
        try:
            socket.create_connection((host or "127.0.0.1", int(port)), timeout=10).close()
        except (OSError, ValueError) as exc:
            raise ManifestError(f"cannot reach the Ray cluster at {address} (is `ray start --head` running there?): "
                                f"{exc.strerror or exc}") from None
    try:
        ray.init(address=address, **kw)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise ManifestError(f"cannot join the Ray cluster at {address}: {first[:200]}") from None
    return True


def run_on_ray(specs: list[CaseSpec], opts: dict[str, Any], workers: int, finish: Callable[[dict], None],
               fn: Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]] | None = None,
               address: str | None = None) -> None:
    """Run `fn(asdict(spec), opts)` (default: run_one) for every spec as Ray tasks, at most `workers` at once;
    `finish` gets each record, in the order they end."""
    try:
        import ray
    except ImportError:
        from agent.core.errors import ManifestError

        raise ManifestError("the ray executor needs Ray: pip install 'dxagent[ray]'") from None
    from ray.exceptions import RayError

    from agent.app.executors import run_one

    fn = fn or run_one
    started_here = connect(address)
    try:
        workers = max(1, min(workers, len(specs)))
        threads = task_cpus([n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]], workers)
        task = ray.remote(_run_task).options(num_cpus=threads, max_retries=1, retry_exceptions=False,
                                             scheduling_strategy="SPREAD")
        pending = list(specs)
        running: dict[Any, CaseSpec] = {}
        while pending or running:
            while pending and len(running) < workers:
                spec = pending.pop(0)
                running[task.remote(fn, asdict(spec), opts, threads)] = spec
            ready, _ = ray.wait(list(running), num_returns=1)
            for ref in ready:
                spec = running.pop(ref)
                try:
                    finish(ray.get(ref))
                except RayError as exc:  # its worker (or node) died on both tries; run_one catches a case's own errors
                    first = next((ln for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
                    finish(failed_record(spec, f"the Ray worker running this case died twice ({type(exc).__name__}: "
                                               f"{first[:160]})"))
    finally:
        if started_here:
            ray.shutdown()
