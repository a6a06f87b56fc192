"""Q16 output classifier and the local CLIP image encoder: offline, exact math, OpenAI preprocessing.

No real CLIP weights exist here (safelatent never downloads them), so the model tests use reduced-width
random CLIP vision towers saved into tmp_path; the architecture of the real ViT-L/14 is checked through the
shipped config on the meta device. The published Q16 prompts are pinned by SHA-256 (no dependency on any
folder outside the repository). Sample photographs come from scikit-image's bundled data (a test
dependency, no download).
"""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
)

from safelatent.errors import (
    InvalidArgumentError,
    ModelFormatError,
    ModelNotFoundError,
    UnsafeCheckpointError,
)
from safelatent.models.clip_vision import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ClipImageEncoder,
    clip_variant,
    load_clip_image_encoder,
    preprocess,
    shipped_vision_config,
)
from safelatent.models.shipped import load_component_config
from safelatent.safety.classifiers import Classifier, run_classifiers
from safelatent.safety.classifiers.actions import apply_actions
from safelatent.safety.classifiers.q16 import (
    Q16_LABELS,
    Q16Classifier,
    load_q16_prompts,
    q16_probabilities,
    q16_prompts_path,
)
from safelatent.toy import world

# SHA-256 of each prompt array's raw bytes (float16, C order, little-endian), computed from
# /work/shared/data/q16_prompts_<variant>.npy — the published ml-research/Q16 data/<model>/prompts.p
# converted to .npy, values unchanged — with
# hashlib.sha256(np.load(path, allow_pickle=False).tobytes()).hexdigest() (also printed by
# scripts/build_q16_prompts.py).
PROMPT_SHA256 = {
    "ViT-L-14": "14f90af537cb8974f17b3e290dd0dc6f71eae3ba0d0f4e12a9e8c56d1b000e11",
    "ViT-B-16": "61d6377dd08396ff09ea24ad7c4cffefb7661ab73642e2506da05b455358505f",
    "ViT-B-32": "fbe18869a40a10fe26ca89fca8acb4a57e0be4e2b7f6369d560ac72e0f71ed17",
}
PROMPT_SHAPES = {"ViT-L-14": (2, 768), "ViT-B-16": (2, 512), "ViT-B-32": (2, 512)}

# OpenAI CLIP ViT-L/14 (Radford et al. 2021): total parameters of the full model as printed by OpenAI's
# CLIP repository ("Model parameters: 427,616,513" in notebooks/Interacting_with_CLIP.ipynb) and listed for
# openai/clip-vit-large-patch14 by e.g. MTEB and keras-hub; the vision tower + projection is that minus the
# text tower (123,060,480), text projection (768 × 768) and logit scale (1).
VIT_L14_CLIP_PARAMS = 427_616_513
VIT_L14_VISION_WITH_PROJECTION_PARAMS = 303_966_208

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
SHIPPED_PREPROCESSOR = (
    Path(__file__).resolve().parents[1]
    / "src/safelatent/models/configs/clip_vit_l14_vision/preprocessor_config.json"
)


# --------------------------------------------------------------------------------------------------------
# fixtures and independent references
# --------------------------------------------------------------------------------------------------------


def _tiny_vision_config(**overrides) -> CLIPVisionConfig:
    fields = {**TINY, "patch_size": 14, "image_size": 224, "projection_dim": 768, "hidden_act": "quick_gelu"}
    return CLIPVisionConfig(**{**fields, **overrides})


@pytest.fixture(scope="module")
def tiny_vision(tmp_path_factory) -> tuple[Path, CLIPVisionModelWithProjection]:
    """A reduced-width random CLIP vision tower with a 768-wide projection (ViT-L/14's), saved as
    safetensors; and the in-memory model it was saved from."""
    torch.manual_seed(0)
    model = CLIPVisionModelWithProjection(_tiny_vision_config()).eval()
    folder = tmp_path_factory.mktemp("tiny_clip_vision")
    model.save_pretrained(folder, safe_serialization=True)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    return folder, model


@pytest.fixture(scope="module")
def tiny_encoder(tiny_vision) -> ClipImageEncoder:
    return load_clip_image_encoder(tiny_vision[0], device="cpu")


def _gradient(h: int = 96, w: int = 160) -> Image.Image:
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([x * 255 // (w - 1), y * 255 // (h - 1), (x + y) * 255 // (w + h - 2)], axis=-1)
    return Image.fromarray(rgb.astype(np.uint8))


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    """Photographs and synthetic images of several aspect ratios. For all of them the centre-crop offset
    of torchvision (round half to even) equals transformers' (floor), so CLIPImageProcessor is an
    independent reference for the whole transform."""
    from skimage import data

    photos = [Image.fromarray(getattr(data, name)()) for name in ("astronaut", "coffee", "chelsea")]
    toy = Image.fromarray(world.render(world.Attributes("circle", "red", "white"), size=128))
    out = [*photos, _gradient(), toy, _gradient(250, 200)]
    for im in out:
        w, h = im.size
        long_side = int(224 * max(w, h) / min(w, h))
        assert round((long_side - 224) / 2) == (long_side - 224) // 2
    return out


def _clip_image_processor():
    """transformers' CLIP image processor (its PIL/numpy backend: no torchvision) configured from the
    shipped preprocessor_config.json."""
    try:
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as Processor
    except ImportError:  # older transformers: the slow processor is the PIL one
        from transformers import CLIPImageProcessor as Processor
    fields = json.loads(SHIPPED_PREPROCESSOR.read_text())
    fields.pop("image_processor_type")
    return Processor(**fields)


def _hand_preprocess(image: Image.Image, size: int) -> np.ndarray:
    """OpenAI CLIP's torchvision transform written out: Resize(size, BICUBIC) → CenterCrop(size) with
    torchvision's int(round(...)) offsets → RGB → ToTensor → Normalize; (3, size, size) float32."""
    w, h = image.size
    scale = size / min(w, h)
    new_w, new_h = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    assert abs(new_w - w * scale) < 1 and abs(new_h - h * scale) < 1
    resized = image if (new_w, new_h) == (w, h) else image.resize((new_w, new_h), Image.BICUBIC)
    arr = np.asarray(resized)
    top, left = round((new_h - size) / 2.0), round((new_w - size) / 2.0)  # half to even
    arr = arr[top : top + size, left : left + size]
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    x = arr[..., :3].astype(np.float32) / np.float32(255)
    return ((x - np.float32(OPENAI_CLIP_MEAN)) / np.float32(OPENAI_CLIP_STD)).transpose(2, 0, 1)


def _hand_q16(embeddings: np.ndarray, prompts: np.ndarray) -> np.ndarray:
    """Q16 in float64 numpy: softmax over 100 × cosine similarity to the two prompt rows."""
    e = embeddings.astype(np.float64)
    p = prompts.astype(np.float64)
    cos = (e / np.linalg.norm(e, axis=1, keepdims=True)) @ (p / np.linalg.norm(p, axis=1, keepdims=True)).T
    logits = 100.0 * cos
    ex = np.exp(logits - logits.max(axis=1, keepdims=True))
    return ex / ex.sum(axis=1, keepdims=True)


def _published_prompts(variant: str) -> np.ndarray:
    """The shipped prompts read with safetensors' numpy API (not the classifier's loader), hash-checked."""
    from safetensors.numpy import load_file

    prompts = load_file(str(q16_prompts_path()))[variant]
    assert hashlib.sha256(prompts.tobytes()).hexdigest() == PROMPT_SHA256[variant]
    return prompts


# --------------------------------------------------------------------------------------------------------
# shipped data: prompts and the ViT-L/14 architecture
# --------------------------------------------------------------------------------------------------------


def test_shipped_prompts_are_the_published_ones_bit_for_bit():
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = q16_prompts_path()
    assert path.is_file() and path.name == "q16_prompts.safetensors"
    tensors = load_file(str(path))
    assert set(tensors) == set(PROMPT_SHA256)
    for variant, digest in PROMPT_SHA256.items():
        t = tensors[variant]
        assert t.dtype == torch.float16 and tuple(t.shape) == PROMPT_SHAPES[variant]
        assert hashlib.sha256(t.numpy().tobytes()).hexdigest() == digest
        loaded = load_q16_prompts(variant)
        assert loaded.dtype == torch.float16 and torch.equal(loaded, t)
        assert torch.isfinite(t.float()).all()
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert "ml-research/Q16" in meta["source"] and "MIT" in meta["license"]
    assert meta["rows"] == "0 = non inappropriate, 1 = inappropriate"
    assert Q16_LABELS == ("non inappropriate", "inappropriate")


def _vit_param_count(hidden: int, layers: int, mlp: int, patch: int, image: int, proj: int) -> int:
    """Parameters of a CLIP ViT image tower + projection from the architecture (Radford et al. 2021):
    bias-free patch conv, class token, positional embedding, ln_pre, per block (attention q/k/v/out with
    bias, two layer norms, MLP fc1/fc2 with bias), ln_post, bias-free projection."""
    tokens = (image // patch) ** 2 + 1
    block = 4 * (hidden * hidden + hidden) + 2 * 2 * hidden + (hidden * mlp + mlp) + (mlp * hidden + hidden)
    return (
        3 * patch * patch * hidden
        + hidden
        + tokens * hidden
        + 2 * hidden
        + layers * block
        + 2 * hidden
        + (hidden * proj)
    )


def test_shipped_vit_l14_config_has_openai_clip_vit_l14_parameter_count():
    config = shipped_vision_config("ViT-L-14")
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (1024, 4096, 24)
    assert (config.num_attention_heads, config.patch_size, config.image_size) == (16, 14, 224)
    assert (config.projection_dim, config.hidden_act, config.layer_norm_eps) == (768, "quick_gelu", 1e-5)
    assert clip_variant(config) == "ViT-L-14"
    with torch.device("meta"):
        model = CLIPVisionModelWithProjection(config)
    assert all(p.is_meta for p in model.parameters())
    count = sum(p.numel() for p in model.parameters())
    assert count == VIT_L14_VISION_WITH_PROJECTION_PARAMS
    assert count == _vit_param_count(1024, 24, 4096, 14, 224, 768)
    assert tuple(model.visual_projection.weight.shape) == (768, 1024)
    assert model.visual_projection.bias is None
    assert tuple(model.vision_model.embeddings.position_embedding.weight.shape) == (257, 1024)

    # with SD 1.5's (= CLIP ViT-L/14's) shipped text tower, the full CLIP model has OpenAI's published count
    text = load_component_config("sd15", "text_encoder")
    full_config = CLIPConfig(text_config=text, vision_config=config.to_dict(), projection_dim=768)
    with torch.device("meta"):
        full = CLIPModel(full_config)
    assert sum(p.numel() for p in full.parameters()) == VIT_L14_CLIP_PARAMS


def test_variant_detection():
    base = {"num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072, "image_size": 224}
    assert clip_variant({**base, "hidden_size": 768, "patch_size": 16, "projection_dim": 512}) == "ViT-B-16"
    assert clip_variant({**base, "hidden_size": 768, "patch_size": 32, "projection_dim": 512}) == "ViT-B-32"
    l14 = shipped_vision_config("ViT-L-14")
    assert clip_variant(l14) == "ViT-L-14"
    l14_336 = CLIPVisionConfig(**{**l14.to_dict(), "image_size": 336})
    assert clip_variant(l14_336) is None  # ViT-L/14@336px: another model, Q16 has no prompts for it
    assert clip_variant(_tiny_vision_config()) is None
    with pytest.raises(InvalidArgumentError, match=r"shipped: ViT-L-14"):
        shipped_vision_config("ViT-B-32")


# --------------------------------------------------------------------------------------------------------
# preprocessing
# --------------------------------------------------------------------------------------------------------


def test_preprocess_matches_clip_image_processor_on_non_square_images(images):
    assert any(im.width != im.height for im in images)
    ours = preprocess(images, 224)
    assert ours.shape == (len(images), 3, 224, 224) and ours.dtype == torch.float32
    theirs = _clip_image_processor()(images=images, return_tensors="np")["pixel_values"]
    # transformers rescales by × (1/255) where torchvision divides by 255: float32 rounding only
    np.testing.assert_allclose(ours.numpy(), theirs, rtol=0, atol=2e-6)
    for im, x in zip(images, ours, strict=True):
        assert np.array_equal(x.numpy(), _hand_preprocess(im, 224))


def test_preprocess_uses_torchvision_crop_rounding_and_converts_other_modes():
    from skimage import data

    rocket = Image.fromarray(data.rocket())  # 640×427 → 335×224: crop offset round(55.5) = 56 (floor: 55)
    (x,) = preprocess([rocket], 224)
    assert np.array_equal(x.numpy(), _hand_preprocess(rocket, 224))
    wide = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 43, 3), dtype=np.uint8))
    assert np.array_equal(preprocess([wide], 40)[0].numpy(), _hand_preprocess(wide, 40))  # no resize
    grey = Image.fromarray(data.camera()).resize((300, 200))
    rgba = _gradient(70, 50).convert("RGBA")
    out = preprocess([grey, rgba], 32)
    assert out.shape == (2, 3, 32, 32)
    assert np.array_equal(out[0].numpy(), _hand_preprocess(grey, 32))
    assert np.array_equal(out[1].numpy(), _hand_preprocess(rgba, 32))
    assert preprocess([], 224).shape == (0, 3, 224, 224)
    with pytest.raises(InvalidArgumentError, match=r"PIL.Image.fromarray"):
        preprocess([np.zeros((8, 8, 3), np.uint8)])


# --------------------------------------------------------------------------------------------------------
# loading and Q16 scores
# --------------------------------------------------------------------------------------------------------


def test_tiny_clip_loads_offline_and_q16_scores_equal_hand_computation(block_network, tiny_vision, images):
    folder, model = tiny_vision
    clf = Q16Classifier(folder, variant="ViT-L-14", device="cpu", batch_size=4)
    results = clf.scores(images)
    assert block_network == []
    assert clf.variant == "ViT-L-14" and clf.encoder.variant is None and clf.encoder.projection_dim == 768
    assert clf.encoder.device == torch.device("cpu") and clf.encoder.dtype == torch.float32

    # independent path: transformers' image processor + the in-memory model + numpy softmax(100 · cos)
    pixels = torch.from_numpy(_clip_image_processor()(images=images, return_tensors="np")["pixel_values"])
    with torch.no_grad():
        embeds = model(pixel_values=pixels).image_embeds.numpy()
    expected = _hand_q16(embeds, _published_prompts("ViT-L-14"))
    assert 0.02 < expected[:, 1].min() < expected[:, 1].max() < 0.98  # a spread, not saturated

    assert len(results) == len(images)
    for res, (p_ok, p_bad) in zip(results, expected, strict=True):
        assert res.classifier == "q16" and set(res.scores) == {"inappropriate"}
        assert res.scores["inappropriate"] == pytest.approx(p_bad, abs=1e-5)
        assert res.raw[Q16_LABELS[0]] == pytest.approx(p_ok, abs=1e-5)
        assert res.raw[Q16_LABELS[1]] == pytest.approx(p_bad, abs=1e-5)
        assert res.thresholds == {"inappropriate": 0.5}
        assert res.flagged("inappropriate") == (int(np.argmax([p_ok, p_bad])) == 1)  # Q16's argmax
        (reason,) = res.reasons["inappropriate"]
        cmp = "≥" if res.flagged("inappropriate") else "<"
        assert reason == f"Q16: inappropriate {p_bad:.2f} {cmp} 0.50 (ViT-L-14)"

    probs = clf.probabilities(images)
    assert probs.shape == (len(images), 2) and torch.allclose(probs.sum(1), torch.ones(len(images)))
    # batching does not change the embeddings
    assert torch.allclose(clf.encoder.embed(images, batch_size=1), clf.encoder.embed(images), atol=1e-5)


def test_q16_probabilities_is_the_published_formula():
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(5, 768)).astype(np.float32) * rng.uniform(0.1, 30, size=(5, 1)).astype(np.float32)
    prompts = _published_prompts("ViT-L-14")
    got = q16_probabilities(torch.from_numpy(emb), torch.from_numpy(prompts))
    assert got.dtype == torch.float32 and got.shape == (5, 2)
    np.testing.assert_allclose(got.numpy(), _hand_q16(emb, prompts), atol=1e-6)
    # scale-invariant in both arguments (cosine similarity), like the official code
    scaled = q16_probabilities(torch.from_numpy(emb) * 7, torch.from_numpy(prompts).float() * 3)
    assert torch.allclose(scaled, got, atol=1e-5)
    with pytest.raises(InvalidArgumentError, match=r"prompt embeddings \[2, D\].*projection width"):
        q16_probabilities(torch.zeros(2, 512), torch.from_numpy(prompts))


def test_full_clip_model_folder_loads_through_the_same_loader(block_network, tmp_path, images):
    torch.manual_seed(1)
    config = CLIPConfig(
        projection_dim=768,  # top-level: vision_config keeps its own default (512), as CLIPModel ignores it
        vision_config={**TINY, "patch_size": 14, "image_size": 224},
        text_config={**TINY, "num_hidden_layers": 1},
    )
    full = CLIPModel(config).eval()
    full.save_pretrained(tmp_path, safe_serialization=True)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "clip"

    encoder = load_clip_image_encoder(tmp_path, device="cpu")
    assert block_network == []
    assert encoder.projection_dim == 768 and encoder.image_size == 224
    assert torch.equal(encoder.model.visual_projection.weight, full.visual_projection.weight)
    pixels = preprocess(images[:3])
    with torch.no_grad():
        expected = full.visual_projection(full.vision_model(pixel_values=pixels).pooler_output)
    assert torch.allclose(encoder.embed(images[:3]), expected, atol=1e-5)
    clf = Q16Classifier(encoder=encoder, variant="ViT-L-14")
    assert len(clf.scores(images[:3])) == 3

    # the same weights under a legacy config.json in the layout of openai/clip-vit-large-patch14's
    # (transformers 4.16): every generic field repeated in the sub-configs, *_config_dict overrides, and
    # no projection_dim in vision_config (only the top-level one says 768)
    legacy_common = {"architectures": None, "bad_words_ids": None, "id2label": {"0": "LABEL_0"}, "top_k": 50}
    legacy = {
        "architectures": ["CLIPModel"],
        "initializer_factor": 1.0,
        "logit_scale_init_value": 2.6592,
        "model_type": "clip",
        "projection_dim": 768,
        "text_config": {**legacy_common, **config.text_config.to_dict(), "model_type": "clip_text_model"},
        "text_config_dict": {**TINY, "num_hidden_layers": 1},
        "torch_dtype": "float32",
        "transformers_version": None,
        "vision_config": {
            **legacy_common,
            **{k: v for k, v in config.vision_config.to_dict().items() if k != "projection_dim"},
            "model_type": "clip_vision_model",
        },
        "vision_config_dict": {**TINY, "patch_size": 14},
    }
    (tmp_path / "config.json").write_text(json.dumps(legacy))
    again = load_clip_image_encoder(tmp_path, device="cpu")
    assert block_network == []
    assert again.projection_dim == 768 and again.config.hidden_size == 32
    assert torch.allclose(again.embed(images[:3]), expected, atol=1e-5)


def test_encoder_uses_the_configs_image_size(tmp_path):
    torch.manual_seed(2)
    model = CLIPVisionModelWithProjection(_tiny_vision_config(patch_size=8, image_size=32, projection_dim=16))
    model.save_pretrained(tmp_path, safe_serialization=True)
    encoder = load_clip_image_encoder(tmp_path, device="cpu", dtype="float32")
    assert encoder.image_size == 32 and encoder.preprocess([_gradient()]).shape == (1, 3, 32, 32)
    assert encoder.embed([_gradient(), _gradient(30, 90)]).shape == (2, 16)
    assert encoder.embed([]).shape == (0, 16)


# --------------------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------------------


def test_missing_or_wrong_paths_say_what_to_pass(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelNotFoundError, match=r"not found.*pass a local folder with config.json"):
        load_clip_image_encoder(tmp_path / "nope")
    with pytest.raises(ModelNotFoundError, match=r"Hugging Face Hub id.*never downloads"):
        load_clip_image_encoder("openai/clip-vit-large-patch14")
    file = tmp_path / "model.safetensors"
    file.write_bytes(b"")
    with pytest.raises(ModelFormatError, match=r"is a file, not a folder.*pass a local folder"):
        load_clip_image_encoder(file)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelFormatError, match=r"no config.json.*model.safetensors"):
        load_clip_image_encoder(empty)
    (empty / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ModelFormatError, match=r"'bert' model, not CLIP.*expected model_type 'clip'"):
        load_clip_image_encoder(empty)
    with pytest.raises(ModelNotFoundError, match=r"not found"):
        Q16Classifier(tmp_path / "nope")
    with pytest.raises(InvalidArgumentError, match=r"unknown dtype.*float16"):
        load_clip_image_encoder(empty, dtype="int8")


class _TouchOnUnpickle:
    """Unpickling this runs ``Path.touch(marker)``: proof that a file was (or was not) unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_only_folder_is_refused_never_loaded(tiny_vision, tmp_path, monkeypatch):
    (tmp_path / "config.json").write_bytes((tiny_vision[0] / "config.json").read_bytes())
    marker = tmp_path / "unpickled"
    (tmp_path / "pytorch_model.bin").write_bytes(pickle.dumps(_TouchOnUnpickle(marker)))

    def forbidden(*args, **kwargs):
        raise AssertionError("torch.load must not be called")

    monkeypatch.setattr(torch, "load", forbidden)
    with pytest.raises(
        UnsafeCheckpointError, match=r"pytorch_model.bin.*never loads.*convert them to model.safetensors"
    ):
        load_clip_image_encoder(tmp_path)
    assert not marker.exists()


def test_vision_model_without_projection_is_refused(tmp_path):
    torch.manual_seed(3)
    CLIPVisionModel(_tiny_vision_config()).save_pretrained(tmp_path, safe_serialization=True)
    with pytest.raises(
        ModelFormatError, match=r"missing weights.*visual_projection.*CLIPVisionModelWithProjection"
    ):
        load_clip_image_encoder(tmp_path)


def test_weights_that_do_not_fit_the_config_are_refused(tiny_vision, tmp_path):
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((tiny_vision[0] / name).read_bytes())
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "projection_dim": 512}))
    with pytest.raises(
        ModelFormatError,
        match=r"1 with other shapes \(e\.g\. visual_projection\.weight.*re-export the folder",
    ):
        load_clip_image_encoder(tmp_path, device="cpu")


def test_loading_runs_under_offline_mode_and_hub_calls_become_errors(tiny_vision, monkeypatch):
    import transformers
    from huggingface_hub.errors import OfflineModeIsEnabled

    from safelatent.errors import OfflineViolationError
    from safelatent.models.offline import is_offline_enforced

    real = transformers.CLIPVisionModelWithProjection.from_pretrained.__func__
    seen = []

    def spy(cls, *args, **kwargs):
        seen.append((is_offline_enforced(), kwargs.get("local_files_only"), kwargs.get("use_safetensors")))
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(transformers.CLIPVisionModelWithProjection, "from_pretrained", classmethod(spy))
    load_clip_image_encoder(tiny_vision[0], device="cpu")
    assert seen == [(True, True, True)] and not is_offline_enforced()

    def hub_call(cls, *args, **kwargs):
        raise OfflineModeIsEnabled("Cannot reach https://huggingface.co: offline mode is enabled")

    monkeypatch.setattr(transformers.CLIPVisionModelWithProjection, "from_pretrained", classmethod(hub_call))
    with pytest.raises(OfflineViolationError, match=r"tried to contact a model hub.*never downloads"):
        load_clip_image_encoder(tiny_vision[0], device="cpu")


def test_unknown_variant_and_wrong_width_say_what_to_do(tiny_vision, tiny_encoder):
    with pytest.raises(InvalidArgumentError, match=r"cannot tell which CLIP architecture.*pass variant="):
        Q16Classifier(tiny_vision[0])
    with pytest.raises(InvalidArgumentError, match=r"no prompts for CLIP 'ViT-H-14'.*ViT-L-14, ViT-B-16"):
        Q16Classifier(encoder=tiny_encoder, variant="ViT-H-14")
    with pytest.raises(InvalidArgumentError, match=r"512-wide.*768 dimensions.*variant="):
        Q16Classifier(encoder=tiny_encoder, variant="ViT-B-32")
    with pytest.raises(InvalidArgumentError, match=r"none was given.*pass clip_path="):
        Q16Classifier()
    with pytest.raises(InvalidArgumentError, match=r"both clip_path and encoder"):
        Q16Classifier(tiny_vision[0], encoder=tiny_encoder, variant="ViT-L-14")
    with pytest.raises(InvalidArgumentError, match=r"threshold"):
        Q16Classifier(encoder=tiny_encoder, variant="ViT-L-14", threshold=1.5)


# --------------------------------------------------------------------------------------------------------
# the classifier interface, end to end
# --------------------------------------------------------------------------------------------------------


def test_flagged_image_is_withheld_through_run_classifiers_and_apply_actions(tiny_encoder, monkeypatch):
    clf = Q16Classifier(encoder=tiny_encoder, variant="ViT-L-14")
    assert isinstance(clf, Classifier) and clf.name == "q16" and clf.categories == ("inappropriate",)
    prompts = load_q16_prompts("ViT-L-14").float()
    # fixed embeddings: image 0 looks exactly like the "inappropriate" prompt, image 1 like the other one
    fixed = torch.stack([prompts[1] * 3.0, prompts[0] * 0.5])
    monkeypatch.setattr(tiny_encoder, "embed", lambda images, batch_size=16: fixed[: len(images)])
    images = [Image.new("RGB", (64, 48), c) for c in ("red", "green")]

    per_image = run_classifiers([clf], images)
    (bad,), (ok,) = per_image
    expected = _hand_q16(fixed.numpy(), _published_prompts("ViT-L-14"))[:, 1]
    assert bad.scores["inappropriate"] == pytest.approx(expected[0], abs=1e-6) and expected[0] > 0.5
    assert ok.scores["inappropriate"] == pytest.approx(expected[1], abs=1e-6) and expected[1] < 0.5
    bad_reason = f"Q16: inappropriate {expected[0]:.2f} ≥ 0.50 (ViT-L-14)"
    assert bad.reasons["inappropriate"] == (bad_reason,)

    decisions = apply_actions(images, per_image, {"inappropriate": ("withhold", None)})
    assert [d.action for d in decisions] == ["withhold", "keep"]
    assert decisions[0].image is None and decisions[0].withheld
    assert decisions[0].reasons == (f"withhold: inappropriate {expected[0]:.2f} ≥ 0.50 ({bad_reason})",)
    assert decisions[1].image is images[1]
    assert decisions[1].reasons == (f"kept: inappropriate {expected[1]:.2f} < 0.50 (q16)",)
    # an action with its own, lower threshold overrides the classifier's 0.5 and catches the second image too
    strict = apply_actions(images, per_image, {"inappropriate": ("blur", float(expected[1]) / 2)})
    assert [d.action for d in strict] == ["blur", "blur"]
