"""The CPU kernel lab: the variants behind the verdicts quoted in ``tfm/backends/cpu``'s module
headers, each checked against the float64 reference and timed side by side (dev/README.md).

Importing the package prepares the process the way the studies do, before Numba loads:
compiled kernels are cached under a directory keyed by the sources of tfm and of this lab
(Numba revalidates a cached kernel only against its own file, not the helpers it calls), tfm
is imported first (it sets ``OMP_WAIT_POLICY=PASSIVE``) and PyTorch right after it (if a
Numba parallel kernel starts libgomp before PyTorch loads it, PyTorch runs ~3x slower:
``studies/_common.py``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _source_hash() -> str:
    """tfm's source hash (``tfm/_source.py``, loaded by path: importing tfm loads Numba) with
    this lab's own files mixed in."""
    spec = importlib.util.spec_from_file_location("_tfm_source", ROOT / "tfm" / "_source.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    lab = b"".join(p.read_bytes() for p in sorted(Path(__file__).parent.glob("*.py")))
    return hashlib.sha1(module.source_hash().encode() + lab).hexdigest()[:12]


os.environ.setdefault("NUMBA_CACHE_DIR", str(ROOT / ".venv" / "numba-cache" / f"dev-cpu-{_source_hash()}"))
import tfm  # noqa: E402,F401

try:
    import torch  # noqa: F401
except ImportError:  # the PyTorch rows are then left out, with the reason printed
    pass
