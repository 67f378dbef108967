"""``trainer serve``: an OpenAI-compatible chat endpoint for a run, a checkpoint, any local model
directory or a daemon home's live model.

Layer 10, above ``daemon`` (it follows a daemon home's ``current``); only ``cli`` imports it.
Importing this package imports neither torch nor Starlette; the modules do, inside functions.

Modules:

- :mod:`~trainer_core.serve.api`: the request schema (strict attrs/cattrs) and the OpenAI error
  objects;
- :mod:`~trainer_core.serve.engine`: the served model (loaded and swapped), request batching
  through ``generate()``, and the per-row control processor (streaming, stop, sampling);
- :mod:`~trainer_core.serve.app`: the Starlette application and the uvicorn runner.

The dashboard (``monitor.dashboard``) stays on the standard library's ``http.server`` for now,
a decision rather than an oversight: it sits in layer 7 and must run on a core install (the
``serve`` extra is optional), it needs none of what Starlette brings here (async streaming of
many generations, request validation), and a thread per open page is its whole load. The two
share what matters for safety (loopback binding by default, the loopback Host check:
``is_loopback``). Moving it would be worth it if Starlette and uvicorn became core dependencies.
"""
