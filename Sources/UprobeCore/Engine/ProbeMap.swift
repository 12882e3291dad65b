/// The registrations by id, as a copy-on-write map split into chunks of 1024 ids.
///
/// The writer publishes a snapshot after every batch; with one flat dictionary the first
/// change after each publication copied every registration (O(n) per batch: 20,000 probes
/// and thousands of small batches made churn crawl). Here a snapshot shares the chunks, and a
/// change copies only the chunk it touches (at most 1024 entries), once per batch.
public struct ProbeMap: Sendable {
    static let chunkSize: UInt64 = 1024

    /// A chunk's records. Mutated in place only while uniquely referenced (i.e. by the writer,
    /// before the snapshot that shares it exists); once shared it is never mutated again, the
    /// writer copies it first. That is what makes the `@unchecked Sendable` safe.
    final class Chunk: @unchecked Sendable {
        var records: [String: ProbeRecord]
        init(_ records: [String: ProbeRecord] = [:]) { self.records = records }
    }

    private var chunks: [UInt64: Chunk] = [:]
    public private(set) var count = 0

    public init() {}

    static func chunkIndex(_ id: String) -> UInt64 {
        ProbeID.number(id).map { $0 / chunkSize } ?? UInt64.max  // non-numeric ids share one chunk
    }

    public subscript(id: String) -> ProbeRecord? {
        chunks[Self.chunkIndex(id)]?.records[id]
    }

    public var isEmpty: Bool { count == 0 }

    mutating func insert(_ r: ProbeRecord) {
        let ci = Self.chunkIndex(r.id)
        let chunk = uniqueChunk(ci)
        if chunk.records.updateValue(r, forKey: r.id) == nil { count += 1 }
    }

    @discardableResult
    mutating func remove(_ id: String) -> ProbeRecord? {
        let ci = Self.chunkIndex(id)
        guard chunks[ci]?.records[id] != nil else { return nil }
        let chunk = uniqueChunk(ci)
        let r = chunk.records.removeValue(forKey: id)
        if r != nil { count -= 1 }
        if chunk.records.isEmpty { chunks.removeValue(forKey: ci) }
        return r
    }

    private mutating func uniqueChunk(_ ci: UInt64) -> Chunk {
        if let c = chunks[ci] {
            if isKnownUniquelyReferenced(&chunks[ci]!) { return c }
            let copy = Chunk(c.records)
            chunks[ci] = copy
            return copy
        }
        let fresh = Chunk()
        chunks[ci] = fresh
        return fresh
    }

    /// Every registration, in no particular order.
    public var values: [ProbeRecord] {
        var out: [ProbeRecord] = []
        out.reserveCapacity(count)
        for c in chunks.values { out.append(contentsOf: c.records.values) }
        return out
    }

    /// Every registration in id order (registration order), without comparing strings.
    public var sorted: [ProbeRecord] {
        var out: [ProbeRecord] = []
        out.reserveCapacity(count)
        for ci in chunks.keys.sorted() {
            guard let c = chunks[ci] else { continue }
            let keyed = c.records.values.map { (ProbeID.number($0.id) ?? UInt64.max, $0) }
            out.append(contentsOf: keyed.sorted { $0.0 < $1.0 || ($0.0 == $1.0 && $0.1.id < $1.1.id) }.map(\.1))
        }
        return out
    }
}
