"""Retrieval backends: each module registers its implementation of the op "retrieve" with
horen_fast.dispatch (torch_ref: "torch", cpp: "cpp", triton: "triton")."""
