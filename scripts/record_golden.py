"""Re-record the golden traces in traces/golden/ from the bundled demo cases with the embedded planner.

CI replays them (tests/test_replay.py): any change in prompts, tool set, critic or report then shows up as a
replay divergence. When the change is intended, re-record (about 2 minutes on 2 cores) and commit the result:

    .venv/bin/python scripts/record_golden.py [--llm local]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent.app.cli.cases import demo_cases  # noqa: E402
from agent.engine.session import run_case  # noqa: E402
from agent.store.trace import TraceStore, verify_dump, write_export  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llm", default="local")
    ap.add_argument("--out", type=Path, default=ROOT / "traces" / "golden")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        shutil.rmtree(args.out, ignore_errors=True)
        for name, path, question in demo_cases():
            res = run_case([path], question, llm=args.llm, trace_dir=tmp)
            dump = TraceStore(None, tmp).dump(res.run_id)
            out = write_export(dump, args.out / f"{name}.json", Path(tmp) / "artifacts")
            problems = verify_dump(dump, args.out / "artifacts")
            steps = [e["name"] for e in dump["events"] if e["kind"] == "tool"]
            print(f"{name}: {len(dump['events'])} events, tools {steps}, outcome "
                  f"{res.report['recommendation']['outcome']} -> {out.relative_to(ROOT)}"
                  + (f"  PROBLEMS: {problems}" if problems else ""))


if __name__ == "__main__":
    main()
