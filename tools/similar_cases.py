"""similar_cases: the labelled library cases that look most like this image (content-based retrieval).

What: embeds the view (a volume's middle slice) with the encoder that built the case library
(`dxagent library build`; default handcrafted colour/intensity/GLCM/LBP/HOG features, see
agent/index/library.py) and returns the k nearest library cases by cosine similarity (faiss inner
product on L2-normalised vectors), restricted to the view's modality family (DX/CR/RG/DR are one
family, every other code its own) when the library holds any case of it. Each neighbour comes with
its labels, source, modality and similarity; a vote counts each label once per neighbour ("7 of the
10 most similar library cases were labelled malignant"). The query image itself (same file sha256)
is never its own neighbour.

Modalities: any; 2D views. Library: `$DXAGENT_LIBRARY` or
~/.cache/dxagent/library. A library built with a model card (`--encoder CARD`, a clip card: its
image embeddings instead of the handcrafted features) is searched only while that card is in the
model store with the same sha256 and verified weights; otherwise the tool is not offered and a call
fails with one line naming the card.

Limitations: similarity evidence, not a diagnosis: neighbours share colour, intensity, texture and
layout, which track acquisition (device, stain, dataset) as much as disease; the vote is only as good
as the library's labels and balance, and labels from different datasets are not harmonised
("No finding" vs "No Finding").

Validation (bench/bench_retrieval.py: a library of all 562 realcases, handcrafted encoder; each
labelled case queried leave-one-out against its own source, the majority first label of its 10
nearest compared with its own; majority-class baseline in brackets): LC25000 pathology 0.93 (0.35,
n=112), COVID CT 0.77 (0.52, n=108), brain MRI 0.54 (0.29, n=72), BUSI ultrasound 0.47 (0.37, n=97),
HAM10000 dermoscopy 0.26 (0.17, n=93); chest radiographs at the baseline (actualmed 0.62 (0.62,
n=13), covid-chestxray 0.74 (0.77, n=39)). About 40 ms a call (embed + search) on 2 busy cores.
"""

from __future__ import annotations

import json
from collections import Counter

from pydantic import BaseModel, Field

from agent.analysis.display import is_rgb
from agent.core.state import ImageView
from agent.core.tool import FindingDraft, Tool, ToolContext, ToolError, ToolInput
from agent.index.library import (
    LibraryError,
    card_problem,
    default_library_dir,
    embed_pixels,
    encoder_from_spec,
    modality_family,
    open_library,
)


class SimilarInput(ToolInput):
    k: int = Field(10, ge=1, le=50, description="how many similar library cases to return")


class Neighbour(BaseModel):
    case_id: str
    labels: list[str]
    modality: str
    source: str
    similarity: float  # cosine, in [-1, 1]
    path: str  # relative to the root the library was built from


class SimilarOutput(BaseModel):
    library: str
    library_size: int
    searched: int  # library cases eligible for this query (same family, not the query itself)
    family: str
    same_family: bool  # False: the library holds no case of this family; all cases were searched
    encoder: str
    excluded_self: bool
    neighbours: list[Neighbour]
    votes: dict[str, int]  # label -> neighbours carrying it
    majority: list[str]  # the label(s) with the most votes
    vote_summary: str
    note: str = ""


class SimilarCases(Tool):
    name = "similar_cases"
    description = ("Find the k most similar labelled cases in the case library (same modality family) and "
                   "summarise their labels; similarity evidence, not a diagnosis.")
    kind = "retrieve"
    describes = frozenset({"US", "XC", "ES", "SM"})  # labelled look-alikes, where the library has them
    dims = frozenset({2})
    topics = ("similar", "similar cases", "compare", "resemble", "looks like", "diagnosis", "benign", "malignant")
    timeout_s = 60.0
    limitations = ("similarity evidence, not a diagnosis: handcrafted features track device, stain and dataset as much "
                   "as disease; as good as the library's labels; needs `dxagent library build` first")
    validation = ("leave-one-out 10-NN vote within realcases sources: pathology 0.93 (baseline 0.35, n=112), COVID CT "
                  "0.77 (0.52), brain MRI 0.54 (0.29), breast US 0.47 (0.37), dermoscopy 0.26 (0.17); CXR at baseline")
    Input = SimilarInput
    Output = SimilarOutput

    def applicable(self, view: ImageView) -> str | None:
        """Also refused while no library is built, so the planner is not offered a tool that can only fail."""
        if (reason := super().applicable(view)) is not None:
            return reason
        root = default_library_dir()
        head = root / "library.json"
        if not head.is_file():
            return f"no case library at {root}: build one with `dxagent library build`"
        try:  # a library built with a model card that is gone or changed can only fail: say so now
            spec = json.loads(head.read_text()).get("encoder") or {}
        except (OSError, ValueError, AttributeError):
            return None  # unreadable: run() says why
        return card_problem(spec) if isinstance(spec, dict) else None

    def run(self, ctx: ToolContext, inp: SimilarInput) -> SimilarOutput:
        view = self.usable_view(ctx, inp.view)
        root = default_library_dir()
        try:
            lib = open_library(root)
            enc = encoder_from_spec(lib.encoder)
        except LibraryError as exc:
            raise ToolError(str(exc)) from None
        vec = embed_pixels(enc, ctx.pixels(inp.view), is_rgb(view))
        family = modality_family(view.modality)
        sha = view.source_sha256
        hits, same = lib.search(vec, inp.k, family, exclude_sha256=sha)
        if not hits:
            raise ToolError(f"the case library at {root} holds no case other than this image")
        in_lib = bool(sha) and any(c["sha256"] == sha for c in lib.cases)
        searched = sum(1 for c in lib.cases if c["sha256"] != sha and (not same or c["family"] == family))
        votes = Counter(label for case, _ in hits for label in dict.fromkeys(case["labels"]))
        top = max(votes.values(), default=0)
        majority = sorted(label for label, n in votes.items() if n == top) if top else []
        n = len(hits)
        if majority:
            summary = f"{top} of the {n} most similar library cases were labelled {' / '.join(majority)}"
            if len(majority) > 1:
                summary += " (a tie)"
        else:
            summary = f"none of the {n} most similar library cases carries a label"
        notes = [] if same else [f"the library holds no {family} case: all {searched} cases were searched"]
        if n < inp.k:
            notes.append(f"only {n} eligible cases")
        return SimilarOutput(
            library=str(root), library_size=lib.size, searched=searched, family=family, same_family=same,
            encoder=lib.encoder["name"], excluded_self=in_lib,
            neighbours=[Neighbour(case_id=c["case_id"], labels=c["labels"], modality=c["modality"], source=c["source"],
                                  similarity=round(s, 4), path=c["path"]) for c, s in hits],
            votes=dict(votes.most_common()), majority=majority, vote_summary=summary, note="; ".join(notes),
        )

    def findings(self, output: BaseModel, view: ImageView) -> list[FindingDraft]:
        assert isinstance(output, SimilarOutput)
        n = len(output.neighbours)
        return [FindingDraft(
            label=f"{label} (similar-case vote)", present=None, probability=round(output.votes[label] / n, 3),
            note=(f"{output.votes[label]} of the {n} most similar cases in a {output.library_size}-case library "
                  f"({output.encoder} features, {output.family}) carry this label; similarity evidence, not a diagnosis"),
        ) for label in output.majority]

    def summary(self, output: BaseModel) -> str:
        assert isinstance(output, SimilarOutput)
        best = output.neighbours[0]
        text = (f"{output.vote_summary} (k={len(output.neighbours)}, {output.searched} {output.family} cases searched; "
                f"best match {best.case_id} [{', '.join(best.labels) or 'no label'}] cosine {best.similarity:.3f})")
        return text if len(text) <= 280 else text[:279] + "…"
