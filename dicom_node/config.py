"""config.toml -> one typed, frozen Config.

Every key is declared here; an unknown key or a value of the wrong type stops the node with a message that
names the key (``routes[0].send_to: unknown destination 'pac'``). Relative paths are resolved against the
directory holding the config file so the node behaves the same whatever the working directory.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from pydicom.datadict import tag_for_keyword

AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # default character repertoire without backslash


class ConfigError(ValueError):
    """The config file is invalid; the message names the offending key."""


@dataclass(frozen=True)
class NodeSection:
    ae_title: str = "DICOM_NODE"
    port: int = 11112
    bind: str = "0.0.0.0"
    data_dir: str = "var"
    database_url: str = ""
    sqlite_synchronous: str = "FULL"  # FULL: an acknowledged instance survives power loss, not only a crash
    min_free_mb: int = 1024  # refuse new instances (0xA700) below this much free space in data_dir
    max_pdu_size: int = 262_144
    max_associations: int = 16
    # Processes accepting associations on node.port (sharing the socket; limits apply node-wide): 0 = one
    # per CPU core, at most 4; 1 = receive in the main process. Parallel senders need more than one: a
    # Python process spends its receive work under one interpreter lock.
    listener_processes: int = 0
    acse_timeout: float = 30.0
    dimse_timeout: float = 60.0
    network_timeout: float = 60.0
    max_instance_mb: int = 2048
    duplicate_policy: str = "keep_first"  # keep_first | replace


ANY_AE = "*"  # key of security.allowed_hosts applying to every AE title without an entry of its own
TLS_VERSIONS = ("1.2", "1.3")


@dataclass(frozen=True)
class SecuritySection:
    """Who may associate, from where, and over what transport (see dicom_node/receive/access.py)."""

    allowed_calling_ae_titles: tuple[str, ...] = ()  # empty: any
    require_called_ae_title: bool = True
    # AE title (or "*") -> IP addresses / CIDR blocks it may connect from; AE titles without an entry (and
    # no "*") may connect from anywhere. A refused host gets A-ASSOCIATE-RJ permanent, service-user, reason 3.
    allowed_hosts: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # DICOM TLS (PS3.15 BCP 195). With tls_cert_file set, node.port speaks TLS only.
    tls_cert_file: str = ""  # PEM server certificate (chain); relative paths resolve against the config folder
    tls_key_file: str = ""  # PEM private key of that certificate
    tls_ca_file: str = ""  # PEM CA bundle that client certificates must chain to
    tls_require_client_cert: bool = False  # true: refuse clients without a certificate from tls_ca_file
    tls_min_version: str = "1.2"  # "1.2" | "1.3"


@dataclass(frozen=True)
class CompletionSection:
    stable_seconds: float = 30.0
    poll_seconds: float = 0.25  # an idle SQLite query; latency, not load, is what the interval costs
    # Instances that arrive after a study was processed re-open it; once it is quiet again the study is
    # re-run and the new results supersede the earlier ones (same deterministic UIDs per series+model).
    late_arrivals: str = "rerun"  # rerun | ignore


@dataclass(frozen=True)
class WorkerSection:
    device: str = "auto"
    lease_seconds: float = 300.0
    max_attempts: int = 3
    retry_backoff_seconds: float = 30.0
    poll_seconds: float = 0.25  # an idle SQLite query; latency, not load, is what the interval costs
    preload_models: bool = True  # load every configured model when the node starts, before the first job


@dataclass(frozen=True)
class SenderSection:
    max_attempts: int = 20
    backoff_seconds: float = 10.0
    backoff_max_seconds: float = 600.0
    poll_seconds: float = 0.25  # an idle SQLite query; latency, not load, is what the interval costs
    acse_timeout: float = 30.0
    dimse_timeout: float = 120.0
    network_timeout: float = 60.0


@dataclass(frozen=True)
class ResultsSection:
    seg_series_number: int = 9001
    sr_series_number: int = 9000  # before the SEGs' 9001, 9002, ... (one per segmentation model)
    findings_sr_series_number: int = 9100  # the findings SR for viewers, clear of the SEGs' numbers
    rejection_series_number: int = 9200  # IOCM rejection notes retiring a re-run's superseded results
    institution_name: str = ""


@dataclass(frozen=True)
class RetentionSection:
    """What the node deletes, and when (see dicom_node/housekeeping.py). Ages count from when a study
    finished: its last instance, job or delivery, whichever came last."""

    enabled: bool = True  # false: nothing is deleted except by `dicom-node purge`
    keep_received_hours: float = 24.0  # received instances, once every job is done and every result delivered
    keep_results_days: float = 7.0  # result objects (SEG, SR), once delivered
    keep_failed_days: float = 14.0  # a study with a failed job or an undelivered result, all of it
    keep_history_days: float = 90.0  # rows (study, jobs, deliveries) of a study whose files are all gone
    high_watermark_percent: float = 90.0  # data volume use above which finished studies are evicted...
    low_watermark_percent: float = 80.0  # ...oldest first, down to this
    evict_failed: bool = True  # under disk pressure failed studies go too (after every delivered one)
    interval_seconds: float = 60.0  # how often the housekeeping round runs in `dicom-node serve`


@dataclass(frozen=True)
class HttpSection:
    """The operator's web dashboard, REST API and Prometheus metrics (dicom_node/web/), in the node process."""

    enabled: bool = True  # on 127.0.0.1 by default, and nothing but /healthz and /metrics without the token
    bind: str = "127.0.0.1"
    port: int = 11180
    # The token every page and API call needs: the environment variable token_env when set, else token_file;
    # an empty token_file is <data_dir>/http-token, made with a random token (mode 0600) at first start.
    token_file: str = ""
    token_env: str = "DICOM_NODE_HTTP_TOKEN"
    metrics_require_token: bool = False  # true: /healthz and /metrics need the token too (Bearer)
    show_patient_details: bool = False  # true: patient names and IDs on the dashboard and in the API
    tls_cert_file: str = ""  # PEM certificate (chain): HTTPS only; same rules as security.tls_*
    tls_key_file: str = ""
    tls_min_version: str = "1.2"


@dataclass(frozen=True)
class AuditSection:
    """The audit trail: JSON Lines, one record per association, result sent and admin action (no patient
    names or IDs), rotated by size."""

    path: str = ""  # empty: <data_dir>/audit.jsonl
    max_bytes: int = 10_485_760
    backups: int = 5  # rotated files kept: audit.jsonl.1 (newest) .. .N


@dataclass(frozen=True)
class LoggingSection:
    level: str = "INFO"
    format: str = "logfmt"  # logfmt | json


@dataclass(frozen=True)
class Destination:
    name: str
    ae_title: str
    host: str
    port: int
    calling_ae_title: str = ""  # empty: node.ae_title


@dataclass(frozen=True)
class ModelSpec:
    name: str
    bundle: str  # folder of a MONAI bundle; relative paths resolve against the config file's folder
    device: str = ""  # empty: worker.device
    min_score: float = -1.0  # detections/classifications reported from this score; -1: the bundle's operating point

    @property
    def operating_point(self) -> float | None:
        """The configured min_score, or None for the bundle's own."""
        return self.min_score if self.min_score >= 0 else None


@dataclass(frozen=True)
class Route:
    name: str
    models: tuple[str, ...]
    send_to: tuple[str, ...]
    match: dict[str, str] = field(default_factory=dict)  # DICOM keyword -> exact value or /regex/
    series: str = "largest_axial"  # how to pick the series fed to the models
    min_slices: int = 10


@dataclass(frozen=True)
class Config:
    node: NodeSection = NodeSection()
    security: SecuritySection = SecuritySection()
    completion: CompletionSection = CompletionSection()
    worker: WorkerSection = WorkerSection()
    sender: SenderSection = SenderSection()
    results: ResultsSection = ResultsSection()
    retention: RetentionSection = RetentionSection()
    http: HttpSection = HttpSection()
    audit: AuditSection = AuditSection()
    logging: LoggingSection = LoggingSection()
    destinations: tuple[Destination, ...] = ()
    models: tuple[ModelSpec, ...] = ()
    routes: tuple[Route, ...] = ()
    base_dir: Path = Path(".")

    @property
    def data_dir(self) -> Path:
        return resolve_path(self.base_dir, self.node.data_dir)

    @property
    def database_url(self) -> str:
        if self.node.database_url:
            return self.node.database_url
        return f"sqlite:///{self.data_dir / 'node.db'}"

    @property
    def audit_path(self) -> Path:
        return resolve_path(self.base_dir, self.audit.path) if self.audit.path else self.data_dir / "audit.jsonl"

    @property
    def http_token_path(self) -> Path:
        h = self.http
        return resolve_path(self.base_dir, h.token_file) if h.token_file else self.data_dir / "http-token"

    def destination(self, name: str) -> Destination:
        return next(d for d in self.destinations if d.name == name)

    def model(self, name: str) -> ModelSpec:
        return next(m for m in self.models if m.name == name)

    def bundle_path(self, name: str) -> Path:
        return resolve_path(self.base_dir, self.model(name).bundle)


def resolve_path(base: Path, value: str) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else (base / p)


_TABLE_LISTS = {"destinations": Destination, "models": ModelSpec, "routes": Route}


def _convert(value: Any, hint: Any, key: str) -> Any:
    origin = get_origin(hint)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item,) = {a for a in get_args(hint) if a is not Ellipsis}
        return tuple(_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table, got {value!r}")
        value_hint = get_args(hint)[1]
        return {str(k): _convert(v, value_hint, f"{key}.{k}") for k, v in value.items()}
    raise ConfigError(f"{key}: unsupported type")  # pragma: no cover - schema bug


def _build(cls: type, raw: Any, key: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{key}: expected a table, got {raw!r}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"{key}.{unknown[0]}: unknown key" if key else f"{unknown[0]}: unknown key")
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        sub = f"{key}.{name}" if key else name
        if name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{sub}: required key is missing")
            continue
        kwargs[name] = _convert(raw[name], hints[name], sub)
    return cls(**kwargs)


def parse_config(data: dict[str, Any], base_dir: Path) -> Config:
    """Validate a parsed TOML document; every error names its key."""
    sections = {f.name: f for f in dataclasses.fields(Config) if f.name != "base_dir"}
    unknown = sorted(set(data) - set(sections))
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown key")
    hints = get_type_hints(Config)
    kwargs: dict[str, Any] = {"base_dir": base_dir}
    for name in sections:
        if name not in data:
            continue
        if name in _TABLE_LISTS:
            items = data[name]
            if not isinstance(items, list):
                raise ConfigError(f"{name}: expected an array of tables ([[{name}]])")
            kwargs[name] = tuple(_build(_TABLE_LISTS[name], it, f"{name}[{i}]") for i, it in enumerate(items))
        else:
            kwargs[name] = _build(hints[name], data[name], name)
    cfg = Config(**kwargs)
    _validate(cfg)
    return cfg


def _validate_series_numbers(cfg: Config) -> None:
    """The SEGs take seg_series_number onwards, one per configured model at most: the SRs and the rejection notes
    must not share."""
    r = cfg.results
    segs = range(r.seg_series_number, r.seg_series_number + max(1, len(cfg.models)))
    if r.sr_series_number in segs:
        raise ConfigError(
            f"results.sr_series_number: {r.sr_series_number} is among the SEGs' {segs.start}-{segs.stop - 1}"
        )
    if r.findings_sr_series_number in segs or r.findings_sr_series_number == r.sr_series_number:
        raise ConfigError(
            f"results.findings_sr_series_number: {r.findings_sr_series_number} is the SR's or among the SEGs' numbers"
        )
    if r.rejection_series_number in segs or r.rejection_series_number in (
        r.sr_series_number,
        r.findings_sr_series_number,
    ):
        raise ConfigError(
            f"results.rejection_series_number: {r.rejection_series_number} is an SR's or among the SEGs' numbers"
        )


def _unique(names: list[str], key: str) -> None:
    seen: set[str] = set()
    for i, n in enumerate(names):
        if n in seen:
            raise ConfigError(f"{key}[{i}].name: duplicate name {n!r}")
        seen.add(n)


def _check_ae(value: str, key: str) -> None:
    if not AE_RE.match(value) or value.strip() == "":
        raise ConfigError(f"{key}: invalid AE title {value!r} (1-16 characters, no backslash)")


def _check_port(value: int, key: str, *, lowest: int = 0) -> None:
    """``lowest`` 1 for a peer's port (0 asks the system for any free port: only ever a port of our own)."""
    if not lowest <= value <= 65535:
        raise ConfigError(f"{key}: port {value} out of range {lowest}-65535")


def _check_database_url(url: str) -> None:
    """SQLite or PostgreSQL (the job store's SQL is written for those two), with its driver installed."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    if not url:
        return
    try:
        u = make_url(url)
    except ArgumentError as exc:
        raise ConfigError(f"node.database_url: not a database URL: {exc}") from exc
    if u.get_backend_name() not in ("sqlite", "postgresql"):
        raise ConfigError(
            f"node.database_url: expected sqlite:///PATH or postgresql+psycopg://USER@HOST/DB, "
            f"got a {u.get_backend_name()} URL"
        )
    try:
        u.get_dialect().import_dbapi()
    except ImportError as exc:
        raise ConfigError(
            f"node.database_url: the {u.drivername} driver is not installed ({exc}); for PostgreSQL "
            "use postgresql+psycopg://... after .venv/bin/pip install -e '.[postgres]'"
        ) from exc


def _validate(cfg: Config) -> None:
    """Section by section; the first error found stops the start with its key named."""
    _validate_series_numbers(cfg)
    _validate_node(cfg.node)
    for i, ae in enumerate(cfg.security.allowed_calling_ae_titles):
        _check_ae(ae, f"security.allowed_calling_ae_titles[{i}]")
    _validate_security(cfg)
    _validate_jobs(cfg)
    _validate_retention(cfg.retention)
    _validate_http(cfg)
    _validate_audit_and_logging(cfg)
    _unique([d.name for d in cfg.destinations], "destinations")
    _unique([m.name for m in cfg.models], "models")
    _unique([r.name for r in cfg.routes], "routes")
    _validate_destinations(cfg)
    _validate_models(cfg)
    _validate_routes(cfg)


def _validate_node(n: NodeSection) -> None:
    _check_ae(n.ae_title, "node.ae_title")
    _check_port(n.port, "node.port")
    _check_database_url(n.database_url)
    if n.sqlite_synchronous.upper() not in {"OFF", "NORMAL", "FULL", "EXTRA"}:
        raise ConfigError(f"node.sqlite_synchronous: expected OFF, NORMAL, FULL or EXTRA, got {n.sqlite_synchronous!r}")
    if n.duplicate_policy not in {"keep_first", "replace"}:
        raise ConfigError(f"node.duplicate_policy: expected keep_first or replace, got {n.duplicate_policy!r}")
    for k in ("max_pdu_size", "max_associations", "max_instance_mb"):
        if getattr(n, k) <= 0:
            raise ConfigError(f"node.{k}: must be positive")
    if n.min_free_mb < 0:
        raise ConfigError("node.min_free_mb: must not be negative")
    if not 0 <= n.listener_processes <= 64:
        raise ConfigError("node.listener_processes: expected 0 (one per CPU core) to 64")


def _validate_jobs(cfg: Config) -> None:
    """Completion, worker and sender: when a study is done and how often its job and deliveries are tried."""
    if cfg.completion.stable_seconds < 0:
        raise ConfigError("completion.stable_seconds: must not be negative")
    if cfg.completion.late_arrivals not in {"rerun", "ignore"}:
        raise ConfigError(f"completion.late_arrivals: expected rerun or ignore, got {cfg.completion.late_arrivals!r}")
    if cfg.worker.max_attempts < 1:
        raise ConfigError("worker.max_attempts: must be at least 1")
    if cfg.sender.max_attempts < 1:
        raise ConfigError("sender.max_attempts: must be at least 1")


def _validate_audit_and_logging(cfg: Config) -> None:
    if cfg.audit.max_bytes < 4096:
        raise ConfigError("audit.max_bytes: must be at least 4096")
    if not 0 <= cfg.audit.backups <= 1000:
        raise ConfigError("audit.backups: expected 0 to 1000")
    if cfg.logging.level.upper() not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise ConfigError(f"logging.level: expected DEBUG, INFO, WARNING or ERROR, got {cfg.logging.level!r}")
    if cfg.logging.format not in {"logfmt", "json"}:
        raise ConfigError(f"logging.format: expected logfmt or json, got {cfg.logging.format!r}")


def _validate_destinations(cfg: Config) -> None:
    for i, d in enumerate(cfg.destinations):
        _check_ae(d.ae_title, f"destinations[{i}].ae_title")
        _check_port(d.port, f"destinations[{i}].port", lowest=1)
        if d.calling_ae_title:
            _check_ae(d.calling_ae_title, f"destinations[{i}].calling_ae_title")


def _validate_models(cfg: Config) -> None:
    for i, m in enumerate(cfg.models):
        if not (cfg.bundle_path(m.name) / "configs").is_dir():
            raise ConfigError(f"models[{i}].bundle: no MONAI bundle at {cfg.bundle_path(m.name)} (configs/ missing)")
        if m.min_score != -1.0 and not 0.0 <= m.min_score <= 1.0:
            raise ConfigError(f"models[{i}].min_score: must be between 0 and 1, or -1 for the bundle's own")


def _validate_routes(cfg: Config) -> None:
    """Routes name known models and destinations, and match on DICOM keywords with valid patterns."""
    model_names = {m.name for m in cfg.models}
    dest_names = {d.name for d in cfg.destinations}
    for i, r in enumerate(cfg.routes):
        for j, model in enumerate(r.models):
            if model not in model_names:
                raise ConfigError(f"routes[{i}].models[{j}]: unknown model {model!r}")
        for j, dest in enumerate(r.send_to):
            if dest not in dest_names:
                raise ConfigError(f"routes[{i}].send_to[{j}]: unknown destination {dest!r}")
        if r.series not in {"largest_axial"}:
            raise ConfigError(f"routes[{i}].series: expected 'largest_axial', got {r.series!r}")
        for kw, pattern in r.match.items():
            _check_match(f"routes[{i}].match.{kw}", kw, pattern)


def _check_match(where: str, keyword: str, pattern: str) -> None:
    if tag_for_keyword(keyword) is None:
        raise ConfigError(f"{where}: not a DICOM keyword")
    if pattern.startswith("/") and pattern.endswith("/") and len(pattern) >= 2:
        try:
            re.compile(pattern[1:-1])
        except re.error as exc:
            raise ConfigError(f"{where}: invalid regex: {exc}") from exc


def _validate_retention(r: RetentionSection) -> None:
    for k in ("keep_received_hours", "keep_results_days", "keep_failed_days", "keep_history_days"):
        if getattr(r, k) < 0:
            raise ConfigError(f"retention.{k}: must not be negative")
    if not 0 < r.low_watermark_percent < r.high_watermark_percent <= 100:
        raise ConfigError(
            "retention.low_watermark_percent, retention.high_watermark_percent: expected "
            f"0 < low < high <= 100, got {r.low_watermark_percent} and {r.high_watermark_percent}"
        )
    if r.interval_seconds <= 0:
        raise ConfigError("retention.interval_seconds: must be positive")


def _validate_http(cfg: Config) -> None:
    h = cfg.http
    _check_port(h.port, "http.port")
    try:
        ipaddress.ip_address(h.bind)
    except ValueError as exc:
        raise ConfigError(f"http.bind: not an IP address: {h.bind!r}") from exc
    if h.enabled and h.port == cfg.node.port and h.port:
        raise ConfigError(f"http.port: {h.port} is node.port")
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", h.token_env):
        raise ConfigError(f"http.token_env: not an environment variable name: {h.token_env!r}")
    _check_tls_files(cfg, "http", h.tls_cert_file, h.tls_key_file, "", h.tls_min_version)


def _check_tls_files(cfg: Config, section: str, cert: str, key: str, ca: str, min_version: str) -> None:
    """The TLS rules shared by the DICOM port and the HTTP server: a version we allow, a key with a
    certificate, and files that exist."""
    if min_version not in TLS_VERSIONS:
        raise ConfigError(f'{section}.tls_min_version: expected "1.2" or "1.3", got {min_version!r}')
    if not cert:
        if key:
            raise ConfigError(f"{section}.tls_key_file: set without {section}.tls_cert_file")
        return
    if not key:
        raise ConfigError(f"{section}.tls_key_file: required with {section}.tls_cert_file")
    for k, v in (("tls_cert_file", cert), ("tls_key_file", key), ("tls_ca_file", ca)):
        if v and not resolve_path(cfg.base_dir, v).is_file():
            raise ConfigError(f"{section}.{k}: file not found: {resolve_path(cfg.base_dir, v)}")


def _validate_security(cfg: Config) -> None:
    s = cfg.security
    listed = set(s.allowed_calling_ae_titles)
    for ae, hosts in s.allowed_hosts.items():
        key = f"security.allowed_hosts.{ae}"
        if ae != ANY_AE:
            _check_ae(ae, key)
            if listed and ae not in listed:
                raise ConfigError(f"{key}: AE title not in security.allowed_calling_ae_titles")
        if not hosts:
            raise ConfigError(f"{key}: empty list (remove the entry to allow any host)")
        for i, h in enumerate(hosts):
            try:
                ipaddress.ip_network(h.strip(), strict=False)
            except ValueError as exc:
                raise ConfigError(f"{key}[{i}]: not an IP address or CIDR block: {h!r}") from exc
    if not s.tls_cert_file:
        for k in ("tls_ca_file", "tls_require_client_cert"):
            if getattr(s, k):
                raise ConfigError(f"security.{k}: set without security.tls_cert_file")
    elif s.tls_require_client_cert and not s.tls_ca_file:
        raise ConfigError("security.tls_ca_file: required with security.tls_require_client_cert")
    _check_tls_files(cfg, "security", s.tls_cert_file, s.tls_key_file, s.tls_ca_file, s.tls_min_version)


def load_config(path: str | Path) -> Config:
    p = Path(path)
    try:
        with p.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError as exc:
        raise ConfigError(f"config file not found: {p}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: not valid TOML: {exc}") from exc
    return parse_config(data, p.resolve().parent)
