"""What an image file claims to be, read from its header before anything is decoded.

OpenCV has no header-only API, and a 200-byte PNG may claim 30000×30000 pixels (a 2.7 GB
decode). This reads size, frame/page count and channel count of PNG (and APNG), JPEG, GIF,
WebP, BMP and TIFF straight from their headers, so callers can refuse oversized, animated or
multi-page files cheaply. Unknown or malformed headers give ``None``: the decoder decides.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


@dataclass(frozen=True)
class Header:
    kind: str  # PNG | JPEG | GIF | WebP | BMP | TIFF
    width: int
    height: int
    frames: int = 1  # animation frames or TIFF pages
    channels: int | None = None  # samples per pixel, where the header says (TIFF)

    @property
    def pixels(self) -> int:
        return self.width * self.height


def read_header(raw: bytes) -> Header | None:
    try:
        if raw[:8] == b"\x89PNG\r\n\x1a\n":
            return _png(raw)
        if raw[:2] == b"\xff\xd8":
            return _jpeg(raw)
        if raw[:6] in (b"GIF87a", b"GIF89a"):
            return _gif(raw)
        if raw[:4] == b"RIFF" and raw[8:12] == b"WEBP":
            return _webp(raw)
        if raw[:2] == b"BM" and len(raw) >= 26:
            w, h = struct.unpack_from("<ii", raw, 18)
            return Header("BMP", abs(w), abs(h))
        if raw[:4] in (b"II*\0", b"MM\0*"):
            return _tiff(raw)
    except (struct.error, IndexError):
        return None
    return None


def _png(raw: bytes) -> Header:
    w, h = struct.unpack_from(">II", raw, 16)
    frames, i = 1, 8
    while i + 8 <= len(raw):  # APNG: an acTL chunk before the first IDAT
        n, kind = struct.unpack_from(">I4s", raw, i)
        if kind == b"acTL":
            frames = struct.unpack_from(">I", raw, i + 8)[0]
        if kind in (b"IDAT", b"IEND"):
            break
        i += 12 + n
    return Header("PNG", w, h, max(frames, 1))


def _jpeg(raw: bytes) -> Header | None:
    i = 2
    while i + 4 <= len(raw):
        if raw[i] != 0xFF:
            return None
        marker = raw[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        seg = struct.unpack_from(">H", raw, i + 2)[0]
        if marker in _JPEG_SOF:
            h, w, c = struct.unpack_from(">HHB", raw, i + 5)
            return Header("JPEG", w, h, 1, c)
        if marker == 0xDA:
            return None
        i += 2 + seg
    return None


def _gif(raw: bytes) -> Header:
    w, h, flags = struct.unpack_from("<HHB", raw, 6)
    i = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
    frames = 0
    while i < len(raw):
        block = raw[i]
        if block == 0x3B:  # trailer
            break
        if block == 0x21:  # extension: label, then sub-blocks
            i += 2
        elif block == 0x2C:  # image descriptor, local colour table, LZW code size, sub-blocks
            frames += 1
            fw, fh, lflags = struct.unpack_from("<HHB", raw, i + 5)
            w, h = max(w, fw), max(h, fh)
            i += 10 + (3 << ((lflags & 7) + 1) if lflags & 0x80 else 0) + 1
        else:
            break
        while i < len(raw) and raw[i]:  # sub-blocks up to the zero terminator
            i += raw[i] + 1
        i += 1
    return Header("GIF", w, h, max(frames, 1))


def _webp(raw: bytes) -> Header | None:
    i, frames, size = 12, 0, None
    while i + 8 <= len(raw):
        kind, n = struct.unpack_from("<4sI", raw, i)
        d = i + 8
        if kind == b"VP8X":
            size = (1 + int.from_bytes(raw[d + 4:d + 7], "little"), 1 + int.from_bytes(raw[d + 7:d + 10], "little"))
        elif kind == b"ANMF":
            frames += 1
        elif kind == b"VP8 " and size is None:
            w, h = struct.unpack_from("<HH", raw, d + 6)
            size = (w & 0x3FFF, h & 0x3FFF)
        elif kind == b"VP8L" and size is None:
            b = struct.unpack_from("<I", raw, d + 1)[0]
            size = (1 + (b & 0x3FFF), 1 + ((b >> 14) & 0x3FFF))
        i = d + n + (n & 1)
    return Header("WebP", *size, max(frames, 1)) if size else None


def _tiff(raw: bytes) -> Header | None:
    e = "<" if raw[:2] == b"II" else ">"
    offset = struct.unpack_from(e + "I", raw, 4)[0]
    seen, pages, first = set(), 0, None
    while offset and offset not in seen and len(seen) < 10000:
        seen.add(offset)
        (n,) = struct.unpack_from(e + "H", raw, offset)
        tags = {}
        for k in range(n):
            tag, typ, count, value = struct.unpack_from(e + "HHI4s", raw, offset + 2 + 12 * k)
            if typ == 3:
                tags[tag] = struct.unpack_from(e + "H", value)[0]
            elif typ == 4:
                tags[tag] = struct.unpack_from(e + "I", value)[0]
        if not tags.get(254, 0) & 1:  # NewSubfileType bit 0: a reduced-resolution copy, not a page
            pages += 1
        if first is None:
            first = tags
        offset = struct.unpack_from(e + "I", raw, offset + 2 + 12 * n)[0]
    if not first or 256 not in first or 257 not in first:
        return None
    return Header("TIFF", first[256], first[257], max(pages, 1), first.get(277, 1))
