// libFuzzer harness for the ELF reader. UprobeELF is built by SwiftPM with coverage, ASan and
// -enable-testing (fuzz/build.sh): the testable import reaches the resolver's internal per-spec
// entry points, so no path is opened or canonicalized per input.
//
// Each input is written to one scratch file and parsed with ELFFile(fd:path:), the daemon's
// own path (pread, never mmap). What parses is then driven the way a request drives it: symbol
// lookups by plain, versioned and glob names, offsets, USDT specs, debug-symbol attachment.
// Traps, ASan reports, timeouts and runaway allocations are the findings; a few invariants of
// the parsed tables are checked too (see `checkTables`), failing with a message and abort().
import SystemPackage
@testable import UprobeELF
#if canImport(Glibc)
import Glibc
#endif

/// The scratch file: opened once per process and unlinked at once (the fuzzer runs millions of
/// inputs; creating a file per input would dominate the time).
let scratch: Int32 = {
    let dir = getenv("TMPDIR").map { String(cString: $0) } ?? "/tmp"
    var template = Array("\(dir)/elf-fuzz-XXXXXX".utf8CString)
    let fd = mkstemp(&template)
    if fd < 0 { perror("mkstemp"); abort() }
    unlink(template)
    return fd
}()

/// No debug directories (a fuzzed build-id must not pull files from the host) and no cache:
/// the scratch file keeps its inode, so a cache could hand back the previous input's parse.
let resolver = Resolver(limits: ResolverLimits(maxMatchesPerSpec: 10_000), locator: LibraryLocator(),
                        debugDirectories: [], cache: ELFFileCache(capacity: 0))

/// Every code a malformed file may produce; anything else from the parser is a finding.
let parseCodes: Set<String> = ["not_elf", "unsupported_elf", "malformed_elf"]

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzELF(_ data: UnsafePointer<UInt8>?, _ size: Int) -> CInt {
    guard ftruncate(scratch, 0) == 0 else { perror("ftruncate"); abort() }
    var written = 0
    while written < size, let data {
        let n = pwrite(scratch, data + written, size - written, off_t(written))
        if n <= 0 { perror("pwrite"); abort() }
        written += n
    }
    let elf: ELFFile
    do {
        elf = try ELFFile(fd: FileDescriptor(rawValue: scratch), path: "/fuzz/input")
    } catch {
        check(parseCodes.contains("\(error.code)"), "unexpected parse error code \(error)")
        return 0
    }
    check(elf.fileSize == UInt64(size), "fileSize \(elf.fileSize) for \(size) bytes")
    // Each symbol is a 24-byte entry of the file: more than fit means tables were read more than
    // once, and the parse grows faster than the file (a memory amplification, not a big input).
    check(elf.functionSymbols.count * 24 <= size, "\(elf.functionSymbols.count) symbols from \(size) bytes")
    checkTables(elf)
    exerciseResolver(elf)
    // Attaching a "debug file" with the same build-id (itself) re-indexes duplicated symbols.
    var twice = elf
    if twice.attachDebugSymbols(elf, path: "/fuzz/debug") {
        check(twice.functionSymbols.count == 2 * elf.functionSymbols.count, "debug symbols not appended")
        checkTables(twice)
        exerciseResolver(twice)
    }
    return 0
}

/// Invariants of the parsed tables that callers rely on.
func checkTables(_ elf: ELFFile) {
    if let id = elf.buildID {
        check(!id.isEmpty && id.count % 2 == 0 && id.utf8.allSatisfy { (0x30...0x39).contains($0) || (0x61...0x66).contains($0) },
              "build-id is not lowercase hex bytes: \(id.debugDescription)")
    }
    for (i, s) in elf.functionSymbols.enumerated() {
        // An empty base name is possible (a .symtab name "@VER"): see fuzz/README.md, findings.
        check(!s.name.contains("@"), "symbol base name \(s.name.debugDescription) has a version in it")
        check(s.address != 0, "symbol \(s.name) at address 0")
        check(elf.symbolsByName[s.name]?.contains(i) == true, "symbol \(i) missing from symbolsByName")
        check(elf.symbolsByAddress[s.address]?.contains(i) == true, "symbol \(i) missing from symbolsByAddress")
    }
    for (name, off) in elf.uniqueFunctionOffsets {
        let syms = elf.symbols(named: name)
        check(syms.count == 1, "uniqueFunctionOffsets has \(name) with \(syms.count) symbols")
        check(elf.fileOffset(ofVirtualAddress: syms[0].address, executable: true) == off,
              "uniqueFunctionOffsets[\(name)] disagrees with fileOffset")
    }
}

func exerciseResolver(_ elf: ELFFile) {
    let path = "/fuzz/input"
    // Names from the file itself, bounded: glibc's fnmatch backtracks, and a file could
    // otherwise make the harness (not the daemon) slow with thousands of long starry names.
    var requests: [String] = ["*", "?*", "[a-m]*", "*@*", "*@@*", "main", "no_such_function_xyz", "x@", "@V"]
    for s in elf.functionSymbols.prefix(16) where s.name.utf8.count <= 64 {
        requests.append(s.name)
        requests.append(s.versionedName)
        requests.append(String(s.name.prefix(3)) + "*")
        if let v = s.version { requests.append(s.name + "@" + v) }
    }
    for request in requests {
        guard let (sites, _) = try? resolver.resolveSymbol(request, elf: elf, path: path) else { continue }
        check(!sites.isEmpty, "resolveSymbol(\(request)) succeeded with no sites")
        for site in sites {
            check(elf.virtualAddress(ofExecutableFileOffset: site.offset) != nil,
                  "resolveSymbol(\(request)) gave offset \(site.offset) outside executable segments")
        }
    }

    var offsets: [UInt64] = [0, 1]
    for p in elf.programHeaders.prefix(16) where p.isLoad && p.isExecutable {
        offsets += [p.offset, p.offset &+ 1, p.offset &+ p.fileSize &- 1]
    }
    for s in elf.functionSymbols.prefix(16) {
        if let off = elf.fileOffset(ofVirtualAddress: s.address, executable: true) { offsets += [off, off &+ 1] }
    }
    // The scratch file as the resolver's opened target (its descriptor reads the same bytes).
    let target = Resolver.Target(fd: FileDescriptor(rawValue: scratch), path: path, device: 0, inode: 0)
    for off in offsets {
        for force in [false, true] {
            guard let site = try? resolver.resolveOffset(off, elf: elf, target: target, force: force) else { continue }
            check(site.offset == off, "resolveOffset(\(off)) moved the offset to \(site.offset)")
        }
    }

    var specs = ["a:b", "nocolon", ":", "p:"]
    for n in elf.usdtNotes.prefix(16) { specs.append("\(n.provider):\(n.name)") }
    for spec in specs {
        _ = try? resolver.resolveUSDT(spec, elf: elf, target: target)
    }
}

func check(_ ok: @autoclosure () -> Bool, _ message: @autoclosure () -> String) {
    if !ok() {
        let text = "ELFFuzz check failed: \(message())\n"
        _ = text.withCString { write(2, $0, strlen($0)) }
        abort()
    }
}
