"""Named pretrained weights: one table, downloads checked against our own sha256, a cache that works offline.

Names are ``<model>.<tag>`` as timm writes them (``resnext50_32x4d.tv2_in1k``). Each entry records where the file
is, its sha256 (the full digest, or the prefix its publisher put in the file name), its licence, its published
ImageNet top-1 and where that figure is published, and the input convention it was trained with. Teams add their
own entries with :func:`register_weights` or a JSON file named by ``$RESNEXT_BACKBONES_REGISTRY``.

Environment:

- ``RESNEXT_BACKBONES_CACHE``: the cache folder (default ``~/.cache/resnext_backbones/weights``).
- ``RESNEXT_BACKBONES_OFFLINE=1``: never download; use the cache, or fail naming the exact path to put the file at.
- ``RESNEXT_BACKBONES_REGISTRY``: a JSON file ``{"<model>.<tag>": {"url": ..., "sha256": ..., ...}, ...}``, or
  the same in YAML (``.yaml``/``.yml``, read with PyYAML).

Sources of the built-in table (looked up 2026-11-25 in stored copies of each project):
torchvision ``torchvision/models/resnet.py`` (``*_Weights``: url, ``_metrics``, transforms); timm
``timm/models/resnet.py`` (``default_cfgs``: origin url, licence, test size) and ``results/results-imagenet.csv``
(top-1); Hugging Face blob pages of ``timm/<name>`` ("Git LFS Details", full sha256 of ``model.safetensors`` at
the pinned revision); mmpretrain ``configs/resnext/metafile.yml``; detectron2 ``MODEL_ZOO.md`` and
``configs/COCO-InstanceSegmentation/mask_rcnn_X_101_32x8d_FPN_3x.yaml``.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import urllib.error
import urllib.parse
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple, Union

from .files import PathLike, WeightsError, atomic_write, check_sha256, checked_sha256
from .trunk import IMAGENET_MEAN, IMAGENET_STD, MODELS, ResNeXtSpec

__all__ = ["WeightsEntry", "register_weights", "list_weights", "weights_info", "get_entry", "resolve", "fetch",
           "cache_dir", "PERMISSIVE_LICENSES"]

log = logging.getLogger("resnext_backbones")

PERMISSIVE_LICENSES = ("bsd-3-clause", "apache-2.0", "mit")
_FILE_SUFFIXES = (".pth", ".pt", ".pkl", ".safetensors", ".ckpt", ".bin")  # a missing one is a missing file


@dataclass(frozen=True)
class WeightsEntry:
    """One named set of weights. ``mean``/``std`` are in the publisher's convention: ``input_format`` channel
    order, on a ``pixel_range`` of 1 (images in [0, 1]) or 255; :meth:`normalization` gives the RGB [0, 1] form
    that the trunk takes once loaded (detectron2's BGR stems are flipped to RGB on loading)."""

    name: str
    url: str
    sha256: Optional[str]  # full hex digest, or the publisher's prefix (>= 8 hex digits); None: unknown
    source: str  # the ecosystem whose file layout this is: torchvision | timm | mmpretrain | detectron2 | ...
    license: str
    top1: Optional[float] = None
    top1_source: str = ""
    mean: Tuple[float, ...] = IMAGENET_MEAN
    std: Tuple[float, ...] = IMAGENET_STD
    input_format: str = "RGB"
    pixel_range: float = 1.0
    resize: int = 256
    crop: int = 224
    notes: str = ""
    file_hints: Dict[str, object] = field(default_factory=dict, compare=False)  # what the file itself does not say

    @property
    def model(self) -> str:
        return self.name.split(".", 1)[0]

    @property
    def tag(self) -> str:
        return self.name.split(".", 1)[1]

    @property
    def file_name(self) -> str:
        return Path(urllib.parse.urlparse(self.url).path).name

    def normalization(self) -> Dict[str, Tuple[float, ...]]:
        """``mean``/``std`` for RGB images in [0, 1], the form the loaded trunk takes."""
        order = slice(None, None, -1) if self.input_format == "BGR" else slice(None)
        return {"mean": tuple(m / self.pixel_range for m in self.mean[order]),
                "std": tuple(s / self.pixel_range for s in self.std[order])}

    def info(self) -> dict:
        return {**asdict(self), "model": self.model, "normalization_rgb01": self.normalization()}

    def __post_init__(self) -> None:
        if self.input_format not in ("RGB", "BGR"):
            raise ValueError(f"weights {self.name!r}: input_format={self.input_format!r} must be 'RGB' or 'BGR'")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"weights {self.name!r}: mean and std need 3 values each, got {self.mean}, {self.std}")


def _tv(name: str, file: str, top1: float, v2: bool) -> WeightsEntry:
    return WeightsEntry(
        name, f"https://download.pytorch.org/models/{file}", file.rsplit("-", 1)[1].split(".")[0], "torchvision",
        "bsd-3-clause", top1, "torchvision/models/resnet.py _metrics['ImageNet-1K']['acc@1'] (resize "
        f"{232 if v2 else 256}, crop 224)", resize=232 if v2 else 256,
        notes="torchvision IMAGENET1K_" + ("V2" if v2 else "V1") + "; the same weights as timm's "
              + ("tv2_in1k" if v2 else "tv_in1k") + " tag. Licence: torchvision's code licence (BSD-3-Clause), "
              "as timm labels them; torchvision says weights may carry terms of their training data.")


def _timm(name: str, url: str, sha256: str, top1: float, size: int, crop_pct: float, license: str = "apache-2.0",
          notes: str = "") -> WeightsEntry:
    return WeightsEntry(name, url, sha256, "timm", license, top1,
                        f"timm results/results-imagenet.csv (img_size {size}, crop_pct {crop_pct})",
                        resize=round(size / crop_pct), crop=size, notes=notes)


_HF = "https://huggingface.co/timm/{}/resolve/{}/model.safetensors"
_FB = "https://dl.fbaipublicfiles.com/semiweaksupervision/model_files/"
_NC = ("CC-BY-NC 4.0: non-commercial use only (timm license='cc-by-nc-4.0'; Yalniz et al. 2019 / Mahajan et al. "
       "2018 release terms).")
_MM = "https://download.openmmlab.com/mmclassification/v0/resnext/"

_BUILTIN: List[WeightsEntry] = [
    _tv("resnext50_32x4d.tv_in1k", "resnext50_32x4d-7cdf4587.pth", 77.618, v2=False),
    _tv("resnext50_32x4d.tv2_in1k", "resnext50_32x4d-1a0047aa.pth", 81.198, v2=True),
    _tv("resnext101_32x8d.tv_in1k", "resnext101_32x8d-8ba56ff5.pth", 79.312, v2=False),
    _tv("resnext101_32x8d.tv2_in1k", "resnext101_32x8d-110c445d.pth", 82.834, v2=True),
    _tv("resnext101_64x4d.tv_in1k", "resnext101_64x4d-173b62eb.pth", 83.246, v2=True),  # the new recipe
    _tv("resnet50.tv_in1k", "resnet50-0676ba61.pth", 76.130, v2=False),
    _tv("resnet50.tv2_in1k", "resnet50-11ad3fa6.pth", 80.858, v2=True),
    _tv("resnet101.tv_in1k", "resnet101-63fe2227.pth", 77.374, v2=False),
    _tv("resnet101.tv2_in1k", "resnet101-cd907fc2.pth", 81.886, v2=True),
    # timm's own training runs ("ResNet strikes back", Wightman et al. 2021), from the Hugging Face hub at a pinned
    # revision with the full digest of model.safetensors, or from timm's release file (digest prefix in its name).
    _timm("resnext50_32x4d.a1h_in1k",
          _HF.format("resnext50_32x4d.a1h_in1k", "8af8dd95e2a7538fad74714fc76507d9de9de33c"),
          "b952952a7b3e856b16ebf82fb44d2aa8c502e73ec678976c9e3b970fcd530bd5", 82.016, 288, 1.0),
    _timm("resnext50_32x4d.a2_in1k",
          _HF.format("resnext50_32x4d.a2_in1k", "1e2fad8de183cfcac6c58dab7f6b519e8d1ffd38"),
          "4b4522bcca81d90e486f8cfb92213597b899d68764ce5fc08db37e3352e02a7d", 81.304, 288, 1.0),
    _timm("resnext50_32x4d.a3_in1k",
          _HF.format("resnext50_32x4d.a3_in1k", "97dff44c340d0f00933a0659edc8ccb444cef692"),
          "55480d1612cf33904614f2a3891a0853022cb78c95a3ad734e185ae6575ee545", 79.258, 224, 0.95),
    _timm("resnext50_32x4d.ra_in1k",
          "https://github.com/huggingface/pytorch-image-models/releases/download/v0.1-weights/"
          "resnext50_32x4d_ra-d733960d.pth", "d733960d", 80.720, 288, 0.95),
    _timm("resnext50_32x4d.fb_swsl_ig1b_ft_in1k", _FB + "semi_weakly_supervised_resnext50_32x4-72679e44.pth",
          "72679e44", 82.162, 224, 0.875, "cc-by-nc-4.0", _NC),
    _timm("resnext50_32x4d.fb_ssl_yfcc100m_ft_in1k", _FB + "semi_supervised_resnext50_32x4-ddb3e555.pth",
          "ddb3e555", 80.316, 224, 0.875, "cc-by-nc-4.0", _NC),
    _timm("resnext101_32x8d.fb_wsl_ig1b_ft_in1k", "https://download.pytorch.org/models/ig_resnext101_32x8-c38310e5.pth",
          "c38310e5", 82.720, 224, 0.875, "cc-by-nc-4.0", _NC),
    _timm("resnext101_32x8d.fb_swsl_ig1b_ft_in1k", _FB + "semi_weakly_supervised_resnext101_32x8-b4712904.pth",
          "b4712904", 84.276, 224, 0.875, "cc-by-nc-4.0", _NC),
    _timm("resnext101_32x8d.fb_ssl_yfcc100m_ft_in1k", _FB + "semi_supervised_resnext101_32x8-2cfe2f8b.pth",
          "2cfe2f8b", 81.620, 224, 0.875, "cc-by-nc-4.0", _NC),
    # mmpretrain: the only public ImageNet weights for the 101-32x4d and 152-32x4d specs (0-255 RGB means).
    *(WeightsEntry(f"{model}.mmpretrain_in1k", _MM + file, file.rsplit("-", 1)[1].split(".")[0], "mmpretrain",
                   "apache-2.0", top1, "mmpretrain configs/resnext/metafile.yml (resize 256, crop 224)",
                   mean=(123.675, 116.28, 103.53), std=(58.395, 57.12, 57.375), pixel_range=255.0,
                   notes="mmpretrain/mmcls release (style='pytorch': stride in the 3x3); licence of the repository")
      for model, file, top1 in [
          ("resnext50_32x4d", "resnext50_32x4d_b32x8_imagenet_20210429-56066e27.pth", 77.90),
          ("resnext101_32x4d", "resnext101_32x4d_b32x8_imagenet_20210506-e0fa3dd5.pth", 78.61),
          ("resnext101_32x8d", "resnext101_32x8d_b32x8_imagenet_20210506-23a247d5.pth", 79.27),
          ("resnext152_32x4d", "resnext152_32x4d_b32x8_imagenet_20210524-927787be.pth", 78.88)]),
    # detectron2's ImageNet trunk for its X101-FPN recipes: trained with Caffe2 at FB, BGR input, 0-255 pixel means.
    WeightsEntry("resnext101_32x8d.d2_in1k",
                 "https://dl.fbaipublicfiles.com/detectron2/ImageNetPretrained/FAIR/X-101-32x8d.pkl", None,
                 "detectron2", "cc-by-sa-3.0", None, "detectron2 MODEL_ZOO.md publishes no ImageNet accuracy",
                 mean=(103.530, 116.280, 123.675), std=(57.375, 57.120, 58.395), input_format="BGR",
                 pixel_range=255.0, resize=800, crop=800,
                 file_hints={"stride_in_1x1": False, "input_format": "BGR"},
                 notes="detectron2 publishes no digest for this file: pass expected_sha256= after checking it "
                       "yourself. STRIDE_IN_1X1=False ('a C2 model'); models in MODEL_ZOO.md are CC BY-SA 3.0."),
]

_registry: Dict[str, WeightsEntry] = {e.name: e for e in _BUILTIN}
_loaded_registry_file: Optional[str] = None


def register_weights(name: str, url: str, sha256: Optional[str], *, overwrite: bool = False, **info) -> WeightsEntry:
    """Add ``name`` (``<model>.<tag>``, the model one of :func:`~resnext_backbones.list_models`) to the registry, so
    that ``weights=name`` downloads ``url`` (``https://``, ``http://`` or ``file://``) once, checks its ``sha256``
    (the full digest, or a prefix of at least 8 hex characters) and caches it. ``info``: any other
    :class:`WeightsEntry` field (``license``, ``mean``, ``std``, ``input_format``, ``pixel_range``, ``top1``, ...)."""
    model, _, tag = name.partition(".")
    if not tag or "." in tag:
        raise ValueError(f"weights name {name!r} must be '<model>.<tag>', e.g. 'resnext50_32x4d.acme_coco'")
    if model not in MODELS:
        raise ValueError(f"weights name {name!r}: {model!r} is not a model; known: {list(MODELS)}")
    if urllib.parse.urlparse(url).scheme not in ("https", "http", "file"):
        raise ValueError(f"weights {name!r}: url {url!r} must be https://, http:// or file://")
    if name in _registry and not overwrite:
        raise ValueError(f"weights {name!r} are already registered ({_registry[name].url}); pass overwrite=True to "
                         "replace them")
    known = [f.name for f in fields(WeightsEntry)][3:]  # all but name, url and sha256
    unknown = sorted(set(info) - set(known))
    if unknown:
        raise ValueError(f"weights {name!r}: unknown fields {unknown}; known: {known}")
    info = {k: tuple(v) if isinstance(v, list) else v for k, v in info.items()}
    entry = WeightsEntry(name=name, url=url, sha256=None if sha256 is None else checked_sha256(sha256, "sha256"),
                         source=info.pop("source", "user"), license=info.pop("license", "unknown"), **info)
    _registry[name] = entry
    return entry


def _table() -> Dict[str, WeightsEntry]:
    """The registry, with the entries of ``$RESNEXT_BACKBONES_REGISTRY`` (read again when the variable changes)."""
    global _loaded_registry_file
    path = os.environ.get("RESNEXT_BACKBONES_REGISTRY")
    if path and path != _loaded_registry_file:
        try:
            text = Path(path).read_text()
            if Path(path).suffix in (".yaml", ".yml"):
                import yaml  # PyYAML: only for registries written in YAML

                entries = yaml.safe_load(text)
            else:
                entries = json.loads(text)
        except Exception as e:  # noqa: BLE001 - unreadable, not JSON, not YAML (yaml.YAMLError), no PyYAML
            raise ValueError(f"RESNEXT_BACKBONES_REGISTRY={path!r}: cannot read it ({e}); it must be a JSON file, "
                             "or YAML (.yaml/.yml, needs PyYAML)") from None
        if not isinstance(entries, dict):
            raise ValueError(f"RESNEXT_BACKBONES_REGISTRY={path!r} must hold a JSON object of name -> entry")
        for name, entry in entries.items():
            try:
                register_weights(name, overwrite=True, **entry)
            except (TypeError, ValueError) as e:
                raise ValueError(f"RESNEXT_BACKBONES_REGISTRY={path!r}, entry {name!r}: {e}") from None
        _loaded_registry_file = path
    return _registry


def list_weights(model: Optional[str] = None) -> List[str]:
    """Registered weight names (``<model>.<tag>``), all of them or ``model``'s."""
    return [name for name, e in _table().items() if model is None or e.model == model]


def get_entry(name: str, model: Optional[str] = None) -> WeightsEntry:
    """The entry for ``name``: ``<model>.<tag>``, the tag alone when ``model`` is given, or ``DEFAULT`` (the
    best-top-1 entry of ``model`` under a permissive licence). Unknown names fail listing the close ones."""
    table = _table()
    if name == "DEFAULT":
        if model is None:
            raise ValueError("weights='DEFAULT' needs a model, e.g. resnext('resnext50_32x4d', weights='DEFAULT')")
        candidates = [e for e in table.values()
                      if e.model == model and e.license in PERMISSIVE_LICENSES and e.top1 is not None]
        if not candidates:
            raise ValueError(f"weights='DEFAULT': no weights for {model!r} under a permissive licence "
                             f"{list(PERMISSIVE_LICENSES)} with a published top-1; registered: {list_weights(model)}")
        return max(candidates, key=lambda e: e.top1)
    full = name if "." in name or model is None else f"{model}.{name}"
    if full in table:
        entry = table[full]
        if model is not None and entry.model != model:
            raise ValueError(f"weights {full!r} are for {entry.model!r}, not {model!r}; {model!r} has "
                             f"{list_weights(model)}")
        return entry
    close = difflib.get_close_matches(full, list(table), n=5, cutoff=0.6)
    raise ValueError(f"weights {name!r} are neither a file nor a registered name"
                     + (f" for {model!r}" if model else "")
                     + (f"; did you mean {close}?" if close else f"; registered: {list_weights(model)}"))


def weights_info(name: str) -> dict:
    """Everything the registry knows of ``name``: url, sha256 (full or the publisher's prefix), source ecosystem,
    licence, top-1 and where it is published, mean/std and channel order as published and as RGB in [0, 1]
    (``normalization_rgb01``), eval resize/crop, notes."""
    return get_entry(name).info()


def model_of(spec: ResNeXtSpec) -> Optional[str]:
    """The name of ``spec`` in the table of models, if it has one."""
    return next((name for name, s in MODELS.items() if s == spec), None)


def resolve(weights: Union[PathLike, Mapping], model: Optional[str] = None,
            expected_sha256: Optional[str] = None) -> Tuple[Union[PathLike, Mapping], Optional[WeightsEntry]]:
    """``(a local file or the given mapping, the registry entry it came from or None)``: an existing file is taken
    as is; anything else must be a registered name, fetched (downloaded once, verified, cached)."""
    if isinstance(weights, Mapping) or Path(weights).is_file():
        return weights, None
    try:
        entry = get_entry(str(weights), model)
    except ValueError as e:
        if os.sep in str(weights) or Path(weights).suffix in _FILE_SUFFIXES:  # meant as a file
            raise WeightsError(f"weights file {str(weights)!r} does not exist") from None
        raise WeightsError(str(e)) from None
    return fetch(entry, expected_sha256), entry


def cache_dir() -> Path:
    """``$RESNEXT_BACKBONES_CACHE``, else ``~/.cache/resnext_backbones/weights``."""
    return Path(os.environ.get("RESNEXT_BACKBONES_CACHE") or Path.home() / ".cache/resnext_backbones/weights")


def cached_path(entry: WeightsEntry) -> Path:
    """Where ``entry``'s file lives in the cache: a folder per name (hub files are all called model.safetensors)."""
    return cache_dir() / entry.name / entry.file_name


def _offline() -> bool:
    return os.environ.get("RESNEXT_BACKBONES_OFFLINE", "").strip().lower() not in ("", "0", "false", "no")


def fetch(entry: WeightsEntry, expected_sha256: Optional[str] = None, *, progress: bool = True) -> Path:
    """The verified local file of ``entry``. From the cache if there (checked again: a file put there by hand is
    verified too); else downloaded with a progress bar to a temporary file beside its place in the cache, whose
    sha256 we compute and compare before it is renamed into place. A file lock lets only one process per machine
    download (DDP ranks, workers); the others wait and then read the cache."""
    from filelock import FileLock

    pinned = expected_sha256 or entry.sha256
    if pinned is None:
        raise WeightsError(f"weights {entry.name!r}: no sha256 is published for {entry.url}, so the file cannot be "
                           "verified. Check it yourself and pass expected_sha256='<its sha256>' (sha256sum FILE)")
    target = cached_path(entry)
    if not target.is_file():
        if _offline():
            raise WeightsError(f"weights {entry.name!r} are not in the cache and RESNEXT_BACKBONES_OFFLINE is set: "
                               f"download {entry.url} and put it at {target}")
        target.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(target.parent / f".{target.name}.lock")):
            if not target.is_file():  # else another process fetched it while this one waited
                _download(entry, target, pinned, progress)
    check_sha256(target, pinned, source=f"the cached file {target} of {entry.name!r} (delete it to download again)")
    return target


def _download(entry: WeightsEntry, target: Path, pinned: str, progress: bool) -> None:
    import torch.hub

    log.info("downloading %s from %s to %s", entry.name, entry.url, target)
    with atomic_write(target) as partial:  # readable by the other users of a cache, as a plain download would be
        try:
            torch.hub.download_url_to_file(entry.url, str(partial), progress=progress)
        except (urllib.error.URLError, OSError) as e:
            raise WeightsError(f"cannot download weights {entry.name!r} from {entry.url} ({e}). Without network, "
                               f"download it elsewhere and put it at {target}") from None
        check_sha256(partial, pinned, source=f"the download of {entry.url}")
