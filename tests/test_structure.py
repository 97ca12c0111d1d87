"""The shape of the core, measured: arrows point one way between its modules, and every function
reads in one sitting (``../shared/DESIGN.md``)."""

import ast
import os

from tests.helpers import ROOT

MAX_FUNCTION_LINES = 80


def platform_modules() -> dict[str, str]:
    """{dotted module name: file} of every module of the platform package."""
    found = {}
    for folder, _, files in os.walk(os.path.join(ROOT, "platform")):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                dotted = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                found[dotted.removesuffix(".__init__")] = path
    return found


def imports_between(modules: dict[str, str]) -> dict[str, set[str]]:
    """Which platform modules each one imports, at its top or inside a function alike; not what it
    imports only when run as a program (``if __name__ == "__main__":``)."""
    graph = {}
    for module, path in modules.items():
        targets = set()
        tree = ast.parse(open(path).read())
        tree.body = [node for node in tree.body if not is_main_block(node)]
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "platform":
                for alias in node.names:  # `from platform import tracking` names a module too
                    targets.add(f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module)
            elif isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names if alias.name in modules}
        graph[module] = targets - {module, "platform"}  # the package itself is the standard-library stand-in
    return graph


def is_main_block(node) -> bool:
    return (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
            and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__")


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles (Tarjan's strongly connected components of more than one module)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(module):
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for target in sorted(graph.get(module, ())):
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in on_stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while not component or component[-1] != module:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return found


def test_no_import_cycles_among_the_platform_modules():
    graph = imports_between(platform_modules())
    assert graph["platform.tune"] and graph["platform.loop"]  # the walk sees imports at all
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_every_function_of_the_core_reads_in_one_sitting():
    long = []
    for module, path in platform_modules().items():
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{module}.{node.name}: {lines} lines")
    assert long == [], f"over {MAX_FUNCTION_LINES} lines: {long}"


MACHINERY = ("platform.loop", "platform.runner", "platform.train", "platform.tune", "platform.tracking", "platform.runs",
             "platform.cluster", "ray", "mlflow")


def test_tasks_use_the_cores_helpers_never_its_machinery():
    """A task never reaches into the loop, Ray or MLflow, nor into another module's private names."""
    found = []
    folder = os.path.join(ROOT, "tasks")
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".py"):
            continue
        tree = ast.parse(open(os.path.join(folder, name)).read())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                modules = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
                private = [a.name for a in node.names if a.name.startswith("_") and a.name != "__future__"]
            elif isinstance(node, ast.Import):
                modules, private = [a.name for a in node.names], []
            elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__") \
                    and isinstance(node.value, ast.Name) and node.value.id in {"simulate", "data", "lensing", "mae"}:
                found.append(f"{name}: {node.value.id}.{node.attr}")
                continue
            else:
                continue
            found += [f"{name}: imports {m}" for m in modules if m.startswith(MACHINERY)]
            found += [f"{name}: imports private {p} from {node.module}" for p in private if node.module != "tasks"]
    assert found == []
