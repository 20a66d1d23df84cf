"""WebRTC media for WhatsApp calls (aiortc), and the audio bridge to a voice backend.

`sdp`: WhatsApp's SDP rules (pure functions). `peer.CallMedia`: our side of one call.
`jitter`: the low-latency receive path for inbound audio. `opus`: libopus encode/decode.
`ice`: host-candidate selection.
Import the submodules directly; this package does not import aiortc by itself.
"""
