"""WebRTC media for WhatsApp calls (aiortc), and the audio bridge to a voice backend."""
