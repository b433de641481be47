"""ADE20K, the SceneParsing benchmark release (Zhou et al., CVPR 2017), 150 classes.

    <root>/images/{training,validation}/ADE_{train,val}_<8 digits>.jpg
    <root>/annotations/{training,validation}/ADE_{train,val}_<8 digits>.png     single-channel 0..150

`root` is the `ADEChallengeData2016` folder or the folder that contains it. Splits `train` (20210 images) and
`val` (2000) read `training` and `validation`. Label 0 ("other objects") becomes the ignore index 255 and label
k the class k - 1 (the `reduce_zero_label` convention of the benchmark's evaluation). Images vary in size.
"""
from pathlib import Path

from engine.data.files import FileSegmentation, void_first_labels
from engine.data.voc import colormap

CLASS_NAMES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand",
    "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove",
    "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet",
    "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
    "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher",
    "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier",
    "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag")
FOLDERS = {"train": "training", "val": "validation"}


class ADE20K(FileSegmentation):
    """ADE20K SceneParsing; see the module docstring."""
    name = "ade20k"
    class_names = CLASS_NAMES
    palette = colormap(len(CLASS_NAMES) + 1)[1:]  # the PASCAL colour map without its black
    label_lut, valid_labels = void_first_labels(len(CLASS_NAMES))
    valid_text = f"0 (other, ignored), 1..{len(CLASS_NAMES)}"

    def __init__(self, split, *, root="", train=False, crop=(64, 64), scale=(0.5, 2.0), flip=True, rotate=0.0,
                 seed=0, skip_bad=False, skip_log=None):
        super().__init__(split, train=train, crop=crop, scale=scale, flip=flip, rotate=rotate, seed=seed,
                         skip_bad=skip_bad, skip_log=skip_log)
        if not str(root):
            raise ValueError("ade20k needs its folder: pass root (--data-root) pointing at ADEChallengeData2016/")
        if split not in FOLDERS:
            raise ValueError(f"ade20k has splits {tuple(FOLDERS)}, got {split!r}")
        root = Path(root)
        self.root = root / "ADEChallengeData2016" if (root / "ADEChallengeData2016").is_dir() else root
        image_dir = self.root / "images" / FOLDERS[split]
        label_dir = self.root / "annotations" / FOLDERS[split]
        for folder in (image_dir, label_dir):
            if not folder.is_dir():
                raise FileNotFoundError(f"ade20k {split} split: folder {folder} is missing")
        images = sorted(image_dir.glob("*.jpg"))
        if not images:
            raise ValueError(f"ade20k {split} split: no .jpg images in {image_dir}")
        self.set_files(images, [label_dir / f"{p.stem}.png" for p in images])
