"""How a store command finds its store (``--store``, ``--config``, ``$DVX_DR_STORE``,
``$DVX_DR_CONFIG``), and what an empty option says."""

from __future__ import annotations

from pathlib import Path

import pytest

from dvx_dr.cli import build_parser, main
from dvx_dr.cli.context import store_path

SITE_YAML = """\
name: site-a
store: {store}
listen: 127.0.0.1:8443
tls: {{cert: a.crt, key: a.key, ca: ca.crt}}
admin_socket: admin.sock
"""


def config(path: Path, store: str) -> Path:
    path.write_text(SITE_YAML.format(store=store))
    return path


def chosen(argv: list[str]) -> Path:
    return store_path(build_parser(argv).parse_args(argv))


@pytest.mark.parametrize("argv", [["volume", "list"], ["datastore", "stats"],
                                  ["snapshot", "list"], ["pg", "snapshots"],
                                  ["datastore", "encryption", "status"]])
def test_store_commands_take_the_store_of_DVX_DR_CONFIG(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, argv: list[str]) -> None:
    """The README says ``$DVX_DR_CONFIG`` is the default for ``--config``, and every store
    command takes ``--config``: with neither ``--store`` nor ``$DVX_DR_STORE``, it names the
    store (it was ignored: "no store given")."""
    monkeypatch.setenv("DVX_DR_CONFIG", str(config(tmp_path / "site.yaml", "st")))
    assert chosen(argv) == tmp_path / "st"


def test_options_win_over_the_environment_and_a_store_over_a_config(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--store, then --config, then $DVX_DR_STORE, then $DVX_DR_CONFIG."""
    env_config = config(tmp_path / "env.yaml", "env-config-store")
    option_config = config(tmp_path / "option.yaml", "option-config-store")
    monkeypatch.setenv("DVX_DR_CONFIG", str(env_config))
    monkeypatch.setenv("DVX_DR_STORE", str(tmp_path / "env-store"))
    base = ["volume", "list"]
    assert chosen(base) == tmp_path / "env-store"
    assert chosen([*base, "--config", str(option_config)]) == tmp_path / "option-config-store"
    assert chosen([*base, "--store", "s", "--config", str(option_config)]) == Path("s")
    monkeypatch.setenv("DVX_DR_STORE", "")  # set but empty: as if unset
    assert chosen(base) == tmp_path / "env-config-store"


@pytest.mark.parametrize(("argv", "option"), [
    (["volume", "list", "--store", ""], "--store"),
    (["volume", "list", "--store="], "--store"),
    (["datastore", "stats", "--config", ""], "--config"),
    (["snapshot", "list", "--config="], "--config"),
    (["datastore", "unlock", "--store", ""], "--store"),
])
def test_an_empty_store_or_config_is_refused_by_its_name(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        argv: list[str], option: str) -> None:
    """An empty value (an unset shell variable) is refused by the option's name, in one line,
    exit 2, even with a store in the environment: it was taken for '.', the current
    directory ("'.' is not a dvx-dr store", ".: is a directory, expected a YAML file")."""
    monkeypatch.setenv("DVX_DR_STORE", str(tmp_path / "env-store"))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [f"dvx-dr: error: {option} is empty; give the path of "
                                + ("the store directory" if option == "--store"
                                   else "the site's site.yaml")]
