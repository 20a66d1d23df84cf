pytest_plugins = ["whatsapp_call.testing"]
