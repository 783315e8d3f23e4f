"""The README's research scripts run on the shipped model (few steps: they are checked for working,
their numbers are README's)."""
from __future__ import annotations

from PIL import Image


def test_figure_script_draws_the_world_and_every_concept(tmp_path):
    from scripts.figure_embedded import main

    out = tmp_path / "figure.png"
    main(["--steps", "2", "--out", str(out)])
    image = Image.open(out)
    assert image.width >= 6 * 128  # references x3, a photo of, customized, AlignIT
    assert image.height >= 5 * 128  # patterned prompts + four concepts


def test_concept_rows_script_reports_five_conditionings_per_textual_inversion(capsys):
    from scripts.concept_rows import main

    main(["--seeds", "1", "--steps", "2"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| <")]
    assert len(rows) == 10
    assert {r.split(" | ")[0] for r in rows} == {"| <holed-star>", "| <striped-ball>"}
    assert all(r.endswith("/ 1 |") for r in rows)
