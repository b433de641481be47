"""`cirkd`: cross-image relational distillation (Yang et al., "Cross-Image Relational Knowledge Distillation for
Semantic Segmentation", CVPR 2022).

Three terms on the feature before the classifier (default --position decoder; the code's `s_outputs[-1]` /
`t_outputs[-1]`, train_cirkd.py:313-318). n(x) is L2 normalisation over channels, tau = --cirkd-tau (0.1,
the code's --contrast-temperature, train_cirkd.py:81), T = --cirkd-kd-tau (1, --contrast-kd-temperature, :80).

Mini-batch pixel-to-pixel (losses/cirkd_mini_batch.py:58-83, weight lambda_mb = 1, train_cirkd.py:84). With
f = n(F) [B, C, N] (N = h*w, every pixel, ignore-labelled ones included) for each network separately (the
student's and the teacher's channel counts may differ: no projection), for every ordered image pair (i, j)
the rows of the [N, N] similarity map of image i's pixels to image j's are distributions over image j's pixels:
    A_ij[p, q] = f_i[:, p] . f_j[:, q] / tau
    L_mb = 1/(B^2 N) sum_{i,j} sum_p KL(softmax(A^t_ij[p]) || softmax(A^s_ij[p]))
(F.kl_div 'batchmean' per pair divides by the N rows, then the sum over pairs by B^2; no T^2 factor).
Computed as one broadcast matmul [B, 1, N, C] @ [1, B, C, N] -> [B, B, N, N], not the code's B x B loop.

Memory-based terms (losses/cirkd_memory.py:121-177, weights lambda_p = lambda_r = 0.1, train_cirkd.py:85-86).
The student's feature goes through a trainable projection head P = [1x1 conv C_s->C_t, BN, ReLU, 1x1 conv
C_t->C_t] (cirkd_memory.py:20-25; BatchNorm2d here, SyncBatchNorm in the code), s = n(P(F_s)), t = n(F_t).
Labels go to feature resolution by nearest neighbour. Two queues of teacher embeddings per class are buffers:
pixel Q_p [K, M_p, C_t] (M_p = 20000) and region Q_r [K, M_r, C_t] (M_r = 2000) (train_cirkd.py:74-75),
initialised to n(randn). Each forward first enqueues (under no_grad) the teacher embeddings of the whole
global batch (all ranks, all_gather), then samples n_p = 4096 // K + 1 pixel and n_r = 1024 // K + 1 region
slots (the same slots for every class; train_cirkd.py:237-238, the sizes 4096 / 1024 at :76-77) and over
the valid (non-ignored) pixels v:
    z_p(x) = x . Q_p[k, slots_p]^T / tau over all K*n_p entries      (likewise z_r over K*n_r entries)
    L_p = T^2 / |v| sum_{v} KL(softmax(z_p(t_v)/T) || softmax(z_p(s_v)/T))   (L_r: the same with z_r)
(`contrast_sim_kd`, F.kl_div 'batchmean' over the valid pixels; 0 when there is none, as the code's skip).

Enqueue rule (`_dequeue_and_enqueue`, cirkd_memory.py:74-111), image by image of the gathered batch, class by
class present in it (labels in [0, K), not ignore):
    region: Q_r[k, ptr_r[k]] = n(mean of t over the image's pixels of class k); ptr_r[k] = (ptr_r[k]+1) % M_r
    pixel:  m = min(#pixels of class k, 16) pixels drawn uniformly without replacement, written n(t) at
            slots [ptr, ptr+m) and ptr += m, or, when ptr + m >= M_p, at the last m slots [M_p-m, M_p), ptr = 0.
Deviation: the code draws `this_feat[:, perm[:K]]` (cirkd_memory.py:102) with perm = randperm(#pixels of
class k), i.e. the first pixels of the image in random order whatever their class (an indexing slip:
`idxs[perm[:K]]` was meant, as the paper's per-class memory says); here the m pixels are drawn among the pixels
of class k.
The draw is vectorised (a uniform key per pixel, one stable integer sort by (class, key) per image) and
seeded: a generator seeded with (a seed drawn from the global RNG at construction, identical on every rank) +
the number of forwards so far (a buffer, so a resume continues the same stream). With the gathered batch and the same
stream, every rank writes the same entries: the queues stay identical across ranks with no broadcast. No host
sync: the loop is over the gathered images (B * world size), each step a few tensor ops over all K classes.

Costs (arithmetic from the shapes, not measured on a GPU). L_mb's [B, B, N, N] maps grow with the square of
the per-process batch and of N: at the recipe's 2 images per process and 512x1024 crops (N = 64 * 128 = 8192)
each fp32 map is 2 * 2 * 8192^2 * 4 B = 1.07 GB, and the student's and the teacher's maps with their
softmaxes are at least four of them at once (over 4 GB); 8 images per process would be 16x that. The queues are
K * (M_p + M_r) * C_t * 4 B: 19 * 22000 * 256 * 4 B = 428 MB at the recipe's DeepLabV3 decoder (C_t = 256),
twice that for a 512-wide one. They are buffers, so every checkpoint carries them (a resume needs them to
continue exactly).
"""
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import kernels
from engine.methods.base import Method, labels_at
from engine.settings import at_least, positive, setting

PIXEL_UPDATE = 16  # pixels enqueued per class and image: the code's pixel_update_freq (cirkd_memory.py:30)


@dataclass
class CIRKDSettings:
    cirkd_minibatch_weight: float = setting(1.0, "cirkd: lambda of the mini-batch pixel-to-pixel term L_mb "
                                                 "(--lambda-minibatch-pixel, train_cirkd.py:84)", check=at_least(0))
    cirkd_pixel_weight: float = setting(0.1, "cirkd: lambda of the memory pixel-to-pixel term L_p "
                                             "(--lambda-memory-pixel, train_cirkd.py:85)", check=at_least(0))
    cirkd_region_weight: float = setting(0.1, "cirkd: lambda of the memory pixel-to-region term L_r "
                                              "(--lambda-memory-region, train_cirkd.py:86)", check=at_least(0))
    cirkd_pixel_memory: int = setting(20000, "cirkd: teacher pixel embeddings kept per class, M_p "
                                             "(--pixel-memory-size, train_cirkd.py:74)",
                                      check=at_least(PIXEL_UPDATE))
    cirkd_region_memory: int = setting(2000, "cirkd: teacher region embeddings kept per class, M_r "
                                             "(--region-memory-size, train_cirkd.py:75)", check=at_least(1))
    cirkd_pixel_contrast: int = setting(4096, "cirkd: pixel contrast size; n_p = this // K + 1 slots per class "
                                              "(--pixel-contrast-size, train_cirkd.py:77, 238)", check=at_least(1))
    cirkd_region_contrast: int = setting(1024, "cirkd: region contrast size; n_r = this // K + 1 slots per class "
                                               "(--region-contrast-size, train_cirkd.py:76, 237)", check=at_least(1))
    cirkd_tau: float = setting(0.1, "cirkd: temperature tau dividing every cosine similarity "
                                    "(--contrast-temperature, train_cirkd.py:81)", check=positive)
    cirkd_kd_tau: float = setting(1.0, "cirkd: KD temperature T of the memory terms, times T^2 "
                                       "(--contrast-kd-temperature, train_cirkd.py:80)", check=positive)


def minibatch_pixel_kl(fs, ft, tau):
    """L_mb (module docstring): fs [B, C_s, h, w], ft [B, C_t, h, w] -> fp32 scalar.

    One broadcast matmul per network gives every pair's [N, N] map: [B, 1, N, C] @ [1, B, C, N] -> [B, B, N, N].
    """
    b = fs.shape[0]
    with torch.autocast(fs.device.type, enabled=False):
        s = F.normalize(fs.float().flatten(2), dim=1)  # [B, C_s, N]
        log_s = torch.matmul(s.transpose(1, 2)[:, None], s[None]).div(tau).log_softmax(-1)  # [B, B, N, N]
        with torch.no_grad():
            t = F.normalize(ft.float().flatten(2), dim=1)  # [B, C_t, N]
            log_t = torch.matmul(t.transpose(1, 2)[:, None], t[None]).div(tau).log_softmax(-1)
        kl = F.kl_div(log_s, log_t, reduction="sum", log_target=True)
    return kl / (b * b * s.shape[-1])


def memory_kl(s, t, valid, contrast, tau, kd_tau):
    """L_p or L_r (module docstring). s, t: [P, D] unit embeddings of the student (projected) and teacher; valid:
    [P] bool; contrast: [M, D] queue entries. Mean over the valid pixels of the KL of the similarity
    distributions, times kd_tau^2; 0 when no pixel is valid. fp32 scalar."""
    log_s = (s @ contrast.T).div(tau * kd_tau).log_softmax(-1)  # [P, M]
    with torch.no_grad():
        log_t = (t @ contrast.T).div(tau * kd_tau).log_softmax(-1)
    kl = F.kl_div(log_s, log_t, reduction="none", log_target=True).sum(1)  # [P]
    return (kl * valid).sum() / valid.sum().clamp_min(1) * kd_tau ** 2


def gather_all(x):
    """Concatenate x along dim 0 over every rank (a single process: x itself). No gradient."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


class CIRKD(Method):
    settings = CIRKDSettings
    positioned = True
    default_position = "decoder"

    def __init__(self, cfg, student_channels, teacher_channels, num_classes, ignore_index=255):
        super().__init__(cfg, student_channels, teacher_channels, num_classes, ignore_index)
        c_s, c_t = student_channels[self.position], teacher_channels[self.position]
        self.projector = nn.Sequential(nn.Conv2d(c_s, c_t, 1, bias=False), nn.BatchNorm2d(c_t), nn.ReLU(inplace=True),
                                       nn.Conv2d(c_t, c_t, 1, bias=False))
        k = num_classes
        # the global RNG is seeded alike on every rank before the methods are built: identical queues and seed
        self.register_buffer("pixel_queue", F.normalize(torch.randn(k, cfg.cirkd_pixel_memory, c_t), dim=2))
        self.register_buffer("pixel_ptr", torch.zeros(k, dtype=torch.long))
        self.register_buffer("region_queue", F.normalize(torch.randn(k, cfg.cirkd_region_memory, c_t), dim=2))
        self.register_buffer("region_ptr", torch.zeros(k, dtype=torch.long))
        self.register_buffer("forwards", torch.zeros((), dtype=torch.long))
        self.seed = int(torch.randint(0, 2 ** 31, (1,), device="cpu"))  # the CPU generator whatever the default device
        self._forwards = 0  # host copy of `forwards`: seeding the draws from it needs no sync

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._forwards = int(self.forwards)  # one sync, at load time only

    def generator(self, device):
        """The stream of this forward's draws: the same on every rank, continued exactly by a resume."""
        g = torch.Generator(device=device)
        g.manual_seed(self.seed + self._forwards)
        self._forwards += 1
        self.forwards += 1
        return g

    @torch.no_grad()
    def enqueue(self, t, labels, g):
        """Enqueue the teacher embeddings of the global batch (module docstring). t: [B, D, h, w] unit teacher
        embeddings (fp32); labels: [B, h, w] at feature resolution; g: the forward's generator."""
        t, labels = gather_all(t), gather_all(labels)  # [G, D, h, w], [G, h, w]
        k, m_p = self.pixel_queue.shape[:2]
        m_r = self.region_queue.shape[1]
        n_img, d = t.shape[:2]
        means, counts = kernels.masked_avg_pool(t, labels, k, self.ignore_index)  # [G, K, D], [G, K]
        regions = F.normalize(means, dim=2)
        counts = counts.long()
        # m pixels per (image, class), uniformly without replacement: sort by (class, uniform key)
        y = labels.reshape(n_img, -1).long()  # [G, N]
        valid = (y >= 0) & (y < k) & (y != self.ignore_index)
        cls = torch.where(valid, y, k)
        keys = torch.rand(y.shape, generator=g, device=y.device)  # [G, N] in [0, 1)
        sort_key = cls * 2 ** 24 + (keys * 2 ** 24).long()  # 24-bit keys within class; ties: by index
        order = torch.sort(sort_key, dim=1, stable=True).indices  # [G, N]
        starts = counts.cumsum(1) - counts  # [G, K]: first sorted position of each class
        r = torch.arange(PIXEL_UPDATE, device=y.device)  # [F]
        pos = (starts[..., None] + r).clamp_max(y.shape[1] - 1).reshape(n_img, -1)  # [G, K*F]
        pix = order.gather(1, pos)  # [G, K*F] pixel indices
        feats = F.normalize(t.reshape(n_img, d, -1).gather(2, pix[:, None].expand(-1, d, -1)), dim=1)  # [G, D, K*F]
        feats = feats.transpose(1, 2).reshape(n_img, k, PIXEL_UPDATE, d)  # [G, K, F, D]
        take = counts.clamp_max(PIXEL_UPDATE)  # [G, K]
        rows = torch.arange(k, device=y.device)
        for i in range(n_img):  # sequential as the code: each image's writes follow the pointers the last one moved
            # region: one slot per present class; an absent class rewrites its slot's own value
            ptr = self.region_ptr
            present = counts[i] > 0
            old = self.region_queue[rows, ptr]  # [K, D]
            self.region_queue[rows, ptr] = torch.where(present[:, None], regions[i], old)
            self.region_ptr.copy_(torch.where(present, (ptr + 1) % m_r, ptr))
            # pixel: m slots from ptr, or the last m when they would reach the end. Entries beyond m repeat the
            # first one (same slot, same value), an absent class rewrites its slot's own value: writes to one
            # slot always carry one value, so the scatter's order does not matter
            ptr, m = self.pixel_ptr, take[i]
            wrap = ptr + m >= m_p
            start = torch.where(wrap, m_p - m, ptr)  # [K]
            ok = r < m[:, None]  # [K, F]
            first = torch.where((m > 0)[:, None], feats[i, :, 0], self.pixel_queue[rows, start])  # [K, D]
            slots = torch.where(ok, start[:, None] + r, start[:, None])  # [K, F]
            values = torch.where(ok[..., None], feats[i], first[:, None])  # [K, F, D]
            self.pixel_queue.index_put_((rows[:, None].expand_as(slots), slots), values)
            self.pixel_ptr.copy_(torch.where(wrap, 0, ptr + m))

    def forward(self, s, t, batch):
        cfg = self.cfg
        fs, ft = self.features(s), self.features(t)
        if ft.shape[-2:] != fs.shape[-2:]:  # the code resizes labels to the student's size for both
            ft = F.interpolate(ft.float(), size=fs.shape[-2:], mode="bilinear", align_corners=False)
        l_mb = minibatch_pixel_kl(fs, ft, cfg.cirkd_tau)
        labels = labels_at(batch["label"], fs.shape[-2:])  # [B, h, w]
        g = self.generator(fs.device)
        with torch.autocast(fs.device.type, enabled=False):
            t_emb = F.normalize(ft.detach().float(), dim=1)  # [B, D, h, w]
            s_emb = F.normalize(self.projector(fs.float()), dim=1)
            self.enqueue(t_emb, labels, g)
            k, m_p, d = self.pixel_queue.shape
            n_p = min(cfg.cirkd_pixel_contrast // k + 1, m_p)
            n_r = min(cfg.cirkd_region_contrast // k + 1, self.region_queue.shape[1])
            pixel_slots = torch.randperm(m_p, generator=g, device=fs.device)[:n_p]
            region_slots = torch.randperm(self.region_queue.shape[1], generator=g, device=fs.device)[:n_r]
            pixel_contrast = self.pixel_queue[:, pixel_slots].reshape(-1, d)  # [K*n_p, D]
            region_contrast = self.region_queue[:, region_slots].reshape(-1, d)  # [K*n_r, D]
            s_rows = s_emb.permute(0, 2, 3, 1).reshape(-1, d)  # [B*h*w, D]
            t_rows = t_emb.permute(0, 2, 3, 1).reshape(-1, d)
            y = labels.reshape(-1)
            valid = (y >= 0) & (y < k) & (y != self.ignore_index)
            l_p = memory_kl(s_rows, t_rows, valid, pixel_contrast, cfg.cirkd_tau, cfg.cirkd_kd_tau)
            l_r = memory_kl(s_rows, t_rows, valid, region_contrast, cfg.cirkd_tau, cfg.cirkd_kd_tau)
        return {"minibatch_pixel": cfg.cirkd_minibatch_weight * l_mb,
                "memory_pixel": cfg.cirkd_pixel_weight * l_p,
                "memory_region": cfg.cirkd_region_weight * l_r}
