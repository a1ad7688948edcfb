"""Metrics read when Prometheus scrapes: what the job store, the disk and the running node already know
(states, queue, free space, open associations, GPU memory), so nothing counts them twice."""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from storage.jobstore import DELIVERY_STATES, JOB_STATES, JobStore
from storage.overview import Overview

STUDY_STATES = ("receiving", "complete")


class NodeCollector(Collector):
    def __init__(
        self, jobs: JobStore, overview: Overview, data_root: Any, node_state: Callable[[], dict[str, Any]]
    ) -> None:
        """``node_state``: the running node's own view ({"associations_open": n, "listeners_alive": n})."""
        self.jobs = jobs
        self.overview = overview
        self.data_root = data_root
        self.node_state = node_state

    def collect(self) -> Iterator[GaugeMetricFamily]:
        counts = self.jobs.counts()
        for name, states, doc in (
            ("studies", STUDY_STATES, "Studies by state"),
            ("jobs", JOB_STATES, "Jobs by state"),
            ("deliveries_current", DELIVERY_STATES, "Deliveries by state"),
        ):
            key = "deliveries" if name == "deliveries_current" else name
            g = GaugeMetricFamily(f"dicom_node_{name}", doc, labels=["state"])
            for state in sorted(set(states) | set(counts[key])):
                g.add_metric([state], counts[key].get(state, 0))
            yield g
        q = self.overview.queue()
        yield GaugeMetricFamily("dicom_node_queue_depth", "Jobs queued (waiting for the worker)", value=q.queued)
        age = time.time() - q.oldest_queued_at if q.oldest_queued_at else 0.0
        yield GaugeMetricFamily(
            "dicom_node_oldest_queued_job_age_seconds", "Age of the oldest queued job; 0: none", value=max(0.0, age)
        )
        usage = shutil.disk_usage(self.data_root)
        yield GaugeMetricFamily("dicom_node_disk_free_bytes", "Free space on the data volume", value=usage.free)
        yield GaugeMetricFamily("dicom_node_disk_total_bytes", "Size of the data volume", value=usage.total)
        node = self.node_state()
        yield GaugeMetricFamily(
            "dicom_node_associations_open",
            "DICOM associations open now, node-wide",
            value=node.get("associations_open", 0),
        )
        yield GaugeMetricFamily(
            "dicom_node_listener_processes_alive", "Listener processes running", value=node.get("listeners_alive", 0)
        )
        yield from _gpu_memory()


def _gpu_memory() -> Iterator[GaugeMetricFamily]:
    """Memory torch holds on each CUDA device, when torch is loaded here (the worker) and sees one."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return
    alloc = GaugeMetricFamily("dicom_node_gpu_memory_allocated_bytes", "GPU memory in tensors", labels=["device"])
    reserved = GaugeMetricFamily(
        "dicom_node_gpu_memory_reserved_bytes", "GPU memory held by torch's allocator", labels=["device"]
    )
    for i in range(torch.cuda.device_count()):
        alloc.add_metric([f"cuda:{i}"], torch.cuda.memory_allocated(i))
        reserved.add_metric([f"cuda:{i}"], torch.cuda.memory_reserved(i))
    yield alloc
    yield reserved
