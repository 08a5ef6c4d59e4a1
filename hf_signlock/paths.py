"""Paths the product reads and writes: a model folder a user names, paths that files name, files replaced whole.

``check_model_folder`` refuses a MODEL / RUN_DIR argument that ``from_pretrained`` cannot load, by the argument's
name and before any work. A path named inside a file (a shard index, a checkpoint's config, a run's stats) is input:
``inside`` and ``plain_relative_name`` say whether it stays in the folder that names it. ``replaced_whole`` writes a
file beside its place and renames it over it, so an interrupted write leaves the previous file, never half of one.
``cache_root`` is where everything the product builds or fetches once is kept.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import ModelLoadError


def cache_root() -> Path:
    """The product's cache: ``$HF_SIGNLOCK_CACHE``, else ``~/.cache/hf_signlock`` (the built-in corpus, the compiled
    kernels and the benches' peer environments live in folders under it)."""
    return Path(os.environ.get("HF_SIGNLOCK_CACHE") or Path.home() / ".cache" / "hf_signlock")


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def check_model_folder(model: str | os.PathLike, argument: str = "MODEL") -> None:
    """Refuse a local folder that ``from_pretrained`` cannot load: missing, without ``config.json`` or weights.

    A string that is not an existing path is left alone: it may be a Hub id.
    """
    path = Path(model)
    if not path.exists():
        if str(model).startswith((".", "/", "~")) or os.sep in str(model).strip("/").replace("/", "", 1):
            raise ModelLoadError(f"{argument} {str(model)!r} does not exist: pass a model folder or a Hub id.")
        return
    if not path.is_dir():
        raise ModelLoadError(f"{argument} {str(model)!r} is a file; pass the folder `save_pretrained` wrote.")
    if not (path / "config.json").exists():
        raise ModelLoadError(f"{argument} {str(model)!r} has no config.json; pass a folder written by `save_pretrained`.")
    if not any((path / name).exists() for name in WEIGHT_FILES):
        raise ModelLoadError(
            f"{argument} {str(model)!r} has no weights (none of {', '.join(WEIGHT_FILES)}); pass a folder written by "
            "`save_pretrained`, or a run's output_dir after training finished."
        )


def inside(folder: str | os.PathLike, named: str | os.PathLike) -> bool:
    """Whether the path ``named`` (a relative one taken from ``folder``) lies inside ``folder``, links resolved."""
    folder = Path(folder)
    return (folder / Path(named).expanduser()).resolve().is_relative_to(folder.resolve())


def plain_relative_name(name) -> bool:
    """Whether ``name`` (as a file names another) is a relative path that stays in its folder however it is joined:
    a non-empty string, not absolute, no ``..`` part, no backslash."""
    return (isinstance(name, str) and bool(Path(name).parts) and not Path(name).is_absolute()
            and ".." not in Path(name).parts and "\\" not in name)


@contextlib.contextmanager
def replaced_whole(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` to write the new file to; when the block ends it is renamed over ``path``
    (on an error, or an interrupt, it is removed and ``path`` is left as it was)."""
    path = Path(path)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    os.close(handle)
    try:
        yield Path(temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
