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


def test_a_benchmark_that_names_sides_as_seen_gets_measured_positions_mirrored():
    """SLAKE's "Where is the liver?" says "Left" (as the picture shows it); dxagent's tools say the patient's right.
    The style learns the frame from the references (an organ that lies on one side, named on the other) and mirrors
    a position measured by the tools, never an expert's answer in the benchmark's own words, and never an organ's
    name ("right lung" is anatomical in SLAKE too)."""
    seen = [("Where is the liver?", "Left")] * 4 + [("Where is the liver?", "Left and Top")] * 3 + [
        ("Where is the spleen?", "Right")] * 2
    st = AnswerStyle.fit(seen)
    assert st.sides == "image" and st.to_json()["sides"] == "image"
    assert st.render("Where is the liver?", "right", measured=True) == ("Left", "sides|image+side|location|liver|left")
    assert st.render("Where is the liver?", "right") == ("right", None)  # the expert's words: left alone
    assert st.render("Where is the liver?", "upper right", measured=True) == ("upper left", "sides|image")
    assert st.render("Where is the nodule?", "right lung", measured=True) == ("right lung", None)
    assert st.render("Where is the liver?", "left")[0] == "Left"  # the bare side outweighs "Left and Top"
    anatomical = AnswerStyle.fit([("Where is the liver?", "Right")] * 4 + [("Where is the liver?", "Left")])
    assert anatomical.sides == "patient"
    assert anatomical.render("Where is the liver?", "right", measured=True)[0] == "Right"
    row = {"system": "agent", "question": "Where is the liver?",
           "answer": {"kind": "location", "value": "right", "method": "evidence", "evidence_ids": ["E2"]}}
    assert restyle(row, st)["answer"]["value"] == "Left"
    expert = {**row, "answer": {**row["answer"], "method": "expert", "value": "Left"}}
    assert restyle(expert, st)["answer"]["value"] == "Left"
