"""The package's shape: imports flow one way along the layers, no private names cross modules, and the
public modules' `__all__` lists names that exist.

Layers, bottom-up (docs/architecture.md): paths/errors -> core -> kernels -> matmul -> adapters -> sharding
-> flax -> optim -> io, then the public modules (qjax/*.py, qjax.models). A module may import its own layer
and the layers below it, lazily inside a function included; kernels/ (installed as qjax.kernels) sits beside
matmul: it may import core, and matmul's dispatch imports it.
"""

import ast
import importlib
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAYERS = ["paths/errors", "core", "kernels", "matmul", "adapters", "sharding", "flax", "optim", "io", "public"]
SRC_LAYERS = {"paths": 0, "errors": 0, "core": 1, "matmul": 3, "adapters": 4, "sharding": 5, "flax": 6,
              "optim": 7, "io": 8}


def module_name(path: pathlib.Path) -> str:
    """qjax/_src/core/qarray.py -> qjax._src.core.qarray; kernels/dispatch.py -> qjax.kernels.dispatch."""
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "kernels":
        parts = ["qjax"] + parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


FILES = {module_name(p): p for p in sorted([*(ROOT / "qjax" / "_src").rglob("*.py"),
                                           *(ROOT / "kernels").rglob("*.py")])}
PUBLIC = sorted((ROOT / "qjax").glob("*.py"))
MODULES = set(FILES) | {module_name(p) for p in [*PUBLIC, *(ROOT / "qjax" / "models").glob("*.py")]}


def layer(module: str) -> int | None:
    """The layer index of a qjax module (None: outside qjax, or a qjax/_src module in no layer)."""
    parts = module.split(".")
    if parts[0] != "qjax":
        return None
    if parts[1:2] == ["kernels"]:
        return LAYERS.index("kernels")
    if parts[1:2] == ["_src"]:
        return SRC_LAYERS.get(parts[2]) if len(parts) > 2 else None
    return LAYERS.index("public")


def is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def package_of(module: str, path: pathlib.Path) -> str:
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


def imports(module: str, path: pathlib.Path):
    """(line, imported module, imported name or None, bound alias) for every import statement in the file."""
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, None, alias.asname
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = package_of(module, path).split(".")
                pkg = pkg[:len(pkg) - node.level + 1]
                base = ".".join(pkg + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in MODULES:
                    yield node.lineno, sub, None, alias.asname or alias.name  # a module imported by name
                else:
                    yield node.lineno, base, alias.name, alias.asname or alias.name


def violations() -> list[str]:
    found = []
    for module, path in FILES.items():
        where = f"{path.relative_to(ROOT)}"
        mine = layer(module)
        if mine is None:
            found.append(f"{where}: module {module} is in no layer of {LAYERS}")
            continue
        own_package = package_of(module, path)
        module_aliases = {}
        for line, target, name, alias in imports(module, path):
            theirs = layer(target)
            if theirs is not None and theirs > mine:
                found.append(f"{where}:{line}: {LAYERS[mine]} imports {target} ({LAYERS[theirs]}), a higher layer")
            if target == module or layer(target) is None:
                continue
            if name is not None and is_private(name):
                found.append(f"{where}:{line}: imports the private name {name} of {target}")
            parts = target.split(".")
            for i, part in enumerate(parts):  # a private module is private to the package that holds it
                scope = ".".join(parts[:i])
                if is_private(part) and not f"{own_package}.".startswith(f"{scope}."):
                    found.append(f"{where}:{line}: imports from the private module {'.'.join(parts[:i + 1])} "
                                 f"outside {scope}")
                    break
            if name is None and alias is not None:
                module_aliases[alias] = target
        for node in ast.walk(ast.parse(path.read_text())):  # `B._prod(...)` through an imported module
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in module_aliases and is_private(node.attr)):
                found.append(f"{where}:{node.lineno}: uses the private name {node.attr} of "
                             f"{module_aliases[node.value.id]}")
    return list(dict.fromkeys(found))  # `from m import a, b` names its line once


def test_the_checker_sees_every_module_and_import():
    assert len(FILES) > 30 and "qjax.kernels.dispatch" in FILES and "qjax._src.paths" in FILES
    targets = {t for m, p in FILES.items() for _, t, _, _ in imports(m, p)}
    assert "qjax._src.core.qarray" in targets and "qjax.kernels.dispatch" in targets


def test_imports_flow_one_way_and_private_names_stay_home():
    found = violations()
    assert not found, "\n".join(found)


@pytest.mark.parametrize("path", PUBLIC, ids=lambda p: p.name)
def test_public_modules_define_all_and_its_names_exist(path):
    tree = ast.parse(path.read_text())
    declared = [n for n in tree.body if isinstance(n, ast.Assign)
                and any(isinstance(t, ast.Name) and t.id == "__all__" for t in n.targets)]
    assert declared, f"{path.relative_to(ROOT)} defines no __all__"
    name = "qjax" if path.name == "__init__.py" else f"qjax.{path.stem}"
    module = importlib.import_module(name)
    missing = [n for n in module.__all__ if not hasattr(module, n)]
    assert not missing, f"{name}.__all__ names missing attributes: {missing}"
    assert len(set(module.__all__)) == len(module.__all__), f"{name}.__all__ repeats a name"


def test_sharding_names_are_the_top_level_ones():
    import qjax
    import qjax.sharding

    assert set(qjax.sharding.__all__) == {
        "lora_sharding", "optimizer_sharding", "params_sharding", "qmatmul_sharded", "quantize_params_sharded",
        "quantized_sharding", "shard_params", "with_sharding_constraint"}
    for name in qjax.sharding.__all__:  # the old top-level names stay importable, one release
        assert getattr(qjax, name) is getattr(qjax.sharding, name), name
