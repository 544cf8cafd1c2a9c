"""The one tool protocol: `Tool`, its typed input and output, and the `ToolContext` a run may touch.

A tool is a subclass of `Tool` in any module of the `tools` package (or a class exposed through
the `dxagent.tools` entry-point group; agent/engine/registry.py finds them): adding one file adds a tool, with no
edits elsewhere. `ToolContext` is typed against `ArtifactSink`, the three artifact-store methods a tool uses, so this
module depends on nothing but agent/core/state.py.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import numpy as np
from pydantic import BaseModel, Field

from agent.core.errors import DxagentError
from agent.core.state import ArtifactRef, CaseState, ImageView

# Input fields that hold image coordinates: the planner must take their values from recorded evidence or the
# question, never invent them (agent/engine/planner.py checks).
COORDINATE_ARGS = frozenset({"bbox", "center", "points", "seed_point"})
# Mark an optional Input field `Field(..., json_schema_extra=USER_ONLY)` to keep it out of the planner's schema: a
# tuning knob (a confidence threshold) that a user may set but a small planner fills with nonsense (conf=1.0).
USER_ONLY = {"planner": False}


class ArtifactSink(Protocol):
    """Where a tool's pixels, masks and pictures go (agent/store/artifacts.py's ArtifactStore is the one in use)."""

    def put_array(self, arr: np.ndarray, kind: str = "pixels", description: str = "") -> ArtifactRef: ...

    def put_png(self, rgb_or_gray: np.ndarray, kind: str = "overlay", description: str = "") -> ArtifactRef: ...

    def get_array(self, ref: ArtifactRef) -> np.ndarray: ...


class ToolError(DxagentError):
    """A tool could not do what was asked; the message goes into the evidence."""


class ToolInput(BaseModel):
    """Every tool input names the view it acts on."""

    view: str = Field("V1", description="id of the image view to act on")


class Measurement(BaseModel):
    name: str
    value: float
    unit: str  # "mm", "mm2", "mL", "HU", "px", "px2", "ratio", "%"


class FindingDraft(BaseModel):
    """A finding a tool's output supports; the report attaches the evidence id."""

    label: str
    present: bool | None = None  # None: a measurement, not a yes/no claim
    location: str = ""
    bbox: list[float] | None = None  # [row0, col0, row1, col1] in the view's pixels
    measurements: list[Measurement] = Field(default_factory=list)
    # present True/False: how likely that claim holds (absent: that it is not there); None claim: P(present)
    probability: float | None = None
    note: str = ""


@dataclass
class ToolContext:
    """What a tool may touch while it runs."""

    state: CaseState
    store: ArtifactSink
    new_views: list[ImageView] = field(default_factory=list)
    artifacts: list[ArtifactRef] = field(default_factory=list)
    # what the case's earlier evidence states, by evidence id, as each tool's `findings` reads its output (the engine
    # fills it: agent/engine/graph.py act); empty when a tool is run on its own
    findings: dict[str, list[FindingDraft]] = field(default_factory=dict)

    def view(self, view_id: str) -> ImageView:
        for v in self.new_views:
            if v.id == view_id:
                return v
        return self.state.view(view_id)

    def pixels(self, view_id: str) -> np.ndarray:
        return self.store.get_array(self.view(view_id).pixels)

    def save_png(self, img: np.ndarray, kind: str, description: str) -> ArtifactRef:
        ref = self.store.put_png(img, kind=kind, description=description)
        self.artifacts.append(ref)
        return ref

    def save_mask(self, mask: np.ndarray, description: str, legend: dict[int, str] | None = None,
                  view: str | None = None, slice_index: int | None = None) -> ArtifactRef:
        """Store a label mask (uint8, 0 background). `legend` names each label value ({1: "liver"}); `view` is the
        view whose grid the mask is on; `slice_index` the slice of a 3D view that a 2D mask lies in. Without a
        legend, each value present is called "segment N" and a DICOM SEG of it says that nothing named it."""
        mask = mask.astype(np.uint8)
        ref = self.store.put_array(mask, kind="mask", description=description)
        if legend is None:
            legend = {int(v): f"segment {int(v)}" for v in np.unique(mask) if v}
        ref = ref.model_copy(update={"legend": {int(k): str(v) for k, v in legend.items()}, "view": view,
                                     "slice_index": slice_index})
        self.artifacts.append(ref)
        return ref

    def add_view(self, pixels: np.ndarray, parent: ImageView, provenance: dict[str, Any], **changes: Any) -> ImageView:
        """Create a derived view (crop, zoom, window) that later tool calls can act on."""
        n = len(self.state.views) + len(self.new_views) + 1
        ref = self.store.put_array(pixels, kind="pixels", description=f"view V{n} from {parent.id}")
        fields = parent.model_dump()
        fields.update(
            id=f"V{n}", pixels=ref, shape=tuple(pixels.shape), dtype=str(pixels.dtype),
            parent=parent.id, provenance=provenance,
        )
        fields.update(changes)
        view = ImageView(**fields)
        self.new_views.append(view)
        return view


class Tool(ABC):
    """Name, description, where it applies, typed input and output, and `run`."""

    name: ClassVar[str]
    description: ClassVar[str]  # one line, shown to the planner
    version: ClassVar[str] = "1"
    kind: ClassVar[str] = "inspect"  # inspect | view | segment | detect | classify | measure | retrieve
    modalities: ClassVar[frozenset[str] | None] = None  # None: any modality
    # modalities whose "describe the findings" starts with this tool although it is made for any modality (a lesion
    # segmenter for ultrasound, dermoscopy and endoscopy): routed there like a modality's own tools, no planner call
    describes: ClassVar[frozenset[str]] = frozenset()
    describe_args: ClassVar[dict[str, Any]] = {}  # its arguments there (besides the view): e.g. the whole picture
    dims: ClassVar[frozenset[int]] = frozenset({2, 3})
    topics: ClassVar[tuple[str, ...]] = ()  # question words this tool's evidence answers
    # what this tool's evidence can state, as agent/core/vocab.py subjects: finding labels ("cardiomegaly"), organs
    # ("lung", "left lung"), measurement names ("cardiothoracic_ratio") and study attributes ("attribute:modality").
    # The critic answers a question only from evidence about its subject, and abstains early when no applicable
    # tool names it. Learned tools add their cards' labels (`addresses`).
    subjects: ClassVar[tuple[str, ...]] = ()
    timeout_s: ClassVar[float] = 60.0
    # the tool's card: what it cannot do, and its validation figure on real data (shown to the planner
    # and in `dxagent tools`)
    limitations: ClassVar[str] = ""
    validation: ClassVar[str] = ""
    Input: ClassVar[type[ToolInput]] = ToolInput
    Output: ClassVar[type[BaseModel]]
    # True: the tool needs a region (a box, centre or points) to act on. The planner never sees pixels, so it is
    # offered such a tool only once evidence or the question holds coordinates. Default: an Input field named in
    # COORDINATE_ARGS is required.
    needs_region: ClassVar[bool | None] = None

    def requires_region(self) -> bool:
        if self.needs_region is not None:
            return self.needs_region
        return any(f.is_required() for n, f in self.Input.model_fields.items() if n in COORDINATE_ARGS)

    def available(self) -> str | None:
        """None if this installation can run the tool at all (e.g. its endpoint is configured), else why not. A tool
        that is unavailable is left out of the planner's tool list, so that list stays the same across cases."""
        return None

    def applicable(self, view: ImageView) -> str | None:
        """None if the tool can run on this view, else the reason it cannot."""
        if self.modalities is not None and view.modality not in self.modalities:
            reason = f"{self.name} is for {'/'.join(sorted(self.modalities))}, not {view.modality}"
            if view.modality_uncertain:  # say whether a likely alternative would fit
                alts = view.modality_alternatives()
                fits = [m for m, _ in alts if m in self.modalities]
                reason += (f" (the modality is uncertain: {', '.join(f'{m} {p:.2f}' for m, p in alts[:3])}; "
                           + (f"if it is {fits[0]}, pass --modality {fits[0]})" if fits else "none of the likely "
                              "ones fits)"))
            return reason
        if view.ndim_spatial not in self.dims:
            return f"{self.name} takes {'/'.join(f'{d}D' for d in sorted(self.dims))} images, not {view.ndim_spatial}D"
        return None

    def addresses(self, view: ImageView) -> frozenset[str]:
        """The subjects this tool's evidence can state on this view (default: the class's `subjects`)."""
        return frozenset(self.subjects)

    def absent_labels(self, output: BaseModel, view: ImageView) -> list[str]:
        """Labels this output looked for and did not find (a segmenter's organs with no pixels), so that "Is there
        a kidney?" can be answered no from it. Default: none (a tool that found nothing usually cannot say so)."""
        return []

    # a tool that answers the question asked itself (a VQA expert, a vision-language model): it addresses every
    # question but "describe the findings", and `answer_to` gives its ranked answers to the answer step, which weighs
    # them against the measured evidence (agent/engine/answer.py: fuse)
    answers_questions: ClassVar[bool] = False

    def answer_to(self, output: BaseModel, view: ImageView, question: str) -> list[tuple[str, float]] | None:
        """Ranked (answer, probability) this output gives to `question`, best first; None when it does not answer it
        (another question, or it stepped aside). Default: None."""
        return None

    # takes_question and question_scope load the tool's models (the VQA expert: its weights and the MiniLM question
    # encoder): the engine asks them in the tool worker (agent/engine/worker.py `ask`), where the tool's own call will
    # load the same models, so the engine's process need not import torch for them (issue 33: cold start)
    questions_in_worker: ClassVar[bool] = False

    def takes_question(self, question: str) -> bool:
        """Whether a question-answering tool would answer this question at all (before any picture is read): False
        when it is sure to step aside (e.g. a question unlike its training questions), so the loop neither counts it
        as addressing the question nor spends a call on it. Default: True."""
        return True

    def question_scope(self, question: str, model: str | None = None) -> tuple[float, float] | None:
        """For a tool that answers questions from a bank of training questions (the VQA expert): (the question's
        similarity to the nearest of them, the tool's own threshold), without a picture. The answer step reads the
        first such score as how close the question's wording is to the questions the answer calibration was measured
        on (agent/engine/calibration.py). Default: None (no bank)."""
        return None

    def reads_first(self, question: str) -> tuple[str, ...]:
        """Tools whose evidence this one reads to answer `question` (through ToolContext.findings), so the router calls
        them first where they apply and have not run: the knowledge graph checks the organs the organ segmenter stated
        present against a system's members. Default: none."""
        return ()

    def absence_probabilities(self, output: BaseModel, view: ImageView) -> dict[str, float]:
        """For labels of `absent_labels`, how sure the tool is that each is absent (0..1); a label missing here has
        no probability of its own (its answer's probability then comes from calibration alone). Default: none."""
        return {}

    def attributes(self, output: BaseModel, view: ImageView) -> dict[str, dict[str, Any]]:
        """Study attributes this output states: {"modality": {"value": "CT", "probability": 0.9 | None,
        "source": "dicom" | "user" | "guess"}}. Default: none."""
        return {}

    def prompt_lines(self, view: ImageView) -> list[str]:
        """Extra lines the planner sees about this tool for this case (a learned tool: its model cards)."""
        return []

    def usable_view(self, ctx: ToolContext, view_id: str) -> ImageView:
        """The view to act on, or ToolError with the reason this tool does not apply to it (a derived view may
        differ from the one the case was routed on)."""
        view = ctx.view(view_id)
        if (reason := self.applicable(view)) is not None:
            raise ToolError(reason)
        return view

    @abstractmethod
    def run(self, ctx: ToolContext, inp: ToolInput) -> BaseModel: ...

    def findings(self, output: BaseModel, view: ImageView) -> list[FindingDraft]:
        """Findings this output supports (the report cites the evidence id). Default: none."""
        return []

    def summary(self, output: BaseModel) -> str:
        """One line for the planner and the CLI."""
        text = output.model_dump_json()
        return text if len(text) <= 240 else text[:237] + "..."

    def card(self) -> dict[str, Any]:
        return {
            "name": self.name, "description": self.description, "version": self.version,
            "kind": self.kind, "modalities": sorted(self.modalities) if self.modalities else "any",
            "dims": sorted(self.dims), "topics": list(self.topics), "limitations": self.limitations,
            "validation": self.validation,
        }
