"""``python -m tasks.data convert SRC --to coco OUT.json``: detection labels in any form the data module reads
(:mod:`tasks.data.label_formats`), written as one COCO file."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Optional, Sequence

from resnext_backbones.files import atomic_write

from .coco import CocoIndex
from .label_formats import FORMATS, detect_format, read_labels, to_coco


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tasks.data", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser("convert", help="write detection labels as a COCO file")
    convert.add_argument("source", help="COCO .json, YOLO data.yaml or names list, VOC ImageSets/Main/<split>.txt "
                                        "or Annotations/ folder")
    convert.add_argument("--images", help="the images folder (YOLO: .../images/<split>; VOC: default the "
                                          "JPEGImages/ beside Annotations/); COCO file_names are relative to it")
    convert.add_argument("--format", choices=FORMATS, help="the source's form (default: detected)")
    convert.add_argument("--classes", nargs="+", help="VOC class names in id order (default: the sorted names found)")
    convert.add_argument("--to", choices=["coco"], required=True, help="the form to write")
    convert.add_argument("output", help="the COCO .json file to write")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    images = args.images
    if images is None:
        if (args.format or detect_format(args.source)[0]) != "voc":
            parser.error("--images is needed for COCO and YOLO labels (the folder of the images they name)")
        source = Path(args.source)
        annotations = source if source.is_dir() else source.parent.parent.parent / "Annotations"
        images = str(annotations.parent / "JPEGImages")
    data, format = read_labels(args.source, images, args.format, args.classes, key="convert")
    CocoIndex.from_coco(data, args.source)  # the data module's checks, before anything is written
    with atomic_write(args.output) as temporary:
        temporary.write_text(json.dumps(to_coco(data)))
    print(f"wrote {len(data['images'])} images, {len(data['annotations'])} annotations, "
          f"{len(data['categories'])} categories ({format} -> coco) to {args.output}")


if __name__ == "__main__":
    main()
