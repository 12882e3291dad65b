import SystemPackage
import UprobeSystem
#if canImport(Glibc)
import Glibc
#endif

/// A program header (`Elf64_Phdr`).
public struct ELFProgramHeader: Sendable, Equatable {
    /// `p_type` (`PT_LOAD` = 1, `PT_NOTE` = 4, ...).
    public var type: UInt32
    /// `p_flags` (`PF_X` = 1, `PF_W` = 2, `PF_R` = 4).
    public var flags: UInt32
    /// `p_offset`: where the segment starts in the file.
    public var offset: UInt64
    /// `p_vaddr`: where it is linked to be loaded.
    public var vaddr: UInt64
    /// `p_filesz`: bytes backed by the file.
    public var fileSize: UInt64
    /// `p_memsz`: bytes in memory (>= fileSize; the tail is zero-filled, e.g. .bss).
    public var memSize: UInt64

    public static let load: UInt32 = 1
    public static let note: UInt32 = 4
    public static let flagExecute: UInt32 = 1

    /// A loadable segment.
    public var isLoad: Bool { type == Self.load }
    /// Mapped executable (`PF_X`): the only place a uprobe may go.
    public var isExecutable: Bool { flags & Self.flagExecute != 0 }

    /// Whether `vaddr` lies in the file-backed part of this segment.
    public func containsFileBacked(vaddr a: UInt64) -> Bool {
        guard a >= vaddr, let end = checkedAdd(vaddr, fileSize) else { return false }
        return a < end
    }

    /// Whether the segment's file range ends within a file of `fileSize` bytes.
    public func liesWithin(fileSize: UInt64) -> Bool {
        guard let end = checkedAdd(offset, self.fileSize) else { return false }
        return end <= fileSize
    }

    /// Whether file offset `off` lies in this segment's file range.
    public func contains(fileOffset off: UInt64) -> Bool {
        guard off >= offset, let end = checkedAdd(offset, fileSize) else { return false }
        return off < end
    }
}

/// A section header (`Elf64_Shdr`) with its resolved name.
/// Fields mirror `sh_name` (resolved through `.shstrtab`), `sh_type`, `sh_flags`, `sh_addr`,
/// `sh_offset`, `sh_size`, `sh_link`, `sh_info`, `sh_entsize`.
public struct ELFSection: Sendable, Equatable {
    public var name: String
    public var type: UInt32
    public var flags: UInt64
    public var addr: UInt64
    public var offset: UInt64
    public var size: UInt64
    public var link: UInt32
    public var info: UInt32
    public var entSize: UInt64

    static let symtab: UInt32 = 2
    static let strtab: UInt32 = 3
    static let note: UInt32 = 7
    static let nobits: UInt32 = 8
    static let dynsym: UInt32 = 11
    static let gnuVerdef: UInt32 = 0x6fff_fffd
    static let gnuVerneed: UInt32 = 0x6fff_fffe
    static let gnuVersym: UInt32 = 0x6fff_ffff
}

/// A defined function symbol (`STT_FUNC` or `STT_GNU_IFUNC`) from `.symtab` or `.dynsym`.
public struct ELFFunctionSymbol: Sendable, Equatable, Hashable {
    public enum Binding: UInt8, Sendable { case local = 0, global = 1, weak = 2, unique = 10, other = 255 }
    /// Where the symbol came from; `debugFile` = the `.symtab` of a separate debug file.
    public enum Table: Sendable { case symtab, dynsym, debugFile }

    /// Base name, without any `@VERSION` suffix.
    public var name: String
    /// Symbol version (`GLIBC_2.2.5`), if any.
    public var version: String?
    /// True for the default version (`name@@VER`); false for `name@VER` (hidden/old).
    public var isDefaultVersion: Bool
    /// Virtual address (`st_value`).
    public var address: UInt64
    public var size: UInt64
    public var binding: Binding
    /// `STT_GNU_IFUNC`: the address is the resolver's.
    public var isIFunc: Bool
    public var table: Table

    /// `name`, `name@VER` or `name@@VER`.
    public var versionedName: String {
        guard let version else { return name }
        return name + (isDefaultVersion ? "@@" : "@") + version
    }
}

/// One `.note.stapsdt` entry (a USDT probe site).
public struct USDTNote: Sendable, Equatable {
    public var provider: String
    public var name: String
    public var arguments: String
    /// Probe PC as a virtual address, already adjusted by `.stapsdt.base`.
    public var pc: UInt64
    /// Semaphore virtual address (0 = none).
    public var semaphore: UInt64
}

/// A hand-written, bounds-checked parser for ELF64 little-endian x86-64 files.
///
/// Only the pieces needed to place uprobes are decoded: program headers, section headers,
/// function symbols (with GNU symbol versions), notes (build-id, stapsdt, Go). Every offset and
/// size taken from the file is validated; malformed input yields `malformed_elf`, never a trap.
/// The file is read with `pread`, a section at a time, never mapped (a concurrent truncation
/// can therefore not raise SIGBUS inside the daemon).
public struct ELFFile: Sendable {
    /// `ET_EXEC` (2) or `ET_DYN` (3).
    public let elfType: UInt16
    public let fileSize: UInt64
    public let programHeaders: [ELFProgramHeader]
    public let sections: [ELFSection]
    /// Defined function symbols from `.symtab`, then `.dynsym`, then an attached debug file,
    /// stored compactly (`ELFSymbolTable`).
    public private(set) var symbols = ELFSymbolTable()
    /// The symbols as values (made on demand: the table keeps no `String` per symbol).
    public var functionSymbols: [ELFFunctionSymbol] { (0..<symbols.count).map { symbols.symbol($0) } }
    /// Indices into `functionSymbols` by base name.
    public var symbolsByName: ELFNameIndex { ELFNameIndex(table: symbols) }
    /// Indices into `functionSymbols` by address.
    public var symbolsByAddress: ELFAddressIndex { ELFAddressIndex(table: symbols) }
    /// File offsets of the plain names the common case asks for: a name defined once, alone at
    /// its address, not an IFUNC, in an executable segment, and probeable. One lookup instead
    /// of the four (name, symbol, address, segment) of the general path.
    public var uniqueFunctionOffsets: ELFUniqueOffsets { ELFUniqueOffsets(elf: self) }
    /// The function starts (file offsets) whose first instruction x86 uprobes cannot probe, and
    /// why (`ProbeableInstruction`); filled by `checkInstructions`. Such names are left out of
    /// `uniqueFunctionOffsets`, so the resolver's general path refuses or skips them.
    public private(set) var unprobeableSites: [UInt64: InstructionRefusal] = [:]
    /// Path of the separate debug file whose symbols were attached, if any.
    public private(set) var debugFilePath: String?
    /// About how much memory this parse holds (symbols, their names and the three indices), so
    /// a cache can be bounded by bytes: a count bound let 30 parses of a 300,000-symbol binary
    /// hold 2.4 GB. An estimate from element sizes, not a measurement of the allocator.
    public private(set) var estimatedBytes = 0
    public let hasSymtab: Bool
    public let hasDynsym: Bool
    /// Lowercase hex of the `NT_GNU_BUILD_ID` note, if present.
    public let buildID: String?
    /// True for Go binaries (`.go.buildinfo` section or a Go build-id note).
    public let isGoBinary: Bool
    /// USDT probe sites from `.note.stapsdt`.
    public let usdtNotes: [USDTNote]

    /// Largest single section/table we are willing to read (protects memory from hostile sizes).
    static let maxRead: UInt64 = 1 << 30

    /// Parses the ELF file open on `fd`. `path` is only used in messages.
    /// - Parameter checkingInstructions: also check the first instruction of every function
    ///   (`checkInstructions`). False for a separate debug file, whose code is not in it, and for
    ///   a caller that attaches debug symbols first and checks afterwards.
    public init(fd: FileDescriptor, path: String, checkingInstructions: Bool = true) throws(ResolveError) {
        var st = stat()
        guard fstat(fd.rawValue, &st) == 0 else {
            throw .fileNotFound("cannot \(Syscall.lastError("fstat", path))")
        }
        guard (st.st_mode & S_IFMT) == S_IFREG else {
            throw .notELF("\(path) is not a regular file")
        }
        let size = UInt64(max(0, st.st_size))
        fileSize = size
        let io = FileIO(fd: fd, size: size, path: path)

        // --- ELF header -----------------------------------------------------------------
        guard size >= 64 else {
            let head = try io.read(0, size)
            if head.count >= 4, head[0] == 0x7f, head[1] == 0x45, head[2] == 0x4c, head[3] == 0x46 {
                throw .malformed("\(path) is truncated: \(size) bytes, shorter than an ELF header")
            }
            throw .notELF("\(path) is not an ELF file (too short, no ELF magic)")
        }
        let eh = ByteReader(bytes: try io.read(0, 64), what: "\(path) ELF header")
        guard try eh.u8(0) == 0x7f, try eh.u8(1) == 0x45, try eh.u8(2) == 0x4c, try eh.u8(3) == 0x46 else {
            throw .notELF("\(path) is not an ELF file (no \\x7fELF magic); give the path of a binary or shared library")
        }
        guard try eh.u8(4) == 2 else { throw .unsupported("\(path) is a 32-bit ELF; only ELF64 x86-64 is supported") }
        guard try eh.u8(5) == 1 else { throw .unsupported("\(path) is big-endian; only little-endian x86-64 is supported") }
        let type = try eh.u16(16)
        let machine = try eh.u16(18)
        guard machine == 62 else { throw .unsupported("\(path) is for machine \(machine), not x86-64 (62)") }
        guard type == 2 || type == 3 else {
            throw .unsupported("\(path) has ELF type \(type); only executables (ET_EXEC) and shared objects/PIE (ET_DYN) can be probed")
        }
        elfType = type
        let phoff = try eh.u64(32), shoff = try eh.u64(40)
        let phentsize = try eh.u16(54), phnum = try eh.u16(56)
        let shentsize = try eh.u16(58)
        var shnum = UInt64(try eh.u16(60))
        var shstrndx = UInt64(try eh.u16(62))

        // --- program headers --------------------------------------------------------------
        var phdrs: [ELFProgramHeader] = []
        if phnum > 0 {
            guard phentsize >= 56 else { throw .malformed("\(path): e_phentsize \(phentsize) < 56") }
            let ph = ByteReader(bytes: try io.read(phoff, UInt64(phnum) * UInt64(phentsize)), what: "\(path) program headers")
            for i in 0..<Int(phnum) {
                let b = i * Int(phentsize)
                phdrs.append(ELFProgramHeader(type: try ph.u32(b), flags: try ph.u32(b + 4), offset: try ph.u64(b + 8),
                                              vaddr: try ph.u64(b + 16), fileSize: try ph.u64(b + 32),
                                              memSize: try ph.u64(b + 40)))
            }
        }
        programHeaders = phdrs

        // --- section headers -------------------------------------------------------------
        var secs: [ELFSection] = []
        if shoff != 0 {
            guard shentsize >= 64 else { throw .malformed("\(path): e_shentsize \(shentsize) < 64") }
            // Extended numbering: e_shnum == 0 / e_shstrndx == SHN_XINDEX live in section 0.
            if shnum == 0 || shstrndx == 0xffff {
                let s0 = ByteReader(bytes: try io.read(shoff, 64), what: "\(path) section header 0")
                if shnum == 0 { shnum = try s0.u64(32) }
                if shstrndx == 0xffff { shstrndx = UInt64(try s0.u32(40)) }
            }
            guard shnum <= 1 << 20 else { throw .malformed("\(path): implausible section count \(shnum)") }
            let sh = ByteReader(bytes: try io.read(shoff, shnum * UInt64(shentsize)), what: "\(path) section headers")
            var raw: [(UInt32, ELFSection)] = []
            for i in 0..<Int(shnum) {
                let b = i * Int(shentsize)
                raw.append((try sh.u32(b), ELFSection(name: "", type: try sh.u32(b + 4), flags: try sh.u64(b + 8),
                                                       addr: try sh.u64(b + 16), offset: try sh.u64(b + 24),
                                                       size: try sh.u64(b + 32), link: try sh.u32(b + 40),
                                                       info: try sh.u32(b + 44), entSize: try sh.u64(b + 56))))
            }
            var names: ByteReader?
            if shstrndx != 0, shstrndx < shnum {
                let s = raw[Int(shstrndx)].1
                if s.type != ELFSection.nobits {
                    names = ByteReader(bytes: try io.read(s.offset, s.size), what: "\(path) .shstrtab")
                }
            }
            for (nameOff, var s) in raw {
                if let names { s.name = (try? names.cString(Int(nameOff))) ?? "" }
                secs.append(s)
            }
        }
        sections = secs

        // --- symbols -----------------------------------------------------------------------
        var syms = ELFSymbolTable()
        var sawSymtab = false, sawDynsym = false
        // Only the first table of each kind: the gABI allows one, and a crafted file with many
        // section headers over the same bytes would otherwise multiply the symbols it yields
        // (a 59 KB file made 420,000 of them).
        if let idx = secs.firstIndex(where: { $0.type == ELFSection.symtab }) {
            sawSymtab = true
            try Self.readSymbols(io: io, sections: secs, index: idx, table: .symtab, path: path, into: &syms)
        }
        if let idx = secs.firstIndex(where: { $0.type == ELFSection.dynsym }) {
            sawDynsym = true
            try Self.readSymbols(io: io, sections: secs, index: idx, table: .dynsym, path: path, into: &syms)
        }
        symbols = syms
        hasSymtab = sawSymtab
        hasDynsym = sawDynsym

        // --- notes -------------------------------------------------------------------------
        var notes: [RawNote] = []
        var noteSections = secs.filter { $0.type == ELFSection.note }
        if noteSections.isEmpty {
            // Section headers stripped: fall back to PT_NOTE segments (build-id still lives there).
            noteSections = phdrs.filter { $0.type == ELFProgramHeader.note }.map {
                ELFSection(name: "", type: ELFSection.note, flags: 0, addr: $0.vaddr, offset: $0.offset,
                           size: $0.fileSize, link: 0, info: 0, entSize: 0)
            }
        }
        // Each region once, and no more note bytes than the file has: many headers naming the
        // same bytes must not multiply the work.
        var readRegions = Set<[UInt64]>()
        var noteBytes: UInt64 = 0
        for s in noteSections where readRegions.insert([s.offset, s.size]).inserted {
            noteBytes &+= s.size
            guard noteBytes <= size else { throw .malformed("\(path): its note sections add up to more than the file") }
            notes += try Self.parseNotes(ByteReader(bytes: try io.read(s.offset, s.size), what: "\(path) note \(s.name)"))
        }
        var bid: String?
        var go = secs.contains { $0.name == ".go.buildinfo" || $0.name == ".note.go.buildid" }
        var usdt: [USDTNote] = []
        let stapsdtBase = secs.first { $0.name == ".stapsdt.base" }?.addr
        for n in notes {
            if n.owner == "GNU", n.type == 3, bid == nil, !n.desc.isEmpty {
                bid = n.desc.map { b in
                    let h = String(b, radix: 16)
                    return h.count == 1 ? "0" + h : h
                }.joined()
            } else if n.owner == "Go", n.type == 4 {
                go = true
            } else if n.owner == "stapsdt", n.type == 3 {
                usdt.append(try Self.parseStapsdt(n.desc, base: stapsdtBase, path: path))
            }
        }
        buildID = bid
        isGoBinary = go
        usdtNotes = usdt
        rebuildIndex()
        if checkingInstructions { try checkInstructions(io: io) }
    }

    /// Checks the first instruction at every function start in an executable segment
    /// (`ProbeableInstruction`) and records the ones x86 uprobes cannot probe in
    /// `unprobeableSites`. Call it again after `attachDebugSymbols`: the debug file's names can
    /// add function starts. Reads the code in large windows: about 2 ms for libc's 3,000 starts.
    public mutating func checkInstructions(fd: FileDescriptor, path: String) throws(ResolveError) {
        try checkInstructions(io: FileIO(fd: fd, size: fileSize, path: path))
    }

    private mutating func checkInstructions(io: FileIO) throws(ResolveError) {
        var offsets: [UInt64] = []
        offsets.reserveCapacity(symbols.distinctAddresses)
        for address in symbols.distinctAddressList {
            if let off = fileOffset(ofVirtualAddress: address, executable: true) { offsets.append(off) }
        }
        let before = unprobeableSites.count
        // `uniqueFunctionOffsets` consults this too: the fast path never hands out a refused site.
        unprobeableSites = try ProbeableInstruction.refusals(at: offsets, io: io)
        estimatedBytes += (unprobeableSites.count - before) * Self.refusalBytes
    }

    /// Adds the function symbols of `debug` (a separate debug file for this binary, e.g.
    /// `/usr/lib/debug/.build-id/xx/yyy.debug`) so stripped distribution binaries can be probed
    /// by internal names. Refused (returns false) when the build-ids differ.
    @discardableResult
    public mutating func attachDebugSymbols(_ debug: ELFFile, path: String) -> Bool {
        guard let bid = buildID, debug.buildID == bid else { return false }
        symbols.append(contentsOf: debug.symbols, as: .debugFile)
        debugFilePath = path
        rebuildIndex()
        return true
    }

    private mutating func rebuildIndex() {
        symbols.index()
        estimatedBytes = symbols.estimatedBytes + unprobeableSites.count * Self.refusalBytes
    }

    /// About what one `unprobeableSites` entry holds: its key, the refusal, its byte array and
    /// its reason text (about 150 bytes), and the dictionary's free buckets.
    static let refusalBytes = 8 + MemoryLayout<InstructionRefusal>.stride + 32 + 16 + 32 + 160

    /// `uniqueFunctionOffsets[name]`.
    func uniqueFunctionOffset(_ name: String) -> UInt64? {
        guard let (i, only) = symbols.first(named: name), only, !symbols.isIFunc(i), symbols.isAloneAtAddress(i),
              let off = fileOffset(ofVirtualAddress: symbols.address(i), executable: true), unprobeableSites[off] == nil
        else { return nil }
        return off
    }

    /// Symbols named `name` (base name, any version).
    public func symbols(named name: String) -> [ELFFunctionSymbol] {
        symbols.indices(named: name).map { symbols.symbol($0) }
    }

    /// Symbols whose address is `address`.
    public func symbols(at address: UInt64) -> [ELFFunctionSymbol] {
        symbols.indices(at: address).map { symbols.symbol($0) }
    }

    /// Opens `path` read-only and parses it.
    public init(path: String, checkingInstructions: Bool = true) throws(ResolveError) {
        let fd = try openReadOnly(path)
        defer { try? fd.close() }
        try self.init(fd: fd, path: path, checkingInstructions: checkingInstructions)
    }

    // MARK: address translation

    /// File offset of `vaddr` through the PT_LOAD segment containing it.
    /// - Parameter executable: require that segment to be `PF_X` (code) — true for probe sites,
    ///   false for data such as USDT semaphores.
    public func fileOffset(ofVirtualAddress vaddr: UInt64, executable: Bool) -> UInt64? {
        // Only segments that lie inside the file: a crafted header can place one so that the
        // sum overflows, or past the end of the file (an offset there names nothing).
        for p in programHeaders where p.isLoad && (!executable || p.isExecutable) && p.containsFileBacked(vaddr: vaddr)
            && p.liesWithin(fileSize: fileSize) {
            return checkedAdd(vaddr - p.vaddr, p.offset)
        }
        return nil
    }

    /// Virtual address of file offset `off` if it lies in an executable PT_LOAD segment.
    public func virtualAddress(ofExecutableFileOffset off: UInt64) -> UInt64? {
        for p in programHeaders where p.isLoad && p.isExecutable && p.contains(fileOffset: off) && p.liesWithin(fileSize: fileSize) {
            return checkedAdd(off - p.offset, p.vaddr)
        }
        return nil
    }

    // MARK: parsing helpers

    private static func readSymbols(io: FileIO, sections: [ELFSection], index: Int, table: ELFFunctionSymbol.Table,
                                    path: String, into out: inout ELFSymbolTable) throws(ResolveError) {
        let s = sections[index]
        let tname = table == .symtab ? ".symtab" : ".dynsym"
        guard s.type != ELFSection.nobits, s.size > 0 else { return }
        guard Int(s.link) < sections.count, s.link != 0 else {
            throw .malformed("\(path): \(tname) links to missing string table \(s.link)")
        }
        let strSec = sections[Int(s.link)]
        let data = ByteReader(bytes: try io.read(s.offset, s.size), what: "\(path) \(tname)")
        let strs = ByteReader(bytes: try io.read(strSec.offset, strSec.size), what: "\(path) \(tname) strings")
        let count = data.count / 24

        // GNU versions apply to .dynsym only: .gnu.version (one u16 per symbol) + .gnu.version_d.
        var versym: ByteReader?
        var verNames: [UInt16: String] = [:]
        if table == .dynsym {
            if let vs = sections.first(where: { $0.type == ELFSection.gnuVersym && $0.link == UInt32(index) })
                ?? sections.first(where: { $0.type == ELFSection.gnuVersym }) {
                versym = ByteReader(bytes: try io.read(vs.offset, vs.size), what: "\(path) .gnu.version")
            }
            for vd in sections where vd.type == ELFSection.gnuVerdef {
                verNames.merge(try readVerdef(io: io, sections: sections, sec: vd, path: path)) { a, _ in a }
            }
        }

        let bytes = strs.bytes
        for i in 0..<count {
            let b = i * 24
            let info = try data.u8(b + 4)
            let stype = info & 0xf
            guard stype == 2 || stype == 10 else { continue }           // STT_FUNC, STT_GNU_IFUNC
            let shndx = try data.u16(b + 6)
            guard shndx != 0 else { continue }                           // undefined: an import
            let value = try data.u64(b + 8)
            guard value != 0 else { continue }
            // The name's bytes in place (no String per symbol); the same checks as `cString`.
            let start = Int(try data.u32(b))
            guard start < bytes.count else {
                throw .malformed("\(strs.what): string offset \(start) is outside its \(bytes.count) bytes")
            }
            guard let end = bytes[start...].firstIndex(of: 0) else {
                throw .malformed("\(strs.what): unterminated string at \(start)")
            }
            guard end > start, bytes[start] != UInt8(ascii: "@") else { continue }  // no base name: nothing to ask for
            var nameEnd = end
            var version: String?
            var isDefault = false
            if let at = bytes[start..<end].firstIndex(of: UInt8(ascii: "@")) {
                // .symtab spells versions into the name ("foo@VER_1", "foo@@VER_2").
                isDefault = at + 1 < end && bytes[at + 1] == UInt8(ascii: "@")
                let v = String(decoding: bytes[(isDefault ? at + 2 : at + 1)..<end], as: UTF8.self)
                version = v.isEmpty ? nil : v
                nameEnd = at
            } else if let versym, let vidx = try? versym.u16(i * 2) {
                let idx = vidx & 0x7fff
                if idx >= 2, let v = verNames[idx] {
                    version = v
                    isDefault = vidx & 0x8000 == 0
                }
            }
            let size = try data.u64(b + 16)
            let binding = ELFFunctionSymbol.Binding(rawValue: info >> 4) ?? .other
            let raw = bytes[start..<nameEnd]
            if raw.allSatisfy({ $0 < 0x80 }) {
                raw.withUnsafeBufferPointer {
                    out.append(name: $0, version: version, isDefaultVersion: isDefault, address: value, size: size,
                               binding: binding, isIFunc: stype == 10, table: table)
                }
            } else {
                // Invalid UTF-8 is repaired, as `cString` does: names are looked up as Strings.
                var repaired = String(decoding: raw, as: UTF8.self)
                repaired.withUTF8 {
                    out.append(name: $0, version: version, isDefaultVersion: isDefault, address: value, size: size,
                               binding: binding, isIFunc: stype == 10, table: table)
                }
            }
        }
    }

    /// Version index -> name, from `.gnu.version_d` (skips the file's own base version).
    private static func readVerdef(io: FileIO, sections: [ELFSection], sec: ELFSection,
                                   path: String) throws(ResolveError) -> [UInt16: String] {
        guard Int(sec.link) < sections.count else { throw .malformed("\(path): .gnu.version_d has bad sh_link") }
        let strSec = sections[Int(sec.link)]
        let d = ByteReader(bytes: try io.read(sec.offset, sec.size), what: "\(path) .gnu.version_d")
        let strs = ByteReader(bytes: try io.read(strSec.offset, strSec.size), what: "\(path) .gnu.version_d strings")
        var out: [UInt16: String] = [:]
        var off = 0
        // sh_info holds the entry count; also cap by size so a loop in vd_next cannot spin.
        for _ in 0..<min(Int(sec.info), d.count / 20 + 1) {
            let flags = try d.u16(off + 2), ndx = try d.u16(off + 4), aux = try d.u32(off + 12)
            let next = try d.u32(off + 16)
            if flags & 1 == 0 {                                          // not VER_FLG_BASE
                let name = try strs.cString(Int(try d.u32(off + Int(aux))))
                out[ndx & 0x7fff] = name
            }
            guard next != 0 else { break }
            off += Int(next)
        }
        return out
    }

    struct RawNote { var owner: String; var type: UInt32; var desc: [UInt8] }

    private static func parseNotes(_ r: ByteReader) throws(ResolveError) -> [RawNote] {
        var out: [RawNote] = []
        var off = 0
        func align4(_ v: Int) -> Int { (v + 3) & ~3 }
        while off + 12 <= r.count {
            let namesz = Int(try r.u32(off)), descsz = Int(try r.u32(off + 4)), type = try r.u32(off + 8)
            let nameOff = off + 12
            guard namesz <= r.count, descsz <= r.count else { throw .malformed("\(r.what): note sizes out of range") }
            let descOff = nameOff + align4(namesz)
            let nameBytes = try r.slice(nameOff, namesz)
            let owner = String(decoding: nameBytes.prefix { $0 != 0 }, as: UTF8.self)
            let desc = Array(try r.slice(descOff, descsz))
            out.append(RawNote(owner: owner, type: type, desc: desc))
            off = descOff + align4(descsz)
        }
        return out
    }

    private static func parseStapsdt(_ desc: [UInt8], base: UInt64?, path: String) throws(ResolveError) -> USDTNote {
        let r = ByteReader(bytes: desc, what: "\(path) stapsdt note")
        var pc = try r.u64(0)
        let noteBase = try r.u64(8), sema = try r.u64(16)
        let provider = try r.cStringAndEnd(24)
        let name = try r.cStringAndEnd(provider.end + 1)
        let args = (try? r.cString(name.end + 1)) ?? ""
        // The note records the link-time address of .stapsdt.base; if the file was later
        // relocated (prelink), shift the pc by the same amount. Semaphores are not adjusted.
        if let base, noteBase != 0 { pc = pc &+ (base &- noteBase) }
        return USDTNote(provider: provider.string, name: name.string, arguments: args, pc: pc, semaphore: sema)
    }
}

/// pread-based reader with size validation.
struct FileIO {
    let fd: FileDescriptor
    let size: UInt64
    let path: String

    func read(_ offset: UInt64, _ length: UInt64) throws(ResolveError) -> [UInt8] {
        guard length <= ELFFile.maxRead else { throw .malformed("\(path): region of \(length) bytes is implausibly large") }
        guard let end = checkedAdd(offset, length), end <= size else {
            throw .malformed("\(path) is truncated or corrupt: bytes \(offset)..<\(offset &+ length) lie beyond its size \(size)")
        }
        let n = Int(length)
        if n == 0 { return [] }
        var buf = [UInt8](repeating: 0, count: n)
        var done = 0
        var failure: Errno?
        buf.withUnsafeMutableBytes { raw in
            while done < n {
                do {
                    let got = try fd.read(fromAbsoluteOffset: Int64(offset) + Int64(done),
                                          into: UnsafeMutableRawBufferPointer(rebasing: raw[done...]),
                                          retryOnInterrupt: true)
                    if got == 0 { break }
                    done += got
                } catch {
                    failure = error as? Errno ?? .ioError
                    break
                }
            }
        }
        if let failure { throw .malformed("\(path): read failed: \(failure)") }
        guard done == n else { throw .malformed("\(path) shrank while being read") }
        return buf
    }
}

/// Opens `path` for reading without ever blocking, and only if it is a regular file.
///
/// open(2) of a FIFO waits for a writer, and of some device nodes for the device: a peer that
/// names one would hold a daemon thread for as long as it likes. O_NONBLOCK makes such an open
/// return at once (it changes nothing for a regular file's reads), O_NOCTTY keeps a terminal
/// from becoming ours, and the fstat(2) refuses anything but a regular file before one byte is
/// read. Errno is mapped to resolver codes.
func openReadOnly(_ path: String) throws(ResolveError) -> FileDescriptor {
    let fd: FileDescriptor
    do {
        fd = try FileDescriptor.open(FilePath(path), .readOnly, options: [.closeOnExec, .nonBlocking, FileDescriptor.OpenOptions(rawValue: O_NOCTTY)])
    } catch let e as Errno {
        switch e {
        case .noSuchFileOrDirectory, .notDirectory:
            throw .fileNotFound("\(path): no such file; give an absolute path to an existing binary or a library name like \"libc\"")
        case .permissionDenied, .notPermitted:
            throw .permissionDenied("\(path): permission denied (the daemon must be able to read the file)")
        case .isDirectory:
            throw .notELF("\(path) is a directory, not an ELF file")
        case .tooManyOpenFiles, .tooManyOpenFilesInSystem:
            throw .tooManyOpenFiles("\(path): cannot open: uprobed is out of file descriptors (\(e)); raise LimitNOFILE or lower max_connections")
        default:
            // A Unix socket cannot be opened at all (ENXIO): say what the file is.
            var st = stat()
            if stat(path, &st) == 0, (st.st_mode & S_IFMT) != S_IFREG {
                throw .notELF("\(path) is \(fileKind(st.st_mode)), not a regular file; uprobes go in binaries and shared libraries")
            }
            throw .fileNotFound("\(path): cannot open: \(e)")
        }
    } catch {
        throw .fileNotFound("\(path): cannot open: \(error)")
    }
    var st = stat()
    guard fstat(fd.rawValue, &st) == 0 else {
        let e = Errno(rawValue: errno)
        try? fd.close()
        throw .fileNotFound("cannot stat \(path): \(e)")
    }
    guard (st.st_mode & S_IFMT) == S_IFREG else {
        try? fd.close()
        throw .notELF("\(path) is \(fileKind(st.st_mode)), not a regular file; uprobes go in binaries and shared libraries")
    }
    return fd
}

/// "a FIFO", "a character device", … for a message about a file of the wrong kind.
func fileKind(_ mode: mode_t) -> String {
    switch mode & S_IFMT {
    case S_IFIFO: return "a FIFO (named pipe)"
    case S_IFCHR: return "a character device"
    case S_IFBLK: return "a block device"
    case S_IFSOCK: return "a socket"
    case S_IFDIR: return "a directory"
    case S_IFLNK: return "a symbolic link"
    default: return "not a regular file"
    }
}
