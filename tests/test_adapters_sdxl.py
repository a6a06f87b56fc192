"""LoRA adapters on Stable Diffusion XL: kohya files (sgm/LDM and diffusers block names, ``lora_te1_`` /
``lora_te2_``), diffusers/peft and safelatent files with ``text_encoder_2`` keys, applied by
:class:`LoraStack` to the UNet and both text encoders; files for the wrong family are refused clearly.

Every check compares against deltas the test wrote itself: an adapted layer computes
``W0·x + w·(α/r)·B·A·x`` (LoRA, Hu et al. 2021, arXiv 2106.09685), so with the adapter its output minus the
base layer's output is ``w·(α/r)·B·A·x`` and after fusing ``W' − W0 = w·(α/r)·B·A``.
"""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from diffusers.loaders import StableDiffusionXLLoraLoaderMixin
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer

from helpers.lora_files import lora_delta, random_lora_pair, write_kohya_modules
from helpers.tiny_sd import build_tiny_sd
from safelatent.errors import ModelFormatError, SafelatentError
from safelatent.models.adapters import LoraSpec, LoraStack, plan_injection, read_lora, save_lora

TOL = 1e-5
WEIGHT = 0.7
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")

#: (component, module in the model's own names, kohya stem in sgm/LDM names for UNet modules).
#: sgm numbering of the tiny SDXL UNet (layers_per_block 2, as SDXL base): input_blocks 1-2 / 4-5 / 7-8 are
#: the layers of down_blocks 0 / 1 / 2 (input_blocks 3 and 6 the downsamplers), middle_block 0-2 =
#: resnet, attention, resnet; output_blocks 0-2 / 3-5 / 6-8 are up_blocks 0 / 1 / 2; in a block ``_0_`` is
#: the resnet, ``_1_`` the attention (the upsampler after it).
MODULES = [
    (
        "unet",
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
        "input_blocks_4_1_transformer_blocks_0_attn1_to_q",
    ),
    (
        "unet",
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k",
        "input_blocks_4_1_transformer_blocks_0_attn1_to_k",
    ),
    (
        "unet",
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_v",
        "input_blocks_4_1_transformer_blocks_0_attn1_to_v",
    ),
    (
        "unet",
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0",
        "input_blocks_4_1_transformer_blocks_0_attn1_to_out_0",
    ),
    ("unet", "down_blocks.1.attentions.1.proj_in", "input_blocks_5_1_proj_in"),
    (
        "unet",
        "down_blocks.2.attentions.1.transformer_blocks.1.attn2.to_k",
        "input_blocks_8_1_transformer_blocks_1_attn2_to_k",
    ),
    ("unet", "down_blocks.0.resnets.0.conv1", "input_blocks_1_0_in_layers_2"),  # 3×3 conv
    (
        "unet",
        "mid_block.attentions.0.transformer_blocks.1.attn2.to_q",
        "middle_block_1_transformer_blocks_1_attn2_to_q",
    ),
    (
        "unet",
        "mid_block.attentions.0.transformer_blocks.1.attn2.to_v",
        "middle_block_1_transformer_blocks_1_attn2_to_v",
    ),
    (
        "unet",
        "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj",
        "middle_block_1_transformer_blocks_0_ff_net_0_proj",
    ),
    ("unet", "mid_block.attentions.0.proj_out", "middle_block_1_proj_out"),
    ("unet", "mid_block.resnets.1.conv2", "middle_block_2_out_layers_3"),
    (
        "unet",
        "up_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0",
        "output_blocks_0_1_transformer_blocks_0_attn2_to_out_0",
    ),
    (
        "unet",
        "up_blocks.0.attentions.2.transformer_blocks.1.ff.net.2",
        "output_blocks_2_1_transformer_blocks_1_ff_net_2",
    ),
    ("unet", "up_blocks.1.attentions.2.proj_in", "output_blocks_5_1_proj_in"),
    ("unet", "up_blocks.1.resnets.0.conv_shortcut", "output_blocks_3_0_skip_connection"),  # 1×1 conv
    ("unet", "add_embedding.linear_1", "label_emb_0_0"),  # SDXL's added-conditioning MLP
    ("text_encoder", "encoder.layers.0.self_attn.q_proj", None),
    ("text_encoder", "encoder.layers.0.self_attn.out_proj", None),
    ("text_encoder", "encoder.layers.1.mlp.fc1", None),
    ("text_encoder_2", "text_model.encoder.layers.0.self_attn.q_proj", None),
    ("text_encoder_2", "text_model.encoder.layers.0.self_attn.v_proj", None),
    ("text_encoder_2", "text_model.encoder.layers.1.mlp.fc2", None),
    ("text_encoder_2", "text_projection", None),  # CLIPTextModelWithProjection's top-level projection
]


def kohya_stem(component: str, module: str, sgm: str | None, naming: str, index: int) -> str | None:
    """The kohya name of a module: ``lora_te1_text_model_…`` / ``lora_te2_…`` for the text encoders; for
    the UNet its sgm name, its diffusers name with underscores, or (``mixed``) alternately one and the other.
    ``None`` where diffusers has no conversion for that spelling (``add_embedding`` has only the sgm one,
    ``label_emb``)."""
    if component == "text_encoder":
        return "lora_te1_text_model_" + module.replace(".", "_")
    if component == "text_encoder_2":
        return "lora_te2_" + module.replace(".", "_")
    use_sgm = naming == "sgm" or (naming == "mixed" and index % 2 == 0)
    if use_sgm or module.startswith("add_embedding."):
        return None if naming == "diffusers_names" else "lora_unet_" + sgm
    return "lora_unet_" + module.replace(".", "_")


@pytest.fixture(scope="module")
def sdxl():
    """Tiny SDXL components (built once), the original weights of the adapted models, and one known
    low-rank delta per module of :data:`MODULES` (rank 2-4, α different for every module)."""
    parts = build_tiny_sd("sdxl", seed=0)
    models = {name: parts[name] for name in ("unet", *TEXT_ENCODERS)}
    originals = {
        name: {k: v.detach().clone() for k, v in model.state_dict().items()} for name, model in models.items()
    }
    generator = torch.Generator().manual_seed(2024)
    known = {}
    for index, (component, module, _sgm) in enumerate(MODULES):
        rank = 2 + index % 3
        alpha = 0.5 + 0.75 * index
        down, up = random_lora_pair(models[component].get_submodule(module), rank, generator)
        known[(component, module)] = SimpleNamespace(
            down=down, up=up, rank=rank, alpha=alpha, delta=lora_delta(down, up, WEIGHT * alpha / rank)
        )
    return SimpleNamespace(parts=parts, models=models, originals=originals, known=known)


def _peft_free(model) -> bool:
    return not any(isinstance(m, BaseTunerLayer) for m in model.modules()) and "peft_config" not in vars(
        model
    )


@pytest.fixture
def stack(sdxl):
    """A :class:`LoraStack` over the shared tiny SDXL; afterwards every adapter is removed and the models
    must be exactly as built (so the tests cannot leak into each other)."""
    p = sdxl.parts
    lora_stack = LoraStack(
        p["unet"], p["text_encoder"], text_encoder_2=p["text_encoder_2"], architecture="sdxl"
    )
    yield lora_stack
    lora_stack.set([])
    for name, model in sdxl.models.items():
        assert _peft_free(model), name
        state = model.state_dict()
        assert state.keys() == sdxl.originals[name].keys()
        assert all(torch.equal(state[k], v) for k, v in sdxl.originals[name].items()), name


def _write_kohya(sdxl, path, naming: str):
    modules, expected = {}, {}
    for index, (component, module, sgm) in enumerate(MODULES):
        stem = kohya_stem(component, module, sgm, naming, index)
        if stem is None:
            continue
        k = sdxl.known[(component, module)]
        modules[stem] = (k.down, k.up, k.alpha)
        expected[(component, module)] = k
    return write_kohya_modules(path, modules), expected


def _layer_input(layer: torch.nn.Module, generator: torch.Generator) -> torch.Tensor:
    if isinstance(layer, torch.nn.Linear):
        return torch.randn(3, layer.in_features, generator=generator)
    return torch.randn(2, layer.in_channels, 6, 6, generator=generator)


def _delta_output(layer: torch.nn.Module, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``ΔW`` applied to ``x`` the way the layer applies its weight (no bias)."""
    if isinstance(layer, torch.nn.Linear):
        return F.linear(x, delta)
    return F.conv2d(x, delta, None, layer.stride, layer.padding, layer.dilation, layer.groups)


def assert_unfused_deltas(sdxl, expected) -> None:
    """Every adapted layer: output with the adapter − base layer's output == w·(α/r)·B·A·x (fp32, 1e-5)."""
    generator = torch.Generator().manual_seed(5)
    for (component, module), k in expected.items():
        layer = sdxl.models[component].get_submodule(module)
        assert isinstance(layer, BaseTunerLayer), (component, module)
        base = layer.get_base_layer()
        x = _layer_input(base, generator)
        with torch.no_grad():
            got = layer(x) - base(x)
            want = _delta_output(base, x, k.delta)
        assert want.abs().max().item() > 1e-3, (component, module)  # the delta is not negligible
        assert (got - want).abs().max().item() < TOL, (component, module)


def assert_fused_deltas(sdxl, expected) -> None:
    """After fuse(): W' − W0 == w·(α/r)·B·A for the adapted layers; every other tensor unchanged."""
    for component, model in sdxl.models.items():
        fused = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if ".lora_" not in k}
        originals = sdxl.originals[component]
        assert fused.keys() == originals.keys()
        for key, before in originals.items():
            module = key.rsplit(".", 1)[0]
            if key.endswith(".weight") and (component, module) in expected:
                change = fused[key] - before
                assert (change - expected[(component, module)].delta).abs().max().item() < TOL, key
            else:
                assert torch.equal(fused[key], before), key


def assert_original_weights(sdxl) -> None:
    for component, model in sdxl.models.items():
        base = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if ".lora_" not in k}
        assert all(torch.equal(base[k], v) for k, v in sdxl.originals[component].items()), component


# --------------------------------------------------------------------------------------------------------
# kohya SDXL files
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("naming", ["sgm", "diffusers_names", "mixed"])
def test_a_kohya_sdxl_lora_written_from_known_deltas_reproduces_them(sdxl, stack, tmp_path, naming):
    """sgm/LDM block names (input_blocks / middle_block / output_blocks / label_emb), diffusers block names
    with underscores, or both in one file; ``lora_te1_`` → text_encoder, ``lora_te2_`` → text_encoder_2."""
    path, expected = _write_kohya(sdxl, tmp_path / f"sdxl_{naming}.safetensors", naming)
    assert {c for c, _ in expected} == {"unet", *TEXT_ENCODERS}

    lora = read_lora(path)
    assert lora.format == "kohya"
    assert lora.components == ("unet", "text_encoder", "text_encoder_2")
    assert len(lora.modules) == len(expected)
    alphas = {
        module.replace("text_encoder.text_model.", "text_encoder."): a
        for module, a in lora.network_alphas.items()
    }
    assert alphas == pytest.approx({f"{c}.{m}": k.alpha for (c, m), k in expected.items()})

    active = stack.set([LoraSpec(path, WEIGHT)])
    assert [(a.format, a.weight, a.components) for a in active] == [
        ("kohya", WEIGHT, ("unet", "text_encoder", "text_encoder_2"))
    ]
    assert_unfused_deltas(sdxl, expected)
    adapted = {
        (c, m)
        for c, model in sdxl.models.items()
        for m, x in model.named_modules()
        if isinstance(x, BaseTunerLayer)
    }
    assert adapted == set(expected)  # nothing else was wrapped

    stack.fuse()
    assert stack.fused
    assert_fused_deltas(sdxl, expected)
    stack.unfuse()
    assert not stack.fused
    assert_original_weights(sdxl)  # bit for bit
    assert_unfused_deltas(sdxl, expected)  # and the adapter still applies, unfused


def test_the_same_deltas_in_the_diffusers_and_safelatent_layouts_give_the_same_result(sdxl, stack, tmp_path):
    """``StableDiffusionXLLoraLoaderMixin.save_lora_weights`` (unet / text_encoder / text_encoder_2 keys,
    each module's α in ``alpha_pattern`` of the per-component LoraConfig) and :func:`save_lora`."""
    kohya, expected = _write_kohya(sdxl, tmp_path / "kohya.safetensors", "sgm")
    layers = {c: {} for c in ("unet", *TEXT_ENCODERS)}
    configs = {}
    for (component, module), k in expected.items():
        layers[component][f"{module}.lora_A.weight"] = k.down
        layers[component][f"{module}.lora_B.weight"] = k.up
    for component in layers:
        mine = {m: k for (c, m), k in expected.items() if c == component}
        configs[component] = LoraConfig(
            r=4,
            lora_alpha=1.0,
            target_modules=sorted(mine),
            rank_pattern={re.escape(m): k.rank for m, k in mine.items()},
            alpha_pattern={re.escape(m): k.alpha for m, k in mine.items()},
        )
    StableDiffusionXLLoraLoaderMixin.save_lora_weights(
        tmp_path / "diffusers",
        unet_lora_layers=layers["unet"],
        text_encoder_lora_layers=layers["text_encoder"],
        text_encoder_2_lora_layers=layers["text_encoder_2"],
        unet_lora_adapter_metadata=configs["unet"].to_dict(),
        text_encoder_lora_adapter_metadata=configs["text_encoder"].to_dict(),
        text_encoder_2_lora_adapter_metadata=configs["text_encoder_2"].to_dict(),
    )
    canonical = {f"{c}.{key}": value for c, sd in layers.items() for key, value in sd.items()}
    safelatent = save_lora(
        tmp_path / "mine.safetensors", canonical, configs=configs, info={"trigger_words": ["xl"]}
    )

    reference = read_lora(kohya)
    for path, fmt in [(tmp_path / "diffusers", "diffusers"), (safelatent, "safelatent")]:
        lora = read_lora(path)
        assert lora.format == fmt
        assert lora.components == ("unet", "text_encoder", "text_encoder_2")
        flat = {
            k.replace("text_encoder.text_model.", "text_encoder."): v for k, v in lora.network_alphas.items()
        }
        ref = {
            k.replace("text_encoder.text_model.", "text_encoder."): v
            for k, v in reference.network_alphas.items()
        }
        assert flat == pytest.approx(ref)

        stack.set([f"{path}:{WEIGHT}"])
        assert [a.format for a in stack.active] == [fmt]
        assert_unfused_deltas(sdxl, expected)
        stack.fuse()
        assert_fused_deltas(sdxl, expected)
        stack.unfuse()
        assert_original_weights(sdxl)
    assert read_lora(safelatent).trigger_words == ["xl"]


def test_adapters_on_both_text_encoders_stack_replace_and_remove(sdxl, stack, tmp_path):
    """Two adapters at their weights add on text_encoder_2 too; replacing the set removes the old
    text_encoder_2 layers; ``set([])`` leaves no peft layer (the fixture checks the weights)."""
    te2 = [(c, m) for c, m, _ in MODULES if c == "text_encoder_2"]
    first = {f"lora_te2_{m.replace('.', '_')}": sdxl.known[(c, m)] for c, m in te2}
    a = write_kohya_modules(
        tmp_path / "a.safetensors", {s: (k.down, k.up, k.alpha) for s, k in first.items()}
    )
    b = write_kohya_modules(
        tmp_path / "b.safetensors", {s: (k.down, k.up * -2.0, k.alpha) for s, k in list(first.items())[:2]}
    )
    stack.set([f"{a}:0.5", f"{b}:0.25"])
    generator = torch.Generator().manual_seed(9)
    for index, (component, module) in enumerate(te2):
        k = sdxl.known[(component, module)]
        layer = sdxl.models[component].get_submodule(module)
        base = layer.get_base_layer()
        x = _layer_input(base, generator)
        scale = 0.5 * k.alpha / k.rank + (0.25 * -2.0 * k.alpha / k.rank if index < 2 else 0.0)
        with torch.no_grad():
            assert (
                (layer(x) - base(x)) - _delta_output(base, x, lora_delta(k.down, k.up, scale))
            ).abs().max() < TOL

    stack.set([b])  # replaces both: only b's two layers still hold an adapter
    holding = {
        m: x
        for m, x in sdxl.models["text_encoder_2"].named_modules()
        if isinstance(x, BaseTunerLayer) and len(x.lora_A)
    }
    assert sorted(holding) == sorted(m for _, m in te2[:2])
    assert [a.path for a in stack.active] == [b]
    for _, module in te2[2:]:  # a's other layers compute the base layer again (peft keeps empty wrappers)
        layer = sdxl.models["text_encoder_2"].get_submodule(module)
        x = _layer_input(layer.get_base_layer(), generator)
        with torch.no_grad():
            assert torch.equal(layer(x), layer.get_base_layer()(x))
    assert _peft_free(sdxl.models["unet"]) and _peft_free(sdxl.models["text_encoder"])
    stack.set([])
    assert all(_peft_free(model) for model in sdxl.models.values())


def test_a_stack_without_text_encoder_2_keeps_working_for_unet_and_text_encoder(sdxl, tmp_path):
    """The positional two-model form (SD 1.x callers) is unchanged: adapters without text_encoder_2 apply."""
    modules, expected = {}, {}
    for index, (component, module, sgm) in enumerate(MODULES):
        if component != "text_encoder_2":
            k = expected[(component, module)] = sdxl.known[(component, module)]
            modules[kohya_stem(component, module, sgm, "sgm", index)] = (k.down, k.up, k.alpha)
    path = write_kohya_modules(tmp_path / "no_te2.safetensors", modules)
    lora_stack = LoraStack(sdxl.parts["unet"], sdxl.parts["text_encoder"], architecture="sdxl")
    try:
        lora_stack.set([f"{path}:{WEIGHT}"])
        assert lora_stack.active[0].components == ("unet", "text_encoder")
        assert_unfused_deltas(sdxl, expected)
    finally:
        lora_stack.set([])
    assert all(_peft_free(model) for model in sdxl.models.values())
    assert_original_weights(sdxl)


# --------------------------------------------------------------------------------------------------------
# clear errors
# --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd15():
    return build_tiny_sd("sd15", seed=0)


@pytest.mark.parametrize("layout", ["kohya", "diffusers"])
def test_a_text_encoder_2_lora_on_a_model_without_it_is_refused_as_made_for_sdxl(
    sdxl, sd15, tmp_path, layout
):
    k = sdxl.known[("text_encoder_2", "text_model.encoder.layers.0.self_attn.q_proj")]
    if layout == "kohya":
        path = write_kohya_modules(
            tmp_path / "xl_te2.safetensors",
            {"lora_te2_text_model_encoder_layers_0_self_attn_q_proj": (k.down, k.up, 1.0)},
        )
        key = "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"
    else:
        path = save_lora(
            tmp_path / "xl_te2.safetensors",
            {
                "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": k.down,
                "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": k.up,
            },
        )
        key = "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"
    lora_stack = LoraStack(sd15["unet"], sd15["text_encoder"])  # an SD 1.x model: no second text encoder
    with pytest.raises(ModelFormatError) as caught:
        lora_stack.set([path])
    message = str(caught.value)
    for fragment in ("xl_te2.safetensors", "made for Stable Diffusion XL", "text_encoder_2", "sd15", key):
        assert fragment in message, (fragment, message)
    assert caught.value.hint
    assert lora_stack.active == []
    assert _peft_free(sd15["unet"]) and _peft_free(sd15["text_encoder"])


def test_an_sd1_lora_on_the_sdxl_unet_names_both_families(sdxl, stack, tmp_path):
    """An SD 1.x kohya file: layers SDXL does not have (attention in down_blocks.0) → "name no layer of
    this sdxl (Stable Diffusion XL) model"; SD 1.x's 768-wide cross-attention on an SDXL layer → "trained
    for Stable Diffusion 1.x". Nothing is applied either way."""
    missing = {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (
            torch.ones(4, 32),
            torch.ones(32, 4),
            4.0,
        ),
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj": (torch.ones(4, 32), torch.ones(32, 4), 4.0),
    }
    widths = {
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k": (
            torch.ones(4, 768),
            torch.ones(64, 4),
            4.0,
        ),
    }
    cases = [
        (
            missing,
            "sd15_layers",
            ["name no layer of this sdxl (Stable Diffusion XL) model", "down_blocks_0_attentions_0"],
        ),
        (
            widths,
            "sd15_widths",
            ["trained for Stable Diffusion 1.x", "this sdxl (Stable Diffusion XL) model", "(4, 768)"],
        ),
    ]
    for modules, name, fragments in cases:
        path = write_kohya_modules(tmp_path / f"{name}.safetensors", modules)
        with pytest.raises(ModelFormatError) as caught:
            stack.set([path])
        message = str(caught.value)
        for fragment in [f"{name}.safetensors", *fragments]:
            assert fragment in message, (fragment, message)
        assert "Stable Diffusion XL" in caught.value.hint
        assert stack.active == [] and all(_peft_free(model) for model in sdxl.models.values())


def test_kohya_names_diffusers_cannot_map_are_named(sdxl, tmp_path):
    k = sdxl.known[("unet", "mid_block.attentions.0.proj_out")]
    bad_block = write_kohya_modules(
        tmp_path / "bad_block.safetensors", {"lora_unet_middle_block_3_proj_out": (k.down, k.up, 1.0)}
    )
    with pytest.raises(ModelFormatError, match=r"bad_block\.safetensors.*lora_unet_middle_block_3_proj_out"):
        read_lora(bad_block)
    twice = write_kohya_modules(
        tmp_path / "twice.safetensors",
        {
            "lora_unet_middle_block_1_proj_out": (k.down, k.up, 1.0),
            "lora_unet_mid_block_attentions_0_proj_out": (k.down, k.up, 1.0),
        },
    )
    with pytest.raises(ModelFormatError, match=r"twice\.safetensors has two keys for one weight") as caught:
        read_lora(twice)
    assert "lora_unet_middle_block_1_proj_out" in str(caught.value)
    assert "lora_unet_mid_block_attentions_0_proj_out" in str(caught.value)


def test_plan_injection_checks_text_encoder_2_shapes(sdxl, tmp_path):
    """A te2 layer of another width (real SDXL's 1280-wide bigG on the tiny 32-wide one) is named as an
    SDXL adapter that does not fit this model."""
    path = write_kohya_modules(
        tmp_path / "big_te2.safetensors",
        {
            "lora_te2_text_model_encoder_layers_0_self_attn_q_proj": (
                torch.ones(4, 1280),
                torch.ones(1280, 4),
                4.0,
            )
        },
    )
    with pytest.raises(SafelatentError) as caught:
        plan_injection(read_lora(path), sdxl.models, architecture="sdxl")
    assert "trained for Stable Diffusion XL" in str(caught.value) and "(4, 1280)" in str(caught.value)
