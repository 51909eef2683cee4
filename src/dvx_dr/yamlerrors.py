"""Loading a YAML file into a pydantic model, with errors that name file, line and field.

Every YAML file dvx-dr reads (``site.yaml``, the protection-group policy files) goes through
:func:`load_yaml_model`, so that a mistake is always reported the same way::

    site.yaml line 7: peers.site-b: expected a URL like https://host:port, got 'foo'

How it works: the text is composed into PyYAML's node tree (every node carries its start line),
constructed into plain Python data, and validated with ``model_cls.model_validate``. When pydantic
rejects the data, the ``loc`` of each error (``("peers", "site-b")``) is walked down the node tree
to the deepest node that exists, and that node's line is reported. Errors about a mapping entry
point at the line of its key, so a missing field inside ``tls:`` points at ``tls:``.

Contract for models loaded this way:

- Validators raise ``ValueError`` with a message that reads well after ``"<field>: "``, e.g.
  ``"expected a duration like 15m, got 'soon'"``; it is reported as is (pydantic's
  ``"Value error, "`` prefix is dropped). Pydantic's own messages are reworded
  (``"Input should be a valid integer"`` -> ``"expected a valid integer"``) and the offending
  value is appended.
- Validators receive ``{BASE_DIR: <directory of the YAML file>}`` as validation context
  (``info.context``), so relative paths in the file can be resolved against the file's directory
  rather than the current directory.
- Models should use ``extra="forbid"``: an unknown field is then reported with the fields that are
  allowed at that place.

Duplicate keys in a mapping are an error too (PyYAML would silently keep the last one).

Whatever the file holds, the outcome is the model or one :class:`UserError`, never another
exception: a byte that is not UTF-8, a character YAML does not allow (a NUL, a form feed, an
escape) and a value PyYAML cannot construct (``2024-13-01``) are reported with their line. The
file is bounded before and while it is parsed: at most ``max_bytes`` bytes (checked before
parsing), at most ``_MAX_NODES`` values and ``_MAX_DEPTH`` levels of nesting (checked while
composing, and again once aliases are expanded), so that no file can hold a site's event loop
for long or fill its memory.
"""

from __future__ import annotations

import os
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails

from dvx_dr.errors import UserError

M = TypeVar("M", bound=BaseModel)

BASE_DIR = "base_dir"
"""Key of the validation context entry holding the YAML file's directory (an absolute Path)."""

_MAX_REPORTED = 5
_MAX_INPUT_REPR = 60
#: Bounds on a configuration document (see ``_check_size``).
_MAX_NODES = 100_000
_MAX_DEPTH = 50
#: The largest file read, by default (site.yaml); callers pass their own (a policy file).
MAX_FILE_BYTES = 1024 * 1024
#: Line breaks as YAML counts them (after ``\r\n`` and ``\r`` are read as ``\n``).
_YAML_BREAKS = "\n\x85\u2028\u2029"
#: Names of the characters PyYAML refuses that an editor or a copy can put in a file.
_CHARACTER_NAMES = {
    0x00: "NUL", 0x07: "bell, ^G", 0x08: "backspace, ^H", 0x0B: "vertical tab, ^K",
    0x0C: "form feed, ^L", 0x1B: "escape, ^[", 0x7F: "delete, DEL",
}


def load_yaml_model(path: Path, model_cls: type[M], *, kind: str = "",
                    max_bytes: int = MAX_FILE_BYTES) -> M:
    """Read ``path``, parse it as YAML and validate it as ``model_cls``.

    ``kind`` is an optional word put before the file name in messages (``"policy"`` gives
    ``"policy finance.yaml line 7: ..."``). Raises :class:`UserError` for an unreadable file, a
    file larger than ``max_bytes``, malformed YAML, duplicate keys, or data the model rejects;
    the message names the file, the line and the field.
    """
    return load_yaml_model_and_nodes(path, model_cls, kind=kind, max_bytes=max_bytes)[0]


def load_yaml_model_and_nodes(path: Path, model_cls: type[M], *, kind: str = "",
                              max_bytes: int = MAX_FILE_BYTES) -> tuple[M, yaml.Node]:
    """``load_yaml_model``, and the node tree the model was read from (for the line numbers
    of later checks: from the same reading of the file, however it changes meanwhile)."""
    where = f"{kind} {path}" if kind else str(path)
    text = _read_text(path, where, max_bytes, f"{kind} file" if kind else "configuration file")
    root, data = _parse(text, where)
    _check_duplicate_keys(root, where)
    try:
        model = model_cls.model_validate(data, context={BASE_DIR: path.absolute().parent})
    except ValidationError as exc:
        raise UserError(format_validation_error(exc, root, model_cls, where)) from None
    return model, root


def load_yaml_data(path: Path, *, kind: str = "", max_bytes: int = MAX_FILE_BYTES) -> Any:
    """The plain data of ``path`` (no model), read and parsed within the same bounds and with
    the same errors as :func:`load_yaml_model`."""
    where = f"{kind} {path}" if kind else str(path)
    text = _read_text(path, where, max_bytes, f"{kind} file" if kind else "configuration file")
    return _parse(text, where)[1]


def format_validation_error(
    exc: ValidationError, root: yaml.Node | None, model_cls: type[BaseModel], where: str
) -> str:
    """One line describing every error in ``exc``, each with its YAML line when known."""
    parts = []
    errors = sorted(exc.errors(), key=lambda e: line_of(root, e["loc"]) or 0)
    for error in errors[:_MAX_REPORTED]:
        line = line_of(root, error["loc"])
        prefix = f"{where} line {line}" if line is not None else where
        field = format_loc(error["loc"])
        message = _describe(error, model_cls)
        parts.append(f"{prefix}: {field}: {message}" if field else f"{prefix}: {message}")
    if len(errors) > _MAX_REPORTED:
        more = len(errors) - _MAX_REPORTED
        parts.append(f"and {more} more error{'s' if more > 1 else ''}")
    return "; ".join(parts)


def line_of(root: yaml.Node | None, loc: tuple[int | str, ...]) -> int | None:
    """1-based line of the deepest node along ``loc``; None only without a node tree.

    For a mapping entry the key's line is used; ``"[key]"`` (an error about a dict key) stays on
    the key. Steps that do not exist in the file (a missing field) leave the last node found;
    when not even the first step exists (a missing top-level field), that is the line where
    the document's mapping starts.
    """
    if root is None:
        return None
    if not loc:
        return root.start_mark.line + 1
    node: yaml.Node = root
    found: yaml.Node | None = None
    for part in loc:
        if part == "[key]":
            break
        child_key, child = _child(node, part)
        if child is None:
            break
        found = child_key or child
        node = child
    return (found or root).start_mark.line + 1


def format_loc(loc: tuple[int | str, ...]) -> str:
    """``("replication", 0, "rpo")`` -> ``"replication[0].rpo"`` (dict-key markers dropped)."""
    out = ""
    for part in loc:
        if part == "[key]":
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _read_text(path: Path, where: str, max_bytes: int, noun: str) -> str:
    """The file's text, with line ends as Python's text mode reads them. A file larger than
    ``max_bytes`` is refused before its text is decoded or parsed."""
    try:
        with path.open("rb") as f:
            data = f.read(max_bytes + 1)
            if len(data) > max_bytes:
                size = os.fstat(f.fileno()).st_size
                said = f"{size} bytes" if size > max_bytes else f"more than {max_bytes} bytes"
                raise UserError(f"{where} is {said}; a {noun} may hold at most "
                                f"{_format_bytes(max_bytes)}")
    except FileNotFoundError:
        raise UserError(f"{where}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"{where}: is a directory, expected a YAML file") from None
    except OSError as exc:
        raise UserError(f"{where}: cannot read: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line_start = data.rfind(b"\n", 0, exc.start) + 1
        line = data.count(b"\n", 0, exc.start) + 1
        column = len(data[line_start:exc.start].decode("utf-8")) + 1  # valid up to there
        raise UserError(
            f"{where} line {line}: not UTF-8 text: byte 0x{data[exc.start]:02x} at column "
            f"{column}; save the file as UTF-8") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _format_bytes(size: int) -> str:
    """1048576 -> ``"1 MiB"``, 262144 -> ``"256 KiB"``, 1000 -> ``"1000 bytes"``."""
    for unit, scale in (("MiB", 1024 * 1024), ("KiB", 1024)):
        if size % scale == 0:
            return f"{size // scale} {unit}"
    return f"{size} bytes"


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, bounded while it composes (``_MAX_NODES`` values, ``_MAX_DEPTH``
    levels: a large file is refused part way, not after minutes of parsing), and with every
    construction error marked with its node's place."""

    def __init__(self, text: str, where: str) -> None:
        super().__init__(text)
        self._where = where
        self._nodes = 0
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        self._nodes += 1
        self._depth += 1
        try:
            if self._nodes > _MAX_NODES or self._depth > _MAX_DEPTH:
                line = self.peek_event().start_mark.line + 1
                if self._depth > _MAX_DEPTH:
                    raise UserError(f"{self._where} line {line}: nested more than "
                                    f"{_MAX_DEPTH} levels deep")
                raise UserError(f"{self._where} line {line}: more than {_MAX_NODES} values "
                                f"(a file may hold at most {_MAX_NODES})")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except (ValueError, TypeError, AttributeError, OverflowError) as exc:
            # PyYAML lets these through for a value it recognises but cannot build:
            # "2024-13-01" (a date with month 13), "!!int abc", "!!timestamp x".
            why = f" ({exc})" if isinstance(exc, ValueError) else ""
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read {_short_repr(node.value)} as {_tag_name(node.tag)}"
                f"{why}", node.start_mark) from None


def _tag_name(tag: str) -> str:
    """``"tag:yaml.org,2002:timestamp"`` -> ``"a timestamp"``."""
    name = tag.rsplit(":", 1)[-1]
    return f"an {name}" if name[:1] in "aeiou" else f"a {name}"


def _parse(text: str, where: str) -> tuple[yaml.Node, Any]:
    """Compose the node tree (for line numbers) and construct the data from that same tree."""
    loader: _Loader | None = None
    try:
        # The loader refuses a character YAML does not allow as soon as it is made.
        loader = _Loader(text, where)
        root = loader.get_single_node()
        if root is not None:
            _check_size(root, where)
        data = loader.construct_document(root) if root is not None else None
    except RecursionError:
        raise UserError(f"{where}: not valid YAML: nested too deeply") from None
    except yaml.reader.ReaderError as exc:
        raise UserError(_unacceptable_character(exc, text, where)) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f" line {mark.line + 1}" if mark is not None else ""
        problem = ", ".join(part for part in (exc.context, exc.problem) if part) or "malformed"
        raise UserError(f"{where}{line}: not valid YAML: {problem}") from None
    except yaml.YAMLError as exc:
        raise UserError(f"{where}: not valid YAML: {exc}") from None
    finally:
        if loader is not None:
            loader.dispose()
    if root is None:
        raise UserError(f"{where}: the file is empty, expected a mapping of fields")
    return root, data


def _unacceptable_character(exc: yaml.reader.ReaderError, text: str, where: str) -> str:
    """``<where> line 3 column 9: not valid YAML: unacceptable character #x000c (form feed,
    ^L); remove it``."""
    position = exc.position if isinstance(exc.position, int) else -1
    if not 0 <= position < len(text):
        return f"{where}: not valid YAML: {exc}"
    code = ord(text[position])
    before = text[:position]
    line = sum(before.count(c) for c in _YAML_BREAKS) + 1
    column = position - max(before.rfind(c) for c in _YAML_BREAKS)
    if code in _CHARACTER_NAMES:
        name = _CHARACTER_NAMES[code]
    elif code < 0x20:
        name = f"control character ^{chr(code + 0x40)}"
    elif 0x80 <= code < 0xA0:
        name = "C1 control character"
    else:
        name = "not allowed in YAML"
    return (f"{where} line {line} column {column}: not valid YAML: unacceptable character "
            f"#x{code:04x} ({name}); remove it")


def _check_size(root: yaml.Node, where: str) -> None:
    """Refuse a document nested more than ``_MAX_DEPTH`` deep or holding more than
    ``_MAX_NODES`` nodes once its aliases are expanded: a few hundred bytes of nested aliases
    (a "billion laughs") would otherwise take minutes and gigabytes to check and report."""
    stack = [(root, 1)]
    count = 0
    while stack:
        node, depth = stack.pop()
        count += 1
        if count > _MAX_NODES:
            raise UserError(f"{where}: more than {_MAX_NODES} values once its aliases (*name) "
                            "are expanded; write the values out")
        if depth > _MAX_DEPTH:
            line = node.start_mark.line + 1
            raise UserError(f"{where} line {line}: nested more than {_MAX_DEPTH} levels deep")
        if isinstance(node, yaml.MappingNode):
            stack.extend((child, depth + 1) for pair in node.value for child in pair)
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((child, depth + 1) for child in node.value)


def _check_duplicate_keys(node: yaml.Node, where: str) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                line = key_node.start_mark.line + 1
                if key_node.value in seen:
                    raise UserError(
                        f"{where} line {line}: duplicate key {key_node.value!r} "
                        f"(first given on line {seen[key_node.value]})"
                    )
                seen[key_node.value] = line
            _check_duplicate_keys(value_node, where)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _check_duplicate_keys(item, where)


def _child(node: yaml.Node, part: int | str) -> tuple[yaml.Node | None, yaml.Node | None]:
    """(key node, value node) of ``part`` inside ``node``, or (None, None)."""
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.value == str(part):
                return key_node, value_node
    elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
        items = node.value
        return (None, items[part]) if 0 <= part < len(items) else (None, None)
    return None, None


def _describe(error: ErrorDetails, model_cls: type[BaseModel]) -> str:
    kind = error["type"]
    ctx = error.get("ctx") or {}
    if kind in ("value_error", "assertion_error") and "error" in ctx:
        return str(ctx["error"])
    if kind == "missing":
        return "required field is missing"
    if kind == "extra_forbidden":
        allowed = _allowed_fields(model_cls, error["loc"][:-1])
        hint = f" (expected one of: {', '.join(allowed)})" if allowed else ""
        return f"unknown field{hint}"
    got = _short_repr(error.get("input"))
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"expected a mapping, got {got}"
    if kind in ("list_type", "tuple_type", "set_type"):
        return f"expected a list, got {got}"
    if kind in ("bool_type", "bool_parsing"):
        return f"expected true or false, got {got}"
    msg = error["msg"]
    if msg.startswith("Input should be "):
        msg = "expected " + msg[len("Input should be ") :]
    elif msg:
        msg = msg[0].lower() + msg[1:]
    return f"{msg}, got {got}"


def _short_repr(value: object) -> str:
    text = repr(value)
    if len(text) > _MAX_INPUT_REPR:
        text = text[: _MAX_INPUT_REPR - 3] + "..."
    return text


def _allowed_fields(model_cls: type[BaseModel], loc: tuple[int | str, ...]) -> list[str]:
    """Field names of the model found by walking ``loc`` from ``model_cls``; [] if unknown."""
    current: Any = model_cls
    parts = list(loc)
    while parts:
        model = _model_in(current)
        if model is None:
            return []
        part = parts.pop(0)
        field = _fields_by_yaml_name(model).get(str(part))
        if field is None:
            return []
        current = field.annotation
        # Descend through containers: each dict/list level consumes one loc step (key or index).
        while _model_in(current) is None and parts:
            origin = typing.get_origin(current)
            args = typing.get_args(current)
            if origin is typing.Union or origin is types.UnionType:
                rest = [arg for arg in args if arg is not type(None)]
                if len(rest) != 1:
                    return []
                current = rest[0]
                continue
            if origin is dict and len(args) == 2:
                current = args[1]
            elif origin in (list, tuple, set, frozenset) and args:
                current = args[0]
            else:
                return []
            parts.pop(0)
    model = _model_in(current)
    return list(_fields_by_yaml_name(model)) if model is not None else []


def _fields_by_yaml_name(model: type[BaseModel]) -> dict[str, FieldInfo]:
    return {field.alias or name: field for name, field in model.model_fields.items()}


def _model_in(tp: Any) -> type[BaseModel] | None:
    """The model class ``tp`` is, or the one in an Optional/Union/Annotated around it."""
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return tp
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return _model_in(typing.get_args(tp)[0])
    if origin is typing.Union or origin is types.UnionType:
        for arg in typing.get_args(tp):
            found = _model_in(arg)
            if found is not None:
                return found
    return None
