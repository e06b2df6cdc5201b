"""Writing a generated set of (condition, target) pairs in the fill50k layout, whole or not at all.

Layout: ``source/{i}.png`` (the condition), ``target/{i}.png`` (RGB), ``prompt.json`` (one JSON
object per line: source, target, prompt, then whatever parameters the generator records) and
``generator.json`` (the generator's arguments). The generators (:mod:`.fill50k`, :mod:`.outlines`)
say what a sample is and how it renders; this module writes them: in worker processes, in a
temporary sibling folder renamed into place when complete, so the folder is never seen half-written
and the same samples give byte-identical files whatever the number of workers.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..imageio import atomic_write_bytes, encode_png_fast

__all__ = ["parallel_map", "read_options", "read_records", "write_pairs"]

_BLOCK = 256  # samples per worker task

#: sample -> (source, target) images, each (H, W, 3) uint8; a module-level function (workers pickle it)
Render = Callable[[Any], tuple[np.ndarray, np.ndarray]]


def _write_block(args: tuple[Render, Sequence[Any], str]) -> int:
    render, samples, root = args
    for s in samples:
        for folder, image in zip(("source", "target"), render(s)):
            fd = os.open(f"{root}/{folder}/{s.index}.png", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.write(fd, encode_png_fast(image))
            finally:
                os.close(fd)
    return len(samples)


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def parallel_map(fn: Callable[[Any], Any], args: Sequence[Any], workers: int | None) -> list[Any]:
    """``[fn(a) for a in args]`` in ``workers`` forked processes (None: one per core), in order;
    ``fn`` must be a module-level function."""
    workers = _cpu_count() if workers is None else workers
    if workers <= 1 or len(args) < 2 * _BLOCK:
        return [fn(a) for a in args]
    import multiprocessing as mp

    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else None)
    with ctx.Pool(workers) as pool:
        return pool.map(fn, args, chunksize=_BLOCK // 4)


def _run_blocks(render: Render, blocks: list[list[Any]], root: Path, workers: int) -> Iterator[int]:
    jobs = [(render, b, str(root)) for b in blocks]
    if workers <= 1 or len(blocks) <= 1:
        yield from map(_write_block, jobs)
        return
    import multiprocessing as mp

    # fork: a spawned worker would re-import torch through the package (seconds) for numpy work
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else None)
    with ctx.Pool(workers) as pool:
        yield from pool.imap_unordered(_write_block, jobs)


def write_pairs(
    out_dir: str | Path,
    samples: Sequence[Any],
    render: Render,
    options: dict[str, Any],
    *,
    desc: str,
    workers: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Write ``samples`` (each with an ``index`` and a ``to_record()`` giving its prompt.json line)
    rendered by ``render`` to ``out_dir``, with ``options`` as generator.json; return ``out_dir``.

    A folder that exists and is not empty is refused unless ``overwrite``; it is replaced only once
    the new set is complete (an error on the way leaves it as it was)."""
    out = Path(out_dir)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())) and not overwrite:
        raise ValueError(f"{out} already exists; overwrite it (--overwrite) or choose another folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        (tmp / "source").mkdir(parents=True)
        (tmp / "target").mkdir()
        blocks = [list(samples[i : i + _BLOCK]) for i in range(0, len(samples), _BLOCK)]
        done = _run_blocks(render, blocks, tmp, _cpu_count() if workers is None else workers)
        if progress:
            from tqdm import tqdm

            with tqdm(total=len(samples), desc=desc, unit="pair") as bar:
                for k in done:
                    bar.update(k)
        else:
            for _ in done:
                pass
        lines = "".join(json.dumps(s.to_record()) + "\n" for s in samples)
        atomic_write_bytes(tmp / "prompt.json", lines.encode())
        atomic_write_bytes(tmp / "generator.json", (json.dumps(options, indent=2) + "\n").encode())
        _swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _swap_in(tmp: Path, out: Path) -> None:
    """Rename the finished folder ``tmp`` to ``out``, replacing whatever ``out`` was."""
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() else old.unlink()


def read_records(
    path: str | Path, from_record: Callable[[dict[str, Any], int], Any], command: str
) -> list[Any]:
    """The samples of a generated set, from its folder or its prompt.json: ``from_record(line, i)``
    for line i. ValueError naming the file and line of a line it cannot read (a missing key:
    only sets written by ``controlnet data COMMAND`` carry their parameters)."""
    path = Path(path)
    index_file = path / "prompt.json" if path.is_dir() else path
    if not index_file.is_file():
        raise FileNotFoundError(f"{index_file}: no such file")
    samples = []
    with open(index_file, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                samples.append(from_record(json.loads(line), len(samples)))
            except json.JSONDecodeError as e:
                raise ValueError(f"{index_file} line {lineno}: malformed JSON ({e.msg})") from None
            except KeyError as e:
                raise ValueError(
                    f"{index_file} line {lineno}: missing {e.args[0]}; only sets written by "
                    f"`controlnet data {command}` carry their parameters"
                ) from None
            except (TypeError, ValueError, IndexError) as e:
                raise ValueError(f"{index_file} line {lineno}: bad sample parameters ({e})") from None
    return samples


def read_options(path: str | Path) -> dict[str, Any] | None:
    """A generated set's generator.json (its folder or a file inside it), or None for other sets."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    try:
        data = json.loads((folder / "generator.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
