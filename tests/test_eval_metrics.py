"""Eval scoring (agent/app/eval_metrics.py), benchmark manifests and question-only baselines (agent/app/eval_data.py), and the
eval HTML page opened in a real headless Chromium (skipped without playwright or chromium).

Every expected number below is worked out by hand from the toy rows."""

from __future__ import annotations

import json
import math
import os
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from agent.app.eval_data import (
    EvalItem,
    MajorityBaseline,
    ManifestError,
    PriorBaseline,
    StudyPriorBaseline,
    question_key,
    read_eval_manifest,
    sample_items,
)
from agent.app.eval_metrics import (
    aurc,
    bootstrap_ci,
    closed_correct,
    ece,
    normalize_answer,
    paired_difference,
    risk_coverage,
    summarize,
    summary_markdown,
    token_recall,
    write_eval_html,
)

SLAKE = Path(os.environ.get("DXAGENT_SLAKE", Path(__file__).resolve().parents[2] / "shared" / "data" / "slake_dev"))
SYSTEMS = ["agent", "prior", "majority"]


# -- normalisation and per-item scores --------------------------------------------------------------------------------
@pytest.mark.parametrize(("text", "norm"), [
    ("Yes", "yes"), ("TRUE", "yes"), ("present.", "yes"), ("y", "yes"), ("Absent", "no"), ("n", "no"), ("False", "no"),
    (True, "yes"), ("MR", "mri"), ("Magnetic Resonance Imaging", "mri"), ("MRI scan", "mri"), ("X-Ray", "x ray"),
    ("xray", "x ray"), ("Chest X-ray", "x ray"), ("radiograph", "x ray"), ("CR", "x ray"), ("DX", "x ray"),
    ("CT scan", "ct"), ("Computed Tomography", "ct"), ("2.0", "2"), ("2.50", "2.5"), ("two", "2"), ("Ten", "10"),
    (3, "3"), ("3.5 cm", "3.5 cm"), ("The Liver.", "liver"), ("a left  lung, ", "left lung"), ("an apple", "apple"),
    ("Bowen's disease", "bowens disease"), ("no finding", "no finding"), ("end.", "end"), (None, ""),
])
def test_normalize_answer(text, norm):
    assert normalize_answer(text) == norm


def test_correct_and_token_recall():
    assert closed_correct("No", "no") and closed_correct(2, "two") and closed_correct("X-ray", "xray")
    assert not closed_correct(None, "no") and not closed_correct("yes", "no")
    assert token_recall("left", "left lung") == 0.5 and token_recall("The left lung", "left lung") == 1.0
    assert token_recall(None, "liver") == 0.0 and token_recall("kidney", "liver") == 0.0


# -- intervals, risk-coverage, calibration --------------------------------------------------------------------------------
def test_bootstrap_and_paired_difference():
    lo, hi = bootstrap_ci([])
    assert math.isnan(lo) and math.isnan(hi)
    assert bootstrap_ci([0.3] * 5) == (0.3, 0.3)
    lo, hi = bootstrap_ci([0, 1, 1, 0, 1, 0, 1, 1], seed=3)
    assert 0 <= lo <= 5 / 8 <= hi <= 1 and lo < hi
    assert bootstrap_ci([0, 1, 1, 0], seed=3) == bootstrap_ci([0, 1, 1, 0], seed=3)  # seeded
    d = paired_difference([1, 1, 1], [0, 0, 0])
    assert d == {"mean": 1.0, "lo": 1.0, "hi": 1.0, "n": 3}
    d = paired_difference([1, 0, 1, 1], [0, 0, 1, 0])
    assert d["mean"] == 0.5 and d["lo"] <= 0.5 <= d["hi"] and d["n"] == 4
    assert paired_difference([], []) == {"mean": None, "lo": None, "hi": None, "n": 0}
    with pytest.raises(ValueError):
        paired_difference([1], [1, 0])


def flat(points: list[dict]) -> list[float]:
    """[coverage1, risk1, coverage2, risk2, ...]"""
    return [x for p in points for x in (p["coverage"], p["risk"])]


def test_risk_coverage_aurc_ece_by_hand():
    # most confident first, the two 0.7s in input order (index 2 wrong, then index 3 right); index 1 has no probability
    pts = risk_coverage([0.9, None, 0.7, 0.7, 0.2], [True, True, False, True, False])
    assert flat(pts) == pytest.approx([0.2, 0.0, 0.4, 0.5, 0.6, 1 / 3, 0.8, 0.5])
    assert aurc(pts) == pytest.approx(0.2 * (0 + 0.5 + 1 / 3 + 0.5))  # = 4/15
    assert aurc([]) is None and risk_coverage([], []) == []
    # bins [0.9, 1]: p .95, .95, one right: |0.5 - 0.95|; [0.3, 0.4): p .3, .35, one right: |0.5 - 0.325|; half each
    assert ece([0.95, 0.95, 0.3, 0.35, None], [True, False, False, True, True]) == pytest.approx(0.5 * 0.45 + 0.5 * 0.175)
    assert ece([1.0, 0.0], [True, False]) == 0.0 and ece([None], [True]) is None


# -- the summary on toy rows ----------------------------------------------------------------------------------------------
ITEMS = {  # item: (gold, answer_type, content_type, modality)
    "i1": ("yes", "CLOSED", "Abnormality", "CT"), "i2": ("yes", "CLOSED", "Abnormality", "MRI"),
    "i3": ("no", "CLOSED", "Organ", "CT"), "i4": ("no", "CLOSED", "Organ", "X-Ray"),
    "i5": ("left lung", "OPEN", "Position", "X-Ray"), "i6": ("liver", "OPEN", "Organ", "CT"),
}


def row(item: str, system: str, value=None, kind: str = "yes_no", prob=None, status: str = "done", reason=None,
        tool_calls: int = 0, seconds: float = 0.0) -> dict:
    gold, at, ct, mod = ITEMS[item]
    answer = None if status == "failed" else {"kind": kind, "value": value, "unit": None, "probability": prob,
                                               "evidence_ids": [], "basis": "", "reason": reason}
    return {"item_id": item, "image_id": f"img{item}", "system": system, "question": f"q {item}", "gold": gold,
            "answer_type": at, "content_type": ct, "modality": mod, "status": status, "answer": answer, "run_id": None,
            "tool_calls": tool_calls, "seconds": seconds, "error": "boom" if status == "failed" else None}


def toy_rows() -> list[dict]:
    return [
        row("i1", "agent", "yes", prob=0.9, tool_calls=3, seconds=10),  # right
        row("i2", "agent", "Yes", prob=0.8, tool_calls=2, seconds=20),  # right
        row("i3", "agent", "yes", prob=0.6, tool_calls=4, seconds=30),  # wrong
        row("i4", "agent", kind="abstain", reason="insufficient evidence", tool_calls=1, seconds=40),
        row("i5", "agent", "left", kind="location", tool_calls=2, seconds=50),  # not exact, recall 1/2
        row("i6", "agent", status="failed", seconds=30),
        *(row(i, "prior", v) for i, v in (("i1", "yes"), ("i2", "no"), ("i3", "no"), ("i4", "no"))),  # 1, 0, 1, 1
        row("i5", "prior", "right lung", kind="phrase"), row("i6", "prior", "Liver", kind="phrase"),  # recall 1/2, 1
        *(row(i, "majority", "yes") for i in ("i1", "i2", "i3", "i4")),  # 1, 1, 0, 0
        row("i5", "majority", "liver", kind="phrase"), row("i6", "majority", "liver", kind="phrase"),  # recall 0, 1
    ]


def test_summarize_by_hand():
    s = summarize(toy_rows(), SYSTEMS, notes=["baselines fitted on train.jsonl"])
    assert s["n_items"] == 6 and s["notes"][0] == "baselines fitted on train.jsonl"
    a = s["systems"]["agent"]
    assert a["n"] == 6 and a["closed"]["n"] == 4 and a["open"]["n"] == 2
    assert a["closed"]["accuracy_all"]["value"] == 0.5
    assert a["closed"]["accuracy_answered"]["value"] == pytest.approx(2 / 3) and a["closed"]["accuracy_answered"]["n"] == 3
    assert a["closed"]["coverage"]["value"] == 0.75 and a["coverage"]["value"] == pytest.approx(4 / 6)
    assert a["open"]["exact_match_all"]["value"] == 0.0 and a["open"]["exact_match_answered"]["n"] == 1
    assert a["open"]["token_recall_all"]["value"] == 0.25 and a["open"]["coverage"]["value"] == 0.5
    assert a["abstentions"] == {"failed": 1, "insufficient evidence": 1}
    assert a["abstention_rate"] == {"failed": pytest.approx(1 / 6), "insufficient evidence": pytest.approx(1 / 6)}
    assert a["tool_calls"] == {"mean": 2.0, "total": 12.0}
    assert a["seconds"] == {"mean": 30.0, "median": 30.0, "total": 180.0} and a["questions_per_min"] == 2.0
    m = a["closed"]["accuracy_all"]
    assert m["lo"] <= 0.5 <= m["hi"] and m["n"] == 4
    # risk-coverage over the 4 closed items: 0.9 right, 0.8 right, 0.6 wrong (the abstention has none)
    assert flat(a["risk_coverage"]) == pytest.approx([0.25, 0, 0.5, 0, 0.75, 1 / 3])
    assert a["aurc"] == pytest.approx(1 / 12) and a["n_with_probability"] == 3
    assert a["ece"] == pytest.approx((0.1 + 0.2 + 0.6) / 3)
    by = a["by"]
    assert by["answer_type"]["CLOSED"]["accuracy_all"]["value"] == 0.5 and by["answer_type"]["OPEN"]["accuracy_all"]["value"] == 0
    assert by["content_type"]["Abnormality"]["accuracy_all"]["value"] == 1.0 and by["content_type"]["Abnormality"]["n"] == 2
    assert by["content_type"]["Organ"]["accuracy_all"]["value"] == 0.0
    assert by["content_type"]["Organ"]["coverage"]["value"] == pytest.approx(1 / 3)
    assert by["modality"]["CT"]["accuracy_all"]["value"] == pytest.approx(1 / 3) and by["modality"]["CT"]["n"] == 3
    p = s["systems"]["prior"]
    assert p["closed"]["accuracy_all"]["value"] == 0.75 and p["closed"]["accuracy_answered"]["value"] == 0.75
    assert p["coverage"]["value"] == 1.0 and p["abstentions"] == {}
    assert p["open"]["exact_match_all"]["value"] == 0.5 and p["open"]["token_recall_all"]["value"] == 0.75
    assert p["risk_coverage"] == [] and p["aurc"] is None and p["ece"] is None and p["questions_per_min"] is None
    mj = s["systems"]["majority"]
    assert mj["closed"]["accuracy_all"]["value"] == 0.5 and mj["open"]["token_recall_all"]["value"] == 0.5
    # paired: agent closed [1,1,0,0] vs prior [1,0,1,1]; open recall [0.5,0] vs [0.5,1]; vs majority [1,1,0,0], [0,1]
    ap = s["paired"]["agent - prior"]
    assert ap["closed_accuracy"]["mean"] == -0.25 and ap["closed_accuracy"]["n"] == 4
    assert ap["closed_accuracy"]["lo"] <= -0.25 <= ap["closed_accuracy"]["hi"]
    assert ap["open_token_recall"]["mean"] == -0.5 and ap["open_token_recall"]["n"] == 2
    am = s["paired"]["agent - majority"]
    assert am["closed_accuracy"] == {"mean": 0.0, "lo": 0.0, "hi": 0.0, "n": 4}  # every difference 0: degenerate
    assert am["open_token_recall"]["mean"] == -0.25
    assert set(s["paired"]) == {"agent - prior", "agent - majority"}
    json.dumps(s, allow_nan=False)  # JSON-able, no NaN
    assert summarize(toy_rows(), SYSTEMS) == summarize(toy_rows(), SYSTEMS)  # deterministic


def test_summarize_missing_rows_and_empty_system():
    rows = [r for r in toy_rows() if not (r["system"] == "majority" and r["item_id"] == "i6")]
    s = summarize(rows, [*SYSTEMS, "ghost"])
    assert s["systems"]["majority"]["n"] == 5 and s["paired"]["agent - majority"]["open_token_recall"]["n"] == 1
    assert s["paired"]["agent - majority"]["open_token_recall"]["mean"] == 0.5  # i5 only: 0.5 - 0
    assert s["systems"]["ghost"]["n"] == 0 and s["systems"]["ghost"]["closed"]["accuracy_all"]["value"] is None
    assert any("majority has rows for 5 of 6" in n for n in s["notes"])
    json.dumps(s, allow_nan=False)
    none = summarize(toy_rows(), ["prior"], reference_system="agent")
    assert none["paired"] == {} and any("no paired differences" in n for n in none["notes"])


def test_summary_markdown():
    md = summary_markdown(summarize(toy_rows(), SYSTEMS, notes=["prior and majority fitted on train.jsonl"]), "toy eval")
    assert md.startswith("# toy eval") and "abstentions and failed items count as wrong in 'all'" in md.lower()
    assert "reference split named in the notes" in md and "prior and majority fitted on train.jsonl" in md
    assert "| agent | 0.500 [" in md and "| agent - prior | -0.250 [" in md and "| agent - majority | 0.000 [0.000, 0.000]" in md
    for heading in ("## Headline", "## Paired differences", "content type", "modality", "## Abstentions"):
        assert heading in md


# -- manifests ----------------------------------------------------------------------------------------------------------
def png(path: Path, size=(4, 4)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", size, 128).save(path)
    return path


def write_lines(path: Path, lines: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


def test_read_jsonl_manifest(tmp_path):
    d = tmp_path / "m"
    a, b = png(d / "imgs" / "a.png"), png(d / "imgs" / "b.png")
    png(tmp_path / "x.png")  # exists, but outside the manifest's folder
    m = write_lines(d / "q.jsonl", [
        {"case_id": "q1", "image": "imgs/a.png", "question": "Is this a CT?", "answer": "Yes", "answer_type": "closed",
         "content_type": "Modality", "modality": "CT", "image_organ": "Brain"},
        "",
        "{not json",
        {"case_id": "q2", "image": "imgs/missing.png", "question": "Any?", "answer": "no"},
        {"case_id": "q3", "image": "../x.png", "question": "Any?", "answer": "no"},
        {"case_id": "q1", "image": "imgs/b.png", "question": "How many?", "answer": 2, "modality": "MRI"},
        [1, 2],
        {"id": "q/4", "img_name": "imgs/a.png", "question": "Where?", "answer": ["left", "right"], "question_type": "Position"},
        {"case_id": "q5", "image": "imgs/a.png", "answer": "yes"},
    ])
    root, items = read_eval_manifest(m)
    assert root == d.resolve() and len(items) == 8
    ok = [it for it in items if it.error is None]
    assert [it.case_id for it in ok] == ["q1", "q1~5", "q__4"]
    q1, rep, q4 = ok
    assert (q1.paths, q1.answer, q1.answer_type, q1.content_type, q1.modality) == ([str(a.resolve())], "Yes", "CLOSED",
                                                                                  "Modality", "CT")
    assert (q1.image_id, q1.where, q1.labels) == ("imgs/a.png", "line 1", [])
    assert (rep.paths, rep.answer, rep.answer_type, rep.modality) == ([str(b.resolve())], "2", "OPEN", "MRI")
    assert (q4.answer, q4.answer_type, q4.content_type, q4.modality) == ("left, right", "OPEN", "Position", "")
    errors = {it.where: it.error for it in items if it.error}
    assert set(errors) == {"line 3", "line 4", "line 5", "line 7", "line 9"}
    assert "not JSON" in errors["line 3"] and "no such file" in errors["line 4"] and "escapes" in errors["line 5"]
    assert "JSON object" in errors["line 7"] and "no question" in errors["line 9"]
    assert all(it.paths == [] for it in items if it.error)
    assert len({it.case_id for it in items}) == len(items)


def test_read_vqa_rad_json_and_vqa_med_txt(tmp_path):
    png(tmp_path / "synpic1.jpg")
    m = tmp_path / "rad.json"
    m.write_text(json.dumps([
        {"qid": 11, "image_name": "synpic1.jpg", "question": "Is there a fracture?", "answer": "no", "answer_type": "CLOSED",
         "question_type": "PRES"},
        {"qid": 12, "image_name": "synpic1.jpg", "question": "What organ?", "answer": "Brain", "answer_type": "OPEN",
         "question_type": "ORGAN"},
        "junk"]))
    _, items = read_eval_manifest(m)
    assert [(it.case_id, it.answer_type, it.content_type, it.error) for it in items[:2]] == [
        ("11", "CLOSED", "PRES", None), ("12", "OPEN", "ORGAN", None)]
    assert items[2].where == "item 3" and "JSON object" in items[2].error

    med = tmp_path / "med"
    png(med / "images" / "synpic100.jpg")
    png(med / "synpic200.png")
    t = med / "test.txt"
    t.write_text("synpic100|what modality is shown?|ct\n\nsynpic200|Modality|is this an mri?|yes\nsynpic300|q|a\nbad line\n")
    root, items = read_eval_manifest(t)
    assert root == med.resolve() and len(items) == 4
    first, second, third, fourth = items
    assert first.paths == [str((med / "images" / "synpic100.jpg").resolve())] and first.answer_type == "OPEN"
    assert (first.case_id, first.question, first.answer, first.image_id) == ("synpic100", "what modality is shown?", "ct",
                                                                             "synpic100")
    assert second.paths == [str((med / "synpic200.png").resolve())] and second.content_type == "Modality"
    assert second.answer_type == "CLOSED" and second.where == "line 3"
    assert "no image synpic300" in third.error and "field" in fourth.error


def test_realcases_label_questions(tmp_path):
    png(tmp_path / "a.png")
    png(tmp_path / "b.png")
    m = write_lines(tmp_path / "cases.jsonl", [
        {"case_id": "c1", "image": "a.png", "modality": "CXR", "findings": ["Cardiomegaly"], "source": "s1"},
        {"case_id": "c2", "image": "a.png", "modality": "CXR", "findings": ["No Finding"], "source": "s1"},
        {"case_id": "c3", "image": "b.png", "modality": "CXR", "findings": ["Effusion", "cardiomegaly"], "source": "s1"},
        {"case_id": "c4", "image": "b.png", "modality": "CT", "findings": [], "source": "s1"},
        {"case_id": "c5", "image": "b.png", "modality": "MRI", "findings": ["glioma"], "source": "s2"},
        {"case_id": "c6", "image": "b.png", "modality": "MRI", "findings": ["no tumor"], "source": "s2"},
        {"case_id": "c7", "image": "b.png", "modality": "CXR", "findings": ["No Pneumothorax", "Healthy"], "source": "s3"},
    ])
    _, items = read_eval_manifest(m)
    got = [(it.case_id, it.question, it.answer) for it in items]
    assert got == [
        ("c1__cardiomegaly", "Is there Cardiomegaly in this image?", "yes"),
        ("c1__effusion", "Is there Effusion in this image?", "no"),
        ("c2__cardiomegaly", "Is there Cardiomegaly in this image?", "no"),
        ("c2__effusion", "Is there Effusion in this image?", "no"),
        ("c3__cardiomegaly", "Is there Cardiomegaly in this image?", "yes"),
        ("c3__effusion", "Is there Effusion in this image?", "yes"),
        ("c5__glioma", "Is there glioma in this image?", "yes"),
        ("c6__glioma", "Is there glioma in this image?", "no"),
    ]
    assert all(it.answer_type == "CLOSED" and it.content_type == "Abnormality" and it.error is None for it in items)
    assert items[0].modality == "CXR" and items[0].paths == [str((tmp_path / "a.png").resolve())]
    assert items[6].modality == "MRI" and items[6].image_id == "b.png"


def test_manifest_errors(tmp_path):
    with pytest.raises(ManifestError, match="no such manifest"):
        read_eval_manifest(tmp_path / "absent.jsonl")
    (tmp_path / "m.csv").write_text("image,question\n")
    with pytest.raises(ManifestError, match="not .csv"):
        read_eval_manifest(tmp_path / "m.csv")
    (tmp_path / "empty.jsonl").write_text("\n  \n")
    with pytest.raises(ManifestError, match="no items"):
        read_eval_manifest(tmp_path / "empty.jsonl")
    (tmp_path / "d.json").write_text('{"a": 1}')
    with pytest.raises(ManifestError, match="list"):
        read_eval_manifest(tmp_path / "d.json")
    with pytest.raises(ManifestError, match="root"):
        read_eval_manifest(tmp_path / "empty.jsonl", root=tmp_path / "nowhere")


def test_sample_items_and_question_key():
    items = [EvalItem(f"q{i}", [], "q", "a", "OPEN") for i in range(20)]
    s = sample_items(items, 5, seed=1)
    assert len(s) == 5 and s == sample_items(items, 5, seed=1)
    assert [it.case_id for it in s] == sorted((it.case_id for it in s), key=lambda c: int(c[1:]))  # file order
    assert sample_items(items, None, 0) == items and sample_items(items, 50, 0) == items
    assert question_key("  Is there a TUMOR ? ") == question_key("is there a tumor") == "is there a tumor"


# -- baselines ------------------------------------------------------------------------------------------------------------
def ref_item(q: str, a: str, at: str, ct: str) -> EvalItem:
    return EvalItem("r", [], q, a, at, ct)


REFERENCE = [
    ref_item("Is there a tumor?", "yes", "CLOSED", "Abnormality"),
    ref_item("Is there a tumor ?", "No", "CLOSED", "Abnormality"),
    ref_item("is there a TUMOR", "no", "CLOSED", "Abnormality"),
    ref_item("Is the lung healthy?", "no", "CLOSED", "Abnormality"),
    ref_item("Is this the liver?", "yes", "CLOSED", "Organ"),
    ref_item("Is this the heart?", "yes", "CLOSED", "Organ"),
    ref_item("Is this the brain?", "yes", "CLOSED", "Organ"),
    ref_item("Which organ?", "Liver", "OPEN", "Organ"),
    ref_item("Which organ is this?", "Lung", "OPEN", "Organ"),
    ref_item("What modality?", "CT", "OPEN", "Modality"),
    ref_item("How was this taken?", "ct", "OPEN", "Modality"),
]


def test_prior_baseline_levels_and_ties():
    prior = PriorBaseline(REFERENCE)
    ask = lambda q, at, ct: prior.predict(EvalItem("x", [], q, "", at, ct))  # noqa: E731
    # the same question text: no 2 (spelled "No" once, "no" once: the first spelling), yes 1
    answer, basis = ask("IS THERE A TUMOR?", "CLOSED", "Abnormality")
    assert answer == "No" and "same question" in basis and "2 of 3" in basis
    # unseen question: (Abnormality, CLOSED): no 3 ("no" twice), yes 1
    answer, basis = ask("Is the kidney enlarged?", "CLOSED", "Abnormality")
    assert answer == "no" and "content type Abnormality" in basis
    # unseen content type, or none: CLOSED: yes 4, no 3
    answer, basis = ask("Is it axial?", "CLOSED", "Plane")
    assert answer == "yes" and "answer type CLOSED" in basis
    assert ask("Is it axial?", "CLOSED", "")[0] == "yes"
    # (Organ, OPEN): Liver 1, Lung 1: the first seen; reversed reference, the other
    assert ask("What is this?", "OPEN", "Organ")[0] == "Liver"
    assert PriorBaseline(REFERENCE[::-1]).predict(EvalItem("x", [], "What is this?", "", "OPEN", "Organ"))[0] == "Lung"
    # no reference item of that answer type: every answer (yes 4, no 2 + No 1 = 3 ... -> yes)
    closed_only = PriorBaseline(REFERENCE[:7])
    answer, basis = closed_only.predict(EvalItem("x", [], "What?", "", "OPEN", "Size"))
    assert answer == "yes" and "all reference" in basis
    with pytest.raises(ValueError):
        PriorBaseline([])


def test_prior_plus_study_conditions_on_the_predicted_study():
    """The same question answered per predicted (modality, region), hand-counted; unseen studies fall back."""
    def item(q: str, a: str, img: str) -> EvalItem:
        return EvalItem("r", [img], q, a, "OPEN", "Organ")

    studies = {"ct-abd": ("CT", "abdomen"), "ct-chest": ("CT", "chest"), "mr-head": ("MR", "head"),
               "ct-head": ("CT", "head")}
    ref = [item("Which organ is largest?", "Liver", "ct-abd"), item("Which organ is largest?", "Liver", "ct-abd"),
           item("Which organ is largest?", "Lung", "ct-chest"), item("Which organ is largest?", "Brain", "mr-head"),
           item("Which organ is largest?", "Lung", "ct-chest"), item("Which organ is largest?", "Lung", "ct-chest")]
    prior = StudyPriorBaseline(ref, lambda it: studies[it.paths[0]])
    ask = lambda img: prior.predict(item("Which organ is largest?", "", img))  # noqa: E731
    assert ask("ct-abd")[0] == "Liver" and "CT of the abdomen" in ask("ct-abd")[1]  # 2 of 2
    assert ask("mr-head")[0] == "Brain"
    # CT of the head never seen: the same question on CT (Lung 3, Liver 2)
    answer, basis = ask("ct-head")
    assert answer == "Lung" and basis.endswith("on CT: 3 of 5 reference answers")
    # the plain prior (same question text, all studies: Lung 3 of 6) where the item has no image
    assert prior.predict(EvalItem("x", [], "Which organ is largest?", "", "OPEN", "Organ"))[0] == "Lung"


def test_majority_baseline():
    maj = MajorityBaseline(REFERENCE)
    assert maj.predict(EvalItem("x", [], "Is there a tumor?", "", "CLOSED", "Abnormality"))[0] == "yes"
    answer, basis = maj.predict(EvalItem("x", [], "Anything?", "", "OPEN", ""))
    assert answer == "CT" and "OPEN" in basis and "2 of 4" in basis  # CT twice ("CT" seen first), Liver, Lung
    assert MajorityBaseline(REFERENCE[:7]).predict(EvalItem("x", [], "?", "", "OPEN", ""))[0] == "yes"


def test_slake_validate_manifest():
    if not (SLAKE / "validate.jsonl").exists():
        pytest.skip(f"SLAKE dev data is absent ({SLAKE}; set DXAGENT_SLAKE)")
    root, items = read_eval_manifest(SLAKE / "validate.jsonl")
    assert len(items) == 1053 and [it.error for it in items if it.error] == []
    assert sum(it.answer_type == "CLOSED" for it in items) == 422 and len({it.case_id for it in items}) == 1053
    assert {it.modality for it in items} == {"CT", "MRI", "X-Ray"} and all(Path(it.paths[0]).is_file() for it in items[:20])
    prior = PriorBaseline(read_eval_manifest(SLAKE / "train.jsonl")[1])
    assert all(prior.predict(it)[0] for it in items[:50])


# -- the HTML page --------------------------------------------------------------------------------------------------------
class _Refs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.ids: list[str] = []
        self.refs: list[str] = []

    def handle_starttag(self, tag, attrs):
        for k, v in attrs:
            if k == "id":
                self.ids.append(v)
            if k in ("src", "href", "xlink:href") and v is not None:
                self.refs.append(v)


def test_eval_html_is_self_contained(tmp_path):
    out = write_eval_html(summarize(toy_rows(), SYSTEMS, notes=["fitted on train"]), tmp_path / "r" / "eval.html", "toy")
    html = out.read_text()
    p = _Refs()
    p.feed(html)
    assert {"headline", "risk-coverage", "by-content", "by-modality", "paired", "abstentions"} <= set(p.ids)
    assert len(p.ids) == len(set(p.ids)), "duplicate element ids across the inline SVGs"
    assert all(r.startswith(("#", "data:")) for r in p.refs) and "http://" not in html and "https://" not in html
    assert "<?xml" not in html and "<!DOCTYPE svg" not in html and "Research use only" in html
    # nothing to show still renders
    empty = write_eval_html(summarize([], ["agent"]), tmp_path / "empty.html")
    assert "Research use only" in empty.read_text()


CHECKS = """() => {
  const refs = [...document.querySelectorAll('[href], [src]')].map(e => e.getAttribute('href') ?? e.getAttribute('src'));
  const rows = id => [...document.querySelectorAll(`#${id} tbody tr:not(.empty)`)].map(r => r.cells[0].textContent.trim());
  return {
    headline: document.querySelector('#headline')?.tagName, paired: document.querySelector('#paired')?.tagName,
    rc: document.querySelector('figure#risk-coverage > svg') !== null,
    content: document.querySelectorAll('#by-content svg').length, modality: document.querySelectorAll('#by-modality svg').length,
    bars: document.querySelectorAll('#by-content svg path').length,
    systems: rows('headline'), pairs: rows('paired'), reasons: rows('abstentions'),
    external: refs.filter(h => !(h.startsWith('#') || h.startsWith('data:'))),
    text: document.body.innerText,
  };
}"""


def test_eval_html_in_browser(browser, tmp_path):
    rows = [*toy_rows(), *(dict(r, system="agent2", answer=dict(r["answer"], probability=0.5)) for r in toy_rows()
                           if r["system"] == "agent" and r["answer"])]
    out = write_eval_html(summarize(rows, [*SYSTEMS, "agent2"], notes=["fitted on train"]), tmp_path / "eval.html")
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    requests: list[str] = []
    errors: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(out.as_uri(), wait_until="load")
    got = page.evaluate(CHECKS)
    assert got["headline"] == "TABLE" and got["paired"] == "TABLE" and got["rc"]
    assert got["systems"] == [*SYSTEMS, "agent2"]
    assert got["pairs"] == ["agent - prior", "agent - majority", "agent - agent2"]
    assert got["reasons"] == ["failed", "insufficient evidence"]
    assert got["content"] == 1 and got["modality"] == 1 and got["bars"] > 0
    for name in ("agent", "agent2"):  # the systems with probabilities each have a drawn line
        assert page.locator(f'#risk-coverage svg g[id$="rc-{name}"] path').count() >= 1, name
    for name in ("prior", "majority"):
        assert page.locator(f'#risk-coverage svg g[id$="rc-{name}"]').count() == 0
    assert "prior: no probabilities" in got["text"] and "majority: no probabilities" in got["text"]
    assert got["external"] == [] and all(u.startswith(("file:", "data:")) for u in requests), requests
    assert "Research use only" in got["text"] and errors == []


def test_a_choice_answer_is_scored_by_the_option_it_names():
    """Issue 30: "t1 weighted" to "Is this MR image T2-weighted or T1-weighted?" (reference "T1") was scored wrong at
    p 0.99, though it names the reference's option in the option's own words."""
    q = "Is this MR image T2-weighted or T1-weighted?"
    assert closed_correct("t1 weighted", "T1", q) and not closed_correct("t2 weighted", "T1", q)
    assert not closed_correct("t1 weighted", "T1")  # without the question: exact match only
    assert not closed_correct("weighted", "T1", q)  # names no option on its own
    assert not closed_correct("lung", "left lung", "Is the lesion in the left lung or the right lung?")
    assert closed_correct("Left", "left lung", "Is the lesion in the left lung or the right lung?")
    assert not closed_correct("yes", "no", "Is there an effusion?")
