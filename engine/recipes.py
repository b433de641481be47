"""Recipes: the published settings, as named plain functions (`--recipe NAME`; `--recipe list` names them).

A recipe sets what the authors' code and paper set (models, crop, batch, optimisation, schedule, loss weights and
conventions, evaluation) and carries the figures they report; every explicit flag still overrides it. The source of
each value is cited in the recipe's docstring; a value marked *inferred* is not stated by the source and is segkd's
best reading. What a user must still give (the data, the trained teacher, the ImageNet backbone) is listed in
`needs`: recipes never download anything.

Batches: `global_batch` is the authors' images per iteration over all their GPUs. segkd's --batch-size is per
process, so a recipe sets it to global_batch / WORLD_SIZE (torchrun's, 1 without it): the same optimisation on
any number of GPUs that divides the global batch. Iterations: where the code counts epochs, iters = epochs x
floor(train images / global batch) (its DataLoader drops the last incomplete batch).

    python engine/train.py --recipe list
    torchrun --nproc-per-node 4 engine/train.py --recipe apd_cityscapes_r18 --data-root DIR \\
        --teacher-ckpt T.pt --pretrained-backbone resnet18-imagenet.pth --dry-run
"""
import os
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Recipe:
    name: str
    summary: str               # one line: the setting
    settings: dict             # field name (flag without --, underscores) -> value
    global_batch: int          # images per iteration over all processes of the authors' run
    gpus: int                  # processes of the authors' run
    paper: dict = field(default_factory=dict)  # row -> mIoU (%): "teacher", "none" (student alone), method names
    paper_source: str = ""     # where the figures are printed
    needs: tuple = ()          # what the user must give: (flag, what)
    inferred: tuple = ()       # settings not stated by the source, and deviations segkd cannot avoid
    doc: str = ""              # the recipe function's docstring: the sources


def world_size():
    """torchrun's WORLD_SIZE, 1 without it: the processes a recipe's global batch is split over."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def epochs_to_iters(epochs, images, global_batch, gpus=1):
    """A code that counts epochs over a DistributedSampler (each of `gpus` ranks gets ceil(images / gpus) images)
    with drop_last per rank: epochs x floor(ceil(images / gpus) / (global batch / gpus)) iterations."""
    per_rank = -(-images // gpus)
    return epochs * (per_rank // (global_batch // gpus))


# ------------------------------------------------------------------------------------------------ APD
APD_SOURCE = "dvlab-research/APD README.md (Results table: Baseline, Ours)"
APD_NEEDS = (("--data-root", "the dataset"),
             ("--teacher-ckpt", "the trained PSPNet-R101 teacher in segkd's layout (the released "
                                "pspnet101_fc_*.pth are in semseg's layout: not loadable yet)"),
             ("--pretrained-backbone", "the ImageNet deep-stem checkpoint of the student (resnet18-imagenet.pth)"))
APD_INFERRED = ("the student's decoder feature is read before its Dropout2d(0.1); the code reads it after",
                "evaluation: semseg's test.py also averages the horizontally flipped prediction, centres its "
                "padding, strides ceil(2/3 window) and averages softmax outputs; segkd: no flip, bottom/right "
                "padding, int(2/3 window), logits",
                "augmentation: the code rotates half the images (RandRotate p 0.5) and blurs half "
                "(RandomGaussianBlur); segkd rotates every image, never blurs")


def _apd(name, dataset, crop, global_batch, lr, epochs, train_images, teacher, student, base_size,
         extra_inferred=()):
    settings = {
        "teacher": teacher, "student": student, "dataset": dataset, "crop": crop,
        "scale_min": 0.5, "scale_max": 2.0, "rotate": 10.0, "flip": True,
        "lr": lr, "momentum": 0.9, "weight_decay": 1e-4, "schedule": "poly", "poly_power": 0.9,
        "iters": epochs_to_iters(epochs, train_images, global_batch, gpus=4),
        "aux_weight": 0.4, "head_lr_mult": 10.0, "sync_bn": True,
        "method": "apd", "apd_convention": "code", "apd_kd_unit": "element", "apd_kd_weight": 10.0,
        "apd_rec_weight": 10.0, "apd_tau": 0.1, "apd_teacher_lr": 1e-5, "temperature": 1.0,
        "sliding": True, "val_split": "val", "val_resize": base_size, "val_resize_side": "long",
    }
    return settings, APD_NEEDS, APD_INFERRED + tuple(extra_inferred)


def apd_cityscapes_r18():
    """APD, Cityscapes, PSPNet-R101 -> PSPNet-R18 (Tian et al., TPAMI 2022).

    dvlab-research/APD config/cityscapes/cityscapes_release_psp18_psp101.yaml: train_h/w 713, scale 0.5-2.0,
    rotate +-10, batch_size 8 over train_gpu [0,1,2,3], base_lr 0.005, epochs 200, power 0.9, momentum 0.9,
    weight_decay 1e-4, aux_weight 0.4, kl_weight = pred_kmeans_weight = proto_align_weight = 10, kmeans_temp 10
    (tau 0.1), temperature 1, teacher_lr 1e-5, sync_bn; TEST: sliding 713 windows at base_size 2048, scale 1.0.
    tool/train.py: heads, auxiliary head and student projector at 10x base_lr. model/pspnet.py: semseg's
    dilation (pspnet_*d_apd). 2975 train images over 4 ranks of 2 -> 372 iterations an epoch.
    """
    settings, needs, inferred = _apd("apd_cityscapes_r18", "cityscapes", (713, 713), 8, 0.005, 200, 2975,
                                     "pspnet_r101d_apd", "pspnet_r18d_apd", 2048)
    return Recipe("apd_cityscapes_r18", "APD, Cityscapes 713x713, PSPNet-R101 -> PSPNet-R18, 4 GPUs x 2",
                  settings, 8, 4, {"none": 74.15, "apd": 75.68}, APD_SOURCE, needs, inferred,
                  apd_cityscapes_r18.__doc__)


def apd_ade20k_r18():
    """APD, ADE20K, PSPNet-R101 -> PSPNet-R18.

    dvlab-research/APD config/ade20k/ade20k_release_psp18_psp101.yaml: train_h/w 473, batch_size 8 over 4 GPUs,
    base_lr 0.005, epochs 100, weight_decay 1e-4, aux_weight 0.4, the APD weights of the Cityscapes recipe;
    TEST: base_size 512, 473 windows. 20210 train images over 4 ranks of 2 -> 2526 iterations an epoch.
    """
    settings, needs, inferred = _apd("apd_ade20k_r18", "ade20k", (473, 473), 8, 0.005, 100, 20210,
                                     "pspnet_r101d_apd", "pspnet_r18d_apd", 512)
    return Recipe("apd_ade20k_r18", "APD, ADE20K 473x473, PSPNet-R101 -> PSPNet-R18, 4 GPUs x 2", settings, 8, 4,
                  {"none": 37.19, "apd": 39.25}, APD_SOURCE, needs, inferred, apd_ade20k_r18.__doc__)


def apd_context_r18():
    """APD, Pascal-Context (60 classes), PSPNet-R101 -> PSPNet-R18.

    dvlab-research/APD config/context/context_release_psp18_psp101.yaml: classes 60, train_h/w 473, batch_size 12
    over 4 GPUs, base_lr 0.00075, epochs 100, weight_decay 1e-4, aux_weight 0.4; TEST: base_size 512, 473
    windows. model/pspnet.py dilates as CIRKD on Pascal-Context (its `classes == 60` branch): pspnet_*d.
    4998 train images over 4 ranks of 3 -> 416 iterations an epoch.
    """
    settings, needs, inferred = _apd("apd_context_r18", "pascal_context", (473, 473), 12, 0.00075, 100, 4998,
                                     "pspnet_r101d", "pspnet_r18d", 512)
    return Recipe("apd_context_r18", "APD, Pascal-Context 473x473, PSPNet-R101 -> PSPNet-R18, 4 GPUs x 3", settings,
                  12, 4, {"none": 42.29, "apd": 43.96}, APD_SOURCE, needs, inferred, apd_context_r18.__doc__)


def _mbv2(recipe_fn, name):
    """The R18 recipe with a MobileNetV2 student (APD's `pspmv2` arch): every setting inferred from the R18
    config, as the repository releases no MobileNetV2 config; no figures (the README has none)."""
    base = recipe_fn()
    # tool/train.py hard-codes index_split = 5 for its poly update: with pspmv2's one backbone group every group
    # (backbone, ppm, cls, aux, projector) runs at the base lr from the first iteration on
    settings = {**base.settings, "student": "pspnet_mbv2", "head_lr_mult": 1.0}
    needs = tuple((f, "the ImageNet MobileNetV2 checkpoint (torchvision's layout)" if f == "--pretrained-backbone"
                   else w) for f, w in base.needs)
    inferred = base.inferred + ("every setting: from the R18 config (no MobileNetV2 config released); segkd's "
                                "MobileNetV2 is torchvision's, APD's pspmv2 may differ",
                                "head lr x1: tool/train.py's index_split = 5 puts every group at the base lr "
                                "for pspmv2")
    return Recipe(name, base.summary.replace("PSPNet-R18", "PSPNet-MobileNetV2"), settings, base.global_batch,
                  base.gpus, {}, "", needs, inferred, (_mbv2.__doc__ or "") + "\n" + (recipe_fn.__doc__ or ""))


def apd_cityscapes_mbv2():
    return _mbv2(apd_cityscapes_r18, "apd_cityscapes_mbv2")


def apd_ade20k_mbv2():
    return _mbv2(apd_ade20k_r18, "apd_ade20k_mbv2")


def apd_context_mbv2():
    return _mbv2(apd_context_r18, "apd_context_mbv2")


# ------------------------------------------------------------------------------------------------ CWD, angular
CWD_NEEDS = (("--data-root", "Cityscapes"),
             ("--teacher-ckpt", "the trained PSPNet-R101 teacher in segkd's layout"),
             ("--pretrained-backbone", "resnet18-imagenet.pth (deep stem)"))


def _cwd_setting(method):
    # exp_cwd.sh passes neither --random-scale nor --random-mirror (store_true flags): no scale, no flip
    return {"teacher": "pspnet_r101d", "student": "pspnet_r18d", "dataset": "cityscapes", "crop": (512, 512),
            "scale_min": 1.0, "scale_max": 1.0, "rotate": 0.0, "flip": False,
            "lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4, "schedule": "poly", "poly_power": 0.9,
            "iters": 40000, "aux_weight": 0.4, "head_lr_mult": 1.0, "method": method, "sliding": False,
            "val_split": "val"}


CWD_INFERRED = ("TorchDistiller's networks/pspnet.py dilates both 3x3 convs of every BasicBlock (2, 2 in layer3; "
                "4, 4 in layer4) and gives the R18 student a 128-channel PSP head; segkd's pspnet_r18d dilates as "
                "CIRKD and its head is 512 wide",
                "whole-image evaluation is segkd's reading of the code's val.py")


def cwd_cityscapes_r18():
    """CWD, Cityscapes, PSPNet-R101 -> PSPNet-R18 (Shu et al., ICCV 2021).

    irfanICMLL/TorchDistiller SemSeg-distill/options.py: INPUT_SIZE 512,512, BATCH_SIZE 8 (one GPU, exp_cwd.sh
    --gpu 0), NUM_STEPS 40000, LEARNING_RATE 1e-2, MOMENTUM 0.9, POWER 0.9, WEIGHT_DECAY 5e-4; --random-scale and
    --random-mirror are store_true flags exp_cwd.sh does not pass (no rescale, no flip); utils/criterion.py
    CriterionDSN adds 0.4 x the CE of the layer3 head; exp_cwd.sh `channel kl 3 4`: lambda_cwd 3, temperature 4
    on the logits (segkd's cwd defaults). README: "fluctuations in the result, from 74.6~75.0" (val); the paper
    reports their mean.
    """
    s = {**_cwd_setting("cwd"), "cwd_weight": 3.0, "cwd_temperature": 4.0}
    return Recipe("cwd_cityscapes_r18", "CWD, Cityscapes 512x512, PSPNet-R101 -> PSPNet-R18, 1 GPU x 8", s, 8, 1,
                  {}, "TorchDistiller README: 74.6 to 75.0 over runs, no single figure", CWD_NEEDS, CWD_INFERRED,
                  cwd_cityscapes_r18.__doc__)


def cwd_kd_adv_cityscapes_r18():
    """CWD with the pixel-wise and holistic terms, Cityscapes, PSPNet-R101 -> PSPNet-R18: TorchDistiller's
    second command, `exp_cwd.sh channel kl 3 4 True True False` (SemSeg-distill/README.md: "channel-wise
    distillation, GAN loss and Pixel-wise distillation"), in cwd_cityscapes_r18's setting.

    KD: networks/kd_model.py `args.lambda_kd * CriterionKD()` with options.py lambda_kd 10, and CriterionKD is
    KLDivLoss() (mean over every element, T = 1) of the logits: in segkd's per-pixel unit that is kd_weight
    10 / 19 (the mean over B*C*h*w divides the per-pixel KL by C = 19). Adversarial: options.py --adv-loss-type
    wgan-gp, lambda_adv 0.001, lambda_d 0.1, lambda_gp 10 (inside lambda_d), lr-d 4e-4 with Adam (0.9, 0.99):
    segkd's adv settings with --adv-loss wgan-gp. The README gives no figure for this command.
    """
    s = {**_cwd_setting("cwd+kd+adv"), "cwd_weight": 3.0, "cwd_temperature": 4.0, "kd_weight": 10.0 / 19,
         "temperature": 1.0, "adv_loss": "wgan-gp", "adv_weight": 0.001, "adv_d_weight": 0.1, "adv_gp_weight": 10.0,
         "adv_d_lr": 4e-4}
    inferred = CWD_INFERRED + ("the discriminator's Adam lr: TorchDistiller's train.py poly-decays it with the "
                               "student's schedule (adjust_learning_rate(args.lr_d, D_solver, step)); segkd keeps "
                               "it constant at 4e-4, as CIRKD does",)
    return Recipe("cwd_kd_adv_cityscapes_r18", "CWD + KD + adversarial (wgan-gp), Cityscapes 512x512, PSPNet-R101 -> "
                  "PSPNet-R18, 1 GPU x 8", s, 8, 1, {}, "", CWD_NEEDS, inferred, cwd_kd_adv_cityscapes_r18.__doc__)


def angular_cityscapes_r18():
    """Angular distillation (lad/cad/pad), Cityscapes, PSPNet-R101 -> PSPNet-R18: the paper trains "following"
    CWD, so the setting is cwd_cityscapes_r18's with lambda_ad = lambda_kd = 10 and the KD term in element units
    (KLDivLoss()'s mean, as TorchDistiller's CriterionKD with --lambda-kd 10; see engine/methods/angular.py).
    `--method lad|pad|cwd` runs the paper's other rows in the same setting.
    """
    s = {**_cwd_setting("cad"), "ad_weight": 10.0, "ad_kd_weight": 10.0, "ad_kd_unit": "element"}
    inferred = ("the whole setting: taken from the CWD code the paper says it follows",) + CWD_INFERRED
    return Recipe("angular_cityscapes_r18", "CAD (LAD/PAD/CWD), Cityscapes 512x512, PSPNet-R101 -> PSPNet-R18", s,
                  8, 1, {}, "", CWD_NEEDS, inferred, angular_cityscapes_r18.__doc__)


# ------------------------------------------------------------------------------------------------ CIRKD
CIRKD_SOURCE = "winycg/CIRKD README.md at commit 2d8ad0f (val)"
CIRKD_PAPER = {"teacher": 78.07, "none": 74.21}
CIRKD_NEEDS = (("--data-root", "Cityscapes"),
               ("--teacher-ckpt", "the trained DeepLabV3-R101 teacher in segkd's layout"),
               ("--pretrained-backbone", "resnet18-imagenet.pth (deep stem)"))
CIRKD_INFERRED = ("random scale 0.5-2.0 and flip: CIRKD's dataset/cityscapes.py augmentation as segkd reads it",
                  "CIRKD's auxiliary _FCNHead is C/4 = 64 channels wide (segkd's: 256, semseg's)")


def _cirkd_setting(method):
    """winycg/CIRKD (commit 2d8ad0f) train_cirkd.py and train_kd.py share these defaults: crop 512x1024, batch-size
    16 over nproc_per_node 8, max-iterations 40000, lr 0.02, momentum 0.9, weight-decay 1e-4, poly 0.9; `args.aux =
    True` for a resnet student (CE + 0.4 CE(aux)); --lambda-kd 1 at kd-temperature 1 (segkd's kd defaults) in every
    script; whole-image validation."""
    return {"teacher": "deeplabv3_r101d", "student": "deeplabv3_r18d", "dataset": "cityscapes", "crop": (512, 1024),
            "scale_min": 0.5, "scale_max": 2.0, "rotate": 0.0, "flip": True,
            "lr": 0.02, "momentum": 0.9, "weight_decay": 1e-4, "schedule": "poly", "poly_power": 0.9, "iters": 40000,
            "aux_weight": 0.4, "head_lr_mult": 1.0, "method": method, "kd_weight": 1.0, "temperature": 1.0,
            "sliding": False, "val_split": "val"}


def _cirkd_recipe(name, method, summary, extra, figure, doc):
    return Recipe(name, f"{summary}, Cityscapes 512x1024, DeepLabV3-R101 -> R18, 8 GPUs x 2",
                  {**_cirkd_setting(method), **extra}, 16, 8, {**CIRKD_PAPER, method: figure}, CIRKD_SOURCE,
                  CIRKD_NEEDS, CIRKD_INFERRED, doc)


def cirkd_cityscapes_r18():
    """CIRKD's Cityscapes setting, DeepLabV3-R101 -> DeepLabV3-R18 (Yang et al., CVPR 2022).

    winycg/CIRKD (commit 2d8ad0f) train_scripts/train_cirkd/citys/deeplabv3_res18.sh with train_cirkd.py's
    defaults (see _cirkd_setting). README (that commit): teacher 78.07, baseline 74.21, SKD 75.42, IFVD 75.59,
    CWD 75.55, CIRKD 76.38 (val). The method is `kd+cirkd` (train_cirkd.py: lambda-kd 1 plus the mini-batch and
    memory terms, no adversarial term). The SKD and IFVD rows of the table are skd_cityscapes_r18 and
    ifvd_cityscapes_r18; its CWD row (train_kd.py with CWD on both the feature, 50, and the logits, 3, plus KD
    and the adversarial term) has no recipe: segkd's cwd is one term, on the logits (cwd_cityscapes_r18).
    """
    return _cirkd_recipe("cirkd_cityscapes_r18", "kd+cirkd", "CIRKD's setting", {}, 76.38,
                         cirkd_cityscapes_r18.__doc__)


def skd_cityscapes_r18():
    """SKD as CIRKD's table trains it: train_scripts/train_kd/train_skd.sh (commit 2d8ad0f) runs train_kd.py with
    --lambda-kd 1, --lambda-adv 0.001, --lambda-d 0.1, --lambda-skd 10: CE + aux + KD + the holistic adversarial
    term (hinge, Adam 4e-4: segkd's adv defaults) + the pair-wise term on the last feature map (segkd's skd
    defaults: weight 10, 2x2 max-pool). Setting: _cirkd_setting. README (that commit): SKD 75.42 (val).
    """
    return _cirkd_recipe("skd_cityscapes_r18", "kd+skd+adv", "SKD as CIRKD trains it",
                         {"skd_weight": 10.0, "adv_weight": 0.001, "adv_d_weight": 0.1}, 75.42,
                         skd_cityscapes_r18.__doc__)


def ifvd_cityscapes_r18():
    """IFVD as CIRKD's table trains it: train_scripts/train_kd/train_ifvd.sh (commit 2d8ad0f) runs train_kd.py
    with --lambda-kd 1.0, --lambda-adv 0.001, --lambda-d 0.1, --lambda-ifv 20: CE + aux + KD + the holistic
    adversarial term + IFVD on the last feature map (segkd's ifvd default weight, 20). Setting: _cirkd_setting.
    README (that commit): IFVD 75.59 (val).
    """
    return _cirkd_recipe("ifvd_cityscapes_r18", "kd+ifvd+adv", "IFVD as CIRKD trains it",
                         {"ifvd_weight": 20.0, "adv_weight": 0.001, "adv_d_weight": 0.1}, 75.59,
                         ifvd_cityscapes_r18.__doc__)


# ------------------------------------------------------------------------------------------------ data-free
def _dfad(dataset, classes_note, weight_decay, gamma):
    return {"teacher": "deeplabv3_r50", "student": "deeplabv3_mbv2", "dataset": dataset, "method": "dfad",
            "iters": 300 * 50 * 5, "gen_batch": 64, "gen_every": 5, "gen_nz": 256, "gen_size": (128, 128),
            "gen_lr": 1e-3, "dfad_lr": 0.1, "dfad_weight_decay": weight_decay, "momentum": 0.9,
            "schedule": "step", "step_parts": 3, "step_gamma": gamma, "val_split": "test", "val_resize": 256,
            "sliding": False, "crop": (128, 128), "aux_weight": 0.0, "head_lr_mult": 1.0}


DFAD_INFERRED = ("inputs: DFAD's code normalises to [-1, 1], segkd with ImageNet statistics (consistent with a "
                 "teacher segkd trained; DFAD's own teachers are in torchvision's layout and not loadable)",
                 "the student: segkd's deeplabv3_mbv2 is torchvision's MobileNetV2; DFAD's comes from "
                 "pytorch-deeplab-xception",
                 "the best epoch: DFAD reports the best of 300 validations; segkd reports the last (read the best "
                 "from log.jsonl with --eval-interval 250, 50 rounds of 5 student steps as the code's epoch)")


def dfad_camvid():
    """DFAD on CamVid, DeepLabV3-R50 -> DeepLabV3-MobileNetV2, no data (Fang et al., 2019).

    VainF/Data-Free-Adversarial-Distillation DFAD_camvid_deeplab.py with the README's --scheduler: batch 64,
    epochs 300 x epoch_itrs 50 rounds of 5 student steps (75000 student steps), lr_S 0.1 (SGD, momentum 0.9,
    weight_decay 5e-4), lr_G 1e-3 (Adam), nz 256, GeneratorB img_size 128, StepLR(step_size 100, gamma 0.1)
    on both; dataloader.py: test split, ExtResize(256). README: "the mIoU reaches 0.5346 at 232 epochs".
    """
    return Recipe("dfad_camvid", "DFAD, CamVid test at 256, DeepLabV3-R50 -> DeepLabV3-MobileNetV2, 1 GPU",
                  _dfad("camvid", "11", 5e-4, 0.1), 64, 1, {"dfad": 53.46},
                  "VainF/Data-Free-Adversarial-Distillation README.md (best epoch)",
                  (("--data-root", "CamVid (for the teacher and the evaluation)"),
                   ("--teacher-ckpt", "the trained DeepLabV3-R50 teacher (or none: segkd trains one, cached)")),
                  DFAD_INFERRED, dfad_camvid.__doc__)


def dfad_nyuv2():
    """DFAD on NYUv2 (13 classes), DeepLabV3-R50 -> DeepLabV3-MobileNetV2, no data.

    VainF/Data-Free-Adversarial-Distillation DFAD_nyu_deeplab.py with --scheduler: as dfad_camvid but
    weight_decay 5e-5 and StepLR gamma 0.3; test split resized to 256. No figure in the README's text.
    """
    return Recipe("dfad_nyuv2", "DFAD, NYUv2 test at 256, DeepLabV3-R50 -> DeepLabV3-MobileNetV2, 1 GPU",
                  _dfad("nyuv2", "13", 5e-5, 0.3), 64, 1, {}, "",
                  (("--data-root", "NYUv2 in DFAD's layout"),
                   ("--teacher-ckpt", "the trained DeepLabV3-R50 teacher (or none: segkd trains one, cached)")),
                  DFAD_INFERRED, dfad_nyuv2.__doc__)


def dfss_camvid():
    """DFSS on CamVid (Sun and Wu, 2025), DFAD's models and evaluation: what the paper states, the rest inferred.

    The models, the test split at 256 and the DeepLabV3-R50 teacher follow the DFAD benchmark the paper compares
    with; the pool, the kept fraction and the WDPD schedule are segkd's defaults (docs/datafree.md), the
    optimisation is DFAD's student optimisation without the generator. None of it is taken from released code
    (there is none to read), so every setting is marked inferred.
    """
    s = {"teacher": "deeplabv3_r50", "student": "deeplabv3_mbv2", "dataset": "camvid", "method": "dfss",
         "crop": (128, 128), "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4, "schedule": "poly",
         "poly_power": 0.9, "iters": 15000, "val_split": "test", "val_resize": 256, "sliding": False,
         "aux_weight": 0.0, "head_lr_mult": 1.0}
    return Recipe("dfss_camvid", "DFSS, CamVid test at 256, DeepLabV3-R50 -> DeepLabV3-MobileNetV2 (inferred)", s,
                  64, 1, {}, "",
                  (("--data-root", "CamVid"), ("--aux-data", "the unlabelled image pool"),
                   ("--teacher-ckpt", "the trained DeepLabV3-R50 teacher (or none: segkd trains one, cached)")),
                  ("every setting: inferred (see the docstring)",), dfss_camvid.__doc__)


RECIPES = {
    "apd_cityscapes_r18": apd_cityscapes_r18,
    "apd_ade20k_r18": apd_ade20k_r18,
    "apd_context_r18": apd_context_r18,
    "apd_cityscapes_mbv2": apd_cityscapes_mbv2,
    "apd_ade20k_mbv2": apd_ade20k_mbv2,
    "apd_context_mbv2": apd_context_mbv2,
    "cwd_cityscapes_r18": cwd_cityscapes_r18,
    "cwd_kd_adv_cityscapes_r18": cwd_kd_adv_cityscapes_r18,
    "angular_cityscapes_r18": angular_cityscapes_r18,
    "cirkd_cityscapes_r18": cirkd_cityscapes_r18,
    "skd_cityscapes_r18": skd_cityscapes_r18,
    "ifvd_cityscapes_r18": ifvd_cityscapes_r18,
    "dfad_camvid": dfad_camvid,
    "dfad_nyuv2": dfad_nyuv2,
    "dfss_camvid": dfss_camvid,
}


def get_recipe(name):
    if name not in RECIPES:
        raise ValueError(f"--recipe {name!r} is not a recipe; valid: {', '.join(RECIPES)} (or list)")
    return RECIPES[name]()


def resolved_settings(recipe, processes=None, batch_given=False):
    """The recipe's settings with --batch-size (dfad: --gen-batch) = global batch / processes (world_size() by
    default); `batch_given`: the user gave that flag, which then stands whatever the split."""
    n = world_size() if processes is None else processes
    if batch_given:
        return dict(recipe.settings)
    if recipe.global_batch % n:
        raise ValueError(f"--recipe {recipe.name}: its global batch {recipe.global_batch} does not split over {n} "
                         f"processes; run with a number of processes that divides it, or give --batch-size")
    settings = dict(recipe.settings)
    # dfad trains on generated batches (--gen-batch); --batch-size is then only the teacher's and evaluation's
    settings["gen_batch" if settings.get("method") == "dfad" else "batch_size"] = recipe.global_batch // n
    return settings


def paper_rows(recipe, method, cfg=None):
    """[(label, figure)] of the recipe's source for the closing table: teacher, student alone and `method`; none
    when `cfg` trains other models or data than the recipe's (the figures would be beside the wrong models)."""
    if cfg is not None and any(recipe.settings.get(k) not in (None, v) for k, v in (
            ("teacher", cfg.model.teacher), ("student", cfg.model.student), ("dataset", cfg.data.dataset))):
        return []
    keys = [("teacher", "teacher (paper)"), ("none", "student alone (paper)")]
    if method not in ("teacher", "none"):
        keys.append((method, f"{method} (paper)"))
    return [(label, recipe.paper[key]) for key, label in keys if recipe.paper.get(key) is not None]


def dry_run_text(cfg):
    """--dry-run: every setting of the run as the flag that gives it, marked where it differs from segkd's default,
    then (with --recipe) its source, the figures it reports, what the user must still give and what is inferred."""
    import dataclasses

    from engine.config import SECTIONS, section_of

    sections = section_of()
    batch = cfg.method.gen_batch if cfg.method.method == "dfad" else cfg.data.batch_size
    lines = [f"segkd dry run: {cfg.method.method} on {cfg.data.dataset}, student {cfg.model.student}, teacher "
             f"{cfg.model.teacher}, {batch} images x {world_size()} process(es) an iteration"
             + (f", recipe {cfg.run.recipe}" if cfg.run.recipe else "")]
    for section, klass in SECTIONS.items():
        lines.append(f"  [{section}]")
        values = getattr(cfg, section)
        for f in dataclasses.fields(klass):
            v = getattr(values, f.name)
            shown = ",".join(map(str, v)) if isinstance(v, tuple) else ("''" if v == "" else str(v))
            mark = "" if v == f.default else "   *"
            lines.append(f"    --{f.name.replace('_', '-'):<22} {shown}{mark}")
    lines.append("  (* differs from segkd's default)")
    if cfg.run.recipe:
        recipe = get_recipe(cfg.run.recipe)
        lines.append(f"recipe {recipe.name}: {recipe.summary}; the authors' global batch {recipe.global_batch} over "
                     f"{recipe.gpus} GPU(s)")
        lines += ["  " + line.strip() for line in (recipe.doc or "").strip().splitlines() if line.strip()]
        figures = ", ".join(f"{'student alone' if k == 'none' else k} {v}" for k, v in recipe.paper.items()
                            if v is not None)
        lines.append(f"  reported: {figures} ({recipe.paper_source})" if figures else
                     f"  reported: no figure in the sources read{f' ({recipe.paper_source})' if recipe.paper_source else ''}")
        for flag, what in recipe.needs:
            name = flag[2:].replace("-", "_")
            given = getattr(getattr(cfg, sections[name]), name)
            lines.append(f"  needs {flag}: {what}" + (f" (given: {given})" if given else " (NOT GIVEN)"))
        lines += [f"  inferred: {text}" for text in recipe.inferred]
    return "\n".join(lines)


# The file each recipe's settings are read from (its docstring has the details).
CITES = {
    "apd_cityscapes_r18": "dvlab-research/APD `config/cityscapes/cityscapes_release_psp18_psp101.yaml`",
    "apd_ade20k_r18": "dvlab-research/APD `config/ade20k/ade20k_release_psp18_psp101.yaml`",
    "apd_context_r18": "dvlab-research/APD `config/context/context_release_psp18_psp101.yaml`",
    "apd_cityscapes_mbv2": "as apd_cityscapes_r18 (inferred: no MobileNetV2 config released)",
    "apd_ade20k_mbv2": "as apd_ade20k_r18 (inferred)",
    "apd_context_mbv2": "as apd_context_r18 (inferred)",
    "cwd_cityscapes_r18": "irfanICMLL/TorchDistiller `SemSeg-distill/options.py`, `exp_cwd.sh`",
    "cwd_kd_adv_cityscapes_r18": "irfanICMLL/TorchDistiller `SemSeg-distill/README.md` (second command), "
                                 "`networks/kd_model.py`, `options.py`",
    "angular_cityscapes_r18": "the CWD code the paper follows (inferred)",
    "cirkd_cityscapes_r18": "winycg/CIRKD@2d8ad0f `train_cirkd.py`, `train_scripts/train_cirkd/citys/`",
    "skd_cityscapes_r18": "winycg/CIRKD@2d8ad0f `train_kd.py`, `train_scripts/train_kd/train_skd.sh`",
    "ifvd_cityscapes_r18": "winycg/CIRKD@2d8ad0f `train_kd.py`, `train_scripts/train_kd/train_ifvd.sh`",
    "dfad_camvid": "VainF/Data-Free-Adversarial-Distillation `DFAD_camvid_deeplab.py`, `dataloader.py`",
    "dfad_nyuv2": "VainF/Data-Free-Adversarial-Distillation `DFAD_nyu_deeplab.py`",
    "dfss_camvid": "the DFSS paper's statements and the DFAD benchmark (inferred)",
}


def markdown_table():
    """The README's table of recipes, generated from RECIPES (tests/test_readme.py keeps the two equal)."""
    lines = ["| `--recipe` | setting | method | authors' batch | reported mIoU (teacher / alone / method) | source |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, fn in RECIPES.items():
        r = fn()
        method = r.settings["method"]
        shown = " / ".join("-" if r.paper.get(k) is None else f"{r.paper[k]:.2f}" for k in ("teacher", "none", method))
        source = CITES[name]
        lines.append(f"| `{name}` | {r.summary} | `{method}` | {r.global_batch} on {r.gpus} GPU(s) | {shown} | "
                     f"{source} |")
    return "\n".join(lines)
