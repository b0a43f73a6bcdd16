"""The package's imports go down the layers only, and none hides inside a function.

  main | aot -> tasks -> viz | convert | config_lib -> exports -> training -> models | data
  -> pixels | paths | tpu

A module may import modules of its own subpackage (no cycle among them) and of lower
layers; never one of its own layer in another subpackage, nor a higher one.
"""

import ast
import os

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "beit_jax")
LAYERS = {
  "beit_jax.main": 7,
  "beit_jax.aot": 7,
  "beit_jax.tasks": 6,
  "beit_jax.viz": 5,
  "beit_jax.convert": 5,
  "beit_jax.config_lib": 5,
  "beit_jax.exports": 4,
  "beit_jax.training": 3,
  "beit_jax.models": 2,
  "beit_jax.data": 2,
  "beit_jax.pixels": 1,
  "beit_jax.paths": 1,  # Local or bucket paths, for every layer above.
  "beit_jax.tpu": 1,  # TPU chips, topologies and what the compiler reports (for aot).
  "beit_jax": 0,  # The package's __init__ (the version only).
}
# Heavy dependencies that may be imported where they are used: torch and dall_e are
# optional (the `convert` extra); tensorboardX imports torch whenever it is installed.
LAZY_ALLOWED = {"torch", "dall_e", "tensorboardX"}


def _modules() -> dict[str, str]:
  out = {}
  for root, _, files in os.walk(PACKAGE):
    for f in files:
      if f.endswith(".py"):
        path = os.path.join(root, f)
        rel = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].replace(os.sep, ".")
        out[rel.removesuffix(".__init__")] = path
  return out


MODULES = _modules()


def _imports(path: str) -> list[tuple[str, bool]]:
  """(imported name, inside a function) for every import statement of the file."""
  tree = ast.parse(open(path, encoding="utf-8").read())
  found = []

  def visit(node, in_function):
    for child in ast.iter_child_nodes(node):
      inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
      if isinstance(child, ast.Import):
        found.extend((a.name, inner) for a in child.names)
      elif isinstance(child, ast.ImportFrom) and child.module and not child.level:
        found.extend(
          [(child.module, inner)] + [(f"{child.module}.{a.name}", inner) for a in child.names]
        )
      visit(child, inner)

  visit(tree, False)
  return found


def _graph() -> dict[str, set[str]]:
  return {
    m: {name for name, _ in _imports(p) if name in MODULES and name != m}
    for m, p in MODULES.items()
  }


def _layer(module: str) -> tuple[str, int]:
  key = max((k for k in LAYERS if module == k or module.startswith(k + ".")), key=len)
  return key, LAYERS[key]


def test_every_module_has_a_layer():
  for module in MODULES:
    assert _layer(module)[0] != "beit_jax" or module == "beit_jax", module


def test_no_import_cycle():
  graph, state = _graph(), {}

  def visit(node, stack):
    state[node] = "open"
    for nxt in sorted(graph[node]):
      if state.get(nxt) == "open":
        pytest.fail("import cycle: " + " -> ".join(stack[stack.index(nxt) :] + [nxt]))
      if nxt not in state:
        visit(nxt, stack + [nxt])
    state[node] = "done"

  for module in sorted(graph):
    if module not in state:
      visit(module, [module])


def test_imports_go_down_the_layers():
  wrong = []
  for module, targets in _graph().items():
    group, rank = _layer(module)
    for target in targets:
      target_group, target_rank = _layer(target)
      if target_group != group and target_rank >= rank:
        wrong.append(f"{module} -> {target}")
  assert not wrong, "imports up or across the layers: " + ", ".join(sorted(wrong))


def test_no_import_inside_a_function():
  hidden = [
    f"{module}: {name}"
    for module, path in MODULES.items()
    for name, inside in _imports(path)
    if inside and name.split(".")[0] not in LAZY_ALLOWED
  ]
  assert not hidden, "imports inside functions: " + ", ".join(hidden)


def test_the_checks_catch_a_cycle_and_an_upward_import(tmp_path, monkeypatch):
  """The walker sees imports at module level and inside functions."""
  a = tmp_path / "a.py"
  a.write_text(
    "import os\nfrom beit_jax.training import loop\n\ndef f():\n"
    "  from beit_jax.tasks import pretrain\n"
  )
  names = dict(_imports(str(a)))
  assert names == {
    "os": False,
    "beit_jax.training": False,
    "beit_jax.training.loop": False,
    "beit_jax.tasks": True,
    "beit_jax.tasks.pretrain": True,
  }


def test_no_module_above_600_lines():
  long = {
    m: n for m, p in MODULES.items() if (n := len(open(p, encoding="utf-8").readlines())) > 600
  }
  assert not long, long
