"""Tests for losses.py: hand-computed losses, invariants (Sinkhorn marginals, KoLeo on known points, EMA math),
parity with the official Sinkhorn-Knopp arithmetic, overflow safety, and 1 process vs 2 gloo ranks.

Run: `python -m pytest -q tests/test_losses.py` (CPU, about 10 s; the 2-rank test spawns two processes).
"""
import math
import os
import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from losses import (dino_loss, ibot_loss, ibot_loss_in_chunks, ibot_mask_weights, is_dist, koleo_loss, sinkhorn_knopp,
                    sinkhorn_knopp_bias, softmax_center, update_center)
from runtime import teardown_distributed

# --------------------------------------------------------------------------------------------------------------
# Helpers: plain-Python cross-entropy, and the official Sinkhorn-Knopp arithmetic as the reference
# --------------------------------------------------------------------------------------------------------------


def _cross_entropy(target, logits, temp):
    """-sum_k target[k] log softmax(logits / temp)[k], in plain Python floats (independent of torch)."""
    z = [v / temp for v in logits]
    log_norm = math.log(sum(math.exp(v) for v in z))
    return -sum(p * (v - log_norm) for p, v in zip(target, z))


def official_sinkhorn_knopp(teacher_output, teacher_temp, n_iterations=3):
    """The official DINOv2 algorithm (DINOLoss.sinkhorn_knopp_teacher), one process: the same operations in the
    same order, in linear space. Overflows once teacher_output / teacher_temp exceeds ~88."""
    Q = torch.exp(teacher_output.float() / teacher_temp).t()  # [K, B]
    B, K = Q.shape[1], Q.shape[0]
    Q /= torch.sum(Q)
    for _ in range(n_iterations):
        Q /= torch.sum(Q, dim=1, keepdim=True)
        Q /= K
        Q /= torch.sum(Q, dim=0, keepdim=True)
        Q /= B
    Q *= B
    return Q.t()


# --------------------------------------------------------------------------------------------------------------
# DINO loss
# --------------------------------------------------------------------------------------------------------------


def test_dino_loss_hand_computed():
    # 2 global + 1 local student crop, 2 teacher crops, B = 2 images, K = 3 prototypes.
    student = [[[1.0, 0.0, -1.0], [0.5, 0.2, 0.1]],
               [[0.0, 2.0, 0.0], [-0.3, 0.0, 0.3]],
               [[0.2, 0.2, 0.9], [1.0, -1.0, 0.0]]]
    teacher = [[[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]],
               [[0.3, 0.3, 0.4], [0.5, 0.25, 0.25]]]
    pairs = [(0, 1), (1, 0), (2, 0), (2, 1)]  # (student crop, teacher crop) with different crops
    expected = sum(_cross_entropy(teacher[t][b], student[s][b], 0.1) for s, t in pairs for b in range(2)) / (4 * 2)
    loss = dino_loss(torch.tensor(student), torch.tensor(teacher), student_temp=0.1)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_dino_loss_18_pairs_for_2_global_8_local_crops():
    torch.manual_seed(0)
    S, T, B, K = 10, 2, 4, 16
    student = torch.randn(S, B, K)
    teacher = F.softmax(torch.randn(T, B, K) / 0.05, dim=-1)
    # Cross-entropy of every (student, teacher) pair, averaged over images: [S, T].
    ce = -torch.einsum("tbk,sbk->stb", teacher, F.log_softmax(student / 0.1, dim=-1)).mean(-1)
    different_crops = torch.ones(S, T, dtype=torch.bool)
    different_crops[0, 0] = different_crops[1, 1] = False
    assert different_crops.sum() == 18  # 8 locals x 2 globals + 2 globals x the other global
    torch.testing.assert_close(dino_loss(student, teacher), ce[different_crops].mean())
    # The official code splits the same total into a local term and a global term whose teacher crops are swapped
    # (student global A vs teacher B), each divided by the 18 loss terms; the sum must match ours.
    local = sum(-(t * F.log_softmax(s / 0.1, dim=-1)).sum(-1).mean() for s in student[2:] for t in teacher) / 18
    swapped = torch.cat([teacher[1], teacher[0]])  # [2B, K]
    glob = -(swapped * F.log_softmax(student[:2].flatten(0, 1) / 0.1, dim=-1)).sum(-1).mean() * 2 / 18
    torch.testing.assert_close(dino_loss(student, teacher), local + glob)


def test_dino_loss_gradient_reaches_student_only():
    student = torch.randn(3, 2, 5, requires_grad=True)
    teacher = F.softmax(torch.randn(2, 2, 5), dim=-1)
    dino_loss(student, teacher).backward()
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------------------------
# iBOT loss
# --------------------------------------------------------------------------------------------------------------


def test_ibot_mask_weights():
    masks = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [0, 1, 0, 0]], dtype=torch.bool)  # image 1: nothing masked
    torch.testing.assert_close(ibot_mask_weights(masks), torch.tensor([0.5, 0.5, 1.0]))


def test_ibot_loss_hand_computed_with_an_unmasked_image():
    # 3 images, 4 patches each; image 0 has 2 masked patches, image 1 none, image 2 one. K = 3.
    masks = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 0], [0, 0, 0, 1]], dtype=torch.bool)
    student = [[0.3, -0.2, 1.0], [2.0, 0.0, 0.5], [-1.0, 0.4, 0.4]]  # the M = 3 masked patches, in masks order
    teacher = [[0.2, 0.2, 0.6], [0.9, 0.05, 0.05], [0.1, 0.8, 0.1]]
    ce = [_cross_entropy(t, s, 0.1) for s, t in zip(student, teacher)]
    # image 0: mean of its 2 patches; image 1: contributes 0 but counts; image 2: its only patch. Then / 3 images.
    expected = ((ce[0] + ce[1]) / 2 + 0.0 + ce[2]) / 3
    loss = ibot_loss(torch.tensor(student), torch.tensor(teacher), ibot_mask_weights(masks), n_images=3)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_ibot_loss_equals_dense_per_image_mean():
    # The official dense form (iBOTPatchLoss.forward): per-image mean CE over masked patches, mean over images.
    torch.manual_seed(1)
    B, N, K = 4, 9, 7
    masks = torch.rand(B, N) < 0.4
    masks[2] = False
    student, teacher = torch.randn(B, N, K), F.softmax(torch.randn(B, N, K), dim=-1)
    ce = -(teacher * F.log_softmax(student / 0.1, dim=-1)).sum(-1)  # [B, N]
    dense = ((ce * masks).sum(-1) / masks.sum(-1).clamp(min=1)).mean()
    loss = ibot_loss(student[masks], teacher[masks], ibot_mask_weights(masks), n_images=B)
    torch.testing.assert_close(loss, dense)


# --------------------------------------------------------------------------------------------------------------
# KoLeo
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [3, 6, 8, 50])
def test_koleo_points_on_a_circle(n):
    # n equally spaced unit vectors: every nearest-neighbour distance is the chord 2 sin(pi / n).
    angles = torch.arange(n, dtype=torch.float64) * 2 * math.pi / n
    x = torch.stack([angles.cos(), angles.sin()], dim=1).float() * 3.0  # any radius: rows are L2-normalised
    assert koleo_loss(x).item() == pytest.approx(-math.log(2 * math.sin(math.pi / n)), abs=1e-5)


def test_koleo_uneven_points():
    # e1, e2 and their bisector: each one's nearest neighbour is at chord sqrt(2 - sqrt(2)) (45 degrees).
    x = torch.tensor([[1.0, 0.0, 0.0], [0.0, 5.0, 0.0], [2.0, 2.0, 0.0], [0.0, 0.0, 1.0]])
    # e3's nearest neighbour is at 90 degrees: chord sqrt(2).
    expected = -(3 * math.log(math.sqrt(2 - math.sqrt(2))) + math.log(math.sqrt(2))) / 4
    assert koleo_loss(x).item() == pytest.approx(expected, abs=1e-5)


def test_koleo_antipodal_pair_is_not_its_own_neighbour():
    # Cosine -1 between the two: a diagonal filled with -1 (official) would tie and pick the row itself.
    assert koleo_loss(torch.tensor([[1.0, 0.0], [-1.0, 0.0]])).item() == pytest.approx(-math.log(2), abs=1e-6)


def test_koleo_groups_search_neighbours_inside_each_group():
    # Two groups of two: each vector's neighbour is its group partner, not the closer vector of the other group.
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [0.1, 1.0]])
    chord = 2 * math.sin((math.pi / 2 - 2 * math.atan(0.1)) / 2)  # rows 2, 3: 78.6 degrees apart
    partner = -(2 * math.log(math.sqrt(2)) + 2 * math.log(chord)) / 4  # rows 0, 1: 90 degrees
    assert koleo_loss(x, group_size=2).item() == pytest.approx(partner, abs=1e-5)
    assert koleo_loss(x, group_size=4).item() == pytest.approx(koleo_loss(x).item())  # one group = all rows
    assert koleo_loss(x).item() > partner  # without groups: the 5.7-degree neighbours, a larger loss


def test_koleo_batch_of_one_is_zero_with_a_gradient():
    x = torch.randn(1, 8, requires_grad=True)
    loss = koleo_loss(x)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_koleo_identical_vectors_stay_finite():
    x = torch.ones(4, 8).mul(0.3).requires_grad_()
    loss = koleo_loss(x)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()


# --------------------------------------------------------------------------------------------------------------
# Centering (EMA) and float32 under autocast
# --------------------------------------------------------------------------------------------------------------


def test_update_center_is_the_ema_formula_and_pure():
    torch.manual_seed(2)
    center, teacher_logits = torch.randn(1, 5), torch.randn(6, 5)
    center_before = center.clone()
    new_center = update_center(center, [teacher_logits[:4], teacher_logits[4:]], momentum=0.9)
    torch.testing.assert_close(new_center, 0.9 * center + 0.1 * teacher_logits.mean(dim=0, keepdim=True))
    assert torch.equal(center, center_before)  # no hidden state update: the caller stores the returned center


def test_softmax_center():
    torch.manual_seed(3)
    center, teacher_logits = torch.randn(1, 5), torch.randn(6, 5)
    probs = softmax_center(teacher_logits, center, teacher_temp=0.04)
    torch.testing.assert_close(probs, torch.softmax((teacher_logits - center) / 0.04, dim=-1))
    torch.testing.assert_close(probs.sum(-1), torch.ones(6))


def test_everything_float32_under_bf16_autocast():
    torch.manual_seed(4)
    x = torch.randn(8, 16)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        h = torch.nn.functional.linear(x, torch.randn(16, 16))  # a bf16 activation, as the model would give
        assert h.dtype == torch.bfloat16
        outs = [koleo_loss(h), sinkhorn_knopp(h, 0.04), softmax_center(h, torch.zeros(1, 16), 0.04),
                update_center(torch.zeros(1, 16), [h]), dino_loss(h[None].expand(3, 8, 16), F.softmax(h, -1)[None]),
                ibot_loss(h, F.softmax(h.float(), -1), torch.ones(8), n_images=2)]
    assert all(o.dtype == torch.float32 for o in outs)
    torch.testing.assert_close(outs[0], koleo_loss(h.float()))


# --------------------------------------------------------------------------------------------------------------
# Sinkhorn-Knopp
# --------------------------------------------------------------------------------------------------------------


def test_sinkhorn_marginals_after_enough_iterations():
    torch.manual_seed(5)
    B, K = 32, 64
    probs = sinkhorn_knopp(torch.randn(B, K), teacher_temp=0.1, n_iterations=100)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(B), rtol=0, atol=1e-6)  # each sample sums to 1
    torch.testing.assert_close(probs.mean(dim=0), torch.full((K,), 1 / K), rtol=0, atol=1e-6)  # equipartition


@pytest.mark.parametrize("scale, teacher_temp, n_iterations", [(1.0, 0.04, 3), (0.5, 0.04, 3), (2.0, 0.1, 10),
                                                               (3.0, 0.07, 1)])
def test_sinkhorn_equals_official_where_official_is_finite(scale, teacher_temp, n_iterations):
    torch.manual_seed(6)
    # scale 1.0 at 0.04 is the realistic case: the head's weight-normalised last layer gives cosine-like logits.
    logits = (torch.rand(48, 100) * 2 - 1) * scale
    expected = official_sinkhorn_knopp(logits, teacher_temp, n_iterations)
    assert torch.isfinite(expected).all()
    torch.testing.assert_close(sinkhorn_knopp(logits, teacher_temp, n_iterations), expected, rtol=1e-4, atol=1e-7)


def test_sinkhorn_no_overflow_at_logit_1e4_temp_0_04():
    torch.manual_seed(7)
    logits = torch.randn(16, 32).sign() * 1e4
    logits[3] = -1e4  # a sample far below every other one on every prototype
    assert not torch.isfinite(official_sinkhorn_knopp(logits, 0.04)).all()  # the official version breaks here
    probs = sinkhorn_knopp(logits, teacher_temp=0.04)
    assert torch.isfinite(probs).all()
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(16), rtol=0, atol=1e-6)


def test_sinkhorn_streamed_over_chunks_equals_the_whole_batch():
    torch.manual_seed(9)
    logits = torch.randn(50, 30) * 2
    whole = sinkhorn_knopp(logits, teacher_temp=0.05)
    bias = sinkhorn_knopp_bias([logits[:7], logits[7:8], logits[8:8], logits[8:]], teacher_temp=0.05)
    torch.testing.assert_close(F.softmax(logits / 0.05 + bias, dim=-1), whole, rtol=1e-5, atol=1e-6)


def test_ibot_loss_in_chunks_equals_the_whole_logits_with_gradients():
    torch.manual_seed(10)
    M, K, b = 10, 24, 6
    z = F.normalize(torch.randn(M, b), dim=-1).requires_grad_()
    prototypes = torch.randn(K, b, requires_grad=True)
    teacher, weights = F.softmax(torch.randn(M, K) / 0.1, dim=-1), torch.rand(M)
    whole = ibot_loss(z @ prototypes.t(), teacher, weights, n_images=4)
    grads = torch.autograd.grad(whole, (z, prototypes))
    chunked = ibot_loss_in_chunks(z, prototypes, lambda rows: teacher[rows], weights, 4, chunk_rows=3)
    torch.testing.assert_close(chunked, whole)
    for g, expected in zip(torch.autograd.grad(chunked, (z, prototypes)), grads):
        torch.testing.assert_close(g, expected)
    empty = ibot_loss_in_chunks(z[:0], prototypes, lambda rows: teacher[:0], weights[:0], 4, chunk_rows=3)
    assert empty.item() == 0.0 and empty.requires_grad  # no masked patch: 0, still in the graph (DDP)


def test_sinkhorn_empty_batch():
    assert sinkhorn_knopp(torch.zeros(0, 8), 0.04).shape == (0, 8)


# --------------------------------------------------------------------------------------------------------------
# 2 ranks (gloo, CPU) with part of the batch each == 1 process on the whole batch
# --------------------------------------------------------------------------------------------------------------

SPLITS = [4, 3, 0]  # rows on rank 0 out of 8: half each, uneven (iBOT: masked patches per rank), one empty rank


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_rank_worker(rank, port, logits, center, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=60))
    try:
        assert is_dist()
        results = {}
        for split in SPLITS:
            shard = logits[:split] if rank == 0 else logits[split:]
            results[split] = (sinkhorn_knopp(shard, teacher_temp=0.04), update_center(center, [shard], momentum=0.9))
        points = logits[:, :6]  # 8 vectors, 4 per rank; a group of 8 spans both ranks
        for group in (0, 2, 4, 8):
            x = points[4 * rank:4 * rank + 4].clone().requires_grad_()
            loss = koleo_loss(x, group_size=group)
            loss.backward()
            results[f"koleo{group}"] = (loss.detach(), x.grad)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        teardown_distributed()


def test_two_ranks_equal_one_process(tmp_path):
    torch.manual_seed(8)
    logits, center = torch.randn(8, 40) * 3.0, torch.randn(1, 40)  # |logit| / 0.04 up to ~300: log space needed
    assert not is_dist()
    probs_1, center_1 = sinkhorn_knopp(logits, teacher_temp=0.04), update_center(center, [logits], momentum=0.9)
    mp.spawn(_two_rank_worker, args=(_free_port(), logits, center, str(tmp_path)), nprocs=2, join=True)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for split in SPLITS:
        torch.testing.assert_close(torch.cat([rank0[split][0], rank1[split][0]]), probs_1, rtol=0, atol=1e-6)
        torch.testing.assert_close(rank0[split][1], center_1, rtol=0, atol=1e-6)
        torch.testing.assert_close(rank1[split][1], center_1, rtol=0, atol=1e-6)
    for group in (0, 2, 4, 8):  # the mean over both ranks and its gradient (a rank gets every rank's share)
        x = logits[:, :6].clone().requires_grad_()
        loss = koleo_loss(x, group_size=group)
        loss.backward()
        both = (rank0[f"koleo{group}"][0] + rank1[f"koleo{group}"][0]) / 2
        torch.testing.assert_close(both, loss.detach(), rtol=0, atol=1e-6)
        grad = torch.cat([rank0[f"koleo{group}"][1], rank1[f"koleo{group}"][1]]) / 2
        torch.testing.assert_close(grad, x.grad, rtol=0, atol=1e-6)
