"""site.yaml: loading, path resolution, and errors that name file, line and field."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from pydantic import BaseModel, ConfigDict

from dvx_dr.errors import UserError
from dvx_dr.site.config import (
    HostPort,
    SiteConfig,
    check_site_name,
    load_site_config,
    parse_host_port,
)
from dvx_dr.yamlerrors import load_yaml_model

GOOD = """\
name: site-a
store: store
listen: 127.0.0.1:8443
tls:
  cert: tls/site-a.crt
  key: tls/site-a.key
  ca: /etc/dvx-dr/ca.crt
admin_socket: run/admin.sock
peers:
  site-b: https://10.0.0.2:8443
  site-c: https://[fd00::3]:9443/
"""


def _write(tmp_path: Path, text: str, name: str = "site.yaml") -> Path:
    directory = tmp_path / "conf"
    directory.mkdir(exist_ok=True)
    path = directory / name
    path.write_text(textwrap.dedent(text))
    return path


def _error(path: Path) -> str:
    with pytest.raises(UserError) as info:
        load_site_config(path)
    return str(info.value)


def test_good_config_loads_and_relative_paths_resolve_against_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, GOOD)
    conf = tmp_path / "conf"

    config = load_site_config(path)

    assert config.name == "site-a"
    assert config.store == conf / "store"
    assert config.listen == HostPort("127.0.0.1", 8443)
    assert (config.listen.host, config.listen.port) == ("127.0.0.1", 8443)
    assert config.tls.cert == conf / "tls/site-a.crt"
    assert config.tls.key == conf / "tls/site-a.key"
    assert config.tls.ca == Path("/etc/dvx-dr/ca.crt")  # absolute stays as written
    assert config.admin_socket == conf / "run/admin.sock"
    assert config.peers == {"site-b": "https://10.0.0.2:8443", "site-c": "https://[fd00::3]:9443"}
    assert config.startup_key is None and config.policy_dir is None
    assert config.model_dump(mode="json")["listen"] == "127.0.0.1:8443"


def test_relative_paths_resolve_against_the_file_not_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write(tmp_path, GOOD + "policy_dir: policies\nstartup_key: ../keys/startup.key\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    config = load_site_config(Path("../conf/site.yaml"))

    assert config.store.resolve() == (tmp_path / "conf/store").resolve()
    assert config.store.is_absolute()
    assert config.policy_dir is not None
    assert config.policy_dir.resolve() == (tmp_path / "conf/policies").resolve()
    assert config.startup_key is not None
    assert config.startup_key.resolve() == (tmp_path / "keys/startup.key").resolve()


def test_bad_peer_url_names_file_line_and_field(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        """\
        name: site-a
        store: store
        listen: 127.0.0.1:8443
        tls: {cert: a.crt, key: a.key, ca: ca.crt}
        admin_socket: admin.sock
        peers:
          site-b: foo
        """,
    )
    assert _error(path) == (
        f"{path} line 7: peers.site-b: expected a URL like https://host:port, got 'foo'"
    )


@pytest.mark.parametrize(
    "url",
    ["ftp://10.0.0.2:8443", "https://10.0.0.2", "https://:8443", "https://h:99999",
     "https://h:8443/api", "https://u:p@h:8443", "https://h:8443?x=1"],
)  # fmt: skip
def test_malformed_peer_urls_are_rejected(tmp_path: Path, url: str) -> None:
    path = _write(tmp_path, GOOD.replace("https://10.0.0.2:8443", url))
    message = _error(path)
    assert f"{path} line 10: peers.site-b: expected a URL like https://host:port" in message


def test_plaintext_peer_is_refused(tmp_path: Path) -> None:
    text = GOOD.replace("https://10.0.0.2:8443", "http://10.0.0.2:8080")
    path = _write(tmp_path, text)
    assert _error(path) == (
        f"{path} line 10: peers.site-b: expected https://host:port, got "
        "'http://10.0.0.2:8080': sites replicate only over mutual TLS"
    )
    path = _write(tmp_path, text + "allow_plaintext: true\n")
    assert "allow_plaintext" in _error(path)


def test_unknown_field_names_file_line_and_the_allowed_fields(tmp_path: Path) -> None:
    path = _write(tmp_path, GOOD.replace("  key: tls/site-a.key", "  keyfile: tls/site-a.key"))
    message = _error(path)
    assert f"{path} line 6: tls.keyfile: unknown field (expected one of: cert, key, ca)" in message
    assert f"{path} line 4: tls.key: required field is missing" in message

    path = _write(tmp_path, GOOD + "listne: 0.0.0.0:1\n")
    assert _error(path).startswith(f"{path} line 12: listne: unknown field (expected one of: name,")


def test_malformed_yaml_names_file_and_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "name: site-a\nstore: store\ntls:\n  cert: [a.crt\n  key: x\n")
    message = _error(path)
    assert message.startswith(f"{path} line ")
    assert "not valid YAML" in message

    path = _write(tmp_path, "name: site-a\nstore: store: nested\n")
    assert _error(path) == f"{path} line 2: not valid YAML: mapping values are not allowed here"


def test_missing_required_field_at_top_level_names_the_mapping_line(tmp_path: Path) -> None:
    path = _write(tmp_path, GOOD.replace("store: store\n", ""))
    assert _error(path) == f"{path} line 1: store: required field is missing"


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("name: site-a", "name: Site_A",
         "line 1: name: expected a site name of 1-63 lowercase letters, digits and hyphens, "
         "starting with a letter or digit, got 'Site_A'"),
        ("listen: 127.0.0.1:8443", "listen: 127.0.0.1",
         "line 3: listen: expected host:port like 127.0.0.1:8443 or [::1]:8443, got '127.0.0.1'"),
        ("listen: 127.0.0.1:8443", "listen: 127.0.0.1:0",
         "line 3: listen: port must be between 1 and 65535, got 0"),
        ("listen: 127.0.0.1:8443", "listen: '::1:8443'",
         "line 3: listen: expected host:port like 127.0.0.1:8443 or [::1]:8443, got '::1:8443' "
         "(put an IPv6 address in brackets)"),
        ("listen: 127.0.0.1:8443", "listen: 8443", "line 3: listen: expected host:port"),
        ("  site-c:", "  Site-C:", "line 11: peers.Site-C: expected a site name of"),
        ("  site-c:", "  site-a:",
         "line 11: peers.site-a: 'site-a' is this site's own name; list only the other sites"),
        ("tls:\n  cert: tls/site-a.crt\n  key: tls/site-a.key\n  ca: /etc/dvx-dr/ca.crt\n",
         "tls: none\n", "line 4: tls: expected a mapping, got 'none'"),
        ("store: store", "store: ''", "line 2: store: expected a path, got an empty string"),
    ],
)  # fmt: skip
def test_field_errors(tmp_path: Path, old: str, new: str, expected: str) -> None:
    assert old in GOOD
    path = _write(tmp_path, GOOD.replace(old, new))
    assert f"{path} {expected}" in _error(path)


def test_ipv6_listen_address(tmp_path: Path) -> None:
    path = _write(tmp_path, GOOD.replace("127.0.0.1:8443", "'[::1]:8443'"))
    config = load_site_config(path)
    assert config.listen == HostPort("::1", 8443)
    assert str(config.listen) == "[::1]:8443"


def test_startup_key_inside_the_store_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path, GOOD + "startup_key: store/startup.key\n")
    message = _error(path)
    assert message.startswith(f"{path} line 12: startup_key: ")
    assert "is inside the store directory" in message


def test_admin_socket_path_too_long_for_unix_sockets(tmp_path: Path) -> None:
    path = _write(tmp_path, GOOD.replace("run/admin.sock", "/" + "s" * 120))
    assert "line 8: admin_socket: the path is 121 bytes long" in _error(path)


def test_duplicate_keys_are_an_error(tmp_path: Path) -> None:
    path = _write(tmp_path, GOOD + "name: site-z\n")
    assert _error(path) == f"{path} line 12: duplicate key 'name' (first given on line 1)"


def test_several_errors_are_reported_in_line_order(tmp_path: Path) -> None:
    text = GOOD.replace("name: site-a", "name: A").replace("https://10.0.0.2:8443", "nope")
    path = _write(tmp_path, text)
    assert _error(path) == (
        f"{path} line 1: name: expected a site name of 1-63 lowercase letters, digits and "
        "hyphens, starting with a letter or digit, got 'A'; "
        f"{path} line 10: peers.site-b: expected a URL like https://host:port, got 'nope'"
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [("", "the file is empty"), ("# only a comment\n", "the file is empty"),
     ("- a\n- b\n", "expected a mapping, got ['a', 'b']"),
     ("a: 1\n---\nb: 2\n",
      "line 2: not valid YAML: expected a single document in the stream, but found another")],
)  # fmt: skip
def test_not_a_mapping(tmp_path: Path, text: str, expected: str) -> None:
    path = _write(tmp_path, text)
    assert expected in _error(path)


def test_missing_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    assert _error(path) == f"{path}: no such file"


def test_check_site_name() -> None:
    assert check_site_name("site-a") == "site-a"
    with pytest.raises(UserError, match="^peer: expected a site name of 1-63 lowercase letters"):
        check_site_name("Site A", what="peer")
    with pytest.raises(UserError):
        check_site_name("site-a\n")


def test_parse_host_port() -> None:
    assert parse_host_port("localhost:1") == ("localhost", 1)
    assert parse_host_port("[fd00::1]:65535") == HostPort("fd00::1", 65535)
    with pytest.raises(ValueError, match="expected host:port"):
        parse_host_port("localhost:http")


def test_model_can_be_built_without_a_file() -> None:
    config = SiteConfig.model_validate(
        {
            "name": "site-a",
            "store": "/srv/store",
            "listen": "0.0.0.0:8443",
            "tls": {"cert": "/c", "key": "/k", "ca": "/ca"},
            "admin_socket": "/run/a.sock",
        }
    )
    assert config.peers == {}
    assert config.store == Path("/srv/store")


# The loader is shared with the policy files; its sequence and nesting rules are checked here on a
# small model of that shape.


class _Target(BaseModel):
    model_config = ConfigDict(extra="forbid")
    site: str
    rpo: int


class _Policy(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    replication: list[_Target] | None = None


def test_loader_locates_errors_inside_lists(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        """\
        name: finance
        replication:
          - site: site-b
            rpo: 15
          - site: site-c
            rpo: soon
            bandwidth: 10
        """,
        name="finance.yaml",
    )
    with pytest.raises(UserError) as info:
        load_yaml_model(path, _Policy, kind="policy")
    assert str(info.value) == (
        f"policy {path} line 6: replication[1].rpo: expected a valid integer, unable to parse "
        f"string as an integer, got 'soon'; policy {path} line 7: replication[1].bandwidth: "
        "unknown field (expected one of: site, rpo)"
    )
