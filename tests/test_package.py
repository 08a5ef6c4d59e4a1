"""The package itself: what ``import hf_signlock`` loads, registration in any import order, no import cycles, the
public names, a docstring on every public class."""

import ast
import importlib
import inspect
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import hf_signlock

PACKAGE = Path(hf_signlock.__file__).parent
HEAVY = ("hf_signlock.training", "hf_signlock.evaluation", "hf_signlock.cli", "transformers.trainer", "datasets",
         "accelerate", "peft", "numba")


def _run(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_import_is_light_and_registers_when_transformers_needs_it():
    out = _run(
        "import sys, hf_signlock\n"
        f"print(sorted(m for m in sys.modules if m.startswith({HEAVY!r})))\n"
        "from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING, AUTO_QUANTIZATION_CONFIG_MAPPING\n"
        "print('signlock' in AUTO_QUANTIZER_MAPPING, 'signlock' in AUTO_QUANTIZATION_CONFIG_MAPPING)\n"
    )
    loaded, registered = out.splitlines()
    assert loaded == "[]"
    assert registered == "True True"


@pytest.mark.parametrize("first", ["from transformers import AutoModelForCausalLM", "import transformers.quantizers",
                                   "import transformers.modeling_utils"])
def test_registered_whatever_was_imported_first(first):
    out = _run(f"{first}\nimport hf_signlock\nfrom transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING\n"
               "print(AUTO_QUANTIZER_MAPPING['signlock'].__name__)")
    assert out.strip() == "SignLockHfQuantizer"


def test_public_names_resolve_lazily():
    for name in hf_signlock.__all__:
        assert getattr(hf_signlock, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        hf_signlock.nope  # noqa: B018


def _modules():
    for info in pkgutil.walk_packages([str(PACKAGE)], "hf_signlock."):
        if info.name == "hf_signlock.__main__":  # runs the CLI when imported
            continue
        yield info.name, (PACKAGE / Path(*info.name.split(".")[1:])).with_suffix(".py") if not info.ispkg else \
            PACKAGE / Path(*info.name.split(".")[1:]) / "__init__.py"


def _imports(name: str, path: Path) -> set[str]:
    """hf_signlock modules that ``name`` imports, anywhere in it (module level or inside functions)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            for alias in node.names:  # `from .pkg import module` imports the module itself
                candidate = f"{base}.{alias.name}"
                found.add(candidate if importlib.util.find_spec(base) and _is_module(candidate) else base)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m.startswith("hf_signlock") and m != name}


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def test_no_import_cycles_and_training_never_imports_quantization():
    graph = {name: _imports(name, path) for name, path in _modules()}
    for name, targets in graph.items():
        if name.startswith("hf_signlock.training"):
            assert not any(t.startswith("hf_signlock.quantization") for t in targets), name
        if name.startswith(("hf_signlock.quantization", "hf_signlock.signs", "hf_signlock.kernels")):
            assert not any(t.startswith(("hf_signlock.training", "hf_signlock.evaluation", "hf_signlock.cli"))
                           for t in targets), name
    state = {}

    def visit(node, path):
        state[node] = "open"
        for target in graph.get(node, ()):
            if state.get(target) == "open":
                pytest.fail(f"import cycle: {' -> '.join(path + [target])}")
            if target not in state:
                visit(target, path + [target])
        state[node] = "done"

    for node in graph:
        if node not in state:
            visit(node, [node])


def test_every_public_class_and_function_has_a_docstring():
    missing = []
    for name, _ in _modules():
        module = importlib.import_module(name)
        for attr, value in vars(module).items():
            if attr.startswith("_") or getattr(value, "__module__", None) != name:
                continue
            if (inspect.isclass(value) or inspect.isfunction(value)) and not inspect.getdoc(value):
                missing.append(f"{name}.{attr}")
    assert not missing, missing
