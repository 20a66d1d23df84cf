"""Twilio Network Traversal Service (TURN credentials) for whatsapp-call."""
