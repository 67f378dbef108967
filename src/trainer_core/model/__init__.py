"""Layer 5, the model on a device: the model directory, device and precision, loading (local
directories only), the speed plan (attention kernel, compiled blocks, fused loss) and the loss.

May import: config, plugins, data, demo, errors. Used by generation and training alike.
"""
