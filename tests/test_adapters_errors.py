"""A LoRA that does not fit gives ONE error naming the file and its first mismatching keys, and leaves the
model exactly as it was — whether no adapter or another adapter was active, and also when injection
itself fails after the checks passed."""

from __future__ import annotations

import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import save_file

from helpers.lora_files import UNET_TARGETS, add_random_lora, lora_config, prefixed, probe, tiny_pipeline
from helpers.tiny_sd import build_tiny_sd15
from safelatent.errors import (
    InvalidWeightsError,
    ModelFormatError,
    ModelNotFoundError,
    SafelatentError,
    UnsafeCheckpointError,
)

TO_Q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
TO_K2 = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A valid adapter's canonical state dict and a file of it."""
    parts = build_tiny_sd15(seed=0)
    state_dict = prefixed(add_random_lora(parts["unet"], lora_config(UNET_TARGETS), "g", seed=1))
    path = tmp_path_factory.mktemp("good") / "good.safetensors"
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))
    return state_dict, path


def _write(path, tensors) -> str:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return str(path)


def _snapshot(pipe):
    c = pipe.components
    return probe(c.unet, c.text_encoder), [x.adapter_name for x in pipe.loras]


def _assert_unchanged(pipe, before, *, had_adapters: bool) -> None:
    c = pipe.components
    outputs, names = before
    after = probe(c.unet, c.text_encoder)
    assert all(torch.equal(x, y) for x, y in zip(after, outputs, strict=True))
    assert [x.adapter_name for x in pipe.loras] == names
    if not had_adapters:
        for model in (c.unet, c.text_encoder):
            assert not any(isinstance(m, BaseTunerLayer) for m in model.modules())
            assert "peft_config" not in model.__dict__ and "_hf_peft_config_loaded" not in model.__dict__


def _bad_files(tmp_path, good_state):
    sd = dict(good_state)
    r = sd[f"{TO_Q}.lora_A.weight"].shape[0]
    to_z = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_z"
    nan = dict(sd)
    nan[f"{TO_K2}.lora_B.weight"] = nan[f"{TO_K2}.lora_B.weight"].clone()
    nan[f"{TO_K2}.lora_B.weight"][0, 0] = float("nan")
    return {
        "sdxl": (
            _write(
                tmp_path / "sdxl_style.safetensors",
                {
                    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_k.lora_down.weight": torch.ones(
                        4, 640
                    ),
                    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_k.lora_up.weight": torch.ones(
                        640, 4
                    ),
                    "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.ones(
                        4, 1280
                    ),
                    "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.ones(
                        1280, 4
                    ),
                },
            ),
            ModelFormatError,
            ["sdxl_style.safetensors", "Stable Diffusion XL", "lora_te2_text_model_encoder_layers_0"],
        ),
        "sd2_widths": (
            _write(
                tmp_path / "sd2_widths.safetensors",
                {
                    **sd,
                    f"{TO_K2}.lora_A.weight": torch.ones(r, 1024),
                    f"{TO_K2}.lora_B.weight": torch.ones(64, r),
                },
            ),
            ModelFormatError,
            ["sd2_widths.safetensors", "Stable Diffusion 2.x", f"{TO_K2}.lora_A.weight", "(4, 1024)"],
        ),
        "unknown_key": (
            _write(
                tmp_path / "unknown_key.safetensors",
                {
                    **sd,
                    f"{to_z}.lora_A.weight": torch.ones(r, 32),
                    f"{to_z}.lora_B.weight": torch.ones(32, r),
                },
            ),
            ModelFormatError,
            ["unknown_key.safetensors", "attn1.to_z.lora_A.weight", "name no layer"],
        ),
        "kohya_unknown": (
            _write(
                tmp_path / "kohya_unknown.safetensors",
                {
                    "lora_unet_down_blocks_7_resnets_0_conv1.lora_down.weight": torch.ones(2, 32, 3, 3),
                    "lora_unet_down_blocks_7_resnets_0_conv1.lora_up.weight": torch.ones(32, 2, 1, 1),
                },
            ),
            ModelFormatError,
            ["kohya_unknown.safetensors", "lora_unet_down_blocks_7_resnets_0_conv1.lora_down.weight"],
        ),
        "wrong_shape": (
            _write(tmp_path / "wrong_shape.safetensors", {**sd, f"{TO_Q}.lora_A.weight": torch.ones(r, 33)}),
            InvalidWeightsError,
            ["wrong_shape.safetensors", f"{TO_Q}.lora_A.weight", "(4, 33)", "(4, 32)"],
        ),
        "nan": (
            _write(tmp_path / "nan_values.safetensors", nan),
            InvalidWeightsError,
            ["nan_values.safetensors", "NaN", f"{TO_K2}.lora_B.weight"],
        ),
        "missing_partner": (
            _write(
                tmp_path / "half.safetensors", {k: v for k, v in sd.items() if k != f"{TO_Q}.lora_B.weight"}
            ),
            ModelFormatError,
            ["half.safetensors", f"{TO_Q}.lora_A.weight"],
        ),
        "missing_file": (str(tmp_path / "nope.safetensors"), ModelNotFoundError, ["nope.safetensors"]),
    }


@pytest.mark.parametrize("with_active", [False, True], ids=["no-adapter", "adapter-active"])
@pytest.mark.parametrize(
    "case", ["sdxl", "sd2_widths", "unknown_key", "kohya_unknown", "wrong_shape", "nan", "missing_partner",
             "missing_file"],
)  # fmt: skip
def test_a_bad_adapter_raises_one_clear_error_and_changes_nothing(good, tmp_path, case, with_active):
    good_state, good_path = good
    path, error_type, fragments = _bad_files(tmp_path, good_state)[case]
    pipe = tiny_pipeline(seed=0)
    if with_active:
        pipe.set_loras([f"{good_path}:0.6"])
    before = _snapshot(pipe)
    with pytest.raises(error_type) as caught:
        pipe.set_loras([good_path, path])  # the good one first: it must not stay half-applied
    error = caught.value
    assert isinstance(error, SafelatentError) and error.hint
    for fragment in fragments:
        assert fragment in str(error), (fragment, str(error))
    _assert_unchanged(pipe, before, had_adapters=with_active)


@pytest.mark.parametrize("with_active", [False, True], ids=["no-adapter", "adapter-active"])
def test_a_failure_inside_injection_removes_what_was_added(good, monkeypatch, with_active):
    """The checks pass, the UNet part is injected, then the text-encoder injection fails."""
    parts = build_tiny_sd15(seed=0)
    unet_sd = add_random_lora(parts["unet"], lora_config(["to_q"]), "u", seed=4)
    text_sd = add_random_lora(parts["text_encoder"], lora_config(["q_proj"]), "t", seed=5)
    path = good[1].parent / f"both-{with_active}.safetensors"
    _write(path, prefixed(unet_sd, text_sd))
    pipe = tiny_pipeline(seed=0)
    if with_active:
        pipe.set_loras([good[1]], fuse=True)
    before = _snapshot(pipe)
    text_encoder = pipe.components.text_encoder

    def broken(*args, **kwargs):
        raise RuntimeError("simulated failure while loading the text-encoder adapter")

    monkeypatch.setattr(text_encoder, "load_adapter", broken)
    with pytest.raises(ModelFormatError, match=r"both-.*could not be applied .*simulated failure"):
        pipe.set_loras([path])
    _assert_unchanged(pipe, before, had_adapters=with_active)
    assert pipe.loras_fused == with_active
    monkeypatch.undo()
    pipe.set_loras([path])  # and the same file applies once injection works
    assert [x.components for x in pipe.loras] == [("unet", "text_encoder")]


class _Payload:
    def __reduce__(self):
        return (exec, ("open('PWNED', 'w').write('x')",))


def test_pickled_adapters_are_read_weights_only(good, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    good_state, _ = good
    torch.save(dict(good_state), tmp_path / "plain.pt")
    pipe = tiny_pipeline(seed=0)
    pipe.set_loras([tmp_path / "plain.pt"])
    assert pipe.loras[0].format == "diffusers"
    torch.save({"weights": _Payload()}, tmp_path / "evil.bin")
    with pytest.raises(UnsafeCheckpointError, match=r"evil\.bin"):
        pipe.set_loras([tmp_path / "evil.bin"])
    assert not (tmp_path / "PWNED").exists()
    assert [x.path.name for x in pipe.loras] == ["plain.pt"]


@pytest.mark.parametrize(
    ("key", "raw", "message"),
    [
        ("safelatent", "{not json", "is not JSON"),
        ("safelatent", "[1, 2]", "is not a JSON object"),
        ("lora_adapter_metadata", "{not json", "is not JSON"),
    ],
)
def test_malformed_json_header_entries_are_named(tmp_path, key, raw, message):
    from safelatent.models.adapters import read_lora

    path = tmp_path / "bad_header.safetensors"
    tensors = {
        "unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.ones(2, 4),
        "unet.down_blocks.0.attentions.0.proj_in.lora_B.weight": torch.ones(4, 2),
    }
    save_file(tensors, str(path), metadata={key: raw})
    with pytest.raises(ModelFormatError, match=message) as caught:
        read_lora(path)
    assert "bad_header.safetensors" in str(caught.value) and key in str(caught.value)
