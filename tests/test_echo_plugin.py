"""The example third-party plugin (examples/whatsapp-call-echo): its echo session on its own,
a whole simulated call with it registered in-process, `doctor --smoke`, and the outsider's path
(a fresh virtual environment where the plugin is found through its entry point only).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from array import array
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from whatsapp_call import plugins as plugin_mod
from whatsapp_call.cli import cli
from whatsapp_call.doctor import run_doctor, run_smoke
from whatsapp_call.models import CheckStatus
from whatsapp_call.voice import VoiceEventType as Ev

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "whatsapp-call-echo"
# The example is an outsider's package, deliberately not installed in the workspace venv.
sys.path.insert(0, str(EXAMPLE / "src"))
import whatsapp_call_echo as echo  # noqa: E402
from whatsapp_call_echo import EchoSession, EchoSettings  # noqa: E402

RATE = 24_000
CHUNK_MS = 20
TO = "+14155550123"


def tone(ms: int, freq: float = 300.0, amplitude: int = 8000) -> bytes:
    n = RATE * ms // 1000
    return array(
        "h", (int(amplitude * math.sin(2 * math.pi * freq * i / RATE)) for i in range(n))
    ).tobytes()


def silence(ms: int) -> bytes:
    return bytes(RATE * ms // 1000 * 2)


async def feed(session: EchoSession, pcm: bytes) -> None:
    """Send `pcm` in 20 ms chunks, as the audio bridge does (no pacing: the VAD counts ms of
    audio, not wall-clock time)."""
    step = RATE * CHUNK_MS // 1000 * 2
    for i in range(0, len(pcm), step):
        await session.send_audio(pcm[i : i + step])


async def collect(session: EchoSession, until: Ev, timeout: float = 3.0) -> list:
    events = []
    async with asyncio.timeout(timeout):
        async for event in session.events():
            events.append(event)
            if event.type is until:
                return events
    return events


def drain(session: EchoSession) -> list:
    out = []
    while not session._events.empty():
        out.append(session._events.get_nowait())
    return out


# -- (1) the session on its own --------------------------------------------------------------


async def test_echoes_a_turn_after_the_delay_with_vad_events():
    session = EchoSession(EchoSettings(echo_delay_ms=150, echo_silence_ms=400))
    await session.start()
    speech = tone(1000)
    await feed(session, silence(200) + speech + silence(400))
    stopped_at = time.monotonic()
    events = await collect(session, Ev.RESPONSE_DONE)
    echoed_at = time.monotonic()
    kinds = [e.type for e in events]
    assert kinds == [
        Ev.SPEECH_STARTED,
        Ev.SPEECH_STOPPED,
        Ev.TRANSCRIPT,
        Ev.AUDIO,
        Ev.TRANSCRIPT,
        Ev.RESPONSE_DONE,
    ]
    assert (events[2].role, events[2].text) == ("user", "(1.0 s of speech)")
    audio = events[3]
    # exactly the caller's speech, leading and trailing silence cut, after the delay
    assert audio.audio == speech
    assert echoed_at - stopped_at >= 0.15
    assert (events[4].role, events[4].text) == ("assistant", "(echo of 1.0 s of audio)")
    assert events[5].item_id == audio.item_id
    await session.close()


async def test_a_click_is_not_a_turn():
    session = EchoSession(EchoSettings(echo_delay_ms=0, echo_silence_ms=300))
    await feed(session, tone(40) + silence(600))
    await asyncio.sleep(0.05)
    assert drain(session) == []


async def test_speaking_again_drops_the_pending_echo():
    session = EchoSession(EchoSettings(echo_delay_ms=300, echo_silence_ms=200))
    await feed(session, tone(500) + silence(200))
    await feed(session, tone(300, freq=500))  # before the echo of the first turn plays
    await asyncio.sleep(0.45)
    kinds = [e.type for e in drain(session)]
    assert kinds == [Ev.SPEECH_STARTED, Ev.SPEECH_STOPPED, Ev.TRANSCRIPT, Ev.SPEECH_STARTED]
    await session.close()


async def test_long_turn_is_capped():
    session = EchoSession(EchoSettings(echo_delay_ms=0, echo_silence_ms=200, echo_max_seconds=0.5))
    await feed(session, tone(1500) + silence(200))
    events = await collect(session, Ev.RESPONSE_DONE)
    audio = next(e for e in events if e.type is Ev.AUDIO).audio
    assert len(audio) == RATE * 2 // 2  # 0.5 s
    await session.close()


async def test_greeting_is_a_chime_and_says_so():
    session = EchoSession(EchoSettings())
    await session.greet("Hello there")
    events = await collect(session, Ev.RESPONSE_DONE)
    audio, text = events[0], events[1]
    assert audio.type is Ev.AUDIO and len(audio.audio) == RATE * 2 * 500 // 1000
    assert echo.level_dbfs(audio.audio) > -20  # clearly audible
    assert text.role == "assistant" and "no text-to-speech" in text.text
    assert "Hello there" in text.text


async def test_close_ends_the_event_stream_and_later_audio_is_ignored():
    session = EchoSession(EchoSettings())
    await session.close()
    await session.close()  # idempotent
    await feed(session, tone(500))
    assert await collect(session, Ev.RESPONSE_DONE, timeout=1) == []


def test_level_dbfs():
    assert echo.level_dbfs(silence(20)) < -100
    assert -10 < echo.level_dbfs(tone(20, amplitude=16000)) < -5
    assert echo.level_dbfs(b"") < -100


async def test_hooks_answer_only_for_the_echo_backend(register_plugin, make_settings):
    register_plugin(echo, name="echo")
    assert ("echo", ["echo"]) in plugin_mod.call_all_sync("voice_backend_names")
    settings = make_settings(provider="meta", voiceBackend="echo", echoDelayMs=75)
    session = await plugin_mod.call_first("open_voice_session", call=None, settings=settings)
    assert isinstance(session, EchoSession) and session.options.echo_delay_ms == 75
    other = make_settings(provider="meta", voiceBackend="other")
    assert await plugin_mod.call_first("open_voice_session", call=None, settings=other) is None


# -- (2) a whole call through the simulators, registered in-process -------------------------


def _correlation(heard: np.ndarray, said: np.ndarray) -> float:
    """Peak normalised cross-correlation of `said` within `heard` (1.0 = identical)."""
    heard = heard.astype(np.float64)
    said = said.astype(np.float64)
    n = len(heard) + len(said)
    size = 1 << (n - 1).bit_length()
    xc = np.fft.irfft(np.fft.rfft(heard, size) * np.conj(np.fft.rfft(said, size)), size)
    power = np.concatenate(([0.0], np.cumsum(heard**2)))
    energy = power[len(said) :] - power[: -len(said)]  # heard's energy under each lag
    lags = len(energy)
    score = xc[:lags] / np.sqrt(np.maximum(energy * float(np.sum(said**2)), 1e-9))
    return float(score.max())


@pytest.mark.slow
async def test_simulated_call_echoes_the_users_own_voice(simulated_call):
    from whatsapp_call_sim.audio import load_utterance
    from whatsapp_call_sim.user import HangUp, Say, UserScript, WaitForSpeech
    from whatsapp_call_sim.whatsapp import Scenario

    script = UserScript((WaitForSpeech(), Say("hello"), WaitForSpeech(), HangUp()))
    result = await simulated_call(
        plugins=[echo], scenario=Scenario(user_script=script), echoDelayMs=200
    )

    record, user = result.record, result.user
    assert record.end_reason == "completed", record.end_detail
    assert result.options["voiceBackend"] == "echo"
    assistant = result.lines("assistant")
    assert "no text-to-speech" in assistant[0]
    assert any(line.startswith("(echo of ") for line in assistant[1:]), assistant
    assert any(line.endswith("s of speech)") for line in result.lines("user"))
    # What the simulated user heard after saying "hello" is "hello" itself.
    hello = next(s for s in user.said if s.utterance == "hello")
    after = [chunk for t, chunk in user.heard_frames() if t > hello.end]
    heard = np.concatenate(after)
    assert _correlation(heard, np.asarray(load_utterance("hello"))) > 0.7  # measured ~0.9
    assert _correlation(heard, np.asarray(load_utterance("yes"))) < 0.4  # never said: ~0.15
    echoes = [s for s in user.speech_segments() if s.start > hello.end]
    assert echoes and echoes[0].start - hello.end >= 0.2 + 0.3  # delay + end-of-turn silence
    # Barge-in and turn metrics work from the VAD events.
    turns = record.metrics["audio"]["turns"]
    assert turns and all(t["response_latency_ms"] >= 200 for t in turns), turns


# -- doctor --smoke ------------------------------------------------------------------------------


class _App:
    """The CLI's AppContext, over ready settings."""

    def __init__(self, make_settings, options):
        self.make_settings = make_settings
        self.options = options
        self._settings = None

    def settings(self, overrides=None):
        if self._settings is None or overrides:
            self._settings = self.make_settings(**{**self.options, **(overrides or {})})
        return self._settings


@pytest.fixture
def smoke_plugins(register_plugin):
    import whatsapp_call_meta

    register_plugin(whatsapp_call_meta)
    register_plugin(echo, name="echo")


@pytest.mark.slow
async def test_doctor_smoke_fails_when_the_call_is_declined(smoke_plugins, make_settings, tmp_path):
    from whatsapp_call_sim.runner import SimulatorSet

    async with SimulatorSet(
        provider="meta", state_dir=tmp_path, scenario="reject", turn=False
    ) as sims:
        app = _App(make_settings, sims.options)
        smoke = await run_smoke(app, await run_doctor(app, {"voiceBackend": "echo"}), TO)
    assert [(c.name, c.status) for c in smoke] == [("smoke call", CheckStatus.FAIL)]
    assert "rejected" in smoke[0].message and "answer it" in smoke[0].hint


async def test_doctor_smoke_is_skipped_when_the_checks_fail(make_settings):
    app = _App(make_settings, {"provider": "meta", "voiceBackend": "echo"})
    checks = await run_doctor(app, {"voiceBackend": "echo"})
    assert any(c.status == CheckStatus.FAIL for c in checks)  # no provider plugin, no keys
    smoke = await run_smoke(app, checks, TO)
    assert smoke[0].status == CheckStatus.FAIL and "not placed" in smoke[0].message


@pytest.mark.parametrize(
    "args, message",
    [
        (["--smoke"], "--smoke needs the number"),
        (["--smoke-to", TO], "only apply to the smoke test call"),
        (["--voice-backend", "echo"], "only apply to the smoke test call"),
        (["--smoke", "--smoke-to", "12"], "12"),
    ],
)
def test_doctor_smoke_options_are_checked(args, message, tmp_path):
    result = CliRunner().invoke(cli, ["-c", str(tmp_path / "none.yaml"), "doctor", *args])
    assert result.exit_code == 2 and message in result.output


# -- (3) the outsider's path: a fresh venv, the plugin found by its entry point -----------------

UV = ROOT / ".tools" / "bin" / "uv"
SMOKE_CHECKS = ("smoke call", "audio from the phone", "audio to the phone")


def _run(args, timeout, **kwargs):
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kwargs)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_installed_from_its_own_directory_into_a_fresh_venv(tmp_path):
    if not UV.exists():
        pytest.fail(f"{UV} is missing: run `make env` once to bootstrap uv")
    venv = tmp_path / "venv"
    made = _run([str(UV), "venv", "--quiet", "--python", sys.executable, str(venv)], 60)
    assert made.returncode == 0, made.stderr
    python = venv / "bin" / "python"
    install = [
        str(UV),
        "pip",
        "install",
        "--quiet",
        "--python",
        str(python),
        f"{ROOT / 'core'}[server]",
        str(ROOT / "sim"),
        str(ROOT / "plugins" / "meta"),
        str(EXAMPLE),
    ]
    # Not inside the workspace: install as an outsider would. From uv's cache when it holds
    # everything (`make env` filled it), else from the package index.
    installed = _run([*install, "--offline"], 300, cwd=tmp_path)
    if installed.returncode != 0:
        installed = _run(install, 300, cwd=tmp_path)
    assert installed.returncode == 0, installed.stderr
    wacall = str(venv / "bin" / "whatsapp-call")
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("WHATSAPP_CALL_", "VIRTUAL_ENV"))
    }

    listed = _run([wacall, "plugins", "--json"], 60, env=env)
    assert listed.returncode == 0, listed.stderr
    plugins = {p["name"]: p for p in json.loads(listed.stdout)}
    assert plugins["echo"]["distribution"] == "whatsapp-call-echo"
    assert {"open_voice_session", "voice_backend_names", "settings_model"} <= set(
        plugins["echo"]["hooks"]
    )
    assert "openai" not in plugins  # the call below cannot be using the AI backend

    config = tmp_path / "sim.yaml"
    ready = tmp_path / "ready.json"
    sim = subprocess.Popen(
        [
            wacall,
            "sim",
            "--config-out",
            str(config),
            "--state-dir",
            str(tmp_path / "state"),
            "--no-turn",
            "--json",
        ],
        stdout=ready.open("w"),
        stderr=(tmp_path / "sim.log").open("w"),
        env=env,
    )
    try:
        deadline = time.monotonic() + 60
        while not (ready.exists() and ready.read_text().strip()):
            assert sim.poll() is None, (tmp_path / "sim.log").read_text()
            assert time.monotonic() < deadline, "the simulators did not start within 60 s"
            time.sleep(0.1)
        call = _run(
            [
                wacall,
                "-c",
                str(config),
                "call",
                TO,
                "--voice-backend",
                "echo",
                "--greeting",
                "Hi",
                "--json",
            ],
            120,
            env=env,
        )
        smoke = _run(
            [wacall, "-c", str(config), "doctor", "--smoke", "--smoke-to", TO, "--json"],
            120,
            env=env,
        )
    finally:
        sim.send_signal(signal.SIGTERM)
        sim.wait(15)
    assert call.returncode == 0, call.stderr
    record = json.loads(call.stdout)
    assert record["end_reason"] == "completed"
    lines = [line["text"] for line in record["transcript"] if line["role"] == "assistant"]
    assert any(text.startswith("(echo of ") for text in lines), lines
    assert "AI: (echo backend, no text-to-speech: a chime instead of 'Hi')" in call.stderr
    # doctor --smoke: the usual checks, then a test call with the echo backend by default
    assert smoke.returncode == 0, smoke.stdout + smoke.stderr
    checks = {c["name"]: c for c in json.loads(smoke.stdout)}
    assert "voice backend echo" in checks["config"]["message"]
    assert all(c["status"] != "fail" for c in checks.values()), checks
    assert [checks[n]["status"] for n in SMOKE_CHECKS] == ["ok"] * 3, checks
    assert "answered" in checks["smoke call"]["message"]
    assert "heard speech" in checks["audio from the phone"]["message"]
    # the echo of "hello" (and of "goodbye" when it beats the hang-up)
    assert re.search(r"\d repl(y|ies) to the caller", checks["audio to the phone"]["message"])
    assert "AI: (echo backend, no text-to-speech" in smoke.stderr  # live progress on stderr
    options = yaml.safe_load(config.read_text())["channels"]["whatsappcall"]
    secrets = [v for k, v in options.items() if k.endswith(("Token", "Key", "Secret"))]
    assert secrets
    for secret in secrets:
        assert secret not in call.stdout + call.stderr + smoke.stdout + smoke.stderr
    shutil.rmtree(venv, ignore_errors=True)
