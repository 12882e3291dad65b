import CUprobeSys
import Dispatch
import Logging
import NIOCore
import NIOPosix
import ServiceLifecycle
import Synchronization
import UprobeCore
import UprobeELF
import UprobeKernel
import UprobedProtocol
#if canImport(Glibc)
import Glibc
#endif

/// Settings of the daemon's process, made once by `main` before the service starts.
public enum DaemonProcess {
    /// Descriptors to keep beyond `max_connections` for the engine: a batch of single-probe
    /// registrations makes one link (one fd) each until the next merge, and the resolver opens
    /// the binaries it reads. Below this, the daemon warns at start.
    static let descriptorReserve: UInt64 = 4096

    /// Raises the soft RLIMIT_NOFILE to the hard limit (setrlimit(2)) and returns the limits
    /// then in force. The daemon never uses select(2), so the historical soft limit of 1024
    /// protects nothing here, while every uprobe_multi link and client connection is an fd.
    /// The shipped unit filters setrlimit out (`~@resources`); its `LimitNOFILE` sets both
    /// limits, so there is nothing to raise there.
    @discardableResult
    public static func raiseFileLimit() -> (soft: UInt64, hard: UInt64) {
        var limit = rlimit()
        let resource = __rlimit_resource_t(RLIMIT_NOFILE.rawValue)
        guard getrlimit(resource, &limit) == 0 else { return (0, 0) }
        if limit.rlim_cur < limit.rlim_max {
            var raised = limit
            raised.rlim_cur = limit.rlim_max
            if setrlimit(resource, &raised) == 0 { limit = raised }
        }
        return (UInt64(limit.rlim_cur), UInt64(limit.rlim_max))
    }

    /// Large requests build multi-megabyte buffers (a 10,000-probe request: its 0.5 MB line,
    /// the 3.5 MB state-log line, the 1.2 MB reply; a `stats` of 10,000 probes: 330 KB).
    /// glibc gives each block over 128 KiB its own mmap and unmaps it on free, so each such
    /// request faulted in fresh zeroed pages: ~4,000 faults (16 MB) per 10,000-probe register
    /// and unregister, measured; encoding that register's state-log line took 14 ms instead
    /// of 9. Blocks up to 32 MiB now come from the heap, and up to 64 MiB of freed heap stays
    /// mapped for the next request (that much resident memory is the price), per arena: after
    /// bulk work (a whole binary registered or removed) a heap-release window puts glibc's
    /// default trim threshold back until the trim that follows it (`MemoryTrimmer`).
    /// Returns false if glibc refused the settings (the daemon runs anyway, slower on big requests).
    @discardableResult
    public static func keepFreedMemory() -> Bool {
        CUprobeSys_keep_freed_memory(32 << 20, 64 << 20) != 0
    }
}
