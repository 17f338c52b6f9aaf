"""How many CPU threads torch may use in one service process.

torch starts as many intra-op threads as the machine has cores, in every process. Two model services on a
2-core machine then run 4 threads on 2 cores, and every small op pays for the contention (a full-vocabulary
`torch.where` took 6 ms instead of 0.3 ms). Each service therefore sets its threads at start, before the
model loads; embedded mode (i2s_cli/embedded.py) divides the cores between the services it starts.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

from serving.config import setting

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ThreadOptions:
    torch_threads: int = setting(0, "CPU threads for torch's operators in this process (0: one per core this "
                                 "process may use)")


CGROUP_CPU_MAX = "/sys/fs/cgroup/cpu.max"


def cgroup_cpu_limit(path: str = CGROUP_CPU_MAX) -> int | None:
    """The CPU limit of this container in whole cores (a Kubernetes `limits.cpu: 3` is "300000 100000" in
    cgroup v2's cpu.max), or None where there is none. A limit is a time quota, not fewer visible cores."""
    try:
        with open(path, encoding="ascii") as f:
            quota, period = f.read().split()[:2]
        return None if quota == "max" else max(1, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        return None


def available_cores() -> int:
    """The cores this process may use: its CPU affinity (which taskset and cpusets narrow), bounded by the
    container's CPU limit."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    limit = cgroup_cpu_limit()
    return max(1, min(cores, limit) if limit else cores)


def threads_per_service(services: int, cores: int | None = None) -> int:
    """The machine's cores shared evenly by `services` processes, at least one each."""
    cores = available_cores() if cores is None else cores
    return max(1, cores // max(1, services))


def apply_torch_threads(options: ThreadOptions) -> int:
    """Sets torch's intra-op (and, while still possible, inter-op) threads; returns the intra-op count.
    Call at process start, before the model loads."""
    import torch  # only the model services call this, and they need torch anyway

    threads = options.torch_threads if options.torch_threads > 0 else available_cores()
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(threads)
    except RuntimeError:  # settable once, before any inter-op work; the intra-op count is what matters here
        pass
    log.info("torch uses %d CPU thread(s)", threads)
    return threads
