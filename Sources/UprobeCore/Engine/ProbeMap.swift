/// The registrations by id, as a copy-on-write map split into chunks of 1024 ids.
///
/// The writer publishes a snapshot after every batch; with one flat dictionary the first
/// change after each publication copied every registration (O(n) per batch: 20,000 probes
/// and thousands of small batches made churn crawl). Here a snapshot shares the chunks, and a
/// change copies only the chunk it touches (1024 references), once per batch. Ids are `p<N>`:
/// chunk N / 1024, index N % 1024, so walking the chunks in order is registration order and
/// listings need no sort.
///
/// Beside each record its chunk keeps a `StatsRow`, by value: `stats` of 10,000 probes reads
/// 10,000 contiguous rows instead of 10,000 record objects and their site arrays scattered
/// over the heap.
public struct ProbeMap: Sendable {
    static let chunkSize = 1024

    /// A chunk's records. Mutated in place only while uniquely referenced (i.e. by the writer,
    /// before the snapshot that shares it exists); once shared it is never mutated again, the
    /// writer copies it first. That is what makes the `@unchecked Sendable` safe.
    final class Chunk: @unchecked Sendable {
        var records: [ProbeRecord?]
        /// `rows[i]` describes `records[i]` (`present` is false where that is nil).
        var rows: [StatsRow]
        var count = 0
        init() {
            records = Array(repeating: nil, count: ProbeMap.chunkSize)
            rows = Array(repeating: StatsRow(), count: ProbeMap.chunkSize)
        }
        init(copying other: Chunk) {
            records = other.records
            rows = other.rows
            count = other.count
        }
    }

    private var chunks: [UInt64: Chunk] = [:]
    /// Ids that are not `p<N>` (none are made by this daemon; kept for robustness).
    private var others: [String: ProbeRecord] = [:]
    public private(set) var count = 0
    /// Consumer names as small numbers for the rows, each with how many records carry it. A
    /// name is dropped (and its number reused) when its last record goes, so names that come
    /// and go (one per CI job, say) do not pile up. Changed only when a record's consumer
    /// comes or goes, so a batch copies it (shared with the last snapshot) at most once.
    private var consumerKeys: [String: (key: UInt32, records: Int)] = [:]
    private var freeConsumerKeys: [UInt32] = []
    private var nextConsumerKey: UInt32 = 1

    public init() {}

    private static func place(_ id: String) -> (chunk: UInt64, index: Int)? {
        place(ProbeID.number(id))
    }

    private static func place(_ number: UInt64?) -> (chunk: UInt64, index: Int)? {
        guard let n = number else { return nil }
        return (n / UInt64(chunkSize), Int(n % UInt64(chunkSize)))
    }

    public subscript(id: String) -> ProbeRecord? {
        guard let (ci, i) = Self.place(id) else { return others[id] }
        return chunks[ci]?.records[i]
    }

    public var isEmpty: Bool { count == 0 }

    mutating func insert(_ r: ProbeRecord) {
        guard let (ci, i) = Self.place(r.number) else {
            let old = others.updateValue(r, forKey: r.id)
            if old == nil { count += 1 } else { releaseConsumerKey(old?.consumer) }
            _ = retainConsumerKey(r.consumer)
            return
        }
        let chunk = uniqueChunk(ci)
        let old = chunk.records[i]
        if old == nil { chunk.count += 1; count += 1 }
        let key: UInt32
        if let old, old.consumer == r.consumer {
            key = chunk.rows[i].consumer
        } else {
            if let old { releaseConsumerKey(old.consumer) }
            key = retainConsumerKey(r.consumer)
        }
        chunk.records[i] = r
        chunk.rows[i] = StatsRow(r, consumer: key)
    }

    /// Inserts `records` as `insert` does each, a run of new records of one chunk at a time:
    /// one chunk lookup and one access to its arrays per run, and one consumer count per run
    /// of records that share their request's terms. A whole binary's 241,000 records spent a
    /// fifth of their registry time in the lookups and exclusivity checks of one insert each.
    mutating func insert(contentsOf records: [ProbeRecord]) {
        var start = records.startIndex
        while start < records.endIndex {
            let first = records[start]
            guard let (ci, i0) = Self.place(first.number), records[start...].count > 1 else {
                insert(first)
                start += 1
                continue
            }
            // The run: new records in consecutive places of this chunk with the same terms.
            let chunk = uniqueChunk(ci)
            var end = start
            var i = i0
            while end < records.endIndex, i < Self.chunkSize, chunk.records[i] == nil,
                  records[end].terms === first.terms, let n = records[end].number,
                  n == ci &* UInt64(Self.chunkSize) &+ UInt64(i) {
                end += 1
                i += 1
            }
            guard end > start else {  // its place is taken: replaced as usual
                insert(first)
                start += 1
                continue
            }
            let key = retainConsumerKey(first.consumer, records: end - start)
            chunk.records.withUnsafeMutableBufferPointer { places in
                chunk.rows.withUnsafeMutableBufferPointer { rows in
                    for (k, r) in records[start..<end].enumerated() {
                        places[i0 + k] = r
                        rows[i0 + k] = StatsRow(r, consumer: key)
                    }
                }
            }
            chunk.count += end - start
            count += end - start
            start = end
        }
    }

    @discardableResult
    mutating func remove(_ id: String) -> ProbeRecord? {
        guard let (ci, i) = Self.place(id) else {
            let r = others.removeValue(forKey: id)
            if r != nil { count -= 1; releaseConsumerKey(r?.consumer) }
            return r
        }
        guard chunks[ci]?.records[i] != nil else { return nil }
        let chunk = uniqueChunk(ci)
        let r = chunk.records[i]
        chunk.records[i] = nil
        chunk.rows[i] = StatsRow()
        releaseConsumerKey(r?.consumer)
        chunk.count -= 1
        count -= 1
        if chunk.count == 0 { chunks.removeValue(forKey: ci) }
        return r
    }

    private mutating func uniqueChunk(_ ci: UInt64) -> Chunk {
        guard let at = chunks.index(forKey: ci) else {
            let fresh = Chunk()
            chunks[ci] = fresh
            return fresh
        }
        // Checked in place, one hash per call (a 10,000-probe register comes here 10,000
        // times). If a snapshot shares the dictionary, this access copies it first, and the
        // chunk, then referenced by both copies, is copied too.
        if !isKnownUniquelyReferenced(&chunks.values[at]) { chunks.values[at] = Chunk(copying: chunks.values[at]) }
        return chunks.values[at]
    }

    /// The number the rows use for `consumer`, and how many registrations have it; nil if none.
    func consumerKey(_ consumer: String) -> (key: UInt32, records: Int)? { consumerKeys[consumer] }
    /// How many consumer names are kept (one per consumer with a registration).
    var consumerNames: Int { consumerKeys.count }

    /// `records`: how many new records take the name.
    private mutating func retainConsumerKey(_ consumer: String?, records: Int = 1) -> UInt32 {
        guard let consumer else { return 0 }
        if let at = consumerKeys.index(forKey: consumer) {  // one hash: a register of 10,000 comes here 10,000 times
            consumerKeys.values[at].records += records
            return consumerKeys.values[at].key
        }
        let k: UInt32
        if let reused = freeConsumerKeys.popLast() {
            k = reused
        } else {
            // More than 2^32 - 2 names alive at once cannot happen: each has a record.
            k = nextConsumerKey
            nextConsumerKey += 1
        }
        consumerKeys[consumer] = (k, records)
        return k
    }

    private mutating func releaseConsumerKey(_ consumer: String?) {
        guard let consumer, let at = consumerKeys.index(forKey: consumer) else { return }
        if consumerKeys.values[at].records > 1 {
            consumerKeys.values[at].records -= 1
        } else {
            freeConsumerKeys.append(consumerKeys.values[at].key)
            consumerKeys.remove(at: at)
        }
    }

    /// Every registration, in id order (registration order).
    public var values: [ProbeRecord] { sorted }

    /// Every registration in id order, without comparing anything but chunk numbers.
    public var sorted: [ProbeRecord] { sorted(where: { _ in true }) }

    /// The registrations `include` accepts, in id order, in one pass (`stats` of one consumer
    /// out of 20,000 probes no longer copies all of them first).
    public func sorted(where include: (ProbeRecord) -> Bool) -> [ProbeRecord] {
        var out: [ProbeRecord] = []
        out.reserveCapacity(count)
        for ci in chunks.keys.sorted() {
            guard let c = chunks[ci] else { continue }
            for case let r? in c.records where include(r) { out.append(r) }
        }
        out.append(contentsOf: others.values.filter(include).sorted { $0.id < $1.id })
        return out
    }

    /// The ids of the registrations `include` accepts, in id order.
    func selectIDs(_ include: (ProbeRecord) -> Bool) -> [String] {
        var out: [String] = []
        forEach { r in if include(r) { out.append(r.id) } }
        return out
    }

    /// Calls `body` with each registration in id order, without collecting them first.
    public func forEach(_ body: (ProbeRecord) -> Void) {
        for ci in chunks.keys.sorted() {
            guard let c = chunks[ci] else { continue }
            for case let r? in c.records { body(r) }
        }
        for r in others.values.sorted(by: { $0.id < $1.id }) { body(r) }
    }

    /// Each registration in id order — only those of consumer number `consumer` if given —
    /// as its id number and row. `body` gets the record too when `wantsRecord(row)` says so;
    /// otherwise the record object is not touched. Ids not of the form `p<N>` come last with
    /// a nil number, always with their record (their row is made from it).
    func forEachRow(consumer: UInt32?, wantsRecord: (borrowing StatsRow) -> Bool,
                    _ body: (UInt64?, borrowing StatsRow, ProbeRecord?) -> Void) {
        for ci in chunks.keys.sorted() {
            guard let c = chunks[ci] else { continue }
            let first = ci &* UInt64(Self.chunkSize)
            c.rows.withUnsafeBufferPointer { rows in
                for i in rows.indices where rows[i].present && (consumer == nil || rows[i].consumer == consumer) {
                    body(first &+ UInt64(i), rows[i], wantsRecord(rows[i]) ? c.records[i] : nil)
                }
            }
        }
        guard !others.isEmpty else { return }
        for r in others.values.sorted(by: { $0.id < $1.id }) {
            let key = r.consumer.flatMap { consumerKeys[$0]?.key } ?? 0
            if let consumer, key != consumer { continue }
            body(nil, StatsRow(r, consumer: key), r)
        }
    }
}

/// What `stats` needs of a registration, kept by value beside its record (see `ProbeMap`).
/// 24 bytes: the two flags share a word with the consumer's number.
struct StatsRow: Sendable, BitwiseCopyable {
    /// Bits 0-29: `ProbeMap.consumerKey` of its consumer (0 for none); bit 30: `present`;
    /// bit 31: `plain`.
    private var consumerAndFlags: UInt32 = 0
    /// The counter slot of its only site, when `plain`.
    var slot: UInt32 = 0
    /// `ProbeRecord.countingSince`.
    var countingSince: Double = 0
    var baseHits: UInt64 = 0

    private static let presentBit: UInt32 = 1 << 30
    private static let plainBit: UInt32 = 1 << 31

    /// `ProbeMap.consumerKey` of its consumer; 0 for none.
    var consumer: UInt32 { consumerAndFlags & (Self.presentBit - 1) }
    /// False for an empty place in a chunk.
    var present: Bool { consumerAndFlags & Self.presentBit != 0 }
    /// One site, active, no retired versions, not a latency probe: its hits are `baseHits + counts[slot]`, and
    /// nothing else of the record is needed unless a per-file breakdown is asked for.
    var plain: Bool { consumerAndFlags & Self.plainBit != 0 }

    init() {}

    init(_ r: ProbeRecord, consumer: UInt32) {
        // Consumer numbers are reused as names go, so they stay below the number of
        // registrations, far below 2^30.
        precondition(consumer < Self.presentBit, "consumer number out of range")
        consumerAndFlags = consumer | Self.presentBit
        countingSince = r.countingSince
        baseHits = r.baseHits
        if r.sites.count == 1, !r.hasRetired, !r.spec.latency, r.isActive {
            consumerAndFlags |= Self.plainBit
            slot = r.sites[0].slot
        }
    }
}
