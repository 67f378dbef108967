"""Layer 7, monitoring: run events and the listeners that watch a run (console, status.json,
metrics.jsonl, previews.jsonl).

May import: config, plugins, errors, files. Never imports train or cli: the recipe emits events,
listeners react.
"""
