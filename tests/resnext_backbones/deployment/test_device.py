"""What the device computes natively (resnext_backbones.deployment.device): the CPU's flags and oneDNN's limit."""

import pytest
import torch

from resnext_backbones.deployment import device as deployment_device
from resnext_backbones.deployment import native_support


@pytest.mark.parametrize("variable", ["ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"])
def test_a_onednn_isa_limit_below_bf16_makes_low_precision_not_native(variable, monkeypatch):
    """oneDNN's ISA order (its dnnl_cpu_isa_t): AVX2 and AVX512_CORE have no bf16 arithmetic, AVX512_CORE_BF16 has
    bf16 but not fp16, AVX512_CORE_AMX (alias of AVX10_1_512_AMX) both: with the limit set, the CPU's own flags no
    longer decide, and the benchmark headers say so."""
    cpu = torch.device("cpu")
    monkeypatch.setattr(deployment_device, "cpu_flags", lambda: frozenset({"avx2", "avx512f", "amx_bf16", "amx_fp16"}))
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    assert native_support(bf16, cpu) and native_support(fp16, cpu)  # this CPU's flags, no limit
    for limit, *expected in [("avx2", False, False), ("AVX512_CORE", False, False), ("AVX512_CORE_BF16", True, False),
                             ("AVX512_CORE_AMX", True, True), ("DEFAULT", True, True), ("AVX10_2", True, True)]:
        monkeypatch.setenv(variable, limit)
        assert [native_support(bf16, cpu), native_support(fp16, cpu), native_support(fp32, cpu)] == [*expected, True]
    monkeypatch.setenv(variable, "AVX2")
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    assert deployment_device.isa_flags() == (f"avx2, avx512f, amx_bf16, amx_fp16; oneDNN limited to AVX2 ({variable}); "
                                           "ATen kernels limited to avx2 (ATEN_CPU_CAPABILITY)")


@pytest.mark.parametrize("device, flags, expected, why", [
    ("cpu", {"avx2"}, "32-true", "has no native bf16: autocast would emulate it"),  # AVX2 only, as AMD EPYC Zen 3
    ("cpu", {"avx2", "avx512f", "avx512_bf16"}, "bf16-mixed", "AMD EPYC (Zen 4, Zen 5) with AVX-512 BF16"),
    ("cpu", {"avx2", "avx512f", "avx512_bf16", "amx_bf16"}, "bf16-mixed", "Intel Xeon with AMX"),
    ("mps", {"avx2"}, "32-true", "measured on CUDA GPUs and CPUs only")])
def test_auto_training_precision_is_bf16_mixed_only_where_bf16_is_native_and_measured_faster(
        device, flags, expected, why, monkeypatch):
    monkeypatch.setattr(deployment_device, "cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(deployment_device, "has_cpu_flag", lambda flag: flag in flags)  # not torch's probe of this CPU
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    precision, reason = deployment_device.auto_training_precision(device)
    assert precision == expected and why in reason
    if expected == "bf16-mixed":  # oneDNN held below bf16, or a native kind never measured: float32
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE")
        assert deployment_device.auto_training_precision(device)[0] == "32-true"
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
        monkeypatch.setattr(deployment_device, "BF16_TRAINING_FASTER", {})
        precision, reason = deployment_device.auto_training_precision(device)
        assert precision == "32-true" and "not measured faster" in reason


@pytest.mark.parametrize("bf16", [True, False])
def test_auto_training_precision_on_cuda_follows_the_gpus_bf16(bf16, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16)
    monkeypatch.setattr(deployment_device, "describe_device", lambda device: "a GPU")
    assert deployment_device.auto_training_precision("cuda")[0] == ("bf16-mixed" if bf16 else "32-true")
