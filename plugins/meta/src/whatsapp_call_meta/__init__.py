"""WhatsApp Cloud API (Meta Graph API) provider for whatsapp-call."""
