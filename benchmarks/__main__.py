"""Every benchmark, on the machine at hand: ``python -m benchmarks`` (results go to benchmarks/README.md)."""

from . import backbone, evaluation

for module in (backbone, evaluation):
    module.main([])
