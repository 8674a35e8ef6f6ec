"""Reading what a user or an attacker hands us: one place decides which files may be opened, how much of them is
read, what an opt-in variable means and what a digest looks like. Every reader here raises the caller's
`OptpipeError` class (so the exit code follows the file's role) with a message naming the file or field, and
never blocks: a FIFO or a device is refused before it is opened for reading.

Imported by the runtime, so it imports nothing of optpipe but its errors.
"""
from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path
from typing import Any

from .errors import InputError, OptpipeError, RecipeError

TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off", "")
NAME_MAX = 255  # bytes in one path component (Linux, and most filesystems)
PATH_MAX = 4096


def env_flag(name: str, environ=None) -> bool:
    """An opt-in environment variable: 1/true/yes/on (any case) allow, 0/false/no/off/empty (or unset) refuse;
    anything else is an error naming the variable, never a silent yes."""
    value = (os.environ if environ is None else environ).get(name, "")
    word = value.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise RecipeError(f"{name}={value!r}: not a yes/no value (allow with one of {', '.join(TRUE_WORDS)}; refuse "
                      f"with one of {', '.join(w or 'empty' for w in FALSE_WORDS)}, in any case)")


def check_path_text(text: str, where: str, error: type[OptpipeError] = RecipeError) -> Path:
    """`text` as a Path when the operating system could name it: no NUL, no component over 255 bytes, at most
    4096 bytes in all (else the first `stat` fails with an OSError that is no user's message)."""
    if not isinstance(text, (str, os.PathLike)):
        raise error(f"{where}: a path must be text, not {type(text).__name__}")
    raw = os.fsencode(text)
    if b"\0" in raw:
        raise error(f"{where}: the path contains a NUL byte")
    if len(raw) > PATH_MAX:
        raise error(f"{where}: the path is {len(raw)} bytes long (the limit is {PATH_MAX})")
    for part in raw.split(b"/"):
        if len(part) > NAME_MAX:
            shown = part[:40].decode("utf-8", "replace")
            raise error(f"{where}: the path component {shown!r}... is {len(part)} bytes long (the limit is {NAME_MAX})")
    return Path(os.fsdecode(raw))


def kind_of(path: Path) -> str | None:
    """'file', 'dir', 'symlink', 'fifo', 'socket', 'device' (no link followed), or None when nothing is there
    or it cannot be looked at."""
    try:
        mode = os.lstat(path).st_mode
    except (OSError, ValueError):
        return None
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISFIFO(mode):
        return "fifo"
    if stat.S_ISSOCK(mode):
        return "socket"
    return "device"


def is_regular_file(path: Path, follow_symlinks: bool = True) -> bool:
    """A regular file (after links when `follow_symlinks`): never a FIFO, socket or device, which would block
    or never end when read."""
    try:
        mode = os.stat(path, follow_symlinks=follow_symlinks).st_mode
    except (OSError, ValueError):
        return False
    return stat.S_ISREG(mode)


def open_regular(path: Path, where: str, error: type[OptpipeError] = RecipeError, *, follow_symlinks: bool = True):
    """Open `path` for binary reading only when it is a regular file. The open itself cannot block: O_NONBLOCK
    makes opening a FIFO return at once, and the descriptor is checked with fstat before anything is read."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    if not follow_symlinks:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise error(f"{where}: {path} not found") from None
    except OSError as e:
        if not follow_symlinks and os.path.islink(path):
            raise error(f"{where}: {path} is a symlink, which is not followed here") from None
        raise error(f"{where}: {path} cannot be opened ({e.strerror})") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            what = "a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else \
                "a socket" if stat.S_ISSOCK(mode) else "a device"
            raise error(f"{where}: {path} is {what}, not a regular file")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_bounded(path: Path, limit: int, where: str, error: type[OptpipeError] = RecipeError,
                 what: str = "file", follow_symlinks: bool = True) -> bytes:
    """The whole of a regular file that must be small (a recipe, a config, a manifest): more than `limit` bytes
    is refused without reading them."""
    with open_regular(path, where, error, follow_symlinks=follow_symlinks) as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise error(f"{where}: {path} is larger than {limit} bytes; a {what} is a small file")
    return data


def read_head(path: Path, n: int, where: str, error: type[OptpipeError] = RecipeError) -> bytes:
    """The first `n` bytes of a regular file (never the whole of a large one)."""
    with open_regular(path, where, error) as f:
        return f.read(n)


def load_json(path: Path, where: str, error: type[OptpipeError] = RecipeError, limit: int = 64 << 20,
              what: str = "JSON file", follow_symlinks: bool = True) -> Any:
    """A small JSON file: bounded in size, UTF-8, and not nested past what the parser can take."""
    raw = read_bounded(path, limit, where, error, what, follow_symlinks)
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise error(f"{where}: {path} is not UTF-8 (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise error(f"{where}: {path} is not valid JSON: {e}") from None
    except RecursionError:
        raise error(f"{where}: {path} is nested too deeply to be a {what}") from None


DIGEST_FORM = "sha256:<64 hex digits>"
_DIGEST = re.compile(r"(?:sha256:)?([0-9a-f]{64})", re.IGNORECASE)


def parse_digest(value: Any, where: str = "digest") -> str:
    """An artifact digest as written by `build` (`sha256:` and 64 hex digits; the prefix and the case of either
    may vary, the bare hex is accepted), normalized to lower case. Anything else (another algorithm, a digit
    short, white space) is an InputError (exit 2): a malformed digest is not evidence of a changed artifact."""
    if not isinstance(value, str):
        raise InputError(f"{where}: a digest is text ({DIGEST_FORM}), not {type(value).__name__}")
    m = _DIGEST.fullmatch(value)
    if m is None:
        shown = value if len(value) <= 80 else value[:77] + "..."
        raise InputError(f"{where}: malformed digest {shown!r} (expected {DIGEST_FORM}, as `optpipe build` prints it)")
    return "sha256:" + m.group(1).lower()
