"""pom-bench: PoM against attention on this machine (speed, memory, decoding); `python -m pom_ext.bench --help`.

common  the attention baseline (MHA), timing, peak memory, out-of-memory handling, the machine's description
layer   the layer sweep over sequence lengths          decode  per-step decoding latency, state vs KV cache
report  tables, JSON, CSV, PNG plots, speed-ups and targets
"""
from .common import MHA, Timer, fwd_bwd, measure, median_time, peak_bytes

__all__ = ["MHA", "Timer", "fwd_bwd", "measure", "median_time", "peak_bytes"]
