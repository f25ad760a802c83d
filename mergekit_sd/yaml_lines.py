"""YAML files our users write (recipes, prompt grids): read safely, with every problem reported
as one sentence naming the file, the line and the field.

The text is parsed once, with PyYAML's safe loader, into nodes, whose marks say which line each
field is on, and the data is built from those nodes (as `yaml.safe_load` does, except that a key
given twice is refused), so that a validation error found later in the data can point at the
user's line.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from mergekit_sd.errors import UserError


class DuplicateKey(yaml.constructor.ConstructorError):
    """A mapping gives a key twice: `mapping` (the node), the `key` node and the `first` one."""

    def __init__(self, mapping: yaml.MappingNode, key: yaml.Node, first: yaml.Node):
        super().__init__(None, None, f"{key.value!r} is given twice", key.start_mark)
        self.mapping, self.key, self.first = mapping, key, first


class UniqueKeyLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that refuses a key given twice in one mapping (YAML requires keys to
    be unique; PyYAML would keep the last silently, dropping a model or a value the user wrote).
    A key that a merge key (`<<: *anchor`) brings in may still be overridden, as YAML allows."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=deep)
                try:
                    first = seen.setdefault(key, key_node)
                except TypeError:  # an unhashable key: SafeLoader's own error says so
                    break
                if first is not key_node:
                    raise DuplicateKey(node, key_node, first)
        return super().construct_mapping(node, deep=deep)


class YamlFileError(UserError):
    """A problem in a YAML file: one sentence with the file, the line and the field."""

    def __init__(self, path: Path | str, line: int | None, field_path: str, problem: str):
        where = f"{path}, line {line}" if line else f"{path}"
        super().__init__(f"{where}, {field_path}: {problem}" if field_path
                         else f"{where}: {problem}")


def load_mapping(text: str, path: Path, error: type[YamlFileError],
                 expected: str) -> tuple[dict, dict[tuple, int]]:
    """The YAML mapping in `text` and the line of each field in it (`line_of`); invalid YAML,
    or anything but a mapping ("must be a YAML mapping with `expected`"), raises `error`."""
    loader = None
    try:
        loader = UniqueKeyLoader(text)  # checks the characters already
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except DuplicateKey as exc:
        loc = (*_path_to(node, exc.mapping), exc.key.value)
        raise error(path, exc.key.start_mark.line + 1, dotted(loc),
                    f"is given twice (first on line {exc.first.start_mark.line + 1})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            line = mark.line + 1
        elif isinstance(exc, yaml.reader.ReaderError):  # a character YAML does not allow
            line = text.count("\n", 0, exc.position) + 1
        else:
            line = None
        problem = getattr(exc, "problem", None) or getattr(exc, "reason", None) or str(exc)
        raise error(path, line, "", f"is not valid YAML ({problem})") from None
    except RecursionError:  # PyYAML builds nested collections recursively
        raise error(path, None, "", "is not valid YAML (its collections are nested too "
                                    "deeply to read)") from None
    finally:
        if loader is not None:
            loader.dispose()
    if not isinstance(data, dict):
        raise error(path, 1, "", f"must be a YAML mapping with {expected}")
    return data, (_line_map(node) if node is not None else {})


def dotted(loc: tuple) -> str:
    return ".".join(str(part) for part in loc)


def line_of(lines: dict[tuple, int], loc: tuple) -> int | None:
    """The line of the deepest part of `loc` the file has (a missing field: its parent's)."""
    loc = tuple(loc)
    while loc:
        if loc in lines:
            return lines[loc]
        loc = loc[:-1]
    return lines.get(())


def _path_to(root, target) -> tuple:
    """The field path of node `target` inside `root` (walked as `_line_map` walks)."""
    stack, walked = [(root, ())], set()
    while stack:
        node, prefix = stack.pop()
        if node is target:
            return prefix
        if id(node) in walked:
            continue
        walked.add(id(node))
        if isinstance(node, yaml.MappingNode):
            stack.extend((value, (*prefix, key.value)) for key, value in node.value)
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((item, (*prefix, i)) for i, item in enumerate(node.value))
    return ()


def _line_map(node, prefix: tuple = (), lines: dict | None = None,
              walked: set | None = None) -> dict[tuple, int]:
    # A node an alias repeats is walked once: below its other uses a field gets the alias's
    # line. Walking it again would never end for an alias inside its own anchor (`&a [*a]`)
    # and take exponential time for aliases of aliases.
    lines = {} if lines is None else lines
    walked = set() if walked is None else walked
    lines.setdefault(prefix, node.start_mark.line + 1)
    if id(node) in walked:
        return lines
    walked.add(id(node))
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            path = (*prefix, key.value)
            lines[path] = key.start_mark.line + 1
            _line_map(value, path, lines, walked)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _line_map(item, (*prefix, index), lines, walked)
    return lines
