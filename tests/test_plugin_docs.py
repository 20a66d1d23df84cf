"""The plugin guide (docs/plugins.md) and the example plugin stay true to the code.

test_hook_docs.py guards the hook reference; this guards the rest of the reference: the
voice-session interface, the event models, the test fixtures, the debugging switches, the
packaging recipe, and the example's claim to use only the public API.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
import sys
import tomllib
from pathlib import Path

import pytest
from whatsapp_call import plugins as plugin_mod
from whatsapp_call import testing
from whatsapp_call.cli import cli
from whatsapp_call.models import CallEvent, CallEventType
from whatsapp_call.voice import VoiceEvent, VoiceEventType, VoiceSession

ROOT = Path(__file__).resolve().parents[1]
DOCS = (ROOT / "docs" / "plugins.md").read_text()
EXAMPLE = ROOT / "examples" / "whatsapp-call-echo"
EXAMPLE_SOURCE = EXAMPLE / "src" / "whatsapp_call_echo" / "__init__.py"
PUBLIC_MODULES = {
    "whatsapp_call",
    "whatsapp_call.voice",
    "whatsapp_call.errors",
    "whatsapp_call.models",
    "whatsapp_call.config",
}


def chapter(title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", DOCS, re.S | re.M)
    assert match, f"docs/plugins.md has no '## {title}' chapter"
    return match.group(1)


def code_blocks(text: str, lang: str = "python") -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, re.S)


def table_rows(text: str) -> dict[str, str]:
    """First-column code value -> the rest of the row, for the tables of a chapter."""
    rows = dict(re.findall(r"^\| `([a-z_]+)` \|(.*)$", text, re.M))
    rows.pop("type", None)  # the header row
    return rows


def signature(fn) -> str:
    text = ("async " if inspect.iscoroutinefunction(fn) else "") + f"def {fn.__name__}"
    return (text + str(inspect.signature(fn))).replace("'", "")


VOICE_METHODS = ["start", "send_audio", "greet", "events", "playback_interrupted", "close"]


def test_voice_methods_list_is_complete():
    public = {
        name
        for name, member in vars(VoiceSession).items()
        if callable(member) and not name.startswith("_")
    }
    assert public == set(VOICE_METHODS)


@pytest.mark.parametrize("name", VOICE_METHODS)
def test_voice_session_method_documented_with_exact_signature(name):
    blocks = code_blocks(chapter("The voice-session interface"))
    interface = next(b for b in blocks if b.startswith("class VoiceSession"))
    assert signature(getattr(VoiceSession, name)) in interface
    assert f"sample_rate: int = {VoiceSession.sample_rate}" in interface


def test_every_voice_event_type_and_field_documented():
    text = chapter("The voice-session interface")
    rows = table_rows(text)
    assert set(rows) == {t.value for t in VoiceEventType}
    fields = ", ".join(f.name for f in dataclasses.fields(VoiceEvent))
    assert f"`VoiceEvent({fields})`" in text


def test_every_call_event_type_and_field_documented():
    text = chapter("The call-event model")
    rows = table_rows(text)
    assert set(rows) == {t.value for t in CallEventType}
    fields = {f.name for f in dataclasses.fields(CallEvent)}
    for row in rows.values():
        named = set(re.findall(r"`([a-z_]+)`", row.rsplit("|", 2)[-2]))
        assert named <= fields, f"the table names fields CallEvent lacks: {named - fields}"
    for name in fields:
        assert f"`{name}`" in text, f"CallEvent.{name} is not described"


def test_every_fixture_documented_with_its_parameters():
    text = chapter("Testing a plugin")
    fixtures = [
        name
        for name, obj in vars(testing).items()
        if hasattr(obj, "_fixture_function_marker")
        or type(obj).__name__ == "FixtureFunctionDefinition"
    ]
    assert {"register_plugin", "make_settings", "simulated_call"} <= set(fixtures)
    for name in fixtures:
        assert f"`{name}(" in text, f"fixture {name} is not documented"
    run_params = re.search(r"`simulated_call\((.*?)\)`", text, re.S).group(1)
    for param in ("plugins", "provider", "voice_backend", "scenario", "to", "greeting", "timeout"):
        assert re.search(rf"\b{param}\b", run_params), param
    for field in dataclasses.fields(testing.SimulatedCall):
        assert f"`{field.name}`" in text, f"SimulatedCall.{field.name} is not documented"


def test_debugging_switches_exist_as_documented():
    text = chapter("Debugging")
    assert plugin_mod.PLUGINS_ENV in text and plugin_mod.TRACE_ENV in text
    options = {
        cmd: {opt for p in cli.commands[cmd].params for opt in p.opts}
        for cmd in ("plugins", "doctor")
    }
    for flag in re.findall(r"whatsapp-call plugins \[?(--[a-z-]+)", text):
        assert flag in options["plugins"]
    for flag in ("--smoke", "--smoke-to", "--voice-backend"):
        assert flag in text and flag in options["doctor"]


def test_example_code_compiles():
    blocks = [b for b in code_blocks(DOCS) if "@hookimpl" in b or "def test_" in b]
    assert len(blocks) > 10
    for block in blocks:
        ast.parse(block)


def test_packaging_recipe_is_the_examples():
    documented = tomllib.loads(code_blocks(chapter("Packaging a plugin"), "toml")[0])
    actual = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())
    assert documented["project"]["entry-points"] == actual["project"]["entry-points"]
    assert actual["project"]["entry-points"][plugin_mod.ENTRY_POINT_GROUP] == {
        "echo": "whatsapp_call_echo"
    }
    assert documented["build-system"] == actual["build-system"]
    assert documented["project"]["dependencies"] == actual["project"]["dependencies"]


def test_example_uses_only_the_public_api():
    tree = ast.parse(EXAMPLE_SOURCE.read_text())
    imported = {
        node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
    } | {a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
    ours = {m for m in imported if m.split(".")[0] == "whatsapp_call"}
    assert ours and ours <= PUBLIC_MODULES, ours - PUBLIC_MODULES


def test_example_is_not_a_workspace_member():
    root = tomllib.loads((ROOT / "pyproject.toml").read_text())
    members = root["tool"]["uv"]["workspace"]["members"]
    assert not any(Path("examples/whatsapp-call-echo").match(m) for m in members)
    assert "whatsapp-call-echo" not in root["tool"]["uv"].get("sources", {})


def test_example_readme_documents_its_options():
    sys.path.insert(0, str(EXAMPLE / "src"))
    try:
        from whatsapp_call_echo import EchoSettings
    finally:
        sys.path.remove(str(EXAMPLE / "src"))
    readme = (EXAMPLE / "README.md").read_text()
    assert "## Write your own voice backend in 50 lines" in readme
    rows = dict(re.findall(r"^\| `(\w+)` \| ([^|]+) \|", readme, re.M))
    expected = {f.alias: f.default for f in EchoSettings.model_fields.values()}
    assert set(rows) == set(expected)
    for key, default in expected.items():
        assert float(rows[key]) == default, key
