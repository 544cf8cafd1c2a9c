"""A real two-node Ray cluster on this machine (tests/raycluster.py: two `ray start` processes, one CPU and a temp
folder each) with a real PostgreSQL trace store (tests/pgcluster.py) and one shared --out: `eval` and `batch` spread
over both nodes, and the second node is killed (its whole process group) in the middle of a batch. Slow: about a
minute on 2 shared cores; skipped with the reason where Ray or PostgreSQL is absent."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest
from helpers import call
from pydicom.data import get_testdata_file

pytestmark = pytest.mark.slow

CT = get_testdata_file("CT_small.dcm")
MR = get_testdata_file("MR_small.dcm")
SCRIPT = [call("inspect_image")]


@pytest.fixture(scope="module")
def cluster():
    from raycluster import RayCluster

    if why := RayCluster.why_not():
        pytest.skip(why)
    c = RayCluster(env={"RAY_health_check_period_ms": "500", "RAY_health_check_failure_threshold": "3",
                        "RAY_health_check_initial_delay_ms": "500"})
    try:
        c.add_node(cpus=1)
        c.add_node(cpus=1)
        yield c
    finally:
        c.stop()


@pytest.fixture
def driver(cluster, monkeypatch):
    """This process as the cluster's driver, as `dxagent batch --ray-address` makes it; both nodes alive."""
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # as the nodes run (loopback only); a ~/.ray token would turn it on
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    if cluster.nodes[1].poll() is not None:  # an earlier test killed node 1: a fresh second node
        cluster.nodes.pop(1)
        cluster.add_node(cpus=1)
    return cluster


def node_ids(address: str) -> dict[str, str]:
    """{"node0": Ray node id, "node1": ...} by the custom resource each node was started with."""
    import ray

    ray.init(address=address, log_to_driver=False, configure_logging=False)
    try:
        return {name: n["NodeID"] for n in ray.nodes() if n["Alive"] for name in n["Resources"]
                if name.startswith("node") and name[4:].isdigit()}
    finally:
        ray.shutdown()


def images(tmp_path: Path, n: int) -> Path:
    d = tmp_path / "study"
    d.mkdir(parents=True)
    rows = []
    for i in range(n):
        src = CT if i % 2 == 0 else MR
        shutil.copy(src, d / f"img{i}.dcm")
        rows.append({"case_id": f"c{i}", "image": f"img{i}.dcm", "question": "What is the pixel spacing?",
                     "answer": "CT" if src == CT else "MR"})
    (d / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d / "m.jsonl"


def test_eval_spreads_over_two_nodes_into_one_postgresql_store(driver, pg, tmp_path):
    from agent.app.eval import run_eval
    from agent.store.trace import TraceStore

    ids = node_ids(driver.address)
    assert len(ids) == 2
    db = pg.new_database()
    res = run_eval(images(tmp_path, 4), tmp_path / "out", systems=["agent"], llm="scripted", script=SCRIPT,
                   db_url=db, workers=2, executor="ray", ray_address=driver.address)
    rows = [json.loads(x) for x in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert res.ran == 4 and len(rows) == 4 and all(r["status"] == "done" for r in rows)
    assert {r["ray_node"] for r in rows} == set(ids.values())  # both nodes ran items, and each row says which
    store = TraceStore(db, tmp_path / "out" / "traces")
    for r in rows:
        assert store.get_run(r["run_id"]).status == "done" and store.verify_chain(r["run_id"]) is None


def test_a_node_killed_mid_batch_loses_nothing_and_its_case_runs_again(driver, pg, tmp_path):
    """Both nodes finish cases; then node 1's worker is caught in a case (frozen with SIGSTOP and let run in 20 ms
    steps until its run is under way in the store, so the moment is certain) and node 1's whole process group is
    killed. The batch ends with every case done once, the lost case done on the head, its first run marked."""
    import ray

    from agent.app.batch import run_batch
    from agent.store.trace import TraceStore

    ray.init(address=driver.address, log_to_driver=False, configure_logging=False)  # one driver (job) for both
    try:  # batches, so the second finds both nodes' workers warm (the first case of a cold worker takes ~15 s)
        ids = {name: n["NodeID"] for n in ray.nodes() if n["Alive"] for name in n["Resources"]
               if name in ("node0", "node1")}
        head, second = ids["node0"], ids["node1"]
        warm = run_batch(images(tmp_path / "warm", 2), tmp_path / "warm" / "out", workers=2, executor="ray",
                         llm="scripted", script=SCRIPT)
        assert warm.by_node == {head: 1, second: 1}
        db = pg.new_database()
        out = tmp_path / "out"
        store = TraceStore(db, out / "traces")
        seen: dict = {}

        def kill_second_node_mid_case() -> None:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and not seen.get("stop"):
                done = [json.loads(p.read_text()) for p in (out / "cases").glob("*/result.json")]
                finished = {r["case_id"] for r in done}
                if {r.get("ray_node") for r in done} >= {head, second}:
                    for p in (out / "cases").glob("*/attempt.json"):
                        a = json.loads(p.read_text())
                        if a["ray_node"] != second or p.parent.name in finished:
                            continue
                        os.kill(a["worker"], signal.SIGSTOP)
                        for _ in range(200):
                            run = store.get_run(a["run_id"])
                            if run is not None or (p.parent / "result.json").exists():
                                break
                            os.kill(a["worker"], signal.SIGCONT)
                            time.sleep(0.02)
                            os.kill(a["worker"], signal.SIGSTOP)
                        if run is None or run.status != "running":
                            os.kill(a["worker"], signal.SIGCONT)
                            continue  # it finished (or never started) between two looks: the next case
                        driver.kill_node(1)
                        seen.update(case=p.parent.name, run=a["run_id"], done_before=done, t=time.monotonic())
                        return
                time.sleep(0.01)

        watcher = threading.Thread(target=kill_second_node_mid_case, daemon=True)
        watcher.start()
        t0 = time.monotonic()
        try:
            s = run_batch(images(tmp_path, 6), out, workers=2, executor="ray", llm="scripted", script=SCRIPT,
                          db_url=db)
        finally:
            seen.setdefault("stop", True)
            watcher.join(5)
    finally:
        ray.shutdown()
    assert "case" in seen, "node 1 was never caught mid-case: the kill did not happen"
    print(f"\nbatch of 6 on two nodes, node 1 killed after {seen['t'] - t0:.1f} s, done in {time.monotonic() - t0:.1f} s")
    assert s.counts == {"done": 6}
    # rows from both nodes before the kill, and they keep their results
    assert {r["ray_node"] for r in seen["done_before"]} == {head, second}
    summary = {r["case_id"]: r for r in csv.DictReader((out / "summary.csv").open())}
    assert set(summary) == {f"c{i}" for i in range(6)} and all(r["node"] and r["ray_node"] for r in summary.values())
    for r in seen["done_before"]:
        assert summary[r["case_id"]]["run_id"] == r["run_id"] and summary[r["case_id"]]["ray_node"] == r["ray_node"]
    # the case that was under way on node 1 ran again on the head; its first run is marked, not left "running"
    lost = json.loads((out / "cases" / seen["case"] / "result.json").read_text())
    assert lost["status"] == "done" and lost["ray_node"] == head and lost["replaced_runs"] == [seen["run"]]
    first = store.get_run(seen["run"])
    assert first.status == "interrupted" and lost["run_id"] in first.error
    # every row done exactly once: one done run per case in the store, each sealed with its chain intact
    runs = {r["run_id"] for r in summary.values()}
    assert len(runs) == 6
    for run_id in runs:
        assert store.get_run(run_id).status == "done" and store.verify_chain(run_id) is None
    assert sorted(r.id for r in store.runs(limit=100, status="done")) == sorted(runs)  # no case done twice
    assert [r.id for r in store.runs(limit=100) if r.status != "done"] == [seen["run"]]


def test_a_case_never_asks_for_more_cpus_than_one_node_has():
    from agent.app.batch_ray import task_cpus

    assert task_cpus([1, 1], 1) == 1  # two 1-CPU nodes, one case at a time: 1, not 2 (it would never be scheduled)
    assert task_cpus([1, 1], 2) == 1
    assert task_cpus([8, 8], 4) == 4 and task_cpus([8, 8], 1) == 8 and task_cpus([16, 2], 2) == 9
    assert task_cpus([4], 8) == 1 and task_cpus([], 1) == 1


def test_an_unreachable_cluster_is_one_line_at_once(tmp_path):
    pytest.importorskip("ray")
    from raycluster import free_port

    from agent.app.batch import ManifestError, run_batch

    shutil.copy(CT, tmp_path / "ct.dcm")
    t0 = time.monotonic()
    with pytest.raises(ManifestError, match=r"cannot reach the Ray cluster at 127.0.0.1:\d+ .*refused") as exc:
        run_batch(tmp_path, tmp_path / "out", executor="ray", ray_address=f"127.0.0.1:{free_port()}", llm="scripted",
                  script=SCRIPT)
    assert "\n" not in str(exc.value) and time.monotonic() - t0 < 30
