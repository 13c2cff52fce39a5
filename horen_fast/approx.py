"""Approximate retrieval over a prefilter's candidates: the candidates, the sketch tail, safe mode.

Built on the Hopfield ops of horen_fast/hopfield.py: each step's softmax sums are the partials
(m, z, y) of the row's exact candidate keys, plus (with the sketch) one more partial for every
other key, and ``damped_update`` takes the step; ``best_match`` picks the winner under the one
tie rule (the lowest storage position).

The candidates alone are a poor approximation: the exact softmax runs over every key, and with
anisotropic keys at beta = 20 the keys outside the top k carry most of its mass; an IVF index also
misses some of the keys nearest the query. So by default (``tail="sketch"``) the prefilter keeps
a low-rank sketch of every key (horen_fast/sketch.py) and, in one pass over it per step:
- adds each row's ``sketch_candidates`` keys of highest Cauchy-Schwarz bound to its exact set
  (the keys the index may have missed; for batches of fewer than 8 queries, where the pass is
  bound by memory and these are nearly free: a batch relies on the rescue below instead);
- models the softmax mass of every other key (log weight L and weighted mean key mu: the partial
  (m=L, z=1, y=mu)) and combines it with the exact candidates' partial;
- after the step, rescores exactly every key whose bound can still beat the best final cosine or
  pass the threshold (``rescue``, on by default), so the final decision is exact for the refined
  query. The scan also bounds every key left outside the exact set (its ``sketch_candidates``-th
  bound); carried through the steps like safe mode's bound below, it lets most rows skip this
  second pass.
``tail="none"`` is the candidates alone. Either way it is an approximation: measure it as
decisions (matched, index) that agree with exact retrieval (bench/bench_prefilter.py), not as
recall. The rescue's cost grows with the number of keys whose bound reaches the floor: with a low
threshold in a dense codebook it rescores thousands of keys a row (bench/RESULTS.md).

``safe=True`` (which takes ``tail="none"`` and ``index="flat"``) certifies each row or answers it
exactly. The exact search makes the k-th candidate's cosine s_k a bound on every key outside the
candidates. A row is kept when, at every step t, the softmax mass outside the candidates, relative
to the largest term, is at most ``(N - k) * exp(beta * (u_t - m_t)) <= tolerance`` (u_t: a bound on
every outside cosine with q_t, m_t: the best candidate cosine with q_t), and when the final winner
is certain: no outside key can beat the best candidate's final cosine, or none can pass the
threshold while no candidate does. The bound is carried through each step with
q_t = ((1 - alpha) q_{t-1} + alpha r_t) / n_t and r_t . k <= 1, so u_t = ((1 - alpha) u_{t-1} +
alpha) / n_t. Other rows go to exact retrieval. A row whose candidates cover the whole codebook is
exact by construction. At realistic sizes the bound is rarely small, so safe mode mostly falls
back: that is the cost of the guarantee.

The search is host code: this path copies the queries to the host and synchronizes, unlike exact
retrieval. Use exact retrieval where a host sync is not allowed (CUDA graphs).
"""
from __future__ import annotations

import numpy as np
import torch

from .faiss_index import host_f32
from .hopfield import best_match, combine_partials, damped_update, normalize_queries, select_match, \
    softmax_partials
from .retrieval import RetrievalParams, RetrievalResult, compute_dtype
from .sketch import pair_dots

__all__ = ["prefiltered_retrieve", "NEAR_KEYS_BELOW"]

# batches from this size skip the sketch's near keys: their scan is compute-bound there, and one
# rescue pass after the step costs less than testing every key against every row's near-key heap
NEAR_KEYS_BELOW = 8
_BIG = torch.iinfo(torch.long).max


def _carry(bound: torch.Tensor, running: torch.Tensor, q: torch.Tensor, y: torch.Tensor,
           alpha: float) -> torch.Tensor:
    """A bound u on the cosines of keys outside the exact set, from q to the next step's query:
    ((1 - alpha) u + alpha) / ||(1 - alpha) q + alpha r|| (r . k <= 1), where the row moves."""
    r = torch.nn.functional.normalize(y, dim=1, eps=1e-30)
    norm = ((1 - alpha) * q + alpha * r).norm(dim=1).clamp(min=1e-30)
    return torch.where(running, ((1 - alpha) * bound + alpha) / norm, bound)


def prefiltered_retrieve(queries: torch.Tensor, keys: torch.Tensor, slot_of_id: torch.Tensor,
                         prefilter, params: RetrievalParams, exact) -> RetrievalResult:
    """HoReN retrieval over each row's candidates, plus the sketch's model of the rest when the
    prefilter (a horen_fast.prefilter.Prefilter) has one. Returns slots (positions in ``keys``)
    in ``index``, like ``retrieve``; ``exact(queries_subset)`` answers rows safe mode rejects."""
    n = keys.shape[0]
    dtype = compute_dtype(queries, keys)
    q, valid = normalize_queries(queries, dtype)
    index, sketch, safe = prefilter.index, prefilter.sketch, prefilter.config.safe
    ids, labels = index.search_labels(host_f32(q), prefilter.candidates)
    labels_t = torch.from_numpy(labels).to(keys.device)
    first_tail = beyond = None
    if sketch is not None:  # the tail at q_0, and the keys the index may have missed
        near = min(prefilter.sketch_candidates, n) if q.shape[0] < NEAR_KEYS_BELOW else 0
        *first_tail, more, beyond = sketch.scan(q, params.beta, labels_t, near)
        more = more.cpu().numpy()
        ids, labels = np.concatenate([ids, index.ids_of(more)], 1), np.concatenate([labels, more], 1)
        labels_t = torch.from_numpy(labels).to(keys.device)
    k = ids.shape[1]
    ids_t = torch.from_numpy(ids).to(keys.device)
    slots = torch.where(ids_t >= 0, slot_of_id[ids_t.clamp(min=0)], torch.full_like(ids_t, -1))
    present = slots >= 0
    kc = keys[slots.clamp(min=0).reshape(-1)].to(dtype).reshape(q.shape[0], k, -1)  # [B, k, d]
    neg = torch.tensor(float("-inf"), dtype=dtype, device=q.device)

    def cos(vec):  # [B, k] cosines of each row's candidates, -inf where absent
        return torch.where(present, torch.bmm(kc, vec[:, :, None])[:, :, 0], neg)

    covered = present.sum(1) >= n            # the candidates are the whole codebook
    certain = valid.clone()
    inf = torch.tensor(float("inf"), dtype=dtype, device=q.device)
    # s_k, the k-th candidate's cosine, bounds every outside cosine (exact search, all k present)
    bound = torch.where(present.all(dim=1), cos(q).min(dim=1).values, inf) if safe else None
    outside = float(n - k)
    running = valid.clone()
    for step_no in range(params.steps):
        m, z, y = softmax_partials(q, kc, params.beta, present)
        if safe:
            top = m / params.beta  # the best candidate cosine
            certain &= outside * torch.exp(params.beta * (bound - top)) <= prefilter.config.tolerance
        if sketch is not None:  # the keys outside the exact set, from the sketch: one more partial
            tail_log, tail_mean = (first_tail if step_no == 0 else sketch.scan(q, params.beta, labels_t)[:2])
            m, z, y = combine_partials([m, tail_log], [z, torch.ones_like(z)], [y, tail_mean.to(dtype)])
        q_next, running = damped_update(q, y, running, params.alpha, params.eps)
        if safe:
            bound = _carry(bound, running, q, y, params.alpha)
        if beyond is not None:  # keys outside the exact set had q_0 . k <= beyond: carry it the same way
            beyond = _carry(beyond.to(dtype), running, q, y, params.alpha)
        q = q_next
    best, slot = best_match(cos(q), slots)
    if sketch is not None and prefilter.config.rescue:
        best, slot = _rescue(q, valid, best, slot, keys, slot_of_id, prefilter, labels_t, params.threshold,
                             beyond)
    res = select_match(best, slot, valid, params.threshold)
    index_out, score, matched = res.index, res.score, res.matched
    if safe:
        certain &= (bound < best) | ((bound <= params.threshold) & (best <= params.threshold))
        redo = valid & ~(certain | covered)
        if bool(redo.any()):  # host sync: the rows to answer exactly
            rows = redo.nonzero()[:, 0]
            sub = exact(queries[rows])
            index_out, score, matched = index_out.clone(), score.clone(), matched.clone()
            index_out[rows], score[rows], matched[rows] = sub.index, sub.score.to(score.dtype), sub.matched
    return RetrievalResult(index=index_out, score=score, matched=matched)


def _rescue(q, valid, best, slot, keys, slot_of_id, prefilter, labels, threshold, beyond):
    """Score exactly the keys outside the exact set whose bound says they might beat the best
    final cosine (and the threshold); return the updated (best cosine, slot) per row, the slot
    under the tie rule (lowest position). Rows whose carried bound ``beyond`` already rules every
    outside key out skip the pass."""
    sketch = prefilter.sketch
    floor = torch.where(valid, torch.clamp(best, min=threshold), torch.full_like(best, float("inf")))
    need = (beyond + sketch.slack > floor).nonzero()[:, 0]
    if need.numel() == 0:  # host sync: which rows need the pass
        return best, slot
    sub_rows, lab = sketch.rescue(q[need], floor[need], labels[need])
    rows = need[sub_rows.to(need.device)]
    if rows.numel() == 0:  # host sync: how many keys to rescore
        return best, slot
    ids = torch.from_numpy(prefilter.index.ids_of(lab.cpu().numpy())).to(keys.device)
    s = slot_of_id[ids]
    val = pair_dots(keys, q, rows, s)
    new_best = best.scatter_reduce(0, rows, val.to(best.dtype), "amax")
    slot = torch.where(slot >= 0, slot, torch.full_like(slot, _BIG))
    kept = torch.where(new_best == best, slot, torch.full_like(slot, _BIG))  # a candidate still ties
    at_best = torch.where(val.to(best.dtype) == new_best[rows], s, torch.full_like(s, _BIG))
    out = torch.minimum(kept, torch.full_like(slot, _BIG).scatter_reduce(0, rows, at_best, "amin"))
    return new_best, torch.where(out == _BIG, torch.full_like(out, -1), out)
