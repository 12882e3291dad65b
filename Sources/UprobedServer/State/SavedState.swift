import Foundation
import SystemPackage
import UprobeCore
import UprobeELF
import UprobeKernel
import UprobeSystem
#if canImport(Glibc)
import Glibc
import UprobeErrors
#endif

/// A state file that cannot be read or written, with a stable code.
public struct StateError: Error, Sendable, CustomStringConvertible {
    /// `state_corrupt` (the file exists but is not a state file this daemon understands),
    /// `state_incomplete` (the files are readable but changes are missing between them: see
    /// `StateCodec.replay`) or `state_io` (the file system refused).
    public let code: ErrorCode
    public let message: String
    /// The failed call behind a `state_io` error; its errno tells a full disk (ENOSPC, EDQUOT)
    /// from other failures.
    public var cause: SyscallError? = nil
    /// For `state_incomplete`: the sequence numbers of the changes that are in no file.
    public var missingChanges: ClosedRange<UInt64>? = nil
    public var description: String { "\(message) [\(code)]" }

    /// A `state_io` error: what the store could not do, then the call that failed, on what, and
    /// its errno (`cannot append to the log: write(/var/lib/uprobed/state.log): No space left
    /// on device`).
    static func io(_ what: String, _ cause: SyscallError) -> StateError {
        StateError(code: .stateIO, message: "\(what): \(cause)", cause: cause)
    }

    /// The file system is out of space (or the quota is used up): a write may succeed once
    /// space is freed, e.g. by the space reserve (`SpaceReserve`).
    var isDiskFull: Bool { cause?.errno == .noSpace || cause?.errno == .diskQuotaExceeded }
}

/// What identified a probed binary when it was registered, to tell after a restart whether it
/// is still the same file.
public struct FileStamp: Sendable, Hashable {
    public var device: UInt64
    public var inode: UInt64
    public var size: Int64
    public var mtimeNanos: Int64
}

/// One registration as the state file keeps it.
public struct SavedProbe: Sendable, Equatable {
    public var id: String
    public var consumer: String?
    public var owner: Peer
    public var spec: ProbeSpecInput
    public var registeredAt: Double
    /// Hits counted up to the save (carried over as `baseHits` after a restart).
    public var hits: UInt64
    /// Where it was resolved when first registered (never replaced by a later resolution).
    public var targets: [ResolvedProbe]
    /// The first target's file as it was when registered.
    public var stamp: FileStamp?
    /// For a `pid` filter: the process's start time (clock ticks after boot, /proc/PID/stat
    /// field 22) when registered, to notice a reused pid.
    public var pidStartTime: UInt64?
    /// Why it was degraded at the last start (informational; every start decides afresh).
    public var degradedReason: String?
    /// Why it ended (its process exited or stopped being its owner's). Unlike a degraded
    /// registration, an ended one is never attached again: it comes back ended.
    public var endedReason: String? = nil
    /// The counter slot of each target (the same order), while the registration counts in
    /// exactly those sites: a restart adopts the pinned links that count into them.
    public var slots: [UInt32]? = nil
    /// With `slots`: the hits not in those counters (earlier lives' counts, carried over).
    /// A restart that adopts the slots' links reports `baseHits` + the counters, which went
    /// on counting while no daemon ran; one that attaches again starts from `hits`.
    public var baseHits: UInt64 = 0
    /// The probe set that owns it (`ProbeRecord.probeSet`), so a restart knows which
    /// registrations its reconcile may change and which came through the API.
    public var probeSet: String? = nil
    /// A latency probe's histogram up to the save (carried over as `baseLatency`).
    public var latency: LatencyHistogram? = nil
    /// With `slots`, for a latency probe: the part of `latency` its rows do not hold (earlier
    /// lives' measurements; nil when the rows hold it all). A restart that adopts its pinned
    /// links reports this plus the rows, which measured on while no daemon ran; one that
    /// attaches again starts from `latency`.
    public var latencyBase: LatencyHistogram? = nil
    /// With `slots`, for a followed registration whose binary was replaced: its sites in older
    /// file versions still mapped by some process (each with its slot), so a restart adopts
    /// their pinned links too and old processes stay counted. nil when it has none.
    public var olderSites: [SavedSite]? = nil
    /// A followed registration's retired file versions (`ProbeRecord.retired`).
    public var retired: RetiredVersions = []
    /// Read from a group whose names are in a names file (format 5): that file, until
    /// `NameFiles.fill` has given the target its symbol (and aliases). Never written.
    public var nameFile: String? = nil
    /// Why its target has no symbol after a restore: its names file could not be used and its
    /// binary is no longer the file it was registered on (see `NameFiles`). Never written.
    public var unknownNames: String? = nil
}

/// A site of a followed registration in an older file version.
public struct SavedSite: Sendable, Equatable {
    public var target: ResolvedProbe
    public var slot: UInt32
}

/// The whole state file.
public struct SavedState: Sendable, Equatable {
    public static let format = "uprobed-state"
    /// 2: runs (`StateCodec.writeProbes`) in the snapshot and the log. 3: counter slots and
    /// base hits (`SavedProbe.slots`), in full entries and as row members 5 and 6. 4: groups
    /// instead of runs (`StateCodec.writeGroup`: a glob's registrations too, per-registration
    /// data in columns). 5: a glob group's names in a names file (`NameTable`), the group
    /// naming it (`"names"`) instead of carrying a `symbols` column. Versions 1 to 4 are read.
    public static let version: Int64 = 5
    /// The format version of the file this state was read from (`version` when made here).
    public var formatVersion: Int64 = SavedState.version
    /// /proc/sys/kernel/random/boot_id when saved: pids and start times mean nothing across boots.
    public var bootID: String?
    public var savedAt: Double
    public var probes: [SavedProbe]
    /// Sequence number of the last change this state includes: log entries at or below it are
    /// already in it (see StateStore).
    public var seq: UInt64 = 0
    /// Lowest probe number never handed out (ids are `p<N>`): a restart must not give a removed
    /// probe's id to a new one, or a client still holding it would act on someone else's probe.
    public var nextID: UInt64 = 1
    /// Some names file could not be used at load (`NameFiles.fill`): the daemon writes a
    /// snapshot once restored, which writes the names files again. Never written.
    public var namesRepairDue = false
}

// What the model's identities are read from on this host: at each save (`StatePersister`), and
// again at a restart, which compares the two (`RestorePlanner`).

/// (device, inode, size, mtime) of `path`, following symlinks.
func fileStamp(_ path: String) -> FileStamp? {
    var st = stat()
    guard stat(path, &st) == 0 else { return nil }
    return FileStamp(device: UInt64(st.st_dev), inode: UInt64(st.st_ino), size: Int64(st.st_size),
                     mtimeNanos: Int64(st.st_mtim.tv_sec) * 1_000_000_000 + Int64(st.st_mtim.tv_nsec))
}

/// Field 22 of /proc/PID/stat (start time in clock ticks after boot); nil if there is no such process.
func processStartTime(_ pid: Int32) -> UInt64? {
    guard pid > 0, let bytes = readWholeFile("/proc/\(pid)/stat", limit: 1 << 16) else { return nil }
    // The command name (field 2) is in parentheses and may contain spaces: split after the last ')'.
    guard let close = bytes.lastIndex(of: UInt8(ascii: ")")) else { return nil }
    let rest = String(decoding: bytes[(close + 1)...], as: UTF8.self).split(separator: " ")
    // rest[0] is field 3 (state); field 22 is rest[19].
    guard rest.count > 19 else { return nil }
    return UInt64(rest[19])
}

/// This boot's id (`SavedState.bootID`); nil if the kernel does not give one.
func currentBootID() -> String? {
    guard let b = readWholeFile("/proc/sys/kernel/random/boot_id", limit: 256) else { return nil }
    return String(decoding: b, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
}

/// Seconds since the Unix epoch: saved times outlive the process and the boot, so they are wall-clock.
func clockRealtime() -> Double {
    var ts = timespec()
    clock_gettime(CLOCK_REALTIME, &ts)
    return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
}
