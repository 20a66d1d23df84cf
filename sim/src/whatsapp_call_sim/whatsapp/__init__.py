"""A wire-faithful simulated WhatsApp network: Meta's Graph Calling API and WATI's Calling API.

Both front doors share one network (users, call permissions, limits, calls); each callee's
behaviour is a `Scenario`, and calls that carry media are answered by a real aiortc peer
(`whatsapp_call_sim.user.SimulatedUser`). See `simulator.py` for the control API.
"""

from .network import GRAPH_ERRORS, SimApiError, SimCall, WhatsAppNetwork
from .scenario import Faults, Limits, Scenario, SimConfig
from .sdp import canned_answer, sdp_problem
from .simulator import WhatsAppSimulator
from .webhooks import Delivery, check_signature, sign, verify_webhook

__all__ = [
    "GRAPH_ERRORS",
    "Delivery",
    "Faults",
    "Limits",
    "Scenario",
    "SimApiError",
    "SimCall",
    "SimConfig",
    "WhatsAppNetwork",
    "WhatsAppSimulator",
    "canned_answer",
    "check_signature",
    "sdp_problem",
    "sign",
    "verify_webhook",
]
