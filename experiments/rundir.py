"""Run directories: create or open one safely, lock it, and write into it atomically.

A run directory holds `config.json` (the resolved config), `results.sqlite` (the
store) and the report. `prepare` turns the arguments of `basin run` into an open,
locked `RunDir`, checking everything that can be checked before it creates anything:

- its `name` is a plain file name (it names the default directory
  `runs/<name>-<stamp>`), and a resumed run's stored `config.json` is validated exactly
  as a new config is (`experiments.run` validates new ones, grid size included);
- `--out` is not a file, not `''`, and can be created or written; with `--resume`,
  `--out` must be absent (or the same directory);
- an existing run directory holds the same study (a hash of the canonical JSON of the
  resolved config); a different one is refused unless `add=True` (`basin run --add`),
  which adds the new study's groups beside the stored ones and keeps the stored config
  as `config-<hash>.json`;
- a damaged `config.json` or `results.sqlite` is named in a one-line error.

The lock is `fcntl.flock` on `.lock` inside the directory (non-blocking; the holder
writes its pid there), so a second writer is refused at once, with the pid. Under
`jax.distributed` the processes of one run write into the same directory by design:
only process 0 takes the lock. Another, independent run is still refused by it (its
own process 0 finds the lock held and stops with the error); the lock cannot tell
the other processes of two concurrent distributed runs apart, which would need a
token shared over the coordinator.

Every file is written by `atomic_write`: a temporary file in the same directory, then
`os.replace`, so a kill mid-write leaves the old file or the new one, never a
truncated one, and a symbolic link planted at the target is refused, never followed.

    >>> with prepare(cfg, validate=experiments.validate, out="runs/t") as rd:
    ...     rd.path, rd.cfg["name"]
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

from experiments import config as cfglib
from experiments.store import Store, StoreError, loads

CONFIG = "config.json"
STORE = "results.sqlite"
LOCK = ".lock"
CONFIG_DEPTH = 16  # config tables nest a few levels; a swept list of lists one more


class RunDirError(ValueError):
    """A run directory that cannot be created, opened, locked or written; one line."""


def check_name(name: Any) -> str:
    """A config `name` must be a plain file name: it names `runs/<name>-<stamp>`."""
    if (not isinstance(name, str) or not name.strip() or "/" in name or "\\" in name
            or ".." in name or "\0" in name or (os.altsep and os.altsep in name)):
        raise cfglib.ConfigError(f"name must be a plain file name (no '/', '\\' or '..'), "
                                 f"got {name!r:.80}")
    return name


def fingerprint(value: Any) -> str:
    """SHA-256 of the canonical JSON of `value` (sorted keys, no spaces), so equal
    resolved configs give equal hashes however they were written."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(text.encode()).hexdigest()


def group_hash(members) -> str:
    """The hash a finished group is matched on: the whole resolved configs of its
    members, in order (not only the key that names the group)."""
    return fingerprint([m.config for m in members])


def atomic_write(path: str | Path, data: str | bytes) -> Path:
    """Write `data` to `path` through a temporary file in the same directory and
    `os.replace`; a symbolic link at `path` is refused, never followed."""
    path = Path(path)
    if path.is_symlink():
        raise RunDirError(f"refusing to write {path}: it is a symbolic link")
    raw = data.encode() if isinstance(data, str) else data
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise RunDirError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would hide results from others
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise RunDirError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_writable(path: Path, doing: str) -> None:
    """`path` (a directory) can take new files; else a `RunDirError` saying `doing`."""
    if not os.access(path, os.W_OK | os.X_OK):
        raise RunDirError(f"cannot {doing}: {path} is not writable")


def read_config(run_dir: str | Path, validate: Callable[[dict], dict] | None = None) -> dict:
    """The stored config of `run_dir` (resolved by `validate`, which checks it as a new
    config is checked, when given); a missing, empty, truncated, non-JSON or invalid
    `config.json` is a one-line `ConfigError`."""
    file = Path(run_dir) / CONFIG
    if not file.is_file():
        raise cfglib.ConfigError(f"{run_dir} is not a run directory (no {CONFIG})")
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise cfglib.ConfigError(f"cannot read {file}: {getattr(e, 'strerror', None) or e}"
                                 ) from None
    if not text.strip():
        raise cfglib.ConfigError(f"{file} is empty (a run killed while writing it?); "
                                 f"start again with another --out")
    try:
        cfg = loads(text, str(file), CONFIG_DEPTH)
    except StoreError as e:
        raise cfglib.ConfigError(str(e)) from None
    if not isinstance(cfg, dict) or not cfg:
        raise cfglib.ConfigError(f"{file} holds no run config")
    return cfg if validate is None else _validate_stored(cfg, file, validate)


def _validate_stored(cfg: dict, file: Path, validate: Callable[[dict], dict]) -> dict:
    try:
        check_name(cfg.get("name"))
        resolved = validate(cfg)
    except cfglib.ConfigError as e:
        raise cfglib.ConfigError(f"{file}: {e}") from None
    except KeyError as e:
        raise cfglib.ConfigError(f"{file} is not a valid run config (no {e})") from None
    except (TypeError, AttributeError, IndexError, ValueError) as e:
        raise cfglib.ConfigError(f"{file} is not a valid run config ({e})") from None
    if fingerprint(resolved) != fingerprint(cfg):
        # The runner stores the resolved config; anything else was edited by hand.
        missing = sorted(set(resolved) - set(cfg))
        raise cfglib.ConfigError(
            f"{file} is not a valid run config (not the resolved config the runner "
            f"writes{': no ' + ', '.join(missing) if missing else ''})")
    return resolved


def _check_store(path: Path) -> None:
    """A store already in `path` must open (a garbage file is named, not trusted)."""
    if (path / STORE).exists():
        with Store(path / STORE, readonly=True) as store:
            store.finished_hashes()


def _check_target(path: Path) -> None:
    """`path` can become (or already is) a writable directory; nothing is created."""
    if path.exists() or path.is_symlink():
        if not path.is_dir():
            raise RunDirError(f"--out {path} exists and is not a directory")
        check_writable(path, "write the run")
        return
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise RunDirError(f"cannot create {path}: {parent} is not a directory")
    check_writable(parent, f"create {path}")


def _is_fresh(path: Path) -> bool:
    """Empty but for the lock and temporary files."""
    return not path.exists() or all(p.name.startswith(".") for p in path.iterdir())


def _holder(lock_file: Path) -> str:
    try:
        pid = lock_file.read_text().strip()
    except OSError:
        pid = ""
    return f"pid {pid}" if pid.isdigit() else "a process whose pid is not written yet"


def lock(path: Path) -> int | None:
    """Take the run directory's lock (see the module docstring); the file descriptor
    that holds it, or None for a process of a distributed run other than process 0."""
    import jax

    if jax.process_count() > 1 and jax.process_index() != 0:
        return None
    file = path / LOCK
    try:
        fd = os.open(file, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        raise RunDirError(f"cannot lock {path}: {e.strerror or e}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise RunDirError(f"{path} is in use by another basin run ({_holder(file)}); "
                              f"wait for it to finish or use another --out") from None
        raise RunDirError(f"cannot lock {path}: {e.strerror or e}") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


@dataclass
class RunDir:
    """An open, locked run directory: `path`, the resolved `cfg`, whether the run
    `added` a study to a directory of another one. Close it (or use `with`) to unlock."""

    path: Path
    cfg: dict
    added: bool = False
    lock_fd: int | None = field(default=None, repr=False)

    def __enter__(self) -> "RunDir":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.lock_fd is not None:
            os.close(self.lock_fd)  # closing the descriptor releases the flock
            self.lock_fd = None

    @property
    def mixed(self) -> bool:
        """The directory was extended with `--add` (it keeps earlier configs)."""
        return self.added or any(self.path.glob("config-*.json"))


def prepare(cfg: dict | None, *, validate: Callable[[dict], dict],
            out: str | Path | None = None, resume: str | Path | None = None,
            add: bool = False, log: Callable[[str], None] | None = None) -> RunDir:
    """Create or open and lock the run directory of the resolved config `cfg` (None with
    `resume`), see the module docstring; every error is raised before anything is
    created. `validate` resolves a stored config as a new one is resolved."""
    log = log or (lambda msg: None)
    for flag, value in (("--out", out), ("--resume", resume)):
        if value is not None and not str(value).strip():
            raise RunDirError(f"{flag} must name a directory, got ''")
    if resume is not None:
        if add:
            raise RunDirError("--add starts a new study in a run directory; --resume "
                              "continues the stored one: give one of them")
        rd = _open_resume(Path(resume), out, validate)
    else:
        check_name(cfg.get("name"))
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        path = Path(out) if out is not None else Path("runs") / f"{cfg['name']}-{stamp}"
        rd = _open_new(path, cfg, add, validate)
    if isinstance(rd.cfg.get("sweep"), dict):  # a custom study has no grid
        log(f"{rd.path}: a grid of {cfglib.grid_size(rd.cfg):,} member(s)"
            + (" added beside the stored study" if rd.added else ""))
    return rd


def _open_resume(path: Path, out, validate: Callable[[dict], dict]) -> RunDir:
    if out is not None and Path(out).resolve() != path.resolve():
        raise RunDirError(f"--resume continues {path} in place; drop --out {out}")
    if not path.is_dir():
        raise cfglib.ConfigError(f"cannot resume: {path} is not a directory")
    if not (path / CONFIG).is_file():
        raise cfglib.ConfigError(f"cannot resume: {path} holds no {CONFIG}")
    check_links(path)
    cfg = read_config(path, validate)
    _check_store(path)
    check_writable(path, f"resume {path}")
    return RunDir(path, cfg, lock_fd=lock(path))


def check_links(path: Path) -> None:
    """Refuse a run directory holding a symbolic link: the runner and the report
    write only regular files of their own, so a link is planted, and following it
    would overwrite a file elsewhere."""
    for entry in path.iterdir():
        if entry.is_symlink():
            raise RunDirError(f"refusing to use {entry}: it is a symbolic link")


def _stored_study(path: Path, cfg: dict, add: bool,
                  validate: Callable[[dict], dict]) -> dict | None:
    """The study stored in `path` (None if there is none yet), refused if it differs
    from `cfg` unless `add` (which the caller refuses for a custom study)."""
    if not path.is_dir():
        return None
    if not (path / CONFIG).exists():
        if _is_fresh(path):
            return None
        raise RunDirError(f"{path} is not empty and holds no {CONFIG} (not a run "
                          f"directory); use another --out")
    stored = read_config(path, validate)
    if fingerprint(stored) == fingerprint(cfg):
        return stored
    if not add:
        raise RunDirError(f"{path} holds a different study; use another --out or --resume "
                          f"(or --add to add this one to it)")
    if (stored.get("study") != cfg.get("study")
            or list(stored.get("sweep", {})) != list(cfg.get("sweep", {}))):
        raise RunDirError(f"--add needs the same study over the same [sweep] keys as "
                          f"{path} holds ({', '.join(stored.get('sweep', {}))})")
    return stored


def _open_new(path: Path, cfg: dict, add: bool, validate: Callable[[dict], dict]) -> RunDir:
    _check_target(path)
    if path.is_dir():
        check_links(path)
    _stored_study(path, cfg, add, validate)
    _check_store(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunDirError(f"cannot create {path}: {e.strerror or e}") from None
    fd = lock(path)
    try:
        # Again under the lock: another run may have written the directory meanwhile.
        stored = _stored_study(path, cfg, add, validate)
        added = stored is not None and fingerprint(stored) != fingerprint(cfg)
        if added:
            atomic_write(path / f"config-{fingerprint(stored)[:12]}.json",
                         json.dumps(stored, indent=2))
        atomic_write(path / CONFIG, json.dumps(cfg, indent=2))
    except BaseException:
        if fd is not None:
            os.close(fd)
        raise
    return RunDir(path, cfg, added, fd)


def pending(groups: list[tuple[str, list]], store: Store,
            mixed: bool = False) -> list[tuple[str, list, str]]:
    """The groups not yet in `store`, as (key, members, group hash).

    A group is finished if a stored group has its hash; a group stored before hashes
    were kept (hash None) is matched on its key, unless the directory is `mixed`
    (extended with `--add`), where a key no longer identifies a group.
    """
    stored = store.finished_hashes()
    hashes = set(stored.values())
    out = []
    for key, members in groups:
        h = group_hash(members)
        if h in hashes or (not mixed and key in stored and stored[key] is None):
            continue
        out.append((key, members, h))
    return out
