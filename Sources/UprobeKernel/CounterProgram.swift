import CUprobeSys
import Synchronization
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// The counting BPF program and its maps: one instance per daemon.
///
/// Maps (all created by `init`, all fds owned and closed on deinit):
/// - `counters`: BPF_MAP_TYPE_ARRAY with BPF_F_MMAPABLE, u32 slot → u64 hits, `capacity`
///   entries, mapped into the daemon: reading every counter is a memory read, not a syscall.
///   (A per-CPU array avoids cache-line sharing between CPUs on hot probes, but its only bulk
///   read, BPF_MAP_LOOKUP_BATCH, cost ~5 ms per 20,000 slots here and ran on every `stats`;
///   a uprobe hit costs a trap, microseconds, next to which the shared atomic add is small.)
/// - `overlap`:  BPF_MAP_TYPE_ARRAY, u32 slot → u32 flag; non-zero while a link rebuild of
///   that slot is in progress (two links attached on it).
/// - `marks`:    BPF_MAP_TYPE_HASH, {u32 tid; u32 slot} → u32 generation; the per-thread
///   hand-off between the two links of a slot during a rebuild.
///
/// Program (BPF_PROG_TYPE_KPROBE, expected attach type BPF_TRACE_UPROBE_MULTI, "GPL"):
/// the attach cookie is `(generation << 32) | slot`.
/// ```
/// if overlap[slot] == 0 { counters[slot] += 1 (atomic); return }          // fast path
/// m = marks[{tid, slot}]
/// if m exists && m > generation { delete marks[{tid, slot}]; return }   // newer link counted it
/// marks[{tid, slot}] = generation; counters[slot] += 1 (atomic)
/// ```
///
/// ## Make-before-break (rebuilding a link) — the invariant the engine must keep
/// A link cannot be changed; to drop probes the engine attaches a new link with the remaining
/// offsets (same slots, fresh generation) and then closes the old one. While both are attached
/// every hit runs both programs in the same thread, newest link first (the kernel adds
/// consumers at the head of a uprobe's list). The exact sequence per rebuild is:
/// 1. `setOverlap(true, slots:)` for the slots of the new link that the old link also covers;
/// 2. `attach(...)` the new link;
/// 3. close the old link (`UprobeMultiLink.close()` or `LinkCloser.closeAll`) — returns only
///    after the uprobe grace period, so no old program is still running afterwards;
/// 4. `setOverlap(false, slots:)`;
/// 5. `sweepMarks(slots:)`.
///
/// Within one hit the newer program counts and marks, the older one finds a mark with a newer
/// generation and consumes it instead of counting. A mark left behind because the old link went
/// away between the two programs of one hit carries a generation ≤ that of every link still
/// attached to the slot, so it never suppresses a count. This holds only if, **on any slot, at
/// most two links are attached at once and the newer of two links is never closed while the
/// older one is still attached.** Counter slots must be zeroed (`resetCounters`) before reuse.
///
/// Limits of the scheme, by construction:
/// - If `marks` is full (more than `markCapacity` {thread, slot} pairs in hand-off at once) the
///   newer program cannot leave its mark and that hit is counted by both links.
/// - Generations are 32-bit and start at 1 per `CounterProgram`, or above the newest link
///   adopted from the pin directory (`continueGenerations`): the order holds across daemon
///   lives, and breaks after 2³² links.
/// - "close returns after the grace period" holds only if uprobed's fd is the last reference
///   to the link (no fd passed on; a concurrent `bpftool link` walk briefly holds one). A
///   pinned link is closed by removing its pin first (that reference is put from a workqueue,
///   without waiting) and closing the fd second, which then is the last reference and waits.
///
/// ## Pinning (`pins`)
/// The maps, the program and every link can be pinned under a `PinDirectory` so that they
/// outlive the process: links keep counting with no daemon, and the next one adopts them
/// (`pinnedLinks`, `KernelObjectName`). An exit may come in the middle of a rebuild, leaving two
/// links on some slots with their hand-off on: the hand-off goes on exactly with no daemon, and
/// the next start closes the older link of each pair (`endAllHandoffs` after it).
/// - Both the entry and the return (uretprobe) consumers run newest first on Linux 6.18; the
///   tests rebuild links under load for both.
public final class CounterProgram: Sendable {
    /// Number of counter slots (entries of the counters array).
    public let capacity: UInt32
    /// Capacity of the `marks` hash map (threads × slots in hand-off at once).
    public let markCapacity: UInt32

    let counters: FileDescriptor
    /// `counters`' values, mapped shared (mmap of the map fd). The program adds with atomic
    /// instructions; the daemon loads and stores them through `Atomic` (`CounterMapping.word`).
    private let counterMapping: CounterMapping
    let overlap: FileDescriptor
    let marks: FileDescriptor
    /// The program attached through uprobe_multi links.
    let multiProgram: FileDescriptor
    /// A second instance of the same instructions, loaded without the uprobe_multi expected
    /// attach type, for perf_event based attachment (the benchmark baseline). Lazily loaded.
    private let perfProgramFD: Mutex<FileDescriptor?>
    private let lastGeneration = Atomic<UInt32>(0)

    /// BPF_PROG_TYPE_KPROBE (uprobe programs are kprobe-type programs).
    static let kprobeProgramType = BPF_PROG_TYPE_KPROBE
    static let helperMapLookup: Int32 = 1
    static let helperMapUpdate: Int32 = 2
    static let helperMapDelete: Int32 = 3
    static let helperGetCurrentPidTgid: Int32 = 14
    static let helperGetAttachCookie: Int32 = 174

    /// Where the maps, the program and the links are pinned (nil: nothing is pinned, and
    /// every link dies with the process).
    public let pins: PinDirectory?
    /// Which named objects this start adopted from `pins` and which it created.
    public let objects: PinnedObjects
    /// The id of the counting program links are made with; links running another program
    /// (an older uprobed's) are moved to this one at start.
    public let programID: UInt32
    /// The pinned program this start replaced because its instructions differ (an upgrade).
    public let replacedProgramID: UInt32?
    /// The pinned `counters` and `overlap` maps of another size (`slot_capacity` changed),
    /// held until the links still using them are moved to the new maps (`ResizedCounters`).
    let previous: Mutex<ResizedCounters?>

    /// Creates the three maps (BPF_MAP_CREATE ×3) and loads the counting program
    /// (BPF_PROG_LOAD). With `pins`, each map pinned there with the same shape is adopted
    /// instead (its counters carry on), the others are created and pinned, and the program
    /// pinned there is used if it has the same instructions (else this one replaces its pin).
    /// `variant` adds a no-op instruction: a test-only way to make a "new" program.
    /// Errors: `bpf_unavailable` (EPERM/ENOSYS), `map_create_failed`,
    /// `uprobe_multi_unsupported` (the kernel rejects the attach type), `prog_load_failed`
    /// (message carries the verifier log), `pin_failed`.
    public init(capacity: UInt32, markCapacity: UInt32 = 65_536, pins: PinDirectory? = nil,
                variant: Bool = false) throws(KernelError) {
        guard capacity > 0, markCapacity > 0 else {
            throw KernelError(code: .invalidArgument, message: "capacity and markCapacity must be > 0")
        }
        self.capacity = capacity
        self.markCapacity = markCapacity
        self.pins = pins
        var objects = PinnedObjects(directory: pins)
        var opened: [FileDescriptor] = []
        var resized: [String: (fd: FileDescriptor, entries: UInt32)] = [:]
        func make(_ type: bpf_map_type, _ key: UInt32, _ value: UInt32, _ max: UInt32,
                  _ name: String, _ kernelName: String, flags: UInt32 = 0, resizable: Bool = false) throws(KernelError) -> FileDescriptor {
            let shape = MapShape(type: type.rawValue, keySize: key, valueSize: value, maxEntries: max, flags: flags)
            do throws(KernelError) {
                let made = try objects.map(name, shape, resizable: resizable) { () throws(KernelError) -> FileDescriptor in
                    try Self.createMap(type, key, value, max, flags: flags, name: kernelName)
                }
                opened.append(made.fd)
                if let old = made.previous {
                    opened.append(old.fd)
                    resized[name] = old
                }
                return made.fd
            } catch {
                for fd in opened { try? fd.close() }
                throw error
            }
        }
        // Sized by `slot_capacity`: pinned ones of another size are replaced (and kept open).
        counters = try make(BPF_MAP_TYPE_ARRAY, 4, 8, capacity, KernelObjectName.counters, "uprobed_counts",
                            flags: UInt32(BPF_F_MMAPABLE), resizable: true)
        do {
            counterMapping = try CounterMapping(fd: counters, count: Int(capacity))
        } catch {
            for fd in opened { try? fd.close() }
            throw KernelError(code: .mapCreateFailed, error, context: "mmap of uprobed_counts")
        }
        overlap = try make(BPF_MAP_TYPE_ARRAY, 4, 4, capacity, KernelObjectName.overlap, "uprobed_overlap", resizable: true)
        marks = try make(BPF_MAP_TYPE_HASH, 8, 4, markCapacity, KernelObjectName.marks, "uprobed_marks")
        let insns = Self.instructions(counters: counters.rawValue, overlap: overlap.rawValue,
                                      marks: marks.rawValue, variant: variant)
        let loaded: FileDescriptor
        switch BPFSyscall.progLoad(type: BPF_PROG_TYPE_KPROBE,
                                   expectedAttachType: CUPROBESYS_BPF_TRACE_UPROBE_MULTI,
                                   instructions: insns, license: "GPL", name: "uprobed_count") {
        case .success(let fd):
            loaded = fd
        case .failure(let pf):
            let failure = pf.failure, log = pf.log
            counterMapping.unmap()
            for fd in opened { try? fd.close() }
            if failure.errno == .notPermitted {
                throw KernelError(code: .bpfUnavailable, failure, context: "counting program")
            }
            // An unknown expected_attach_type makes the kernel fail with EINVAL before the
            // verifier runs, i.e. with an empty log.
            if failure.errno == .invalidArgument && log.isEmpty {
                throw KernelError(code: .uprobeMultiUnsupported,
                                  message: "the kernel rejects BPF_TRACE_UPROBE_MULTI programs (needs Linux >= 6.6 with CONFIG_UPROBES): \(failure.call) failed: \(failure.errno)",
                                  errno: failure.errno.rawValue)
            }
            throw KernelError(code: .progLoadFailed,
                              message: "\(failure.call) failed: \(failure.errno); verifier log:\n\(log)",
                              errno: failure.errno.rawValue)
        }
        do {
            let chosen = try objects.program(KernelObjectName.countProgram, loaded: loaded)
            multiProgram = chosen.fd
            replacedProgramID = chosen.replaced
            programID = try BPFSyscall.progInfo(chosen.fd).id
        } catch {
            counterMapping.unmap()
            for fd in opened + [loaded] { try? fd.close() }
            if let e = error as? KernelError { throw e }
            throw KernelError(code: .pinFailed, message: "counting program: \(error)")
        }
        self.objects = objects
        perfProgramFD = Mutex(nil)
        previous = Mutex(ResizedCounters(counters: resized[KernelObjectName.counters], overlap: resized[KernelObjectName.overlap]))
    }

    /// BPF_MAP_CREATE with the errors of `init`.
    private static func createMap(_ type: bpf_map_type, _ key: UInt32, _ value: UInt32, _ max: UInt32,
                                  flags: UInt32, name: String) throws(KernelError) -> FileDescriptor {
        do throws(SyscallFailure) {
            return try BPFSyscall.mapCreate(type: type, keySize: key, valueSize: value, maxEntries: max, flags: flags, name: name)
        } catch {
            if error.errno == .notPermitted || error.errno == .noFunction {
                throw KernelError(code: .bpfUnavailable, error, context: "map \(name)")
            }
            throw KernelError(code: .mapCreateFailed, error, context: "map \(name)")
        }
    }

    deinit {
        dropResizedMaps()
        if let fd = perfProgramFD.withLock({ $0 }) { try? fd.close() }
        try? multiProgram.close()
        try? marks.close()
        try? overlap.close()
        counterMapping.unmap()
        try? counters.close()
    }

    /// The counting program (see the type's documentation), assembled.
    static func instructions(counters: Int32, overlap: Int32, marks: Int32, variant: Bool = false) -> [UInt64] {
        var a = BPFAssembler()
        // The test-only variant: one more instruction (r0 is overwritten by the call below), so
        // the program's tag differs and a start sees an upgraded program.
        if variant { a.mov(.r0, imm: 0) }
        let count = a.newLabel(), out = a.newLabel()
        // Stack: [r10-4] u32 slot key; [r10-16] mark key {tid, slot}; [r10-20] u32 generation.
        a.call(helperGetAttachCookie)          // r0 = cookie (r1 = ctx on entry)
        a.mov32(.r8, .r0)                      // r8 = slot = cookie & 0xffffffff
        a.mov(.r7, .r0)
        a.rsh(.r7, imm: 32)                    // r7 = generation = cookie >> 32
        a.storeW(.r10, off: -4, .r8)
        a.entryHandOff(overlap: overlap, marks: marks, count: count, consumed: out)
        a.bind(count)
        a.storeW(.r10, off: -4, .r8)
        a.loadMap(.r1, fd: counters)
        a.mov(.r2, .r10)
        a.add(.r2, imm: -4)
        a.call(helperMapLookup)
        a.jumpIfZero(.r0, out)
        a.mov(.r1, imm: 1)
        // Atomic: every CPU adds to the same value.
        a.atomicAdd64(.r0, off: 0, .r1)
        a.bind(out)
        a.mov(.r0, imm: 0)
        a.exit()
        return a.finish()
    }

    /// The program instance for perf_event attachment (BPF_PROG_LOAD on first use, type KPROBE,
    /// no expected attach type), sharing this instance's maps.
    func perfProgram() throws(KernelError) -> FileDescriptor {
        let result: Result<FileDescriptor, KernelError> = perfProgramFD.withLock { slot in
            if let fd = slot { return .success(fd) }
            let insns = Self.instructions(counters: counters.rawValue, overlap: overlap.rawValue,
                                          marks: marks.rawValue)
            switch BPFSyscall.progLoad(type: BPF_PROG_TYPE_KPROBE, expectedAttachType: 0,
                                       instructions: insns, license: "GPL", name: "uprobed_count_pe") {
            case .success(let fd):
                slot = fd
                return .success(fd)
            case .failure(let pf):
            let failure = pf.failure, log = pf.log
                return .failure(KernelError(code: .progLoadFailed,
                                            message: "\(failure.call) failed: \(failure.errno); verifier log:\n\(log)",
                                            errno: failure.errno.rawValue))
            }
        }
        return try result.get()
    }

    /// A fresh link generation (monotonically increasing, starting at 1).
    func nextGeneration() -> UInt32 {
        lastGeneration.add(1, ordering: .relaxed).newValue
    }

    /// Makes every later link's generation greater than `generation` (links adopted from the
    /// pin directory keep theirs: the hand-off order must hold across daemon lives).
    public func continueGenerations(above generation: UInt32) {
        _ = lastGeneration.max(generation, ordering: .relaxed)
    }

    /// Creates one uprobe_multi link (BPF_LINK_CREATE, attach type BPF_TRACE_UPROBE_MULTI):
    /// probe `offsets[i]` of `path` counts into `slots[i]`, with the cookie
    /// `(generation << 32) | slots[i]` and a fresh generation. `refCtrOffsets` are USDT
    /// semaphore offsets (nil = none); `pid` nil = all processes; `retprobe` sets
    /// BPF_F_UPROBE_MULTI_RETURN. Returns once every uprobe is registered (and installed in
    /// processes that currently map the file). See the type's documentation for the rebuild
    /// protocol and its invariant.
    public func attach(path: String, offsets: [UInt64], refCtrOffsets: [UInt64]?, slots: [UInt32],
                       pid: Int32?, retprobe: Bool) throws(KernelError) -> UprobeMultiLink {
        guard !offsets.isEmpty else {
            throw KernelError(code: .invalidArgument, message: "a link needs at least one offset")
        }
        guard offsets.count == slots.count, refCtrOffsets.map({ $0.count == offsets.count }) ?? true else {
            throw KernelError(code: .invalidArgument,
                              message: "offsets, slots and refCtrOffsets must have the same length")
        }
        if let bad = slots.first(where: { $0 >= capacity }) {
            throw KernelError(code: .capacityExhausted, message: "slot \(bad) is outside the counter capacity \(capacity)")
        }
        let generation = nextGeneration()
        let cookies = slots.map { (UInt64(generation) << 32) | UInt64($0) }
        let fd = try createLink(program: multiProgram, attachType: CUPROBESYS_BPF_TRACE_UPROBE_MULTI, path: path,
                                offsets: offsets, refCtrOffsets: refCtrOffsets, cookies: cookies, pid: pid,
                                flags: retprobe ? CUPROBESYS_BPF_F_UPROBE_MULTI_RETURN : 0)
        guard let pins else { return UprobeMultiLink(fd: fd, generation: generation, offsetCount: offsets.count) }
        // Pinned before anyone is told of it: a link the state files name is always pinned.
        let pinPath = pins.linkPath(generation)
        do { try BPFSyscall.objPin(fd, at: pinPath) } catch {
            try? fd.close()
            throw KernelError(code: .pinFailed, error, context: pinPath)
        }
        return UprobeMultiLink(fd: fd, generation: generation, offsetCount: offsets.count, pinPath: pinPath)
    }

    /// BPF_LINK_CREATE of one uprobe_multi-style link of `program` (the counting program, or
    /// the latency program with BPF_TRACE_UPROBE_SESSION), with the checks and error codes
    /// both share. The caller checked that the arrays have the same length.
    func createLink(program: FileDescriptor, attachType: UInt32, path: String, offsets: [UInt64],
                    refCtrOffsets: [UInt64]?, cookies: [UInt64], pid: Int32?, flags: UInt32) throws(KernelError) -> FileDescriptor {
        if let pid, pid <= 0 {
            throw KernelError(code: .invalidArgument, message: "pid must be positive, got \(pid)")
        }
        // Pre-check the file so the two common mistakes get precise codes; the kernel checks too.
        var st = stat()
        if stat(path, &st) != 0 {
            let err = Errno(rawValue: Glibc.errno)
            throw KernelError(code: err == .noSuchFileOrDirectory ? .pathNotFound : .linkCreateFailed,
                              message: "cannot stat \(path): \(err)", errno: err.rawValue)
        }
        if let bad = offsets.first(where: { $0 >= UInt64(st.st_size) }) {
            throw KernelError(code: .offsetOutOfRange,
                              message: "offset \(bad) is beyond the end of \(path) (\(st.st_size) bytes)",
                              errno: Errno.invalidArgument.rawValue)
        }
        if let exec = ExecutableRanges.of(path: path),
           let bad = offsets.first(where: { off in !exec.contains { $0.contains(off) } }) {
            throw KernelError(code: .offsetNotExecutable,
                              message: "offset \(bad) of \(path) is not inside an executable segment; the kernel would accept it but the probe could never fire",
                              errno: Errno.invalidArgument.rawValue)
        }
        do {
            return try BPFSyscall.linkCreateUprobeMulti(
                program: program, path: path, offsets: offsets, refCtrOffsets: refCtrOffsets,
                cookies: cookies, flags: flags, pid: pid.map { UInt32($0) } ?? 0, attachType: attachType)
        } catch {
            switch error.errno {
            case .noSuchFileOrDirectory:
                throw KernelError(code: .pathNotFound, error, context: path)
            case .noSuchProcess:
                throw KernelError(code: .processNotFound, error, context: "pid \(pid ?? 0)")
            case .badFileDescriptor, .invalidArgument:
                throw KernelError(code: .linkCreateFailed, error,
                                  context: "\(path): not a regular file, an offset is not a probeable instruction, or a probe at that offset already has another USDT semaphore (ref_ctr_offset)")
            case let e where RefusedOffsets.mayBeRefusedInstruction(e):
                // The kernel names no offset: find them (an error path, ~1 s on a large link).
                if let named = RefusedOffsets.error(path: path, offsets: offsets, errno: e, program: multiProgram) {
                    throw named
                }
                throw KernelError(code: .linkCreateFailed, error, context: path)
            case .tooManyOpenFiles, .tooManyOpenFilesInSystem:
                throw KernelError(code: .tooManyOpenFiles, error,
                                  context: "\(path): uprobed is out of file descriptors (each link is one); raise LimitNOFILE or lower max_connections")
            default:
                throw KernelError(code: .linkCreateFailed, error, context: path)
            }
        }
    }

    /// Sets or clears the rebuild flag of `slots` (one BPF_MAP_UPDATE_BATCH on `overlap`).
    ///
    /// Ordering: set it before creating the new link — link creation (a syscall that takes
    /// the uprobe locks) orders this store before any run of the new link's program; clear it
    /// only after the old link's close has returned — by then no old program is in flight, and
    /// a program that still sees the flag just takes the exact slow path.
    public func setOverlap(_ on: Bool, slots: [UInt32]) throws(KernelError) {
        try checkSlots(slots)
        let values = [UInt32](repeating: on ? 1 : 0, count: slots.count)
        do {
            try updateBatch(overlap, keys: slots, values: values, valueSize: 4)
        } catch {
            throw KernelError(code: .mapOpFailed, error, context: "overlap (\(slots.count) slots)")
        }
        try setResizedOverlap(on, slots: slots)
    }

    func updateBatch<V>(_ map: FileDescriptor, keys: [UInt32], values: [V], valueSize: Int) throws(SyscallFailure) {
        guard !keys.isEmpty else { return }
        let result: Result<Void, SyscallFailure> = keys.withUnsafeBufferPointer { k in
            values.withUnsafeBytes { v in
                guard let kb = k.baseAddress, let vb = v.baseAddress else { return .success(()) }
                return Result { () throws(SyscallFailure) in
                    try BPFSyscall.mapUpdateBatch(map, keys: kb, values: vb, valueSize: valueSize, count: UInt32(keys.count))
                }
            }
        }
        try result.get()
    }

    private func checkSlots(_ slots: [UInt32]) throws(KernelError) {
        if let bad = slots.first(where: { $0 >= capacity }) {
            throw KernelError(code: .invalidArgument, message: "slot \(bad) is outside the capacity \(capacity)")
        }
    }

    /// Deletes the hand-off marks of `slots` (BPF_MAP_GET_NEXT_KEY walk, then
    /// BPF_MAP_DELETE_ELEM). Call after `setOverlap(false, ...)`, when no old link of these
    /// slots is attached any more.
    public func sweepMarks(slots: Set<UInt32>) throws(KernelError) {
        try sweep(marks, slots: slots)
    }

    /// Deletes the entries of a {u32 tid; u32 slot} hand-off map whose slot is in `slots`.
    func sweep(_ marks: FileDescriptor, slots: Set<UInt32>) throws(KernelError) {
        guard !slots.isEmpty else { return }
        var doomed: [UInt64] = []
        var key: UInt64 = 0
        var next: UInt64 = 0
        var first = true
        do {
            while true {
                let found: Bool
                if first {
                    found = try BPFSyscall.mapNextKey(marks, key: nil, next: &next)
                    first = false
                } else {
                    found = try BPFSyscall.mapNextKey(marks, key: &key, next: &next)
                }
                if !found { break }
                // Key layout {u32 tid; u32 slot}, little-endian: slot is the upper half.
                if slots.contains(UInt32(truncatingIfNeeded: next >> 32)) { doomed.append(next) }
                key = next
            }
            for var k in doomed { try BPFSyscall.mapDelete(marks, key: &k) }
        } catch {
            throw KernelError(code: .mapOpFailed, error, context: "sweeping marks")
        }
    }

    /// Number of hand-off marks currently held for `slot` (BPF_MAP_GET_NEXT_KEY walk); for
    /// tests and diagnostics.
    public func markCount(slot: UInt32) throws(KernelError) -> Int {
        var count = 0
        var key: UInt64 = 0
        var next: UInt64 = 0
        var first = true
        do {
            while true {
                let found = first ? try BPFSyscall.mapNextKey(marks, key: nil, next: &next)
                                  : try BPFSyscall.mapNextKey(marks, key: &key, next: &next)
                first = false
                if !found { break }
                if UInt32(truncatingIfNeeded: next >> 32) == slot { count += 1 }
                key = next
            }
        } catch {
            throw KernelError(code: .mapOpFailed, error, context: "walking marks")
        }
        return count
    }

    /// Zeroes the counters of `slots` (stores through the mapping). Do this before a slot is
    /// reused, once no link can count into it any more.
    public func resetCounters(slots: [UInt32]) throws(KernelError) {
        try checkSlots(slots)
        for slot in slots { counterMapping.word(Int(slot)).pointee.store(0, ordering: .relaxed) }
    }

    /// The hits of one slot.
    public func readCounter(slot: UInt32) throws(KernelError) -> UInt64 {
        guard slot < capacity else {
            throw KernelError(code: .invalidArgument, message: "slot \(slot) is outside the capacity \(capacity)")
        }
        return counterMapping.word(Int(slot)).pointee.load(ordering: .relaxed)
    }

    /// The hits of slots [0, upTo), read from the mapping.
    ///
    /// Relaxed loads suffice: a count is exact for hits that happened before the read in the
    /// usual sense (the workload ended, or was waited for), and each value is read whole.
    /// Never throws today; the signature stays that of `KernelBackend.readCounters`.
    public func readAllCounters(upTo: UInt32) throws(KernelError) -> [UInt64] {
        let limit = Int(min(upTo, capacity))
        return [UInt64](unsafeUninitializedCapacity: limit) { buf, n in
            for i in 0..<limit { buf[i] = counterMapping.word(i).pointee.load(ordering: .relaxed) }
            n = limit
        }
    }

}

extension Substring {
    fileprivate func trimmingCharacters(in set: String) -> Substring {
        var s = self
        while let f = s.first, set.contains(f) { s.removeFirst() }
        while let l = s.last, set.contains(l) { s.removeLast() }
        return s
    }
}

/// Reads a small text file (sysfs) whole; nil if it cannot be read.
func readSmallFile(_ path: String) -> String? {
    guard let fd = try? FileDescriptor.open(FilePath(path), .readOnly, options: .closeOnExec) else { return nil }
    defer { try? fd.close() }
    var bytes: [UInt8] = []
    var buf = [UInt8](repeating: 0, count: 4096)
    while true {
        let n = (try? buf.withUnsafeMutableBytes { try fd.read(into: $0, retryOnInterrupt: true) }) ?? 0
        if n <= 0 { break }
        bytes.append(contentsOf: buf[0..<n])
        if bytes.count > 1 << 20 { break }
    }
    return String(decoding: bytes, as: UTF8.self)
}

/// The counters map's values, mmapped shared from the map fd (BPF_F_MMAPABLE).
///
/// `@unchecked Sendable` is sound because: the mapping is created in `init` and never changes
/// until `unmap`, which only the owning `CounterProgram`'s deinit calls (no thread can use it
/// then); every access goes through `Atomic<UInt64>` operations, and the BPF program's own
/// accesses are atomic instructions.
final class CounterMapping: @unchecked Sendable {
    private let base: UnsafeMutableRawPointer
    private let length: Int
    private let count: Int

    /// mmap(2) of `count` u64 values of the array map `fd`, PROT_READ|PROT_WRITE, MAP_SHARED.
    init(fd: FileDescriptor, count: Int) throws(SyscallFailure) {
        let page = Int(sysconf(Int32(_SC_PAGESIZE)))
        length = max(page, (count * 8 + page - 1) / page * page)
        self.count = count
        guard let p = mmap(nil, length, PROT_READ | PROT_WRITE, MAP_SHARED, fd.rawValue, 0), p != MAP_FAILED else {
            throw SyscallFailure(call: "mmap(uprobed_counts)", errno: Errno(rawValue: Glibc.errno))
        }
        base = p
    }

    /// The counter of `slot` (< count).
    func word(_ slot: Int) -> UnsafeMutablePointer<Atomic<UInt64>> {
        precondition(slot >= 0 && slot < count, "counter slot out of range")
        return (base + slot * 8).assumingMemoryBound(to: Atomic<UInt64>.self)
    }

    func unmap() { munmap(base, length) }
}
