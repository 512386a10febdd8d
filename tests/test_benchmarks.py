"""The benchmarks run at toy sizes on the CPU: their code paths, rows and wiring (the figures come from real runs)."""

import torch

from benchmarks import gpu


def test_gpu_benchmark_runs_end_to_end_on_tiny_shapes():
    body = gpu.main(["--device", "cpu", "--models", "resnet18", "--batch", "2", "--size", "32", "--repeats", "1",
                     "--detector-backbone", "resnet18", "--detector-size", "64", "96", "--detector-steps", "1",
                     "--peak-tflops", "1", "--no-write"])
    rows = [line for line in body.splitlines() if line.startswith("| resnet18 |")]
    assert [row.split(" | ")[1] for row in rows] == ["bf16", "fp16"]
    assert all(row.rstrip(" |").endswith("%") for row in rows)  # an MFU for each row
    assert "s/iter" in body


def test_forward_flops_are_the_papers_multiply_adds_times_two():
    import resnext_backbones as rb

    assert abs(gpu.forward_flops(rb.resnext("resnext50_32x4d"), 224) / 2 / 1e9 - 4.23) < 0.01  # 4.2 GMACs, Table 1


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
    expected = ["backbone", "detector", "data", "evaluation", "predict"]
    expected += ["gpu"] if torch.cuda.is_available() else []
    assert calls == [[sys.executable, "-m", f"benchmarks.{name}"] for name in expected]


def test_predict_benchmark_reports_memory_and_speed_per_count_on_tiny_shapes():
    from benchmarks import predict

    body = predict.main(["--counts", "3", "6", "--size", "16", "--batch", "2", "--workers", "0", "--no-write"])
    rows = [line.split(" | ") for line in body.splitlines() if line.startswith(("| 3 |", "| 6 |"))]
    assert [(row[0], row[1]) for row in rows] == [("| 3", "streamed"), ("| 6", "streamed")]
    assert [row[-1] for row in rows] == ["30 |", "60 |"]  # 10 detections per image, all written
    assert all(float(row[4]) > 0 and " -> " in row[5] for row in rows)


def test_data_benchmark_measures_worker_memory_with_and_without_masks_on_tiny_shapes():
    from benchmarks import data

    body = data.main(["--images", "4", "--repeats", "1", "--batch", "4", "--memory-images", "40", "--memory-boxes",
                      "120", "--polygon-points", "8", "--no-write"])
    rows = [line.split(" | ")[:2] for line in body.splitlines() if line.startswith(("| ours |", "| torchvision |"))
            and line.count("|") > 4]
    assert rows == [["| ours", "boxes"], ["| torchvision", "boxes"], ["| ours", "boxes, masks"],
                    ["| torchvision", "boxes, masks"]]
    assert "Ours keeps the 120 segmentations in " in body
