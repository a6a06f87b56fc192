"""CLIP score and domain score: the math against CLIPModel's own forward pass on architecture-shaped random
weights (reduced widths), offline loading of the text tower, and both measures inside ``safelatent eval``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModelWithProjection

from safelatent.errors import InvalidArgumentError, ModelFormatError
from safelatent.eval.configs import EvalSettings
from safelatent.eval.quality import QualityScorer, clip_score, domain_similarity
from safelatent.eval.report import build_report
from safelatent.eval.run import run_eval
from safelatent.models.clip_text import load_clip_text_encoder
from safelatent.models.clip_vision import load_clip_image_encoder, preprocess
from safelatent.models.tokenizer import load_clip_tokenizer, tokenize_prompts

TEXT = {"vocab_size": 49408, "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2}
TEXT |= {
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "eos_token_id": 49407,
    "pad_token_id": 49407,
}
VISION = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4}
VISION |= {"image_size": 32, "patch_size": 16}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=16)).eval()
    folder = tmp_path_factory.mktemp("clip")
    model.save_pretrained(folder, safe_serialization=True)
    return folder, model


def images(n: int = 3) -> list[Image.Image]:
    rng = np.random.default_rng(1)
    return [Image.fromarray(rng.integers(0, 256, (40 + 8 * i, 48, 3), dtype=np.uint8)) for i in range(n)]


def test_clip_score_matches_clip_models_own_forward_pass(tiny_clip, block_network):
    folder, model = tiny_clip
    prompts = ["a red circle", "a blue square on a gray background", "stripes"]
    scorer_images = load_clip_image_encoder(folder, device="cpu")
    scorer_texts = load_clip_text_encoder(folder, device="cpu")
    ours = clip_score(scorer_images.embed(images()), scorer_texts.embed(prompts))
    ids = tokenize_prompts(load_clip_tokenizer(), prompts).input_ids
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=preprocess(images(), 32))
    cos = (out.logits_per_image / model.logit_scale.exp()).diagonal().detach().double().numpy()
    np.testing.assert_allclose(ours, 100 * np.maximum(cos, 0), atol=1e-4)
    ours_text = torch.nn.functional.normalize(scorer_texts.embed(prompts), dim=-1)
    np.testing.assert_allclose(ours_text.numpy(), out.text_embeds.detach().numpy(), atol=1e-5)  # unit there
    assert block_network == []


def test_clip_score_is_clamped_and_domain_similarity_is_the_centroid_cosine():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    t = torch.tensor([[2.0, 0.0], [1.0, 1.0], [1.0, 0.0]])
    np.testing.assert_allclose(clip_score(a, t), [100.0, 100 / np.sqrt(2), 0.0])  # negative cosine → 0
    refs = torch.tensor([[3.0, 0.0], [0.0, 0.5]])  # unit vectors (1,0), (0,1) → centroid (1,1)/√2
    np.testing.assert_allclose(domain_similarity(a, refs), [1 / np.sqrt(2), 1 / np.sqrt(2), -1 / np.sqrt(2)])
    with pytest.raises(InvalidArgumentError):
        clip_score(a, t[:2])


def test_text_tower_needs_a_full_clip_folder(tmp_path):
    CLIPVisionModelWithProjection(CLIPVisionConfig(**VISION, projection_dim=16)).save_pretrained(tmp_path)
    with pytest.raises(ModelFormatError, match="full CLIP model"):
        load_clip_text_encoder(tmp_path, device="cpu")


def test_quality_measures_inside_eval(tiny_clip, tmp_path):
    folder, _ = tiny_clip
    refs = tmp_path / "refs"
    refs.mkdir()
    for i, image in enumerate(images(2)):
        image.save(refs / f"{i}.png")
    with pytest.raises(InvalidArgumentError, match="--clip"):
        EvalSettings(prompts="toy-plain", reference_images=str(refs))
    settings = EvalSettings(
        prompts="toy-plain",
        limit=2,
        images_per_prompt=2,
        batch=2,
        steps=2,
        clip=str(folder),
        reference_images=str(refs),
    )
    run_eval(settings, tmp_path / "run", progress=False)
    records = [json.loads(line) for line in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    assert len(records) == 4
    scorer = QualityScorer(folder, reference_dir=refs, device="cpu")
    for r in records:
        assert 0.0 <= r["quality"]["clip_score"] <= 100.0 and -1.0 <= r["quality"]["domain"] <= 1.0
    summary = json.loads(build_report(tmp_path / "run").with_name("results.json").read_text())
    quality = summary["configs"]["baseline"]["quality"]
    assert quality["clip_score"] == pytest.approx(np.mean([r["quality"]["clip_score"] for r in records]))
    assert scorer.reference is not None and scorer.reference.shape == (2, 16)
    assert "CLIP score" in (tmp_path / "run" / "report" / "index.html").read_text()
