"""Models configured in config.toml, loaded once per process and kept loaded between jobs."""

from __future__ import annotations

import logging
import threading

from ai_models.bundle import LoadedModel, load_model
from dicom_node.config import Config
from dicom_node.logs import log_event

log = logging.getLogger("dicom_node.models")


class ModelCache:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self._loaded: dict[str, LoadedModel] = {}
        self._lock = threading.Lock()

    def get(self, name: str) -> LoadedModel:
        with self._lock:
            model = self._loaded.get(name)
            if model is None:
                spec = self.cfg.model(name)
                device = spec.device or self.cfg.worker.device
                model = load_model(self.cfg.bundle_path(name), name=name, device=device)
                ident = model.identity
                log_event(log, "model_loaded", model=name, version=ident.version, task=ident.task,
                          device=ident.device, bundle_sha256=ident.bundle_hash[:12])
                self._loaded[name] = model
            return model
