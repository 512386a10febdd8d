"""Every ```python block of README.md and docs/*.md runs, one test each, named by the file and the line of its fence
(``docs/inference-and-export.md:42``); a failing block's traceback points at its lines in the Markdown file.

The blocks of one file run in order in one namespace shared by that file, so a page may build a model in one block
and use it in the next; run alone (``pytest "tests/end_to_end/test_docs.py::test_block[docs/sharing.md:42]"``), a
block first runs the blocks above it. Each file's blocks run in a temporary working directory of their own, with
RESNEXT_BACKBONES_CACHE and RESNEXT_BACKBONES_DATA in temporary folders and RESNEXT_BACKBONES_OFFLINE=1, so nothing
reaches the network or the home folder; weights a block registers and warning filters it sets end with the block.

A block that needs the network (downloading named weights) is marked by an HTML comment on the line right before its
fence, and is skipped as "needs the network" (pytest's summary counts the skips; ``-rs`` lists them)::

    <!-- docs-test: skip network -->
    ```python
    trunk = rb.resnext("resnext50_32x4d", weights="tv2_in1k")
    ```

A block that takes long (a whole detector exported to ONNX) is marked ``<!-- docs-test: slow -->`` and runs under
``-m slow`` only, as the suite's other long tests do; no later block may need what it defines.

Other fences (```bash, ```yaml, a bare ```) are shown, not run. The relative links of these files must lead to a file
and, with ``#anchor``, to one of its headings. Keep the blocks tiny (``rb.resnext("resnet18")``,
images of 64-128 px, detectors with ``min_size=128, max_size=160``): each should run in seconds on 2 CPU cores.
"""

from __future__ import annotations

import re
import textwrap
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import pytest
from helpers import REPO

DOC_FILES = ["README.md"] + sorted(p.relative_to(REPO).as_posix() for p in (REPO / "docs").glob("*.md"))
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^`\s]*)")
MARKER = re.compile(r"^\s*<!--\s*docs-test:\s*(?P<what>.*?)\s*-->\s*$")
SKIP_REASONS = {"skip network": "needs the network"}
SLOW = "slow"  # the mark of a block run only under -m slow (a whole-detector export); no later block may need it


@dataclass(frozen=True)
class Block:
    path: str  # relative to the repository: the test id and the traceback's file name
    line: int  # 1-based line of the opening fence
    code: str
    skip: Optional[str] = None  # the reason, when marked
    slow: bool = False  # marked slow: a test of its own under -m slow, never run as an earlier block of another

    @property
    def id(self) -> str:
        return f"{self.path}:{self.line}"


def extract(text: str, path: str) -> List[Block]:
    """The ```python blocks of Markdown ``text``, with their marks. A mark other than those of ``SKIP_REASONS`` is an
    error (a typo must not silently skip a block, nor a mark be left on a block it does not reach)."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            mark = MARKER.match(lines[i])
            if mark and not (i + 1 < len(lines) and FENCE.match(lines[i + 1])):
                raise ValueError(f"{path}:{i + 1}: a docs-test mark must be the line right before a ```python fence")
            i += 1
            continue
        fence, indent = opening["fence"], len(opening["indent"])
        end = i + 1
        while end < len(lines) and not re.match(rf"^[ \t]*{re.escape(fence[0]) * len(fence)}{fence[0]}*\s*$",
                                                lines[end]):
            end += 1
        mark = MARKER.match(lines[i - 1]) if i > 0 else None
        if opening["info"].lower() in ("python", "py"):
            skip = None
            if mark and mark["what"] != SLOW:
                if mark["what"] not in SKIP_REASONS:
                    raise ValueError(f"{path}:{i}: unknown docs-test mark {mark['what']!r}; "
                                     f"known: {[*SKIP_REASONS, SLOW]}")
                skip = SKIP_REASONS[mark["what"]]
            body = "\n".join(line[indent:] if line[:indent].strip() == "" else line for line in lines[i + 1:end])
            slow = bool(mark) and mark["what"] == SLOW
            blocks.append(Block(path, i + 1, textwrap.dedent(body) + "\n", skip, slow))
        elif mark:
            raise ValueError(f"{path}:{i}: a docs-test mark on a ```{opening['info']} block, which is not run")
        i = end + 1
    return blocks


def run(block: Block, namespace: dict) -> None:
    """Execute ``block`` in ``namespace``, compiled so that its line numbers are those of its Markdown file."""
    code = compile("\n" * block.line + block.code, str(REPO / block.path), "exec")  # absolute: tracebacks show it
    with warnings.catch_warnings():
        exec(code, namespace)


BLOCKS = [block for path in DOC_FILES for block in extract((REPO / path).read_text(), path)]


class FileState:
    """One Markdown file's namespace, folders and how far its blocks have run."""

    def __init__(self, root: Path):
        self.namespace: dict = {"__name__": "__docs__"}
        self.root = root
        for sub in ("work", "cache", "data"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        self.next = 0  # index (among the file's blocks) of the next block to run


_states: Dict[str, FileState] = {}


@pytest.fixture
def docs_env(tmp_path_factory, monkeypatch):
    """The state of ``path``'s blocks, with the working directory and environment of that file set for this test,
    and the weights registry as it was before, after the test."""
    from resnext_backbones import registry

    def enter(path: str) -> FileState:
        if path not in _states:
            _states[path] = FileState(tmp_path_factory.mktemp(re.sub(r"\W", "_", path)))
        state = _states[path]
        monkeypatch.chdir(state.root / "work")
        monkeypatch.setenv("RESNEXT_BACKBONES_CACHE", str(state.root / "cache"))
        monkeypatch.setenv("RESNEXT_BACKBONES_DATA", str(state.root / "data"))
        monkeypatch.setenv("RESNEXT_BACKBONES_OFFLINE", "1")
        monkeypatch.delenv("RESNEXT_BACKBONES_REGISTRY", raising=False)
        return state

    saved = dict(registry._registry)
    yield enter
    registry._registry.clear()
    registry._registry.update(saved)


@pytest.mark.parametrize("block", [pytest.param(b, id=b.id, marks=[pytest.mark.slow] if b.slow else [])
                                   for b in BLOCKS])
def test_block(block: Block, docs_env):
    if block.skip:
        pytest.skip(block.skip)
    state = docs_env(block.path)
    of_file = [b for b in BLOCKS if b.path == block.path]
    index = of_file.index(block)
    current, failure = block, None
    try:
        # run alone or after a skip: what this block builds on (never a skipped or slow block)
        for current in [b for b in of_file[state.next:index] if not (b.skip or b.slow)] + [block]:
            run(current, state.namespace)
    except Exception as error:  # the block's own frames, not this file's nor the Markdown above the block
        frames = traceback.extract_tb(error.__traceback__)
        first = next(i for i, frame in enumerate(frames) if frame.filename == str(REPO / current.path))
        where = "" if current is block else f" (in {current.id}, which this block builds on)"
        failure = (f"{block.id} failed{where}:\n" + "".join(traceback.format_list(frames[first:]))
                   + "".join(traceback.format_exception_only(error)))
    finally:
        state.next = index + 1
    if failure:
        pytest.fail(failure, pytrace=False)


SYNTHETIC = """\
# A page

```bash
lightning fit --config configs/detection.yaml
```

```python
x = 6 * 7
```

<!-- docs-test: skip network -->
```python
import urllib.request
urllib.request.urlopen("https://example.com")
```

- in a list:

  ```python
  y = x / 0
  ```
"""


def test_the_extractor_finds_the_blocks_and_a_failing_one_fails():
    blocks = extract(SYNTHETIC, "page.md")
    assert [(b.line, b.skip) for b in blocks] == [(7, None), (12, "needs the network"), (19, None)]
    assert blocks[2].code == "y = x / 0\n"  # the list item's indent is gone
    namespace: dict = {}
    run(blocks[0], namespace)
    assert namespace["x"] == 42
    with pytest.raises(ZeroDivisionError) as failure:
        run(blocks[2], namespace)
    frame = traceback.extract_tb(failure.tb)[-1]
    assert (frame.filename, frame.lineno) == (str(REPO / "page.md"), 20)  # the failing line of the Markdown file
    with pytest.raises(ValueError, match="unknown docs-test mark"):
        extract(SYNTHETIC.replace("skip network", "skip netwrok"), "page.md")
    slow = extract(SYNTHETIC.replace("skip network", "slow"), "page.md")
    assert [(b.skip, b.slow) for b in slow] == [(None, False), (None, True), (None, False)]
    with pytest.raises(ValueError, match="not run"):
        extract(SYNTHETIC.replace("```python\nimport urllib", "```bash\nimport urllib"), "page.md")

    readme = [b for b in BLOCKS if b.path == "README.md"]
    assert len(readme) >= 3, [b.id for b in readme]
    pages = {"backbone-and-weights", "tasks-and-data", "predictions", "inference-and-export", "sharing",
             "reliability"}
    assert {f"docs/{page}.md" for page in pages} <= set(DOC_FILES), DOC_FILES
    assert sum(b.skip is not None or b.slow for b in BLOCKS) < len(BLOCKS) / 2  # marks are the exception


def heading_anchors(text: str) -> set:
    """GitHub's anchors for the headings of Markdown ``text`` (fenced blocks left out)."""
    anchors, fence = set(), None
    for line in text.splitlines():
        opening = FENCE.match(line)
        if opening and (fence is None or opening["fence"].startswith(fence)):
            fence = None if fence else opening["fence"]
        elif fence is None and line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return anchors


@pytest.mark.parametrize("path", DOC_FILES)
def test_the_links_between_the_guides_lead_somewhere(path):
    source = REPO / path
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", source.read_text()):
        if re.match(r"^[a-z]+:", target):  # https://, mailto:
            continue
        file, _, anchor = target.partition("#")
        linked = (source.parent / file).resolve() if file else source
        if not linked.exists() or (anchor and linked.suffix == ".md"
                                   and anchor not in heading_anchors(linked.read_text())):
            broken.append(target)
    assert not broken, f"{path}: links to nothing: {broken}"


def yaml_configs(text: str, path: str) -> List[tuple]:
    """``(id, parsed)`` of each ```yaml block of Markdown ``text`` with a ``model`` or ``data`` section naming its
    ``class_path``: the configs a reader copies, which no test runs."""
    import yaml

    lines, configs, fence = text.splitlines(), [], None
    for i, line in enumerate(lines):
        opening = FENCE.match(line)
        if not opening:
            continue
        if fence is None:
            fence = (opening["fence"], opening["info"].lower(), i)
        elif opening["fence"].startswith(fence[0]) and not opening["info"]:
            if fence[1] in ("yaml", "yml"):
                config = yaml.safe_load(textwrap.dedent("\n".join(lines[fence[2] + 1:i])))
                if isinstance(config, dict) and any(isinstance(config.get(s), dict) and "class_path" in config[s]
                                                    for s in ("model", "data")):
                    configs.append((f"{path}:{fence[2] + 1}", config))
            fence = None
    return configs


def init_arguments(cls) -> set:
    """The keyword arguments ``cls(...)`` takes: its ``__init__``'s, and its bases' while each passes ``**kwargs`` on
    (as jsonargparse reads them)."""
    import inspect

    names = set()
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        parameters = inspect.signature(vars(klass)["__init__"]).parameters.values()
        names |= {p.name for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)} - {"self"}
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            break
    return names


YAML_CONFIGS = [config for path in DOC_FILES for config in yaml_configs((REPO / path).read_text(), path)]


@pytest.mark.parametrize("config", [c for _, c in YAML_CONFIGS], ids=[i for i, _ in YAML_CONFIGS])
def test_the_configs_of_the_guides_name_only_arguments_their_classes_take(config):
    """A copied config with a misspelt or renamed key fails only in the reader's run: each ```yaml block's
    ``model`` / ``data`` ``init_args`` are checked against the class it names, and a ``tile`` against
    ``Tiling.from_config``."""
    import importlib

    from resnext_backbones.deployment import Tiling

    for section in ("model", "data"):
        part = config.get(section)
        if not (isinstance(part, dict) and "class_path" in part):
            continue
        module, _, name = part["class_path"].rpartition(".")
        cls = getattr(importlib.import_module(module), name)
        arguments = part.get("init_args") or {}
        unknown = sorted(set(arguments) - init_arguments(cls))
        assert not unknown, f"{section}.init_args {unknown} are not arguments of {part['class_path']}"
        if arguments.get("tile"):
            Tiling.from_config(arguments["tile"], key=f"{section}.init_args.tile")


def test_the_config_check_finds_the_guides_configs_and_refuses_an_unknown_argument():
    ids = [i for i, _ in YAML_CONFIGS]
    assert sum(i.startswith("docs/data-formats.md:") for i in ids) == 5 and any("predictions.md" in i for i in ids)
    with pytest.raises(AssertionError, match=r"data.init_args \['repeat_thresh'\] are not arguments"):
        test_the_configs_of_the_guides_name_only_arguments_their_classes_take(
            {"data": {"class_path": "tasks.data.CocoDetectionDataModule", "init_args": {"repeat_thresh": 0.1}}})
