"""Question understanding: what kind of answer the question wants, and what it is about. Deterministic rules.

    kind         wants                                     e.g.
    yes_no       yes | no                                  "Is there evidence of an aortic aneurysm?"
    choice       one of the options the question names     "Is this a CT or an MRI?", "left or right?"
    count        a whole number                            "How many nodules are there?"
    measurement  a number with a unit                      "How large is the lesion?", "What is the CTR?"
    location     where (side, region)                      "Where is the mass?", "Which side is the effusion on?"
    attribute    a study attribute (modality, plane, body region, MR weighting, organ)
                                                           "What modality is this?", "Which plane?"
    open         a phrase or a description                 "Describe the findings", "What diseases are seen?"

The subject (finding, organ, side, quantity, study attribute) comes from agent/core/vocab.py, so questions and tool
labels share one vocabulary. A subject the vocabulary does not know is kept as the words the question uses
("Is there bronchiectasis?" -> finding "bronchiectasis"): no tool names it, so the agent says so.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, Field

from agent.core.vocab import Subject, attribute_value_in, label_key, normalise_text, subject_of, words

QuestionKind = Literal["yes_no", "choice", "count", "measurement", "location", "attribute", "open"]
AnswerKind = Literal["yes_no", "choice", "count", "measurement", "location", "phrase"]
ANSWER_KIND: dict[str, AnswerKind] = {"yes_no": "yes_no", "choice": "choice", "count": "count",
                                      "measurement": "measurement", "location": "location", "attribute": "phrase",
                                      "open": "phrase"}

_YES_NO_START = {"is", "are", "does", "do", "did", "can", "could", "was", "were", "has", "have", "had", "will",
                 "would", "should", "shall", "may", "might", "any", "isn", "aren", "doesn"}
_MEASURE = re.compile(r"\b(composition|how (large|big|long|wide|thick|much)|what (is|are) the (size|diameter|area|volume|ratio|"
                      r"width|length|density|cardiothoracic ratio|ctr)|measure|size of|diameter of|ratio)\b")
_LOCATION = re.compile(r"\b(where|which side|what side|which lobe|in which part|which part of the (lung|liver|brain)|"
                       r"located|location|position of)\b")
_ABNORMAL = re.compile(r"\b(abnormal\w*|diseased?|lesions?|affected|injur\w*|tumou?rs?|cancers?|sick|unhealthy)\b")
_SIZE_RANK = re.compile(r"\b(largest|biggest|bigger|larger|smallest|smaller)\b")
_ORGAN_ID = re.compile(r"\b(organ|organs|structure)\b(?! system)")
_IMPERATIVE = {"segment", "measure", "detect", "find", "locate", "outline", "quantify", "show", "list", "classify",
               "describe", "analyse", "analyze", "assess", "evaluate", "summarize", "summarise", "report", "identify"}
_DESCRIBE = re.compile(r"\b(describe|description|findings?|what do you see|what can you see|what is seen|what is shown|"
                       r"summar\w*|quantify|analy[sz]e|report|assess|evaluate|interpret)\b")
_HEALTHY = re.compile(r"\b(healthy|normal)\b")
_LEAD = re.compile(r"^(is|are|does|do|did|can|could|was|were|has|have|had|will|would|should|any)\s+"
                   r"(there|this|the|it|you|we)?\s*(any|evidence of|signs? of|a|an|the)?\s*")
_WH_LEAD = re.compile(r"^(what|which|where|how|who)\s+(is|are|was|were|does|do|can)?\s*(there|this|the|it)?\s*"
                      r"(a|an|the)?\s*")
_TRAIL = re.compile(r"\s+(in|on|of|within|at|seen|visible|present|shown|observed|appear|exist)\b.*$")
_GENERIC_TAIL = {"image", "scan", "picture", "one", "film", "study", "photo", "view"}


class Question(BaseModel):
    """The question as the agent understood it; recorded in the state, the trace and the report."""

    text: str
    kind: QuestionKind
    answer_kind: AnswerKind
    subject: str = ""  # in words: "aortic aneurysm", "modality", "longest diameter of lesion"
    finding: str | None = None
    organ: str | None = None
    side: str | None = None
    quantities: list[str] = Field(default_factory=list)  # measurement names that answer it
    organs: list[str] = Field(default_factory=list)  # every organ or tissue named ("fat, soft tissue and bone")
    attributes: list[str] = Field(default_factory=list)  # every study attribute named ("spacing and intensity range")
    attribute: str | None = None  # modality | plane | body_region | mr_weighting | organ
    attribute_value: str | None = None  # the value a closed attribute question names ("CT")
    choices: list[str] = Field(default_factory=list)
    allowed: list[str] = Field(default_factory=list)  # the values an answer may take (closed questions)
    negated: bool = False  # "Is the lung healthy?": yes means the finding is absent
    describe: bool = False  # an open request for the findings, with no particular subject

    def subject_obj(self) -> Subject:
        return Subject(finding=self.finding, organ=self.organ, side=self.side, quantities=tuple(self.quantities),
                       attribute=self.attribute, attribute_value=self.attribute_value, organs=tuple(self.organs),
                       attributes=tuple(self.attributes))


def _strip_tail(phrase: str) -> str:
    toks = [t for t in phrase.split() if t not in ("a", "an", "the")]
    while toks and toks[-1] in _GENERIC_TAIL:
        toks.pop()
    return " ".join(toks)


def _choices(q: str) -> list[str]:
    """The options of an "A or B" question, as the question words them."""
    body = q.rstrip(" ?")
    left, _, right = body.partition(" or ")
    right = _strip_tail(right.split(",")[0].strip())
    if not right or right in ("not", "no"):
        return []
    left = re.sub(r"^(which|what)\b.*?(,|\b(is|are)\b)\s*", "", left) if left.split()[0] in ("which", "what") else left
    lw = [t for t in _LEAD.sub("", left).split() if t not in ("a", "an", "the")]
    n = max(1, len(right.split()))
    a = " ".join(lw[-n:]) if lw else ""
    if "," in left:  # "liver, spleen or kidney"
        opts = [_strip_tail(x) for x in left.split(",")]
        opts = [" ".join(o.split()[-n:]) for o in opts if o and len(o.split()) <= n + 1  # not the stem
                and not _SIZE_RANK.fullmatch(o) and not _ABNORMAL.fullmatch(o)]
        return [o for o in opts if o] + [right]
    return [a, right] if a and a != right else []


def _fallback_subject(q: str) -> str:
    """The words after "is there (a|evidence of)" up to a preposition: the subject of a yes/no question the
    vocabulary does not know."""
    rest = _TRAIL.sub("", _LEAD.sub("", _WH_LEAD.sub("", q.rstrip(" ?"))))
    return _strip_tail(rest)


def parse_question(text: str) -> Question:
    q = words(text)
    first = q.split()[0] if q else ""
    subj = subject_of(text)
    kw: dict = {}
    choices: list[str] = []
    if first in _IMPERATIVE:  # a task ("Segment the nodules and measure them."): the findings of the tools that do it
        kind = "open"
    elif " or " in f" {q} " and (first in _YES_NO_START or first in ("which", "what")) and \
            (choices := _choices(" ".join(re.sub(r"[^a-z0-9,]+", " ", text.lower()).replace(",", " , ").split()))):
        kind: QuestionKind = "choice"
    elif re.search(r"\bhow many\b|\bnumber of\b", q):
        kind = "count"
    elif _MEASURE.search(q) or (subj.quantities and first in ("what", "how") and not subj.attribute):
        kind = "measurement"  # "What is the mean intensity inside the box?"
    elif _LOCATION.search(q):
        kind = "location"
    elif first in _YES_NO_START:
        kind = "yes_no"
    elif subj.attribute or (_ORGAN_ID.search(q) and first in ("which", "what", "where", "name")):
        kind = "attribute"
    else:
        kind = "open"

    attribute, value = subj.attribute, None
    rank = _SIZE_RANK.search(q)
    if rank and (kind == "choice" or _ORGAN_ID.search(q)):  # "What is the largest organ?", "Which is bigger, A or B?"
        attribute = "smallest_organ" if rank.group(1).startswith("small") else "largest_organ"
        kind = "choice" if kind == "choice" else "attribute"
    if kind == "attribute" and not attribute:
        attribute = "organ"
    if attribute == "organ" and _ABNORMAL.search(q):  # "Which organ is abnormal?" is not "which organs are shown"
        attribute = "abnormal_organ"
    if kind in ("yes_no", "choice"):
        named = attribute_value_in(text, attribute)
        if named and (attribute or not (subj.finding or subj.organ) or named[0] == "modality" and not subj.finding):
            attribute, value = named[0], (named[1] if kind == "yes_no" else None)
            if named[0] == "modality" and subj.organ:
                kw["organ"] = None  # "Is this a brain MRI?" asks about the modality
        elif not named and attribute not in ("mr_weighting",):
            attribute = None if kind == "yes_no" else attribute
    elif kind not in ("attribute",):
        attribute = None
    finding = subj.finding
    negated = False
    if kind == "yes_no" and _HEALTHY.search(q) and not finding:
        finding, negated = "abnormality", True
    if kind == "yes_no" and not (finding or subj.organ or attribute):
        finding = label_key(_fallback_subject(normalise_text(text))) or None
    describe = kind == "open" and (first in _IMPERATIVE or (not finding and not subj.organ and bool(_DESCRIBE.search(q))))
    if kind == "open" and not (describe or finding or subj.organ):
        finding = label_key(_fallback_subject(normalise_text(text))) or None  # no tool names it: abstain early
    fields = {"finding": finding, "organ": subj.organ, "side": subj.side, "quantities": list(subj.quantities),
              "organs": list(subj.organs) if kind == "measurement" else []} | kw
    if kind != "measurement" and kind != "open":
        fields["quantities"] = []
    if attribute:
        fields.update(finding=None, quantities=[])
        fields["attributes"] = list(dict.fromkeys([attribute, *subj.attributes])) if kind == "attribute" else [attribute]
        if attribute != "organ":
            fields["organ"] = None
    allowed = ["yes", "no"] if kind == "yes_no" else list(choices)
    out = Question(text=text, kind=kind, answer_kind=ANSWER_KIND[kind], attribute=attribute, attribute_value=value,
                   choices=choices, allowed=allowed, negated=negated, describe=describe, **fields)
    out.subject = out.subject_obj().text or ("the findings" if describe else "")
    return out
