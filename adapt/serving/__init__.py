"""Serving: `dlm-adapt serve` / `adapt.serve`, an OpenAI-compatible HTTP server. `protocol.py` (request bodies, the
mapping to the sampler's options, errors), `batching.py` (the model worker: a bounded queue, batches of requests
that arrived together, per-row streaming), `app.py` (routes, server-sent events, auth, shutdown). Needs the serve
extra (fastapi, uvicorn)."""
