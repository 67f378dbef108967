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
"""
