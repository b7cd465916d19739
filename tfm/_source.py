"""The identity of tfm's code: a hash of its sources, shared by the Numba cache and the studies.

Standard library only, so that ``studies/_common.py`` can load this file by path and key
``NUMBA_CACHE_DIR`` on it before Numba is imported. The Makefile computes the same hash in
shell (``SRC_HASH``).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def source_hash() -> str:
    """sha1 (12 hex digits) of tfm/*.py, tfm/*/*.py and tfm/*/*/*.py, in sorted path order.

    Numba revalidates a cached kernel only against its own file, not the helpers it calls, so
    its cache is keyed by this; a saved study row is reused only if measured under it.
    """
    files = sorted({str(p.relative_to(ROOT)) for pat in ("tfm/*.py", "tfm/*/*.py", "tfm/*/*/*.py")
                    for p in ROOT.glob(pat)})
    return hashlib.sha1(b"".join((ROOT / f).read_bytes() for f in files)).hexdigest()[:12]
