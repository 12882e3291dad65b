import Foundation
import Logging
import Synchronization
import UprobeCore
#if canImport(Glibc)
import Glibc
#endif

/// Turns engine snapshots into state files: called by the engine's writer once per batch
/// (before replies, so an acknowledged registration is on disk) and once more at a graceful
/// stop with the final hit counts. A batch's line is appended without an fsync: the engine
/// calls `sync` once for the batches it is about to answer (group commit), so one fsync
/// serves them all; the engine must therefore be given both hooks. Log appends are
/// serialized by the memo lock; snapshots are taken with it held and written outside it, one
/// at a time, and an older snapshot never overwrites a newer one.
public final class StatePersister: Sendable {
    let store: StateStore
    let kernel: any KernelBackend
    let counters: ServiceCounters
    private struct Memo {
        /// File and process identity taken when each probe was first saved.
        var stamps = StampBook()
        /// Registry generation of the newest registry saved: a save of an older one (a
        /// checkpoint overtaken by the writer) is skipped.
        var lastGeneration: UInt64 = 0
        /// Ids the files on disk hold (snapshot plus log). A registration whose batch could not
        /// be saved is never added: the engine answers `state_write_failed` and rolls it back,
        /// so no later snapshot carries it and a restart cannot bring it back.
        var written = ProbeIDSet()
        /// Sequence number of the last change on disk.
        var seq: UInt64 = 0
        /// Lowest probe number not in any file written so far (see `SavedState.nextID`).
        var nextID: UInt64 = 1
        /// Sizes on disk: once the log outgrows the snapshot and holds mostly dead entries or
        /// many lines (`compactionDue`), a new snapshot replaces both.
        var snapshotBytes = 0
        var logBytes = 0
        /// Registrations written in the snapshot, in the log since it, and the log's lines: a
        /// log of live registrations (one large request's) is as good as a snapshot, and
        /// rewriting it would cost a second write of the same megabytes.
        var snapshotEntries = 0
        var logEntries = 0
        var logLines = 0
        /// The snapshot on disk is an older format version: the first change rewrites it rather
        /// than appending lines an older uprobed, finding the old version, would misread.
        var olderSnapshot = false
        /// Removals done but not on disk: their batch's append failed, or the sync of their
        /// line did. The next append carries them, and any snapshot covers them (it holds only
        /// live registrations).
        var unsavedRemovals: [String] = []
        /// A sync failed. Lines appended before it may have been dropped from the page cache
        /// with the error, so the next change rewrites the snapshot instead of appending.
        var rewriteDue = false
        /// Group commit: removals in lines appended but not yet known to be synced, by the
        /// line's seq. A failed sync turns them into `unsavedRemovals` (their lines may be lost).
        var unsyncedRemovals: [(seq: UInt64, ids: [String])] = []
        /// When the snapshot on disk was written (wall clock); nil if there is none.
        var snapshotAt: Double?
        /// Runs appended to the log whose ids and stamps are not in `written`, `stamps` and
        /// `nextID` yet. Entering 10,000 of them costs the writer ~3 ms before the reply, so
        /// `persist` leaves it to the encode-ahead queue; whatever reads the memo first settles
        /// it (`persist` and `checkpoint` begin with `settle()`).
        var unsettled: [(records: [ProbeRecord], stamps: [ProbeStamps])] = []
        /// Names files referred to by lines appended since the last `capture` (a snapshot
        /// being written keeps them when it collects the others: `NameFiles.collect`).
        var namesSinceCapture: Set<String> = []
        /// A snapshot taken by `capture` is being written outside the lock (`writeCaptured`).
        /// Only one at a time: they share the temporary file, and a later one must not be
        /// overtaken by an earlier one.
        var snapshotInFlight = false
        /// The registry generation and the sum of all hit counters the snapshot on disk was
        /// taken with. A checkpoint that finds both unchanged (an idle daemon) writes nothing:
        /// counters only grow while a generation lasts (a slot is reused only in a new one).
        var savedMark: (generation: UInt64, hits: UInt64)?

        /// Registrations live in the files (`written` and those still to settle).
        var liveEntries: Int { written.count + unsettled.reduce(0) { $0 + $1.records.count } }

        /// Whether the log should be folded into a new snapshot: it is larger than the snapshot
        /// (and than `compactionFloor`), and more of what the files hold is dead (removed or
        /// written again) than half of what is live, or it has many lines to replay. A large
        /// registration alone never is: its log line is as compact as its snapshot would be.
        var compactionDue: Bool {
            guard logBytes > max(StatePersister.compactionFloor, snapshotBytes) else { return false }
            let dead = max(0, snapshotEntries + logEntries - liveEntries)
            return dead * 2 > liveEntries || logLines >= StatePersister.compactionLines
        }

        mutating func settle() {
            for run in unsettled {
                stamps.reserveCapacity(stamps.count + run.records.count)
                for (r, s) in zip(run.records, run.stamps) { stamps[record: r] = s }
                noteWritten(run.records)
            }
            unsettled.removeAll()
        }

        /// `records` are in the log now: on disk, and their ids never to be handed out again.
        mutating func noteWritten(_ records: [ProbeRecord]) {
            for r in records {
                written.insert(r)
                if let n = r.number, n < UInt64.max { nextID = max(nextID, n + 1) }
            }
        }

        /// `ids` are in the log now: on disk, and never to be handed out again.
        mutating func noteWritten(_ ids: [String]) {
            written.formUnion(ids)
            nextID = max(nextID, StateCodec.nextID(after: ids))
        }
    }
    /// The memo's lock. An NSLock (a pthread mutex) rather than `Mutex`: the memo is settled on
    /// the encode-ahead queue too, and ThreadSanitizer does not see `Mutex`.
    private final class MemoCell: @unchecked Sendable {
        // @unchecked: `memo` is only touched with `lock` held.
        private let lock = NSLock()
        private var memo = Memo()
        func withLock<R>(_ body: (inout Memo) -> R) -> R {
            lock.lock()
            defer { lock.unlock() }
            return body(&memo)
        }
    }
    private let memo = MemoCell()
    let bootID: String?
    let aheadQueue: DispatchQueue
    let logger: Logger?
    /// Writes snapshots taken by `capture`, one at a time (see `Memo.snapshotInFlight`).
    private let snapshotQueue: DispatchQueue

    /// Registrations whose log entries are being written ahead of their batch (`prepare`),
    /// keyed by the first record. Taken by the next `persist`, used or not.
    private let prepared = Mutex<[ObjectIdentifier: PreparedRun]>([:])

    /// The log text of a run of new registrations, written on a background queue.
    private final class PreparedRun: Sendable {
        let records: [ProbeRecord]
        let names: NameFiles
        private let result = Mutex<Encoded?>(nil)
        private let done = DispatchSemaphore(value: 0)
        init(_ records: [ProbeRecord], names: NameFiles) {
            self.records = records
            self.names = names
        }

        /// The records as log array elements, the stamps taken for them (in their order), and
        /// the names files the text refers to (written and synced by then).
        struct Encoded: Sendable {
            var text: [UInt8] = []
            var stamps: [ProbeStamps] = []
            var names: Set<String> = []
            /// How long `fill` took (logged for a bulk run).
            var micros: UInt64 = 0
        }

        func fill() {
            let started = ContinuousClock.now
            let table = RecordTable(records, stamping: true)
            let stamps = table.stamps
            // A glob's names go to their names file here, synced before the text is handed
            // over: this runs while the kernel attaches, and the line that refers to the file
            // is appended only after (see `NameFiles`).
            let refs = NameRefs(names)
            let text = StateCodec.encodeElements(table, stamps: stamps, names: refs)
            let micros = (ContinuousClock.now - started).microseconds
            result.withLock { $0 = Encoded(text: text, stamps: stamps, names: refs.used, micros: micros) }
            done.signal()
        }

        /// Waits for `fill`.
        func get() -> Encoded {
            done.wait()
            done.signal()  // stays readable
            return result.withLock { $0 } ?? Encoded()
        }
    }

    /// The engine's prepare hook: `records` are new registrations of one request that a
    /// coming `persist` will probably add (unless the request fails). Their log text is
    /// written now on a background queue, while the writer attaches them in the kernel, so a
    /// 10,000-probe request's entry is ready when its attach is done. A run that its batch
    /// does not add (the request failed) is dropped by that batch's `persist`.
    public func prepare(_ records: [ProbeRecord]) {
        guard let first = records.first else { return }
        let run = PreparedRun(records, names: store.names)
        prepared.withLock { $0[ObjectIdentifier(first)] = run }
        aheadQueue.async { run.fill() }
    }

    /// The engine's sync hook (group commit): makes every line appended so far durable.
    public func sync() throws(StateError) {
        // The lines this sync covers, if any of them removes registrations (the memo lock is
        // not taken otherwise: the writer holds it while it appends the next batch).
        let covers = unsyncedRemovalLines.load(ordering: .relaxed) > 0 ? memo.withLock { $0.seq } : nil
        do throws(StateError) { try store.syncLog() } catch {
            memo.withLock { m in
                m.rewriteDue = true
                // Those lines may be lost with the error: their removals are not known to be
                // on disk, and the rewrite the next change makes must leave them out.
                for line in m.unsyncedRemovals {
                    m.written.formUnion(line.ids)
                    m.unsavedRemovals += line.ids
                }
                m.unsyncedRemovals.removeAll()
                publishUnsaved(m)
            }
            counters.stateWriteFailures.add(1, ordering: .relaxed)
            throw error
        }
        if let covers {
            memo.withLock { m in
                m.unsyncedRemovals.removeAll { $0.seq <= covers }
                publishUnsaved(m)
            }
        }
        counters.stateSyncs.add(1, ordering: .relaxed)
    }

    /// `unsyncedRemovals.count`, readable without the memo lock.
    private let unsyncedRemovalLines = Atomic<Int>(0)

    /// With the memo lock held, after `unsavedRemovals` or `unsyncedRemovals` changed: the
    /// counts `status` shows and `sync` reads.
    private func publishUnsaved(_ m: Memo) {
        counters.stateUnsavedRemovals.store(m.unsavedRemovals.count, ordering: .relaxed)
        unsyncedRemovalLines.store(m.unsyncedRemovals.count, ordering: .relaxed)
        counters.stateReserveBytes.store(store.reserve.heldBytes, ordering: .relaxed)
    }

    /// `aheadQueue` runs `prepare`'s encoding; the daemon shares one serial queue with the
    /// register replies written ahead, so the entry the writer waits for comes first.
    public init(store: StateStore, kernel: any KernelBackend, counters: ServiceCounters, restored: SavedState?,
                aheadQueue: DispatchQueue = .global(), logger: Logger? = nil,
                snapshotQueue: DispatchQueue = DispatchQueue(label: "uprobed-snapshot")) {
        self.logger = logger
        self.snapshotQueue = snapshotQueue
        self.aheadQueue = aheadQueue
        self.store = store
        self.kernel = kernel
        self.counters = counters
        self.bootID = currentBootID()
        var m = Memo()
        for p in restored?.probes ?? [] { m.stamps[p.id] = ProbeStamps(file: p.stamp, processStart: p.pidStartTime) }
        m.written = ProbeIDSet(restored?.probes.map(\.id) ?? [])
        m.seq = restored?.seq ?? 0
        m.nextID = restored?.nextID ?? 1
        m.snapshotBytes = store.size(store.path)
        m.logBytes = store.size(store.logPath) + store.size(store.previousLogPath)
        // What the files hold beside the live registrations is not known here: a log that has
        // outgrown its snapshot is compacted at the first change, as before.
        m.snapshotEntries = restored?.probes.count ?? 0
        m.logLines = m.logBytes > max(Self.compactionFloor, m.snapshotBytes) ? Self.compactionLines : 0
        m.olderSnapshot = (restored?.formatVersion ?? SavedState.version) < SavedState.version
        var st = stat()
        if stat(store.path, &st) == 0 { m.snapshotAt = Double(st.st_mtim.tv_sec) }
        memo.withLock { $0 = m }
        counters.stateReserveBytes.store(store.reserve.heldBytes, ordering: .relaxed)
    }

    /// The engine's persist hook, once per batch before its replies: appends the batch's added
    /// and removed registrations (`batchAdded`, `batchRemoved`: the engine says what changed, so
    /// this costs the size of the batch, not of the registry) to the log. Once the log has grown
    /// past the snapshot (at least 1 MiB) a new snapshot is started on `snapshotQueue`; only a
    /// rewrite the replies must wait for (`rewriteDue`, `olderSnapshot`) is written here.
    public func persist(_ snapshot: RegistrySnapshot) throws(StateError) {
        // Runs written ahead by `prepare` are spliced in; the rest is written here. A run's
        // registrations are new (restored ones are never prepared): none is on disk yet.
        // The runs this batch adds whole are found, and waited for, before the memo lock is
        // taken: their encoding is queued on `aheadQueue`, possibly behind a deferred `settle`
        // that needs that lock: waiting with it held would deadlock the writer when two large
        // registers come in a row.
        let runs = prepared.withLock { p in defer { p.removeAll() }; return p }
        let batch = snapshot.batchAdded
        var runStarts: [Int: PreparedRun] = [:]
        var i = batch.startIndex
        while i < batch.endIndex {
            if let run = runs[ObjectIdentifier(batch[i])], batch.count - i >= run.records.count,
               zip(run.records, batch[i...]).allSatisfy({ $0 === $1 }) {
                runStarts[i] = run
                i += run.records.count
            } else {
                i += 1
            }
        }
        let waitStarted = ContinuousClock.now
        let filled = runStarts.mapValues { run in (run: run, encoded: run.get()) }
        if let bulk = filled.values.first(where: { $0.run.records.count >= 50_000 }) {
            logger?.info("bulk state entry", metadata: ["probes": "\(bulk.run.records.count)", "encode_us": "\(bulk.encoded.micros)",
                                                        "writer_waited_us": "\((ContinuousClock.now - waitStarted).microseconds)"])
        }
        // nil: a full rewrite is due while a snapshot is being written; wait for it, then again.
        var outcome: Result<Bool, StateError>? = nil
        while outcome == nil {
            outcome = persistLocked(snapshot, filled: filled)
            if outcome == nil { snapshotQueue.sync {} }
        }
        let result = outcome ?? .success(false)
        if case .success(true) = result {
            // Once the batch's fsync and reply are done: settling at once takes the second CPU
            // from them (fsync 0.7 -> 1.2-3.2 ms), and settling at the sync delays the reply by
            // 1-2 ms. 20 ms later the reply is out and its client is reading it.
            let memo = self.memo
            aheadQueue.asyncAfter(deadline: .now() + .milliseconds(20)) { memo.withLock { $0.settle() } }
        }
        try counted(result.map { _ in () })
    }

    /// `persist` with the memo lock held. True: runs written ahead were appended (to settle).
    private func persistLocked(_ snapshot: RegistrySnapshot,
                               filled: [Int: (run: PreparedRun, encoded: PreparedRun.Encoded)])
        -> Result<Bool, StateError>? {
        let batch = snapshot.batchAdded
        return memo.withLock { m -> Result<Bool, StateError>? in
            guard snapshot.generation >= m.lastGeneration else { return .success(false) }
            m.settle()
            var spliced: [(run: PreparedRun, encoded: PreparedRun.Encoded)] = []
            var added: [ProbeRecord] = []
            var i = batch.startIndex
            while i < batch.endIndex {
                if let f = filled[i] {
                    spliced.append(f)
                    i += f.run.records.count
                } else {
                    if !m.written.contains(batch[i]) { added.append(batch[i]) }
                    i += 1
                }
            }
            // An ended registration is written again (a log entry's add replaces an earlier one
            // of the same id): a crash must not bring it back as it was.
            // So is a followed one whose file versions changed (see `batchFollowed`).
            let addedIDs = Set(added.map(\.id))
            added += (snapshot.batchEnded + snapshot.batchFollowed).filter { !addedIDs.contains($0.id) }
            let removed = (m.unsavedRemovals + snapshot.batchRemoved).filter { m.written.contains($0) }
            if added.isEmpty && spliced.isEmpty && removed.isEmpty {
                m.lastGeneration = snapshot.generation
                return .success(false)
            }
            if m.olderSnapshot || m.rewriteDue {
                // A full rewrite that the batch's reply waits for, with the writer held: after a
                // failed sync the log may have lost lines, and an older format must not be
                // appended to.
                if m.snapshotInFlight { return nil }
                let counts = (try? KernelCounts.read(kernel, snapshot)) ?? KernelCounts()
                do throws(StateError) { try writeSnapshot(&m, snapshot, counts: counts) } catch {
                    m.unsavedRemovals = removed
                    publishUnsaved(m)
                    return .failure(error)
                }
                publishUnsaved(m)
                return .success(false)
            }
            var files = FileStampCache()
            // With their counters: a restored registration whose links were adopted has counted
            // on while no daemon ran, and its entry must not take that back to `baseHits`.
            let kernel = self.kernel
            let adds = added.map { r in
                // A latency probe's rows likewise (read first: a call in them is in the counter).
                let measured = r.latency { kernel.readLatency(slot: $0) }
                let hits = r.sites.reduce(r.baseHits) { $0 &+ ((try? kernel.readCounter(slot: $1.slot)) ?? 0) }
                var p = Self.saved(r, hits: hits, stamps: &m.stamps, files: &files)
                if let measured { p.latency = measured }
                return p
            }
            // Not sorted here: `writeRemovals` sorts what it writes (sorting 241,000 id strings took 10 ms).
            let parts = StateCodec.logEntryParts(seq: m.seq + 1, add: adds, encoded: spliced.map(\.encoded.text), remove: removed)
            // A line that removes registrations may use the space reserve: acknowledged
            // removals must not come back after a restart because the disk was full.
            do throws(StateError) { try store.append(parts: parts, sync: false, useReserve: !removed.isEmpty) } catch {
                m.unsavedRemovals = removed
                publishUnsaved(m)
                return .failure(error)
            }
            m.unsavedRemovals.removeAll()
            m.seq += 1
            if !removed.isEmpty { m.unsyncedRemovals.append((m.seq, removed)) }
            publishUnsaved(m)
            m.logBytes += parts.reduce(0) { $0 + $1.count }
            m.logLines += 1
            m.logEntries += added.count + spliced.reduce(0) { $0 + $1.run.records.count }
            m.written.subtract(removed)
            m.stamps.remove(removed)
            m.noteWritten(added)
            m.unsettled += spliced.map { ($0.run.records, $0.encoded.stamps) }
            for s in spliced { m.namesSinceCapture.formUnion(s.encoded.names) }
            m.lastGeneration = snapshot.generation
            if m.compactionDue && !m.snapshotInFlight {
                // A new snapshot is written on `snapshotQueue` while batches go on. (Written
                // here, a 10,000-probe registry would hold the writer 32-64 ms, and every
                // request would wait.)
                let counts = (try? KernelCounts.read(kernel, snapshot)) ?? KernelCounts()
                do throws(StateError) {
                    let captured = try capture(&m, snapshot, counts: counts)
                    snapshotQueue.async { _ = self.writeCaptured(captured) }
                } catch {
                    // The log's fsync failed: the batch's sync will say so; rewrite in full next.
                    m.rewriteDue = true
                }
            }
            return .success(!spliced.isEmpty)
        }
    }

    /// The log's size below which it is never compacted, and its line count at which it is
    /// (see `Memo.compactionDue`).
    static let compactionFloor = 1 << 20
    static let compactionLines = 1024

    /// Waits until a snapshot being written outside the memo lock is in place (tests; a stop
    /// waits through `checkpoint`).
    func waitForSnapshotWrite() { snapshotQueue.sync {} }

    /// What a snapshot written outside the memo lock needs, taken with it held (`capture`).
    private struct Captured: Sendable {
        let snapshot: RegistrySnapshot
        let counts: KernelCounts
        let stamps: StampBook
        let unsettled: [(records: [ProbeRecord], stamps: [ProbeStamps])]
        /// The last log line the snapshot covers.
        let seq: UInt64
        let nextID: UInt64
        /// Removals not on disk when it was taken: the snapshot, which leaves them out, saves them.
        let unsavedRemovals: [String]
    }

    /// What changes whenever anything is counted: hits, and latency probes' returns (a call
    /// may return without any new hit).
    static func hitSum(_ counts: KernelCounts) -> UInt64 {
        counts.latency.values.reduce(counts.hits.reduce(0, &+)) { $0 &+ $1.returns &+ $1.unobserved }
    }

    /// With the memo lock held: takes the registry as of the last log line and moves the log
    /// aside (`StateStore.rotateLog`), so the new snapshot can drop it. Cheap: the snapshot and
    /// the stamps are shared copies. If the log cannot be moved aside (a `prev` left by a
    /// snapshot that failed), it stays: its lines are skipped by their seq after the snapshot.
    private func capture(_ m: inout Memo, _ snapshot: RegistrySnapshot, counts: KernelCounts) throws(StateError) -> Captured {
        if try store.rotateLog() {
            m.logBytes = 0
            m.logLines = 0
            // Their entries move to the snapshot being written (counted when it is in place).
            m.logEntries = 0
            // Rotating fsynced the log: every line in it is on disk.
            m.unsyncedRemovals.removeAll()
            publishUnsaved(m)
        }
        m.snapshotInFlight = true
        m.namesSinceCapture = []
        m.lastGeneration = max(m.lastGeneration, snapshot.generation)
        return Captured(snapshot: snapshot, counts: counts, stamps: m.stamps, unsettled: m.unsettled, seq: m.seq, nextID: m.nextID,
                        unsavedRemovals: m.unsavedRemovals)
    }

    /// Writes a captured snapshot (on `snapshotQueue`, one at a time) and drops the log it
    /// covers. A failure leaves the old snapshot and both logs, which `load` reads together,
    /// and makes the next batch rewrite in full.
    private func writeCaptured(_ c: Captured) -> Result<Void, StateError> {
        var stamps = c.stamps
        for run in c.unsettled {
            for (r, st) in zip(run.records, run.stamps) where stamps[record: r] == nil { stamps[record: r] = st }
        }
        let probes = Self.savedProbes(c.snapshot, counts: c.counts, stamps: &stamps)
        var state = SavedState(bootID: bootID, savedAt: clockRealtime(), probes: probes)
        state.seq = c.seq
        state.nextID = max(c.nextID, StateCodec.nextID(after: probes.map(\.id)))
        let result: Result<Void, StateError>
        var used: Set<String> = []
        do throws(StateError) {
            used = try store.write(state, covering: .previousLog)
            result = .success(())
        } catch {
            result = .failure(error)
        }
        let store = self.store
        let mark = (generation: c.snapshot.generation, hits: Self.hitSum(c.counts))
        memo.withLock { m in
            m.snapshotInFlight = false
            if case .success = result {
                // The names files neither this snapshot nor a line after it refers to.
                store.names.collect(keep: used.union(m.namesSinceCapture))
                m.snapshotBytes = store.size(store.path)
                m.snapshotEntries = probes.count
                m.olderSnapshot = false
                m.savedMark = mark
                m.snapshotAt = state.savedAt
                if !c.unsavedRemovals.isEmpty {
                    let saved = Set(c.unsavedRemovals)
                    m.unsavedRemovals.removeAll { saved.contains($0) }
                    m.written.subtract(saved)
                }
            } else {
                m.rewriteDue = true
            }
            publishUnsaved(m)
        }
        if case .failure(let e) = result {
            logger?.error("writing the state snapshot failed; the next batch rewrites it with the writer held",
                          metadata: ["error_code": "\(e.code)", "error": "\(e.message)"])
        }
        try? counted(result)
        return result
    }

    /// Rewrites the snapshot with the hit totals of `snapshot` (periodic checkpoint, final
    /// save), waiting for it; the writer is held only while it is taken. Skipped if the writer
    /// has already saved a newer registry.
    public func checkpoint(_ snapshot: RegistrySnapshot) throws(StateError) {
        let counts: KernelCounts
        do { counts = try KernelCounts.read(kernel, snapshot) } catch {
            throw StateError(code: .stateIO, message: "cannot read hit counters: \(error.message)")
        }
        let hits = Self.hitSum(counts)
        while true {
            // Taken with the lock held, written outside it: the writer goes on meanwhile.
            let step: Result<Captured?, StateError>? = memo.withLock { m in
                guard snapshot.generation >= m.lastGeneration else { return .success(nil) }
                if m.snapshotInFlight { return nil }
                // Nothing registered, removed or counted since the snapshot on disk.
                if let saved = m.savedMark, saved.generation == snapshot.generation, saved.hits == hits,
                   m.logBytes == 0, !m.rewriteDue {
                    return .success(nil)
                }
                m.settle()
                do throws(StateError) { return .success(try capture(&m, snapshot, counts: counts)) } catch {
                    m.rewriteDue = true
                    return .failure(error)
                }
            }
            switch step {
            case nil: snapshotQueue.sync {}  // another snapshot is being written; then again
            case .success(nil)?: return
            case .success(let captured?)?:
                let result = snapshotQueue.sync { writeCaptured(captured) }
                if case .failure(let e) = result { throw e }
                return
            case .failure(let e)?: try counted(.failure(e))
            }
        }
    }

    /// What the state files lack compared with `snapshot` (the registry now), for the log line
    /// of a failed final save.
    public func unsaved(_ snapshot: RegistrySnapshot) -> UnsavedChanges {
        memo.withLock { m in
            m.settle()
            var seen: Set<String> = []
            let removals = (m.unsavedRemovals + m.unsyncedRemovals.flatMap(\.ids)).filter { seen.insert($0).inserted }
            let registrations = snapshot.sortedProbes.map(\.id).filter { !m.written.contains($0) }
            return UnsavedChanges(removals: removals, registrations: registrations, snapshotAt: m.snapshotAt)
        }
    }

    /// Counts a write attempt in the service counters and passes its failure on.
    private func counted(_ result: Result<Void, StateError>) throws(StateError) {
        switch result {
        case .success: counters.stateWrites.add(1, ordering: .relaxed)
        case .failure(let e):
            counters.stateWriteFailures.add(1, ordering: .relaxed)
            throw e
        }
    }

    /// Writes the whole registry as the new snapshot.
    private func writeSnapshot(_ m: inout Memo, _ snapshot: RegistrySnapshot, counts: KernelCounts) throws(StateError) {
        let probes = Self.savedProbes(snapshot, counts: counts, stamps: &m.stamps)
        let live = ProbeIDSet(probes.map(\.id))
        var state = SavedState(bootID: bootID, savedAt: clockRealtime(), probes: probes)
        state.seq = m.seq + 1
        m.nextID = max(m.nextID, StateCodec.nextID(after: probes.map(\.id)))
        state.nextID = m.nextID
        let used = try store.write(state)
        // It covers every line: only the names files it refers to are needed.
        store.names.collect(keep: used)
        m.namesSinceCapture = []
        m.seq += 1
        m.written = live
        m.stamps = m.stamps.keeping(live)
        m.snapshotBytes = store.size(store.path)
        m.snapshotEntries = probes.count
        m.logBytes = 0
        m.logEntries = 0
        m.logLines = 0
        m.olderSnapshot = false
        m.unsavedRemovals.removeAll()
        m.unsyncedRemovals.removeAll()
        m.snapshotAt = state.savedAt
        m.rewriteDue = false
        m.lastGeneration = snapshot.generation
        m.savedMark = (snapshot.generation, Self.hitSum(counts))
    }
}

