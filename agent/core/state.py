"""Typed case state: everything the graph knows about one case, as pydantic models.

The state stays small and JSON-serialisable so the LangGraph checkpointer can persist it after
every node: pixel arrays live in the content-addressed artifact store and views refer to them by
sha256 (see agent/store/artifacts.py).
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, Field, model_serializer

from agent.core.question import Question

Spacing = tuple[float, ...] | Literal["unknown"]


class ArtifactRef(BaseModel):
    """A file in the artifact store (mask, overlay, crop pixels), named by its sha256."""

    sha256: str
    kind: str  # "pixels", "mask", "overlay", ...
    media_type: str  # "application/x-npy", "image/png", ...
    path: str  # relative to the artifact root
    description: str = ""
    # masks only: what each label value means ({1: "liver", 2: "spleen"}; names as agent/core/vocab.py writes them),
    # the view whose pixel grid the mask is on, and for a 2D mask of a volume the slice it lies in. DICOM SEG
    # (agent/app/dicom_out.py) needs all three; empty/None for pixels and overlays.
    legend: dict[int, str] = Field(default_factory=dict)
    view: str | None = None
    slice_index: int | None = None

    @model_serializer(mode="wrap")
    def _drop_unset_mask_fields(self, handler: Any) -> dict[str, Any]:
        """Pixels and overlays serialise as before the mask fields existed (recorded traces replay unchanged)."""
        data = handler(self)
        for key in ("legend", "view", "slice_index"):
            if data.get(key) in (None, {}):
                data.pop(key, None)
        return data


SPACING_UNKNOWN_NOTE = "pixel spacing unknown: sizes are in pixels"


class ImageView(BaseModel):
    """One image the tools can act on: the loaded study or a derived view (crop, window)."""

    id: str  # "V1", "V2", ...
    pixels: ArtifactRef  # .npy in the artifact store; (H, W), (H, W, 3) or (Z, H, W)
    shape: tuple[int, ...]
    dtype: str
    ndim_spatial: int  # 2 or 3
    spacing_mm: Spacing = "unknown"  # (row, col) or (z, row, col) in mm, or "unknown"
    modality: str = "OT"  # DICOM modality code: CT, MR, US, CR, DX, XA, OT, ...
    modality_source: str = "unknown"  # "dicom", "user", "classifier" (agent/analysis/study.py), "guess" (pixel rules)
    body_part: str = "unknown"
    photometric: str = "MONOCHROME2"  # or "RGB"
    metadata: dict[str, Any] = Field(default_factory=dict)  # de-identified only
    parent: str | None = None  # the view this one was derived from
    provenance: dict[str, Any] = Field(default_factory=dict)  # how it was derived (tool, args)
    source_sha256: str = ""  # sha256 of the input file(s)

    @property
    def spacing_known(self) -> bool:
        return self.spacing_mm != "unknown"

    def plane_spacing(self) -> tuple[float, float]:
        """The in-plane (row, column) pixel spacing in mm, or (1.0, 1.0) when it is unknown (sizes are then in px)."""
        if not self.spacing_known:
            return 1.0, 1.0
        row, col = (float(s) for s in self.spacing_mm[-2:])
        return row, col

    @property
    def length_unit(self) -> str:
        """"mm" when the pixel spacing is known, else "px" (areas: this + "2")."""
        return "mm" if self.spacing_known else "px"

    @property
    def modality_inferred(self) -> bool:
        """The modality was inferred from the pixels (study classifier or pixel rules), not read or given."""
        return self.modality_source in ("classifier", "guess")

    def modality_alternatives(self, floor: float = 0.1) -> list[tuple[str, float]]:
        """The study classifier's likely modalities, best first (probability >= floor)."""
        probs = ((self.metadata.get("study") or {}).get("probabilities") or {}).get("modality") or {}
        return sorted(((m, float(p)) for m, p in probs.items() if p >= floor), key=lambda kv: -kv[1])

    @property
    def modality_uncertain(self) -> bool:
        """An inferred modality whose probability is under 0.6 (agent/analysis/study.py UNCERTAIN)."""
        conf = self.metadata.get("modality_confidence")
        return self.modality_inferred and isinstance(conf, int | float) and conf < 0.6


class Evidence(BaseModel):
    """The record of one tool call. Findings in the report cite these ids."""

    id: str  # "E1", "E2", ...
    tool: str
    tool_version: str
    args: dict[str, Any]
    status: Literal["ok", "failed", "refused", "skipped"]
    output: dict[str, Any] | None = None
    artifacts: list[ArtifactRef] = Field(default_factory=list)
    new_views: list[str] = Field(default_factory=list)
    confidence: float | None = None
    duration_s: float = 0.0
    error: str | None = None
    step: int = 0


class Decision(BaseModel):
    """What the planner chose: call a tool, or answer."""

    action: Literal["call", "answer"]
    tool: str | None = None
    args: dict[str, Any] = Field(default_factory=dict)
    reason: str = ""


class Critique(BaseModel):
    """What the rethink node concluded after the last act step."""

    step: int
    conflicts: list[str] = Field(default_factory=list)
    answered: bool = False
    answered_by: list[str] = Field(default_factory=list)  # evidence ids
    question_topics: list[str] = Field(default_factory=list)
    suggestions: list[str] = Field(default_factory=list)  # e.g. a region worth a closer look
    budget_left: dict[str, float] = Field(default_factory=dict)
    route: Literal["think", "report"] = "think"
    why: str = ""


AbstainReason = Literal["no_applicable_tool", "evidence_does_not_address", "tools_conflict", "input_unreadable",
                        "budget_spent", "planner_failed", "low_confidence"]


class Answer(BaseModel):
    """The answer to the question, composed from the evidence (agent/engine/answer.py), or an abstention with its reason.

    `probability` is the probability that `value` is right, where one exists: a classifier's output, the model's
    token probabilities over the allowed values, or the modality guess's confidence; None where nothing measured
    one (a value read from a DICOM tag, a measurement)."""

    kind: Literal["yes_no", "choice", "count", "measurement", "location", "phrase", "abstain"]
    value: str | float | int | None = None
    unit: str | None = None
    probability: float | None = None
    evidence_ids: list[str] = Field(default_factory=list)
    basis: str = ""  # one line: how the value follows from the evidence
    reason: AbstainReason | None = None  # abstentions only
    needed: str = ""  # abstentions: what would be needed to answer
    method: str = ""  # "evidence" (read from the evidence), "llm" (a constrained choice), "rules" (no evidence)
    # how the value was reached, the key of its calibration (agent/engine/calibration.py): "organ_segment:absent",
    # "inspect_image:modality:classifier", "llm:yes_no", ...
    route: str = ""
    text: str = ""  # the plain-text rendering (Markdown, chat)

    @property
    def answered(self) -> bool:
        return self.kind != "abstain"


class StepLog(BaseModel):
    step: int
    node: str
    summary: str
    t: float = Field(default_factory=time.time)


class Budget(BaseModel):
    max_steps: int = 6  # tool calls
    max_wall_s: float = 300.0
    max_invalid_decisions: int = 2  # re-asks of the planner per think step
    route: bool = True  # a question about a named subject goes straight to a tool that addresses it (agent/engine/graph.py)
    started_at: float | None = None

    def elapsed(self, now: float | None = None) -> float:
        return 0.0 if self.started_at is None else (time.time() if now is None else now) - self.started_at


class Turn(BaseModel):
    """One finished question-and-answer of a chat thread (agent/app/chat.py)."""

    turn: int
    question: str
    answer: str
    outcome: str = ""
    evidence_ids: list[str] = Field(default_factory=list)


class CaseInput(BaseModel):
    """What the user handed in: image paths plus optional hints."""

    paths: list[str]
    modality: str | None = None  # user override
    body_part: str | None = None


class CaseState(BaseModel):
    """The LangGraph state of one case."""

    case_id: str = ""
    run_id: str = ""
    inputs: CaseInput
    question: str = "Describe the main findings and quantify them."
    question_info: Question | None = None  # the question as understood (agent/core/question.py), set at intake
    addressing_tools: list[str] = Field(default_factory=list)  # applicable tools that can address its subject
    answer: Answer | None = None  # set by the answer step
    clinical_context: str = ""
    views: list[ImageView] = Field(default_factory=list)
    applicable_tools: list[str] = Field(default_factory=list)
    model_lines: list[str] = Field(default_factory=list)  # the user's model cards that fit this case, for the planner
    evidence: list[Evidence] = Field(default_factory=list)
    pending: Decision | None = None
    critiques: list[Critique] = Field(default_factory=list)
    steps: list[StepLog] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)  # limitations gathered on the way
    budget: Budget = Field(default_factory=Budget)
    tool_steps: int = 0
    planner_failures: int = 0
    report: dict[str, Any] | None = None
    error: str | None = None
    conversation: list[Turn] = Field(default_factory=list)  # earlier turns of a chat thread

    def view(self, view_id: str) -> ImageView:
        for v in self.views:
            if v.id == view_id:
                return v
        raise KeyError(f"no view {view_id!r}; views are {[v.id for v in self.views]}")

    def evidence_by_id(self, eid: str) -> Evidence | None:
        return next((e for e in self.evidence if e.id == eid), None)
