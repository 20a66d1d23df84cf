"""Guards (after datasette): every hook is documented in docs/plugins.md with its exact
signature and firstresult semantics, and every hook is exercised by at least one test."""

import inspect
import re
from pathlib import Path

import pytest
from whatsapp_call import hookspecs

ROOT = Path(__file__).resolve().parents[1]
DOCS = (ROOT / "docs" / "plugins.md").read_text()
HOOKS = {
    name: fn
    for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
    if hasattr(fn, "whatsapp_call_spec")
}


def _signature(fn) -> str:
    text = (
        "async " if inspect.iscoroutinefunction(fn) else ""
    ) + f"def {fn.__name__}{inspect.signature(fn)}"
    return text.replace("'", "")


def _section(name: str) -> str:
    match = re.search(rf"^### `{name}`\n(.*?)(?=^### |^## |\Z)", DOCS, re.S | re.M)
    assert match, f"docs/plugins.md has no '### `{name}`' section"
    return match.group(1)


def test_there_are_hooks():
    assert {"send_offer", "check_permission", "fetch_ice_servers", "open_voice_session"} <= set(
        HOOKS
    )


@pytest.mark.parametrize("name", sorted(HOOKS))
def test_hook_documented_with_exact_signature(name):
    section = _section(name)
    assert _signature(HOOKS[name]) in section, f"signature of {name} differs from docs/plugins.md"
    firstresult = HOOKS[name].whatsapp_call_spec["firstresult"]
    assert ("**firstresult**" in section) == firstresult, f"firstresult of {name} misdocumented"
    examples = re.findall(r"```python\n(.*?)```", section, re.S)
    assert any("@hookimpl" in e for e in examples), f"{name} needs a minimal example"


@pytest.mark.parametrize("name", sorted(HOOKS))
def test_hook_docstring(name):
    assert (HOOKS[name].__doc__ or "").strip(), f"hook {name} has no docstring"


@pytest.mark.parametrize("name", sorted(HOOKS))
def test_hook_has_a_test(name):
    """A hook counts as tested when some test implements it or calls it by name."""
    pattern = re.compile(rf"(def {name}\(|[\"']{name}[\"'])")
    for path in (ROOT / "tests").glob("test_*.py"):
        if path.name == "test_hook_docs.py":
            continue
        if pattern.search(path.read_text()):
            return
    pytest.fail(f"no test implements or calls hook {name}")
