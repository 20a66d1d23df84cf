"""Pytest fixtures for testing whatsapp-call and its plugins. Enable in a conftest.py with:

    pytest_plugins = ["whatsapp_call.testing"]

* No installed plugin is loaded from entry points during tests (the `sys._called_from_test`
  guard): a test registers exactly the plugins it needs with `register_plugin`.
* `make_settings(**options)` builds validated Settings from camelCase options.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from . import plugins as plugin_mod
from .config import Settings, settings_from_dict


def pytest_configure(config: pytest.Config) -> None:
    sys._called_from_test = True  # type: ignore[attr-defined]


@pytest.fixture
def register_plugin() -> Iterator[Callable[..., str]]:
    """Register plugin objects (modules or instances) for one test; unregistered afterwards."""
    names: list[str] = []

    def register(plugin: object, name: str | None = None) -> str:
        registered = plugin_mod.register(plugin, name=name)
        names.append(registered)
        return registered

    yield register
    for name in names:
        if plugin_mod.pm.get_plugin(name) is not None:
            plugin_mod.pm.unregister(name=name)


@pytest.fixture
def make_settings() -> Callable[..., Settings]:
    """Settings from camelCase options, validated against the registered plugins' models."""

    def make(**options: Any) -> Settings:
        models = [m for _, m in plugin_mod.call_all_sync("settings_model")]
        return settings_from_dict(dict(options), plugin_models=models)

    return make
