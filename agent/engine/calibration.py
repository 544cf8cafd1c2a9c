"""What an answer's probability means: how often answers reached the same way were right on held-out questions.

Every closed answer (yes/no, choice, count) has a *route* - the tool and the kind of claim it was read from
("organ_segment:absent", "inspect_image:modality:classifier", "cardiothoracic_ratio:rule", "llm:yes_no") - and, where
a tool or the model gave one, a raw probability. `scripts/fit_answer_calibration.py` counts, per route and raw
probability band (none, < 0.9, >= 0.9), how many answers were right in `dxagent eval` runs on a split the reported
figures never use (SLAKE train), and writes `answer_calibration.json` beside this file. Here that table turns an
answer's raw probability into the route's smoothed accuracy ((right + 1) / (n + 2)), so a segmenter's "absent" or
a DICOM tag's modality - which carry no probability of their own - get one, and a classifier's 0.98 becomes what
such answers were worth. An answer whose calibrated probability is under `MIN_PROBABILITY` is withheld as a
`low_confidence` abstention: a wrong answer at high probability is the worst thing the product can do. Routes
seen fewer than `MIN_N` times keep their raw probability (and are not withheld); the basis says which applied.

Open answers named as a phrase (the organ a segmenter names, the body region, modality or plane the study classifier
gives; not a location nor a measurement, see OPEN_KINDS) have routes of their own in the table, prefixed `open:`
(`route_key`): their rate is how often such answers matched the reference exactly
(`scripts/fit_answer_calibration.py --open`), not a yes/no's. An answer of a question-answering tool (the VQA
expert) keeps the probability its own calibration gave.
"""

from __future__ import annotations

import contextvars
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

TABLE = Path(__file__).with_name("answer_calibration.json")
MIN_N = 12  # answers of a route (and band) before its accuracy is trusted
CLOSED = ("yes_no", "choice", "count")
OPEN_PREFIX = "open:"  # an open answer's route in the table (see the module docstring)
# the open answers calibrated: a phrase (an organ, a region, a modality, a plane) is right when it names the reference's
# term; a location's exact match counts how a benchmark words places ("Upper Left" on the picture for the patient's
# right), not whether the place is right ("where is the liver?" -> "right" from the masks matched SLAKE 0.38 of the
# time), and a measurement has no reference to match: those keep the probability their tool gave (none, mostly)
OPEN_KINDS = ("phrase",)


def route_key(kind: str, route: str) -> str | None:
    """The table's route for an answer of this kind reached this way: an open answer's apart from a closed one's; None
    for a kind that is not calibrated (OPEN_KINDS)."""
    return route if kind in CLOSED else OPEN_PREFIX + route if kind in OPEN_KINDS else None


def band(p: float | None) -> str:
    return "none" if p is None else ("hi" if p >= 0.9 else "lo")


def keys(route: str, raw: float | None) -> tuple[str, str]:
    """The table's keys for an answer, most specific first: route and raw-probability band, then the route."""
    return f"{route}|{band(raw)}", route


@lru_cache(maxsize=1)
def table() -> dict[str, Any]:
    """The fitted table; empty (raw probabilities, nothing withheld) when absent or DXAGENT_CALIBRATION=off (the
    fitting runs themselves)."""
    if os.environ.get("DXAGENT_CALIBRATION", "").lower() == "off":
        return {}
    try:
        return json.loads(TABLE.read_text())
    except (OSError, ValueError):
        return {}


CAREFUL = "careful"  # the operating point fitted for at most `target_error` wrong answers among those given
# (threshold, threshold for new wording) while a replay or a served run answers under given ones
_OVERRIDE: contextvars.ContextVar[tuple[float, float] | None] = contextvars.ContextVar("dxagent_min_probability",
                                                                                      default=None)
NEW_WORDING_BELOW = 0.999  # a question less similar than this to every question the table was measured on is worded anew


def parse_threshold(value: str | float | None) -> float | None:
    """A withholding threshold as given by a user: a number in [0, 1], or "careful" (the fitted table's
    `min_probability_at_target_error`: on held-out SLAKE train, at most 10 % of the answers given were wrong); None for
    none given. ValueError, saying what is accepted, for anything else."""
    if value is None or str(value).strip() == "":
        return None
    text = str(value).strip().lower()
    if text == CAREFUL:
        return float(table().get("min_probability_at_target_error", table().get("min_probability", 0.0)))
    try:
        p = float(text)
    except ValueError:
        p = float("nan")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"the answer threshold must be a probability between 0 and 1 or {CAREFUL!r}, not {value!r}")
    return p


@contextmanager
def threshold(p: float | None, p_new_wording: float | None = None) -> Iterator[None]:
    """Within: `p` is the withholding threshold, `p_new_wording` the one for questions worded anew (default: `p`; a
    replay uses the ones its run recorded; a run recorded before the second existed answered every question under
    `p`). None: the defaults."""
    token = _OVERRIDE.set(None if p is None else (p, p if p_new_wording is None else p_new_wording))
    try:
        yield
    finally:
        _OVERRIDE.reset(token)


def min_probability(new_wording: bool = False) -> float:
    """The withholding threshold: a replay's recorded one, else DXAGENT_MIN_PROBABILITY (a probability, or "careful";
    0 answers everything, calibrated; the user's choice holds for every question), else the fitted default:
    `min_probability`, or for a question worded unlike those the table was measured on (`new_wording`)
    `min_probability_new_wording` (the table's `new_wording` says how it was chosen). A value that is neither is
    ignored here (the CLI refuses it in one line before any run)."""
    if (over := _OVERRIDE.get()) is not None:
        return over[1] if new_wording else over[0]
    try:
        env = parse_threshold(os.environ.get("DXAGENT_MIN_PROBABILITY"))
    except ValueError:
        env = None
    if env is not None:
        return env
    t = table()
    base = float(t.get("min_probability", 0.0))
    return float(t.get("min_probability_new_wording", base)) if new_wording else base


def new_wording(similarity: float | None) -> bool:
    """Whether a question with this similarity to the nearest calibration question (Question.wording) is worded anew;
    False where no tool could tell (None)."""
    return similarity is not None and similarity < NEW_WORDING_BELOW


def lookup(route: str, raw: float | None) -> tuple[float | None, int, str]:
    """(calibrated probability or None, the answers it rests on, which key) for a route and raw probability."""
    routes = table().get("routes", {})
    for key in keys(route, raw):
        cell = routes.get(key)
        if cell and cell.get("n", 0) >= MIN_N:
            return round((cell["right"] + 1) / (cell["n"] + 2), 4), int(cell["n"]), key
    return None, 0, ""


ANSWER_THRESHOLD = 0.5  # the stated policy: an answer more likely wrong than right is withheld (see fit)


def fit(rows: list[dict[str, Any]], target_error: float = 0.10, threshold: float | None = None) -> dict[str, Any]:
    """The table from eval rows ({"route", "raw_probability", "correct"}). `min_probability` is `threshold` when given
    (scripts/fit_answer_calibration.py passes ANSWER_THRESHOLD: with the VQA expert in the answer step, thresholds
    0 / 0.5 / 0.6 / 0.7 / 0.777 answered 0.99 / 0.92 / 0.88 / 0.83 / 0.78 of 961 held-out train items, right 0.83 /
    0.87 / 0.88 / 0.89 / 0.90 of the time (scripts/choose_fusion.py): 0.5 withholds what is more likely wrong than
    right; above it coverage falls faster than accuracy rises);
    otherwise midway between the highest calibrated level left out and the lowest kept at the lowest threshold where
    the answers kept on these rows are wrong at most `target_error` of the time (0 when none is needed), which is
    always recorded as `min_probability_at_target_error`."""
    routes: dict[str, dict[str, int]] = {}
    for r in rows:
        for key in keys(r["route"], r.get("raw_probability")):
            cell = routes.setdefault(key, {"n": 0, "right": 0})
            cell["n"] += 1
            cell["right"] += int(bool(r["correct"]))
    out = {"routes": routes, "n": len(rows), "target_error": target_error}
    chosen = threshold
    cal = []
    for r in rows:
        for key in keys(r["route"], r.get("raw_probability")):
            cell = routes[key]
            if cell["n"] >= MIN_N:
                cal.append(((cell["right"] + 1) / (cell["n"] + 2), bool(r["correct"])))
                break
        else:
            cal.append((r.get("raw_probability") if r.get("raw_probability") is not None else 1.0, bool(r["correct"])))
    threshold = target_threshold(cal, target_error)
    kept = [c for p, c in cal if p >= threshold]
    out["min_probability_at_target_error"] = round(threshold, 4)
    if chosen is not None:
        threshold = chosen
        kept = [c for p, c in cal if p >= threshold]
    out["min_probability"] = round(threshold, 4)
    out["fit_figures"] = {"answered": len(kept), "of": len(cal),
                          "error_answered": round(sum(not c for c in kept) / len(kept), 4) if kept else None}
    return out


def target_threshold(cal: list[tuple[float, bool]], target_error: float) -> float:
    """The lowest threshold at which the (probability, right) rows kept (probability >= it) are wrong at most
    `target_error` of the time - midway between the highest level left out and the lowest kept, as any threshold
    between them keeps the same rows; 0 when none is needed, 1.01 (none kept) when none meets it."""
    levels = sorted({p for p, _ in cal})
    for i, t in enumerate([0.0, *levels]):
        kept = [c for p, c in cal if p >= t]
        if kept and sum(not c for c in kept) / len(kept) <= target_error:
            return t if i <= 1 else (levels[i - 2] + t) / 2
    return 1.01
