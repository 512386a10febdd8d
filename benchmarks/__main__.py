"""Every benchmark, on the machine at hand: ``python -m benchmarks`` (results go to benchmarks/README.md)."""

import torch

from . import backbone, data, detector, evaluation, gpu

for module in (backbone, detector, data, evaluation):
    module.main([])
if torch.cuda.is_available():
    gpu.main([])
