"""The CLI contract: `python -m alignit_core generate|tokens ...` writes reproducible images and
settings, and bad input exits 2 with one `error:` line and writes nothing."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from alignit_core.cli import main
from alignit_core.generate import ONE_OBJECT

REPO = Path(__file__).resolve().parents[1]
SETTINGS_KEYS = {"model", "prompt", "p", "p_dummy", "positions", "token_tables", "seed", "steps", "guidance", "size",
                 "scheduler", "versions"}


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "alignit_core", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def png_settings(path: Path) -> dict:
    with Image.open(path) as im:
        return json.loads(im.text["alignit"])


@pytest.fixture(scope="module")
def toy_concept(tmp_path_factory) -> Path:
    """A textual-inversion concept `<toy>` (class word 'dog') for the tiny SD's 32-wide encoder."""
    folder = tmp_path_factory.mktemp("concepts") / "toy"
    folder.mkdir()
    save_file({"<toy>": torch.randn(1, 32, generator=torch.Generator().manual_seed(0))},
              str(folder / "learned_embeds.safetensors"))
    (folder / "manifest.json").write_text(json.dumps({"token": "<toy>", "class_word": "dog",
                                                      "kind": "textual_inversion",
                                                      "weights": "learned_embeds.safetensors"}))
    return folder


# ------------------------------------------------------------------------------ token swap


@pytest.fixture(scope="module")
def swap_run(tiny_sd_dir, tmp_path_factory):
    """`generate ... --swap dog=zebra` run as a real process: (completed process, out dir)."""
    out = tmp_path_factory.mktemp("swap") / "out"
    proc = run_cli("generate", "--model", str(tiny_sd_dir), "--prompt", "a jumping dog", "--swap", "dog=zebra",
                   "--steps", "2", "--out", str(out))
    return proc, out


def test_generate_swap_as_a_process_exits_zero_and_writes_its_files(swap_run):
    proc, out = swap_run
    assert proc.returncode == 0, proc.stderr
    names = ["baseline.png", "swapped.png", "heatmaps.png", "maps.safetensors", "settings.json"]
    assert sorted(p.name for p in out.iterdir()) == sorted(names)
    assert [Path(line).name for line in proc.stdout.split()] == names  # each written path printed
    assert not error_lines(proc.stderr)


def test_settings_json_records_the_dog_to_zebra_swap(swap_run, tiny_sd_dir):
    _, out = swap_run
    s = json.loads((out / "settings.json").read_text())
    assert SETTINGS_KEYS <= set(s)
    assert s["model"] == str(tiny_sd_dir) and s["mode"] == "swap"
    assert (s["prompt"], s["p"], s["p_dummy"], s["positions"]) == ("a jumping dog", "a jumping dog", "* * zebra", [3])
    assert (s["seed"], s["steps"], s["size"], s["scheduler"]) == (0, 2, 64, "ddim")
    assert s["guidance"] == 7.5
    assert {"alignit", "torch", "diffusers", "transformers"} <= set(s["versions"])
    table = s["token_tables"]["swapped"]
    assert [(t["position"], t["text"]) for t in table[1:-1]] == [(1, "a"), (2, "jumping"), (3, "dog")]
    assert set(s["token_tables"]) == {"baseline", "swapped"}


def test_every_png_carries_the_settings_in_its_alignit_metadata(swap_run):
    _, out = swap_run
    s = json.loads((out / "settings.json").read_text())
    for name in ("baseline.png", "swapped.png", "heatmaps.png"):
        assert png_settings(out / name) == s


def test_swap_changes_the_image_and_the_same_command_reproduces_it(swap_run, tiny_sd_dir, tmp_path, capsys):
    _, first = swap_run
    again = tmp_path / "again"
    assert main(["generate", "--model", str(tiny_sd_dir), "--prompt", "a jumping dog", "--swap", "dog=zebra",
                 "--steps", "2", "--out", str(again)]) == 0
    for name in ("baseline.png", "swapped.png"):
        with Image.open(first / name) as a, Image.open(again / name) as b:
            assert a.tobytes() == b.tobytes()
    with Image.open(first / "baseline.png") as a, Image.open(first / "swapped.png") as b:
        assert a.tobytes() != b.tobytes()


def test_settings_given_on_the_command_line_are_the_ones_recorded(tiny_sd_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["generate", "--model", str(tiny_sd_dir), "--prompt", "banana in a white plate", "--swap",
                 "4=black", "--steps", "3", "--seed", "7", "--guidance", "4", "--size", "128", "--scheduler",
                 "euler", "--out", str(out)]) == 0
    s = json.loads((out / "settings.json").read_text())
    assert (s["p_dummy"], s["positions"]) == ("* * * black *", [4])  # 'white' from 'black' 
    assert (s["seed"], s["steps"], s["guidance"], s["size"], s["scheduler"]) == (7, 3, 4.0, 128, "euler")
    with Image.open(out / "swapped.png") as im:
        assert im.size == (128, 128)


def test_maps_safetensors_holds_each_images_unscaled_maps_and_its_tokens(swap_run):
    from safetensors import safe_open

    _, out = swap_run
    s = json.loads((out / "settings.json").read_text())
    with safe_open(str(out / "maps.safetensors"), "np") as f:
        meta = f.metadata()
        maps = {row: f.get_tensor(row) for row in f.keys()}
    assert set(maps) == {"baseline", "swapped"} and json.loads(meta["settings"]) == s
    tokens, positions, words = (json.loads(meta[k]) for k in ("tokens", "positions", "words"))
    assert tokens["swapped"] == ["<|startoftext|>", "a", "jumping", "dog", "<|endoftext|>"]
    assert positions["swapped"] == [0, 1, 2, 3, 4] and words["swapped"][1:4] == ["a", "jumping", "dog"]
    for row, m in maps.items():
        assert m.dtype == np.float32 and m.shape == (5, 8, 8)
        assert (m >= 0).all() and (m.sum(0) <= 1 + 1e-5).all()  # attention probabilities, not scaled per map


def test_the_grid_names_its_columns_as_the_demo_does(tmp_path, monkeypatch, capsys):
    """The grid said `customized`, `alignit` where the page says `customized baseline`, `AlignIT`."""
    import visualize

    drawn, real = [], visualize.comparison_grid
    monkeypatch.setattr(visualize, "comparison_grid",
                        lambda columns, *a, **k: drawn.append([c for c, _, _ in columns]) or real(columns, *a, **k))
    assert main(["generate", "--model", "embedded", "--concept", "striped-ball-ti", "--prompt",
                 "a <striped-ball> on a green background", "--steps", "1", "--base", "--out", str(tmp_path)]) == 0
    assert drawn == [["customized baseline", "AlignIT", "base model on p"]]


def test_map_blocks_and_steps_on_the_command_line_are_recorded(tiny_sd_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["generate", "--model", str(tiny_sd_dir), "--prompt", "a jumping dog", "--swap", "dog=zebra",
                 "--steps", "4", "--map-blocks", "up", "--map-steps", "0.5", "1", "--out", str(out)]) == 0
    s = json.loads((out / "settings.json").read_text())
    assert (s["map_blocks"], s["map_steps"]) == (["up"], [0.5, 1.0])


# ------------------------------------------------------------------------------ concept mode


def test_concept_mode_on_the_embedded_model_writes_customized_alignit_and_base(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["generate", "--model", "embedded", "--concept", "striped-ball-ti", "--prompt",
                 "a <striped-ball> on a green background", "--steps", "2", "--base", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["customized.png", "alignit.png", "base.png", "heatmaps.png", "maps.safetensors", "settings.json"])
    s = json.loads((out / "settings.json").read_text())
    assert s["mode"] == "alignit" and s["rows"] == ["customized", "alignit", "base"]
    assert s["concept"] == {"name": "striped-ball-ti", "token": "<striped-ball>", "class_word": "circle",
                            "kind": "textual_inversion"}
    assert (s["p"], s["p_dummy"], s["positions"]) == ("a circle on a green background", "* <striped-ball> * * * *", [2])
    assert png_settings(out / "alignit.png") == s
    with Image.open(out / "customized.png") as a, Image.open(out / "alignit.png") as b:
        assert a.tobytes() != b.tobytes()


def test_concept_mode_positions_override_the_class_word(tiny_sd_dir, toy_concept, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["generate", "--model", str(tiny_sd_dir), "--concept", str(toy_concept), "--prompt",
                 "a photo of a <toy>", "--positions", "4", "5", "--steps", "2", "--out", str(out)]) == 0
    s = json.loads((out / "settings.json").read_text())
    assert (s["p"], s["positions"]) == ("a photo of a dog", [4, 5])


def test_two_concepts_in_one_prompt_each_from_its_own_model(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["generate", "--model", "embedded", "--concept", "striped-ball-ti", "--concept", "holed-star-cd",
                 "--prompt", "a <striped-ball> and a <holed-star> on a green background", "--steps", "2",
                 "--out", str(out)]) == 0
    s = json.loads((out / "settings.json").read_text())
    assert s["p"] == "a circle and a star on a green background"
    assert s["customized_prompt"] == "a <striped-ball> and a <holed-star> star on a green background"
    assert [(c["name"], c["p_dummy"], c["positions"]) for c in s["concepts"]] == [
        ("striped-ball-ti", "* <striped-ball> * * * * * * *", [2]),
        ("holed-star-cd", "* * * <holed-star> star * * * *", [5])]
    assert s["positions"] == [2, 5] and s["rows"] == ["customized", "alignit"]
    # the shapes world draws one object a picture: said beside the result (tiny Stable Diffusion models: no warning)
    assert s["warnings"] == [ONE_OBJECT] and f"warning: {ONE_OBJECT}" in capsys.readouterr().err
    assert main(["tokens", "--model", "embedded", "--concept", "striped-ball-ti", "--concept", "holed-star-cd",
                 "--prompt", "a <striped-ball> and a <holed-star> on a green background"]) == 0
    printed = capsys.readouterr().out
    assert [tok for _, tok in table_rows(printed, "p'[<holed-star>]")][4:6] == ["<holed-star>", "star"]
    assert [tok for _, tok in table_rows(printed, "p'[<striped-ball>]")][2] == "<striped-ball>"


def test_swap_knobs_reach_the_settings(tiny_sd_dir, tmp_path):
    out = tmp_path / "out"
    assert main(["generate", "--model", str(tiny_sd_dir), "--prompt", "a jumping dog", "--swap", "dog=zebra",
                 "--swap-kv", "v", "--swap-strength", "0.5", "--steps", "2", "--out", str(out)]) == 0
    s = json.loads((out / "settings.json").read_text())
    assert (s["swap_kv"], s["swap_strength"]) == ("v", 0.5)


# ------------------------------------------------------------------------------ tokens


def table_rows(text: str, label: str) -> list[tuple[int, str]]:
    """(position, token) rows of the table headed `label: ...` in the `tokens` output."""
    rows, inside = [], False
    for line in text.splitlines():
        if re.match(r"^\S+: ", line):
            inside = line.startswith(f"{label}: ")
            continue
        m = re.match(r"^\s*(\d+)\s+\d+\s+\d+\s+(\S+)", line)
        if inside and m:
            rows.append((int(m.group(1)), m.group(2)))
    return rows


def test_tokens_prints_positions_with_the_start_token_at_zero(capsys):
    assert main(["tokens", "--model", "embedded", "--prompt", "a photo of a cat"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "p: a photo of a cat"
    rows = table_rows(out, "p")
    assert [pos for pos, _ in rows] == list(range(7))
    assert [tok for _, tok in rows][1:6] == ["a", "photo", "of", "a", "cat"]
    assert rows[0][1] == "<|startoftext|>" and rows[-1][1] == "<|endoftext|>"


def test_tokens_of_a_long_prompt_number_positions_through_the_segments(capsys):
    text = " ".join(f"The {c} circle sits on a plain background." for c in ["red", "green", "blue"] * 4)
    assert main(["tokens", "--model", "embedded", "--prompt", text]) == 0
    out = capsys.readouterr().out
    rows = table_rows(out, "p")
    assert [pos for pos, _ in rows] == list(range(len(rows))) and len(rows) > 77
    assert [tok for _, tok in rows].count("<|startoftext|>") >= 2  # one start token per segment
    assert [tok for _, tok in rows].count("circle") == 12  # every word kept
    assert main(["tokens", "--model", "embedded", "--prompt", text, "--long-prompt", "truncate"]) == 0
    out = capsys.readouterr().out
    assert "not read:" in out and len(table_rows(out, "p")) == 77


def test_tokens_with_a_concept_shows_customized_p_and_dummy_tables(capsys):
    assert main(["tokens", "--model", "embedded", "--concept", "striped-ball-cd", "--prompt",
                 "a <striped-ball> on a green background"]) == 0
    out = capsys.readouterr().out
    assert [tok for _, tok in table_rows(out, "customized")][1:4] == ["a", "<striped-ball>", "circle"]
    assert [tok for _, tok in table_rows(out, "p")][1:3] == ["a", "circle"]
    assert [tok for _, tok in table_rows(out, "p'")][1:3] == ["<striped-ball>", "circle"]


# ------------------------------------------------------------------------------ bad input


LONG = " ".join(["red circle"] * 40)  # 80 tokens
BAD = {
    "empty prompt": (["--prompt", ""], "the prompt is empty"),
    "whitespace prompt": (["--prompt", "   "], "the prompt is empty"),
    "concept token absent": (["--concept", "{toy}", "--prompt", "a photo of a cat"], "<toy> is not in the prompt"),
    "unknown concept": (["--concept", "no-such-concept"], "unknown concept 'no-such-concept'"),
    "unknown model id": (["--model", "nobody/no-such-model"], "not available offline"),
    "position 0": (["--concept", "{toy}", "--positions", "0"], "position 0 is the start token"),
    "position 99": (["--concept", "{toy}", "--positions", "99"], "position 99 is outside the prompt"),
    "position -1": (["--concept", "{toy}", "--positions", "-1"], "position -1 is outside the prompt"),
    "position twice": (["--concept", "{toy}", "--positions", "3", "3"], "position 3 is given twice"),
    "position not a number": (["--concept", "{toy}", "--positions", "x"], "position 'x' is not a whole number"),
    "swap strength over 1": (["--swap-strength", "2"], "the swap strength must be a number from 0"),
    "same concept twice": (["--concept", "{toy}", "--concept", "{toy}"], "<toy> is chosen twice"),
    "swap word absent": (["--swap", "cat=zebra"], "the word 'cat' is not in the prompt"),
    "swap source too long": (["--swap", "dog=hippopotamus"], "'hippopotamus' is 3 tokens but 'dog' has only 1"),
    "steps 0": (["--steps", "0"], "steps must be a whole number from 1 to 150"),
    "steps 10000": (["--steps", "10000"], "steps must be a whole number from 1 to 150"),
    "guidance nan": (["--guidance", "nan"], "guidance must be a finite number"),
    "guidance inf": (["--guidance", "inf"], "guidance must be a finite number"),
    "size 100": (["--size", "100"], "size must be a multiple of 8"),
    "size 10000": (["--size", "10000"], "size must be a multiple of 8"),
    "seed -1": (["--seed", "-1"], "seed must be a whole number from 0"),
    "seed 2**40": (["--seed", str(2**40)], "seed must be a whole number from 0"),
    "prompt over 75 tokens, segments refused": (["--prompt", LONG, "--long-prompt", "refuse"],
                                                "this model reads at most 75"),
}


def bad_argv(tiny_sd_dir, toy_concept, out: Path, extra: list[str]) -> list[str]:
    """`generate` on the tiny SD ('a jumping dog', dog=zebra; concept cases 'a photo of a <toy>'),
    with `extra` overriding or adding options."""
    extra = [str(toy_concept) if a == "{toy}" else a for a in extra]
    concept = "--concept" in extra
    argv = ["generate", "--model", str(tiny_sd_dir), "--steps", "2", "--out", str(out)]
    if "--prompt" not in extra:
        argv += ["--prompt", "a photo of a <toy>" if concept else "a jumping dog"]
    if not concept and "--swap" not in extra:
        argv += ["--swap", "dog=zebra"]
    return argv + extra


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_exits_2_with_one_error_line_and_writes_nothing(case, tiny_sd_dir, toy_concept, tmp_path, capsys):
    extra, phrase = BAD[case]
    out = tmp_path / "out"
    assert main(bad_argv(tiny_sd_dir, toy_concept, out, extra)) == 2
    err = capsys.readouterr().err
    lines = error_lines(err)
    assert len(lines) == 1, err
    assert phrase in lines[0]
    assert "Traceback" not in err
    assert not out.exists()


def test_unknown_scheduler_is_an_argparse_error_with_status_2(tiny_sd_dir, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        main(bad_argv(tiny_sd_dir, None, out, ["--scheduler", "lms"]))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'lms'" in err and "ddim" in err
    assert not out.exists()


def test_bad_input_as_a_process_exits_2_with_one_error_line(tiny_sd_dir, tmp_path):
    out = tmp_path / "out"
    proc = run_cli("generate", "--model", str(tiny_sd_dir), "--prompt", "a jumping dog", "--swap", "cat=zebra",
                   "--steps", "2", "--out", str(out))
    assert proc.returncode == 2
    lines = error_lines(proc.stderr)
    assert lines == ["error: the word 'cat' is not in the prompt"]
    assert proc.stdout == "" and "Traceback" not in proc.stderr
    assert not out.exists()


def test_an_unknown_model_is_the_only_line_on_stderr():
    """Loading passed diffusers' deprecated `torch_dtype`: its FutureWarning came before the error."""
    proc = run_cli("tokens", "--model", "no-such-org/no-such-model", "--prompt", "a jumping dog")
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == ["error: model 'no-such-org/no-such-model' is not available offline (no "
                                        "local copy; the hub is not reachable). Use --model embedded or a local "
                                        "diffusers folder"]
    assert proc.stdout == ""


def test_loading_a_model_does_not_warn_about_image_processors_it_never_uses():
    """diffusers looks up image-processor classes while loading; without torchvision transformers warned
    about `CLIPImageProcessor` and `SiglipImageProcessor` as the first lines of every command."""
    proc = run_cli("tokens", "--model", "embedded", "--prompt", "a red circle on a blue background")
    assert proc.returncode == 0, proc.stderr
    assert "torchvision" not in proc.stderr and "ImageProcessor" not in proc.stderr, proc.stderr


def test_a_generation_writes_only_its_model_line_on_stderr(tmp_path):
    """diffusers' "Loading pipeline components" and transformers' "Loading weights" bars (two nested bars
    of carriage returns) came before the `model: ...` line on every command."""
    proc = run_cli("generate", "--model", "embedded", "--prompt", "a red circle on a blue background", "--swap",
                   "red=yellow", "--steps", "2", "--out", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("model: embedded-shapes"), proc.stderr


def test_the_help_examples_are_commands_a_shell_reads_as_written():
    """A backslash at a line's end in the help's docstring joined the lines (a run of spaces inside one
    command); each example is now shown with its continuation and parses as written."""
    import shlex

    from alignit_core.cli import parser

    text = parser().format_help()
    joined = re.sub(r"\\\n\s+", " ", text)  # as a shell reads a line that ends in a backslash
    commands = [c for c in joined.splitlines() if c.strip().startswith("python -m alignit_core ")]
    assert len(commands) == 4, text
    for command in commands:
        assert "   " not in command.strip(), command
        parser().parse_args(shlex.split(command)[3:])


# ------------------------------------------------------------------------------ cost of a run


def test_importing_the_package_lets_idle_openmp_threads_sleep():
    """The app set OMP_WAIT_POLICY=PASSIVE, the CLI and the package did not: with anything else on
    the CPU a generation took 23.8 s instead of 1.0 s."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", "import alignit_core, os; print(os.environ['OMP_WAIT_POLICY'])"],
                         cwd=REPO, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "PASSIVE"


def test_an_unreachable_hub_is_detected_once_and_clip_is_reported_missing_at_once():
    """Offline without HF_HUB_OFFLINE, the hub client retried CLIP's download for 47 s."""
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env["HF_ENDPOINT"] = "http://127.0.0.1:9"  # nothing listens on the discard port
    code = ("from alignit_core.models import hub_reachable\n"
            "from alignit_core.scores import load_clip\n"
            "from alignit_core.errors import ModelError\n"
            "assert not hub_reachable() and hub_reachable.cache_info().misses == 1\n"
            "try:\n    load_clip()\nexcept ModelError as e:\n    print(e)\n"
            "assert hub_reachable.cache_info().misses == 1\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120, check=True)
    assert "not in the local cache, and the hub is not reachable" in out.stdout
