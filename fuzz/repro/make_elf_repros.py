#!/usr/bin/env python3
"""Writes the hand-made ELF reproducers in this folder (see README.md here for what each shows).

Each is the smallest file that reaches the bug: an ELF64 x86-64 header, one PT_LOAD program
header and, where symbols are needed, a .symtab with its .strtab. Run from anywhere:
    python3 fuzz/repro/make_elf_repros.py
"""
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
PT_LOAD, PF_R_X = 1, 5
SHT_SYMTAB, SHT_STRTAB = 2, 3
STB_GLOBAL_STT_FUNC = 0x12


def header(phnum, shoff, shnum):
    ident = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)  # ELFCLASS64, little-endian, version 1
    return ident + struct.pack("<HHIQQQIHHHHHH", 3, 62, 1, 0, 64, shoff, 0, 64, 56, phnum, 64, shnum, 0)


def phdr(offset, vaddr, size):
    return struct.pack("<IIQQQQQQ", PT_LOAD, PF_R_X, offset, vaddr, vaddr, size, size, 0x1000)


def shdr(type_, offset, size, link=0, entsize=0):
    return struct.pack("<IIQQQQIIQQ", 0, type_, 0, 0, offset, size, link, 0, 8, entsize)


def with_symbol(load, name, value):
    """Header + `load` program header + .symtab holding one function symbol `name` at `value`."""
    strtab = b"\0" + name + b"\0"
    symtab = bytes(24) + struct.pack("<IBBHQQ", 1, STB_GLOBAL_STT_FUNC, 0, 1, value, 0)
    sym_off = 64 + 56
    str_off = sym_off + len(symtab)
    sh_off = (str_off + len(strtab) + 7) & ~7
    body = load + symtab + strtab
    body += bytes(sh_off - 64 - len(body))
    shdrs = shdr(0, 0, 0) + shdr(SHT_SYMTAB, sym_off, len(symtab), link=2, entsize=24) + shdr(SHT_STRTAB, str_off, len(strtab))
    return header(1, sh_off, 3) + body + shdrs


def write(name, data):
    with open(os.path.join(HERE, name), "wb") as f:
        f.write(data)


# 1. An executable segment linked at the top of the address space: virtualAddress(ofExecutableFileOffset:)
#    computes off - p_offset + p_vaddr and traps on the overflow for any offset 16...119.
write("elf/vaddr-overflow.elf", header(1, 0, 0) + phdr(0, 0xFFFF_FFFF_FFFF_FFF0, 120))

# 2. An executable segment whose p_offset is near 2^64 and a function inside it: while parsing
#    (rebuildIndex -> fileOffset(ofVirtualAddress:)) vaddr - p_vaddr + p_offset overflows.
write("elf/fileoffset-overflow.elf", with_symbol(phdr(0xFFFF_FFFF_FFFF_FF00, 0x1000, 0x1000), b"f", 0x1100))

# 3. Not a trap: a .symtab name "@V" becomes a function symbol with an empty base name.
write("elf/empty-symbol-name.elf", with_symbol(phdr(0, 0x1000, 0x1000), b"@V", 0x1100))


def many_symtabs(copies, symbols):
    """`copies` section headers that all name the same .symtab of `symbols` functions: each is
    read and added again, so the symbol list grows as copies x symbols from a file of
    copies x 64 + symbols x 24 bytes."""
    strtab = b"\0f\0"
    symtab = bytes(24) + b"".join(struct.pack("<IBBHQQ", 1, STB_GLOBAL_STT_FUNC, 0, 1, 0x1000 + 16 * i, 16)
                                  for i in range(symbols - 1))
    sym_off = 64 + 56
    str_off = sym_off + len(symtab)
    sh_off = (str_off + len(strtab) + 7) & ~7
    body = phdr(0, 0x1000, 0x1000) + symtab + strtab
    body += bytes(sh_off - 64 - len(body))
    shdrs = shdr(0, 0, 0) + shdr(SHT_STRTAB, str_off, len(strtab))
    shdrs += shdr(SHT_SYMTAB, sym_off, len(symtab), link=1, entsize=24) * copies
    return header(1, sh_off, copies + 2) + body + shdrs


# 4. Not a trap: amplification. The symbols parsed grow as copies x symbols while the file grows
#    as copies + symbols (here 200 x 200 = 40,000 symbols from 18 KB; 700 x 600 give 420,000 from
#    59 KB, 450 ms and 138 MB in a release build; a 1 MB file can ask for ~170 million).
write("elf/symtab-amplification.elf", many_symtabs(200, 200))


def usdt_note(provider, name, args):
    """An executable segment and a PT_NOTE segment holding one stapsdt note (no sections)."""
    desc = struct.pack("<QQQ", 0x1010, 0, 0) + provider + b"\0" + name + b"\0" + args + b"\0"
    desc += bytes(-len(desc) % 4)
    note = struct.pack("<III", 8, len(desc), 3) + b"stapsdt\0" + desc
    note_off = 64 + 2 * 56
    notes = struct.pack("<IIQQQQQQ", 4, 4, note_off, 0, 0, len(note), len(note), 4)  # PT_NOTE, PF_R
    return header(2, 0, 0) + phdr(0, 0x1000, note_off + len(note)) + notes + note


# 5. Not a trap: a provider name that is not valid UTF-8 shifts where the probe name is read
#    (offsets are counted in the repaired String's UTF-8, not in the note's bytes): the probe
#    "\xff:tick" is read as provider "\u{FFFD}", name "ck".
write("elf/usdt-invalid-utf8-provider.elf", usdt_note(b"\xff", b"tick", b"args"))
