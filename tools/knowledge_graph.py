"""knowledge_graph: one fact from SLAKE's medical knowledge graph (an organ's function, a disease's treatment), cited.

What: looks up (entity, relation) in the SLAKE 1.0 knowledge graph (Liu et al., ISBI 2021; CC BY 4.0): `en_organ.csv`
(organ#attribute#value: function, effect, position, definition, component, shape, ...), `en_organ_rel.csv`
(organ#belong to#system) and `en_disease.csv` (disease#attribute#value: location, description, cause, symptom,
treatment, prevention, infectivity, alias, susceptible population). The files are read where they lie, never copied:
the folder is `$DXAGENT_SLAKE_KG`, else `<repo root>/../shared/data/slake_dev/KG`; when neither holds them the tool is
not offered (`available()` says why).

- Relation, from the question's wording: function / effect / "used for" / role -> the organ's `function` or `effect`;
  treat -> `treatment`; prevent -> `prevention`; symptom -> `symptom`; cause -> `cause`; "belong to" / "part of the X
  system" / "which system" -> membership (`belong to`, en_organ_rel.csv); infectious / contagious -> `infectivity`;
  "also called" / alias -> `alias`; component / composed of -> `component`; shape; where / located / position ->
  a disease's `location` or an organ's `position` (these two are read and cited, but never answer the question or
  count as addressing it: "where is the edema?" asks about this image; IMAGE_RELATIONS); "what is" / definition /
  describe -> `description` (disease) or `definition` (organ). Other attribute names of the CSVs are reachable
  through the `relation` input.
- Entity: the `entity` input; else an organ, body system or disease named in the question itself ("What is the
  function of the heart?"); else the case's recorded evidence: the findings other tools stated present (ToolContext.findings,
  which the engine fills from each earlier call's output). For an organ relation "the main organ" is the organ of largest
  stated area (the sum of its findings' `area` measurements; left and right lung are one KG organ); a question that
  picks the organ by position or colour ("the leftmost organ", "the black organ") is answered from evidence only when
  one structure is stated present (a structure the KG does not know counts too). For a disease relation, the diseases
  stated present (restricted to the organ the question names, if any): one is the entity, several are ambiguous.
  "Which organs in the picture belong to the X system?" checks every organ stated present (or the `organs` input)
  against the KG's `belong to`.
- Matching: case-insensitive whole words; the longest name wins ("bacterial pneumonia" over "pneumonia"); plurals by
  agent/core/vocab.py's aliases and a trailing "s" ("lungs" -> Lung, "tonsil" -> Tonsils); "left"/"right" dropped
  ("left kidney" -> Kidney); a short synonym table (SYNONYMS: "small bowel" -> Small Intestine, "brain stem" ->
  Brainstem, "tumor" <-> "tumour", "nodule" -> Pulmonary Nodules in the lung ...); the KG's own `alias` values name
  their disease. It does not stem other words, correct spelling, map a sub-structure to its organ ("temporal lobe" is
  not "brain") or match by meaning.

Output: the triple(s) used (subject, relation, object, CSV file and line number), the entity and where it came from
("question", "input" or an evidence id E#), the answer text (the KG's value as written; several values of one
relation are joined by "; " and marked not unique), or `reason` when it cannot answer: no entity, entity not in the
KG, relation not in the KG for it, or several diseases fit and none is named (ambiguous: up to 5 candidates listed, no
answer). It never guesses. `answer_to` (this tool `answers_questions`) gives [(answer, probability)] only when the
output answered this very question (normalised words compared, as vqa_expert does) from unambiguous triples (one
value per entity and relation); probability: 1.0 when the entity came from the question's own words or the `entity`
input, else the probability of the evidence finding that named the entity (the largest when several findings name
it, e.g. both lungs); for a membership answer over several organs, the smallest of theirs. When the finding that named
the entity has no probability (the organ segmenter's organs), the output still cites the triple as evidence, but
`answer_to` gives nothing: a lookup is only as sure as its entity, and an unmeasured certainty would outweigh the
calibrated VQA expert in the answer step's fusion. A yes/no question is answered only as "Yes" to "Do any organs in
the picture belong to the X system?" (never "No": an organ the evidence did not state may still be there).
`findings()` is [] (knowledge is not evidence about the patient).

Modalities: any (the view's pixels are not read). Limitations: SLAKE's KG is small (about 100 organs, 300 diseases)
and its values are terse, templated text; the answer is general knowledge about the entity, not about this patient;
an entity taken from evidence is only as right as that evidence; positional picks ("the organ on the top") are not
resolved. Validation: see `slake_kg_figures` in tests/test_knowledge_graph.py (SLAKE train KG questions).
"""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, Field

from agent.core.state import CaseState, ImageView
from agent.core.tool import FindingDraft, Tool, ToolContext, ToolError, ToolInput
from agent.core.vocab import ALIASES, words

FILES = {"organ": "en_organ.csv", "organ_rel": "en_organ_rel.csv", "disease": "en_disease.csv"}
MAX_CANDIDATES = 5
# spellings a question or a tool uses -> the KG's name (lower-case words); "left"/"right" are dropped before this
SYNONYMS = {
    "small bowel": "small intestine", "large bowel": "large intestine", "brain stem": "brainstem",
    "cornea": "corneal", "bronchus": "bronchial tube", "bronchi": "bronchial tube", "gall bladder": "gallbladder",
    "thyroid gland": "thyroid", "urinary bladder": "bladder", "teeth": "tooth", "oesophagus": "esophagus",
    "tumor": "tumour", "brain tumor": "brain tumour", "brain enhancing tumor": "brain tumour",
    "brain non enhancing tumor": "brain tumour", "brain enhancing tumour": "brain tumour",
    "brain non enhancing tumour": "brain tumour", "effusion": "pleural effusion", "myocardial infarction":
    "miocardial infarction", "kidney cancer": "renal carcinoma", "kidney cyst": "renal cyst",
    "liver cyst": "hepatic cyst", "heart enlargement": "cardiomegaly", "enlarged heart": "cardiomegaly",
    "sensory system": "sense organ", "sensory organ": "sense organ", "sense system": "sense organ",
}
# a closed question ("Does the picture contain the organ that ...?"): a KG value is no answer to it
CLOSED = re.compile(r"^(is|are|do|does|did|can|could|has|have|will|would|was|were)\b")
# a finding word that names a lung disease only when the lung is its place ("nodule" in a chest X-ray)
LUNG_FINDINGS = {"nodule": "pulmonary nodules", "nodules": "pulmonary nodules", "mass": "pulmonary mass",
                 "infiltrate": "pulmonary infiltration", "infiltration": "pulmonary infiltration",
                 "edema": "pulmonary edema", "fibrosis": "pulmonary fibrosis", "abscess": "pulmonary abscess",
                 "embolism": "pulmonary embolism", "cancer": "lung cancer", "tumor": "lung cancer",
                 "tumour": "lung cancer"}

# question wording -> (relation name, KG attributes for an organ, KG attributes for a disease), first match wins
RELATIONS: tuple[tuple[str, str, tuple[str, ...], tuple[str, ...]], ...] = (
    # "belong(s) to" with what it belongs to after it: "Which part of the body / What scanning plane does this image
    # belong to?" (337 SLAKE train+validate questions) ask for the body region or the plane, not a body system
    ("membership", r"\bbelongs? to \w|\bpart of (the )?\w+( \w+)? system\b|\bwhich system\b|\bwhat system\b", (), ()),
    ("treatment", r"\btreat", (), ("treatment",)),
    ("prevention", r"\bprevent", (), ("prevention",)),
    ("symptom", r"\bsymptom", (), ("symptom",)),
    ("cause", r"\bcause of\b|\bcauses\b|\bcaused by\b|\bwhat cause|\bwhy\b", (), ("cause",)),
    ("infectivity", r"\binfectious|\binfectivity|\bcontagious", (), ("infectivity",)),
    ("alias", r"\balias|\balso (called|known)|\bother names?\b", ("alias",), ("alias",)),
    ("function", r"\bfunctions?\b|\beffects?\b|\bused for\b|\brole\b|\bwhat does .* do\b", ("function", "effect"), ()),
    ("component", r"\bcomponents?\b|\bcomposed\b|\bconsists?\b|\bmade of\b", ("component",), ()),
    ("shape", r"\bshape\b", ("shape",), ()),
    ("location", r"\bwhere\b|\blocat|\bposition\b", ("position",), ("location",)),
    ("description", r"\bdefinition\b|\bdefine\b|\bdescri|^what is (a |an |the )?\w+( \w+)?$", ("definition",),
     ("description",)),
)
# "where is the brain edema?", "what is the shape of the kidney?" ask about this image, not the textbook: the KG's
# location/position and shape triples are read on request (the `relation` input) and cited as context, but never
# answer such a question nor count as addressing it. On SLAKE validate (2026-12-06, found reading the agent's errors
# there, so in-sample) they answered 3 of 15 Position and 0 of 7 Shape questions right.
IMAGE_RELATIONS = {"location", "shape"}
# a question that picks its organ by place or colour: the largest organ is not it
PICKS = re.compile(r"\b(left|right|leftmost|rightmost|top|bottom|upper|lower|center|centre|central|middle|black|"
                   r"gray|grey|white|bright|dark|hollow)\b")
QUESTION_ONLY = 1.0


def kg_folder() -> Path:
    env = os.environ.get("DXAGENT_SLAKE_KG", "").strip()
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parents[1].parent / "shared" / "data" / "slake_dev" / "KG"


def key(text: str) -> str:
    """A name as a matching key: words, vocab plural aliases, synonyms, a trailing plural 's' removed per word."""
    w = words(text)
    w = ALIASES.get(w, w)
    w = " ".join(t for t in w.split() if t not in ("left", "right", "bilateral"))
    w = SYNONYMS.get(w, w)
    return " ".join(t[:-1] if len(t) > 3 and t.endswith("s") and not t.endswith(("ss", "us", "is")) else t
                    for t in w.split())


# ----------------------------------------------------------------------------------------------
# the graph


@dataclass(frozen=True)
class Row:
    subject: str
    relation: str
    value: str
    file: str
    line: int


@dataclass
class Graph:
    folder: Path
    rows: list[Row]
    organs: dict[str, str] = field(default_factory=dict)  # key -> KG name (organs and systems)
    diseases: dict[str, str] = field(default_factory=dict)  # key (name or alias) -> KG name

    def facts(self, subject: str, attrs: tuple[str, ...], files: tuple[str, ...]) -> list[Row]:
        return [r for r in self.rows if r.subject == subject and r.relation in attrs and r.file in files]

    def located_in(self, organ: str) -> list[str]:
        return list(dict.fromkeys(r.subject for r in self.rows if r.file == FILES["disease"] and r.relation == "location"
                                  and key(r.value) == key(organ)))


_LOCK = threading.Lock()
_GRAPHS: dict[tuple, Graph] = {}


def load_graph(folder: Path | None = None) -> Graph:
    folder = Path(folder or kg_folder())
    paths = [folder / f for f in FILES.values()]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise ToolError(f"SLAKE's knowledge graph is not here ({folder}: no {', '.join(missing)}): set "
                        "DXAGENT_SLAKE_KG to its KG folder")
    fp = tuple((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in paths)
    with _LOCK:
        if fp in _GRAPHS:
            return _GRAPHS[fp]
        rows: list[Row] = []
        for p in paths:
            for n, line in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
                parts = line.split("#", 2)
                if len(parts) != 3 or parts[1].strip() == "attribute":  # header lines (one sits mid-file)
                    continue
                s, rel, v = (x.strip() for x in parts)
                if s and rel and v:
                    rows.append(Row(s, rel, v, p.name, n))
        g = Graph(folder, rows)
        for r in rows:
            if r.file == FILES["disease"]:
                g.diseases.setdefault(key(r.subject), r.subject)
            else:
                g.organs.setdefault(key(r.subject), r.subject)
                if r.file == FILES["organ_rel"]:
                    g.organs.setdefault(key(r.value), r.value)
        for r in rows:  # a disease's aliases name it, unless the alias is another entity's name
            if r.file == FILES["disease"] and r.relation == "alias":
                for a in r.value.split(","):
                    if (k := key(a)) and k not in g.diseases and k not in g.organs:
                        g.diseases[k] = r.subject
        _GRAPHS[fp] = g
        return g


def named_in(text: str, names: dict[str, str]) -> list[str]:
    """KG names whose key occurs in `text` as whole words, longest first, none inside a longer one found."""
    t = f" {key(text)} "
    hits = sorted((k for k in names if f" {k} " in t), key=len, reverse=True)
    kept: list[str] = []
    for k in hits:
        if not any(f" {k} " in f" {h} " for h in kept):
            kept.append(k)
    return list(dict.fromkeys(names[k] for k in kept))


def relation_of(question: str) -> tuple[str, tuple[str, ...], tuple[str, ...]] | None:
    q = words(question)
    for name, pattern, organ_attrs, disease_attrs in RELATIONS:
        if re.search(pattern, q):
            return name, organ_attrs, disease_attrs
    return None


# ----------------------------------------------------------------------------------------------
# the tool


class KgInput(ToolInput):
    question: str = Field("", max_length=500, description="the question to answer from the KG (default: the case's)")
    entity: str = Field("", max_length=120, description="organ, body system or disease to look up (default: named in "
                        "the question, else taken from the recorded evidence)")
    relation: str = Field("", max_length=60, description="a KG attribute to read (e.g. 'function', 'treatment'); "
                          "default: from the question's wording")
    organs: list[str] = Field(default_factory=list, description="for membership questions: the organs to check "
                              "(default: the organs other tools stated present)")


class Triple(BaseModel):
    subject: str
    relation: str
    object: str
    file: str
    line: int


class KgOutput(BaseModel):
    question: str
    relation: str = ""  # the relation asked: function, treatment, membership, ...
    entity: str = ""  # the KG name looked up (for membership: the system)
    entity_source: str = ""  # "question", "input" or evidence ids "E2"
    triples: list[Triple] = Field(default_factory=list)
    answer: str | None = None
    unambiguous: bool = False  # one value per (entity, relation): answer_to gives it
    probability: float | None = None  # what answer_to gives (see the module docstring)
    candidates: list[str] = Field(default_factory=list)  # when ambiguous: up to 5
    reason: str = ""
    kg_folder: str = ""


@dataclass
class Stated:
    """An organ or disease the evidence states present."""

    name: str  # the KG name
    label: str  # the finding's label, sides dropped ("Small Bowel")
    evidence: list[str]
    probability: float | None  # None: the finding gave none
    area: float


def evidence_entities(state: CaseState, graph: Graph, stated: dict[str, list[FindingDraft]],
                      organ_hint: str | None = None) -> tuple[list[Stated], list[Stated], list[str]]:
    """(organs, diseases) that the earlier evidence's findings (`stated`: ToolContext.findings, by evidence id) state
    present, each once, in evidence order, and the labels of the other findings stated present (structures the KG
    does not know, e.g. "Left Temporal Lobe")."""
    organs: dict[str, Stated] = {}
    diseases: dict[str, Stated] = {}
    others: list[str] = []
    for e in state.evidence:
        for f in stated.get(e.id, []):
            if f.present is not True:
                continue
            label = " ".join(t for t in f.label.split() if t.lower() not in ("left", "right"))
            k = key(f.label)
            area = sum(m.value for m in f.measurements if m.name == "area")
            p = None if f.probability is None else float(f.probability)
            name, into = None, None
            if k in graph.organs:
                name, into = graph.organs[k], organs
            elif k in graph.diseases:
                name, into = graph.diseases[k], diseases
            elif k in LUNG_FINDINGS and (organ_hint == "Lung" or "lung" in key(f.location + " " + f.label)
                                         or state.inputs.body_part in ("chest", "lung")):
                name, into = graph.diseases.get(key(LUNG_FINDINGS[k])), diseases
            if not name or into is None:
                others += [f.label] if f.label not in others else []
                continue
            if name in into:  # stated again (the other lung, another tool): its strongest statement counts
                s = into[name]
                s.probability = p if s.probability is None else s.probability if p is None else max(s.probability, p)
                s.evidence += [e.id] if e.id not in s.evidence else []
            else:
                s = into[name] = Stated(name, label, [e.id], p, 0.0)
            s.area += area
    return list(organs.values()), list(diseases.values()), others


class KnowledgeGraph(Tool):
    name = "knowledge_graph"
    description = ("Look up a fact in SLAKE's medical knowledge graph (an organ's function or body system, a "
                   "disease's cause, symptoms, treatment, prevention), citing the triple; general knowledge, not "
                   "evidence about this patient.")
    kind = "retrieve"
    topics = ("function", "effect", "treat", "prevent", "symptom", "cause", "belong", "system", "knowledge")
    subjects = ()  # it answers the question asked (answers_questions), not a fixed subject
    limitations = ("SLAKE's small KG (about 100 organs, 300 diseases, terse values); general knowledge, not about this "
                   "patient; an entity taken from evidence is only as right as that evidence; organs picked by "
                   "position or colour are not resolved; no answer when several diseases fit")
    validation = "SLAKE train KG questions: see tests/test_knowledge_graph.py (slake_kg_figures)"
    timeout_s = 30.0
    Input = KgInput
    Output = KgOutput
    answers_questions = True

    def available(self) -> str | None:
        folder = kg_folder()
        if not all((folder / f).is_file() for f in FILES.values()):
            return "SLAKE's knowledge graph is not here: set DXAGENT_SLAKE_KG to its KG folder"
        return None

    def applicable(self, view: ImageView) -> str | None:
        return self.available()  # any modality (the view's pixels are not read), where the KG is installed

    def run(self, ctx: ToolContext, inp: KgInput) -> KgOutput:
        graph = load_graph()
        question = " ".join((inp.question or ctx.state.question or "").split())
        out = KgOutput(question=question, kg_folder=str(graph.folder))
        rel = relation_of(question)
        if inp.relation:  # one of RELATIONS' names, else a KG attribute read as written
            name = inp.relation.strip().lower()
            known = next((r for r in RELATIONS if r[0] == name), None)
            rel = (name, known[2], known[3]) if known else (name, (name,), (name,))
        if rel is None:
            out.reason = "the question asks for no relation the KG holds (function, treatment, cause, membership, ...)"
            return out
        out.relation = rel[0]
        if out.relation == "membership":
            return self._membership(ctx, inp, graph, out)
        return self._fact(ctx, inp, graph, out, rel[1], rel[2])

    @staticmethod
    def _is_system(name: str) -> bool:
        return name.lower().endswith(("system", "organ"))

    # -- one entity, one relation -----------------------------------------------------------------------------
    def _fact(self, ctx: ToolContext, inp: KgInput, graph: Graph, out: KgOutput, organ_attrs: tuple[str, ...],
              disease_attrs: tuple[str, ...]) -> KgOutput:
        text = inp.entity or out.question
        source = "input" if inp.entity else "question"
        diseases = named_in(text, graph.diseases)
        organs = [o for o in named_in(text, graph.organs) if not (out.relation == "membership" and self._is_system(o))]
        if out.relation != "membership" and CLOSED.match(words(out.question)) and not inp.relation:
            out.reason = ("a yes/no question: a KG value does not answer it (finding which organs in the picture have "
                          "a property is not supported); no answer")
            return out
        wants_disease = bool(disease_attrs) and not organ_attrs
        probability = QUESTION_ONLY
        entity = None
        if diseases and (disease_attrs or not organs):
            entity = diseases[0] if len(diseases) == 1 else None
            if entity is None:
                out.candidates, out.entity_source = diseases[:MAX_CANDIDATES], source
                out.reason = (f"ambiguous: the {source} names several diseases ({', '.join(diseases[:MAX_CANDIDATES])}); "
                              "no answer")
                return out
        elif organs and not wants_disease:
            entity = organs[0]
        elif inp.entity:
            out.entity_source = "input"
            out.reason = f"{inp.entity!r} is not an organ, body system or disease of the KG"
            return out
        if entity is None:  # from the evidence
            hint = organs[0] if organs else None
            stated_organs, stated_diseases, others = evidence_entities(ctx.state, graph, ctx.findings, hint)
            if wants_disease:
                pool = [d for d in stated_diseases if hint is None or any(
                    key(r.value) == key(hint) for r in graph.facts(d.name, ("location",), (FILES["disease"],)))]
                if len(pool) == 1:
                    entity, probability, source = pool[0].name, pool[0].probability, ",".join(pool[0].evidence)
                elif len(pool) > 1:
                    out.candidates = [d.name for d in pool][:MAX_CANDIDATES]
                    out.reason = (f"ambiguous: the evidence states several diseases ({', '.join(out.candidates)}) and "
                                  "the question names none; no answer")
                    return out
                else:
                    cands = graph.located_in(hint) if hint else []
                    out.candidates = cands[:MAX_CANDIDATES]
                    out.reason = ("no disease named in the question or stated present by the evidence" +
                                  (f"; ambiguous: the KG lists {len(cands)} diseases of the {hint.lower()} "
                                   f"(e.g. {', '.join(out.candidates)})" if cands else "") + "; no answer")
                    return out
            else:
                if not stated_organs:
                    out.reason = "no organ or disease named in the question, and no organ stated present by the evidence"
                    return out
                if len(stated_organs) + len(others) > 1 and PICKS.search(words(out.question)):
                    out.candidates = ([o.name for o in stated_organs] + others)[:MAX_CANDIDATES]
                    out.reason = ("the question picks its organ by position or colour, which this tool cannot resolve "
                                  f"among {', '.join(out.candidates)}; no answer")
                    return out
                if len(stated_organs) > 1 and not any(o.area for o in stated_organs):
                    out.candidates = [o.name for o in stated_organs][:MAX_CANDIDATES]
                    out.reason = f"several organs stated present with no area to pick the main one: {', '.join(out.candidates)}"
                    return out
                main = max(stated_organs, key=lambda o: o.area)
                entity, probability, source = main.name, main.probability, ",".join(main.evidence)
        out.entity, out.entity_source = entity, source
        is_disease = entity in graph.diseases.values() and entity not in graph.organs.values()
        if out.relation == "membership":
            attrs, files = ("belong to",), (FILES["organ_rel"],)
        else:
            attrs = disease_attrs if is_disease else organ_attrs
            files = (FILES["disease"],) if is_disease else (FILES["organ"], FILES["organ_rel"])
        if not attrs:
            out.reason = (f"the KG holds no {out.relation} for {'a disease' if is_disease else 'an organ'} "
                          f"({entity}); no answer")
            return out
        rows = graph.facts(entity, attrs, files)
        if not rows:
            out.reason = f"the KG has no {'/'.join(attrs)} for {entity}; no answer"
            return out
        values = list(dict.fromkeys(r.value for r in rows))
        seen: set[str] = set()
        for r in rows:
            if r.value not in seen:
                seen.add(r.value)
                out.triples.append(Triple(subject=r.subject, relation=r.relation, object=r.value, file=r.file, line=r.line))
        out.answer = "; ".join(values)
        out.unambiguous = len(values) == 1
        out.probability = None if probability is None else round(probability, 4)
        if not out.unambiguous:
            out.reason = f"the KG gives {len(values)} differing values for {entity}'s {out.relation}: all are cited"
        return out

    # -- which organs belong to a system ----------------------------------------------------------------------
    def _membership(self, ctx: ToolContext, inp: KgInput, graph: Graph, out: KgOutput) -> KgOutput:
        systems = [o for o in named_in(inp.entity or out.question, graph.organs) if self._is_system(o)]
        if not systems:
            if re.search(r"\bsystem\b|\borgans?\b.*\b(picture|image)\b", words(inp.entity or out.question)):
                out.reason = "the body system asked about is not one the KG names; no answer"
                return out
            return self._fact(ctx, inp, graph, out, (), ())  # "Which system does the heart belong to?"
        system = out.entity = systems[0]
        if inp.organs:
            stated, names = [], set()
            for o in inp.organs:
                hits = named_in(o, graph.organs)
                if not hits:
                    out.reason = f"{o!r} is not an organ of the KG; no answer"
                    return out
                label = " ".join(t for t in o.split() if t.lower() not in ("left", "right"))
                if hits[0] in names:
                    continue
                names.add(hits[0])
                stated.append(Stated(hits[0], label, ["input"], QUESTION_ONLY, 0.0))
            out.entity_source = "input"
        else:
            stated, _, _ = evidence_entities(ctx.state, graph, ctx.findings)
            out.entity_source = ",".join(dict.fromkeys(e for s in stated for e in s.evidence))
        if not stated:
            out.reason = f"no organ given or stated present by the evidence to check against the {system.lower()}"
            return out
        members, probs = [], []
        for s in stated:
            rows = [r for r in graph.facts(s.name, ("belong to",), (FILES["organ_rel"],)) if r.value == system]
            if rows:
                r = rows[0]
                out.triples.append(Triple(subject=r.subject, relation=r.relation, object=r.value, file=r.file, line=r.line))
                members.append(s.label)
                probs.append(s.probability)
        checked = ", ".join(s.name for s in stated)
        if not members:
            out.reason = (f"none of the organs checked ({checked}) belongs to the {system.lower()} in the KG; no answer "
                          "(an organ the evidence did not state may still be in the picture)")
            return out
        yes_no = re.match(r"^(do|does|is|are|can)\b", words(out.question)) is not None
        out.answer = "Yes" if yes_no else ", ".join(dict.fromkeys(members))
        out.unambiguous = True
        out.probability = None if any(x is None for x in probs) else round(min(probs), 4)
        out.reason = f"checked {checked} against the KG's 'belong to'"
        return out

    def takes_question(self, question: str) -> bool:
        """Whether the question asks for a relation the KG holds (function, treatment, membership, ...): the loop
        counts this tool as addressing only those (agent/engine/answer.py can_address)."""
        rel = relation_of(question)
        if rel is None or (rel[0] != "membership" and CLOSED.match(words(question))):
            return False
        return rel[0] not in IMAGE_RELATIONS

    def reads_first(self, question: str) -> tuple[str, ...]:
        """The organ segmenter first when the question leaves its organ to the image ("Do any of the organs in the
        picture belong to the nervous system?", "What is the function of the main organ here?"): the organs it states
        present are what this tool checks. A question that names its organ or disease needs no image evidence."""
        rel = relation_of(question)
        if rel is None or rel[0] in IMAGE_RELATIONS or not (rel[0] == "membership" or rel[1] and not rel[2]):
            return ()
        try:
            graph = load_graph()
        except ToolError:
            return ()
        if [o for o in named_in(question, graph.organs) if not self._is_system(o)] or named_in(question, graph.diseases):
            return ()
        return ("organ_segment",)

    # -- what the evidence states -----------------------------------------------------------------------------
    def answer_to(self, output: BaseModel, view: ImageView, question: str) -> list[tuple[str, float]] | None:
        """[(answer, probability)] when this output answered this very question from unambiguous triples, else None
        (probability: see the module docstring)."""
        assert isinstance(output, KgOutput)
        if not output.answer or not output.unambiguous or not output.triples or words(output.question) != words(question):
            return None
        if output.probability is None:  # the entity came from evidence that gives no probability: cited, not weighed
            return None
        if output.relation in IMAGE_RELATIONS:  # the textbook's shape or site is context, not this image's answer
            return None
        return [(output.answer, output.probability)]

    def findings(self, output: BaseModel, view: ImageView) -> list[FindingDraft]:
        """None: knowledge about an organ or disease is not evidence about this patient."""
        return []

    def summary(self, output: BaseModel) -> str:
        assert isinstance(output, KgOutput)
        if output.answer and output.triples:
            t = output.triples[0]
            more = f" (+{len(output.triples) - 1} more)" if len(output.triples) > 1 else ""
            text = (f"{output.entity} {output.relation}: {output.answer} [{t.file}:{t.line} {t.subject}#{t.relation}"
                    f"]{more}; entity from {output.entity_source}")
        else:
            text = f"no KG answer to {output.question[:80]!r}: {output.reason}"
        return text if len(text) <= 240 else text[:239] + "…"
