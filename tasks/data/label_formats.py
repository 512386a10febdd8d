"""Detection labels in COCO, YOLO and Pascal VOC form, read into the one index (:class:`~tasks.data.coco.CocoIndex`).

Each reader turns its files into the content of a COCO file (``images``, ``annotations``, ``categories``), every
annotation carrying a ``source`` (``labels/train/a.txt line 3``); :meth:`CocoIndex.from_coco` then makes the checks
and messages of a COCO file, naming that file and line instead of an annotation id. So there is one index and one
set of checks, and ``python -m tasks.data convert`` writes what the readers read.

Category ids, stable across runs and kept in the checkpoint's label map (as the data's categories always are):

- YOLO: the class number of the label files (``0..N-1``), named by ``names`` of the ``data.yaml`` (a list, or a
  mapping of numbers to names) or by the names file (one a line, the first is class 0).
- VOC: ``1..N`` in the order of ``data.classes`` if given, else of the sorted names found in every file of
  ``Annotations/`` (the same for every split).

YOLO label files are found as ultralytics finds them: the image's path with its last ``/images/`` turned into
``/labels/`` and the suffix into ``.txt``; an image without one has no objects. A line ``class cx cy w h`` is a box
(centre and size, fractions of the image's width and height); a longer one, ``class x1 y1 x2 y2 ...``, a polygon
(fractions too), which gives the instance its mask and its box. VOC boxes are 1-based pixel indices, as VOC's
development kit writes them: ``xmin - 1, ymin - 1, xmax, ymax`` in pixels (as detectron2 reads them); an object
``difficult`` is COCO's crowd: left out of training, ignored by evaluation.
"""

from __future__ import annotations

import json
import logging
import xml.parsers.expat
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple
from xml.etree import ElementTree

from .coco import CocoIndex
from .image_files import IMAGE_SUFFIXES
from .images import CorruptImageError, image_size

log = logging.getLogger("tasks")

FORMATS = ("coco", "yolo", "voc")


def detect_format(annotations: str) -> Tuple[str, str]:
    """``(format, why)`` of an annotation path: a ``.json`` file is COCO; a ``.yaml``/``.yml`` file (a YOLO
    ``data.yaml``) or another text file (a YOLO names list) is YOLO, except a text file in ``ImageSets/Main/`` (a VOC
    image set); a folder of ``.xml`` files is VOC's ``Annotations/``."""
    path = Path(annotations)
    if path.is_dir():
        if any(path.glob("*.xml")):
            return "voc", "a folder of .xml files"
    elif path.suffix.lower() == ".json":
        return "coco", "a .json file"
    elif path.suffix.lower() in (".yaml", ".yml"):
        return "yolo", "a .yaml file"
    elif path.parent.name == "Main" and path.parent.parent.name == "ImageSets":
        return "voc", "a file in ImageSets/Main/"
    elif path.is_file():
        return "yolo", "a names list (a text file, not in ImageSets/Main/)"
    raise ValueError(f"cannot tell the label format of {annotations!r}: give a COCO .json file, a YOLO data.yaml or "
                     "names list, or a VOC ImageSets/Main/<split>.txt or Annotations/ folder, or set data.format "
                     f"to one of {list(FORMATS)}")


def read_coco(annotations: str, images: str, classes: Optional[Sequence[str]], skip_missing: bool) -> dict:
    path = Path(annotations)
    if not path.is_file():
        raise FileNotFoundError(f"annotation file {str(path)!r} does not exist")
    try:
        return json.loads(path.read_bytes())
    except ValueError as e:
        raise ValueError(f"{path}: not a JSON file ({e})") from None


# -- YOLO
def yolo_names(annotations: str) -> List[str]:
    """Class names of a YOLO ``data.yaml`` (``names``: a list, or ``{number: name}`` numbered 0..N-1) or names list."""
    path = Path(annotations)
    if path.suffix.lower() not in (".yaml", ".yml"):
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    import yaml

    names = (yaml.safe_load(path.read_text()) or {}).get("names")
    if isinstance(names, dict):
        if sorted(int(k) for k in names) != list(range(len(names))):
            raise ValueError(f"{path}: 'names' numbers {sorted(names)} must be 0..{len(names) - 1}")
        names = [names[k] for k in sorted(names, key=int)]
    if not isinstance(names, list) or not names:
        raise ValueError(f"{path}: a YOLO data.yaml needs 'names', a list of class names (class 0 first) or a mapping "
                         "of class numbers to names")
    return [str(n) for n in names]


def yolo_label_path(image: Path) -> Path:
    """The label file of an image, as ultralytics finds it: its last ``/images/`` turned into ``/labels/``."""
    head, sep, tail = str(image).rpartition("/images/")
    if not sep:
        raise ValueError(f"{image}: YOLO label files are found by turning the last /images/ of an image's path into "
                         "/labels/; put the images in a folder named images (e.g. data/images/train, with "
                         "data/labels/train beside it)")
    return Path(head + "/labels/" + tail).with_suffix(".txt")


def read_yolo(annotations: str, images: str, classes: Optional[Sequence[str]], skip_missing: bool) -> dict:
    names = yolo_names(annotations)
    root = Path(images).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"data: YOLO images {images!r} is not a folder; give the images folder "
                                "(.../images/train, with the labels in .../labels/train)")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    label_root = yolo_label_path(root / "x").parent
    orphans = sorted(set(label_root.rglob("*.txt")) - {yolo_label_path(f) for f in files})
    if orphans:
        message = (f"data: {len(orphans)} YOLO label files have no image in {root} (first: "
                   f"{[str(p) for p in orphans[:5]]})")
        if not skip_missing:
            raise FileNotFoundError(f"{message}. Add or remove them, or set data.skip_missing_images: true")
        log.warning("%s; left out (data.skip_missing_images)", message)
    coco_images, anns = [], []
    for image_id, file in enumerate(files, start=1):
        try:
            height, width = image_size(file)
        except CorruptImageError:
            height, width = 0, 0  # check_image_files names it
        coco_images.append({"id": image_id, "file_name": str(file.relative_to(root)), "height": height,
                            "width": width})
        label = yolo_label_path(file)
        if label.is_file():
            anns += _yolo_objects(label, image_id, width, height, len(anns))
    return {"images": coco_images, "annotations": anns,
            "categories": [{"id": i, "name": n} for i, n in enumerate(names)]}


def _yolo_objects(label: Path, image_id: int, width: int, height: int, first_id: int) -> List[dict]:
    objects = []
    for number, line in enumerate(label.read_text().splitlines(), start=1):
        values = line.split()
        if not values:
            continue
        where = f"{label} line {number}"
        try:
            category, coordinates = int(values[0]), [float(v) for v in values[1:]]
        except ValueError:
            raise ValueError(f"{where}: {line.strip()!r} is not 'class cx cy w h' or 'class x1 y1 x2 y2 ...' "
                             "(a class number, then fractions of the image's size)") from None
        if len(coordinates) == 4:
            cx, cy, w, h = coordinates
            bbox, segmentation = [(cx - w / 2) * width, (cy - h / 2) * height, w * width, h * height], None
        elif len(coordinates) >= 6 and len(coordinates) % 2 == 0:
            xs, ys = [x * width for x in coordinates[0::2]], [y * height for y in coordinates[1::2]]
            bbox = [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]
            segmentation = [[v for xy in zip(xs, ys, strict=True) for v in xy]]
        else:
            raise ValueError(f"{where}: {len(values)} numbers; a box line has 5 (class cx cy w h), a polygon line "
                             "an odd number of at least 7 (class x1 y1 x2 y2 x3 y3 ...)")
        objects.append({"id": first_id + len(objects) + 1, "image_id": image_id, "category_id": category,
                        "bbox": bbox, "area": bbox[2] * bbox[3], "iscrowd": 0, "source": where,
                        **({} if segmentation is None else {"segmentation": segmentation})})
    return objects


# -- Pascal VOC
def voc_annotation_files(annotations: str) -> Tuple[Path, List[Path]]:
    """``(Annotations folder, the split's .xml files)`` of an ``ImageSets/Main/<split>.txt`` or an ``Annotations/``
    folder (every ``.xml`` in it)."""
    path = Path(annotations)
    if path.is_dir():
        return path, sorted(path.glob("*.xml"))
    folder = path.parent.parent.parent / "Annotations"
    ids = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    files = [folder / f"{i}.xml" for i in ids]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"{path}: {len(missing)} listed ids have no annotation file (first: {missing[:5]}); "
                                "fix the list or add the files")
    return folder, files


def _parse_xml(path: Path) -> ElementTree.Element:
    """An XML file as an ElementTree whose elements carry their line (attribute ``_line``), for messages."""
    builder, parser = ElementTree.TreeBuilder(), xml.parsers.expat.ParserCreate()
    parser.StartElementHandler = lambda tag, attrs: builder.start(tag, {**attrs,
                                                                        "_line": str(parser.CurrentLineNumber)})
    parser.EndElementHandler = builder.end
    parser.CharacterDataHandler = builder.data
    try:
        parser.Parse(path.read_bytes(), True)
    except xml.parsers.expat.ExpatError as e:
        raise ValueError(f"{path}: not an XML file ({e})") from None
    return builder.close()


def _text(element: ElementTree.Element, tag: str, path: Path, cast: Callable = str):
    child = element.find(tag)
    try:
        return cast(child.text.strip())
    except (AttributeError, ValueError):
        raise ValueError(f"{path} line {element.get('_line')}: <{element.tag}> needs a <{tag}> "
                         f"({cast.__name__}); fix the file") from None


def voc_classes(folder: Path) -> List[str]:
    """The sorted object names of every annotation file in ``folder``."""
    return sorted({_text(o, "name", f) for f in folder.glob("*.xml") for o in _parse_xml(f).iter("object")})


def read_voc(annotations: str, images: str, classes: Optional[Sequence[str]], skip_missing: bool) -> dict:
    folder, files = voc_annotation_files(annotations)
    names = list(classes) if classes else voc_classes(folder)
    ids = {name: i for i, name in enumerate(names, start=1)}
    coco_images, anns = [], []
    for image_id, file in enumerate(files, start=1):
        root = _parse_xml(file)
        name = root.find("filename")
        size = root.find("size")
        coco_images.append({"id": image_id, "file_name": name.text.strip() if name is not None else file.stem + ".jpg",
                            "height": _text(size, "height", file, int) if size is not None else 0,
                            "width": _text(size, "width", file, int) if size is not None else 0})
        for obj in root.iter("object"):
            where = f"{file} line {obj.get('_line')}"
            box = obj.find("bndbox")
            if box is None:
                raise ValueError(f"{where}: <object> needs a <bndbox>; fix the file")
            x0, y0, x1, y1 = (_text(box, k, file, float) for k in ("xmin", "ymin", "xmax", "ymax"))
            label = _text(obj, "name", file)
            difficult = obj.find("difficult")
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": ids.get(label, label),
                         "bbox": [x0 - 1, y0 - 1, x1 - x0 + 1, y1 - y0 + 1], "area": (x1 - x0 + 1) * (y1 - y0 + 1),
                         "iscrowd": int(difficult is not None and (difficult.text or "0").strip() == "1"),
                         "source": where})
    return {"images": coco_images, "annotations": anns,
            "categories": [{"id": i, "name": n} for n, i in ids.items()]}


READERS: Dict[str, Callable[..., dict]] = {"coco": read_coco, "yolo": read_yolo, "voc": read_voc}


def read_labels(annotations: str, images: str, format: Optional[str] = None, classes: Optional[Sequence[str]] = None,
                skip_missing: bool = False, key: str = "data") -> Tuple[dict, str]:
    """``(COCO content, format)`` of a detection label source in any of :data:`FORMATS` (``None``: detected, and
    the detection logged)."""
    if format is None:
        format, why = detect_format(annotations)
        log.info("%s: %s read as %s labels (%s; set data.format to choose)", key, annotations, format, why)
    elif format not in READERS:
        raise ValueError(f"data.format={format!r}; choose one of {list(FORMATS)}, or leave it unset to detect it")
    if classes is not None and format != "voc":
        raise ValueError(f"data.classes names VOC's classes; {format} labels name their own "
                         f"({'the categories of the file' if format == 'coco' else 'names of the data.yaml'})")
    return READERS[format](annotations, images, classes, skip_missing), format


def read_index(annotations: str, images: str, format: Optional[str] = None, masks: Optional[bool] = False,
               classes: Optional[Sequence[str]] = None, skip_missing: bool = False, key: str = "data") -> CocoIndex:
    """The index of a label source in any of :data:`FORMATS`, checked as a COCO file is."""
    data, format = read_labels(annotations, images, format, classes, skip_missing, key)
    return CocoIndex.from_coco(data, str(annotations), masks)


def to_coco(data: dict) -> dict:
    """The COCO file of a reader's content: the same, without the readers' ``source`` notes."""
    anns = [{k: v for k, v in a.items() if k != "source"} for a in data["annotations"]]
    return {"images": data["images"], "annotations": anns, "categories": data["categories"]}
