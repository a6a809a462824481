"""`netlab compare`: one topology in each kube-proxy mode, the same traffic, side by side.

topology  the user's topology plus the compare's pods and services (pure)
measure   objects, programming time, latency, distribution, behaviour (kernel, real traffic)
run       the orchestration: sizes x modes in one lab; IPVS through the VM tier
stats     percentiles, slopes with bootstrap intervals, chi-square (pure)
report    verdicts, report.md, terminal tables (pure)
plot      PNGs (matplotlib)
"""

from netlab.compare.measure import CompareError
from netlab.compare.run import Options, compare, write_outputs

__all__ = ["CompareError", "Options", "compare", "write_outputs"]
