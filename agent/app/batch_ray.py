"""`dxagent batch --executor ray`: the same cases on a Ray cluster (`pip install 'dxagent[ray]'`).

With $RAY_ADDRESS set (or a cluster started with `ray start`), the batch joins that cluster; otherwise it starts a
local Ray instance on this machine's cores. Each worker is a Ray actor that runs `agent.app.executors.init_worker` once
(the planner model loaded and its system prompt prefilled, the tools discovered) and then one case at a time with
`agent.app.executors.run_one`, exactly as a local worker process does, so reports, result.json files and the resume rules
are the same. An actor that dies is replaced; its case is retried once and then recorded as failed.

Shared state: every worker writes its case's files under --out and its trace events to the trace store. On one
machine that is the SQLite file under --out/traces (WAL, with a busy timeout). On a multi-node cluster --out must be
a shared filesystem, dxagent must be installed on every node, and the trace store should be a database every node
reaches (`--db-url postgresql://...`): SQLite over a network filesystem is not safe.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from agent.app.executors import CaseSpec, failed_record, retry_or_fail


def run_on_ray(specs: list[CaseSpec], opts: dict[str, Any], workers: int, finish: Callable[[dict], None]) -> None:
    try:
        import ray
    except ImportError:
        from agent.core.errors import ManifestError

        raise ManifestError("the ray executor needs Ray: pip install 'dxagent[ray]'") from None
    from ray.exceptions import RayActorError, WorkerCrashedError

    from agent.app.executors import init_worker, run_one

    started_here = False
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
        if not address:
            kw.update(num_cpus=os.cpu_count() or 1, object_store_memory=128 * 2**20)
        ray.init(address=address or None, **kw)
        started_here = True
    try:
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        workers = max(1, min(workers, len(specs)))
        threads = max(1, cpus // workers)

        @ray.remote(num_cpus=threads, max_restarts=0)
        class Worker:
            def __init__(self, threads: int, llm: str):
                init_worker(threads, llm)

            def run(self, spec: dict[str, Any], opts: dict[str, Any]) -> dict[str, Any]:
                return run_one(spec, opts)

        def new_actor() -> Any:
            return Worker.remote(threads, opts.get("llm", "local"))

        idle = [new_actor() for _ in range(workers)]
        pending = list(specs)
        lost: Counter = Counter()
        running: dict[Any, tuple[Any, CaseSpec]] = {}  # object ref -> (actor, case)
        while pending or running:
            while pending and idle:
                actor, spec = idle.pop(), pending.pop(0)
                running[actor.run.remote(asdict(spec), opts)] = (actor, spec)
            ready, _ = ray.wait(list(running), num_returns=1)
            for ref in ready:
                actor, spec = running.pop(ref)
                try:
                    finish(ray.get(ref))
                    idle.append(actor)
                except (RayActorError, WorkerCrashedError):
                    retry_or_fail(spec, lost, pending, finish, "Ray worker")
                    idle.append(new_actor())
                except Exception as exc:  # pragma: no cover - run_one catches the case's own errors
                    finish(failed_record(spec, f"{type(exc).__name__}: {exc}"))
                    idle.append(actor)
    finally:
        if started_here:
            ray.shutdown()
