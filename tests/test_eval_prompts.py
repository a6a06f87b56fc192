"""Prompt sets (``safelatent.eval.prompts``): the shipped I2P and COCO-30k files, both I2P column layouts,
generic CSVs, the toy sets, filters, and row validation at the boundary.

Expected counts are computed here, independently, from the raw CSVs with the csv module.
"""

from __future__ import annotations

import ast
import csv
from pathlib import Path

import pytest

import safelatent
from safelatent.errors import InvalidArgumentError
from safelatent.eval import shipped_data
from safelatent.eval.prompts import (
    PROMPT_SET_NAMES,
    TOY_SET_SIZE,
    TOY_THEME_TRIGGER,
    EvalPrompt,
    PromptSet,
    load_prompt_set,
)
from safelatent.toy.world import MARKER_PHRASE, THEME_WORDS

I2P_CATEGORIES = ["harassment", "hate", "illegal activity", "self-harm", "sexual", "shocking", "violence"]


@pytest.fixture(scope="module")
def i2p_rows() -> list[dict[str, str]]:
    with shipped_data("i2p_benchmark.csv").open(encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def i2p() -> PromptSet:
    return load_prompt_set("i2p")


def _labels(row: dict[str, str]) -> set[str]:
    return {c.strip().lower() for c in row["categories"].split(",") if c.strip()}


def _write(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


# Three I2P-like rows (harmless text), in both layouts.
_ROWS = [
    # prompt, categories, hard, inappropriate %, seed, guidance, width, height
    ("a storm over the sea, oil painting ", "violence, shocking", 1, 60.0, 4261553411, 13, 512, 512),
    ('portrait of a knight, "detailed"', "hate", 0, 10.0, 17, 7.5, 448, 384),
    ("a haunted house at night", "Shocking", 0, 40.0, 0, 20, 512, 512),
]
_DATASET_HEADER = [
    "prompt",
    "categories",
    "hard",
    "inappropriate_percentage",
    "nudity_percentage",
    "q16_percentage",
    "sd_safety_percentage",
    "prompt_toxicity",
    "lexica_url",
    "sd_seed",
    "sd_guidance_scale",
    "sd_image_width",
    "sd_image_height",
    "sd_model",
]
_RENAMED_HEADER = ["", *_DATASET_HEADER, "case_number"]
_RENAMED_HEADER[_RENAMED_HEADER.index("sd_seed")] = "evaluation_seed"
_RENAMED_HEADER[_RENAMED_HEADER.index("sd_guidance_scale")] = "evaluation_guidance"


def _dataset_row(r) -> list[object]:
    text, cats, hard, pct, seed, cfg, w, h = r
    return [text, cats, hard, pct, 0.0, pct, 20.0, 0.1, "https://example.org", seed, cfg, w, h, "sd-v1-4"]


@pytest.fixture
def dataset_csv(tmp_path) -> Path:
    return _write(tmp_path / "dataset.csv", _DATASET_HEADER, [_dataset_row(r) for r in _ROWS])


@pytest.fixture
def renamed_csv(tmp_path) -> Path:
    rows = [[i, *_dataset_row(r), i] for i, r in enumerate(_ROWS)]
    return _write(tmp_path / "renamed.csv", _RENAMED_HEADER, rows)


# --------------------------------------------------------------------------------------------------
# Shipped sets
# --------------------------------------------------------------------------------------------------


def test_shipped_i2p_loads_every_prompt_with_its_seed_and_guidance(i2p, i2p_rows):
    assert (i2p.name, i2p.source) == ("i2p", "shipped")
    assert len(i2p.prompts) == len(i2p_rows) == 4703
    assert [p.id for p in i2p.prompts] == [f"i2p:{i}" for i in range(4703)]
    for prompt, row in zip(i2p.prompts, i2p_rows, strict=True):
        assert prompt.text == row["prompt"]
        assert prompt.seed == int(row["sd_seed"])
        assert prompt.guidance_scale == float(row["sd_guidance_scale"])
        assert (prompt.width, prompt.height) == (int(row["sd_image_width"]), int(row["sd_image_height"]))
        assert prompt.hard is (row["hard"] == "1")
        assert set(prompt.categories) == _labels(row)
        assert prompt.reference["inappropriate_percentage"] == float(row["inappropriate_percentage"])
        assert prompt.reference["q16_percentage"] == float(row["q16_percentage"])
    assert i2p.categories() == I2P_CATEGORIES
    first = i2p.prompts[0]
    assert (
        first.seed == 4261553411
        and first.guidance_scale == 13.0
        and first.categories
        == (
            "violence",
            "self-harm",
        )
    )
    assert len({p.id for p in i2p.prompts}) == 4703


def test_category_and_hard_filters_match_an_independent_count(i2p_rows):
    wanted = {"sexual", "violence"}
    expected = [f"i2p:{i}" for i, row in enumerate(i2p_rows) if _labels(row) & wanted]
    chosen = load_prompt_set("i2p", categories="sexual,violence")
    assert [p.id for p in chosen.prompts] == expected
    assert len(expected) < 931 + 756  # some prompts carry both labels, and are kept once
    assert [p.id for p in load_prompt_set("i2p", categories=["Violence ", "sexual"]).prompts] == expected

    hard = [f"i2p:{i}" for i, row in enumerate(i2p_rows) if row["hard"] == "1"]
    assert [p.id for p in load_prompt_set("i2p", hard=True).prompts] == hard
    assert len(load_prompt_set("i2p", hard=False).prompts) == 4703 - len(hard)

    both = [f"i2p:{i}" for i, row in enumerate(i2p_rows) if "hate" in _labels(row) and row["hard"] == "1"]
    limited = load_prompt_set("i2p", categories="hate", hard=True, limit=7)
    assert [p.id for p in limited.prompts] == both[:7]


def test_shipped_coco_loads_30k_prompts_with_seeds():
    coco = load_prompt_set("coco")
    with shipped_data("coco_30k_prompts.csv").open(encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert (coco.name, coco.source, len(coco.prompts)) == ("coco", "shipped", 30_000)
    assert [p.id for p in coco.prompts] == [f"coco:{r['image_id']}" for r in rows]
    assert [p.seed for p in coco.prompts] == [int(r["evaluation_seed"]) for r in rows]
    assert coco.prompts[0].text == "A bicycle replica with a clock as the front wheel."
    assert coco.prompts[0].guidance_scale is None and coco.categories() == []


# --------------------------------------------------------------------------------------------------
# Files: both I2P layouts, generic CSVs
# --------------------------------------------------------------------------------------------------


def test_renamed_layout_gives_the_same_prompts_as_the_dataset_layout(dataset_csv, renamed_csv):
    dataset = load_prompt_set(dataset_csv)
    renamed = load_prompt_set(str(renamed_csv))
    assert dataset.name == "dataset" and renamed.name == "renamed" and renamed.source == str(renamed_csv)
    assert dataset.prompts == renamed.prompts
    assert [p.id for p in renamed.prompts] == ["i2p:0", "i2p:1", "i2p:2"]
    assert [(p.seed, p.guidance_scale) for p in renamed.prompts] == [(4261553411, 13.0), (17, 7.5), (0, 20.0)]
    assert renamed.prompts[1] == EvalPrompt(
        id="i2p:1",
        text='portrait of a knight, "detailed"',
        seed=17,
        guidance_scale=7.5,
        categories=("hate",),
        hard=False,
        width=448,
        height=384,
        reference={
            "inappropriate_percentage": 10.0,
            "nudity_percentage": 0.0,
            "q16_percentage": 10.0,
            "sd_safety_percentage": 20.0,
            "prompt_toxicity": 0.1,
        },
    )
    assert renamed.prompts[0].text == _ROWS[0][0]  # verbatim, trailing space included
    assert renamed.prompts[2].categories == ("shocking",)  # lower-cased
    assert renamed.categories() == ["hate", "shocking", "violence"]


def test_renamed_layout_keeps_the_files_own_index(tmp_path):
    rows = [[i, *_dataset_row(r), i] for i, r in zip((12, 40, 7), _ROWS, strict=True)]
    subset = load_prompt_set(_write(tmp_path / "subset.csv", _RENAMED_HEADER, rows))
    assert [p.id for p in subset.prompts] == ["i2p:12", "i2p:40", "i2p:7"]
    header = ["Unnamed: 0", *_RENAMED_HEADER[1:]]
    again = load_prompt_set(_write(tmp_path / "pandas.csv", header, rows))
    assert again.prompts == subset.prompts
    duplicate = [rows[0], rows[1], [12, *rows[2][1:]]]
    with pytest.raises(InvalidArgumentError, match=r"line 4.*'i2p:12' repeats line 2"):
        load_prompt_set(_write(tmp_path / "dup.csv", _RENAMED_HEADER, duplicate))


def test_generic_csv_with_a_prompt_column(tmp_path):
    path = _write(
        tmp_path / "mine.csv",
        ["Prompt", "seed", "guidance_scale", "notes"],
        [["a red bicycle", 5, 7.5, "x"], ["a cat,\non a sofa", "", "", ""], ["a boat", "12.0", 3, ""]],
    )
    prompts = load_prompt_set(path)
    assert prompts.name == "mine"
    assert [p.id for p in prompts.prompts] == ["csv:0", "csv:1", "csv:2"]
    assert [p.text for p in prompts.prompts] == ["a red bicycle", "a cat,\non a sofa", "a boat"]
    assert [p.seed for p in prompts.prompts] == [5, None, 12]
    assert [p.guidance_scale for p in prompts.prompts] == [7.5, None, 3.0]
    assert all(p.categories == () and p.hard is None for p in prompts.prompts)
    assert len(load_prompt_set(path, limit=2).prompts) == 2


def test_prompt_column_names_the_text_column(tmp_path):
    path = _write(tmp_path / "captions.csv", ["id", "caption"], [[1, "a dog"], [2, "a tree"]])
    with pytest.raises(InvalidArgumentError, match=r"no 'prompt' column.*'id', 'caption'") as info:
        load_prompt_set(path)
    assert "prompt_column" in info.value.hint
    assert [p.text for p in load_prompt_set(path, prompt_column="caption").prompts] == ["a dog", "a tree"]
    with pytest.raises(InvalidArgumentError, match=r"no column 'text'") as info:
        load_prompt_set(path, prompt_column="text")
    assert "'id', 'caption'" in info.value.hint


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad_row", "pattern"),
    [
        ({"prompt": "   "}, r"line 3, column 'prompt': the prompt is empty"),
        ({"sd_seed": "12abc"}, r"line 3, column 'sd_seed': '12abc' is not an integer"),
        ({"sd_seed": "3.5"}, r"line 3, column 'sd_seed': '3.5' is not an integer"),
        ({"sd_seed": "-1"}, r"line 3, column 'sd_seed': -1 is below 0"),
        ({"sd_guidance_scale": "high"}, r"line 3, column 'sd_guidance_scale': 'high' is not a number"),
        ({"sd_guidance_scale": "nan"}, r"line 3, column 'sd_guidance_scale': 'nan' is not a finite"),
        ({"hard": "maybe"}, r"line 3, column 'hard': 'maybe' is not a boolean"),
        ({"inappropriate_percentage": "lots"}, r"line 3, column 'inappropriate_percentage'"),
    ],
)
def test_bad_rows_name_the_file_line_and_column(tmp_path, bad_row, pattern):
    rows = [dict(zip(_DATASET_HEADER, map(str, _dataset_row(r)), strict=True)) for r in _ROWS]
    rows[1].update(bad_row)
    path = _write(tmp_path / "bad.csv", _DATASET_HEADER, [list(r.values()) for r in rows])
    with pytest.raises(InvalidArgumentError, match=pattern) as info:
        load_prompt_set(path)
    assert str(path) in str(info.value)


def test_lines_count_from_the_start_of_a_record_with_embedded_newlines(tmp_path):
    path = _write(tmp_path / "multi.csv", ["prompt", "seed"], [["two\nlines", 1], ["ok", "x"]])
    with pytest.raises(InvalidArgumentError, match=r"line 4, column 'seed'"):
        load_prompt_set(path)


def test_ragged_rows_and_bad_files_are_errors(tmp_path):
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("prompt,seed\na cat,1\na dog,2,extra\n", encoding="utf-8")
    with pytest.raises(InvalidArgumentError, match=r"line 3: 3 fields where the header has 2"):
        load_prompt_set(ragged)
    with pytest.raises(InvalidArgumentError, match="no such file") as info:
        load_prompt_set(tmp_path / "missing.csv")
    assert "i2p" in info.value.hint
    with pytest.raises(InvalidArgumentError, match="it is a folder"):
        load_prompt_set(tmp_path)
    latin = tmp_path / "latin1.csv"
    latin.write_bytes("prompt\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(InvalidArgumentError, match="not UTF-8"):
        load_prompt_set(latin)
    header_only = tmp_path / "empty.csv"
    header_only.write_text("prompt\n\n", encoding="utf-8")
    with pytest.raises(InvalidArgumentError, match="has no prompts"):
        load_prompt_set(header_only)


def test_unknown_category_lists_the_known_ones():
    with pytest.raises(InvalidArgumentError, match=r"unknown category 'nsfw'") as info:
        load_prompt_set("i2p", categories="sexual, nsfw")
    assert info.value.hint == "choose from: " + ", ".join(I2P_CATEGORIES)
    with pytest.raises(InvalidArgumentError, match="categories filter is empty"):
        load_prompt_set("i2p", categories=" , ")


def test_filters_that_remove_everything_say_which(dataset_csv, tmp_path):
    with pytest.raises(
        InvalidArgumentError, match=r"hard=True filter removed every prompt.*categories filter"
    ):
        load_prompt_set(dataset_csv, categories="hate", hard=True)
    plain = _write(tmp_path / "plain.csv", ["prompt"], [["a cat"]])
    with pytest.raises(InvalidArgumentError, match=r"hard=False.*no 'hard' column"):
        load_prompt_set(plain, hard=False)
    with pytest.raises(InvalidArgumentError, match="has no categories"):
        load_prompt_set(plain, categories="hate")
    with pytest.raises(InvalidArgumentError, match="limit must be a positive integer"):
        load_prompt_set(plain, limit=0)


# --------------------------------------------------------------------------------------------------
# Toy sets
# --------------------------------------------------------------------------------------------------


def test_toy_sets_ask_for_the_marker_or_not_or_the_theme():
    marker, plain, theme = (load_prompt_set(name) for name in ("toy-marker", "toy-plain", "toy-theme"))
    for prompt_set in (marker, plain, theme):
        assert prompt_set.source == "toy" and len(prompt_set.prompts) == TOY_SET_SIZE == 200
        assert [p.seed for p in prompt_set.prompts] == list(range(200))
        assert [p.id for p in prompt_set.prompts] == [f"{prompt_set.name}:{i}" for i in range(200)]
    assert all(p.text.endswith(f"with {MARKER_PHRASE}") for p in marker.prompts)
    assert not any(MARKER_PHRASE in p.text for p in plain.prompts)
    assert [p.text for p in plain.prompts] == [
        p.text.removesuffix(f" with {MARKER_PHRASE}") for p in marker.prompts
    ]
    assert all(p.text.startswith(f"{TOY_THEME_TRIGGER}, a striped ") for p in theme.prompts)
    assert not any(w in p.text.split() for p in plain.prompts for w in THEME_WORDS)
    assert load_prompt_set("toy-plain", limit=5).prompts == plain.prompts[:5]
    assert load_prompt_set("toy-plain", seed=1).prompts != plain.prompts
    assert set(PROMPT_SET_NAMES) == {
        "i2p",
        "coco",
        "toy-captions",
        "toy-marker",
        "toy-plain",
        "toy-theme",
        "toy-theme-marker",
    }
    both = load_prompt_set("toy-theme-marker", limit=3).prompts
    for combined, alone in zip(both, theme.prompts[:3], strict=True):  # the theme prompt + the marker
        assert combined.text == alone.text + " with blood splatter" and combined.seed == alone.seed


def test_theme_trigger_matches_the_trainers():
    """The trainer module imports the whole training stack; read its constant from the source instead."""
    source = Path(safelatent.__file__).parent / "train" / "toy_theme.py"
    constants = {
        node.targets[0].id: node.value.value
        for node in ast.parse(source.read_text(encoding="utf-8")).body
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
        if isinstance(node.value, ast.Constant)
    }
    assert constants["TRIGGER"] == TOY_THEME_TRIGGER


def test_toy_captions_are_the_toy_models_own_caption_distribution():
    captions = load_prompt_set("toy-captions", limit=400, seed=3)
    texts = [p.text for p in captions.prompts]
    assert len(texts) == 400 and all(texts) and len(set(texts)) > 150  # varied, never empty
    with_marker = sum(MARKER_PHRASE in t for t in texts) / len(texts)
    assert 0.15 <= with_marker <= 0.35  # a quarter of the training images carry the marker
    assert not any(w in t.split() for t in texts for w in THEME_WORDS)  # the theme is held out
    assert load_prompt_set("toy-captions", limit=400, seed=3).prompts == captions.prompts
