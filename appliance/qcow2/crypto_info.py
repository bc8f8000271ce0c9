"""What ``qemu-img info`` says of an encrypted qcow2 image (we hold no key).

Method 1 is QEMU's old AES-CBC scheme, which has no header of its own. Method
2 keeps a LUKS1 header (cryptsetup's on-disk format) in the clusters the
crypto header extension names (qcow2.txt, "Full disk encryption header
pointer"); QEMU reports its cipher, key slots and payload offset, in the
order of QEMU 7.2's QCryptoBlockInfoLUKS as qemu-img prints it.
"""

from __future__ import annotations

import os
import struct
from typing import Any

from appliance.qcow2 import header as H

_LUKS = struct.Struct(">6sH32s32s32sII20s32sI40s")  # 208 bytes, then 8 key slots
_SLOT = struct.Struct(">II32sII")
_SLOT_ACTIVE = 0x00AC71F3


def encrypt_info(fd: int, h: H.Header) -> dict[str, Any] | None:
    """The ``encrypt`` member of the format-specific data, or None if unreadable."""
    if h.crypt_method == 1:
        return {"format": "aes"}
    ext = h.ext(H.EXT_CRYPTO)
    if h.crypt_method != 2 or ext is None or len(ext) < 16:
        return None
    off, _length = struct.unpack_from(">QQ", ext)
    raw = os.pread(fd, _LUKS.size + 8 * _SLOT.size, off)
    if len(raw) < _LUKS.size + 8 * _SLOT.size:
        return None
    (magic, _ver, cipher, mode, hash_spec, payload, key_bytes, _digest, _salt, mk_iters,
     uuid) = _LUKS.unpack_from(raw)
    if magic != b"LUKS\xba\xbe":
        return None

    def text(b: bytes) -> str:
        return b.split(b"\0", 1)[0].decode("ascii", "replace")

    mode_name, _, ivgen = text(mode).partition("-")
    ivgen_alg, _, ivgen_hash = ivgen.partition(":")
    bits = key_bytes * 8 // (2 if mode_name == "xts" else 1)
    out: dict[str, Any] = {"ivgen-alg": ivgen_alg}
    if ivgen_hash:
        out["ivgen-hash-alg"] = ivgen_hash
    out["hash-alg"] = text(hash_spec)
    out["cipher-alg"] = f"{text(cipher)}-{bits}"
    out["uuid"] = text(uuid)
    out["format"] = "luks"
    out["cipher-mode"] = mode_name
    slots = []
    for i in range(8):
        active, iters, _s, key_off, stripes = _SLOT.unpack_from(raw, _LUKS.size + i * _SLOT.size)
        if active == _SLOT_ACTIVE:
            slots.append({"active": True, "iters": iters, "key-offset": key_off * 512,
                          "stripes": stripes})
        else:
            slots.append({"active": False, "key-offset": key_off * 512})
    out["slots"] = slots
    out["payload-offset"] = payload * 512
    out["master-key-iters"] = mk_iters
    return out
