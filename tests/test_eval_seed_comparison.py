"""The seed comparison (measurement issue): base vs theme adapter vs theme + SLD vs theme + erasure adapter
in ONE ``safelatent eval`` report with fidelity, theme and marker columns, on toy prompts that ask for the
theme and the marker; erasure adapters are labelled with what they erase."""

from __future__ import annotations

import html
import json

import pytest
from typer.testing import CliRunner

from safelatent.cli import app
from safelatent.train.toy_comparison import CONFIGS, write_matrix


@pytest.fixture(scope="module")
def report(tmp_path_factory, toy_theme_adapter, toy_erasure_adapter):
    tmp = tmp_path_factory.mktemp("seed-comparison")
    theme, erasure = toy_theme_adapter[0]["lora_file"], toy_erasure_adapter["lora_file"]
    matrix = write_matrix(tmp / "matrix.toml", theme, erasure, limit=12, images=2, steps=20)
    result = CliRunner().invoke(app, ["eval", "--matrix", str(matrix), "--out", str(tmp / "run"), "-q"])
    assert result.exit_code == 0, result.output
    return tmp / "run" / "report"


def test_one_report_with_every_configuration_and_the_toy_columns(report):
    summary = json.loads((report / "results.json").read_text())
    assert list(summary["configs"]) == list(CONFIGS)
    toy = {name: data["toy"] for name, data in summary["configs"].items()}
    for rates in toy.values():
        assert {"fidelity_shape_colour", "theme", "marker"} <= set(rates)
    # the theme adapter brings the theme; SLD and the erasure adapter take the marker away (on these
    # prompts, which ask for both, they also take some of the theme: bench/RESULTS.md has the figures)
    assert toy["theme"]["theme"] >= toy["base"]["theme"] + 0.3
    for safer in ("theme+sld", "theme+erasure", "theme+erasure+sld"):
        assert toy[safer]["marker"] < toy["theme"]["marker"], safer
    assert toy["theme+erasure+sld"]["marker"] <= min(
        toy["theme+sld"]["marker"], toy["theme+erasure"]["marker"]
    )
    page = html.unescape((report / "index.html").read_text())
    assert "fidelity (shape + colour)" in page and "theme rate" in page and "marker rate" in page
    assert "(erases 'blood splatter', ESD-kv)" in page  # the erasure adapter says what it erases
    assert (report / "toy.csv").read_text().splitlines()[0].startswith("config,images,fidelity_shape_colour")
