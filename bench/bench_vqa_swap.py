"""Does the VQA expert look at the image? SLAKE validate answered by `vqa-expert` on its own images and again with each
item's image swapped for another validate image of the same modality, beside the question-only prior.

    .venv/bin/python bench/bench_vqa_swap.py [--out DIR] [--seed 0] [--sample N]

The swap is a seeded derangement of the split's distinct images within each modality (no image keeps its place), so
every question is asked about a real picture of the same kind that is not its own. Image-dependent content types
(organ presence, position, abnormality, size, quantity, colour) should fall toward the prior; those a question and
its modality settle (modality, plane, knowledge) should hardly move. Prints, by content type, the expert's accuracy
on its own images, on swapped images, the prior's, and how much of the expert's lead over the prior the swap takes
away. Both runs go through `agent.app.eval.run_eval` (the code `dxagent eval` runs). Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def swapped(rows: list[dict], seed: int) -> tuple[list[dict], int]:
    """The rows with each image replaced by another image of the same modality (a derangement per modality)."""
    by_mod: dict[str, list[str]] = defaultdict(list)
    for r in rows:
        if r["image"] not in by_mod[r["modality"]]:
            by_mod[r["modality"]].append(r["image"])
    rng = random.Random(seed)
    to: dict[str, str] = {}
    for images in by_mod.values():
        if len(images) < 2:
            continue
        order = sorted(images)
        rng.shuffle(order)
        to.update({a: b for a, b in zip(order, order[1:] + order[:1], strict=True)})  # a cycle: nobody keeps its own
    out = [{**r, "image": to[r["image"]], "image_own": r["image"]} for r in rows if r["image"] in to]
    return out, len(rows) - len(out)


def by_type(path: Path) -> dict[str, dict[str, list[float]]]:
    from agent.app.eval_metrics import closed_correct

    acc: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for line in path.read_text().splitlines():
        r = json.loads(line)
        a = r.get("answer") or {}
        ok = r.get("status") == "done" and a.get("kind") not in (None, "abstain") and closed_correct(a.get("value"),
                                                                                                      r.get("gold"))
        for key in (str(r.get("content_type")), "all"):
            acc[key][r["system"]].append(float(ok))
    return acc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sample", type=int, default=None)
    args = ap.parse_args()
    data = Path(os.environ.get("DXAGENT_SLAKE") or ROOT.parent / "shared" / "data" / "slake_dev")
    if not (data / "validate.jsonl").exists():
        sys.exit(f"no SLAKE data at {data} (set DXAGENT_SLAKE)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from agent.app.eval import run_eval

    out = args.out or Path(tempfile.mkdtemp(prefix="bench-vqa-swap-"))
    out.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(x) for x in (data / "validate.jsonl").read_text().splitlines() if x.strip()]
    if args.sample:
        rows = random.Random(args.seed).sample(rows, min(args.sample, len(rows)))
    swap, dropped = swapped(rows, args.seed)
    (out / "own.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows if r["image"] in
                                           {s["image_own"] for s in swap}))
    (out / "swapped.jsonl").write_text("".join(json.dumps(r) + "\n" for r in swap))
    runs = {}
    for name, systems in (("own", ["vqa-expert", "prior"]), ("swapped", ["vqa-expert"])):
        run_eval(out / f"{name}.jsonl", out / name, systems=systems, prior_from=data / "train.jsonl", root=data)
        runs[name] = by_type(out / name / "results.jsonl")
    print(f"SLAKE validate, {len(swap)} questions ({dropped} on a modality with one image left out); images swapped "
          f"within modality (seed {args.seed})")
    print(f"{'content type':14} {'n':>5} {'expert own':>11} {'swapped':>8} {'prior':>6} {'lead lost':>10}")
    report = {}
    for key in sorted(runs["own"], key=lambda k: (k == "all", k)):
        own = runs["own"][key]["vqa-expert"]
        sw = runs["swapped"].get(key, {}).get("vqa-expert", [])
        pr = runs["own"][key]["prior"]
        e, s, p = (sum(x) / len(x) if x else float("nan") for x in (own, sw, pr))
        lost = (e - s) / (e - p) if e - p > 1e-9 else float("nan")
        report[key] = {"n": len(own), "expert_own": round(e, 4), "expert_swapped": round(s, 4), "prior": round(p, 4),
                       "lead_lost": round(lost, 3) if lost == lost else None}
        print(f"{key:14} {len(own):5d} {e:11.3f} {s:8.3f} {p:6.3f} {lost:10.2f}")
    (out / "swap.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"lead lost = (own - swapped) / (own - prior): 1 means the swap brings the expert down to the prior; "
          f"written {out / 'swap.json'}")


if __name__ == "__main__":
    main()
