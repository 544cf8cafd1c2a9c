"""Model store and model cards: real weight files, real hashes, the CLI as a user runs it."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from agent.store.models import ModelCardError, ModelStore, ModelStoreError, load_card, load_weights_path, planner_lines

DX = [sys.executable, "-m", "agent.app.cli"]


@pytest.fixture(autouse=True)
def _user_store_only(monkeypatch):
    """These tests are about the user's store; the bundled cards (tools/models) are tested in test_study_classify."""
    monkeypatch.setenv("DXAGENT_BUNDLED_MODELS", "0")


def save_weights(path: Path, seed: int = 0) -> str:
    """A real (tiny) torch state_dict on disk; returns its sha256."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 1))
    torch.save(net.state_dict(), path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_card(folder: Path, name: str = "toy_unet", weights: str = "toy.pt", sha: str | None = None, **over) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    actual = save_weights(folder / weights)  # real weights always; `sha` overrides what the card claims
    sha = sha or actual
    card = {"name": name, "kind": "segment", "adapter": "monai_bundle", "modalities": ["CT"], "body_part": "abdomen",
            "labels": ["liver", "spleen", "left kidney", "right kidney", "aorta", "pancreas"],
            "input": {"size": [96, 96, 96], "channels": 1, "spacing": [1.5, 1.5, 2.0], "intensity": "HU -57..164 -> 0..1"},
            "weights": weights, "sha256": sha, "license": "MIT", "intended_use": "tests of the model store",
            "validation": {"dice": 0.912, "dataset": "synthetic phantoms"}, "version": 1.0}
    card.update(over)
    card = {k: v for k, v in card.items() if v is not None}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(card, sort_keys=False))
    return path


def test_add_list_get_verify_and_self_contained_copy(tmp_path):
    src = write_card(tmp_path / "src")
    store = ModelStore(tmp_path / "store")
    card = store.add(src)
    assert card.source == (tmp_path / "store" / "toy_unet" / "card.yaml").resolve()
    assert card.weights == "toy.pt" and card.weights_path.read_bytes() == (tmp_path / "src" / "toy.pt").read_bytes()
    assert card.version == "1.0" and card.kind == "segment"
    # the stored card no longer depends on the source folder
    (tmp_path / "src" / "toy.pt").unlink()
    [entry] = store.list()
    assert entry.ok and entry.name == "toy_unet"
    assert store.get("toy_unet").labels[0] == "liver"
    [v] = store.verify()
    assert v.ok and v.got == card.sha256
    assert store.load_weights_path("toy_unet") == card.weights_path
    assert load_weights_path(card, store) == card.weights_path
    with pytest.raises(ModelStoreError, match="no model 'nope'"):
        store.get("nope")
    [line] = planner_lines(store.usable())
    assert line.startswith("toy_unet: segment") and "CT abdomen" in line and "liver, spleen, left kidney, right kidney +2" \
        in line and "dice 0.912" in line


def test_no_copy_points_to_absolute_weights(tmp_path):
    src = write_card(tmp_path / "src")
    store = ModelStore(tmp_path / "store")
    card = store.add(src, copy_weights=False)
    assert card.weights_path == (tmp_path / "src" / "toy.pt").resolve()
    assert not (tmp_path / "store" / "toy_unet" / "toy.pt").exists()
    (tmp_path / "src" / "toy.pt").unlink()
    [v] = store.verify()
    assert v.status == "missing weights"
    with pytest.raises(ModelStoreError) as exc:
        store.load_weights_path(card)
    msg = str(exc.value)
    assert "toy_unet" in msg and "weights not found" in msg and "\n" not in msg
    assert store.usable() == []


def test_sha256_mismatch_refused_at_add_and_detected_after_tampering(tmp_path):
    src = write_card(tmp_path / "src", sha="0" * 64)
    store = ModelStore(tmp_path / "store")
    with pytest.raises(ModelStoreError, match="sha256 mismatch .* expected 0{64}, got [0-9a-f]{64}"):
        store.add(src)
    assert store.list() == [] and not (tmp_path / "store" / "toy_unet").exists()
    assert not [p for p in (tmp_path / "store").iterdir() if p.name.startswith(".add-")]  # no half-written folder

    good = write_card(tmp_path / "src2")
    card = store.add(good)
    with open(card.weights_path, "r+b") as f:  # flip one byte in place
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 0xFF]))
    [v] = store.verify("toy_unet")
    assert v.status == "sha256 mismatch" and v.expected == card.sha256 and v.got != card.sha256
    with pytest.raises(ModelStoreError, match="model card 'toy_unet': sha256 mismatch"):
        store.load_weights_path(card)


def test_sha256_cache_is_used_and_invalidated_when_the_file_changes(tmp_path, monkeypatch):
    import agent.store.models as models

    path = tmp_path / "w.bin"
    path.write_bytes(os.urandom(3 << 20))  # 3 MiB: three chunks
    store = ModelStore(tmp_path / "store")
    first = store.sha256(path)
    assert first == hashlib.sha256(path.read_bytes()).hexdigest()
    cached = json.loads(store.cache_path.read_text())
    assert cached[str(path.resolve())]["sha256"] == first

    calls = []
    real = models._hash_file
    monkeypatch.setattr(models, "_hash_file", lambda p: calls.append(p) or real(p))
    assert ModelStore(tmp_path / "store").sha256(path) == first and calls == []  # a new store reads the JSON cache

    path.write_bytes(os.urandom(3 << 20))  # same size, new content and mtime
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    second = ModelStore(tmp_path / "store").sha256(path)
    assert calls == [path] and second == hashlib.sha256(path.read_bytes()).hexdigest() and second != first
    # --fresh rehashes even when size and mtime look unchanged
    ModelStore(tmp_path / "store").sha256(path, fresh=True)
    assert len(calls) == 2


@pytest.mark.parametrize("change, field, words", [
    ({"kind": "regress"}, "kind", "segment"),
    ({"sha256": None}, "sha256", "required field missing"),
    ({"sha256": "z" * 64}, "sha256", "64 hexadecimal digits"),
    ({"sha256": "ab" * 31}, "sha256", "64 hexadecimal digits"),
    ({"modalities": []}, "modalities", "at least 1"),
    ({"name": "bad name!"}, "name", "identifier"),
    ({"weights_file": "x.pt"}, "weights_file", "unknown field"),
])
def test_malformed_card_is_a_one_line_error_naming_file_and_field(tmp_path, change, field, words):
    path = write_card(tmp_path, **change)
    with pytest.raises(ModelCardError) as exc:
        load_card(path)
    msg = str(exc.value)
    assert msg.startswith(f"{path}: {field}: ") and words in msg and "\n" not in msg, msg


def test_non_mapping_and_invalid_yaml_cards(tmp_path):
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    (tmp_path / "bad.yaml").write_text("name: [unclosed\nkind: segment\n")
    for name in ("list.yaml", "bad.yaml"):
        with pytest.raises(ModelCardError) as exc:
            load_card(tmp_path / name)
        assert str(exc.value).startswith(str(tmp_path / name)) and "\n" not in str(exc.value)


def test_broken_card_listed_not_crashing_and_name_clash(tmp_path):
    store = ModelStore(tmp_path / "store")
    store.add(write_card(tmp_path / "a"))
    (tmp_path / "store" / "broken.yaml").write_text("name: broken\nkind: regress\n")
    entries = {e.name: e for e in store.list()}
    assert entries["toy_unet"].ok and not entries["broken"].ok
    assert "kind" in entries["broken"].error or "adapter" in entries["broken"].error
    assert {v.name: v.status for v in store.verify()} == {"toy_unet": "ok", "broken": "broken card"}
    with pytest.raises(ModelCardError):
        store.get("broken")

    other = write_card(tmp_path / "b", weights="other.pt")
    with pytest.raises(ModelStoreError, match="already in the store .*--replace"):
        store.add(other)
    card = store.add(other, replace=True)
    assert card.weights == "other.pt" and sorted(p.name for p in (tmp_path / "store" / "toy_unet").iterdir()) == [
        "card.yaml", "other.pt"]
    assert store.verify("toy_unet")[0].ok


def test_default_store_dir_is_not_the_planner_model_folder(monkeypatch, tmp_path):
    monkeypatch.delenv("DXAGENT_MODELS", raising=False)
    monkeypatch.setenv("DXAGENT_CACHE", str(tmp_path / "cache"))
    assert ModelStore().dir == tmp_path / "cache" / "models" / "cards"
    monkeypatch.setenv("DXAGENT_MODELS", str(tmp_path / "m"))
    assert ModelStore().dir == tmp_path / "m"


def dx(*args, models: Path):
    env = {**os.environ, "COLUMNS": "200", "DXAGENT_MODELS": str(models)}
    return subprocess.run([*DX, *map(str, args)], capture_output=True, text=True, timeout=120, env=env)


def one_line_error(r) -> str:
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in r.stderr and len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    return lines[0]


def test_cli_models_add_list_verify_end_to_end(tmp_path):
    models = tmp_path / "store"
    src = write_card(tmp_path / "src")
    r = dx("models", "add", src, models=models)
    assert r.returncode == 0, r.stderr
    assert "added toy_unet" in r.stdout
    assert "already in the store" in one_line_error(dx("models", "add", src, models=models))
    assert dx("models", "add", src, "--replace", "--no-copy", models=models).returncode == 0

    bad = write_card(tmp_path / "bad", name="bad_card", sha="1" * 64)
    r = dx("models", "add", bad, models=models)
    assert r.returncode == 2 and "sha256 mismatch" in one_line_error(r)
    r = dx("models", "add", tmp_path / "missing.yaml", models=models)
    assert r.returncode == 2 and "cannot read card" in one_line_error(r)

    r = dx("models", "list", models=models)
    assert r.returncode == 0 and "toy_unet" in r.stdout and "monai_bundle" in r.stdout and "dice 0.912" in r.stdout
    [row] = json.loads(dx("models", "list", "--json", models=models).stdout)
    assert row["status"] == "ok" and row["card"]["weights"] == str((tmp_path / "src" / "toy.pt").resolve())

    r = dx("models", "verify", models=models)
    assert r.returncode == 0 and "ok" in r.stdout
    (tmp_path / "src" / "toy.pt").write_bytes(b"not the weights")
    r = dx("models", "verify", "toy_unet", models=models)
    assert r.returncode == 1 and "sha256 mismatch" in r.stdout
    (models / "junk.yaml").write_text("kind: nonsense\n")
    r = dx("models", "list", models=models)
    assert r.returncode == 0 and "BROKEN" in r.stdout and "junk" in r.stdout
    assert "no model 'nope'" in one_line_error(dx("models", "verify", "nope", models=models))


def test_a_card_is_parsed_once_and_again_when_it_changes(tmp_path, monkeypatch):
    """Issue 33 (cold start): routing read the same cards 48 times per case. A card unchanged on disk is not parsed
    again; an edited one is, and a caller's changes to its copy never leak into the next read."""
    path = write_card(tmp_path / "m")
    first = load_card(path)
    first.labels.append("mutated by a caller")
    calls = []
    real = yaml.load
    monkeypatch.setattr(yaml, "load", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = load_card(path)
    assert calls == [] and "mutated by a caller" not in again.labels and again == load_card(path)
    text = path.read_text().replace("version: 1.0", "version: 2.0")
    path.write_text(text + "\n")
    assert load_card(path).version == "2.0" and calls == [1]
