"""Triton kernels for horen_fast, installed as the package horen_fast.kernels (setup.py maps
kernels/ to it; editable installs too): ``plan`` (tile sizes, splits and the traffic model, per GPU
target), ``steps`` (the @triton.jit kernels), ``hopfield`` (the launch sequence of one retrieval).
horen_fast/backends/triton.py registers them with horen_fast.dispatch."""
