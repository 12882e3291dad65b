#if canImport(Glibc)
import Glibc
#endif

/// The function symbols of one parse, stored compactly: every name in one byte buffer, 32
/// bytes per symbol, and two flat indices (by name: an open-addressing table; by address: the
/// symbols in address order).
///
/// A whole binary (swift-frontend: 246,000 function symbols, names of 107 bytes on average)
/// held as one `String` and one `ELFFunctionSymbol` per symbol, plus dictionaries of arrays by
/// name and by address, took about 120 MB and most of a 2 s parse. Here the same is about
/// 40 MB: the names (each NUL-terminated, so `fnmatch` reads them in place), 8 MB of entries
/// and a few MB of indices. `ELFFunctionSymbol` values are made on demand.
public struct ELFSymbolTable: Sendable {
    struct Entry: Sendable, BitwiseCopyable {
        var address: UInt64
        var size: UInt64
        var nameStart: UInt32
        var nameLength: UInt32
        /// Index into `versions`; 0 = no version.
        var version: UInt16
        /// Bits 0-1: table (0 symtab, 1 dynsym, 2 debug file); 2: default version; 3: IFUNC;
        /// 4: alone at its address; 5-7: binding (0 local, 1 global, 2 weak, 3 unique, 4 other).
        var flags: UInt8
    }

    private(set) var entries: [Entry] = []
    /// Every name, each followed by a NUL.
    private(set) var names: [UInt8] = []
    /// Version names; `versions[0]` is the empty placeholder for "none".
    private(set) var versions: [String] = [""]
    private var versionIndex: [String: UInt16] = [:]
    /// Open-addressing table over distinct names: the first symbol with that name, or -1.
    private var nameHeads: [Int32] = []
    /// The next symbol with the same name as symbol i, or -1.
    private var nextSameName: [Int32] = []
    /// Symbol indices sorted by (address, index).
    private(set) var addressOrder: [Int32] = []
    /// Number of distinct names and of distinct addresses.
    private(set) var distinctNames = 0
    private(set) var distinctAddresses = 0

    public init() {}

    public var count: Int { entries.count }
    public var isEmpty: Bool { entries.isEmpty }

    // MARK: building

    /// Adds a symbol; call `index()` once all are added.
    mutating func append(name: UnsafeBufferPointer<UInt8>, version: String?, isDefaultVersion: Bool, address: UInt64,
                         size: UInt64, binding: ELFFunctionSymbol.Binding, isIFunc: Bool, table: ELFFunctionSymbol.Table) {
        let start = UInt32(truncatingIfNeeded: names.count)
        names.append(contentsOf: name)
        names.append(0)
        var v: UInt16 = 0
        if let version {
            if let known = versionIndex[version] {
                v = known
            } else if versions.count < Int(UInt16.max) {
                v = UInt16(versions.count)
                versions.append(version)
                versionIndex[version] = v
            }
        }
        entries.append(Entry(address: address, size: size, nameStart: start, nameLength: UInt32(truncatingIfNeeded: name.count),
                             version: v, flags: Self.flags(table: table, isDefault: isDefaultVersion, isIFunc: isIFunc, binding: binding)))
    }

    /// Appends every symbol of `other` as coming from `table`.
    mutating func append(contentsOf other: ELFSymbolTable, as table: ELFFunctionSymbol.Table) {
        names.reserveCapacity(names.count + other.names.count)
        entries.reserveCapacity(entries.count + other.entries.count)
        other.names.withUnsafeBufferPointer { buf in
            for e in other.entries {
                let name = UnsafeBufferPointer(rebasing: buf[Int(e.nameStart)..<Int(e.nameStart) + Int(e.nameLength)])
                append(name: name, version: e.version == 0 ? nil : other.versions[Int(e.version)],
                       isDefaultVersion: e.flags & 4 != 0, address: e.address, size: e.size,
                       binding: Self.binding(e.flags), isIFunc: e.flags & 8 != 0, table: table)
            }
        }
    }

    /// Builds the indices by name and by address, and gives the buffers back their growth
    /// slack (appending doubled them: 33 MB held for 26 MB of names).
    mutating func index() {
        names = Self.exactCopy(names)
        entries = Self.exactCopy(entries)
        let n = entries.count
        names.withUnsafeBufferPointer { nameBytes in
            var capacity = 16
            while capacity < n * 2 { capacity <<= 1 }
            var heads = [Int32](repeating: -1, count: n == 0 ? 0 : capacity)
            var next = [Int32](repeating: -1, count: n)
            var tails = [Int32](repeating: -1, count: n)  // last symbol of each name's chain, at its head's index
            var distinct = 0
            let mask = capacity - 1
            entries.withUnsafeBufferPointer { es in
                for i in 0..<n {
                    let name = Self.bytes(es[i], nameBytes)
                    var slot = Int(truncatingIfNeeded: Self.hash(name)) & mask
                    while true {
                        let h = heads[slot]
                        if h < 0 {
                            heads[slot] = Int32(i)
                            tails[i] = Int32(i)
                            distinct += 1
                            break
                        }
                        if Self.equal(Self.bytes(es[Int(h)], nameBytes), name) {
                            next[Int(tails[Int(h)])] = Int32(i)
                            tails[Int(h)] = Int32(i)
                            break
                        }
                        slot = (slot + 1) & mask
                    }
                }
            }
            nameHeads = heads
            nextSameName = next
            distinctNames = distinct
        }
        var order = (0..<Int32(n)).map { $0 }
        entries.withUnsafeBufferPointer { es in
            order.sort { a, b in es[Int(a)].address != es[Int(b)].address ? es[Int(a)].address < es[Int(b)].address : a < b }
        }
        var distinctAddrs = 0
        var i = 0
        while i < n {
            var j = i + 1
            while j < n, entries[Int(order[j])].address == entries[Int(order[i])].address { j += 1 }
            distinctAddrs += 1
            for k in i..<j {
                if j - i == 1 { entries[Int(order[k])].flags |= 16 } else { entries[Int(order[k])].flags &= ~16 }
            }
            i = j
        }
        addressOrder = order
        distinctAddresses = distinctAddrs
    }

    // MARK: reading

    /// The symbol at `i` as a value (its name and version as Strings).
    public func symbol(_ i: Int) -> ELFFunctionSymbol {
        let e = entries[i]
        return ELFFunctionSymbol(name: name(i), version: e.version == 0 ? nil : versions[Int(e.version)],
                                 isDefaultVersion: e.flags & 4 != 0, address: e.address, size: e.size,
                                 binding: Self.binding(e.flags), isIFunc: e.flags & 8 != 0, table: Self.table(e.flags))
    }

    public func name(_ i: Int) -> String {
        let e = entries[i]
        return names.withUnsafeBufferPointer { String(decoding: Self.bytes(e, $0), as: UTF8.self) }
    }

    /// The UTF-8 bytes of symbol i's name (as in the file), lent to `body`.
    func withNameBytes<R>(_ i: Int, _ body: (UnsafeBufferPointer<UInt8>) -> R) -> R {
        let e = entries[i]
        return names.withUnsafeBufferPointer { body(Self.bytes(e, $0)) }
    }

    /// The byte length of symbol i's name.
    func nameByteCount(_ i: Int) -> Int { Int(entries[i].nameLength) }

    func address(_ i: Int) -> UInt64 { entries[i].address }
    func size(_ i: Int) -> UInt64 { entries[i].size }
    func isIFunc(_ i: Int) -> Bool { entries[i].flags & 8 != 0 }
    /// Whether no other symbol has the same address.
    func isAloneAtAddress(_ i: Int) -> Bool { entries[i].flags & 16 != 0 }

    /// The symbols named `name` (base name), in table order; empty if none.
    public func indices(named name: String) -> [Int] {
        guard let head = head(named: name) else { return [] }
        var out: [Int] = []
        var i = head
        while i >= 0 {
            out.append(i)
            i = Int(nextSameName[i])
        }
        return out
    }

    /// The first symbol named `name`, and whether it is the only one.
    func first(named name: String) -> (index: Int, only: Bool)? {
        guard let head = head(named: name) else { return nil }
        return (head, nextSameName[head] < 0)
    }

    private func head(named name: String) -> Int? {
        guard !nameHeads.isEmpty else { return nil }
        var name = name
        return name.withUTF8 { want -> Int? in
            names.withUnsafeBufferPointer { nameBytes -> Int? in
                entries.withUnsafeBufferPointer { es -> Int? in
                    let mask = nameHeads.count - 1
                    var slot = Int(truncatingIfNeeded: Self.hash(want)) & mask
                    while true {
                        let h = nameHeads[slot]
                        if h < 0 { return nil }
                        if Self.equal(Self.bytes(es[Int(h)], nameBytes), want) { return Int(h) }
                        slot = (slot + 1) & mask
                    }
                }
            }
        }
    }

    /// The symbols at `address`, in table order; empty if none.
    public func indices(at address: UInt64) -> [Int] {
        var lo = 0, hi = addressOrder.count
        while lo < hi {
            let mid = (lo + hi) / 2
            if entries[Int(addressOrder[mid])].address < address { lo = mid + 1 } else { hi = mid }
        }
        var out: [Int] = []
        while lo < addressOrder.count, entries[Int(addressOrder[lo])].address == address {
            out.append(Int(addressOrder[lo]))
            lo += 1
        }
        return out
    }

    /// Calls `body` with the first symbol of each distinct name and that name as a C string
    /// (in place in the buffer); `body` returns whether to take every symbol of that name,
    /// which are then added to the result.
    func indicesOfNames(where body: (UnsafePointer<CChar>) -> Bool) -> [Int] {
        var out: [Int] = []
        names.withUnsafeBufferPointer { nameBytes in
            guard let base = nameBytes.baseAddress else { return }
            base.withMemoryRebound(to: CChar.self, capacity: nameBytes.count) { chars in
                for h in nameHeads where h >= 0 {
                    guard body(chars + Int(entries[Int(h)].nameStart)) else { continue }
                    var i = Int(h)
                    while i >= 0 {
                        out.append(i)
                        i = Int(nextSameName[i])
                    }
                }
            }
        }
        return out
    }

    /// Every distinct name (error messages' "did you mean").
    public var distinctNameList: [String] { nameHeads.filter { $0 >= 0 }.map { name(Int($0)) } }

    /// Every distinct address, ascending.
    public var distinctAddressList: [UInt64] {
        var out: [UInt64] = []
        out.reserveCapacity(distinctAddresses)
        for i in addressOrder where out.last != entries[Int(i)].address { out.append(entries[Int(i)].address) }
        return out
    }

    /// About how much memory this table holds.
    var estimatedBytes: Int {
        entries.capacity * MemoryLayout<Entry>.stride + names.capacity + nameHeads.count * 4 + nextSameName.count * 4
            + addressOrder.count * 4 + versions.count * 48
    }

    // MARK: helpers

    /// A copy of `a` whose capacity is its count.
    private static func exactCopy<T: BitwiseCopyable>(_ a: [T]) -> [T] {
        guard a.capacity > a.count else { return a }
        return [T](unsafeUninitializedCapacity: a.count) { buf, n in
            a.withUnsafeBufferPointer { src in
                if let to = buf.baseAddress, let from = src.baseAddress { to.initialize(from: from, count: src.count) }
            }
            n = a.count
        }
    }

    private static func bytes(_ e: Entry, _ all: UnsafeBufferPointer<UInt8>) -> UnsafeBufferPointer<UInt8> {
        UnsafeBufferPointer(rebasing: all[Int(e.nameStart)..<Int(e.nameStart) + Int(e.nameLength)])
    }

    private static func equal(_ a: UnsafeBufferPointer<UInt8>, _ b: UnsafeBufferPointer<UInt8>) -> Bool {
        guard a.count == b.count else { return false }
        guard let pa = a.baseAddress, let pb = b.baseAddress else { return true }
        return memcmp(pa, pb, a.count) == 0
    }

    /// FNV-1a: names are hashed once at indexing and once per lookup.
    private static func hash(_ bytes: UnsafeBufferPointer<UInt8>) -> UInt64 {
        var h: UInt64 = 0xcbf2_9ce4_8422_2325
        for b in bytes { h = (h ^ UInt64(b)) &* 0x100_0000_01b3 }
        return h ^ (h >> 29)
    }

    private static func flags(table: ELFFunctionSymbol.Table, isDefault: Bool, isIFunc: Bool,
                              binding: ELFFunctionSymbol.Binding) -> UInt8 {
        let t: UInt8
        switch table {
        case .symtab: t = 0
        case .dynsym: t = 1
        case .debugFile: t = 2
        }
        let b: UInt8
        switch binding {
        case .local: b = 0
        case .global: b = 1
        case .weak: b = 2
        case .unique: b = 3
        case .other: b = 4
        }
        return t | (isDefault ? 4 : 0) | (isIFunc ? 8 : 0) | (b << 5)
    }

    private static func binding(_ flags: UInt8) -> ELFFunctionSymbol.Binding {
        switch flags >> 5 {
        case 0: return .local
        case 1: return .global
        case 2: return .weak
        case 3: return .unique
        default: return .other
        }
    }

    private static func table(_ flags: UInt8) -> ELFFunctionSymbol.Table {
        switch flags & 3 {
        case 0: return .symtab
        case 1: return .dynsym
        default: return .debugFile
        }
    }
}

/// `ELFFile.symbolsByName`: symbol indices by base name.
public struct ELFNameIndex: Sendable {
    let table: ELFSymbolTable
    public subscript(name: String) -> [Int]? {
        let found = table.indices(named: name)
        return found.isEmpty ? nil : found
    }
    /// Distinct names.
    public var count: Int { table.distinctNames }
    public var keys: [String] { table.distinctNameList }
}

/// `ELFFile.symbolsByAddress`: symbol indices by address.
public struct ELFAddressIndex: Sendable {
    let table: ELFSymbolTable
    public subscript(address: UInt64) -> [Int]? {
        let found = table.indices(at: address)
        return found.isEmpty ? nil : found
    }
    /// Distinct addresses.
    public var count: Int { table.distinctAddresses }
    /// Distinct addresses, ascending.
    public var keys: [UInt64] { table.distinctAddressList }
}

/// `ELFFile.uniqueFunctionOffsets`: the file offset of a plain name the fast path may hand out.
public struct ELFUniqueOffsets: Sendable, Sequence {
    let elf: ELFFile
    public subscript(name: String) -> UInt64? { elf.uniqueFunctionOffset(name) }
    /// Every such name with its offset (made on demand: tests and the fuzzer).
    public func makeIterator() -> IndexingIterator<[(key: String, value: UInt64)]> {
        elf.symbols.distinctNameList.compactMap { name in elf.uniqueFunctionOffset(name).map { (name, $0) } }.makeIterator()
    }
}
