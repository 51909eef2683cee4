"""Loading the policy directory: one YAML file per protection group.

:func:`load_policy_file` loads and checks one file; :func:`load_policy_dir` loads every
``*.yaml``/``*.yml`` file of a directory, in name order, and keeps going past bad ones: a mistake in
one file never unloads the others. Across files, two rules hold:

- PG names are unique: a file whose name is taken by an earlier file (in file-name order) is
  rejected.
- A volume belongs to at most one PG: a file whose members claim a volume that an earlier file
  already claimed is rejected.

A policy file holds at most ``MAX_POLICY_BYTES`` bytes; a larger one is refused before it is
parsed. A ``*.yaml`` entry that is a symbolic link to nothing (an unmounted share, a moved
file) is an error for that file, not a file that is not there.

Every error names the file, the line and the field and says what was expected::

    policy pols/finance.yaml line 7: replication[0].rpo: expected a duration like 15m, got 'soon'

Field errors come from :func:`dvx_dr.yamlerrors.load_yaml_model`; the rest are located here by
walking the file's YAML node tree along the field's path.
"""

from __future__ import annotations

import os
from collections.abc import Sequence, Set
from fnmatch import fnmatchcase
from pathlib import Path

import yaml

from dvx_dr.errors import NotFoundError, UserError
from dvx_dr.policies.model import Loc, Policy
from dvx_dr.yamlerrors import load_yaml_data, load_yaml_model_and_nodes

POLICY_SUFFIXES = (".yaml", ".yml")
#: The largest policy file read: a policy is a few kilobytes; a megabyte took PyYAML seconds.
MAX_POLICY_BYTES = 256 * 1024


class PolicyError(UserError):
    """A policy file that cannot be used; the message names file, line and field."""

    def __init__(self, path: Path, message: str) -> None:
        super().__init__(message)
        self.path = path


def load_policy_file(path: Path | str, known_sites: Set[str]) -> Policy:
    """Load one policy file; raises :class:`PolicyError` when it is unreadable or wrong."""
    policy, _ = _load(Path(path), known_sites)
    return policy


def load_policy_dir(
    directory: Path | str, known_sites: Set[str], volumes: list[str],
    first: Sequence[Path] = (), files: dict[str, Path] | None = None,
) -> tuple[dict[str, Policy], list[PolicyError]]:
    """Load every policy file in ``directory``: the good ones by PG name, and one error per bad
    file. ``volumes`` are the volume names that exist, to check no volume is in two groups.

    When two files claim one group name or one volume, the file read first wins: the files in
    ``first``, in that order (a running site passes those of the groups it runs, the least
    recently changed first, so that neither a file added beside them nor one edited to claim
    another's volumes takes a running group's place), then the others by name. ``files``,
    when given, receives PG name -> file of each group loaded."""
    directory = Path(directory)
    if not directory.is_dir():
        raise NotFoundError(f"policy directory {directory} does not exist")
    order = {path: n for n, path in enumerate(first)}
    paths = sorted(policy_files(directory), key=lambda p: (order.get(p, len(order)), p))
    policies: dict[str, Policy] = {}
    files = {} if files is None else files  # PG name -> its file
    owners: dict[str, str] = {}  # volume -> PG name
    errors: list[PolicyError] = []
    for path in paths:
        try:
            policy, root = _load(path, known_sites)
        except PolicyError as exc:
            errors.append(exc)
            continue
        problems: list[tuple[Loc, str]] = []
        if policy.name in policies:
            problems.append(
                (
                    ("name",),
                    f"expected a name no other policy uses, got {policy.name!r} "
                    f"(already used by {files[policy.name].name})",
                )
            )
        # Volumes claimed elsewhere, grouped by the member glob that claims them here.
        taken: dict[tuple[int, str], list[str]] = {}
        for volume in members_of(policy, volumes):
            owner = owners.get(volume)
            if owner is not None:
                taken.setdefault((_claiming_glob(policy, volume), owner), []).append(volume)
        for (index, owner), claimed in taken.items():
            names = ", ".join(repr(v) for v in claimed)
            problems.append(
                (
                    ("members", index),
                    f"expected volumes no other group has, got {names} "
                    f"(already in {owner!r} from {files[owner].name})",
                )
            )
        if problems:
            errors.append(PolicyError(path, _format(path, root, problems)))
            continue
        policies[policy.name] = policy
        files[policy.name] = path
        for volume in members_of(policy, volumes):
            owners[volume] = policy.name
    return policies, errors


def policy_files(directory: Path) -> list[Path]:
    """The policy files of ``directory``, by name: its ``*.yaml`` and ``*.yml`` files, not
    hidden ones (editor swap files), and the links among them that lead nowhere (so that
    loading them reports it)."""
    return sorted(p for p in directory.iterdir()
                  if p.suffix in POLICY_SUFFIXES and not p.name.startswith(".")
                  and (p.is_file() or p.is_symlink() and not p.exists()))


def named_sites(path: Path) -> set[str]:
    """The target site names a policy file gives, read within the same bounds as a policy
    (to check a file without knowing the peers); empty when the file cannot be read, which
    :func:`load_policy_file` then reports."""
    try:
        doc = load_yaml_data(path, kind="policy", max_bytes=MAX_POLICY_BYTES)
    except UserError:
        return set()
    targets = doc.get("replication") if isinstance(doc, dict) else None
    if not isinstance(targets, list):
        return set()
    return {str(t.get("site")) for t in targets if isinstance(t, dict)}


def members_of(policy: Policy, volumes: list[str]) -> list[str]:
    """The ``volumes`` in ``policy``'s group, in the order given. Member globs apply in order:
    a glob adds the volumes it matches, a glob with a leading ``!`` removes them again. Globs are
    :mod:`fnmatch` patterns and case-sensitive."""
    selected: set[str] = set()
    for glob in policy.members:
        if glob.startswith("!"):
            selected.difference_update(v for v in volumes if fnmatchcase(v, glob[1:]))
        else:
            selected.update(v for v in volumes if fnmatchcase(v, glob))
    return [v for v in volumes if v in selected]


def _claiming_glob(policy: Policy, volume: str) -> int:
    """Index of the member glob that puts ``volume`` in the group: the last one matching it."""
    for index in reversed(range(len(policy.members))):
        if fnmatchcase(volume, policy.members[index].removeprefix("!")):
            return index
    raise AssertionError(f"{volume!r} is not a member of {policy.name!r}")


def _check_link(path: Path) -> None:
    """Raise :class:`PolicyError` when ``path`` is a symbolic link that leads nowhere."""
    if not path.is_symlink():
        return
    try:
        path.stat()
    except OSError as exc:
        try:
            target = os.readlink(path)
        except OSError:
            target = "?"
        why = "which does not exist" if isinstance(exc, FileNotFoundError) else (
            f"which cannot be followed: {exc.strerror or exc}")
        raise PolicyError(path, f"policy {path} is a symbolic link to {target}, {why}"
                          ) from None


def _load(path: Path, known_sites: Set[str]) -> tuple[Policy, yaml.Node]:
    _check_link(path)
    try:
        policy, root = load_yaml_model_and_nodes(path, Policy, kind="policy",
                                                 max_bytes=MAX_POLICY_BYTES)
    except UserError as exc:
        raise PolicyError(path, str(exc)) from None
    problems = policy.check(known_sites)
    if problems:
        raise PolicyError(path, _format(path, root, problems))
    return policy, root


def _format(path: Path, root: yaml.Node, problems: list[tuple[Loc, str]]) -> str:
    """``policy <path> line <n>: <field>: <message>`` for each problem, by line, joined by "; "."""
    located = sorted(
        ((_line_of(root, loc), loc, message) for loc, message in problems), key=lambda item: item[0]
    )
    return "; ".join(
        f"policy {path} line {line}: {_field(loc)}: {message}" for line, loc, message in located
    )


def _line_of(root: yaml.Node, loc: Loc) -> int:
    """1-based line of ``loc`` in the file: a mapping entry's key line, a list item's own line."""
    node, line = root, root.start_mark.line + 1
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode) and key.value == str(part):
                    node, line = value, key.start_mark.line + 1
                    break
            else:
                break
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            if not 0 <= part < len(node.value):
                break
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


def _field(loc: Loc) -> str:
    """``("replication", 0, "rpo")`` -> ``"replication[0].rpo"``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out
