"""The module's Python and its .ui file agree, checked without Qt (ast + XML)."""

from __future__ import annotations

import ast
import re
import xml.etree.ElementTree as ElementTree
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MODULE = REPO / "VOILASegmenter" / "VOILASegmenter.py"
UI_FILE = REPO / "VOILASegmenter" / "Resources" / "UI" / "VOILASegmenter.ui"
MODULE_CMAKE = REPO / "VOILASegmenter" / "CMakeLists.txt"


def ui_widgets() -> dict[str, ElementTree.Element]:
    root = ElementTree.parse(UI_FILE).getroot()
    return {widget.get("name"): widget for widget in root.iter("widget")}


def used_ui_names() -> set[str]:
    """Every ``self.ui.<name>`` attribute the module reads or writes."""
    tree = ast.parse(MODULE.read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Attribute)
            and node.value.attr == "ui"
            and isinstance(node.value.value, ast.Name)
            and node.value.value.id == "self"
        ):
            names.add(node.attr)
    return names


def parameter_names() -> set[str]:
    tree = ast.parse(MODULE.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "VOILASegmenterParameterNode":
            return {item.target.id for item in node.body if isinstance(item, ast.AnnAssign)}
    raise AssertionError("VOILASegmenterParameterNode not found")


def test_every_widget_the_module_uses_exists_in_the_ui_file():
    missing = used_ui_names() - set(ui_widgets())
    assert not missing, f"used in VOILASegmenter.py but absent from the .ui: {sorted(missing)}"


def test_the_module_uses_the_widgets_it_needs():
    used = used_ui_names()
    for name in ("applyButton", "promptsLineEdit", "progressBar", "statusLabel", "resultsTableWidget"):
        assert name in used


def test_every_bound_widget_names_an_existing_parameter():
    parameters = parameter_names()
    for name, widget in ui_widgets().items():
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                assert prop.find("string").text in parameters, name


def test_every_parameter_is_bound_to_a_widget_or_handled_in_code():
    bound = {
        prop.find("string").text
        for widget in ui_widgets().values()
        for prop in widget.findall("property")
        if prop.get("name") == "SlicerParameterName"
    }
    source = MODULE.read_text(encoding="utf-8")
    for parameter in parameter_names() - bound:
        assert re.search(rf"_parameterNode\.{parameter}\s*=", source), parameter


def test_the_result_table_has_the_documented_columns_and_fills_each_of_them():
    table = ui_widgets()["resultsTableWidget"]
    headers = [column.find("property/string").text for column in table.findall("column")]
    assert headers == ["Structure", "Colour", "Volume (ml)", "Confidence", "Found", "Predicted Dice", "Check"]
    assert table.find("property[@name='columnCount']/number").text == str(len(headers))
    source = MODULE.read_text(encoding="utf-8")
    cells = source[source.index("def _showResults") :]
    cells = cells[cells.index("cells = [") : cells.index("]\n", cells.index("cells = ["))]
    assert cells.count("\n") - 1 == len(headers), "one cell per column in _showResults"


def widget_methods() -> set[str]:
    tree = ast.parse(MODULE.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "VOILASegmenterWidget":
            return {item.name for item in node.body if isinstance(item, ast.FunctionDef)}
    raise AssertionError("VOILASegmenterWidget not found")


def ui_connections() -> dict[str, tuple[str, str]]:
    """``{widget name: (signal, slot method)}`` of every ``self.ui.<name>.connect(signal, self.<slot>)``."""
    tree = ast.parse(MODULE.read_text(encoding="utf-8"))
    connections = {}
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "connect"
            and isinstance(node.func.value, ast.Attribute)
            and isinstance(node.func.value.value, ast.Attribute)
            and node.func.value.value.attr == "ui"
            and len(node.args) == 2
            and isinstance(node.args[1], ast.Attribute)
        ):
            connections[node.func.value.attr] = (node.args[0].value, node.args[1].attr)
    return connections


def test_every_connected_signal_goes_to_a_method_of_the_widget():
    methods = widget_methods()
    for name, (signal, slot) in ui_connections().items():
        assert slot in methods, f"{name}.{signal} is connected to a missing method {slot}"


def test_the_refine_section_offers_a_structure_chooser_and_four_connected_click_buttons():
    widgets = ui_widgets()
    refine = widgets["refineCollapsibleButton"]
    inside = {widget.get("name"): widget for widget in refine.iter("widget")}
    assert inside["refinePromptComboBox"].get("class") == "QComboBox"
    texts = {
        name: inside[name].find("property[@name='text']/string").text
        for name in ("insidePointButton", "outsidePointButton", "boxButton", "clearClicksButton")
    }
    assert texts == {
        "insidePointButton": "Inside point",
        "outsidePointButton": "Outside point",
        "boxButton": "Box",
        "clearClicksButton": "Clear",
    }
    connections = ui_connections()
    for name in texts:
        assert connections[name][0] == "clicked()", name
    assert "refinePromptComboBox" in used_ui_names()


def test_every_module_script_and_resource_is_listed_in_cmake():
    cmake = MODULE_CMAKE.read_text(encoding="utf-8").replace("${MODULE_NAME}", "VOILASegmenter")
    module_dir = MODULE.parent
    for path in sorted(module_dir.glob("VOILASegmenterLib/*.py")) + [MODULE]:
        assert path.relative_to(module_dir).as_posix() in cmake, path.name
    for path in sorted((module_dir / "Resources").rglob("*")):
        if path.is_file():
            assert path.relative_to(module_dir).as_posix() in cmake, path.name
