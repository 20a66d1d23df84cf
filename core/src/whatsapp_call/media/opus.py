"""Opus encode and decode through libopus itself (ctypes), at the voice backend's rate.

Why not PyAV's codec contexts: FFmpeg's libopus wrapper decodes only to 48 kHz (so every
inbound frame then needs resampling to the backend's 24 kHz) and wraps each 20 ms frame in
Python frame/packet objects both ways. libopus decodes and encodes natively at 8, 12, 16,
24 or 48 kHz, conceals a lost packet properly (its PLC continues the voice instead of us
repeating the last frame), and one ctypes call per frame is all it costs.

The library is the one PyAV's wheel ships (aiortc needs PyAV, so it is always installed, and
it is the same build aiortc's own codec uses); a PyAV built from source links the system's
libopus, which `ctypes.util.find_library` finds (Debian: libopus0).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import glob
import os

import av
import numpy as np

from ..errors import MediaError

RATES = (8000, 12000, 16000, 24000, 48000)  # what libopus encodes from and decodes to
_APPLICATIONS = {"voip": 2048, "audio": 2049, "lowdelay": 2051}
_SET_BITRATE = 4002
_SET_COMPLEXITY = 4010
_SET_INBAND_FEC = 4012
_SET_PACKET_LOSS_PERC = 4014
_MAX_PACKET = 1500  # bytes: one RTP payload
_MAX_FRAME_MS = 120  # the longest Opus packet


def _candidates() -> list[str]:
    """Where libopus may be: PyAV's bundled copy first (auditwheel/delocate/delvewheel put it
    beside or inside the package), then the system's."""
    package = os.path.dirname(av.__file__)
    patterns = [
        os.path.join(package, os.pardir, "av.libs", "libopus*.so*"),  # Linux wheels
        os.path.join(package, ".dylibs", "libopus*.dylib"),  # macOS wheels
        os.path.join(package, os.pardir, "av.libs", "*opus*.dll"),  # Windows wheels
    ]
    found = [path for pattern in patterns for path in sorted(glob.glob(pattern))]
    system = ctypes.util.find_library("opus")
    return found + ([system] if system else [])


@functools.cache
def libopus() -> ctypes.CDLL:
    """The loaded libopus with its function signatures declared; `MediaError` if none."""
    tried = []
    for path in _candidates():
        try:
            lib = ctypes.CDLL(path)
            lib.opus_get_version_string.restype = ctypes.c_char_p
            break
        except (OSError, AttributeError) as exc:
            tried.append(f"{path}: {exc}")
    else:
        raise MediaError(
            "libopus was not found" + (f" ({'; '.join(tried)})" if tried else "") + ".",
            "Install PyAV from its wheels (pip install av), or the system library "
            "(Debian: apt-get install libopus0).",
        )
    c_int, ptr = ctypes.c_int, ctypes.c_void_p
    lib.opus_encoder_create.restype = ptr
    lib.opus_encoder_create.argtypes = [ctypes.c_int32, c_int, c_int, ctypes.POINTER(c_int)]
    lib.opus_encoder_destroy.argtypes = [ptr]
    lib.opus_encode.restype = ctypes.c_int32
    lib.opus_encode.argtypes = [ptr, ptr, c_int, ptr, ctypes.c_int32]
    lib.opus_encoder_ctl.argtypes = [ptr, c_int]  # variadic: the value goes as a ctypes int
    lib.opus_decoder_create.restype = ptr
    lib.opus_decoder_create.argtypes = [ctypes.c_int32, c_int, ctypes.POINTER(c_int)]
    lib.opus_decoder_destroy.argtypes = [ptr]
    lib.opus_decode.restype = c_int
    lib.opus_decode.argtypes = [ptr, ctypes.c_char_p, ctypes.c_int32, ptr, c_int, c_int]
    lib.opus_packet_get_nb_samples.restype = c_int
    lib.opus_packet_get_nb_samples.argtypes = [ctypes.c_char_p, ctypes.c_int32, ctypes.c_int32]
    lib.opus_strerror.restype = ctypes.c_char_p
    lib.opus_strerror.argtypes = [c_int]
    if hasattr(lib, "opus_packet_has_lbrr"):  # libopus 1.5+
        lib.opus_packet_has_lbrr.restype = c_int
        lib.opus_packet_has_lbrr.argtypes = [ctypes.c_char_p, ctypes.c_int32]
    return lib


def version() -> str:
    """libopus's version string, e.g. "libopus 1.5.2" (for `doctor`)."""
    return libopus().opus_get_version_string().decode()


class OpusError(MediaError):
    """libopus refused a call (bad packet, bad argument)."""


def _check(code: int, what: str) -> int:
    if code < 0:
        reason = libopus().opus_strerror(code).decode()
        raise OpusError(f"libopus {what} failed: {reason} ({code}).", _HINT)
    return code


_HINT = "This is a bug or a corrupt packet; the frame is skipped and the call goes on."


def _check_rate(rate: int, what: str) -> None:
    if rate not in RATES:
        raise MediaError(
            f"Opus cannot {what} at {rate} Hz.",
            f"Use a voice session sample rate in {RATES} (the bridge resamples otherwise).",
        )


class OpusEncoder:
    """Mono PCM16 at `rate` -> Opus packets, one per 20 ms frame (any 2.5-60 ms frame works).

    application "voip" favours speech intelligibility (what WebRTC uses for calls);
    complexity 0-10 (None keeps libopus's default, 10) trades CPU for quality;
    fec_loss_percent > 0 adds in-band FEC (each packet carries a coarse copy of the previous
    frame) tuned for that much loss: the receiver can then rebuild a lost frame, for 20-50%
    more encoding CPU.
    """

    def __init__(
        self,
        rate: int,
        *,
        bitrate: int = 32000,
        application: str = "voip",
        complexity: int | None = None,
        fec_loss_percent: int = 0,
    ) -> None:
        _check_rate(rate, "encode")
        lib = libopus()
        error = ctypes.c_int()
        state = lib.opus_encoder_create(rate, 1, _APPLICATIONS[application], ctypes.byref(error))
        _check(error.value, "encoder set-up")
        self._lib, self._state = lib, state
        self._encode = lib.opus_encode
        self._out = ctypes.create_string_buffer(_MAX_PACKET)
        self.rate = rate
        _check(lib.opus_encoder_ctl(state, _SET_BITRATE, ctypes.c_int32(bitrate)), "set bitrate")
        if complexity is not None:
            _check(
                lib.opus_encoder_ctl(state, _SET_COMPLEXITY, ctypes.c_int32(complexity)),
                "set complexity",
            )
        if fec_loss_percent > 0:
            _check(lib.opus_encoder_ctl(state, _SET_INBAND_FEC, ctypes.c_int32(1)), "set FEC")
            _check(
                lib.opus_encoder_ctl(
                    state, _SET_PACKET_LOSS_PERC, ctypes.c_int32(fec_loss_percent)
                ),
                "set expected loss",
            )

    def encode(self, pcm: np.ndarray) -> bytes:
        """One frame of int16 mono samples (C-contiguous) -> one Opus packet."""
        n = self._encode(self._state, pcm.ctypes.data, len(pcm), self._out, _MAX_PACKET)
        return ctypes.string_at(self._out, _check(n, "encode"))

    def __del__(self) -> None:
        state, self._state = getattr(self, "_state", None), None
        if state:
            self._lib.opus_encoder_destroy(state)


class OpusDecoder:
    """Opus packets (mono or stereo coded) -> mono s16 `av.AudioFrame`s at `rate`.

    `decode(None, samples)` is libopus's packet-loss concealment: a frame that continues the
    voice of the last one and fades out over a few lost packets. `decode(next, samples,
    fec=True)` rebuilds a lost frame from the in-band FEC the next packet carries (concealment
    when it carries none; `has_fec` tells).
    """

    def __init__(self, rate: int) -> None:
        _check_rate(rate, "decode")
        lib = libopus()
        error = ctypes.c_int()
        state = lib.opus_decoder_create(rate, 1, ctypes.byref(error))
        _check(error.value, "decoder set-up")
        self._lib, self._state = lib, state
        self._decode = lib.opus_decode
        self._nb_samples = lib.opus_packet_get_nb_samples
        self.rate = rate
        self._max_samples = rate * _MAX_FRAME_MS // 1000

    def decode(
        self, data: bytes | None, samples: int | None = None, *, fec: bool = False
    ) -> av.AudioFrame:
        """Decode one packet; with `data` None, conceal a lost one of `samples` samples
        (at `rate`; a multiple of 2.5 ms); with `fec`, rebuild the lost frame before `data`.
        Raises `OpusError` for a corrupt packet."""
        if data is None or fec:
            size = 0 if data is None else len(data)
            n = min(samples or self.rate // 50, self._max_samples)
        else:
            size = len(data)
            n = _check(self._nb_samples(data, size, self.rate), "packet parse")
            if not 0 < n <= self._max_samples:
                raise OpusError(f"An Opus packet of {n} samples is out of range.", _HINT)
        frame = av.AudioFrame(format="s16", layout="mono", samples=n)
        got = self._decode(self._state, data, size, frame.planes[0].buffer_ptr, n, int(fec))
        _check(got, "concealment" if data is None else "FEC decode" if fec else "decode")
        frame.sample_rate = self.rate
        return frame

    def has_fec(self, data: bytes) -> bool | None:
        """Whether `data` carries in-band FEC for the frame before it (None: this libopus,
        older than 1.5, cannot tell)."""
        probe = getattr(self._lib, "opus_packet_has_lbrr", None)
        return None if probe is None else probe(data, len(data)) > 0

    def __del__(self) -> None:
        state, self._state = getattr(self, "_state", None), None
        if state:
            self._lib.opus_decoder_destroy(state)


def loaded_from() -> str:
    """The file libopus was loaded from (for `doctor` and bug reports)."""
    return os.path.normpath(libopus()._name)
