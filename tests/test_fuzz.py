"""Issue 15: the generated hostile-input corpus (tests/makers/fuzz.py) through the real pipeline, plus property-based
tests of the manifest reader and the planner's argument validation.

Each corpus case ends as the user must see it: a report, or a one-line error (DxError; on the CLI exit 2 and no
traceback). Afterwards no store under the trace folder holds the file names' patient marker or the text injected into
the DICOM tags. Malformed manifests give a one-line ManifestError or per-row errors, never a crash.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import answer, call
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from makers import fuzz

from agent.app.batch import ManifestError, read_manifest
from agent.engine.session import DxError, run_case

Q = "What is the tissue composition of this image?"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    return root, fuzz.make(root / "inputs")


@pytest.fixture(scope="module")
def outcomes(corpus):
    """Every case through run_case (scripted planner: inspect, then answer) into one trace folder."""
    root, cases = corpus
    got = {}
    for c in cases:
        try:
            res = run_case([str(c.path)], Q, llm="scripted", script=[call("inspect_image"), answer()],
                           trace_dir=root / "traces", route=False, max_wall_s=120)
            got[c.name] = ("ok", res.report["recommendation"]["outcome"])
        except DxError as exc:
            got[c.name] = ("error", str(exc))
    return got


def test_every_corpus_case_ends_as_a_report_or_one_line(corpus, outcomes):
    _, cases = corpus
    table = []
    for c in cases:
        kind, detail = outcomes[c.name]
        table.append(f"{c.name:55} {kind:5} {detail[:90]}")
        assert kind == c.expect, (c.name, kind, detail)
        if kind == "error":
            assert "\n" not in detail and len(detail) <= 400 and c.words in detail, (c.name, detail)
    print("\n".join(table))  # the outcome table (pytest -s)


def test_no_identifier_or_injected_text_in_any_store(corpus, outcomes):
    root, _ = corpus
    scanned = 0
    for f in (root / "traces").rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            scanned += 1
            for needle in (fuzz.NAME.encode(), b"IGNORE PREVIOUS", b"MRN12345"):
                assert needle not in data, (f.name, needle)
    assert scanned >= 3


@pytest.mark.parametrize("which", ["named pipe", "DICOM cut inside its header", "16-bit PNG that would decode to 1.5 GB"])
def test_the_cli_exits_2_with_one_line_and_no_traceback(corpus, tmp_path, which):
    _, cases = corpus
    c = next(x for x in cases if x.name == which)
    r = subprocess.run([sys.executable, "-m", "agent.app.cli", "run", str(c.path), "--llm", "tiny", "--trace-dir",
                        str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, (r.returncode, r.stderr[-500:])
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_malformed_manifests_are_one_line_or_per_row(corpus, tmp_path):
    root, cases = corpus
    image = next(c.path for c in cases if c.name == "constant picture")
    for what, path, kind in fuzz.manifests(tmp_path / "manifests", image):
        if kind == "fatal":
            with pytest.raises(ManifestError) as exc:
                read_manifest(path)
            assert "\n" not in str(exc.value), what
        else:
            _, specs = read_manifest(path, root=image.parent if what != "a path escaping the folder" else None)
            assert specs and all("\n" not in (s.error or "") for s in specs), what
            assert any(s.error for s in specs), what


# -- property-based -----------------------------------------------------------------------------------------------

_line = st.one_of(
    st.text(max_size=80),
    st.dictionaries(st.sampled_from(["case_id", "image", "images", "question", "labels", "modality", "x"]),
                    st.one_of(st.text(max_size=20), st.integers(), st.none(), st.lists(st.text(max_size=8), max_size=3)),
                    max_size=5).map(json.dumps))


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(_line, max_size=8))
@example(lines=['{"case_id": "n", "image": "a\\u0000b.png"}'])  # found by hypothesis: a NUL byte in a path crashed it
def test_the_manifest_reader_never_crashes(tmp_path, lines):
    p = tmp_path / "m.jsonl"
    p.write_bytes("\n".join(lines).encode("utf-8", "surrogatepass"))  # lone surrogates too: not valid UTF-8
    try:
        _, specs = read_manifest(p)
    except ManifestError as exc:
        assert "\n" not in str(exc)
        return
    for s in specs:
        assert "\n" not in (s.error or "")
        assert "/" not in s.case_id and s.case_id not in ("", ".", "..")


@settings(max_examples=200, deadline=None, derandomize=True)
@given(tool=st.sampled_from(["region_measure", "crop_zoom", "ct_window", "answer", "nope", ""]),
       args=st.dictionaries(st.sampled_from(["view", "bbox", "preset", "threshold", "box", "zoom", "x"]),
                            st.one_of(st.none(), st.floats(allow_nan=True), st.integers(), st.text(max_size=10),
                                      st.lists(st.floats(allow_nan=True), max_size=5)), max_size=4))
def test_tool_arguments_from_a_model_are_validated_or_rejected(tool, args):
    """Whatever a model writes as a call, validation gives a decision or a ValueError (a re-ask), never a crash."""
    from agent.engine.planner import validate
    from agent.engine.session import tools

    try:
        d = validate(tools(), tool, args, "", ["V1"], set())
    except ValueError as exc:
        assert str(exc)
        return
    assert d.action in ("call", "answer")


def test_the_corpus_maker_writes_no_big_files(corpus):
    _, cases = corpus
    sizes = [c.path.stat().st_size for c in cases if c.path.is_file() and not c.path.is_symlink()
             and Path(c.path).parent.name == "inputs"]
    assert sizes and max(sizes) < 2_000_000
