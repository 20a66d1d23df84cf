"""Meta's SDP checks on a business offer (spec §2), and a canned answer for signalling-only calls.

Meta answers a bad offer with Graph error 100 and the reason in `error_data.details`; the
checks here are the ones the spec names, each with its own sentence so a test (and the
product's error message) can tell them apart.
"""

from __future__ import annotations

import re
import secrets
import string


def sdp_problem(sdp: object) -> str | None:
    """The first reason Meta would refuse this offer SDP, or None when it is acceptable."""
    if not isinstance(sdp, str) or not sdp.strip():
        return "session.sdp must be a non-empty SDP string"
    if not sdp.startswith("v=0"):
        return "SDP must start with v=0 (RFC 8866); was it serialized twice?"
    if re.search(r"(?<!\r)\n", sdp) or re.search(r"\r(?!\n)", sdp):
        return "SDP lines must end with CRLF (\\r\\n)"
    lines = [line for line in sdp.split("\r\n") if line]
    media = [line for line in lines if line.startswith("m=")]
    audio = [line for line in media if line.startswith("m=audio ")]
    if len(audio) != 1:
        return f"SDP must have exactly one m=audio section (found {len(audio)})"
    if len(media) != 1:
        return "SDP must have only one media section (one audio track); remove the others"
    formats = audio[0].split()[3:]
    opus = [
        line
        for line in lines
        if re.match(r"a=rtpmap:(\d+) opus/48000(/2)?$", line, re.I)
        and line.split(":", 1)[1].split()[0] in formats
    ]
    if not opus:
        return "No Opus codec (a=rtpmap:<pt> opus/48000/2) in the audio section; WhatsApp only supports Opus"
    fingerprints = [line for line in lines if line.lower().startswith("a=fingerprint:")]
    if not fingerprints:
        return "No fingerprint found in SDP (a=fingerprint:sha-256 is required for DTLS-SRTP)"
    hashes = {line.split(":", 1)[1].split()[0].lower() for line in fingerprints}
    if "sha-256" not in hashes:
        return "SDP fingerprint must use sha-256"
    if hashes != {"sha-256"}:
        others = ", ".join(sorted(hashes - {"sha-256"}))
        return f"Only sha-256 fingerprints are supported; remove the {others} fingerprint(s)"
    setups = {
        line.split(":", 1)[1].strip().lower() for line in lines if line.startswith("a=setup:")
    }
    if setups != {"actpass"}:
        found = ", ".join(sorted(setups)) or "none"
        return f"Offer must use a=setup:actpass (found: {found})"
    if not any(line.startswith("a=ice-ufrag:") for line in lines):
        return "Missing ICE credentials: a=ice-ufrag"
    if not any(line.startswith("a=ice-pwd:") for line in lines):
        return "Missing ICE credentials: a=ice-pwd"
    return None


def _token(length: int, alphabet: str = string.ascii_letters + string.digits + "+/") -> str:
    return "".join(secrets.choice(alphabet) for _ in range(length))


def canned_answer(offer_sdp: str, host: str = "127.0.0.1") -> str:
    """A Meta-shaped answer (ice-lite, setup:active, sha-256, Opus) with fresh credentials,
    for signalling-only calls where no simulated user carries media (spec §2, last note)."""
    lines = offer_sdp.split("\r\n")
    mid = next((line.split(":", 1)[1] for line in lines if line.startswith("a=mid:")), "0")
    opus_pt = "111"
    for line in lines:
        match = re.match(r"a=rtpmap:(\d+) opus/48000", line, re.I)
        if match:
            opus_pt = match.group(1)
            break
    port = 3478 + 2 * secrets.randbelow(8)
    fingerprint = ":".join(f"{b:02X}" for b in secrets.token_bytes(32))
    ufrag = _token(14)
    return (
        "\r\n".join(
            [
                "v=0",
                f"o=- {secrets.randbelow(10**18)} 2 IN IP4 127.0.0.1",
                "s=-",
                "t=0 0",
                f"a=group:BUNDLE {mid}",
                "a=ice-lite",
                f"m=audio {port} UDP/TLS/RTP/SAVPF {opus_pt} 126",
                f"c=IN IP4 {host}",
                "a=rtcp:9 IN IP4 0.0.0.0",
                f"a=candidate:{secrets.randbelow(2**32)} 1 udp 2113937151 {host} {port} typ host generation 0",
                f"a=ice-ufrag:{ufrag}",
                f"a=ice-pwd:{_token(32)}",
                f"a=fingerprint:sha-256 {fingerprint}",
                "a=setup:active",
                f"a=mid:{mid}",
                "a=sendrecv",
                "a=rtcp-mux",
                f"a=rtpmap:{opus_pt} opus/48000/2",
                f"a=fmtp:{opus_pt} minptime=10;useinbandfec=1",
                "a=rtpmap:126 telephone-event/8000",
                f"a=ssrc:{secrets.randbelow(2**32)} cname:{_token(16, string.ascii_letters)}",
            ]
        )
        + "\r\n"
    )
