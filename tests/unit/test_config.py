"""config.toml: defaults that work, every error names its key."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest

from dicom_node.config import ConfigError, Destination, ModelSpec, Route, load_config, parse_config
from tests.peers import REPO


def test_shipped_config_loads_with_working_defaults() -> None:
    cfg = load_config(REPO / "config.toml")
    assert cfg.node.ae_title == "DICOM_NODE" and cfg.node.port == 11112
    assert cfg.database_url.startswith("sqlite:///") and cfg.database_url.endswith("var/node.db")
    assert cfg.bundle_path("lung-seg") == REPO / "ai_models" / "bundles" / "lung_seg"
    assert not any("fixtures" in m.bundle for m in cfg.models)  # the product ships real models, not the test fixtures
    assert [r.name for r in cfg.routes] == ["chest-ct"]
    assert cfg.routes[0].send_to == ("pacs",)


def test_shipped_config_shows_every_key_with_its_default() -> None:
    """The README's promise: an admin finds every key in the shipped file, set to what the node would use
    without it (security.allowed_hosts, a table of the admin's own titles, is shown commented out)."""
    shipped = tomllib.loads((REPO / "config.toml").read_text())
    cfg = load_config(REPO / "config.toml")
    for section in ("node", "security", "completion", "worker", "sender", "results", "http", "audit", "logging"):
        schema = type(getattr(cfg, section))
        keys = {f.name for f in dataclasses.fields(schema)} - ({"allowed_hosts"} if section == "security" else set())
        assert set(shipped[section]) == keys, section
        defaults = schema()
        for key in keys:
            if section == "node" and key in ("bind",):
                continue
            assert getattr(getattr(cfg, section), key) == getattr(defaults, key), f"{section}.{key}"
    for array, schema in (("destinations", Destination), ("models", ModelSpec), ("routes", Route)):
        shown = set().union(*(set(item) for item in shipped[array]))  # each key in one entry at least
        assert shown == {f.name for f in dataclasses.fields(schema)}, array
    assert "# [security.allowed_hosts]" in (REPO / "config.toml").read_text()


def test_empty_config_is_valid() -> None:
    cfg = parse_config({}, Path("/tmp"))
    assert cfg.completion.stable_seconds == 30
    assert cfg.data_dir == Path("/tmp/var")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"nodee": {}}, "nodee: unknown key"),
        ({"node": {"portt": 1}}, "node.portt: unknown key"),
        ({"node": {"port": "11112"}}, "node.port: expected an integer"),
        ({"node": {"port": 70000}}, "node.port: port 70000 out of range"),
        ({"node": {"ae_title": "A" * 17}}, "node.ae_title: invalid AE title"),
        ({"node": {"sqlite_synchronous": "SOMETIMES"}}, "node.sqlite_synchronous"),
        ({"completion": {"stable_seconds": -1}}, "completion.stable_seconds"),
        ({"destinations": [{"name": "p", "ae_title": "P", "host": "h"}]}, "destinations[0].port: required key"),
        (
            {"destinations": [{"name": "p", "ae_title": "P", "host": "h", "port": 0}]},
            "destinations[0].port: port 0 out of range 1-65535",
        ),
        (
            {"destinations": [{"name": "p", "ae_title": "P", "host": "h", "port": 1, "colour": "red"}]},
            "destinations[0].colour: unknown key",
        ),
        (
            {"routes": [{"name": "r", "models": [], "send_to": ["pac"]}]},
            "routes[0].send_to[0]: unknown destination 'pac'",
        ),
        ({"routes": [{"name": "r", "models": ["nope"], "send_to": []}]}, "routes[0].models[0]: unknown model 'nope'"),
        (
            {"routes": [{"name": "r", "models": [], "send_to": [], "match": {"Modalty": "CT"}}]},
            "routes[0].match.Modalty: not a DICOM keyword",
        ),
        (
            {"routes": [{"name": "r", "models": [], "send_to": [], "match": {"Modality": "/CT(/"}}]},
            "routes[0].match.Modality: invalid regex",
        ),
        ({"models": [{"name": "m", "bundle": "/nonexistent"}]}, "models[0].bundle: no MONAI bundle"),
        (
            {
                "models": [
                    {
                        "name": "m",
                        "bundle": str(Path(__file__).resolve().parents[2] / "ai_models/bundles/lung_seg"),
                        "min_score": 1.5,
                    }
                ]
            },
            "models[0].min_score: must be between 0 and 1, or -1",
        ),
        ({"results": {"sr_series_number": 9001}}, "results.sr_series_number: 9001 is among the SEGs' 9001-9001"),
        ({"results": {"findings_sr_series_number": 9000}}, "results.findings_sr_series_number: 9000 is the SR's"),
        ({"results": {"rejection_series_number": 9100}}, "results.rejection_series_number: 9100 is an SR's"),
        ({"results": {"rejection_series_number": 9001}}, "results.rejection_series_number: 9001 is an SR's or among"),
        ({"node": {"database_url": "mysql://u@h/db"}}, "node.database_url: expected sqlite:///PATH or postgresql"),
        ({"node": {"database_url": "postgresql+pg8000://u@h/db"}}, "node.database_url: the postgresql.pg8000 driver"),
        ({"node": {"database_url": "not a url"}}, "node.database_url: not a database URL"),
        (
            {
                "destinations": [
                    {"name": "p", "ae_title": "P", "host": "h", "port": 1},
                    {"name": "p", "ae_title": "Q", "host": "h", "port": 2},
                ]
            },
            "destinations[1].name: duplicate",
        ),
    ],
)
def test_errors_name_the_key(data: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")):
        parse_config(data, Path("/tmp"))


def test_bad_toml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "c.toml"
    bad.write_text("[node\nport = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml")
