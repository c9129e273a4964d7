"""Multi-crop augmentation and iBOT block masks for DINOv2 (arXiv 2304.07193, Sec. 4, App. B), batched in torch.

The whole pipeline runs in the DataLoader's collate function on a batch of images (data.Batches), so it runs in
the worker processes (num_workers > 0) or in the main process (num_workers = 0) with one code path. Only the
random resized crop is per image (images of a folder differ in size); every colour op is one tensor op on the
batch. Randomness is per sample: sample j of the global batch of step t draws its numbers from a generator seeded
by (seed, t, j), whatever rank, micro-batch or worker it lands in. So 1 GPU with accumulation, 2 GPUs and 8 GPUs
train on the same crops, and resuming on another number of GPUs continues the same stream.

Paper -> code
  Sec. 4 / App. B multi-crop augmentation (2 global, 8 local crops) .. MultiCropCollate, augment_crops
  App. B colour jitter, grayscale, blur, solarisation ................ color_jitter, random_grayscale,
                                                                        gaussian_blur, solarize
  Sec. 4 patch-level objective (iBOT): block masking ................. block_mask, mask_plan, sample_masks
  Augmentation as a function of (seed, step, sample) ................. CROP_DRAWS, Draws

Shape legend: B batch, N patches per crop, G / L global / local crop size in pixels.
"""
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F

from losses import ibot_mask_weights

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ---------------------------------------------------------------------------------------------------------------
# Image ops shared with evaluation (data.eval_transform)
# ---------------------------------------------------------------------------------------------------------------
def normalize(img):
    """ImageNet mean/std normalisation of [..., 3, H, W] images in [0,1]."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=img.dtype, device=img.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=img.dtype, device=img.device).view(3, 1, 1)
    return (img - mean) / std


def resize(img, size):
    """Bicubic (antialiased) resize of [3,H,W] or [B,3,H,W] to size=(h, w), clamped back to [0,1]."""
    x = img if img.dim() == 4 else img.unsqueeze(0)
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True).clamp_(0, 1)
    return x if img.dim() == 4 else x[0]


# ---------------------------------------------------------------------------------------------------------------
# Multi-crop augmentation (Sec. 4 and App. B; DINO v1 Sec. 3.1)
# ---------------------------------------------------------------------------------------------------------------
# The uniform numbers one crop of one image draws, by operation, in a fixed order. They are drawn slot-major
# ([sum of the widths, crops] per sample), so a new augmentation added at the end of this table gets new numbers
# and every existing draw stays the same; and no draw depends on what an earlier operation decided.
CROP_DRAWS = {"box": 22, "flip": 1, "jitter": 9, "gray": 1, "blur": 2, "solarize": 1}
DRAWS_PER_CROP = sum(CROP_DRAWS.values())


class Draws:
    """Per-image uniform numbers of one crop, handed out by operation: u [B, DRAWS_PER_CROP] -> take(op) [B, k]."""

    def __init__(self, u):
        self.u = torch.as_tensor(u, dtype=torch.float64)
        ends = np.cumsum(list(CROP_DRAWS.values()))
        self.columns = {op: slice(end - k, end) for (op, k), end in zip(CROP_DRAWS.items(), ends)}

    def take(self, op):
        return self.u[:, self.columns[op]]


def sample_crop_boxes(u, heights, widths, scale, ratio=(3 / 4, 4 / 3), attempts=10):
    """torchvision RandomResizedCrop.get_params for B images at once, from u [B, 2 * attempts + 2] uniforms
    -> int arrays top, left, h, w [B]."""
    u = u.numpy().T  # [2 * attempts + 2, B]
    B = len(heights)
    area = heights * widths * (scale[0] + (scale[1] - scale[0]) * u[:attempts])  # [attempts,B]
    log_ratio = np.log(ratio)
    aspect = np.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[attempts:2 * attempts])
    w, h = np.round(np.sqrt(area * aspect)).astype(int), np.round(np.sqrt(area / aspect)).astype(int)
    ok = (w > 0) & (h > 0) & (w <= widths) & (h <= heights)
    first = ok.argmax(axis=0)  # first valid attempt per image
    h, w = h[first, np.arange(B)], w[first, np.arange(B)]
    fallback = ~ok.any(axis=0)  # torchvision falls back to the whole image, aspect ratio clamped
    side = np.minimum(heights, widths)
    h = np.where(fallback, np.where(heights / widths > ratio[1], side, heights), h)
    w = np.where(fallback, np.where(widths / heights > ratio[1], side, widths), w)
    top = (u[-2] * (heights - h + 1)).astype(int)
    left = (u[-1] * (widths - w + 1)).astype(int)
    return top, left, h, w


def gray(x):
    """ITU-R 601 luma of [B,3,H,W] -> [B,1,H,W] (torchvision rgb_to_grayscale)."""
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def adjust_hue(x, shift):
    """Rotate the hue of [B,3,H,W] by shift [B] (fraction of a turn): RGB -> HSV -> RGB as torchvision does."""
    maxc, minc = x.max(dim=1).values, x.min(dim=1).values  # [B,H,W]
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    r, g, b = ((maxc.unsqueeze(1) - x) / safe.unsqueeze(1)).unbind(1)
    hue = torch.where(maxc == x[:, 0], b - g, torch.where(maxc == x[:, 1], 2.0 + r - b, 4.0 + g - r))
    hue = torch.where(delta > 0, hue / 6.0 % 1.0, torch.zeros_like(hue))
    sat = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), torch.zeros_like(maxc))
    hue = (hue + shift.view(-1, 1, 1)) % 1.0
    k = (torch.tensor([5.0, 3.0, 1.0]).view(1, 3, 1, 1) + hue.unsqueeze(1) * 6.0) % 6.0  # [B,3,H,W]
    return maxc.unsqueeze(1) * (1 - sat.unsqueeze(1) * torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0))


def color_jitter(x, u, p=0.8, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1):
    """RandomApply(ColorJitter(0.4, 0.4, 0.2, 0.1), p=0.8) (App. B) from u [B, 9]: each image gets its own
    factors and its own random order of the four operations, as torchvision draws them per image."""
    u = u.float()
    lows, highs = torch.tensor([1 - brightness, 1 - contrast, 1 - saturation, -hue]), \
        torch.tensor([1 + brightness, 1 + contrast, 1 + saturation, hue])
    factors = (lows + (highs - lows) * u[:, :4]).T  # [4,B]: brightness, contrast, saturation, hue
    order = torch.argsort(u[:, 4:8], dim=1)  # [B,4] a random permutation per image
    applied = u[:, 8] < p
    blend = lambda img, other, f: (f.view(-1, 1, 1, 1) * img + (1 - f.view(-1, 1, 1, 1)) * other).clamp(0, 1)
    ops = [lambda img, f: (img * f.view(-1, 1, 1, 1)).clamp(0, 1),  # brightness
           lambda img, f: blend(img, gray(img).mean(dim=(1, 2, 3), keepdim=True), f),  # contrast
           lambda img, f: blend(img, gray(img), f),  # saturation
           adjust_hue]
    for position in range(4):
        for op_index, op in enumerate(ops):
            idx = (applied & (order[:, position] == op_index)).nonzero().flatten()
            if len(idx):
                x[idx] = op(x[idx], factors[op_index][idx])
    return x


def random_grayscale(x, u, p=0.2):
    """RandomGrayscale(p) from u [B, 1]."""
    idx = (u[:, 0] < p).nonzero().flatten()
    x[idx] = gray(x[idx]).expand(-1, 3, -1, -1)
    return x


def gaussian_blur(x, u, p, sigma=(0.1, 2.0), kernel_size=9):
    """RandomApply(GaussianBlur(kernel 9, sigma ~ U(0.1, 2)), p) with reflect padding, as torchvision; u [B, 2]."""
    idx = (u[:, 0] < p).nonzero().flatten()
    if len(idx) == 0:
        return x
    s = (sigma[0] + (sigma[1] - sigma[0]) * u[idx, 1]).float()  # [B']
    B, C, H, W = len(idx), *x.shape[1:]
    t = torch.linspace(-(kernel_size // 2), kernel_size // 2, kernel_size)
    kernel = torch.softmax(-0.5 * (t / s.view(-1, 1)) ** 2, dim=1)  # [B,9] = normalised Gaussian
    kernel = kernel.repeat_interleave(C, dim=0)  # [B*C,9]: one depthwise filter per image channel
    pad = kernel_size // 2
    y = F.pad(x[idx].reshape(1, B * C, H, W), (pad, pad, pad, pad), mode="reflect")
    y = F.conv2d(y, kernel.view(B * C, 1, kernel_size, 1), groups=B * C)  # vertical pass
    y = F.conv2d(y, kernel.view(B * C, 1, 1, kernel_size), groups=B * C)  # horizontal pass
    x[idx] = y.view(B, C, H, W)
    return x


def solarize(x, u, p=0.2, threshold=128 / 255):
    """RandomSolarize(threshold 128, p) from u [B, 1]."""
    idx = (u[:, 0] < p).nonzero().flatten()
    x[idx] = torch.where(x[idx] >= threshold, 1.0 - x[idx], x[idx])
    return x


def augment_crops(images, u, size, scale, blur_p, solarize_p=0.0, blur_sigma=(0.1, 2.0)):
    """One crop of each image: random resized crop (bicubic) + flip + colour jitter + grayscale + blur
    (+ solarize) + normalise. images: list of [3,H,W] in [0,1]; u [B, DRAWS_PER_CROP] -> [B,3,size,size]."""
    draws = Draws(u)
    heights = np.array([im.shape[1] for im in images])
    widths = np.array([im.shape[2] for im in images])
    top, left, h, w = sample_crop_boxes(draws.take("box"), heights, widths, scale)
    x = torch.cat([resize(im[:, t:t + hh, l:l + ww].unsqueeze(0), (size, size))
                   for im, t, l, hh, ww in zip(images, top, left, h, w)])  # [B,3,size,size]
    flip = draws.take("flip")[:, 0] < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
    x = random_grayscale(color_jitter(x, draws.take("jitter")), draws.take("gray"))
    x = gaussian_blur(x, draws.take("blur"), blur_p, blur_sigma)
    x = solarize(x, draws.take("solarize"), solarize_p)
    return normalize(x)


# ---------------------------------------------------------------------------------------------------------------
# iBOT block masks (Sec. 4), planned over the global batch, and the collate that builds a training batch
# ---------------------------------------------------------------------------------------------------------------
def block_mask(rng, grid, n_target, min_patches=4, min_aspect=0.3, attempts=10):
    """BEiT/iBOT block-wise mask (official MaskingGenerator): add random rectangles of >= 4 patches with aspect
    in [0.3, 1/0.3] until about n_target patches are masked (never more). -> bool [grid, grid]."""
    mask = np.zeros((grid, grid), dtype=bool)
    max_block = int(0.5 * grid * grid)  # official max_num_patches = 0.5 * N
    log_aspect = (np.log(min_aspect), np.log(1 / min_aspect))
    while mask.sum() < n_target:
        budget, added = min(n_target - mask.sum(), max_block), 0
        for _ in range(attempts):
            area = min_patches + (budget - min_patches) * rng.random()  # random.uniform: budget may be < 4
            aspect = np.exp(rng.uniform(*log_aspect))
            h, w = int(round(np.sqrt(area * aspect))), int(round(np.sqrt(area / aspect)))
            if w < grid and h < grid:
                top, left = rng.integers(0, grid - h + 1), rng.integers(0, grid - w + 1)
                new = h * w - mask[top:top + h, left:left + w].sum()
                if 0 < new <= budget:
                    mask[top:top + h, left:left + w] = True
                    added = new
                    break
        if added == 0:
            break
    return mask


def mask_plan(seed, step, n_crops, ratio=(0.1, 0.5), probability=0.5):
    """Which global crops of step `step` are masked and how much (Sec. 4 / iBOT): a fraction `probability` of
    the n_crops crops of the whole global batch, with target ratios spread uniformly over `ratio` (one
    sub-interval of a linspace each), assigned in a random order. -> (rank [n_crops], bounds): crop k is masked
    with a ratio in [bounds[rank[k]], bounds[rank[k] + 1]) when rank[k] < len(bounds) - 1."""
    n_masked = int(n_crops * probability)
    rank = np.random.default_rng([seed, step, 2]).permutation(n_crops)  # 2: a stream apart from the samples'
    return rank, np.linspace(ratio[0], ratio[1], n_masked + 1)


def sample_masks(rngs, crop_ids, plan, grid):
    """Block masks of the crops `crop_ids` (indices into the global batch's crops), each drawn by its image's
    generator in `rngs` -> bool [len(crop_ids), grid*grid] (True = masked, row-major)."""
    rank, bounds = plan
    N, masks = grid * grid, []
    for rng, k in zip(rngs, crop_ids):
        r = rank[k]
        masked = r < len(bounds) - 1
        masks.append(block_mask(rng, grid, int(N * rng.uniform(bounds[r], bounds[r + 1]))) if masked
                     else np.zeros((grid, grid), dtype=bool))
    return torch.from_numpy(np.stack(masks).reshape(len(crop_ids), N))


class MultiCropCollate:
    """Collate (image, label, (step, position)) items into a training batch (Sec. 4, App. B):
        global_crops [2B,3,G,G] (crop-major: first crop of every image, then the second), local_crops [nB,3,L,L],
        masks bool [2B,N], mask_indices [M] (flat indices of the masked patches into [2B*N], computed here on
        the CPU so the model gathers with a known shape: no host sync, traceable), mask_weights [M]
        (1 / #masked of the token's crop, for ibot_loss), labels [B].
    `position` is the sample's index in the global batch of `step` (global_batch images): it seeds the sample's
    augmentation and, with the step, its mask. Blur probabilities 1.0 / 0.1 / 0.5 (global 1, global 2, locals)
    are the paper's; the official code applies 0.0 / 0.9 / 0.5, because its GaussianBlur passes p=1-p to
    RandomApply (github.com/facebookresearch/dinov2 PR #411). Solarisation p=0.2 on the second global crop."""

    def __init__(self, global_size, local_size, n_local, patch_size, global_scale=(0.32, 1.0),
                 local_scale=(0.05, 0.32), mask_ratio=(0.1, 0.5), mask_probability=0.5, blur_sigma=(0.1, 2.0),
                 seed=0, global_batch=None):
        self.global_size, self.local_size, self.n_local, self.patch_size = global_size, local_size, n_local, patch_size
        self.global_scale, self.local_scale, self.blur_sigma = global_scale, local_scale, blur_sigma
        self.mask_ratio, self.mask_probability = mask_ratio, mask_probability
        self.seed, self.global_batch = seed, global_batch

    def __call__(self, items):
        images, labels, keys = zip(*items)
        steps, positions = zip(*keys)
        assert len(set(steps)) == 1, "a micro-batch holds samples of one step"
        global_batch = self.global_batch or len(items)  # None: the batch is the whole global batch (tests)
        rngs = [np.random.default_rng([self.seed, steps[0], j]) for j in positions]  # one stream per sample
        n_crops = 2 + self.n_local
        u = torch.from_numpy(np.stack([rng.random((DRAWS_PER_CROP, n_crops)).T for rng in rngs]))  # [B,crops,36]
        G, L = self.global_size, self.local_size
        crop = partial(augment_crops, images, blur_sigma=self.blur_sigma)
        global_crops = torch.cat([crop(u[:, 0], G, self.global_scale, blur_p=1.0),
                                  crop(u[:, 1], G, self.global_scale, blur_p=0.1, solarize_p=0.2)])
        # All local crops in one batch (crop-major, as global_crops): every op is per sample, so this equals
        # one call per local crop, in n_local times fewer ops.
        local_u = u[:, 2:].transpose(0, 1).reshape(-1, DRAWS_PER_CROP)  # [nB,36]
        local_crops = (augment_crops(images * self.n_local, local_u, L, self.local_scale, blur_p=0.5,
                                     blur_sigma=self.blur_sigma) if self.n_local else torch.empty(0, 3, L, L))
        plan = mask_plan(self.seed, steps[0], 2 * global_batch, self.mask_ratio, self.mask_probability)
        crop_ids = [c * global_batch + j for c in range(2) for j in positions]  # crop-major, as global_crops
        masks = sample_masks(rngs * 2, crop_ids, plan, G // self.patch_size)  # [2B,N]
        return dict(global_crops=global_crops, local_crops=local_crops, masks=masks,
                    mask_indices=masks.flatten().nonzero().flatten(),  # [M]
                    mask_weights=ibot_mask_weights(masks),  # [M]
                    labels=torch.tensor(labels))
