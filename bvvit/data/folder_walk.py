"""Walking the class folders of one split of an image folder: which files are its images
and which class each belongs to. The cheap layout check (:func:`first_images`) and the
full scan (:func:`scan_split`) share one walker, so they apply the same rules:

- An image is a regular file whose name ends in an image extension (IMAGE_EXTENSIONS).
  Hidden entries are skipped; other files are ignored and counted. A FIFO, socket or
  device named like an image, and a link that points nowhere, are never opened: they are
  ignored, counted and reported.
- Links are followed, each folder at most once (by its real path). Skipped and reported:
  a folder link to the folder it is in or any folder above it, or above the split folder
  (a loop); a link into another class folder of the split (an image is only ever labelled
  by a class folder it really is in); a folder link to a folder already walked. Links that
  lead outside the data root (class folders on another disk) are followed as usual.
- A class folder's own tree is walked first (sorted, depth first), then the folders its
  links lead to; a file listed directly and through a link keeps its direct path.
- Within a split a real file is one sample: links to an image already listed are dropped.
- :func:`scan_split` reports what it skipped as one warning line per kind (a count and
  the first example) and, given the other split, warns once if both hold the same files.
- A folder that cannot be listed is a DataError naming it and the reason.

Cost: one ``os.scandir`` per folder; entry types come from the directory listing, so only
links cost a ``stat`` and a ``realpath``.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import stat
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, NamedTuple, Optional, Sequence

from bvvit.errors import DataError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp",
                    ".ppm", ".pgm")
_BROKEN_LINK_ERRNOS = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.ENAMETOOLONG})


class SkipKind(NamedTuple):
    """A kind of entry the walk skips, worded for "{verb} {count} {noun}s {rest}"."""

    verb: str
    noun: str
    rest: str


LOOP = SkipKind("skipped", "folder link", "to its own folder or one above it (a loop)")
OTHER_CLASS = SkipKind("skipped", "link", "into another class folder (an image keeps the "
                                          "label of the folder it is in)")
WALKED = SkipKind("skipped", "folder link", "to a folder already walked")
DUPLICATE = SkipKind("skipped", "link", "to an image already listed (each image counts once)")
NOT_REGULAR = SkipKind("ignored", "file", "named like an image but not a regular file "
                                          "(FIFO, socket or device)")
BROKEN = SkipKind("ignored", "link", "pointing nowhere (broken)")


def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def unreadable_error(path: str | Path, exc: OSError, what: str = "folder") -> DataError:
    """One line naming ``path`` and the reason, e.g. "cannot read folder X: Permission denied"."""
    reason = exc.strerror or str(exc)
    return DataError(f"cannot read {what} {path}: {reason}; make it readable for this user "
                     f"or move it out of the data folder")


def no_images_error(class_dir: str | Path) -> DataError:
    return DataError(f"class folder {class_dir} has no images (looked for "
                     f"{' '.join(IMAGE_EXTENSIONS)}); add images or remove the folder")


def sorted_entries(path: str | Path) -> list[os.DirEntry]:
    try:
        with os.scandir(path) as entries:
            return sorted(entries, key=lambda entry: entry.name)
    except OSError as exc:
        raise unreadable_error(path, exc) from exc


def class_folders(split_dir: Path) -> list[str]:
    """Sorted names of the non-hidden sub-folders (or links to folders) of ``split_dir``."""
    names = []
    for entry in sorted_entries(split_dir):
        if entry.name.startswith("."):
            continue
        try:
            if entry.is_dir():
                names.append(entry.name)
        except OSError as exc:  # a link whose target cannot be examined
            raise unreadable_error(entry.path, exc, "link") from exc
    return names


def _is_within(path: str, folder: str) -> bool:
    """True if real path ``path`` is ``folder`` or below it."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


class SkipNotes:
    """Entries skipped while walking, by kind: how many and the first one."""

    def __init__(self) -> None:
        self._counts: dict[SkipKind, int] = {}
        self._examples: dict[SkipKind, str] = {}

    def add(self, kind: SkipKind, example: str) -> None:
        self._counts[kind] = self._counts.get(kind, 0) + 1
        self._examples.setdefault(kind, example)

    def lines(self, where: str | Path) -> list[str]:
        """One line per kind, e.g. "ROOT/train: skipped 3 folder links to ... ; e.g. X -> Y"."""
        lines = []
        for kind, count in self._counts.items():
            noun = kind.noun if count == 1 else kind.noun + "s"
            lines.append(f"{where}: {kind.verb} {count} {noun} {kind.rest}; e.g. "
                         f"{self._examples[kind]}")
        return lines


@dataclass
class FolderRecord:
    """A folder walked: the class it was walked for and the images listed directly in it."""

    label: int
    images: int = 0
    first_image: str = ""


@dataclass
class SplitScan:
    """What a split holds: ``samples`` as (path, label) pairs, ``ignored`` files, and for
    comparing splits the real path of each folder walked and of each image listed through
    a file link."""

    samples: list[tuple[str, int]]
    ignored: int
    folders: dict[str, FolderRecord]
    linked_images: set[str] = field(default_factory=set)
    notes: SkipNotes = field(default_factory=SkipNotes)


class SplitWalker:
    """Walks the class folders ``split_dir/<class_names[i]>`` by the module's rules.

    :meth:`images` lists one class lazily (the cheap check reads a few); :meth:`scan`
    lists the whole split. Both record what they skip in ``notes``.
    """

    def __init__(self, split_dir: Path, class_names: Sequence[str]) -> None:
        self.split_dir = split_dir
        self.class_names = tuple(class_names)
        self.notes = SkipNotes()
        self.ignored = 0
        self.folders: dict[str, FolderRecord] = {}
        self._split_real = os.path.realpath(split_dir)
        self._class_dirs = [os.path.join(split_dir, name) for name in self.class_names]
        self._class_reals = [os.path.realpath(class_dir) for class_dir in self._class_dirs]
        self._label_of_real: dict[str, int] = {}
        for label, real in enumerate(self._class_reals):
            if _is_within(self._split_real, real):
                raise DataError(f"class folder {self._class_dirs[label]} is a link to {real}, "
                                f"which holds the whole split; point it at its class's images")
            first = self._label_of_real.setdefault(real, label)
            if first != label:
                raise DataError(f"class folders {self._class_dirs[first]} and "
                                f"{self._class_dirs[label]} are the same folder ({real}); "
                                f"give each class its own folder")
        self._owner_cache: dict[str, Optional[int]] = {}
        self._real_folders: dict[str, str] = {}  # folder as a link names it -> real path

    def images(self, label: int) -> Iterator[tuple[str, Optional[str]]]:
        """The images of class ``label`` as ``(path, target)``, where target is the real
        path when the file itself is a link and None otherwise."""
        stack = [(self._class_dirs[label], self._class_reals[label])]
        folder_links: deque[tuple[str, str, str]] = deque()  # (link, its real target, parent)
        while stack or folder_links:
            if not stack:
                link, target, parent_real = folder_links.popleft()
                if self._may_follow(link, target, parent_real, label):
                    stack.append((link, target))
                continue
            path, real = stack.pop()
            if self._enter(path, real, label):
                yield from self._folder_images(path, real, label, stack, folder_links)

    def scan(self) -> SplitScan:
        """Every image of the split; DataError if a class folder has none."""
        samples: list[tuple[str, int]] = []
        linked: list[tuple[int, str, str]] = []  # (index in samples, link, real target)
        counts = []
        for label in range(len(self.class_names)):
            start = len(samples)
            for path, target in self.images(label):
                if target is not None:
                    linked.append((len(samples), path, target))
                samples.append((path, label))
            counts.append(len(samples) - start)
            if counts[-1] == 0:  # fail before walking the other classes
                raise no_images_error(self._class_dirs[label])
        linked_images, dropped = self._drop_duplicate_links(linked)
        for index in dropped:
            counts[samples[index][1]] -= 1
        if 0 in counts:
            raise no_images_error(self._class_dirs[counts.index(0)])
        if dropped:
            samples = [sample for index, sample in enumerate(samples) if index not in dropped]
        return SplitScan(samples, self.ignored, self.folders, linked_images, self.notes)

    # --- one folder ---------------------------------------------------------------------

    def _enter(self, path: str, real: str, label: int) -> bool:
        """Register folder ``real`` as walked for ``label``; False to skip it."""
        owner = self._label_of_real.get(real, label)
        if owner != label:  # a class folder nested inside another class folder
            self.notes.add(OTHER_CLASS, f"{path} (the folder of class {self.class_names[owner]})")
            return False
        if real in self.folders:
            return False
        self.folders[real] = FolderRecord(label)
        return True

    def _folder_images(self, path: str, real: str, label: int, stack: list,
                       folder_links: deque) -> Iterator[tuple[str, Optional[str]]]:
        record = self.folders[real]
        real_prefix = real if real.endswith(os.sep) else real + os.sep
        subfolders = []
        for entry in sorted_entries(path):
            name = entry.name
            if name.startswith("."):
                if not self._is_folder(entry):
                    self.ignored += 1
            elif entry.is_symlink():
                target = self._link(entry, real, label, folder_links)
                if target is not None:
                    yield entry.path, target
            elif entry.is_dir(follow_symlinks=False):
                subfolders.append((entry.path, real_prefix + name))
            elif not is_image_file(name):
                self.ignored += 1
            elif not entry.is_file(follow_symlinks=False):
                self.ignored += 1
                self.notes.add(NOT_REGULAR, entry.path)
            else:
                record.images += 1
                record.first_image = record.first_image or name
                yield entry.path, None
        stack.extend(reversed(subfolders))

    @staticmethod
    def _is_folder(entry: os.DirEntry) -> bool:
        try:
            return entry.is_dir()
        except OSError:
            return False

    def _link(self, entry: os.DirEntry, parent_real: str, label: int,
              folder_links: deque) -> Optional[str]:
        """The real path of the image a file link of class ``label`` points to; None when
        the link is a folder link (queued in ``folder_links``) or skipped (noted)."""
        mode, target, target_folder = self._resolve(entry.path, parent_real)
        if mode is None:
            self.ignored += 1
            self.notes.add(BROKEN, f"{entry.path} -> {target}")
        elif stat.S_ISDIR(mode):
            folder_links.append((entry.path, target, parent_real))
        elif not is_image_file(entry.name):
            self.ignored += 1
        elif not stat.S_ISREG(mode):
            self.ignored += 1
            self.notes.add(NOT_REGULAR, entry.path)
        elif self._owner(target_folder) not in (None, label):
            self.notes.add(OTHER_CLASS, f"{entry.path} -> {target}")
        else:
            return target
        return None

    def _resolve(self, link: str, parent_real: str) -> tuple[Optional[int], str, str]:
        """(mode, real path, real folder) of what ``link``, in real folder ``parent_real``,
        finally points to; mode None if nothing.

        Link farms (every image a link) are common, so the usual case costs a readlink and
        an lstat: the target's folder is resolved once per folder, not once per file.
        """
        try:
            text = os.readlink(link)
            folder, _, name = (text if text.startswith(os.sep)
                               else parent_real + os.sep + text).rpartition(os.sep)
            if name not in ("", ".", ".."):
                real_folder = self._real_folders.get(folder)
                if real_folder is None:
                    real_folder = self._real_folders[folder] = os.path.realpath(folder or os.sep)
                target = real_folder.rstrip(os.sep) + os.sep + name
                mode = os.lstat(target).st_mode
                if not stat.S_ISLNK(mode):
                    return mode, target, real_folder
            target = os.path.realpath(link)  # a chain of links, or a link to "." or ".."
            return os.stat(link).st_mode, target, os.path.dirname(target)
        except OSError as exc:
            if exc.errno not in _BROKEN_LINK_ERRNOS:
                raise unreadable_error(link, exc, "link") from exc
            target = os.path.realpath(link)
            return None, target, os.path.dirname(target)

    def _may_follow(self, link: str, target: str, parent_real: str, label: int) -> bool:
        if _is_within(parent_real, target) or _is_within(self._split_real, target):
            kind = LOOP
        elif self._owner(target) not in (None, label):
            kind = OTHER_CLASS
        elif target in self.folders:
            kind = WALKED
        else:
            return True
        self.notes.add(kind, f"{link} -> {target}")
        return False

    def _owner(self, real_folder: str) -> Optional[int]:
        """The label of the class folder that real path ``real_folder`` is in, if any."""
        if real_folder not in self._owner_cache:
            owner = self._label_of_real.get(real_folder)
            parent = os.path.dirname(real_folder)
            if owner is None and parent != real_folder:
                owner = self._owner(parent)
            self._owner_cache[real_folder] = owner
        return self._owner_cache[real_folder]

    def _drop_duplicate_links(self, linked: list[tuple[int, str, str]]
                              ) -> tuple[set[str], set[int]]:
        """Real paths of the images kept through file links, and the indices of links to
        an image listed directly or through an earlier link."""
        kept, dropped = set(), set()
        for index, link, target in linked:
            folder, _, name = target.rpartition(os.sep)
            if target in kept or (folder in self.folders and is_image_file(name)):
                dropped.add(index)
                self.notes.add(DUPLICATE, f"{link} -> {target}")
            else:
                kept.add(target)
        return kept, dropped


def first_images(walker: SplitWalker, label: int, count: int) -> list[str]:
    """Up to ``count`` images of class ``label``, walking no further than needed."""
    return [path for path, _ in itertools.islice(walker.images(label), count)]


def scan_split(split_dir: Path, class_names: Sequence[str],
               compare_with: Optional[Path] = None) -> tuple[list[tuple[str, int]], int]:
    """All ``(image_path, label)`` pairs below ``split_dir`` and the number of ignored files.

    Warns once per kind of skipped entry. With ``compare_with`` (the other split's folder)
    also walks that split and warns once if both hold the same files (train/val leakage).
    """
    found = class_folders(split_dir) if split_dir.is_dir() else []
    if found != list(class_names):
        raise DataError(f"{split_dir} no longer has the class folders it had when the data "
                        f"set was resolved ({len(found)} vs {len(class_names)}); restart")
    scan = SplitWalker(split_dir, class_names).scan()
    for line in scan.notes.lines(split_dir):
        log.warning(line)
    if compare_with is not None:
        other = SplitWalker(compare_with, class_folders(compare_with)).scan()
        count, example = shared_images(scan, other)
        if count:
            log.warning(f"{split_dir.parent}: {count} image{'s' if count > 1 else ''} of "
                        f"{split_dir.name}/ {'are' if count > 1 else 'is'} also in "
                        f"{compare_with.name}/ (the same files, through links), so validation "
                        f"results would be too good; e.g. {example}")
    return scan.samples, scan.ignored


def shared_images(first: SplitScan, second: SplitScan) -> tuple[int, str]:
    """How many real image files two splits share, and one of them ("" if none)."""
    shared = []  # (count, example)
    for real, record in first.folders.items():
        other = second.folders.get(real)
        if other is not None and record.images:
            shared.append((min(record.images, other.images),
                           os.path.join(real, record.first_image)))
    for linked, folders in ((first.linked_images, second.folders),
                            (second.linked_images, first.folders)):
        for target in linked:
            folder, _, name = target.rpartition(os.sep)
            if folder in folders and is_image_file(name):
                shared.append((1, target))
    shared.extend((1, target) for target in sorted(first.linked_images & second.linked_images))
    return sum(count for count, _ in shared), (shared[0][1] if shared else "")
