"""What a file given as input is, from its first bytes, so that a wrong file is refused with one
line naming it and what it is ("x.npz is a text file, not an .npz archive") instead of the error
a loader meets deep inside (numpy's advice about pickled data, the unpickler's "KeyError: 101").

    expect(path, "npz")    # ValueError unless `path` starts as an .npz archive does

The checks read at most a few kilobytes and never parse the file: a file that passes may still
be refused by its loader, with that loader's message."""
from __future__ import annotations

import struct
from pathlib import Path

# leading bytes → what the file is, in words (first match wins)
SIGNATURES = (
    (b"version https://git-lfs", "a git-lfs pointer"),
    (b"PK\x03\x04", "a zip archive"),
    (b"PK\x05\x06", "a zip archive"),             # an empty one
    (b"\x93NUMPY", "an .npy array"),
    (b"\x80", "a pickle"),                         # protocol 2+: a legacy torch.save file
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF8", "a GIF image"),
    (b"\x1f\x8b", "a gzip file"),
    (b"\x89HDF\r\n\x1a\n", "an HDF5 file"),
    (b"%PDF", "a PDF document"),
)

# what each kind of input must be: (its name in messages, the kinds from kind_of that pass)
EXPECTED = {
    "npz": ("an .npz archive", {"a zip archive", "an .npy array"}),   # np.load reads both
    "npy": ("an .npy array", {"an .npy array", "a zip archive"}),
    "torch": ("a PyTorch checkpoint", {"a zip archive", "a pickle"}),  # torch.save: zip; legacy
    "safetensors": ("a safetensors file", {"a safetensors file"}),
}


def kind_of(path) -> str:
    """A file's kind in words: "a folder", "an empty file", "a zip archive", "a text file", …,
    or "a binary file of no format ddpm_fast knows"."""
    path = Path(path)
    if path.is_dir():
        return "a folder"
    with open(path, "rb") as f:
        head = f.read(4096)
    if not head:
        return "an empty file"
    for signature, name in SIGNATURES:
        if head.startswith(signature):
            return name
    if len(head) >= 9:                              # u64 header length, then a JSON header
        (n,) = struct.unpack("<Q", head[:8])
        if head[8:9] == b"{" and 2 <= n <= path.stat().st_size - 8:
            return "a safetensors file"
    if b"\0" not in head:
        try:
            head.decode("utf-8")
            return "a text file"
        except UnicodeDecodeError as e:             # a multi-byte character cut at 4096
            if e.start >= len(head) - 3:
                return "a text file"
    return "a binary file of no format ddpm_fast knows"


def expect(path, kind: str) -> None:
    """ValueError "PATH is <what it is>, not <kind>" unless `path` starts as `kind` (a key of
    EXPECTED) does. A missing path is left to the loader, which names it."""
    path = Path(path)
    if not path.is_file():
        return
    wanted, passes = EXPECTED[kind]
    found = kind_of(path)
    if found not in passes:
        hint = " (fetch the file itself: git lfs pull)" if found == "a git-lfs pointer" else ""
        raise ValueError(f"{path} is {found}, not {wanted}{hint}")


def expect_array_file(path) -> None:
    """An image array given by name: `.npz` / `.npy` files must start as one (np.load reads
    either under either name); other paths are left to the loader."""
    suffix = Path(path).suffix.lower()
    if suffix in (".npz", ".npy"):
        expect(path, suffix[1:])


def expect_weights_file(path) -> None:
    """A weights file given by name: `.safetensors`, else a torch.save file (zip, or a legacy
    pickle). Folders are left to the loader."""
    expect(path, "safetensors" if Path(path).suffix.lower() == ".safetensors" else "torch")
