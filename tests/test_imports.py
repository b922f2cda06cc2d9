"""The package's import structure: no cycles, config a leaf, `import switchjax` light, and
nothing in the package reaching outside it (sys.path, ../shared).

The graph is read from the source (ast), every `import` of a switchjax module counted wherever
it stands (module level or inside a function) except under `if TYPE_CHECKING:`, which never
runs. Importing `a.b.c` also runs the packages `a` and `a.b` first, so those count too, except
a module's own enclosing packages (always loaded before it).
"""

import ast
import pathlib
import subprocess
import sys

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "switchjax"


def module_names() -> dict[str, pathlib.Path]:
  names = {}
  for path in sorted(PACKAGE.rglob("*.py")):
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
      parts = parts[:-1]
    names[".".join(parts)] = path
  return names


def _enclosing(name: str) -> list[str]:
  parts = name.split(".")
  return [".".join(parts[:i]) for i in range(1, len(parts))]


def _is_type_checking(node: ast.If) -> bool:
  test = node.test
  return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
    isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
  )


def imports_of(name: str, path: pathlib.Path, modules) -> dict[str, bool]:
  """{imported switchjax module: True if imported inside a function} of one module."""
  found: dict[str, bool] = {}
  package = name if path.name == "__init__.py" else name.rpartition(".")[0]

  def add(target: str, nested: bool) -> None:
    for t in [*_enclosing(target), target]:
      if t in modules and t != name and t not in _enclosing(name):
        found[t] = found.get(t, False) or nested

  def visit(node: ast.AST, nested: bool) -> None:
    for child in ast.iter_child_nodes(node):
      if isinstance(child, ast.If) and _is_type_checking(child):
        continue
      inner = nested or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
      if isinstance(child, ast.Import):
        for alias in child.names:
          if alias.name.split(".")[0] == "switchjax":
            add(alias.name, inner)
      elif isinstance(child, ast.ImportFrom):
        base = child.module or ""
        if child.level:
          parts = package.split(".")[: len(package.split(".")) - child.level + 1]
          base = ".".join(parts + ([base] if base else []))
        if base.split(".")[0] != "switchjax":
          continue
        for alias in child.names:
          full = f"{base}.{alias.name}"
          add(full if full in modules else base, inner)
      else:
        visit(child, inner)

  visit(ast.parse(path.read_text()), False)
  return found


def import_graph() -> dict[str, dict[str, bool]]:
  modules = module_names()
  return {name: imports_of(name, path, modules) for name, path in modules.items()}


def cycles(graph) -> list[list[str]]:
  """The strongly connected components of more than one module (Tarjan)."""
  index, low, stack, on_stack, found = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in graph[v]:
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        found.append(sorted(component))

  for v in graph:
    if v not in index:
      visit(v)
  return found


def test_the_package_has_no_import_cycles():
  assert cycles(import_graph()) == []


def test_the_cycle_check_finds_a_cycle():
  graph = {"a": {"b": False}, "b": {"c": True}, "c": {"a": False}, "d": {"a": False}}
  assert cycles(graph) == [["a", "b", "c"]]


def test_no_module_imports_switchjax_inside_a_function():
  # A function-level import of the package's own modules is how a cycle hides.
  nested = {
    name: sorted(t for t, inner in targets.items() if inner)
    for name, targets in import_graph().items()
  }
  assert {name: t for name, t in nested.items() if t} == {}


def test_config_is_a_leaf():
  # Routers register their names and checks with config; config imports none of the rest
  # (switchjax.errors, a helper that imports nothing of switchjax, aside).
  graph = import_graph()
  outside = {
    name: sorted(t for t in targets if not t.startswith("switchjax.config"))
    for name, targets in graph.items()
    if name.startswith("switchjax.config")
  }
  assert {n: t for n, t in outside.items() if t not in ([], ["switchjax.errors"])} == {}
  assert graph["switchjax.errors"] == {}


def test_checkpoint_io_does_not_import_the_model():
  graph = import_graph()
  reached, todo = set(), [n for n in graph if n.startswith("switchjax.checkpoint")]
  while todo:
    name = todo.pop()
    if name not in reached:
      reached.add(name)
      todo.extend(graph[name])
  assert not reached & {"switchjax.model", "switchjax.scan", "switchjax.moe", "switchjax.layers"}


def test_import_switchjax_is_light():
  code = (
    "import sys, switchjax\n"
    "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in "
    "('switchjax', 'optax', 'orbax', 'torch', 'transformers', 'grain', 'sentencepiece'))))"
  )
  loaded = set(
    subprocess.run(
      [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
  )
  heavy = {"optax", "orbax", "torch", "transformers", "grain", "sentencepiece"}
  assert not loaded & heavy
  assert {m.split(".")[1] for m in loaded if m.count(".") >= 1} <= {"config", "errors", "routing"}


def test_public_names_import_on_first_use():
  code = (
    "import switchjax\n"
    "print(switchjax.load_model.__module__, switchjax.MoeLayer.__module__, "
    "switchjax.upcycle.__name__, 'train' in dir(switchjax))\n"
    "try:\n  switchjax.no_such_name\nexcept AttributeError as e:\n  print(e)\n"
  )
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert (
    out.stdout.split("\n")[0]
    == "switchjax.model_loading switchjax.moe.layer switchjax.upcycle True"
  )
  assert "has no attribute 'no_such_name'" in out.stdout


def test_the_package_stays_inside_itself():
  # Reference code (flaxformer) and measurement live in the repository's benchmarks/, not here.
  offenders = []
  for name, path in module_names().items():
    source = path.read_text()
    tree = ast.parse(source)
    edits_path = any(
      isinstance(node, ast.Attribute)
      and node.attr == "path"
      and isinstance(node.value, ast.Name)
      and node.value.id == "sys"
      for node in ast.walk(tree)
    )
    if edits_path or "shared/refs" in source or "../shared" in source:
      offenders.append(name)
  assert offenders == []
