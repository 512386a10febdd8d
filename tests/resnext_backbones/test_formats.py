import hashlib
import pickle
import pickletools
import warnings
import zipfile

import numpy as np
import pytest
import torch
import torchvision
from helpers import randomize_norm_stats
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.models.resnet import Bottleneck as TvBottleneck
from torchvision.models.resnet import ResNet as TvResNet

import resnext_backbones as rb
from resnext_backbones import UnverifiedWeightsWarning, WeightsError
from resnext_backbones.convert import FORMATS, convert
from resnext_backbones.formats.detectron2 import to_detectron2

BN = ("weight", "bias", "running_mean", "running_var")
X26 = dict(depth=26, cardinality=4, base_width=4)  # a small grouped bottleneck trunk: 2 blocks per stage


def detectron2_names(blocks=(2, 2, 2, 2)):
    """torchvision name -> detectron2 name for a bottleneck trunk, written from detectron2's ResNet (``stem``,
    ``res2..res5``, ``convN`` with ``.norm``, ``shortcut`` with ``.norm``), not from the library's table."""
    names = {"conv1.weight": "stem.conv1.weight"} | {f"bn1.{t}": f"stem.conv1.norm.{t}" for t in BN}
    for stage, n in enumerate(blocks, start=1):
        for b in range(n):
            for k in (1, 2, 3):
                names[f"layer{stage}.{b}.conv{k}.weight"] = f"res{stage + 1}.{b}.conv{k}.weight"
                names |= {f"layer{stage}.{b}.bn{k}.{t}": f"res{stage + 1}.{b}.conv{k}.norm.{t}" for t in BN}
        names[f"layer{stage}.0.downsample.0.weight"] = f"res{stage + 1}.0.shortcut.weight"
        names |= {f"layer{stage}.0.downsample.1.{t}": f"res{stage + 1}.0.shortcut.norm.{t}" for t in BN}
    return names


def handwritten_detectron2_bottleneck(cardinality=4, base_width=4, blocks=(2, 2, 2, 2), seed=0):
    """A detectron2 ``model`` dict of numpy arrays for a ResNeXt of 2 bottleneck blocks per stage, shapes
    worked out from the paper (width = planes * base_width / 64 * cardinality, 3x3 grouped, 4x expansion)."""
    rng = np.random.default_rng(seed)

    def conv(cout, cin, k):
        return rng.standard_normal((cout, cin, k, k)).astype(np.float32)

    def norm(prefix, c):
        return {f"{prefix}.norm.weight": rng.uniform(0.5, 1.5, c).astype(np.float32),
                f"{prefix}.norm.bias": rng.normal(0, 0.1, c).astype(np.float32),
                f"{prefix}.norm.running_mean": rng.normal(0, 0.1, c).astype(np.float32),
                f"{prefix}.norm.running_var": rng.uniform(0.5, 1.5, c).astype(np.float32)}

    model = {"stem.conv1.weight": conv(64, 3, 7)} | norm("stem.conv1", 64)
    cin = 64
    for i, n in enumerate(blocks):
        planes = 64 * 2**i
        width, cout = planes * base_width // 64 * cardinality, planes * 4
        for b in range(n):
            res = f"res{i + 2}.{b}"
            model |= {f"{res}.conv1.weight": conv(width, cin, 1)} | norm(f"{res}.conv1", width)
            model |= {f"{res}.conv2.weight": conv(width, width // cardinality, 3)} | norm(f"{res}.conv2", width)
            model |= {f"{res}.conv3.weight": conv(cout, width, 1)} | norm(f"{res}.conv3", cout)
            if b == 0:
                model |= {f"{res}.shortcut.weight": conv(cout, cin, 1)} | norm(f"{res}.shortcut", cout)
            cin = cout
    return model


@pytest.fixture
def tv_resnet18():
    torch.manual_seed(0)
    return randomize_norm_stats(torchvision.models.resnet18()).eval()


def trunk_features(model, x):
    with torch.no_grad():
        return model.eval()(x)


def assert_trunk_equals_torchvision(trunk, tv):
    theirs = tv.state_dict()
    for key, value in trunk.state_dict().items():
        torch.testing.assert_close(value, theirs[key], msg=key)


@pytest.mark.parametrize("with_fc", [True, False])
def test_torchvision_state_dict_loads_and_reports_fc_as_ignored(tmp_path, tv_resnet18, with_fc, images):
    state = tv_resnet18.state_dict()
    if not with_fc:
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    torch.save(state, tmp_path / "resnet18.pth")
    trunk = rb.resnext("resnet18")
    report = rb.load_weights(trunk, tmp_path / "resnet18.pth")
    assert report.format == "torchvision" and report.ok
    assert report.ignored == (["fc.weight", "fc.bias"] if with_fc else [])
    assert len(report.loaded) == len([k for k in state if not k.startswith("fc.")])
    tv_c5 = torch.nn.Sequential(*list(tv_resnet18.children())[:-2])(images)
    torch.testing.assert_close(trunk_features(trunk, images)["c5"], tv_c5, rtol=1e-4, atol=1e-5)


def test_timm_safetensors_state_dict_loads(tmp_path, tv_resnet18):
    save_file(tv_resnet18.state_dict(), str(tmp_path / "model.safetensors"))  # timm's hub layout
    trunk = rb.resnext("resnet18", weights=str(tmp_path / "model.safetensors"))
    assert_trunk_equals_torchvision(trunk, tv_resnet18)


def test_mmdet_checkpoint_loads_backbone_and_ignores_heads(tmp_path, tv_resnet18):
    state = {"backbone." + k: v for k, v in tv_resnet18.state_dict().items() if not k.startswith("fc.")}
    state["neck.lateral_convs.0.conv.weight"] = torch.zeros(256, 64, 1, 1)
    torch.save({"meta": {"epoch": 12, "mmdet_version": "3.3.0"}, "state_dict": state}, tmp_path / "mmdet.pth")
    trunk = rb.resnext("resnet18")
    report = rb.load_weights(trunk, tmp_path / "mmdet.pth")
    assert report.format == "mmdet" and report.ignored == ["neck.lateral_convs.0.conv.weight"]
    assert "trunk found under prefix 'backbone.'" in report.converted
    assert_trunk_equals_torchvision(trunk, tv_resnet18)


def test_lightning_checkpoint_of_a_detector_loads_the_trunk(tmp_path, tv_resnet18):
    state = {"model.backbone.body." + k: v for k, v in tv_resnet18.state_dict().items() if not k.startswith("fc.")}
    torch.save({"state_dict": state, "pytorch-lightning_version": "2.6.6", "epoch": 3}, tmp_path / "last.ckpt")
    trunk = rb.resnext("resnet18")
    assert rb.load_weights(trunk, tmp_path / "last.ckpt").format == "lightning"
    assert_trunk_equals_torchvision(trunk, tv_resnet18)


@pytest.mark.parametrize("input_format", ["RGB", "BGR"])
def test_detectron2_pickle_round_trip_with_numpy_arrays(tmp_path, tv_resnet18, input_format):
    content = to_detectron2({k: v for k, v in tv_resnet18.state_dict().items() if not k.startswith("fc.")},
                            input_format=input_format)
    assert "res2.0.conv1.norm.running_var" in content["model"] and "stem.conv1.weight" in content["model"]
    assert "res3.0.shortcut.weight" in content["model"] and "res3.0.shortcut.norm.bias" in content["model"]
    assert all(type(v).__module__ == "numpy" for v in content["model"].values())
    with open(tmp_path / "r18.pkl", "wb") as f:
        pickle.dump(content, f)
    trunk = rb.resnext("resnet18", norm="frozen_bn")
    report = rb.load_weights(trunk, tmp_path / "r18.pkl")
    assert report.format == "detectron2" and report.ok
    assert any("BGR -> RGB" in note for note in report.converted) == (input_format == "BGR")
    assert_trunk_equals_torchvision(trunk, tv_resnet18)


def test_handwritten_detectron2_bottleneck_loads_with_names_mapped_and_the_stem_flipped_to_rgb(tmp_path):
    model = handwritten_detectron2_bottleneck()
    with open(tmp_path / "X-26.pkl", "wb") as f:  # detectron2's default INPUT.FORMAT, BGR, is not stated
        pickle.dump({"model": model, "__author__": "a detectron2 user", "stride_in_1x1": False}, f)
    trunk = rb.resnext(**X26)
    report = rb.load_weights(trunk, tmp_path / "X-26.pkl")
    assert report.format == "detectron2" and report.ok
    assert any("BGR -> RGB" in note for note in report.converted)
    names, ours = detectron2_names(), trunk.state_dict()
    assert set(names) == {k for k in ours if not k.endswith("num_batches_tracked")}
    stem = torch.from_numpy(model["stem.conv1.weight"])
    rgb = torch.stack([stem[:, 2], stem[:, 1], stem[:, 0]], dim=1)  # detectron2's input channel 0 is blue
    assert not torch.equal(rgb, stem)
    assert torch.equal(ours["conv1.weight"], rgb)
    for tv_name, d2_name in names.items():
        if tv_name != "conv1.weight":
            assert torch.equal(ours[tv_name], torch.from_numpy(model[d2_name])), (tv_name, d2_name)


def test_detectron2_training_checkpoint_with_prefix_loads(tmp_path, tv_resnet18):
    model = to_detectron2({k: v for k, v in tv_resnet18.state_dict().items() if not k.startswith("fc.")})["model"]
    model = {"backbone.bottom_up." + k: torch.from_numpy(v) for k, v in model.items()}
    torch.save({"model": model, "stride_in_1x1": False, "input_format": "RGB"}, tmp_path / "model_final.pth")
    trunk = rb.resnext("resnet18")
    assert rb.load_weights(trunk, tmp_path / "model_final.pth").format == "detectron2"
    assert_trunk_equals_torchvision(trunk, tv_resnet18)


def test_detectron2_stride_in_1x1_weights_are_refused(tmp_path, tv_resnet18):
    content = to_detectron2({k: v for k, v in tv_resnet18.state_dict().items() if not k.startswith("fc.")})
    content = {"model": content["model"], "__author__": "Detectron2 Model Zoo"}  # MSRA convention, not stated
    with open(tmp_path / "R-18.pkl", "wb") as f:
        pickle.dump(content, f)
    with pytest.raises(WeightsError, match="STRIDE_IN_1X1=True"):
        rb.resnext("resnet18", weights=str(tmp_path / "R-18.pkl"))


def test_caffe2_named_detectron2_file_is_refused_with_advice(tmp_path):
    import numpy as np

    with open(tmp_path / "R-50.pkl", "wb") as f:
        pickle.dump({"blobs": {"res2_0_branch2a_w": np.zeros(1)}}, f)
    with pytest.raises(WeightsError, match="no ResNet/ResNeXt trunk found"):
        rb.resnext("resnet50", weights=str(tmp_path / "R-50.pkl"))


def test_safetensors_backbone_round_trip_rebuilds_the_trunk_without_a_name(tmp_path, images):
    trunk = randomize_norm_stats(rb.resnext(depth=26, cardinality=8, base_width=4)).eval()
    rb.save_backbone(trunk, tmp_path / "trunk.safetensors")
    again = rb.load_backbone(tmp_path / "trunk.safetensors").eval()
    assert again.spec == trunk.spec == rb.ResNeXtSpec(26, 8, 4)
    for key, value in trunk_features(trunk, images).items():
        torch.testing.assert_close(trunk_features(again, images)[key], value)


def test_tampered_safetensors_fails_its_sha256(tmp_path):
    from safetensors import safe_open

    path = tmp_path / "trunk.safetensors"
    rb.save_backbone(rb.resnext("resnet18"), path)
    with safe_open(str(path), framework="pt") as f:
        meta, state = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    state["conv1.weight"][0, 0, 0, 0] += 1
    save_file(state, str(path), metadata=meta)
    with pytest.raises(WeightsError, match="do not match the sha256"):
        rb.load_backbone(path)


def test_load_backbone_refuses_a_file_without_spec(tmp_path):
    save_file({"conv1.weight": torch.zeros(64, 3, 7, 7)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(WeightsError, match="was not written by save_backbone"):
        rb.load_backbone(tmp_path / "x.safetensors")


def test_mismatched_spec_fails_naming_keys_and_shapes_and_non_strict_loads_what_fits(tmp_path):
    rb.save_backbone(rb.resnext(depth=26, cardinality=8, base_width=8), tmp_path / "8x8d.safetensors")
    target = rb.resnext(depth=26, cardinality=8, base_width=4)
    with pytest.raises(WeightsError) as err:
        rb.load_weights(target, tmp_path / "8x8d.safetensors")
    assert "layer1.0.conv1.weight: file (64, 64, 1, 1) vs model (32, 64, 1, 1)" in str(err.value)
    report = rb.load_weights(target, tmp_path / "8x8d.safetensors", strict=False)
    assert "conv1.weight" in report.loaded and report.mismatched and not report.ok


def test_big_c5_into_small_spec_is_refused(tmp_path):
    torch.save(torchvision.models.resnet50().state_dict(), tmp_path / "r50.pth")
    expected = r"layer1\.0\.conv1\.weight: file \(64, 64, 1, 1\) vs model \(64, 64, 3, 3\)"
    with pytest.raises(WeightsError, match=expected):
        rb.resnext("resnet18", weights=str(tmp_path / "r50.pth"))


def test_fpn_takes_a_trunk_file_or_a_whole_backbone_with_fpn(tmp_path, tv_resnet18, images):
    torch.save(tv_resnet18.state_dict(), tmp_path / "r18.pth")
    fpn = rb.resnext_fpn("resnet18", weights=str(tmp_path / "r18.pth"))
    assert_trunk_equals_torchvision(fpn.body, tv_resnet18)
    tv_fpn = randomize_norm_stats(resnet_fpn_backbone(backbone_name="resnet18", weights=None)).eval()
    detector = {"backbone." + k: v for k, v in tv_fpn.state_dict().items()} | {"roi_heads.x": torch.zeros(1)}
    torch.save({"model": detector}, tmp_path / "detector.pth")
    fpn = rb.resnext_fpn("resnet18")
    report = rb.load_weights(fpn, tmp_path / "detector.pth")
    assert report.ok and report.ignored == ["roi_heads.x"] and len(report.loaded) == len(tv_fpn.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fpn.eval()(images)["pool"], tv_fpn(images)["pool"])


class _WritesAFile:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def pickle_globals(path):
    """The globals a pickle (plain, or the data.pkl inside a torch zip checkpoint) would import to load."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            data = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    else:
        data = path.read_bytes()
    found, strings = [], []
    for op, arg, _ in pickletools.genops(data):
        if op.name == "GLOBAL":
            found.append(arg.replace(" ", "."))
        elif op.name == "STACK_GLOBAL":
            found.append(".".join(strings[-2:]))
        elif isinstance(arg, str):
            strings.append(arg)
    return found


@pytest.mark.parametrize("kind", ["torch", "pickle"])
def test_a_pickle_that_would_run_code_is_refused_and_runs_nothing(tmp_path, kind):
    victim, bad = tmp_path / "pwned.txt", tmp_path / f"bad.{kind}"
    payload = {"conv1.weight": [[0.0, 1.0]], "evil": _WritesAFile(str(victim))}  # plain data beside the payload
    if kind == "torch":
        torch.save(payload, bad)
    else:
        with open(bad, "wb") as f:
            pickle.dump(payload, f)
    assert pickle_globals(bad) == ["io.open"]  # the malicious global is the only reason to refuse it
    victim.unlink(missing_ok=True)
    with pytest.raises(WeightsError, match="refusing to load .* could run code"):
        rb.load_weights(rb.resnext("resnet18"), bad)
    assert not victim.exists()


def test_missing_file_is_named():
    with pytest.raises(WeightsError, match="weights file 'nowhere.pth' does not exist"):
        rb.resnext("resnet18", weights="nowhere.pth")


def test_report_reads_well(tmp_path, tv_resnet18):
    torch.save(tv_resnet18.state_dict(), tmp_path / "r18.pth")
    text = str(rb.load_weights(rb.resnext("resnet18"), tmp_path / "r18.pth"))
    assert text.startswith(f"loaded {len(tv_resnet18.state_dict()) - 2} tensors from")
    assert "ignored (2): fc.weight, fc.bias" in text


# ------------------------------------------------------------------------------- digests and our safetensors

def strip_sha256_entry(path):
    with safe_open(str(path), framework="pt") as f:
        meta, state = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    del meta["sha256"]
    save_file(state, str(path), metadata=meta)


def test_our_safetensors_without_its_sha256_loads_with_a_warning_that_points_at_expected_sha256(tmp_path, images):
    trunk = randomize_norm_stats(rb.resnext("resnet18")).eval()
    path = tmp_path / "trunk.safetensors"
    rb.save_backbone(trunk, path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # with the entry: verified, silent
        rb.load_backbone(path)
    strip_sha256_entry(path)
    with pytest.warns(UnverifiedWeightsWarning, match="unverified.*expected_sha256="):
        again = rb.load_backbone(path).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(images)["c5"], trunk(images)["c5"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the caller pinned the file's digest: that is the verification
        rb.load_backbone(path, expected_sha256=hashlib.sha256(path.read_bytes()).hexdigest())
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnverifiedWeightsWarning)  # how a caller turns the warning into a refusal
        with pytest.raises(UnverifiedWeightsWarning):
            rb.resnext("resnet18", weights=str(path))


LOADERS = {
    "load_weights": lambda path, digest: rb.load_weights(rb.resnext("resnet18"), path, expected_sha256=digest),
    "resnext": lambda path, digest: rb.resnext("resnet18", weights=path, expected_sha256=digest),
    "resnext_fpn": lambda path, digest: rb.resnext_fpn("resnet18", weights=path, expected_sha256=digest),
    "load_backbone": lambda path, digest: rb.load_backbone(path, expected_sha256=digest),
}


@pytest.mark.parametrize("loader", LOADERS)
def test_expected_sha256_accepts_the_files_digest_or_a_prefix_and_refuses_another(tmp_path, loader):
    path = tmp_path / "trunk.safetensors"
    rb.save_backbone(randomize_norm_stats(rb.resnext("resnet18")), path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    for pinned in (digest, digest[:8], digest[:12].upper()):
        LOADERS[loader](path, pinned)
    wrong = digest[:-1] + ("0" if digest[-1] != "0" else "1")
    with pytest.raises(WeightsError) as err:
        LOADERS[loader](path, wrong)
    assert str(path) in str(err.value) and wrong in str(err.value) and digest in str(err.value)


def test_expected_sha256_is_checked_before_the_file_is_parsed(tmp_path):
    path = tmp_path / "not_weights.pth"
    path.write_bytes(b"not a weight file at all")
    with pytest.raises(WeightsError, match="is not the file you pinned"):
        rb.resnext("resnet18", weights=str(path), expected_sha256="0" * 64)


@pytest.mark.parametrize("digest, message", [("abc1234", "at least 8"), ("xyz" * 4, "hex"), ("0" * 65, "64 hex")])
def test_expected_sha256_that_is_not_a_digest_is_a_value_error(tmp_path, digest, message):
    torch.save(rb.resnext("resnet18").state_dict(), tmp_path / "r18.pth")
    with pytest.raises(ValueError, match=message):
        rb.resnext("resnet18", weights=str(tmp_path / "r18.pth"), expected_sha256=digest)


def test_expected_sha256_needs_a_file():
    with pytest.raises(ValueError, match="give weights="):
        rb.resnext("resnet18", expected_sha256="0" * 64)
    with pytest.raises(ValueError, match="pass the file's path"):
        rb.load_weights(rb.resnext("resnet18"), rb.resnext("resnet18").state_dict(), expected_sha256="0" * 64)


def test_file_sha256_is_the_sha256_of_the_bytes(tmp_path):
    (tmp_path / "x").write_bytes(b"abc")
    assert rb.file_sha256(tmp_path / "x") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_backbone_metadata_reads_the_header_and_no_tensor(tmp_path, monkeypatch):
    from resnext_backbones.formats import safetensors as ours

    path = tmp_path / "trunk.safetensors"
    rb.save_backbone(rb.resnext(**X26, returned_features=("c2", "c3"), norm="frozen_bn"), path)
    opened, real_safe_open = [], ours.safe_open

    class HeaderOnly:
        def __init__(self, *args, **kwargs):
            self.file = real_safe_open(*args, **kwargs)
            opened.append(self)

        def __enter__(self):
            self.file.__enter__()
            return self

        def __exit__(self, *exc):
            return self.file.__exit__(*exc)

        def metadata(self):
            return self.file.metadata()

        def __getattr__(self, name):  # keys(), get_tensor(), get_slice(), ...
            raise AssertionError(f"backbone_metadata used safe_open(...).{name}(): it reads tensors")

    def no_full_read(*args, **kwargs):
        raise AssertionError("backbone_metadata read the whole file")

    monkeypatch.setattr(ours, "safe_open", HeaderOnly)
    monkeypatch.setattr("resnext_backbones.files.read_file", no_full_read)
    monkeypatch.setattr(ours, "read_file", no_full_read, raising=False)
    meta = rb.backbone_metadata(path)
    assert opened and meta["spec"] == rb.ResNeXtSpec(26, 4, 4) and meta["norm"] == "frozen_bn"
    assert meta["returned_features"] == ("c2", "c3") and meta["mean"] == rb.IMAGENET_MEAN


# ------------------------------------------------------------------------------------------------- exports

def torchvision_x26():
    return TvResNet(TvBottleneck, [2, 2, 2, 2], groups=4, width_per_group=4)


def read_back_in_the_targets_own_terms(fmt, path):
    """A torchvision-named state dict from an export, read as the target ecosystem reads it (its own loader,
    its own names): no code of this library is involved, except to rebuild our own safetensors."""
    if fmt == "safetensors":
        return rb.load_backbone(path).state_dict()
    if fmt == "torchvision":
        return torch.load(path, weights_only=True)
    if fmt == "timm":
        return load_file(str(path))
    if fmt == "mmdet":
        return {k.removeprefix("backbone."): v for k, v in torch.load(path, weights_only=True)["state_dict"].items()}
    with open(path, "rb") as f:
        d2 = pickle.load(f)
    assert d2["stride_in_1x1"] is False and d2["input_format"] == "RGB"
    return {tv: torch.from_numpy(d2["model"][name]) for tv, name in detectron2_names().items()}


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_export_holds_the_trunks_values_and_loads_back(tmp_path, fmt, images):
    source = randomize_norm_stats(rb.resnext(**X26)).eval()
    out = convert(source.state_dict(), tmp_path / f"x26.{fmt}", fmt)
    tv = torchvision_x26().eval()
    missing, unexpected = tv.load_state_dict(read_back_in_the_targets_own_terms(fmt, out), strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and not unexpected
    with torch.no_grad():
        torch.testing.assert_close(torch.nn.Sequential(*list(tv.children())[:-2])(images), source(images)["c5"])
    again = rb.resnext(**X26).eval()
    assert rb.load_weights(again, out).ok
    for key, value in source.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(again.state_dict()[key], value), key
