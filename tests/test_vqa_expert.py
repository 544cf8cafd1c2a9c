"""Issue 31: the learned VQA expert (tools/vqa_expert.py, card tools/models/vqa_expert_slake).

The card loads from the repository through the model store (sha256 checked); a question far from its training
questions is refused by the gate; a blank picture does not get the real picture's answers; the whole ensemble answers
one validate picture's 13 questions, and the fast mode (EfficientNet members only) ten validate questions per content
type, above loose floors (those skip where ../shared/data is absent). About 40 s in all on two busy cores.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from helpers import make_ctx, run_tool
from PIL import Image

from agent.store.artifacts import ArtifactStore
from agent.store.models import ModelStore

ROOT = Path(__file__).resolve().parent.parent
SLAKE = ROOT.parent / "shared" / "data" / "slake_dev"
CARD = ROOT / "tools" / "models" / "vqa_expert_slake" / "card.yaml"
needs_slake = pytest.mark.skipif(not (SLAKE / "validate.jsonl").is_file(), reason="../shared/data/slake_dev is absent")
PER_TYPE = 10  # validate questions per content type (the first ones in file order)


@pytest.fixture(scope="module")
def astore(tmp_path_factory) -> ArtifactStore:
    return ArtifactStore(tmp_path_factory.mktemp("vqa") / "artifacts")


@pytest.fixture(scope="module")
def ct_ctx(astore):
    """A real CT slice that ships in pydicom's wheel (no ../shared needed)."""
    from pydicom.data import get_testdata_file

    return make_ctx(astore, get_testdata_file("CT_small.dcm"))


def _validate_rows() -> list[dict]:
    return [json.loads(line) for line in (SLAKE / "validate.jsonl").read_text().splitlines() if line.strip()]


def test_card_loads_through_the_model_store_with_its_sha256():
    from tools.vqa_expert import VqaExpert, normalise_answer

    store = ModelStore()
    card = next(c for c in store.cards() if c.name == "vqa_expert_slake")
    assert card.source == CARD.resolve()
    assert store.verify_card(card).ok  # the weights in the repo hash to the card's sha256
    tool = VqaExpert()
    assert [c.name for c in tool.cards(None)] == ["vqa_expert_slake"]
    expert = tool.load(card)
    assert {"yes", "no"} <= {normalise_answer(a) for a in expert.answers} and len(expert.answers) > 200
    assert 0 < card.input["gate"]["question_min_cosine"] < 1 and 0 < card.input["gate"]["image_min_cosine"] < 1
    assert CARD.with_name("weights.pt").stat().st_size <= 30 * 2**20
    assert [m["name"] for m in card.input["members"]] == expert.order and expert.gate_member == expert.order[0]
    assert int(card.validation["validate_reads"]) in (1, 2)


@pytest.mark.parametrize("question", [
    "What is the capital of France?",
    "Does this mole show an irregular pigment network on dermoscopy?",
])
def test_a_question_far_from_training_is_refused(ct_ctx, question):
    out = run_tool(ct_ctx, "vqa_expert", question=question)
    assert out.outside_training and not out.answers and out.yes_no is None
    assert out.gate.question_score < out.gate.question_min
    assert "outside my training distribution" in out.reason and "question" in out.reason
    from tools.vqa_expert import VqaExpert

    view = ct_ctx.state.view("V1")
    assert VqaExpert().findings(out, view) == [] and VqaExpert().attributes(out, view) == {}


def test_the_question_gate_is_readable_without_a_picture():
    from tools.vqa_expert import VqaExpert

    tool = VqaExpert()
    far, thr = tool.question_scope("Is there evidence of an aortic aneurysm?")
    near, _ = tool.question_scope("Does the picture contain liver?")
    assert far < thr <= near


@pytest.mark.parametrize("question, organ", [
    ("Is the heart included on this slice?", "heart"), ("Is renal tissue seen on this slice?", "kidney"),
    ("Are the lungs in the field of view?", "lung"), ("Can you see the mandible here?", "mandible"),
    ("Is the kidney enlarged?", None), ("Is there no heart on this slice?", None), ("Is the spleen on the left?", None),
    ("Is there evidence of liver cancer on this CT?", None), ("Are the lungs abnormal?", None),
])
def test_only_a_sure_presence_reading_is_asked_in_the_training_words(question, organ):
    """A yes/no about whether an organ is there is put to the model as SLAKE's own template (on held-out train the
    expert answered those right 0.91 of the time; the organ segmenter's "absent" on their rewordings 0.63); anything
    more - a finding, a negation, a place - stays as worded (and the gate judges it)."""
    from tools.vqa_expert import VqaExpert, presence_organ

    assert presence_organ(question) == organ
    form = VqaExpert().asked_form(question)
    assert (form is None) == (organ is None) and (form is None or organ in form), form


@pytest.mark.parametrize("question, system", [
    ("Is any part of the respiratory system shown here?", "respiratory"), ("Is any urinary-tract organ visible?",
                                                                             "urinary"),
    ("Does this slice include an organ of the digestive system?", "digestive"),
    ("Is the patient's nervous system affected?", None), ("Is no organ of the nervous system shown?", None),
    ("Which digestive organs can be seen on this slice?", None),
])
def test_a_membership_question_is_asked_as_its_template(question, system):
    from tools.vqa_expert import MEMBERSHIP_TEMPLATE, VqaExpert, member_system

    assert member_system(question) == system
    assert VqaExpert().asked_form(question) == (system and MEMBERSHIP_TEMPLATE.format(s=system))


def test_a_reworded_presence_question_is_answered_as_its_template(ct_ctx):
    """Refused as worded by the gate? Not as a presence question: the model is asked the template, the output keeps
    the question asked (so it answers this very question), and the evidence says how it was asked."""
    from tools.vqa_expert import VqaExpert

    question = "Could you identify any hepatic parenchyma on this section?"
    out = run_tool(ct_ctx, "vqa_expert", question=question)
    assert out.asked_as == "Does the picture contain liver?" and out.question == question
    assert out.gate.question_score >= 0.999 and any("training words" in n for n in out.notes)
    assert VqaExpert().takes_question(question)
    if not out.outside_training:  # the image gate may refuse pydicom's small slice: then it says so
        assert VqaExpert().answer_to(out, ct_ctx.state.view("V1"), question)[0][0] in ("Yes", "No")


def test_a_slake_question_on_a_ct_slice_is_answered_with_calibrated_probabilities(ct_ctx):
    out = run_tool(ct_ctx, "vqa_expert", question="What modality is used to take this image?")
    assert out.gate.question_score >= 0.99  # a SLAKE template
    if out.outside_training:  # pydicom's 128 px test slice may be unlike SLAKE's pictures: then the image gate says so
        assert "picture" in out.reason
        return
    probs = [a.probability for a in out.answers]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001


@needs_slake
def test_a_blank_picture_does_not_get_the_real_pictures_answers(astore, tmp_path):
    real = SLAKE / "imgs" / "xmlab207" / "source.jpg"  # a validate CT of the abdomen (liver, kidneys)
    blank = tmp_path / "blank.png"
    Image.fromarray(np.zeros((512, 512), np.uint8)).save(blank)
    real_ctx, blank_ctx = make_ctx(astore, real), make_ctx(astore, blank, modality="CT")
    differ = 0
    for q in ("Does the picture contain liver?", "Which organ is abnormal?", "What modality is used to take this image?",
              "Where is the liver?"):
        a, b = run_tool(real_ctx, "vqa_expert", question=q), run_tool(blank_ctx, "vqa_expert", question=q)
        assert not a.outside_training, a.reason
        if b.outside_training:  # the image gate refuses a blank picture: no answer at all
            assert "picture" in b.reason and not b.answers
            differ += 1
        elif [x.answer for x in a.answers[:2]] != [x.answer for x in b.answers[:2]]:
            differ += 1
    assert differ == 4


@needs_slake
def test_fast_mode_runs_the_efficientnet_members_only(astore, monkeypatch):
    ctx = make_ctx(astore, SLAKE / "imgs" / "xmlab207" / "source.jpg")
    monkeypatch.setenv("DXAGENT_VQA_CASCADE", "0")
    full = run_tool(ctx, "vqa_expert", question="Does the picture contain kidney?")
    monkeypatch.setenv("DXAGENT_VQA_FAST", "1")
    fast = run_tool(ctx, "vqa_expert", question="Does the picture contain kidney?")
    assert full.members == [m["name"] for m in full_card_members()]
    assert fast.members and all(m.startswith("effnet") for m in fast.members) and len(fast.members) < len(full.members)
    assert any("DXAGENT_VQA_FAST" in n for n in fast.notes)


def full_card_members() -> list[dict]:
    return next(c for c in ModelStore().cards() if c.name == "vqa_expert_slake").input["members"]


@needs_slake
def test_the_full_ensemble_answers_a_validate_picture(astore, monkeypatch):
    """Every question SLAKE validate asks about one CT of the abdomen (13), through the whole ensemble (LiteMedSAM
    included), then through the default cascade (the slow members only where the fast ones are unsure), which must
    give the same top answers wherever the fast members were sure enough to answer alone, and say so. Floor 8 of 13:
    the card's validate overall rate is 0.82 (about 10 of 13 expected; 13 measured)."""
    from agent.app.eval_metrics import closed_correct

    rows = [r for r in _validate_rows() if r["image"] == "imgs/xmlab207/source.jpg"]
    ctx = make_ctx(astore, SLAKE / rows[0]["image"])
    right, whole = 0, []
    monkeypatch.setenv("DXAGENT_VQA_CASCADE", "0")
    for r in rows:
        out = run_tool(ctx, "vqa_expert", question=r["question"])
        assert len(out.members) == len(full_card_members())
        right += int(not out.outside_training and closed_correct(out.answers[0].answer, r["answer"]))
        whole.append(out.answers[0].answer)
    assert len(rows) == 13 and right >= 8, right
    monkeypatch.delenv("DXAGENT_VQA_CASCADE")
    fast_alone = 0
    for r, top in zip(rows, whole, strict=True):
        out = run_tool(ctx, "vqa_expert", question=r["question"])
        if len(out.members) < len(full_card_members()):
            fast_alone += 1
            assert any("cascade" in n for n in out.notes) and out.answers[0].probability >= 0.9
            assert out.answers[0].answer == top, (r["question"], out.answers[0].answer, top)
    assert fast_alone >= 1


@pytest.fixture(scope="module")
def validate_answers(astore):
    """The first PER_TYPE validate questions of each content type, answered through the tool in
    fast mode (the EfficientNet members: LiteMedSAM's 3.4 s a picture would make this a minute and a half; the full
    ensemble is tested above)."""
    if not (SLAKE / "validate.jsonl").is_file():
        pytest.skip("../shared/data/slake_dev is absent")
    from agent.app.eval_metrics import closed_correct

    picked: dict[str, list[dict]] = defaultdict(list)
    for r in _validate_rows():
        if len(picked[r["content_type"]]) < PER_TYPE:
            picked[r["content_type"]].append(r)
    by_image: dict[str, list[dict]] = defaultdict(list)
    for rows in picked.values():
        for r in rows:
            by_image[r["image"]].append(r)
    scores: dict[str, list[int]] = defaultdict(list)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DXAGENT_VQA_FAST", "1")
        for image, rows in by_image.items():
            ctx = make_ctx(astore, SLAKE / image)
            for r in rows:
                out = run_tool(ctx, "vqa_expert", question=r["question"])
                ok = not out.outside_training and closed_correct(out.answers[0].answer, r["answer"])
                scores[r["content_type"]].append(int(ok))
    return scores


# Floors: k/10 with k = floor(10 x the fast mode's SLAKE-validate rate for the content type) - 3 (rates from the one
# validate read, validation.json `validate.effnet_members_alone_without_gate`: Abnormality 0.67, Color 0.74, KG 0.77,
# Modality 0.96, Organ 0.87, Plane 1.0, Position 0.68, Quantity 0.84, Shape 0.73, Size 0.78): three wrong answers more
# than the rate predicts still pass; a broken preprocessing, vocabulary order or checkpoint does not (measured on these
# items: 8, 8, 5, 10, 9, 10, 7, 9, 7, 10 right of 10)
FLOORS = {"Abnormality": 0.3, "Color": 0.4, "KG": 0.4, "Modality": 0.6, "Organ": 0.5, "Plane": 0.7, "Position": 0.3,
          "Quantity": 0.5, "Shape": 0.4, "Size": 0.4}


@needs_slake
@pytest.mark.parametrize("content_type", sorted(FLOORS))
def test_validate_questions_per_content_type(validate_answers, content_type):
    got = validate_answers[content_type]
    assert len(got) == PER_TYPE
    assert np.mean(got) >= FLOORS[content_type] - 1e-9, got


def test_turned_off_it_is_neither_offered_nor_routed(ct_ctx, monkeypatch):
    from agent.engine.session import tools

    expert = tools()["vqa_expert"]
    assert expert.applicable(ct_ctx.state.views[0]) is None
    monkeypatch.setenv("DXAGENT_VQA_EXPERT", "0")
    assert "DXAGENT_VQA_EXPERT=0" in (expert.applicable(ct_ctx.state.views[0]) or "")


def test_a_measurement_question_is_left_to_measuring_tools():
    """Issue 33: the answer vocabulary holds no measured value, so "How much fat is in this slice?" is not the
    expert's; deciding so does not load the question encoder (a cold routed run paid 2-7 s for it)."""
    from tools.vqa_expert import VqaExpert

    assert VqaExpert().takes_question("How much fat is in this slice?") is False
    assert VqaExpert().takes_question("How large is the dominant bright region?") is False
    assert VqaExpert().takes_question("What density is the abnormality?") is True  # "Hyperdense": the gate's call


def test_a_question_worded_unlike_its_training_questions_gets_flatter_probabilities():
    """Issue 30 item 5: the card's wording temperature (fitted on held-out train, in SLAKE's words and reworded as
    clinicians write them) flattens a yes/no answer to a question far from every training question, keeps the top
    answer, and leaves a training template's own wording (cosine 1) as calibrated."""
    from tools.vqa_expert import VqaExpert, normalise_answer

    tool = VqaExpert()
    card = tool.cards(None)[0]
    expert = tool.load(card)
    wording = card.input["wording"]
    assert wording["slope_yes_no"] > 0 and "held-out" in wording["how"]
    yes = [normalise_answer(a) for a in expert.answers].index("yes")
    p = np.full(len(expert.answers), 1e-6, np.float32)
    p[yes] = 0.99
    p /= p.sum()
    assert expert.wording_temperature(p, 1.0) == 1.0 and expert.for_wording(p, 1.0) is p
    near, far = expert.for_wording(p, 0.95), expert.for_wording(p, 0.8)
    assert far.argmax() == yes and 0.5 < far[yes] < near[yes] < p[yes]
    assert abs(float(far.sum()) - 1.0) < 1e-4


@needs_slake
def test_a_reworded_yes_no_question_says_its_probabilities_were_flattened(astore):
    real = SLAKE / "imgs" / "xmlab207" / "source.jpg"  # a validate CT of the abdomen (liver, kidneys)
    ctx = make_ctx(astore, real)
    # cosine 0.93 to train's nearest; not a presence question, so asked as worded (a presence one would be put as its
    # template: test_a_reworded_presence_question_is_answered_as_its_template)
    out = run_tool(ctx, "vqa_expert", question="Does the liver appear normal here?")
    assert not out.outside_training and out.gate.question_score < 0.99 and out.yes_no is not None
    assert out.asked_as is None
    assert any("wording temperature" in n for n in out.notes)
