"""The package's shape: no import circle (lazy imports included), light entry points, small modules and functions."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "knowlm"
MODULE_LINES = 450          # no module longer
FUNCTION_LINES = 60         # no function longer in the CLI and the training code
HEAVY = ("mindspore", "mindformers", "torch", "transformers")


def module_name(path):
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(name, path):
    """knowlm modules ``name`` imports anywhere in its file, with the packages each import initialises first
    (importing ``a.b.c`` runs ``a`` and ``a.b``), except its own ancestors, which are already running."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + [base]).strip(".")
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        for target in targets:
            parts = target.split(".")
            found |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)} & MODULES.keys()
    ancestors = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
    return found - ancestors - {name}


def test_the_import_graph_has_no_circle():
    graph = {name: imported_modules(name, path) for name, path in MODULES.items()}
    state, stack = {}, []

    def visit(name):
        state[name] = "open"
        stack.append(name)
        for target in sorted(graph[name]):
            if state.get(target) == "open":
                circle = stack[stack.index(target):] + [target]
                pytest.fail("import circle: " + " -> ".join(circle))
            if target not in state:
                visit(target)
        stack.pop()
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name)


def test_the_graph_sees_lazy_imports_and_package_initialisation():
    cli = imported_modules("knowlm.cli", MODULES["knowlm.cli"])
    assert {"knowlm.generate", "knowlm.models", "knowlm.models.load", "knowlm.train.finetune"} <= cli


def loaded_after(code):
    done = subprocess.run([sys.executable, "-c", f"import sys; {code}; "
                           f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))"],
                          capture_output=True, text=True, timeout=120, check=True)
    return done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""


@pytest.mark.parametrize("code", [
    "import knowlm.ie, knowlm.ie.parse, knowlm.ie.extract, knowlm.ie.evaluate, knowlm.ie.kg2instruct",
    "import knowlm, knowlm.errors, knowlm.files, knowlm.tokenizer.chat, knowlm.checkpoints.names",
    "import knowlm.cli; knowlm.cli.build_parser().format_help()",
])
def test_light_modules_load_no_framework(code):
    assert loaded_after(code) == ""


def test_version_and_help_answer_without_loading_a_framework():
    for flag in ("--version", "--help"):
        done = subprocess.run([sys.executable, "-X", "importtime", "-m", "knowlm.cli", flag], capture_output=True,
                              text=True, timeout=60, check=True)
        assert done.stdout.strip()
        imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if "|" in line}
        assert not imported & set(HEAVY), flag


def test_public_names_resolve_on_first_use():
    assert {"mindspore", "mindformers"} <= set(loaded_after("import knowlm; knowlm.KnowLMForCausalLM").split(","))


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_is_longer_than_the_limit(name):
    assert len(MODULES[name].read_text(encoding="utf-8").splitlines()) <= MODULE_LINES


@pytest.mark.parametrize("name", [name for name in sorted(MODULES) if name.endswith(".cli") or
                                  name.startswith("knowlm.train")])
def test_no_cli_or_training_function_is_longer_than_the_limit(name):
    tree = ast.parse(MODULES[name].read_text(encoding="utf-8"))
    long = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines)" for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > FUNCTION_LINES]
    assert not long
