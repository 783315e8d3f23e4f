"""The evaluation sweep: CustomConcept101's layout, resumable jobs, the Table-1 summary, bad input,
and the same CSV from one process and from two under `accelerate launch`."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from alignit_core import Concept
from alignit_core.cli import main
from alignit_core.sweep import COLUMNS, Entry, Job, plan, read_dataset, summary

REPO = Path(__file__).resolve().parents[1]
EMBEDDED = REPO / "assets" / "eval" / "embedded.json"


def _embedding(path: Path, token: str, seed: int = 0) -> None:
    save_file({token: torch.randn(1, 32, generator=torch.Generator().manual_seed(seed))}, str(path))


@pytest.fixture(scope="module")
def cc101(tmp_path_factory) -> Path:
    """A two-concept CustomConcept101 tree as Adobe ships it, with concepts trained 'for the tiny SD':
    pet_toy1 as a bare learned_embeds file, plushie_duck with a manifest and masked references."""
    root = tmp_path_factory.mktemp("cc101")
    (root / "prompts").mkdir()
    (root / "prompts" / "toy.txt").write_text("Photo of a {}.\na {} swimming in a pool.\n\na {} in the jungle.\n")
    (root / "prompts" / "plushie.txt").write_text("a {} on a beach\n")
    entries = []
    for name, cls, prompts in (("pet_toy1", "dog", "toy"), ("plushie_duck", "duck plushie", "plushie")):
        refs = root / "benchmark_dataset" / name
        refs.mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (40, 40), (40 * i, 100, 200)).save(refs / f"{i}.jpg")
        entries.append({"instance_prompt": f"photo of a <new1> {cls}", "class_prompt": cls,
                        "instance_data_dir": f"./benchmark_dataset/{name}",
                        "class_data_dir": f"./regularization/{name}",
                        "prompt_filename": f"prompts/{prompts}.txt"})
    masks = root / "masks" / "plushie_duck"  # CatVersion-style: the duck's references masked to the duck
    masks.mkdir(parents=True)
    for i in range(2):
        Image.fromarray(np.pad(np.full((20, 20), 255, np.uint8), 10)).save(masks / f"{i}.png")
    entries[1]["mask_dir"] = "masks/plushie_duck"
    (root / "dataset.json").write_text(json.dumps(entries, indent=4))
    concepts = root / "concepts"
    (concepts / "pet_toy1").mkdir(parents=True)
    _embedding(concepts / "pet_toy1" / "learned_embeds.safetensors", "<new1>")
    (concepts / "plushie_duck").mkdir()
    _embedding(concepts / "plushie_duck" / "learned_embeds.safetensors", "<duck>", 1)
    (concepts / "plushie_duck" / "manifest.json").write_text(json.dumps(
        {"token": "<duck>", "class_word": "duck", "kind": "textual_inversion",
         "weights": "learned_embeds.safetensors"}))
    return root


def test_customconcept101_layout_is_read_and_planned(tiny_sd, cc101):
    entries = read_dataset(cc101, tiny_sd, cc101 / "concepts")
    assert [e.name for e in entries] == ["pet_toy1", "plushie_duck"]
    toy, duck = entries
    assert (toy.concept.token, toy.concept.class_word) == ("<new1>", "dog")  # bare file: class word from the entry
    assert (duck.concept.token, duck.concept.class_word) == ("<duck>", "duck")  # manifest wins
    assert toy.prompts == ("Photo of a {}.", "a {} swimming in a pool.", "a {} in the jungle.")
    assert [p.name for p in toy.references] == ["0.jpg", "1.jpg"] and toy.masks is None
    assert [p.name for p in duck.masks] == ["0.png", "1.png"]
    jobs, texts, skipped = plan(tiny_sd, entries, prompts=2, seeds=3)
    assert len(jobs) == (2 + 1) * 3 and jobs == sorted(jobs) and not skipped
    assert jobs[0] == Job("pet_toy1", 0, 0) and jobs[0].folder == Path("images/pet_toy1/p00-s0")
    assert texts[("pet_toy1", 1)] == ("a <new1> swimming in a pool.", "a dog swimming in a pool.")
    assert texts[("plushie_duck", 0)] == ("a <duck> on a beach", "a duck on a beach")
    assert [e.name for e in read_dataset(cc101 / "dataset.json", tiny_sd, cc101 / "concepts", only=["plushie_duck"])] \
        == ["plushie_duck"]


def test_a_prompt_alignit_cannot_align_is_skipped_with_the_reason(tiny_sd):
    # Custom Diffusion reads `<new1> dog`: two tokens that cannot right-align onto `dog` at position 1
    cd = Concept("cd", "<new1>", "dog", "custom_diffusion", "{token} {class_word}", vectors=(torch.zeros(1, 32),))
    jobs, texts, skipped = plan(tiny_sd, [Entry("cd", cd, ("{} swimming in a pool", "a {} in the jungle"), ())],
                                prompts=None, seeds=1)
    assert jobs == [Job("cd", 1, 0)] and list(texts) == [("cd", 1)]
    assert skipped[0][:2] == ("cd", 0) and "before it" in skipped[0][2]


def test_a_prompt_over_75_tokens_is_generated_and_scored_in_segments(tiny_sd, tmp_path):
    from alignit_core.settings import Settings, resolve
    from alignit_core.sweep import Scoring, run_job

    toy = Concept("toy", "<toy>", "dog", "textual_inversion", vectors=(torch.randn(1, 32),))
    long = "a {} in a garden. " + " ".join(f"Tree number {i} is tall and green, with leaves." for i in range(8))
    entry = Entry("toy", toy, (long,), ())
    jobs, texts, skipped = plan(tiny_sd, [entry], prompts=None, seeds=1)
    assert jobs == [Job("toy", 0, 0)] and not skipped
    settings = resolve(tiny_sd, Settings(steps=2))
    rows, generated, scored = run_job(tiny_sd, entry, jobs[0], texts[("toy", 0)], tmp_path, settings,
                                      Scoring(2, None, {}))
    assert generated and scored and [r["method"] for r in rows] == ["customized", "alignit"]
    assert rows[0]["p"].startswith("a dog in a garden.") and all(np.isfinite(r["mi"]) for r in rows)


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _argv(model: str, dataset: Path, out: Path, *extra: str) -> list[str]:
    return ["eval", "--model", model, "--dataset", str(dataset), "--out", str(out), "--steps", "2",
            "--mi-samples", "2", *extra]


def test_a_sweep_writes_the_table_and_a_second_run_reuses_every_job(tiny_sd_dir, cc101, tmp_path, capsys,
                                                                    monkeypatch):
    out = tmp_path / "out"
    argv = _argv(str(tiny_sd_dir), cc101, out, "--concepts", str(cc101 / "concepts"), "--prompts", "1", "--seeds", "2")
    assert main(argv) == 0
    captured = capsys.readouterr()
    rows = _rows(out / "results.csv")
    assert list(rows[0]) == COLUMNS and len(rows) == 2 * 2 * 2  # concepts x seeds x methods
    assert [(r["concept"], r["seed"], r["method"]) for r in rows[:4]] == [
        ("pet_toy1", "0", "customized"), ("pet_toy1", "0", "alignit"),
        ("pet_toy1", "1", "customized"), ("pet_toy1", "1", "alignit")]
    assert rows[0]["p"] == "Photo of a dog." and rows[0]["prompt"] == "Photo of a <new1>."
    assert all(np.isfinite(float(r["mi"])) and r["clip_text"] == "" for r in rows)
    for r in rows:
        assert (out / r["image"]).is_file()
    assert "| AlignIT vs baseline |" in captured.out and "CLIP is not available" in captured.out
    assert "generated 4, scored 4" in captured.err
    assert (out / "summary.md").read_text().strip() in captured.out

    def no_generation(*a, **k):
        raise AssertionError("a finished job was generated again")

    monkeypatch.setattr("alignit_core.generate.generate_concept", no_generation)
    assert main(argv) == 0
    assert "generated 0, scored 0" in capsys.readouterr().err
    assert _rows(out / "results.csv") == rows
    (out / "images/plushie_duck/p00-s1/scores.json").unlink()  # scoring was interrupted
    assert main(argv) == 0
    assert "generated 0, scored 1" in capsys.readouterr().err
    assert _rows(out / "results.csv") == rows


def test_with_clip_the_summary_is_the_papers_table(tiny_sd_dir, cc101, tmp_path, capsys, monkeypatch):
    from tests.test_scores import build_tiny_clip

    clip = build_tiny_clip()
    monkeypatch.setattr("alignit_core.scores.load_clip", lambda **kw: clip)
    out = tmp_path / "out"
    assert main(_argv(str(tiny_sd_dir), cc101, out, "--concepts", str(cc101 / "concepts"), "--only", "plushie_duck",
                      "--seeds", "1")) == 0
    rows = _rows(out / "results.csv")
    for r in rows:
        t, i = float(r["clip_text"]), float(r["clip_image"])
        assert float(r["overall"]) == pytest.approx(np.sqrt(max(t, 0) * max(i, 0)))
    text = capsys.readouterr().out
    assert "CLIP is not available" not in text and " % |" in text


def test_summary_reports_relative_change_and_the_paired_mi_difference():
    def row(method, t, i, mi):
        return {"method": method, "clip_text": t, "clip_image": i, "overall": (t * i) ** 0.5, "mi": mi}

    rows = [row("customized", 0.2, 0.8, 1.0), row("alignit", 0.3, 0.6, 4.0),
            row("customized", 0.2, 0.8, 2.0), row("alignit", 0.3, 0.6, 3.0)]
    lines = summary(rows).splitlines()
    assert lines[2] == "| customized baseline | 0.200 | 0.800 | 0.400 | 1.50 | 2 |"
    assert lines[3].startswith("| AlignIT | 0.300 | 0.600 | 0.424 | 3.50 | 2 |")
    assert lines[4] == "| AlignIT vs baseline | +50.0 % | -25.0 % | +6.1 % | +2.00 ± 1.00 | |"


BAD = {
    "no dataset file": (["--dataset", "{root}/nope.json"], "no dataset file at"),
    "entry without a concept": ([], "names no concept: give --concepts DIR"),
    "unknown --only": (["--concepts", "{concepts}", "--only", "pet_cat9"], "--only pet_cat9: no such concept"),
    "zero seeds": (["--concepts", "{concepts}", "--seeds", "0"], "--seeds and --prompts must be at least 1"),
    "bad steps": (["--concepts", "{concepts}", "--steps", "0"], "steps must be a whole number"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_exits_2_with_one_error_line_and_writes_nothing(case, tiny_sd_dir, cc101, tmp_path, capsys):
    extra, phrase = BAD[case]
    extra = [a.format(root=cc101, concepts=cc101 / "concepts") for a in extra]
    out = tmp_path / "out"
    argv = _argv(str(tiny_sd_dir), cc101, out) + extra
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and phrase in lines[0], err
    assert "Traceback" not in err and not out.exists()


def test_a_prompt_file_line_without_braces_is_refused(tiny_sd_dir, cc101, tmp_path, capsys):
    root = tmp_path / "ds"
    (root / "prompts").mkdir(parents=True)
    (root / "prompts" / "x.txt").write_text("a {} on a beach\na dog on a beach\n")
    (root / "dataset.json").write_text(json.dumps([{"class_prompt": "dog", "prompt_filename": "prompts/x.txt",
                                                    "concept": str(cc101 / "concepts" / "plushie_duck")}]))
    assert main(_argv(str(tiny_sd_dir), root, tmp_path / "out")) == 2
    assert "x.txt, prompt 2: write {} once where the concept goes" in capsys.readouterr().err


def test_an_out_folder_of_another_sweep_is_refused(tiny_sd_dir, cc101, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "sweep.json").write_text(json.dumps({"model": str(tiny_sd_dir), "steps": 50}))
    assert main(_argv(str(tiny_sd_dir), cc101, out, "--concepts", str(cc101 / "concepts"))) == 2
    assert "holds a sweep made with other settings (steps" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["sweep.json"]


# ------------------------------------------------------------------------------ accelerate launch

def _eval(launcher: list[str], out: Path) -> subprocess.CompletedProcess:
    # one thread per process in both runs: CPU float rounding depends on the thread count
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    args = ["eval", "--model", "embedded", "--dataset", str(EMBEDDED), "--only", "striped-ball-cd", "--prompts", "2",
            "--seeds", "2", "--steps", "4", "--mi-samples", "4", "--device", "cpu", "--out", str(out)]
    return subprocess.run([*launcher, "-m", "alignit_core", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)


def test_two_processes_under_accelerate_launch_give_the_one_process_csv(tmp_path):
    one = _eval([sys.executable], tmp_path / "one")
    assert one.returncode == 0, one.stderr
    two = _eval([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                 "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"], tmp_path / "two")
    assert two.returncode == 0, two.stderr
    assert "4 job(s) on 2 process(es)" in two.stderr
    assert "[0] 2/2" in two.stderr and "[1] 2/2" in two.stderr  # both processes worked
    rows = (tmp_path / "one" / "results.csv").read_text()
    assert len(_rows(tmp_path / "one" / "results.csv")) == 1 * 2 * 2 * 2  # concept x prompts x seeds x methods
    assert (tmp_path / "two" / "results.csv").read_text() == rows
