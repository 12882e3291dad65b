import CUprobeSys
import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

/// Which offsets of a refused uprobe_multi link the kernel refuses, found by asking it.
///
/// A link with one offset whose instruction x86 uprobes refuse fails as a whole (ENOTSUPP, or
/// ENOEXEC when the kernel's decoder fails) and names none. The resolver decides most cases
/// itself (`ProbeableInstruction`); this finds the rest, which depend on the kernel's opcode
/// tables (an invalid VEX opcode, a forced offset into the middle of an instruction).
///
/// How: the kernel analyses an instruction when it first installs the probe in a process that
/// maps the file. The pages holding the offsets are copied into a memfd (the rest stays a
/// hole), the daemon maps it executable, and links restricted to the daemon's own process
/// (`pid` = getpid()) are created on the copy: a failing set is halved until single offsets
/// remain. On a copy, not the file: the probes land in a mapping nothing executes, never in
/// the daemon's own code (libc, for one), and no other process is touched.
///
/// Cost: each attempt is a link creation and close (a grace period); about 2·log2(N) attempts
/// per refused offset, at most `maxAttempts`. Measured on Linux 6.18 (debug build, 2 CPUs): a
/// 4,005-function glob with one such function failed in 1.75 s, the search included; the
/// engine's writer waits meanwhile, on this error path only.
enum RefusedOffsets {
    static let maxAttempts = 48
    /// ENOTSUPP: the kernel-internal errno x86 uprobes return for an instruction they refuse.
    static let notSupported = Errno(rawValue: 524)

    /// Whether a failed link creation may be a refused instruction: ENOTSUPP, or ENOEXEC (the
    /// kernel's instruction decoder failed).
    static func mayBeRefusedInstruction(_ e: Errno) -> Bool { e == notSupported || e == .execFormatError }

    /// How the kernel's answer reads in a message.
    static func describe(_ e: Errno) -> String {
        if e == notSupported { return "ENOTSUPP: x86 uprobes refuse it" }
        if e == .execFormatError { return "ENOEXEC: the kernel's instruction decoder cannot decode it" }
        return "\(e)"
    }

    /// The error for a link the kernel refused with `errno`, naming the refused offsets when
    /// they can be found; nil when the errno is not about instructions.
    static func error(path: String, offsets: [UInt64], errno: Errno, program: FileDescriptor) -> KernelError? {
        guard mayBeRefusedInstruction(errno) else { return nil }
        guard let found = find(path: path, offsets: offsets, program: program), !found.refused.isEmpty else {
            return KernelError(code: .linkCreateFailed,
                               message: "bpf(BPF_LINK_CREATE uprobe_multi) (\(path)) failed: \(describe(errno)) for one of its "
                                   + "\(offsets.count) offsets, which could not be narrowed down (the file could not be copied "
                                   + "and mapped, or every offset attached on its own)",
                               errno: errno.rawValue)
        }
        let listed = found.refused.prefix(16).map { r in
            let hex = (found.bytes[r.offset] ?? []).map { b in (b < 16 ? "0" : "") + String(b, radix: 16) }.joined(separator: " ")
            return "0x\(String(r.offset, radix: 16)) (\(hex)…; \(describe(r.errno)))"
        }
        var message = "the kernel refused the instruction at offset\(found.refused.count == 1 ? "" : "s") "
            + listed.joined(separator: ", ") + (found.refused.count > 16 ? ", …" : "")
            + "; uprobed's own check could not tell (the kernel decides these with its opcode tables)"
        if !found.complete { message += "; the search stopped after \(found.attempts) attempts, so there may be others" }
        return KernelError(code: .instructionNotProbeable, message: message, errno: errno.rawValue)
    }

    /// What the search found: each refused offset with the kernel's errno, and whether every
    /// offset was settled (false: the attempt limit was reached).
    struct Finding {
        var refused: [(offset: UInt64, errno: Errno)]
        var complete: Bool
        var attempts: Int
        /// The first bytes at each refused offset.
        var bytes: [UInt64: [UInt8]]
    }

    /// The refused offsets among `offsets` of the file at `path` (nil: the copy could not be
    /// made or mapped, or no attempt failed). `program` is attached to the copy only, which
    /// nothing executes.
    static func find(path: String, offsets: [UInt64], program: FileDescriptor) -> Finding? {
        guard !offsets.isEmpty, let copy = SparseCopy(path: path, offsets: offsets) else { return nil }
        defer { copy.close() }
        let me = UInt32(getpid())
        var attempts = 0
        var refused: [(offset: UInt64, errno: Errno)] = []
        var complete = true
        /// nil: attached (no refused offset among them); else the errno.
        func attempt(_ set: ArraySlice<UInt64>) -> Errno? {
            attempts += 1
            do {
                let fd = try BPFSyscall.linkCreateUprobeMulti(
                    program: program, path: copy.kernelPath, offsets: Array(set), refCtrOffsets: nil,
                    cookies: [UInt64](repeating: 0, count: set.count), flags: 0, pid: me)
                try? fd.close()
                return nil
            } catch {
                return error.errno
            }
        }
        /// `set` is known to fail with `errno`.
        func narrow(_ set: ArraySlice<UInt64>, _ errno: Errno) {
            if set.count == 1, let only = set.first {
                refused.append((only, errno))
                return
            }
            guard attempts + 2 <= maxAttempts else {
                complete = false
                return
            }
            let mid = set.startIndex + set.count / 2
            for half in [set[set.startIndex..<mid], set[mid..<set.endIndex]] {
                if let e = attempt(half) { narrow(half, e) }
            }
        }
        let all = ArraySlice(Array(Set(offsets)).sorted())
        guard let first = attempt(all) else { return nil }
        narrow(all, first)
        return Finding(refused: refused.sorted { $0.offset < $1.offset }, complete: complete, attempts: attempts,
                       bytes: copy.bytes)
    }

    /// The file's pages that hold the offsets (and the next page, for an instruction crossing
    /// into it), copied at their offsets into a memfd of the file's size, mapped executable.
    final class SparseCopy {
        let fd: Int32
        let size: Int
        let mapping: UnsafeMutableRawPointer
        var kernelPath: String { "/proc/self/fd/\(fd)" }
        /// The first bytes at each offset, for messages.
        private(set) var bytes: [UInt64: [UInt8]] = [:]

        init?(path: String, offsets: [UInt64]) {
            let source = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK)
            guard source >= 0 else { return nil }
            defer { Glibc.close(source) }
            var st = stat()
            guard fstat(source, &st) == 0, st.st_size > 0 else { return nil }
            let memfd = CUprobeSys_memfd_create("uprobed-check")
            guard memfd >= 0 else { return nil }
            guard ftruncate(memfd, st.st_size) == 0 else {
                Glibc.close(memfd)
                return nil
            }
            let page: UInt64 = 4096
            var pages = Set<UInt64>()
            for off in offsets where off < UInt64(st.st_size) {
                pages.insert(off & ~(page - 1))
                pages.insert((off + 15) & ~(page - 1))
            }
            var buffer = [UInt8](repeating: 0, count: Int(page))
            for p in pages where p < UInt64(st.st_size) {
                let n = buffer.withUnsafeMutableBytes { pread(source, $0.baseAddress, Int(page), off_t(p)) }
                guard n >= 0, buffer.withUnsafeBytes({ pwrite(memfd, $0.baseAddress, n, off_t(p)) }) == n else {
                    Glibc.close(memfd)
                    return nil
                }
            }
            guard let m = mmap(nil, Int(st.st_size), PROT_READ | PROT_EXEC, MAP_PRIVATE, memfd, 0), m != MAP_FAILED else {
                Glibc.close(memfd)  // e.g. vm.memfd_noexec forbids executable memfd mappings
                return nil
            }
            fd = memfd
            size = Int(st.st_size)
            mapping = m
            for off in offsets where off < UInt64(st.st_size) {
                let end = min(Int(off) + 8, size)
                bytes[off] = Array(UnsafeRawBufferPointer(start: m + Int(off), count: end - Int(off)))
            }
        }

        func close() {
            munmap(mapping, size)
            Glibc.close(fd)
        }
    }
}
