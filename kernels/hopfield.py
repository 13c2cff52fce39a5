"""Fused Triton retrieval (SPEC section 3): the launch sequence of one call.

``launches`` turns a plan (kernels/plan.py) and the call's tensors into the list of kernel
launches, allocating their buffers on the tensors' device; ``final_cosines`` runs it. The same
list, built from meta tensors, is what bench/gpu_static.py compiles for each GPU target, so the
static check sees exactly the configurations a call would launch.

Per Hopfield step: small path (B <= 4) ``small_step`` (one visit of each key tile), large path
``split`` (q into three bf16 parts, for bf16 keys) + ``large_scores`` + ``large_wsum``; then ``combine`` (split
partials, split over d) and ``update`` (one program per row). After the last step ``bound``
(each row's best lower bound of the final cosines) and ``final`` (exact rescoring of the keys
that can still win). No host synchronization
anywhere: the sequence depends only on the shapes and ``steps``, and is capturable in a CUDA graph.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch

from . import plan as planner
from . import steps as K

# Triton decides at decoration time whether kernels are interpreted; remember which it was.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
BOUND_SLACK = 1e-5  # cosine units: float32 rounding of s, the norms and the row constants
TRITON_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
                torch.int32: "i32", torch.int64: "i64"}


@dataclass
class Launch:
    name: str
    kernel: object          # a triton.JITFunction
    grid: tuple[int, int, int]
    args: dict              # runtime arguments, by name
    constexprs: dict
    num_warps: int
    num_stages: int = field(default=3)

    def run(self) -> None:
        self.kernel[self.grid](**self.args, **self.constexprs, num_warps=self.num_warps,
                               num_stages=self.num_stages)

    def grid_problem(self) -> str | None:
        """Why the grid cannot be launched (a dimension outside CUDA's limits), or None."""
        for i, (n, lim) in enumerate(zip(self.grid, planner.GRID_LIMITS)):
            if not 1 <= n <= lim:
                return (f"{self.name}: grid dimension {i} is {n}, outside [1, {lim}]; the shapes are "
                        f"beyond what the Triton kernels support (N up to 16M keys, B up to 1024)")
        return None

    def signature(self) -> tuple[dict, dict, dict]:
        """(signature, constexprs, attrs) for triton.compile(ASTSource(...)), specialized the way
        the JIT specializes this call (ints equal to 1 become constants; pointers and ints that
        are multiples of 16 carry the divisibility hint; not the kernel's do_not_specialize ints)."""
        sig, const, attrs = {}, dict(self.constexprs), {}
        names = self.kernel.arg_names
        fixed = {p.name for p in self.kernel.params if p.do_not_specialize}
        for name in names:
            if name in const:
                sig[name] = "constexpr"
                continue
            v = self.args[name]
            if isinstance(v, torch.Tensor):
                sig[name] = "*" + TRITON_TYPES[v.dtype]
                attrs[(names.index(name),)] = [["tt.divisibility", 16]]
            elif isinstance(v, bool) or not isinstance(v, (int, float)):
                raise TypeError(f"launch {self.name}: argument {name} has unsupported type {type(v).__name__}")
            elif isinstance(v, int):
                if name in fixed:
                    sig[name] = "i32" if -2**31 <= v < 2**31 else "i64"
                    continue
                if v == 1:
                    sig[name] = "constexpr"
                    const[name] = 1
                    continue
                sig[name] = "i32" if -2**31 <= v < 2**31 else "i64"
                if v % 16 == 0:
                    attrs[(names.index(name),)] = [["tt.divisibility", 16]]
            else:
                sig[name] = "fp32"
        return sig, const, attrs


def _grid(name: str, *dims: int) -> tuple[int, int, int]:
    return tuple(dims) + (1,) * (3 - len(dims))


def launches(q: torch.Tensor, valid: torch.Tensor, keys: torch.Tensor, *, beta: float, alpha: float,
             steps: int, threshold: float, eps: float, plan: planner.Plan, counts: torch.Tensor | None = None):
    """(launch list, c): running the launches in order leaves in c [B, N] float32 the exact final
    cosine of every key that can be the row's match and -inf elsewhere (first maximal index of a
    row = the match under the tie rule). ``q`` [B, D] float32 unit rows (zero where not ``valid``),
    not modified; ``counts`` (int64 [4], zeroed) collects loaded key elements (kernels/steps.py)."""
    B, D = q.shape
    N = keys.shape[0]
    dev = q.device
    p = plan
    bl2e = float(beta) * math.log2(math.e)
    cnt = counts if counts is not None else torch.zeros(4, dtype=torch.int64, device=dev)
    count = counts is not None
    q = q.contiguous().clone()
    s = torch.empty(B, N, device=dev, dtype=torch.float32)
    kk = torch.empty(N, device=dev, dtype=torch.float32)
    b_pad = -(-B // 4) * 4  # rows of maxes start 16-byte aligned
    maxes = torch.full((steps + 1, b_pad), float("-inf"), device=dev, dtype=torch.float32)[:, :B]
    running = valid.to(torch.int32).contiguous() if steps else torch.zeros(B, dtype=torch.int32, device=dev)
    valid_i = valid.to(torch.int32).contiguous()
    rowp = torch.ones(3, B, device=dev, dtype=torch.float32)
    y = torch.empty(B, D, device=dev, dtype=torch.float32) if steps else None
    nsplit = p.splits if p.path == "small" else p.wsum_splits
    part = torch.empty(nsplit, B, D, device=dev, dtype=torch.float32) if steps else None
    mpart = torch.empty(nsplit, B, device=dev, dtype=torch.float32) if (steps and p.path == "small") else None
    key_bf16 = keys.dtype == torch.bfloat16
    # the bf16 parts of q for the large path's scores pass (a placeholder for other keys)
    qp = torch.empty(3 if key_bf16 else 1, B, D if key_bf16 else 1, device=dev, dtype=torch.bfloat16)
    out = []
    common = dict(num_warps=p.num_warps, num_stages=p.num_stages)
    for t in range(max(steps, 1)):
        last = t == max(steps, 1) - 1
        if p.path == "small":
            out.append(Launch("small_step", K.small_step_kernel, _grid("small_step", p.splits), dict(
                q_ptr=q, k_ptr=keys, part_ptr=part if steps else s, mpart_ptr=mpart if steps else kk,
                s_ptr=s, kk_ptr=kk, cnt_ptr=cnt, B=B, N=N, D=D, stride_k=keys.stride(0), stride_s=N,
                per_split=p.per_split, beta_log2e=bl2e), dict(
                BLOCK_B=p.block_b, BLOCK_N=p.block_n, BLOCK_D=p.block_d, ONE_CHUNK=p.one_chunk,
                WSUM=steps > 0, LAST=last, COUNT=count), **common))
        else:
            mx = maxes[t]
            if key_bf16:
                out.append(Launch("split", K.split_kernel, _grid("split", -(-(B * D) // 1024)),
                                  dict(q_ptr=q, qp_ptr=qp, n=B * D), dict(BLOCK=1024), num_warps=4, num_stages=1))
            out.append(Launch("large_scores", K.large_scores_kernel, _grid("large_scores", p.splits, p.n_qblocks),
                              dict(q_ptr=q, qp_ptr=qp, k_ptr=keys, s_ptr=s, mx_ptr=mx, kk_ptr=kk, cnt_ptr=cnt,
                                   B=B, N=N, D=D, stride_k=keys.stride(0), stride_s=N, per_split=p.per_split),
                              dict(BLOCK_B=p.block_b, BLOCK_N=p.block_n, BLOCK_D=p.block_d, KEY_BF16=key_bf16,
                                   EMULATE=INTERPRETED, LAST=last, COUNT=count), **common))
            if steps:
                out.append(Launch("large_wsum", K.large_wsum_kernel,
                                  _grid("large_wsum", p.wsum_splits * p.wsum_dchunks, p.n_qblocks),
                                  dict(k_ptr=keys, s_ptr=s, mx_ptr=mx, part_ptr=part, cnt_ptr=cnt, B=B, N=N, D=D,
                                       stride_k=keys.stride(0), stride_s=N, per_split=p.wsum_per_split,
                                       n_dchunks=p.wsum_dchunks, beta_log2e=bl2e),
                                  dict(BLOCK_B=p.block_b, BLOCK_N=p.block_n, BLOCK_D=p.wsum_block_d,
                                       KEY_BF16=key_bf16, EMULATE=INTERPRETED, COUNT=count), **common))
        if not steps:
            break
        small = p.path == "small"
        out.append(Launch("combine", K.combine_kernel, _grid("combine", -(-D // p.combine_block_d), B),
                          dict(part_ptr=part, mpart_ptr=mpart if small else maxes[t], y_ptr=y, B=B, D=D,
                               NSPLIT=nsplit, beta_log2e=bl2e),
                          dict(BLOCK_D=p.combine_block_d, SCALED=small), num_warps=4, num_stages=1))
        out.append(Launch("update", K.update_kernel, _grid("update", B),
                          dict(q_ptr=q, y_ptr=y, run_ptr=running, rowp_ptr=rowp, B=B, D=D, alpha=float(alpha),
                               eps=float(eps)), dict(BLOCK_D=p.update_block_d), num_warps=4, num_stages=1))
    best = maxes[steps]
    fb, fn = p.final_block_b, p.final_block_n
    bounds = dict(s_ptr=s, kk_ptr=kk, rowp_ptr=rowp, run_ptr=running, valid_ptr=valid_i, best_ptr=best)
    out.append(Launch("bound", K.bound_kernel, _grid("bound", -(-N // fn), -(-B // fb)),
                      dict(**bounds, B=B, N=N, stride_s=N, score_error=p.score_error, slack=BOUND_SLACK),
                      dict(BLOCK_B=fb, BLOCK_N=fn), num_warps=4, num_stages=1))
    out.append(Launch("final", K.final_kernel, _grid("final", -(-N // fn), -(-B // fb)),
                      dict(q_ptr=q, k_ptr=keys, **bounds, cnt_ptr=cnt, B=B, N=N, D=D, stride_k=keys.stride(0),
                           stride_s=N, threshold=float(threshold), score_error=p.score_error, slack=BOUND_SLACK),
                      dict(BLOCK_B=fb, BLOCK_N=fn, BLOCK_D=p.final_block_d, COUNT=count),
                      num_warps=4, num_stages=p.num_stages))
    return out, s


def final_cosines(q: torch.Tensor, valid: torch.Tensor, keys: torch.Tensor, *, beta: float, alpha: float,
                  steps: int, threshold: float, eps: float, plan: planner.Plan | None = None,
                  counts: torch.Tensor | None = None) -> torch.Tensor:
    """Run one fused retrieval; returns c [B, N] (see ``launches``). ``keys`` [N, D] float32,
    bfloat16 or float16 with unit stride in d."""
    if plan is None:
        plan = planner.plan(q.shape[0], keys.shape[0], q.shape[1], keys.dtype, planner.target_for(q.device))
    seq, c = launches(q, valid, keys, beta=beta, alpha=alpha, steps=steps, threshold=threshold, eps=eps,
                      plan=plan, counts=counts)
    for launch in seq:
        problem = launch.grid_problem()
        if problem:
            raise ValueError(problem)
    for launch in seq:
        launch.run()
    return c
