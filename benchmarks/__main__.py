"""Every benchmark, on the machine at hand: ``python -m benchmarks`` (results go to benchmarks/README.md).

Each runs in a fresh process, so that none measures what another left behind: the trunk benchmark pins the
allocator and keeps gigabytes of freed heap, which forked data-loader workers would inherit, and compiled code
and thread settings outlive a benchmark too.
"""

import subprocess
import sys

import torch

names = ["backbone", "inference", "detector", "precision", "profile", "data", "evaluation", "predict", "tiling",
         "rare_classes", "segmentation"]
names += ["gpu"] if torch.cuda.is_available() else []
for name in names:
    print(f"== python -m benchmarks.{name}", flush=True)
    subprocess.run([sys.executable, "-m", f"benchmarks.{name}"], check=True)
