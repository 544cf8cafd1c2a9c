"""Answers in a benchmark's words (agent/app/answer_style.py): learned from a split's references, applied by the eval
to the systems' values, leaving unknown values, yes/no and numbers alone."""

from __future__ import annotations

import json

from agent.app.answer_style import AnswerStyle
from agent.app.eval import restyle

PAIRS = [("Which plane is this image taken?", "Transverse Plane")] * 3 + [
    ("What is the scanning plane of this image?", "Coronal Plane")] * 3 + [
    ("Which plane is this image taken?", "Sagittal Plane")] * 2 + [  # under the support of 3: not learned
    ("Which part of the body does this image belong to?", "Pelvic Cavity")] * 4 + [
    ("Which lung is abnormal?", "Left Lung")] * 3 + [
    ("Is the liver healthy?", "Yes")] * 5 + [("How many kidneys are there?", "2")] * 5


def test_the_style_maps_values_to_the_reference_words_and_leaves_the_rest_alone():
    st = AnswerStyle.fit(PAIRS)
    assert st.render("Which plane is this image taken?", "axial")[0] == "Transverse Plane"
    assert st.render("In which plane is this image?", "frontal")[0] == "Coronal Plane"  # a frontal radiograph
    assert st.render("Which part of the body does this image belong to?", "pelvis")[0] == "Pelvic Cavity"
    assert st.render("Which lung is abnormal?", "left")[0] == "Left Lung"
    # seen twice only, yes/no, numbers, a value the vocabulary does not know: unchanged, no rule named
    assert st.render("Which plane is this image taken?", "sagittal") == ("sagittal", None)
    assert st.render("Is the liver healthy?", "yes") == ("yes", None)
    assert st.render("How many kidneys are there?", "2") == ("2", None)
    assert st.render("Which plane is this image taken?", "oblique") == ("oblique", None)


def test_the_eval_restyles_system_values_and_keeps_the_raw_one():
    st = AnswerStyle.fit(PAIRS)
    row = {"system": "agent", "question": "Which plane is this image taken?",
           "answer": {"kind": "phrase", "value": "axial", "evidence_ids": ["E1"]}}
    out = restyle(row, st)
    assert out["answer"]["value"] == "Transverse Plane" and out["answer"]["value_raw"] == "axial"
    assert out["answer"]["style_rule"].startswith("attr|plane")
    assert row["answer"]["value"] == "axial"  # the stored row is not changed in place
    abst = {"system": "agent", "question": "Which plane is this image taken?", "answer": {"kind": "abstain"}}
    assert restyle(abst, st) == abst
    prior = {"system": "prior", "question": "Which plane is this image taken?", "answer": {"kind": "phrase",
                                                                                          "value": "axial"}}
    assert restyle(prior, st) == prior
    json.dumps(out)
