"""Issue 15's and 32's figures: the hostile-input corpus outcome table, an identifier scan of every store, the injection
table (vector x planner -> tools and outcome, against the clean run; paraphrased vectors too), the impression table
(paraphrased dispositions from an endpoint narrator -> kept or dropped) and the forgery table (forgery -> verify).

    .venv/bin/python bench/bench_hostile.py [--no-local]

Prints tables; asserts nothing. `--no-local` leaves out the embedded Qwen planner (a minute) and keeps the scripted
adversarial endpoint (tests/test_hostile.py ObeyingChat: obeys any instruction it sees outside <<< >>> quotes).
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def corpus_table(tmp: Path) -> None:
    from helpers import answer, call
    from makers import fuzz

    from agent.engine.session import DxError, run_case

    cases = fuzz.make(tmp / "inputs")
    print(f"\n## corpus: {len(cases)} inputs\n\n| input | outcome | message | s |\n|---|---|---|---|")
    for c in cases:
        t0 = time.perf_counter()
        try:
            res = run_case([str(c.path)], "What does this image show?", llm="scripted",
                           script=[call("inspect_image"), answer()], trace_dir=tmp / "traces", route=False)
            out, msg = "report", res.report["recommendation"]["outcome"]
        except DxError as exc:
            out, msg = "error (exit 2)", str(exc).replace(fuzz.NAME, "<name>")
        print(f"| {c.name} | {out} | {msg[:80].replace('|', '/')} | {time.perf_counter() - t0:.2f} |")
    hits = sum(f.read_bytes().count(fuzz.NAME.encode()) + f.read_bytes().count(b"IGNORE PREVIOUS")
               for f in (tmp / "traces").rglob("*") if f.is_file())
    n = sum(1 for f in (tmp / "traces").rglob("*") if f.is_file())
    print(f"\nidentifier / injected-text scan over {n} files under the trace folder: {hits} hits")


def injection_table(tmp: Path, local: bool) -> None:
    import test_hostile as th
    from pydicom.data import get_testdata_file

    from agent.engine.session import run_case

    tmp.mkdir(parents=True, exist_ok=True)
    q = "Describe the findings"
    clean_path = get_testdata_file("CT_small.dcm")
    bad_path = th._injected_dicom(tmp)
    vectors = {"none": (clean_path, q, ""), "DICOM tags": (bad_path, q, ""), "clinical context": (clean_path, q, th.INJECT),
               "question": (clean_path, f"{q}. {th.INJECT}", ""), "all three": (bad_path, f"{q}. {th.INJECT}", th.INJECT),
               "paraphrased context": (clean_path, q, th.PARAPHRASE),
               "paraphrased question": (clean_path, f"{q}. {th.PARAPHRASE}", "")}
    print("\n## injection\n\n| planner | vector | tools | outcome | findings | same as clean |\n|---|---|---|---|---|---|")
    planners = ["obeying endpoint", "gullible endpoint"] + (["embedded Qwen2.5-1.5B"] if local else [])
    for planner in planners:
        base = None
        for name, (path, question, ctx) in vectors.items():
            d = tmp / f"{planner[:3]}-{name.replace(' ', '_')}"
            if planner != "embedded Qwen2.5-1.5B":  # obeying: instructions outside quotes; gullible: a paraphrase
                # anywhere in its prompt (tests/test_hostile.py)
                kind = th.ObeyingChat if planner == "obeying endpoint" else th.GullibleChat
                chat = kind(responses=[th.call("ct_tissue_composition"), json.dumps({"tool": "answer",
                                                                                    "args": {}})] * 3,
                            model_id="obeying")
                chat.obeyed = []
                res = run_case([str(path)], question, chat=chat, model_id="obeying", mode="json", clinical_context=ctx,
                               trace_dir=d, route=False)
            else:
                res = run_case([str(path)], question, llm="local", clinical_context=ctx, trace_dir=d, route=False,
                               max_steps=4)
            row = ([e.tool for e in res.state.evidence], res.report["recommendation"]["outcome"],
                   len(res.report["findings"]))
            base = base or row
            print(f"| {planner} | {name} | {', '.join(row[0])} | {row[1]} | {row[2]} | {'yes' if row == base else 'NO'} |")


def impression_table(tmp: Path) -> None:
    """An endpoint narrator writing dispositions in words no list holds: what reaches the impression."""
    from helpers import call
    from pydicom.data import get_testdata_file

    from agent.engine.session import run_case
    from agent.llm.backends import ScriptedChat

    said = ["Fat is about 25 % of the body [E1].", "The scan is unremarkable [E1].",
            "No malignancy is present [E1].", "The patient can go home [E1].", "Fat is 52 % of the body [E1].",
            "Nothing here needs attention [E1].", "All is well [E1]."]
    res = run_case([get_testdata_file("CT_small.dcm")], "How much fat?", llm="scripted",
                   script=[call("ct_tissue_composition")], trace_dir=tmp, narrator=ScriptedChat(responses=[" ".join(said)]))
    imp = res.report["impression"]
    print("\n## impression (endpoint narrator)\n\n| sentence written | kept |\n|---|---|")
    for s in said:
        print(f"| {s} | {'yes' if s in imp else 'dropped'} |")


def forgery_table(tmp: Path) -> None:
    import os

    from helpers import call

    from agent.engine.session import run_case
    from agent.store.trace import TraceStore, seal_of, verify_dump

    mr = __import__("pydicom.data", fromlist=["get_testdata_file"]).get_testdata_file("MR_small.dcm")

    def run(d: Path) -> str:
        return run_case([mr], "How large is the dominant bright region?", llm="scripted",
                        script=[call("region_measure")], trace_dir=d).run_id

    def sql(d: Path, q: str, *a) -> None:
        con = sqlite3.connect(d / "dxagent.sqlite")
        con.execute(q, a)
        con.commit()
        con.close()

    def verdict(d: Path, rid: str) -> str:
        p = verify_dump(TraceStore(None, d).dump(rid), d / "artifacts")
        return "intact" if not p else ("INCOMPLETE" if all(x.startswith("incomplete") for x in p) else "TAMPERED") + \
            f": {p[0][:90]}"

    os.environ["DXAGENT_TRACE_KEY"] = "bench-key"
    rows = []
    d = tmp / "f1"
    rid = run(d)
    sql(d, "DELETE FROM event WHERE run_id = ? AND seq > 3", rid)
    sql(d, "UPDATE run SET status='running', report=NULL, seal=NULL, seal_alg=NULL, n_events=NULL, head_hash=NULL "
           "WHERE id = ?", rid)
    rows.append(("cut after event 3, report removed, status running, seal cleared", verdict(d, rid)))
    d = tmp / "f2"
    rid = run(d)
    row = TraceStore(None, d).dump(rid)["run"]
    sql(d, "UPDATE run SET seal_alg='sha256', seal=? WHERE id = ?", seal_of(row, "sha256"), rid)
    rows.append(("keyed run re-sealed with plain sha256 (key set)", verdict(d, rid)))
    d = tmp / "f3"
    rid = run(d)
    sql(d, "UPDATE event SET payload = replace(payload, 'ok', 'failed') WHERE run_id = ? AND kind = 'tool'", rid)
    rows.append(("tool event edited", verdict(d, rid)))
    d = tmp / "f4"
    rid = run(d)
    sql(d, "UPDATE run SET report = replace(report, 'report', 'abstain') WHERE id = ?", rid)
    rows.append(("report edited in the run row", verdict(d, rid)))
    d = tmp / "f5"
    rid = run(d)
    rows.append(("untouched (control)", verdict(d, rid)))
    del os.environ["DXAGENT_TRACE_KEY"]
    print("\n## forgery (DXAGENT_TRACE_KEY set)\n\n| forgery | verify |\n|---|---|")
    for what, v in rows:
        print(f"| {what} | {v} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-local", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        corpus_table(tmp / "corpus")
        injection_table(tmp / "inj", not args.no_local)
        impression_table(tmp / "imp")
        forgery_table(tmp / "forge")


if __name__ == "__main__":
    main()
