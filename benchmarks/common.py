"""Side-by-side timing: ours and the peer alternate in one process; each row is a ratio of medians."""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import platform
import statistics
import time
from datetime import date
from pathlib import Path
from typing import Callable, Dict, List

import torch

README = Path(__file__).with_name("README.md")


def median_seconds_alternating(fns: Dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> Dict[str, float]:
    """Run every fn ``warmup`` times, then ``repeats`` rounds in alternating order; the median time of each."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: Dict[str, List[float]] = {name: [] for name in fns}
    order = list(fns.items())
    for r in range(repeats):
        for name, fn in order if r % 2 == 0 else order[::-1]:  # ABBA: slow drifts of the machine cancel
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"{cpu}, {torch.get_num_threads()} threads{gpu}; torch {torch.__version__}, "
            f"python {platform.python_version()}; {date.today().isoformat()}")


def pin_malloc() -> str:
    """Fix glibc malloc's thresholds so freed activations are reused rather than unmapped and faulted back in.

    glibc adapts its mmap threshold to the block sizes freed so far, so the page faults a forward pays (zeroing
    every fresh page) depend on what the process ran before: in one process torchvision's batch-8 forward went
    from 22 to 15 img/s after an unrelated torch.compile. Pinned, a model's time depends on its own work. Both
    peers share the setting, which favours the one that allocates more (torchvision: a tensor per BatchNorm).
    Returns what the table header should say.
    """
    if platform.libc_ver()[0] != "glibc":
        return "malloc: the platform's default"
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    if libc.mallopt(m_mmap_threshold, 1 << 30) != 1 or libc.mallopt(m_trim_threshold, 1 << 30) != 1:
        return "malloc: glibc default (mallopt refused the pinned thresholds)"
    return "malloc: glibc with mmap and trim thresholds pinned at 1 GiB (no page faults from its adaptive state)"


def write_section(name: str, body: str) -> None:
    """Replace (or append) the section between ``<!-- name -->`` markers in benchmarks/README.md."""
    start, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    text = README.read_text() if README.exists() else "# Benchmarks\n"
    block = f"{start}\n{body.rstrip()}\n{end}"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    README.write_text(text)


def benchmark_parser(doc: str) -> argparse.ArgumentParser:
    """The command line every benchmark starts from: its docstring as help, and ``--no-write``."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-write", action="store_true", help="print only; leave benchmarks/README.md alone")
    return parser


def training_precision(asked: str, device: str) -> str:
    """``asked``, or for ``auto`` what ``trainer.precision: auto`` resolves to on ``device``."""
    if asked != "auto":
        return asked
    from resnext_backbones.deployment import auto_training_precision

    return auto_training_precision(device)[0]


def publish(section: str, body: str, args: argparse.Namespace) -> str:
    """Write ``body`` as ``section`` of benchmarks/README.md (unless ``--no-write``) and return it."""
    if not args.no_write:
        write_section(section, body)
    return body
