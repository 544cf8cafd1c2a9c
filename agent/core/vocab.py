"""The one vocabulary of findings, organs, sides, quantities and study attributes.

Questions (agent/core/question.py), tool labels (what a finding says it is about) and the critic all read subjects
through `subject_of`, so "enlarged heart" in a question and "cardiomegaly" from a tool are the same subject.
Aliases live here and nowhere else.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# label spellings that name the same finding across tools and questions (lower case, words only)
ALIASES = {
    "enlarged heart": "cardiomegaly", "enlarged cardiac silhouette": "cardiomegaly", "heart enlargement": "cardiomegaly",
    "cardiac enlargement": "cardiomegaly", "heart enlarged": "cardiomegaly", "cardiac silhouette enlarged": "cardiomegaly",
    "heart looks enlarged": "cardiomegaly", "heart is enlarged": "cardiomegaly",
    "pleural effusion": "effusion", "pleural effusions": "effusion",
    "lung nodule": "nodule", "pulmonary nodule": "nodule", "nodules": "nodule", "lung opacity": "opacity",
    "pneumothorax present": "pneumothorax", "tumour": "tumor", "tumors": "tumor", "masses": "mass",
    "lesions": "lesion", "aneurysms": "aneurysm", "aortic aneurysms": "aortic aneurysm",
    # a detector's candidates are not nodules: keep them apart from the finding "nodule"
    "candidate nodule blob": "blob candidate", "candidate nodule": "blob candidate",
    "abnormal": "abnormality", "abnormally": "abnormality", "unhealthy": "abnormality", "diseased": "abnormality",
    "brian": "brain", "lungs": "lung", "kidneys": "kidney", "eyes": "eye", "ears": "ear",
    # free-form clinical wording (issue 30): plurals and spellings of the same structure or finding
    "ventricles": "ventricle", "lateral ventricles": "lateral ventricle", "ribs": "rib", "vertebrae": "vertebra",
    "fractures": "fracture", "cysts": "cyst", "calcifications": "calcification", "infarcts": "infarct",
    "hemorrhages": "hemorrhage", "bleed": "hemorrhage", "bleeding": "hemorrhage", "haemorrhage": "hemorrhage",
    "pneumothoraces": "pneumothorax", "effusions": "effusion", "opacities": "opacity", "polyps": "polyp",
    "small intestine": "small bowel", "large intestine": "colon", "large bowel": "colon", "gall bladder": "gallbladder",
    "x rays": "x ray", "xray": "x ray", "x-ray": "x ray",
    "nodular opacity": "nodule", "mass lesion": "mass", "mass lesions": "mass", "tumours": "tumor",
    "malignancy": "cancer", "neoplasm": "tumor", "arteries": "artery", "veins": "vein",
    "mca": "middle cerebral artery", "left and right": "bilateral", "both left and right": "bilateral",
}

# findings a question may ask about (multi-word first: the longest match wins)
FINDINGS = (
    "aortic aneurysm", "aneurysm", "cardiomegaly", "effusion", "pneumothorax", "pneumonia", "atelectasis",
    "consolidation", "edema", "oedema", "emphysema", "fibrosis", "infiltration", "infiltrate", "nodule", "mass",
    "opacity", "fracture", "hernia", "pneumoperitoneum", "calcification", "cyst", "tumor", "cancer", "carcinoma",
    "metastasis", "hemorrhage", "haemorrhage", "infarct", "stroke", "lesion", "polyp", "melanoma", "nevus",
    "glioma", "meningioma", "pituitary tumor", "covid 19", "covid", "tuberculosis", "pleural thickening",
    "brain edema", "brain enhancing tumor", "brain non enhancing tumor", "lung cancer", "liver cancer",
    "kidney cyst", "liver cyst", "mediastinal widening", "widened mediastinum", "diabetic retinopathy",
    "adenocarcinoma", "squamous cell carcinoma", "benign", "malignant", "blob candidate", "abnormality",
    "disease", "diseases", "abnormalities",
    # SLAKE's disease names (train's Abnormality answers and detection.json labels; issue 31), those not above
    "kidney cancer", "pulmonary mass", "pulmonary nodule", "pulmonary infiltration", "pleural effusion",
    # findings of free-form clinical questions (issue 30): known words, so that a phrase ending in them is read as that
    # finding; no tool states most of them, so such a question abstains with no_applicable_tool
    "pneumoperitoneum", "free air", "free fluid", "ascites", "hydrocephalus", "midline shift", "infarction",
    "ischemia", "abscess", "obstruction", "small bowel obstruction", "bowel obstruction", "perforation",
    "appendicitis", "diverticulitis", "cholecystitis", "pancreatitis", "gallstone", "gallstones", "kidney stone",
    "hydronephrosis", "dissection", "thrombus", "embolism", "pulmonary embolism", "contusion",
    "hematoma", "subdural hematoma", "epidural hematoma", "subarachnoid hemorrhage", "air fluid level",
    "pneumomediastinum", "lymphadenopathy", "metastases", "stenosis", "scoliosis", "osteophyte", "lytic lesion",
    "blastic lesion", "air bronchogram",
    "interstitial markings", "consolidations", "enhancement", "ring enhancement", "fat stranding", "thickening",
    "wall thickening", "hyperinflation", "mass effect", "herniation",
)
# words that name "any finding" (an open abnormality question): classifiers and detectors address them
GENERIC_FINDINGS = {"abnormality", "abnormalities", "disease", "diseases", "lesion", "finding", "findings"}

ORGANS = (
    "left lung", "right lung", "lung", "heart", "liver", "spleen", "kidney", "left kidney", "right kidney",
    "pancreas", "brain", "bladder", "stomach", "colon", "rectum", "small bowel", "duodenum", "esophagus",
    "oesophagus", "trachea", "aorta", "spinal cord", "spine", "rib", "ribs", "bone", "femur", "gallbladder",
    "prostate", "uterus", "thyroid", "eye", "ear", "parotid", "temporal lobe", "brainstem", "cerebellum",
    "mediastinum", "diaphragm", "retina", "retinal vessel", "vessel", "vessels", "skin", "breast", "fat",
    "soft tissue", "lung field", "optic disc",
    # structures clinicians ask about by name (issue 30): known as structures, addressed only by tools that list them
    "ventricle", "lateral ventricle", "fourth ventricle", "third ventricle", "bowel", "large bowel", "appendix",
    "adrenal gland", "hilum", "cortex", "orbit", "sinus", "vertebra", "pelvis bone", "clavicle", "sternum",
    "scapula", "humerus", "pancreatic head", "portal vein", "vena cava", "ivc", "cerebrum", "midbrain", "pons",
    "basal ganglia", "thalamus", "corpus callosum", "falx", "skull", "mandible", "carotid artery", "artery", "vein",
    "bronchus", "airway", "larynx", "pharynx", "muscle", "psoas", "gyrus", "sulcus", "white matter", "gray matter",
    "grey matter", "frontal lobe", "parietal lobe", "occipital lobe", "cardiac silhouette", "aortic arch",
    "gastric wall", "bowel wall", "biliary tree", "bile duct", "common bile duct", "ureter", "urinary bladder",
    "ovary", "testis", "caudate nucleus", "cerebral cortex", "lobe", "middle cerebral artery", "basilar artery",
    "vertebral artery", "costophrenic angle", "lung parenchyma", "parenchyma",
)
SIDES = ("left", "right")
# adjectives that name an organ ("hepatic lesion" is a lesion in the liver)
ORGAN_ADJECTIVES = {"hepatic": "liver", "renal": "kidney", "pulmonary": "lung", "cardiac": "heart", "cerebral": "brain",
                    "splenic": "spleen", "pancreatic": "pancreas", "gastric": "stomach", "colonic": "colon",
                    "intracranial": "brain", "cerebellar": "cerebellum", "vertebral": "spine", "spinal": "spine",
                    "pleural": "lung", "thoracic": "chest", "abdominal": "abdomen", "pelvic": "pelvis",
                    "esophageal": "esophagus", "tracheal": "trachea", "aortic": "aorta", "bronchial": "lung",
                    "intestinal": "small bowel", "bowel": "small bowel", "biliary": "gallbladder", "adrenal": "adrenal gland",
                    "mediastinal": "mediastinum", "hilar": "hilum", "periventricular": "ventricle", "orbital": "orbit",
                    "vascular": "vessel", "cortical": "cortex", "subdural": "brain", "epidural": "brain",
                    "subarachnoid": "brain", "peritoneal": "abdomen", "retroperitoneal": "abdomen", "osseous": "bone"}
# body regions: a place a question asks about, never its subject when a finding is asked
REGIONS = {"abdomen": "abdomen", "chest": "chest", "thorax": "chest", "pelvis": "pelvis", "head": "head", "neck": "neck",
           "skull": "head", "hemithorax": "chest", "upper quadrant": "abdomen", "lower quadrant": "abdomen",
           "peritoneum": "abdomen", "retroperitoneum": "abdomen", "mediastinum": "chest", "diaphragm": "chest"}
# The body regions each organ appears in on SLAKE train's organ boxes (detection.json) by its images' location label,
# on the study classifier's region names (scripts/organ_regions.py prints it; an organ counts in a region where >= 2
# training images box it). An organ outside its regions in a study the classifier places surely elsewhere is absent by
# anatomy, not by a segmenter's miss: a count of none there stands against the VQA expert (agent/engine/answer.py fuse).
ORGAN_REGIONS = {
    "bladder": ("pelvis",), "brain": ("head",), "colon": ("abdomen", "pelvis"), "duodenum": ("abdomen",),
    "ear": ("head",), "esophagus": ("abdomen", "chest", "neck"), "eye": ("head",), "heart": ("abdomen", "chest"),
    "kidney": ("abdomen", "chest"), "larynx": ("neck",), "liver": ("abdomen", "chest"), "lung": ("abdomen", "chest"),
    "mandible": ("head",), "parotid": ("head",), "rectum": ("pelvis",), "small bowel": ("abdomen", "pelvis"),
    "spinal cord": ("abdomen", "chest", "head", "neck", "pelvis"), "spleen": ("abdomen",), "stomach": ("abdomen",),
    "temporal lobe": ("head",), "trachea": ("neck",),
}

# devices a question may ask about (phrase -> canonical name); no tool states them yet
DEVICES = {"chest tube": "chest tube", "chest drain": "chest tube", "thoracostomy tube": "chest tube",
           "nasogastric tube": "nasogastric tube", "ng tube": "nasogastric tube", "feeding tube": "feeding tube",
           "endotracheal tube": "endotracheal tube", "et tube": "endotracheal tube", "ett": "endotracheal tube",
           "pacemaker": "pacemaker", "central line": "central line", "central venous catheter": "central line",
           "picc line": "central line", "picc": "central line", "catheter": "catheter", "stent": "stent",
           "shunt": "shunt", "tube": "tube", "line": "line", "wires": "wires", "sternotomy wires": "sternotomy wires",
           "surgical clips": "surgical clips", "clips": "surgical clips", "prosthesis": "prosthesis", "implant": "implant",
           "port": "port", "drain": "drain", "foreign body": "foreign body", "tracheostomy tube": "tracheostomy tube",
           "icd": "defibrillator", "defibrillator": "defibrillator", "staples": "staples", "hardware": "hardware"}

# quantity words in a question -> measurement names tools write (tools/*.py Measurement.name)
QUANTITIES = {
    "cardiothoracic ratio": ("cardiothoracic_ratio",), "ctr": ("cardiothoracic_ratio",),
    "heart size": ("cardiothoracic_ratio",), "cardiac width": ("cardiac_width",),
    "thoracic width": ("thoracic_width",), "diameter": ("longest_diameter", "diameter", "equivalent_diameter"),
    "area": ("area", "max_cross_section_area"), "volume": ("volume",), "size": ("longest_diameter", "area", "volume"),
    "how large": ("longest_diameter", "area", "volume"), "how big": ("longest_diameter", "area", "volume"),
    "vessel density": ("vessel_density",), "density": ("vessel_density", "mean_intensity"),
    "hounsfield": ("mean_hu", "mean_intensity"), "hu": ("mean_hu", "mean_intensity"),
    "intensity": ("mean_intensity",), "distance": ("distance",), "length": ("total_vessel_length", "longest_diameter"),
    "width": ("width",), "height": ("height",), "fraction": ("fraction_of_body",),
    "how much": ("volume", "area", "fraction_of_body"), "composition": ("volume", "area", "fraction_of_body"),
    "amount": ("volume", "area", "fraction_of_body"),
}

# quantity words that name no quantity of their own: they need an organ or tissue ("how much fat")
VAGUE_QUANTITIES = {"how much", "amount"}

# subjects that stand for several organs or tissues at once
COMPOSITES = {"tissue composition": ("fat", "soft tissue", "bone", "lung"), "composition": ("fat", "soft tissue", "bone", "lung")}

# study attributes (answered by evidence that states them, e.g. inspect_image's modality)
ATTRIBUTE_WORDS = {
    "modality": "modality", "imaging modality": "modality", "kind of scan": "modality", "type of scan": "modality",
    "type of image": "modality", "kind of image": "modality", "type of medical image": "modality",
    "kind of medical image": "modality", "imaging technique": "modality",
    "scanning plane": "plane", "plane": "plane", "view": "plane", "orientation": "plane",
    "part of the body": "body_region", "body part": "body_region", "body region": "body_region",
    "organ system": "body_region", "region of the body": "body_region",
    "weighting": "mr_weighting", "weighted": "mr_weighting",
    "pixel spacing": "spacing", "spacing": "spacing", "voxel size": "spacing", "pixel size": "spacing",
    "intensity range": "intensity_range", "range of intensities": "intensity_range", "value range": "intensity_range",
    "image size": "image_size", "matrix size": "image_size", "dimensions": "image_size",
    # how an organ looks: no tool states it (yet), so such a question abstains before any tool is called
    "color": "appearance", "colour": "appearance", "shape": "appearance", "look like": "appearance",
}
# study attribute values a closed question may name ("Is this a CT?"), by attribute
ATTRIBUTE_VALUES = {
    "modality": {"ct": "CT", "computed tomography": "CT", "mri": "MR", "mr": "MR", "magnetic resonance": "MR",
                 "x ray": "DX", "xray": "DX", "radiograph": "DX", "ultrasound": "US", "sonography": "US",
                 "dermoscopy": "XC", "fundus": "OP", "endoscopy": "ES", "colonoscopy": "ES", "pathology": "SM",
                 "histology": "SM", "mammogram": "MG", "pet": "PT"},
    "plane": {"transverse": "axial", "axial": "axial", "coronal": "coronal", "sagittal": "sagittal",
              "axially": "axial", "coronally": "coronal", "sagittally": "sagittal",
              "frontal": "frontal", "pa": "frontal", "ap": "frontal", "lateral": "lateral"},
    "body_region": {"head": "head", "brain": "head", "neck": "neck", "chest": "chest", "thorax": "chest",
                    "thoracic": "chest", "abdominal": "abdomen", "pelvic": "pelvis", "cranial": "head", "cervical": "neck",
                    "abdomen": "abdomen", "pelvic cavity": "pelvis", "pelvis": "pelvis", "limb": "limb"},
    "mr_weighting": {"t1": "T1", "t2": "T2", "flair": "FLAIR", "dwi": "DWI"},
}
# DICOM modality codes in the words a reader expects as an answer
MODALITY_ANSWER = {"CT": "CT", "MR": "MRI", "DX": "X-Ray", "CR": "X-Ray", "US": "Ultrasound", "MG": "Mammography",
                   "XC": "Dermoscopy", "OP": "Fundus photograph", "ES": "Endoscopy", "SM": "Pathology", "PT": "PET",
                   "NM": "Nuclear medicine", "OT": "Other"}


def words(text: str) -> str:
    """Lower case, words only, single spaces."""
    return " ".join(re.sub(r"[^a-z0-9]+", " ", text.lower()).split())


def label_key(label: str) -> str:
    """A finding label as one key: parentheses dropped, lower-case words, aliases applied."""
    w = words(re.sub(r"\([^)]*\)", " ", label))
    return ALIASES.get(w, w)


@dataclass(frozen=True)
class Subject:
    """What a question (or a tool's finding label) is about, in vocabulary terms."""

    finding: str | None = None
    organ: str | None = None
    side: str | None = None
    quantities: tuple[str, ...] = ()  # measurement names
    attribute: str | None = None  # modality | plane | body_region | mr_weighting
    attribute_value: str | None = None  # e.g. "CT" for "Is this a CT?"
    organs: tuple[str, ...] = ()  # every organ or tissue named, in the question's order ("fat, soft tissue and bone")
    attributes: tuple[str, ...] = ()  # every study attribute named, in the question's order

    @property
    def text(self) -> str:
        if self.attribute:
            names = " and ".join(a.replace("_", " ") for a in (self.attributes or (self.attribute,)))
            return names + (f" = {self.attribute_value}" if self.attribute_value else "")
        organ = self.organ if self.organ and not (self.finding and self.organ in self.finding) else None
        parts = [p for p in (self.side if organ and self.side and not organ.startswith(self.side) else None,
                             organ, self.finding) if p]
        q = " ".join(parts)
        if self.quantities and len(self.organs) > 1:
            q = "amount of " + ", ".join(self.organs)
        elif self.quantities:
            q = f"{self.quantities[0].replace('_', ' ')} of {q}" if q else self.quantities[0].replace("_", " ")
        return q


def _find(text: str, vocab: tuple[str, ...] | list[str]) -> str | None:
    """The longest vocabulary entry that occurs in `text` as whole words (text already normalised)."""
    padded = f" {text} "
    hits = [v for v in vocab if f" {v} " in padded]
    return max(hits, key=len) if hits else None


def normalise_text(text: str) -> str:
    """Words, with every alias replaced (whole words, longest first)."""
    out = f" {words(text)} "
    for k in sorted(ALIASES, key=len, reverse=True):
        out = out.replace(f" {k} ", f" {ALIASES[k]} ")
    return " ".join(out.split())


def subject_of(text: str) -> Subject:
    """The finding, organ, side, quantities and study attribute that `text` names (any may be absent)."""
    t = normalise_text(text)
    finding = _find(t, FINDINGS)
    if finding in ("oedema",):
        finding = "edema"
    organ = _find(t, ORGANS)
    side = next((s for s in SIDES if f" {s} " in f" {t} "), None)
    if organ and organ.split()[0] in SIDES:
        side, organ = organ.split()[0], organ.split(" ", 1)[1]
    qwords = sorted((k for k in QUANTITIES if f" {k} " in f" {t} "), key=len, reverse=True)
    if set(qwords) <= VAGUE_QUANTITIES and not _find(t, ORGANS):
        qwords = []  # "How much damage ...": how much of what no tool measures
    quantities = tuple(dict.fromkeys(n for k in qwords for n in QUANTITIES[k]))
    found: dict[str, int] = {}
    padded = f" {t} "
    for phrase in sorted(ATTRIBUTE_WORDS, key=len, reverse=True):  # longest phrase first: "pixel spacing" > "spacing"
        at = padded.find(f" {phrase} ")
        if at >= 0 and not any(at >= a and at < a + len(p) for p, a in found.items()):
            found[phrase] = at
    attrs = tuple(dict.fromkeys(ATTRIBUTE_WORDS[p] for p in sorted(found, key=found.get)))
    attribute = attrs[0] if attrs else None
    named = sorted((o for o in ORGANS if f" {o} " in padded and not any(o != p and f" {o} " in f" {p} " for p in ORGANS
                                                                     if f" {p} " in padded)), key=padded.index)
    composite = next((v for k, v in COMPOSITES.items() if f" {k} " in padded), None)
    if composite and not named:
        named, organ = list(composite), organ or composite[0]
    return Subject(finding=finding, organ=organ, side=side, quantities=quantities, attribute=attribute,
                   organs=tuple(named), attributes=attrs)


def attribute_value_in(text: str, attribute: str | None = None) -> tuple[str, str] | None:
    """(attribute, canonical value) named in `text` ("Is this a CT?" -> ("modality", "CT")), if any."""
    t = f" {words(text)} "
    for attr, values in ATTRIBUTE_VALUES.items():
        if attribute and attr != attribute:
            continue
        for k in sorted(values, key=len, reverse=True):
            if f" {k} " in t:
                return attr, values[k]
    return None
