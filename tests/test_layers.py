"""The package's layers import downward only (docs/architecture.md), and no module imports another's private names."""

from __future__ import annotations

import ast
from pathlib import Path

import neurofm

SRC = Path(neurofm.__file__).parent

#: lowest first; a module may import from its own layer and the ones below it
LAYERS = [
    {"errors", "faults", "utils", "config", "plots", "pretrained", ""},  # "" is the package root (its version)
    {"io"},
    {"store"},
    {"preprocess"},
    {"synth"},
    {"data"},
    {"models"},
    {"objectives"},
    {"train"},
    {"infer"},
    {"evaluate"},
    {"tasks"},
    {"analyze"},
    {"demo", "inspect", "cli"},
]


def _layer(module: str) -> int:
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else ""
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"{module} is in no layer: add its package to LAYERS (and to docs/architecture.md)")


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC.parent).with_suffix("")
        name = ".".join(rel.parts).removesuffix(".__init__")
        out[name] = ast.parse(path.read_text(), str(path))
    return out


def _imports(tree: ast.Module) -> list[tuple[str, list[str], int]]:
    """Every neurofm import anywhere in a module (top level or inside functions): (module, names, line)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "neurofm":
            found.append((node.module, [a.name for a in node.names], node.lineno))
        elif isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names if a.name.split(".")[0] == "neurofm"]
    return found


def test_every_import_goes_down_or_sideways():
    upward = []
    for name, tree in _modules().items():
        own = _layer(name)
        for target, names, line in _imports(tree):
            # `from neurofm.models import dual_latent` imports the submodule: judge by its layer too
            targets = [target] + [f"{target}.{n}" for n in names if (SRC / target.split(".", 1)[-1]).is_dir()]
            for t in targets:
                if t != "neurofm" and _layer(t) > own:
                    upward.append(f"{name}:{line} imports {t} (layer {_layer(t)} > {own})")
    assert not upward, "imports that go up a layer:\n" + "\n".join(upward)


def test_no_private_names_cross_modules():
    leaks = []
    for name, tree in _modules().items():
        for target, names, line in _imports(tree):
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private and target != name:
                leaks.append(f"{name}:{line} imports {private} from {target}")
    assert not leaks, "\n".join(leaks)


def test_the_layer_check_catches_an_upward_import():
    tree = ast.parse("def f():\n    from neurofm.tasks.finetune import finetune\n")
    ((target, _, _),) = _imports(tree)
    assert _layer(target) > _layer("neurofm.models.downstream")
