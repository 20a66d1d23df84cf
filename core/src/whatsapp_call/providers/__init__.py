"""Helpers for provider plugins: the plumbing every WhatsApp provider plugin needs, written once.

The Meta and WATI plugins are built on these, and a third-party provider (360dialog, say)
can be too; each plugin keeps only what is its provider's own: URLs, authentication, payload
shapes, error codes and their hints. See docs/plugins.md, "Helpers for provider plugins".

* `whatsapp_call.providers.http`: one pooled `httpx.AsyncClient` per event loop, a rate
  limiter, and `send` (timeouts, bounded retries with backoff that honour `Retry-After`,
  transport failures as `ProviderError`s); tenacity is imported on first use.
* `whatsapp_call.providers.permissions`: WhatsApp's call-permission object (Graph
  `call_permissions`) as a `PermissionState`, and refused permission requests as results.
* `whatsapp_call.providers.webhooks`: `X-Hub-Signature-256` checks, header lookup, JSON bodies.
* `whatsapp_call.providers.hooks`: `ProviderHooks`, the provider hooks that answer only for
  their own provider and hand the work to the plugin's client and webhook parser.

None of this needs core's `server` extra, and core itself does not import it, so a
remote-only install never loads it.
"""
