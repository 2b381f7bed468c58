"""CPU feature names (as /proc/cpuinfo spells them) from KVM_GET_SUPPORTED_CPUID.

A migration target must offer every feature the source's guest may use; the
reservation compares these name sets.  Only the common bits of leaves 1, 7
and 0x80000001 are named.
"""

from __future__ import annotations

from typing import Any

# (leaf, subleaf, register) -> {bit: name}
_BITS: dict[tuple[int, int, str], dict[int, str]] = {
    (1, 0, "edx"): {
        0: "fpu", 1: "vme", 2: "de", 3: "pse", 4: "tsc", 5: "msr", 6: "pae", 7: "mce",
        8: "cx8", 9: "apic", 11: "sep", 12: "mtrr", 13: "pge", 14: "mca", 15: "cmov",
        16: "pat", 17: "pse36", 19: "clflush", 23: "mmx", 24: "fxsr", 25: "sse",
        26: "sse2", 27: "ss", 28: "ht",
    },
    (1, 0, "ecx"): {
        0: "pni", 1: "pclmulqdq", 3: "monitor", 9: "ssse3", 12: "fma", 13: "cx16",
        17: "pcid", 19: "sse4_1", 20: "sse4_2", 21: "x2apic", 22: "movbe", 23: "popcnt",
        24: "tsc_deadline_timer", 25: "aes", 26: "xsave", 28: "avx", 29: "f16c",
        30: "rdrand", 31: "hypervisor",
    },
    (7, 0, "ebx"): {
        0: "fsgsbase", 1: "tsc_adjust", 3: "bmi1", 4: "hle", 5: "avx2", 7: "smep",
        8: "bmi2", 9: "erms", 10: "invpcid", 11: "rtm", 16: "avx512f", 17: "avx512dq",
        18: "rdseed", 19: "adx", 20: "smap", 21: "avx512ifma", 23: "clflushopt",
        24: "clwb", 28: "avx512cd", 29: "sha_ni", 30: "avx512bw", 31: "avx512vl",
    },
    (7, 0, "ecx"): {
        1: "avx512vbmi", 2: "umip", 3: "pku", 5: "waitpkg", 6: "avx512_vbmi2",
        8: "gfni", 9: "vaes", 10: "vpclmulqdq", 11: "avx512_vnni", 12: "avx512_bitalg",
        14: "avx512_vpopcntdq", 16: "la57", 22: "rdpid", 25: "cldemote", 27: "movdiri",
        28: "movdir64b",
    },
    (7, 0, "edx"): {
        4: "fsrm", 8: "avx512_vp2intersect", 14: "serialize", 16: "tsxldtrk",
        22: "amx_bf16", 23: "avx512_fp16", 24: "amx_tile", 25: "amx_int8",
        26: "spec_ctrl", 27: "intel_stibp", 29: "arch_capabilities", 31: "ssbd",
    },
    (0x80000001, 0, "edx"): {11: "syscall", 20: "nx", 26: "pdpe1gb", 27: "rdtscp", 29: "lm"},
    (0x80000001, 0, "ecx"): {0: "lahf_lm", 5: "abm", 6: "sse4a", 8: "3dnowprefetch", 16: "fma4"},
}


def feature_names(entries: list[tuple[int, int, int, int, int, int]]) -> frozenset[str]:
    """Names of the set bits in (function, index, eax, ebx, ecx, edx) CPUID entries."""
    names: set[str] = set()
    for function, index, eax, ebx, ecx, edx in entries:
        regs = {"eax": eax, "ebx": ebx, "ecx": ecx, "edx": edx}
        for (leaf, sub, reg), bits in _BITS.items():
            if leaf == function and sub == index:
                names.update(name for bit, name in bits.items() if regs[reg] >> bit & 1)
    return frozenset(names)


def entries_of(cpuid: Any) -> list[tuple[int, int, int, int, int, int]]:
    """The entries of a filled kvm_cpuid2 buffer as plain tuples."""
    return [
        (e.function, e.index, e.eax, e.ebx, e.ecx, e.edx)
        for e in (cpuid.entries[i] for i in range(cpuid.nent))
    ]
