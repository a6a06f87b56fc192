"""LoRA files in every layout load back to exactly the adapter peft built in memory; kohya's α honoured;
``PATH[:WEIGHT]`` parsing; the A1111 "autov3" adapter hash."""

from __future__ import annotations

import hashlib
import shutil
import struct
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from safetensors.torch import save_file

from helpers.lora_files import (
    TEXT_TARGETS,
    UNET_TARGETS,
    add_random_lora,
    lora_config,
    module_alphas,
    prefixed,
    probe,
    tiny_pipeline,
    write_kohya,
    write_safelatent,
)
from helpers.tiny_sd import build_tiny_sd15
from safelatent.errors import InvalidArgumentError
from safelatent.models.adapters import LoraSpec, lora_hash, read_lora

TOL = 1e-5


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One adapter (UNet + text encoder; per-module ranks and alphas differ) built by peft in memory, and
    the same adapter written in each layout."""
    root = tmp_path_factory.mktemp("lora-formats")
    parts = build_tiny_sd15(seed=0)
    unet, text_encoder = parts["unet"], parts["text_encoder"]
    base = probe(unet, text_encoder)
    unet_config = lora_config(
        UNET_TARGETS, r=4, alpha=8, alpha_pattern={"to_k": 2.0}, rank_pattern={"conv1": 2}
    )
    text_config = lora_config(TEXT_TARGETS, r=4, alpha=3, alpha_pattern={"fc1": 12.0})
    unet_sd = add_random_lora(unet, unet_config, "ref", seed=1)
    text_sd = add_random_lora(text_encoder, text_config, "ref", seed=2)
    adapted = probe(unet, text_encoder)
    state_dict = prefixed(unet_sd, text_sd)
    alphas = {**module_alphas(unet, "ref", "unet"), **module_alphas(text_encoder, "ref", "text_encoder")}
    # diffusers' own writer, with the per-component LoraConfig in the header as diffusers' trainers store it
    StableDiffusionLoraLoaderMixin.save_lora_weights(
        root / "diffusers",
        unet_lora_layers=unet_sd,
        text_encoder_lora_layers=text_sd,
        unet_lora_adapter_metadata=unet_config.to_dict(),
        text_encoder_lora_adapter_metadata=text_config.to_dict(),
    )
    files = {
        "diffusers": root / "diffusers" / "pytorch_lora_weights.safetensors",
        "kohya": write_kohya(root / "kohya.safetensors", state_dict, alphas),
        "safelatent": write_safelatent(
            root / "safelatent.safetensors",
            state_dict,
            {"unet": unet_config, "text_encoder": text_config},
            {"trigger_words": ["zq stripes"], "rank": 4, "alpha": 8, "base_model_hash": "0123456789"},
        ),
    }
    return SimpleNamespace(base=base, adapted=adapted, files=files, alphas=alphas, state_dict=state_dict)


def _flat(alphas: dict) -> dict:
    """Text-encoder module names without ``text_model.`` (kohya files have it, transformers 5 drops it)."""
    return {k.replace("text_encoder.text_model.", "text_encoder."): v for k, v in alphas.items()}


def _max_diff(a, b) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("fmt", ["diffusers", "kohya", "safelatent"])
def test_each_format_round_trips_to_the_in_memory_peft_adapter(reference, fmt):
    path = reference.files[fmt]
    lora = read_lora(path)
    assert lora.format == fmt
    assert len(lora.modules) == len(reference.alphas)
    assert _flat(lora.network_alphas) == pytest.approx(
        reference.alphas
    )  # per-module α, also where it differs
    assert _max_diff(reference.adapted, reference.base) > 0.1  # the adapter does change both outputs

    pipe = tiny_pipeline(seed=0)
    c = pipe.components
    assert _max_diff(probe(c.unet, c.text_encoder), reference.base) == 0.0
    pipe.set_loras([path])
    assert _max_diff(probe(c.unet, c.text_encoder), reference.adapted) < TOL
    assert [lora.format for lora in pipe.loras] == [fmt]


def test_safelatent_header_gives_trigger_words_and_base_model(reference):
    lora = read_lora(reference.files["safelatent"])
    assert lora.trigger_words == ["zq stripes"]
    assert lora.base_model_hash == "0123456789"
    assert lora.info["rank"] == 4
    assert read_lora(reference.files["diffusers"]).trigger_words == []


def test_a_diffusers_folder_and_a_file_without_metadata(reference, tmp_path):
    folder = read_lora(reference.files["diffusers"].parent)  # the folder save_lora_weights wrote
    assert folder.path.name == "pytorch_lora_weights.safetensors"
    bare = tmp_path / "bare.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict.items()}, str(bare))
    lora = read_lora(bare)
    assert lora.format == "diffusers"
    # no lora_adapter_metadata: diffusers' convention α = r, i.e. B·A is the delta
    assert lora.network_alphas == {m: float(r) for m, r in lora.ranks.items()}


def test_kohya_file_reproduces_a_known_low_rank_delta(tmp_path):
    """W' − W == w·(α/r)·up@down for Linear and Conv layers of the UNet and the text encoder."""
    rank, alpha, weight = 3, 1.5, 0.8
    pipe = tiny_pipeline(seed=3)
    unet, text_encoder = pipe.components.unet, pipe.components.text_encoder
    layers = {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": (
            "unet",
            "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
        ),
        "lora_unet_down_blocks_1_resnets_0_conv1": ("unet", "down_blocks.1.resnets.0.conv1"),  # 3×3 conv
        "lora_unet_mid_block_attentions_0_proj_in": ("unet", "mid_block.attentions.0.proj_in"),  # 1×1 conv
        "lora_te_text_model_encoder_layers_1_mlp_fc1": ("text_encoder", "encoder.layers.1.mlp.fc1"),
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj": (
            "text_encoder",
            "encoder.layers.0.self_attn.q_proj",
        ),
    }
    models = {"unet": unet, "text_encoder": text_encoder}
    originals = {
        component: {k: v.clone() for k, v in model.state_dict().items()}
        for component, model in models.items()
    }
    generator = torch.Generator().manual_seed(7)
    tensors, deltas = {}, {}
    for kohya, (component, name) in layers.items():
        layer = models[component].get_submodule(name)
        w = layer.weight
        if w.ndim == 2:
            down, up = (
                torch.randn(rank, w.shape[1], generator=generator),
                torch.randn(w.shape[0], rank, generator=generator),
            )
            delta = up @ down
        else:
            down = torch.randn(rank, *w.shape[1:], generator=generator)
            up = torch.randn(w.shape[0], rank, 1, 1, generator=generator)
            delta = (up.flatten(1) @ down.flatten(1)).reshape(w.shape)
        tensors |= {
            f"{kohya}.lora_down.weight": down,
            f"{kohya}.lora_up.weight": up,
            f"{kohya}.alpha": torch.tensor(alpha),
        }
        deltas[(component, name)] = weight * (alpha / rank) * delta
    path = tmp_path / "known.safetensors"
    save_file(tensors, str(path))
    assert _flat(read_lora(path).network_alphas) == pytest.approx(
        {f"{c}.{n}": alpha for c, n in layers.values()}
    )

    pipe.set_loras([f"{path}:{weight}"])
    # the un-fused peft layer computes W0·x + w·(α/r)·B·A·x
    fc1 = text_encoder.get_submodule("encoder.layers.1.mlp.fc1")
    x = torch.randn(5, fc1.in_features, generator=generator)
    before = originals["text_encoder"]
    fc1_weight = (
        before["encoder.layers.1.mlp.fc1.weight"] + deltas[("text_encoder", "encoder.layers.1.mlp.fc1")]
    )
    expected = torch.nn.functional.linear(x, fc1_weight, before["encoder.layers.1.mlp.fc1.bias"])
    with torch.no_grad():
        assert (fc1(x) - expected).abs().max().item() < TOL

    pipe.fuse_loras()
    for component, model in models.items():
        fused = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if ".lora_" not in k}
        assert fused.keys() == originals[component].keys()
        for key, before in originals[component].items():
            name = key.rsplit(".", 1)[0]
            if key.endswith(".weight") and (component, name) in deltas:
                assert (fused[key] - before - deltas[(component, name)]).abs().max().item() < 1e-6, key
            else:
                assert torch.equal(fused[key], before), key


def test_lora_spec_parses_only_a_trailing_weight(tmp_path):
    assert LoraSpec.parse("style.safetensors") == LoraSpec(Path("style.safetensors"), 1.0)
    spec = LoraSpec.parse("loras/style.safetensors:0.7")
    assert (str(spec.path), spec.weight, spec.display_name) == ("loras/style.safetensors", 0.7, "style")
    assert LoraSpec.parse(r"C:\loras\a.safetensors").path.name == r"C:\loras\a.safetensors"
    windows = LoraSpec.parse(r"C:\loras\a.safetensors:-0.5")
    assert (str(windows.path), windows.weight) == (r"C:\loras\a.safetensors", -0.5)
    assert LoraSpec.parse("a:b.safetensors").weight == 1.0
    odd = tmp_path / "w:2"  # a file whose name ends like a weight is taken as given
    odd.write_bytes(b"")
    assert LoraSpec.parse(str(odd)) == LoraSpec(odd, 1.0)
    for bad in ("a.safetensors:nan", "a.safetensors:inf", ""):
        with pytest.raises(InvalidArgumentError):
            LoraSpec.parse(bad)


def test_hash_is_a1111_autov3_of_the_bytes_after_the_header(reference, tmp_path):
    path = reference.files["safelatent"]
    data = path.read_bytes()
    (header_size,) = struct.unpack("<Q", data[:8])
    expected = hashlib.sha256(data[8 + header_size :]).hexdigest()[:12]
    assert lora_hash(path) == read_lora(path).hash == expected
    copy = tmp_path / "renamed.safetensors"
    shutil.copy(path, copy)
    assert lora_hash(copy) == expected  # same bytes, same hash
    # the same tensors with other header metadata (diffusers vs safelatent entry) hash the same
    plain = write_safelatent(
        tmp_path / "other-info.safetensors", reference.state_dict, {}, {"trigger_words": ["x"]}
    )
    assert lora_hash(plain) == lora_hash(
        write_safelatent(tmp_path / "b.safetensors", reference.state_dict, {}, {})
    )
    changed = dict(reference.state_dict)
    key = next(iter(changed))
    changed[key] = changed[key] + 1e-3
    assert lora_hash(write_safelatent(tmp_path / "c.safetensors", changed, {}, {})) != lora_hash(plain)


def _old_diffusers_key(key: str) -> str:
    """peft naming → the older diffusers naming (attention processors, ``lora_linear_layer``)."""
    stem, part = key.rsplit(".lora_", 1)
    updown = "down" if part.startswith("A") else "up"
    if key.startswith("text_encoder."):
        return f"{stem}.lora_linear_layer.{updown}.weight"
    for proj in ("to_q", "to_k", "to_v", "to_out.0"):
        if stem.endswith(f".{proj}"):
            short = proj.removesuffix(".0")
            return f"{stem[: -len(proj) - 1]}.processor.{short}_lora.{updown}.weight"
    return f"{stem}.lora.{updown}.weight"


def test_older_diffusers_key_names_convert_to_the_same_adapter(reference, tmp_path):
    old = {_old_diffusers_key(k): v.contiguous() for k, v in reference.state_dict.items()}
    assert any(".processor.to_out_lora.up.weight" in k for k in old)
    assert any("lora_linear_layer" in k for k in old)
    save_file(old, str(tmp_path / "old.safetensors"))
    lora = read_lora(tmp_path / "old.safetensors")
    assert lora.format == "diffusers"
    assert lora.state_dict.keys() == reference.state_dict.keys()
    assert all(torch.equal(lora.state_dict[k], v) for k, v in reference.state_dict.items())
    first = next(k for k in lora.state_dict if k.endswith("to_out.0.lora_A.weight"))
    assert lora.source_keys[first].endswith(".processor.to_out_lora.down.weight")  # errors name file keys
