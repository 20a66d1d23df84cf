"""Wire-faithful local simulators: WhatsApp (Meta, WATI), a WhatsApp user, OpenAI Realtime, Twilio TURN."""
