import CZlib

/// A `NameBytes` compressed with zlib in blocks of whole names, each block decodable alone.
///
/// Function names of one binary repeat a lot (mangled C++ and Swift names share long
/// prefixes and type names): swift-frontend's 241,000 names take 109 bytes each as
/// `NameBytes` and ~16 compressed in 16 KiB blocks (~150 names) with a 16 KiB preset
/// dictionary. The dictionary is names sampled across the whole buffer, so that a block's
/// first names compress as well as its last ones; blocks stay small so that reading one name
/// decodes 16 KiB (~30 µs), not the whole buffer.
///
/// Measured on those names (zlib level 6, CPU time): 8 KiB blocks with a 32 KiB dictionary
/// were 17.1 B per name and 615 ms to compress; 16 KiB with 16 KiB, 16.3 B and 445 ms (a
/// dictionary is hashed again for every block); decoding all of them takes ~50 ms either way.
///
/// A block decodes to exactly the bytes of its stretch of the `NameBytes`, so a name keeps
/// its offset (`ResolvedProbe` holds offsets). Immutable, hence `@unchecked Sendable`.
final class CompressedNames: @unchecked Sendable {
    /// Where each block starts in the uncompressed bytes, and the total at the end (count + 1).
    private let plainStarts: [UInt32]
    /// Where each block starts in `packed`, and its size at the end (count + 1).
    private let packedStarts: [UInt32]
    /// The blocks' raw deflate streams, one after another.
    private let packed: NameBytes
    /// The preset dictionary every block was compressed with.
    private let dictionary: NameBytes

    /// Uncompressed bytes per block (a block ends at the first name boundary at or after it).
    static let blockBytes = 16 << 10
    /// The dictionary's size (zlib uses at most 32 KiB), or 1/32 of a smaller buffer.
    static let maxDictionaryBytes = 16 << 10

    private init(plainStarts: [UInt32], packedStarts: [UInt32], packed: NameBytes, dictionary: NameBytes) {
        self.plainStarts = plainStarts
        self.packedStarts = packedStarts
        self.packed = packed
        self.dictionary = dictionary
    }

    /// The uncompressed size.
    var plainCount: Int { Int(plainStarts.last ?? 0) }
    /// Bytes held: the blocks, the dictionary and the two offset tables.
    var storedBytes: Int { packed.count + dictionary.count + 4 * (plainStarts.count + packedStarts.count) }
    var blockCount: Int { plainStarts.count - 1 }

    /// The block holding the name at offset `at`, and the stretch of the plain bytes it covers.
    func block(containing at: Int) -> (index: Int, plain: Range<Int>) {
        // The last block start at or below `at`.
        var lo = 0, hi = plainStarts.count - 1
        while hi - lo > 1 {
            let mid = (lo + hi) / 2
            if Int(plainStarts[mid]) <= at { lo = mid } else { hi = mid }
        }
        return (lo, Int(plainStarts[lo])..<Int(plainStarts[lo + 1]))
    }

    /// Compresses `plain` (nil if zlib fails, or if a block does not decode back to its bytes:
    /// then the names stay as they are). `level`: zlib's 1-9.
    static func make(_ plain: NameBytes, level: Int32 = 6) -> CompressedNames? {
        plain.withBytes { bytes -> CompressedNames? in
            guard let base = bytes.baseAddress, bytes.count > 0, bytes.count < Int(UInt32.max) else { return nil }
            let starts = blockStarts(bytes)
            let dictionary = sampleDictionary(bytes, maxBytes: min(maxDictionaryBytes, max(1024, bytes.count / 32)))
            var stream = z_stream()
            guard CZlib_deflateInitRaw(&stream, level) == Z_OK else { return nil }
            defer { deflateEnd(&stream) }
            var out: [UInt8] = []
            out.reserveCapacity(bytes.count / 4)
            var packedStarts: [UInt32] = []
            packedStarts.reserveCapacity(starts.count)
            var scratch = [UInt8](repeating: 0, count: Int(deflateBound(&stream, UInt(blockBytes))))
            for i in 0..<(starts.count - 1) {
                packedStarts.append(UInt32(out.count))
                let from = Int(starts[i]), n = Int(starts[i + 1]) - from
                guard deflateReset(&stream) == Z_OK else { return nil }
                let dictOK = dictionary.withBytes { d in
                    d.isEmpty || deflateSetDictionary(&stream, d.baseAddress, UInt32(d.count)) == Z_OK
                }
                guard dictOK else { return nil }
                let bound = Int(deflateBound(&stream, UInt(n)))
                if scratch.count < bound { scratch = [UInt8](repeating: 0, count: bound) }
                let made = scratch.withUnsafeMutableBufferPointer { s -> Int? in
                    stream.next_in = base + from
                    stream.avail_in = UInt32(n)
                    stream.next_out = s.baseAddress
                    stream.avail_out = UInt32(s.count)
                    guard deflate(&stream, Z_FINISH) == Z_STREAM_END else { return nil }
                    return s.count - Int(stream.avail_out)
                }
                guard let made else { return nil }
                out.append(contentsOf: scratch[0..<made])
            }
            packedStarts.append(UInt32(out.count))
            guard out.count < Int(UInt32.max) else { return nil }
            // Exactly the bytes made: `out` grew by doubling.
            let packed = out.withUnsafeBufferPointer { o in NameBytes.make(count: o.count) { _ = $0.initialize(from: o) } }
            let made = CompressedNames(plainStarts: starts, packedStarts: packedStarts, packed: packed, dictionary: dictionary)
            // Checked once, here and off the readers' way: a reader then never meets a block
            // that does not decode.
            for i in 0..<made.blockCount {
                let from = Int(starts[i]), n = Int(starts[i + 1]) - from
                guard let block = made.decode(block: i),
                      block.withBytes({ $0.elementsEqual(UnsafeBufferPointer(start: base + from, count: n)) }) else { return nil }
            }
            return made
        }
    }

    /// Block `index` as plain bytes (the stretch `block(containing:)` names); nil if zlib
    /// fails (`make` checked every block, so only when memory runs out).
    func decode(block index: Int) -> NameBytes? {
        let from = Int(plainStarts[index]), n = Int(plainStarts[index + 1]) - from
        let packedFrom = Int(packedStarts[index]), packedCount = Int(packedStarts[index + 1]) - packedFrom
        var stream = z_stream()
        guard CZlib_inflateInitRaw(&stream) == Z_OK else { return nil }
        defer { inflateEnd(&stream) }
        let dictOK = dictionary.withBytes { d in d.isEmpty || inflateSetDictionary(&stream, d.baseAddress, UInt32(d.count)) == Z_OK }
        guard dictOK else { return nil }
        var ok = false
        let block = packed.withBytes { p in
            NameBytes.make(count: n) { out in
                stream.next_in = p.baseAddress.map { $0 + packedFrom }
                stream.avail_in = UInt32(packedCount)
                stream.next_out = out.baseAddress
                stream.avail_out = UInt32(n)
                ok = inflate(&stream, Z_FINISH) == Z_STREAM_END && stream.avail_out == 0
                // All `n` bytes are initialized either way (UInt8 needs no initialization to be read).
            }
        }
        return ok ? block : nil
    }

    /// Offsets where blocks of about `blockBytes` start (on name boundaries), then the end.
    private static func blockStarts(_ bytes: UnsafeBufferPointer<UInt8>) -> [UInt32] {
        guard let base = bytes.baseAddress else { return [0] }
        var starts: [UInt32] = [0]
        starts.reserveCapacity(bytes.count / blockBytes + 2)
        var at = 0, blockStart = 0
        while at < bytes.count {
            let (start, n) = storedName(at: at, in: base)
            at = start + n + 1
            if at - blockStart >= blockBytes, at < bytes.count {
                starts.append(UInt32(at))
                blockStart = at
            }
        }
        starts.append(UInt32(bytes.count))
        return starts
    }

    /// Whole names taken evenly across `bytes`, up to `maxBytes`: what a block is most likely
    /// to repeat from elsewhere in the buffer (the names of one binary share their parts).
    private static func sampleDictionary(_ bytes: UnsafeBufferPointer<UInt8>, maxBytes: Int) -> NameBytes {
        guard let base = bytes.baseAddress, bytes.count > 0 else { return NameBytes.make(count: 0) { _ in } }
        // A stride through the buffer that takes about as many names of ~110 bytes as fit.
        let stride = max(1, bytes.count / max(1, maxBytes / 110))
        var picked: [UInt8] = []
        picked.reserveCapacity(maxBytes)
        // Walk the names once, taking the first one past each stride mark.
        var at = 0, mark = 0
        while at < bytes.count {
            let (start, n) = storedName(at: at, in: base)
            let next = start + n + 1
            if at >= mark {
                // One name longer than what is left is skipped, not the rest.
                if picked.count + (next - at) <= maxBytes {
                    picked.append(contentsOf: UnsafeBufferPointer(start: base + at, count: next - at))
                }
                mark = at + stride
            }
            at = next
        }
        return picked.withUnsafeBufferPointer { p in NameBytes.make(count: p.count) { _ = $0.initialize(from: p) } }
    }
}
