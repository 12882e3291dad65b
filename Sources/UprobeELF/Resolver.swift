import SystemPackage
import UprobeSystem
#if canImport(Glibc)
import Glibc
#endif

/// What a client asked for: exactly one of `symbol`, `offset` or `usdt` in `path`.
public struct ProbeSpecInput: Sendable, Hashable {
    /// Absolute path, or a library name: `libc`, `libc.so.6`, `libsqlite3.so.0`.
    public var path: String
    /// Plain (`malloc`), versioned (`malloc@@GLIBC_2.2.5`, `name@VER`) or glob (`f*`, `mem?`, `[ab]*`).
    public var symbol: String?
    /// A file offset.
    public var offset: UInt64?
    /// `provider:name`.
    public var usdt: String?
    /// Resolve inside that process's view (`/proc/PID/root`, its mapped libraries).
    public var pid: Int32?
    public var retprobe: Bool
    /// Allow an offset that is not a function start; allow a retprobe on a Go binary.
    public var force: Bool
    /// Follow the path when its file is replaced (a new inode): the daemon resolves the same
    /// probe in the new file and attaches it too. The resolver itself ignores it.
    public var follow: Bool
    /// Measure each call's duration (entry to return) instead of counting entries: a latency
    /// probe (a uprobe session link). The resolver itself ignores it.
    public var latency: Bool

    public init(path: String, symbol: String? = nil, offset: UInt64? = nil, usdt: String? = nil,
                pid: Int32? = nil, retprobe: Bool = false, force: Bool = false, follow: Bool = true,
                latency: Bool = false) {
        self.follow = follow
        self.latency = latency
        self.path = path
        self.symbol = symbol
        self.offset = offset
        self.usdt = usdt
        self.pid = pid
        self.retprobe = retprobe
        self.force = force
    }
}

/// One probe site ready for the kernel: (dev, inode, file offset) plus what to tell the user.
///
/// Compact on purpose: a whole binary is 241,000 of these, kept for as long as they are
/// registered. What every site of one file shares (path, device, inode, build-id, and the
/// buffer of its sites' symbol names) is one `ResolvedFile` object that the resolver makes
/// once per file and all its sites reference; a site keeps only the offset of its name in
/// that buffer (no String per site, and no second reference to retain at every copy); what
/// few sites have (aliases, a USDT semaphore, a warning) sits behind one optional reference.
/// 28 bytes.
public struct ResolvedProbe: Sendable, Hashable {
    /// The file: path, device, inode, build-id, names (shared by the sites of one resolution).
    public var file: ResolvedFile
    /// File offset for `uprobe_multi`'s `offsets`.
    public var fileOffset: UInt64
    /// `aliases`, `refCtrOffset` and `warning`: nil when all are empty (the common case).
    private var details: ResolvedDetails?
    /// Where the name is in `file.names`; `noName` for none.
    @usableFromInline var nameAt: UInt32

    @usableFromInline static let noName = UInt32.max

    public init(file: ResolvedFile, fileOffset: UInt64, symbol: String?, aliases: [String] = [],
                refCtrOffset: UInt64? = nil, warning: String? = nil) {
        let packed = symbol.map(SymbolNames.single)
        self.init(file: packed.map { file.with(names: $0.names) } ?? file, fileOffset: fileOffset, nameAt: packed?.at,
                  aliases: aliases, refCtrOffset: refCtrOffset, warning: warning)
    }

    /// With a name already packed in `file.names` (`SymbolNames.pack`; nil: no name): a
    /// resolution packs all its names at once.
    public init(file: ResolvedFile, fileOffset: UInt64, nameAt: UInt32?, aliases: [String] = [],
                refCtrOffset: UInt64? = nil, warning: String? = nil) {
        self.file = file
        self.fileOffset = fileOffset
        self.nameAt = file.names == nil ? Self.noName : nameAt ?? Self.noName
        self.details = ResolvedDetails.make(aliases: aliases, refCtrOffset: refCtrOffset, warning: warning)
    }

    public init(path: String, device: UInt64, inode: UInt64, buildID: String?, fileOffset: UInt64,
                symbol: String?, aliases: [String] = [], refCtrOffset: UInt64? = nil, warning: String? = nil) {
        self.init(file: ResolvedFile(path: path, device: device, inode: inode, buildID: buildID), fileOffset: fileOffset,
                  symbol: symbol, aliases: aliases, refCtrOffset: refCtrOffset, warning: warning)
    }

    /// Primary name (global/default-versioned preferred); `provider:name` for USDT; nil for a
    /// bare offset. Made into a String on each read: loops over many probes read
    /// `withSymbolUTF8` instead. Setting it gives the site a file object of its own.
    public var symbol: String? {
        get { withSymbolUTF8 { String(decoding: $0, as: UTF8.self) } }
        set {
            guard let newValue else { nameAt = Self.noName; return }
            let packed = SymbolNames.single(newValue)
            file = file.with(names: packed.names)
            nameAt = packed.at
        }
    }

    /// Whether it has a symbol name.
    public var hasSymbol: Bool { nameAt != Self.noName }
    /// Where the name is in `file.names` (nil: none), and whether it has aliases, a semaphore or
    /// a warning: a registration record keeps a site without those in fields of its own and
    /// makes it again with `init(file:fileOffset:nameAt:)`.
    public var nameIndex: UInt32? { nameAt == Self.noName ? nil : nameAt }
    public var hasDetails: Bool { details != nil }
    /// The symbol name's length in UTF-8 bytes (0 without one).
    public var symbolByteCount: Int { withSymbolUTF8 { $0.count } ?? 0 }

    /// The symbol name's UTF-8 bytes (followed in memory by a NUL, so `fnmatch` can read them
    /// as a C string), lent to `body`; nil without calling it when there is no name.
    @inlinable
    public func withSymbolUTF8<R>(_ body: (UnsafeBufferPointer<UInt8>) throws -> R) rethrows -> R? {
        guard nameAt != Self.noName, let names = file.names else { return nil }
        return try names.withName(at: nameAt, body)
    }

    /// Whether the symbol is `name` (nil: no symbol), without making a String.
    public func symbolIs(_ name: String?) -> Bool {
        guard var name else { return !hasSymbol }
        return withSymbolUTF8 { mine in name.withUTF8 { mine.elementsEqual($0) } } ?? false
    }

    public static func == (a: ResolvedProbe, b: ResolvedProbe) -> Bool {
        guard a.fileOffset == b.fileOffset, a.file == b.file, a.details == b.details, a.hasSymbol == b.hasSymbol else { return false }
        if a.file.names === b.file.names && a.nameAt == b.nameAt { return true }
        return a.withSymbolUTF8 { l in b.withSymbolUTF8 { r in l.elementsEqual(r) } ?? false } ?? true
    }

    public func hash(into h: inout Hasher) {
        h.combine(file)
        h.combine(fileOffset)
        h.combine(hasSymbol)
        withSymbolUTF8 { h.combine(bytes: UnsafeRawBufferPointer($0)) }
        h.combine(details)
    }

    /// Absolute path the kernel must open (under `/proc/PID/root/` when the target process
    /// lives in another mount namespace/root).
    public var path: String {
        get { file.path }
        set { file = ResolvedFile(path: newValue, device: file.device, inode: file.inode, buildID: file.buildID, names: file.names) }
    }
    /// `st_dev` of the opened file.
    public var device: UInt64 {
        get { file.device }
        set { file = ResolvedFile(path: file.path, device: newValue, inode: file.inode, buildID: file.buildID, names: file.names) }
    }
    /// `st_ino` of the opened file.
    public var inode: UInt64 {
        get { file.inode }
        set { file = ResolvedFile(path: file.path, device: file.device, inode: newValue, buildID: file.buildID, names: file.names) }
    }
    /// Hex of `NT_GNU_BUILD_ID`, if present.
    public var buildID: String? {
        get { file.buildID }
        set { file = ResolvedFile(path: file.path, device: file.device, inode: file.inode, buildID: newValue, names: file.names) }
    }
    /// Other names at the same address.
    public var aliases: [String] {
        get { details?.aliases ?? [] }
        set { details = ResolvedDetails.make(aliases: newValue, refCtrOffset: refCtrOffset, warning: warning) }
    }
    /// USDT semaphore as a file offset (uprobe `ref_ctr_offset`), nil if none.
    public var refCtrOffset: UInt64? {
        get { details?.refCtrOffset }
        set { details = ResolvedDetails.make(aliases: aliases, refCtrOffset: newValue, warning: warning) }
    }
    /// Something the user should know (IFUNC resolver, forced mid-function offset).
    public var warning: String? {
        get { details?.warning }
        set { details = ResolvedDetails.make(aliases: aliases, refCtrOffset: refCtrOffset, warning: newValue) }
    }
}

/// The file a `ResolvedProbe` is in. Immutable; compared and hashed by value, so two equal
/// files made apart are equal (a state file's targets are read one by one).
public final class ResolvedFile: Sendable, Hashable {
    public let path: String
    public let device: UInt64
    public let inode: UInt64
    public let buildID: String?
    /// The symbol names of the sites that reference this object (`ResolvedProbe.nameAt`).
    /// Not part of the file's identity: equality and hashing ignore it.
    /// (`SymbolNames` is immutable but a ManagedBuffer, which cannot declare itself Sendable.)
    public nonisolated(unsafe) let names: SymbolNames?

    public init(path: String, device: UInt64, inode: UInt64, buildID: String?, names: SymbolNames? = nil) {
        self.path = path
        self.device = device
        self.inode = inode
        self.buildID = buildID
        self.names = names
    }

    /// The same file with `names`.
    public func with(names: SymbolNames) -> ResolvedFile {
        ResolvedFile(path: path, device: device, inode: inode, buildID: buildID, names: names)
    }

    public static func == (a: ResolvedFile, b: ResolvedFile) -> Bool {
        a === b || (a.device == b.device && a.inode == b.inode && a.path == b.path && a.buildID == b.buildID)
    }

    public func hash(into h: inout Hasher) {
        h.combine(device)
        h.combine(inode)
        h.combine(path)
        h.combine(buildID)
    }
}

/// The rarely present parts of a `ResolvedProbe`, compared by value.
private final class ResolvedDetails: Sendable, Hashable {
    let aliases: [String]
    let refCtrOffset: UInt64?
    let warning: String?

    private init(aliases: [String], refCtrOffset: UInt64?, warning: String?) {
        self.aliases = aliases
        self.refCtrOffset = refCtrOffset
        self.warning = warning
    }

    /// Nil when there is nothing to keep.
    static func make(aliases: [String], refCtrOffset: UInt64?, warning: String?) -> ResolvedDetails? {
        aliases.isEmpty && refCtrOffset == nil && warning == nil
            ? nil : ResolvedDetails(aliases: aliases, refCtrOffset: refCtrOffset, warning: warning)
    }

    static func == (a: ResolvedDetails, b: ResolvedDetails) -> Bool {
        a === b || (a.aliases == b.aliases && a.refCtrOffset == b.refCtrOffset && a.warning == b.warning)
    }

    func hash(into h: inout Hasher) {
        h.combine(aliases)
        h.combine(refCtrOffset)
        h.combine(warning)
    }
}

/// A function a glob matched but left out because its first instruction cannot be probed
/// (`ProbeableInstruction`): reported in the register and resolve replies' `skipped`.
public struct SkippedSite: Sendable, Hashable {
    /// The file, as `ResolvedProbe.path`.
    public var path: String
    public var fileOffset: UInt64
    /// The function's primary name.
    public var symbol: String?
    public var refusal: InstructionRefusal

    public init(path: String, fileOffset: UInt64, symbol: String?, refusal: InstructionRefusal) {
        self.path = path
        self.fileOffset = fileOffset
        self.symbol = symbol
        self.refusal = refusal
    }

    /// The reply's `reason`: the instruction's bytes and what is wrong with them.
    public var reason: String { refusal.description }
}

/// What one spec resolves to: the probes to attach, and the functions a glob skipped.
public struct Resolution: Sendable, Hashable {
    public var probes: [ResolvedProbe]
    public var skipped: [SkippedSite]

    public init(probes: [ResolvedProbe], skipped: [SkippedSite] = []) {
        self.probes = probes
        self.skipped = skipped
    }
}

/// Bounds on how much one spec may expand to.
public struct ResolverLimits: Sendable, Equatable {
    /// A glob or USDT spec matching more distinct sites than this fails with `too_many_matches`.
    public var maxMatchesPerSpec: Int

    public init(maxMatchesPerSpec: Int = 10_000) {
        self.maxMatchesPerSpec = maxMatchesPerSpec
    }
}

/// Turns probe specs into file offsets. Stateless and thread-safe; every call opens and parses
/// the target afresh (callers run it outside any lock).
public struct Resolver: Sendable {
    public let limits: ResolverLimits
    public let locator: LibraryLocator
    /// Roots searched for separate debug files (`ROOT/.build-id/xx/yyyy.debug`). When the
    /// target has no `.symtab` (a stripped distribution binary) and a debug file with the same
    /// build-id exists, its function symbols are used too (e.g. Debian's libc6-dbg gives
    /// libc's internal and IFUNC implementation names).
    public let debugDirectories: [String]
    /// Parsed files, shared by every copy of this resolver.
    public let cache: ELFFileCache
    /// Compresses the names buffers of large resolutions some time after they are made (the
    /// daemon's, whose registrations keep them); nil: they stay plain.
    public let names: NameCompactor?

    public init(limits: ResolverLimits = .init()) {
        self.init(limits: limits, locator: LibraryLocator())
    }

    public init(limits: ResolverLimits, locator: LibraryLocator, debugDirectories: [String] = ["/usr/lib/debug"],
                cache: ELFFileCache = ELFFileCache(), names: NameCompactor? = nil) {
        self.limits = limits
        self.locator = locator
        self.debugDirectories = debugDirectories
        self.cache = cache
        self.names = names
    }

    /// Resolve one spec into one or more probes (globs and multi-site USDT give several),
    /// sorted by file offset. Functions a glob skipped are left out silently; see
    /// `resolution(_:)` for them.
    public func resolve(_ spec: ProbeSpecInput) throws(ResolveError) -> [ResolvedProbe] {
        try resolution(spec).probes
    }

    /// `resolve`, with the functions a glob skipped because x86 uprobes cannot probe their first
    /// instruction.
    public func resolution(_ spec: ProbeSpecInput) throws(ResolveError) -> Resolution {
        try validate(spec)
        let target = try openTarget(spec)
        defer { try? target.fd.close() }
        let elf = try cache.file(fd: target.fd, path: target.path, debugDirectories: debugDirectories)
        return try resolve(spec, in: target, elf: elf)
    }

    /// Resolves the specs of one request. Specs naming the same (path, pid) share one open,
    /// one canonicalization and one cache lookup, so a 10,000-probe request on one binary costs
    /// one file open plus 10,000 symbol lookups. Results are in spec order; one failure does
    /// not stop the others (the caller decides what a failure means for the request).
    public func resolveMany(_ specs: [ProbeSpecInput]) -> [Result<[ResolvedProbe], ResolveError>] {
        resolutions(specs).map { $0.map(\.probes) }
    }

    /// `resolveMany`, with the functions each glob skipped (see `resolution(_:)`).
    public func resolutions(_ specs: [ProbeSpecInput]) -> [Result<Resolution, ResolveError>] {
        struct OpenKey: Hashable { var path: String; var pid: Int32? }
        var opened: [OpenKey: Result<(Target, ELFFile), ResolveError>] = [:]
        defer {
            for case .success(let (t, _)) in opened.values { try? t.fd.close() }
        }
        var results: [Result<Resolution, ResolveError>] = []
        results.reserveCapacity(specs.count)
        // Specs are taken in runs naming one (path, pid): a 10,000-probe request names one
        // binary 10,000 times, and each run binds its file once instead of copying it (and
        // hashing its key) per spec.
        var start = specs.startIndex
        while start < specs.endIndex {
            let key = OpenKey(path: specs[start].path, pid: specs[start].pid)
            var end = start + 1
            while end < specs.endIndex, specs[end].pid == key.pid, specs[end].path == key.path { end += 1 }
            // A file is opened for a spec that passed validation (a path with a NUL is never opened).
            let entry: Result<(Target, ELFFile), ResolveError>
            if let e = opened[key] {
                entry = e
            } else if let first = specs[start..<end].first(where: { (try? validate($0)) != nil }) {
                do throws(ResolveError) {
                    let t = try openTarget(first)
                    do throws(ResolveError) {
                        entry = .success((t, try cache.file(fd: t.fd, path: t.path, debugDirectories: debugDirectories)))
                    } catch {
                        try? t.fd.close()
                        throw error
                    }
                } catch {
                    entry = .failure(error)
                }
                opened[key] = entry
            } else {
                entry = .failure(.invalidSpec("no valid spec"))  // never reported: each spec's own validation fails first
            }
            switch entry {
            case .success(let (target, elf)):
                results += resolveRun(specs[start..<end], in: target, elf: elf)
            case .failure(let openError):
                for spec in specs[start..<end] {
                    do throws(ResolveError) { try validate(spec) } catch {
                        results.append(.failure(error))
                        continue
                    }
                    results.append(.failure(openError))
                }
            }
            start = end
        }
        return results
    }

    /// The specs of one run (one opened file: the same path and pid), in order.
    private func resolveRun(_ run: ArraySlice<ProbeSpecInput>, in target: Target, elf: ELFFile)
        -> [Result<Resolution, ResolveError>] {
        var out: [Result<Resolution, ResolveError>] = []
        out.reserveCapacity(run.count)
        // One file object for the whole run: a 10,000-name request is 10,000 probes of one file.
        let file = ResolvedFile(path: target.path, device: target.device, inode: target.inode, buildID: elf.buildID)
        var found: [Result<(sites: [Site], skipped: [SkippedSite]), ResolveError>] = []
        found.reserveCapacity(run.count)
        for spec in run {
            do throws(ResolveError) {
                // The run's one path was checked already: its file was opened for a spec of the
                // run that passed `validate`.
                try validate(spec, pathChecked: true)
                found.append(.success(try sites(spec, in: target, elf: elf)))
            } catch {
                found.append(.failure(error))
            }
        }
        // Every name of the run in one buffer: a 10,000-name request is 10,000 specs of one
        // site each, and a buffer per spec was an allocation per probe.
        var all: [Site.Name] = []
        all.reserveCapacity(found.reduce(0) { n, f in n + ((try? f.get())?.sites.count ?? 0) })
        for case .success(let f) in found { all += f.sites.lazy.map(\.name) }
        var names = Self.pack(all, elf: elf, compactor: self.names)[...]
        var files = FilesWithNames(file)
        for f in found {
            switch f {
            case .success(let sites):
                out.append(.success(resolution(sites, files: &files, names: names.prefix(sites.sites.count))))
                names = names.dropFirst(sites.sites.count)
            case .failure(let error):
                out.append(.failure(error))
            }
        }
        return out
    }

    /// `pathChecked`: the caller knows the path is valid, so it is not scanned again.
    private func validate(_ spec: ProbeSpecInput, pathChecked: Bool = false) throws(ResolveError) {
        let kinds = (spec.symbol != nil ? 1 : 0) + (spec.offset != nil ? 1 : 0) + (spec.usdt != nil ? 1 : 0)
        guard kinds == 1 else {
            throw .invalidSpec("a probe needs exactly one of symbol, offset or usdt (got \(kinds))")
        }
        if !pathChecked {
            guard !spec.path.isEmpty, !spec.path.containsUTF8(where: { $0 == 0 }) else {
                throw .invalidSpec("path is empty or contains NUL")
            }
        }
        if let s = spec.symbol, s.isEmpty || s.containsUTF8(where: { $0 == 0 }) {
            throw .invalidSpec("symbol is empty or contains NUL")
        }
        if spec.usdt != nil && spec.retprobe { throw .invalidSpec("a USDT probe cannot be a retprobe") }
        if spec.usdt != nil && spec.latency { throw .invalidSpec("a USDT probe cannot be a latency probe") }
        if spec.retprobe && spec.latency { throw .invalidSpec("a probe cannot be both a retprobe and a latency probe") }
    }

    /// - Parameter file: the target as a `ResolvedFile`, if the caller made one for several specs.
    private func resolve(_ spec: ProbeSpecInput, in target: Target, elf: ELFFile,
                         file: ResolvedFile? = nil) throws(ResolveError) -> Resolution {
        let found = try sites(spec, in: target, elf: elf)
        // One file object for all the sites: a whole binary's 241,000 probes share it.
        let file = file ?? ResolvedFile(path: target.path, device: target.device, inode: target.inode, buildID: elf.buildID)
        var files = FilesWithNames(file)
        return resolution(found, files: &files, names: Self.pack(found.sites.map(\.name), elf: elf, compactor: self.names)[...])
    }

    /// The sites `spec` names in order of their offsets, and the functions a glob skipped.
    private func sites(_ spec: ProbeSpecInput, in target: Target, elf: ELFFile) throws(ResolveError) -> (sites: [Site], skipped: [SkippedSite]) {
        if (spec.retprobe || spec.latency) && elf.isGoBinary && !spec.force {
            // A latency probe hooks each call's return the same way a uretprobe does.
            throw .retprobeOnGo("\(target.path) is a Go binary: Go moves goroutine stacks, so a uretprobe (or latency probe) can corrupt "
                + "them and crash the process; probe the function's return sites by offset, or set force to accept the risk")
        }
        let sites: [Site]
        var skipped: [SkippedSite] = []
        if let symbol = spec.symbol {
            (sites, skipped) = try resolveSymbol(symbol, elf: elf, path: target.path)
        } else if let offset = spec.offset {
            sites = [try resolveOffset(offset, elf: elf, target: target, force: spec.force)]
        } else if let usdt = spec.usdt {
            sites = try resolveUSDT(usdt, elf: elf, target: target)
        } else {
            sites = []
        }
        // By index: zipping the array with itself copied every site (its strings and arrays) twice.
        let inOrder = sites.indices.dropLast().allSatisfy({ sites[$0].offset < sites[$0 + 1].offset })
            ? sites : sites.sorted { $0.offset < $1.offset }
        return (inOrder, skipped.map {
            var s = $0
            s.path = target.path
            return s
        })
    }

    /// The probes of `found`'s sites in `file`, with their names packed already (`names`:
    /// one per site, in order).
    private func resolution(_ found: (sites: [Site], skipped: [SkippedSite]), files: inout FilesWithNames,
                            names: ArraySlice<(names: SymbolNames, at: UInt32)?>) -> Resolution {
        var probes: [ResolvedProbe] = []
        probes.reserveCapacity(found.sites.count)
        for (site, name) in zip(found.sites, names) {
            probes.append(ResolvedProbe(file: files.file(with: name?.names), fileOffset: site.offset, nameAt: name?.at,
                                        aliases: site.aliases, refCtrOffset: site.refCtr, warning: site.warning))
        }
        return Resolution(probes: probes, skipped: found.skipped)
    }

    /// The file object of a run for each names buffer its sites' names are in: one, unless the
    /// names outgrew one buffer's 32-bit offsets.
    struct FilesWithNames {
        private let plain: ResolvedFile
        private var last: ResolvedFile?
        init(_ file: ResolvedFile) { plain = file }
        mutating func file(with names: SymbolNames?) -> ResolvedFile {
            guard let names else { return plain }
            if let last, last.names === names { return last }
            let made = plain.with(names: names)
            last = made
            return made
        }
    }

    /// The `instruction_not_probeable` error for a site a spec names (`what`: "symbol 'x'",
    /// "offset 0x…", "USDT p:n").
    private func notProbeable(_ what: String, at offset: UInt64, path: String, _ refusal: InstructionRefusal) -> ResolveError {
        let consequence = refusal.kind == .misemulated
            ? "the kernel would accept the probe and then not execute that instruction"
            : "the kernel would refuse the probe"
        return .instructionNotProbeable("\(what) in \(path) (offset 0x\(hex(offset))) cannot be probed: its first "
            + "\(refusal); force does not override this (\(consequence)). Probe a later instruction of the function by offset")
    }

    struct Site {
        var offset: UInt64
        var symbol: String?
        var aliases: [String]
        var refCtr: UInt64?
        var warning: String?
        /// The symbol table entry whose name is `symbol`, which is then not made (-1: `symbol`
        /// is the name). A glob's function with one name takes its name from the table when
        /// the names are packed (`pack`): a String per function, made, copied with its site
        /// and freed again, was a third of a whole binary's resolution.
        var tableName: Int32 = -1

        /// The name, where it is.
        enum Name {
            case string(String?)
            case table(Int32)
        }
        var name: Name { tableName >= 0 ? .table(tableName) : .string(symbol) }
    }

    /// `SymbolNames.pack` of sites' names, those in `elf`'s symbol table copied from its bytes
    /// (valid UTF-8: the parser repairs a name that is not as it reads it).
    /// Each buffer of at least `compactor.minimumBytes` is handed to `compactor`, as `SymbolNames.pack` does.
    static func pack(_ names: [Site.Name], elf: ELFFile, compactor: NameCompactor?) -> [(names: SymbolNames, at: UInt32)?] {
        let syms = elf.symbols
        return SymbolNames.pack(count: names.count, utf8Count: { k in
            switch names[k] {
            case .string(let s): return s?.utf8.count
            case .table(let i): return syms.nameByteCount(Int(i))
            }
        }, withUTF8: { k, write in
            switch names[k] {
            case .string(let s):
                guard var s else { return }
                s.withUTF8(write)
            case .table(let i): syms.withNameBytes(Int(i), write)
            }
        }, storeFrom: compactor?.minimumBytes, compactor: compactor)
    }

    // MARK: opening

    struct Target { var fd: FileDescriptor; var path: String; var device: UInt64; var inode: UInt64 }

    func openTarget(_ spec: ProbeSpecInput) throws(ResolveError) -> Target {
        var root = ""          // "" = the daemon's own root
        if let pid = spec.pid { root = try ProcessCheck.probeableRoot(of: pid) }
        var path = spec.path
        var mappedFull: String?
        if LibraryLocator.isLibraryName(path) {
            if let pid = spec.pid, let m = try locator.mappedLibrary(path, pid: pid) {
                mappedFull = pickMapped(m, root: root)
                path = m.path
            } else {
                path = try locator.locate(path, root: root)
            }
        } else if !path.hasPrefix("/") {
            throw .invalidSpec("path '\(path)' must be absolute (or a bare library name such as \"libc\")")
        }
        let full: String
        if let mappedFull {
            full = mappedFull
        } else if root.isEmpty {
            full = try canonicalize(path)
        } else {
            full = root + (try resolveInRoot(root: root, path: path))
        }
        let fd = try openReadOnly(full)
        var st = stat()
        guard fstat(fd.rawValue, &st) == 0 else {
            try? fd.close()
            throw .fileNotFound("cannot stat \(full)")
        }
        return Target(fd: fd, path: full, device: UInt64(st.st_dev), inode: UInt64(st.st_ino))
    }

    /// A path the daemon (and the kernel) can open that names exactly the file `m` maps:
    /// the printed path if it is that file (same root, or a chroot as seen from the host), else
    /// the path inside the process's root (another mount namespace), else the map_files link
    /// (a deleted or replaced library that is still mapped).
    func pickMapped(_ m: LibraryLocator.Mapping, root: String) -> String {
        var candidates: [String] = []
        if !m.deleted {
            if let c = try? canonicalize(m.path) { candidates.append(c) }
            if !root.isEmpty, let inRoot = try? resolveInRoot(root: root, path: m.path) { candidates.append(root + inRoot) }
        }
        let want = fileIdentity(m.mapFile)
        for c in candidates {
            guard let id = fileIdentity(c) else { continue }
            if let want { if id == want { return c } } else if id.1 == m.inode && id.0 == m.device { return c }
        }
        return m.mapFile
    }

    /// realpath(3), mapping failures to resolver errors.
    func canonicalize(_ path: String) throws(ResolveError) -> String {
        guard let p = realpath(path, nil) else {
            let e = Syscall.lastError("realpath", path)
            if e.errno == .permissionDenied { throw .permissionDenied("\(path): permission denied") }
            throw .fileNotFound("\(path): no such file (\(e))")
        }
        defer { free(p) }
        return String(cString: p)
    }

    /// Resolves symlinks in `path` as if `root` were `/` (absolute link targets restart at
    /// `root`, `..` never climbs above it), so a container's `/usr/lib -> /lib` links point at
    /// the container's files, not the host's. Returns an absolute path without symlinks.
    func resolveInRoot(root: String, path: String) throws(ResolveError) -> String {
        var done: [Substring] = []
        var todo = Array(path.split(separator: "/").reversed())
        var links = 0
        while let comp = todo.popLast() {
            if comp == "." { continue }
            if comp == ".." { _ = done.popLast(); continue }
            let candidate = root + "/" + (done + [comp]).joined(separator: "/")
            var st = stat()
            guard lstat(candidate, &st) == 0 else {
                throw .fileNotFound("\(path): no such file inside \(root)")
            }
            if (st.st_mode & S_IFMT) == S_IFLNK {
                links += 1
                guard links <= 40 else { throw .fileNotFound("\(path): too many symbolic links inside \(root)") }
                var buf = [CChar](repeating: 0, count: Int(PATH_MAX) + 1)
                let n = readlink(candidate, &buf, buf.count - 1)
                guard n > 0 else { throw .fileNotFound("\(path): unreadable symbolic link inside \(root)") }
                let target = String(decoding: buf[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
                if target.hasPrefix("/") { done = [] }
                todo += target.split(separator: "/").reversed()
            } else {
                done.append(comp)
            }
        }
        return "/" + done.joined(separator: "/")
    }

    // MARK: symbols

    /// The sites `request` names, and the functions a glob skipped because their first
    /// instruction cannot be probed (a plain or versioned name is refused instead).
    func resolveSymbol(_ request: String, elf: ELFFile, path: String) throws(ResolveError) -> ([Site], [SkippedSite]) {
        if let site = uniqueSymbolSite(request, elf: elf) { return ([site], []) }
        let syms = elf.symbols
        let tables = [elf.hasSymtab ? ".symtab" : nil, elf.hasDynsym ? ".dynsym" : nil, elf.debugFilePath].compactMap { $0 }
        guard !syms.isEmpty else {
            let what = tables.isEmpty ? "has no symbol tables" : "has no defined function symbols in \(tables.joined(separator: " or "))"
            throw .noSymbols("\(path) \(what) (it is stripped); probe it by offset or USDT, or use an unstripped build")
        }
        // Split "name@@VER" / "name@VER".
        var base = request
        var version: String?
        var defaultOnly = false
        if let at = request.firstIndex(of: "@") {
            base = String(request[..<at])
            let rest = request[request.index(after: at)...]
            defaultOnly = rest.hasPrefix("@")
            version = String(defaultOnly ? rest.dropFirst() : rest)
            if base.isEmpty || version?.isEmpty == true { throw .invalidSpec("symbol '\(request)' is not name@VERSION or name@@VERSION") }
        }
        let isGlob = request.contains { $0 == "*" || $0 == "?" || $0 == "[" }

        // Indices into `syms`: a whole binary's glob matches 246,000 symbols, and copying each
        // (with its strings) was a visible part of resolving it.
        var matched: [Int]
        if isGlob {
            if version != nil {
                matched = request.withCString { pattern in
                    (0..<syms.count).filter { fnmatch(pattern, syms.symbol($0).versionedName, 0) == 0 }
                }
            } else if Self.matchesEveryName(request) {
                matched = Array(0..<syms.count)
            } else {
                // Match each distinct name once, then expand to its symbols.
                // On the names in place (NUL-terminated in the table's buffer): no String per name.
                matched = request.withCString { pattern in syms.indicesOfNames { fnmatch(pattern, $0, 0) == 0 } }
            }
        } else {
            matched = syms.indices(named: base).filter {
                version == nil || (syms.symbol($0).version == version && (!defaultOnly || syms.symbol($0).isDefaultVersion))
            }
            // A plain name with several definitions: the default version, then unversioned
            // non-local definitions, win (that is what the dynamic linker would bind).
            if version == nil, Set(matched.map { syms.address($0) }).count > 1 {
                let defaults = matched.filter { syms.symbol($0).isDefaultVersion }
                if !defaults.isEmpty {
                    matched = defaults
                } else {
                    let nonLocal = matched.filter { syms.symbol($0).binding != .local && syms.symbol($0).version == nil }
                    if !nonLocal.isEmpty { matched = nonLocal }
                }
            }
        }
        guard !matched.isEmpty else {
            var msg = "symbol '\(request)' not found in \(path) (searched \(tables.joined(separator: " and ")))"
            if !isGlob, let hint = closestName(to: base, in: elf) { msg += "; did you mean '\(hint)'?" }
            if isGlob { msg += "; no function name matches that pattern" }
            throw .symbolNotFound(msg)
        }
        // The matched symbols in address order (for every name, the table's own order).
        if matched.count == syms.count {
            matched = syms.addressOrder.map { Int($0) }
        } else {
            matched.sort { syms.address($0) != syms.address($1) ? syms.address($0) < syms.address($1) : $0 < $1 }
        }
        let addresses = Self.uniqued(sorted: matched.map { syms.address($0) })
        guard addresses.count <= limits.maxMatchesPerSpec else {
            throw .tooMany("'\(request)' matches \(addresses.count) functions in \(path), more than the limit of "
                + "\(limits.maxMatchesPerSpec); narrow the pattern")
        }
        // Whether a name is among those matched (it ranks first among the names at an address).
        // Asked only where an address has several names: a set of every matched name cost as
        // much as the rest of a whole binary's glob.
        lazy var versionedMatches = Set(matched.map { syms.name($0) })
        func isMatched(_ name: String) -> Bool {
            if !isGlob { return name == base }
            if version != nil { return versionedMatches.contains(name) }
            return fnmatch(request, name, 0) == 0
        }
        // The refused sites' offsets in order, searched before the table is hashed: a glob over
        // a whole binary asks for every function, and few are refused.
        let refusals = elf.unprobeableSites
        let refused = refusals.keys.sorted()
        func refusal(at off: UInt64) -> InstructionRefusal? {
            var lo = 0, hi = refused.count
            while lo < hi {
                let mid = (lo + hi) / 2
                if refused[mid] < off { lo = mid + 1 } else { hi = mid }
            }
            return lo < refused.count && refused[lo] == off ? refusals[off] : nil
        }
        var sites: [Site] = []
        sites.reserveCapacity(addresses.count)
        var skipped: [SkippedSite] = []
        var next = 0  // into `matched`, in address order
        for addr in addresses {
            let first = matched[next]
            while next < matched.count, syms.address(matched[next]) == addr { next += 1 }
            guard let off = elf.fileOffset(ofVirtualAddress: addr, executable: true) else {
                if isGlob { continue }
                throw .notExecutable("symbol '\(request)' in \(path) has address 0x\(hex(addr)), which is not in an executable segment")
            }
            if syms.isAloneAtAddress(first) {
                // Most functions have one name: no ranking, no aliases.
                if let refusal = refusal(at: off) {
                    guard isGlob else { throw notProbeable("symbol '\(request)'", at: off, path: path, refusal) }
                    skipped.append(SkippedSite(path: "", fileOffset: off, symbol: syms.name(first), refusal: refusal))
                    continue
                }
                let warning = syms.isIFunc(first) ? ifuncWarning(syms.name(first), ifuncs: [syms.symbol(first)], syms: syms) : nil
                sites.append(Site(offset: off, symbol: nil, aliases: [], refCtr: nil, warning: warning, tableName: Int32(first)))
                continue
            }
            let here = syms.indices(at: addr).map { syms.symbol($0) }
            let matchedHere = Set(here.map(\.name).filter(isMatched))
            let ranked = here.sorted { before($0, $1, matchedHere) }
            guard let primary = ranked.first else { continue }
            if let refusal = refusal(at: off) {
                guard isGlob else { throw notProbeable("symbol '\(request)'", at: off, path: path, refusal) }
                // The path is filled in by the caller, which knows the target's.
                skipped.append(SkippedSite(path: "", fileOffset: off, symbol: primary.name, refusal: refusal))
                continue
            }
            var seen: Set<String> = [primary.name]
            var aliases: [String] = []
            for s in ranked where seen.insert(s.name).inserted { aliases.append(s.name) }
            var warning: String?
            if here.contains(where: { $0.isIFunc }) {
                warning = ifuncWarning(primary.name, ifuncs: here.filter(\.isIFunc), syms: syms)
            }
            sites.append(Site(offset: off, symbol: primary.name, aliases: aliases, refCtr: nil, warning: warning))
        }
        guard !sites.isEmpty else {
            if !skipped.isEmpty {
                let listed = skipped.prefix(8).map { "\($0.symbol ?? "0x" + hex($0.fileOffset)) (\($0.refusal))" }
                throw .instructionNotProbeable("'\(request)' matches \(skipped.count) function(s) in \(path), and x86 uprobes "
                    + "cannot probe the first instruction of any of them: \(listed.joined(separator: "; "))"
                    + (skipped.count > 8 ? "; …" : ""))
            }
            throw .notExecutable("'\(request)' matches only symbols outside executable segments in \(path)")
        }
        return (sites, skipped)
    }

    /// The common case without the general path's sets and sorting (a 10,000-symbol request
    /// spent most of its resolution there): a plain name (no glob, no version) defined once,
    /// alone at its address, not an IFUNC, in an executable segment
    /// (`ELFFile.uniqueFunctionOffsets`). Nil: take the general path.
    private func uniqueSymbolSite(_ request: String, elf: ELFFile) -> Site? {
        guard let off = elf.uniqueFunctionOffset(request),
              !request.containsUTF8(where: { $0 == UInt8(ascii: "@") || $0 == UInt8(ascii: "*")
                                                 || $0 == UInt8(ascii: "?") || $0 == UInt8(ascii: "[") })
        else { return nil }
        return Site(offset: off, symbol: request, aliases: [], refCtr: nil, warning: nil)
    }

    /// Sort key for choosing the primary name at an address: strong/global first, then the
    /// name the user asked for, then default-versioned, then public-looking, shorter names.
    private func rank(_ s: ELFFunctionSymbol, _ matched: Set<String>) -> (Int, Int, Int, Int, Int) {
        let bind: Int
        switch s.binding {
        case .global, .unique: bind = 0
        case .weak: bind = 1
        case .local: bind = 2
        case .other: bind = 3
        }
        let ver = s.isDefaultVersion ? 0 : (s.version == nil ? 1 : 2)
        let underscores = s.name.utf8.prefix { $0 == UInt8(ascii: "_") }.count
        return (bind, matched.contains(s.name) ? 0 : 1, ver, underscores, s.name.utf8.count)
    }

    /// Total order on candidate names: `rank`, then the name itself (deterministic output).
    private func before(_ a: ELFFunctionSymbol, _ b: ELFFunctionSymbol, _ matched: Set<String>) -> Bool {
        let ra = rank(a, matched), rb = rank(b, matched)
        if ra != rb { return ra < rb }
        return a.name < b.name
    }

    /// Whether `fnmatch(pattern, name, 0)` accepts every name: only stars (`*`, `**`).
    static func matchesEveryName(_ pattern: String) -> Bool {
        !pattern.isEmpty && pattern.utf8.allSatisfy { $0 == UInt8(ascii: "*") }
    }

    /// `sorted` without repeated elements.
    static func uniqued(sorted: [UInt64]) -> [UInt64] {
        var out: [UInt64] = []
        out.reserveCapacity(sorted.count)
        for v in sorted where out.last != v { out.append(v) }
        return out
    }

    private func ifuncWarning(_ name: String, ifuncs: [ELFFunctionSymbol], syms: ELFSymbolTable) -> String {
        // glibc names implementations __<name>_<variant> (__memcpy_avx_unaligned_erms); the
        // fortified __<name>_chk_* family belongs to a different IFUNC.
        let bases = Set(ifuncs.map { String($0.name.drop { $0 == "_" }) })
        let resolverAddresses = Set(ifuncs.map(\.address))
        var impls = Set<String>()
        for i in 0..<syms.count where !syms.isIFunc(i) && !resolverAddresses.contains(syms.address(i)) {
            let name = syms.name(i)
            for b in bases where name.hasPrefix("__" + b + "_") && !name.hasPrefix("__" + b + "_chk") {
                impls.insert(name)
            }
        }
        var msg = "\(name) is an IFUNC; this probes its resolver, which runs once (at load/bind time), not the function itself."
        let list = impls.sorted()
        if list.isEmpty {
            msg += " No implementation symbols are visible in this file (stripped?); install debug symbols and probe the implementation (e.g. __\(name)_avx2) by name or offset."
        } else {
            let shown = list.prefix(16).joined(separator: ", ")
            msg += " Implementations: \(shown)\(list.count > 16 ? ", … (\(list.count) in all)" : "") — probe those instead."
        }
        return msg
    }

    /// Cheap "did you mean": the nearest name by edit distance, if reasonably close.
    private func closestName(to name: String, in elf: ELFFile) -> String? {
        let target = Array(name.utf8)
        var best: (Int, String)?
        let limit = max(2, target.count / 3)
        for candName in elf.symbolsByName.keys.sorted() {
            let cand = Array(candName.utf8)
            guard abs(cand.count - target.count) <= limit else { continue }
            let d = editDistance(target, cand, cap: limit + 1)
            if d <= limit, best.map({ d < $0.0 }) ?? true { best = (d, candName) }
        }
        return best?.1
    }

    // MARK: offsets

    func resolveOffset(_ offset: UInt64, elf: ELFFile, target: Target, force: Bool) throws(ResolveError) -> Site {
        let site = try offsetSite(offset, elf: elf, path: target.path, force: force)
        // A function start was checked with the file; any other offset is read here (one read).
        let refusal = elf.symbolsByAddress[elf.virtualAddress(ofExecutableFileOffset: offset) ?? 0] != nil
            ? elf.unprobeableSites[offset]
            : try ProbeableInstruction.refusal(at: offset, fd: target.fd, path: target.path)
        if let refusal { throw notProbeable("offset 0x\(hex(offset))", at: offset, path: target.path, refusal) }
        return site
    }

    private func offsetSite(_ offset: UInt64, elf: ELFFile, path: String, force: Bool) throws(ResolveError) -> Site {
        guard let vaddr = elf.virtualAddress(ofExecutableFileOffset: offset) else {
            let ranges = elf.programHeaders.filter { $0.isLoad && $0.isExecutable }
                .map { "0x\(hex($0.offset))..<0x\(hex($0.offset &+ $0.fileSize))" }.joined(separator: ", ")
            throw .notExecutable("offset 0x\(hex(offset)) is not inside executable code of \(path) (executable file ranges: \(ranges.isEmpty ? "none" : ranges))")
        }
        let syms = elf.symbols
        let here = elf.symbols(at: vaddr)
        if let primary = here.sorted(by: { before($0, $1, []) }).first {
            var seen: Set<String> = [primary.name]
            let aliases = here.sorted { before($0, $1, []) }.compactMap { seen.insert($0.name).inserted ? $0.name : nil }
            let warning = here.contains { $0.isIFunc } ? ifuncWarning(primary.name, ifuncs: here.filter(\.isIFunc), syms: syms) : nil
            return Site(offset: offset, symbol: primary.name, aliases: aliases, refCtr: nil, warning: warning)
        }
        let containing = (0..<syms.count).first { syms.size($0) > 0 && vaddr > syms.address($0) && vaddr - syms.address($0) < syms.size($0) }
            .map { syms.symbol($0) }
        let location = containing.map { "inside \($0.name)+0x\(hex(vaddr - $0.address))" } ?? "not at any known function start"
        if !force {
            throw .notFunctionStart("offset 0x\(hex(offset)) in \(path) is \(location); probing mid-instruction corrupts the "
                + "program, so set force only if you know it is an instruction boundary")
        }
        return Site(offset: offset, symbol: nil, aliases: [], refCtr: nil,
                    warning: "offset 0x\(hex(offset)) is \(location) (forced)")
    }

    // MARK: USDT

    func resolveUSDT(_ spec: String, elf: ELFFile, target: Target) throws(ResolveError) -> [Site] {
        let sites = try usdtSites(spec, elf: elf, path: target.path)
        // USDT sites are nops by construction; checked all the same, in one read per nearby group.
        var st = stat()
        guard fstat(target.fd.rawValue, &st) == 0 else { throw .fileNotFound("cannot \(Syscall.lastError("fstat", target.path))") }
        let refusals = try ProbeableInstruction.refusals(at: sites.map(\.offset),
                                                         io: FileIO(fd: target.fd, size: UInt64(max(0, st.st_size)), path: target.path))
        if let bad = sites.first(where: { refusals[$0.offset] != nil }), let refusal = refusals[bad.offset] {
            throw notProbeable("USDT \(spec) site", at: bad.offset, path: target.path, refusal)
        }
        return sites
    }

    private func usdtSites(_ spec: String, elf: ELFFile, path: String) throws(ResolveError) -> [Site] {
        let parts = spec.split(separator: ":", maxSplits: 1, omittingEmptySubsequences: false)
        guard parts.count == 2, !parts[0].isEmpty, !parts[1].isEmpty else {
            throw .invalidSpec("usdt '\(spec)' must be provider:name")
        }
        let provider = String(parts[0]), name = String(parts[1])
        let notes = elf.usdtNotes.filter { $0.provider == provider && $0.name == name }
        guard !notes.isEmpty else {
            var msg = "USDT probe \(provider):\(name) not found in \(path)"
            if elf.usdtNotes.isEmpty {
                msg += " (it has no .note.stapsdt probes)"
            } else {
                let avail = Array(Set(elf.usdtNotes.map { "\($0.provider):\($0.name)" })).sorted()
                msg += "; available: \(avail.prefix(20).joined(separator: ", "))\(avail.count > 20 ? ", …" : "")"
            }
            throw .usdtNotFound(msg)
        }
        var sites: [UInt64: Site] = [:]
        for n in notes {
            guard let off = elf.fileOffset(ofVirtualAddress: n.pc, executable: true) else {
                throw .malformed("USDT \(provider):\(name) in \(path) has pc 0x\(hex(n.pc)) outside executable segments")
            }
            var sema: UInt64?
            if n.semaphore != 0 {
                guard let s = elf.fileOffset(ofVirtualAddress: n.semaphore, executable: false) else {
                    throw .malformed("USDT \(provider):\(name) in \(path) has semaphore 0x\(hex(n.semaphore)) outside file-backed segments")
                }
                sema = s
            }
            sites[off] = Site(offset: off, symbol: "\(provider):\(name)", aliases: [], refCtr: sema, warning: nil)
        }
        guard sites.count <= limits.maxMatchesPerSpec else {
            throw .tooMany("USDT \(provider):\(name) has \(sites.count) sites in \(path), more than the limit of \(limits.maxMatchesPerSpec)")
        }
        return sites.values.sorted { $0.offset < $1.offset }
    }
}

func hex(_ v: UInt64) -> String { String(v, radix: 16) }

func sameFile(_ a: String, _ b: String) -> Bool {
    var sa = stat(), sb = stat()
    guard stat(a, &sa) == 0, stat(b, &sb) == 0 else { return false }
    return sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino
}

/// Levenshtein distance, giving up early (returning `cap`) once every path exceeds it.
func editDistance(_ a: [UInt8], _ b: [UInt8], cap: Int) -> Int {
    if a.isEmpty { return min(b.count, cap) }
    if b.isEmpty { return min(a.count, cap) }
    var prev = Array(0...b.count)
    var cur = [Int](repeating: 0, count: b.count + 1)
    for i in 1...a.count {
        cur[0] = i
        var rowMin = i
        for j in 1...b.count {
            cur[j] = Swift.min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1))
            rowMin = Swift.min(rowMin, cur[j])
        }
        if rowMin >= cap { return cap }
        swap(&prev, &cur)
    }
    return min(prev[b.count], cap)
}

extension String {
    /// Whether a UTF-8 byte of the string passes `test`, read from contiguous bytes: the
    /// generic `utf8.contains` walk was about 15% of resolving a 10,000-spec request.
    func containsUTF8(where test: (UInt8) -> Bool) -> Bool {
        var s = self
        return s.withUTF8 { $0.contains(where: test) }
    }
}
