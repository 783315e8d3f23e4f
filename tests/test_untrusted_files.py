"""Untrusted concept files: a pickle is never run (uploads take safetensors only, local files load
with weights_only), uploaded tensors are checked by name and shape before use, an upload over the
size cap is refused unread, and a manifest cannot point out of its folder.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import gradio as gr
import pytest
import torch
from safetensors.torch import save_file

import app
import alignit_core.concept_files as concept_files
from alignit_core import ConceptError, load_concept
from reliability import WIDTH, assert_intact

pytestmark = pytest.mark.usefixtures("one_thread_per_run")


class Evil:
    """Unpickling this would create `marker`: proof that a pickle ran code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".ckpt", ".pth"])
def test_an_uploaded_pickle_is_refused_unopened_and_its_code_never_runs(suffix, tiny_sd, reference, tmp_path,
                                                                        monkeypatch):
    marker = tmp_path / "pwned"
    path = tmp_path / f"learned_embeds{suffix}"
    torch.save({"<x>": Evil(marker)}, path)
    opened = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: opened.append(a) or pytest.fail("torch.load was called"))
    with pytest.raises(gr.Error, match="only .safetensors can be uploaded"):
        app.add_concept(tiny_sd, {}, {}, str(path), "<x>", "cat")
    assert not opened and not marker.exists()
    assert_intact(tiny_sd, reference)


def test_a_pickle_dressed_as_safetensors_is_refused_and_never_runs(tiny_sd, tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "learned_embeds.safetensors"
    torch.save({"<x>": Evil(marker)}, path)  # a pickle (zip) under the safetensors name
    with pytest.raises(gr.Error, match="not a valid safetensors file"):
        app.add_concept(tiny_sd, {}, {}, str(path), "<x>", "cat")
    assert not marker.exists()


@pytest.mark.parametrize("tensors, token, words", [
    ({"<a>": torch.zeros(WIDTH), "<b>": torch.zeros(WIDTH)}, "", "must hold one token's embedding"),
    ({"<x>": torch.zeros(1, 1, WIDTH)}, "", "must be (vectors, width), got (1, 1, 32)"),
    ({"<x>": torch.zeros(17, WIDTH)}, "", "must be (vectors, width), got (17, 32)"),
    ({"<x>": torch.zeros(0, WIDTH)}, "", "must be (vectors, width), got (0, 32)"),
    ({"<x>": torch.full((1, WIDTH), math.nan)}, "", "finite floating-point numbers"),
    ({"<x>": torch.ones(1, WIDTH, dtype=torch.int32)}, "", "finite floating-point numbers"),
    ({"<x>": torch.zeros(1, WIDTH)}, "<my cat>", "must be one word without spaces"),
], ids=["two tensors", "3-D", "17 vectors", "no vectors", "NaN", "integers", "token with a space"])
def test_uploaded_tensors_are_checked_by_name_and_shape_before_use(tensors, token, words, tiny_sd, reference,
                                                                   tmp_path):
    path = tmp_path / "learned_embeds.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(gr.Error) as e:
        app.add_concept(tiny_sd, {}, {}, str(path), token, "cat")
    assert words in e.value.message and e.value.title == "Concept error"
    assert_intact(tiny_sd, reference)


def test_an_upload_over_the_size_cap_is_refused_before_it_is_read(tiny_sd, tmp_path, monkeypatch):
    path = tmp_path / "learned_embeds.safetensors"
    save_file({"<x>": torch.zeros(16, WIDTH)}, str(path))
    assert path.stat().st_size > 1024
    monkeypatch.setattr(app, "MAX_UPLOAD_BYTES", 1024)
    monkeypatch.setattr(concept_files, "load_file", lambda *a: pytest.fail("the oversized file was read"))
    with pytest.raises(gr.Error, match="the limit is"):
        app.add_concept(tiny_sd, {}, {}, str(path), "", "cat")


def test_a_local_pickle_is_loaded_with_weights_only(tiny_sd, tmp_path, monkeypatch):
    folder = tmp_path / "toy"
    folder.mkdir()
    torch.save({"<toy>": torch.zeros(1, WIDTH)}, folder / "learned_embeds.bin")
    (folder / "manifest.json").write_text(json.dumps({"token": "<toy>", "class_word": "dog",
                                                      "kind": "textual_inversion", "weights": "learned_embeds.bin"}))
    calls = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: (calls.append(k), real(*a, **k))[1])
    assert load_concept(folder, tiny_sd).n_vectors == 1
    assert calls and all(k.get("weights_only") is True for k in calls)


@pytest.mark.parametrize("role", ["custom_diffusion", "text_encoder"])
def test_a_malicious_pickle_in_any_manifest_role_never_runs(role, tiny_sd, tmp_path):
    marker = tmp_path / "pwned"
    folder = tmp_path / "evil"
    folder.mkdir()
    save_file({"<x>": torch.zeros(1, WIDTH)}, str(folder / "learned_embeds.safetensors"))
    evil = {"unet": {"layer.to_k.weight": Evil(marker)}} if role == "custom_diffusion" else {"w": Evil(marker)}
    torch.save(evil, folder / "evil.bin")
    kind = "custom_diffusion" if role == "custom_diffusion" else "text_encoder"
    (folder / "manifest.json").write_text(json.dumps({"token": "<x>", "class_word": "dog", "kind": kind,
                                                      "weights": "learned_embeds.safetensors", role: "evil.bin"}))
    with pytest.raises(ConceptError, match="could not be loaded safely"):
        load_concept(folder, tiny_sd)
    assert not marker.exists()


@pytest.mark.parametrize("role", ["weights", "custom_diffusion", "text_encoder"])
@pytest.mark.parametrize("escape", ["parent", "absolute", "symlink"])
def test_a_manifest_path_out_of_its_folder_is_refused_unread(role, escape, tiny_sd, tmp_path, monkeypatch):
    outside = tmp_path / "secret.safetensors"
    save_file({"<x>": torch.zeros(1, WIDTH)}, str(outside))  # a real, loadable file
    folder = tmp_path / "concept"
    folder.mkdir()
    save_file({"<x>": torch.zeros(1, WIDTH)}, str(folder / "learned_embeds.safetensors"))
    if escape == "symlink":
        (folder / "link.safetensors").symlink_to(outside)
    ref = {"parent": "../secret.safetensors", "absolute": str(outside), "symlink": "link.safetensors"}[escape]
    kind = {"weights": "textual_inversion"}.get(role, role)
    manifest = {"token": "<x>", "class_word": "dog", "kind": kind, "weights": "learned_embeds.safetensors", role: ref}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    read = []
    real = concept_files.load_file
    monkeypatch.setattr(concept_files, "load_file", lambda p, *a: (read.append(Path(p).resolve()), real(p, *a))[1])
    with pytest.raises(ConceptError, match="outside the concept folder"):
        load_concept(folder, tiny_sd)
    assert outside.resolve() not in read
