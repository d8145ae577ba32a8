"""The import graph of dare_mega against the layers docs/architecture.md draws.

Every import (module level or inside a function) goes to the same package or to a lower layer; no module
imports itself back through others; no package imports another's private names. The layer table is read from
docs/architecture.md, so the page and this check cannot drift apart.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from conftest import REPO

PACKAGE = Path(REPO) / "dare_mega"


def layers() -> dict[str, int]:
    """{package or top-level module: layer} from the table under '## Layers' in docs/architecture.md."""
    text = (Path(REPO) / "docs" / "architecture.md").read_text()
    section = text.split("\n## Layers", 1)[1].split("\n## ", 1)[0]
    out = {}
    for rank, names in re.findall(r"^\| (\d+) \| ([^|]+) \|", section, flags=re.M):
        for name in names.split(","):
            out[name.strip().strip("`")] = int(rank)
    return out


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def unit(module: str) -> str:
    """The layer unit of a module: its package under dare_mega, or the top-level module's own name."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"  # a package, or a top-level module (errors, config, ...)


def imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) for every dare_mega import in a file."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("dare_mega"):
            out.append((node.module, [a.name for a in node.names], node.lineno))
        elif isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names if a.name.startswith("dare_mega")]
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}:{node.lineno}: relative import (use dare_mega.<package>...)")
    return out


def test_every_package_has_a_layer():
    table = layers()
    units = {unit(m) for m in modules()}
    assert units - set(table) == set(), f"not in docs/architecture.md's layer table: {sorted(units - set(table))}"
    assert set(table) - units == set(), f"in the table but not in the code: {sorted(set(table) - units)}"


def upward_imports(known: dict[str, Path]) -> list[str]:
    table = layers()
    upward = []
    for module, path in known.items():
        src = unit(module)
        for target, _, line in imports(path):
            dst = unit(target)
            if dst != src and table[dst] >= table[src]:
                upward.append(f"{path.name}:{line}: {module} ({src}, layer {table[src]}) imports {target} "
                              f"({dst}, layer {table[dst]})")
    return upward


def test_imports_go_down_the_layers():
    upward = upward_imports(modules())
    assert not upward, "\n".join(upward)


def test_no_private_names_across_packages():
    crossing = []
    for module, path in modules().items():
        for target, names, line in imports(path):
            if unit(target) == unit(module):
                continue
            private = [n for n in names if n.startswith("_") and n != "__version__"]
            private += [p for p in target.split(".") if p.startswith("_") and p not in ("__main__", "__init__")]
            if private:
                crossing.append(f"{path.relative_to(REPO)}:{line}: {target} {private}")
    assert not crossing, "\n".join(crossing)


def import_cycles(known: dict[str, Path]) -> list[list[str]]:
    edges = {m: set() for m in known}
    for module, path in known.items():
        for target, names, _ in imports(path):
            for name in names or [None]:
                full = f"{target}.{name}" if name else target
                edges[module].add(full if full in known else target)
    # Tarjan's strongly connected components, iteratively
    index, low, on_stack, stack, cycles, counter = {}, {}, set(), [], [], [0]

    def visit(root):
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next((c for c in children if c in known), None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    cycles.append(sorted(component))

    for module in sorted(known):
        if module not in index:
            visit(module)
    return cycles


def test_no_import_cycles():
    cycles = import_cycles(modules())
    assert not cycles, cycles


def test_the_check_would_see_an_upward_import(tmp_path):
    """A planted module of `data` (layer 2) importing the trainer (layer 7) inside a function is reported."""
    planted = tmp_path / "planted.py"
    planted.write_text("def f():\n    from dare_mega.trainer.rl import main\n")
    found = upward_imports({"dare_mega.data.planted": planted})
    assert found == ["planted.py:2: dare_mega.data.planted (data, layer 2) imports dare_mega.trainer.rl "
                     "(trainer, layer 7)"], found


def test_the_check_would_see_a_cycle(tmp_path):
    a, b, c = (tmp_path / f"{n}.py" for n in "abc")
    a.write_text("from dare_mega.models.b import f\n")
    b.write_text("def f():\n    from dare_mega.models import c\n")
    c.write_text("import dare_mega.models.a\n")
    known = {"dare_mega.models.a": a, "dare_mega.models.b": b, "dare_mega.models.c": c}
    assert import_cycles(known) == [["dare_mega.models.a", "dare_mega.models.b", "dare_mega.models.c"]]
