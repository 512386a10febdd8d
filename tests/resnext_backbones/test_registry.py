"""Named weights: a registry you can trust, a cache that works offline, one download per machine."""

import hashlib
import json
import re
import subprocess
import sys
import textwrap
import urllib.parse

import pytest
import torch
import torchvision
from helpers import REPO, randomize_norm_stats

import resnext_backbones as rb
from resnext_backbones import registry

# The digests torchvision puts in its file names, as the issue and torchvision's resnet.py give them.
TORCHVISION_PREFIXES = {"resnext50_32x4d.tv_in1k": "7cdf4587", "resnext50_32x4d.tv2_in1k": "1a0047aa",
                        "resnext101_32x8d.tv_in1k": "8ba56ff5", "resnext101_32x8d.tv2_in1k": "110c445d",
                        "resnext101_64x4d.tv_in1k": "173b62eb"}

# torchvision's published table, written out here (not read from the registry): the "Classification" table of
# https://pytorch.org/vision/stable/models.html (Acc@1, e.g. ResNeXt50_32X4D_Weights.IMAGENET1K_V1 77.618) and
# torchvision/models/resnet.py (url with its digest prefix, ImageClassification(crop_size=224, resize_size=...)).
# name: (torchvision enum, file name, acc@1, resize, crop); all under torchvision's BSD-3-Clause (timm's label).
TORCHVISION_TABLE = {
    "resnext50_32x4d.tv_in1k": ("ResNeXt50_32X4D_Weights.IMAGENET1K_V1", "resnext50_32x4d-7cdf4587.pth", 77.618,
                                256, 224),
    "resnext50_32x4d.tv2_in1k": ("ResNeXt50_32X4D_Weights.IMAGENET1K_V2", "resnext50_32x4d-1a0047aa.pth", 81.198,
                                 232, 224),
    "resnext101_32x8d.tv_in1k": ("ResNeXt101_32X8D_Weights.IMAGENET1K_V1", "resnext101_32x8d-8ba56ff5.pth", 79.312,
                                 256, 224),
    "resnext101_32x8d.tv2_in1k": ("ResNeXt101_32X8D_Weights.IMAGENET1K_V2", "resnext101_32x8d-110c445d.pth",
                                  82.834, 232, 224),
    "resnext101_64x4d.tv_in1k": ("ResNeXt101_64X4D_Weights.IMAGENET1K_V1", "resnext101_64x4d-173b62eb.pth",
                                 83.246, 232, 224),
    "resnet50.tv_in1k": ("ResNet50_Weights.IMAGENET1K_V1", "resnet50-0676ba61.pth", 76.130, 256, 224),
    "resnet50.tv2_in1k": ("ResNet50_Weights.IMAGENET1K_V2", "resnet50-11ad3fa6.pth", 80.858, 232, 224),
    "resnet101.tv_in1k": ("ResNet101_Weights.IMAGENET1K_V1", "resnet101-63fe2227.pth", 77.374, 256, 224),
    "resnet101.tv2_in1k": ("ResNet101_Weights.IMAGENET1K_V2", "resnet101-cd907fc2.pth", 81.886, 232, 224),
}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("RESNEXT_BACKBONES_CACHE", str(folder))
    monkeypatch.delenv("RESNEXT_BACKBONES_OFFLINE", raising=False)
    return folder


@pytest.fixture
def published(tmp_path):
    """A torchvision resnet18 state dict 'published' at a file:// URL, registered by name with its sha256."""
    torch.manual_seed(0)
    tv = randomize_norm_stats(torchvision.models.resnet18())
    path = tmp_path / "server" / "r18.pth"
    path.parent.mkdir()
    torch.save(tv.state_dict(), path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    name = f"resnet18.test_{digest[:6]}"
    rb.register_weights(name, url=path.as_uri(), sha256=digest, license="bsd-3-clause", top1=1.0)
    yield name, path, digest
    registry._registry.pop(name, None)


def test_every_url_is_well_formed_and_torchvision_urls_carry_the_recorded_digest_prefix():
    names = rb.list_weights()
    assert set(TORCHVISION_PREFIXES) <= set(names)
    for name in names:
        info = rb.weights_info(name)
        url = urllib.parse.urlparse(info["url"])
        assert url.scheme == "https" and url.netloc and re.search(r"\.(pth|safetensors|pkl)$", url.path), name
        assert name.split(".")[0] in rb.list_models() and info["license"] and info["source"], name
        if info["source"] == "torchvision":
            assert re.search(r"-([0-9a-f]{8})\.pth$", url.path)[1] == info["sha256"], name
    for name, prefix in TORCHVISION_PREFIXES.items():
        assert rb.weights_info(name)["sha256"] == prefix


def test_the_torchvision_entries_hold_torchvisions_published_url_digest_top1_transforms_and_licence():
    """Each torchvision entry against the published table above and against the installed torchvision's own
    ``*_Weights`` enum (an independent copy of the same facts): url, digest prefix, acc@1, resize and crop."""
    registered = {name for name in rb.list_weights() if rb.weights_info(name)["source"] == "torchvision"}
    assert registered == set(TORCHVISION_TABLE)
    for name, (enum, file, top1, resize, crop) in TORCHVISION_TABLE.items():
        info = rb.weights_info(name)
        assert info["url"] == f"https://download.pytorch.org/models/{file}", name
        assert info["sha256"] == file.rsplit("-", 1)[1].removesuffix(".pth"), name
        assert (info["top1"], info["resize"], info["crop"], info["license"]) == \
            (top1, resize, crop, "bsd-3-clause"), name
        group, member = enum.split(".")
        theirs = getattr(getattr(torchvision.models, group), member)
        transforms = theirs.transforms()
        assert (theirs.url, theirs.meta["_metrics"]["ImageNet-1K"]["acc@1"], transforms.resize_size,
                transforms.crop_size) == (info["url"], info["top1"], [info["resize"]], [info["crop"]]), name


def test_non_commercial_weights_say_so_and_are_never_the_default():
    for name in ["resnext50_32x4d.fb_swsl_ig1b_ft_in1k", "resnext101_32x8d.fb_ssl_yfcc100m_ft_in1k"]:
        assert rb.weights_info(name)["license"] == "cc-by-nc-4.0"
    # fb_swsl (82.16, non-commercial) beats a1h (82.02, Apache-2.0) on top-1: DEFAULT must still be a1h
    assert registry.get_entry("DEFAULT", "resnext50_32x4d").name == "resnext50_32x4d.a1h_in1k"
    assert registry.get_entry("DEFAULT", "resnext101_32x8d").name == "resnext101_32x8d.tv2_in1k"


def test_detectron2_entry_is_bgr_on_0_255_and_normalises_as_torchvision_once_flipped():
    info = rb.weights_info("resnext101_32x8d.d2_in1k")
    assert info["input_format"] == "BGR" and info["pixel_range"] == 255
    rgb = info["normalization_rgb01"]
    torch.testing.assert_close(torch.tensor(rgb["mean"]), torch.tensor([0.485, 0.456, 0.406]), atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.tensor(rgb["std"]), torch.tensor([0.229, 0.224, 0.225]), atol=1e-6, rtol=0)


def test_unknown_names_fail_listing_the_close_ones():
    with pytest.raises(ValueError, match=r"'tv3_in1k' are neither a file nor a registered name for 'resnext50_32x4d'"
                                         r"; did you mean \[.*'resnext50_32x4d.tv2_in1k'"):
        rb.resnext("resnext50_32x4d", weights="tv3_in1k")
    with pytest.raises(ValueError, match=r"are for 'resnext50_32x4d', not 'resnet50'"):
        rb.resnext("resnet50", weights="resnext50_32x4d.tv2_in1k")


def test_load_by_name_equals_loading_the_file_and_fills_the_cache(cache, published, images):
    name, path, digest = published
    by_name = rb.resnext(weights=name).eval()  # the model comes from the name
    by_file = rb.resnext("resnet18", weights=str(path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(by_name(images)["c5"], by_file(images)["c5"], rtol=0, atol=0)
    cached = cache / name / "r18.pth"
    assert cached.is_file() and hashlib.sha256(cached.read_bytes()).hexdigest() == digest
    tag = name.split(".")[1]
    assert torch.equal(rb.resnext("resnet18", weights=tag).conv1.weight, by_file.conv1.weight)


def test_the_cache_is_used_without_the_source_and_offline(cache, published, monkeypatch):
    name, path, _ = published
    first = rb.resnext(weights=name)
    path.unlink()  # the server is gone
    monkeypatch.setenv("RESNEXT_BACKBONES_OFFLINE", "1")
    assert torch.equal(rb.resnext(weights=name).conv1.weight, first.conv1.weight)


def test_a_tampered_download_is_refused_and_leaves_nothing_in_the_cache(cache, published):
    name, path, digest = published
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in a tensor
    path.write_bytes(bytes(data))
    with pytest.raises(rb.WeightsError) as error:
        rb.resnext(weights=name)
    message = str(error.value)
    assert path.as_uri() in message and digest in message
    assert hashlib.sha256(path.read_bytes()).hexdigest() in message
    assert not any(p.is_file() and not p.name.endswith(".lock") for p in cache.rglob("*"))


def test_the_cached_file_is_verified_again_at_each_use(cache, published):
    """A file in the cache that no longer has the pinned digest (disk corruption, a hand-copied file) is refused
    at the next load, naming the cached file and both digests, though the server still has the good file."""
    name, path, digest = published
    rb.resnext(weights=name)  # downloaded and cached
    cached = cache / name / "r18.pth"
    data = bytearray(cached.read_bytes())
    data[len(data) // 2] ^= 0xFF
    cached.write_bytes(bytes(data))
    with pytest.raises(rb.WeightsError) as error:
        rb.resnext(weights=name)
    message = str(error.value)
    assert str(cached) in message and digest in message and "delete it to download again" in message
    assert hashlib.sha256(bytes(data)).hexdigest() in message


def test_weights_without_a_published_digest_need_expected_sha256(cache, published, monkeypatch):
    """An entry with no sha256 (as detectron2's ImageNet trunk) is not downloaded unverified: the error says to pass
    expected_sha256; with the right one it loads the served file, with a wrong one it is refused."""
    _, path, digest = published
    rb.register_weights("resnet18.no_digest", url=path.as_uri(), sha256=None)
    try:
        with pytest.raises(rb.WeightsError, match=r"no sha256 is published for .*r18.pth.*expected_sha256="):
            rb.resnext(weights="resnet18.no_digest")
        assert not (cache / "resnet18.no_digest" / "r18.pth").exists()  # nothing unverified was kept
        with pytest.raises(rb.WeightsError, match=f"expected sha256 {'0' * 64}, got {digest}"):
            rb.resnext(weights="resnet18.no_digest", expected_sha256="0" * 64)
        loaded = rb.resnext(weights="resnet18.no_digest", expected_sha256=digest)
        served = torch.load(path, weights_only=True)
        assert torch.equal(loaded.layer3[0].bn1.running_mean, served["layer3.0.bn1.running_mean"])
        assert served["layer3.0.bn1.running_mean"].abs().max() > 0  # randomised, not the zero default
    finally:
        registry._registry.pop("resnet18.no_digest", None)
    assert rb.weights_info("resnext101_32x8d.d2_in1k")["sha256"] is None  # the built-in entry this is about


def test_offline_without_the_file_names_the_url_and_the_path_to_put_it_at(cache, published, monkeypatch):
    name, path, _ = published
    monkeypatch.setenv("RESNEXT_BACKBONES_OFFLINE", "1")
    with pytest.raises(rb.WeightsError) as error:
        rb.resnext(weights=name)
    message = str(error.value)
    assert "RESNEXT_BACKBONES_OFFLINE" in message and path.as_uri() in message
    assert str(cache / name / "r18.pth") in message


def test_no_network_names_the_url_and_the_path_to_put_it_at(cache, tmp_path):
    url = (tmp_path / "nowhere" / "x.pth").as_uri()
    rb.register_weights("resnet18.unreachable", url=url, sha256="0" * 64)
    try:
        with pytest.raises(rb.WeightsError, match=re.escape(str(cache / "resnet18.unreachable" / "x.pth"))):
            rb.resnext(weights="resnet18.unreachable")
    finally:
        registry._registry.pop("resnet18.unreachable")


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_a_registry_file_adds_entries(cache, published, tmp_path, monkeypatch, suffix):
    import yaml

    _, path, digest = published
    entries = {"resnet18.team_coco": {"url": path.as_uri(), "sha256": digest[:8], "license": "proprietary",
                                      "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}
    dump = json.dumps if suffix == ".json" else yaml.safe_dump
    (tmp_path / f"registry{suffix}").write_text(dump(entries))
    monkeypatch.setenv("RESNEXT_BACKBONES_REGISTRY", str(tmp_path / f"registry{suffix}"))
    try:
        assert "resnet18.team_coco" in rb.list_weights("resnet18")
        assert rb.weights_info("resnet18.team_coco")["mean"] == (0.5, 0.5, 0.5)
        loaded = rb.resnext(weights="resnet18.team_coco").state_dict()
        served = torch.load(path, weights_only=True)  # the file at the entry's url
        assert len(loaded) >= 100 and set(loaded) <= set(served)
        for key, value in loaded.items():
            assert torch.equal(value, served[key]), key
        assert served["layer4.1.bn2.running_var"].std() > 0.1  # randomised statistics: a default init would differ
    finally:
        registry._registry.pop("resnet18.team_coco", None)


@pytest.mark.parametrize("kwargs, message", [
    ({"name": "resnet18", "url": "https://x/y.pth", "sha256": "0" * 64}, "must be '<model>.<tag>'"),
    ({"name": "resnet19.x", "url": "https://x/y.pth", "sha256": "0" * 64}, "'resnet19' is not a model"),
    ({"name": "resnet18.x", "url": "ftp://x/y.pth", "sha256": "0" * 64}, "must be https://"),
    ({"name": "resnet18.x", "url": "https://x/y.pth", "sha256": "abc"}, "sha256='abc' must be the file's sha256"),
    ({"name": "resnet50.tv_in1k", "url": "https://x/y.pth", "sha256": "0" * 64}, "already registered"),
])
def test_register_weights_refuses_bad_entries_naming_the_field(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        rb.register_weights(**kwargs)


def test_two_processes_download_once(cache, published, tmp_path):
    """As DDP ranks on one machine: both ask at the same moment, one downloads, the other waits for the file."""
    name, path, digest = published
    script = textwrap.dedent(f"""
        import sys, time, torch.hub
        import resnext_backbones as rb
        from resnext_backbones import registry
        rb.register_weights({name!r}, url={path.as_uri()!r}, sha256={digest!r})
        real = torch.hub.download_url_to_file
        def slow(*args, **kwargs):
            open({str(tmp_path / "downloads.log")!r}, "a").write("x")
            time.sleep(1.0)  # both processes are inside fetch while the first downloads
            return real(*args, **kwargs)
        torch.hub.download_url_to_file = slow
        print("ready", flush=True)
        sys.stdin.readline()  # start together
        print(registry.fetch(registry.get_entry({name!r})))
    """)
    env = {**__import__("os").environ, "RESNEXT_BACKBONES_CACHE": str(cache)}
    procs = [subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    for p in procs:  # both have imported everything before either starts
        assert p.stdout.readline() == "ready\n", p.stderr.read()[-2000:]
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    assert (tmp_path / "downloads.log").read_text() == "x"
    assert outs[0][0] == outs[1][0] == f"{cache / name / 'r18.pth'}\n"


def test_torch_hub_takes_a_weights_name(cache, published):
    name, path, _ = published
    trunk = torch.hub.load(str(REPO), "resnet18", source="local", weights=name.split(".")[1])
    assert torch.equal(trunk.conv1.weight, rb.resnext("resnet18", weights=str(path)).conv1.weight)


def test_yaml_weights_by_name_for_both_tasks(cache, published, tmp_path, monkeypatch, tiny_folder, tiny_coco):
    from tasks.cli import cli

    name, path, digest = published
    (tmp_path / "registry.json").write_text(json.dumps({name: {"url": path.as_uri(), "sha256": digest}}))
    monkeypatch.setenv("RESNEXT_BACKBONES_REGISTRY", str(tmp_path / "registry.json"))
    expected = rb.resnext("resnet18", weights=str(path)).conv1.weight
    common = ["--model.init_args.backbone", "resnet18", "--model.init_args.weights", name,
              "--trainer.default_root_dir", str(tmp_path), "--data.init_args.num_workers", "0"]
    data = {"classification": [f"--data.init_args.{k}={v}" for k, v in tiny_folder.items()],
            "detection": [f"--data.init_args.{k}={v}" for k, v in tiny_coco.items()]}
    for config, trunk in [("classification", lambda m: m.trunk), ("detection", lambda m: m.model.backbone.body)]:
        model = cli(["--config", str(REPO / f"configs/{config}.yaml"), *common, *data[config]], run=False).model
        assert torch.equal(trunk(model).conv1.weight, expected), config


def _trunk_with_own_normalization(tmp_path):
    """One trunk in two conventions: detectron2's (BGR stem, 0-255 means, the convention in a registry entry, not
    in the file) and torchvision's (RGB stem, [0, 1] means, in our safetensors' metadata)."""
    from resnext_backbones.formats.detectron2 import to_detectron2

    torch.manual_seed(1)
    trunk = randomize_norm_stats(rb.resnext("resnet18")).eval()
    mean_bgr255, std_bgr255 = (30.0, 60.0, 90.0), (20.0, 40.0, 60.0)  # deliberately not ImageNet's
    d2 = to_detectron2(trunk.state_dict(), input_format="BGR")["model"]  # a bare d2 file: names and arrays only
    with open(tmp_path / "r18_bgr.pkl", "wb") as f:
        __import__("pickle").dump({"model": d2}, f)
    rb.register_weights("resnet18.d2_test", url=(tmp_path / "r18_bgr.pkl").as_uri(),
                        sha256=hashlib.sha256((tmp_path / "r18_bgr.pkl").read_bytes()).hexdigest(),
                        source="detectron2", mean=mean_bgr255, std=std_bgr255, input_format="BGR",
                        pixel_range=255.0, file_hints={"stride_in_1x1": False, "input_format": "BGR"})
    mean, std = [m / 255 for m in reversed(mean_bgr255)], [s / 255 for s in reversed(std_bgr255)]
    rb.save_backbone(trunk, tmp_path / "r18_rgb.safetensors", mean=tuple(mean), std=tuple(std))
    return trunk, torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)


def test_normalisation_follows_the_weights_through_each_task(cache, tmp_path):
    from tasks import ImageClassifier, ObjectDetector

    trunk, mean, std = _trunk_with_own_normalization(tmp_path)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = trunk((images - mean) / std)["c5"]  # by hand, from the published convention
    try:
        for weights in ["resnet18.d2_test", str(tmp_path / "r18_rgb.safetensors")]:
            classifier = ImageClassifier(backbone="resnet18", num_classes=3, weights=weights).eval()
            detector = ObjectDetector(backbone="resnet18", num_classes=3, weights=weights, norm="bn",
                                      min_size=64, max_size=64).eval()
            with torch.no_grad():
                x = (images - classifier.mean) / classifier.std
                torch.testing.assert_close(classifier.trunk(x)["c5"], reference, rtol=1e-4, atol=1e-4)
                batch = detector.model.transform(list(images))[0].tensors
                features = detector.model.backbone.body(batch)["c5"]
            torch.testing.assert_close(features, reference, rtol=1e-4, atol=1e-4, msg=weights)
            saved = ObjectDetector(backbone="resnet18", num_classes=3)  # a checkpoint restores the convention
            checkpoint = {}
            detector.on_save_checkpoint(checkpoint)
            saved.on_load_checkpoint(checkpoint)
            assert saved.model.transform.image_std == detector.model.transform.image_std != [0.229, 0.224, 0.225]
    finally:
        registry._registry.pop("resnet18.d2_test", None)


def test_every_shipped_config_names_registered_weights_or_none():
    import yaml

    named = {}
    for path in sorted((REPO / "configs").rglob("*.yaml")):
        weights = (yaml.safe_load(path.read_text()).get("model") or {}).get("init_args", {}).get("weights")
        if weights is not None:
            named[path.name] = weights
    # COCO's 8 and ImageNet's on torchvision's weights; ADE20K's X-101 32x4d on mmpretrain's (torchvision has none)
    assert len(named) == 11 and {n.split(".")[1] for n in named.values()} == {"tv_in1k", "mmpretrain_in1k"}, named
    for config, name in named.items():
        assert name in rb.list_weights(), (config, name)


def test_export_prints_a_registry_entry_that_loads_by_name(cache, tmp_path, monkeypatch):
    trunk = randomize_norm_stats(rb.resnext("resnet18"))
    trunk.normalization = {"mean": (0.5, 0.4, 0.3), "std": (0.2, 0.2, 0.2)}
    rb.save_backbone(trunk, tmp_path / "source.safetensors")
    out = tmp_path / "published" / "acme_trunk.safetensors"
    result = subprocess.run([sys.executable, "-m", "resnext_backbones", "export", str(tmp_path / "source.safetensors"),
                             str(out), "--register", out.as_uri(), "--license", "proprietary"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    entry = json.loads(result.stdout.split("\n", 1)[1])
    fields = entry["resnet18.acme_trunk"]
    assert fields["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest() and fields["url"] == out.as_uri()
    assert fields["mean"] == [0.5, 0.4, 0.3] and fields["license"] == "proprietary"
    (tmp_path / "registry.json").write_text(json.dumps(entry))
    monkeypatch.setenv("RESNEXT_BACKBONES_REGISTRY", str(tmp_path / "registry.json"))
    try:
        loaded = rb.resnext(weights="resnet18.acme_trunk")
        assert torch.equal(loaded.layer4[1].bn2.running_var, trunk.layer4[1].bn2.running_var)
        assert loaded.normalization == trunk.normalization
    finally:
        registry._registry.pop("resnet18.acme_trunk", None)


def test_the_weights_guide_lists_every_registered_name():
    guide = (REPO / "docs/backbone-and-weights.md").read_text()
    missing = [name for name in rb.list_weights() if f"| `{name}` |" not in guide]
    assert not missing and len(rb.list_weights()) >= 20, missing
