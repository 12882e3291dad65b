import CUprobeSys
import Synchronization
import SystemPackage

/// Benchmark baseline: one perf_event per probe on the "uprobe" PMU (type from
/// /sys/bus/event_source/devices/uprobe/type, config1 = path pointer, config2 = offset, the
/// retprobe bit from .../format/retprobe), with the counting program attached by a
/// BPF_PERF_EVENT link whose bpf_cookie is `slot` (generation 0, so the program takes the
/// fast path unless the slot is flagged in `overlap`).
public final class PerfEventUprobe: Sendable {
    public let slot: UInt32
    private let fds: Mutex<(link: FileDescriptor, event: FileDescriptor)?>

    /// perf_event_open(2) of one uprobe, then BPF_LINK_CREATE (attach type BPF_PERF_EVENT) of
    /// `program`'s perf variant (a second load of the same instructions without the
    /// uprobe_multi expected attach type, sharing the maps). `pid` nil = every process.
    public init(program: CounterProgram, path: String, offset: UInt64, slot: UInt32, pid: Int32?,
                retprobe: Bool) throws(KernelError) {
        guard slot < program.capacity else {
            throw KernelError(code: .capacityExhausted, message: "slot \(slot) is outside the counter capacity \(program.capacity)")
        }
        guard let typeText = readSmallFile("/sys/bus/event_source/devices/uprobe/type"),
              let pmuType = UInt32(typeText.filter { !$0.isWhitespace }) else {
            throw KernelError(code: .perfPMUUnavailable, message: "no uprobe PMU in /sys/bus/event_source/devices/uprobe")
        }
        var config: UInt64 = 0
        if retprobe {
            // Format is "config:<bit>".
            guard let format = readSmallFile("/sys/bus/event_source/devices/uprobe/format/retprobe"),
                  let bitText = format.split(separator: ":").last,
                  let bit = UInt64(bitText.filter { !$0.isWhitespace }), bit < 64 else {
                throw KernelError(code: .perfPMUUnavailable, message: "the uprobe PMU has no retprobe format bit")
            }
            config = 1 << bit
        }
        let prog = try program.perfProgram()
        let event: FileDescriptor
        do {
            event = try BPFSyscall.perfUprobeOpen(pmuType: pmuType, config: config, path: path,
                                                  offset: offset, pid: pid ?? -1)
        } catch {
            throw KernelError(code: error.errno == .noSuchFileOrDirectory ? .pathNotFound : .perfEventOpenFailed,
                              error, context: "\(path)+\(offset)")
        }
        do {
            let link = try BPFSyscall.linkCreatePerfEvent(program: prog, perfEvent: event, cookie: UInt64(slot))
            fds = Mutex((link, event))
        } catch {
            try? event.close()
            throw KernelError(code: .linkCreateFailed, error, context: "perf_event link")
        }
        self.slot = slot
    }

    /// Closes the BPF link and the perf event (close(2) ×2). Idempotent.
    public func close() {
        let taken = fds.withLock { slot -> (link: FileDescriptor, event: FileDescriptor)? in
            defer { slot = nil }
            return slot
        }
        if let taken {
            try? taken.link.close()
            try? taken.event.close()
        }
    }

    deinit { close() }
}
