/// The registrations by id, as a copy-on-write map split into chunks of 1024 ids.
///
/// The writer publishes a snapshot after every batch; with one flat dictionary the first
/// change after each publication copied every registration (O(n) per batch: 20,000 probes
/// and thousands of small batches made churn crawl). Here a snapshot shares the chunks, and a
/// change copies only the chunk it touches (1024 references), once per batch. Ids are `p<N>`:
/// chunk N / 1024, index N % 1024, so walking the chunks in order is registration order and
/// listings need no sort.
public struct ProbeMap: Sendable {
    static let chunkSize = 1024

    /// A chunk's records. Mutated in place only while uniquely referenced (i.e. by the writer,
    /// before the snapshot that shares it exists); once shared it is never mutated again, the
    /// writer copies it first. That is what makes the `@unchecked Sendable` safe.
    final class Chunk: @unchecked Sendable {
        var records: [ProbeRecord?]
        var count = 0
        init() { records = Array(repeating: nil, count: ProbeMap.chunkSize) }
        init(copying other: Chunk) {
            records = other.records
            count = other.count
        }
    }

    private var chunks: [UInt64: Chunk] = [:]
    /// Ids that are not `p<N>` (none are made by this daemon; kept for robustness).
    private var others: [String: ProbeRecord] = [:]
    public private(set) var count = 0

    public init() {}

    private static func place(_ id: String) -> (chunk: UInt64, index: Int)? {
        guard let n = ProbeID.number(id) else { return nil }
        return (n / UInt64(chunkSize), Int(n % UInt64(chunkSize)))
    }

    public subscript(id: String) -> ProbeRecord? {
        guard let (ci, i) = Self.place(id) else { return others[id] }
        return chunks[ci]?.records[i]
    }

    public var isEmpty: Bool { count == 0 }

    mutating func insert(_ r: ProbeRecord) {
        guard let (ci, i) = Self.place(r.id) else {
            if others.updateValue(r, forKey: r.id) == nil { count += 1 }
            return
        }
        let chunk = uniqueChunk(ci)
        if chunk.records[i] == nil { chunk.count += 1; count += 1 }
        chunk.records[i] = r
    }

    @discardableResult
    mutating func remove(_ id: String) -> ProbeRecord? {
        guard let (ci, i) = Self.place(id) else {
            let r = others.removeValue(forKey: id)
            if r != nil { count -= 1 }
            return r
        }
        guard chunks[ci]?.records[i] != nil else { return nil }
        let chunk = uniqueChunk(ci)
        let r = chunk.records[i]
        chunk.records[i] = nil
        chunk.count -= 1
        count -= 1
        if chunk.count == 0 { chunks.removeValue(forKey: ci) }
        return r
    }

    private mutating func uniqueChunk(_ ci: UInt64) -> Chunk {
        // Take the chunk out so the only references left are ours and any snapshot's.
        guard var c = chunks.removeValue(forKey: ci) else {
            let fresh = Chunk()
            chunks[ci] = fresh
            return fresh
        }
        if !isKnownUniquelyReferenced(&c) { c = Chunk(copying: c) }
        chunks[ci] = c
        return c
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
}
