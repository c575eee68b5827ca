"""The versioned M2T bitstream container (specified in docs/bitstream.md).

Format version 7 (written now by fixed-rate models; portable, progressive, exact pixels;
version 6 adds the quality of variable-rate models: below), little-endian:

    magic            4 bytes  b"M2TC"
    version          u8       7 (or 5, 4, 3)
    flags            u8       bit 0: encoded on a CUDA device (informational);
                              bit 2: MT's confidence-adaptive order (else the fixed schedule)
    model_id_len     u8       1..MAX_MODEL_ID_LEN
    model_id         bytes    ASCII registry name of the model
    weights_hash     8 bytes  first 8 bytes of the model's weights digest (M2TCodec.weights_digest;
                              from version 4 it covers the integer synthesis transform that
                              decodes the version)
    height, width    u32 x2   original image size in pixels
    payload_len      u32      bytes of the payload (>= 4 per latent window)
    latent_crc       u32      CRC-32 of (height, width, C, h, w as u32) + y_hat (int32, C order)
    payload_crc      u32      CRC-32 of the payload
    num_steps        u8       S, the model's coding steps
    num_chunks       varint   chunks of up to CHUNK_WINDOWS windows (each its own range coder)
    step table       varints  S * num_chunks - 1 piece lengths in 4-byte words, step-major
                              (step 1: chunk 1, 2, ...; step 2: ...); the last piece is the
                              rest of the payload
    piece_crcs       u16 x S * num_chunks  (version 4 on) per piece, step-major like the table:
                              the low 16 bits of piece_checksum(height, width, the symbols
                              that piece codes), checked as each piece is decoded: a preview
                              verifies all it decodes, and a damaged stream, another model or
                              an edited size fails at its first bad piece
    header_crc       u32      CRC-32 of every header byte before this field
    payload          the pieces in table order

Piece (k, c) is the part of chunk c's range-coded stream that step k adds: so the header plus
the first K steps' pieces, a prefix of the stream, decodes the first K steps of every window
(a preview). `Header.step_ends[k]` is the stream length that holds steps 1..k+1.

Version 4 has version 3's layout; what changed is the decoder: from version 4 the pixels
come from the model's integer synthesis transform (int_synthesis.py), so they are a pure
function of the stream and the model, and the weights hash names that transform too.
Version 3 streams (m2t 0.3) are still read: their latent decodes exactly as before and the
integer transform makes the pixels (the float g_s of 0.3 may differ from them in the last
level of a few pixels).

Version 5 (m2t 0.6) has version 4's layout; again what changed is the decoder: its pixels come
from the integer synthesis transform's integer-v2 arithmetic (int_synthesis.py: weights
within 8 bits, one plane of int8 products instead of two, about 1.6x faster on CPUs), derived
from the same model, and its weights hash names that arithmetic. Version 4 streams decode with
integer-v1, to the pixels they always had.

Version 6 (m2t 0.7) is version 5 with one more field, written by variable-rate models only
(m2t_core/rate.py):

    quality          u16      right after model_id: the quality Q the stream was coded at, as
                              round(Q * 256), Q in [1, K] of the model's K rate levels; the
                              decoder computes its gains from it

Version 7 (m2t 0.8) has version 5's layout (no quality); what changed is the entropy model
that codes it: its linears' weights within 8 bits (exact.eight_bit_weights, derived from the
same model: each weight row re-rounded at a coarser exponent), so each product is one plane of
int8 products instead of two, about half the work. Its probabilities differ slightly from
version 5's (about 0.03 % of the bits), so the payload differs too; its weights hash names
that arithmetic. Version 5 streams decode with the 16-bit weights, to the latents they always
had.

Earlier versions are refused with UnsupportedVersionError: version 1 (a float entropy model;
its streams decoded only on the kind of machine that wrote them) and version 2 (one range
coder for the whole image, no previews) were written by m2t 0.2.0 and earlier, which still
reads them: decode there and re-encode.

Every field is validated before anything is allocated from it.
"""

from __future__ import annotations

import functools
import struct
import zlib
from dataclasses import dataclass

MAGIC = b"M2TC"
FORMAT_VERSION = 7  # what fixed-rate models write
QUALITY_VERSION = 6  # what variable-rate models write: version 5 and the quality
# 4 for decoders of m2t 0.4-0.5, 5 for m2t 0.6-0.7 (Encoder(format_version=N), m2t encode
# --format-version N); 6: variable-rate models
WRITABLE_VERSIONS = (4, 5, 6, 7)
READABLE_VERSIONS = (3, 4, 5, 6, 7)  # 3: m2t 0.3's, 4: m2t 0.4-0.5's streams (same layout; see the module docstring)
QUALITY_VERSIONS = (6,)  # the versions whose header holds a quality (variable-rate models)
EIGHT_BIT_ENTROPY_VERSIONS = (7,)  # coded by the entropy model with 8-bit weights (exact.eight_bit_weights)
RETIRED_VERSIONS = (1, 2)  # read by m2t 0.2.0 and earlier (see the module docstring)
LAST_RELEASE_READING_RETIRED = "0.2.0"
MAX_MODEL_ID_LEN = 64
MAX_SIDE = 65535
DEFAULT_MAX_PIXELS = 64_000_000
FLAG_CUDA = 1  # encoded on a CUDA device (informational)
FLAG_ADAPTIVE_ORDER = 4  # MT: each step's positions chosen by the model's confidence
KNOWN_FLAGS = FLAG_CUDA | FLAG_ADAPTIVE_ORDER
MAX_CHUNKS = 1 << 16  # 64 MP at the smallest window (16 latent tokens = 256 px a side) is ~1000
WORD_BYTES = 4  # the range coder's word
DOWNSAMPLING = 16
# The payload holds at least one coder word per latent window (the encoder pads with zero
# words), so a tiny stream cannot declare a huge image and make the decoder run the network
# over it: work is bounded by the bytes given.
MIN_PAYLOAD_BYTES_PER_WINDOW = 4
# The windows are coded in chunks of this many, each its own range coder: coder and decoder
# memory stay bounded by one chunk whatever the image size.
CHUNK_WINDOWS = 64


def has_quality(version: int) -> bool:
    """Whether a header of format `version` holds the quality field."""
    return version in QUALITY_VERSIONS


def eight_bit_entropy(version: int) -> bool:
    """Whether streams of format `version` are coded by the entropy model with 8-bit weights."""
    return version in EIGHT_BIT_ENTROPY_VERSIONS


_FIXED_AFTER_ID = struct.Struct("<8sIIIIIB")  # hash, h, w, len, crcs, num_steps (then the step table)
_QUALITY = struct.Struct("<H")  # version 6: between the model id and the fixed fields
QUALITY_FRAC_BITS = 8  # the quality field holds round(Q * 2^8): Q in steps of 1/256 (rate.py)
QUALITY_ONE = 1 << QUALITY_FRAC_BITS
_HEADER_CRC = struct.Struct("<I")
# The fewest bytes any readable stream has (format 3's smallest: magic, version, flags, a 1-byte
# model id, the fixed fields, a one-chunk step table, the header CRC, one window's payload):
# an archive index row shorter than this cannot hold a stream.
MIN_STREAM_BYTES = len(MAGIC) + 3 + 1 + _FIXED_AFTER_ID.size + 1 + _HEADER_CRC.size + MIN_PAYLOAD_BYTES_PER_WINDOW


class BitstreamError(ValueError):
    """The bytes are not a valid M2T bitstream (bad magic, version, truncation, corruption)."""


class UnsupportedVersionError(BitstreamError):
    pass


class ModelMismatchError(BitstreamError):
    """The bitstream was written by a different model than the one given or found."""


class ChecksumMismatchError(BitstreamError):
    """The decoded latent does not match the encoder's checksum."""


class ImageTooLargeError(BitstreamError):
    pass


def image_padding(height: int, width: int) -> tuple[int, int]:
    """Rows and columns added so both sides are multiples of the 16x down-sampling."""
    return (-height) % DOWNSAMPLING, (-width) % DOWNSAMPLING


def check_image_size(height: int, width: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
    """Raise ImageTooLargeError naming the limit that an image of height x width exceeds."""
    if height > MAX_SIDE or width > MAX_SIDE:
        raise ImageTooLargeError(
            f"image of {width}x{height} pixels exceeds the limit of {MAX_SIDE} pixels per side")
    if height * width > max_pixels:
        raise ImageTooLargeError(
            f"image of {width}x{height} = {height * width} pixels exceeds the limit of {max_pixels} "
            "pixels (raise max_pixels to code it)")


def min_payload_len(num_windows: int) -> int:
    """The fewest payload bytes a stream of `num_windows` latent windows may have."""
    return MIN_PAYLOAD_BYTES_PER_WINDOW * num_windows


def _varint(value: int) -> bytes:
    """LEB128: 7 bits a byte, low first."""
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _read_varint(data: bytes, pos: int, what: str) -> tuple[int, int]:
    """(value, next position); at most 5 bytes (values below 2^35), canonical."""
    value = 0
    for i in range(5):
        if pos + i >= len(data):
            raise BitstreamError(f"truncated bitstream: the header's {what} runs past the end")
        byte = data[pos + i]
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            if byte == 0 and i:
                raise BitstreamError(f"corrupt header: non-canonical {what}")
            return value, pos + i + 1
    raise BitstreamError(f"corrupt header: {what} longer than 5 bytes")


@dataclass(frozen=True)
class Header:
    model_id: str
    weights_hash: bytes
    height: int
    width: int
    payload_len: int
    latent_crc: int
    payload_crc: int
    # step_pieces[k][c] = payload bytes that step k adds to chunk c's stream.
    step_pieces: tuple[tuple[int, ...], ...]
    flags: int = 0
    version: int = FORMAT_VERSION
    piece_crcs: tuple[int, ...] = ()  # version 4 on: piece_checksum per (step, chunk), step-major
    quality: int | None = None  # version 6: the quality code round(Q * 256) (rate.py); None before

    @property
    def quality_value(self) -> float | None:
        """The quality Q the stream was coded at (version 6), None before."""
        return None if self.quality is None else self.quality / QUALITY_ONE

    @property
    def padding(self) -> tuple[int, int]:
        return image_padding(self.height, self.width)

    @property
    def num_steps(self) -> int:
        return len(self.step_pieces)

    @property
    def num_chunks(self) -> int:
        return len(self.step_pieces[0]) if self.step_pieces else 0

    @functools.cached_property  # a frozen header: computed once
    def size(self) -> int:
        """Bytes of the header (the payload starts here)."""
        return len(self._serialize())

    @functools.cached_property
    def step_ends(self) -> tuple[int, ...]:
        """For each step k, the length of the stream prefix (header included) that holds
        steps 1..k+1; the last equals the whole stream's length."""
        ends, total = [], self.size
        for pieces in self.step_pieces:
            total += sum(pieces)
            ends.append(total)
        return tuple(ends)

    def steps_in(self, available: int) -> int:
        """How many complete steps a prefix of `available` bytes of the stream holds."""
        return sum(1 for end in self.step_ends if end <= available)

    def to_bytes(self) -> bytes:
        if self.version not in WRITABLE_VERSIONS:
            raise ValueError(f"writes format versions {', '.join(map(str, WRITABLE_VERSIONS))} only, "
                             f"not {self.version}")
        return self._serialize()

    def _serialize(self) -> bytes:
        """The header's bytes in its version's layout (3: no piece checksums)."""
        model_id = self.model_id.encode("ascii")
        if not 1 <= len(model_id) <= MAX_MODEL_ID_LEN:
            raise ValueError(f"model id must be 1..{MAX_MODEL_ID_LEN} ASCII bytes: {self.model_id!r}")
        if len(self.weights_hash) != 8:
            raise ValueError("weights_hash must be 8 bytes")
        if self.flags & ~KNOWN_FLAGS:
            raise ValueError(f"unknown flags {self.flags:#04x}")
        if has_quality(self.version) != (self.quality is not None):
            need = "needs" if has_quality(self.version) else "has no"
            raise ValueError(f"format {self.version} {need} quality")
        quality = _QUALITY.pack(self.quality) if self.quality is not None else b""
        fixed = _FIXED_AFTER_ID.pack(
            self.weights_hash, self.height, self.width, self.payload_len, self.latent_crc,
            self.payload_crc, self.num_steps,
        ) + self._step_table() + (self._piece_crc_table() if self.version >= 4 else b"")
        body = MAGIC + bytes([self.version, self.flags, len(model_id)]) + model_id + quality + fixed
        return body + _HEADER_CRC.pack(zlib.crc32(body))

    def piece_crc(self, step: int, chunk: int) -> int | None:
        """The checksum of piece (step, chunk) (0-based), or None (a version 3 stream)."""
        return self.piece_crcs[step * self.num_chunks + chunk] if self.piece_crcs else None

    def _piece_crc_table(self) -> bytes:
        count = self.num_steps * self.num_chunks
        if len(self.piece_crcs) != count or any(not 0 <= c < 1 << 16 for c in self.piece_crcs):
            raise ValueError("piece_crcs needs one 16-bit checksum per piece (piece_checksum)")
        return struct.pack(f"<{count}H", *self.piece_crcs)

    def _step_table(self) -> bytes:
        pieces = [p for step in self.step_pieces for p in step]
        if not 1 <= self.num_steps <= 255 or not 1 <= self.num_chunks <= MAX_CHUNKS:
            raise ValueError(f"step table of {self.num_steps} steps x {self.num_chunks} chunks is out of range")
        if any(len(step) != self.num_chunks for step in self.step_pieces):
            raise ValueError("every step needs one piece per chunk")
        if any(p < 0 or p % WORD_BYTES for p in pieces) or sum(pieces) != self.payload_len:
            raise ValueError("step pieces must be whole words that add up to payload_len")
        # The last piece is implied by payload_len.
        return _varint(self.num_chunks) + b"".join(_varint(p // WORD_BYTES) for p in pieces[:-1])


def piece_checksum(height: int, width: int, symbols: bytes) -> int:
    """The low 16 bits of the CRC-32 of the image size (two u32) then the symbols a piece codes
    (int32 little-endian, in coding order). Over decoded values, not bytes: a preview checks
    what it decodes, and another model or an edited size shows as well as a damaged byte."""
    return zlib.crc32(symbols, zlib.crc32(struct.pack("<II", height, width))) & 0xFFFF


def pack(header: Header, payload: bytes) -> bytes:
    if header.payload_len != len(payload):
        raise ValueError("header.payload_len does not match the payload")
    return header.to_bytes() + payload


def unpack(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, prefix: bool = False) -> tuple[Header, bytes]:
    """Parse and validate a bitstream; returns (header, payload). Raises BitstreamError.

    prefix=True accepts a stream cut short: the payload returned is what there is (its
    checksum cannot be checked; `header.steps_in(len(data))` says how many steps it holds).
    A cut inside the header is still an error."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise BitstreamError(f"expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) < 7:
        raise BitstreamError(f"truncated bitstream: {len(data)} bytes is shorter than any header")
    if data[:4] != MAGIC:
        raise BitstreamError(f"not an M2T bitstream (magic {data[:4]!r}, expected {MAGIC!r})")
    version, flags, id_len = data[4], data[5], data[6]
    if version in RETIRED_VERSIONS:
        raise UnsupportedVersionError(
            f"bitstream format version {version} is no longer read (this decoder reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}): "
            f"m2t {LAST_RELEASE_READING_RETIRED} still decodes it; decode it there and re-encode the image, "
            "or re-encode the source image")
    if version not in READABLE_VERSIONS:
        raise UnsupportedVersionError(
            f"unsupported bitstream format version {version} (this decoder reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))})")
    if flags & ~KNOWN_FLAGS:
        raise BitstreamError(f"corrupt header: unknown flags {flags:#04x}")
    if not 1 <= id_len <= MAX_MODEL_ID_LEN:
        raise BitstreamError(f"corrupt header: model id length {id_len}")
    fixed_start = 7 + id_len
    quality = None
    if has_quality(version):
        if len(data) < fixed_start + _QUALITY.size:
            raise BitstreamError("truncated bitstream: the header ends in its quality field")
        (quality,) = _QUALITY.unpack_from(data, fixed_start)
        fixed_start += _QUALITY.size
    table_start = fixed_start + _FIXED_AFTER_ID.size
    if len(data) < table_start + _HEADER_CRC.size:
        raise BitstreamError(f"truncated bitstream: {len(data)} bytes, header needs {table_start + _HEADER_CRC.size}")
    weights_hash, height, width, payload_len, latent_crc, payload_crc, num_steps = \
        _FIXED_AFTER_ID.unpack_from(data, fixed_start)
    step_pieces, table_end = _read_step_table(data, table_start, num_steps, payload_len)
    piece_crcs: tuple[int, ...] = ()
    if version >= 4:
        crc_table = struct.Struct(f"<{num_steps * len(step_pieces[0])}H")
        if len(data) < table_end + crc_table.size:
            raise BitstreamError(f"truncated bitstream: the header's piece checksums need {crc_table.size} bytes")
        piece_crcs = crc_table.unpack_from(data, table_end)
        table_end += crc_table.size
    header_end = table_end + _HEADER_CRC.size
    if len(data) < header_end:
        raise BitstreamError(f"truncated bitstream: {len(data)} bytes, header needs {header_end}")
    (stored_header_crc,) = _HEADER_CRC.unpack_from(data, header_end - _HEADER_CRC.size)
    if zlib.crc32(data[: header_end - _HEADER_CRC.size]) != stored_header_crc:
        raise BitstreamError("corrupt header: header checksum mismatch")
    try:
        model_id = data[7:7 + id_len].decode("ascii")
    except UnicodeDecodeError:
        raise BitstreamError("corrupt header: model id is not ASCII") from None
    if not (1 <= height <= MAX_SIDE and 1 <= width <= MAX_SIDE):
        raise BitstreamError(f"corrupt header: image size {height}x{width} out of range")
    if height * width > max_pixels:
        raise ImageTooLargeError(
            f"image of {width}x{height} = {height * width} pixels exceeds the limit of {max_pixels} "
            "(raise max_pixels to decode it)"
        )
    payload = data[header_end:]
    cut_short = prefix and len(payload) < payload_len
    if len(payload) != payload_len and not cut_short:
        kind = "truncated" if len(payload) < payload_len else "trailing bytes after"
        raise BitstreamError(
            f"{kind} payload: header says {payload_len} bytes, found {len(payload)}"
            + (" (a preview decodes the complete steps of a cut stream)" if kind == "truncated" else "")
        )
    if not cut_short and zlib.crc32(payload) != payload_crc:
        raise BitstreamError("corrupt payload: payload checksum mismatch")
    header = Header(
        model_id=model_id, weights_hash=weights_hash, height=height, width=width, payload_len=payload_len,
        latent_crc=latent_crc, payload_crc=payload_crc, step_pieces=step_pieces, flags=flags, version=version,
        piece_crcs=piece_crcs, quality=quality,
    )
    return header, payload


def _read_step_table(data: bytes, pos: int, num_steps: int, payload_len: int):
    """The step table at data[pos:] -> (step_pieces in bytes, end position)."""
    if not 1 <= num_steps <= 255:
        raise BitstreamError(f"corrupt header: {num_steps} coding steps")
    num_chunks, pos = _read_varint(data, pos, "chunk count")
    if not 1 <= num_chunks <= MAX_CHUNKS:
        raise BitstreamError(f"corrupt header: {num_chunks} chunks (1..{MAX_CHUNKS})")
    count = num_steps * num_chunks - 1
    if len(data) < pos + count + _HEADER_CRC.size:  # each entry is at least one byte
        raise BitstreamError(f"truncated bitstream: the header's step table needs at least {count} more bytes")
    if payload_len % WORD_BYTES:
        raise BitstreamError(f"corrupt header: payload length {payload_len} is not whole words")
    words, left = [], payload_len // WORD_BYTES
    for _ in range(count):
        value, pos = _read_varint(data, pos, "step table")
        if value > left:
            raise BitstreamError("corrupt header: the step table adds up to more than the payload")
        words.append(value)
        left -= value
    words.append(left)
    pieces = tuple(tuple(WORD_BYTES * w for w in words[k * num_chunks:(k + 1) * num_chunks])
                   for k in range(num_steps))
    return pieces, pos


def read_header(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, prefix: bool = False) -> Header:
    return unpack(data, max_pixels, prefix)[0]
