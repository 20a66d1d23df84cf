"""Inspect and rewrite SDP for WhatsApp's calling API (spec: whatsapp-calling-api.md §2).

WhatsApp is strict where browsers are lenient: one Opus audio m-line, DTLS-SRTP with a
**sha-256** fingerprint only (aiortc also emits sha-384/sha-512 lines, which WhatsApp rejects),
`a=setup:actpass` in the business offer, CRLF line endings. These are pure functions on
strings so they are easy to test and reuse: `whatsapp_offer` fixes an aiortc offer,
`validate_answer` checks the answer we get back, `offer_problems` is what the simulated
WhatsApp user refuses, `whatsapp_answer` makes an aiortc answer look like Meta's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..errors import MediaError

#: The only fingerprint hash WhatsApp accepts.
WHATSAPP_FINGERPRINT = "sha-256"
#: WhatsApp's media transport profile.
WEBRTC_PROFILE = "UDP/TLS/RTP/SAVPF"

_LINE = re.compile(r"^([a-z])=(.*)$")
_RTPMAP = re.compile(r"^(\d+)\s+([^/\s]+)/(\d+)(?:/(\d+))?\s*$")
_FORMAT_ATTR = re.compile(r"^a=(?:rtpmap|fmtp|rtcp-fb):(\d+)\b")
_DIRECTIONS = ("sendrecv", "sendonly", "recvonly", "inactive")


@dataclass(frozen=True)
class Codec:
    payload_type: int
    name: str  # as written, e.g. "opus"
    clock_rate: int
    channels: int | None = None

    @property
    def is_opus(self) -> bool:
        return self.name.lower() == "opus" and self.clock_rate == 48000


@dataclass(frozen=True)
class IceCandidate:
    foundation: str
    component: int
    transport: str
    priority: int
    address: str
    port: int
    type: str


@dataclass(frozen=True)
class MediaSection:
    kind: str  # "audio", "video", "application"
    port: int
    proto: str
    formats: tuple[str, ...]
    codecs: tuple[Codec, ...] = ()
    direction: str | None = None
    rtcp_mux: bool = False


@dataclass(frozen=True)
class SdpInfo:
    """What matters in one SDP for WhatsApp. Session- and media-level attributes are merged
    (media-level wins), which is exact for the single-audio-section SDPs WhatsApp uses."""

    crlf: bool  # every line ends with CRLF
    version_ok: bool  # starts with v=0
    media: tuple[MediaSection, ...] = ()
    fingerprints: tuple[tuple[str, str], ...] = ()  # (lower-case hash name, hex value)
    setup: str | None = None
    ice_ufrag: str | None = None
    ice_pwd: str | None = field(default=None, repr=False)
    ice_lite: bool = False
    bundle: bool = False
    candidates: tuple[IceCandidate, ...] = ()

    @property
    def audio(self) -> tuple[MediaSection, ...]:
        return tuple(m for m in self.media if m.kind == "audio")


def split_lines(sdp: str) -> list[str]:
    """The SDP's lines without terminators, accepting CRLF, LF or a mix; blank lines dropped."""
    return [line for line in re.split(r"\r?\n", sdp.strip("\r\n")) if line.strip()]


def join_lines(lines: list[str]) -> str:
    """SDP text with CRLF after every line (RFC 8866; WhatsApp rejects bare LF)."""
    return "".join(line + "\r\n" for line in lines)


def _is_crlf(sdp: str) -> bool:
    return bool(sdp) and sdp.endswith("\r\n") and "\n" not in sdp.replace("\r\n", "")


def _parse_candidate(value: str) -> IceCandidate | None:
    parts = value.split()
    if len(parts) < 8 or parts[6] != "typ":
        return None
    try:
        return IceCandidate(
            foundation=parts[0],
            component=int(parts[1]),
            transport=parts[2].lower(),
            priority=int(parts[3]),
            address=parts[4],
            port=int(parts[5]),
            type=parts[7],
        )
    except ValueError:
        return None


def parse_sdp(sdp: str) -> SdpInfo:
    """Parse the parts of `sdp` WhatsApp cares about. Raises `MediaError` for text that is
    not SDP at all (a line that is not `x=value`); missing attributes are left empty so the
    caller can say exactly what is missing."""
    if not isinstance(sdp, str) or not sdp.strip():
        raise MediaError("The SDP is empty.", "Pass the SDP text of the offer or answer.")
    lines = split_lines(sdp)
    session: dict[str, list[str]] = {}
    sections: list[tuple[str, dict[str, list[str]]]] = []
    current = session
    for number, line in enumerate(lines, start=1):
        match = _LINE.match(line)
        if match is None:
            raise MediaError(
                f"SDP line {number} is not of the form 'x=value': {line[:60]!r}.",
                "Pass the SDP unchanged, as the provider sent it.",
            )
        kind, value = match.groups()
        if kind == "m":
            current = {}
            sections.append((value, current))
            continue
        if kind == "a":
            name, _, attr_value = value.partition(":")
            current.setdefault(name.strip().lower(), []).append(attr_value.strip())

    media: list[MediaSection] = []
    candidates: list[IceCandidate] = []
    fingerprints: list[tuple[str, str]] = []
    merged: dict[str, str] = {}
    for key in ("setup", "ice-ufrag", "ice-pwd"):
        if session.get(key):
            merged[key] = session[key][0]
    for value in session.get("fingerprint", []):
        fingerprints.append(_fingerprint(value))
    for mline, attrs in sections:
        parts = mline.split()
        kind = parts[0] if parts else ""
        try:
            port = int(parts[1]) if len(parts) > 1 else 0
        except ValueError:
            port = 0
        proto = parts[2] if len(parts) > 2 else ""
        formats = tuple(parts[3:])
        codecs = []
        for rtpmap in attrs.get("rtpmap", []):
            m = _RTPMAP.match(rtpmap)
            if m:
                pt, name, rate, channels = m.groups()
                codecs.append(Codec(int(pt), name, int(rate), int(channels) if channels else None))
        direction = next((d for d in _DIRECTIONS if d in attrs), None)
        media.append(
            MediaSection(
                kind=kind,
                port=port,
                proto=proto,
                formats=formats,
                codecs=tuple(c for c in codecs if str(c.payload_type) in formats),
                direction=direction,
                rtcp_mux="rtcp-mux" in attrs,
            )
        )
        for value in attrs.get("candidate", []):
            cand = _parse_candidate(value)
            if cand is not None:
                candidates.append(cand)
        for value in attrs.get("fingerprint", []):
            fingerprints.append(_fingerprint(value))
        if kind == "audio":
            for key in ("setup", "ice-ufrag", "ice-pwd"):
                if attrs.get(key):
                    merged[key] = attrs[key][0]
    bundle = any(v.split()[:1] == ["BUNDLE"] for v in session.get("group", []))
    return SdpInfo(
        crlf=_is_crlf(sdp),
        version_ok=bool(lines) and lines[0].strip() == "v=0",
        media=tuple(media),
        fingerprints=tuple(fingerprints),
        setup=merged.get("setup", "").lower() or None,
        ice_ufrag=merged.get("ice-ufrag") or None,
        ice_pwd=merged.get("ice-pwd") or None,
        ice_lite="ice-lite" in session,
        bundle=bundle,
        candidates=tuple(candidates),
    )


def _fingerprint(value: str) -> tuple[str, str]:
    algorithm, _, digest = value.strip().partition(" ")
    return algorithm.lower(), digest.strip()


def _opus(section: MediaSection) -> list[Codec]:
    return [c for c in section.codecs if c.is_opus]


def offer_problems(sdp: str) -> list[str]:
    """Why WhatsApp would refuse `sdp` as a business-initiated offer (empty list = fine).

    Used by the simulated WhatsApp user, so a regression in our offer fails the tests the
    way it would fail against Meta (error 100 "invalid SDP", or a call that never connects).
    """
    try:
        info = parse_sdp(sdp)
    except MediaError as exc:
        return [exc.message]
    problems = []
    if not info.version_ok:
        problems.append("the SDP does not start with v=0")
    if not info.crlf:
        problems.append("line endings are not CRLF")
    audio = info.audio
    if len(audio) != 1:
        problems.append(f"expected exactly one m=audio section, found {len(audio)}")
    for section in audio:
        if section.proto != WEBRTC_PROFILE:
            problems.append(f"m=audio uses {section.proto or 'no'} profile, not {WEBRTC_PROFILE}")
        if not _opus(section):
            problems.append("m=audio does not offer opus/48000/2")
        if not section.rtcp_mux:
            problems.append("a=rtcp-mux is missing")
        if section.direction not in (None, "sendrecv"):
            problems.append(f"audio direction is {section.direction}, not sendrecv")
    if not info.fingerprints:
        problems.append("no a=fingerprint (DTLS-SRTP is required)")
    other = sorted({alg for alg, _ in info.fingerprints if alg != WHATSAPP_FINGERPRINT})
    if other:
        problems.append(f"fingerprints other than sha-256 present: {', '.join(other)}")
    if info.fingerprints and WHATSAPP_FINGERPRINT not in {a for a, _ in info.fingerprints}:
        problems.append("no sha-256 fingerprint")
    if info.setup != "actpass":
        problems.append(f"a=setup is {info.setup or 'missing'}, an offer must say actpass")
    if not info.ice_ufrag or not info.ice_pwd:
        problems.append("a=ice-ufrag / a=ice-pwd missing")
    return problems


def _rewrite(
    sdp: str,
    *,
    setup: str | None,
    ice_lite: bool | None = None,
    what: str = "offer",
    opus_fmtp: str | None = None,
) -> str:
    """Drop non-sha-256 fingerprints and non-Opus codecs, optionally force a=setup and
    a=ice-lite, give Opus `opus_fmtp` parameters when it has none, and emit CRLF. Shared by
    `whatsapp_offer` and `whatsapp_answer`."""
    info = parse_sdp(sdp)
    if len(info.audio) != 1:
        raise MediaError(
            f"The {what} has {len(info.audio)} m=audio sections; WhatsApp needs exactly one.",
            "Create the peer connection with a single audio transceiver.",
        )
    if WHATSAPP_FINGERPRINT not in {alg for alg, _ in info.fingerprints}:
        raise MediaError(
            f"The {what} has no sha-256 a=fingerprint; WhatsApp accepts only sha-256.",
            "Use a DTLS certificate whose sha-256 fingerprint the stack writes (aiortc does).",
        )
    opus = {str(c.payload_type) for c in _opus(info.audio[0])}
    if not opus:
        raise MediaError(
            f"The {what} does not offer Opus 48 kHz; WhatsApp only speaks Opus.",
            "Set the audio transceiver's codec preferences to Opus.",
        )
    out: list[str] = []
    in_audio = False
    lines = split_lines(sdp)
    has_fmtp = {m.group(1) for m in map(_FORMAT_ATTR.match, lines) if m and "fmtp" in m.group(0)}
    for line in lines:
        if line.startswith("m="):
            parts = line[2:].split()
            in_audio = parts[:1] == ["audio"]
            if in_audio:
                fmts = [f for f in parts[3:] if f in opus]
                line = "m=" + " ".join(parts[:3] + fmts)
            out.append(line)
            continue
        if line.startswith("a=fingerprint:"):
            alg, digest = _fingerprint(line[len("a=fingerprint:") :])
            if alg == WHATSAPP_FINGERPRINT:
                out.append(f"a=fingerprint:{WHATSAPP_FINGERPRINT} {digest.upper()}")
            continue
        if setup is not None and line.startswith("a=setup:"):
            out.append(f"a=setup:{setup}")
            continue
        if line == "a=ice-lite" and ice_lite is not None:
            continue
        fmt_attr = _FORMAT_ATTR.match(line)
        if in_audio and fmt_attr and fmt_attr.group(1) not in opus:
            continue
        out.append(line)
        if in_audio and opus_fmtp and line.startswith("a=rtpmap:") and fmt_attr:
            pt = fmt_attr.group(1)
            if pt not in has_fmtp:
                out.append(f"a=fmtp:{pt} {opus_fmtp}")
    if setup is not None and not any(line.startswith("a=setup:") for line in out):
        out.append(f"a=setup:{setup}")
    if ice_lite:
        first_m = next(i for i, line in enumerate(out) if line.startswith("m="))
        out.insert(first_m, "a=ice-lite")
    return join_lines(out)


#: what our offer asks of the caller's Opus encoder (RFC 7587): in-band FEC, which our
#: receive buffer decodes to rebuild lost packets; 10 ms frames at the shortest (as Meta).
OFFER_OPUS_FMTP = "minptime=10;useinbandfec=1"


def whatsapp_offer(sdp: str) -> str:
    """Make an (aiortc) offer WhatsApp-ready: sha-256 fingerprint only, `a=setup:actpass`,
    Opus only (with `OFFER_OPUS_FMTP`), CRLF. Raises `MediaError` when it cannot be fixed by
    rewriting (no audio, no Opus, no sha-256 fingerprint, several audio sections)."""
    return _rewrite(sdp, setup="actpass", what="offer", opus_fmtp=OFFER_OPUS_FMTP)


def whatsapp_answer(sdp: str, *, ice_lite: bool = False) -> str:
    """Make an (aiortc) answer look like Meta's: sha-256 only, Opus only, CRLF, and
    `a=ice-lite` at session level when `ice_lite`. The DTLS role is kept as the stack chose."""
    return _rewrite(sdp, setup=None, ice_lite=ice_lite, what="answer")


def validate_answer(sdp: str) -> SdpInfo:
    """Check the provider's SDP answer before applying it; raise `MediaError` naming every
    missing piece (an audio m-line with Opus, a sha-256 fingerprint, ICE ufrag/pwd, a setup
    role of active or passive). Returns the parsed answer."""
    info = parse_sdp(sdp)
    missing = []
    audio = info.audio
    if not info.version_ok:
        missing.append("v=0 first line")
    if not audio:
        missing.append("an m=audio line")
    elif not any(_opus(s) for s in audio):
        missing.append("Opus (a=rtpmap:<pt> opus/48000/2) in the audio m-line")
    elif audio[0].port == 0:
        missing.append("an accepted audio m-line (port is 0: audio was rejected)")
    if not info.fingerprints:
        missing.append("a DTLS fingerprint (a=fingerprint:sha-256 ...)")
    elif WHATSAPP_FINGERPRINT not in {alg for alg, _ in info.fingerprints}:
        missing.append("a sha-256 fingerprint")
    if not info.ice_ufrag:
        missing.append("ICE username fragment (a=ice-ufrag)")
    if not info.ice_pwd:
        missing.append("ICE password (a=ice-pwd)")
    if info.setup not in ("active", "passive"):
        missing.append(f"a DTLS role a=setup:active|passive (found {info.setup or 'none'})")
    if missing:
        raise MediaError(
            "The SDP answer is unusable: missing " + "; ".join(missing) + ".",
            "The provider's answer must be the callee's WebRTC answer to our offer; "
            "check the webhook parsing passes the SDP unchanged.",
        )
    return info


__all__ = [
    "WHATSAPP_FINGERPRINT",
    "Codec",
    "IceCandidate",
    "MediaSection",
    "SdpInfo",
    "join_lines",
    "offer_problems",
    "parse_sdp",
    "split_lines",
    "validate_answer",
    "whatsapp_answer",
    "whatsapp_offer",
]
