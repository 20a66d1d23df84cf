"""Pytest fixtures for testing whatsapp-call and its plugins. Enable in a conftest.py with:

    pytest_plugins = ["whatsapp_call.testing"]

* No installed plugin is loaded from entry points during tests (the `sys._called_from_test`
  guard): a test registers exactly the plugins it needs with `register_plugin`.
* `make_settings(**options)` builds validated Settings from camelCase options.
* `simulated_call(plugins=[...], scenario=..., **options)` runs one whole call through the
  real service against the local simulators (needs `whatsapp-call-sim`) and returns what
  happened: the call record, transcript, events and the simulated user's recording.
"""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from . import plugins as plugin_mod
from .config import Settings, settings_from_dict
from .errors import PluginError

SIM_TO = "+14155550123"
SIM_GREETING = "Hi! This is a simulated test call. Can you hear me?"
# The built-in plugins a simulated call falls back on, by the name they answer for.
_BUILTIN = {
    "meta": "whatsapp_call_meta",
    "wati": "whatsapp_call_wati",
    "openai": "whatsapp_call_openai",
}


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


@dataclass
class SimulatedCall:
    """The outcome of `simulated_call`: read it after the call (everything is stopped).

    `record` is the final `CallRecord` (`end_reason`, `metrics`...), `transcript` its
    `TranscriptLine`s, `events` the stored call events. `sim_call` is the WhatsApp
    simulator's view of the call and `user` the `SimulatedUser` (None for a signalling-only
    scenario): `user.speech_segments()`, `user.heard_audio()` (48 kHz int16) and `user.said`
    show what the callee heard and said. `options` is the config the service ran with.
    """

    record: Any
    transcript: list[Any]
    events: list[Any]
    sim_call: Any
    user: Any
    options: dict[str, Any] = field(default_factory=dict)

    def lines(self, role: str) -> list[str]:
        """The transcript texts of `role` ("assistant" or "user"), in order."""
        return [t.text for t in self.transcript if t.role == role]


def _answers(hook: str, plugin: object) -> list[str]:
    impl = getattr(plugin, hook, None)
    return list((impl() if callable(impl) else None) or [])


@pytest.fixture
def simulated_call(
    register_plugin: Callable[..., str], make_settings: Callable[..., Settings], tmp_path: Path
) -> Callable[..., Awaitable[SimulatedCall]]:
    """`await simulated_call(plugins=[my_plugin], scenario=..., **options)`: one whole call
    through the real service (store, webhooks, WebRTC, audio bridge) against the simulators.

    * `plugins`: your plugin objects, registered for this test. The built-in plugin for the
      provider (`meta`/`wati`) and for the voice backend (`openai`: the simulated Realtime
      server) are added when none of yours answers for it.
    * `voice_backend`: default the first one your plugins name (`voice_backend_names`),
      else `openai`. `provider`: the simulated provider, `meta` (default) or `wati`.
    * `scenario`: what the callee does (a `whatsapp_call_sim.whatsapp.Scenario`, a preset name
      such as "reject", or a dict); its `user_script` is what the user says.
    * `**options`: more camelCase config keys (your plugin's own included).
    * `timeout`: the longest the call may take, in seconds.
    """
    from . import plugins as plugin_mod

    async def run(
        *,
        plugins: Iterable[object] = (),
        provider: str = "meta",
        voice_backend: str | None = None,
        scenario: Any = None,
        to: str = SIM_TO,
        greeting: str | None = SIM_GREETING,
        timeout: float = 60.0,
        **options: Any,
    ) -> SimulatedCall:
        try:  # lazily: core does not depend on the simulators
            from whatsapp_call_sim.runner import SimulatorSet
        except ImportError:
            raise PluginError(
                "simulated_call needs the simulators, which are not installed.",
                "pip install whatsapp-call-sim (or 'whatsapp-call[sim]').",
            ) from None
        import importlib

        from .calls.orchestrator import CallRequest
        from .runtime import Runtime

        mine = list(plugins)
        for plugin in mine:
            if not plugin_mod.pm.is_registered(plugin):
                register_plugin(plugin)
        backends = [n for p in mine for n in _answers("voice_backend_names", p)]
        backend = voice_backend or (backends[0] if backends else "openai")
        for hook, name in (("provider_names", provider), ("voice_backend_names", backend)):
            answered = {n for p in mine for n in _answers(hook, p)}
            if name in answered or name not in _BUILTIN:
                continue
            try:
                module = importlib.import_module(_BUILTIN[name])
            except ImportError:
                raise PluginError(
                    f"simulated_call needs a plugin for {name!r}: none given and the built-in "
                    f"{_BUILTIN[name]} is not installed.",
                    f"Pass plugins=[...] that answer for {name!r}, or install it.",
                ) from None
            if not plugin_mod.pm.is_registered(module):
                register_plugin(module)
        async with SimulatorSet(
            provider=provider, state_dir=tmp_path / "sim", scenario=scenario, turn=False
        ) as sims:
            settings = make_settings(**{**sims.options, "voiceBackend": backend, **options})
            async with Runtime(settings) as runtime:
                placed = await runtime.service.place_call(CallRequest(to=to, greeting=greeting))
                try:
                    record = await runtime.service.wait(placed.id, timeout=timeout)
                except TimeoutError:
                    await runtime.service.hangup(placed.id)
                    raise TimeoutError(
                        f"The simulated call did not end within {timeout:g} s (it was hung up)."
                    ) from None
                transcript = await runtime.store.get_transcript(record.id)
                events = await runtime.store.get_events(record.id)
            calls = list(sims.whatsapp.calls.values())
            sim_call = calls[-1] if calls else None
            return SimulatedCall(
                record=record,
                transcript=transcript,
                events=events,
                sim_call=sim_call,
                user=getattr(sim_call, "user", None),
                options=dict(settings.public_dict()),
            )

    return run
