"""What an admin sees when the node cannot start or a command cannot run: one line naming the config key,
exit status 2, no traceback; and `check-config` finds what would otherwise fail only once the node runs."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import pytest
import torch

from dicom_node.cli import main
from tests.fault_models import write_fault_bundle
from tests.peers import free_port, write_config


def _config(
    tmp_path: Path,
    *,
    data_dir: Path | None = None,
    models: str = "",
    port: int = 0,
    node_extra: str = "",
    worker_device: str = "",
) -> Path:
    cfg = write_config(
        tmp_path / "config.toml",
        port=port or free_port(),
        data_dir=data_dir or tmp_path / "var",
        destinations=[{"name": "pacs", "port": 4242}],
        models=models,
        routes="",
        node_extra=node_extra,
    )
    if worker_device:
        cfg.write_text(cfg.read_text().replace('device = "cpu"', f'device = "{worker_device}"'))
    return cfg


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_admin_commands_refuse_a_data_dir_without_a_node_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A mistyped data_dir used to get an empty store made there, and `status` said "no jobs"."""
    cfg = _config(tmp_path, data_dir=tmp_path / "typo")
    for argv in (["status"], ["jobs"], ["retry", "1"], ["cancel", "1"]):
        rc, _, err = _run(capsys, "--config", str(cfg), *argv)
        assert rc == 2 and "node.data_dir: no node data in" in err and str(tmp_path / "typo") in err, (argv, err)
    assert not (tmp_path / "typo").exists()


def test_an_unusable_data_dir_is_named_by_serve_and_check_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "a-file").write_text("not a folder")
    cfg = _config(tmp_path, data_dir=tmp_path / "a-file" / "var")
    for argv in (["serve"], ["check-config"]):
        rc, _, err = _run(capsys, "--config", str(cfg), *argv)
        assert rc == 2 and err.startswith("config error: node.data_dir: cannot use"), (argv, err)
        assert "Traceback" not in err


def test_serve_names_the_port_another_program_holds(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = _config(tmp_path, port=port, node_extra="listener_processes = 2")  # the pool's bind, as by default
        rc, _, err = _run(capsys, "--config", str(cfg), "serve")
    assert rc == 2 and f"node.port: cannot listen on 127.0.0.1:{port}: Address already in use" in err, err


def test_check_config_loads_every_model_as_the_worker_will(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = write_fault_bundle(tmp_path / "bundles", "good")
    weightless = write_fault_bundle(tmp_path / "bundles", "weightless")
    shutil.rmtree(weightless / "models")
    models = "".join(f'[[models]]\nname = "{b.name}"\nbundle = "{b}"\n' for b in (good, weightless))
    rc, out, err = _run(capsys, "--config", str(_config(tmp_path, models=models)), "check-config")
    assert rc == 2 and not out
    assert err.startswith("models[1] (weightless): ") and "has neither models/model.pt" in err, err
    assert "good" not in err

    only_good = f'[[models]]\nname = "good"\nbundle = "{good}"\n'
    rc, out, _ = _run(capsys, "--config", str(_config(tmp_path, models=only_good)), "check-config")
    assert rc == 0 and ": OK (1 destinations, 1 models" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_cuda_device_on_a_machine_without_one_is_reported_not_raised(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = write_fault_bundle(tmp_path / "bundles", "good")
    cfg = _config(tmp_path, models=f'[[models]]\nname = "good"\nbundle = "{good}"\n', worker_device="cuda")
    rc, _, err = _run(capsys, "--config", str(cfg), "check-config")
    assert rc == 2 and err.startswith("models[0] (good): ") and "CUDA is not available" in err, err
    rc, out, _ = _run(capsys, "--config", str(cfg), "models")
    assert rc == 2 and "good" in out and "error: " in out and "CUDA is not available" in out, out


def test_with_a_database_url_admin_commands_need_no_local_data_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Several machines sharing one database: an admin may query it from a host without the shared folder."""
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    (tmp_path / "a").mkdir()
    serve_side = _config(tmp_path / "a", data_dir=tmp_path / "a" / "var", node_extra=f'database_url = "{url}"')
    from dicom_node.config import load_config
    from dicom_node.runtime import open_runtime

    open_runtime(load_config(serve_side))  # a node made the store
    (tmp_path / "b").mkdir()
    admin_side = _config(tmp_path / "b", data_dir=tmp_path / "b" / "nowhere", node_extra=f'database_url = "{url}"')
    rc, out, err = _run(capsys, "--config", str(admin_side), "status")
    assert rc == 0 and "instances: 0" in out, err
    assert not (tmp_path / "b" / "nowhere").exists()  # and nothing was made on this host


def test_make_phantom_names_a_malformed_shape(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A shape that is not ZxYxX is a usage error naming the option, not a traceback from inside the phantom."""
    for shape in ("120x256", "120x256xA"):
        with pytest.raises(SystemExit) as exit_info:
            main(["make-phantom", str(tmp_path / "out"), "--shape", shape])
        assert exit_info.value.code == 2
        assert "--shape: expected ZxYxX" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
