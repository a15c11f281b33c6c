"""What the package is made of: the library alone (torch and the standard library), no import cycle,
and every private torch access in one module (``_torch_compat.py``)."""

from __future__ import annotations

import ast
import pathlib
import sys

import gradvac_dist

PACKAGE = pathlib.Path(gradvac_dist.__file__).parent
MODULES = sorted(PACKAGE.glob("*.py"))


def _trees():
    return {path.stem: ast.parse(path.read_text(), str(path)) for path in MODULES}


def test_the_package_imports_only_torch_and_the_standard_library():
    allowed = set(sys.stdlib_module_names) | {"torch"}
    for name, tree in _trees().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                roots = [node.module.split(".")[0]]
            else:
                continue
            assert set(roots) <= allowed, f"{name}.py imports {roots}"


def test_no_import_cycle():
    graph = {}
    for name, tree in _trees().items():
        graph[name] = {
            node.module
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module
        } | {
            alias.name
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module is None
            for alias in node.names
        }

    def visit(name, path):
        assert name not in path, f"import cycle: {' -> '.join([*path, name])}"
        for dep in graph.get(name, ()):
            visit(dep, [*path, name])

    for name in graph:
        if name != "__init__":
            visit(name, [])


def _own_private_names() -> set[str]:
    """Underscored names the package itself defines (functions, classes, attributes, slots, arguments),
    outside ``_torch_compat.py``, whose names are torch's."""
    names = set()
    for module, tree in _trees().items():
        if module == "_torch_compat":
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.arg):
                names.add(node.arg)
            elif isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__slots__" for t in node.targets):
                names.update(c.value for c in ast.walk(node.value) if isinstance(c, ast.Constant))
    return names


def _private_torch_names(tree: ast.Module, own: set[str]) -> set[str]:
    """Underscored attributes the package does not define, and imports of underscored torch modules."""
    found = set()
    for node in ast.walk(tree):
        attr = node.attr if isinstance(node, ast.Attribute) else None
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("getattr", "hasattr", "setattr"):
            name = node.args[1] if len(node.args) > 1 else None
            attr = name.value if isinstance(name, ast.Constant) and isinstance(name.value, str) else None
        if attr and attr.startswith("_") and not attr.startswith("__") and attr not in own:
            found.add(attr)
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module.split(".")[0] == "torch":
            if any(part.startswith("_") for part in node.module.split(".")):
                found.add(node.module)
    return found


def test_private_torch_names_appear_only_in_torch_compat():
    own = _own_private_names()
    trees = _trees()
    found = {
        name: names
        for name, tree in trees.items()
        if name != "_torch_compat"
        if (names := _private_torch_names(tree, own))
    }
    assert not found, f"private torch names outside _torch_compat.py: {found}"
    # the detector sees them where they are
    assert {"_get_fsdp_state", "_comm_hooks", "_orig_mod", "_join_config"} <= _private_torch_names(
        trees["_torch_compat"], own
    )


def _grad_writes(tree: ast.AST) -> list[int]:
    """Lines that assign ``x.grad = ...`` or add into ``x.grad`` in place (``x.grad.add_(...)``)."""
    lines = []
    for node in ast.walk(tree):
        targets = (
            node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AugAssign) else []
        )
        if any(isinstance(t, ast.Attribute) and t.attr == "grad" for t in targets):
            lines.append(node.lineno)
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr.endswith("_")
            and isinstance(node.func.value, ast.Attribute)
            and node.func.value.attr == "grad"
        ):
            lines.append(node.lineno)
    return lines


def test_only_grads_writes_param_grad():
    trees = _trees()
    # FSDP2's own unsharded parameters are FSDP's business (a private slot, in _torch_compat).
    found = {
        name: lines
        for name, tree in trees.items()
        if name not in ("_grads", "_torch_compat")
        if (lines := _grad_writes(tree))
    }
    assert not found, f"param.grad written outside _grads.py (module: lines): {found}"
    assert len(_grad_writes(trees["_grads"])) >= 5  # the detector sees the writes where they are
