"""The plugin manager: one module-level `pm`, loaded from entry points in group `whatsapp_call`.

Environment:
* `WHATSAPP_CALL_PLUGINS`: comma list of plugin names to load (entry-point names such as
  `meta,openai`); unset loads all installed; empty string loads none.
* `WHATSAPP_CALL_TRACE_HOOKS=1`: log every hook call with its arguments (secrets redacted)
  and results, on the `whatsapp_call.hooks` logger (stderr by default).

Under pytest (`sys._called_from_test`, set by our conftest) no entry point is loaded, so
installed plugins never leak into tests; tests register the plugins they need.

Hooks may be plain or `async def`. Call them through `call_first` / `call_all`, which await
async implementations and keep firstresult semantics (pluggy alone would take an async
implementation's coroutine for an answer even when it resolves to None).
"""

from __future__ import annotations

import importlib.metadata
import inspect
import logging
import os
import sys
from typing import Any

import pluggy

from . import hookspecs
from .errors import PluginError
from .redact import redact

ENTRY_POINT_GROUP = "whatsapp_call"
PLUGINS_ENV = "WHATSAPP_CALL_PLUGINS"
TRACE_ENV = "WHATSAPP_CALL_TRACE_HOOKS"

trace_log = logging.getLogger("whatsapp_call.hooks")

pm = pluggy.PluginManager("whatsapp_call")
pm.add_hookspecs(hookspecs)

_loaded = False
_load_error: PluginError | None = None
_tracing = False


def load_plugins() -> None:
    """Load installed plugins (once), check hook names, and enable tracing if asked.

    A load failure is remembered and raised again on every later call, so no command runs
    with a silently incomplete set of plugins.
    """
    global _loaded, _load_error
    if _load_error is not None:
        raise _load_error
    if _loaded:
        return
    _loaded = True
    try:
        _load_all()
    except PluginError as exc:
        _load_error = exc
        raise


def _load_all() -> None:
    if not hasattr(sys, "_called_from_test"):
        wanted = os.environ.get(PLUGINS_ENV)
        if wanted is None:
            _load_entry_points(None)
        else:
            _load_entry_points({name.strip() for name in wanted.split(",") if name.strip()})
    check()
    if os.environ.get(TRACE_ENV, "").lower() in ("1", "true", "yes"):
        enable_tracing()


def _load_entry_points(only: set[str] | None) -> None:
    found = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    names = {ep.name for ep in found}
    if only is not None:
        missing = only - names
        if missing:
            raise PluginError(
                f"{PLUGINS_ENV} names plugins that are not installed: {', '.join(sorted(missing))}.",
                f"Installed plugins: {', '.join(sorted(names)) or 'none'}. "
                "Fix the list, or install the missing distribution (e.g. pip install whatsapp-call-meta).",
            )
    for ep in found:
        if only is not None and ep.name not in only:
            continue
        if pm.get_plugin(ep.name) is not None:
            continue
        try:
            module = ep.load()
        except Exception as exc:  # a broken plugin must say which one it is
            raise PluginError(
                f"Plugin {ep.name!r} ({ep.value}) failed to import: {exc}",
                f"Reinstall or upgrade its distribution, or leave it out with {PLUGINS_ENV}.",
            ) from exc
        pm.register(module, name=ep.name)
        dist = getattr(ep, "dist", None)
        if dist is not None:
            pm._dist_info = getattr(pm, "_dist_info", {})  # type: ignore[attr-defined]
            pm._dist_info[ep.name] = (dist.name, dist.version)  # type: ignore[attr-defined]


def register(plugin: object, name: str | None = None) -> str:
    """Register a plugin object (module or instance) in-process, and check its hook names."""
    registered = pm.register(plugin, name=name)
    check()
    return registered


def check() -> None:
    """Fail loudly on a misspelt hook implementation instead of silently never calling it."""
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(
            f"A plugin implements a hook that does not exist: {exc}",
            "Check the spelling against docs/plugins.md (whatsapp-call plugins lists the hooks).",
        ) from exc


def plugin_info() -> list[dict[str, Any]]:
    """Every registered plugin: name, distribution and version, hooks it implements."""
    dist_info = getattr(pm, "_dist_info", {})
    out = []
    for name, plugin in sorted(pm.list_name_plugin(), key=lambda item: item[0]):
        hooks = sorted(h.name for h in pm.get_hookcallers(plugin) or [])
        dist, version = dist_info.get(name, (None, None))
        out.append({"name": name, "distribution": dist, "version": version, "hooks": hooks})
    return out


def _impls(hook_name: str) -> list[pluggy.HookImpl]:
    caller = getattr(pm.hook, hook_name)
    # pluggy calls the last-registered (and tryfirst) implementations first.
    return list(reversed(caller.get_hookimpls()))


async def _invoke(impl: pluggy.HookImpl, kwargs: dict[str, Any]) -> Any:
    result = impl.function(*(kwargs[arg] for arg in impl.argnames))
    if inspect.isawaitable(result):
        result = await result
    return result


async def call_first(hook_name: str, **kwargs: Any) -> Any:
    """Call a firstresult hook: the first non-None answer, awaiting async implementations."""
    _trace_call(hook_name, kwargs)
    for impl in _impls(hook_name):
        result = await _invoke(impl, kwargs)
        if result is not None:
            _trace_result(hook_name, impl.plugin_name, result)
            return result
    _trace_result(hook_name, None, None)
    return None


async def call_all(hook_name: str, **kwargs: Any) -> list[tuple[str, Any]]:
    """Call a hook on every plugin; returns (plugin name, result) for each non-None result."""
    _trace_call(hook_name, kwargs)
    results = []
    for impl in _impls(hook_name):
        result = await _invoke(impl, kwargs)
        if result is not None:
            results.append((impl.plugin_name, result))
    _trace_result(hook_name, "*", results)
    return results


def call_first_sync(hook_name: str, **kwargs: Any) -> Any:
    """Call a synchronous firstresult hook (e.g. `parse_webhook`)."""
    _trace_call(hook_name, kwargs)
    for impl in _impls(hook_name):
        result = impl.function(*(kwargs[arg] for arg in impl.argnames))
        if inspect.isawaitable(result):
            result.close()
            raise PluginError(
                f"Plugin {impl.plugin_name!r} implements {hook_name} as async; it must be synchronous.",
                "Make it a plain def (see docs/plugins.md).",
            )
        if result is not None:
            _trace_result(hook_name, impl.plugin_name, result)
            return result
    _trace_result(hook_name, None, None)
    return None


def call_all_sync(hook_name: str, **kwargs: Any) -> list[tuple[str, Any]]:
    _trace_call(hook_name, kwargs)
    results = [
        (impl.plugin_name, r)
        for impl in _impls(hook_name)
        if (r := impl.function(*(kwargs[arg] for arg in impl.argnames))) is not None
    ]
    _trace_result(hook_name, "*", results)
    return results


def enable_tracing() -> None:
    """Log every hook call and result (secrets redacted). Also on with WHATSAPP_CALL_TRACE_HOOKS=1."""
    global _tracing
    _tracing = True
    if not trace_log.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        trace_log.addHandler(handler)
    trace_log.setLevel(logging.DEBUG)


def disable_tracing() -> None:
    global _tracing
    _tracing = False


def _trace_call(hook_name: str, kwargs: dict[str, Any]) -> None:
    if _tracing:
        trace_log.debug("call %s(%s)", hook_name, redact(kwargs))


def _trace_result(hook_name: str, plugin: str | None, result: Any) -> None:
    if _tracing:
        trace_log.debug("  %s -> %s: %s", hook_name, plugin, redact(result))
