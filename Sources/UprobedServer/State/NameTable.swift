import UprobeCore
import UprobedProtocol

/// The function names of a glob group's members (format 5): kept in a names file beside the
/// state (`NameFiles`) instead of in the group's log line or snapshot element, which then
/// carries only offsets. Names are most of a whole-binary glob's entry (26 of 29 MB for
/// swift-frontend's 241,362 functions), and writing them before the reply was most of its
/// state write.
///
/// A names file is binary, written once and never changed:
///
///     "UPNAMES1"                       magic and version
///     u32 n, n bytes of JSON           the file identity ({"path", "device", "inode",
///                                      "size", "mtime_ns", "build_id"}), for messages and checks
///     u32 count, then count entries    u64 offset, u32 length + symbol bytes,
///                                      u32 alias count, each u32 length + bytes
///     u64 checksum                     `NameTable.checksum` of everything before it
///
/// (integers little-endian). Its name is `names-<checksum in hex>.bin`: the same names of the
/// same file make the same bytes, so a glob registered again finds its file already there and
/// writes nothing.
struct NameTable: Sendable, Equatable {
    /// The binary the names belong to, as the group's registrations stamped it.
    var identity: NameIdentity
    var offsets: [UInt64] = []
    var symbols: [String] = []
    /// Aliases by entry index (only entries that have some).
    var aliases: [Int: [String]] = [:]

    static let magic: [UInt8] = Array("UPNAMES1".utf8)

    var count: Int { offsets.count }

    /// The file's bytes (see the type's comment) and the name it is stored under.
    func encode() -> (bytes: [UInt8], name: String) {
        var out: [UInt8] = []
        chunks { out.append(contentsOf: $0) }
        let sum = checksum()
        withUnsafeBytes(of: sum.littleEndian) { out.append(contentsOf: $0) }
        return (out, Self.fileName(sum))
    }

    /// The checksum `encode` ends the file with (and names it by), without making its bytes: a
    /// glob registered again finds its names file by it and writes nothing (making the 28 MB
    /// of a whole binary's names only to hash them cost 30 ms, most of it page faults).
    func checksum() -> UInt64 {
        var c = NameChecksum()
        chunks { c.add($0) }
        return c.value
    }

    /// The file's bytes but its checksum, given to `body` in pieces of up to 1 MiB (one
    /// buffer, reused: no 28 MB array, and no call per name).
    func chunks(_ body: (UnsafeRawBufferPointer) -> Void) {
        let capacity = 1 << 20
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: capacity, alignment: 8)
        defer { buffer.deallocate() }
        var used = 0
        serialize { piece in
            if used + piece.count > capacity {
                body(UnsafeRawBufferPointer(rebasing: buffer[0..<used]))
                used = 0
            }
            guard let from = piece.baseAddress, piece.count > 0 else { return }
            if piece.count > capacity {
                body(piece)
                return
            }
            (buffer.baseAddress! + used).copyMemory(from: from, byteCount: piece.count)
            used += piece.count
        }
        if used > 0 { body(UnsafeRawBufferPointer(rebasing: buffer[0..<used])) }
    }

    /// The file's bytes but its checksum, given to `sink` piece by piece.
    private func serialize(_ sink: (UnsafeRawBufferPointer) -> Void) {
        func put32(_ v: UInt32) { withUnsafeBytes(of: v.littleEndian, sink) }
        func putString(_ s: String) {
            var s = s
            s.withUTF8 { u in
                put32(UInt32(u.count))
                sink(UnsafeRawBufferPointer(u))
            }
        }
        Self.magic.withUnsafeBytes(sink)
        let header = identity.json()
        put32(UInt32(header.count))
        header.withUnsafeBytes(sink)
        put32(UInt32(offsets.count))
        for i in offsets.indices {
            withUnsafeBytes(of: offsets[i].littleEndian, sink)
            putString(symbols[i])
            let a = aliases[i] ?? []
            put32(UInt32(a.count))
            for s in a { putString(s) }
        }
    }

    static func fileName(_ checksum: UInt64) -> String {
        let hex = String(checksum, radix: 16)
        return "names-" + String(repeating: "0", count: 16 - hex.count) + hex + ".bin"
    }

    /// What can be wrong with a names file's bytes.
    struct Damage: Error, Equatable {
        let why: String
    }

    /// A names file read back; any damage (cut short, bit flips, another file) is an error.
    static func decode(_ bytes: [UInt8]) throws(Damage) -> NameTable {
        var r = Reader(bytes: bytes)
        guard bytes.count >= magic.count + 16, Array(bytes[0..<magic.count]) == magic else {
            throw Damage(why: "not a uprobed names file (no \"UPNAMES1\" at its start)")
        }
        let stored = bytes.withUnsafeBytes { UnsafeRawBufferPointer(rebasing: $0[(bytes.count - 8)...]).loadUnaligned(as: UInt64.self) }
        var c = NameChecksum()
        bytes.withUnsafeBytes { c.add(UnsafeRawBufferPointer(rebasing: $0[..<(bytes.count - 8)])) }
        let sum = c.value
        guard UInt64(littleEndian: stored) == sum else { throw Damage(why: "its checksum does not match its contents (damaged or cut short)") }
        r.at = magic.count
        r.end = bytes.count - 8
        guard let hlen = r.u32(), let header = r.bytes(Int(hlen)), let identity = NameIdentity(json: header) else {
            throw Damage(why: "its header is unreadable")
        }
        guard let count = r.u32() else { throw Damage(why: "it has no entry count") }
        var t = NameTable(identity: identity)
        t.offsets.reserveCapacity(Int(count))
        t.symbols.reserveCapacity(Int(count))
        for i in 0..<Int(count) {
            guard let off = r.u64(), let sym = r.string(), let n = r.u32() else { throw Damage(why: "entry \(i) is cut short") }
            t.offsets.append(off)
            t.symbols.append(sym)
            if n > 0 {
                var a: [String] = []
                for _ in 0..<n {
                    guard let s = r.string() else { throw Damage(why: "entry \(i)'s aliases are cut short") }
                    a.append(s)
                }
                t.aliases[i] = a
            }
        }
        guard r.at == r.end else { throw Damage(why: "it has bytes after its last entry") }
        return t
    }

    /// Bounds-checked reads of a names file.
    private struct Reader {
        let bytes: [UInt8]
        var at = 0
        var end = 0
        mutating func bytes(_ n: Int) -> ArraySlice<UInt8>? {
            guard n >= 0, at + n <= end else { return nil }
            defer { at += n }
            return bytes[at..<(at + n)]
        }
        mutating func u32() -> UInt32? {
            guard at + 4 <= end else { return nil }
            defer { at += 4 }
            return bytes.withUnsafeBytes { UInt32(littleEndian: $0.loadUnaligned(fromByteOffset: at, as: UInt32.self)) }
        }
        mutating func u64() -> UInt64? {
            guard at + 8 <= end else { return nil }
            defer { at += 8 }
            return bytes.withUnsafeBytes { UInt64(littleEndian: $0.loadUnaligned(fromByteOffset: at, as: UInt64.self)) }
        }
        mutating func string() -> String? {
            guard let n = u32(), let b = bytes(Int(n)) else { return nil }
            return String(decoding: b, as: UTF8.self)
        }
    }
}

/// A 64-bit checksum of a byte stream, the same on every run and host (Swift's `Hasher` is
/// seeded per process), and the same however the stream is cut into pieces. Words at a time,
/// mixed like xxHash's rounds: ~10 ms for 28 MB. Not cryptographic: it names a names file and
/// catches damage; the entries are checked against the registrations that use them anyway.
struct NameChecksum {
    private static let p1: UInt64 = 0x9E37_79B1_85EB_CA87, p2: UInt64 = 0xC2B2_AE3D_27D4_EB4F
    private var h: UInt64 = 0x27D4_EB2F_1656_67C5
    /// Bytes of the next word not yet complete (low bytes first), and how many.
    private var carry: UInt64 = 0
    private var carried = 0
    private var total: UInt64 = 0

    private mutating func round(_ w: UInt64) {
        h ^= (w &* Self.p2).rotated(31) &* Self.p1
        h = h.rotated(27) &* Self.p1 &+ 0x85EB_CA77_C2B2_AE63
    }

    mutating func add(_ bytes: UnsafeRawBufferPointer) {
        total &+= UInt64(bytes.count)
        var i = 0
        while carried != 0, i < bytes.count {
            carry |= UInt64(bytes[i]) << UInt64(8 * carried)
            carried += 1
            i += 1
            if carried == 8 {
                round(carry)
                carry = 0
                carried = 0
            }
        }
        while i + 8 <= bytes.count {
            round(UInt64(littleEndian: bytes.loadUnaligned(fromByteOffset: i, as: UInt64.self)))
            i += 8
        }
        while i < bytes.count {
            carry |= UInt64(bytes[i]) << UInt64(8 * carried)
            carried += 1
            i += 1
        }
    }

    var value: UInt64 {
        var h = self.h
        if carried > 0 { h ^= (carry &* 0x1656_67B1_9E37_79F9).rotated(11) &* Self.p1 }
        h ^= total
        h ^= h >> 33; h = h &* Self.p2; h ^= h >> 29; h = h &* 0x1656_67B1_9E37_79F9; h ^= h >> 32
        return h
    }
}

extension UInt64 {
    fileprivate func rotated(_ k: UInt64) -> UInt64 { (self << k) | (self >> (64 - k)) }
}

/// The binary a names file belongs to: what a restore checks before it takes names from the
/// binary itself (`NameFiles.fill`). The registrations' own stamp and build-id, so a file
/// that is not exactly the one they were registered on is never read for names.
struct NameIdentity: Sendable, Hashable {
    var path: String
    var device: UInt64
    var inode: UInt64
    var size: Int64
    var mtimeNanos: Int64
    var buildID: String?

    init(path: String, device: UInt64, inode: UInt64, size: Int64, mtimeNanos: Int64, buildID: String?) {
        (self.path, self.device, self.inode, self.size, self.mtimeNanos, self.buildID) = (path, device, inode, size, mtimeNanos, buildID)
    }

    /// The identity of a group's members: its first registration's target and stamp.
    init?(_ p: SavedProbe) {
        guard let t = p.targets.first, let s = p.stamp, s.device == t.device, s.inode == t.inode else { return nil }
        self.init(path: t.path, device: t.device, inode: t.inode, size: s.size, mtimeNanos: s.mtimeNanos, buildID: t.buildID)
    }

    func json() -> [UInt8] {
        var o = JSONObject()
        o["path"] = .string(path)
        o["device"] = StateCodec.u64(device)
        o["inode"] = StateCodec.u64(inode)
        o["size"] = .int(size)
        o["mtime_ns"] = .int(mtimeNanos)
        if let buildID { o["build_id"] = .string(buildID) }
        return Array(JSONSerializer.serialize(.object(o)).utf8)
    }

    init?(json bytes: ArraySlice<UInt8>) {
        guard let v = try? JSONParser.parse(Array(bytes)), let o = v.objectValue, let path = o["path"]?.stringValue,
              let d = StateCodec.readU64(o["device"]), let i = StateCodec.readU64(o["inode"]),
              let sz = o["size"]?.int64Value, let mt = o["mtime_ns"]?.int64Value else { return nil }
        self.init(path: path, device: d, inode: i, size: sz, mtimeNanos: mt, buildID: o["build_id"]?.stringValue)
    }

    /// Whether the file at `path` is still this one (device, inode, size, mtime); the caller
    /// checks the build-id of what it then reads.
    var matchesFileNow: Bool {
        guard let now = fileStamp(path) else { return false }
        return now.device == device && now.inode == inode && now.size == size && now.mtimeNanos == mtimeNanos
    }
}
