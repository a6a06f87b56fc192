"""Stacking adapters with weights, fusing and unfusing, replacing and removing the set; SLD encodes its
concept with the adapted text encoder.

Whole-model comparisons against weights merged by hand run in float64: the random tiny UNet amplifies fp32
rounding (merged ``W + ΔW`` vs peft's ``W·x + B·A·x``) to up to 4e-4 in its output (measured for a to_v
adapter alone), which says nothing about the adapter math. Each adapted layer is also checked in fp32.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from helpers.lora_files import (
    TEXT_TARGETS,
    add_random_lora,
    lora_config,
    prefixed,
    probe,
    tiny_pipeline,
    write_diffusers,
    write_kohya,
    write_safelatent,
)
from helpers.tiny_sd import build_tiny_sd15
from safelatent.models.adapters import LoraSpec
from safelatent.sampling.conditioning import encode_texts

TOL = 1e-5
F64 = torch.float64


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """Two adapters with overlapping targets and different ranks/alphas, as files, and their tensors."""
    root = tmp_path_factory.mktemp("lora-stack")
    parts = build_tiny_sd15(seed=0)
    a_unet = add_random_lora(parts["unet"], lora_config(["to_q", "to_v", "conv1"], r=4, alpha=8), "a", seed=1)
    a_text = add_random_lora(parts["text_encoder"], lora_config(TEXT_TARGETS, r=2, alpha=1), "a", seed=2)
    b_unet = add_random_lora(
        parts["unet"], lora_config(["to_q", "to_k", "proj_out"], r=2, alpha=3), "b", seed=3
    )
    a = prefixed(a_unet, a_text)
    b = prefixed(b_unet)
    a_alphas = {
        k[: -len(".lora_A.weight")]: (8.0 if k.startswith("unet.") else 1.0) for k in a if "lora_A" in k
    }
    b_alphas = {k[: -len(".lora_A.weight")]: 3.0 for k in b if "lora_A" in k}
    return SimpleNamespace(
        a=write_kohya(root / "a.safetensors", a, a_alphas),
        b=write_diffusers(root / "b.safetensors", b, {"unet": lora_config(["to_q"], r=2, alpha=3)}),
        tensors={"a": (a, a_alphas), "b": (b, b_alphas)},
    )


def _add_by_hand(parts: dict, state_dict: dict, alphas: dict, weight: float) -> None:
    """W ← W + weight·(α/r)·B·A for every module of an adapter (Linear and Conv2d)."""
    with torch.no_grad():
        for module, alpha in alphas.items():
            component, name = module.split(".", 1)
            down, up = state_dict[f"{module}.lora_A.weight"], state_dict[f"{module}.lora_B.weight"]
            layer = parts[component].get_submodule(name)
            delta = (up.flatten(1) @ down.flatten(1)).reshape(layer.weight.shape)
            layer.weight += weight * (alpha / down.shape[0]) * delta


def _max_diff(a, b) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


def _has_peft_layers(pipe) -> bool:
    c = pipe.components
    return any(isinstance(m, BaseTunerLayer) for model in (c.unet, c.text_encoder) for m in model.modules())


def test_two_adapters_at_half_weight_equal_both_deltas_added_by_hand(adapters):
    pipe = tiny_pipeline(seed=0, dtype=F64)
    active = pipe.set_loras([f"{adapters.a}:0.5", LoraSpec(adapters.b, 0.5, name="bee")])
    assert [(x.name, x.weight, x.format) for x in active] == [("a", 0.5, "kohya"), ("bee", 0.5, "diffusers")]
    c = pipe.components
    stacked = probe(c.unet, c.text_encoder)

    by_hand = build_tiny_sd15(seed=0)
    for model in (by_hand["unet"], by_hand["text_encoder"]):
        model.to(F64)
    base = probe(by_hand["unet"], by_hand["text_encoder"])
    for name in ("a", "b"):
        _add_by_hand(by_hand, *adapters.tensors[name], weight=0.5)
    expected = probe(by_hand["unet"], by_hand["text_encoder"])
    assert _max_diff(expected, base) > 0.05
    assert _max_diff(stacked, expected) < TOL


def test_each_stacked_layer_computes_the_weighted_sum_in_fp32(adapters):
    """Every adapted layer: peft's output == x·(W0 + Σ w_i·(α_i/r_i)·B_i·A_i)ᵀ + b, fp32, tol 1e-5."""
    pipe = tiny_pipeline(seed=0)
    c = pipe.components
    models = {"unet": c.unet, "text_encoder": c.text_encoder}
    weights = {"a": 0.5, "b": -1.5}
    pipe.set_loras([f"{adapters.a}:{weights['a']}", f"{adapters.b}:{weights['b']}"])
    by_hand = build_tiny_sd15(seed=0)
    for name, weight in weights.items():
        _add_by_hand(by_hand, *adapters.tensors[name], weight=weight)
    modules = {m for name in weights for m in adapters.tensors[name][1]}
    generator = torch.Generator().manual_seed(5)
    for module in sorted(modules):
        component, name = module.split(".", 1)
        adapted, merged = models[component].get_submodule(name), by_hand[component].get_submodule(name)
        if isinstance(merged, torch.nn.Linear):
            x = torch.randn(3, merged.in_features, generator=generator)
        else:
            x = torch.randn(1, merged.in_channels, 6, 6, generator=generator)
        with torch.no_grad():
            assert (adapted(x) - merged(x)).abs().max().item() < TOL, module


def test_fuse_equals_unfused_and_unfuse_restores_the_exact_weights(adapters):
    pipe = tiny_pipeline(seed=0, dtype=F64)
    c = pipe.components
    base_out = probe(c.unet, c.text_encoder)
    originals = {k: v.clone() for k, v in c.unet.state_dict().items()}
    pipe.set_loras([f"{adapters.a}:0.7", f"{adapters.b}:-0.4"])
    unfused = probe(c.unet, c.text_encoder)
    assert _max_diff(unfused, base_out) > 0.05

    pipe.fuse_loras()
    assert pipe.loras_fused
    base_weights = {
        k.replace(".base_layer", ""): v for k, v in c.unet.state_dict().items() if ".lora_" not in k
    }
    changed = [k for k, v in originals.items() if not torch.equal(base_weights[k], v)]
    assert changed and all(k.endswith(".weight") for k in changed)
    assert _max_diff(probe(c.unet, c.text_encoder), unfused) < TOL

    pipe.unfuse_loras()
    assert not pipe.loras_fused
    base_weights = {
        k.replace(".base_layer", ""): v for k, v in c.unet.state_dict().items() if ".lora_" not in k
    }
    assert all(torch.equal(base_weights[k], v) for k, v in originals.items())  # bit for bit
    assert _max_diff(probe(c.unet, c.text_encoder), unfused) < TOL


def test_set_loras_replaces_the_set_and_empty_removes_everything(adapters):
    pipe = tiny_pipeline(seed=0)
    c = pipe.components
    base_out = probe(c.unet, c.text_encoder)
    pipe.set_loras([adapters.a])
    only_a = probe(c.unet, c.text_encoder)
    pipe.set_loras([adapters.b], fuse=True)  # replaces a (text-encoder layers too), fused
    assert [x.name for x in pipe.loras] == ["b"] and pipe.loras_fused
    assert all(not isinstance(m, BaseTunerLayer) for m in c.text_encoder.modules())
    only_b = probe(c.unet, c.text_encoder)
    pipe.set_loras([adapters.a])  # unfuses b first, then swaps
    assert _max_diff(probe(c.unet, c.text_encoder), only_a) < TOL
    assert _max_diff(only_b, only_a) > 0.05
    pipe.set_loras([])
    assert pipe.loras == [] and not _has_peft_layers(pipe)
    assert "peft_config" not in c.unet.__dict__ and "peft_config" not in c.text_encoder.__dict__
    assert _max_diff(probe(c.unet, c.text_encoder), base_out) == 0.0


def test_sld_concept_is_encoded_by_the_adapted_text_encoder(adapters):
    """The concept branch the UNet sees is the adapted text encoder's encoding of the concept."""
    pipe = tiny_pipeline(seed=0)
    c = pipe.components
    concept = "blood splatter"
    plain, _, _ = encode_texts(c.tokenizer, c.text_encoder, [concept])
    pipe.set_loras([adapters.a])  # a adapts the text encoder
    adapted, _, _ = encode_texts(c.tokenizer, c.text_encoder, [concept])
    assert (adapted - plain).abs().max().item() > 0.05

    seen = []
    hook = c.unet.register_forward_pre_hook(
        lambda _m, _a, kwargs: seen.append(kwargs["encoder_hidden_states"].clone()), with_kwargs=True
    )
    try:
        result = pipe.generate(
            "a red circle",
            sld="medium",
            safety_concept=concept,
            num_inference_steps=2,
            seed=0,
            width=64,
            height=64,
        )
    finally:
        hook.remove()
    branches = seen[0].chunk(3)  # [uncond, prompt, concept]
    assert torch.equal(branches[2], adapted)
    assert result.settings.sld["sld_preset"] == "medium"
    assert [x["name"] for x in result.settings.loras] == ["a"]


def test_a_safelatent_adapter_for_another_base_model_warns(adapters, tmp_path):
    state_dict, _ = adapters.tensors["b"]
    path = write_safelatent(
        tmp_path / "other-base.safetensors", state_dict, {}, {"base_model_hash": "ffffffffff"}
    )
    pipe = tiny_pipeline(seed=0)  # model hash 0123456789
    with pytest.warns(UserWarning, match="other-base was trained on a model with hash ffffffffff"):
        pipe.set_loras([path])
    assert [x.name for x in pipe.loras] == ["other-base"]
