"""Offline model loading (issue 2, part 1): diffusers folders, single-file LDM checkpoints, pickle safety,
teaching errors, and proof that no socket is opened — on tiny random models built from the shipped SD 1.5
configs, plus one full SD 1.5-shaped checkpoint."""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers.ldm_layout import (
    components_to_ldm,
    text_encoder_to_ldm,
    unet_to_ldm,
    vae_to_ldm,
    write_ldm_checkpoint,
)
from helpers.tiny_sd import build_tiny_sd15, write_tiny_config_dir
from safelatent.api import Pipeline
from safelatent.errors import (
    InvalidWeightsError,
    ModelFormatError,
    ModelNotFoundError,
    UnsafeCheckpointError,
)
from safelatent.models.loading import load_components
from safelatent.models.offline import OFFLINE_ENV, offline_mode
from safelatent.models.shipped import load_component_config, shipped_config_dir

MODEL_PARTS = ("unet", "vae", "text_encoder")


# ------------------------------------------------------------------------------------------------------
# fixtures: one tiny model, written once per module as a diffusers folder and as an LDM single file
# ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_sd15(seed=0)


@pytest.fixture(scope="module")
def tiny_folder(tiny, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("diffusers") / "tiny-sd15"
    for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        tiny[name].save_pretrained(folder / name)
    shutil.copy(shipped_config_dir("sd15") / "model_index.json", folder / "model_index.json")
    return folder


@pytest.fixture(scope="module")
def tiny_config_dir(tmp_path_factory) -> Path:
    return write_tiny_config_dir(tmp_path_factory.mktemp("configs") / "tiny-configs")


def _ema_and_buffers(tiny) -> dict[str, torch.Tensor]:
    """Keys real SD 1.x files carry besides the three models: an EMA copy, scheduler buffers, VAE loss."""
    conv_in = tiny["unet"].state_dict()["conv_in.weight"]
    return {
        "model_ema.decay": torch.tensor(0.9999),
        "model_ema.num_updates": torch.tensor(1000, dtype=torch.int32),
        "model_ema.diffusion_modelinput_blocks00weight": torch.full_like(conv_in, 7.0),
        "alphas_cumprod": torch.linspace(0.99, 0.01, 1000),
        "betas": torch.linspace(0.00085, 0.012, 1000),
        "first_stage_model.loss.logvar": torch.zeros(()),
    }


@pytest.fixture(scope="module")
def tiny_ldm_file(tiny, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ldm") / "tiny-sd15.safetensors"
    return write_ldm_checkpoint(
        path, tiny["unet"], tiny["vae"], tiny["text_encoder"], extra=_ema_and_buffers(tiny)
    )


def _assert_same_weights(loaded, original) -> None:
    expected = original.state_dict()
    got = loaded.state_dict()
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert torch.equal(got[key], value), key


def _assert_ready(components, dtype=torch.float32) -> None:
    for name in MODEL_PARTS:
        model = getattr(components, name)
        assert not model.training, name
        assert not any(p.requires_grad for p in model.parameters()), name
        assert all(p.dtype == dtype and p.device.type == "cpu" for p in model.parameters()), name
    assert components.tokenizer.model_max_length == 77
    assert type(components.scheduler).__name__ == "PNDMScheduler"
    assert components.architecture == "sd15"
    assert len(components.model_hash) == 10 and int(components.model_hash, 16) >= 0


def _sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


# ------------------------------------------------------------------------------------------------------
# round trips
# ------------------------------------------------------------------------------------------------------


def test_diffusers_folder_round_trip(tiny, tiny_folder):
    components = load_components(tiny_folder)
    for name in MODEL_PARTS:
        _assert_same_weights(getattr(components, name), tiny[name])
    _assert_ready(components)
    assert components.source == str(tiny_folder)
    assert components.tokenizer("a cat").input_ids == tiny["tokenizer"]("a cat").input_ids
    expected_hash = hashlib.sha256()  # weight files in sorted order of their relative paths
    for rel in ("text_encoder/model.safetensors", "unet/diffusion_pytorch_model.safetensors"):
        expected_hash.update((tiny_folder / rel).read_bytes())
    expected_hash.update((tiny_folder / "vae" / "diffusion_pytorch_model.safetensors").read_bytes())
    assert components.model_hash == expected_hash.hexdigest()[:10]


def test_folder_without_tokenizer_uses_shipped_one(tiny_folder, tmp_path, caplog):
    folder = shutil.copytree(tiny_folder, tmp_path / "m", ignore=shutil.ignore_patterns("tokenizer"))
    with caplog.at_level(logging.WARNING, logger="safelatent.models.loading"):
        components = load_components(folder)
    assert "shipped CLIP tokenizer" in caplog.text
    assert components.tokenizer("a cat").input_ids == [49406, 320, 2368, 49407]


def test_single_file_round_trip(tiny, tiny_ldm_file, tiny_config_dir):
    components = load_components(tiny_ldm_file, config_dir=tiny_config_dir)
    for name in MODEL_PARTS:
        _assert_same_weights(getattr(components, name), tiny[name])
    _assert_ready(components)
    assert components.model_hash == _sha256(tiny_ldm_file)[:10]
    assert components.extra["ignored_keys"] == 5  # model_ema.* (3), alphas_cumprod, betas
    assert components.vae.config.scaling_factor == 0.18215


def test_single_file_to_fp16(tiny, tiny_ldm_file, tiny_config_dir):
    components = load_components(tiny_ldm_file, config_dir=tiny_config_dir, dtype="fp16")
    _assert_ready(components, torch.float16)
    key = "down_blocks.0.attentions.0.proj_in.weight"
    assert torch.equal(components.unet.state_dict()[key], tiny["unet"].state_dict()[key].half())


def test_weights_only_ckpt_with_state_dict_nesting_loads(tiny, tiny_config_dir, tmp_path):
    path = tmp_path / "model.ckpt"
    state = components_to_ldm(tiny["unet"], tiny["vae"], tiny["text_encoder"])
    torch.save({"state_dict": state, "global_step": 470000, "epoch": 6}, path)
    components = load_components(path, config_dir=tiny_config_dir)
    for name in MODEL_PARTS:
        _assert_same_weights(getattr(components, name), tiny[name])
    assert components.model_hash == _sha256(path)[:10]


# ------------------------------------------------------------------------------------------------------
# the LDM writer itself: same names as diffusers' own conversion expects, both directions
# ------------------------------------------------------------------------------------------------------


def test_ldm_layout_matches_real_sd15_key_names():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(load_component_config("sd15", "unet"))
        vae = AutoencoderKL.from_config(load_component_config("sd15", "vae"))
    ldm_unet = unet_to_ldm(unet.state_dict(), 2)
    ldm_vae = vae_to_ldm(vae.state_dict(), 4)
    # a few names exactly as they appear in v1-5-pruned-emaonly.safetensors
    for key in (
        "input_blocks.3.0.op.weight",
        "input_blocks.4.0.skip_connection.weight",
        "middle_block.1.transformer_blocks.0.attn2.to_k.weight",
        "output_blocks.2.1.conv.weight",
        "output_blocks.5.2.conv.weight",
        "output_blocks.11.1.proj_out.weight",
        "time_embed.2.bias",
        "out.2.weight",
    ):
        assert key in ldm_unet, key
    for key in (
        "decoder.up.0.block.0.nin_shortcut.weight",
        "encoder.mid.attn_1.q.weight",
        "decoder.norm_out.bias",
    ):
        assert key in ldm_vae, key
    assert tuple(ldm_vae["encoder.mid.attn_1.q.weight"].shape) == (512, 512, 1, 1)
    assert len(ldm_unet) == 686 and len(ldm_vae) == 248
    back = convert_ldm_unet_checkpoint(
        {"model.diffusion_model." + k: v for k, v in ldm_unet.items()}, load_component_config("sd15", "unet")
    )
    assert set(back) == set(unet.state_dict())
    back = convert_ldm_vae_checkpoint(
        {"first_stage_model." + k: v for k, v in ldm_vae.items()}, load_component_config("sd15", "vae")
    )
    assert set(back) == set(vae.state_dict())
    te = text_encoder_to_ldm({"embeddings.position_embedding.weight": torch.zeros(77, 8)})
    assert set(te) == {
        "transformer.text_model.embeddings.position_embedding.weight",
        "transformer.text_model.embeddings.position_ids",
    }


# ------------------------------------------------------------------------------------------------------
# offline: environment + constants, and no socket ever opened
# ------------------------------------------------------------------------------------------------------


def test_block_network_fixture_blocks_and_records(block_network):
    with pytest.raises(OSError, match="blocked"):
        socket.create_connection(("127.0.0.1", 9))
    with pytest.raises(OSError, match="blocked"):
        socket.getaddrinfo("huggingface.co", 443)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock, pytest.raises(OSError, match="blocked"):
        sock.connect(("127.0.0.1", 9))
    assert len(block_network) == 3


def test_hub_client_traffic_is_caught_by_the_fixture(block_network):
    """Without offline mode the hub's HTTP client does reach for the network — and the fixture sees it
    (so an empty attempt list in the loading tests means something)."""
    import huggingface_hub.constants
    from huggingface_hub.utils import get_session

    if huggingface_hub.constants.HF_HUB_OFFLINE:
        pytest.skip("HF_HUB_OFFLINE is set in this environment")
    with pytest.raises(Exception, match="blocked"):  # the client wraps the OSError
        get_session().head("https://huggingface.co/api/models/org/name")
    assert block_network, "the hub client reached the network without the fixture noticing"


def test_offline_mode_sets_and_restores(block_network, tmp_path, monkeypatch):
    import diffusers.utils.hub_utils
    import huggingface_hub.constants
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(diffusers.utils.hub_utils, "HF_HUB_OFFLINE", False)
    with offline_mode():
        for key, value in OFFLINE_ENV.items():
            assert os.environ[key] == value
        assert huggingface_hub.constants.HF_HUB_OFFLINE is True
        assert huggingface_hub.constants.is_offline_mode() is True
        assert diffusers.utils.hub_utils.HF_HUB_OFFLINE is True
        with offline_mode():  # nesting keeps it on
            pass
        assert huggingface_hub.constants.HF_HUB_OFFLINE is True
        with pytest.raises((OfflineModeIsEnabled, LocalEntryNotFoundError)):
            hf_hub_download("org/name", "config.json", cache_dir=tmp_path)
    assert "HF_HUB_OFFLINE" not in os.environ
    assert os.environ["TRANSFORMERS_OFFLINE"] == "0"
    assert huggingface_hub.constants.HF_HUB_OFFLINE is False
    assert diffusers.utils.hub_utils.HF_HUB_OFFLINE is False
    assert block_network == []


def test_loading_with_all_sockets_blocked(block_network, tiny, tiny_folder, tiny_ldm_file, tiny_config_dir):
    from_folder = load_components(tiny_folder)
    from_file = load_components(tiny_ldm_file, config_dir=tiny_config_dir)
    for components in (from_folder, from_file):
        _assert_same_weights(components.unet, tiny["unet"])
    assert block_network == []


def test_hub_id_is_never_resolved(block_network):
    with pytest.raises(ModelNotFoundError) as info:
        load_components("stable-diffusion-v1-5/stable-diffusion-v1-5")
    message = str(info.value)
    assert "Hub id" in message and "never downloads" in message and "local" in message
    assert block_network == []


# ------------------------------------------------------------------------------------------------------
# pickle safety
# ------------------------------------------------------------------------------------------------------


class _CreatesFileWhenUnpickled:
    """A pickle payload: unpickling calls ``open(marker, "w")``, which creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_ckpt_is_refused_and_not_executed(tmp_path, tiny_config_dir):
    marker = tmp_path / "pwned.txt"
    path = tmp_path / "evil.ckpt"
    torch.save(
        {
            "state_dict": {"model.diffusion_model.x": torch.zeros(1)},
            "hook": _CreatesFileWhenUnpickled(marker),
        },
        path,
    )
    assert not marker.exists()

    with pytest.raises(UnsafeCheckpointError) as info:
        load_components(path, config_dir=tiny_config_dir)
    message = str(info.value)
    assert "NOT loaded" in message and "run code" in message
    assert "safetensors" in message and "save_file" in message
    assert "open" in message  # names what the pickle wanted to call
    assert not marker.exists()

    # the payload is live: a full unpickle (what safelatent never does) would have created the file
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_malicious_bin_in_a_diffusers_folder_is_refused(tiny_folder, tmp_path):
    folder = shutil.copytree(tiny_folder, tmp_path / "m")
    (folder / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    marker = tmp_path / "pwned.txt"
    torch.save(
        {"decoder.conv_out.bias": torch.zeros(3), "hook": _CreatesFileWhenUnpickled(marker)},
        folder / "vae" / "diffusion_pytorch_model.bin",
    )
    with pytest.raises(UnsafeCheckpointError, match=r"diffusion_pytorch_model\.bin was NOT loaded"):
        load_components(folder)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------------
# errors that teach
# ------------------------------------------------------------------------------------------------------


def test_missing_path(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no such file or folder") as info:
        load_components(tmp_path / "nope.safetensors")
    assert "local diffusers folder" in str(info.value)


def test_folder_missing_vae(tiny_folder, tmp_path):
    folder = shutil.copytree(tiny_folder, tmp_path / "m", ignore=shutil.ignore_patterns("vae"))
    with pytest.raises(ModelFormatError) as info:
        load_components(folder)
    message = str(info.value)
    assert "missing vae/" in message
    assert "model_index.json" in message and "text_encoder/" in message and "scheduler/" in message


def test_folder_of_checkpoints_points_at_the_file(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "v1-5-pruned-emaonly.safetensors").write_bytes(b"")
    with pytest.raises(ModelFormatError, match="pass one of them"):
        load_components(tmp_path / "m")


def test_unrelated_safetensors_keys(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"encoder.layer.0.weight": torch.zeros(2, 2), "classifier.bias": torch.zeros(2)}, path)
    with pytest.raises(ModelFormatError) as info:
        load_components(path)
    message = str(info.value)
    assert "classifier.bias" in message and "fit no known" in message
    assert "model.diffusion_model." in message and "cond_stage_model.transformer." in message


def test_diffusers_state_dict_as_single_file(tiny, tmp_path):
    path = tmp_path / "unet.safetensors"
    save_file({k: v.contiguous() for k, v in tiny["unet"].state_dict().items()}, path)
    with pytest.raises(ModelFormatError, match="diffusers-layout state dict"):
        load_components(path)


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        (
            {
                "model.diffusion_model.input_blocks.0.0.weight": (384, 4, 3, 3),
                "first_stage_model.encoder.conv_in.weight": (128, 3, 3, 3),
                "conditioner.embedders.0.model.ln_final.weight": (1280,),
            },
            "Stable Diffusion XL refiner",
        ),
        (
            {
                "model.diffusion_model.input_blocks.0.0.weight": (256, 7, 3, 3),
                "model.diffusion_model.label_emb.weight": (1000, 1024),
                "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (256, 1024),
            },
            "class-conditioned UNet",
        ),
    ],
)
def test_sdxl_refiner_and_upscaler_are_recognised_and_refused(tmp_path, keys, expected):
    path = tmp_path / "model.safetensors"
    save_file({k: torch.zeros(shape) for k, shape in keys.items()}, path)
    with pytest.raises(ModelFormatError) as info:
        load_components(path)
    assert expected in str(info.value) and "not supported" in str(info.value)


def test_unet_only_file_names_what_is_missing(tiny, tiny_config_dir, tmp_path):
    path = write_ldm_checkpoint(tmp_path / "unet-only.safetensors", tiny["unet"])
    with pytest.raises(ModelFormatError) as info:
        load_components(path, config_dir=tiny_config_dir)
    message = str(info.value)
    assert (
        "VAE (first_stage_model.*)" in message and "text encoder (cond_stage_model.transformer.*)" in message
    )
    assert "diffusers folder" in message


def test_checkpoint_not_matching_the_configs(tiny_ldm_file):
    with pytest.raises(ModelFormatError) as info:
        load_components(tiny_ldm_file)  # tiny widths, shipped full-size configs
    message = str(info.value)
    assert "do not fit" in message and "other shapes" in message and "config_dir" in message


def test_nan_weights_in_single_file(tiny, tiny_config_dir, tmp_path):
    state = components_to_ldm(tiny["unet"], tiny["vae"], tiny["text_encoder"])
    bad_key = "first_stage_model.decoder.mid.attn_1.q.weight"
    state[bad_key] = state[bad_key].clone()
    state[bad_key][0, 0] = float("nan")
    path = tmp_path / "nan.safetensors"
    save_file(state, path)
    with pytest.raises(InvalidWeightsError) as info:
        load_components(path, config_dir=tiny_config_dir)
    assert bad_key in str(info.value) and str(path) in str(info.value) and "re-download" in str(info.value)


def test_inf_weights_in_folder(tiny_folder, tmp_path):
    folder = shutil.copytree(tiny_folder, tmp_path / "m")
    weights = folder / "vae" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    state["decoder.conv_out.bias"][0] = float("inf")
    save_file(state, weights)
    with pytest.raises(InvalidWeightsError, match=r"'decoder\.conv_out\.bias'.*vae"):
        load_components(folder)


def test_unknown_extension_and_corrupt_file(tmp_path):
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"\x08\x01")
    with pytest.raises(ModelFormatError, match=r"unknown model file type '\.onnx'"):
        load_components(onnx)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ModelFormatError, match=r"not a readable \.safetensors file"):
        load_components(broken)


# ------------------------------------------------------------------------------------------------------
# full SD 1.5 shapes with the shipped configs (runs by default; the marker is only a label)
# ------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_full_size_sd15_single_file_with_shipped_configs(tmp_path, block_network):
    """A full-size SD 1.5 LDM checkpoint (random weights, fp16, ~2 GB) loads with the shipped configs,
    sockets blocked; every tensor lands under its diffusers name with the right shape and values."""
    start = time.perf_counter()
    parts = build_tiny_sd15(seed=0, full_size=True)
    path = tmp_path / "sd15-random.safetensors"
    state: dict[str, torch.Tensor] = {}
    fingerprints: dict[str, dict[str, tuple[tuple[int, ...], float]]] = {}
    for name in MODEL_PARTS:
        model = parts.pop(name).half()  # in place, parameter by parameter: no second full-size copy
        fingerprints[name] = {
            k: (tuple(v.shape), float(v.double().sum())) for k, v in model.state_dict().items()
        }
        state.update(components_to_ldm(**{name: model}))  # shares the fp16 tensors
        del model
        gc.collect()
    save_file(state, path)
    n_file_keys = len(state)
    del state, parts
    gc.collect()
    built = time.perf_counter()

    components = load_components(path, dtype=torch.float16)
    loaded = time.perf_counter()

    assert n_file_keys == 686 + 248 + 196 + 1  # unet, vae, text encoder, position_ids
    assert components.extra["ignored_keys"] == 0
    for name in MODEL_PARTS:
        got = getattr(components, name).state_dict()
        assert set(got) == set(fingerprints[name]), name
        for key, (shape, total) in fingerprints[name].items():
            assert tuple(got[key].shape) == shape, key
            assert float(got[key].double().sum()) == total, key
    assert sum(p.numel() for p in components.unet.parameters()) == 859_520_964
    assert sum(p.numel() for p in components.vae.parameters()) == 83_653_863
    assert sum(p.numel() for p in components.text_encoder.parameters()) == 123_060_480
    assert components.unet.config.cross_attention_dim == 768
    assert components.vae_scale_factor == 8
    _assert_ready(components, torch.float16)
    assert components.model_hash == _sha256(path)[:10]
    assert block_network == []

    # and it generates (fp32 on the CPU; 2 steps at 64×64 with SLD: every branch through the real shapes)
    for name in MODEL_PARTS:
        getattr(components, name).float()
    result = Pipeline(components).generate(
        "a lighthouse", num_inference_steps=2, width=64, height=64, seed=0, sld="medium", return_pixels=True
    )
    assert result.pixels.shape == (1, 64, 64, 3) and np.isfinite(result.pixels).all()
    assert block_network == []
    generated = time.perf_counter()
    print(
        f"\nfull-size SD 1.5: build+write {built - start:.1f} s, load {loaded - built:.1f} s,"
        f" generate {generated - loaded:.1f} s"
    )
    (tmp_path / "timing.json").write_text(json.dumps({"build": built - start, "load": loaded - built}))


def test_prompts_are_padded_to_the_text_encoders_context(block_network):
    """The toy text encoder has 32 positions (SD: 77): the loader fits the tokenizer to it, so prompts
    are padded to 32 and a longer prompt is cut there with a warning, never an index error."""
    from safelatent.sampling.conditioning import PromptTruncatedWarning, encode_texts
    from safelatent.toy.model import CONTEXT_LENGTH, toy_model_dir

    components = load_components(toy_model_dir())
    assert components.text_encoder.config.max_position_embeddings == CONTEXT_LENGTH == 32
    assert components.tokenizer.model_max_length == CONTEXT_LENGTH
    hidden, _, messages = encode_texts(components.tokenizer, components.text_encoder, ["a red circle"])
    assert hidden.shape[1] == CONTEXT_LENGTH and messages == []
    long_prompt = " ".join(["red"] * 40) + " circle"
    with pytest.warns(PromptTruncatedWarning, match="longer than 32 CLIP tokens"):
        hidden, _, messages = encode_texts(components.tokenizer, components.text_encoder, [long_prompt])
    assert hidden.shape[1] == CONTEXT_LENGTH and "circle" in messages[0]
    assert block_network == []
