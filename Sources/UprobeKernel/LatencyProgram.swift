import CUprobeSys
import Synchronization
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// The latency program: a BPF_TRACE_UPROBE_SESSION program (Linux >= 6.13) that measures each
/// call of a probed function from entry to return, and its maps. One instance per daemon,
/// made by `BPFKernelBackend` next to the `CounterProgram` whose `counters` and `overlap`
/// maps it shares. With the counter's pin directory, its maps, its program and its links are
/// pinned there too (`KernelObjectName.latency`, `latency/<generation>`), so latency probes
/// measure on while no daemon runs and a start adopts them (`PinnedLatencyLinks.swift`).
///
/// A session link runs one program at a function's entry and, unless that run returned
/// non-zero, again at that call's return; `bpf_session_cookie()` is a u64 of that one call
/// (per consumer, per call: recursion and threads need no map keyed by thread id), and
/// `bpf_session_is_return()` says which run this is. Both are kfuncs, called by their BTF ids
/// in `/sys/kernel/btf/vmlinux` (`KernelBTF`). Without them (no BTF, a kernel before 6.13),
/// `init` throws `latency_unsupported`; uprobed does not fall back to uprobe + uretprobe
/// pairs (they need a map keyed by thread and stack depth to pair runs).
///
/// Maps (fds owned, closed on deinit):
/// - `rows`: BPF_MAP_TYPE_ARRAY, BPF_F_MMAPABLE, `rowCapacity` rows of `Layout.words` u64:
///   one row per latency probe site, mapped into the daemon (a read is a memory read).
/// - `rowOf`: BPF_MAP_TYPE_ARRAY, slot → row + 1 (0: none), one entry per counter slot.
/// - `marks`: BPF_MAP_TYPE_HASH {u32 tid; u32 slot} → u32 tag: the entry hand-off between the
///   two links of a slot during a rebuild (its own map: a counting link's mark on the same
///   slot number must never be taken for a latency link's).
///
/// The attach cookie is `(tag << 32) | slot`, tag = `generation << 1 | phase`. A slot's links
/// alternate phases: each new link of a slot takes the other phase than the previous one.
/// ```
/// entry:  (the same hand-off as the counting program, on this program's `marks`)
///         if overlap[slot] && marks[{tid, slot}] > tag { delete it; return 1 }  // newer link owns the call
///         if overlap[slot] { marks[{tid, slot}] = tag }
///         row.calls[phase] += 1; counters[slot] += 1; *session_cookie = ktime_ns; return 0
/// return: d = ktime_ns - *session_cookie
///         row.returns[phase] += 1; row.sum += d; row.max = max(row.max, d) (cmpxchg);
///         row.notMin = max(row.notMin, ~d); row.bucket[index(d)] += 1
/// ```
/// Returning 1 at entry tells the kernel not to run this link's program at that call's
/// return: during a make-before-break overlap exactly one link (the newer) counts a call and
/// owns its return, and its cookie holds the start time.
///
/// ## Rebuilds: why phases, and the one limit left
/// A session link only sees the returns of calls it saw enter. A call that entered through
/// the old link (before the new one was attached) returns through the old one, so the old
/// link is closed only when its calls have drained: `LatencyLink.close()` waits until
/// `calls[p] - returns[p] - settled[p]` of its phase p is 0 on every slot a newer link took
/// over, for at most `drainLimit`. Calls still running then (a thread blocked in the function,
/// or one that left it without returning: thread exit, longjmp) can no longer be seen
/// returning; after the close (no program of the old link runs any more) the daemon stores
/// `settled[p] = calls[p] - returns[p]`, and they are reported as `unobserved`. So
/// `calls = returns + in_flight + unobserved` holds exactly, always; a call is only ever
/// `unobserved` after it has run for `drainLimit` across a rebuild of its link.
///
/// Other limits, by construction: the counting program's (marks full → a call counted by both
/// links; 2³¹ generations); the kernel arms at most 64 nested return probes per thread
/// (MAX_URETPROBE_DEPTH): a call deeper than that is counted but never seen returning, and
/// stays in `in_flight`.
public final class LatencyProgram: Sendable {
    /// Row layout, in u64 words.
    public enum Layout {
        public static let callsPhase = 0       // + phase
        public static let returnsPhase = 2     // + phase
        public static let sum = 4
        public static let max = 5
        public static let notMin = 6
        public static let settledPhase = 7     // + phase; written by the daemon only
        public static let buckets = 16
        public static let words = (buckets + LatencyHistogram.bucketCount + 7) / 8 * 8
        public static let bytes = words * 8
    }

    /// Rows (latency probe sites at once).
    public let rowCapacity: UInt32
    /// How long a rebuild waits for calls through the old link to return (see the type's doc).
    public let drainLimit: Duration
    let counter: CounterProgram
    let rows: FileDescriptor
    let rowOf: FileDescriptor
    let marks: FileDescriptor
    let program: FileDescriptor
    let mapping: RowMapping
    let table: Mutex<RowTable>
    /// Which named objects this instance adopted from the pin directory and which it created.
    public let objects: PinnedObjects
    /// The id of the program new links run; adopted links running another one (an older
    /// uprobed's) are moved to it at start.
    public let programID: UInt32
    /// The pinned program this instance replaced because its instructions differ.
    public let replacedProgramID: UInt32?

    /// Which row each slot uses and which tag its newest link has; free rows.
    struct RowTable {
        var rowOfSlot: [UInt32: UInt32] = [:]
        var newestTag: [UInt32: UInt32] = [:]
        var free: [UInt32] = []
        var highWater: UInt32 = 0
    }

    /// The kfuncs the program calls, by name.
    static let kfuncNames: Set<String> = ["bpf_session_is_return", "bpf_session_cookie"]
    static let helperKtimeGetNs: Int32 = 5

    /// Creates the maps and loads the program. Throws `latency_unsupported` when the kernel
    /// lacks uprobe sessions or their kfuncs, `map_create_failed`, `prog_load_failed`.
    /// `btfPath`: where the kernel's BTF is read (tests point it elsewhere). With the
    /// counter's pin directory, maps pinned there with the same shape and a program with the
    /// same tag are adopted (as `CounterProgram.init` does; a map of another shape is
    /// `PinnedObjects.Mismatch`). `variant`: the test-only altered program (one leading no-op).
    public init(counter: CounterProgram, rowCapacity: UInt32, markCapacity: UInt32 = 65_536,
                drainLimit: Duration = .seconds(1), btfPath: String = KernelBTF.vmlinuxPath,
                variant: Bool = false) throws(KernelError) {
        guard rowCapacity > 0 else { throw KernelError(code: .invalidArgument, message: "rowCapacity must be > 0") }
        self.counter = counter
        self.rowCapacity = rowCapacity
        self.drainLimit = drainLimit
        let ids: [String: UInt32]
        do { ids = try KernelBTF.functionIDs(named: Self.kfuncNames, path: btfPath) } catch {
            throw KernelError(code: .latencyUnsupported,
                              message: "cannot read the kernel's BTF (\(btfPath)): \(error); latency probes need CONFIG_DEBUG_INFO_BTF and Linux >= 6.13")
        }
        guard let isReturn = ids["bpf_session_is_return"], let cookie = ids["bpf_session_cookie"] else {
            throw KernelError(code: .latencyUnsupported,
                              message: "the kernel has no bpf_session_cookie/bpf_session_is_return kfuncs (uprobe sessions need Linux >= 6.13)")
        }
        var opened: [FileDescriptor] = []
        var objects = PinnedObjects(directory: counter.pins)
        func create(_ type: bpf_map_type, _ key: UInt32, _ value: UInt32, _ max: UInt32,
                    _ name: String, pin: String, flags: UInt32 = 0) throws(KernelError) -> FileDescriptor {
            let shape = MapShape(type: type.rawValue, keySize: key, valueSize: value, maxEntries: max, flags: flags)
            do throws(KernelError) {
                let fd = try objects.map(pin, shape) { () throws(KernelError) -> FileDescriptor in
                    do throws(SyscallFailure) {
                        return try BPFSyscall.mapCreate(type: type, keySize: key, valueSize: value,
                                                        maxEntries: max, flags: flags, name: name)
                    } catch {
                        throw KernelError(code: .mapCreateFailed, error, context: "map \(name)")
                    }
                }
                opened.append(fd)
                return fd
            } catch {
                for fd in opened { try? fd.close() }
                throw error
            }
        }
        rows = try create(BPF_MAP_TYPE_ARRAY, 4, UInt32(Layout.bytes), rowCapacity, "uprobed_lat",
                          pin: KernelObjectName.latencyRows, flags: UInt32(BPF_F_MMAPABLE))
        do {
            mapping = try RowMapping(fd: rows, rows: Int(rowCapacity))
        } catch {
            for fd in opened { try? fd.close() }
            throw KernelError(code: .mapCreateFailed, error, context: "mmap of uprobed_lat")
        }
        rowOf = try create(BPF_MAP_TYPE_ARRAY, 4, 4, counter.capacity, "uprobed_lat_row", pin: KernelObjectName.latencyRowOf)
        marks = try create(BPF_MAP_TYPE_HASH, 8, 4, markCapacity, "uprobed_lat_mark", pin: KernelObjectName.latencyMarks)
        // The variant's leading no-op (r0 is set before it is read) changes the tag only:
        // jumps are relative, so nothing after it moves.
        let insns = (variant ? Self.leadingNoOp : []) + Self.instructions(isReturn: isReturn, cookie: cookie, rows: rows.rawValue,
                                      rowOf: rowOf.rawValue, marks: marks.rawValue,
                                      overlap: counter.overlap.rawValue, counters: counter.counters.rawValue)
        let loaded: FileDescriptor
        switch BPFSyscall.progLoad(type: BPF_PROG_TYPE_KPROBE, expectedAttachType: CUPROBESYS_BPF_TRACE_UPROBE_SESSION,
                                   instructions: insns, license: "GPL", name: "uprobed_latency") {
        case .success(let fd):
            loaded = fd
        case .failure(let pf):
            mapping.unmap()
            for fd in opened { try? fd.close() }
            if pf.failure.errno == .invalidArgument && pf.log.isEmpty {
                throw KernelError(code: .latencyUnsupported,
                                  message: "the kernel rejects BPF_TRACE_UPROBE_SESSION programs (uprobe sessions need Linux >= 6.13): \(pf.failure.call) failed: \(pf.failure.errno)",
                                  errno: pf.failure.errno.rawValue)
            }
            throw KernelError(code: .progLoadFailed,
                              message: "\(pf.failure.call) failed: \(pf.failure.errno); verifier log:\n\(pf.log)",
                              errno: pf.failure.errno.rawValue)
        }
        let chosen: (fd: FileDescriptor, replaced: UInt32?)
        // It also uses the counter's `counters` and `overlap`: new ones there make it new too.
        let shared = [KernelObjectName.counters, KernelObjectName.overlap]
        let mapsAdopted = !objects.created.contains { KernelObjectName.latency.contains($0) }
            && !counter.objects.created.contains { shared.contains($0) }
        do { chosen = try objects.program(KernelObjectName.latencyProgram, loaded: loaded, mapsAdopted: mapsAdopted) } catch {
            mapping.unmap()
            for fd in opened + [loaded] { try? fd.close() }
            throw error
        }
        do { programID = try BPFSyscall.progInfo(chosen.fd).id } catch {
            mapping.unmap()
            for fd in opened + [chosen.fd] { try? fd.close() }
            throw KernelError(code: .pinFailed, error, context: "latency program")
        }
        program = chosen.fd
        replacedProgramID = chosen.replaced
        self.objects = objects
        table = Mutex(RowTable())
    }

    /// `mov r0, 0`: the test-only variant's first instruction.
    static var leadingNoOp: [UInt64] {
        var a = BPFAssembler()
        a.mov(.r0, imm: 0)
        return a.finish()
    }

    deinit {
        try? program.close()
        try? marks.close()
        try? rowOf.close()
        mapping.unmap()
        try? rows.close()
    }

    /// The program (see the type's documentation), assembled. Registers: r6 ctx then the row,
    /// r7 tag, r8 slot, r9 is_return then scratch.
    static func instructions(isReturn: UInt32, cookie: UInt32, rows: Int32, rowOf: Int32, marks: Int32,
                             overlap: Int32, counters: Int32) -> [UInt64] {
        var a = BPFAssembler()
        let skip = a.newLabel(), ret = a.newLabel(), count = a.newLabel()
        let stamp = a.newLabel(), done = a.newLabel()
        // Stack: [r10-4] u32 slot; [r10-8] u32 row; [r10-16] mark key {tid, slot}; [r10-20] u32 tag.
        a.mov(.r6, .r1)
        a.callKfunc(btfID: isReturn)
        a.mov(.r9, .r0)
        a.mov(.r1, .r6)
        a.call(CounterProgram.helperGetAttachCookie)
        a.mov32(.r8, .r0)
        a.mov(.r7, .r0)
        a.rsh(.r7, imm: 32)
        a.storeW(.r10, off: -4, .r8)
        a.loadMap(.r1, fd: rowOf)
        a.mov(.r2, .r10)
        a.add(.r2, imm: -4)
        a.call(CounterProgram.helperMapLookup)
        a.jumpIfZero(.r0, skip)
        a.loadW(.r1, .r0, off: 0)
        a.jumpIfZero(.r1, skip)
        a.add(.r1, imm: -1)
        a.storeW(.r10, off: -8, .r1)
        a.loadMap(.r1, fd: rows)
        a.mov(.r2, .r10)
        a.add(.r2, imm: -8)
        a.call(CounterProgram.helperMapLookup)
        a.jumpIfZero(.r0, skip)
        a.mov(.r6, .r0)                                    // r6 = row
        a.jumpIfNotZero(.r9, ret)

        // Entry run: the hand-off between a slot's two links during a rebuild; a call the
        // newer link counted (it owns the return too) is skipped here.
        a.entryHandOff(overlap: overlap, marks: marks, count: count, consumed: skip)
        a.bind(count)
        a.mov(.r1, .r7)
        a.and(.r1, imm: 1)
        a.lsh(.r1, imm: 3)
        a.add(.r1, .r6)
        a.mov(.r2, imm: 1)
        a.atomicAdd64(.r1, off: Int16(Layout.callsPhase * 8), .r2)
        a.storeW(.r10, off: -4, .r8)
        a.loadMap(.r1, fd: counters)
        a.mov(.r2, .r10)
        a.add(.r2, imm: -4)
        a.call(CounterProgram.helperMapLookup)             // the probe's hits are its calls
        a.jumpIfZero(.r0, stamp)
        a.mov(.r1, imm: 1)
        a.atomicAdd64(.r0, off: 0, .r1)
        a.bind(stamp)
        a.callKfunc(btfID: cookie)
        a.mov(.r9, .r0)
        a.call(helperKtimeGetNs)
        a.storeDW(.r9, off: 0, .r0)
        a.mov(.r0, imm: 0)                                 // 0: run this program at the return too
        a.exit()

        // Return run: r3 = duration.
        a.bind(ret)
        a.callKfunc(btfID: cookie)
        a.loadDW(.r9, .r0, off: 0)
        a.call(helperKtimeGetNs)
        a.sub(.r0, .r9)
        a.mov(.r3, .r0)
        a.mov(.r1, .r7)
        a.and(.r1, imm: 1)
        a.lsh(.r1, imm: 3)
        a.add(.r1, .r6)
        a.mov(.r2, imm: 1)
        a.atomicAdd64(.r1, off: Int16(Layout.returnsPhase * 8), .r2)
        a.atomicAdd64(.r6, off: Int16(Layout.sum * 8), .r3)
        // max(row.max, d) and max(row.notMin, ~d): compare-and-swap, retried a few times
        // (a loop would need bpf_loop); each failed try means another CPU raised the value.
        func raise(word: Int, value: BPFAssembler.Reg) {
            let raised = a.newLabel()
            a.loadDW(.r1, .r6, off: Int16(word * 8))
            for _ in 0..<4 {
                a.jumpIfLessOrEqual(value, .r1, raised)
                a.mov(.r0, .r1)
                a.atomicCmpxchg64(.r6, off: Int16(word * 8), value)
                a.jumpIfEqual(.r0, .r1, raised)
                a.mov(.r1, .r0)
            }
            a.bind(raised)
        }
        raise(word: Layout.max, value: .r3)
        a.mov(.r4, .r3)
        a.xor(.r4, imm: -1)
        raise(word: Layout.notMin, value: .r4)
        // Bucket index without loops: r4 = floor(log2 d) by binary search, then the sub-bucket.
        let sub = LatencyHistogram.subBits
        a.mov(.r4, imm: 0)
        a.mov(.r5, .r3)
        for shift: Int32 in [32, 16, 8, 4, 2, 1] {
            let next = a.newLabel()
            a.mov(.r2, .r5)
            a.rsh(.r2, imm: shift)
            a.jumpIfZero(.r2, next)
            a.add(.r4, imm: shift)
            a.mov(.r5, .r2)
            a.bind(next)
        }
        let have = a.newLabel(), regular = a.newLabel(), notSmall = a.newLabel()
        a.jumpIfLess(.r3, imm: Int32(LatencyHistogram.subBuckets), regular)
        a.jump(notSmall)
        a.bind(regular)
        a.mov(.r2, .r3)                                    // d < 8: its own bucket
        a.jump(have)
        a.bind(notSmall)
        let inRange = a.newLabel()
        a.jumpIfGreater(.r4, imm: Int32(LatencyHistogram.topPower), inRange)
        a.mov(.r2, .r4)
        a.add(.r2, imm: Int32(-sub))
        a.mov(.r5, .r3)
        a.rsh(.r5, .r2)
        a.and(.r5, imm: Int32(LatencyHistogram.subBuckets - 1))
        a.mov(.r2, .r4)
        a.add(.r2, imm: Int32(1 - sub))
        a.lsh(.r2, imm: Int32(sub))
        a.add(.r2, .r5)
        a.jump(have)
        a.bind(inRange)                                    // beyond the top power: overflow bucket
        a.mov(.r2, imm: Int32(LatencyHistogram.overflowIndex))
        a.bind(have)
        a.jumpIfGreater(.r2, imm: Int32(LatencyHistogram.overflowIndex), done)   // bounds the verifier can see
        a.lsh(.r2, imm: 3)
        a.add(.r2, .r6)
        a.mov(.r1, imm: 1)
        a.atomicAdd64(.r2, off: Int16(Layout.buckets * 8), .r1)
        a.bind(done)
        a.mov(.r0, imm: 0)
        a.exit()

        a.bind(skip)
        a.mov(.r0, imm: 1)                                 // not ours: no return run
        a.exit()
        return a.finish()
    }

    /// Creates one session link: `offsets[i]` of `path` measured into `slots[i]`. Slots get a
    /// row (zeroed) the first time; every slot's tag flips phase against its previous link.
    public func attach(path: String, offsets: [UInt64], refCtrOffsets: [UInt64]?, slots: [UInt32],
                       pid: Int32?) throws(KernelError) -> LatencyLink {
        guard !offsets.isEmpty else {
            throw KernelError(code: .invalidArgument, message: "a link needs at least one offset")
        }
        guard offsets.count == slots.count, refCtrOffsets.map({ $0.count == offsets.count }) ?? true else {
            throw KernelError(code: .invalidArgument, message: "offsets, slots and refCtrOffsets must have the same length")
        }
        if let bad = slots.first(where: { $0 >= counter.capacity }) {
            throw KernelError(code: .capacityExhausted, message: "slot \(bad) is outside the counter capacity \(counter.capacity)")
        }
        let rowsOfSlots = try assignRows(slots)
        let generation = counter.nextGeneration()
        guard generation < 1 << 31 else {
            throw KernelError(code: .capacityExhausted, message: "link generations exhausted; restart uprobed")
        }
        let tags: [UInt32] = table.withLock { t in
            slots.map { s in (generation << 1) | ((t.newestTag[s].map { ($0 & 1) ^ 1 }) ?? 0) }
        }
        let cookies = zip(tags, slots).map { (UInt64($0) << 32) | UInt64($1) }
        let fd = try counter.createLink(program: program, attachType: CUPROBESYS_BPF_TRACE_UPROBE_SESSION, path: path,
                                        offsets: offsets, refCtrOffsets: refCtrOffsets, cookies: cookies, pid: pid, flags: 0)
        // Pinned before anyone is told of it, as counting links are (`CounterProgram.attach`).
        let pinPath = counter.pins?.latencyLinkPath(generation)
        if let pinPath {
            do { try BPFSyscall.objPin(fd, at: pinPath) } catch {
                try? fd.close()
                throw KernelError(code: .pinFailed, error, context: pinPath)
            }
        }
        table.withLock { t in for (s, tag) in zip(slots, tags) { t.newestTag[s] = tag } }
        let sites = (0..<slots.count).map { LatencyLink.Site(slot: slots[$0], row: rowsOfSlots[$0], tag: tags[$0]) }
        return LatencyLink(fd: fd, generation: generation, sites: sites, program: self, pinPath: pinPath)
    }

    /// Rows of `slots`, giving a zeroed row (and its `rowOf` entry) to each slot that has none.
    /// Rows are zero already: new ones from the kernel, freed ones from `release`, so a
    /// registration does not pay for clearing them.
    private func assignRows(_ slots: [UInt32]) throws(KernelError) -> [UInt32] {
        let result: Result<(all: [UInt32], new: [(slot: UInt32, row: UInt32)]), KernelError> = table.withLock { t in
            var all: [UInt32] = [], new: [(UInt32, UInt32)] = []
            for s in slots {
                if let r = t.rowOfSlot[s] { all.append(r); continue }
                let r: UInt32
                if let f = t.free.popLast() { r = f } else if t.highWater < rowCapacity { r = t.highWater; t.highWater += 1 } else {
                    for (slot, row) in new { t.rowOfSlot[slot] = nil; t.free.append(row) }
                    return .failure(KernelError(code: .capacityExhausted,
                                                message: "no latency rows left (\(rowCapacity) in use); unregister latency probes or raise latency_capacity"))
                }
                t.rowOfSlot[s] = r
                all.append(r)
                new.append((s, r))
            }
            return .success((all, new))
        }
        let assigned = try result.get()
        guard !assigned.new.isEmpty else { return assigned.all }
        do {
            try counter.updateBatch(rowOf, keys: assigned.new.map(\.slot), values: assigned.new.map { $0.row + 1 }, valueSize: 4)
        } catch {
            release(slots: assigned.new.map(\.slot))
            throw KernelError(code: .mapOpFailed, error, context: "uprobed_lat_row")
        }
        return assigned.all
    }

    /// Gives the rows of freed slots back, zeroed (the engine calls it once no link can use
    /// them and no reader can still look at them: a slot is released after its links were
    /// closed and a grace period of the readers passed).
    public func release(slots: [UInt32]) {
        table.withLock { t in
            for s in slots {
                t.newestTag[s] = nil
                if let r = t.rowOfSlot.removeValue(forKey: s) {
                    mapping.zero(row: Int(r))
                    t.free.append(r)
                }
            }
        }
    }

    /// Rows in use.
    public var rowsInUse: Int { table.withLock { $0.rowOfSlot.count } }

    /// The histogram of `slot`, nil if it has no row (not a latency slot).
    public func read(slot: UInt32) -> LatencyHistogram? {
        guard let row = table.withLock({ $0.rowOfSlot[slot] }) else { return nil }
        return read(row: row)
    }

    func read(row: UInt32) -> LatencyHistogram {
        let w = { (i: Int) in self.mapping.word(row: Int(row), i).pointee.load(ordering: .relaxed) }
        var h = LatencyHistogram()
        // Returns before calls: a call that returns between the two loads is then never
        // counted as returned without having entered.
        h.returns = w(Layout.returnsPhase) &+ w(Layout.returnsPhase + 1)
        h.sumNanoseconds = w(Layout.sum)
        h.maxNanoseconds = w(Layout.max)
        let notMin = w(Layout.notMin)
        h.minNanoseconds = notMin == 0 ? 0 : ~notMin
        h.buckets = (0..<LatencyHistogram.bucketCount).map { w(Layout.buckets + $0) }
        h.unobserved = w(Layout.settledPhase) &+ w(Layout.settledPhase + 1)
        h.calls = w(Layout.callsPhase) &+ w(Layout.callsPhase + 1)
        return h
    }

    /// Calls of `phase` entered and neither returned nor settled.
    func inFlight(row: UInt32, phase: UInt32) -> UInt64 {
        let w = { (i: Int) in self.mapping.word(row: Int(row), i).pointee.load(ordering: .relaxed) }
        let p = Int(phase & 1)
        return w(Layout.callsPhase + p) &- w(Layout.returnsPhase + p) &- w(Layout.settledPhase + p)
    }

    /// After the link of `phase` on `row` was closed (none of its programs runs any more):
    /// its calls still unreturned are unobserved for good.
    func settle(row: UInt32, phase: UInt32) {
        let p = Int(phase & 1)
        let calls = mapping.word(row: Int(row), Layout.callsPhase + p).pointee.load(ordering: .relaxed)
        let returns = mapping.word(row: Int(row), Layout.returnsPhase + p).pointee.load(ordering: .relaxed)
        mapping.word(row: Int(row), Layout.settledPhase + p).pointee.store(calls &- returns, ordering: .relaxed)
    }

    /// Whether a newer link than `tag` holds `slot`.
    func superseded(slot: UInt32, tag: UInt32) -> Bool {
        table.withLock { t in t.newestTag[slot].map { $0 != tag } ?? false }
    }

    /// A session link of a program that only returns 0 (no map, no kfunc): what any uprobe
    /// session costs per call (entry trap, return hook, two program runs). The benchmark's
    /// baseline for the latency program; nothing in the daemon uses it.
    public static func attachBareSession(counter: CounterProgram, path: String, offsets: [UInt64]) throws(KernelError) -> UprobeMultiLink {
        var a = BPFAssembler()
        a.mov(.r0, imm: 0)
        a.exit()
        let program: FileDescriptor
        switch BPFSyscall.progLoad(type: BPF_PROG_TYPE_KPROBE, expectedAttachType: CUPROBESYS_BPF_TRACE_UPROBE_SESSION,
                                   instructions: a.finish(), license: "GPL", name: "uprobed_bare") {
        case .success(let fd): program = fd
        case .failure(let pf):
            throw KernelError(code: .latencyUnsupported, message: "\(pf.failure.call) failed: \(pf.failure.errno)", errno: pf.failure.errno.rawValue)
        }
        // The link holds its own reference to the program.
        defer { try? program.close() }
        let fd = try counter.createLink(program: program, attachType: CUPROBESYS_BPF_TRACE_UPROBE_SESSION, path: path,
                                        offsets: offsets, refCtrOffsets: nil, cookies: offsets.map { _ in 0 }, pid: nil, flags: 0)
        return UprobeMultiLink(fd: fd, generation: 0, offsetCount: offsets.count)
    }

    /// Deletes hand-off marks of `slots` (see `CounterProgram.sweepMarks`).
    public func sweepMarks(slots: Set<UInt32>) throws(KernelError) {
        try counter.sweep(marks, slots: slots)
    }
}

/// A latency (session) link. `close()` first lets the calls that entered through it return
/// when a newer link took its slots over (bounded by `LatencyProgram.drainLimit`), then
/// closes it (a grace period), then settles what is left (see `LatencyProgram`).
public final class LatencyLink: Sendable {
    struct Site: Sendable { let slot: UInt32; let row: UInt32; let tag: UInt32 }
    public let generation: UInt32
    public var offsetCount: Int { sites.count }
    let sites: [Site]
    private let link: UprobeMultiLink
    private let program: LatencyProgram
    private let closed = Atomic<Bool>(false)

    init(fd: FileDescriptor, generation: UInt32, sites: [Site], program: LatencyProgram, pinPath: String? = nil) {
        self.link = UprobeMultiLink(fd: fd, generation: generation, offsetCount: sites.count, pinPath: pinPath)
        self.generation = generation
        self.sites = sites
        self.program = program
    }

    public var rawDescriptor: Int32? { link.rawDescriptor }

    /// Where the link is pinned, if it is.
    public var pinPath: String? { link.pinPath }

    /// Closes the fd and leaves the pin (daemon exit): the link keeps measuring, its calls in
    /// flight included, for the next daemon to adopt. Nothing is settled. An unpinned link is
    /// closed as by `close(drain: false)`.
    public func release() {
        guard link.pinPath != nil else { close(drain: false); return }
        guard closed.compareExchange(expected: false, desired: true, ordering: .acquiringAndReleasing).exchanged else { return }
        link.release()
    }

    /// Drains (bounded), closes, settles. Idempotent.
    public func close() { close(drain: true) }

    /// `drain: false` closes at once (daemon shutdown: nothing is counted after it anyway).
    public func close(drain: Bool) {
        guard closed.compareExchange(expected: false, desired: true, ordering: .acquiringAndReleasing).exchanged else { return }
        if drain {
            let handedOver = sites.filter { program.superseded(slot: $0.slot, tag: $0.tag) }
            let deadline = ContinuousClock.now + program.drainLimit
            var waiting = handedOver.filter { program.inFlight(row: $0.row, phase: $0.tag) > 0 }
            while !waiting.isEmpty && ContinuousClock.now < deadline {
                var ts = timespec(tv_sec: 0, tv_nsec: 1_000_000)
                nanosleep(&ts, nil)
                waiting = waiting.filter { program.inFlight(row: $0.row, phase: $0.tag) > 0 }
            }
        }
        link.close()
        for s in sites { program.settle(row: s.row, phase: s.tag) }
    }

    deinit { if link.pinPath != nil { release() } else { close(drain: false) } }
}

/// The `rows` map's values, mmapped shared (see `CounterMapping`, whose soundness argument
/// holds here: created in init, unmapped only by the owner's deinit, atomic accesses only).
final class RowMapping: @unchecked Sendable {
    private let base: UnsafeMutableRawPointer
    private let length: Int
    private let rows: Int

    init(fd: FileDescriptor, rows: Int) throws(SyscallFailure) {
        let page = Int(sysconf(Int32(_SC_PAGESIZE)))
        length = max(page, (rows * LatencyProgram.Layout.bytes + page - 1) / page * page)
        self.rows = rows
        guard let p = mmap(nil, length, PROT_READ | PROT_WRITE, MAP_SHARED, fd.rawValue, 0), p != MAP_FAILED else {
            throw SyscallFailure(call: "mmap(uprobed_lat)", errno: Errno(rawValue: Glibc.errno))
        }
        base = p
    }

    func word(row: Int, _ i: Int) -> UnsafeMutablePointer<Atomic<UInt64>> {
        precondition(row >= 0 && row < rows && i >= 0 && i < LatencyProgram.Layout.words, "latency row out of range")
        return (base + row * LatencyProgram.Layout.bytes + i * 8).assumingMemoryBound(to: Atomic<UInt64>.self)
    }

    /// Clears a row no program and no reader uses any more (see `LatencyProgram.release`).
    func zero(row: Int) {
        precondition(row >= 0 && row < rows, "latency row out of range")
        memset(base + row * LatencyProgram.Layout.bytes, 0, LatencyProgram.Layout.bytes)
    }

    func unmap() { munmap(base, length) }
}
