"""torch.hub entry points: ``torch.hub.load(repo_dir, "resnext50_32x4d_fpn", source="local", weights=path)``.

Every name in ``resnext_backbones.list_models()`` gives a trunk (``name``) and an FPN backbone (``name_fpn``);
keyword arguments go to :func:`resnext_backbones.resnext` / :func:`resnext_backbones.resnext_fpn`. ``weights``
is a local file or a registered name (``weights="tv2_in1k"``): downloaded once, verified by its sha256, cached.
"""

dependencies = ["torch", "torchvision", "safetensors"]

import functools as _functools  # noqa: E402

import resnext_backbones as _rb  # noqa: E402


def _entry(builder, name, suffix):
    @_functools.wraps(builder)
    def entry(**kwargs):
        return builder(name, **kwargs)

    entry.__name__ = entry.__qualname__ = name + suffix
    entry.__doc__ = f"{name}{' FPN backbone' if suffix else ' trunk'}; kwargs as resnext_backbones.{builder.__name__}."
    return entry


for _name in _rb.list_models():
    globals()[_name] = _entry(_rb.resnext, _name, "")
    globals()[_name + "_fpn"] = _entry(_rb.resnext_fpn, _name, "_fpn")
