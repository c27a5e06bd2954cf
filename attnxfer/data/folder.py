"""ImageNet-style folders (``root/train/<class>/*.jpg``, ``root/val/<class>/*``) read and transformed by
timm, its augmentation seeded per (seed, epoch, index). Without labels a split is every image under it."""

from __future__ import annotations

import collections
import glob
import inspect
import io
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch.utils.data import Dataset

from ..errors import InputError, MissingPathError, OptionError
from ..run_layout import LOCK_NAME
from ..speak import warn
from .registry import DatasetInfo, built_info, register_dataset
from .seeding import key_epoch, sample_seed, seeded_global_rngs

if TYPE_CHECKING:
    import PIL.Image

_SPLIT_DIRS = {"train": ("train", "training"), "val": ("val", "validation")}
_LAYOUT = "root/train/<class>/*.jpg|png and root/val/<class>/*.jpg|png"


def _split_dir(root: str | None, split: str, named: str | None = None) -> Path:
    """The folder of ``split`` under ``root``: ``named`` (data.kwargs' val_split), else train/ or training/,
    val/ or validation/. A missing one is refused with the folders there are (train/ and test/: the option)."""
    if root is None:
        raise InputError(f"dataset 'folder' needs root=PATH with the layout {_LAYOUT}")
    base = Path(root).expanduser()
    if not base.is_dir():
        what = "is a file, not a folder" if base.exists() else "does not exist"
        raise MissingPathError(f"dataset folder '{base}' {what}; expected the layout {_LAYOUT}")
    for name in (named,) if named else _SPLIT_DIRS[split]:
        if (base / name).is_dir():
            return base / name
    found = sorted(d.name for d in base.iterdir() if _is_class_dir(d))
    other = [name for name in found if name not in _SPLIT_DIRS["train"]]
    option = (
        f"data.kwargs={{val_split: {other[0]}}} validates on {other[0]}/; "
        if split == "val" and other
        else ""
    )
    there = f"it has {', '.join(f'{name}/' for name in found)}" if found else "it has no sub-folder"
    if base.name in _SPLIT_DIRS["train"] + _SPLIT_DIRS["val"]:  # a split's folder given: its classes there
        there += f": {base.name}/ is a split's folder, not the dataset's: data.root={base.parent}"
    wanted = (
        f"{named}/ (data.kwargs val_split)"
        if named
        else f"{' or '.join(f'{d}/' for d in _SPLIT_DIRS[split])} sub-folder"
    )
    raise MissingPathError(
        f"dataset folder '{base}' has no {wanted} for split '{split}' ({there}); {option}expected the layout "
        f"{_LAYOUT}"
    )


def _is_class_dir(path: Path) -> bool:
    """A visible sub-folder: hidden ones (.ipynb_checkpoints, .git) are no class, as their images are none."""
    return path.is_dir() and not path.name.startswith(".")


def folder_classes(root: str) -> tuple[str, ...]:
    """Class names: the visible sub-folders of the train folder, in timm's natural sort order."""
    from timm.utils.misc import natural_key  # local import keeps `import attnxfer.data` light

    train = _split_dir(root, "train")
    classes = sorted((d.name for d in train.iterdir() if _is_class_dir(d)), key=natural_key)
    if not classes:
        raise MissingPathError(
            f"'{train}' has no class sub-folders; expected the layout {_LAYOUT} "
            "(data.labels=false reads every image under it, without classes)"
        )
    return tuple(classes)


def decoded_image_info(name: str, classes: tuple[str, ...] | None, labels: bool = True) -> DatasetInfo:
    """Defaults of images timm decodes: ImageNet's mean and std, RGB, 224 px; ``classes`` None if unknown."""
    return DatasetInfo(
        name=name,
        num_classes=None if classes is None else len(classes),
        class_names=classes,
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        in_chans=3,
        img_size=224,
        has_labels=labels,
    )


def folder_info(
    root: str | None, labels: bool = True, *, class_map: str | Sequence[str] | None = None
) -> DatasetInfo:
    """Classes from ``root/train``'s sub-folders, or those of them ``class_map`` names, in its order (timm's
    --class-map: a subset of the classes, ImageNet-100's); ``labels=False`` reads none (class folders optional)."""
    if root is None or not labels:
        return decoded_image_info("folder", None, labels)
    classes = folder_classes(root)
    if class_map is not None:
        mapped = _mapped_classes(class_map, root)
        if missing := [c for c in mapped if c not in classes]:
            raise InputError(
                f"data.kwargs.class_map names {len(missing)} class(es) that '{_split_dir(root, 'train')}' has no "
                f"folder for (e.g. {missing[0]!r}): each line names a class folder of train/"
            )
        classes = mapped
    return decoded_image_info("folder", classes, labels)


def _mapped_classes(class_map: str | Sequence[str], root: str) -> tuple[str, ...]:
    """The class folders a class map names, index by index: a text file of one name a line (looked for as
    given, then under ``root``, as timm looks for its --class-map), or the names as a list."""
    if isinstance(class_map, str):
        path = Path(class_map).expanduser()
        if not path.is_file() and (Path(root) / class_map).is_file():  # as timm looks: under the root
            path = Path(root) / class_map
        try:
            names = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise MissingPathError(
                f"data.kwargs.class_map={class_map}: cannot be read as a text file ({e}); give a file of class "
                "folder names, one a line (a relative path is read from here, then under data.root), or the "
                "names as a list: data.kwargs.class_map=[cat, dog]"
            ) from None
    else:
        names = [str(n) for n in class_map]
    names = [n.strip() for n in names if n.strip()]
    if len(set(names)) < len(names) or not names:
        twice = sorted({n for n in names if names.count(n) > 1})
        raise InputError(
            f"data.kwargs.class_map names {f'{twice[0]!r} more than once' if twice else 'no class'}: give each "
            "class folder once, in the order of its index"
        )
    return tuple(names)


class ImageFiles:
    """Every image file under ``folder`` (any depth, hidden ones left out) in timm's natural order, as a timm
    reader. With ``class_map`` each is labelled by its class folder, the first folder under ``folder``, however
    deep it lies there (torchvision's ImageFolder rule; timm's reader would name a class by the innermost
    folder); without one it hands out no target."""

    def __init__(self, folder: Path, extensions: set[str], class_map: dict[str, int] | None = None):
        from timm.utils.misc import natural_key  # local import keeps `import attnxfer.data` light

        self.folder = folder
        # glob, not rglob: symlinked folders are walked (as torchvision and timm do), hidden ones are not
        found = [Path(p) for p in glob.glob("**", root_dir=folder, recursive=True) if (folder / p).is_file()]
        if run := next((p.parent for p in found if p.name == LOCK_NAME), None):
            # its pictures would be read as this split's images, and its folder as a class
            raise InputError(
                f"'{folder / run}' is an attnxfer run's folder (it holds {LOCK_NAME}) inside the dataset's "
                f"'{folder}': its pictures would be read as images; put run_dir outside data.root's split folders"
            )
        images = (p for p in found if p.suffix.lower() in extensions)
        self.files = sorted(images, key=lambda p: natural_key(p.as_posix()))
        if len(self.files) < len(found):  # another format (.webp, .bmp, a note) is left out, not in silence
            other = sorted(p for p in found if p.suffix.lower() not in extensions)
            kinds = collections.Counter(
                p.suffix.lower() or "no suffix" for p in other
            )  # .webp images said too
            warn(
                f"{len(other)} file(s) under '{folder}' are not read ({', '.join(f'{n} {k}' for k, n in kinds.most_common())}"
                f"; e.g. '{other[0]}'), as timm reads only {', '.join(sorted(extensions))} images"
            )
        self.targets = [None] * len(self.files)
        if class_map is not None:
            self.targets = [class_map.get(p.parts[0]) if len(p.parts) > 1 else None for p in self.files]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        # an open file, as timm's own readers hand images to its ImageDataset
        return open(self.folder / self.files[index], "rb"), self.targets[index]

    def filename(self, index: int, basename: bool = False, absolute: bool = False) -> str:
        path = self.files[index]
        if basename:
            return path.name
        return str(self.folder / path) if absolute else str(path)

    def filenames(self, basename: bool = False, absolute: bool = False) -> list[str]:
        return [self.filename(i, basename, absolute) for i in range(len(self))]


def eight_bit(img: PIL.Image.Image) -> PIL.Image.Image:
    """A 16-bit grey image as its top 8 bits: PIL's convert to L or RGB clips it to 255, a white image. Such a
    PNG opens as I;16, or as I (32 bits) before Pillow 10.3: a PNG holds at most 16 bits a channel."""
    import numpy as np  # local import keeps `import attnxfer.data` light
    from PIL import Image

    sixteen = img.mode.startswith("I;16") or (img.mode == "I" and img.format == "PNG")
    return Image.fromarray((np.asarray(img) >> 8).astype(np.uint8)) if sixteen else img


class OpenedImages:
    """A timm reader whose every image is decoded here, whole, in ``mode`` (a 16-bit one as 8 bits: `eight_bit`)
    and handed on as raw pixels, which timm's ImageDataset opens at no cost and with no mode of its own: an image
    PIL cannot decode, unknown or cut short anywhere (a partial copy), is named here, where timm's own decode would
    log its index alone. ``strict`` (an evaluation's split): such an image is an InputError, since timm's
    ImageDataset hands out the next sample in its place (its convention for training, on the OSError raised
    otherwise), which an evaluation would count twice."""

    def __init__(self, reader, strict: bool, mode: str):
        self.reader, self.strict, self.mode = reader, strict, mode

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, index: int):
        from PIL import Image, UnidentifiedImageError

        image, *rest = self.reader[index]
        try:
            with image:
                decoded = eight_bit(Image.open(image)).convert(self.mode)
        except OSError as e:
            reason = "PIL cannot identify its format" if isinstance(e, UnidentifiedImageError) else e
            name = self.reader.filename(index, absolute=True)
            said = f"image {repr(name) if name else f'number {index}'} cannot be read as an image ({reason})"
            if not self.strict:
                raise OSError(f"{said}; the next image stands in") from None
            raise InputError(
                f"{said}: replace or remove it; evaluation would otherwise count another image in its place"
            ) from None
        # handed on as a PGM or PPM: a header, then the pixels as they lie in memory
        width, height = decoded.size
        header = b"P%d %d %d 255\n" % (5 if self.mode == "L" else 6, width, height)
        return io.BytesIO(header + decoded.tobytes()), *rest

    def filename(self, index: int, basename: bool = False, absolute: bool = False) -> str | None:
        return self.reader.filename(index, basename, absolute)

    def filenames(self, basename: bool = False, absolute: bool = False) -> list:
        return self.reader.filenames(basename, absolute)


class FolderDataset(Dataset):
    """timm ImageDataset whose transform runs with global RNGs seeded by (seed, epoch, index). ``strict`` (the
    val split, whose images an evaluation counts): an image PIL cannot decode is an error (`OpenedImages`)."""

    def __init__(self, image_dataset, info: DatasetInfo, *, seed: int, deterministic: bool, strict: bool):
        image_dataset.reader = OpenedImages(image_dataset.reader, strict, image_dataset.input_img_mode)
        image_dataset.input_img_mode = None  # its reader hands out images already in the mode
        self.image_dataset = image_dataset
        self.info = info
        self.seed = seed
        self.deterministic = deterministic
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Epoch for plain-int indices (SampleKey indices carry their own)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.image_dataset)

    def __getitem__(self, index: int):
        idx = int(index)
        if not self.deterministic:
            return self.image_dataset[idx]
        with seeded_global_rngs(sample_seed(self.seed, key_epoch(index, self.epoch), idx)):
            return self.image_dataset[idx]

    def image(self, index: int):
        """Sample ``index``'s image (a label-free reader's target is timm's placeholder, never a label)."""
        return self[index][0]


def timm_transform(
    split: str, augment: bool | None, info: DatasetInfo, **aug
) -> tuple[bool, Callable, DatasetInfo]:
    """(``augment``, by default on the train split; timm's transform of ``info``'s images, ``aug`` its options
    over `build_folder`'s transform defaults; ``info`` with how that transform resizes and crops for eval)."""
    from timm.data import DEFAULT_CROP_PCT, create_transform  # keeps `import attnxfer.data` light

    # folder's defaults (bicubic, no colour jitter, crop_pct 0.875) under what ``aug`` sets, so that the timm
    # prefixes (hfds/, wds/, hfids/) prepare images as folder does where data.kwargs sets nothing
    params = inspect.signature(build_folder).parameters
    aug = {**{name: params[name].default for name in _FOLDER_TRANSFORM_OPTIONS}, **aug}
    unknown = sorted(set(aug) - set(inspect.signature(create_transform).parameters))
    if unknown:  # an open-ended builder's (hfds/, wds/) data.kwargs end here
        raise OptionError(
            f"dataset '{info.name}' has no option(s) {', '.join(unknown)} (data.kwargs), and timm's "
            "create_transform takes none of them"
        )
    augment = split == "train" if augment is None else augment
    size = (info.in_chans, info.img_size, info.img_size)
    crop = aug.get("crop_pct")
    if crop is not None and not (isinstance(crop, (int, float)) and crop > 0):  # timm: 0 is its 0.875
        raise InputError(f"dataset '{info.name}': crop_pct must be > 0 (data.kwargs), got {crop!r}")
    if aug.get("re_mode", "const") not in ("const", "rand", "pixel"):  # timm asserts without a word
        raise InputError(
            f"dataset '{info.name}': data.kwargs.re_mode is one of const, rand, pixel (aug.remode's choices), "
            f"got {aug['re_mode']!r}"
        )
    if aug.get("crop_mode") not in (None, "center", "squash", "border"):  # timm reads any other as center
        raise InputError(
            f"dataset '{info.name}': data.kwargs.crop_mode is one of center, squash, border, got {aug['crop_mode']!r}"
        )
    # timm takes any: re_prob 1.5 erases always, hflip 2 flips every image
    probabilities = (("re_prob", 0, 1), ("hflip", 0, 1), ("vflip", 0, 1), ("re_count", 1, None))
    for option, low, high in probabilities:
        value = aug.get(option)
        if isinstance(value, (int, float)) and not (low <= value and (high is None or value <= high)):
            said = f"between {low} and {high}" if high is not None else f">= {low}"
            raise InputError(f"dataset '{info.name}': data.kwargs.{option} must be {said}, got {value!r}")
    jitter = aug.get("color_jitter") or 0.0  # timm's: one number, or a list of 3 (or 4: + hue)
    parts = jitter if isinstance(jitter, (list, tuple)) and len(jitter) in (3, 4) else [jitter]
    if not all(isinstance(p, (int, float)) and not isinstance(p, bool) and p >= 0 for p in parts):
        raise InputError(
            f"dataset '{info.name}': data.kwargs.color_jitter takes a number >= 0 (brightness, contrast and "
            f"saturation) or a list of 3 such numbers (one each), or 4 (+ hue, <= 0.5); got {jitter!r}"
        )
    # how timm's create_transform(..., is_training=False) resizes and crops (its own defaults: centre crop)
    eval_info = replace(
        info,
        crop_pct=DEFAULT_CROP_PCT if crop is None else float(crop),
        crop_mode=aug.get("crop_mode") or "center",
        interpolation=aug["interpolation"],
    )
    try:
        transform = create_transform(size, is_training=augment, mean=info.mean, std=info.std, **aug)
    except (KeyError, IndexError, TypeError, ValueError, AssertionError) as e:  # timm's own checks, if any
        raise InputError(
            f"dataset '{info.name}': timm's create_transform cannot build from these options ({type(e).__name__}: "
            f"{e}); check the values data.kwargs and the aug section set (interpolation: bicubic, bilinear or "
            "nearest; scale and ratio: two numbers each)"
        ) from None
    return augment, transform, eval_info


@register_dataset("folder", info=folder_info)
def build_folder(
    split: str,
    *,
    root: str | None = None,
    img_size: int | None = None,
    in_chans: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    seed: int = 0,
    augment: bool | None = None,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    hflip: float = 0.5,
    color_jitter: float | Sequence[float] = 0.0,
    auto_augment: str | None = None,
    re_prob: float = 0.0,
    re_mode: str = "const",
    re_count: int = 1,
    interpolation: str = "bicubic",
    crop_pct: float = 0.875,
    crop_mode: str = "center",
    labels: bool = True,
    val_split: str | None = None,
    class_map: str | Sequence[str] | None = None,
) -> FolderDataset:
    """Folder split. Train (``augment`` defaults to ``split == 'train'``): timm's RandomResizedCrop
    (``scale``, ``ratio``), ``hflip``, ``color_jitter``, ``auto_augment`` (e.g. 'rand-m9-mstd0.5-inc1'),
    random erasing ``re_prob`` / ``re_mode`` (const, rand, pixel) / ``re_count``. Eval: resize to img_size / crop_pct,
    then timm's ``crop_mode`` (center: a centre crop; squash: the whole image resized; border).
    ``labels=False``: every image under the split folder, as ``(x,)`` samples (`ImageFiles`). ``val_split``:
    the val split's folder where it is neither val/ nor validation/ (test/, valid/), as timm's ``--val-split``.
    ``class_map``: the classes read, in the order of their indices (`folder_info`); the others' images are not."""
    # train's classes: a train folder without them is refused first
    default = folder_info(root, labels, class_map=class_map)
    # a missing split folder is refused before anything is built
    split_dir = _split_dir(root, split, val_split if split == "val" else None)
    info = built_info("folder", default, img_size, in_chans, mean, std, grayscale_or_rgb=True)
    augment, transform, info = timm_transform(
        split,
        augment,
        info,
        scale=scale,
        ratio=ratio,
        hflip=hflip,
        color_jitter=color_jitter,
        auto_augment=auto_augment,
        re_prob=re_prob,
        re_mode=re_mode,
        re_count=re_count,
        interpolation=interpolation,
        crop_pct=crop_pct,
        crop_mode=crop_mode,
    )
    classes = info.class_names or ()
    # a class map's folders alone are read, with labels or without (a label-free conversion on ImageNet-100)
    only = None if class_map is None else classes if labels else _mapped_classes(class_map, root)
    images = _split_images(split, split_dir, root, classes, labels, info.in_chans, transform, only)
    return FolderDataset(images, info, seed=seed, deterministic=augment, strict=split == "val")


#: the transform options whose defaults are folder's own, not timm's create_transform's (bilinear, a 0.4
#: colour jitter): every source that "gets folder's transforms" starts from these
_FOLDER_TRANSFORM_OPTIONS = (
    "scale",
    "ratio",
    "hflip",
    "color_jitter",
    "interpolation",
    "crop_pct",
    "crop_mode",
)


def _split_images(
    split: str,
    split_dir: Path,
    root: str,
    classes: Sequence[str],
    labels: bool,
    in_chans: int,
    transform: Callable,
    only: Sequence[str] | None = None,
) -> Any:
    """timm's dataset of the images in ``split_dir`` (class folders mapped to train's indices where ``labels``;
    ``only``: the class folders whose images alone are read); a split with classes train lacks, with no image,
    or with images outside every class folder is refused."""
    from timm.data import ImageDataset, get_img_extensions  # keeps `import attnxfer.data` light

    class_map = {c: i for i, c in enumerate(classes)}  # val uses train's indices even if it lacks a class
    stray = sorted(d.name for d in split_dir.iterdir() if _is_class_dir(d) and d.name not in class_map)
    if stray and labels and only is None:
        raise InputError(f"'{split_dir}' has classes {stray} that '{_split_dir(root, 'train')}' lacks")
    extensions = get_img_extensions(as_set=True)
    reader = ImageFiles(split_dir, extensions, class_map if labels else None)
    if only is not None:  # the classes a class map leaves out: their images are not read (a loose file is)
        kept = [i for i, f in enumerate(reader.files) if len(f.parts) == 1 or f.parts[0] in only]
        reader.files, reader.targets = [reader.files[i] for i in kept], [reader.targets[i] for i in kept]
    if not reader.files:
        raise MissingPathError(
            f"no images ({', '.join(sorted(extensions))}) under '{split_dir}'; expected the layout {_LAYOUT}"
        )
    if labels:
        loose = [reader.files[i] for i, target in enumerate(reader.targets) if target is None]
        if loose:  # the stray-class check above leaves only images outside every class folder unlabelled
            # ImageNet's val split as distributed: 50,000 files in one folder, their classes in a list beside
            imagenet = loose[0].name.startswith("ILSVRC2012_val_") and all(c[:1] == "n" for c in classes)
            how = " (ImageNet's val images: the first word of each row of Kaggle's LOC_val_solution.csv)"
            raise InputError(
                f"{len(loose)} image(s) of '{split_dir}' lie outside any class folder (e.g. '{loose[0]}'): "
                f"move them into their class's folder{how * imagenet} (data.labels=false reads them all, "
                "without classes)"
            )
        held = set(reader.targets)
        empty = [c for c, i in class_map.items() if i not in held]
        if split == "train" and empty:  # each would be a class of the head that no image teaches
            raise InputError(
                f"class folder(s) {empty} of '{split_dir}' hold no images ({', '.join(sorted(extensions))}): "
                "add images or remove the folder(s); every sub-folder of train is a class"
            )
    mode = "RGB" if in_chans == 3 else "L"
    return ImageDataset(str(split_dir), reader=reader, input_img_mode=mode, transform=transform)
