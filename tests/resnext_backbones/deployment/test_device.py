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
