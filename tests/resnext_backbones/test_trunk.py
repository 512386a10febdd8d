import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
import torchvision
from helpers import randomize_norm_stats
from torch import nn
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.models.resnet import Bottleneck as TvBottleneck
from torchvision.models.resnet import ResNet as TvResNet
from torchvision.ops import FrozenBatchNorm2d

import resnext_backbones as rb
import resnext_backbones.fused as fused_module
from resnext_backbones.fused import _ONEDNN as ONEDNN
from resnext_backbones.fused import FusedBlock, FusedConv2d, merge_groups, min_merge, pack_convolutions
from resnext_backbones.trunk import STAGE_BLOCKS


def torchvision_twin(name):
    """torchvision's model for a named spec (resnext26 has no torchvision builder, so use its ResNet class)."""
    if name == "resnext26_32x4d":
        return TvResNet(TvBottleneck, [2, 2, 2, 2], groups=32, width_per_group=4)
    return getattr(torchvision.models, name)()


def test_list_models_has_the_published_and_the_small_specs():
    names = rb.list_models()
    for name in ["resnet18", "resnet34", "resnet50", "resnet101", "resnext26_32x4d", "resnext50_32x4d",
                 "resnext101_32x4d", "resnext101_32x8d", "resnext101_64x4d", "resnext152_32x4d"]:
        assert name in names


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50", "resnext50_32x4d", "resnext101_32x8d",
                                  "resnext101_64x4d"])
def test_state_dict_has_torchvision_keys_and_shapes_minus_fc(name):
    ours = rb.resnext(name).state_dict()
    theirs = {k: v for k, v in getattr(torchvision.models, name)().state_dict().items() if not k.startswith("fc.")}
    assert list(ours) == list(theirs)
    assert all(ours[k].shape == theirs[k].shape for k in ours)


@pytest.mark.parametrize("name", ["resnet18", "resnext26_32x4d", "resnext50_32x4d"])
def test_features_equal_torchvision_layers_with_same_weights(name, images):
    tv = randomize_norm_stats(torchvision_twin(name)).eval()
    ours = rb.resnext(name).eval()
    ours.load_state_dict({k: v for k, v in tv.state_dict().items() if not k.startswith("fc.")})
    with torch.no_grad():
        feats = ours(images)
        x = tv.maxpool(tv.relu(tv.bn1(tv.conv1(images))))
        for key, layer in zip(["c2", "c3", "c4", "c5"], [tv.layer1, tv.layer2, tv.layer3, tv.layer4], strict=True):
            x = layer(x)
            torch.testing.assert_close(feats[key], x, rtol=1e-4, atol=1e-5)


def test_outputs_channels_and_strides_metadata(images):
    trunk = rb.resnext("resnext26_32x4d").eval()
    with torch.no_grad():
        feats = trunk(images)
    assert list(feats) == ["c2", "c3", "c4", "c5"]
    assert trunk.out_channels == {"c2": 256, "c3": 512, "c4": 1024, "c5": 2048}
    assert trunk.strides == {"c2": 4, "c3": 8, "c4": 16, "c5": 32}
    for key, f in feats.items():
        assert f.shape == (2, trunk.out_channels[key], 64 // trunk.strides[key], 64 // trunk.strides[key])


def test_two_layer_blocks_report_their_channels(images):
    trunk = rb.resnext("resnet18")
    assert trunk.out_channels == {"c2": 64, "c3": 128, "c4": 256, "c5": 512}


def test_channels_last_input_gives_the_same_values(images):
    trunk = randomize_norm_stats(rb.resnext("resnext26_32x4d")).eval()
    with torch.no_grad():
        ref = trunk(images)
        out = trunk.to(memory_format=torch.channels_last)(images.to(memory_format=torch.channels_last))
    for key in ref:
        assert out[key].is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(out[key], ref[key], rtol=1e-4, atol=1e-5)


def test_returned_features_subset_builds_no_later_stage(images):
    trunk = rb.resnext("resnet18", returned_features=("c4", "c3")).eval()
    assert list(trunk(images)) == ["c3", "c4"]
    assert trunk.out_channels == {"c3": 128, "c4": 256}
    assert [name for name, _ in trunk.named_children()] == ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2",
                                                            "layer3"]  # no placeholder for layer4


def test_forward_runs_every_built_stage_in_order(images):
    trunk = rb.resnext("resnet18", returned_features=("c2", "c4"))
    ran = []
    for name in ("layer1", "layer2", "layer3"):
        getattr(trunk, name).register_forward_hook(lambda module, args, out, name=name: ran.append(name))
    feats = trunk.eval()(images)
    assert ran == ["layer1", "layer2", "layer3"] and list(feats) == ["c2", "c4"]


@pytest.mark.parametrize("depth", sorted(STAGE_BLOCKS))
def test_every_depth_has_the_papers_layer_count(depth):
    cardinality, width = (32, 4) if STAGE_BLOCKS[depth][0] else (1, 64)
    trunk = rb.resnext(depth=depth, cardinality=cardinality, base_width=width)
    main_path_convs = [n for n, m in trunk.named_modules() if isinstance(m, nn.Conv2d) and "downsample" not in n]
    assert len(main_path_convs) + 1 == depth  # + the classifier's fc layer
    if cardinality > 1:
        assert trunk.layer1[0].conv2.groups == 32 and trunk.layer1[0].conv2.out_channels == 128


def test_any_cardinality_and_width_builds_and_runs(images):
    trunk = rb.resnext(depth=26, cardinality=8, base_width=2)
    assert trunk.layer1[0].conv2.groups == 8 and trunk.layer1[0].conv2.out_channels == 16
    assert trunk(images)["c5"].shape == (2, 2048, 2, 2)


@pytest.mark.parametrize("kwargs, message", [
    (dict(depth=20), "choose one of [18, 26, 34, 38, 50, 101, 152, 200]"),
    (dict(depth=18, cardinality=32, base_width=4), "grouping a two-layer block only makes it wider"),
    (dict(depth=50, cardinality=0), "cardinality=0 must be a positive integer"),
    (dict(name="resnext51_32x4d"), "known models: ['resnet18'"),
    (dict(name="resnext50_32x4d", cardinality=64), "conflicting arguments {'cardinality': 64}"),
    (dict(name="resnet18", norm="layer"), "choose one of ['bn', 'frozen_bn', 'sync_bn', 'gn']"),
    (dict(name="resnet18", trainable_stages=6), "must be an integer in 0..5"),
    (dict(name="resnet18", returned_features=("c6",)), "returned_features=('c6',) must be a non-empty subset of ('c2'"),
    (dict(name="resnet18", returned_features=()), "returned_features=() must be a non-empty subset of ('c2', 'c3'"),
])
def test_invalid_specs_raise_value_error_naming_allowed_values(kwargs, message):
    name = kwargs.pop("name", None)
    with pytest.raises(ValueError) as err:
        rb.resnext(name, **kwargs)
    assert message in str(err.value)


@pytest.mark.parametrize("norm, cls", [("bn", nn.BatchNorm2d), ("frozen_bn", FrozenBatchNorm2d),
                                       ("sync_bn", nn.SyncBatchNorm), ("gn", nn.GroupNorm)])
def test_norm_choice_sets_every_norm_layer(norm, cls):
    trunk = rb.resnext("resnext26_32x4d", norm=norm)
    norms = [m for m in trunk.modules() if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d, nn.SyncBatchNorm,
                                                           nn.GroupNorm))]
    assert len(norms) == 2 * 4 * 3 + 4 + 1  # 3 per block, 1 per downsample, 1 in the stem
    assert all(type(m) is cls for m in norms)


def test_group_norm_trunk_trains():
    """A GroupNorm trunk and a linear head fit 4 random images in a few Adam steps: the loss falls below a fifth,
    and every GroupNorm's affine parameters move (they are trained, not frozen)."""
    torch.manual_seed(0)
    trunk = rb.resnext("resnet18", norm="gn")
    head = nn.Linear(512, 2)
    images, labels = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(5)), torch.tensor([0, 1, 0, 1])
    norms = [m for m in trunk.modules() if isinstance(m, nn.GroupNorm)]
    before = [(m.weight.detach().clone(), m.bias.detach().clone()) for m in norms]
    optimizer = torch.optim.Adam([*trunk.parameters(), *head.parameters()], lr=1e-4)
    losses = []
    for _ in range(6):
        loss = F.cross_entropy(head(trunk(images)["c5"].mean((2, 3))), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.2 * losses[0], losses  # 0.75 -> 0.02 here
    assert len(norms) == 2 * 4 * 2 + 3 + 1  # 2 per basic block, 1 per downsample, 1 in the stem
    for m, (weight, bias) in zip(norms, before, strict=True):
        assert not torch.equal(m.weight, weight) and not torch.equal(m.bias, bias)


@pytest.mark.parametrize("stages", range(6))
def test_trainable_stages_freezes_exactly_what_torchvision_freezes(stages):
    ours = rb.resnext("resnet18", trainable_stages=stages)
    tv = _resnet_fpn_extractor(torchvision.models.resnet18(), stages)
    theirs = {n.removeprefix("body.") for n, p in tv.named_parameters() if p.requires_grad and n.startswith("body.")}
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == theirs


def test_frozen_batchnorm_stays_in_eval_mode_and_keeps_its_statistics(images):
    trunk = rb.resnext("resnet18", norm="bn", trainable_stages=2).train()
    assert not trunk.bn1.training and not trunk.layer2[0].bn1.training
    assert trunk.layer3[0].bn1.training and trunk.layer4[0].bn1.training
    frozen, live = trunk.layer1[0].bn1.running_mean.clone(), trunk.layer3[0].bn1.running_mean.clone()
    trunk(images)
    torch.testing.assert_close(trunk.layer1[0].bn1.running_mean, frozen)
    assert not torch.equal(trunk.layer3[0].bn1.running_mean, live)
    trunk.eval()
    assert not trunk.layer3[0].bn1.training


def test_zero_init_residual_zeroes_the_last_norm_of_each_block():
    trunk = rb.resnext("resnext26_32x4d", zero_init_residual=True)
    assert all(torch.all(b.bn3.weight == 0) for layer in [trunk.layer1, trunk.layer4] for b in layer)
    assert torch.all(trunk.bn1.weight == 1)


def channels_last(x):
    return x.to(memory_format=torch.channels_last)


def packed_convs(trunk):
    """Which convolutions hold a oneDNN-reordered weight, i.e. ran the fused CPU kernels."""
    return [bool(m._packed) for m in trunk.modules() if isinstance(m, FusedConv2d)]


@pytest.mark.parametrize("norm", ["bn", "frozen_bn"])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_fused_trunk_gives_the_same_features_in_the_layout_of_its_input(norm, memory_format, images):
    trunk = randomize_norm_stats(rb.resnext("resnext26_32x4d", norm=norm)).eval()
    x = images.to(memory_format=memory_format)
    before = x.clone()
    with torch.no_grad():
        ref = trunk(images)
        out = trunk.fuse()(x)
    assert not any(isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)) for m in trunk.modules())
    assert torch.equal(x, before)  # the in-place shortcut sums never reach the caller's tensor
    for key in ref:
        torch.testing.assert_close(out[key], ref[key], rtol=1e-4, atol=1e-4)
        assert out[key].is_contiguous(memory_format=memory_format)
    # channels_last runs oneDNN's fused kernels on weights reordered once; NCHW runs the plain aten ops
    fast = memory_format == torch.channels_last and ONEDNN
    assert all(packed_convs(trunk)) if fast else not any(packed_convs(trunk))


def test_fused_basic_block_trunk_gives_the_same_features(images):
    trunk = randomize_norm_stats(rb.resnext("resnet18")).eval()
    with torch.no_grad():
        ref, out = trunk(images), trunk.fuse()(channels_last(images))
    for key in ref:
        torch.testing.assert_close(out[key], ref[key], rtol=1e-4, atol=1e-4)


def test_fused_state_dict_is_the_trunks_convolutions_with_biases_and_no_norms():
    trunk = rb.resnext("resnext26_32x4d").eval()
    convs = [k[: -len(".weight")] for k, v in trunk.state_dict().items() if v.dim() == 4]
    assert set(trunk.fuse().state_dict()) == {f"{c}.{p}" for c in convs for p in ("weight", "bias")}
    assert set(trunk.fuse().state_dict()) == {f"{c}.{p}" for c in convs for p in ("weight", "bias")}  # idempotent


def test_fused_trunk_follows_new_input_shapes_and_reloaded_weights():
    first, second = (randomize_norm_stats(rb.resnext("resnext26_32x4d"), seed=s).eval() for s in (0, 1))
    fused = copy.deepcopy(first).fuse()
    small, tall = channels_last(torch.rand(2, 3, 64, 64)), channels_last(torch.rand(1, 3, 96, 64))
    with torch.no_grad():
        for x in (small, tall, small):  # each shape change reorders the weights for the new shape
            torch.testing.assert_close(fused(x)["c5"], first(x)["c5"], rtol=1e-4, atol=1e-4)
        fused.load_state_dict(copy.deepcopy(second).fuse().state_dict())  # in place: the reordered copies go stale
        for x in (small, tall):
            torch.testing.assert_close(fused(x)["c5"], second(x)["c5"], rtol=1e-4, atol=1e-4)


def test_fused_trunk_survives_deepcopy_pickle_and_dtype_changes(images):
    trunk = randomize_norm_stats(rb.resnext("resnext26_32x4d")).eval()
    fused = copy.deepcopy(trunk).fuse()
    x = channels_last(images)
    with torch.no_grad():
        ref = trunk(images)["c5"]
        fused(x)  # holds reordered weights now
        for twin in (copy.deepcopy(fused), pickle.loads(pickle.dumps(fused))):
            torch.testing.assert_close(twin(x)["c5"], ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(fused.double()(x.double())["c5"].float(), ref, rtol=1e-4, atol=1e-4)


def test_fused_trunk_gives_input_gradients_and_runs_under_autocast(images):
    torch.manual_seed(0)
    trunk = randomize_norm_stats(rb.resnext("resnext26_32x4d")).eval()
    fused = copy.deepcopy(trunk).fuse()
    grads = []
    for model in (trunk, fused):
        x = channels_last(images).requires_grad_(True)
        model(x)["c5"].sum().backward()
        grads.append(x.grad)
    # Forwards that differ by ~1e-6 flip a few ReLU and max-pool decisions at ties, which moves some gradient
    # locally (up to 8e-4 of its norm over 30 seeds); a wrong backward would be off by order 1.
    assert ((grads[1] - grads[0]).norm() / grads[0].norm()).item() < 1e-2
    # Under bf16 autocast the fused trunk is as close to the float32 features as torchvision's own model under the
    # same autocast (the reference: the same weights in torchvision's ResNet class): bf16 keeps 8 bits of mantissa,
    # ~0.4% relative per rounding, and both land at ~0.5% of the features' norm over 26 layers (fused 0.45%,
    # torchvision 0.47% on this input).
    tv = torchvision_twin("resnext26_32x4d")
    tv.load_state_dict(trunk.state_dict(), strict=False)  # all but its fc
    tv_trunk = nn.Sequential(*list(tv.children())[:-2]).eval()  # up to layer4: c5
    x = images[:1, :, :32, :32]
    with torch.no_grad():
        exact = trunk(x)["c5"]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, theirs = fused(channels_last(x))["c5"], tv_trunk(x)
    assert out.dtype == theirs.dtype == torch.bfloat16
    assert exact.abs().mean() > 0.1  # features of a size that a relative error means something for

    def error(y):
        return float((y.float() - exact).norm() / exact.norm())

    assert 1e-4 < error(theirs) < 1e-2  # bf16 really was computed, and this is what it costs
    assert error(out) < 2 * error(theirs)
    torch.testing.assert_close(out.float(), theirs.float(), rtol=0, atol=0.02 * float(exact.abs().max()))


def test_a_fused_block_called_alone_keeps_its_input():
    block = randomize_norm_stats(rb.resnext("resnext26_32x4d")).eval().layer1[1]
    assert block.downsample is None  # its shortcut is its input
    fused = FusedBlock(block)  # reuse_input=False: only the trunk, which owns the tensor, lets it be overwritten
    x = channels_last(torch.rand(1, 256, 8, 8))
    before = x.clone()
    with torch.no_grad():
        torch.testing.assert_close(fused(x), block(x), rtol=1e-4, atol=1e-4)
    assert torch.equal(x, before)


def test_fuse_refuses_training_mode_and_group_norm():
    with pytest.raises(RuntimeError, match=r"call \.eval\(\) first"):
        rb.resnext("resnet18").fuse()
    with pytest.raises(ValueError, match="GroupNorm's statistics depend on the input"):
        rb.resnext("resnet18", norm="gn").eval().fuse()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_frozen_batchnorm_with_zero_variance_stays_finite_in_half_precision(dtype):
    trunk = rb.resnext("resnet18", norm="frozen_bn")
    trunk.bn1.running_var.zero_()  # a channel that never varied in pretraining
    with torch.no_grad():
        out = trunk.bn1.to(dtype)(torch.randn(1, 64, 4, 4, dtype=dtype))
    assert torch.isfinite(out).all()


@pytest.mark.slow  # torch.compile: half a minute on 2 cores
def test_fused_trunk_compiles_to_one_graph_with_the_same_features(images):
    trunk = randomize_norm_stats(rb.resnext("resnet18", returned_features=("c2", "c3"))).eval().fuse()
    x = channels_last(images)
    with torch.no_grad():
        ref = trunk(x)  # oneDNN kernels in eager; under compile, the aten ops inductor fuses itself
        out = torch.compile(trunk, fullgraph=True)(x)
    for key in ref:
        torch.testing.assert_close(out[key], ref[key], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("norm", ["bn", "frozen_bn", "sync_bn"])
def test_fused_copy_gives_the_eval_features_and_leaves_the_trunk_as_it_is(norm, images):
    trunk = rb.resnext("resnext26_32x4d", norm=norm)  # training mode
    trunk.load_state_dict(randomize_norm_stats(rb.resnext("resnext26_32x4d")).state_dict())  # any norm's keys
    state = {k: v.clone() for k, v in trunk.state_dict().items()}
    fused = trunk.fused()
    assert trunk.training and not fused.training
    assert {k: v for k, v in trunk.state_dict().items() if not torch.equal(v, state[k])} == {}
    norms = (nn.modules.batchnorm._BatchNorm, FrozenBatchNorm2d)
    assert sum(isinstance(m, norms) for m in trunk.modules()) == 29  # 1 + 8 blocks x 3 + 4 shortcuts: still there
    with torch.no_grad():
        ref = copy.deepcopy(trunk).eval()(images)
        out = fused(channels_last(images))
    for key in ref:
        torch.testing.assert_close(out[key], ref[key], rtol=1e-4, atol=1e-4)
    assert all(packed_convs(fused)) == ONEDNN


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_fused_copy_runs_natively_close_to_float32(dtype, images):
    trunk = randomize_norm_stats(rb.resnext("resnext26_32x4d")).eval()
    fused = trunk.fused(dtype)
    assert {p.dtype for p in fused.parameters()} == {dtype}
    with torch.no_grad():
        ref = trunk(images)["c5"]
        out = fused(images.to(dtype, memory_format=torch.channels_last))["c5"]
    assert out.dtype == dtype
    assert ((out.float() - ref).norm() / ref.norm()).item() < 2e-2  # bf16: 8 bits of mantissa, ~4e-3 here
    native = {torch.bfloat16: torch.ops.mkldnn._is_mkldnn_bf16_supported,
              torch.float16: torch.ops.mkldnn._is_mkldnn_fp16_supported}[dtype]()
    assert all(packed_convs(fused)) == (ONEDNN and native)  # oneDNN's kernels on weights packed in that dtype


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_without_cpu_kernels_runs_the_plain_ops(dtype, monkeypatch, images):
    monkeypatch.setattr(fused_module, "_ONEDNN_DTYPES", (torch.float32,))  # a CPU without AVX-512 BF16/FP16
    trunk = randomize_norm_stats(rb.resnext("resnext26_32x4d")).eval()
    fused = trunk.fused(dtype)
    with torch.no_grad():
        ref = trunk(images)["c5"]
        out = fused(images.to(dtype, memory_format=torch.channels_last))["c5"]
    assert ((out.float() - ref).norm() / ref.norm()).item() < 2e-2
    assert not any(packed_convs(fused))  # F.conv2d, not oneDNN's kernels, which would refuse bf16 there


def test_merged_groups_are_the_same_convolution():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(16, 4, 3, 3, generator=g, dtype=torch.float64)  # 8 groups of 4 input, 2 output channels
    x = torch.randn(1, 32, 6, 6, generator=g, dtype=torch.float64)
    ref = F.conv2d(x, weight, groups=8)
    for merge in (2, 4, 8):
        merged = merge_groups(weight, 8, merge)
        assert merged.shape == (16, 4 * merge, 3, 3)
        assert torch.count_nonzero(merged) == weight.numel()  # the weights, and zeros between the joined groups
        torch.testing.assert_close(F.conv2d(x, merged, groups=8 // merge), ref)
    # 32x4d's first stage to groups of 32 channels; wide groups stay; as close as the groups allow
    assert [min_merge(32, 4, 32), min_merge(32, 64, 32), min_merge(2, 4, 32), min_merge(6, 4, 32)] == [8, 1, 2, 2]
    assert min_merge(32, 1, 32) == 1  # depthwise stays depthwise (slower joined)


def test_groups_are_joined_only_where_onednn_may_use_amx(monkeypatch):
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    monkeypatch.setattr(torch.cpu, "_is_amx_fp16_supported", lambda: False)
    expected = {"AVX512_CORE_BF16": {}, "AVX512_CORE_AMX": {torch.bfloat16: 32},
                "AVX10_1_512_AMX_FP16": {torch.bfloat16: 32}}
    for limit, widths in expected.items():
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", limit)
        assert fused_module.amx_group_widths() == widths, limit
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    monkeypatch.setattr(torch.cpu, "_is_amx_fp16_supported", lambda: True)
    assert fused_module.amx_group_widths() == {torch.bfloat16: 32, torch.float16: 32}
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_fp16_supported", lambda: False)
    assert fused_module.amx_group_widths() == {}


@pytest.mark.skipif(torch.bfloat16 not in fused_module._ONEDNN_DTYPES, reason="oneDNN has no bf16 kernels here")
def test_bf16_kernels_on_merged_groups_give_the_features_of_the_grouped_convolutions(monkeypatch, images):
    trunk = randomize_norm_stats(rb.resnext("resnext26_32x4d")).eval()
    x = images.to(torch.bfloat16, memory_format=torch.channels_last)
    out, groups = [], []
    for widths in ({}, {torch.bfloat16: 32}):  # as on CPUs without AMX, and as on those with it
        monkeypatch.setattr(fused_module, "_MIN_GROUP_WIDTH", widths)
        fused = trunk.fused(torch.bfloat16)
        with torch.no_grad():
            out.append(fused(x)["c5"].float())
        groups.append([next(iter(b.conv2._packed.values()))[1] for b in (fused.layer1[0], fused.layer4[0])])
    assert groups == [[32, 32], [4, 32]]  # 4-channel groups joined 8 by 8; 32-channel ones left as they are
    assert ((out[1] - out[0]).norm() / out[0].norm()).item() < 1e-2  # bf16 rounding apart


def test_fused_copy_refuses_group_norm():
    with pytest.raises(ValueError, match="GroupNorm's statistics depend on the input"):
        rb.resnext("resnet18", norm="gn").fused()


def test_packed_convolutions_give_the_same_values_with_a_weight_packed_per_input_shape():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Sequential(nn.Conv2d(16, 4, 1, bias=False)),
                          nn.Conv2d(4, 4, 3, padding="same"))
    packed = pack_convolutions(copy.deepcopy(plain))
    assert [type(m).__name__ for m in packed.modules() if "Conv" in type(m).__name__] == \
        ["FusedConv2d", "FusedConv2d", "Conv2d"]  # string padding is left to F.conv2d
    shapes = [(1, 8, 16, 16), (2, 8, 8, 12), (1, 8, 16, 16)]
    with torch.no_grad():
        for shape in shapes:
            x = channels_last(torch.rand(shape))
            torch.testing.assert_close(packed(x), plain(x), rtol=1e-4, atol=1e-5)
    first = packed[0]
    assert len(first._packed) == (2 if ONEDNN else 0)  # two shapes, the third call reused the first's weight
    FusedConv2d.PACKED_SHAPES, saved = 1, FusedConv2d.PACKED_SHAPES
    first._packed.clear()
    try:
        with torch.no_grad():
            for shape in shapes:
                packed(channels_last(torch.rand(shape)))
        assert len(first._packed) == (1 if ONEDNN else 0)  # the oldest shapes make room
    finally:
        FusedConv2d.PACKED_SHAPES = saved


@pytest.mark.parametrize("name, dilation", [
    ("resnext26_32x4d", (False, True, True)), ("resnext26_32x4d", (False, False, True)),
    pytest.param("resnext50_32x4d", (False, True, True), marks=pytest.mark.slow)])
def test_dilated_trunk_equals_torchvisions_with_the_same_flag_and_weights(name, dilation, images):
    """torchvision's ResNet class (resnext50_32x4d's builder; resnext26's blocks in its class) with
    ``replace_stride_with_dilation`` and our weights loaded: the same C2-C5 (and the strides its feature maps have),
    the same state dict keys; the fused copy computes the same."""
    if name == "resnext26_32x4d":
        tv = TvResNet(TvBottleneck, [2, 2, 2, 2], groups=32, width_per_group=4,
                      replace_stride_with_dilation=list(dilation))
    else:
        tv = torchvision.models.resnext50_32x4d(replace_stride_with_dilation=list(dilation))
    tv = randomize_norm_stats(tv).eval()
    ours = rb.resnext(name, replace_stride_with_dilation=dilation).eval()
    ours.load_state_dict({k: v for k, v in tv.state_dict().items() if not k.startswith("fc.")})  # strict
    images = images[:1, :, :48, :40]  # dilated grouped convolutions run the slow aten kernels: a small image
    with torch.no_grad():
        feats, fused = ours(images), ours.fused()(channels_last(images))
        x = tv.maxpool(tv.relu(tv.bn1(tv.conv1(images))))
        for key, layer in zip(["c2", "c3", "c4", "c5"], [tv.layer1, tv.layer2, tv.layer3, tv.layer4], strict=True):
            x = layer(x)
            assert x.abs().amax() > 0.1
            torch.testing.assert_close(feats[key], x, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(fused[key], x, rtol=1e-4, atol=1e-4)
            assert ours.strides[key] == images.shape[-2] // x.shape[-2]
    assert ours.strides == {"c2": 4, "c3": 8, "c4": 8 if dilation[1] else 16, "c5": 8 if dilation[1] else 16}


def test_dilation_is_refused_for_two_layer_blocks_and_a_wrong_length():
    with pytest.raises(ValueError, match="bottleneck blocks"):
        rb.resnext("resnet18", replace_stride_with_dilation=(False, True, True))
    with pytest.raises(ValueError, match="three bools"):
        rb.resnext("resnet50", replace_stride_with_dilation=(True, True))
