"""Which instruction sets oneDNN may use here: its limit from ``ONEDNN_MAX_CPU_ISA`` (or ``DNNL_MAX_CPU_ISA``).

The CPU's own flags say what it has; the variable keeps oneDNN below some of it (e.g. ``AVX2`` to measure a CPU
without AVX-512 on one that has it). The fused kernels (:mod:`resnext_backbones.fused`) and the tasks' choice of
inference precision ask both.
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

__all__ = ["ONEDNN_ISAS", "ONEDNN_ISA_VARIABLES", "onednn_isa_limit", "onednn_reaches"]

# oneDNN's instruction sets, in its order (dnnl_cpu_isa_t), up to the first with bf16 and fp16 arithmetic and on to
# AMX (the values of ONEDNN_MAX_CPU_ISA; AVX512_CORE_FP16 and AVX512_CORE_AMX* are its older names of AVX10_1_512*)
ONEDNN_ISAS = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI",
               "AVX512_CORE_BF16", "AVX10_1_512", "AVX10_1_512_AMX", "AVX10_1_512_AMX_FP16")
_ALIASES = {"AVX512_CORE_FP16": "AVX10_1_512", "AVX512_CORE_AMX": "AVX10_1_512_AMX",
            "AVX512_CORE_AMX_FP16": "AVX10_1_512_AMX_FP16"}
ONEDNN_ISA_VARIABLES = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")  # oneDNN reads the first set, once, at first use


def onednn_isa_limit() -> Optional[Tuple[str, str]]:
    """``(variable, ISA)``: the instruction set oneDNN is limited to by ``ONEDNN_MAX_CPU_ISA`` (or its old name
    ``DNNL_MAX_CPU_ISA``), as named in :data:`ONEDNN_ISAS`. ``None`` where unset, ``DEFAULT``/``ALL``, or a newer
    instruction set than these (AVX10.2): no limit that keeps bf16, fp16 or AMX from oneDNN."""
    for variable in ONEDNN_ISA_VARIABLES:
        if os.environ.get(variable):
            value = os.environ[variable].upper()
            value = _ALIASES.get(value, value)
            return (variable, value) if value in ONEDNN_ISAS else None
    return None


def onednn_reaches(isa: str) -> bool:
    """Whether oneDNN may use ``isa`` (one of :data:`ONEDNN_ISAS`) as far as its limit goes; the CPU may still lack
    it."""
    limit = onednn_isa_limit()
    return limit is None or ONEDNN_ISAS.index(limit[1]) >= ONEDNN_ISAS.index(isa)
