"""Reference signs: the seeded counter-based generator, its low-rank template variant, and bit packing.

Everything here is a pure function of (seed, parameter name, position): no state, no files.
"""

from ..constants import SIGNS_FORMAT_VERSION
from .generator import check_seed, reference_signs, seeded_sign_bits, seeded_signs, sign_key, template_signs
from .packing import pack_bits, pack_signs, unpack_signs

__all__ = [
    "SIGNS_FORMAT_VERSION",
    "check_seed",
    "pack_bits",
    "pack_signs",
    "reference_signs",
    "seeded_sign_bits",
    "seeded_signs",
    "sign_key",
    "template_signs",
    "unpack_signs",
]
