"""The site configuration file, ``site.yaml``, and the rule for site names.

Example (relative paths are taken relative to the directory holding ``site.yaml``)::

    name: site-a                      # 1-63 of a-z 0-9 -, not starting with -
    store: /var/lib/dvx-dr/store      # the store directory
    listen: 0.0.0.0:8443              # host:port of the replication API ([::1]:8443 for IPv6)
    tls:
      cert: tls/site-a.crt            # this site's certificate, issued by `dvx-dr pki issue-site`
      key: tls/site-a.key
      ca: tls/ca.crt                  # the operators' CA; peers must present a cert from it
    admin_socket: /run/dvx-dr/site-a.sock
    startup_key: /etc/dvx-dr/site-a.startup-key   # optional; absent = the site starts locked
    policy_dir: policies              # optional; protection-group policy files
    peers:                            # the sites this one replicates with, by name
      site-b: https://10.0.0.2:8443

The file is loaded once, at the entry point, with :func:`load_site_config`; errors name the file,
the line and the field (see :mod:`dvx_dr.yamlerrors`). It may hold at most ``MAX_SITE_FILE_BYTES``
bytes; a larger file is refused before it is parsed.

The site-name rule lives here, at the bottom of the layering, because the replicator's PKI (which
writes site names into certificates) and the CLI both need it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, NamedTuple
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    PlainSerializer,
    ValidationInfo,
    field_validator,
)

from dvx_dr.errors import UserError
from dvx_dr.yamlerrors import BASE_DIR, load_yaml_model

_SITE_NAME_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
SITE_NAME_RULE = "1-63 lowercase letters, digits and hyphens, starting with a letter or digit"

#: The largest site.yaml read (one is a few hundred bytes; a megabyte of YAML takes seconds).
MAX_SITE_FILE_BYTES = 1024 * 1024

# Linux's sun_path is 108 bytes including the terminating NUL.
_MAX_SOCKET_PATH = 107


def site_name_error(name: object) -> str | None:
    """Why ``name`` is not a valid site name, or None when it is one."""
    if isinstance(name, str) and _SITE_NAME_RE.fullmatch(name):
        return None
    return f"expected a site name of {SITE_NAME_RULE}, got {name!r}"


def check_site_name(name: str, what: str = "site name") -> str:
    """Return ``name`` if it is a valid site name, else raise :class:`UserError`."""
    problem = site_name_error(name)
    if problem is not None:
        raise UserError(f"{what}: {problem}")
    return name


class HostPort(NamedTuple):
    """A ``host:port`` pair; ``str()`` gives it back in that form (IPv6 hosts in brackets)."""

    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_host_port(text: str) -> HostPort:
    """``"127.0.0.1:8443"`` or ``"[::1]:8443"`` -> HostPort. Raises ValueError."""
    expected = f"expected host:port like 127.0.0.1:8443 or [::1]:8443, got {text!r}"
    host, sep, port_text = text.strip().rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ValueError(expected)
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"{expected} (put an IPv6 address in brackets)")
    port = int(port_text)
    if not host or any(c.isspace() or c in "[]/@" for c in host):
        raise ValueError(expected)
    if not 1 <= port <= 65535:
        raise ValueError(f"port must be between 1 and 65535, got {port}")
    return HostPort(host, port)


def _parse_listen(value: Any) -> Any:
    if isinstance(value, str):
        return parse_host_port(value)
    if isinstance(value, HostPort):
        return value
    raise ValueError(f"expected host:port like 127.0.0.1:8443, got {value!r}")


def _check_site_name(value: str) -> str:
    problem = site_name_error(value)
    if problem is not None:
        raise ValueError(problem)
    return value


def _path_text(value: Any) -> Any:
    if isinstance(value, Path):
        return value
    if not isinstance(value, str):
        raise ValueError(f"expected a path, got {value!r}")
    if not value.strip():
        raise ValueError("expected a path, got an empty string")
    return value


def _resolve_path(value: Path, info: ValidationInfo) -> Path:
    """Expand ``~`` and make a relative path relative to the YAML file's directory."""
    value = value.expanduser()
    base = (info.context or {}).get(BASE_DIR)
    if not value.is_absolute() and isinstance(base, Path):
        value = base / value
    return value


def _check_peer_url(value: str, info: ValidationInfo) -> str:
    """Validate and normalise a peer URL to ``https://host:port``."""
    expected = f"expected a URL like https://host:port, got {value!r}"
    try:
        parts = urlsplit(value.strip())
        port = parts.port
    except ValueError:
        raise ValueError(expected) from None
    if parts.scheme == "http":
        raise ValueError(f"expected https://host:port, got {value!r}: sites replicate only "
                         "over mutual TLS")
    if parts.scheme != "https" or not parts.hostname or port is None:
        raise ValueError(expected)
    if parts.username or parts.password or parts.path not in ("", "/") or parts.query:
        raise ValueError(f"{expected} (no user, path or query)")
    if parts.fragment:
        raise ValueError(f"{expected} (no fragment)")
    return f"{parts.scheme}://{HostPort(parts.hostname, port)}"


def _check_peer_name(value: str, info: ValidationInfo) -> str:
    _check_site_name(value)
    if value == info.data.get("name"):
        raise ValueError(f"{value!r} is this site's own name; list only the other sites")
    return value


SiteName = Annotated[str, AfterValidator(_check_site_name)]
ConfigPath = Annotated[Path, BeforeValidator(_path_text), AfterValidator(_resolve_path)]
Listen = Annotated[HostPort, BeforeValidator(_parse_listen), PlainSerializer(str)]
PeerName = Annotated[str, AfterValidator(_check_peer_name)]
PeerURL = Annotated[str, AfterValidator(_check_peer_url)]


class TLSConfig(BaseModel):
    """Paths of this site's certificate and key (PEM) and of the operators' CA certificate."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cert: ConfigPath
    key: ConfigPath
    ca: ConfigPath


class SiteConfig(BaseModel):
    """The validated contents of ``site.yaml``. Paths are absolute when loaded from a file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Field order matters: validators of later fields read earlier ones (info.data).
    name: SiteName
    store: ConfigPath
    listen: Listen
    tls: TLSConfig
    admin_socket: ConfigPath
    startup_key: ConfigPath | None = None
    policy_dir: ConfigPath | None = None
    metrics_listen: Listen | None = None
    peers: dict[PeerName, PeerURL] = {}

    @field_validator("admin_socket")
    @classmethod
    def _socket_path_fits(cls, value: Path) -> Path:
        size = len(bytes(value))
        if size > _MAX_SOCKET_PATH:
            raise ValueError(
                f"the path is {size} bytes long; a Unix socket path can have at most "
                f"{_MAX_SOCKET_PATH}: choose a shorter one"
            )
        return value

    @field_validator("startup_key")
    @classmethod
    def _startup_key_outside_store(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        store = info.data.get("store")
        if value is None or not isinstance(store, Path):
            return value
        if Path(os.path.normpath(value)).is_relative_to(os.path.normpath(store)):
            raise ValueError(
                f"{str(value)!r} is inside the store directory; keep the startup key elsewhere "
                "so that a copy of the store alone cannot be unlocked"
            )
        return value


def load_site_config(path: Path) -> SiteConfig:
    """Read and validate ``site.yaml``; :class:`UserError` naming file, line and field if bad."""
    return load_yaml_model(path, SiteConfig, max_bytes=MAX_SITE_FILE_BYTES)
