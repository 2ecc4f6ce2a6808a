"""The code's shape: imports run one way, the core is free of gradio, and only user errors reach users."""

from __future__ import annotations

import ast
import logging
from pathlib import Path

import pytest
from conftest import ROOT

PACKAGES = ("models", "tabs", "finetune", "api")


def project_modules() -> dict[str, Path]:
    modules = {"app": ROOT / "app.py"}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            modules[name.removesuffix(".__init__")] = path
    return modules


def import_graph() -> dict[str, set[str]]:
    """module -> project modules it imports, at module level or inside functions."""
    modules = project_modules()
    graph = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            graph[name] |= {target for target in targets if target in modules and target != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_no_two_modules_import_each_other():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_core_and_api_never_import_gradio_or_the_tabs():
    offenders = []
    for name, path in project_modules().items():
        if not name.startswith(("models", "finetune", "api")):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            modules = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                       else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{name} imports {module}" for module in modules
                          if module.split(".")[0] in ("gradio", "tabs")]
    assert offenders == []


# ---- what reaches the user -------------------------------------------------------------------------

def test_user_errors_pass_their_message_and_bugs_become_an_internal_error(caplog):
    import gradio as gr

    from models.errors import InvalidRequest
    from tabs.common import user_errors

    @user_errors
    def bad_input():
        raise InvalidRequest("temperature must be between 0 and 2, got 9")

    @user_errors
    def bug():
        return {}["missing"]

    @user_errors
    def library_value_error():
        raise ValueError("shapes (3,) and (4,) not aligned")

    with pytest.raises(gr.Error, match="temperature must be between 0 and 2"):
        bad_input()
    for handler in (bug, library_value_error):
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="tabs.common"):
            with pytest.raises(gr.Error) as excinfo:
                handler()
        assert "Internal error" in excinfo.value.message and "logs/workbench.log" in excinfo.value.message
        assert "missing" not in excinfo.value.message and "aligned" not in excinfo.value.message
        assert caplog.records and caplog.records[0].exc_info, "the bug's traceback is in the log"


def test_generator_handlers_sort_errors_the_same_way():
    import gradio as gr

    from models.errors import Busy
    from tabs.common import user_errors

    @user_errors
    def streaming_bug():
        yield "partial"
        raise TypeError("unsupported operand")

    @user_errors
    def busy():
        yield "partial"
        raise Busy("tiny-vlm is busy answering another request; try again shortly.")

    with pytest.raises(gr.Error, match="Internal error"):
        list(streaming_bug())
    with pytest.raises(gr.Error, match="busy answering"):
        list(busy())


def test_log_lines_are_cut_short():
    import app

    formatter = app.ShortLines("%(message)s")
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "value: %s", ("y" * 10_000,), None)
    text = formatter.format(record)
    assert len(text) < app.MAX_LOG_LINE + 100 and "10,007 characters" in text


def test_no_test_requests_a_fixture_it_never_uses():
    """A fixture wanted only for its effect is named in ``pytest.mark.usefixtures``, not as an unused argument."""
    unused = []
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not (isinstance(node, ast.FunctionDef) and node.name.startswith("test_")):
                continue
            parametrized = set()
            for decorator in node.decorator_list:
                if isinstance(decorator, ast.Call) and getattr(decorator.func, "attr", "") == "parametrize":
                    names = decorator.args[0]
                    if isinstance(names, ast.Constant):
                        parametrized |= {name.strip() for name in names.value.split(",")}
                    elif isinstance(names, (ast.Tuple, ast.List)):
                        parametrized |= {element.value for element in names.elts}
            used = {name.id for name in ast.walk(node) if isinstance(name, ast.Name)}
            unused += [f"{path.name}:{node.lineno} {node.name}({arg.arg})" for arg in node.args.args
                       if arg.arg not in used and arg.arg not in parametrized]
    assert unused == []
