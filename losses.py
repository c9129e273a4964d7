"""DINOv2 objectives: DINO (image level), iBOT (patch level), KoLeo, and the two teacher-target recipes.

Plain functions of tensors, no state: the training loop owns the center tensor and calls `update_center`
once per optimizer step, visibly (a center EMA hidden in `loss.forward` fires once per micro-batch).
Everything is computed in float32 whatever the caller's autocast dtype, because exp/log of logits / 0.04
overflow in half precision. Nothing here imports model.py or train.py; `import losses` runs nothing.

Run the tests with `python -m pytest -q tests/test_losses.py` (CPU, ~6 s, includes a 2-process gloo check).

Paper (arXiv 2304.07193) -> function. Notation: p_s = softmax(s / student_temp) (student_temp 0.1), p_t the
teacher target, t the teacher's prototype scores (logits), K prototypes, B samples.
  Sec. 4 image-level objective   L_DINO  = -sum_k p_t[k] log p_s[k], averaged
         over all (student crop, teacher crop) pairs with different crops, and over images -> dino_loss
  Sec. 4 patch-level objective   L_iBOT  = -sum_i p_ti log p_si over masked patches i,
         each image's patches weighted 1 / (#masked in it), / #images                -> ibot_loss, ibot_mask_weights
  Sec. 4 KoLeo regularizer       L_koleo = -1/n sum_i log(d_n,i),
         d_n,i = min_{j != i} ||x_i - x_j||, x L2-normalised                          -> koleo_loss
  Sec. 4 Sinkhorn-Knopp centering (from SwAV): 3 alternating normalisations of exp(t / teacher_temp)
         so that each prototype gets 1/K of the batch mass and each sample sums to 1 -> sinkhorn_knopp
  DINO centering (official default config; the paper, Table 1, and the released ViT-L/g recipes use S-K):
         p_t = softmax((t - c) / teacher_temp), c <- m c + (1 - m) mean_batch(t), m = 0.9
                                                                                     -> softmax_center, update_center
  Multi-GPU: every sum over the batch is all-reduced, so N ranks equal one process on the global batch
                                                                                     -> is_dist (guards collectives)

Deviations from the official code (github.com/facebookresearch/dinov2, dinov2/loss/):
  - sinkhorn_knopp works in log space. The official version computes exp(t / teacher_temp) directly, which is
    inf once t / teacher_temp > ~88 (|t| > 3.5 at teacher_temp 0.04) and then returns NaN targets; ours stays
    finite for |t| up to 1e4 and equals the official result wherever that one is finite (to float32 rounding).
  - sinkhorn_knopp and update_center all-reduce the sample count instead of assuming every rank holds the
    same number of samples (the official DINO loss multiplies by world_size); identical when counts are equal.
  - koleo_loss(all_ranks=True), as train.py calls it, searches each vector's nearest neighbour among the vectors
    of every rank (all-gathered with gradients, as DINOv3 does); the official DINOv2 code searches its own rank.
  - koleo_loss returns 0 for a batch of fewer than two vectors (the official one returns -log(~1e-8) there), and
    fills the self-similarity with -2, not -1, so an antipodal pair cannot pick the row itself as neighbour.
Shape legend: B batch (samples), S student crops, T teacher (global) crops, M masked patches, K prototypes, D width.
"""
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

# --------------------------------------------------------------------------------------------------------------
# Distributed helpers: every collective is guarded, so one process with no process group just works.
# --------------------------------------------------------------------------------------------------------------


def is_dist():
    """True when torch.distributed is available and a process group is initialised (the guard for collectives)."""
    return dist.is_available() and dist.is_initialized()


def _all_reduce(x, op="sum"):
    """All-reduce `x` in place across ranks (no-op without a process group) and return it."""
    if is_dist():
        dist.all_reduce(x, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return x


def _logsumexp_all_ranks(x, dim):
    """log(sum(exp(x))) over `dim` (int or tuple) when the reduced dimension(s) may be split across ranks.

    Each rank takes its local logsumexp (max-subtracted, finite for any finite x; -inf when it holds no sample,
    e.g. an iBOT batch without masked patches); the ranks' partial results are then combined the same way,
    with the max and the sum of the small reduced tensor all-reduced: the one-process value up to float rounding.
    """
    lse = torch.logsumexp(x, dim=dim, keepdim=True)
    if is_dist():
        lse_max = _all_reduce(lse.clone(), op="max")
        lse = lse_max + _all_reduce((lse - lse_max).exp()).log()
    return lse


# --------------------------------------------------------------------------------------------------------------
# Teacher targets (Sec. 4): EMA centering (DINO) or Sinkhorn-Knopp (SwAV). Both are no_grad and stateless.
# --------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def softmax_center(teacher_logits, center, teacher_temp):
    """Centered, sharpened teacher target: p_t = softmax((t - c) / teacher_temp) over the K prototypes.

    teacher_logits [B, K], center [1, K] -> probs [B, K] float32. Centering stops one prototype from dominating,
    the low teacher_temp (0.04-0.07) stops the target from becoming uniform (DINO, Caron et al. 2021, Sec. 3.1).
    """
    return F.softmax((teacher_logits.float() - center.float()) / teacher_temp, dim=-1)


@torch.no_grad()
def update_center(center, teacher_logits, momentum=0.9):
    """EMA of the teacher's batch mean: c <- m c + (1 - m) (1/B) sum_b t_b, with B the global batch size.

    center [1, K], teacher_logits [B, K] -> new center [1, K] float32 (the input center is not modified).
    With a process group, the sum and the count are all-reduced, so the mean is over the whole global batch.
    The training loop calls this once per optimizer step, after computing the targets with the old center.
    """
    teacher_logits = teacher_logits.float()
    batch_sum = _all_reduce(teacher_logits.sum(dim=0, keepdim=True))  # [1, K]
    batch_size = _all_reduce(torch.tensor(float(teacher_logits.shape[0]), device=teacher_logits.device))
    return center.float() * momentum + (batch_sum / batch_size) * (1 - momentum)


@torch.no_grad()
def sinkhorn_knopp(teacher_logits, teacher_temp, n_iterations=3):
    """Sinkhorn-Knopp teacher targets (Sec. 4, SwAV): an equipartitioned soft assignment of samples to prototypes.

    Start from Q = exp(t / teacher_temp)^T [K, B], normalised to total mass 1, then repeat n_iterations times:
        rows    (prototypes): Q_kb <- Q_kb / (K sum_b' Q_kb')   each prototype gets mass 1/K
        columns (samples):    Q_kb <- Q_kb / (B sum_k' Q_k'b)   each sample gets mass 1/B
    and return (B Q)^T [B, K], whose rows (samples) sum to 1. Sums over b span the global batch (all-reduced
    across ranks, as is B), so N ranks give exactly what one process gives on the concatenated batch.
    Same steps as the official code, but on log Q, so exp never overflows (see the module docstring).

    teacher_logits [B, K] -> probs [B, K] float32. B may differ between ranks (iBOT: masked patches per rank).
    """
    log_q = (teacher_logits.float() / teacher_temp).t()  # [K, B]: K-by-B as in the SwAV paper's notation
    n_prototypes = log_q.shape[0]
    n_samples = _all_reduce(torch.tensor(float(log_q.shape[1]), device=log_q.device))  # global B
    log_q = log_q - _logsumexp_all_ranks(log_q, dim=(0, 1))  # total mass 1 (no effect after the first row step)
    for _ in range(n_iterations):
        log_q = log_q - (_logsumexp_all_ranks(log_q, dim=1) + math.log(n_prototypes))  # [K, 1]: rows span ranks
        log_q = log_q - (torch.logsumexp(log_q, dim=0, keepdim=True) + n_samples.log())  # [1, B]: columns are local
    return (log_q + n_samples.log()).exp().t()  # [B, K]


# --------------------------------------------------------------------------------------------------------------
# Objectives (Sec. 4): cross-entropies between teacher targets and student predictions, and KoLeo.
# --------------------------------------------------------------------------------------------------------------


def dino_loss(student_logits, teacher_probs, student_temp=0.1):
    """Image-level DINO loss: mean over pairs (s, t), s != t, and images b of -sum_k p_t[k] log p_s[k].

    student_logits [S, B, K]: all student crops; the first T are the global crops, in the teacher's order.
    teacher_probs  [T, B, K]: teacher targets (softmax_center or sinkhorn_knopp) for the T global crops.
    p_s = softmax(s / student_temp). A student crop is never matched with the teacher's view of the same crop:
    with 2 global and 8 local crops that leaves 8*2 + 2*1 = 18 pairs. Returns a float32 scalar.
    Equal to the official DINOv2 total (local + global terms, each divided by the 18 loss terms).
    """
    student_log_probs = F.log_softmax(student_logits.float() / student_temp, dim=-1)  # [S, B, K]
    teacher_probs = teacher_probs.float()
    total, n_pairs = 0.0, 0
    for s in range(student_log_probs.shape[0]):
        for t in range(teacher_probs.shape[0]):
            if s == t:  # same global crop seen by both networks: nothing to predict
                continue
            cross_entropy = -(teacher_probs[t] * student_log_probs[s]).sum(dim=-1)  # [B]
            total = total + cross_entropy.mean()
            n_pairs += 1
    if n_pairs == 0:
        raise ValueError("dino_loss needs at least one pair of different crops (got 1 student and 1 teacher crop)")
    return total / n_pairs


def ibot_mask_weights(masks):
    """Per-masked-patch weights 1 / (#masked patches of its image), in the order of `tokens[masks]`.

    masks bool [B, N] (True = masked, row-major patches) -> weights [M] float32, M = masks.sum().
    """
    n_masked = masks.sum(dim=-1, keepdim=True).clamp(min=1).float()  # [B, 1]
    return (1.0 / n_masked).expand(masks.shape)[masks]  # [B, N] -> [M]


def ibot_loss(student_patch_logits, teacher_patch_probs, mask_weights, n_images, student_temp=0.1):
    """Patch-level iBOT loss: (1 / n_images) sum_m w_m (-sum_k p_t,m[k] log p_s,m[k]) over masked patches m.

    student_patch_logits [M, K]: the student's logits at the masked patches of its global crops.
    teacher_patch_probs  [M, K]: the teacher's targets at the same patches (the teacher sees the unmasked image).
    mask_weights [M]: 1 / (#masked patches in that patch's image), see ibot_mask_weights, so each image counts
    once whatever its mask ratio. n_images: number of global-crop images, including those with no masked patch.
    Returns a float32 scalar (0 when M = 0).
    """
    student_log_probs = F.log_softmax(student_patch_logits.float() / student_temp, dim=-1)  # [M, K]
    cross_entropy = -(teacher_patch_probs.float() * student_log_probs).sum(dim=-1)  # [M]
    return (cross_entropy * mask_weights.float()).sum() / n_images


def koleo_loss(x, eps=1e-8, all_ranks=False):
    """KoLeo regularizer (Sablayrolles et al. 2019): -1/B sum_i log(d_i), d_i = min_{j != i} ||x_i - x_j||.

    x [B, D], rows L2-normalised first (student class tokens of one global crop, Sec. 4; the paper applies it
    to each global crop with weight 0.1). Spreads features uniformly over the sphere. Returns a float32 scalar.
    all_ranks: the neighbours are searched among the rows of every rank (all-gathered with gradients, as DINOv3
    does), so N ranks of B rows equal one process of N*B rows once DDP/FSDP average the gradients; without it
    (the official DINOv2 code) each rank only sees its own rows.
    Safe on degenerate batches: B < 2 has no neighbour and returns 0 (still attached to the graph), and
    identical rows give d = ||eps * 1|| instead of 0, so the value and the gradients stay finite.
    """
    everyone, offset = x, 0
    if all_ranks and is_dist():
        import torch.distributed.nn.functional as dist_nn  # all_gather whose backward sends gradients home
        everyone, offset = torch.cat(dist_nn.all_gather(x.contiguous())), dist.get_rank() * x.shape[0]
    if everyone.shape[0] < 2:
        return x.float().sum() * 0.0
    # Outside autocast: a bf16 matmul could pick the wrong neighbour among close ones (official code does the same).
    with torch.autocast(device_type=x.device.type, enabled=False):
        x = F.normalize(x.float(), p=2, dim=-1, eps=eps)  # [B, D]
        everyone = F.normalize(everyone.float(), p=2, dim=-1, eps=eps)  # [R*B, D]
        with torch.no_grad():  # the neighbour search picks indices; the gradient flows through the distance
            similarity = x @ everyone.t()  # [B, D] @ [D, R*B] -> [B, R*B]; max cosine = min distance
            rows = torch.arange(x.shape[0], device=x.device)
            similarity[rows, rows + offset] = -2.0  # a vector is not its own neighbour (cosine >= -1 elsewhere)
            neighbour = similarity.argmax(dim=1)  # [B]
        # eps added to the difference as nn.PairwiseDistance(eps=1e-8) does in the official code (same values)
        distances = (x - everyone[neighbour] + eps).norm(dim=-1)  # [B]
        return -torch.log(distances + eps).mean()
