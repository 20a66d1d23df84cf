"""Our WebRTC media: WhatsApp SDP rules (property-tested), CallMedia against a real
simulated WhatsApp user on 127.0.0.1 (audio both ways, both DTLS roles, ICE-lite, dead
peer), and the low-latency receive path."""

import asyncio
import socket
import time

import numpy as np
import pytest
from aiortc.codecs.opus import OpusEncoder
from aiortc.rtp import RtpPacket
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from whatsapp_call.errors import ConfigError, MediaError
from whatsapp_call.media.jitter import LowLatencyAudioBuffer
from whatsapp_call.media.peer import CallMedia, rtc_ice_servers
from whatsapp_call.media.sdp import (
    join_lines,
    offer_problems,
    parse_sdp,
    split_lines,
    validate_answer,
    whatsapp_answer,
    whatsapp_offer,
)
from whatsapp_call.models import IceServer
from whatsapp_call_sim.audio import frame_to_mono, level_dbfs, tone
from whatsapp_call_sim.user import AudioPlayerTrack, Say, SimulatedUser, UserScript, WaitForSpeech

LOOPBACK = ["127.0.0.1"]
FP256 = ":".join(["AB"] * 32)
FP384 = ":".join(["CD"] * 48)


def sample_offer(
    *,
    fingerprints=(("sha-256", FP256), ("sha-384", FP384)),
    codecs=((96, "opus/48000/2"), (0, "PCMU/8000")),
    setup="actpass",
    eol="\r\n",
    ufrag="abcd",
    pwd="0123456789abcdefghijkl",
    extra_audio=False,
):
    """An aiortc/Chrome-shaped offer with knobs for everything WhatsApp cares about."""
    pts = " ".join(str(pt) for pt, _ in codecs)
    lines = [
        "v=0",
        "o=- 1 1 IN IP4 0.0.0.0",
        "s=-",
        "t=0 0",
        "a=group:BUNDLE 0",
        f"m=audio 50000 UDP/TLS/RTP/SAVPF {pts}",
        "c=IN IP4 127.0.0.1",
        "a=sendrecv",
        "a=mid:0",
        "a=rtcp-mux",
    ]
    for pt, codec in codecs:
        lines.append(f"a=rtpmap:{pt} {codec}")
        lines.append(f"a=rtcp-fb:{pt} transport-cc")
    lines.append("a=candidate:1 1 udp 2130706431 127.0.0.1 50000 typ host")
    lines.append("a=end-of-candidates")
    if ufrag:
        lines.append(f"a=ice-ufrag:{ufrag}")
    if pwd:
        lines.append(f"a=ice-pwd:{pwd}")
    for alg, value in fingerprints:
        lines.append(f"a=fingerprint:{alg} {value}")
    if setup:
        lines.append(f"a=setup:{setup}")
    if extra_audio:
        lines += ["m=audio 50002 UDP/TLS/RTP/SAVPF 96", "a=rtpmap:96 opus/48000/2", "a=rtcp-mux"]
    return eol.join(lines) + eol


def sample_answer(**overrides):
    kwargs = {"fingerprints": (("sha-256", FP256),), "codecs": ((96, "opus/48000/2"),)}
    kwargs.update(overrides)
    kwargs.setdefault("setup", "active")
    return sample_offer(**kwargs)


# -- SDP: examples --------------------------------------------------------------------------


def test_whatsapp_offer_rewrites_aiortc_style_offer():
    out = whatsapp_offer(sample_offer(eol="\n", setup="passive"))
    info = parse_sdp(out)
    assert offer_problems(out) == []
    assert [alg for alg, _ in info.fingerprints] == ["sha-256"]
    assert info.setup == "actpass"
    assert [c.name for c in info.audio[0].codecs] == ["opus"]
    assert info.audio[0].formats == ("96",)
    assert "a=rtcp-fb:0" not in out and "PCMU" not in out
    assert out.endswith("\r\n") and "\n" not in out.replace("\r\n", "")
    # we ask the caller for in-band FEC, which our receive buffer rebuilds lost packets from
    assert out.count("a=fmtp:96 minptime=10;useinbandfec=1\r\n") == 1


def test_whatsapp_offer_keeps_opus_parameters_the_stack_wrote():
    offer = sample_offer().replace(
        "a=rtpmap:96 opus/48000/2\r\n", "a=rtpmap:96 opus/48000/2\r\na=fmtp:96 stereo=1\r\n"
    )
    out = whatsapp_offer(offer)
    assert [line for line in out.split("\r\n") if line.startswith("a=fmtp")] == [
        "a=fmtp:96 stereo=1"
    ]


@pytest.mark.parametrize(
    ("offer", "message"),
    [
        (sample_offer(fingerprints=(("sha-384", FP384),)), "sha-256"),
        (sample_offer(codecs=((0, "PCMU/8000"),)), "Opus"),
        (sample_offer(extra_audio=True), "2 m=audio"),
    ],
)
def test_whatsapp_offer_refuses_what_it_cannot_fix(offer, message):
    with pytest.raises(MediaError, match=message):
        whatsapp_offer(offer)


@pytest.mark.parametrize(
    ("answer", "named"),
    [
        (sample_answer(fingerprints=()), "fingerprint"),
        (sample_answer(fingerprints=(("sha-1", FP256),)), "sha-256 fingerprint"),
        (sample_answer(ufrag=None), "ice-ufrag"),
        (sample_answer(pwd=None), "ice-pwd"),
        (sample_answer(setup=None), "a=setup:active|passive"),
        (sample_answer(setup="actpass"), "found actpass"),
        (sample_answer(codecs=((0, "PCMU/8000"),)), "Opus"),
        ("v=0\r\ns=-\r\nt=0 0\r\n", "m=audio"),
        ("hello world", "not of the form"),
        ("", "empty"),
    ],
)
def test_validate_answer_names_what_is_missing(answer, named):
    with pytest.raises(MediaError, match=named) as exc:
        validate_answer(answer)
    assert exc.value.hint


def test_validate_answer_accepts_metas_reference_answer():
    meta = (
        "v=0\r\no=- 741807839102053725 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n"
        "a=group:BUNDLE 0\r\na=ice-lite\r\nm=audio 3482 UDP/TLS/RTP/SAVPF 111 9 0 8 110 126\r\n"
        "c=IN IP4 31.13.65.130\r\n"
        "a=candidate:2754936280 1 udp 2113937151 31.13.65.130 3482 typ host generation 0\r\n"
        "a=ice-ufrag:JHqAXFH4HcAY/8\r\na=ice-pwd:dNNMmR8wUcGezvfBZOO0Qgcwl2m86GP/\r\n"
        f"a=fingerprint:sha-256 {FP256}\r\na=setup:active\r\na=mid:0\r\na=sendrecv\r\n"
        "a=rtcp-mux\r\na=rtpmap:111 opus/48000/2\r\na=fmtp:111 minptime=10;useinbandfec=1\r\n"
        "a=rtpmap:110 telephone-event/48000\r\n"
    )
    info = validate_answer(meta)
    assert info.ice_lite and info.setup == "active"
    assert info.candidates[0].address == "31.13.65.130" and info.candidates[0].port == 3482


def test_whatsapp_answer_adds_ice_lite_once_at_session_level():
    out = whatsapp_answer(whatsapp_answer(sample_answer(), ice_lite=True), ice_lite=True)
    lines = split_lines(out)
    assert lines.count("a=ice-lite") == 1
    assert lines.index("a=ice-lite") < next(i for i, x in enumerate(lines) if x.startswith("m="))
    assert parse_sdp(out).ice_lite


# -- SDP: properties ------------------------------------------------------------------------

fingerprint_algs = st.lists(
    st.sampled_from(["sha-1", "sha-224", "sha-384", "sha-512", "SHA-512"]), max_size=3
)
other_codecs = st.lists(
    st.sampled_from(["PCMU/8000", "PCMA/8000", "G722/8000", "telephone-event/8000", "red/48000/2"]),
    max_size=4,
    unique=True,
)


@st.composite
def offers(draw):
    others = draw(other_codecs)
    opus_pt = draw(st.integers(96, 127))
    codec_list = [(opus_pt, draw(st.sampled_from(["opus/48000/2", "OPUS/48000/2"])))]
    codec_list += [(pt, c) for pt, c in zip(range(0, 20), others, strict=False)]
    codec_list = draw(st.permutations(codec_list))
    algs = draw(fingerprint_algs)
    fps = [("sha-256", FP256.lower() if draw(st.booleans()) else FP256)]
    fps += [(alg, FP384) for alg in algs]
    fps = draw(st.permutations(fps))
    return sample_offer(
        fingerprints=tuple(fps),
        codecs=tuple(codec_list),
        setup=draw(st.sampled_from(["actpass", "active", "passive", None])),
        eol=draw(st.sampled_from(["\r\n", "\n"])),
    ), opus_pt


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(offers())
def test_property_whatsapp_offer_is_always_acceptable_and_idempotent(case):
    offer, opus_pt = case
    out = whatsapp_offer(offer)
    assert offer_problems(out) == []
    assert whatsapp_offer(out) == out
    info = parse_sdp(out)
    assert info.fingerprints == (("sha-256", FP256),)
    assert info.audio[0].formats == (str(opus_pt),)
    assert info.ice_ufrag == "abcd" and info.ice_pwd
    assert [c.address for c in info.candidates] == ["127.0.0.1"]
    assert "\n" not in out.replace("\r\n", "")


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_property_parsers_fail_only_with_media_error(text):
    for check in (parse_sdp, validate_answer, whatsapp_offer):
        try:
            check(text)
        except MediaError:
            pass
    assert isinstance(offer_problems(text), list)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.sampled_from(["v=0", "s=-", "a=x", "m=audio 9 X 0", "c=IN IP4 1.2.3.4"]), min_size=1
    )
)
def test_property_join_split_roundtrip(lines):
    assert split_lines(join_lines(lines)) == lines


REQUIRED_IN_ANSWER = {
    "fingerprint": ({"fingerprints": ()}, "fingerprint"),
    "ufrag": ({"ufrag": None}, "ice-ufrag"),
    "pwd": ({"pwd": None}, "ice-pwd"),
    "setup": ({"setup": None}, "a=setup:active|passive"),
    "opus": ({"codecs": ((0, "PCMU/8000"),)}, "Opus"),
}


@settings(max_examples=60, deadline=None)
@given(
    st.sets(st.sampled_from(sorted(REQUIRED_IN_ANSWER)), min_size=1),
    st.sampled_from(["\r\n", "\n"]),
)
def test_property_every_missing_piece_of_an_answer_is_named(removed, eol):
    overrides = {"eol": eol}
    for key in removed:
        overrides.update(REQUIRED_IN_ANSWER[key][0])
    with pytest.raises(MediaError) as exc:
        validate_answer(sample_answer(**overrides))
    for key in removed:
        assert REQUIRED_IN_ANSWER[key][1] in exc.value.message
    for key in set(REQUIRED_IN_ANSWER) - removed:
        assert REQUIRED_IN_ANSWER[key][1] not in exc.value.message


# -- ICE servers ------------------------------------------------------------------------------


def test_ice_servers_keep_order_and_credentials_out_of_errors():
    servers = [
        IceServer(urls=("stun:stun.example.org:3478",)),
        IceServer(
            urls=("turn:turn.example.org:3478?transport=udp",), username="u", credential="s3cret"
        ),
    ]
    mapped = rtc_ice_servers(servers)
    assert [s.urls for s in mapped] == [
        ["stun:stun.example.org:3478"],
        ["turn:turn.example.org:3478?transport=udp"],
    ]
    assert mapped[1].username == "u" and mapped[1].credential == "s3cret"
    with pytest.raises(ConfigError, match="http://nope") as exc:
        CallMedia(ice_servers=[IceServer(urls=("http://nope",), credential="s3cret")])
    assert "s3cret" not in str(exc.value)


async def test_gathering_is_bounded_by_gather_timeout_and_keeps_host_candidates():
    # A "TURN server" that never answers: aioice alone would wait 5 s for it.
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))
    port = silent.getsockname()[1]
    media = CallMedia(
        ice_servers=[IceServer(urls=(f"turn:127.0.0.1:{port}",), username="u", credential="p")],
        host_addresses=LOOPBACK,
        gather_timeout=0.5,
    )
    started = time.monotonic()
    try:
        async with asyncio.timeout(5):
            offer = await media.create_offer()
        assert 0.4 <= time.monotonic() - started < 2.5
        info = parse_sdp(offer)
        assert [(c.type, c.address) for c in info.candidates] == [("host", "127.0.0.1")]
        assert offer_problems(offer) == []
    finally:
        await media.close()
        silent.close()


# -- CallMedia against the simulated user ----------------------------------------------------


async def test_offer_from_call_media_is_whatsapp_valid():
    media = CallMedia(host_addresses=LOOPBACK)
    try:
        async with asyncio.timeout(10):
            offer = await media.create_offer()
        assert offer_problems(offer) == []
        info = parse_sdp(offer)
        assert [alg for alg, _ in info.fingerprints] == ["sha-256"]
        assert info.setup == "actpass"
        assert offer.endswith("\r\n") and "\n" not in offer.replace("\r\n", "")
        assert len(info.audio) == 1
        assert [(c.name, c.clock_rate, c.channels) for c in info.audio[0].codecs] == [
            ("opus", 48000, 2)
        ]
        assert info.candidates and {c.address for c in info.candidates} == {"127.0.0.1"}
        assert "offer_built" in media.timings
        assert media.ice_role == "controlling"
    finally:
        await media.close()


async def _connected_pair(user, **media_kwargs):
    media = CallMedia(host_addresses=LOOPBACK, **media_kwargs)
    offer = await media.create_offer()
    answer = await user.answer(offer)
    await media.accept_answer(answer)
    await media.wait_connected(5)
    await user.wait_connected(5)
    return media, answer


async def _recv_until_loud(media, frames_needed, threshold=-40.0):
    """Read frames until `frames_needed` loud ones came in; returns when the first arrived."""
    first = None
    loud = 0
    while loud < frames_needed:
        frame = await media.recv()
        if level_dbfs(frame_to_mono(frame)) > threshold:
            loud += 1
            first = first or time.monotonic()
    return first


async def test_audio_flows_both_ways_and_the_user_answers_after_our_speech():
    player = AudioPlayerTrack()
    user = SimulatedUser(
        "15550001", UserScript((WaitForSpeech(silence_ms=300, min_speech_ms=100), Say("yes")))
    )
    media = None
    try:
        async with asyncio.timeout(15):
            media, _ = await _connected_pair(user, outbound_track=player)
            await asyncio.sleep(0.2)
            tone_done = await player.play(tone(0.5, freq=440))
            heard_user_at = await _recv_until_loud(media, 25)  # 0.5 s of the user's "yes"
        # The user heard our tone: one segment of about half a second.
        segments = user.speech_segments()
        assert len(segments) == 1 and 400 <= segments[0].duration_ms <= 700
        assert 400 <= user.audible_ms() <= 700
        assert user.first_audible_at() is not None
        # ...and answered only after we had been quiet for 300 ms.
        assert user.said and user.said[0].utterance == "yes"
        assert user.said[0].start >= tone_done + 0.28
        assert heard_user_at > user.said[0].start
        # Milestones and the receive path's figures.
        for key in (
            "offer_built",
            "answer_applied",
            "ice_connected",
            "dtls_connected",
            "first_audio_in",
        ):
            assert key in media.timings
        stats = media.inbound_stats()
        assert stats["frames"] > 25 and stats["delay_p50_ms"] < 25
    finally:
        if media:
            await media.close()
        await user.close()


@pytest.mark.parametrize(("setup", "our_role"), [("active", "server"), ("passive", "client")])
async def test_both_dtls_roles_connect_and_we_stay_ice_controlling(setup, our_role):
    user = SimulatedUser("15550002", UserScript.silent(), dtls_setup=setup, ice_lite=True)
    media = None
    try:
        async with asyncio.timeout(10):
            media, answer = await _connected_pair(user)
            assert parse_sdp(answer).setup == setup and parse_sdp(answer).ice_lite
            assert media.dtls_role == our_role
            assert media.ice_role == "controlling"
            # Silence flows from us (no outbound track given) and is heard by the user.
            frame = await media.recv()
            await asyncio.sleep(0.3)
            assert "first_media_in" in user.timings
            assert frame.sample_rate == 48000
    finally:
        if media:
            await media.close()
        await user.close()


async def test_malformed_answer_is_refused_with_a_clear_media_error():
    media = CallMedia(host_addresses=LOOPBACK)
    user = SimulatedUser("15550003", UserScript.silent())
    try:
        async with asyncio.timeout(10):
            offer = await media.create_offer()
            answer = await user.answer(offer)
        broken = "".join(
            line
            for line in answer.splitlines(keepends=True)
            if not line.startswith("a=fingerprint")
        )
        with pytest.raises(MediaError, match="fingerprint"):
            await media.accept_answer(broken)
        with pytest.raises(MediaError, match="ice-pwd"):
            await media.accept_answer(answer.replace("a=ice-pwd:", "a=x-ice-pwd:"))
        assert not media.ended.is_set()
    finally:
        await media.close()
        await user.close()


async def test_dtls_failure_ends_the_call_media():
    """An answer whose fingerprint is not the callee's certificate: DTLS must fail."""
    media = CallMedia(host_addresses=LOOPBACK)
    user = SimulatedUser("15550006", UserScript.silent())
    try:
        async with asyncio.timeout(10):
            answer = await user.answer(await media.create_offer())
            real = parse_sdp(answer).fingerprints[0][1]
            await media.accept_answer(answer.replace(real, FP256))
            with pytest.raises(MediaError, match="dtls_failed"):
                await media.wait_connected(5)
        assert media.end_reason == "dtls_failed"
    finally:
        await media.close()
        await user.close()


@pytest.mark.parametrize("low_latency", [True, False], ids=["our-receive-path", "aiortc-path"])
async def test_dead_peer_is_detected_without_a_goodbye(low_latency):
    user = SimulatedUser("15550004", UserScript.silent())
    media = None
    try:
        async with asyncio.timeout(10):
            media, _ = await _connected_pair(
                user, dead_peer_seconds=0.6, low_latency_receive=low_latency
            )
            await media.recv()
            await user.vanish()
            vanished = time.monotonic()
            await media.ended.wait()
        assert media.end_reason == "no_media"
        assert 0.5 <= time.monotonic() - vanished <= 2.5
        with pytest.raises(MediaError, match="no_media"):
            async with asyncio.timeout(2):
                while True:
                    await media.recv()
    finally:
        if media:
            await media.close()
        await user.close()


async def test_user_hangup_ends_our_media_promptly():
    user = SimulatedUser("15550005", UserScript.silent())
    media = None
    try:
        async with asyncio.timeout(10):
            media, _ = await _connected_pair(user, dead_peer_seconds=5)
            await user.hangup()
            hung_up = time.monotonic()
            await media.ended.wait()
        assert media.end_reason == "closed"
        assert time.monotonic() - hung_up < 2.0
    finally:
        if media:
            await media.close()
        await user.close()


# -- the low-latency receive path ----------------------------------------------------------------


def _opus_packets(count, start_seq=65530, start_ts=4294966000):
    """Real Opus RTP packets (seq and timestamp wrap on purpose) of a 440 Hz tone."""
    encoder = OpusEncoder()
    samples = tone(0.02 * (count + 2))
    packets = []
    import av

    for i in range(count + 2):
        chunk = samples[i * 960 : (i + 1) * 960].reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(chunk, format="s16", layout="mono")
        frame.sample_rate = 48000
        frame.pts = i * 960
        payloads, _ = encoder.encode(frame)
        for payload in payloads:
            n = len(packets)
            packet = RtpPacket(
                payload_type=96,
                sequence_number=(start_seq + n) & 0xFFFF,
                timestamp=(start_ts + n * 960) & 0xFFFFFFFF,
            )
            packet.payload = payload
            packet._data = payload
            packets.append(packet)
    return packets[:count]


async def test_receive_buffer_releases_in_order_immediately_and_conceals_losses():
    out = []
    buffer = LowLatencyAudioBuffer(lambda f: out.append((time.monotonic(), f)), max_wait=0.05)
    packets = _opus_packets(12)
    for p in packets[:4]:  # in order: each one out at once
        buffer.add(p)
        await asyncio.sleep(0.02)
    assert len(out) == 4 and buffer.stats.frames == 4
    buffer.add(packets[5])  # 4 is late: 5 waits for it...
    assert len(out) == 4
    await asyncio.sleep(0.005)
    buffer.add(packets[4])  # ...and both go out, in order, the moment it comes
    assert [f.pts for _, f in out[-2:]] == [4 * 960, 5 * 960]
    buffer.add(packets[7])  # 6 is lost: after the wait, a concealment frame, then 7
    await asyncio.sleep(0.08)
    assert buffer.stats.lost == 1 and buffer.stats.concealed == 1
    assert [f.pts for _, f in out[-2:]] == [6 * 960, 7 * 960]
    assert level_dbfs(frame_to_mono(out[-2][1])) < level_dbfs(frame_to_mono(out[-3][1]))
    buffer.add(packets[6])  # too late now: dropped, counted
    buffer.add(packets[7])  # duplicate
    assert buffer.stats.late == 1 and buffer.stats.duplicates == 1
    pts = [f.pts for _, f in out]
    assert pts == sorted(pts) and np.all(np.diff(pts) == 960)
    assert buffer.stats.summary()["delay_p50_ms"] < 5
    buffer.close()
