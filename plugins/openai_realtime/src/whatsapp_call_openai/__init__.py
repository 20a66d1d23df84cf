"""OpenAI Realtime (GA, WebSocket) voice backend for whatsapp-call."""
