import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// The last parsed loader cache, keyed by file identity and mtime: resolving 10,000 specs
/// against "libc" must not re-read /etc/ld.so.cache 10,000 times.
private let loaderCacheMemo = Mutex<(key: [Int64], entries: [LibraryLocator.CacheEntry])?>(nil)

/// Finds a shared library by name the way the dynamic loader would, or inside a process.
///
/// - Exact sonames (`libc.so.6`, `libsqlite3.so.0`) and short names (`libc` → `libc.so.6`,
///   `libsqlite3` → the first `libsqlite3.so.*`) are looked up in `/etc/ld.so.cache`
///   (glibc's `glibc-ld.so.cache1.1` format), then in the standard library directories.
/// - With a pid, the libraries that process actually mapped (`/proc/PID/maps`) win.
public struct LibraryLocator: Sendable {
    /// Path of the loader cache.
    public var cachePath: String
    /// Directories searched when the cache has no answer, in order.
    public var searchDirectories: [String]

    public init(cachePath: String = "/etc/ld.so.cache",
                searchDirectories: [String] = ["/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu",
                                               "/lib64", "/usr/lib64", "/usr/lib", "/lib"]) {
        self.cachePath = cachePath
        self.searchDirectories = searchDirectories
    }

    /// One `ld.so.cache` entry.
    public struct CacheEntry: Sendable, Equatable {
        public var soname: String
        public var path: String
        public var flags: Int32
    }

    /// Whether a spec `path` is a library name rather than a file path.
    public static func isLibraryName(_ s: String) -> Bool { !s.isEmpty && !s.contains("/") }

    /// Whether a library file name `base` (e.g. `libc.so.6`) answers to `name` (`libc`, `libc.so.6`).
    public static func matches(fileName base: String, name: String) -> Bool {
        if base == name { return true }
        if base.hasPrefix(name + ".so") { return true }             // libc -> libc.so.6, libc.so -> libc.so.6
        if !name.contains(".so"), base.hasPrefix(name + "-"), base.contains(".so") { return true } // libfoo-2.3.so
        return false
    }

    /// Resolves `name` to an absolute path on this host (or under `root`, e.g. `/proc/PID/root`).
    public func locate(_ name: String, root: String = "") throws(ResolveError) -> String {
        guard Self.isLibraryName(name) else { throw .invalidSpec("'\(name)' is not a library name") }
        let cache = Self.loadCache(root + cachePath)
        let x86 = cache.filter { Self.isX8664($0.flags) }
        // 1. exact soname, 2. short name -> versioned soname, 3. short name -> unversioned .so
        if let e = x86.first(where: { $0.soname == name }), fileExists(root + e.path) { return e.path }
        if !name.contains(".so") {
            if let e = x86.first(where: { $0.soname.hasPrefix(name + ".so.") }), fileExists(root + e.path) { return e.path }
            if let e = x86.first(where: { $0.soname == name + ".so" }), fileExists(root + e.path) { return e.path }
        }
        for dir in searchDirectories {
            let p = dir + "/" + name
            if fileExists(root + p) { return p }
        }
        if !name.contains(".so") {
            for dir in searchDirectories {
                let entries = listDirectory(root + dir).filter { $0.hasPrefix(name + ".so") }.sorted()
                if let best = entries.first(where: { $0.hasPrefix(name + ".so.") }) ?? entries.first {
                    return dir + "/" + best
                }
            }
        }
        throw .libraryNotFound("library '\(name)' not found in \(cachePath) or \(searchDirectories.joined(separator: ", ")); "
            + "give an absolute path, or install the library")
    }

    /// A file-backed mapping of a process, from `/proc/PID/maps`.
    public struct Mapping: Sendable, Equatable {
        /// The path as the kernel printed it (relative to the *reader's* root; a chroot shows the
        /// host path, another mount namespace may show a container-relative path).
        public var path: String
        /// `/proc/PID/map_files/START-END`: a link to exactly the mapped file, even if deleted.
        public var mapFile: String
        public var device: UInt64
        public var inode: UInt64
        public var deleted: Bool
    }

    /// The first mapping of process `pid` whose file name answers to library `name`, or nil.
    public func mappedLibrary(_ name: String, pid: Int32) throws(ResolveError) -> Mapping? {
        guard let data = readWholeFile("/proc/\(pid)/maps") else {
            throw .processNotFound("process \(pid) not found (no /proc/\(pid)/maps)")
        }
        for line in String(decoding: data, as: UTF8.self).split(separator: "\n") {
            // address perms offset dev inode path — the path is the 6th field and may contain spaces.
            let fields = line.split(separator: " ", maxSplits: 5, omittingEmptySubsequences: true)
            guard fields.count == 6 else { continue }
            var path = fields[5].trimmingLeadingSpaces()
            guard path.hasPrefix("/") else { continue }
            let deleted = path.hasSuffix(" (deleted)")
            if deleted { path = String(path.dropLast(10)) }
            let base = path.split(separator: "/").last.map(String.init) ?? ""
            guard Self.matches(fileName: base, name: name) else { continue }
            let devParts = fields[3].split(separator: ":")
            guard devParts.count == 2, let major = UInt64(devParts[0], radix: 16), let minor = UInt64(devParts[1], radix: 16),
                  let inode = UInt64(fields[4]) else { continue }
            return Mapping(path: path, mapFile: "/proc/\(pid)/map_files/\(fields[0])", device: makeDevice(major, minor),
                           inode: inode, deleted: deleted)
        }
        return nil
    }

    /// Parsed entries of the cache file at `path` (empty if missing or unreadable), memoised.
    static func loadCache(_ path: String) -> [CacheEntry] {
        var st = stat()
        guard stat(path, &st) == 0 else { return [] }
        let key: [Int64] = [Int64(bitPattern: UInt64(st.st_dev)), Int64(bitPattern: UInt64(st.st_ino)), Int64(st.st_size),
                            Int64(st.st_mtim.tv_sec), Int64(st.st_mtim.tv_nsec), Int64(st.st_ctim.tv_sec),
                            Int64(st.st_ctim.tv_nsec)]
        if let hit = loaderCacheMemo.withLock({ $0?.key == key ? $0?.entries : nil }) { return hit }
        guard let data = readWholeFile(path) else { return [] }
        let entries = (try? parseCache(data)) ?? []
        loaderCacheMemo.withLock { $0 = (key, entries) }
        return entries
    }

    /// x86-64 glibc entries: FLAG_ELF_LIBC6 (3) with FLAG_X8664_LIB64 (0x0300).
    static func isX8664(_ flags: Int32) -> Bool { flags & 0xff == 3 && flags & 0xff00 == 0x0300 }

    /// Parses the new-format (`glibc-ld.so.cache1.1`) cache, optionally preceded by the old
    /// `ld.so-1.7.0` table. Entry keys/values are offsets relative to the new header.
    public static func parseCache(_ bytes: [UInt8]) throws(ResolveError) -> [CacheEntry] {
        let r = ByteReader(bytes: bytes, what: "ld.so.cache")
        let newMagic = Array("glibc-ld.so.cache1.1".utf8)
        let oldMagic = Array("ld.so-1.7.0".utf8)
        var base = 0
        if bytes.starts(with: oldMagic) {
            let n = Int(try r.u32(12))
            guard n < 1 << 24 else { throw .malformed("ld.so.cache: bad old entry count") }
            base = 16 + n * 12
            base = (base + 7) & ~7
        }
        guard Array(try r.slice(base, newMagic.count)) == newMagic else {
            throw .malformed("ld.so.cache: unknown format")
        }
        let nlibs = Int(try r.u32(base + 20))
        guard nlibs < 1 << 24 else { throw .malformed("ld.so.cache: bad entry count") }
        var out: [CacheEntry] = []
        for i in 0..<nlibs {
            let e = base + 48 + i * 24
            let flags = Int32(bitPattern: try r.u32(e))
            let key = try r.cString(base + Int(try r.u32(e + 4)))
            let value = try r.cString(base + Int(try r.u32(e + 8)))
            out.append(CacheEntry(soname: key, path: value, flags: flags))
        }
        return out
    }
}

extension Substring {
    func trimmingLeadingSpaces() -> String { String(drop { $0 == " " }) }
}

/// glibc's `makedev` encoding of a major:minor pair (as printed in /proc/PID/maps) into `dev_t`.
func makeDevice(_ major: UInt64, _ minor: UInt64) -> UInt64 {
    ((major & 0xffff_f000) << 32) | ((major & 0xfff) << 8) | ((minor & 0xffff_ff00) << 12) | (minor & 0xff)
}

/// (st_dev, st_ino) of `p` following symlinks, or nil.
func fileIdentity(_ p: String) -> (UInt64, UInt64)? {
    var st = stat()
    guard stat(p, &st) == 0 else { return nil }
    return (UInt64(st.st_dev), UInt64(st.st_ino))
}

func fileExists(_ p: String) -> Bool {
    var st = stat()
    return stat(p, &st) == 0 && (st.st_mode & S_IFMT) == S_IFREG
}

func listDirectory(_ p: String) -> [String] {
    guard let d = opendir(p) else { return [] }
    defer { closedir(d) }
    var out: [String] = []
    while let ent = readdir(d) {
        let name = withUnsafeBytes(of: ent.pointee.d_name) { raw in
            String(decoding: raw.prefix { $0 != 0 }, as: UTF8.self)
        }
        if name != "." && name != ".." { out.append(name) }
    }
    return out
}

/// Reads a small file (proc files, the loader cache) completely; nil if it cannot be opened.
func readWholeFile(_ p: String, limit: Int = 64 << 20) -> [UInt8]? {
    let fd = open(p, O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { return nil }
    defer { close(fd) }
    var out: [UInt8] = []
    var chunk = [UInt8](repeating: 0, count: 65536)
    while out.count < limit {
        let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        if n < 0 { if errno == EINTR { continue }; return nil }
        if n == 0 { break }
        out += chunk[0..<n]
    }
    return out
}
