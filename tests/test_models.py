"""The DToP model and its baselines: shapes, timm equivalence, gradients, invariances."""

import dataclasses

import pytest
import timm
import torch

from dtop.errors import ConfigError
from dtop.models import build_model, resolve_model_config
from dtop.models.backbone import create_vit
from dtop.models.locality import is_locality_param

SIZES = [(64, 64), (64, 96), (96, 64)]  # square, landscape, portrait (H, W)


def tiny_config(**changes):
    return dataclasses.replace(resolve_model_config("dtop_tiny"), **changes)


BASELINES = {
    "cls": dict(arch="cls", locality="none"),
    "gem-tokens": dict(arch="gem-tokens", locality="none"),
    "gem-cnn": dict(arch="gem-cnn", backbone="resnet18", stem_layers=None, backbone_args={}, dim=32,
                    locality="none"),
}


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("variant", ["dtop", "dtop-orthogonal", "cls", "gem-tokens", "gem-cnn"])
def test_descriptor_shape_and_unit_norm(variant, batch, size):
    if variant == "dtop":
        cfg = tiny_config()
    elif variant == "dtop-orthogonal":
        cfg = tiny_config(fusion="orthogonal", locality="local-attention")
    else:
        cfg = tiny_config(**BASELINES[variant])
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():
        out = model(torch.randn(batch, 3, *size))
    assert out.shape == (batch, model.descriptor_dim)
    assert model.descriptor_dim == (cfg.dim or 512)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(batch))


def _timm_twin(model):
    """A fresh timm VisionTransformer of the same shape holding the same (timm-named) weights."""
    twin = create_vit(dataclasses.replace(model.config, pretrained=None)).eval()
    timm_state = {k: v for k, v in model.backbone.state_dict().items() if not is_locality_param(k)}
    twin.load_state_dict(timm_state, strict=True)
    return twin


@pytest.mark.parametrize("locality", ["none", "conv-ffn", "local-attention"])
def test_taps_equal_timm_forward_intermediates(locality):
    torch.manual_seed(1)
    model = build_model(tiny_config(locality=locality, layers=[-3, -1], locality_blocks=3))
    twin = _timm_twin(model)
    x = torch.randn(2, 3, 96, 64)
    with torch.no_grad():
        cls_tokens, maps = model.forward_taps(x)
        ref = twin.forward_intermediates(x, indices=[1, 3], return_prefix_tokens=True, intermediates_only=True)
    assert len(maps) == 2
    for (ref_map, ref_prefix), cls_token, fmap in zip(ref, cls_tokens, maps):
        assert fmap.shape == (2, 64, 6, 4)
        torch.testing.assert_close(fmap, ref_map, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cls_token, ref_prefix[:, 0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("locality", ["none", "conv-ffn", "local-attention"])
def test_real_hybrid_weights_load_strictly_and_match_timm(tmp_path, locality):
    """A state dict of timm's own R50+ViT-B/16 (here 2 blocks) loads with a strict key match, and the
    backbone computes exactly timm's forward at initialisation, for every locality setting."""
    from safetensors.torch import save_file

    torch.manual_seed(2)
    reference = timm.create_model("vit_base_r50_s16_384", pretrained=False, depth=2, dynamic_img_size=True).eval()
    weights = tmp_path / "hybrid.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(weights))
    cfg = dataclasses.replace(
        resolve_model_config("dtop_hybrid"),
        backbone_args={"depth": 2}, pretrained=str(weights), layers=[-2, -1], locality=locality, locality_blocks=2,
    )
    model = build_model(cfg)
    backbone_keys = {k for k in model.backbone.state_dict() if not is_locality_param(k)}
    assert backbone_keys == set(reference.state_dict()) - {"head.weight", "head.bias"}
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(
            model.backbone.forward_features(x), reference.forward_features(x), rtol=1e-4, atol=1e-4
        )


def test_torch_weights_file_loads_with_weights_only(tmp_path):
    torch.manual_seed(3)
    source = build_model(tiny_config(locality="none"))
    path = tmp_path / "backbone.pth"
    torch.save({"state_dict": source.backbone.state_dict()}, path)
    model = build_model(tiny_config(pretrained=str(path)))
    for key, value in source.backbone.state_dict().items():
        torch.testing.assert_close(model.backbone.state_dict()[key], value)


def test_weights_of_another_shape_fail_clearly(tmp_path):
    from dtop.errors import CheckpointError

    path = tmp_path / "wide.pth"
    torch.save(build_model(tiny_config(backbone_args={"embed_dim": 32, "depth": 4, "num_heads": 2})).backbone
               .state_dict(), path)
    with pytest.raises(CheckpointError, match="shape mismatches"):
        build_model(tiny_config(pretrained=str(path)))


def test_every_trainable_part_receives_a_gradient():
    for locality in ("conv-ffn", "local-attention"):
        torch.manual_seed(4)
        model = build_model(tiny_config(locality=locality)).train()
        # timm zero-initialises the last norm of each ResNetV2 residual block, which blocks the
        # gradient of that block's convs at init; pretrained weights are not like that.
        for module in model.modules():
            if isinstance(module, torch.nn.GroupNorm):
                torch.nn.init.ones_(module.weight)
        x = torch.randn(2, 3, 128, 128)  # 8x8 tokens: the radius-3 window excludes some pairs
        out = model(x)
        (out * torch.randn_like(out)).sum().backward()
        for name, param in model.named_parameters():
            if param.requires_grad:
                assert param.grad is not None, name
                assert param.grad.abs().sum() > 0, name
        groups = model.parameter_groups()
        assert groups["locality"] and groups["head"] and groups["stem"] and groups["encoder"]
        # the final norm and blocks after the last tap do not shape the descriptor: frozen
        assert not any(p.requires_grad for p in model.backbone.norm.parameters())


@pytest.mark.parametrize("variant", ["dtop", "local-attention", "cls", "gem-cnn"])
def test_descriptors_are_batch_invariant(variant):
    if variant == "dtop":
        cfg = tiny_config()
    elif variant == "local-attention":
        cfg = tiny_config(locality="local-attention")
    else:
        cfg = tiny_config(**BASELINES[variant])
    torch.manual_seed(5)
    model = build_model(cfg)
    x = torch.randn(4, 3, 64, 96)
    with torch.no_grad():
        batched = model(x)
        alone = torch.cat([model(x[i:i + 1]) for i in range(4)])
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-5)


def test_sizes_not_multiple_of_16_are_padded(tiny_model):
    x = torch.randn(1, 3, 70, 100)
    padded = torch.nn.functional.pad(x, (0, 12, 0, 10))
    with torch.no_grad():
        torch.testing.assert_close(tiny_model(x), tiny_model(padded))


def test_locality_modules_start_as_identity_and_can_learn():
    torch.manual_seed(6)
    model = build_model(tiny_config(locality="conv-ffn"))
    dwconvs = [m.dwconv for m in model.backbone.blocks[-2:].modules() if hasattr(m, "dwconv")]
    assert len(dwconvs) == 2
    assert all(not c.weight.detach().any() for c in dwconvs)
    twin = _timm_twin(model)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.backbone.forward_features(x), twin.forward_features(x))  # exactly
        dwconvs[0].weight.normal_()
        assert not torch.allclose(model.backbone.forward_features(x), twin.forward_features(x))


def test_local_attention_strength_restricts_to_window():
    torch.manual_seed(7)
    model = build_model(tiny_config(locality="local-attention", locality_blocks=1, locality_radius=1))
    attn = model.backbone.blocks[-1].attn
    mask = attn.outside_window(4, 4, torch.device("cpu"))
    # token 1 (grid 0,0) sees grid cells with Chebyshev distance <= 1: (0,0), (0,1), (1,0), (1,1)
    visible = (mask[1, 1:] == 0).nonzero().flatten().tolist()
    assert visible == [0, 1, 4, 5]
    assert mask[0].abs().sum() == 0 and mask[:, 0].abs().sum() == 0  # [CLS] row and column free


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(backbone="vit_not_a_model", stem_layers=None), "unknown backbone"),
        (dict(layers=[-5]), "out of range"),
        (dict(layers=[4]), "out of range"),
        (dict(locality_blocks=9), "exceeds"),
        (dict(backbone="resnet18", stem_layers=None, backbone_args={}), "not a timm VisionTransformer"),
        (dict(backbone_args={"embed_dim": 64, "depth": 4, "num_heads": 2, "wings": 2}), "backbone_args"),
    ],
)
def test_bad_configs_fail_clearly(changes, message):
    with pytest.raises(ConfigError, match=message):
        build_model(tiny_config(**changes))


def test_repr_is_informative(tiny_model):
    text = repr(tiny_model)
    assert "taps=[2, 3]" in text and "locality=conv-ffnx2" in text and "GeM(p=3.0000" in text


def test_every_arch_choice_has_a_model_class():
    from typing import get_args

    from dtop.models.config import Arch
    from dtop.models.factory import ARCH_REGISTRY

    assert set(ARCH_REGISTRY) == set(get_args(Arch))


# ------------------------------------------------------------------ hybrids on any timm CNN stem


def lite_config(**changes):
    """dtop_lite shrunk for speed (2 blocks of width 48), random weights."""
    cfg = resolve_model_config("dtop_lite", ["pretrained=none"])
    changes.setdefault("backbone_args", {"embed_dim": 48, "depth": 2, "num_heads": 2, "img_size": 64})
    changes.setdefault("layers", [-2, -1])
    return dataclasses.replace(cfg, **changes)


def _cnn_weights(tmp_path, name="efficientnet_lite0", drop_counters=True):
    """A timm-keyed weights file of the whole CNN (classifier included), without BatchNorm's counters."""
    from safetensors.torch import save_file

    torch.manual_seed(5)
    cnn = timm.create_model(name, pretrained=False)
    with torch.no_grad():  # non-trivial BatchNorm statistics, so that a wrong load shows
        for module in cnn.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    state = {k: v.contiguous() for k, v in cnn.state_dict().items()
             if not (drop_counters and k.endswith("num_batches_tracked"))}
    path = tmp_path / f"{name}.safetensors"
    save_file(state, str(path))
    return cnn.eval(), path


def test_cnn_stem_hybrid_equals_timm_features_and_vit(tmp_path):
    """The stem is timm's CNN cut at stride 16 holding the file's weights (loaded strictly, BatchNorm
    counters optional), and the whole backbone computes timm's VisionTransformer over its features."""
    from dtop.models.cnn_stem import create_cnn_stem

    cnn, path = _cnn_weights(tmp_path)
    model = build_model(lite_config(pretrained=str(path), locality="none"))
    stem = model.backbone.patch_embed.backbone
    x = torch.randn(2, 3, 96, 64)
    reference = timm.create_model("efficientnet_lite0", pretrained=False, features_only=True).eval()
    reference.load_state_dict({k: v for k, v in cnn.state_dict().items() if k in reference.state_dict()})
    with torch.no_grad():
        features = stem(x)[-1]
        torch.testing.assert_close(features, reference(x)[3], rtol=1e-5, atol=1e-5)  # stride 16, 112 channels
    assert features.shape == (2, 112, 6, 4) and model.stride == 16
    twin = _timm_twin(model)
    assert type(create_cnn_stem("efficientnet_lite0")) is type(twin.patch_embed.backbone)
    with torch.no_grad():
        torch.testing.assert_close(model.backbone.forward_features(x), twin.forward_features(x), rtol=1e-5, atol=1e-5)


def test_cnn_stem_weights_of_another_cnn_fail_clearly(tmp_path):
    from dtop.errors import CheckpointError

    _, path = _cnn_weights(tmp_path, "mobilenetv3_small_050")
    with pytest.raises(CheckpointError, match="do not fit the stem efficientnet_lite0"):
        build_model(lite_config(pretrained=str(path)))


def test_unknown_cnn_stem_fails_clearly():
    with pytest.raises(ConfigError, match="unknown stem 'efficientnet_lite9'"):
        build_model(lite_config(stem="efficientnet_lite9"))


@pytest.mark.parametrize("arch", ["dtop", "cls", "gem-tokens"])
def test_only_the_pretrained_cnn_learns_slowly(arch):
    """With a CNN stem, backbone_lr_mult applies to the CNN only: the ViT on top is new."""
    from dtop.engine.train import param_groups

    model = build_model(lite_config(arch=arch, locality="none" if arch != "dtop" else "conv-ffn"))
    slow = {n for n, _ in model.named_parameters() if model.from_pretrained(n)}
    assert slow and all(n.startswith("backbone.patch_embed.backbone.") for n in slow)
    assert "backbone.patch_embed.proj.weight" not in slow and "backbone.blocks.0.attn.qkv.weight" not in slow
    groups = param_groups(model, torch.nn.Linear(2, 2), lr=1.0, backbone_mult=0.1, weight_decay=0.0)
    slow_ids = {id(p) for g in groups if g["lr"] == 0.1 for p in g["params"]}
    assert slow_ids == {id(p) for n, p in model.named_parameters() if n in slow and p.requires_grad}
    # a ViT backbone (pretrained as a whole) keeps its rule: everything but the locality modules
    tiny = build_model("dtop_tiny")
    assert all(tiny.from_pretrained(n) == (tiny.part_of(n) in ("stem", "encoder")) for n, _ in tiny.named_parameters())


def test_hybrid_needs_exactly_one_stem():
    with pytest.raises(ConfigError, match="exactly one stem"):
        lite_config(stem_layers=[1, 1, 1])
    with pytest.raises(ConfigError, match="applies only to backbone 'hybrid'"):
        dataclasses.replace(resolve_model_config("gem_cnn_lite"), stem="efficientnet_lite0")


def test_lite_models_build_and_describe():
    for name in ("dtop_lite", "cls_lite", "gem_tokens_lite", "gem_cnn_lite"):
        cfg = resolve_model_config(name, ["pretrained=none"])
        model = build_model(cfg)
        with torch.no_grad():
            out = model(torch.randn(1, 3, 64, 96))
        assert out.shape == (1, model.descriptor_dim)
        assert model.descriptor_dim == (1280 if name == "gem_cnn_lite" else 128)
