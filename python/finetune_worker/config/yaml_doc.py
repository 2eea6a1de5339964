"""YAML documents, read safely and bounded, and where each value of a document sits.

Job configs may be YAML as well as JSON (Axolotl and LLaMA-Factory users write YAML), and
MergeKit configs are YAML. :func:`load_bounded_yaml` is ``yaml.safe_load`` that refuses a
document expanding past a node budget (a 638-byte "billion laughs" of nine levels of nine
aliases expands to 387 million nodes); every failure is a :class:`YamlProblem` with the line and
column. :func:`value_lines` maps each key path of a YAML (or JSON: YAML's flow style reads it)
document to its line, so schema errors can say where they are.
"""

from __future__ import annotations

from typing import Any

import yaml

#: Most YAML nodes a document may expand to, aliases counted as often as they are used. A real
#: config has a few hundred.
MAX_YAML_NODES = 100_000

Path = tuple[str | int, ...]


class YamlProblem(ValueError):
    """A YAML document that cannot be read; the message says where and why."""


def load_bounded_yaml(text: str, max_nodes: int = MAX_YAML_NODES) -> Any:
    """``yaml.safe_load`` that refuses documents expanding past ``max_nodes`` nodes.

    The node graph is composed first (linear in the text: an alias is one shared node), its
    expanded size counted with each shared node sized once, and only then constructed.
    """
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        size = _expanded_size(node, {}, max_nodes)
        if size > max_nodes:
            raise YamlProblem(
                f"the YAML expands to more than {max_nodes} nodes through its anchors and aliases; "
                "write the repeated parts out, or use fewer aliases"
            )
        return loader.construct_document(node)
    except RecursionError:
        raise YamlProblem("the YAML is nested too deeply") from None
    except yaml.YAMLError as exc:
        raise YamlProblem(describe(exc)) from None
    finally:
        loader.dispose()


def describe(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return f"malformed YAML{where}: {problem}"


def _expanded_size(node: Any, sizes: dict[int, int], cap: int) -> int:
    known = sizes.get(id(node))
    if known is not None:
        return known
    size = 1
    if isinstance(node, yaml.SequenceNode):
        children = node.value
    elif isinstance(node, yaml.MappingNode):
        children = [n for pair in node.value for n in pair]
    else:
        children = []
    for child in children:
        size += _expanded_size(child, sizes, cap)
        if size > cap:
            break  # no need to count further: the answer is "too large"
    sizes[id(node)] = size
    return size


def value_lines(text: str, max_nodes: int = MAX_YAML_NODES) -> dict[Path, int]:
    """``{key path: line}`` (1-based) of every mapping key and list item of the document;
    ``{}`` when the text does not compose (it was read some other way) or is too large."""
    try:
        loader = yaml.SafeLoader(text)
        try:
            root = loader.get_single_node()
        finally:
            loader.dispose()
    except (yaml.YAMLError, RecursionError):
        return {}
    out: dict[Path, int] = {}
    stack: list[tuple[Path, Any]] = [((), root)] if root is not None else []
    seen: set[int] = set()
    while stack and len(out) < max_nodes:
        path, node = stack.pop()
        if id(node) in seen:
            continue  # an alias: its lines are the anchor's
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode):
                    here = (*path, key.value)
                    out[here] = key.start_mark.line + 1
                    stack.append((here, value))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                at = (*path, i)
                out[at] = item.start_mark.line + 1
                stack.append((at, item))
    return out
