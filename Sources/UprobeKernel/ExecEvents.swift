import CUprobeSys
import SystemPackage

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Tells the daemon, at once, that a watched process called execve(2).
///
/// An unprivileged process gains privileges only by exec'ing a setuid, setgid or
/// file-capability binary, so the ownership check of pid-filtered probes (see the server's
/// `OwnershipWatcher`) must look again right after every exec of a watched process rather than
/// at its next periodic round. A BPF program on the `sched_process_exec` raw tracepoint (it
/// runs once the new credentials are committed, before the new image runs a user instruction)
/// looks the exec'ing process up in a hash map of watched pids and, for those only, writes
/// (pid, CLOCK_MONOTONIC ns) to a ring buffer whose fd becomes readable. Every other exec on
/// the host costs one hash lookup.
///
/// Only the daemon's own thread uses an instance (it holds the ring buffer's mappings).
public final class ExecEvents {
    /// One exec of a watched process.
    public struct Event: Sendable, Equatable {
        public var pid: Int32
        /// When it happened, CLOCK_MONOTONIC nanoseconds (bpf_ktime_get_ns).
        public var monotonicNanos: UInt64
    }

    private let pidMap: FileDescriptor
    private let ring: FileDescriptor
    private let program: FileDescriptor
    private let attachment: FileDescriptor
    private let pageSize: Int
    private let ringBytes: Int
    private let consumerPage: UnsafeMutableRawPointer
    private let producerArea: UnsafeMutableRawPointer
    private var watched: Set<Int32> = []

    /// Pollable (POLLIN) when events are waiting.
    public var fd: Int32 { ring.rawValue }

    static let helperKtimeGetNs: Int32 = 5
    static let helperRingbufOutput: Int32 = 130
    /// BPF_RB_FORCE_WAKEUP: wake the reader for every record (they are rare: execs of the few
    /// watched processes), instead of only when it has caught up.
    static let forceWakeup: Int32 = 2

    /// Creates the maps, loads the program and attaches it. Errors: `exec_events_unavailable`
    /// with the failing step (the caller then relies on its periodic check alone).
    /// `maxProcesses` bounds the watched pids; `ringBytes` (a power of two, at least a page)
    /// bounds the events waiting to be read (more are dropped; the fd stays readable).
    public init(maxProcesses: UInt32 = 65_536, ringBytes: Int = 16 * 1024) throws(KernelError) {
        let page = Int(sysconf(Int32(_SC_PAGESIZE)))
        let size = max(ringBytes, page)
        guard size & (size - 1) == 0 else {
            throw KernelError(code: .invalidArgument, message: "ringBytes must be a power of two")
        }
        var opened: [FileDescriptor] = []
        func fail(_ what: String, _ error: SyscallFailure) -> KernelError {
            for fd in opened { try? fd.close() }
            return KernelError(code: .execEventsUnavailable, error, context: what)
        }
        let pids: FileDescriptor, ring: FileDescriptor
        do {
            // Allocated as pids are added: most daemons watch none or a few.
            pids = try BPFSyscall.mapCreate(type: BPF_MAP_TYPE_HASH, keySize: 4, valueSize: 4, maxEntries: maxProcesses,
                                            flags: UInt32(BPF_F_NO_PREALLOC), name: "uprobed_execpid")
            opened.append(pids)
            ring = try BPFSyscall.mapCreate(type: BPF_MAP_TYPE_RINGBUF, keySize: 0, valueSize: 0,
                                            maxEntries: UInt32(size), name: "uprobed_execs")
            opened.append(ring)
        } catch {
            throw fail("exec event maps", error)
        }
        let insns = Self.instructions(pids: pids.rawValue, ring: ring.rawValue)
        let program: FileDescriptor
        switch BPFSyscall.progLoad(type: BPF_PROG_TYPE_RAW_TRACEPOINT, expectedAttachType: 0,
                                   instructions: insns, license: "GPL", name: "uprobed_exec") {
        case .success(let fd): program = fd
        case .failure(let pf):
            for fd in opened { try? fd.close() }
            throw KernelError(code: .execEventsUnavailable,
                              message: "\(pf.failure.call) (exec event program) failed: \(pf.failure.errno); verifier log: \(pf.log)",
                              errno: pf.failure.errno.rawValue)
        }
        opened.append(program)
        let attachment: FileDescriptor
        do {
            attachment = FileDescriptor(rawValue: try BPFSyscall.retryingEINTR("bpf(BPF_RAW_TRACEPOINT_OPEN)") {
                CUprobeSys_raw_tracepoint_open("sched_process_exec", program.rawValue)
            })
        } catch {
            throw fail("sched_process_exec", error)
        }
        opened.append(attachment)
        // The kernel lets the consumer position page be mapped writable; the producer position
        // page and the data (mapped twice in a row by the kernel) read-only.
        let consumer = mmap(nil, page, PROT_READ | PROT_WRITE, MAP_SHARED, ring.rawValue, 0)
        guard let consumer, consumer != MAP_FAILED else {
            throw fail("mmap of the exec ring buffer", SyscallFailure(call: "mmap", errno: Errno(rawValue: errno)))
        }
        let producer = mmap(nil, page + 2 * size, PROT_READ, MAP_SHARED, ring.rawValue, off_t(page))
        guard let producer, producer != MAP_FAILED else {
            let e = errno
            munmap(consumer, page)
            throw fail("mmap of the exec ring buffer", SyscallFailure(call: "mmap", errno: Errno(rawValue: e)))
        }
        self.pidMap = pids
        self.ring = ring
        self.program = program
        self.attachment = attachment
        self.pageSize = page
        self.ringBytes = size
        self.consumerPage = consumer
        self.producerArea = producer
    }

    deinit {
        munmap(consumerPage, pageSize)
        munmap(producerArea, pageSize + 2 * ringBytes)
        for fd in [attachment, program, ring, pidMap] { try? fd.close() }
    }

    /// Makes `pids` the watched set (adds and removes the difference). Returns how many pids
    /// could not be added (the map is full); those are left to the periodic check.
    @discardableResult
    public func watch(_ pids: Set<Int32>) -> Int {
        var failed = 0
        var one: UInt32 = 1
        for pid in watched.subtracting(pids) {
            var key = pid
            _ = try? BPFSyscall.mapDelete(pidMap, key: &key)
            watched.remove(pid)
        }
        for pid in pids.subtracting(watched) {
            var key = pid
            do {
                try BPFSyscall.mapUpdate(pidMap, key: &key, value: &one)
                watched.insert(pid)
            } catch {
                failed += 1
            }
        }
        return failed
    }

    /// Consumes every event waiting (making the fd unreadable until the next one); returns up
    /// to `limit` of them, oldest first.
    public func drain(limit: Int = 256) -> [Event] {
        var records = [CUprobeSys_ringbuf_record](repeating: CUprobeSys_ringbuf_record(), count: max(limit, 1))
        let n = records.withUnsafeMutableBufferPointer { out in
            CUprobeSys_ringbuf_drain(consumerPage.assumingMemoryBound(to: UInt64.self),
                                     producerArea.assumingMemoryBound(to: UInt64.self),
                                     producerArea.assumingMemoryBound(to: UInt8.self) + pageSize,
                                     UInt64(ringBytes), out.baseAddress, Int32(out.count))
        }
        return records.prefix(min(Int(n), records.count)).map { r in
            Event(pid: Int32(truncatingIfNeeded: r.words.0 & 0xffff_ffff), monotonicNanos: r.words.1)
        }
    }

    /// The raw tracepoint program: the 16-byte record (tgid, 0, ktime) is built on the stack,
    /// and written to the ring only if the tgid is in the watched map.
    static func instructions(pids: Int32, ring: Int32) -> [UInt64] {
        var a = BPFAssembler()
        let out = a.newLabel()
        a.call(CounterProgram.helperGetCurrentPidTgid)
        a.rsh(.r0, imm: 32)                       // tgid: the pid a pid filter names
        a.storeW(.r10, off: -16, .r0)
        a.mov(.r1, imm: 0)
        a.storeW(.r10, off: -12, .r1)
        a.call(helperKtimeGetNs)
        a.storeDW(.r10, off: -8, .r0)
        a.loadMap(.r1, fd: pids)
        a.mov(.r2, .r10)
        a.add(.r2, imm: -16)
        a.call(CounterProgram.helperMapLookup)
        a.jumpIfZero(.r0, out)
        a.loadMap(.r1, fd: ring)
        a.mov(.r2, .r10)
        a.add(.r2, imm: -16)
        a.mov(.r3, imm: 16)
        a.mov(.r4, imm: forceWakeup)
        a.call(helperRingbufOutput)
        a.bind(out)
        a.mov(.r0, imm: 0)
        a.exit()
        return a.finish()
    }
}
