"""Vision transformers pruned in depth: attention head dimensions shrink with the rest, function kept.

Head-dimension pruning is checked against an independent reference: an attention block pruned through the
spec must compute what the unpruned block computes with the removed query/key/value rows of its projections
(and the matching output-projection columns) zeroed. That holds only if queries and keys lose the same
dimensions in every head and the softmax scale stays the original ``head_dim ** -0.5``.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn as nn
import torch_pruning as tp
from orthoreg_tp.adapters import adapted_pruner_class, prepare, prune


class _Block(nn.Module):
    """One attention module fed the raw input: only its inner (head) width can be pruned."""

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self.attn = attn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x)


def _prune_recording(model: nn.Module, x: torch.Tensor, layers: dict[str, str], **kwargs: object) -> dict:
    """Prune through the spec; return ``{layer name: removed rows/columns (original indices)}``.

    ``layers`` maps a layer name to ``"out"`` (record removed output rows) or ``"in"`` (removed input columns).
    """
    names = {m: n for n, m in model.named_modules()}
    fns = {"out": (tp.prune_linear_out_channels,), "in": (tp.prune_linear_in_channels,)}
    alive: dict[str, list[int]] = {}
    removed: dict[str, list[int]] = {n: [] for n in layers}
    spec = prepare(model, x)
    pruner = adapted_pruner_class(tp.pruner.MetaPruner)(  # the robust graph; finalize is called below
        model, x, importance=tp.importance.RandomImportance(), pruning_ratio=0.5, **spec.pruner_kwargs(), **kwargs
    )
    for group in pruner.step(interactive=True):
        for dep, idxs in group:
            name = names.get(dep.target.module)
            if name not in layers or dep.handler not in fns[layers[name]]:
                continue
            layer = dep.target.module
            width = layer.out_features if layers[name] == "out" else layer.in_features
            current = alive.get(name, list(range(width)))
            drop = set(idxs)
            removed[name].extend(current[i] for i in drop)
            alive[name] = [c for i, c in enumerate(current) if i not in drop]
        group.prune()
    spec.finalize(model, pruner)
    return removed


@torch.no_grad()
def _zero(model: nn.Module, removed: dict, layers: dict[str, str]) -> None:
    for name, idxs in removed.items():
        if not idxs:
            continue
        weight = model.get_submodule(name).weight
        idx = torch.tensor(sorted(set(idxs)))
        if layers[name] == "out":
            weight[idx] = 0
            bias = model.get_submodule(name).bias
            if bias is not None:
                bias[idx] = 0
        else:
            weight[:, idx] = 0


@pytest.mark.parametrize("fused", [True, False])
def test_timm_attention_head_dims_pruned_equals_zeroed(fused: bool) -> None:
    torch.manual_seed(0)
    attn = timm.layers.Attention(dim=32, num_heads=4, qkv_bias=True)
    attn.fused_attn = fused
    model = _Block(attn).eval()
    x = torch.randn(2, 5, 32)
    reference = copy.deepcopy(model)
    layers = {"attn.qkv": "out", "attn.proj": "in"}

    removed = _prune_recording(model, x, layers)
    _zero(reference, removed, layers)

    assert model.attn.qkv.out_features == 48 and model.attn.head_dim == 4 and model.attn.num_heads == 4
    assert model.attn.fused_attn is fused  # traced unfused, restored afterwards
    q, k, v = (sorted(i - p * 32 for i in removed["attn.qkv"] if p * 32 <= i < (p + 1) * 32) for p in range(3))
    assert q == k == v and len(q) == 16  # the same dimensions of queries, keys and values
    torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-5)


def test_timm_attention_whole_heads() -> None:
    torch.manual_seed(0)
    model = _Block(timm.layers.Attention(dim=32, num_heads=4)).eval()
    x = torch.randn(2, 5, 32)
    reference = copy.deepcopy(model)
    layers = {"attn.qkv": "out", "attn.proj": "in"}

    removed = _prune_recording(
        model, x, layers, prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=0.5
    )
    _zero(reference, removed, layers)

    assert model.attn.num_heads == 2 and model.attn.head_dim == 8 and model.attn.qkv.out_features == 48
    torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-5)


def test_timm_vit_attention_shrinks_through_prune() -> None:
    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False, num_classes=10).eval()
    x = torch.randn(1, 3, 160, 160)
    widths = [b.attn.qkv.out_features for b in model.blocks]

    report = prune(model, x, importance=tp.importance.GroupMagnitudeImportance(), ratio=0.5)

    assert report.frozen == ()
    assert all(b.attn.qkv.out_features <= w // 2 + b.attn.num_heads * 3 for b, w in zip(model.blocks, widths))
    assert report.params_fraction < 0.6  # sheds at least 40% of its parameters (global ranking, the default)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (1, 10) and torch.isfinite(out).all()



class _Args(nn.Module):
    """An attention module called with extra positional arguments (a feature size)."""

    def __init__(self, attn: nn.Module, *args: object) -> None:
        super().__init__()
        self.attn, self.args = attn, args

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, *self.args)


def _width_free_cases() -> dict:
    from timm.models import cait, convit, crossvit, davit, pvt_v2, swin_transformer

    swin = swin_transformer.WindowAttention(32, num_heads=4, window_size=2)
    torch.nn.init.normal_(swin.relative_position_bias_table)

    return {
        # attention module, input, {layer: "out"/"in"}, the query layer and its parts (q, k, v rows per layer)
        "pvt_v2": (_Args(pvt_v2.Attention(32, num_heads=2), [4, 4]), (2, 16, 32), {"q": 1, "kv": 2}),
        "crossvit": (_Args(crossvit.CrossAttention(32, num_heads=4)), (2, 5, 32), {"wq": 1, "wk": 1, "wv": 1}),
        "cait_class": (_Args(cait.ClassAttn(32, num_heads=4)), (2, 5, 32), {"q": 1, "k": 1, "v": 1}),
        "convit_mhsa": (_Args(convit.MHSA(32, num_heads=4)), (2, 5, 32), {"qkv": 3}),
        "davit_window": (_Args(davit.WindowAttention(32, (2, 2), num_heads=4)), (2, 4, 32), {"qkv": 3}),
        "swin_window": (_Args(swin), (2, 4, 32), {"qkv": 3}),  # already width-agnostic: no subclass
    }


@pytest.mark.parametrize("name", ["pvt_v2", "crossvit", "cait_class", "convit_mhsa", "davit_window", "swin_window"])
def test_width_free_attention_pruned_equals_zeroed(name: str) -> None:
    torch.manual_seed(0)
    model, shape, projections = _width_free_cases()[name]
    model.eval()
    x = torch.randn(*shape)
    reference = copy.deepcopy(model)
    cls = type(model.attn)
    layers = {f"attn.{p}": "out" for p in projections} | {"attn.proj": "in"}

    removed = _prune_recording(model, x, layers)
    _zero(reference, removed, layers)

    expected = cls.__name__ if name == "swin_window" else f"WidthFree{cls.__name__}"
    assert type(model.attn).__name__ == expected and isinstance(model.attn, cls)
    assert model.attn.proj.in_features == 16
    rows = {p: sorted(removed[f"attn.{p}"]) for p in projections}
    chunks = [[i - c * 32 for i in r if c * 32 <= i < (c + 1) * 32]
              for p, r in rows.items() for c in range(projections[p])]
    assert all(chunk == chunks[0] and len(chunk) == 16 for chunk in chunks)  # same dims of q, k and v
    torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-5)


def test_width_free_refuses_partial_rewrites() -> None:
    from orthoreg_tp.adapters._internal.widthfree import width_free_class
    from timm.models import twins

    # kv.reshape(B, -1, 2, self.num_heads, C // self.num_heads): the head width cannot become -1
    assert width_free_class(twins.GlobalSubSampleAttn) is None


def test_width_free_model_pickles(tmp_path: object) -> None:
    torch.manual_seed(0)
    model = timm.create_model("pvt_v2_b0", pretrained=False, num_classes=10, embed_dims=(16, 32, 80, 128),
                              depths=(1, 1, 1, 1)).eval()
    x = torch.randn(1, 3, 64, 64)
    report = prune(model, x, importance=tp.importance.GroupMagnitudeImportance(), ratio=0.5)
    assert report.frozen == ()
    assert type(model.stages[3].blocks[0].attn).__name__ == "WidthFreeAttention"
    path = tmp_path / "model.pt"
    torch.save(model, path)
    loaded = torch.load(path, weights_only=False)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


def test_packed_swiglu_halves_pruned_together() -> None:
    torch.manual_seed(0)
    model = _Block(timm.layers.GluMlp(32, hidden_features=64, act_layer=nn.SiLU, gate_last=False)).eval()
    x = torch.randn(2, 5, 32)
    reference = copy.deepcopy(model)
    layers = {"attn.fc2": "in"}

    removed = _prune_recording(model, x, layers)
    _zero(reference, removed, layers)

    assert model.attn.fc1.out_features == 32 and model.attn.fc2.in_features == 16
    torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------- transformers
_SMALL = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": 32, "patch_size": 8}


def test_hf_vit_attention_pruned_equals_zeroed() -> None:
    transformers = pytest.importorskip("transformers")

    torch.manual_seed(0)
    vit = transformers.ViTModel(transformers.ViTConfig(**_SMALL, intermediate_size=128))
    config = vit.config
    model = _Block(vit.layers[0].attention).eval()
    x = torch.randn(2, 5, 64)
    reference = copy.deepcopy(model)
    layers = {"attn.q_proj": "out", "attn.k_proj": "out", "attn.v_proj": "out", "attn.o_proj": "in"}

    removed = _prune_recording(model, x, layers)
    _zero(reference, removed, layers)

    assert model.attn.q_proj.out_features == 32 and model.attn.head_dim == 8 and model.attn.num_attention_heads == 4
    assert sorted(removed["attn.q_proj"]) == sorted(removed["attn.k_proj"])
    assert config._attn_implementation == "sdpa"  # traced eager, restored
    torch.testing.assert_close(model(x)[0], reference(x)[0], rtol=1e-5, atol=1e-5)


def test_hf_swin_attention_with_bias_table_pruned_equals_zeroed() -> None:
    transformers = pytest.importorskip("transformers")

    torch.manual_seed(0)
    swin = transformers.SwinModel(transformers.SwinConfig(image_size=32, patch_size=4, embed_dim=32, depths=[1],
                                                          num_heads=[4], window_size=4))
    attn = swin.encoder.layers[0].blocks[0].attention
    table = next(p for n, p in attn.named_parameters() if "relative_position" in n)
    torch.nn.init.normal_(table)
    model = _Block(attn).eval()
    x = torch.randn(2, 16, 32)  # 2 windows of 4 x 4 tokens
    reference = copy.deepcopy(model)
    layers = {"attn.q_proj": "out", "attn.k_proj": "out", "attn.v_proj": "out", "attn.o_proj": "in"}

    removed = _prune_recording(model, x, layers)
    _zero(reference, removed, layers)

    assert model.attn.q_proj.out_features == 16 and model.attn.head_dim == 4 and table.shape[1] == 4
    torch.testing.assert_close(model(x)[0], reference(x)[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(Exception, match="relative-position bias table"):
        prune(swin, torch.randn(1, 3, 32, 32), importance=tp.importance.GroupMagnitudeImportance(), ratio=0.5,
              prune_num_heads=True, head_pruning_ratio=0.5)


def _hf_models() -> dict:
    transformers = pytest.importorskip("transformers")
    swin = {"image_size": 32, "patch_size": 4, "embed_dim": 16, "depths": [1, 1], "num_heads": [2, 4], "window_size": 4}
    vit = {**_SMALL, "intermediate_size": 128}
    return {
        "vit": lambda: transformers.ViTForImageClassification(transformers.ViTConfig(**vit)),
        "deit": lambda: transformers.DeiTForImageClassification(transformers.DeiTConfig(**vit)),
        # a backbone: its hidden states are outputs, so the residual stream is kept
        "dinov2": lambda: transformers.Dinov2Model(transformers.Dinov2Config(**_SMALL, mlp_ratio=2)),
        "swin": lambda: transformers.SwinForImageClassification(transformers.SwinConfig(**swin)),
    }


@pytest.mark.parametrize("name", ["vit", "deit", "dinov2", "swin"])
def test_hf_vision_models_pruned_in_depth(name: str) -> None:
    build = _hf_models()[name]
    torch.manual_seed(0)
    model = build().eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        before = model(x)[0]
    widths = [m.q_proj.out_features for m in model.modules() if hasattr(m, "q_proj")]

    # per-layer ranking: every attention block loses exactly half its head dimensions
    report = prune(model, x, importance=tp.importance.GroupMagnitudeImportance(), ratio=0.5, global_ranking=False)

    assert report.frozen == () and report.spec["unhandled"] == []
    assert report.params_fraction < (0.7 if name == "dinov2" else 0.4)
    attn = [m for m in model.modules() if hasattr(m, "q_proj")]
    assert all(m.q_proj.out_features == m.num_attention_heads * m.head_dim == w // 2 for m, w in zip(attn, widths))
    with torch.no_grad():
        after = model(x)[0]
    assert after.shape == before.shape and torch.isfinite(after).all()


# ----------------------------------------------------------------------------------------------- segmentation
def test_hf_dinov2_classifier_reads_the_stream_twice() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    # the classifier reads cat([cls token, mean of the patch tokens], dim=1): the stream's channels twice
    model = transformers.Dinov2ForImageClassification(transformers.Dinov2Config(**_SMALL, mlp_ratio=2)).eval()
    x = torch.randn(1, 3, 32, 32)

    report = prune(model, x, importance=tp.importance.GroupMagnitudeImportance(), ratio=0.5)

    width = model.dinov2.layernorm.normalized_shape[0]
    assert report.frozen == () and width < 64 and model.classifier.in_features == 2 * width
    assert model(x).logits.shape == (1, 2) and report.params_fraction < 0.6


@pytest.mark.parametrize("arch", [pytest.param("Unet", marks=pytest.mark.slow), "FPN", "DeepLabV3Plus"])
def test_smp_models_pruned(arch: str) -> None:
    smp = pytest.importorskip("segmentation_models_pytorch")
    torch.manual_seed(0)
    kwargs = {"decoder_channels": (64, 32, 16, 16, 8)} if arch == "Unet" else {}
    model = getattr(smp, arch)("resnet18", encoder_weights=None, classes=3, **kwargs).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = model(x)

    report = prune(model, x, importance=tp.importance.GroupMagnitudeImportance(), ratio=0.5)

    assert report.frozen == () and report.params_fraction < 0.5
    with torch.no_grad():
        after = model(x)
    assert after.shape == before.shape and torch.isfinite(after).all()


def test_attention_kept_whole_says_why() -> None:
    from timm.models import cait

    model = _Block(cait.TalkingHeadAttn(32, num_heads=4)).eval()
    spec = prepare(model, torch.randn(2, 5, 32))

    assert any("attention kept whole: proj_l/proj_w mix heads" in n for n in spec.notes)
    assert spec.unhandled == () and model.attn.qkv in spec.ignored_layers


class _StreamAroundPvtAttention(nn.Module):
    """A residual stream through PVT-v2 attention: the stream may shrink while the heads keep their width."""

    def __init__(self) -> None:
        super().__init__()
        from timm.models.pvt_v2 import Attention

        self.inp, self.out = nn.Linear(8, 16), nn.Linear(16, 4)
        self.attn = Attention(16, num_heads=2, sr_ratio=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inp(x)
        return self.out(y + self.attn(y, (2, 2)))


def test_width_free_switch_when_only_the_stream_shrinks():
    """Reproduction (pvt_v2_b0 at ratio 0.5): heads unchanged, stream pruned, and ``reshape(B, N, C)`` failed."""
    torch.manual_seed(0)
    model, x = _StreamAroundPvtAttention().eval(), torch.randn(1, 4, 8)
    attn = model.attn
    report = prune(model, x, ratio=0.4, importance=tp.importance.GroupMagnitudeImportance(),
                   ignored_layers=[attn.q, attn.kv], global_ranking=False)
    assert not report.frozen
    assert attn.q.out_features == 16 and attn.q.in_features < 16  # heads kept, the stream they read shrank
    assert type(attn).__name__.startswith("WidthFree")
    assert model(x).shape == (1, 4, 4)
