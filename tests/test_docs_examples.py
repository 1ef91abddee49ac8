"""Every `# file:` example of docs/extending.md runs: its plugins pass check-plugin, its tests pass."""

import importlib
import inspect
import re
import sys
from pathlib import Path

import pytest
from avalanche.training.plugins import SupervisedPlugin
from flwr.serverapp.strategy import Strategy

from fedtide.cli.check_plugin import check_plugin
from fedtide.continual.base import ContinualMethod

DOC = Path(__file__).parents[1] / "docs" / "extending.md"
BLOCK = re.compile(r"```python\n# file: (\w+)\.py\n(.*?)```", re.DOTALL)
EXAMPLES = dict(BLOCK.findall(DOC.read_text()))


@pytest.fixture
def examples_folder(tmp_path, monkeypatch):
    """The page's files side by side, importable as the user's modules would be."""
    for module, code in EXAMPLES.items():
        (tmp_path / f"{module}.py").write_text(code)
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])
    yield tmp_path
    for module in EXAMPLES:
        sys.modules.pop(module, None)


def test_the_page_has_its_examples():
    assert set(EXAMPLES) == {"clipped_fedavg", "anchor_pull", "test_anchor_pull"}


@pytest.mark.parametrize("module", sorted(m for m in EXAMPLES if not m.startswith("test_")))
def test_each_plugin_on_the_page_passes_check_plugin(examples_folder, module):
    loaded = importlib.import_module(module)
    plugins = [
        name for name, obj in vars(loaded).items()
        if inspect.isclass(obj) and obj.__module__ == module and not name.startswith("_")
        and issubclass(obj, Strategy | ContinualMethod | SupervisedPlugin)
    ]  # fmt: skip
    assert plugins
    for name in plugins:
        report = check_plugin(f"{module}:{name}", clients=3)
        assert report.ok, report.message


def test_the_pages_own_tests_pass(examples_folder):
    loaded = importlib.import_module("test_anchor_pull")
    tests = [obj for name, obj in vars(loaded).items() if name.startswith("test_")]
    assert tests
    for test in tests:
        test()
