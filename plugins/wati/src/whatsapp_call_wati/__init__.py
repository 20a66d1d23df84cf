"""WATI Calling API provider for whatsapp-call."""
