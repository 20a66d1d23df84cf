"""The RFC 6464 audio level on RTP packets of pre-encoded audio.

aiortc's `RTCRtpSender` puts the ssrc-audio-level header extension (negotiated in our offer)
on a packet only when it encoded the frame itself: for a track that hands it ready Opus
packets (`PlayoutTrack` in encoded mode, our default) it sends none. Receivers use the level
for voice-activity indication without decoding; our wire benchmarks use it to see when each
side speaks through SRTP. `carry_audio_level` makes the sender take the level the track
computed for the packet it just returned.

It wraps the sender's `_next_encoded_frame` (aiortc 1.9-1.16: `recv()` of the track, then
packetising, with no await in between, so the track's `audio_level` belongs to that packet);
`tests/test_bridge.py` checks the level on the wire, so a new aiortc that changes this fails
there; at run time such a sender is left alone (the extension is optional).
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)


def carry_audio_level(sender: Any) -> None:
    """Have `sender` stamp each packet of pre-encoded audio with its track's `audio_level`
    (dBov, -127..0; None or absent = no extension) when it computed none itself."""
    next_encoded_frame = getattr(sender, "_next_encoded_frame", None)
    if next_encoded_frame is None:  # an aiortc whose sender changed: the extension is optional
        log.warning("aiortc's RTCRtpSender changed: RTP packets go without the audio level")
        return

    async def with_level(codec: Any) -> Any:
        frame = await next_encoded_frame(codec)
        if frame is not None and frame.audio_level is None:
            frame.audio_level = getattr(sender.track, "audio_level", None)
        return frame

    sender._next_encoded_frame = with_level
