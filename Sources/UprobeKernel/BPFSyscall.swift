import CUprobeSys
import SystemPackage
import UprobeErrors
import UprobeSystem

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// An error of the kernel attacher: its code (passed on by the engine and the wire protocol),
/// a message for humans, and the failing syscall's errno, if any.
public struct KernelError: Error, Sendable, CustomStringConvertible {
    public let code: ErrorCode
    public let message: String
    public let errno: Int32?

    public init(code: ErrorCode, message: String, errno: Int32? = nil) {
        self.code = code
        self.message = message
        self.errno = errno
    }

    /// `errno` as a swift-system value.
    public var errnoValue: Errno? { errno.map { Errno(rawValue: $0) } }

    public var description: String {
        "\(code): \(message)"
    }

    init(code: ErrorCode, _ failure: SyscallFailure, context: String = "") {
        let what = context.isEmpty ? failure.call : "\(failure.call) (\(context))"
        self.init(code: code, message: "\(what) failed: \(failure.errno)", errno: failure.errno.rawValue)
    }
}

/// A failed syscall of the attacher: the daemon's one syscall error type.
typealias SyscallFailure = SyscallError

/// A failed BPF_PROG_LOAD: the syscall failure and the verifier log.
struct ProgLoadFailure: Error, Sendable {
    let failure: SyscallFailure
    let log: String
}

/// The raw syscalls of the attacher, as static functions. Each one wraps one bpf(2) command or
/// perf_event_open(2) (through the C shim, because syscall(2) is variadic) and returns the
/// result or throws `SyscallFailure`; EINTR is retried.
enum BPFSyscall {
    /// Runs `body` (a syscall returning -1 and setting errno on failure) until it does not
    /// fail with EINTR; throws the call's name with errno on any other failure.
    @inline(__always)
    static func retryingEINTR(_ call: String, _ body: () -> Int32) throws(SyscallFailure) -> Int32 {
        try Syscall.run(call, "", body)
    }

    /// BPF_MAP_CREATE: a new map, returned as an owned fd.
    static func mapCreate(type: bpf_map_type, keySize: UInt32, valueSize: UInt32,
                          maxEntries: UInt32, flags: UInt32 = 0,
                          name: String) throws(SyscallFailure) -> FileDescriptor {
        let fd = try retryingEINTR("bpf(BPF_MAP_CREATE)") {
            CUprobeSys_map_create(type.rawValue, keySize, valueSize, maxEntries, flags, name)
        }
        return FileDescriptor(rawValue: fd)
    }

    /// BPF_PROG_LOAD with a verifier log buffer. On failure returns the errno and the log.
    static func progLoad(type: bpf_prog_type, expectedAttachType: UInt32,
                         instructions: [UInt64], license: String,
                         name: String) -> Result<FileDescriptor, ProgLoadFailure> {
        let logSize = 1 << 20
        var log = [CChar](repeating: 0, count: logSize)
        let result: Result<Int32, SyscallFailure> = instructions.withUnsafeBufferPointer { insns in
            log.withUnsafeMutableBufferPointer { logBuf in
                Result { () throws(SyscallFailure) -> Int32 in
                    try retryingEINTR("bpf(BPF_PROG_LOAD)") {
                        CUprobeSys_prog_load(type.rawValue, expectedAttachType, insns.baseAddress,
                                             UInt32(insns.count), license, name,
                                             logBuf.baseAddress, UInt32(logSize))
                    }
                }
            }
        }
        switch result {
        case .success(let fd): return .success(FileDescriptor(rawValue: fd))
        case .failure(let failure):
            let text = log.withUnsafeBufferPointer { buf in
                String(decoding: buf.prefix(while: { $0 != 0 }).map { UInt8(bitPattern: $0) }, as: UTF8.self)
            }
            return .failure(ProgLoadFailure(failure: failure, log: text))
        }
    }

    /// BPF_LINK_CREATE of a uprobe_multi link (attach type BPF_TRACE_UPROBE_MULTI, or
    /// BPF_TRACE_UPROBE_SESSION for a latency link).
    static func linkCreateUprobeMulti(program: FileDescriptor, path: String, offsets: [UInt64],
                                      refCtrOffsets: [UInt64]?, cookies: [UInt64],
                                      flags: UInt32, pid: UInt32,
                                      attachType: UInt32 = CUPROBESYS_BPF_TRACE_UPROBE_MULTI) throws(SyscallFailure) -> FileDescriptor {
        let fd = try offsets.withUnsafeBufferPointer { (offs) throws(SyscallFailure) -> Int32 in
            try cookies.withUnsafeBufferPointer { (cks) throws(SyscallFailure) -> Int32 in
                try withOptionalBuffer(refCtrOffsets) { (refs) throws(SyscallFailure) -> Int32 in
                    try retryingEINTR("bpf(BPF_LINK_CREATE uprobe_multi)") {
                        CUprobeSys_link_create_uprobe_multi_as(program.rawValue, attachType, path, offs.baseAddress,
                                                            refs, cks.baseAddress,
                                                            UInt32(offs.count), flags, pid)
                    }
                }
            }
        }
        return FileDescriptor(rawValue: fd)
    }

    /// BPF_LINK_CREATE of a BPF_PERF_EVENT link with a bpf_cookie.
    static func linkCreatePerfEvent(program: FileDescriptor, perfEvent: FileDescriptor,
                                    cookie: UInt64) throws(SyscallFailure) -> FileDescriptor {
        let fd = try retryingEINTR("bpf(BPF_LINK_CREATE perf_event)") {
            CUprobeSys_link_create_perf_event(program.rawValue, perfEvent.rawValue, cookie)
        }
        return FileDescriptor(rawValue: fd)
    }

    /// BPF_MAP_UPDATE_ELEM (flags: BPF_ANY = 0).
    static func mapUpdate(_ map: FileDescriptor, key: UnsafeRawPointer, value: UnsafeRawPointer,
                          flags: UInt64 = 0) throws(SyscallFailure) {
        _ = try retryingEINTR("bpf(BPF_MAP_UPDATE_ELEM)") {
            CUprobeSys_map_update_elem(map.rawValue, key, value, flags)
        }
    }

    /// BPF_MAP_LOOKUP_ELEM. Returns false when the key is absent (ENOENT).
    static func mapLookup(_ map: FileDescriptor, key: UnsafeRawPointer,
                          value: UnsafeMutableRawPointer) throws(SyscallFailure) -> Bool {
        do {
            _ = try retryingEINTR("bpf(BPF_MAP_LOOKUP_ELEM)") {
                CUprobeSys_map_lookup_elem(map.rawValue, key, value)
            }
            return true
        } catch where error.errno == .noSuchFileOrDirectory {
            return false
        }
    }

    /// BPF_MAP_DELETE_ELEM. Returns false when the key was already absent (ENOENT).
    @discardableResult
    static func mapDelete(_ map: FileDescriptor, key: UnsafeRawPointer) throws(SyscallFailure) -> Bool {
        do {
            _ = try retryingEINTR("bpf(BPF_MAP_DELETE_ELEM)") {
                CUprobeSys_map_delete_elem(map.rawValue, key)
            }
            return true
        } catch where error.errno == .noSuchFileOrDirectory {
            return false
        }
    }

    /// BPF_MAP_GET_NEXT_KEY (`key` nil = first key). Returns false at the end (ENOENT).
    static func mapNextKey(_ map: FileDescriptor, key: UnsafeRawPointer?,
                           next: UnsafeMutableRawPointer) throws(SyscallFailure) -> Bool {
        do {
            _ = try retryingEINTR("bpf(BPF_MAP_GET_NEXT_KEY)") {
                CUprobeSys_map_get_next_key(map.rawValue, key, next)
            }
            return true
        } catch where error.errno == .noSuchFileOrDirectory {
            return false
        }
    }

    /// BPF_MAP_UPDATE_BATCH: writes `count` u32 keys and their values (`valueSize` bytes each)
    /// in one call (array maps, Linux >= 5.6). An interrupted call resumes where it stopped.
    static func mapUpdateBatch(_ map: FileDescriptor, keys: UnsafePointer<UInt32>, values: UnsafeRawPointer,
                               valueSize: Int, count: UInt32) throws(SyscallFailure) {
        var done: UInt32 = 0
        while done < count {
            var n = count - done
            let rc = CUprobeSys_map_update_batch(map.rawValue, keys + Int(done), values + Int(done) * valueSize, &n)
            let err = errno
            done += n
            if rc == 0 { continue }
            if err == EINTR { continue }
            throw SyscallFailure(call: "bpf(BPF_MAP_UPDATE_BATCH)", errno: Errno(rawValue: err))
        }
    }

    /// perf_event_open(2) on the "uprobe" PMU; see CUprobeSys_perf_uprobe_open.
    static func perfUprobeOpen(pmuType: UInt32, config: UInt64, path: String, offset: UInt64,
                               pid: Int32) throws(SyscallFailure) -> FileDescriptor {
        let fd = try retryingEINTR("perf_event_open(uprobe)") {
            CUprobeSys_perf_uprobe_open(pmuType, config, path, offset, pid)
        }
        return FileDescriptor(rawValue: fd)
    }

    private static func withOptionalBuffer<R>(
        _ array: [UInt64]?, _ body: (UnsafePointer<UInt64>?) throws(SyscallFailure) -> R
    ) throws(SyscallFailure) -> R {
        guard let array else { return try body(nil) }
        return try array.withUnsafeBufferPointer { (buf) throws(SyscallFailure) -> R in try body(buf.baseAddress) }
    }
}
