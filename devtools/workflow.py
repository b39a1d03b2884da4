"""Convert ComfyUI's UI-format workflow JSON (what the frontend saves and loads) to the API format (what /prompt runs).

The UI format stores widget values positionally, so the conversion needs the server's ``/object_info`` to know which
inputs are widgets and in what order. ``validate_api_prompt`` checks node names, input names and enum values against
the same ``/object_info`` so example workflows cannot silently rot. ``tests/test_frontend.py`` checks that
``ui_to_api`` gives exactly what the frontend's own ``app.graphToPrompt()`` gives for the same workflow.

A widget fed by a link ("converted to an input") comes in two forms: the old frontend lists only such inputs in the
node's ``inputs`` with a ``widget`` entry; the newer frontend lists every widget there (``link`` null when unlinked).
In both, the widget keeps its slot in ``widgets_values`` (and so does its seed-control / upload companion).
"""

from __future__ import annotations

from typing import Any

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
SEED_CONTROLS = {"fixed", "increment", "decrement", "randomize"}
VIRTUAL_NODES = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}  # frontend-only nodes


class WorkflowError(ValueError):
    pass


def _is_widget(spec: list) -> bool:
    kind = spec[0]
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if options.get("forceInput"):
        return False
    return isinstance(kind, list) or kind in WIDGET_TYPES


def _input_specs(info: dict) -> list[tuple[str, list]]:
    """(name, spec) for every input of a node type, in definition order (required first)."""
    specs = []
    for section in ("required", "optional"):
        defined = info["input"].get(section, {})
        order = info.get("input_order", {}).get(section, list(defined))
        specs += [(name, defined[name]) for name in order if name in defined]
    return specs


def _choices(spec: list) -> list | None:
    """Allowed values of an enum input (classic list form or V3 ``COMBO`` form), else None."""
    if isinstance(spec[0], list):
        return spec[0]
    if spec[0] == "COMBO" and len(spec) > 1 and isinstance(spec[1], dict):
        return spec[1].get("options")
    return None


def _links_by_id(workflow: dict) -> dict[int, tuple[int, int]]:
    links = {}
    for link in workflow.get("links", []):
        if isinstance(link, dict):
            links[link["id"]] = (link["origin_id"], link["origin_slot"])
        else:
            links[link[0]] = (link[1], link[2])
    return links


def _take_widget_value(values: list, name: str, spec: list) -> Any:
    """Pop one widget's value and the extra entries the frontend stores after it (seed control, upload button)."""
    value = values.pop(0)
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if (options.get("control_after_generate") or name in ("seed", "noise_seed")) and values \
            and values[0] in SEED_CONTROLS:
        values.pop(0)
    if options.get("image_upload") and values and values[0] == "image":
        values.pop(0)
    return value


def _default_value(spec: list) -> Any:
    """The value the frontend gives a new widget: the declared default, else the first choice or an empty value."""
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if "default" in options:
        return options["default"]
    choices = _choices(spec)
    if choices:
        return choices[0]
    return {"INT": 0, "FLOAT": 0.0, "BOOLEAN": False}.get(spec[0], "")


def _linked_inputs(node: dict) -> dict[str, int | None]:
    """Input name -> link id; a widget input is named by its widget (old and new frontend forms)."""
    linked = {}
    for inp in node.get("inputs", []):
        widget = inp.get("widget")
        name = widget.get("name", inp["name"]) if isinstance(widget, dict) else inp["name"]
        linked[name] = inp.get("link")
    return linked


def ui_to_api(workflow: dict, object_info: dict) -> dict[str, dict]:
    """Return the API-format prompt for a UI-format workflow (muted nodes and notes are dropped).

    Each node carries ``_meta.title`` as the frontend's ``graphToPrompt`` writes it (ComfyUI ignores it when running).
    """
    nodes = {node["id"]: node for node in workflow["nodes"]}
    links = _links_by_id(workflow)

    def resolve(link_id: int) -> tuple[int, int] | Any:
        """Follow Reroutes to the real source; a PrimitiveNode yields its value instead of a link."""
        origin_id, slot = links[link_id]
        origin = nodes[origin_id]
        if origin["type"] == "Reroute":
            return resolve(origin["inputs"][0]["link"])
        if origin["type"] == "PrimitiveNode":
            return ("value", origin["widgets_values"][0])
        return origin_id, slot

    prompt: dict[str, dict] = {}
    for node_id, node in nodes.items():
        if node["type"] in VIRTUAL_NODES or node.get("mode", 0) in (2, 4):
            if node.get("mode") == 4:
                raise WorkflowError(f"node {node_id} ({node['type']}) is bypassed; un-bypass or delete it")
            continue
        info = object_info.get(node["type"])
        if info is None:
            raise WorkflowError(f"node {node_id}: type {node['type']!r} is not installed on this server")
        linked = _linked_inputs(node)
        values = node.get("widgets_values", [])
        if isinstance(values, dict):
            values = [values.get(name) for name, spec in _input_specs(info) if _is_widget(spec)]
        values = list(values)
        inputs: dict[str, Any] = {}
        for name, spec in _input_specs(info):
            widget = _is_widget(spec)
            if linked.get(name) is not None:
                source = resolve(linked[name])
                if isinstance(source, tuple) and source and source[0] == "value":
                    inputs[name] = source[1]
                else:
                    inputs[name] = [str(source[0]), source[1]]
                if widget and values:
                    _take_widget_value(values, name, spec)  # a converted widget keeps its slot(s)
                continue
            if not widget:
                continue
            # A workflow saved before the node gained this widget: the frontend keeps the widget's default.
            value = _take_widget_value(values, name, spec) if values else _default_value(spec)
            inputs[name] = {"__value__": value} if isinstance(value, list) else value  # as the frontend wraps lists
        title = node.get("title") or info.get("display_name") or node["type"]
        prompt[str(node_id)] = {"class_type": node["type"], "inputs": inputs, "_meta": {"title": title}}
    # Like the frontend: an input linked to a node that is not in the prompt (muted) is left out.
    for node in prompt.values():
        node["inputs"] = {name: value for name, value in node["inputs"].items()
                          if not (isinstance(value, list) and len(value) == 2 and value[0] not in prompt)}
    return prompt


def validate_api_prompt(prompt: dict, object_info: dict) -> list[str]:
    """Problems found in an API prompt: unknown nodes, unknown or missing inputs, bad enum values, dangling links."""
    problems = []
    for node_id, node in prompt.items():
        info = object_info.get(node["class_type"])
        if info is None:
            problems.append(f"{node_id}: unknown node type {node['class_type']!r}")
            continue
        specs = dict(_input_specs(info))
        hidden = set(info["input"].get("hidden", {}))
        for name, value in node["inputs"].items():
            if name not in specs and name not in hidden:
                problems.append(f"{node_id} ({node['class_type']}): unknown input {name!r}")
                continue
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
                source = prompt.get(value[0])
                if source is None:
                    problems.append(f"{node_id}.{name}: link to missing node {value[0]}")
                    continue
                out_types = object_info.get(source["class_type"], {}).get("output", [])
                wanted = specs[name][0] if name in specs else None
                if value[1] >= len(out_types):
                    problems.append(f"{node_id}.{name}: {source['class_type']} has no output {value[1]}")
                elif isinstance(wanted, str) and wanted != "*" and out_types[value[1]] not in (wanted, "*"):
                    problems.append(f"{node_id}.{name}: wants {wanted}, linked to {out_types[value[1]]}")
                continue
            choices = _choices(specs[name]) if name in specs else None
            if choices is not None and value not in choices:
                problems.append(f"{node_id} ({node['class_type']}).{name}: {value!r} not in {choices[:8]}")
        for name in info["input"].get("required", {}):
            if name not in node["inputs"]:
                problems.append(f"{node_id} ({node['class_type']}): required input {name!r} missing")
    return problems
