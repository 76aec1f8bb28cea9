"""The package's shape: data flows one way (no module imports a later stage or a command), each idea
lives in one module, and functions stay short enough to read."""

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "loramix"

# Bottom to top: plain helpers, the stages in data-flow order, then the commands. A module may import
# only modules of lower layers.
LAYERS = [
    ["errors"], ["files"], ["records"], ["config"], ["runtime"],
    ["data", "data.sources"], ["data.demo"], ["data.mixture"], ["data.tokens"], ["data.packing"], ["data.sampling"], ["data.prepare"],
    ["gguf_bases"], ["model"], ["loss"], ["probe"], ["evaluation"], ["tracking"], ["checkpoint"], ["artifacts"], ["card"],
    ["serve", "serve.sampler", "serve.detokenizer", "serve.packed", "serve.kv"], ["serve.lora"], ["serve.scheduler"],
    ["training", "merging", "generation", "reporting"], ["serve.api"], ["serve.http"],
    ["commands"], ["cli"], ["__main__", "__init__"],
]
LAYER = {name: k for k, names in enumerate(LAYERS) for name in names}


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(parts[:-1]) if parts[-1] == "__init__" and len(parts) > 1 else ".".join(parts)
        out[name] = ast.parse(path.read_text(encoding="utf-8"))
    return out


def _imports(tree: ast.Module) -> set[str]:
    """loramix modules imported anywhere in the module (function-level imports included)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("loramix"):
            base = node.module.removeprefix("loramix").lstrip(".")
            for alias in node.names:  # `from loramix import training` names a module; `from loramix.x import f` does not
                sub = f"{base}.{alias.name}".lstrip(".")
                found.add(sub if sub in LAYER else base or "__init__")
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("loramix.") for a in node.names if a.name.startswith("loramix.")}
    return found


@pytest.mark.unit
def test_every_module_has_a_layer():
    assert set(_modules()) == set(LAYER), "place new modules in LAYERS"


@pytest.mark.unit
def test_no_module_imports_a_later_stage_or_a_command():
    wrong = [f"{name} imports {other}" for name, tree in _modules().items() for other in _imports(tree)
             if other != name and LAYER[other] >= LAYER[name]]
    assert not wrong


@pytest.mark.unit
def test_functions_are_under_60_lines():
    long = [(f"{name}.{node.name}", node.end_lineno - node.lineno + 1) for name, tree in _modules().items()
            for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 >= 60]
    assert not long


@pytest.mark.parametrize("pattern", [
    r'"(config\.yaml|adapter_config\.json|config\.json)"\)?\.is_file',  # deciding what kind of dir a path is
    r"os\.replace\(",  # atomic writes
    r"n_positions",  # the context-length lookup
    r'torch\.cuda\.is_available\(\) else "cpu"',  # device resolution
    r'hasattr\(model, "get_base_model"\)',  # unwrapping a PEFT model
])
@pytest.mark.unit
def test_each_mechanism_lives_in_one_module(pattern):
    homes = {path.name for path in PACKAGE.rglob("*.py") if re.search(pattern, path.read_text(encoding="utf-8"))}
    assert len(homes) <= 1, homes
