import SystemPackage
import UprobeSystem
#if canImport(Glibc)
import Glibc
#endif

/// Why the instruction at a probe site cannot be probed.
///
/// Linux's x86 uprobes decode the instruction a probe replaces and refuse some of them; a
/// `uprobe_multi` link with one such offset fails as a whole with ENOTSUPP (524) or ENOEXEC and
/// names no offset. uprobed therefore decides before attaching, the way the kernel does
/// (`ProbeableInstruction.check`).
public struct InstructionRefusal: Sendable, Hashable, CustomStringConvertible {
    public enum Kind: Sendable, Hashable {
        /// The kernel's instruction decoder fails on it; the kernel refuses it (ENOEXEC).
        case undecodable
        /// The kernel decodes it and refuses it (ENOTSUPP, 524).
        case refused
        /// The kernel accepts it, but emulates it as a jump, call or nop instead of executing it,
        /// so a probe there would change what the program does. uprobed's own rule (see
        /// `ProbeableInstruction`).
        case misemulated
    }

    public let kind: Kind
    /// The instruction's bytes the decision read (its prefixes through its opcode).
    public let bytes: [UInt8]
    /// What is wrong with it, in words ("lock prefix (f0), which x86 uprobes refuse").
    public let reason: String

    public init(kind: Kind, bytes: [UInt8], reason: String) {
        self.kind = kind
        self.bytes = bytes
        self.reason = reason
    }

    /// The bytes in hex, as a disassembler prints them ("f0 48 83").
    public var hexBytes: String { bytes.map(hexByte).joined(separator: " ") }

    public var description: String { "instruction \(hexBytes)…: \(reason)" }
}

/// Decides whether Linux's x86-64 uprobes can probe an instruction, from its first bytes, as
/// the kernel decides it (Linux 6.18: `arch_uprobe_analyze_insn` in arch/x86/kernel/uprobes.c
/// and the decoder in arch/x86/lib/insn.c). Only as much of the instruction is decoded as the
/// decision needs: legacy prefixes, REX/REX2, VEX/EVEX/XOP, the opcode bytes, and the ModRM byte
/// of `8e`.
///
/// The kernel's rules, for 64-bit processes:
/// - The instruction must decode (else ENOEXEC): it must fit in 15 bytes, a VEX/EVEX/XOP prefix
///   must name an opcode map the decoder has.
/// - No `lock` (f0) and no es/cs/ss/ds segment override (26, 2e, 36, 3e) among its prefixes.
/// - Not `mov` to SS (8e /2), which masks interrupts for one instruction.
/// - The *first opcode byte* must be allowed by the one-byte table (`good_insns_64`). Two- and
///   three-byte opcodes (`0f …`) all pass, because `0f` itself is allowed (ud2, syscall, … are
///   accepted). For VEX, EVEX, XOP and REX2 encodings the opcode byte after the prefix is looked
///   up in that same one-byte table: `vmovd` (c5 f9 6e) is refused because 6e is `outs`.
/// - A relative jump, jcc or call with an operand-size (66) prefix is refused.
///
/// One rule is uprobed's own: the kernel emulates `jmp`/`jcc`/`call` rel and `nop` (90) instead of
/// stepping them, and it recognises them by that same opcode byte. A VEX/EVEX/XOP/REX2
/// instruction whose opcode byte is 70–7f, e8, e9, eb or 90 (`vpcmpeqb` c5 f9 74, `vmovdqu`
/// store c5 fe 7f, `vzeroupper` c5 f8 77) is therefore accepted but never executed, and so is
/// `xchg %rax,%r8` (49 90, a REX.B 90). Measured on 6.18: with a probe on `vpcmpeqb
/// %xmm0,%xmm0,%xmm0` the register stayed unchanged. Such a site is refused as `misemulated`.
///
/// Not reproduced (the kernel's opcode-map tables would be needed; compilers do not emit these):
/// an instruction longer than 15 bytes because of its operands, and a VEX/EVEX/XOP opcode or an
/// escape the decoder's map marks invalid for that encoding. The kernel refuses those at attach
/// time, and the attach then finds and names them (`RefusedOffsets` in UprobeKernel).
public enum ProbeableInstruction {
    /// Bytes the kernel copies from a probe site (`MAX_UINSN_BYTES`).
    public static let siteBytes = 16
    /// The longest instruction the kernel's decoder accepts (`MAX_INSN_SIZE`).
    static let maxLength = 15

    /// Nil when the instruction starting at `bytes[0]` can be probed; otherwise why not.
    /// Give at least `siteBytes` bytes when the file has them (zero bytes past its end).
    public static func check(_ bytes: [UInt8]) -> InstructionRefusal? {
        bytes.withUnsafeBufferPointer { check($0) }
    }

    /// `check` over a buffer (the resolver checks thousands of sites from one read).
    public static func check(_ bytes: UnsafeBufferPointer<UInt8>) -> InstructionRefusal? {
        var d = Decoder(bytes: bytes)
        return d.decide()
    }

    /// What an opcode byte means where the kernel's one-byte table refuses it, for messages.
    /// Nil: the table allows it.
    static let refusedOpcodes: [String?] = {
        var t = [String?](repeating: nil, count: 256)
        let invalid64 = "invalid in 64-bit mode"
        for (op, name) in [
            (0x06, "push es, \(invalid64)"), (0x07, "pop es, \(invalid64)"), (0x0e, "push cs, \(invalid64)"),
            (0x16, "push ss, \(invalid64)"), (0x17, "pop ss, \(invalid64)"), (0x1e, "push ds, \(invalid64)"),
            (0x1f, "pop ds, \(invalid64)"), (0x27, "daa, \(invalid64)"), (0x2f, "das, \(invalid64)"),
            (0x37, "aaa, \(invalid64)"), (0x3f, "aas, \(invalid64)"), (0x60, "pusha, \(invalid64)"),
            (0x61, "popa, \(invalid64)"), (0x62, "bound, \(invalid64)"), (0x6c, "insb"), (0x6d, "ins"),
            (0x6e, "outsb"), (0x6f, "outs"), (0x82, "group 1 alias, \(invalid64)"), (0x9a, "far call, \(invalid64)"),
            (0xc4, "les, \(invalid64)"), (0xc5, "lds, \(invalid64)"), (0xcc, "int3"), (0xcd, "int"),
            (0xce, "into, \(invalid64)"), (0xcf, "iret"), (0xd4, "aam, \(invalid64)"), (0xd5, "aad, \(invalid64)"),
            (0xd6, "salc, \(invalid64)"), (0xe4, "in"), (0xe5, "in"), (0xe6, "out"), (0xe7, "out"),
            (0xea, "far jmp, \(invalid64)"), (0xec, "in"), (0xed, "in"), (0xee, "out"), (0xef, "out"),
            (0xf1, "int1"), (0xf4, "hlt"), (0xfa, "cli"), (0xfb, "sti"),
        ] { t[op] = name }
        return t
    }()

    /// The prefixes the kernel refuses, by name.
    static func badPrefixName(_ b: UInt8) -> String? {
        switch b {
        case 0xf0: return "lock prefix"
        case 0x26: return "es segment override prefix"
        case 0x2e: return "cs segment override prefix"
        case 0x36: return "ss segment override prefix"
        case 0x3e: return "ds segment override (or notrack) prefix"
        default: return nil
        }
    }

    static func isLegacyPrefix(_ b: UInt8) -> Bool {
        switch b {
        case 0x26, 0x2e, 0x36, 0x3e, 0x64, 0x65, 0x66, 0x67, 0xf0, 0xf2, 0xf3: return true
        default: return false
        }
    }

    /// Opcode bytes the kernel emulates as a branch: jcc rel8 (70–7f), call/jmp rel (e8, e9, eb).
    static func isBranchOpcode(_ op: UInt8) -> Bool {
        (0x70...0x7f).contains(op) || op == 0xe8 || op == 0xe9 || op == 0xeb
    }

    /// The encoding the opcode byte was found in.
    enum Encoding: Equatable {
        case legacy, rex2, vex, evex, xop

        var name: String {
            switch self {
            case .legacy: return "legacy"
            case .rex2: return "REX2-prefixed"
            case .vex: return "VEX-encoded"
            case .evex: return "EVEX-encoded"
            case .xop: return "XOP-encoded"
            }
        }
    }

    /// Up to four distinct legacy prefixes, in the order they came, in one word.
    struct Prefixes {
        private var packed: UInt32 = 0
        private(set) var count = 0

        subscript(_ i: Int) -> UInt8 { UInt8(truncatingIfNeeded: packed >> (8 * i)) }

        func contains(_ b: UInt8) -> Bool {
            for i in 0..<count where self[i] == b { return true }
            return false
        }

        mutating func append(_ b: UInt8) {
            packed |= UInt32(b) << (8 * count)
            count += 1
        }
    }

    /// One pass over the bytes, in the kernel's order: decode, prefixes, mov-to-SS, the one-byte
    /// table, branch prefixes; then uprobed's emulation rule.
    struct Decoder {
        let bytes: UnsafeBufferPointer<UInt8>
        /// Bytes the kernel decodes at most.
        let limit: Int
        var next = 0

        init(bytes: UnsafeBufferPointer<UInt8>) {
            self.bytes = bytes
            limit = min(bytes.count, ProbeableInstruction.maxLength)
        }

        func peek(_ ahead: Int = 0) -> UInt8? {
            let i = next + ahead
            return i < limit ? bytes[i] : nil
        }

        /// The bytes read so far (at least one), for messages.
        var seen: [UInt8] { Array(bytes[0..<max(1, min(next, bytes.count))]) }

        func refusal(_ kind: InstructionRefusal.Kind, _ reason: String) -> InstructionRefusal {
            InstructionRefusal(kind: kind, bytes: seen, reason: reason)
        }

        func undecodable(_ why: String) -> InstructionRefusal {
            refusal(.undecodable, "the kernel's instruction decoder cannot decode it (\(why)), so x86 uprobes refuse it")
        }

        mutating func decide() -> InstructionRefusal? {
            guard limit > 0 else { return InstructionRefusal(kind: .undecodable, bytes: [], reason: "no bytes at the probe site") }
            // The decoder skips the Xen and KVM "emulate" markers (ud2 followed by "xen"/"kvm")
            // and decides on the instruction after them.
            if limit >= 5, bytes[0] == 0x0f, bytes[1] == 0x0b,
               (bytes[2] == 0x78 && bytes[3] == 0x65 && bytes[4] == 0x6e) || (bytes[2] == 0x6b && bytes[3] == 0x76 && bytes[4] == 0x6d) {
                next = 5
            }
            // Legacy prefixes: repeats are skipped; a fifth distinct one ends the prefixes and is
            // taken for the opcode (as the kernel's decoder does). Kept without an allocation:
            // this runs for every function of a binary (241,000 in swift-frontend).
            var prefixes = Prefixes()
            while let b = peek(), ProbeableInstruction.isLegacyPrefix(b) {
                if !prefixes.contains(b) {
                    if prefixes.count == 4 { break }
                    prefixes.append(b)
                }
                next += 1
            }
            // REX (40–4f) or, in 64-bit mode, REX2 (d5 + payload); a VEX/EVEX/XOP prefix may follow REX.
            var rex: UInt8 = 0
            var encoding = Encoding.legacy
            guard let first = peek() else { return undecodable("it ends inside its prefixes") }
            if (0x40...0x4f).contains(first) {
                rex = first
                next += 1
            } else if first == 0xd5 {
                guard peek(1) != nil else { return undecodable("it ends inside its REX2 prefix") }
                encoding = .rex2
                next += 2
            }
            if encoding == .legacy, let b = peek() {
                switch b {
                case 0xc5:
                    guard peek(1) != nil else { return undecodable("it ends inside its VEX prefix") }
                    encoding = .vex
                    next += 2
                case 0xc4:
                    guard let b1 = peek(1), peek(2) != nil else { return undecodable("it ends inside its VEX prefix") }
                    next += 3
                    encoding = .vex
                    let map = b1 & 0x1f
                    guard (1...3).contains(map) else { return undecodable("VEX opcode map \(map) does not exist") }
                case 0x62:
                    guard let b1 = peek(1), peek(2) != nil, peek(3) != nil else { return undecodable("it ends inside its EVEX prefix") }
                    next += 4
                    encoding = .evex
                    let map = b1 & 0x07
                    guard (1...6).contains(map) else { return undecodable("EVEX opcode map \(map) does not exist") }
                case 0x8f:
                    // 8f with ModRM.reg 0 is `pop r/m`; anything else is an XOP prefix.
                    guard let b1 = peek(1) else { return undecodable("it ends after its first byte") }
                    if (b1 >> 3) & 7 != 0 {
                        guard peek(2) != nil else { return undecodable("it ends inside its XOP prefix") }
                        next += 3
                        encoding = .xop
                        let map = b1 & 0x1f
                        guard (8...10).contains(map) else { return undecodable("XOP opcode map \(map) does not exist") }
                    }
                default:
                    break
                }
            }
            // The opcode: the kernel keeps its first byte as "the opcode" for every check below.
            guard let op = peek() else { return undecodable("it ends before its opcode") }
            next += 1
            var second: UInt8?
            if encoding == .legacy, op == 0x0f {
                guard let b = peek() else { return undecodable("it ends inside its opcode") }
                second = b
                next += 1
                if b == 0x38 || b == 0x3a {
                    guard peek() != nil else { return undecodable("it ends inside its opcode") }
                    next += 1
                    second = nil  // a three-byte opcode: the kernel's jcc test looks at two-byte ones only
                }
            }
            var modrm: UInt8?
            if op == 0x8e {
                guard let m = peek() else { return undecodable("it ends before its ModRM byte") }
                modrm = m
                next += 1
            }

            for k in 0..<prefixes.count {
                let p = prefixes[k]
                if let name = ProbeableInstruction.badPrefixName(p) {
                    return refusal(.refused, "\(name) (\(hexByte(p))), which x86 uprobes refuse")
                }
            }
            if op == 0x8e, let modrm, (modrm >> 3) & 7 == 2 {
                return refusal(.refused, "mov to SS (8e /2), which x86 uprobes refuse: it holds off interrupts and traps for one instruction")
            }
            if let name = ProbeableInstruction.refusedOpcodes[Int(op)] {
                if encoding == .legacy {
                    return refusal(.refused, "opcode \(hexByte(op)) (\(name)), which x86 uprobes refuse")
                }
                return refusal(.refused, "\(encoding.name) instruction: x86 uprobes look its opcode byte \(hexByte(op)) up in "
                               + "their one-byte opcode table, where \(hexByte(op)) (\(name)) is refused")
            }
            let branch: Bool
            if let second {
                branch = (0x80...0x8f).contains(second)  // jcc rel32 (0f 80–8f)
            } else {
                branch = ProbeableInstruction.isBranchOpcode(op)
            }
            if branch, prefixes.contains(0x66) {
                return refusal(.refused, "jump or call with an operand-size prefix (66), which x86 uprobes refuse")
            }
            if encoding != .legacy, branch || op == 0x90 {
                let what = op == 0x90 ? "a nop" : op == 0xe8 ? "a call" : "a jump"
                return refusal(.misemulated, "\(encoding.name) instruction whose opcode byte \(hexByte(op)) x86 uprobes take for "
                               + "\(what): they would emulate that instead of executing it, changing what the program does")
            }
            if encoding == .legacy, op == 0x90, rex & 1 != 0 {
                return refusal(.misemulated, "xchg with r8–r15 (REX.B 90), which x86 uprobes take for a nop: they would skip "
                               + "it instead of executing it, changing what the program does")
            }
            return nil
        }
    }
}

@inline(__always)
func hexByte(_ b: UInt8) -> String {
    let digits: [Character] = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "a", "b", "c", "d", "e", "f"]
    return String([digits[Int(b >> 4)], digits[Int(b & 0xf)]])
}

extension ProbeableInstruction {
    /// Sites are read in windows of this alignment: the sites inside one window share one read.
    static let windowBytes: UInt64 = 256 << 10

    /// The refusals among the sites at `offsets` (file offsets) of the file `io` reads, keyed by
    /// offset. The sites are grouped by the `windowBytes`-aligned window they start in, and each
    /// group is one read from its first site to the end of its last, so a binary's functions are
    /// checked in a few reads of its code rather than one per function (grouping, not sorting:
    /// sorting swift-frontend's 241,000 function starts cost more than reading its 150 MB of
    /// code). Sites at or past the end of the file are not checked (the attach refuses them
    /// with `offset_out_of_range`); bytes past the end of the file read as zero, as the
    /// kernel's copy of the site would.
    static func refusals(at offsets: [UInt64], io: FileIO) throws(ResolveError) -> [UInt64: InstructionRefusal] {
        var windowIndex: [UInt64: Int] = [:]
        var windows: [(first: UInt64, last: UInt64, sites: [UInt64])] = []
        for off in offsets where off < io.size {
            if let i = windowIndex[off / windowBytes] {
                windows[i].sites.append(off)
                windows[i].first = min(windows[i].first, off)
                windows[i].last = max(windows[i].last, off)
            } else {
                windowIndex[off / windowBytes] = windows.count
                windows.append((off, off, [off]))
            }
        }
        var out: [UInt64: InstructionRefusal] = [:]
        for w in windows {
            let end = w.last + UInt64(siteBytes)
            var bytes = try io.read(w.first, min(end, io.size) - w.first)
            if bytes.count < Int(end - w.first) { bytes += [UInt8](repeating: 0, count: Int(end - w.first) - bytes.count) }
            bytes.withUnsafeBufferPointer { b in
                for off in w.sites {
                    let at = Int(off - w.first)
                    if let refusal = check(UnsafeBufferPointer(rebasing: b[at..<(at + siteBytes)])) { out[off] = refusal }
                }
            }
        }
        return out
    }

    /// The refusal for the site at `offset` of the file open on `fd`, if any (one read).
    static func refusal(at offset: UInt64, fd: FileDescriptor, path: String) throws(ResolveError) -> InstructionRefusal? {
        var st = stat()
        guard fstat(fd.rawValue, &st) == 0 else { throw .fileNotFound("cannot \(Syscall.lastError("fstat", path))") }
        return try refusals(at: [offset], io: FileIO(fd: fd, size: UInt64(max(0, st.st_size)), path: path))[offset]
    }
}
