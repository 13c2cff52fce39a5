"""Triton kernels for horen_fast, installed as the package horen_fast.kernels."""
