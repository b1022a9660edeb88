"""timm blocks whose forward reads sizes fixed at construction: pruned for real, with no block frozen.

Each model is a reduced config of the family's smallest timm model (random weights, 64x64 inputs). ``prune``
must succeed without its repair loop (``report.frozen`` empty), keep the output shape and shrink the model; for
BatchNorm CNNs the pruned model must also compute what the unpruned one computes with the removed channels'
consumers zeroed (the helper of ``test_adapters_consistency``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import timm
import torch
import torch.nn as nn
import torch_pruning as tp
from orthoreg_tp.adapters import prune
from test_adapters_consistency import _prune_recording, _randomize_bn, _zero_consumers


def _timm(name: str, **kwargs: object) -> Callable[[], nn.Module]:
    return lambda: timm.create_model(name, pretrained=False, num_classes=10, **kwargs)


def _inception_next() -> nn.Module:
    model = timm.create_model(
        "inception_next_atto", pretrained=False, num_classes=10, depths=(1, 1, 1, 1), dims=(16, 32, 64, 128)
    )
    model.head.norm = nn.Identity()  # the head's LayerNorm is not channel-local (zeroing != removing)
    return model


def _poolformerv2() -> nn.Module:
    from timm.models.metaformer import GroupNorm1NoBias, MetaFormer

    # poolformerv2_s12's layout (GroupNorm without bias, res_scale Scale layers) at a tenth of the width.
    return MetaFormer(
        depths=(1, 1, 1, 1),
        dims=(16, 32, 64, 128),
        norm_layers=GroupNorm1NoBias,
        use_mlp_head=False,
        res_scale_init_values=(None, None, 1.0, 1.0),
        num_classes=10,
    )


def _gemma4_vit() -> nn.Module:
    from timm.models.gemma4_vit import Gemma4VitClassifier

    return Gemma4VitClassifier(img_size=64, embed_dim=64, depth=2, num_heads=2, head_dim=32, intermediate_size=128,
                               position_embedding_size=64, num_classes=10)


# dpn48b's layout with one or two blocks per stage and a quarter of the width.
_DPN = {"k_sec": (1, 2, 1, 1), "k_r": 64, "groups": 8, "inc_sec": (8, 16, 16, 32), "num_init_features": 8}

MODELS: dict[str, Callable[[], nn.Module]] = {
    "fasternet": _timm("fasternet_t0", embed_dim=16, depths=(1, 1, 1, 1), feature_dim=64),
    "inception_next": _inception_next,
    "mambaout": _timm("test_mambaout"),
    "efficientvim": _timm("efficientvim_m1", embed_dim=(32, 48, 64), depths=(1, 1, 1), state_dim=(9, 9, 9)),
    "shvit": _timm("shvit_s1", embed_dim=(32, 48, 64), depth=(1, 1, 1), partial_dim=(8, 12, 16)),
    "poolformerv2": _poolformerv2,
    "rexnet": _timm("rexnet_100", width_mult=0.5, depth_mult=0.3),
    "dpn-b": _timm("dpn48b", **_DPN),
    "dpn": _timm("dpn48b", **_DPN, b=False),  # slices c1x1_c's output into the residual and dense updates
    # attention pinned up front (reshapes to its input width): only the MLPs shrink, with no repair needed
    "coat": _timm("coat_tiny", img_size=64, embed_dims=(32, 32, 32, 32), serial_depths=(1, 1, 1, 1), parallel_depth=1),
    "vit_relpos": _timm("test_vit_relpos", img_size=64),  # attention pinned up front: only the MLPs shrink
    # selective kernels: split input (paths pruned in lockstep), and grouped paths reading the whole input
    "skresnet": _timm("skresnet18", layers=(1, 1, 1, 1), channels=(16, 32, 64, 128), stem_width=16),
    "skresnext": _timm("skresnext50_32x4d", layers=(1, 1, 1, 1), cardinality=4, base_width=8, stem_width=16),
    # a chunk of a split read by several ops (host inference overran the sizes); a parameter-free final RmsNorm
    "gemma4_vit": _gemma4_vit,
    # torch.split by kernel-size groups into depthwise/pointwise convs of several kernel sizes, then torch.cat
    "mixnet": _timm("mixnet_s"),
    # EVA-02: a packed SwiGLU MLP (fc1 -> chunk(2) -> silu(x1) * x2); attention kept whole (rotary embeddings)
    "eva02": _timm("eva02_tiny_patch14_224", img_size=64, depth=2),
}
#: BatchNorm CNNs: pruning must equal zeroing the removed channels' consumers.
PRESERVING = ("fasternet", "inception_next", "rexnet", "dpn-b", "dpn", "skresnet", "skresnext", "mixnet")


@pytest.mark.parametrize("name", list(MODELS))
def test_pruned_without_frozen_blocks(name: str) -> None:
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = model(x)

    report = prune(model, x, importance=tp.importance.GroupMagnitudeImportance(), ratio=0.5)

    assert report.frozen == ()
    assert report.params_fraction < 0.8
    with torch.no_grad():
        after = model(x)
    assert after.shape == before.shape and torch.isfinite(after).all()


@pytest.mark.parametrize("name", PRESERVING)
def test_pruned_equals_zeroed(name: str) -> None:
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    _randomize_bn(model)
    x = torch.randn(2, 3, 64, 64)
    reference = copy.deepcopy(model)

    removed = _prune_recording(model, x, 0.5)
    _zero_consumers(reference, removed)

    assert removed
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-4, atol=1e-4)
