"""Scoring of benchmark question answering (SLAKE, VQA-RAD, VQA-Med style) and the eval summary: JSON, Markdown, HTML.

An eval run gives one row per item and system (a dict): `item_id, image_id, system, question, gold, answer_type`
(OPEN|CLOSED), `content_type, modality, status` (done|failed), `answer` (`kind` yes_no|choice|count|measurement|
location|phrase|abstain, `value, unit, probability, evidence_ids, basis, reason`), `run_id, tool_calls, seconds,
error`. An item is answered when its status is "done" and its answer's kind is not "abstain"; a failed row is an
abstention with the reason "failed". `probability` is the system's probability that its stated value is correct.

Per-item scores: CLOSED: 1 when answered and `closed_correct` (for a choice question, naming the reference's option in
the option's words counts: "T1-weighted" for "T1"), else 0; OPEN: exact match (likewise) and token recall
(0 when not answered). "all" metrics divide by every item, so abstentions count as wrong; "answered" metrics divide by
the answered items only. Intervals are 95 % bootstrap percentile intervals of the mean (items resampled, seeded);
paired differences resample items present for both systems. Everything is deterministic for a given seed, and the
summary holds no NaN (None where a value is undefined). Research use only.
"""

from __future__ import annotations

import io
import math
import re
import statistics
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

_NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"))}
_ARTICLES = {"a", "an", "the"}
_SYNONYMS = {
    **dict.fromkeys(("yes", "y", "true", "present"), "yes"),
    **dict.fromkeys(("no", "n", "false", "absent"), "no"),
    **dict.fromkeys(("mr", "mri", "magnetic resonance", "magnetic resonance imaging", "mri scan", "mr scan"), "mri"),
    **dict.fromkeys(("x ray", "xray", "x rays", "xrays", "radiograph", "radiography", "cr", "dx", "chest x ray",
                     "chest xray", "chest radiograph", "plain film"), "x ray"),
    **dict.fromkeys(("ct", "computed tomography", "ct scan", "cat scan"), "ct"),
}
_DOT_NOT_IN_NUMBER = re.compile(r"(?<!\d)\.|\.(?!\d)")
_PUNCT = re.compile(r"[^\w\s.]|_")
_DECIMAL = re.compile(r"^\d+\.\d+$")


def normalize_answer(text: Any) -> str:
    """Lower case; punctuation removed (a '.' inside a number kept); articles dropped; spaces collapsed; number words
    and "2.0" to digits ("2"); whole-answer synonyms: yes/no, MRI, X-ray, CT."""
    if text is None:
        return ""
    if isinstance(text, bool):
        return "yes" if text else "no"
    s = str(text).lower().strip().replace("'", "").replace("\u2019", "")
    s = _PUNCT.sub(" ", _DOT_NOT_IN_NUMBER.sub(" ", s))
    tokens = []
    for t in s.split():
        if t in _ARTICLES:
            continue
        if _DECIMAL.match(t):
            t = t.rstrip("0").rstrip(".")
        tokens.append(_NUMBER_WORDS.get(t, t))
    out = " ".join(tokens)
    return _SYNONYMS.get(out, out)


def closed_correct(value: Any, gold: Any, question: str | None = None) -> bool:
    """The normalised answers are equal (None is never correct); with the `question` of a choice ("Is this T1- or
    T2-weighted?"), also when both name the same one of its options: the option whose words hold all of the
    answer's, when exactly one does ("T1-weighted" for the reference "T1"; the choice is what is asked, its wording
    is the option's)."""
    if value is None:
        return False
    a, g = normalize_answer(value), normalize_answer(gold)
    if a == g:
        return True
    if not question:
        return False
    from agent.core.question import parse_question

    q = parse_question(question)
    if q.kind != "choice" or len(q.choices) < 2:
        return False
    options = [set(normalize_answer(o).split()) for o in q.choices]

    def option_of(words: str) -> int | None:
        hits = [i for i, o in enumerate(options) if words and set(words.split()) <= o]
        return hits[0] if len(hits) == 1 else None

    return (ga := option_of(g)) is not None and ga == option_of(a)


def exact_match(value: Any, gold: Any) -> bool:
    """Open-question exact match: the same rule as `closed_correct`."""
    return closed_correct(value, gold)


def token_recall(value: Any, gold: Any) -> float:
    """The fraction of the gold answer's normalised tokens present among the prediction's tokens (0 for None)."""
    if value is None:
        return 0.0
    gold_tokens = normalize_answer(gold).split()
    pred = set(normalize_answer(value).split())
    if not gold_tokens:
        return float(not pred)
    return sum(t in pred for t in gold_tokens) / len(gold_tokens)


# -- intervals ------------------------------------------------------------------------------------------------------
def bootstrap_ci(values: Sequence[float], n_boot: int = 2000, seed: int = 0, alpha: float = 0.05) -> tuple[float, float]:
    """Percentile interval of the mean over `n_boot` resamples; (nan, nan) for no values, (x, x) when all equal x."""
    arr = np.asarray(list(values), dtype=float)
    if arr.size == 0:
        return math.nan, math.nan
    if np.all(arr == arr[0]):
        return float(arr[0]), float(arr[0])
    rng = np.random.default_rng(seed)
    means = np.concatenate([arr[rng.integers(0, arr.size, size=(m, arr.size))].mean(axis=1)
                            for m in _chunks(n_boot, max(1, 4_000_000 // arr.size))])
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def _chunks(total: int, size: int) -> list[int]:
    return [min(size, total - i) for i in range(0, total, size)]


def _clean(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def _metric(values: Sequence[float], n_boot: int, seed: int) -> dict[str, Any]:
    """{"value", "lo", "hi", "n"}: the mean and its interval (None when there are no values)."""
    lo, hi = bootstrap_ci(values, n_boot, seed)
    return {"value": float(np.mean(values)) if len(values) else None, "lo": _clean(lo), "hi": _clean(hi), "n": len(values)}


def paired_difference(a: Sequence[float], b: Sequence[float], n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """mean(a - b) over aligned items with an item-resampling bootstrap interval: {"mean", "lo", "hi", "n"}."""
    if len(a) != len(b):
        raise ValueError(f"paired_difference needs aligned lists ({len(a)} vs {len(b)} values)")
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    lo, hi = bootstrap_ci(d, n_boot, seed)
    return {"mean": float(d.mean()) if d.size else None, "lo": _clean(lo), "hi": _clean(hi), "n": int(d.size)}


# -- selective prediction and calibration -----------------------------------------------------------------------------
def risk_coverage(probs: Sequence[float | None], correct: Sequence[bool]) -> list[dict[str, float]]:
    """Items with a probability (None: not answered or no probability), most confident first (stable sort: ties keep
    the input order); point k: coverage = k / len(probs), risk = 1 - accuracy of the k most confident, threshold =
    the k-th probability."""
    given = sorted(((float(p), bool(c)) for p, c in zip(probs, correct, strict=True) if p is not None),
                   key=lambda pc: -pc[0])
    points, right = [], 0
    for k, (p, c) in enumerate(given, 1):
        right += c
        points.append({"coverage": k / len(probs), "risk": 1 - right / k, "threshold": p})
    return points


def aurc(points: Sequence[dict[str, float]]) -> float | None:
    """Area under the risk-coverage step curve from coverage 0 to the last point (None without points); with every
    item covered it is the mean of the risks."""
    if not points:
        return None
    area, prev = 0.0, 0.0
    for p in points:
        area += p["risk"] * (p["coverage"] - prev)
        prev = p["coverage"]
    return area


def ece(probs: Sequence[float | None], correct: Sequence[bool], bins: int = 10) -> float | None:
    """Expected calibration error over the items with a probability: equal-width bins on [0, 1] ([lo, hi), the last
    one closed), sum over bins of (bin share) * |accuracy - mean probability|. None without probabilities."""
    pairs = [(min(max(float(p), 0.0), 1.0), bool(c)) for p, c in zip(probs, correct, strict=True) if p is not None]
    if not pairs:
        return None
    groups: dict[int, list[tuple[float, bool]]] = defaultdict(list)
    for p, c in pairs:
        groups[min(int(p * bins), bins - 1)].append((p, c))
    return sum(len(g) / len(pairs) * abs(sum(c for _, c in g) / len(g) - sum(p for p, _ in g) / len(g))
               for g in groups.values())


# -- the summary ------------------------------------------------------------------------------------------------------
def _answered(row: dict[str, Any]) -> bool:
    return row.get("status") == "done" and (row.get("answer") or {}).get("kind") != "abstain"


def _abstention(row: dict[str, Any]) -> str | None:
    """Why the row has no answer ("failed" for a failed row), None when it is answered."""
    if row.get("status") != "done":
        return "failed"
    ans = row.get("answer") or {}
    if ans.get("kind") == "abstain":
        return str(ans.get("reason") or "abstained")
    return None


def _scores(row: dict[str, Any]) -> tuple[float, float]:
    """(score, token recall): CLOSED correct / OPEN exact match, and OPEN token recall (= score for CLOSED)."""
    if not _answered(row):
        return 0.0, 0.0
    value, gold = (row.get("answer") or {}).get("value"), row.get("gold", "")
    score = float(closed_correct(value, gold, row.get("question") if row.get("answer_type") != "OPEN" else None))
    return score, (token_recall(value, gold) if row.get("answer_type") == "OPEN" else score)


def _group_key(value: Any) -> str:
    return str(value).strip() if value not in (None, "") else "(none)"


def _system_summary(rows: list[dict[str, Any]], n_boot: int, seed: int) -> dict[str, Any]:
    m = lambda v: _metric(v, n_boot, seed)  # noqa: E731
    closed = [r for r in rows if r.get("answer_type") != "OPEN"]
    opened = [r for r in rows if r.get("answer_type") == "OPEN"]
    cov = lambda rs: m([float(_answered(r)) for r in rs])  # noqa: E731
    reasons = Counter(a for r in rows if (a := _abstention(r)) is not None)
    by: dict[str, dict[str, Any]] = {}
    for key in ("answer_type", "content_type", "modality"):
        groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in rows:
            groups[_group_key(r.get(key))].append(r)
        by[key] = {g: {"n": len(rs), "accuracy_all": m([_scores(r)[0] for r in rs]), "coverage": cov(rs)}
                   for g, rs in sorted(groups.items())}
    probs = [((r.get("answer") or {}).get("probability") if _answered(r) else None) for r in closed]
    right = [bool(_scores(r)[0]) for r in closed]
    points = risk_coverage(probs, right)
    tool_calls = [float(r.get("tool_calls") or 0) for r in rows]
    seconds = [float(r.get("seconds") or 0.0) for r in rows]
    total_s = sum(seconds)
    return {
        "n": len(rows),
        "closed": {"n": len(closed), "accuracy_all": m([_scores(r)[0] for r in closed]),
                   "accuracy_answered": m([_scores(r)[0] for r in closed if _answered(r)]), "coverage": cov(closed)},
        "open": {"n": len(opened), "exact_match_all": m([_scores(r)[0] for r in opened]),
                 "exact_match_answered": m([_scores(r)[0] for r in opened if _answered(r)]),
                 "token_recall_all": m([_scores(r)[1] for r in opened]), "coverage": cov(opened)},
        "coverage": cov(rows),
        "abstentions": dict(sorted(reasons.items())),
        "abstention_rate": {k: v / len(rows) for k, v in sorted(reasons.items())},
        "by": by,
        "risk_coverage": [{"coverage": p["coverage"], "risk": p["risk"]} for p in points],
        "aurc": aurc(points),
        "ece": ece(probs, right),
        "n_with_probability": len(points),
        "tool_calls": {"mean": statistics.fmean(tool_calls) if rows else None, "total": sum(tool_calls)},
        "seconds": {"mean": statistics.fmean(seconds) if rows else None,
                    "median": statistics.median(seconds) if rows else None, "total": total_s},
        "questions_per_min": len(rows) / total_s * 60 if total_s > 0 else None,
    }


def summarize(rows: Iterable[dict[str, Any]], systems: list[str], reference_system: str = "agent", n_boot: int = 2000,
              seed: int = 0, notes: list[str] | None = None) -> dict[str, Any]:
    """The eval summary (JSON-able, no NaN): per system metrics with intervals, breakdowns, risk-coverage and
    calibration, cost; paired differences `reference_system - other` over the items both have; notes (the caller's
    `notes` first, e.g. which split the baselines were fitted on)."""
    per: dict[str, dict[str, dict[str, Any]]] = {s: {} for s in systems}
    for r in rows:
        if r.get("system") in per:
            per[r["system"]][str(r.get("item_id"))] = r  # the last row of an item wins
    items = {i for rs in per.values() for i in rs}
    out_notes = list(notes or [])
    out_notes.append("'all' metrics count abstentions and failed items as wrong; 'answered' metrics divide by the answered "
                     "items only")
    out_notes.append(f"intervals: 95 % bootstrap percentile intervals of the mean ({n_boot} resamples of items, seed {seed})")
    for s in systems:
        if len(per[s]) < len(items):
            out_notes.append(f"{s} has rows for {len(per[s])} of {len(items)} items")
    paired: dict[str, dict[str, Any]] = {}
    if reference_system in per:
        ref = per[reference_system]
        for b in systems:
            if b == reference_system:
                continue
            common = [i for i in ref if i in per[b]]
            closed = [i for i in common if ref[i].get("answer_type") != "OPEN"]
            opened = [i for i in common if ref[i].get("answer_type") == "OPEN"]
            paired[f"{reference_system} - {b}"] = {
                "closed_accuracy": paired_difference([_scores(ref[i])[0] for i in closed],
                                                     [_scores(per[b][i])[0] for i in closed], n_boot, seed),
                "open_token_recall": paired_difference([_scores(ref[i])[1] for i in opened],
                                                       [_scores(per[b][i])[1] for i in opened], n_boot, seed)}
    else:
        out_notes.append(f"no paired differences: the reference system {reference_system!r} has no rows")
    return {"n_items": len(items),
            "systems": {s: _system_summary(list(per[s].values()), n_boot, seed) for s in systems},
            "paired": paired, "notes": out_notes}


# -- Markdown ---------------------------------------------------------------------------------------------------------
def fmt_num(x: Any, digits: int = 3) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def fmt_metric(m: dict[str, Any] | None, digits: int = 3) -> str:
    """A metric as text, e.g. "0.620 [0.551, 0.688]" (value [lo, hi]); "—" when undefined."""
    if not m or m.get("value", m.get("mean")) is None:
        return "—"
    v = m.get("value", m.get("mean"))
    return f"{v:.{digits}f} [{fmt_num(m.get('lo'), digits)}, {fmt_num(m.get('hi'), digits)}]"


def headline_rows(summary: dict[str, Any]) -> list[list[str]]:
    """The headline table: one row per system (the columns of HEADLINE_COLUMNS)."""
    rows = []
    for name, s in summary["systems"].items():
        ca = s["closed"]["accuracy_answered"]
        n_abst = sum(s["abstentions"].values())
        rows.append([name, fmt_metric(s["closed"]["accuracy_all"]),
                     f"{fmt_num(ca['value'])} (n={ca['n']})", fmt_metric(s["coverage"]),
                     fmt_metric(s["open"]["exact_match_all"]), fmt_metric(s["open"]["token_recall_all"]),
                     f"{n_abst} of {s['n']}", fmt_num(s["seconds"]["mean"], 1)])
    return rows


HEADLINE_COLUMNS = ["system", "closed acc (all) [95% CI]", "closed acc (answered)", "coverage", "open exact match (all)",
                    "open token recall (all)", "abstentions", "s/question"]


def paired_rows(summary: dict[str, Any]) -> list[list[str]]:
    return [[name, fmt_metric(p["closed_accuracy"]), str(p["closed_accuracy"]["n"]), fmt_metric(p["open_token_recall"]),
             str(p["open_token_recall"]["n"])] for name, p in summary["paired"].items()]


PAIRED_COLUMNS = ["difference", "closed accuracy [95% CI]", "closed n", "open token recall [95% CI]", "open n"]


def group_table(summary: dict[str, Any], key: str) -> tuple[list[str], list[list[str]]]:
    """(columns, rows) of the item score (closed accuracy / open exact match, all items) per group of `key` per system."""
    systems = list(summary["systems"])
    groups = sorted({g for s in summary["systems"].values() for g in s["by"].get(key, {})})
    rows = []
    for g in groups:
        cells = [g]
        for name in systems:
            e = summary["systems"][name]["by"].get(key, {}).get(g)
            cells.append(f"{fmt_num(e['accuracy_all']['value'])} (n={e['n']})" if e else "—")
        rows.append(cells)
    return [key, *systems], rows


def abstention_table(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    systems = list(summary["systems"])
    reasons = sorted({r for s in summary["systems"].values() for r in s["abstentions"]})
    rows = [[r, *(f"{summary['systems'][n]['abstentions'].get(r, 0)} ({summary['systems'][n]['abstention_rate'].get(r, 0):.1%})"
                  for n in systems)] for r in reasons]
    return ["reason", *systems], rows


def calibration_rows(summary: dict[str, Any]) -> list[list[str]]:
    return [[n, str(s["n_with_probability"]), fmt_num(s["ece"]), fmt_num(s["aurc"]),
             fmt_num(s["tool_calls"]["mean"], 2), fmt_num(s["questions_per_min"], 2)] for n, s in summary["systems"].items()]


CALIBRATION_COLUMNS = ["system", "closed answers with probability", "ECE", "AURC", "tool calls/question", "questions/min"]


def _md_table(columns: list[str], rows: list[list[str]]) -> str:
    esc = lambda c: str(c).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(esc(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) if rows else lines[0] + "\n" + lines[1] + "\n| (none) |"


def summary_markdown(summary: dict[str, Any], title: str = "dxagent eval") -> str:
    """The summary as Markdown: headline, calibration, paired differences, per content type and modality, notes."""
    parts = [f"# {title}", "", f"{summary['n_items']} items. Research use only.", "",
             "Abstentions and failed items count as wrong in 'all'; 'answered' divides by the answered items only. "
             "Intervals are 95 % bootstrap percentile intervals of the mean."]
    if {"prior", "majority"} & set(summary["systems"]):
        parts.append("'prior' (question-only answer prior) and 'majority' (most frequent answer per answer type) never "
                     "see the image; they are fitted on the reference split named in the notes, never on these items.")
    parts += ["", "## Headline", "", _md_table(HEADLINE_COLUMNS, headline_rows(summary)),
              "", "## Calibration and cost (closed questions)", "", _md_table(CALIBRATION_COLUMNS, calibration_rows(summary)),
              "", "## Paired differences (same items)", "", _md_table(PAIRED_COLUMNS, paired_rows(summary))]
    for key, name in (("content_type", "content type"), ("modality", "modality")):
        parts += ["", f"## Accuracy by {name} (closed accuracy / open exact match, all items)", "",
                  _md_table(*group_table(summary, key))]
    parts += ["", "## Abstentions", "", _md_table(*abstention_table(summary)), "", "## Notes", ""]
    parts += [f"- {n}" for n in summary["notes"]]
    return "\n".join(parts) + "\n"


# -- HTML -------------------------------------------------------------------------------------------------------------
_SVG_ID = re.compile(r'\bid="([^"]+)"')
_SVG_REF = re.compile(r'(href="#|url\(#)([^")]+)')


def _svg(fig: Any, prefix: str) -> str:
    """The figure as an inline <svg> element: no prolog, no metadata, no namespace URIs, ids prefixed (unique)."""
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None, "Creator": None, "Format": None,
                                                                   "Type": None})
    text = buf.getvalue()
    text = text[max(0, text.find("<svg")):]
    text = re.sub(r"<metadata>.*?</metadata>", "", text, flags=re.S)
    text = re.sub(r'\s+xmlns(:\w+)?="[^"]*"', "", text)
    text = _SVG_ID.sub(lambda mt: f'id="{prefix}-{mt.group(1)}"', text)
    return _SVG_REF.sub(lambda mt: f"{mt.group(1)}{prefix}-{mt.group(2)}", text)


def _figure(width: float, height: float) -> tuple[Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", name)


def risk_coverage_svg(summary: dict[str, Any]) -> str:
    """One line per system that gave probabilities (group id "rc-<system>"); the others listed in the legend."""
    import matplotlib

    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "dxagent"}):
        fig, ax = _figure(6.4, 4.0)
        for name, s in summary["systems"].items():
            pts = s["risk_coverage"]
            if pts:
                (line,) = ax.plot([0.0, *(p["coverage"] for p in pts)], [pts[0]["risk"], *(p["risk"] for p in pts)],
                                  drawstyle="steps-pre", marker="." if len(pts) <= 60 else None,
                                  label=f"{name} (AURC {fmt_num(s['aurc'])})")
                line.set_gid(f"rc-{_slug(name)}")
            else:
                ax.plot([], [], ls="none", label=f"{name}: no probabilities")
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="coverage (closed questions answered)", ylabel="risk (1 - accuracy)",
               title="Risk-coverage, closed questions")
        ax.grid(alpha=0.3)
        if summary["systems"]:
            ax.legend(loc="upper left", fontsize=8)
        return _svg(fig, "rc")


def group_bars_svg(summary: dict[str, Any], key: str, prefix: str) -> str:
    """Grouped bars: the item score (closed accuracy / open exact match, all items) per group of `key`, one bar per
    system, with its interval."""
    import matplotlib

    systems = list(summary["systems"])
    groups = sorted({g for s in summary["systems"].values() for g in s["by"].get(key, {})})
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "dxagent"}):
        fig, ax = _figure(max(6.4, 0.5 * len(groups) * max(1, len(systems)) + 2), 4.0)
        width = 0.8 / max(1, len(systems))
        for j, name in enumerate(systems):
            xs, ys, err = [], [], [[], []]
            for i, g in enumerate(groups):
                e = summary["systems"][name]["by"].get(key, {}).get(g)
                if e and e["accuracy_all"]["value"] is not None:
                    m = e["accuracy_all"]
                    xs.append(i - 0.4 + width * (j + 0.5))
                    ys.append(m["value"])
                    err[0].append(m["value"] - m["lo"])
                    err[1].append(m["hi"] - m["value"])
            ax.bar(xs, ys, width, yerr=err if xs else None, capsize=2, label=name)
        ax.set_xticks(range(len(groups)), [f"{g}" for g in groups], rotation=30 if len(groups) > 4 else 0, ha="right"
                      if len(groups) > 4 else "center")
        ax.set(ylim=(0, 1.05), ylabel="accuracy, all items", title=f"By {key.replace('_', ' ')}"
               + ("" if groups else " (no items)"))
        ax.grid(axis="y", alpha=0.3)
        if systems:
            ax.legend(fontsize=8)
        return _svg(fig, prefix)


DISCLAIMER = ("Research use only. dxagent is not a medical device; these figures describe automated answers on a "
              "benchmark and must not be used for diagnosis or treatment decisions.")


def write_eval_html(summary: dict[str, Any], out_path: Path, title: str = "dxagent eval") -> Path:
    """One self-contained HTML page (inline CSS and SVG, no script, no external reference) from
    agent/templates/eval.html.j2; returns its path."""
    from jinja2 import Environment, PackageLoader
    from markupsafe import Markup

    env = Environment(loader=PackageLoader("agent", "templates"), autoescape=True)
    html = env.get_template("eval.html.j2").render(
        title=title, summary=summary, disclaimer=DISCLAIMER,
        headline=(HEADLINE_COLUMNS, headline_rows(summary)), calibration=(CALIBRATION_COLUMNS, calibration_rows(summary)),
        paired=(PAIRED_COLUMNS, paired_rows(summary)), by_content=group_table(summary, "content_type"),
        by_modality=group_table(summary, "modality"), abstentions=abstention_table(summary),
        baselines=bool({"prior", "majority"} & set(summary["systems"])),
        no_prob=[n for n, s in summary["systems"].items() if not s["risk_coverage"]],
        rc_svg=Markup(risk_coverage_svg(summary)),
        content_svg=Markup(group_bars_svg(summary, "content_type", "bc")),
        modality_svg=Markup(group_bars_svg(summary, "modality", "bm")))
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(html, encoding="utf-8")
    return out_path
