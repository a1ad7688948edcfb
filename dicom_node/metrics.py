"""Prometheus metrics the node's code updates as it works (counters and histograms).

`dicom-node serve` receives in several processes, so it runs prometheus_client in multiprocess mode: each
process adds to its own memory-mapped file in ``<data_dir>/.metrics`` (an increment is a write to mapped
memory: no lock shared between processes, no system call, no database), and /metrics sums the files. The
mode is chosen by PROMETHEUS_MULTIPROC_DIR, which must be set before this module is first imported
(dicom_node/metrics_setup.py, called by the CLI before it imports the service). Anywhere else (tests that
start a listener in their own process) the values simply live in that process.

What the job store already knows (studies, jobs and deliveries by state, the queue) is read at scrape time
by dicom_node/web/collector.py instead of being counted twice.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_FAST = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_SLOW = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)

INSTANCES_RECEIVED = Counter(
    "dicom_node_instances_received", "C-STORE requests answered, by response status", ["status"]
)
RECEIVED_BYTES = Counter("dicom_node_received_bytes", "Dataset bytes of C-STORE requests answered with success")
CSTORE_SECONDS = Histogram(
    "dicom_node_cstore_handling_seconds",
    "From a C-STORE's last dataset byte to its response: the node's own handling (checks, durable write, index)",
    buckets=_FAST,
)
ASSOCIATIONS = Counter(
    "dicom_node_associations", "Association requests, accepted or refused (with why)", ["outcome", "reason"]
)
STAGE_SECONDS = Histogram(
    "dicom_node_stage_seconds",
    "Job stage durations: load (reading the series), seg_encode, sr_encode, write",
    ["stage"],
    buckets=_SLOW,
)
INFERENCE_SECONDS = Histogram(
    "dicom_node_inference_seconds", "One model's inference on one series", ["model"], buckets=_SLOW
)
SEND_SECONDS = Histogram(
    "dicom_node_send_seconds", "One association sending a batch of results", ["destination"], buckets=_SLOW
)
JOBS_FINISHED = Counter(
    "dicom_node_job_attempts", "Job attempts ended: done, retry (scheduled again) or failed", ["outcome"]
)
DELIVERIES = Counter(
    "dicom_node_deliveries", "Result send attempts: done, retry (scheduled again) or failed", ["destination", "outcome"]
)
RETRIES = Counter(
    "dicom_node_retries",
    "Retries: job and delivery (automatic, after a failure), admin (retry asked by an admin)",
    ["kind"],
)
MODEL_LOAD_SECONDS = Gauge(
    "dicom_node_model_load_seconds", "How long loading each model took", ["model"], multiprocess_mode="mostrecent"
)
