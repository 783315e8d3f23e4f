"""The README's research scripts run on the shipped model (few steps: they are checked for working,
their numbers are README's)."""
from __future__ import annotations

import pytest
from PIL import Image


def test_figure_script_draws_the_world_and_every_concept(tmp_path):
    from scripts.figure_embedded import main

    out = tmp_path / "figure.png"
    main(["--steps", "2", "--out", str(out)])
    image = Image.open(out)
    assert image.width >= 6 * 128  # references x3, a photo of, customized, AlignIT
    assert image.height >= 7 * 128  # patterned prompts + six concepts
    main(["--steps", "2", "--model", "embedded-mmdit", "--out", str(out)])
    image = Image.open(out)
    assert image.width >= 8 * 128  # four swaps, baseline | swapped (no concept ships for this model)


def test_concept_rows_script_reports_every_concept_kind(capsys):
    """Five conditionings for each text-side concept; seven engine rows for Custom Diffusion (customized,
    AlignIT, AlignIT with the start-of-text, token or end rows too, the token alone at the class word's
    position, base)."""
    from scripts.concept_rows import main

    main(["--seeds", "1", "--steps", "2"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| <")]
    assert {r.split(" | ")[0] for r in rows} == {"| <holed-star>", "| <striped-ball>"}
    kinds = [r.split(" | ")[1] for r in rows]
    assert {k: kinds.count(k) for k in set(kinds)} == {
        "textual inversion": 10, "text-encoder fine-tune": 10, "Custom Diffusion": 14}
    assert sum("AlignIT:" in r for r in rows) == 6  # one AlignIT row per concept
    assert sum("AlignIT, and" in r for r in rows) == 3 * 2  # Custom Diffusion's three more
    assert sum("(the token alone)" in r for r in rows) == 2
    assert all(r.split(" | ")[3].endswith("/ 1") for r in rows)

    main(["--seeds", "1", "--steps", "2", "--only", "holed-star-cd"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| <")]
    assert [r.split(" | ")[:2] for r in rows] == [["| <holed-star>", "Custom Diffusion"]] * 7

    main(["--seeds", "1", "--steps", "2", "--only", "holed-star-ti", "--table1-prompts"])
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines() if line.startswith("| <")]
    assert len(rows) == 5 and all(r[1] == "textual inversion" and r[-1] == "12 |" for r in rows)
    assert all(len(r) == 8 and all(0 <= float(x) <= 1 for x in r[3:7]) for r in rows)  # text, fidelity, colour, pattern

    main(["--seeds", "1", "--steps", "2", "--only", "holed-star-cd", "--table1-prompts"])
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines() if line.startswith("| <")]
    assert len(rows) == 7 and all(r[1] == "Custom Diffusion" and r[-1] == "12 |" for r in rows)
    assert rows[0][2] == "customized prompt" and rows[1][2].startswith("AlignIT:") and rows[-1][2] == "base model on `p`"


def test_concept_rows_colour_row_finds_the_colour_in_the_class_word_s_row_after_it(capsys):
    """`--colour-row`: the shipped base model on `a photo of a <shape> on a <background> background` with the shape
    word's row from `* * * <colour> <shape>` draws that colour far more often than the base model on `p` does by
    chance (README's figures, 4 seeds: 27 / 32 against 7 / 32)."""
    import re

    from scripts.concept_rows import main

    main(["--colour-row", "--seeds", "2"])
    found = re.search(r"draws that colour: (\d+) / 16; the base model on `p` draws it: (\d+) / 16", capsys.readouterr().out)
    assert found, "no colour-row line"
    swapped, chance = map(int, found.groups())
    assert swapped >= 10 and swapped >= chance + 5


def test_concept_rows_reads_splits_the_object_pixels_attention_over_every_row(capsys):
    """`--reads`: per latent side, the base model's and the Custom Diffusion's attention of the object's
    pixels over the five groups of rows (which cover all 77, so each line sums to 1), and the share of the
    value change reaching them through each group."""
    from scripts.concept_rows import READ_GROUPS, main

    main(["--reads", "--seeds", "1", "--steps", "2", "--only", "holed-star-cd"])
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines() if line.startswith("| <")]
    assert [(r[1], r[2]) for r in rows] == [("base model", s) for s in ("16x16", "8x8", "4x4")] + [
        ("Custom Diffusion", s) for s in ("16x16", "16x16", "8x8", "8x8", "4x4", "4x4")]
    for r in rows:
        shares = [float(x) for x in r[4:4 + len(READ_GROUPS)]]
        assert all(0 <= x <= 1 for x in shares) and sum(shares) == pytest.approx(1, abs=0.03)
        assert r[-1] == "4 |"  # one seed on each of four backgrounds


def test_concept_rows_encodes_the_empty_prompt_as_the_engine_does(monkeypatch, capsys):
    """The customized prompt's unconditional rows come from the concept's own text encoder (a fine-tune's),
    every conditioning built on the base prompt's from the base encoder: the engine's classifier-free guidance."""
    import scripts.concept_rows as rows_script

    encoders = []
    real = rows_script.sample
    monkeypatch.setattr(rows_script, "sample", lambda vae, unet, te, *a: encoders.append(te) or real(vae, unet, te, *a))
    rows_script.main(["--seeds", "1", "--steps", "1", "--only", "holed-star-te", "holed-star-ti"])
    rows = [line.split(" | ")[1:3] for line in capsys.readouterr().out.splitlines() if line.startswith("| <")]
    assert len(rows) == len(encoders) == 10
    base = {te for (kind, _), te in zip(rows, encoders) if kind == "textual inversion"}
    assert len(base) == 1  # the textual inversion's five conditionings: the base encoder
    own = [(label, te not in base) for (kind, label), te in zip(rows, encoders) if kind == "text-encoder fine-tune"]
    assert [mine for _, mine in own] == [label.startswith("customized") for label, _ in own] == [True, True, False, False, False]


def test_concept_rows_levels_read_the_customized_rows_only_at_the_levels_asked(capsys):
    """`--levels`: the processor that hands a layer the customized rows instead of the base prompt's
    reproduces the customized prompt exactly when every layer reads them and the base prompt when none
    does, and a layer set to some rows changes the picture only through those layers."""
    import torch

    from alignit_core.toy.sampling import load_exported, sample
    from scripts.concept_rows import ROOT, level_processors, main

    vae, unet, te, scale = load_exported(ROOT / "assets" / "embedded-shapes", torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    base, custom = torch.randn(2, 1, 77, te.config.hidden_size, generator=g)
    plain = [sample(vae, unet, te, scale, rows, 10.0, 0, 3) for rows in (base, custom)]
    levels = level_processors(unet)
    assert sorted(levels) == [4, 8, 16] and sum(map(len, levels.values())) == 7
    assert level_processors(unet) == levels  # installed once
    for proc in (p for procs in levels.values() for p in procs):
        proc.rows = custom
    assert (sample(vae, unet, te, scale, base, 10.0, 0, 3) == plain[1]).all()
    for proc in levels[16]:
        proc.rows = None
    coarse = sample(vae, unet, te, scale, base, 10.0, 0, 3)
    assert not (coarse == plain[0]).all() and not (coarse == plain[1]).all()
    for proc in (p for procs in levels.values() for p in procs):
        proc.rows = None
    assert (sample(vae, unet, te, scale, base, 10.0, 0, 3) == plain[0]).all()

    main(["--seeds", "1", "--steps", "2", "--levels", "--only", "holed-star-te", "holed-star-cd"])
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines() if line.startswith("| <")]
    assert len(rows) == 7 and all(r[1] == "text-encoder fine-tune" for r in rows)  # Custom Diffusion: not text-side
    assert rows[0][2] == "customized prompt" and rows[1][2] == "base prompt"


def test_table1_script_adds_the_instance_asked_in_words(capsys):
    """`--words`: two more columns (the base model on the prompts with the instance's words, and AlignIT's
    share of its fidelity), the same cells in every row as in the header."""
    from scripts.table1 import main

    main(["--seeds", "1", "--steps", "2", "--only", "holed-star-ti", "--words"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    header, row = lines[0].split(" | "), next(line.split(" | ") for line in lines if line.startswith("| <"))
    assert "base model asked in words: text, fidelity" in header and "AlignIT / words" in header
    assert len(row) == len(header) == 9 and row[0] == "| <holed-star>" and row[-1] == "12 |"


def test_table1_script_takes_every_row_of_the_concept_and_reports_each_prompt(capsys):
    """`--rows concept`: AlignIT takes every row where p' holds the concept (the header says so; `--rows token`
    names its own); `--by-prompt`: one line per prompt with both methods' rates. `--write-examples` with it is
    refused: the demo's examples run the paper's AlignIT."""
    import pytest

    from scripts.table1 import main

    main(["--seeds", "1", "--steps", "2", "--only", "holed-star-cd", "--rows", "concept", "--by-prompt"])
    lines = capsys.readouterr().out.splitlines()
    assert "AlignIT (every row of the concept) / customized" in lines[0]
    prompts = [line.split(" | ") for line in lines if line.startswith("| `a ")]
    assert len(prompts) == 12 and all(len(cells) == 3 for cells in prompts)
    assert all(cell.count(", ") == 1 for cells in prompts for cell in cells[1:])
    main(["--seeds", "1", "--steps", "2", "--only", "holed-star-cd", "--rows", "token"])
    lines = capsys.readouterr().out.splitlines()
    assert "AlignIT (the token alone at the class word) / customized" in lines[0]
    assert lines[2].startswith("| <holed-star> | Custom Diffusion |")
    with pytest.raises(SystemExit) as exit_:
        main(["--seeds", "1", "--rows", "concept", "--write-examples"])
    assert exit_.value.code == 2 and "leave --rows class" in capsys.readouterr().err


def test_lora_training_and_the_knobs_measurement_run(tmp_path, capsys):
    """scripts/train_lora.py writes a LoRA concept the engine loads; scripts/measure_knobs.py
    reports every table on it (a few steps: checked for working, not for its numbers)."""
    from scripts.measure_knobs import main as measure
    from scripts.train_lora import main as train

    folder = train(["--instance", "holed-star", "--token", "ohwx", "--out", str(tmp_path / "holed-star"),
                    "--steps", "2", "--class-images", "1", "--class-steps", "2", "--text-encoder"])
    capsys.readouterr()
    measure(["--seeds", "1", "--steps", "2", "--prompts", "1", "--loras", str(folder)])
    lines = capsys.readouterr().out.splitlines()
    assert sum(line.startswith(("| colour |", "| shape |")) for line in lines) == 6
    assert sum(line.startswith("| <") for line in lines) == 18  # six shipped concepts x three ways
    lora = [line for line in lines if line.startswith("| ohwx (holed-star) |")]
    assert [line.split(" | ")[1] for line in lora] == ["customized baseline", "AlignIT, rest 0", "AlignIT, rest 0.25",
                                                      "AlignIT, rest 0.5", "AlignIT, rest 1"]


def test_both_tables_take_held_out_seeds(monkeypatch, capsys):
    """`table1.py --first-seed F` evaluates seeds F .. F+SEEDS-1 (and asks the words on the same ones);
    `concept_rows.py --noise-seed S` draws every conditioning's noise batch from generator seed S and
    starts Custom Diffusion's engine seeds at S: acceptance can be measured on seeds no table uses."""
    import scripts.concept_rows as rows_script
    import scripts.table1 as table1_script

    seen = []
    real_table1, real_words = table1_script.table1, table1_script.asked_in_words
    monkeypatch.setattr(table1_script, "table1", lambda m, c, i, seeds, *a: seen.append(list(seeds))
                        or real_table1(m, c, i, seeds, *a))
    monkeypatch.setattr(table1_script, "asked_in_words", lambda m, c, i, seeds, *a: seen.append(list(seeds))
                        or real_words(m, c, i, seeds, *a))
    table1_script.main(["--seeds", "2", "--first-seed", "100", "--steps", "1", "--only", "holed-star-ti", "--words"])
    assert seen == [[100, 101], [100, 101]]

    noise, engine = [], []
    real_sample, real_resolve = rows_script.sample, rows_script.resolve
    monkeypatch.setattr(rows_script, "sample", lambda *a: noise.append(a[6]) or real_sample(*a))
    monkeypatch.setattr(rows_script, "resolve", lambda m, s: engine.append(s.seed) or real_resolve(m, s))
    rows_script.main(["--seeds", "2", "--noise-seed", "7", "--steps", "1", "--only", "holed-star-ti", "holed-star-cd"])
    assert noise == [7] * 5 and engine == [7, 8]
    capsys.readouterr()


def test_table1_parts_prints_each_part_per_method_only_when_asked(capsys):
    """`table1.py --parts`: one row per concept with its shape, colour and pattern rates, customized → AlignIT,
    each with its interval; without the flag, no such table."""
    import scripts.table1 as table1_script

    table1_script.main(["--seeds", "1", "--steps", "1", "--only", "holed-star-ti", "--parts"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| <holed-star> | textual inversion |")]
    assert "| concept | kind | shape | colour | pattern |" in out and len(rows) == 2, out
    assert rows[1].count("→") == 3 and rows[1].count("[") == 6, rows[1]
    table1_script.main(["--seeds", "1", "--steps", "1", "--only", "holed-star-ti"])
    assert "| shape | colour | pattern |" not in capsys.readouterr().out


def test_knobs_measurement_of_one_shipped_concept_leaves_the_rest_out(capsys):
    """`measure_knobs.py --only NAME`: that concept's three rows (keys and values, keys only, values
    only) and no swap table, no other concept."""
    from scripts.measure_knobs import main as measure

    measure(["--seeds", "1", "--steps", "2", "--prompts", "1", "--only", "holed-star-te"])
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split(" | ") for line in lines if line.startswith("| <")]
    assert [r[:3] for r in rows] == [["| <holed-star>", "text encoder", m]
                                     for m in ("keys and values", "keys only", "values only")]
    assert not any(line.startswith(("| colour |", "| shape |")) for line in lines)
