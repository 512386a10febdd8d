"""The trunk and the FPN backbone export with torch.export and to ONNX, and the exports compute the same values.

(torch.jit.script is deprecated as of torch 2.15 in favour of torch.export, so torch.export is what is proven.)
"""

import pytest
import torch
from conftest import randomize_norm_stats

import resnext_backbones as rb

MODELS = {
    "trunk": lambda: rb.resnext("resnext26_32x4d", norm="frozen_bn"),
    # the inference form on channels_last input, which eager runs on oneDNN's fused kernels: under tracing it
    # computes with the plain aten ops, which export
    "fused trunk": lambda: randomize_norm_stats(rb.resnext("resnext26_32x4d", norm="frozen_bn")).eval().fuse(),
    "fpn": lambda: rb.resnext_fpn("resnet18"),
}


@pytest.fixture(params=list(MODELS))
def model_and_input(request):
    torch.manual_seed(0)
    x = torch.rand(1, 3, 64, 64)
    if request.param == "fused trunk":
        x = x.to(memory_format=torch.channels_last)
    return randomize_norm_stats(MODELS[request.param]()).eval(), x


def test_torch_export_program_gives_the_same_outputs(model_and_input):
    model, x = model_and_input
    program = torch.export.export(model, (x,))
    x2 = torch.rand_like(x)  # another input than the one traced, in its layout
    with torch.no_grad():
        ref, out = model(x2), program.module()(x2)
    assert list(out) == list(ref)
    for key in ref:
        torch.testing.assert_close(out[key], ref[key], rtol=1e-4, atol=1e-5)


def test_onnx_export_runs_in_onnxruntime_with_the_same_outputs(model_and_input, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model, x = model_and_input
    with torch.no_grad():
        ref = model(x)
    torch.onnx.export(model, (x,), str(tmp_path / "model.onnx"), dynamo=True, input_names=["images"],
                      output_names=list(ref), verbose=False)
    session = ort.InferenceSession(str(tmp_path / "model.onnx"))
    names = [o.name for o in session.get_outputs()]
    assert names == list(ref)
    for name, value in zip(names, session.run(None, {"images": x.numpy()}), strict=True):
        torch.testing.assert_close(torch.from_numpy(value), ref[name], rtol=1e-4, atol=1e-4)
