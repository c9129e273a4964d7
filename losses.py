"""DINOv2 objectives: DINO (image level), iBOT (patch level), KoLeo, and the two teacher-target recipes.

Plain functions of tensors, no state: the training loop owns the center tensor and calls `update_center`
once per optimizer step, visibly (a center EMA hidden in `loss.forward` fires once per micro-batch).
Everything is computed in float32 whatever the caller's autocast dtype, because exp/log of logits / 0.04
overflow in half precision. Nothing here imports model.py or train.py; `import losses` runs nothing.

Run the tests with `python -m pytest -q tests/test_losses.py` (CPU, includes a 2-process gloo check).

Paper (arXiv 2304.07193) -> function. Notation: p_s = softmax(s / student_temp) (student_temp 0.1), p_t the
teacher target, t the teacher's prototype scores (logits), K prototypes, B samples.
  Sec. 4 image-level objective   L_DINO  = -sum_k p_t[k] log p_s[k], averaged
         over all (student crop, teacher crop) pairs with different crops, and over images -> dino_loss
  Sec. 4 patch-level objective   L_iBOT  = -sum_i p_ti log p_si over masked patches i,
         each image's patches weighted 1 / (#masked in it), / #images    -> ibot_loss, ibot_mask_weights,
                                              in chunks of patches, [M, K] never whole -> ibot_loss_in_chunks
  Sec. 4 KoLeo regularizer       L_koleo = -1/n sum_i log(d_n,i),
         d_n,i = min_{j != i} ||x_i - x_j|| within a group of the batch, x L2-normalised -> koleo_loss
  Sec. 4 Sinkhorn-Knopp centering (from SwAV): 3 alternating normalisations of exp(t / teacher_temp)
         so that each prototype gets 1/K of the batch mass and each sample sums to 1
         -> sinkhorn_knopp_bias (streamed over chunks of the step's logits), sinkhorn_knopp
  DINO centering (official default config; the paper, Table 1, and the released ViT-L/g recipes use S-K):
         p_t = softmax((t - c) / teacher_temp), c <- m c + (1 - m) mean_batch(t), m = 0.9
                                                                                     -> softmax_center, update_center
  Multi-GPU: every sum over the batch is all-reduced, so N ranks equal one process on the global batch
                                                                                     -> is_dist (guards collectives)

Deviations from the official code (github.com/facebookresearch/dinov2, dinov2/loss/):
  - Sinkhorn-Knopp works in log space and keeps only a per-prototype bias. The official version computes
    exp(t / teacher_temp) directly, which is inf once t / teacher_temp > ~88 (|t| > 3.5 at teacher_temp 0.04)
    and then returns NaN targets; ours stays finite for |t| up to 1e4 and equals the official result wherever
    that one is finite (to float32 rounding). Ranks may hold different numbers of samples.
  - koleo_loss searches neighbours within groups of consecutive positions of the global batch, gathered
    across ranks when a group spans them (DINOv3's loss groups); with groups of the per-GPU batch it is the
    official DINOv2 regulariser on any number of GPUs. It returns 0 for fewer than two vectors (the official
    one returns -log(~1e-8) there), and fills the self-similarity with -2, not -1, so an antipodal pair cannot
    pick the row itself as neighbour.
Shape legend: B batch (samples), S student crops, T teacher (global) crops, M masked patches, K prototypes, D width.
"""
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

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


def _logsumexp_across_ranks(lse):
    """Combine every rank's logsumexp lse [K] into the logsumexp over all ranks' terms (-inf where no rank has
    any): the max and the sum of exp(lse - max) are all-reduced, so the result is finite for any finite input."""
    if not is_dist():
        return lse
    top = _all_reduce(lse.clone(), op="max")
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))  # a prototype no rank has a row for
    return top + _all_reduce((lse - top).exp()).log()


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
def update_center(center, logit_chunks, momentum=0.9):
    """EMA of the teacher's batch mean: c <- m c + (1 - m) (1/B) sum_b t_b, with B the global batch size.

    center [1, K], logit_chunks: the teacher logits of the step as chunks [rows, K] (a list, or anything that
    can be iterated) -> new center [1, K] float32 (the input center is not modified). The sum and the count
    are all-reduced, so the mean is over the whole global batch. The training loop calls this once per
    optimizer step, after computing the targets with the old center.
    """
    batch_sum, rows = torch.zeros_like(center, dtype=torch.float32), 0
    for t in logit_chunks:
        batch_sum, rows = batch_sum + t.float().sum(dim=0, keepdim=True), rows + t.shape[0]
    batch_sum = _all_reduce(batch_sum)  # [1, K]
    batch_size = _all_reduce(torch.tensor(float(rows), device=center.device))
    return center.float() * momentum + (batch_sum / batch_size) * (1 - momentum)


@torch.no_grad()
def sinkhorn_knopp_bias(logit_chunks, teacher_temp, n_iterations=3):
    """Sinkhorn-Knopp teacher targets (Sec. 4, SwAV) as one bias per prototype: a [K] such that the targets are
    softmax(t_b / teacher_temp + a) row by row.

    S-K starts from Q = exp(t / teacher_temp)^T [K, B] and alternates n_iterations times
        rows    (prototypes): Q_kb <- Q_kb / (K sum_b' Q_kb')   each prototype gets mass 1/K
        columns (samples):    Q_kb <- Q_kb / (B sum_k' Q_k'b)   each sample gets mass 1/B,
    then returns (B Q)^T. Every step multiplies Q by a per-prototype or a per-sample factor, so
    Q_kb = exp(t_kb / teacher_temp + a_k + c_b), with
        a_k = -logsumexp_b(t_kb / teacher_temp + c_b)   (row step; c = 0 before the first column step)
        c_b = -logsumexp_k(t_kb / teacher_temp + a_k)   (column step: the softmax normaliser of row b),
    up to constants that cancel. Only the final a is needed, and each row step is a sum over all samples: one
    pass over the step's logits per iteration, chunk by chunk (the [B, K] matrix never has to exist whole),
    the sums over samples all-reduced across ranks. The official code computes exp(t / teacher_temp) directly,
    which overflows once |t| / teacher_temp > ~88 and returns NaN; this stays finite for |t| up to 1e4 and
    equals the official result wherever that one is finite.

    logit_chunks: re-iterable (a list, or an object whose __iter__ yields them) chunks [rows, K] of the teacher
    logits of every sample of the step on this rank (rows may differ between ranks, even be 0) -> a [K] fp32.
    """
    bias = None
    for _ in range(n_iterations):
        lse = None  # logsumexp over this rank's samples, per prototype
        for t in logit_chunks:
            t = t.float() / teacher_temp  # [rows, K]
            if bias is not None:  # the column step of the previous iteration
                t = t - torch.logsumexp(t + bias, dim=1, keepdim=True)  # [rows, K]
            chunk = torch.logsumexp(t, dim=0)  # [K] (-inf for 0 rows)
            lse = chunk if lse is None else torch.logaddexp(lse, chunk)
        bias = -_logsumexp_across_ranks(lse)  # [K]
    return bias


def sinkhorn_knopp(teacher_logits, teacher_temp, n_iterations=3):
    """The S-K targets of a whole batch at once: teacher_logits [B, K] -> probs [B, K] float32, rows summing to
    1 (sinkhorn_knopp_bias with the batch as one chunk; B may differ between ranks)."""
    bias = sinkhorn_knopp_bias([teacher_logits], teacher_temp, n_iterations)
    return F.softmax(teacher_logits.float() / teacher_temp + bias, dim=-1)


@dataclass
class PrototypeTargets:
    """The teacher's targets for one head over one optimizer step: row r of micro-batch i is
    softmax(z W^T / temp + bias), computed when asked from the stored l2-normalised bottleneck features z,
    chunk_rows rows at a time, so no [rows, K] tensor of the step exists whole. bias: the Sinkhorn-Knopp
    potential (sinkhorn_knopp_bias), or -center / temp (EMA centering). Iterating gives the logits of every
    row of the step in chunks (for sinkhorn_knopp_bias and update_center)."""
    z: list  # per micro-batch: [rows_i, b] l2-normalised features (2B for DINO, M for iBOT), compute dtype
    prototypes: torch.Tensor  # [K, b] the head's weight-normalised last layer, whole, in the compute dtype
    temp: float
    chunk_rows: int
    bias: torch.Tensor = None  # [K]

    def logits(self, z):
        return (z @ self.prototypes.t()).float()  # [rows,b] @ [b,K] -> [rows,K]

    def __iter__(self):
        return (self.logits(c) for z in self.z for c in z.split(self.chunk_rows))

    def probs(self, i, rows=slice(None)):
        return F.softmax(self.logits(self.z[i][rows]) / self.temp + self.bias, dim=-1)  # [rows,K] fp32


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


def ibot_loss_in_chunks(student_z, prototypes, teacher_probs, mask_weights, n_images, student_temp=0.1,
                        chunk_rows=512):
    """ibot_loss without the [M, K] logits: the student's prototype scores are computed chunk_rows rows at a time
    and recomputed in the backward pass (activation checkpointing per chunk), so memory grows with M x width,
    not M x K. Same value and gradients as ibot_loss(student_z @ prototypes.T, teacher_probs(all rows), ...).

    student_z [M, b]: the student head's l2-normalised bottleneck features at the masked patches; prototypes
    [K, b]: its weight-normalised last layer; teacher_probs(rows: slice) -> [rows, K] the teacher's targets.
    """
    def chunk_loss(z, weight, start):
        rows = slice(start, start + z.shape[0])
        return ibot_loss(z @ weight.t(), teacher_probs(rows), mask_weights[rows], n_images, student_temp)

    total = 0.0
    for start in range(0, max(student_z.shape[0], 1), chunk_rows):  # one (empty) chunk when M = 0: still a graph
        total = total + checkpoint(chunk_loss, student_z[start:start + chunk_rows], prototypes, start,
                                   use_reentrant=False, preserve_rng_state=False)
    return total


def koleo_loss(x, group_size=0, eps=1e-8):
    """KoLeo regularizer (Sablayrolles et al. 2019): -1/B sum_i log(d_i), d_i = min_{j != i} ||x_i - x_j||.

    x [B, D], rows L2-normalised first (student class tokens of one global crop, Sec. 4; the paper applies it
    to each global crop with weight 0.1). Spreads features uniformly over the sphere. Returns a float32 scalar.
    Neighbours are searched inside groups of group_size consecutive positions of one forward pass of all ranks
    (this rank's B rows sit at positions rank * B ... in it; a group that reaches other ranks' rows gathers
    them, with gradients sent home): the official DINOv2 searches each GPU's batch (a group of the per-GPU
    batch), DINOv3 has loss groups of 16. group_size 0: one group of every rank's rows. Averaged by DDP / FSDP
    and over micro-batches, it is the mean over the global batch whatever the layout.
    Safe on degenerate batches: B < 2 has no neighbour and returns 0 (still attached to the graph), and
    identical rows give d = ||eps * 1|| instead of 0, so the value and the gradients stay finite.
    """
    B = x.shape[0]
    everyone, offset = x, 0
    if is_dist() and not (group_size and B % group_size == 0):  # a group reaches other ranks' rows
        import torch.distributed.nn.functional as dist_nn  # all_gather whose backward sends gradients home
        everyone, offset = torch.cat(dist_nn.all_gather(x.contiguous())), dist.get_rank() * B
    if everyone.shape[0] < 2:
        return x.float().sum() * 0.0
    # Outside autocast: a bf16 matmul could pick the wrong neighbour among close ones (official code does the same).
    with torch.autocast(device_type=x.device.type, enabled=False):
        x = F.normalize(x.float(), p=2, dim=-1, eps=eps)  # [B, D]
        everyone = F.normalize(everyone.float(), p=2, dim=-1, eps=eps)  # [R*B, D]
        with torch.no_grad():  # the neighbour search picks indices; the gradient flows through the distance
            similarity = x @ everyone.t()  # [B, D] @ [D, R*B] -> [B, R*B]; max cosine = min distance
            rows = torch.arange(B, device=x.device) + offset  # positions of this rank's rows
            if group_size:  # a row's neighbour must be in its group (cosine >= -1 elsewhere)
                cols = torch.arange(everyone.shape[0], device=x.device)
                similarity[rows[:, None] // group_size != cols[None, :] // group_size] = -2.0
            similarity[torch.arange(B, device=x.device), rows] = -2.0  # a vector is not its own neighbour
            neighbour = similarity.argmax(dim=1)  # [B]
        # eps added to the difference as nn.PairwiseDistance(eps=1e-8) does in the official code (same values)
        distances = (x - everyone[neighbour] + eps).norm(dim=-1)  # [B]
        return -torch.log(distances + eps).mean()
