"""The node help pages (``web/docs/<NodeName>.md``, served from the pack's WEB_DIRECTORY, read by the frontend's node
help panel): one per node, titled with the node's display name, naming every input and output the node has, with
small pictures that exist. ``tests/test_frontend.py`` opens each page in the frontend's help panel."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "web" / "docs"
PICTURE_LIMIT = 60 * 1024


def node_mappings() -> tuple[dict[str, str], dict[str, str]]:
    """NODE_CLASS_MAPPINGS keys (-> module) and NODE_DISPLAY_NAME_MAPPINGS of every nodes/ module, read from the
    source (importing the nodes needs ComfyUI)."""
    classes, names = {}, {}
    for path in sorted((REPO / "nodes").glob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict):
                target = node.targets[0].id if isinstance(node.targets[0], ast.Name) else ""
                keys = [k.value for k in node.value.keys]
                if target == "NODE_CLASS_MAPPINGS":
                    classes.update({k: path.stem for k in keys})
                elif target == "NODE_DISPLAY_NAME_MAPPINGS":
                    names.update(dict(zip(keys, (v.value for v in node.value.values))))
    return classes, names


CLASSES, DISPLAY_NAMES = node_mappings()


def test_web_directory_holds_only_the_help_pages():
    """WEB_DIRECTORY is served to every browser: no JavaScript (the frontend would load it as an extension)."""
    assert 'WEB_DIRECTORY = "./web"' in (REPO / "__init__.py").read_text()
    served = {p.relative_to(REPO / "web").as_posix() for p in (REPO / "web").rglob("*") if p.is_file()}
    assert served and all(re.fullmatch(r"docs/\w+\.(md|png|jpg)", p) for p in served), served


def test_one_page_per_node():
    """Every registered node has a page and a row of the README's node table linking it, and nothing else does."""
    linked = set(re.findall(r"\(web/docs/(\w+)\.md\)", (REPO / "README.md").read_text()))
    assert CLASSES and {p.stem for p in DOCS.glob("*.md")} == set(CLASSES) == linked


@pytest.mark.parametrize("node_type", sorted(CLASSES))
def test_page_is_titled_and_structured(node_type):
    page = (DOCS / f"{node_type}.md").read_text()
    assert page.splitlines()[0] == f"# {DISPLAY_NAMES[node_type]}"
    for section in ("## Inputs", "## Outputs", "## Mistakes it refuses"):
        assert f"\n{section}\n" in page, section


@pytest.mark.parametrize("node_type", sorted(CLASSES))
def test_pictures_exist_and_are_small(node_type):
    page = (DOCS / f"{node_type}.md").read_text()
    for alt, target in re.findall(r"!\[([^\]]*)\]\(([^)]+)\)", page):
        picture = DOCS / target
        assert alt and picture.is_file(), target
        assert picture.stat().st_size <= PICTURE_LIMIT, f"{target}: {picture.stat().st_size} bytes"
        with Image.open(picture) as image:
            assert image.width >= 200, target


@pytest.mark.comfy
@pytest.mark.parametrize("node_type", sorted(CLASSES))
def test_page_names_every_input_and_output(object_info, node_type):
    """The tables name every input and output the live node has (a renamed input needs its page updated)."""
    page = (DOCS / f"{node_type}.md").read_text()
    info = object_info[node_type]
    inputs = [n for section in ("required", "optional") for n in info["input"].get(section, {})]
    for name in inputs + info["output_name"]:
        assert f"`{name}`" in page, name
