"""Value syntax of the nvmet configfs tree: parsing and printing attribute text.

Each parser takes what a user or a JSON file supplies (the kernel's text form, or the
matching Python value) and returns the canonical Python value, or raises ConfigError
with a sentence saying what a valid value looks like.  Printers produce exactly the
text the kernel shows when the configfs file is read, so JSON written from these
values matches what nvmetcli writes.
"""

from __future__ import annotations

import re
import uuid as uuidlib
from collections.abc import Callable
from typing import Any

from nvmet_p2p.errors import ConfigError
from nvmet_p2p.wire.limits import NVMF_NQN_SIZE

_UUID_NQN_PREFIX = "nqn.2014-08.org.nvmexpress:uuid:"
# "nqn.yyyy-mm.reverse.domain:anything": the date is when the domain was owned.
_NQN_RE = re.compile(r"^nqn\.([0-9]{4})-([0-9]{2})\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?"
                     r"(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*:.+$", re.DOTALL)
_UUID_RE = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}"
                      r"-[0-9a-fA-F]{12}$")
_BDF_RE = re.compile(r"^([0-9a-fA-F]{4}):([0-9a-fA-F]{2}):([0-1][0-9a-fA-F])\.([0-7])$")
_SIZE_RE = re.compile(r"^\s*([0-9]{1,20})\s*([kmgtKMGT]?)(i?[bB])?\s*$")
# Every number the kernel parses fits in 64 bits (20 digits, or 0x + 16); longer text is
# refused before int() sees it (its 4,300-digit limit would raise ValueError).
MAX_NUMBER_CHARS = 24
PATH_MAX = 4096  # include/uapi/linux/limits.h, counting the terminating NUL
_SIZE_SHIFT = {"": 0, "k": 10, "m": 20, "g": 30, "t": 40}
# kstrtobool() accepts these spellings (first character decides, plus on/off).
_TRUE = {"1", "y", "yes", "t", "true", "on"}
_FALSE = {"0", "n", "no", "f", "false", "off"}

Parser = Callable[[Any], Any]


def check_nqn(nqn: Any, what: str = "NQN") -> str:
    """Accept an NQN as the kernel target does; return it unchanged.

    nvmet_subsys_make() and nvmet_hosts_make_group() take any configfs directory name:
    only the discovery NQN is refused (by the caller), and a directory name cannot be
    empty, "." or "..", nor hold '/' or NUL.  An NQN off the NVMe naming format is
    accepted with a warning (see nqn_format_warning); one longer than NVMF_NQN_SIZE is
    refused where the kernel silently truncates it (docs/kernel-differences.md).
    """
    if not isinstance(nqn, str):
        raise ConfigError(f"{what} must be a string like nqn.2014-08.com.example:target1, "
                          f"not {nqn!r}")
    size = utf8_size(nqn, what)
    if size > NVMF_NQN_SIZE:
        raise ConfigError(f"{what} {nqn[:40]!r}... is {size} bytes; an NQN is at most "
                          f"{NVMF_NQN_SIZE} bytes of UTF-8, shorten it")
    if nqn in ("", ".", ".."):
        raise ConfigError(f"{what} {nqn!r} cannot name a configfs directory: use "
                          f"nqn.yyyy-mm.reverse.domain:name")
    if "/" in nqn or "\0" in nqn:
        raise ConfigError(f"{what} {nqn!r} contains '/' or NUL, which a configfs directory "
                          "name cannot hold; remove them")
    return nqn


def nqn_format_warning(nqn: str) -> str | None:
    """Why `nqn` does not follow the NVMe naming format (base spec 4.5), or None.

    Such NQNs work (the kernel target takes them too) but some hosts and tools may
    refuse or mangle them.
    """
    hint = ("the NVMe format is nqn.yyyy-mm.reverse.domain:name (e.g. "
            f"nqn.2014-08.com.example:disk1) or {_UUID_NQN_PREFIX}<uuid>")
    if not nqn.startswith("nqn."):
        return f"NQN {nqn!r} does not start with 'nqn.'; {hint}"
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in nqn):
        return f"NQN {nqn!r} contains whitespace or control characters; {hint}"
    if nqn.startswith(_UUID_NQN_PREFIX):
        if not _UUID_RE.match(nqn[len(_UUID_NQN_PREFIX):]):
            return (f"NQN {nqn!r}: the uuid form needs a UUID after {_UUID_NQN_PREFIX} "
                    "(8-4-4-4-12 hex digits)")
        return None
    m = _NQN_RE.match(nqn)
    if not m or not 1 <= int(m.group(2)) <= 12:
        return f"NQN {nqn!r} is not in the NVMe format; {hint}"
    return None


def utf8_size(text: str, what: str) -> int:
    """Bytes of `text` in UTF-8; a lone surrogate (possible in JSON) is refused."""
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError as e:
        raise ConfigError(f"{what} {text[:40]!r} is not valid Unicode (a lone surrogate at "
                          f"character {e.start}); fix the text") from None


def parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
    raise ConfigError(f"{value!r} is not a boolean: use 0 or 1")


def show_bool(value: bool) -> str:
    return "1" if value else "0"


def _to_int(value: Any) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"{value!r} is not a number: write digits, e.g. 4096")
    if isinstance(value, int):
        if value.bit_length() > 64:
            raise ConfigError(f"{str(value)[:24]}... is too large: every value here fits "
                              "in 64 bits")
        return value
    if isinstance(value, str):
        text = value.strip()
        if len(text) > MAX_NUMBER_CHARS:
            raise ConfigError(f"{text[:24]!r}... is too long for a number: every value here "
                              "fits in 64 bits")
        # int() also takes other scripts' digits and '_' separators; kstrto*() does not.
        if text.isascii() and "_" not in text:
            for base in (10, 0):  # the kernel's kstrto*(..., 0) also takes 0x...
                try:
                    return int(text, base)
                except ValueError:
                    pass
    raise ConfigError(f"{value!r} is not a number: write digits, e.g. 4096")


def int_range(lo: int, hi: int, *, also: tuple[int, ...] = (), why: str = "") -> Parser:
    """Parser for an integer in lo..hi (plus the special values in `also`)."""
    def parse(value: Any) -> int:
        n = _to_int(value)
        if n in also or lo <= n <= hi:
            return n
        extra = "".join(f" or {a}" for a in also)
        raise ConfigError(f"{n} is out of range: use {lo}..{hi}{extra}{why}")
    return parse


def int_choice(options: tuple[int, ...]) -> Parser:
    def parse(value: Any) -> int:
        n = _to_int(value)
        if n not in options:
            raise ConfigError(f"{n} is not supported: use {' or '.join(map(str, options))}")
        return n
    return parse


def show_int(value: int) -> str:
    return str(value)


def choice(options: tuple[str, ...], refused: dict[str, str] | None = None) -> Parser:
    """Parser for an enumerated string; `refused` maps known-but-unsupported values to why."""
    def parse(value: Any) -> str:
        if not isinstance(value, str):
            shown = ", ".join(repr(o) for o in options)
            raise ConfigError(f"{value!r} is not valid: use one of {shown}")
        text = value.strip()
        if refused and text in refused:
            raise ConfigError(f"{text!r} {refused[text]}")
        if text not in options:
            shown = ", ".join(repr(o) for o in options)
            raise ConfigError(f"{value!r} is not valid: use one of {shown}")
        return text
    return parse


def ascii_text(max_len: int, *, what: str, allow_empty: bool = False) -> Parser:
    """Parser for an Identify string field: printable ASCII (NVMe 1.4 section 1.5)."""
    def parse(value: Any) -> str:
        if not isinstance(value, str):
            raise ConfigError(f"{what} must be text, not {value!r}")
        text = value.split("\n", 1)[0]  # the kernel stops at the first newline
        if not text and not allow_empty:
            raise ConfigError(f"{what} cannot be empty: give 1..{max_len} ASCII characters")
        if len(text) > max_len:
            raise ConfigError(f"{what} {text!r} is {len(text)} characters; shorten it to "
                              f"at most {max_len}")
        if any(not 0x20 <= ord(c) <= 0x7E for c in text):
            raise ConfigError(f"{what} {text!r} must contain only printable ASCII characters")
        return text
    return parse


def token(max_len: int, *, what: str) -> Parser:
    """Parser for an address field: one word without whitespace, possibly empty."""
    def parse(value: Any) -> str:
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str):
            raise ConfigError(f"{what} must be text, not {value!r}")
        text = value.strip()
        utf8_size(text, what)
        if any(c.isspace() for c in text):
            raise ConfigError(f"{what} {text!r} contains whitespace: give a single word")
        if len(text) > max_len:
            raise ConfigError(f"{what} {text!r} is longer than {max_len} characters")
        return text
    return parse


def parse_path(value: Any) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"device_path must be text, not {value!r}")
    text = value.split("\n", 1)[0]
    if "\0" in text:
        raise ConfigError(f"device_path {text[:60]!r} contains a NUL byte, which no file "
                          "name can hold; remove it")
    size = utf8_size(text, "device_path")
    if size >= PATH_MAX:
        raise ConfigError(f"device_path is {size} bytes; a path is at most {PATH_MAX - 1} "
                          "bytes (PATH_MAX), shorten it")
    # An unset kernel device_path reads back as "(null)" and nvmetcli saves that text.
    return "" if text == "(null)" else text


def parse_uuid(value: Any) -> str:
    """uuid_parse(): exactly 8-4-4-4-12 hex digits; shown lower case (%pUb)."""
    text = value.strip() if isinstance(value, str) else ""
    if not _UUID_RE.match(text):
        raise ConfigError(f"{value!r} is not a UUID: write 8-4-4-4-12 hex digits, e.g. "
                          "6f1b3c1e-2d4a-4e8b-9a7c-0123456789ab")
    return text.lower()


def parse_nguid(value: Any) -> str:
    """The kernel reads 16 hex byte pairs, each optionally followed by '-' or ':'."""
    text = value.strip() if isinstance(value, str) else ""
    digits, i = [], 0
    for _ in range(16):
        pair = text[i:i + 2]
        if len(pair) != 2 or not all(c in "0123456789abcdefABCDEF" for c in pair):
            raise ConfigError(f"{value!r} is not an NGUID: write 32 hex digits, optionally "
                              "grouped with '-' or ':' (e.g. the UUID form)")
        digits.append(pair.lower())
        i += 2
        if text[i:i + 1] in ("-", ":"):
            i += 1
    if i != len(text):
        raise ConfigError(f"{value!r} has text after the 16 NGUID bytes: remove it")
    return str(uuidlib.UUID("".join(digits)))


def parse_version(value: Any) -> str:
    """attr_version: "major.minor[.tertiary]"; shown without a zero tertiary, as the kernel."""
    m = re.match(r"^\s*(\d+)\.(\d+)(?:\.(\d+))?\s*$", value if isinstance(value, str) else "")
    if not m:
        raise ConfigError(f"{value!r} is not an NVMe version: write major.minor, e.g. 1.3")
    major, minor, tert = int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)
    if major > 0xFFFF or minor > 0xFF or tert > 0xFF:
        raise ConfigError(f"{value!r}: major is at most 65535, minor and tertiary at most 255")
    return f"{major}.{minor}.{tert}" if tert else f"{major}.{minor}"


def parse_ieee_oui(value: Any) -> int:
    n = _to_int(value)
    if not 0 <= n < 0x1000000:
        raise ConfigError(f"{value!r} is not an IEEE OUI: use 0x000000..0xffffff")
    return n


def show_ieee_oui(value: int) -> str:
    return f"0x{value:06x}"


def parse_p2pmem(value: Any) -> str:
    """Namespace p2pmem: 0 (off), 1 (nearest compatible provider) or a PCI BDF to pin one."""
    if isinstance(value, str):
        m = _BDF_RE.match(value.strip())
        if m:
            return value.strip().lower()
    try:
        return show_bool(parse_bool(value))
    except ConfigError:
        raise ConfigError(f"{value!r} is not a p2pmem value: use 0 (off), 1 (auto) or a PCI "
                          "address with its domain, e.g. 0000:03:00.0") from None


def parse_size(value: Any) -> int | None:
    """A byte count: an int, or text such as "4096", "64M", "1G" (binary units); "" unsets."""
    if value is None or value == "":
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    elif isinstance(value, str) and value.isascii() and (m := _SIZE_RE.match(value)):
        n = int(m.group(1)) << _SIZE_SHIFT[m.group(2).lower()]
    else:
        raise ConfigError(f"{value!r} is not a size: write bytes or a number with K, M, G or "
                          "T (powers of 1024), e.g. 64M")
    if n <= 0:
        raise ConfigError(f"size {n} must be positive")
    if n.bit_length() > 64:
        raise ConfigError(f"size {str(n)[:24]}... is too large: at most 2^64 - 1 bytes")
    return n


def show_size(value: int | None) -> str:
    return "" if value is None else str(value)
