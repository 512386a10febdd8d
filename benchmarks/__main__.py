"""Every benchmark, on the machine at hand: ``python -m benchmarks`` (results go to benchmarks/README.md)."""

from . import backbone, data, detector, evaluation

for module in (backbone, detector, data, evaluation):
    module.main([])
