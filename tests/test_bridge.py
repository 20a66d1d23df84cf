"""The audio bridge: PlayoutTrack pacing/queueing/barge-in, resampling, and bridged calls
between two real aiortc peers on 127.0.0.1 (a far peer playing a tone and recording)."""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import json
import time

import av
import numpy as np
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from aiortc.rtp import compute_audio_level_dbov
from whatsapp_call.bridge import AudioBridge, PlayoutTrack
from whatsapp_call.bridge.playout import audio_level_dbov
from whatsapp_call.bridge.resample import FrameToPcm, PcmResampler
from whatsapp_call.errors import MediaError
from whatsapp_call.media.ice import host_addresses
from whatsapp_call.media.sender import carry_audio_level
from whatsapp_call.voice import VoiceEvent, VoiceEventType, VoiceSession

# Pacing assertions need the CPU to themselves: `make test` runs these after the parallel part.
pytestmark = pytest.mark.serial

# ---- helpers -----------------------------------------------------------------------------


def tone(freq: float, ms: int, rate: int = 24000, amp: int = 8000) -> np.ndarray:
    t = np.arange(rate * ms // 1000) / rate
    return (np.sin(2 * np.pi * freq * t) * amp).astype(np.int16)


def peak_hz(samples: np.ndarray, rate: int) -> float:
    x = samples.astype(np.float64) * np.hanning(len(samples))
    spectrum = np.abs(np.fft.rfft(x))
    return float(np.argmax(spectrum) * rate / len(samples))


def quiet_runs(samples: np.ndarray, threshold: int = 100) -> np.ndarray:
    """Lengths of the runs of near-silent samples."""
    edges = np.diff(np.r_[0, (np.abs(samples) < threshold).astype(np.int8), 0])
    return np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1)


def longest_quiet_run(samples: np.ndarray, threshold: int = 100) -> int:
    return int(quiet_runs(samples, threshold).max(initial=0))


def frame_samples(frame: av.AudioFrame) -> np.ndarray:
    """Mono int16 samples of an aiortc frame (decoded frames are packed stereo s16)."""
    data = np.frombuffer(frame.planes[0], dtype=np.int16)
    channels = len(frame.layout.channels)
    return data[: frame.samples * channels].reshape(-1, channels)[:, 0]


def split_irregular(pcm: bytes, sizes_ms=(37, 113, 61, 200, 23, 89)) -> list[bytes]:
    out, i, k = [], 0, 0
    while i < len(pcm):
        n = sizes_ms[k % len(sizes_ms)] * 48  # 24 kHz PCM16: 48 bytes per ms
        out.append(pcm[i : i + n])
        i += n
        k += 1
    return out


class ScriptedSession(VoiceSession):
    """A voice backend driven by the test: records what it hears, says what it is told."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.chunks: list[int] = []
        self.interrupted: list[tuple[str, int]] = []
        self.greeted: list[str] = []
        self._events: asyncio.Queue[VoiceEvent | None] = asyncio.Queue()

    async def start(self) -> None:
        pass

    async def send_audio(self, pcm: bytes) -> None:
        self.received += pcm
        self.chunks.append(len(pcm))

    async def greet(self, text: str) -> None:
        self.greeted.append(text)
        self.say(tone(660, 200).tobytes(), "greeting")

    def say(self, pcm: bytes, item_id: str, done: bool = True) -> None:
        """A reply: irregular chunks all at once (faster than real time), then done."""
        for chunk in split_irregular(pcm):
            self.emit(VoiceEventType.AUDIO, audio=chunk, item_id=item_id)
        if done:
            self.emit(VoiceEventType.RESPONSE_DONE)

    def emit(self, type_: VoiceEventType, **fields) -> None:
        self._events.put_nowait(VoiceEvent(type=type_, **fields))

    async def _iter(self):
        while (event := await self._events.get()) is not None:
            yield event

    def events(self):
        return self._iter()

    async def playback_interrupted(self, item_id: str, played_ms: int) -> None:
        self.interrupted.append((item_id, played_ms))

    async def close(self) -> None:
        self._events.put_nowait(None)


class ToneTrack(MediaStreamTrack):
    """The far phone's microphone: a paced 440 Hz tone."""

    kind = "audio"

    def __init__(self, freq: float = 440.0):
        super().__init__()
        self._t = tone(freq, 1000, rate=48000)
        self._i = 0
        self._start: float | None = None

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self._start is None:
            self._start = time.monotonic()
        else:
            await asyncio.sleep(max(0.0, self._start + self._i * 0.02 - time.monotonic()))
        off = (self._i * 960) % 48000
        frame = av.AudioFrame(format="s16", layout="mono", samples=960)
        frame.planes[0].update(self._t[off : off + 960])
        frame.pts = self._i * 960
        frame.sample_rate = 48000
        frame.time_base = fractions.Fraction(1, 48000)
        self._i += 1
        return frame


class Recorder:
    """Keeps every frame the far peer receives, with its arrival time."""

    def __init__(self, track: MediaStreamTrack):
        self.frames: list[tuple[float, np.ndarray]] = []
        self._task = asyncio.create_task(self._run(track))

    async def _run(self, track: MediaStreamTrack) -> None:
        with contextlib.suppress(MediaStreamError):
            while True:
                frame = await track.recv()
                self.frames.append((time.monotonic(), frame_samples(frame)))

    def audio(self) -> np.ndarray:
        return np.concatenate([f for _, f in self.frames]) if self.frames else np.zeros(0)

    def loud_frames(self, threshold: int = 1000) -> list[tuple[float, np.ndarray]]:
        return [(t, f) for t, f in self.frames if np.abs(f).max() > threshold]

    async def stop(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


class Call:
    """Our peer (sending `playout`) and the far peer (sending a tone, recording), connected."""

    async def connect(self, playout: PlayoutTrack) -> Call:
        self.ours = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.far = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        loop = asyncio.get_running_loop()
        ours_track, far_track = loop.create_future(), loop.create_future()
        self.ours.on("track", ours_track.set_result)
        self.far.on("track", far_track.set_result)
        self.ours.addTrack(playout)
        self.far.addTrack(ToneTrack())
        async with asyncio.timeout(10):
            with host_addresses(["127.0.0.1"]):
                await self.ours.setLocalDescription(await self.ours.createOffer())
                await self.far.setRemoteDescription(self.ours.localDescription)
                await self.far.setLocalDescription(await self.far.createAnswer())
                await self.ours.setRemoteDescription(self.far.localDescription)
            self.media = await ours_track  # what the bridge reads: the far peer's audio
            self.recorder = Recorder(await far_track)
        return self

    async def close(self) -> None:
        await self.recorder.stop()
        await self.ours.close()
        await self.far.close()


@contextlib.asynccontextmanager
async def bridged_call(*, encoded: bool = False, **bridge_options):
    playout = PlayoutTrack(encoded=encoded)
    session = ScriptedSession()
    call = await Call().connect(playout)
    events: list[tuple[str, dict]] = []
    bridge = AudioBridge(
        call.media, playout, session, on_event=lambda n, d: events.append((n, d)), **bridge_options
    )
    call.bridge, call.session, call.playout, call.events = bridge, session, playout, events
    call.run = asyncio.create_task(bridge.run())
    try:
        yield call
    finally:
        await bridge.stop()
        await call.close()


async def wait_for(predicate, timeout: float = 5.0, step: float = 0.01) -> None:
    """Poll a condition on the bridge's state (it has no events to wait on), bounded."""
    async with asyncio.timeout(timeout):
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(step)


# ---- PlayoutTrack ------------------------------------------------------------------------


async def test_playout_emits_paced_20ms_frames_and_silence_on_underrun():
    track = PlayoutTrack(encoded=False)  # frames: the samples are inspected
    times, frames = [], []
    async with asyncio.timeout(5):
        for _ in range(11):
            frames.append(await track.recv())
            times.append(time.monotonic())
    for i, f in enumerate(frames):
        assert (f.format.name, f.layout.name, f.sample_rate, f.samples) == (
            "s16",
            "mono",
            48000,
            960,
        )
        assert f.pts == i * 960 and f.time_base == fractions.Fraction(1, 48000)
        assert not frame_samples(f).any()  # nothing written: silence
    assert times[-1] - times[0] == pytest.approx(0.200, abs=0.015)
    gaps = np.diff(times)
    assert gaps.min() > 0.010 and gaps.max() < 0.040
    assert track.stats()["silence_frames"] == 11 and track.late_frames == 0


async def test_playout_plays_written_audio_without_gaps():
    track = PlayoutTrack(encoded=False)  # frames: the samples are inspected
    audio = tone(440, 300)
    for chunk in split_irregular(audio.tobytes()):
        track.write(chunk, "item_1")
    track.flush()  # the reply is complete
    assert track.queued_ms == pytest.approx(300, abs=2)
    out = []
    async with asyncio.timeout(5):
        for _ in range(20):
            out.append(frame_samples(await track.recv()))
    played = np.concatenate(out)
    loud = np.flatnonzero(np.abs(played) > 100)
    start, end = loud[0], loud[-1]
    assert start < 48  # starts with the first frame (resampler delay < 1 ms)
    assert (end - start) / 48 == pytest.approx(300, abs=3)
    # no gap: no run of near-zero samples longer than a tone half-period inside the span
    assert longest_quiet_run(played[start:end]) < 20
    assert peak_hz(played[start:end], 48000) == pytest.approx(440, abs=5)
    assert track.played_ms("item_1") == 300
    assert track.stats()["audio_frames"] == 15 and track.queued_ms == 0


async def test_clear_empties_queue_at_once_and_reports_played_ms():
    track = PlayoutTrack(encoded=False)  # frames: the samples are inspected
    track.write(tone(440, 1000).tobytes(), "item_a")
    async with asyncio.timeout(5):
        for _ in range(5):
            await track.recv()
        assert track.clear() == ("item_a", 100)
        assert track.queued_ms == 0
        nxt = await track.recv()
    assert not frame_samples(nxt).any()  # the very next frame is silence
    assert track.clear() == ("item_a", 100)  # nothing queued: the last item, unchanged


async def test_playout_skips_frames_when_pacing_falls_behind():
    track = PlayoutTrack(max_lag=0.060)
    track.write(tone(440, 1000).tobytes(), "item_a")
    async with asyncio.timeout(5):
        await track.recv()
        time.sleep(0.15)  # noqa: ASYNC251 - a deliberately blocked event loop
        late = await track.recv()
        after = [await track.recv() for _ in range(3)]
    assert track.late_frames == 1 and track.dropped_frames >= 6
    assert late.pts == (1 + track.dropped_frames) * 960  # RTP timestamps jump over the gap
    assert after[-1].pts == late.pts + 3 * 960
    assert track.played_ms("item_a") == (5 + track.dropped_frames) * 20


async def test_underrun_inside_an_item_is_counted():
    track = PlayoutTrack()
    track.write(tone(440, 30).tobytes(), "item_a")
    async with asyncio.timeout(5):
        for _ in range(3):
            await track.recv()
        track.write(tone(440, 40).tobytes(), "item_a")  # the same reply continues late
        track.write(tone(440, 40).tobytes(), "item_a")  # queued behind: not an underrun
        track.write(tone(440, 40).tobytes(), "item_b")
    assert track.underruns == 1


@pytest.mark.parametrize("encoded", [False, True], ids=["frames", "opus"])
async def test_reply_streamed_at_real_time_plays_without_gaps(encoded):
    """A backend that streams at real time, chunks arriving with jitter: the track holds a
    partial frame back a frame rather than clicking, and then plays continuously."""
    track = PlayoutTrack(encoded=encoded)
    audio = tone(440, 600).tobytes()
    out: list[np.ndarray] = []
    decoder = av.CodecContext.create("libopus", "r")
    decoder.sample_rate, decoder.format, decoder.layout = 48000, "s16", "mono"

    async def backend():
        start, sent = time.monotonic(), 0
        for i, chunk in enumerate(split_irregular(audio, (20, 20, 20, 10, 30))):
            jitter = (0.004, -0.003, 0.002)[i % 3]
            await asyncio.sleep(max(0.0, start + sent / 48000 + jitter - time.monotonic()))
            track.write(chunk, "item_a")
            sent += len(chunk)
        track.flush()

    async with asyncio.timeout(5):
        feeder = asyncio.create_task(backend())
        for _ in range(45):
            got = await track.recv()
            if encoded:
                out.extend(frame_samples(f) for f in decoder.decode(got))
            else:
                out.append(frame_samples(got))
        await feeder
    played = np.concatenate(out)
    loud = np.flatnonzero(np.abs(played) > 300)
    gaps = quiet_runs(played[loud[0] : loud[-1]], 300)
    # at most one held frame (the cushion is built once), then continuous
    assert len(gaps[gaps > 20]) <= 1 and gaps.max() <= 960
    assert (loud[-1] - loud[0]) / 48 == pytest.approx(600, abs=25)
    assert track.played_ms("item_a") == 600
    assert track.underruns <= 1


def test_encoded_mode_rejects_rates_opus_cannot_take():
    with pytest.raises(MediaError, match="44100 Hz"):
        PlayoutTrack(encoded=True, sample_rate=44100)


def test_track_encodes_by_default_when_opus_takes_the_rate():
    assert PlayoutTrack().encoded and PlayoutTrack(sample_rate=16000).encoded
    assert not PlayoutTrack(sample_rate=44100).encoded  # falls back to 48 kHz frames


@pytest.mark.parametrize("amplitude", [0, 1, 30, 1000, 12000, 32767])
def test_audio_level_matches_aiortcs_computation(amplitude):
    rng = np.random.default_rng(amplitude)
    samples = np.clip(rng.normal(0, amplitude, 480), -32768, 32767).astype(np.int16)
    frame = av.AudioFrame(format="s16", layout="mono", samples=480)
    frame.planes[0].update(samples)
    assert audio_level_dbov(samples) == compute_audio_level_dbov(frame)


async def test_encoded_packets_carry_the_rfc6464_audio_level_on_the_wire():
    """Our sender puts the track's level on packets it did not encode itself: silence at
    -127 dBov, a loud tone near full scale (the far peer parses the header extension)."""
    playout = PlayoutTrack()
    ours = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    far = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    carry_audio_level(ours.addTransceiver(playout, direction="sendrecv").sender)
    got_track = asyncio.get_running_loop().create_future()
    far.on("track", got_track.set_result)
    levels: list[int] = []
    try:
        async with asyncio.timeout(10):
            with host_addresses(["127.0.0.1"]):
                await ours.setLocalDescription(await ours.createOffer())
                await far.setRemoteDescription(ours.localDescription)
                await far.setLocalDescription(await far.createAnswer())
                await ours.setRemoteDescription(far.localDescription)
            receiver = far.getTransceivers()[0].receiver
            handle = receiver._handle_rtp_packet

            async def tap(packet, arrival_time_ms):
                if packet.extensions.audio_level is not None:
                    levels.append(-packet.extensions.audio_level[1])
                return await handle(packet, arrival_time_ms)

            receiver._handle_rtp_packet = tap
            await got_track
            await wait_for(lambda: len(levels) >= 5)
            playout.write((tone(440, 200) * 2).tobytes(), "item_a")
            await wait_for(lambda: any(level > -20 for level in levels))
    finally:
        await ours.close()
        await far.close()
    assert levels[0] == -127
    assert max(levels) > -20


async def test_encoded_mode_emits_opus_packets_that_decode_to_the_tone():
    track = PlayoutTrack(encoded=True)
    track.write(tone(1000, 400).tobytes(), "item_a")
    decoder = av.CodecContext.create("libopus", "r")
    decoder.sample_rate, decoder.format, decoder.layout = 48000, "s16", "mono"
    packets, decoded = [], []
    async with asyncio.timeout(5):
        for _ in range(40):
            packets.append(await track.recv())
    for i, p in enumerate(packets):
        assert isinstance(p, av.Packet)
        assert p.pts == i * 960 and p.time_base == fractions.Fraction(1, 48000)
        for f in decoder.decode(p):
            decoded.append(frame_samples(f))
    pcm = np.concatenate(decoded)
    assert peak_hz(pcm[2400:19200], 48000) == pytest.approx(1000, abs=10)
    # steady silence reuses one tiny packet instead of encoding
    tail = [bytes(p) for p in packets[-5:]]
    assert len(set(tail)) == 1 and len(tail[0]) <= 3
    assert track.played_ms("item_a") == 400


async def test_recv_opus_gives_the_same_packets_without_the_av_packet():
    """What media.rtp_fast sends from: the same paced packets and timestamps as recv()."""
    pcm = tone(1000, 200).tobytes()
    one, other = PlayoutTrack(encoded=True), PlayoutTrack(encoded=True)
    one.write(pcm, "item_a")
    other.write(pcm, "item_a")
    async with asyncio.timeout(5):
        for i in range(15):
            packet = await one.recv()
            data, rtp_time = await other.recv_opus()
            assert isinstance(data, bytes) and data == bytes(packet)
            assert rtp_time == packet.pts == i * 960
            assert other.audio_level == one.audio_level
    assert other.played_ms("item_a") == one.played_ms("item_a") == 200
    with pytest.raises(MediaError, match="encoded mode"):
        await PlayoutTrack(encoded=False).recv_opus()


# ---- resampling --------------------------------------------------------------------------


def test_resampling_keeps_tone_frequency_both_ways():
    down = FrameToPcm(24000)
    stereo = np.repeat(tone(1000, 1000, rate=48000), 2)  # aiortc's decoder: packed stereo
    out = bytearray()
    for i in range(50):
        frame = av.AudioFrame.from_ndarray(
            stereo[i * 1920 : (i + 1) * 1920].reshape(1, -1), format="s16", layout="stereo"
        )
        frame.sample_rate, frame.pts = 48000, i * 960
        out += down.convert(frame)
    pcm24 = np.frombuffer(bytes(out), dtype=np.int16)
    assert len(pcm24) == pytest.approx(24000, abs=64)
    assert peak_hz(pcm24[1000:], 24000) == pytest.approx(1000, abs=5)
    assert np.abs(pcm24[1000:]).max() == pytest.approx(8000, rel=0.05)  # a mix, not a sum

    up = PcmResampler(24000, 48000)
    src = tone(1500, 1000).tobytes()
    pcm48 = np.concatenate([up.resample(c) for c in split_irregular(src)])
    assert len(pcm48) == pytest.approx(48000, abs=64)
    assert peak_hz(pcm48[2000:], 48000) == pytest.approx(1500, abs=5)


def test_downsampling_filters_what_24khz_cannot_carry():
    """A real low-pass: a 15 kHz tone must not fold back as a loud 9 kHz alias."""
    down = FrameToPcm(24000)
    high = tone(15000, 200, rate=48000)
    frame = av.AudioFrame.from_ndarray(high.reshape(1, -1), format="s16", layout="mono")
    frame.sample_rate, frame.pts = 48000, 0
    out = np.frombuffer(down.convert(frame), dtype=np.int16)
    assert np.abs(out[200:]).max() < 8000 * 0.05


# ---- bridged calls over real aiortc peers -------------------------------------------------


@pytest.mark.parametrize("encoded", [False, True], ids=["frames", "opus"])
async def test_bridged_call_carries_audio_both_ways(encoded):
    async with bridged_call(encoded=encoded) as call:
        async with asyncio.timeout(10):
            await wait_for(lambda: len(call.session.received) >= 24000 * 2 // 2)  # 0.5 s in
            call.session.say(tone(880, 600).tobytes(), "reply_1")
            await wait_for(lambda: call.playout.played_ms("reply_1") == 600)
            await wait_for(lambda: len(call.recorder.loud_frames()) >= 29)
        heard = np.concatenate([f for _, f in call.recorder.loud_frames()])
        assert peak_hz(heard, 48000) == pytest.approx(880, abs=10)
        pcm = np.frombuffer(bytes(call.session.received), dtype=np.int16)
        assert set(call.session.chunks[2:]) == {960}  # 20 ms of 24 kHz PCM16 per send
        assert peak_hz(pcm[-9600:], 24000) == pytest.approx(440, abs=5)
        assert call.bridge.metrics["outbound"]["mode"] == ("opus" if encoded else "frames")


async def test_barge_in_flushes_within_a_frame_and_reports_played_ms():
    async with bridged_call() as call:
        async with asyncio.timeout(10):
            await wait_for(lambda: call.playout.frames > 5)
            call.session.say(tone(880, 3000).tobytes(), "reply_1")
            await wait_for(lambda: call.playout.audio_frames >= 20)
            call.session.emit(VoiceEventType.SPEECH_STARTED)
            await wait_for(lambda: call.session.interrupted)
            at_flush = call.playout.audio_frames
            assert call.playout.queued_ms == 0
            await asyncio.sleep(0.2)
            # late deltas of the interrupted reply are discarded
            call.session.say(tone(880, 200).tobytes(), "reply_1")
            await asyncio.sleep(0.2)
        item, played = call.session.interrupted[0]
        assert item == "reply_1" and played == at_flush * 20 and 400 <= played < 3000
        assert call.playout.audio_frames == at_flush  # not one more frame of the reply
        assert call.bridge.metrics["barge_ins"][0]["dropped_ms"] > 2000
        # the far phone stopped hearing the reply: about `played` ms of tone arrived
        assert len(call.recorder.loud_frames()) * 20 == pytest.approx(played, abs=60)


async def test_barge_in_without_audio_played_skips_truncation():
    async with bridged_call() as call:
        async with asyncio.timeout(5):
            await wait_for(lambda: call.playout.frames > 2)
            call.session.emit(VoiceEventType.SPEECH_STARTED)
            await wait_for(lambda: call.bridge.metrics["barge_ins"])
            # a reply that finished playing and is done: nothing to truncate either
            call.session.say(tone(880, 100).tobytes(), "reply_1")
            call.session.emit(VoiceEventType.RESPONSE_DONE)
            await wait_for(lambda: call.playout.played_ms("reply_1") == 100)
            call.session.emit(VoiceEventType.SPEECH_STARTED)
            await wait_for(lambda: len(call.bridge.metrics["barge_ins"]) == 2)
        assert call.session.interrupted == []
        assert [b["truncated"] for b in call.bridge.metrics["barge_ins"]] == [False, False]


async def test_end_call_waits_for_the_goodbye_to_play():
    async with bridged_call() as call:
        async with asyncio.timeout(10):
            await wait_for(lambda: call.playout.frames > 2)
            t0 = time.monotonic()
            call.session.say(tone(880, 600).tobytes(), "bye")
            call.session.emit(VoiceEventType.END_CALL, text="goodbye said")
            reason = await call.run
        assert reason == "end_call"
        assert time.monotonic() - t0 >= 0.6
        assert call.playout.played_ms("bye") == 600 and call.playout.queued_ms == 0
        assert ("end_call", {"reason": "goodbye said"}) in call.events


async def test_metrics_are_filled_with_plausible_values():
    transcripts = []
    async with bridged_call(on_transcript=lambda *a: transcripts.append(a)) as call:
        async with asyncio.timeout(10):
            await wait_for(lambda: call.playout.frames > 2)  # the caller is listening
            await call.bridge.greet("Hello")
            await wait_for(lambda: call.playout.played_ms("greeting") == 200)
            call.session.emit(VoiceEventType.SPEECH_STOPPED)
            await asyncio.sleep(0.1)
            call.session.say(tone(880, 100).tobytes(), "reply_1")
            call.session.emit(VoiceEventType.TRANSCRIPT, role="user", text="partial", final=False)
            call.session.emit(VoiceEventType.TRANSCRIPT, role="assistant", text="Hi there")
            await wait_for(lambda: call.bridge.metrics["turns"])
            await asyncio.sleep(0.1)
        m = call.bridge.metrics
        json.dumps(m)
    assert [(r, t) for r, t, _ in transcripts] == [("assistant", "Hi there")]
    assert call.session.greeted == ["Hello"]
    assert 0 < m["first_inbound_audio_ms"] < 3000
    assert m["first_outbound_frame_ms"] < m["first_outbound_audio_ms"] < 3000
    assert 0 <= m["greeting_latency_ms"] <= 40  # one frame, plus scheduling slack
    (turn,) = m["turns"]
    assert turn["item_id"] == "reply_1" and 95 <= turn["response_latency_ms"] <= 150
    assert m["inbound"]["frames"] > 10 and m["inbound"]["processing_us"]["p99"] < 5000
    out = m["outbound"]
    assert out["audio_frames"] == 15 and out["late_frames"] <= 2  # (a busy test machine)
    assert out["write_us"]["p99"] < 5000 and out["frame_us"]["p99"] < 5000
    assert 0 <= out["playout_delay_ms"]["p50"] <= 21  # at most one frame of added latency
    assert out["audio_ms_received"] == 300


async def test_run_ends_when_media_ends_or_the_session_fails():
    async with bridged_call() as call:
        async with asyncio.timeout(10):
            await wait_for(lambda: call.bridge.metrics["inbound"]["frames"] > 2)
            await call.far.close()
            assert await call.run == "media_ended"

    async with bridged_call() as call:
        async with asyncio.timeout(10):
            call.session.emit(VoiceEventType.ERROR, text="rate limited", fatal=False)
            call.session.emit(VoiceEventType.ERROR, text="invalid api key", fatal=True)
            assert await call.run == "voice_error: invalid api key"
        assert ("voice_error", {"message": "rate limited", "fatal": False}) in call.events

    async with bridged_call() as call:
        async with asyncio.timeout(10):
            await wait_for(lambda: call.playout.frames > 2)
            await call.bridge.stop()
            await call.bridge.stop()
            assert await call.run == "stopped"


def test_bridge_refuses_a_session_at_another_rate():
    session = ScriptedSession()
    session.sample_rate = 16000
    with pytest.raises(MediaError, match="16000 Hz") as err:
        AudioBridge(None, PlayoutTrack(), session)
    assert "sample_rate" in err.value.hint


def test_a_sender_without_the_hook_is_left_alone(caplog):
    """An aiortc whose sender has no `_next_encoded_frame` still places calls, without levels."""

    class OtherSender:
        track = None

    sender = OtherSender()
    carry_audio_level(sender)
    assert not hasattr(sender, "_next_encoded_frame")
    assert "without the audio level" in caplog.text
