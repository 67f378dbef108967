"""Layer 5, the model on a device: the model directory, device and precision, loading (local
directories only), the speed plan (``speed``) and its pieces by concern (``attention``: varlen
attention; ``fa4_warmup``; ``fused_loss``; ``tuning``: compile cache, compiled blocks,
allocators), CUDA graphs of the forward and backward pass (``graphs``) and the loss.

May import: config, plugins, data, demo, errors. Used by generation and training alike.
"""
