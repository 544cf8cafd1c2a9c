"""The rethink step's critic: weighs the evidence after each act step and picks the route.

It is deterministic and explainable, so every routing decision can be audited:
- conflicts: two tools' findings disagree (one says a finding is present, another absent); a classifier's
  probability disagrees with another tool's yes/no on the same label (measured present but probability below
  0.2, or measured absent but probability 0.5 or more); or the same measurement on the same view differs by
  more than 20 % between tools;
- answered: successful evidence addresses the question's subject (agent/engine/answer.py: a finding with that label, a
  measurement of that quantity, a classifier's probability for it, a study attribute such as the modality); a
  measurement of something else never answers it. When no applicable tool can address the subject, the loop
  stops at once (the answer step abstains with `no_applicable_tool`);
- a closer look: a finding with a small bounding box (not yet segmented and measured) that no crop view
  covers yet suggests `crop_zoom`;
- chaining: a detector's boxes that no segmenter has used yet suggest a box-prompted segmenter
  (`sam_segment boxes_from=E#`) when one applies;
- budget: tool calls and wall-clock seconds left; three failures in a row stop the loop.
The route goes back to think only for something new (a new conflict, suggestion or failure), or while
the question is unanswered and budget remains.
"""

from __future__ import annotations

import json
import re
from typing import Any

from agent.core.state import CaseState, Critique, Evidence
from agent.core.tool import FindingDraft, Tool
from agent.core.vocab import label_key
from agent.engine.addressing import addressed_by, findings_of, understood

__all__ = ["critique", "findings_of", "label_key", "question_topics", "tools_for_question"]

# a classifier's probability against another tool's yes/no on the same label
PROB_LOW, PROB_HIGH = 0.2, 0.5
# box-prompted segmenters that take a detector's boxes by evidence id
BOX_SEGMENTERS = ("sam_segment",)
MAX_CROP_SUGGESTIONS = 3  # "a closer look with crop_zoom" suggestions a critique makes, the first findings first


def question_topics(question: str, tools: dict[str, Tool], names: list[str]) -> list[str]:
    q = " " + re.sub(r"[^a-z0-9]+", " ", question.lower()) + " "
    found = {t for n in names if n in tools for t in tools[n].topics if f" {t} " in q}
    return sorted(found)


def tools_for_question(question: str, tools: dict[str, Tool], names: list[str]) -> list[str]:
    """The tools among `names` whose topics the question names, most matched topics first (ties: by name)."""
    q = " " + re.sub(r"[^a-z0-9]+", " ", question.lower()) + " "
    hits = {n: sum(f" {t} " in q for t in tools[n].topics) for n in names if n in tools}
    return [n for n, k in sorted(hits.items(), key=lambda kv: (-kv[1], kv[0])) if k > 0]


def critique(state: CaseState, tools: dict[str, Tool], now: float | None = None) -> Critique:
    ok = [e for e in state.evidence if e.status == "ok"]
    drafts = [(e, f) for e in ok for f in findings_of(e, state, tools)]

    conflicts: list[str] = []
    claims: dict[str, list[tuple[str, bool]]] = {}
    for e, f in drafts:
        if f.present is not None:
            claims.setdefault(label_key(f.label), []).append((e.id, f.present))
    for label, votes in sorted(claims.items()):
        yes = [i for i, p in votes if p]
        no = [i for i, p in votes if not p]
        if yes and no:
            conflicts.append(f"{label}: present per {', '.join(yes)}, absent per {', '.join(no)}")
    conflicts += classifier_conflicts(drafts, tools)
    values: dict[tuple[str, str, str], list[tuple[str, float]]] = {}
    for e, f in drafts:
        for m in f.measurements:
            values.setdefault((e.args.get("view", "V1"), m.name, m.unit), []).append((e.id, m.value))
    for (view, name, unit), vals in sorted(values.items()):
        tools_seen = {state.evidence_by_id(i).tool for i, _ in vals}
        lo, hi = min(v for _, v in vals), max(v for _, v in vals)
        if len(tools_seen) > 1 and hi > 0 and (hi - lo) / hi > 0.2:
            conflicts.append(f"{name} on {view} ranges {lo:.3g}-{hi:.3g} {unit} across {', '.join(i for i, _ in vals)}")

    topics = question_topics(state.question, tools, state.applicable_tools)
    q, addressing = understood(state, tools)
    answered_by = sorted(addressed_by(q, state, tools), key=_eid)
    answered = bool(answered_by)

    # a detector's boxes go to a box-prompted segmenter first; those boxes then need no crop suggestion
    suggestions, chained = chain_suggestions(state, tools)
    crops = [v for v in state.views if v.provenance.get("tool") == "crop_zoom"]
    closer: list[str] = []
    if "crop_zoom" in state.applicable_tools:
        for e, f in drafts:
            if e.id in chained or any(m.name in ("area", "volume") for m in f.measurements):
                continue  # boxes bound for a segmenter, or a region already segmented and measured
            view_id = e.args.get("view", "V1")
            view = state.view(view_id)
            if f.bbox is None or view.parent is not None:
                continue
            r0, c0, r1, c1 = f.bbox
            frac = max(0.0, (r1 - r0) * (c1 - c0)) / float(view.shape[-2] * view.shape[-1] if view.photometric != "RGB"
                                                          else view.shape[0] * view.shape[1])
            if 0 < frac < 0.1 and not any(c.parent == view_id for c in crops):
                box = [int(r0), int(c0), int(r1), int(c1)]
                closer.append(f"{f.label} from {e.id} is small ({frac:.1%} of {view_id}): a closer look with "
                              f"crop_zoom view={view_id} bbox={box}")
    # the first few, in the evidence's order (a detector's best first): a blob detector's 30 small candidates made 30
    # suggestions, ~550 tokens the planner prefilled before its next decision (~8 s with the embedded model)
    suggestions += closer[:MAX_CROP_SUGGESTIONS]
    if len(closer) > MAX_CROP_SUGGESTIONS:
        suggestions.append(f"{len(closer) - MAX_CROP_SUGGESTIONS} more small findings could be cropped the same way")
    last = state.evidence[-1] if state.evidence else None
    if last is not None and last.status in ("failed", "refused"):
        # the reason is in the evidence line just above: the planner's prompt does not carry it twice
        suggestions.append(f"{last.id} {last.tool} {last.status} (the reason is in its evidence line); choose another "
                           "tool or other arguments")
    repeats = sum(e.status == "skipped" for e in state.evidence)
    if last is not None and last.status == "skipped" and repeats == 1:
        suggestions.append(f"{last.id} repeated an earlier call: its result is already in the evidence; call another "
                           "tool or answer")

    steps_left = state.budget.max_steps - state.tool_steps
    secs_left = state.budget.max_wall_s - state.budget.elapsed(now)
    fails = 0
    for e in reversed(state.evidence):
        if e.status == "ok":
            break
        fails += 1

    seen = {x for c in state.critiques for x in c.conflicts + c.suggestions}
    new_items = [x for x in conflicts + suggestions if x not in seen]
    if not addressing:
        route, why = "report", f"no applicable tool can address {q.subject or 'the question'}"
    elif steps_left <= 0:
        route, why = "report", "tool-call budget spent"
    elif secs_left <= 0:
        route, why = "report", "wall-clock budget spent"
    elif fails >= 3:
        route, why = "report", "three tool calls in a row failed"
    elif last is not None and last.status == "skipped" and repeats >= 2:
        route, why = "report", f"{last.id} repeated an earlier call again: nothing new can be learned"
    elif last is not None and last.status == "ok" and not answered and \
            sum(e.tool == last.tool and e.status == "ok" for e in state.evidence) >= SAME_TOOL_MAX:
        route, why = "report", (f"{last.id} was {last.tool}'s call no. {SAME_TOOL_MAX} and the question is still "
                                "not answered: more of the same will not answer it")
    elif repeated_retrieval(state, tools) and not new_items:
        route, why = "report", f"{last.id} {last.tool} retrieved nothing that earlier retrieval had not"
    elif new_items:
        route, why = "think", f"{len(new_items)} new conflict(s)/suggestion(s) to weigh"
    elif answered:
        route, why = "report", f"evidence about {q.subject or 'the question'}: " + ", ".join(answered_by)
    else:
        route, why = "think", "the question is not answered yet"
    return Critique(step=state.tool_steps, conflicts=conflicts, answered=answered, answered_by=answered_by,
                    question_topics=topics, suggestions=suggestions,
                    budget_left={"tool_calls": steps_left, "seconds": round(max(0.0, secs_left), 1)},
                    route=route, why=why)


SAME_TOOL_MAX = 3  # successful calls of one tool (other arguments, other views) after which the loop stops unanswered


def repeated_retrieval(state: CaseState, tools: dict[str, Tool]) -> bool:
    """The last call was retrieval (kind "retrieve") whose results (their source or case ids) an earlier call of the
    same tool had already returned: asking again with other words found nothing new."""
    last = state.evidence[-1] if state.evidence else None
    if last is None or last.status != "ok" or tools.get(last.tool, _NoTool).kind != "retrieve":
        return False

    def found(e: Evidence) -> set[str]:
        items = next((v for v in (e.output or {}).values() if isinstance(v, list) and v), [])
        keys = [next((x[k] for k in ("source_id", "case_id", "id") if k in x), x) if isinstance(x, dict) else x
                for x in items]
        return {json.dumps(k, sort_keys=True, default=str) for k in keys}

    mine = found(last)
    return any(e.tool == last.tool and e.status == "ok" and found(e) >= mine for e in state.evidence[:-1])


def classifier_conflicts(drafts: list[tuple[Evidence, FindingDraft]], tools: dict[str, Tool]) -> list[str]:
    """A classifier's probability that disagrees with another tool's yes/no (a measurement, a detector) on the same
    label: present but probability < PROB_LOW, or absent but probability >= PROB_HIGH."""
    probs: dict[str, list[tuple[str, float]]] = {}
    claims: dict[str, list[tuple[str, bool]]] = {}
    for e, f in drafts:
        key = label_key(f.label)
        if f.probability is not None and f.present is None and tools.get(e.tool, _NoTool).kind == "classify":
            probs.setdefault(key, []).append((e.id, f.probability))
        elif f.present is not None:
            claims.setdefault(key, []).append((e.id, f.present))
    out = []
    for key in sorted(set(probs) & set(claims)):
        for cid, present in claims[key]:
            for pid, p in probs[key]:
                if cid == pid:
                    continue
                if present and p < PROB_LOW:
                    out.append(f"{key}: present per {cid}, but {pid} gives it probability {p:.2f} (< {PROB_LOW})")
                elif not present and p >= PROB_HIGH:
                    out.append(f"{key}: absent per {cid}, but {pid} gives it probability {p:.2f} (>= {PROB_HIGH})")
    return out


def pending_chains(state: CaseState, tools: dict[str, Tool]) -> list[tuple[Evidence, int, str, dict[str, Any]]]:
    """Detector evidence with boxes that no box-prompted segmenter has taken yet (a call of any outcome takes them):
    (the evidence, its box count, the segmenter, the call's arguments)."""
    segs = [n for n in BOX_SEGMENTERS if n in state.applicable_tools]
    if not segs:
        return []
    tried = {e.args.get("boxes_from") for e in state.evidence if e.tool in segs}
    out = []
    for e in state.evidence:
        if e.status != "ok" or tools.get(e.tool, _NoTool).kind != "detect" or e.id in tried:
            continue
        n = sum(f.bbox is not None for f in findings_of(e, state, tools))
        if n:
            view = e.args.get("view", "V1")
            out.append((e, n, segs[0], {"boxes_from": e.id} | ({"view": view} if view != "V1" else {})))
    return out


def chain_suggestions(state: CaseState, tools: dict[str, Tool]) -> tuple[list[str], set[str]]:
    """A detector's boxes on a view that no box-prompted segmenter has taken yet: the suggestions, and the ids of the
    detector evidence they name or a segmenter already took."""
    segs = [n for n in BOX_SEGMENTERS if n in state.applicable_tools]
    ids = {u for e in state.evidence if e.tool in segs and isinstance(u := e.args.get("boxes_from"), str)}
    out = []
    for e, n, seg, args in pending_chains(state, tools):
        ids.add(e.id)
        out.append(f"{e.id} {e.tool} found {n} box(es) on {e.args.get('view', 'V1')}; to segment and measure them "
                   "call " + json.dumps({"tool": seg, "args": args}))
    return out, ids


def _eid(eid: str) -> int:
    return int(eid[1:]) if eid[1:].isdigit() else 0


class _NoTool:
    topics: tuple[str, ...] = ()
    kind = "none"
