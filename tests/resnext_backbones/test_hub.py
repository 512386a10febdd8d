import importlib.util
from pathlib import Path

import torch
from helpers import REPO, randomize_norm_stats

import resnext_backbones as rb

REPO = str(REPO)


def test_hub_lists_a_trunk_and_an_fpn_per_named_model():
    spec = importlib.util.spec_from_file_location("hubconf", Path(REPO) / "hubconf.py")
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    entries = [n for n in dir(hubconf) if callable(getattr(hubconf, n)) and not n.startswith("_")]
    for name in rb.list_models():
        assert name in entries and name + "_fpn" in entries


def test_hub_loads_the_fpn_backbone_with_local_weights_offline(tmp_path, images):
    trunk = randomize_norm_stats(rb.resnext("resnext50_32x4d")).eval()
    rb.save_backbone(trunk, tmp_path / "x50.safetensors")
    fpn = torch.hub.load(REPO, "resnext50_32x4d_fpn", source="local", weights=str(tmp_path / "x50.safetensors"))
    assert isinstance(fpn, rb.ResNeXtFPN)
    for key, value in trunk.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            torch.testing.assert_close(fpn.body.state_dict()[key], value)
    trunk2 = torch.hub.load(REPO, "resnext50_32x4d", source="local", weights=str(tmp_path / "x50.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(trunk2.eval()(images)["c5"], trunk(images)["c5"])
