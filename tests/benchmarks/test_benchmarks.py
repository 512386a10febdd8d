"""The benchmarks run at toy sizes on the CPU: their code paths, rows and wiring (the figures come from real runs)."""

import pytest
import torch

from benchmarks import gpu


def test_gpu_benchmark_runs_end_to_end_on_tiny_shapes():
    body = gpu.main(["--device", "cpu", "--models", "resnet18", "--batch", "2", "3", "--size", "32", "--repeats", "1",
                     "--detector-backbone", "resnet18", "--detector-size", "64", "96", "--detector-steps", "1",
                     "--detector-precision", "fp32",  # bf16 is emulated (slow) without AMX/AVX-512 BF16
                     "--peak-tflops", "1", "--no-write"])
    rows = [line for line in body.splitlines() if line.startswith("| resnet18 |")]
    assert [row.split(" | ")[1] for row in rows] == [
        "training, bf16 autocast, batch 2", "training, fp16 autocast, batch 2", "training, bf16 autocast, batch 3",
        "training, fp16 autocast, batch 3", "inference, ours fused fp32 natively vs torchvision fp32 eager, batch 2",
        "inference, ours fused bf16 natively vs torchvision bf16 autocast, batch 2",
        "inference, ours fused fp16 natively vs torchvision fp16 autocast, batch 2"]
    assert all(row.rstrip(" |").endswith("%") for row in rows[:4])  # an MFU for each training row
    assert "s/iter" in body and "2 images of 64x96, fp32" in body and "--batch 2 3 --size 32" in body
    assert "Top ops" not in body


@pytest.mark.slow  # compiling both models twice: minutes on 2 CPU cores
def test_gpu_benchmark_compiles_both_models_with_and_without_cuda_graphs_and_profiles_the_step():
    body = gpu.main(["--device", "cpu", "--models", "resnet18", "--batch", "2", "--size", "32", "--repeats", "1",
                     "--detector-backbone", "resnet18", "--detector-size", "64", "64", "--detector-steps", "1",
                     "--detector-precision", "fp32", "--peak-tflops", "1", "--compile", "--profile", "--no-write"])
    training = [line.split(" | ") for line in body.splitlines() if line.startswith("| resnet18 | training")]
    assert [row[1] for row in training] == [
        "training, bf16 autocast, batch 2", "training, fp16 autocast, batch 2",
        "training, bf16 autocast, batch 2, compile", "training, bf16 autocast, batch 2, compile + CUDA graphs"]
    assert all(float(row[2]) > 0 and float(row[3]) > 0 for row in training)
    assert "--compile --profile`" in body
    table = body[body.index("Top ops by self CPU time, resnet18, 3 bf16 training steps of batch 2"):]
    assert "aten::" in table and "Self CPU" in table  # torch.profiler's own table, op rows included


def test_forward_flops_are_the_papers_multiply_adds_times_two():
    import resnext_backbones as rb

    assert abs(gpu.forward_flops(rb.resnext("resnext50_32x4d"), 224) / 2 / 1e9 - 4.23) < 0.01  # 4.2 GMACs, Table 1


@pytest.mark.slow  # suite time: a benchmark's wiring at toy size, over 10 CPU-seconds
def test_trunk_benchmark_gives_every_row_and_equal_features_on_tiny_shapes():
    from benchmarks import backbone

    body = backbone.main(["--model", "resnet18", "--batches", "2", "--size", "64", "--repeats", "1", "--no-compile",
                          "--malloc", "default", "--no-write"])
    rows = [line.split(" | ")[:4] for line in body.splitlines() if line.startswith("| 2 |")]
    assert rows == [["| 2", "forward", "NCHW", "eager"], ["| 2", "forward+backward", "NCHW", "eager"],
                    ["| 2", "forward", "channels_last", "eager"], ["| 2", "forward+backward", "channels_last", "eager"],
                    ["| 2", "A/A control: torchvision vs a copy of itself, forward+backward", "NCHW", "eager"],
                    ["| 2", "inference: ours vs torchvision eager NCHW", "channels_last", "fused, eager"]]
    diff = float(body.split("max |diff| of C5 vs torchvision: ")[1].split(".\n")[0])
    assert diff < 1e-4


def test_the_benchmark_command_runs_each_benchmark_in_a_fresh_process(monkeypatch):
    import runpy
    import subprocess
    import sys

    calls = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, check: calls.append(cmd))
    runpy.run_module("benchmarks", run_name="__main__")
    expected = ["backbone", "inference", "detector", "precision", "profile", "data", "evaluation", "predict", "tiling",
                "rare_classes", "segmentation"]
    expected += ["gpu"] if torch.cuda.is_available() else []
    assert calls == [[sys.executable, "-m", f"benchmarks.{name}"] for name in expected]


@pytest.mark.slow  # suite time: a benchmark's wiring at toy size, over 10 CPU-seconds
def test_predict_benchmark_reports_memory_and_speed_per_count_on_tiny_shapes():
    from benchmarks import predict

    # one count: a row is a fresh `lightning predict` process, and the rows differ only in their list files
    body = predict.main(["--counts", "3", "--size", "16", "--batch", "2", "--workers", "0", "--no-write"])
    rows = [line.split(" | ") for line in body.splitlines() if line.startswith("| 3 |")]
    assert [(row[0], row[1]) for row in rows] == [("| 3", "streamed")]
    assert [row[-1] for row in rows] == ["30 |"]  # 10 detections per image, all written
    assert all(float(row[4]) > 0 and " -> " in row[5] for row in rows)


def test_inference_benchmark_gives_fp32_and_native_bf16_rows_on_tiny_shapes():
    from benchmarks import inference
    from resnext_backbones.deployment import native_support

    body = inference.main(["--sections", "trunk", "detector", "--model", "resnet18", "--batches", "2", "--size", "64",
                           "--repeats", "1", "--detector-batches", "1", "--no-write"])
    trunk = [line.split(" | ")[1:3] for line in body.splitlines() if line.startswith("| 2 |")]
    detector = [line.split(" | ")[0] for line in body.splitlines() if line.startswith("| fused ")]
    expected = [["fused fp32", "torchvision eager fp32 NCHW"]]
    if native_support(torch.bfloat16, torch.device("cpu")):  # bf16 rows only where the CPU computes bf16 natively
        expected += [["fused bf16", "torchvision eager fp32 NCHW"], ["fused bf16", "torchvision bf16 autocast, "
                                                                                  "channels_last"]]
    assert trunk == expected
    assert detector == ["| fused fp32"] + (["| fused bf16"] if len(expected) > 1 else [])
    assert "fp32 convolution peak" in body and "ISA: " in body


def test_inference_benchmark_times_a_bare_torchvision_detector_against_its_inference_copy():
    from benchmarks import inference
    from resnext_backbones.deployment import native_support

    body = inference.main(["--sections", "bare", "--model", "resnet18", "--bare-size", "96", "--bare-images", "1",
                           "--repeats", "1", "--no-write"])
    rows = [line.split(" | ") for line in body.splitlines() if line.startswith(("| fp32 ", "| bf16 "))]
    native = native_support(torch.bfloat16, torch.device("cpu"))
    assert [row[0] for row in rows] == ["| fp32"] + (["| bf16"] if native else [])
    assert all(float(row[1]) > 0 and float(row[3].rstrip(" |")) > 0 for row in rows)
    assert "rb.inference_copy" in body and "ISA: " in body


@pytest.mark.slow  # suite time: a benchmark's wiring at toy size, over 10 CPU-seconds
def test_inference_benchmark_under_a_onednn_isa_limit_has_its_own_sections_and_says_so(monkeypatch):
    """ONEDNN_MAX_CPU_ISA=AVX2 measures this CPU as one without bf16 units: no bf16 rows, the limit in the header
    and the command, and README sections of their own (the unrestricted tables stay)."""
    from benchmarks import inference

    # oneDNN fixes its instruction set at its first kernel: one runs now, so the variable set below changes what the
    # benchmark reports, not the kernels this process (and the tests after this one) use
    conv = torch.nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
    with torch.no_grad():
        conv(torch.rand(1, 3, 8, 8).contiguous(memory_format=torch.channels_last))
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)  # a limit of the suite's own run would join the command
    published = []
    monkeypatch.setattr(inference, "publish", lambda name, body, args: published.append(name) or body)
    body = inference.main(["--sections", "trunk", "detector", "--model", "resnet18", "--batches", "2", "--size", "64",
                           "--repeats", "1", "--detector-batches", "1", "--no-write"])
    assert published == ["inference_trunk_avx2", "inference_detector_avx2"]
    assert [line.split(" | ")[1] for line in body.splitlines() if line.startswith("| 2 |")] == ["fused fp32"]
    assert "oneDNN limited to AVX2 (ONEDNN_MAX_CPU_ISA)" in body and "`ONEDNN_MAX_CPU_ISA=AVX2 python -m" in body


@pytest.mark.slow  # suite time: a benchmark's wiring at toy size, over 10 CPU-seconds
def test_precision_benchmark_times_both_precisions_on_a_tiny_batch():
    from benchmarks import precision

    body = precision.main(["--configs", "classification.yaml", "--steps", "2", "--repeats", "1", "--batch-size", "2",
                           "--no-write"])
    (row,) = [line.split(" | ") for line in body.splitlines() if line.startswith("| configs/classification.yaml")]
    assert float(row[1]) > 0 and float(row[2]) > 0 and row[3].endswith("x |")


def test_precision_quick_starts_are_built_by_the_configs_task_with_masks_for_mask_rcnn():
    from benchmarks.precision import quick_start

    model, (images, targets) = quick_start("instance_segmentation.yaml", batch_size=2, backbone="resnet18", size=64)
    assert type(model.model).__name__ == "MaskRCNN" and len(images) == 2
    assert all(target["masks"].shape[0] == len(target["boxes"]) > 0 for target in targets)
    with pytest.raises(ValueError, match=r"configs/semantic_segmentation.yaml: model.class_path is "
                                         r"tasks.SemanticSegmenter"):
        quick_start("semantic_segmentation.yaml")


def test_data_benchmark_measures_worker_memory_with_and_without_masks_on_tiny_shapes():
    from benchmarks import data

    body = data.main(["--images", "4", "--repeats", "1", "--batch", "4", "--memory-images", "40", "--memory-boxes",
                      "120", "--polygon-points", "8", "--no-write"])
    rows = [line.split(" | ")[:2] for line in body.splitlines() if line.startswith(("| ours |", "| torchvision |"))
            and line.count("|") > 4]
    assert rows == [["| ours", "boxes"], ["| torchvision", "boxes"], ["| ours", "boxes, masks"],
                    ["| torchvision", "boxes, masks"]]
    assert "Ours keeps the 120 segmentations in " in body


def test_tiling_benchmark_gives_the_whole_image_our_tiles_and_sahis_where_installed_on_tiny_shapes():
    import importlib.util

    from benchmarks import tiling

    body = tiling.main(["--images", "1", "--image-size", "96", "--objects", "3", "--tile", "64", "--overlap", "16",
                        "--train-steps", "0", "--no-warmup", "--no-write"])
    rows = [line.split(" | ") for line in body.splitlines() if line.startswith(("| whole", "| ours", "| SAHI"))]
    expected = ["| whole image (resized to the model's input)", "| ours: tiles batched",
                "| ours: tiles batched, inference copy"]
    sahi = importlib.util.find_spec("sahi") is not None
    assert [row[0] for row in rows] == expected + (["| SAHI: TorchVisionDetectionModel, get_sliced_prediction"]
                                                   if sahi else [])
    assert all(0 <= float(row[1]) <= 1 and float(row[4]) > 0 for row in rows)  # an mAP and a speed each
    assert "4 tiles an image" in body and ("SAHI is not installed" in body) != sahi


@pytest.mark.slow
def test_rare_class_benchmark_trains_both_ways_and_gives_every_row_on_a_toy_set():
    from benchmarks import rare_classes

    body = rare_classes.main(["--train", "24", "--val", "6", "--rare-images", "2", "--steps", "2", "--seeds", "0",
                              "--no-write"])
    rows = [line.split(" | ")[1] for line in body.splitlines() if line.startswith(("| 0 |", "| mean |"))]
    assert rows == ["every image once", "repeat_threshold 0.3", "without repeat factors", "with repeat factors"]
    assert ("trained in bf16-mixed" in body) != ("trained in 32-true" in body)  # auto, resolved as the CLI does


@pytest.mark.slow  # suite time: two training steps of each variant of the quick-start detector
def test_detector_benchmark_times_every_variant_against_the_bare_loop_at_the_precision_asked():
    from benchmarks import detector

    body = detector.main(["--configs", "detection.yaml", "--steps", "2", "--repeats", "1", "--precision", "auto",
                          "--no-write"])
    rows = [line.split(" | ") for line in body.splitlines() if line.startswith("| configs/detection.yaml")]
    assert [row[1] for row in rows[:3]] == ["sparse_roi_align: true (default)", "sparse_roi_align: false",
                                           "channels_last: true"]
    assert all(float(value) > 0 for row in rows[:3] for value in row[2:4])  # ours and the bare loop, seconds
    assert len(rows) == 4 and float(rows[3][1]) > 0 and float(rows[3][2]) > 0  # forward+backward both ways
    assert ("Precision: bf16-mixed." in body) != ("Precision: 32-true." in body)  # auto, resolved as the CLI does


@pytest.mark.slow  # suite time: a benchmark's wiring at toy size, over 10 CPU-seconds
def test_profile_benchmark_lists_the_top_ops_of_each_phase_and_roi_align_only_without_the_sparse_option():
    from benchmarks import profile

    # the detector only (the classifier's step is the same code, without the variants): suite time
    body = profile.main(["--configs", "detection.yaml", "--batch-size", "2", "--steps", "1", "--backbone", "resnet18",
                         "--size", "64", "--top", "1000", "--no-write"])
    sections = {s.split("\n", 1)[0]: s for s in body.split("### ")[1:]}
    assert list(sections) == ["configs/detection.yaml, sparse_roi_align: false",
                              "configs/detection.yaml, sparse_roi_align: true"]
    for section in sections.values():
        phases = [line.split(" | ")[0] for line in section.splitlines() if line.startswith("| **")]
        assert phases == ["| **forward**", "| **backward**", "| **optimizer step**"]
        assert "`aten::convolution_backward`" in section or "`aten::mkldnn_convolution_backward`" in section
    torchvision_kernel = [s for s in sections.values() if "torchvision::roi_align" in s]
    assert torchvision_kernel == [sections["configs/detection.yaml, sparse_roi_align: false"]]
    assert "torchvision::_roi_align_backward" in torchvision_kernel[0]


@pytest.mark.slow  # suite time: a segmenter's training steps in Trainer.fit and a bare loop, at toy size
def test_segmentation_benchmark_times_our_step_in_lightning_against_the_bare_loop():
    from benchmarks import segmentation

    body = segmentation.main(["--backbone", "resnext26_32x4d", "--size", "64", "--batch", "2", "--steps", "2",
                              "--repeats", "1", "--no-write"])
    numbers = [float(cell) for line in body.splitlines() if line.startswith("|") and "---" not in line
               for cell in line.strip("|").split("|")[1:] if cell.strip().replace(".", "", 1).isdigit()]
    assert numbers and all(n > 0 for n in numbers)
