/// The entry side of the make-before-break hand-off, emitted alike into the counting program
/// and the latency program (`CounterProgram` explains the scheme and why it is exact).
extension BPFAssembler {
    /// Emits, for a hit of link generation r7 on slot r8 (the slot also stored at [r10-4]):
    /// ```
    /// if overlap[slot] == 0 { goto count }                                  // fast path
    /// m = marks[{tid, slot}]
    /// if m exists && m > generation { delete marks[{tid, slot}]; goto consumed }
    /// marks[{tid, slot}] = generation                                        // then: count
    /// ```
    /// and falls through to where the caller binds `count`. Uses r0-r5 and the stack at
    /// [r10-20, r10-9] (the mark key {tid, slot} at -16, the generation at -20).
    mutating func entryHandOff(overlap: Int32, marks: Int32, count: Label, consumed: Label) {
        let markAndCount = newLabel()
        loadMap(.r1, fd: overlap)
        mov(.r2, .r10)
        add(.r2, imm: -4)
        call(CounterProgram.helperMapLookup)             // r0 = &overlap[slot] or NULL
        jumpIfZero(.r0, count)
        loadW(.r1, .r0, off: 0)
        jumpIfZero(.r1, count)                           // fast path: no rebuild in progress
        call(CounterProgram.helperGetCurrentPidTgid)     // lower 32 bits = thread id
        storeW(.r10, off: -16, .r0)
        storeW(.r10, off: -12, .r8)
        loadMap(.r1, fd: marks)
        mov(.r2, .r10)
        add(.r2, imm: -16)
        call(CounterProgram.helperMapLookup)
        jumpIfZero(.r0, markAndCount)
        loadW(.r1, .r0, off: 0)                          // mark generation
        jumpIfLessOrEqual(.r1, .r7, markAndCount)
        // A newer link's program already counted this call in this thread: consume its mark.
        // Only this thread reads or writes this key, so no ordering against other CPUs matters.
        loadMap(.r1, fd: marks)
        mov(.r2, .r10)
        add(.r2, imm: -16)
        call(CounterProgram.helperMapDelete)
        jump(consumed)
        bind(markAndCount)
        storeW(.r10, off: -20, .r7)
        loadMap(.r1, fd: marks)
        mov(.r2, .r10)
        add(.r2, imm: -16)
        mov(.r3, .r10)
        add(.r3, imm: -20)
        mov(.r4, imm: 0)                                 // BPF_ANY
        call(CounterProgram.helperMapUpdate)
    }
}
