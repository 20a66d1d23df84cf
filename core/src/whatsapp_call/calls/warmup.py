"""One-time work a process does before it takes calls, so that no call pays for it on the
event loop.

Every live call sends a 20 ms audio frame from the one event loop; a callback that holds the
loop longer makes every other call on it send late. `python -m bench.loop_stalls --stacks`
showed where a fresh process's loop stalled: the first call imported httpcore (~35 ms, httpx
loads its transport at the first client), cryptography's OpenSSL backend and serialization
(~35 + ~45 ms, aiortc's first DTLS certificate and context) and numpy.ma (~90 ms, pulled in by
the first `np.percentile` of the bridge's metrics at call end) and built a TLS context for each
HTTP client (~50 ms each: Graph API, Twilio), and every full garbage collection walked the
whole start-up heap (70-170 ms on the 2-core development machine).
"""

from __future__ import annotations

import gc
import logging

log = logging.getLogger("whatsapp_call.calls")

_prepared = False


def prepare_process() -> None:
    """Import and initialise what a first call would, then take the start-up heap out of the
    garbage collector's full passes. Once per process; later calls return at once."""
    global _prepared
    if _prepared:
        return
    _prepared = True
    warm_media_stack()
    freeze_startup_heap()


def warm_media_stack() -> None:
    """Import and initialise the libraries a call uses lazily (tens of ms each, once), and
    build the TLS context the provider plugins' HTTP clients share."""
    from ..providers.http import tls_context

    tls_context()
    try:
        import cryptography.hazmat.primitives.serialization  # noqa: F401 - the first DTLS context
        import httpcore  # noqa: F401 - httpx imports its transport at the first client
        import numpy as np
        from aiortc.rtcdtlstransport import RTCCertificate

        from ..bridge import AudioBridge, PlayoutTrack  # noqa: F401
        from ..media.peer import CallMedia  # noqa: F401
    except ImportError as exc:  # an install without the media stack places no calls
        log.debug("media stack not warmed up: %s", exc)
        return
    np.percentile(np.zeros(2), 50)  # imports numpy.ma (via np.unique)
    RTCCertificate.generateCertificate()  # loads cryptography's OpenSSL backend
    PlayoutTrack().stop()  # codec set-up


def freeze_startup_heap() -> None:
    """`gc.collect()` then `gc.freeze()`: the objects alive after start-up (modules, classes,
    functions: ~130k) are never garbage, yet a full collection walks them all every time enough
    call objects have survived into the oldest generation. Frozen, a full pass walks only what
    calls created (~1.5k objects per live call). Trade-off: a reference cycle among frozen
    objects that becomes garbage later is never collected; start-up objects live as long as
    the process, and the collection just before the freeze leaves no garbage in."""
    gc.collect()
    gc.freeze()
