"""A FUSE filesystem that, when "the power is cut", keeps only what a real disk would have kept.

Test infrastructure, in the spirit of Jepsen's LazyFS. ``python -m tests.powercutfs BACKING
MOUNTPOINT`` serves the tree in ``BACKING`` at ``MOUNTPOINT``, from memory, modelling a volatile
page cache as ext4 with default options behaves at its weakest:

- a file's data written since its last ``fsync``/``fdatasync`` is volatile;
- a create, mkdir, rename, unlink, rmdir, link or symlink is volatile until a directory it
  changed is fsynced (the file's own fsync does not make its name durable);
- on a cut, every volatile change is dropped, or (``random``) a random subset: each pending
  namespace operation is applied or not (in their order, each whole: a rename is never torn),
  and each file's unsynced 4 KiB pages each come through or not, its size old or new.

Then ``BACKING`` is rewritten to hold exactly what the machine would find after the power came
back, and every further operation fails with EIO until the mount is gone. A clean unmount (no
cut) writes everything, as ``umount`` syncs.

Control is a file that exists only at the mount's root, ``/.powercut``; write one command:

- ``cut [random SEED]``: cut now (the write returns once ``BACKING`` holds the survivors);
- ``arm KIND GLOB N [random SEED]``: cut right after the N-th operation of KIND (``rename``,
  ``fsync``, ``fsyncdir``, ``write``, ``create``, ``mkdir``, ``unlink``, ``any``) on a path
  matching GLOB (``fnmatch``; a rename matches on its new path);
- ``sync``: make everything durable, as sync(1) does.

After a cut, ``<BACKING>.cut.json`` says when and what was dropped; at exit
``<BACKING>.ops.json`` counts the operations by kind.
"""

from __future__ import annotations

import argparse
import errno
import fnmatch
import json
import logging
import os
import random
import shutil
import stat
import sys
import time
from pathlib import Path
from typing import Any

import mfusepy as fuse

PAGE = 4096
CONTROL = "/.powercut"
CONTROL_FH = 1 << 62  # the control file's handle (with ``nullpath_ok``, reads and writes come by handle)
KINDS = ("rename", "fsync", "fsyncdir", "write", "create", "mkdir", "unlink", "any")


class Node:
    """An inode: live state (what programs see) and durable state (what a cut keeps)."""

    __slots__ = ("data", "durable", "entries", "ino", "mode", "mtime", "nlink", "synced", "target")

    def __init__(self, ino: int, mode: int) -> None:
        self.ino = ino
        self.mode = mode
        self.nlink = 0
        self.mtime = time.time_ns()
        self.data = bytearray()  # files: live bytes
        self.synced = b""  # files: the bytes as of the last fsync
        self.entries: dict[str, int] = {}  # directories: live names
        self.durable: dict[str, int] = {}  # directories: names as of the last fsync
        self.target = ""  # symlinks

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)


class Model:
    """The filesystem's state, independent of FUSE (so it can be reasoned about and tested)."""

    def __init__(self) -> None:
        self.nodes: dict[int, Node] = {}
        self.pending: list[tuple[Any, ...]] = []  # namespace operations not yet durable, in order
        self.root = self._new(stat.S_IFDIR | 0o755).ino
        self.nodes[self.root].nlink = 2

    def _new(self, mode: int) -> Node:
        node = Node(len(self.nodes) + 1, mode)
        self.nodes[node.ino] = node
        return node

    # ---- names ----------------------------------------------------------------------------

    def lookup(self, path: str) -> Node:
        node = self.nodes[self.root]
        for part in [p for p in path.split("/") if p]:
            if not node.is_dir or part not in node.entries:
                raise fuse.FuseOSError(errno.ENOENT if node.is_dir else errno.ENOTDIR)
            node = self.nodes[node.entries[part]]
        return node

    def parent(self, path: str) -> tuple[Node, str]:
        head, _, name = path.rstrip("/").rpartition("/")
        directory = self.lookup(head or "/")
        if not directory.is_dir:
            raise fuse.FuseOSError(errno.ENOTDIR)
        return directory, name

    def _set(self, directory: Node, name: str, ino: int) -> None:
        old = directory.entries.get(name)
        if old is not None:
            self.nodes[old].nlink -= 1
        directory.entries[name] = ino
        self.nodes[ino].nlink += 1
        self.pending.append(("set", directory.ino, name, ino))

    def _del(self, directory: Node, name: str) -> None:
        self.nodes[directory.entries.pop(name)].nlink -= 1
        self.pending.append(("del", directory.ino, name))

    def create(self, path: str, mode: int) -> Node:
        directory, name = self.parent(path)
        if name in directory.entries:
            raise fuse.FuseOSError(errno.EEXIST)
        node = self._new(mode)
        self._set(directory, name, node.ino)
        if node.is_dir:
            node.nlink += 1
        return node

    def unlink(self, path: str, want_dir: bool) -> None:
        directory, name = self.parent(path)
        node = self.lookup(path)
        if want_dir != node.is_dir:
            raise fuse.FuseOSError(errno.ENOTDIR if want_dir else errno.EISDIR)
        if want_dir and node.entries:
            raise fuse.FuseOSError(errno.ENOTEMPTY)
        self._del(directory, name)

    def link(self, target_path: str, source_path: str) -> None:
        node = self.lookup(source_path)
        directory, name = self.parent(target_path)
        if name in directory.entries:
            raise fuse.FuseOSError(errno.EEXIST)
        self._set(directory, name, node.ino)

    def rename(self, old: str, new: str, flags: int) -> None:
        if flags & ~1:  # RENAME_EXCHANGE, RENAME_WHITEOUT: not needed here
            raise fuse.FuseOSError(errno.EINVAL)
        src_dir, src_name = self.parent(old)
        node = self.lookup(old)
        dst_dir, dst_name = self.parent(new)
        if (new + "/").startswith(old.rstrip("/") + "/") and new != old:
            raise fuse.FuseOSError(errno.EINVAL)
        existing = dst_dir.entries.get(dst_name)
        if existing == node.ino:
            return
        if existing is not None:
            if flags & 1:
                raise fuse.FuseOSError(errno.EEXIST)
            victim = self.nodes[existing]
            if victim.is_dir and not node.is_dir:
                raise fuse.FuseOSError(errno.EISDIR)
            if node.is_dir and not victim.is_dir:
                raise fuse.FuseOSError(errno.ENOTDIR)
            if victim.is_dir and victim.entries:
                raise fuse.FuseOSError(errno.ENOTEMPTY)
        src_dir.entries.pop(src_name)
        if existing is not None:
            self.nodes[existing].nlink -= 1
        dst_dir.entries[dst_name] = node.ino
        self.pending.append(("move", src_dir.ino, src_name, dst_dir.ino, dst_name, node.ino))

    # ---- durability -----------------------------------------------------------------------

    def _apply(self, op: tuple[Any, ...]) -> None:
        if op[0] == "set":
            self.nodes[op[1]].durable[op[2]] = op[3]
        elif op[0] == "del":
            self.nodes[op[1]].durable.pop(op[2], None)
        else:  # move: both directories at once, as a journal commits a rename
            self.nodes[op[1]].durable.pop(op[2], None)
            self.nodes[op[3]].durable[op[4]] = op[5]

    def fsync_file(self, node: Node) -> None:
        if node.is_dir:
            self.fsync_dir(node)
        else:
            node.synced = bytes(node.data)

    def fsync_dir(self, directory: Node) -> None:
        """The directory's pending changes become durable, in order (a rename to or from it whole)."""
        keep = []
        for op in self.pending:
            touches = (op[1],) if op[0] != "move" else (op[1], op[3])
            if directory.ino in touches:
                self._apply(op)
            else:
                keep.append(op)
        self.pending = keep

    def sync(self) -> None:
        for op in self.pending:
            self._apply(op)
        self.pending = []
        for node in self.nodes.values():
            if not node.is_dir:
                node.synced = bytes(node.data)

    def cut(self, rng: random.Random | None) -> dict[str, int]:
        """The power goes: drop what is volatile (all of it, or a random part with ``rng``)."""
        applied = 0
        for op in self.pending:
            if rng is not None and rng.random() < 0.5:
                self._apply(op)
                applied += 1
        dropped_ops = len(self.pending) - applied
        self.pending = []
        torn = 0
        for node in self.nodes.values():
            if node.is_dir or node.data == node.synced:
                continue
            if rng is not None:
                size = rng.choice((len(node.synced), len(node.data)))
                old, new = node.synced.ljust(size, b"\0"), bytes(node.data).ljust(size, b"\0")
                pages = [(new if rng.random() < 0.5 else old)[i : i + PAGE] for i in range(0, size, PAGE)]
                node.synced = b"".join(pages)[:size]
            torn += 1
            node.data = bytearray(node.synced)
        for node in self.nodes.values():  # what survives is what programs see after the reboot
            if node.is_dir:
                node.entries = dict(node.durable)
        return {"namespace_ops_dropped": dropped_ops, "namespace_ops_kept": applied, "files_changed": torn}

    # ---- to and from a real directory -----------------------------------------------------

    def load(self, backing: Path) -> None:
        """Start from the tree in ``backing``, all of it durable."""

        def walk(directory: Node, path: Path) -> None:
            with os.scandir(path) as it:
                for entry in it:
                    st = entry.stat(follow_symlinks=False)
                    node = self._new(st.st_mode)
                    directory.entries[entry.name] = directory.durable[entry.name] = node.ino
                    node.nlink = 1
                    if entry.is_symlink():
                        node.target = os.readlink(entry.path)
                    elif entry.is_dir(follow_symlinks=False):
                        node.nlink = 2
                        walk(node, Path(entry.path))
                    else:
                        node.data = bytearray(Path(entry.path).read_bytes())
                        node.synced = bytes(node.data)

        walk(self.nodes[self.root], backing)

    def save(self, backing: Path) -> None:
        """Replace ``backing``'s contents with the durable tree."""
        for entry in os.scandir(backing):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
        written: dict[int, Path] = {}

        def walk(directory: Node, path: Path) -> None:
            for name, ino in sorted(directory.durable.items()):
                node, target = self.nodes[ino], path / name
                if ino in written and not node.is_dir:
                    os.link(written[ino], target)
                elif stat.S_ISLNK(node.mode):
                    os.symlink(node.target, target)
                elif node.is_dir:
                    if ino in written:  # a directory reachable twice after a partial cut: keep one
                        continue
                    target.mkdir()
                    written[ino] = target
                    walk(node, target)
                    os.chmod(target, stat.S_IMODE(node.mode))
                else:
                    target.write_bytes(node.synced)
                    os.chmod(target, stat.S_IMODE(node.mode))
                    written[ino] = target

        walk(self.nodes[self.root], backing)


class PowerCutFS(fuse.Operations):
    """The FUSE side: path operations on the ``Model``, the control file, the triggers."""

    use_ns = True

    def __init__(self, backing: Path) -> None:
        self.backing = backing
        self.model = Model()
        self.model.load(backing)
        self.frozen = False
        self.counts: dict[str, int] = dict.fromkeys(KINDS, 0)
        self.trigger: tuple[str, str, int, random.Random | None] | None = None
        self.paths: dict[int, str] = {}  # a handle's path when opened (operations by handle count under it)

    # ---- control ------------------------------------------------------------------------------

    def _check(self) -> None:
        if self.frozen:
            raise fuse.FuseOSError(errno.EIO)

    def _count(self, kind: str, path: str) -> None:
        self.counts[kind] += 1
        self.counts["any"] += 1
        if self.trigger is None:
            return
        want, pattern, remaining, rng = self.trigger
        if want in (kind, "any") and fnmatch.fnmatch(path, pattern):
            remaining -= 1
            self.trigger = (want, pattern, remaining, rng)
            if remaining <= 0:
                self._cut(rng, f"after {kind} {path}")

    def _cut(self, rng: random.Random | None, why: str) -> None:
        summary = self.model.cut(rng)
        self.model.save(self.backing)
        self.frozen = True
        summary |= {"why": why, "random": rng is not None, "ops": self.counts, "at": time.time()}
        Path(f"{self.backing}.cut.json").write_text(json.dumps(summary))

    def _command(self, text: str) -> None:
        words = text.split()
        rng = None
        if "random" in words:
            index = words.index("random")
            rng = random.Random(int(words[index + 1]))
            words = words[:index]
        if words == ["cut"]:
            self._cut(rng, "cut by command")
        elif words == ["sync"]:
            self.model.sync()
        elif len(words) == 4 and words[0] == "arm" and words[1] in KINDS:
            self.trigger = (words[1], words[2], int(words[3]), rng)
        else:
            raise fuse.FuseOSError(errno.EINVAL)

    # ---- attributes ---------------------------------------------------------------------------

    def _node(self, path: str | None, fh: int | None = None) -> Node:
        if fh:
            return self.model.nodes[fh]
        if path is None:
            raise fuse.FuseOSError(errno.EBADF)
        return self.model.lookup(path)

    def getattr(self, path: str | None, fh: int | None = None) -> dict[str, Any]:
        if path == CONTROL or fh == CONTROL_FH:
            return {"st_mode": stat.S_IFREG | 0o600, "st_nlink": 1, "st_size": 0}
        self._check()
        node = self._node(path, fh)
        size = len(node.target) if stat.S_ISLNK(node.mode) else len(node.data)
        return {
            "st_mode": node.mode, "st_nlink": max(node.nlink, 1), "st_size": size, "st_ino": node.ino,
            "st_uid": os.getuid(), "st_gid": os.getgid(), "st_blocks": (size + 511) // 512,
            "st_mtime": node.mtime, "st_ctime": node.mtime, "st_atime": node.mtime,
        }

    def chmod(self, path: str | None, mode: int, fh: int | None = None) -> int:
        self._check()
        node = self._node(path, fh)
        node.mode = stat.S_IFMT(node.mode) | stat.S_IMODE(mode)
        return 0

    def chown(self, path: str | None, uid: int, gid: int) -> int:
        self._check()
        return 0

    def utimens(self, path: str | None, times: tuple[int, int] | None = None) -> int:
        self._check()
        self._node(path).mtime = times[1] if times else time.time_ns()
        return 0

    def statfs(self, path: str) -> dict[str, int]:
        return {"f_bsize": PAGE, "f_frsize": PAGE, "f_blocks": 1 << 24, "f_bfree": 1 << 23, "f_bavail": 1 << 23,
                "f_files": 1 << 20, "f_ffree": 1 << 19, "f_namemax": 255}

    def access(self, path: str, amode: int) -> int:
        if path != CONTROL:
            self._check()
            self.model.lookup(path)
        return 0

    # ---- names ------------------------------------------------------------------------------

    def opendir(self, path: str) -> int:
        self._check()
        ino = self.model.lookup(path).ino
        self.paths[ino] = path
        return ino

    def releasedir(self, path: str | None, fh: int) -> int:
        return 0

    def readdir(self, path: str | None, fh: int) -> list[str]:
        self._check()
        return [".", "..", *self._node(path, fh).entries]

    def mkdir(self, path: str, mode: int) -> int:
        self._check()
        self.model.create(path, stat.S_IFDIR | stat.S_IMODE(mode))
        self._count("mkdir", path)
        return 0

    def rmdir(self, path: str) -> int:
        self._check()
        self.model.unlink(path, want_dir=True)
        self._count("unlink", path)
        return 0

    def unlink(self, path: str) -> int:
        self._check()
        self.model.unlink(path, want_dir=False)
        self._count("unlink", path)
        return 0

    def rename(self, old: str, new: str, flags: int = 0) -> int:
        self._check()
        self.model.rename(old, new, flags)
        self._count("rename", new)
        return 0

    def link(self, target: str, source: str) -> int:
        self._check()
        self.model.link(target, source)
        self._count("create", target)
        return 0

    def symlink(self, target: str, source: str) -> int:
        self._check()
        self.model.create(target, stat.S_IFLNK | 0o777).target = source
        self._count("create", target)
        return 0

    def readlink(self, path: str) -> str:
        self._check()
        return self.model.lookup(path).target

    # ---- data -------------------------------------------------------------------------------

    def create(self, path: str, mode: int, flags: int = 0) -> int:
        if path == CONTROL:
            return CONTROL_FH
        self._check()
        node = self.model.create(path, stat.S_IFREG | stat.S_IMODE(mode))
        self._count("create", path)
        self.paths[node.ino] = path
        return node.ino

    def open(self, path: str, flags: int) -> int:
        if path == CONTROL:
            return CONTROL_FH
        self._check()
        node = self.model.lookup(path)
        if flags & os.O_TRUNC:
            del node.data[:]
        self.paths[node.ino] = path
        return node.ino

    def read(self, path: str | None, size: int, offset: int, fh: int) -> bytes:
        if fh == CONTROL_FH:
            return b""
        self._check()
        return bytes(self._node(path, fh).data[offset : offset + size])

    def write(self, path: str | None, data: bytes, offset: int, fh: int) -> int:
        if fh == CONTROL_FH:
            self._command(data.decode())
            return len(data)
        self._check()
        node = self._node(path, fh)
        if offset > len(node.data):
            node.data.extend(bytes(offset - len(node.data)))
        node.data[offset : offset + len(data)] = data
        node.mtime = time.time_ns()
        self._count("write", path or self.paths.get(fh, ""))
        return len(data)

    def truncate(self, path: str | None, length: int, fh: int | None = None) -> int:
        if path == CONTROL or fh == CONTROL_FH:
            return 0
        self._check()
        node = self._node(path, fh)
        if length < len(node.data):
            del node.data[length:]
        else:
            node.data.extend(bytes(length - len(node.data)))
        return 0

    def fsync(self, path: str | None, datasync: int, fh: int) -> int:
        if fh == CONTROL_FH:
            return 0
        self._check()
        self.model.fsync_file(self._node(path, fh))
        self._count("fsync", path or self.paths.get(fh, ""))
        return 0

    def fsyncdir(self, path: str | None, datasync: int, fh: int) -> int:
        self._check()
        self.model.fsync_dir(self._node(path, fh))
        self._count("fsyncdir", path or self.paths.get(fh, ""))
        return 0

    def flush(self, path: str | None, fh: int) -> int:
        return 0

    def release(self, path: str | None, fh: int) -> int:
        return 0

    def init_with_config(self, conn: Any, config: Any) -> None:
        # open-but-unlinked files keep working by handle (SQLite and rename-over both do this)
        config.hard_remove = 1
        config.nullpath_ok = 1

    def destroy(self, path: str) -> None:
        """A clean unmount writes everything (``umount`` syncs); after a cut, nothing more."""
        if not self.frozen:
            self.model.sync()
            self.model.save(self.backing)
        Path(f"{self.backing}.ops.json").write_text(json.dumps(self.counts))


class _FUSE(fuse.FUSE):
    """mfusepy drops the file handle of ``ftruncate``/``fchmod`` under libfuse 3; with
    ``nullpath_ok`` the path is then missing too, so hand the handle on."""

    def truncate_fuse_3(self, path: bytes | None, length: int, fip: Any) -> int:
        fh = fip.contents.fh if fip else None
        return self.operations.truncate(None if path is None else path.decode(), length, fh)

    def chmod_fuse_3(self, path: bytes | None, mode: int, fip: Any) -> int:
        fh = fip.contents.fh if fip else None
        return self.operations.chmod(None if path is None else path.decode(), mode, fh)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("backing", type=Path)
    parser.add_argument("mountpoint", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=os.environ.get("POWERCUTFS_LOG", "WARNING"), stream=sys.stderr)
    ops = PowerCutFS(args.backing.resolve())
    print("mounting", file=sys.stderr, flush=True)
    _FUSE(ops, str(args.mountpoint), foreground=True, nothreads=True, default_permissions=True,
              fsname="powercutfs")


if __name__ == "__main__":
    main()
