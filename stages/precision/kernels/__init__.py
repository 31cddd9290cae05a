"""Triton kernels for the quantizers (CUDA); the PyTorch reference stays the CPU path and oracle."""
