"""Bench scripts that time work in fresh processes pass them code as a string (`python -c _CHILD`), which no
linter reads: a name the child uses but never binds fails only when the bench runs (bench_convert.py's child used
`pathlib` and `__file__`, neither defined under `python -c`, and died at its first step)."""
import ast
import builtins
import pathlib
import string
import symtable

REPO = pathlib.Path(__file__).resolve().parents[1]


def _children() -> dict[str, str]:
  """{script name: source} of every module-level string assigned to `_CHILD` in bench/ (passed to `python -c`)."""
  out = {}
  for script in sorted((REPO / "bench").glob("*.py")):
    for node in ast.parse(script.read_text()).body:
      if (isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "_CHILD" for t in node.targets)
          and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)):
        out[script.name] = node.value.value
        if "_CHILD.format(" in script.read_text():  # a template: each {field} becomes a value
          out[script.name] = "".join(text + ("None" if field is not None else "")
                                     for text, field, _, _ in string.Formatter().parse(node.value.value))
  return out


def _unbound(source: str) -> set[str]:
  """Global names the code reads (at top level or from its functions) that it never binds and builtins lack."""
  top = symtable.symtable(source, "<child>", "exec")
  bound = {s.get_name() for s in top.get_symbols() if s.is_assigned() or s.is_imported()}
  bound |= {t.get_name() for t in top.get_children()}  # functions and classes it defines
  read, tables = set(), [top]
  while tables:
    table = tables.pop()
    tables.extend(table.get_children())
    for s in table.get_symbols():
      if s.is_referenced() and (table is top or s.is_global()):
        read.add(s.get_name())
  return read - bound - set(dir(builtins))


def test_there_are_children_to_check():
  assert {"bench_convert.py", "plan_server_slots.py"} <= set(_children())


def test_every_name_a_bench_child_reads_is_bound_in_it():
  for name, source in _children().items():
    assert not _unbound(source), f"{name}: its _CHILD code reads {sorted(_unbound(source))}, never bound there"


def test_the_check_finds_an_unbound_name():
  assert _unbound("import os\nx = pathlib.Path(__file__)\ndef f():\n  return os.sep + y\n") == {
      "pathlib", "__file__", "y"}
