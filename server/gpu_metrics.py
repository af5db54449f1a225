"""GPU gauges through NVML (`nvidia-ml-py`): present only when a GPU and its driver are."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from types import ModuleType
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

logger = logging.getLogger("vlserve.metrics")


class NvmlCollector(Collector):
    """Reads utilisation and memory of every GPU at scrape time (NVML calls take ~µs)."""

    def __init__(self, nvml: ModuleType, handles: list[Any], names: list[str]) -> None:
        self._nvml = nvml
        self._handles = handles
        self._names = names

    def collect(self) -> Iterator[GaugeMetricFamily]:
        labels = ["gpu", "name"]
        util = GaugeMetricFamily("vlserve_gpu_utilization_ratio",
                                 "GPU busy time over the last sample period (0-1)", labels=labels)
        used = GaugeMetricFamily("vlserve_gpu_memory_used_bytes", "GPU memory in use",
                                 labels=labels)
        total = GaugeMetricFamily("vlserve_gpu_memory_total_bytes", "GPU memory size",
                                  labels=labels)
        for index, (handle, name) in enumerate(zip(self._handles, self._names, strict=True)):
            values = [str(index), name]
            try:
                rates = self._nvml.nvmlDeviceGetUtilizationRates(handle)
                memory = self._nvml.nvmlDeviceGetMemoryInfo(handle)
            except self._nvml.NVMLError as exc:  # e.g. the GPU fell off the bus: skip it
                logger.debug("NVML read of GPU %d failed: %s", index, exc)
                continue
            util.add_metric(values, rates.gpu / 100.0)
            used.add_metric(values, float(memory.used))
            total.add_metric(values, float(memory.total))
        yield from (util, used, total)


def nvml_collector() -> NvmlCollector | None:
    """A collector for the machine's GPUs, or None without nvidia-ml-py, a driver or a GPU."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        count = pynvml.nvmlDeviceGetCount()
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        names = [_text(pynvml.nvmlDeviceGetName(h)) for h in handles]
    except pynvml.NVMLError as exc:
        logger.debug("no GPU metrics: %s", exc)
        return None
    if not handles:
        return None
    # NVML numbers GPUs as the driver does; CUDA_VISIBLE_DEVICES does not renumber them.
    logger.info("GPU metrics on for %d GPU(s): %s", len(handles), ", ".join(names))
    return NvmlCollector(pynvml, handles, names)


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value
