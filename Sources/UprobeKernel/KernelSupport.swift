import CUprobeSys
import SystemPackage

/// Start-up probe of the kernel features the attacher needs.
public enum KernelSupport {
    /// Probe once at start: BPF available (BPF_MAP_CREATE + BPF_PROG_LOAD of the counting
    /// program with expected attach type uprobe_multi) and the uprobe_multi link type
    /// supported (BPF_LINK_CREATE on "/" must fail with EBADF — "not a regular file" — rather
    /// than EINVAL, which old kernels return for the unknown attach type).
    /// Throws `bpf_unavailable` or `uprobe_multi_unsupported` with a clear message.
    public static func check() throws(KernelError) {
        let program = try CounterProgram(capacity: 1, markCapacity: 1)
        do {
            let fd = try BPFSyscall.linkCreateUprobeMulti(program: program.multiProgram, path: "/",
                                                          offsets: [0], refCtrOffsets: nil,
                                                          cookies: [0], flags: 0, pid: 0)
            try? fd.close()   // unexpected, but then the link type evidently exists
        } catch {
            switch error.errno {
            case .badFileDescriptor, .noSuchFileOrDirectory:
                return      // the kernel parsed the uprobe_multi attr and looked at the path
            case .notPermitted, .permissionDenied:
                throw KernelError(code: .bpfUnavailable, error, context: "uprobe_multi link probe")
            default:
                throw KernelError(code: .uprobeMultiUnsupported,
                                  message: "the kernel does not support uprobe_multi links (needs Linux >= 6.6 with CONFIG_UPROBES): \(error.call) failed: \(error.errno)",
                                  errno: error.errno.rawValue)
            }
        }
    }
}
