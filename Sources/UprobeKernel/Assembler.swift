/// A minimal eBPF assembler: enough opcodes for the counting and exec-event programs, with forward labels.
/// Instructions are encoded as the little-endian u64 words of struct bpf_insn
/// { u8 code; u8 dst_reg:4, src_reg:4; s16 off; s32 imm } so no C bitfields are involved.
struct BPFAssembler {
    enum Reg: UInt8 { case r0 = 0, r1, r2, r3, r4, r5, r6, r7, r8, r9, r10 }
    struct Label: Hashable { let id: Int }

    private(set) var words: [UInt64] = []
    private var labelPositions: [Int: Int] = [:]
    private var fixups: [(index: Int, label: Int)] = []
    private var nextLabel = 0

    // Opcode bytes (class | op | source/size), see Documentation/bpf/standardization.
    private enum Op {
        static let mov64Reg: UInt8 = 0xbf, mov64Imm: UInt8 = 0xb7, mov32Reg: UInt8 = 0xbc
        static let add64Imm: UInt8 = 0x07, rsh64Imm: UInt8 = 0x77
        static let ldxW: UInt8 = 0x61, stxW: UInt8 = 0x63, stxDW: UInt8 = 0x7b
        static let atomicDW: UInt8 = 0xdb   // BPF_STX | BPF_ATOMIC | BPF_DW
        static let ja: UInt8 = 0x05, jeqImm: UInt8 = 0x15, jleReg: UInt8 = 0xbd
        static let call: UInt8 = 0x85, exit: UInt8 = 0x95, ldImm64: UInt8 = 0x18
        // For the latency program.
        static let add64Reg: UInt8 = 0x0f, sub64Reg: UInt8 = 0x1f, lsh64Imm: UInt8 = 0x67
        static let rsh64Reg: UInt8 = 0x7f, and64Imm: UInt8 = 0x57, xor64Imm: UInt8 = 0xa7
        static let ldxDW: UInt8 = 0x79
        static let jneImm: UInt8 = 0x55, jltImm: UInt8 = 0xa5, jgtImm: UInt8 = 0x25, jeqReg: UInt8 = 0x1d
    }
    /// `call` source register for a kernel function named by BTF id (BPF_PSEUDO_KFUNC_CALL).
    static let pseudoKfuncCall: UInt8 = 2

    private mutating func emit(_ code: UInt8, dst: Reg = .r0, src: UInt8 = 0, off: Int16 = 0, imm: Int32 = 0) {
        let regs = UInt64(dst.rawValue & 0x0f) | (UInt64(src & 0x0f) << 4)
        let word = UInt64(code) | (regs << 8) | (UInt64(UInt16(bitPattern: off)) << 16)
            | (UInt64(UInt32(bitPattern: imm)) << 32)
        words.append(word)
    }

    mutating func newLabel() -> Label { defer { nextLabel += 1 }; return Label(id: nextLabel) }
    mutating func bind(_ label: Label) { labelPositions[label.id] = words.count }

    mutating func mov(_ dst: Reg, _ src: Reg) { emit(Op.mov64Reg, dst: dst, src: src.rawValue) }
    mutating func mov(_ dst: Reg, imm: Int32) { emit(Op.mov64Imm, dst: dst, imm: imm) }
    /// 32-bit move: zero-extends, i.e. dst = src & 0xffffffff.
    mutating func mov32(_ dst: Reg, _ src: Reg) { emit(Op.mov32Reg, dst: dst, src: src.rawValue) }
    mutating func add(_ dst: Reg, imm: Int32) { emit(Op.add64Imm, dst: dst, imm: imm) }
    mutating func rsh(_ dst: Reg, imm: Int32) { emit(Op.rsh64Imm, dst: dst, imm: imm) }
    /// dst = *(u32 *)(src + off)
    mutating func loadW(_ dst: Reg, _ src: Reg, off: Int16) { emit(Op.ldxW, dst: dst, src: src.rawValue, off: off) }
    /// *(u32 *)(dst + off) = src
    mutating func storeW(_ dst: Reg, off: Int16, _ src: Reg) { emit(Op.stxW, dst: dst, src: src.rawValue, off: off) }
    /// *(u64 *)(dst + off) = src
    mutating func storeDW(_ dst: Reg, off: Int16, _ src: Reg) { emit(Op.stxDW, dst: dst, src: src.rawValue, off: off) }
    /// lock *(u64 *)(dst + off) += src  (BPF_ATOMIC | BPF_ADD, no fetch)
    mutating func atomicAdd64(_ dst: Reg, off: Int16, _ src: Reg) { emit(Op.atomicDW, dst: dst, src: src.rawValue, off: off, imm: 0x00) }
    /// dst = map pointer of `fd` (ld_imm64 with BPF_PSEUDO_MAP_FD), two words.
    mutating func loadMap(_ dst: Reg, fd: Int32) {
        emit(Op.ldImm64, dst: dst, src: 1, imm: fd)
        emit(0, dst: .r0, imm: 0)
    }
    mutating func call(_ helper: Int32) { emit(Op.call, imm: helper) }
    /// Calls a kfunc of vmlinux by its BTF type id (off 0: vmlinux BTF).
    mutating func callKfunc(btfID: UInt32) { emit(Op.call, src: Self.pseudoKfuncCall, imm: Int32(bitPattern: btfID)) }
    mutating func add(_ dst: Reg, _ src: Reg) { emit(Op.add64Reg, dst: dst, src: src.rawValue) }
    mutating func sub(_ dst: Reg, _ src: Reg) { emit(Op.sub64Reg, dst: dst, src: src.rawValue) }
    mutating func lsh(_ dst: Reg, imm: Int32) { emit(Op.lsh64Imm, dst: dst, imm: imm) }
    mutating func rsh(_ dst: Reg, _ src: Reg) { emit(Op.rsh64Reg, dst: dst, src: src.rawValue) }
    mutating func and(_ dst: Reg, imm: Int32) { emit(Op.and64Imm, dst: dst, imm: imm) }
    /// dst ^= imm (sign-extended to 64 bits: imm -1 flips every bit).
    mutating func xor(_ dst: Reg, imm: Int32) { emit(Op.xor64Imm, dst: dst, imm: imm) }
    /// dst = *(u64 *)(src + off)
    mutating func loadDW(_ dst: Reg, _ src: Reg, off: Int16) { emit(Op.ldxDW, dst: dst, src: src.rawValue, off: off) }
    /// r0 = cmpxchg((u64 *)(dst + off), r0, src): stores src if the value equals r0; r0 gets
    /// the value found (BPF_ATOMIC | BPF_CMPXCHG).
    mutating func atomicCmpxchg64(_ dst: Reg, off: Int16, _ src: Reg) { emit(Op.atomicDW, dst: dst, src: src.rawValue, off: off, imm: 0xf1) }
    mutating func jumpIfNotZero(_ reg: Reg, _ label: Label) { fixups.append((words.count, label.id)); emit(Op.jneImm, dst: reg, imm: 0) }
    /// if dst < imm (unsigned) goto label
    mutating func jumpIfLess(_ reg: Reg, imm: Int32, _ label: Label) { fixups.append((words.count, label.id)); emit(Op.jltImm, dst: reg, imm: imm) }
    /// if dst > imm (unsigned) goto label
    mutating func jumpIfGreater(_ reg: Reg, imm: Int32, _ label: Label) { fixups.append((words.count, label.id)); emit(Op.jgtImm, dst: reg, imm: imm) }
    mutating func jumpIfEqual(_ dst: Reg, _ src: Reg, _ label: Label) { fixups.append((words.count, label.id)); emit(Op.jeqReg, dst: dst, src: src.rawValue) }
    mutating func exit() { emit(Op.exit) }

    mutating func jump(_ label: Label) { fixups.append((words.count, label.id)); emit(Op.ja) }
    mutating func jumpIfZero(_ reg: Reg, _ label: Label) { fixups.append((words.count, label.id)); emit(Op.jeqImm, dst: reg, imm: 0) }
    /// if dst <= src (unsigned) goto label
    mutating func jumpIfLessOrEqual(_ dst: Reg, _ src: Reg, _ label: Label) {
        fixups.append((words.count, label.id)); emit(Op.jleReg, dst: dst, src: src.rawValue)
    }

    /// The finished program with jump offsets resolved (offset = target - (index + 1)).
    func finish() -> [UInt64] {
        var out = words
        for fix in fixups {
            guard let target = labelPositions[fix.label] else { preconditionFailure("unbound BPF label") }
            let off = UInt64(UInt16(bitPattern: Int16(target - fix.index - 1)))
            out[fix.index] = (out[fix.index] & ~(UInt64(0xffff) << 16)) | (off << 16)
        }
        return out
    }
}
