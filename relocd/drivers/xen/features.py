"""Names (as /proc/cpuinfo spells them) of the bits in a Xen CPU featureset.

Xen numbers its featureset words by CPUID leaf and register
(``xen/arch-x86/cpufeatureset.h``); the names come from the same table the kvm
driver uses, so a reservation compares like with like.
"""

from __future__ import annotations

from relocd.drivers.kvm.cpufeatures import feature_names

#: featureset word -> (CPUID leaf, subleaf, register)
WORDS: dict[int, tuple[int, int, str]] = {
    0: (1, 0, "edx"),
    1: (1, 0, "ecx"),
    2: (0x80000001, 0, "edx"),
    3: (0x80000001, 0, "ecx"),
    5: (7, 0, "ebx"),
    6: (7, 0, "ecx"),
    9: (7, 0, "edx"),
}
_REGS = ("eax", "ebx", "ecx", "edx")


def featureset_names(words: list[int]) -> frozenset[str]:
    """The named features set in a featureset."""
    leaves: dict[tuple[int, int], dict[str, int]] = {}
    for index, value in enumerate(words):
        where = WORDS.get(index)
        if where is not None:
            leaf, sub, reg = where
            leaves.setdefault((leaf, sub), {})[reg] = value
    entries = [(leaf, sub, *(regs.get(r, 0) for r in _REGS)) for (leaf, sub), regs in leaves.items()]
    return feature_names(entries)  # type: ignore[arg-type]
