"""Question understanding: what kind of answer the question wants, what it is about, and where. Deterministic rules.

    kind         wants                                     e.g.
    yes_no       yes | no                                  "Is there free air under the diaphragm?"
    choice       one of the options the question names     "Was a CT or an MRI used?", "left or right?"
    count        a whole number                            "How many nodules are there?"
    measurement  a number with a unit                      "How large is the lesion?", "What is the CTR?"
    location     where (side, zone, organ, quadrant)       "Where is the mass?", "What lobe is the lesion in?"
    attribute    a study attribute (modality, plane, body region, MR weighting, organ)
                                                           "What modality is this?", "Which plane?"
    open         a phrase or a description                 "Describe the findings", "What diseases are seen?"

The question is read as a sentence, not as a bag of keywords:

* the **subject** is the noun phrase the question asks about - after an existential lead ("is there", "any",
  "do you see", "does the patient have", "evidence of") or the subject of a predication ("Is the heart enlarged?",
  "Are the lungs normal?") - and is classified by its *head*: a known finding ("right pleural effusion" ->
  effusion, side right), a structure ("both kidneys" -> kidney), or, when the head is a word the vocabulary does not
  know, the whole phrase as an unknown finding ("small bowel obstruction", "free air", "vascular pathology"): an
  organ inside it is its location, never its subject, so the organ segmenter finding no small bowel cannot answer
  "is there a small-bowel obstruction?";
* the **location** qualifier is the object of a locative preposition ("in the abdomen", "under the diaphragm", "of
  the left lung") or an organ modifier of a finding ("hepatic lesion"); a body region, modality or plane word there
  is a place, never the subject;
* a **study attribute** (modality, plane, body region, weighting, contrast) is the subject only where the question
  predicates it of the study: "Is this a CT?", "Was this taken in the axial plane?", "Was a CT or MRI used?";
  "Are the lateral ventricles visible?" is about a structure, "Is there vascular pathology?" about a finding;
* **negation**: "Is the liver normal?" / "Is this a normal x-ray?" ask about an abnormality with yes = absent;
* **comparisons** are kept ("less than half the width of the chest"); the one a tool can decide is turned into a
  stated rule ("cardiac silhouette less/more than half the chest width" -> cardiothoracic ratio < / > 0.5).

`sure` says whether every part of the sentence was accounted for by these patterns; where not, intake may ask the
planner's model for a schema-constrained reading (agent/engine/reading.py) and records which reading it used.
The vocabulary (agent/core/vocab.py) is shared with the tools' labels.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, Field

from agent.core.vocab import (
    ALIASES,
    ATTRIBUTE_VALUES,
    DEVICES,
    FINDINGS,
    ORGAN_ADJECTIVES,
    ORGANS,
    REGIONS,
    SIDES,
    Subject,
    attribute_value_in,
    label_key,
    normalise_text,
    subject_of,
    words,
)

QuestionKind = Literal["yes_no", "choice", "count", "measurement", "location", "attribute", "open"]
AnswerKind = Literal["yes_no", "choice", "count", "measurement", "location", "phrase"]
SubjectType = Literal["finding", "structure", "device", "attribute", "quantity", "findings", ""]
ANSWER_KIND: dict[str, AnswerKind] = {"yes_no": "yes_no", "choice": "choice", "count": "count",
                                      "measurement": "measurement", "location": "location", "attribute": "phrase",
                                      "open": "phrase"}

_YES_NO_START = {"is", "are", "does", "do", "did", "can", "could", "was", "were", "has", "have", "had", "will", "would",
        "should", "shall", "may", "might", "isn", "aren", "doesn", "any"}
_MEASURE = re.compile(r"\b(composition|how (large|big|long|wide|thick|much)|what (is|are) the (size|diameter|area|volume|"
                      r"ratio|width|length|density|cardiothoracic ratio|ctr)|measure|size of|diameter of|ratio)\b")
_LOCATION = re.compile(r"\b(where|which side|what side|which lobe|what lobe|which quadrant|what quadrant|in which part|"
                       r"which part of the (lung|liver|brain|abdomen|chest)|what part of the (lung|liver|brain)|"
                       r"which (region|area|zone|segment) of|what (region|area|zone|segment) of|"
                       r"located|location|position of|in which|in what)\b")
_ABNORMAL = re.compile(r"\b(abnormal\w*|diseased?|lesions?|affected|injur\w*|tumou?rs?|cancers?|sick|unhealthy)\b")
_SIZE_RANK = re.compile(r"\b(largest|biggest|bigger|larger|smallest|smaller)\b")
_ORGAN_ID = re.compile(r"\b(organ|organs|structure)\b(?! system)")
_IMPERATIVE = {"segment", "measure", "detect", "find", "locate", "outline", "quantify", "show", "list", "classify",
               "describe", "analyse", "analyze", "assess", "evaluate", "summarize", "summarise", "report", "identify",
               "name"}
_DESCRIBE = re.compile(r"\b(describe|description|findings?|what do you see|what can you see|what is seen|what is shown|"
                       r"summar\w*|quantify|analy[sz]e|report|assess|evaluate|interpret)\b")
_GENERIC_TAIL = {"image", "images", "scan", "picture", "one", "film", "study", "photo", "view", "radiograph", "section",
                 "slice", "exam", "examination", "patient", "here", "above", "below", "shown", "this", "that", "it"}
_DET = {"a", "an", "the", "this", "these", "those", "that", "any", "some", "its", "their", "his", "her", "patient s",
        "our", "your",
        "patients", "all"}
# words that may stand before a finding without changing what it is ("a large right pleural effusion")
_MODIFIERS = {"small", "large", "big", "tiny", "huge", "massive", "multiple", "single", "new", "old", "acute", "chronic",
              "focal", "diffuse", "bilateral", "unilateral", "possible", "obvious", "significant", "evidence", "any",
              "definite", "apparent", "visible", "mild", "moderate", "severe", "subtle", "several", "many", "few",
              "both", "left", "right", "upper", "lower", "middle", "medial", "lateral", "anterior", "posterior",
              "superior", "inferior", "central", "peripheral", "solitary", "prominent", "enlarged", "well", "defined",
              "circumscribed", "round", "rounded", "ill", "irregular", "abnormal", "suspicious", "hyperdense",
              "hypodense", "hyperintense", "hypointense", "dense", "some", "an", "a", "the", "one", "two", "there",
              "s", "l", "r", "main", "primary", "secondary", "areas", "area", "of"}
# predicates of a structure: "Is the heart enlarged?", "Are the lungs normal?", "Is the liver visible?"
_NORMAL = {"normal", "healthy", "unremarkable", "normally", "ok", "fine", "intact", "normal appearing", "normal looking",
           "normal in size", "normal size", "normal sized", "of normal size", "within normal limits", "normal in appearance"}
_ABNORMAL_PRED = {"abnormal", "diseased", "unhealthy", "abnormally", "affected", "pathologic", "pathological"}
_ENLARGED = {"enlarged", "dilated", "large", "big", "increased in size", "bigger than normal", "larger than normal",
             "distended", "prominent", "hypertrophied", "hypertrophic", "dilatated", "expanded", "too big", "too large"}
_PRESENT = {"visible", "seen", "present", "shown", "identified", "noted", "visualized", "visualised", "included",
            "depicted", "there", "evident", "apparent", "demonstrated", "observed", "seen here", "visualize", "captured",
            "pictured", "appreciated", "detected", "displayed", "in view", "in the image", "in this image", "imaged",
            "found", "contained", "represented", "exist", "existing", "identifiable", "in place", "in situ", "in position",
            "appreciable", "seen on this image", "visible on this image"}
# a structure's predicate that names a finding ("Is the skull fractured?" asks about a fracture of the skull)
_PRED_FINDING = {"fractured": "fracture", "broken": "fracture", "herniated": "herniation", "herniating": "herniation",
                 "thickened": "thickening", "calcified": "calcification", "edematous": "edema", "oedematous": "edema",
                 "infiltrating": "infiltration", "infiltrated": "infiltration", "enhancing": "enhancement",
                 "enhance": "enhancement", "enhanced": "enhancement", "contrast enhancing": "enhancement",
                 "obstructed": "obstruction", "distended": "distension", "collapsed": "collapse",
                 "deviated": "deviation", "shifted": "deviation", "displaced": "displacement", "compressed": "compression",
                 "inflamed": "inflammation", "infected": "infection", "perforated": "perforation", "ruptured": "rupture",
                 "occluded": "occlusion", "narrowed": "stenosis", "stenotic": "stenosis", "hemorrhagic": "hemorrhage",
                 "atrophic": "atrophy", "atrophied": "atrophy", "consolidated": "consolidation", "opacified": "opacification",
                 "dilated": "dilation", "cystic": "cyst", "necrotic": "necrosis", "thrombosed": "thrombosis",
                 "infarcted": "infarct", "hyperinflated": "hyperinflation", "overinflated": "hyperinflation",
                 "crossed the midline": "midline shift", "cross the midline": "midline shift",
                 "crossing the midline": "midline shift", "shifted across the midline": "midline shift",
                 "hyperdense": "hyperdensity", "hypodense": "hypodensity", "hyperintense": "hyperintensity",
                 "hypointense": "hypointensity", "hyperattenuating": "hyperattenuation",
                 "hyper attenuated": "hyperattenuation", "hyperattenuated": "hyperattenuation",
                 "heterogenous": "heterogeneity", "heterogeneous": "heterogeneity"}
# predicates of normality in other words: yes means the finding is absent ("Is the trachea midline?")
_PRED_NEGATED = {"midline": "deviation", "symmetric": "asymmetry", "symmetrical": "asymmetry", "sharp": "blunting",
                 "patent": "occlusion", "well differentiated": "loss of differentiation", "preserved": "loss",
                 "clear": "opacity", "straight": "deviation", "aligned": "malalignment", "in normal position": "displacement"}
_ADJECTIVE_OF = {"trachea": "tracheal", "ventricle": "ventricular", "kidney": "renal", "liver": "hepatic",
                 "lung": "pulmonary", "heart": "cardiac", "brain": "cerebral", "costophrenic angle": "costophrenic angle",
                 "vessel": "vascular", "spleen": "splenic", "pancreas": "pancreatic", "stomach": "gastric",
                 "colon": "colonic", "aorta": "aortic", "bowel": "bowel", "small bowel": "small bowel"}
_ENLARGED_FINDING = {"heart": "cardiomegaly", "cardiac silhouette": "cardiomegaly", "heart size": "cardiomegaly",
                     "cardiac": "cardiomegaly", "heart shadow": "cardiomegaly", "cardiac shadow": "cardiomegaly",
                     "cardiomediastinal silhouette": "cardiomegaly", "cardiac size": "cardiomegaly"}
_LOC_PREPS = ("to the left of", "to the right of", "on the left side of", "on the right side of", "adjacent to",
              "posterior to", "anterior to", "lateral to", "medial to", "superior to", "inferior to", "next to",
              "in front of", "on top of", "out of", "underneath", "beneath", "within", "inside", "throughout",
              "between", "involving", "along", "around", "behind", "below", "above", "under", "near", "over", "into",
              "from", "in", "on", "at", "of", "across", "through", "to")
_PATHOLOGY_NOUNS = {"enlargement", "dilation", "dilatation", "obstruction", "perforation", "thickening", "widening",
                    "narrowing", "stenosis", "occlusion", "rupture", "injury", "damage", "infarction", "atrophy",
                    "herniation", "displacement", "deviation", "shift", "compression", "distension", "distention",
                    "inflammation", "infection", "involvement", "abnormality", "abnormalities", "pathology", "disease",
                    "lesion", "lesions", "mass", "masses", "tumor", "fracture", "fractures", "hemorrhage", "bleed",
                    "collapse", "opacification", "calcification", "calcifications", "edema", "swelling", "stone",
                    "stones", "cyst", "cysts", "nodule", "nodules", "effusion", "consolidation", "air", "fluid", "gas"}
_COMPARE = re.compile(r"\b((?:less|more|greater|smaller|larger|bigger|wider|narrower|longer|shorter|higher|lower)"
                      r"\s+than\b.*|(?:under|over|above|below|at least|at most|exceeds?)\s+(?:half|one half|\d+(?:\.\d+)?"
                      r"\s*(?:cm|mm|%|percent)?).*)$")
_HALF = re.compile(r"\b(half|one half|50 ?%|50 percent|0 5)\b")
_CHEST_WIDTH = re.compile(r"\b(chest|thorax|thoracic|rib cage|hemithorax|thoracic cavity)\b")
_HEART_WORDS = {"heart", "cardiac silhouette", "cardiac shadow", "heart shadow", "heart size", "cardiac width",
                "cardiac diameter", "cardiomediastinal silhouette", "width of the heart", "heart width", "cardiac size"}
_STUDY_NP = {"this", "it", "image", "this image", "the image", "scan", "this scan", "the scan", "film", "this film",
             "study", "this study", "picture", "this picture", "the picture", "the film", "the study", "this x ray",
             "x ray", "this radiograph", "radiograph", "the radiograph", "this ct", "this mri", "this section",
             "section", "the section", "this slice", "this exam", "the exam", "photo", "this photo", "patient",
             "this patient", "the patient", "these images", "the images", "view", "this view", "the view"}
_STUDY_VERBS = re.compile(r"^(taken|obtained|acquired|done|performed|made|imaged|captured|shot|scanned|oriented|"
                          r"positioned|displayed|shown|presented|viewed|seen|cut|sliced|reconstructed)\b\s*"
                          r"(?:(with|using|by|in|on|via|through|as|from)\b)?\s*(?:(a|an|the)\b)?\s*")
_CONTRAST = re.compile(r"\b(contrast|enhanced|enhancement|gadolinium|iodinated|with iv|intravenous contrast)\b")


class Question(BaseModel):
    """The question as the agent understood it; recorded in the state, the trace and the report."""

    text: str
    kind: QuestionKind
    answer_kind: AnswerKind
    subject: str = ""  # in words: "aortic aneurysm", "modality", "longest diameter of lesion"
    subject_type: SubjectType = ""  # finding | structure | device | attribute | quantity | findings
    finding: str | None = None
    organ: str | None = None  # the structure asked about, or the organ a finding is asked about in
    side: str | None = None
    location: str | None = None  # the location qualifier in words ("under the diaphragm", "left lung", "abdomen")
    quantities: list[str] = Field(default_factory=list)  # measurement names that answer it
    organs: list[str] = Field(default_factory=list)  # every organ or tissue named ("fat, soft tissue and bone")
    attributes: list[str] = Field(default_factory=list)  # every study attribute named ("spacing and intensity range")
    attribute: str | None = None  # modality | plane | body_region | mr_weighting | organ | contrast | ...
    attribute_value: str | None = None  # the value a closed attribute question names ("CT")
    choices: list[str] = Field(default_factory=list)
    allowed: list[str] = Field(default_factory=list)  # the values an answer may take (closed questions)
    negated: bool = False  # "Is the lung healthy?": yes means the finding is absent
    comparison: str | None = None  # "less than half the width of the chest"
    also: dict[str, str] = Field(default_factory=dict)  # further study attribute values a yes/no asserts ("Is this a
    # chest CT?": attribute body_region chest, also modality CT): "yes" needs each of them, one that differs is "no"
    rule: str | None = None  # a stated rule turning a measurement into yes/no: "cardiothoracic_ratio < 0.5"
    describe: bool = False  # an open request for the findings, with no particular subject
    sure: bool = True  # every part of the sentence was accounted for by the rules
    unsure_why: str = ""
    reading: str = "rules"  # how it was read: "rules" | "learned" | "model" (agent/engine/reading.py)
    wording: float | None = None  # similarity to the nearest question the answer calibration was measured on (a
    # question-answering tool's bank, Tool.question_scope); None where no applicable tool has one

    def subject_obj(self) -> Subject:
        return Subject(finding=self.finding, organ=self.organ, side=self.side, quantities=tuple(self.quantities),
                       attribute=self.attribute, attribute_value=self.attribute_value, organs=tuple(self.organs),
                       attributes=tuple(self.attributes))


# -- phrases -----------------------------------------------------------------------------------------------------
def _toks(phrase: str) -> list[str]:
    return phrase.split()


def _strip_det(phrase: str) -> str:
    toks = _toks(phrase)
    while toks and (toks[0] in _DET or toks[0] in ("of", "for", "with")):
        toks.pop(0)
    while toks and toks[-1] in _GENERIC_TAIL | {"a", "an", "the", "in", "on", "at", "of", "seen", "visible", "present"}:
        toks.pop()
    return " ".join(toks)


def _strip_tail(phrase: str) -> str:
    toks = [t for t in phrase.split() if t not in ("a", "an", "the")]
    while toks and toks[-1] in _GENERIC_TAIL:
        toks.pop()
    return " ".join(toks)


def _longest(text: str, vocab) -> str | None:
    padded = f" {text} "
    hits = [v for v in vocab if f" {v} " in padded]
    return max(hits, key=len) if hits else None


def _ends_with(text: str, vocab) -> str | None:
    padded = f" {text}"
    hits = [v for v in vocab if padded.endswith(f" {v}")]
    return max(hits, key=len) if hits else None


def split_location(phrase: str) -> tuple[str, str | None]:
    """(the head phrase, the location qualifier) of a noun phrase: "free air under the diaphragm" -> ("free air",
    "under the diaphragm"); "fracture of the left femur" -> ("fracture", "of the left femur"). "of" splits only after a
    finding or a pathology noun ("size of the heart" is one phrase)."""
    toks = _toks(phrase)
    for i in range(1, len(toks)):
        for prep in _LOC_PREPS:
            p = prep.split()
            if toks[i:i + len(p)] != p:
                continue
            head, rest = " ".join(toks[:i]), " ".join(toks[i + len(p):])
            if not rest or not head:
                continue
            if prep == "of" and not (_ends_with(head, FINDINGS) or toks[i - 1] in _PATHOLOGY_NOUNS):
                break
            if not (_place(rest) or _LOCNOUN.search(rest) or (prep in ("in", "within", "inside", "near", "around",
                                                                         "adjacent to") and
                                                                _ends_with(_strip_det(rest), FINDINGS))):
                continue
            if rest.split()[0] in ("contrast", "this", "it"):
                break
            return head, f"{prep} {_strip_det(rest)}" if rest.split()[0] in ("their", "his", "her", "its") else \
                f"{prep} {rest}"
    return phrase, None


_LOCNOUN = re.compile(r"\b(upper|lower|middle|quadrant|lobe|side|region|zone|base|apex|apices|hilum|hila|wall|border|"
                      r"margin|edge|aspect|pole|level|midline|periphery|cavity|space|fossa|hemisphere|field|fields)\b")


def _place(text: str) -> str | None:
    """The organ, region or side a location phrase names."""
    t = normalise_text(text)
    return _longest(t, ORGANS) or _longest(t, tuple(REGIONS)) or _longest(t, SIDES) or \
        _longest(t, tuple(ORGAN_ADJECTIVES))


def location_organ(location: str | None) -> tuple[str | None, str | None]:
    """(organ, side) a location phrase names, in vocabulary terms."""
    if not location:
        return None, None
    t = normalise_text(location)
    organ = _longest(t, ORGANS)
    if organ is None:
        adj = _longest(t, tuple(ORGAN_ADJECTIVES))
        organ = ORGAN_ADJECTIVES.get(adj) if adj else None
    side = next((s for s in SIDES if f" {s} " in f" {t} "), None)
    if organ and organ.split()[0] in SIDES:
        side, organ = organ.split()[0], organ.split(" ", 1)[1]
    return organ, side


class Phrase(BaseModel):
    """A noun phrase as a subject: what kind of thing, its canonical name, and the location it carries."""

    kind: SubjectType
    name: str
    organ: str | None = None  # a structure's name, or the organ modifier of a finding
    side: str | None = None
    location: str | None = None
    known: bool = True  # in the vocabulary


def classify_np(np_text: str) -> Phrase:
    """The subject a noun phrase names, by its head (module docstring)."""
    phrase = _strip_det(normalise_text(np_text))
    head, loc = split_location(phrase)
    head = _strip_det(head)
    loc_organ, loc_side = location_organ(loc)
    toks = _toks(head)
    side = next((s for s in SIDES if s in toks), None) or loc_side
    if not head:
        return Phrase(kind="", name="", location=loc, organ=loc_organ, side=side, known=False)
    if head in DEVICES or (dev := _ends_with(head, DEVICES)) and _mods_only(head, dev):
        return Phrase(kind="device", name=DEVICES.get(head) or DEVICES[dev], location=loc, organ=loc_organ, side=side)
    if re.fullmatch(r"(\w+)\s+(tissue|parenchyma)", head) and (o := ORGAN_ADJECTIVES.get(head.split()[0])):
        return Phrase(kind="structure", name=o, organ=o, side=side, location=loc)  # "hepatic parenchyma": the liver
    if fnd := _ends_with(head, FINDINGS):
        if _mods_only(head, fnd):
            organ = _organ_modifier(head[: len(head) - len(fnd)]) or loc_organ
            if organ and f"{organ} {fnd}" in FINDINGS:  # "cerebral edema" is the known finding "brain edema"
                return Phrase(kind="finding", name=f"{organ} {fnd}", organ=organ, side=side, location=loc)
            name = "edema" if fnd == "oedema" else fnd
            where = loc or (_organ_words(head[: len(head) - len(fnd)]) or None)
            return Phrase(kind="finding", name=name, organ=organ, side=side, location=where)
    if org := _ends_with(head, ORGANS):
        if _mods_only(head, org, allow=SIDES + ("both", "bilateral", "the", "a", "an", "any", "two", "all")):
            o_side = org.split()[0] if org.split()[0] in SIDES else side
            o = org.split(" ", 1)[1] if org.split()[0] in SIDES and org not in ("left", "right") else org
            return Phrase(kind="structure", name=o, organ=o, side=o_side, location=loc)
    # "lung has diffuse opacification", "image use gi contrast": a clause inside the phrase - its object is the subject,
    # the thing before the verb where it is (unless that is the study itself)
    if (cl := _CLAUSE.search(head)) and cl.start() > 0 and cl.group(2).strip():
        obj = classify_np(cl.group(2))
        before = _strip_det(head[: cl.start()].strip())
        if before and not re.search(r"\b(image|images|scan|film|study|picture|x ray|xray|radiograph|ct|mri|plane|view|"
                                    r"this|it|section|slice|you|we|patient)\b", before):
            b_organ = _organ_modifier(before)
            obj = obj.model_copy(update={"location": obj.location or before, "organ": obj.organ or b_organ,
                                         "side": obj.side or side})
        return obj
    # a head the vocabulary does not know: the whole phrase is the subject; an organ inside it is its location
    organ = _organ_modifier(head) or loc_organ
    where = loc or (_organ_words(head) or None)
    name = label_key(head)
    return Phrase(kind="finding", name=name, organ=organ, side=side, location=where, known=False)


_CLAUSE = re.compile(r"\b(has|have|had|show|shows|showing|contain|contains|containing|use|uses|using|represent|"
                     r"represents|detect|detects|demonstrate|demonstrates|reveal|reveals|indicate|indicates|suggest|"
                     r"suggests|with)\s+(?:(?:an?|the|any|some)\s+)?(.+)$")


def _mods_only(head: str, tail: str, allow: tuple[str, ...] | None = None) -> bool:
    """Whether everything before `tail` in `head` is a modifier (size, side, count, organ) - "large right effusion"."""
    pre = head[: len(head) - len(tail)].split()
    ok = set(allow) if allow is not None else _MODIFIERS
    return all(w in ok or (allow is None and (w in ORGAN_ADJECTIVES or f" {w} " in " ".join(f" {o} " for o in ORGANS)))
               for w in pre)


def _organ_modifier(text: str) -> str | None:
    t = f" {normalise_text(text)} "
    if org := _longest(t.strip(), ORGANS):
        return org.split(" ", 1)[1] if org.split()[0] in SIDES and " " in org else org
    adj = _longest(t.strip(), tuple(ORGAN_ADJECTIVES))
    return ORGAN_ADJECTIVES.get(adj) if adj else None


def _organ_words(text: str) -> str:
    t = normalise_text(text)
    return _longest(t, ORGANS) or _longest(t, tuple(ORGAN_ADJECTIVES)) or ""


# -- choices -----------------------------------------------------------------------------------------------------
_OPTION_STOP = {"used", "to", "in", "on", "for", "taken", "seen", "shown", "present", "visible", "of", "than", "this",
                "image", "scan", "film", "picture", "view", "side", "here", "above", "study", "obtained",
                "acquired", "performed", "done", "appear", "appearing", "imaging", "technique", "modality", "with",
                "lesion", "mass", "located", "the", "is", "are", "was", "were", "larger", "smaller", "bigger",
                "biggest", "largest", "smallest", "look", "looks", "appears", "seem", "seems"}


def _cut_option(text: str, keep: int | None = None) -> str:
    """An option as the question words it, cut at the first word that is not part of it ("mri used to take" -> "mri")."""
    toks = [t for t in text.split() if t not in ("a", "an", "the")]
    out = []
    for t in toks:
        if t in _OPTION_STOP and out:
            break
        if t in _OPTION_STOP:
            continue
        out.append(t)
    if keep is not None:
        out = out[:keep]
    return _strip_tail(" ".join(out))


def _choices(q: str) -> list[str]:
    """The options of an "A or B" question, as the question words them."""
    body = q.rstrip(" ?")
    left, _, right = body.partition(" or ")
    right = _cut_option(right.split(",")[0].strip())
    if not right or right in ("not", "no", "none"):
        return []
    n = max(1, len(right.split()))
    if "," in left:  # "liver, spleen or kidney"
        parts = [p.strip() for p in left.split(",")]
        head = _strip_tail(_lead_strip(parts[0]))
        first = head if 0 < len(head.split()) <= n and not re.search(r"\b(which|what|is|are|in|this)\b", head) \
            and parts[0].split()[0] not in ("which", "what") else ""
        opts = [first] + [_cut_option(x) for x in parts[1:]]
        opts = [(o if o.split()[0] in SIDES or len(o.split()) <= 2 else " ".join(o.split()[-n:])) for o in opts
                if o and len(o.split()) <= n + 1
                and not _SIZE_RANK.fullmatch(o) and not _ABNORMAL.fullmatch(o)]
        opts = [o for o in opts if o and o not in ("a", "an", "the")]
        return opts + [right] if opts else []
    lw = [t for t in _lead_strip(left).split() if t not in ("a", "an", "the")]
    a = " ".join(lw[-n:]) if lw else ""
    if len(lw) > n and lw[-n - 1] in SIDES and a not in SIDES:  # "left kidney or spleen"
        a = f"{lw[-n - 1]} {a}"
    rt = right.split()
    if len(rt) == 2 and rt[-1] in ("plane", "section", "lobe", "lung", "kidney", "side", "breast", "hemisphere") and \
            lw and lw[-1] not in (rt[0], rt[-1]):
        a = f"{lw[-1]} {rt[-1]}"  # "the axial or sagittal plane", "in the left or right lung": the noun is shared
    return [a, right] if a and a != right else []


_LEAD_RE = re.compile(r"^(?:(?:is|are|was|were|does|do|did|can|could|has|have|had|will|would|should)\s+)?"
                      r"(?:(?:there|this|these|it|you|we|the|patient|image|scan|film|study|view)\s+)*"
                      r"(?:(?:taken|obtained|acquired|done|performed|made|imaged|seen|shown|located)\s+)?"
                      r"(?:(?:with|using|by|in|on|via|at|as)\s+)?(?:(?:a|an|the|any)\s+)?")


def _lead_strip(left: str) -> str:
    if left.split() and left.split()[0] in ("which", "what"):
        left = re.sub(r"^(which|what)\b.*?(,|\b(is|are|was|were)\b)\s*", "", left)
    return _LEAD_RE.sub("", left).strip()


# -- yes/no questions ----------------------------------------------------------------------------------------------
_EXIST = re.compile(
    r"^(?:is|are|was|were)\s+there\s+(?:any\s+)?(?:evidence\s+of\s+|signs?\s+of\s+|presence\s+of\s+)?|"
    r"^any\s+(?:evidence\s+of\s+|signs?\s+of\s+)?|"
    r"^(?:is|are)\s+(?:there\s+)?(?:evidence|signs?)\s+of\s+|"
    r"^(?:do|can|could|did)\s+(?:you|we|i|one)\s+(?:see|identify|appreciate|visualize|detect|find|note|notice|spot|"
    r"observe)\s+(?:any\s+)?(?:evidence\s+of\s+|signs?\s+of\s+)?|"
    r"^(?:does|do|did)\s+(?:the\s+|this\s+)?(?:patient|patients|individual|person|subject|man|woman|child|he|she)\s+"
    r"(?:have|has|show|demonstrate|suffer\s+from|present\s+with|exhibit)\s+(?:any\s+)?(?:evidence\s+of\s+|signs?\s+of\s+)?|"
    r"^(?:does|do|did)\s+(?:the\s+|this\s+)?(?:image|images|scan|film|study|picture|radiograph|x\s+ray|ct|mri|section|"
    r"slice|exam|it|photo|view)\s+(?:show|shows|have|contain|demonstrate|reveal|depict|display|include|suggest|"
    r"indicate|exhibit|capture|present|represent|use)\s+(?:any\s+)?(?:evidence\s+of\s+|signs?\s+of\s+)?|"
    r"^(?:does|do|did|could|can|would|might)\s+(?:this|these|it)\s+(?:be\s+)?(?:represent|show|suggest|indicate|"
    r"demonstrate|reveal|use|depict)\s+(?:an?\s+|any\s+)?|"
    r"^(?:is|are)\s+(?:there\s+)?(?:an?\s+)?(?:finding|findings)\s+of\s+|"
    r"^(?:has|have|had)\s+(?:there\s+been\s+)?(?:the\s+patient\s+)?(?:had\s+|developed\s+)?|"
    r"^(?:is|are)\s+(?:an?\s+)?(?:evidence|sign)\s+of\s+|"
    r"^is\s+it\s+possible\s+to\s+(?:see|identify|visualize|detect)\s+|"
    r"^(?:does|do|did)\s+(?:the\s+|this\s+)?(?:\w+\s+){0,2}(?:image|images|scan|film|study|picture|radiograph|x\s+ray|"
    r"xray|ct|mri|cxr|section|slice|exam)\s+(?:show|shows|have|contain|demonstrate|reveal|depict|display|include|"
    r"suggest|indicate)\s+(?:any\s+)?(?:evidence\s+of\s+|signs?\s+of\s+)?")
_STUDY_LEAD = re.compile(r"^(?:is|was|are|were)\s+(?:this|the|these|it)?\s*(?:image|images|scan|film|study|picture|"
                         r"radiograph|section|slice|exam|photo|view|patient|modality)?\s*(?:above\s+)?")


def _yes_no_reading(q: str) -> dict:
    """Subject, location, negation, comparison and attribute of a yes/no question (q: lower-case words)."""
    body = q
    mhas = re.match(r"^(has|have)\s+(?:the\s+)?(.+?)\s+(\w+ed)$", body)
    if mhas and mhas.group(3) in _PRED_FINDING:
        return {"np": mhas.group(2), "pred": mhas.group(3), "form": "copula"}
    m = _EXIST.match(body)
    if m and m.group(0).strip():
        rest = body[m.end():]
        rest = re.sub(r"(\s+(?:present|seen|visible|noted|shown|identified|depicted|evident|demonstrated|visualized|"
                      r"observed|appreciated|detected|here))?(\s+(?:in|on|within)\s+(?:this|the|these)\s+(?:\w+\s+){0,2}"
                      r"(?:image|images|study|scan|film|picture|radiograph|x ray|ct|mri|cxr|section|slice|exam))?$", "", rest)
        rest = re.sub(r"^(?:more than|more that|at least|greater than|over|>|fewer than|less than)?\s*(?:one|\d+)\s+", "",
                      rest)
        if re.match(r"^(?:iv\s+|intravenous\s+|oral\s+)?contrast\b", rest):
            return {"np": rest, "form": "study"}
        return {"np": rest, "form": "exist"}
    # "is this (image) (a|an) X" / "was this taken with X" / "was X used": predicated of the study
    first_two = " ".join(body.split()[:2])
    body = re.sub(r"^(?:would|could|can|do|did)\s+(?:you|we|one)\s+(?:call|describe|consider|classify|label|read)\s+"
                  r"(this|it|the\s+\w+)\s+(?:as\s+)?", r"is \1 ", body)  # "Would you call this a CT scan?"
    used = re.match(r"^(?:was|were|is|are|has|have)\s+(?:an?\s+|the\s+)?(.+?)\s+(?:been\s+)?(?:used|performed|employed|"
                    r"done|applied|utilized|utilised)\b", body)
    if used and attribute_value_in(used.group(1), "modality") and len(used.group(1).split()) <= 3:
        return {"np": used.group(1), "form": "study"}  # "Was magnetic resonance used for this image?"
    region = re.match(r"^(?:was|were|is|are)\s+(?:the\s+)?(\w+(?:\s+\w+)?)\s+(?:the\s+region\s+|the\s+area\s+)?"
                      r"(?:imaged|scanned|shown|studied|examined|covered)\b", body)
    if region and attribute_value_in(region.group(1), "body_region"):
        return {"np": region.group(1), "form": "study"}  # "Was the head imaged in this study?"
    if re.match(r"^(is|was|are|were)\s+(this|these|it)\b", body) or \
            re.match(r"^(is|was|are|were)\s+the\s+(image|images|scan|film|study|picture|radiograph|section|slice|exam|"
                     r"photo|view|modality)\b", body):
        rest = _STUDY_LEAD.sub("", body, count=1)
        rest = re.sub(r"^(an?|the)\s+", "", rest)
        rest = _STUDY_VERBS.sub("", rest)
        rest = re.sub(r"^(an?|the)\s+", "", rest)
        if rest.startswith("without "):  # "Was this taken without motion artifact?": yes = the artifact is absent
            return {"np": rest[8:], "form": "exist", "negated": True}
        return {"np": rest, "form": "study"}
    if re.match(r"^(was|were|is|are|has|have)\s+(an?\s+|the\s+)?(iv\s+|intravenous\s+|oral\s+)?contrast\b", body) or \
            re.match(r"^(was|were|is)\s+(an?\s+|the\s+)?(ct|mri|mr|x ray|ultrasound|pet|radiograph)\s+(used|performed|"
                     r"done|taken|obtained)", body):
        return {"np": re.sub(r"^(was|were|is|are|has|have)\s+(an?\s+|the\s+)?", "", body), "form": "study"}
    # "does the heart appear enlarged?", "do the lungs look normal?"
    mv = re.match(r"^(does|do|did)\s+(.+?)\s+(appear|appears|look|looks|seem|seems|exist|exists|show up)\b\s*"
                  r"(?:to\s+be\s+)?(.*)$", body)
    if mv:
        pred = mv.group(4) or "present"
        if mv.group(3).startswith("exist") and not attribute_value_in(pred, "body_region"):
            pred = "present"
        return {"np": mv.group(2), "pred": pred, "form": "copula"}
    mh = re.match(r"^(does|do|did)\s+(.+?)\s+(have|has|contain|contains|show|shows|demonstrate|involve|involves|extend|"
                  r"extends|cross|crosses|enhance|enhances|compress|invade|invades|affect|affects|displace)\b\s*(.*)$", body)
    if mh:
        verb = mh.group(3)
        if verb.startswith(("enhance", "extend", "cross", "compress", "invade", "involve", "affect", "displace")):
            return {"np": mh.group(2), "pred": f"{verb} {mh.group(4)}", "form": "copula", "unsure": True}
        return {"np": mh.group(4), "loc_np": mh.group(2), "form": "exist"}
    mhas = re.match(r"^(has|have)\s+(?:the\s+)?(.+?)\s+(\w+ed)$", body)
    if mhas and mhas.group(3) in _PRED_FINDING:
        return {"np": mhas.group(2), "pred": mhas.group(3), "form": "copula"}
    mc = re.match(r"^(?:can|could)\s+(?:the\s+|a\s+|an\s+)?(.+?)\s+be\s+(seen|visualized|identified|appreciated|"
                  r"detected|found|noted|observed|ruled out|excluded)\b(.*)$", body)
    if mc:
        return {"np": mc.group(1) + (f" {mc.group(3).strip()}" if mc.group(3).strip() else ""), "form": "exist",
                "negated": mc.group(2) in ("ruled out", "excluded")}
    # copula: "is|are (the) NP PRED"
    mcop = re.match(r"^(?:is|are|was|were)\s+(.*)$", body)
    if mcop:
        return {"np_pred": mcop.group(1), "form": "copula"}
    return {"np": re.sub(r"^\w+\s+", "", body), "form": "unknown", "unsure": True, "why": f"no pattern for {first_two!r}"}


_PRED_WORDS = sorted(_NORMAL | _ABNORMAL_PRED | _ENLARGED | _PRESENT | set(_PRED_FINDING) | set(_PRED_NEGATED),
                     key=len, reverse=True)


def _split_np_pred(text: str) -> tuple[str, str]:
    """ "the heart enlarged" -> ("the heart", "enlarged"); "the lesion in the liver" -> ("the lesion", "in the liver");
    "the cardiac silhouette less than half the width of the chest" -> (..., "less than half ...")."""
    if cm := _COMPARE.search(text):
        return text[: cm.start()].strip(), cm.group(0)
    text = re.sub(r"\b(well|clearly|easily|adequately|fully|partially|properly|entirely|completely|readily)\s+"
                  r"(?=(visualized|visualised|seen|visible|identified|depicted|shown|demonstrated|included|imaged)\b)", "",
                  text)
    toks = text.split()
    for i in range(1, len(toks)):  # the first word after the noun phrase that starts a predicate
        rest = " ".join(toks[i:])
        if any(rest == p or rest.startswith(p + " ") for p in _PRED_WORDS):
            return " ".join(toks[:i]), rest
        if toks[i] in ("located", "situated", "seen", "found", "positioned", "placed", "noted") and i >= 1:
            return " ".join(toks[:i]), rest
        if toks[i].endswith("ed") and i >= 1 and toks[i] not in ("enlarged",) and \
                not _longest(" ".join(toks[:i + 1]), FINDINGS + ORGANS) == " ".join(toks[:i + 1]).split(" ", 1)[-1]:
            return " ".join(toks[:i]), rest
    head, loc = split_location(text)
    if loc:
        return head, loc
    return text, ""


def _singular(phrase: str) -> str:
    toks = phrase.split()
    if toks and len(toks[-1]) > 3 and toks[-1].endswith("s") and not toks[-1].endswith("ss"):
        toks[-1] = toks[-1][:-1]
    return " ".join(toks)


# "... on this image / slice / MR / chest radiograph": where the predicate is seen, not part of it
_ON_THIS_IMAGE = re.compile(r"\s+(in|on)\s+(this|the)\s+((chest|abdominal|head|brain)\s+)?(image|scan|film|picture|study|"
                            r"section|slice|ct|mr|mri|radiograph|x ray|xray|cxr)$")


def _clean_pred(pred: str) -> str:
    p = re.sub(_ON_THIS_IMAGE, "", pred).strip()
    p = re.sub(r"^(to be|being|appearing|looking|well)\s+", "", p) if not p.startswith("well differentiated") else p
    return re.sub(r"\s+(appearing|looking|in appearance|appearance|in consistency)$", "", p)


def _pred_kind(pred: str) -> str:
    cp = _clean_pred(pred)
    if cp in _PRED_FINDING:
        return "finding"
    if cp in _PRED_NEGATED:
        return "negated"
    p = re.sub(_ON_THIS_IMAGE, "", pred).strip()
    p = re.sub(r"^(to be|being|appearing|looking)\s+", "", p)
    p = re.sub(r"\s+(appearing|looking|in appearance|appearance)$", "", p)
    if p in _NORMAL or p.startswith("normal") or p.startswith("of normal") or p.startswith("within normal"):
        return "normal"
    if p in _ABNORMAL_PRED or p.startswith("abnormal"):
        return "abnormal"
    if p in _ENLARGED or re.match(r"^(enlarged|dilated|distended|increased in size)\b", p):
        return "enlarged"
    if re.match(r"^(located|situated|found|positioned)\s+(in|on|within)\s+(this|the)\s+(\w+\s+)?(image|scan|film|picture|"
                r"study|section|slice|radiograph)$", p):
        return "present"
    if p in _PRESENT or re.match(r"^(visible|seen|present|shown|identified|noted|visualized|visualised|depicted|"
                                 r"included|evident|demonstrated|there)\b", p):
        return "present"
    return ""


# -- reading ----------------------------------------------------------------------------------------------------
def _words(text: str) -> str:
    q = words(text)
    q = re.sub(r"\b(is|are) (is|are)\b", r"\1", q)
    q = re.sub(r"^(?:can|could|would|will)\s+you\s+(?:please\s+)?(name|list|locate|segment|measure|outline|"
               r"count)\b(?!\s+(?:an?|any)\b)", r"\1", q)  # "Can you name the organ ...?" asks for the name, not a
    # yes/no; "Can you identify a pituitary tumor?" asks whether there is one (_EXIST reads it), and so does "Can you
    # identify the urinary bladder here?": only a generic object ("the organ on the left") asks for a name
    q = re.sub(r"^(?:can|could|would|will)\s+you\s+(?:please\s+)?(identify)\b(?=\s+(?:the\s+)?(?:organs?|structures?|"
               r"abnormalit\w*|lesions?|findings?|diseases?|what|which)\b)", r"\1", q)
    return re.sub(r"\b(existing|existed)\b ", "", q)


_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def asked_part(text: str) -> str:
    """The sentence(s) that ask: of several sentences, those ending in "?" (else the first). What follows a question
    or a request ("Describe the findings. Kindly set aside everything above ...") is not part of what is asked, so
    it cannot put a side, an organ or a finding into the reading (issue 32 item 6)."""
    parts = [p.strip() for p in _SENTENCE.split(" ".join(str(text).split())) if p.strip()]
    if len(parts) <= 1:
        return " ".join(str(text).split())
    asks = [p for p in parts if p.endswith("?")]
    return " ".join(asks) if asks else parts[0]


_OPTIONS_FIRST = re.compile(r"^\s*(?P<opts>[^:?]+?\bor\b[^:?]+?)\s*:\s*(?P<rest>(?:which|what)\b[^?]*)\??\s*$", re.I)


def parse_question(text: str) -> Question:
    full, text = text, asked_part(text)
    if m := _OPTIONS_FIRST.match(text):  # "Transverse or coronal plane: which was this acquired in?" - the options first
        text = f"{m.group('rest').strip()}, {m.group('opts').strip()}?"
    q = _words(text)
    toks = q.split()
    first = toks[0] if toks else ""
    subj = subject_of(text)
    choices: list[str] = []
    unsure: list[str] = []
    comma_q = " ".join(re.sub(r"[^a-z0-9,]+", " ", text.lower()).replace(",", " , ").split())
    existential_or = bool(re.match(r"^(is|are)\s+there\b|^any\b|^(do|does)\s+(you see|the patient)\b", q))
    if first == "describe" and re.search(r"\b(size|dimensions?|diameter|extent)\b", q):
        kind: QuestionKind = "measurement"
    elif first in _IMPERATIVE and not (first == "name" and ("the" not in toks[1:2] or _ORGAN_ID.search(q))):
        kind = "open"
    elif " or " in f" {q} " and (first in _YES_NO_START or first in ("which", "what", "in") or
                                 (first == "where" and "," in comma_q)) and not existential_or \
            and (choices := _choices(comma_q)):
        kind = "choice"
    elif re.search(r"\bhow many\b|\bnumber of\b|\bcount\b", q):
        kind = "count"
    elif re.match(r"^(?!what|which|where|how|who|why|when)(there\s+(is|are)\s+)?(.+?)\s+(is|are)\s+(seen|located|found|"
                  r"present|noted|situated)?\s*(in\s+|on\s+)?(where|which|what)\b", q):
        kind = "location"
    elif (wk := _wh_kind(q)) is not None:
        kind, wh_attr = wk
        if wh_attr:
            subj = Subject(attribute=wh_attr, attributes=(wh_attr,), organ=subj.organ)
    elif first in _YES_NO_START:
        kind = "yes_no"
    elif _MEASURE.search(q) or (subj.quantities and first in ("what", "how") and not subj.attribute and
                                not re.match(r"^(what|which)\s+(area|region|part|zone|portion)\b", q)):
        kind = "measurement"  # "What is the mean intensity inside the box?"
    elif subj.attribute in ("plane", "modality", "mr_weighting") and not subj.finding and \
            first in ("what", "which", "in", "on"):
        kind = "attribute"
    elif _LOCATION.search(q):
        kind = "location"
    elif subj.attribute or (_ORGAN_ID.search(q) and first in ("which", "what", "where", "name")):
        kind = "attribute"
    else:
        kind = "open"
    if kind == "yes_no" and existential_or and " or " in f" {q} ":
        unsure.append("an existential question with 'or'")

    fields: dict = {"finding": None, "organ": None, "side": None, "location": None, "quantities": [], "organs": [],
                    "attributes": [], "attribute": None, "attribute_value": None, "negated": False, "also": {},
                    "comparison": None, "rule": None, "describe": False, "subject_type": ""}

    if kind == "yes_no":
        _read_yes_no(text, q, subj, fields, unsure)
    elif kind == "choice":
        _read_choice(text, q, subj, choices, fields)
    elif kind == "location":
        _read_wh(q, subj, fields, unsure, location=True)
    elif kind == "count":
        _read_count(q, subj, fields, unsure)
    elif kind == "measurement":
        _read_measurement(q, subj, fields)
    elif kind == "attribute":
        _read_attribute(q, subj, fields)
    else:
        _read_open(text, q, subj, fields, unsure)
    if fields.get("attribute") and kind == "attribute":
        fields["attributes"] = list(dict.fromkeys([fields["attribute"], *subj.attributes]))
    elif fields.get("attribute"):
        fields["attributes"] = [fields["attribute"], *fields.get("also", {})]
    allowed = ["yes", "no"] if kind == "yes_no" else list(choices)
    if kind == "open" and not (fields.get("attribute") or fields.get("finding") or fields.get("organ") or
                               fields.get("describe")) and subj.attribute:
        fields.update(attribute=subj.attribute, subject_type="attribute")
    if kind == "attribute" and fields.get("attribute") in (None, "") and not fields.get("finding"):
        fields["attribute"] = "organ"
        fields["attributes"] = ["organ"]
    if fields.get("attribute"):
        fields["subject_type"] = "attribute"
    out = Question(text=full, kind=kind, answer_kind=ANSWER_KIND[kind], choices=choices, allowed=allowed,
                   sure=not unsure, unsure_why="; ".join(unsure), **fields)
    out.subject = out.subject_obj().text or ("the findings" if out.describe else "")
    if out.finding and out.location and out.finding not in ("abnormality", "lesion", "mass") and not out.describe \
            and out.location not in out.finding and not (out.organ and out.organ in out.finding):
        # "free air (under the diaphragm)", not "diaphragm free air"
        out.subject = f"{out.finding} ({out.location})"
    return out


def _set_phrase(fields: dict, ph: Phrase) -> None:
    if ph.kind in ("finding", "device"):
        fields["finding"] = ph.name or None
        fields["organ"] = ph.organ
    elif ph.kind == "structure":
        fields["organ"] = ph.name
    fields["side"] = ph.side
    fields["location"] = ph.location
    fields["subject_type"] = ph.kind


def _study_predicate(np_text: str, q: str, fields: dict, unsure: list[str]) -> bool:
    """ "Is this a CT?", "Is this a normal x-ray?", "Was contrast used?", "Is this in the axial plane?": a predicate of
    the study. True when it was read as one."""
    t = normalise_text(np_text)
    if re.search(r"\b(normal|healthy|unremarkable)\b", t):
        fields.update(finding="abnormality", negated=True, subject_type="finding")
        organ, side = location_organ(t)
        fields.update(organ=organ, side=side, location=organ)
        return True
    if re.search(r"\b(abnormal|pathologic|pathological)\b", t) and not re.search(r"\b(is|are)\b", t):
        fields.update(finding="abnormality", subject_type="finding")
        return True
    if _CONTRAST.search(t) and not attribute_value_in(t, "modality"):
        _, loc = split_location(t)
        fields.update(attribute="contrast", subject_type="attribute", location=loc)
        return True
    if re.search(r"\b(male|female|man|woman|boy|girl)\b", t):
        fields.update(attribute="gender", subject_type="attribute")
        return True
    named = attribute_value_in(t, "mr_weighting") or attribute_value_in(t)
    head = re.sub(r"^((a|an|the|this|image|scan|study|picture|film|photo|taken|of|from|in|on)\s+)+", "", _strip_det(t))
    if named and (head.split()[:1] and (attribute_value_in(" ".join(head.split()[:3])) or head in ATTRIBUTE_VALUES.get(
            named[0], {}) or
                                        re.match(r"^(in|on|of|with|from)\b", head) or len(head.split()) <= 4)):
        # several study attributes in one predicate ("Was this CT taken sagittally?", "Is this a chest CT?"): the
        # plane, else the region, is what is asked; the modality word says what the image is. A yes needs them all
        # (`also`): a chest radiograph is not a chest CT
        found = {a: got[1] for a in ("plane", "body_region", "modality") if (got := attribute_value_in(t, a))}
        if named[0] in found and len(found) > 1:
            main = next(iter(found))
            fields.update(attribute=main, attribute_value=found[main], subject_type="attribute",
                          also={a: v for a, v in found.items() if a != main})
            return True
        attr, value = named
        fields.update(attribute=attr, attribute_value=value, subject_type="attribute")
        return True
    return False


def _read_yes_no(text: str, q: str, subj: Subject, fields: dict, unsure: list[str]) -> None:
    r = _yes_no_reading(q)
    if r.get("unsure"):
        unsure.append(r.get("why") or "an unusual predicate")
    if r.get("negated"):
        fields["negated"] = True
    if r["form"] == "study":
        sugg = re.search(r"\b(?:suggestive of|consistent with|concerning for|indicative of|diagnostic of|showing|"
                         r"compatible with|with evidence of|evidence of|positive for|negative for)\s+(.+)$", r["np"])
        if sugg:  # "Is this x-ray suggestive of aortic dissection?": the finding, not the modality
            r = {"np": sugg.group(1), "form": "exist", "negated": "negative for" in sugg.group(0)}
            if r["negated"]:
                fields["negated"] = True
    if r["form"] == "study":
        if _study_predicate(r["np"], q, fields, unsure):
            return
        ph = classify_np(r["np"])  # "Is this a fracture?": a finding predicated of the image
        _set_phrase(fields, ph)
        if not ph.known:
            unsure.append(f"unknown words {ph.name!r}")
        return
    if "np_pred" in r:
        mid = re.sub(r"\s+(?:(?:seen|shown|visible|imaged|depicted)\s+)?(?:in|on)\s+(?:this|the)\s+(?:image|scan|film|"
                     r"picture|study|radiograph)(?=\s+\w)", "", r["np_pred"])
        np_text, pred = _split_np_pred(mid)
    else:
        np_text, pred = r.get("np", ""), r.get("pred", "")
    if np_text.strip() in _STUDY_NP or _strip_det(np_text) in ("", "image", "scan", "film", "study", "picture"):
        if _study_predicate(pred or np_text, q, fields, unsure):
            return
    ph = classify_np(np_text)
    kind = _pred_kind(pred) if pred else "present"
    if _strip_det(split_location(_strip_det(normalise_text(np_text)))[0]) in (
            "organ", "organs", "image", "picture", "scan", "it", "this", "structures") and pred and \
            (named := attribute_value_in(pred, "body_region")):  # "Do the organs in the image exist in the chest?"
        fields.update(attribute="body_region", attribute_value=named[1], subject_type="attribute")
        return
    comp = _COMPARE.search(pred) if pred else None
    if comp:
        fields["comparison"] = comp.group(0)
        name = _strip_det(normalise_text(np_text))
        if (name in _HEART_WORDS or ph.name in ("heart", "cardiomegaly")) and _HALF.search(comp.group(0)) and \
                _CHEST_WIDTH.search(comp.group(0)):
            less = bool(re.match(r"(less|smaller|narrower|under|below)", comp.group(0)))
            fields.update(quantities=["cardiothoracic_ratio"], subject_type="quantity", location="heart",
                          rule=f"cardiothoracic_ratio {'<' if less else '>'} 0.5")
            return
        _set_phrase(fields, ph)
        fields["finding"] = label_key(f"{np_text} {comp.group(0)}")
        fields["subject_type"] = "finding"
        unsure.append("a comparison no rule decides")
        return
    if kind == "normal":
        fields.update(finding="abnormality", negated=True, subject_type="finding")
        organ = ph.organ if ph.kind == "structure" else (ph.organ or (ph.name if ph.kind == "finding" and not ph.known
                                                                      else None))
        if ph.kind == "finding" and ph.known and ph.name not in ("abnormality",):
            # "Is the mass benign-looking/normal?": about that finding, not about normality in general
            fields.update(finding=f"abnormal {ph.name}", negated=True)
        where = ph.name if ph.kind == "structure" else (ph.location or ph.organ)
        if where and ph.side and ph.side not in where:
            where = f"{ph.side} {where}"
        fields.update(organ=organ if ph.kind == "structure" else ph.organ, side=ph.side, location=where)
        return
    if kind == "abnormal":
        fields.update(finding="abnormality", subject_type="finding", organ=ph.organ, side=ph.side,
                      location=ph.name if ph.kind == "structure" else (ph.location or ph.organ))
        return
    if kind in ("finding", "negated"):
        p = _clean_pred(pred)
        table = _PRED_FINDING if kind == "finding" else _PRED_NEGATED
        f = table[p]
        adj = _ADJECTIVE_OF.get(ph.name) or (_singular(ph.name) if ph.name and not ph.known else None)
        name = f"{adj} {f}" if adj and (kind == "negated" or f"{adj} {f}" in FINDINGS) else f
        fields.update(finding=name, subject_type="finding", organ=ph.organ if ph.kind != "finding" else ph.organ,
                      side=ph.side, negated=kind == "negated",
                      location=None if kind == "negated" or ph.kind != "structure" else
                      (f"{ph.side} {ph.name}" if ph.side and ph.side not in ph.name else ph.name))
        return
    if kind == "enlarged":
        name = _strip_det(normalise_text(np_text))
        if name in _ENLARGED_FINDING or ph.name in _ENLARGED_FINDING:
            fields.update(finding=_ENLARGED_FINDING.get(name) or _ENLARGED_FINDING[ph.name], organ=None,
                          subject_type="finding", location=None)
            return
        fields.update(finding=label_key(f"{ph.name} enlargement"), organ=ph.organ or ph.name, side=ph.side,
                      subject_type="finding", location=None)
        return
    _set_phrase(fields, ph)
    if r.get("loc_np"):  # "does the mass contain calcification?": the thing named first is where it is asked about
        loc_ph = classify_np(r["loc_np"])
        if _strip_det(normalise_text(r["loc_np"])) not in ("", "image", "scan", "film", "study", "picture") and \
                not re.search(r"\b(image|scan|film|study|picture|x ray|xray|radiograph|ct|mri|patient)\b", r["loc_np"]):
            fields["location"] = fields.get("location") or _strip_det(normalise_text(r["loc_np"]))
            fields["organ"] = fields.get("organ") or loc_ph.organ
    if pred and kind == "" and pred:
        head, loc = split_location(pred) if not pred.startswith(tuple(p + " " for p in _LOC_PREPS)) else ("", pred)
        if loc and not head.strip():
            fields["location"] = loc
            organ, side = location_organ(loc)
            if ph.kind == "finding":
                fields["organ"] = fields.get("organ") or organ
            fields["side"] = fields.get("side") or side
        elif ph.kind in ("structure", "device", "finding"):
            # "Is the trachea midline?", "Is the mass calcified?": a property no vocabulary word names
            fields["finding"] = label_key(f"{ph.name} {_clean_pred(pred)}")
            fields["organ"] = ph.organ
            fields["subject_type"] = "finding"
            unsure.append(f"predicate {pred!r}")
    if not ph.known and ph.name:
        unsure.append(f"unknown words {ph.name!r}")
    if not ph.name:
        unsure.append("no subject")


def _read_choice(text: str, q: str, subj: Subject, choices: list[str], fields: dict) -> None:
    attr = None
    named = [attribute_value_in(c) for c in choices]
    if all(named) and len({n[0] for n in named}) == 1:
        attr = named[0][0]
    rank = _SIZE_RANK.search(q)
    if rank and not all(c in SIDES for c in choices) and \
            (_ORGAN_ID.search(q) or all(_longest(normalise_text(c), ORGANS) for c in choices)):
        attr = "smallest_organ" if rank.group(1).startswith("small") else "largest_organ"
    if attr == "body_region" and all(c in SIDES for c in choices):
        attr = None
    if not attr and subj.attribute in ("plane", "modality", "mr_weighting", "body_region") and not subj.finding:
        attr = subj.attribute
    if not attr and _ORGAN_ID.search(q) and _ABNORMAL.search(q):  # "Which organ is abnormal, heart or lung?"
        attr = "abnormal_organ"
    if attr:
        fields.update(attribute=attr, subject_type="attribute")
        return
    if q.startswith("where "):  # "Where is the spleen in this image, right or lower right?"
        _read_wh(q.split(" or ")[0].rsplit(" ", 1)[0] if "," not in text else
                 _words(text.split(",")[0]), subj, fields, [], location=True)
        return
    if _CONTRAST.search(q):  # "Was oral or IV contrast used?"
        fields.update(attribute="contrast", subject_type="attribute")
        return
    if all(c in SIDES for c in choices) or all(c in ("upper", "lower", "middle") for c in choices):
        body = re.sub(r"\b(on|in)?\s*(the)?\s*(patient s|patients|image s)?\s*(left|right|upper|lower|middle)\b.*$", "", q)
        if body.split()[:1] and body.split()[0] in ("which", "what"):
            _read_wh(body, subj, fields, [], location=True)
            fields["side"] = None
            return
        body = re.sub(r"^(is|are|was|were|does|do)\s+", "", body)
        np_text, _ = _split_np_pred(body)
        ph = classify_np(np_text)
        _set_phrase(fields, ph)
        fields["side"] = None
        return
    if re.search(r"\b(male|female)\b", q):
        fields.update(attribute="gender", subject_type="attribute")
        return
    # "Is the mass solid or cystic?": a property of the thing named first (the words before the first option)
    body = re.sub(r"^(is|are|was|were|does|do)\s+", "", q.split(" or ")[0])
    at = f" {body} ".rfind(f" {choices[0]} ")
    np_text = body[: at].strip() if at > 0 else _split_np_pred(body)[0]
    if not _strip_det(np_text) or _strip_det(np_text) in ("this", "it", "there"):
        after = q.split(" or ", 1)[1].split() if " or " in q else []
        tail = " ".join(after[len(choices[-1].split()):])  # "Is this a cystic or solid mass?" -> "mass"
        np_text = tail if _strip_det(tail) else _split_np_pred(body)[0]
    ph = classify_np(np_text)
    _set_phrase(fields, ph)
    if subj.organ and not fields.get("organ") and subj.organ not in choices:
        fields["organ"] = subj.organ


def _read_wh(q: str, subj: Subject, fields: dict, unsure: list[str], location: bool = False) -> None:
    """Where / which side / what lobe ... is the X (in)?"""
    body = q
    body = re.sub(r"^(?:what is|what s|what are|how would you describe|describe) the (?:location|position|locations|"
                  r"positions) of (?:the )?",
                  "where is ", body)
    if insitu := re.match(r"^(?!what|which|where|how|who|why|when)(?:there\s+(?:is|are)\s+)?(.+?)\s+(?:is|are)\s+(?:seen|"
                          r"located|found|present|noted|situated)?\s*(?:in\s+|on\s+)?(?:where|which|what)\b", body):
        body = f"where is {insitu.group(1)}"
    body = re.sub(r"^(?:which|what) (lung|kidney|lobe|lobes|hemisphere|side|breast|ovary|part|region|artery|vessel|organ|"
                  r"segment)\b(.*?)\b(has|have|contains?|shows?) (an? |the )?", r"which \1 is ", body)
    m = re.match(r"^(?:in\s+|on\s+|at\s+)?(?:where|which|what)\s+(?P<what>[a-z ]*?)\s*\b(?P<verb>is|are|was|were|does|do|"
                 r"did|can)\b\s+(?:there\s+)?(?:we\s+see\s+|you\s+see\s+|one\s+see\s+)?(?P<rest>.*)$", body)
    if m:
        rest = m.group("rest")
        what = m.group("what")
        verbs = r"\b(lie|sit|reside|appear|occur|lies|sits|extend|extends|go|goes|travel|point|end|terminate|project|lead)\b"
        if m.group("verb") in ("does", "do", "did") and re.search(verbs, rest):
            rest = re.sub(verbs + ".*$", "", rest).strip()
        of = re.match(r"^(?:side|part|region|area|zone|lobe|segment|quadrant|portion)\s+of\s+(?:the\s+)?(.+)$", what)
    else:
        rest, of = re.sub(r"^\w+\s+", "", body), None
        unsure.append("no wh pattern")
    trail = re.search(r"\s+(?:located|situated|found|seen|positioned|present)?\s*\b(in|on|at|within|of)\s+(?:the\s+)?"
                      r"(?!this\b|image\b|picture\b)(.+?)(?:\s+(?:of|in|on)\s+(?:this|the)\s+(?:image|picture|scan))?$", rest)
    trail_loc = trail.group(2) if trail and _place(trail.group(2)) else None
    if trail_loc:
        rest = rest[: trail.start()]
    rest = re.sub(r"\s+(located|situated|found|seen|positioned|present|visible|noted|in|on|at|of|shown|observed|"
                  r"visualized|lie|lies|sit)(\s+(in|on|at|of)?\s*(this|the)?\s*(image|scan|film|picture)?)?$", "", rest)
    rest = re.sub(r"\s+(located|situated|found|seen|positioned|present)\b.*$", "", rest)
    np_text, pred = _split_np_pred(rest) if rest else ("", "")
    kind = _pred_kind(pred) if pred else ""
    if kind == "abnormal" or (not np_text.strip() and _ABNORMAL.search(q)):
        fields.update(finding="abnormality", subject_type="finding")
        organ = of.group(1) if of else None
        o, s = location_organ(organ) if organ else (None, None)
        fields.update(organ=o, side=s, location=organ)
        return
    if _strip_det(np_text) in ("picture", "image", "scan", "this", "it", "picture show", "image show",
                               "image represent", "picture represent"):  # "Where does the picture show?"
        fields.update(attribute="body_region", subject_type="attribute")
        return
    ph = classify_np(np_text)
    _set_phrase(fields, ph)
    if trail_loc:
        fields["location"] = fields.get("location") or trail_loc
        o, s_ = location_organ(trail_loc)
        fields["organ"] = fields.get("organ") or o
        fields["side"] = fields.get("side") or s_
    if of:
        fields["location"] = fields.get("location") or of.group(1)
        o, s = location_organ(of.group(1))
        fields["organ"] = fields.get("organ") or o
    if fields.get("finding") in ("abnormality",) or ph.kind == "finding" and ph.name in ("abnormality", "abnormalities"):
        fields["finding"] = "abnormality"
    if not ph.name:
        unsure.append("no subject")
    elif not ph.known:
        unsure.append(f"unknown words {ph.name!r}")


def _read_count(q: str, subj: Subject, fields: dict, unsure: list[str]) -> None:
    m = re.search(r"\b(?:how many|number of|count(?: the)?)\s+(.*)$", q)
    rest = m.group(1) if m else q
    rest = re.sub(r"\s+(are|is|were|was|can|do|does|did)\b.*$", "", rest)
    ph = classify_np(rest)
    _set_phrase(fields, ph)
    if not ph.known and ph.name:
        unsure.append(f"unknown words {ph.name!r}")


def _read_measurement(q: str, subj: Subject, fields: dict) -> None:
    fields.update(quantities=list(subj.quantities), organs=list(subj.organs), finding=subj.finding, organ=subj.organ,
                  side=subj.side, subject_type="quantity")


def _read_attribute(q: str, subj: Subject, fields: dict) -> None:
    attribute = subj.attribute
    rank = _SIZE_RANK.search(q)
    if rank and _ORGAN_ID.search(q):
        attribute = "smallest_organ" if rank.group(1).startswith("small") else "largest_organ"
    if not attribute:
        attribute = "organ"
    if attribute == "organ" and _ABNORMAL.search(q):
        attribute = "abnormal_organ"
    fields.update(attribute=attribute, subject_type="attribute")
    if attribute == "organ":
        fields["organ"] = subj.organ


_KNOWLEDGE = re.compile(r"\b(function|functions|used for|role|purpose|treat|treatment|prevent|prevention|cause|causes|"
                        r"caused|damage|how can you tell|how do you know|how can you|why|etiology|origin|symptoms?|"
                        r"prognosis|how long|how much time|risk)\b")
_ABN_NOUN = r"(pathology|abnormality|abnormalities|finding|findings|condition|injury|disease|diseases|process|defect|" \
            r"problem|lesion type|diagnosis|wrong|abnormal|happening|going on|alarming|concerning)"


def _wh_kind(q: str) -> tuple[QuestionKind, str | None] | None:
    """Kinds of wh-questions the generic order gets wrong: (kind, the study attribute it asks for, if any)."""
    if re.match(r"^(how|why)\b", q) and _KNOWLEDGE.search(q):
        return "open", "other"
    if re.match(r"^(what|which)\b", q) and re.search(r"\b(function|used for|role|purpose|treat|prevent|cause|damage)\b",
                                                      q):
        return "open", "other"
    if re.match(r"^(what|which)\s+(\w+\s+)?(types? of |kinds? of )?(iv |intravenous |oral )?contrast\b", q):
        return "attribute", "contrast"
    if re.match(r"^(what|which)\s+(types? of |kinds? of |sort of )(imaging|image|scan|study|modality|exam)\b", q):
        return "attribute", "modality"
    if re.match(r"^(what|which)\s+(types? of |kinds? of |sort of )?(mri|mr|sequence|weighting)\b", q):
        return "attribute", "mr_weighting"
    if re.match(r"^(what|which)\s+(laterality|projection|view)\b", q) or re.match(r"^how was (this|the) (film|image|"
                                                                                   r"radiograph) taken", q):
        return "attribute", "plane"
    if re.match(r"^(what|which)\s+(part|region|area|level|section)\s+of\s+(the\s+)?\w+(\s+\w+)?\s+(is|are)\s+"
                r"(being\s+|most\s+likely\s+|likely\s+|best\s+|clearly\s+)?(seen|shown|imaged|visualized|depicted|pictured|"
                r"displayed|visible|present|included|captured)\b", q):
        return "attribute", "body_region"
    if re.match(r"^where\s+(does|do|is|did)\s+(the|this)\s+(picture|image|scan|film|photo)\s+(show|depict|represent|"
                r"image|display|capture)\b", q):
        return "attribute", "body_region"  # "Where does the picture show?": the part of the body
    if re.match(r"^(what|which)\s+(area|region|part|zone|side|portion)\s+(is|are)\s+(abnormal|affected|diseased|"
                r"involved|injured|damaged)\b", q):
        return "location", None
    if re.match(r"^(what|which)\s+(is|are)\s+(the\s+)?(organ|organs|structure|structures)\s+(located\s+)?(in|on|at)\s+"
                r"(the\s+)?(lower|upper|top|bottom|left|right|middle|center|centre)\b", q):
        return "attribute", "organ"  # "What is the organ located in the lower right corner?"
    if re.match(r"^what\s+(is|are)\s+(located|seen|found|present|noted)\s+(in|at|on|within)\b", q):
        return "open", None
    if re.match(r"^(which|what)\s+(lung|kidney|lobe|lobes|hemisphere|side|breast|ovary|adrenal|part|region|artery|vessel|"
                r"segment)\b.*\b(has|have|is|are|contains?|shows?)\b", q) and not re.search(
                    r"\b(normal|function|largest|smallest|biggest|visible|shown|seen|imaged)\b", q) and \
            (re.search(_ABN_NOUN + r"|\b(lesion|lesions|mass|tumou?r|defect|affected|embolus|clot)\b", q) or
             _longest(q, FINDINGS)):
        return "location", None  # "Which lung has a nodule / diffuse opacification?"
    if re.match(r"^which\s+(one\s+)?is\s+(the\s+)?\w+(\s+\w+)?(\s+in\s+(this|the)\s+(image|picture))?$", q):
        return "location", None  # SLAKE's "Which is the kidney?" asks where it is
    if re.match(r"^(what|which)\s+(colou?r|shape)\b", q) or re.search(r"\b(what colou?r|which colou?r|what shape)\b", q):
        return "open", "appearance"
    if re.match(r"^(what is|what s|what are) the (location|position|locations|positions) of\b|"
                r"^(how would you describe|describe) the location of\b", q):
        return "location", None
    if re.match(r"^(how would you describe|describe)\b", q) and re.search(r"\bsize\b", q):
        return "measurement", None
    return None


def _read_open(text: str, q: str, subj: Subject, fields: dict, unsure: list[str]) -> None:
    first = q.split()[0] if q else ""
    if subj.attribute in ("appearance", "other"):
        fields.update(attribute=subj.attribute, subject_type="attribute")
        return
    m = re.match(r"^(what|which)\s+(types? of |kinds? of |sort of |category of )?" + _ABN_NOUN +
                 r"\b\s*(?:(?:is|are|does|do|can|could|was)\s+)?(?:(?:be\s+)?(?:seen|shown|present|noted|found|"
                 r"identified|suggested|demonstrated)\s+)?(.*)$", q)
    m2 = re.match(r"^what\s+(is|are|was)\s+(the\s+)?(most\s+)?" + _ABN_NOUN + r"\b\s*(.*)$", q)
    m3 = re.match(r"^what\s+(is|are)\s+(located|seen|found|present|noted)\s+(in|at|on|within)\s+(.*)$", q)
    if m or m2 or m3:  # "What pathology does the pancreas demonstrate?", "What is wrong in the right lung?"
        rest = m.group(4) if m else (m2.group(5) if m2 else m3.group(0))
        loc = re.search(r"\b(?:in|of|within|on|at|about|with|does|do)\s+(?:the\s+|this\s+)?(.+?)(?:\s+(?:demonstrate|show|"
                        r"suggest|have|image|in this image|in the image))?$", rest)
        where = loc.group(1) if loc and _place(loc.group(1)) else (_organ_words(rest) or None)
        o, sd = location_organ(where)
        fields.update(finding="abnormality", subject_type="finding", location=where, organ=o, side=sd)
        return
    mc = re.match(r"^what\s+(category|type|kind|grade|stage)\s+(is|are)\s+(the\s+)?(.+)$", q)
    if mc:
        _set_phrase(fields, classify_np(mc.group(4)))
        return
    mt = re.match(r"^(what|which)\s+(types?|kinds?|sort|category|class|grade|stage)\s+(of\s+)?(.+?)\s+(is|are|was|does|do|"
                  r"can)\b.*$|^(what|which)\s+(types?|kinds?|sort|category|class|grade|stage)\s+(of\s+)?(.+?)$", q)
    if mt:  # "What type of thrombosis is shown?"
        np_text = mt.group(4) or mt.group(9)
        ph = classify_np(np_text)
        _set_phrase(fields, ph)
        return
    md = re.match(r"^(how would you describe|describe|what is the appearance of|what does)\s+(the\s+)?(.+?)(\s+look like)?$", q)
    if md and not _DESCRIBE.search(md.group(3)) and first != "describe" or (md and first == "what"):
        fields.update(attribute="appearance", subject_type="attribute")
        return
    describe = first in _IMPERATIVE or (not subj.finding and not subj.organ and bool(_DESCRIBE.search(q)))
    if first in _IMPERATIVE and subj.finding:
        fields.update(finding=subj.finding, organ=subj.organ, side=subj.side, describe=True, subject_type="finding")
        return
    if describe:
        fields.update(describe=True, subject_type="findings")
        return
    if subj.finding in ("abnormality", "abnormalities", "disease", "diseases", "lesion") or subj.finding:
        fields.update(finding=subj.finding, organ=subj.organ, side=subj.side, subject_type="finding")
        loc = re.search(r"\b(in|of|within|on)\s+(the\s+)?(.+?)(\s+in this image|\s+in the image)?$", q)
        if loc and _place(loc.group(3)):
            fields["location"] = loc.group(3)
        return
    fb = _fallback_subject(normalise_text(text))
    ph = classify_np(fb) if fb else None
    if ph is not None and ph.name and (ph.known or ph.kind in ("device", "structure")):
        _set_phrase(fields, ph)
    else:
        fields.update(finding=label_key(fb) or None, organ=subj.organ, side=subj.side, subject_type="finding")
    unsure.append("an open question the rules do not cover")


_LEAD = re.compile(r"^(is|are|does|do|did|can|could|was|were|has|have|had|will|would|should|any)\s+"
                   r"(?:(there|this|the|it|you|we)\s+)?(?:(any|evidence of|signs? of|a|an|the)\s+)?")
_WH_LEAD = re.compile(r"^(what|which|where|how|who)\s+(?:(is|are|was|were|does|do|can)\s+)?(?:(there|this|the|it)\s+)?"
                      r"(?:(a|an|the)\s+)?")
_TRAIL = re.compile(r"\s+(in|on|of|within|at|seen|visible|present|shown|observed|appear|exist)\b.*$")


def _fallback_subject(q: str) -> str:
    rest = _TRAIL.sub("", _LEAD.sub("", _WH_LEAD.sub("", q.rstrip(" ?"))))
    return _strip_tail(rest)


__all__ = ["ALIASES", "ATTRIBUTE_VALUES", "Question", "classify_np", "location_organ", "parse_question",
           "split_location"]
