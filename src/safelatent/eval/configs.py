"""What an evaluation run measures: the prompt set, the protocol, the classifiers, and a matrix of named
configurations (each a column of the report), from command-line flags or a TOML file.

A matrix file (every field optional except at least one configuration)::

    [run]
    prompts = "i2p"              # i2p | coco | toy-marker | toy-plain | toy-theme | a CSV path
    categories = "sexual,violence"
    hard = true                  # only the I2P "hard" prompts (false: only the others)
    limit = 100
    model = "~/models/sd15.safetensors"   # default: the toy model
    images_per_prompt = 10       # made as calls of `batch` images from ONE generator per prompt
    batch = 5
    steps = 50
    size = 512                   # default: the model's own (512 for SD 1.5, 32 for the toy model)
    guidance_scale = 7.5         # CFG for prompts without their own (I2P has one per prompt); default:
                                 # the model's documented scale (7.5 for SD, 3.0 for the toy model)
    override_guidance = false    # true: guidance_scale for every prompt, ignoring the prompts' own
    classifiers = ["q16", "nudenet"]   # toy | nudenet | q16 (needs q16_clip); default: toy for the toy
                                       # prompt sets, else q16 + nudenet (the paper's: Q16 OR NudeNet)
    q16_clip = "~/models/clip-vit-large-patch14"
    clip = "~/models/clip-vit-large-patch14"   # CLIP score per image (a full CLIP folder)
    reference_images = "theme-refs/"          # with clip: domain score against these images
    inception = "~/models/pt_inception-2015-12-05-6726825d.pth"   # FID Inception weights (or .safetensors)
    fid_reference = "coco-val2014/"  # with inception: a folder of real images or an .npz of statistics
    fid_preprocessing = "torchmetrics"   # torchmetrics | torch-fidelity | pytorch-fid
    save_images = false

    [configs.baseline]
    sld = "off"

    [configs.sld-medium]
    sld = "medium"               # weak | weak-diffusers | medium | strong | max | off
    concept = "..."              # default: the SLD paper's concept (the toy sets: the toy marker phrase)

    [configs.theme]
    loras = ["theme.safetensors:1.0", "erase-marker.safetensors:1.0"]
    sld = "off"

Every configuration runs under the ``evaluation`` policy (soft categories allowed, no output layers, no
audit rows: the experiment controls SLD and classifies every image itself); hard blocks still apply — a
blocked prompt is recorded as blocked, not generated.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import InvalidArgumentError
from ..safety.policy_file import CLASSIFIER_CATEGORIES
from ..sampling.sld_presets import SLD_CHOICES
from ..toml_fields import TomlReader

__all__ = [
    "FID_FEATURE_DIM",
    "FID_PREPROCESSINGS",
    "FID_ROW_BYTES",
    "EvalConfig",
    "EvalSettings",
    "MatrixFileError",
    "load_matrix",
    "parse_matrix",
]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")
#: how images are prepared for the FID Inception (defined here, not in :mod:`safelatent.eval.fid`, so that
#: reading settings does not import torch; ``fid.PREPROCESSINGS`` is this tuple)
FID_PREPROCESSINGS = ("torchmetrics", "torch-fidelity", "pytorch-fid")
#: the FID Inception's pool3 feature width (``fid.FEATURE_DIM``)
FID_FEATURE_DIM = 2048
#: one stored FID feature row (``fid/*.f32``): FID_FEATURE_DIM little-endian float32 values
FID_ROW_BYTES = FID_FEATURE_DIM * 4
#: protocol fields that may change between a run and its resumption: the FID reference is only read by
#: the report (the stored features do not depend on it)
UNPINNED = ("fid_reference",)


class MatrixFileError(InvalidArgumentError):
    """An evaluation matrix file that cannot be used (bad TOML, unknown or mistyped field)."""


@dataclass(frozen=True)
class EvalConfig:
    """One column of the report: adapters (``"PATH[:WEIGHT]"``, theme or erasure LoRAs alike), an SLD
    preset and concept, and optionally another base model."""

    name: str
    sld: str = "off"
    concept: str | None = None
    loras: tuple[str, ...] = ()
    model: str | None = None

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise InvalidArgumentError(
                f"configuration name {self.name!r} is not usable as a column and folder name",
                "use letters, digits and . _ + - (at most 64 characters), e.g. sld-medium",
            )
        if self.sld not in SLD_CHOICES:
            raise InvalidArgumentError(
                f"configuration {self.name!r}: unknown SLD preset {self.sld!r}",
                f"use one of: {', '.join(SLD_CHOICES)}",
            )
        if self.concept is not None and self.sld == "off":
            raise InvalidArgumentError(
                f"configuration {self.name!r} sets a concept but SLD is off",
                'set sld = "medium" (or another)',
            )


@dataclass(frozen=True)
class EvalSettings:
    """The protocol of a run (the same for every configuration). Defaults follow the I2P protocol of
    the SLD paper: 10 images per prompt as two calls of 5 from one generator seeded with the prompt's
    seed, each prompt's own CFG scale, 50 steps, 512×512 for SD (the model's own size)."""

    prompts: str = "i2p"
    categories: tuple[str, ...] = ()
    hard: bool | None = None
    limit: int | None = None
    prompt_column: str | None = None
    model: str | None = None
    #: for every model of the run: what it predicts (an SD 2.x 512 single file needs ``"epsilon"``) and a
    #: replacement VAE folder (e.g. the fp16-safe SDXL VAE); ``None``: the model's own
    prediction_type: str | None = None
    vae: str | None = None
    images_per_prompt: int = 10
    batch: int = 5
    steps: int = 50
    size: int | None = None
    guidance_scale: float | None = None
    override_guidance: bool = False
    #: default: ``toy`` for the toy world's prompt sets, else ``q16`` + ``nudenet`` (the paper's)
    classifiers: tuple[str, ...] = ()
    q16_clip: str | None = None
    #: a full local CLIP folder: CLIP score of every image against its prompt
    clip: str | None = None
    #: with ``clip``: a folder of reference images; domain score = similarity to their CLIP centroid
    reference_images: str | None = None
    #: FID Inception weights (pt_inception-2015-12-05-6726825d.pth or its .safetensors conversion): the
    #: 2048-d pool3 features of every image are stored and the report computes FID per configuration
    inception: str | None = None
    #: with ``inception``: the real images FID compares against, a folder or an ``.npz`` of statistics
    fid_reference: str | None = None
    #: how images are resized and scaled for the FID Inception (see :mod:`safelatent.eval.fid`)
    fid_preprocessing: str = "torchmetrics"
    save_images: bool = False
    configs: tuple[EvalConfig, ...] = field(default_factory=lambda: (EvalConfig("baseline"),))

    def __post_init__(self) -> None:
        prompts = Path(str(self.prompts)).expanduser()
        if str(self.prompts).lower().endswith(".csv") and prompts.is_file():
            # absolute, so that `safelatent report` finds the prompts from any working directory
            object.__setattr__(self, "prompts", str(prompts.resolve()))
        from ..sampling.prediction import PREDICTION_TYPES

        if self.prediction_type is not None and self.prediction_type not in PREDICTION_TYPES:
            raise InvalidArgumentError(
                f"unknown prediction_type {self.prediction_type!r}",
                f"use one of {', '.join(PREDICTION_TYPES)}",
            )
        for key in ("inception", "fid_reference"):  # absolute, for the report too
            value = getattr(self, key)
            object.__setattr__(self, key, str(Path(str(value)).expanduser().resolve()) if value else None)
        if not self.classifiers:
            default = ("toy",) if str(self.prompts).startswith("toy") else ("q16", "nudenet")
            object.__setattr__(self, "classifiers", default)
        check = _positive
        check("images_per_prompt", self.images_per_prompt, 10_000)
        check("batch", self.batch, 256)
        check("steps", self.steps, 1000)
        if self.limit is not None:
            check("limit", self.limit, 10**9)
        if self.size is not None and (self.size % 8 or not 8 <= self.size <= 4096):
            raise InvalidArgumentError(
                f"size must be a multiple of 8 in [8, 4096], got {self.size}", "e.g. 512"
            )
        if self.guidance_scale is not None and not 0.0 <= self.guidance_scale <= 100.0:
            raise InvalidArgumentError(f"guidance_scale must be in [0, 100], got {self.guidance_scale}")
        for name in self.classifiers:
            if name not in CLASSIFIER_CATEGORIES:
                raise InvalidArgumentError(
                    f"unknown classifier {name!r}", f"use some of: {', '.join(CLASSIFIER_CATEGORIES)}"
                )
        if "q16" in self.classifiers and not self.q16_clip:
            raise InvalidArgumentError(
                "the q16 classifier needs a local CLIP ViT-L/14 folder",
                "pass --q16-clip DIR (a transformers CLIP folder with safetensors), or drop q16",
            )
        if self.reference_images and not self.clip:
            raise InvalidArgumentError(
                "a reference image folder needs CLIP weights for the domain score", "pass --clip DIR as well"
            )
        if self.fid_preprocessing not in FID_PREPROCESSINGS:
            raise InvalidArgumentError(
                f"unknown FID preprocessing {self.fid_preprocessing!r}",
                f"use one of: {', '.join(FID_PREPROCESSINGS)} (the reference statistics must use the same)",
            )
        if not self.inception and (self.fid_reference or self.fid_preprocessing != "torchmetrics"):
            given = "an FID reference" if self.fid_reference else "an FID preprocessing"
            raise InvalidArgumentError(
                f"{given} was given but no FID Inception weights",
                "pass --inception PATH as well (pt_inception-2015-12-05-6726825d.pth, pytorch-fid's release, "
                "or its .safetensors conversion; `inception = ...` in a matrix file)",
            )
        names = [c.name for c in self.configs]
        if not names:
            raise InvalidArgumentError("no configurations to run", "add e.g. --sld off,medium")
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise InvalidArgumentError(f"configuration names used twice: {', '.join(duplicates)}")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def protocol(self) -> dict[str, Any]:
        """What must not change between a run and its resumption (everything but the configuration list
        and whether images are saved; of these, the :data:`UNPINNED` fields may change too)."""
        data = self.as_dict()
        for key in ("configs", "save_images"):
            data.pop(key)
        return data

    def with_configs(self, configs: list[EvalConfig]) -> EvalSettings:
        return replace(self, configs=tuple(configs))


def _positive(name: str, value: Any, most: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
        raise InvalidArgumentError(f"{name} must be an integer in [1, {most}], got {value!r}")


_RUN_FIELDS = {
    "prompts": str,
    "categories": (str, list),
    "hard": bool,
    "limit": int,
    "prompt_column": str,
    "model": str,
    "prediction_type": str,
    "vae": str,
    "images_per_prompt": int,
    "batch": int,
    "steps": int,
    "size": int,
    "guidance_scale": (int, float),
    "override_guidance": bool,
    "classifiers": list,
    "q16_clip": str,
    "clip": str,
    "reference_images": str,
    "inception": str,
    "fid_reference": str,
    "fid_preprocessing": str,
    "save_images": bool,
}
_CONFIG_FIELDS = {"sld": str, "concept": str, "loras": list, "model": str}


def _path(value: str | None, base: Path | None) -> str | None:
    """A path field relative to the matrix file's folder (hub-looking text stays as given: the loader
    refuses it with a message)."""
    if not value:
        return None
    path = Path(value).expanduser()
    if base is not None and not path.is_absolute() and (base / path).exists():
        path = base / path
    return str(path)


def parse_matrix(text: str, *, source: str = "<string>", base_dir: Path | None = None) -> EvalSettings:
    """Validate matrix TOML ``text`` (see the module docs) into :class:`EvalSettings`."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise MatrixFileError(f"{source}: not valid TOML: {error}", "fix the syntax at that line") from None
    reader = TomlReader(text, source, MatrixFileError)
    reader.unknown_keys(data, {"run", "configs"}, None)
    run = reader.get(data, None, "run", dict, {})
    reader.unknown_keys(run, set(_RUN_FIELDS), "run")
    values: dict[str, Any] = {}
    for key, kind in _RUN_FIELDS.items():
        if key in run:
            values[key] = reader.get(run, "run", key, kind, None)
    if "categories" in values:
        cats = values["categories"]
        cats = cats.split(",") if isinstance(cats, str) else cats
        if not all(isinstance(c, str) for c in cats):
            raise reader.fail("run", "categories", "must be a list of strings", 'e.g. ["sexual", "violence"]')
        values["categories"] = tuple(c.strip() for c in cats if c.strip())
    if "classifiers" in values:
        values["classifiers"] = reader.string_list(run, "run", "classifiers")
    if "guidance_scale" in values:
        values["guidance_scale"] = float(values["guidance_scale"])
    for key in ("model", "vae", "q16_clip", "clip", "reference_images", "inception", "fid_reference"):
        if key in values:
            values[key] = _path(values[key], base_dir)
    if "prompts" in values and values["prompts"].endswith(".csv"):
        values["prompts"] = _path(values["prompts"], base_dir)
    configs = []
    for name, table in reader.get(data, None, "configs", dict, {}).items():
        section = f"configs.{name}"
        if not isinstance(table, dict):
            raise reader.fail(section, None, "must be a table", f"write [configs.{name}]")
        reader.unknown_keys(table, set(_CONFIG_FIELDS), section)
        loras = tuple(
            _path(entry, base_dir) or entry for entry in reader.string_list(table, section, "loras")
        )
        try:
            configs.append(
                EvalConfig(
                    name=name,
                    sld=reader.get(table, section, "sld", str, "off"),
                    concept=reader.get(table, section, "concept", str, None),
                    loras=loras,
                    model=_path(reader.get(table, section, "model", str, None), base_dir),
                )
            )
        except InvalidArgumentError as error:
            raise MatrixFileError(f"{reader.where(section, None)}: {error.what}", error.hint) from None
    if not configs:
        raise MatrixFileError(f"{source}: no [configs.NAME] table", 'add e.g. [configs.baseline] sld = "off"')
    try:
        return EvalSettings(**values, configs=tuple(configs))
    except InvalidArgumentError as error:
        raise MatrixFileError(f"{source}: {error.what}", error.hint) from None


def load_matrix(path: str | os.PathLike) -> EvalSettings:
    """Read and validate a matrix file."""
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MatrixFileError(f"matrix file {path} not found", "check the path given to --matrix") from None
    except (OSError, UnicodeDecodeError) as error:
        raise MatrixFileError(f"cannot read matrix file {path}: {error}") from None
    return parse_matrix(text, source=str(path), base_dir=path.parent)
