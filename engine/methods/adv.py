"""`adv`: the holistic adversarial term of structured KD (Liu et al., "Structured Knowledge Distillation for
Semantic Segmentation", CVPR 2019, sec. 3.3), as CIRKD and the CWD code train it alongside their own terms.

A discriminator D (the SAGAN-style critic below) scores a whole score map (logits [B, K, h, w]) with a map
of scalars [B, 1, h', w']; the teacher's maps are "real", the student's "fake". With E = the mean over the
batch and over D's output positions:

    student   L_adv = lambda_adv * (-E[D(z_s)])                                       (CriterionAdvForG)
    D, hinge  L_D   = lambda_d * (E[relu(1 - D(z_t))] + E[relu(1 + D(z_s))])          (CriterionAdv 'hinge')
    D, wgan-gp L_D  = lambda_d * (-E[D(z_t)] + E[D(z_s)] + lambda_gp * GP)            (CriterionAdv 'wgan-gp'
              GP    = mean_b (||grad_x D(x)_b||_2 - 1)^2,  x = a z_t + (1 - a) z_s,    + CriterionAdditionalGP)
                      a ~ U(0, 1) per image, grad_x of sum(D(x)), ||.||_2 over the image's [K, h, w]
z_s and z_t enter L_D detached. Sources: winycg/CIRKD losses/adv.py, utils/sagan.py and train_kd.py (hinge,
no gradient penalty, D = Discriminator(preprocess_GAN_mode=1, K) on s_outputs[0] / t_outputs[0], the logits
at feature resolution; Adam(lr 4e-4, betas (0.9, 0.99)) with a constant lr; scripts/train_kd/*.sh
--lambda-adv 0.001 --lambda-d 0.1); irfanICMLL/TorchDistiller SemSeg-distill utils/criterion.py,
networks/sagan_models.py, networks/kd_model.py and options.py (the same D and terms, wgan-gp by default,
lambda_gp 10 inside lambda_d, lr-d 4e-4). Defaults here: CIRKD's (hinge, lambda_adv 0.001, lambda_d 0.1,
Adam 4e-4 / (0.9, 0.99)); --adv-loss wgan-gp gives TorchDistiller's, with lambda_gp 10.

Gradient routing under the trainer's one backward of the summed terms (engine/step.py): both codes backward
the student's loss, step the student, then zero D's gradients and backward L_D alone, so D learns from L_D
only. Here L_adv runs D through torch.func.functional_call with D's parameters detached: the student gets
its gradient, D none. L_D sees detached maps: D gets its gradient, the student none. The gradient penalty's
inner torch.autograd.grad (create_graph=True) differentiates with respect to x only, so it writes no .grad;
the outer backward then reaches D's parameters through it. D is the method's separately trained part,
stepped by its own Adam after the student's SGD, its state saved in checkpoints. D runs in float32 outside
autocast (a double backward in bf16 is not worth the risk for a network this small).

D's input must be at least 64 pixels a side (four stride-2 4x4 convs, then a valid 4x4 conv): the references
meet it with 512-pixel crops (logits 64x128, 65x65). Smaller maps are upsampled bilinearly, aspect kept, until
their shorter side is 64, a step neither reference needed. One deliberate difference from the references'
SpectralNorm: they rebind u.data and v.data at each of D's calls, so the backward of an earlier call reads
the u, v of a later one; here each call's sigma is differentiated with its own u, v.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from engine.methods.base import Method
from engine.settings import at_least, one_of, positive, setting

LOSSES = ("hinge", "wgan-gp")
MIN_SIZE = 64  # the smallest side D can score: 64 -> 32 -> 16 -> 8 -> 4 -> (valid 4x4 conv) 1


@dataclass
class AdvSettings:
    adv_weight: float = setting(0.001, "adv: lambda_adv, weight of the student's adversarial term -mean D(z_s) "
                                       "(CIRKD's --lambda-adv)", check=at_least(0))
    adv_d_weight: float = setting(0.1, "adv: lambda_d, weight of the discriminator's loss (CIRKD's --lambda-d)",
                                  check=at_least(0))
    adv_loss: str = setting("hinge", "adv: the discriminator's loss: hinge (CIRKD) or wgan-gp (the CWD code, "
                                     "TorchDistiller, with a gradient penalty)", check=one_of(*LOSSES))
    adv_gp_weight: float = setting(10.0, "adv: lambda_gp, weight of the gradient penalty inside lambda_d "
                                         "(wgan-gp only)", check=at_least(0))
    adv_d_lr: float = setting(4e-4, "adv: Adam learning rate of the discriminator (betas 0.9, 0.99; constant)",
                              check=positive)


def l2normalize(v, eps=1e-12):
    return v / (v.norm() + eps)


class SNConv2d(nn.Module):
    """Conv2d with its weight divided by sigma, its largest singular value estimated by one power iteration per
    call (Miyato et al., ICLR 2018; the references' SpectralNorm): v = n(W^T u), u = n(W v), sigma = u^T W v,
    with W the weight as a [C_out, C_in*k*k] matrix and n(x) = x / (||x|| + 1e-12). u, v are buffers (no
    gradient); sigma's gradient reaches W."""

    def __init__(self, c_in, c_out, kernel, stride, padding):
        super().__init__()
        conv = nn.Conv2d(c_in, c_out, kernel, stride, padding)
        self.weight, self.bias = conv.weight, conv.bias  # the references' weight_bar and bias
        self.stride, self.padding = stride, padding
        self.register_buffer("u", l2normalize(torch.randn(c_out)))
        self.register_buffer("v", l2normalize(torch.randn(c_in * kernel * kernel)))

    def forward(self, x):
        w = self.weight.flatten(1)  # [C_out, C_in*k*k]
        with torch.no_grad():
            v = l2normalize(torch.mv(w.t(), self.u))
            u = l2normalize(torch.mv(w, v))
            self.u.copy_(u)
            self.v.copy_(v)
        sigma = torch.dot(u, torch.mv(w, v))  # u, v: this call's own, never modified afterwards
        return F.conv2d(x, self.weight / sigma, self.bias, self.stride, self.padding)


class SelfAttention(nn.Module):
    """SAGAN self-attention (Zhang et al., ICML 2019): x + gamma * V softmax(Q^T K)^T, gamma starting at 0.
    [B, C, h, w] -> [B, C, h, w]; Q, K have C // 8 channels."""

    def __init__(self, c):
        super().__init__()
        self.query = nn.Conv2d(c, c // 8, 1)
        self.key = nn.Conv2d(c, c // 8, 1)
        self.value = nn.Conv2d(c, c, 1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        b, c, h, w = x.shape
        q = self.query(x).flatten(2).transpose(1, 2)  # [B, hw, C/8]
        k = self.key(x).flatten(2)  # [B, C/8, hw]
        attn = torch.softmax(torch.bmm(q, k), dim=-1)  # [B, hw (query), hw (key)]
        out = torch.bmm(self.value(x).flatten(2), attn.transpose(1, 2))  # [B, C, hw]
        return self.gamma * out.view(b, c, h, w) + x


class Discriminator(nn.Module):
    """The references' D (CIRKD utils/sagan.py, TorchDistiller networks/sagan_models.py, preprocess_GAN_mode 1):
    BatchNorm over the K input channels, four spectral-normalised 4x4 stride-2 convs (width, 2, 4, 8 x width
    channels, LeakyReLU 0.1), self-attention after the third and the fourth, a plain valid 4x4 conv to one
    channel. [B, K, H, W] -> [B, 1, H/16 - 3, W/16 - 3] (H, W >= 64)."""

    def __init__(self, num_classes, width=64):
        super().__init__()
        self.preprocess = nn.BatchNorm2d(num_classes)
        dims = [num_classes, width, 2 * width, 4 * width, 8 * width]
        self.convs = nn.ModuleList(SNConv2d(a, b, 4, 2, 1) for a, b in zip(dims, dims[1:]))
        self.attn1 = SelfAttention(4 * width)
        self.attn2 = SelfAttention(8 * width)
        self.last = nn.Conv2d(8 * width, 1, 4)

    def forward(self, x):
        x = self.preprocess(x)
        for i, conv in enumerate(self.convs):
            x = F.leaky_relu(conv(x), 0.1)
            if i == 2:
                x = self.attn1(x)
        return self.last(self.attn2(x))


def d_input(logits, dtype=torch.float32):
    """Logits [B, K, h, w] in D's dtype, upsampled bilinearly (aspect kept) when the shorter side is under
    MIN_SIZE."""
    z = logits.to(dtype)
    h, w = z.shape[-2:]
    if min(h, w) >= MIN_SIZE:
        return z
    f = MIN_SIZE / min(h, w)
    return F.interpolate(z, size=(max(MIN_SIZE, math.ceil(h * f)), max(MIN_SIZE, math.ceil(w * f))),
                         mode="bilinear", align_corners=False)


def discriminator_loss(d_real, d_fake, kind):
    """CriterionAdv: hinge E[relu(1 - D(z_t))] + E[relu(1 + D(z_s))]; wgan-gp -E[D(z_t)] + E[D(z_s)]."""
    if kind == "hinge":
        return F.relu(1 - d_real).mean() + F.relu(1 + d_fake).mean()
    return d_fake.mean() - d_real.mean()


def gradient_penalty(d, real, fake):
    """CriterionAdditionalGP without its lambda_gp: mean_b (||grad_x sum D(x)||_2 over image b - 1)^2 at
    x = a real + (1 - a) fake, a ~ U(0, 1) per image. real, fake: detached [B, K, H, W]. The graph of the
    inner gradient is kept (create_graph) so that a later backward reaches D's parameters through it."""
    alpha = torch.rand(real.shape[0], 1, 1, 1, device=real.device, dtype=real.dtype)
    with torch.enable_grad():
        x = (alpha * real + (1 - alpha) * fake).requires_grad_(True)
        out = d(x)
        (grad,) = torch.autograd.grad(out, x, torch.ones_like(out), create_graph=True)
    return ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()


class Adversarial(Method):
    """Terms `adv` (L_adv: the student's) and `disc` (L_D: the discriminator's, whose gradient reaches D
    alone). See the module docstring."""

    settings = AdvSettings

    def __init__(self, cfg, student_channels, teacher_channels, num_classes, ignore_index=255):
        super().__init__(cfg, student_channels, teacher_channels, num_classes, ignore_index)
        self.discriminator = Discriminator(num_classes)

    def separately_trained(self):
        return [self.discriminator]

    def optimizers(self):
        return [torch.optim.Adam(self.discriminator.parameters(), lr=self.cfg.adv_d_lr, betas=(0.9, 0.99))]

    def forward(self, s, t, batch):
        cfg, d = self.cfg, self.discriminator
        dtype = d.last.weight.dtype  # float32 (float64 in tests)
        z_s, z_t = d_input(s.logits, dtype), d_input(t.logits, dtype).detach()  # [B, K, H', W']
        with torch.autocast(z_s.device.type, enabled=False):
            # the references' call order (the power iterations advance u, v at each call): G, fake, real, GP
            frozen = {name: p.detach() for name, p in d.named_parameters()}
            l_adv = -functional_call(d, frozen, (z_s,)).mean()
            fake = z_s.detach()
            d_fake = d(fake)  # [B, 1, h', w']
            d_real = d(z_t)
            l_d = discriminator_loss(d_real, d_fake, cfg.adv_loss)
            if cfg.adv_loss == "wgan-gp":
                l_d = l_d + cfg.adv_gp_weight * gradient_penalty(d, z_t, fake)
        return {"adv": cfg.adv_weight * l_adv, "disc": cfg.adv_d_weight * l_d}
