import CUprobeSys
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// The daemon's named kernel objects: what is pinned under the pin directory besides links,
/// and how a pinned one is told to be the one this uprobed needs.
///
/// A map is adopted when its shape (type, key and value sizes, entries, flags) is the one asked
/// for: its contents (the hit counters) carry on. A program is adopted when its tag (the
/// kernel's hash of its instructions, map references left out) equals that of the program this
/// uprobed loads; otherwise the new program is pinned in its place and the links still running
/// the old one are moved to it make-before-break (`programID` tells them apart).
///
/// The latency program's maps and program have names of their own (`latency`): they are made
/// on the first latency probe, so a directory may hold the counting objects alone.
public enum KernelObjectName {
    public static let counters = "counters"
    public static let overlap = "overlap"
    public static let marks = "marks"
    public static let countProgram = "prog_count"
    public static let latencyRows = "lat_rows"
    public static let latencyRowOf = "lat_row_of"
    public static let latencyMarks = "lat_marks"
    public static let latencyProgram = "prog_latency"
    /// The latency program's objects.
    public static let latency = [latencyRows, latencyRowOf, latencyMarks, latencyProgram]
    /// Every name uprobed pins (besides `links/` and `latency/`).
    public static let all = [counters, overlap, marks, countProgram] + latency
}

/// Opens the named objects of one daemon start: adopts pinned ones that fit, creates and pins
/// the others, and records which was which (the start logs it, `status` shows it).
public struct PinnedObjects: Sendable {
    public let directory: PinDirectory?
    /// Objects found pinned and adopted, and objects created (and pinned) by this start.
    public private(set) var adopted: [String] = []
    public private(set) var created: [String] = []
    /// Maps found pinned with another number of entries, replaced by new ones (`map(resizable:)`).
    public private(set) var resized: [String] = []
    /// Maps this start created (none pinned, or resized): a program refers to its maps, so a
    /// pinned program is not adopted when one of them is new.
    private var createdMaps = 0

    public init(directory: PinDirectory?) { self.directory = directory }

    /// The map named `name` with `shape`: the pinned one if it has that shape, else a new one,
    /// pinned. A pinned map of another shape is an error (`pin_failed`): its counters belong
    /// to links of another configuration (see `PinnedObjects.Mismatch`).
    mutating func map(_ name: String, _ shape: MapShape, create: () throws(KernelError) -> FileDescriptor) throws(KernelError) -> FileDescriptor {
        try map(name, shape, resizable: false, create: create).fd
    }

    /// `map`, where with `resizable` a pinned map that differs only in its number of entries
    /// (a changed `slot_capacity`) is replaced instead of refused: a new map is created and
    /// pinned in its place, and the old one is returned open (`previous`), so that the links
    /// still using it can be moved to the new one make-before-break and its counts read.
    mutating func map(_ name: String, _ shape: MapShape, resizable: Bool,
                      create: () throws(KernelError) -> FileDescriptor) throws(KernelError) -> (fd: FileDescriptor, previous: (fd: FileDescriptor, entries: UInt32)?) {
        guard let directory else { return (try create(), nil) }
        let path = directory.objectPath(name)
        var previous: (fd: FileDescriptor, entries: UInt32)? = nil
        if let fd = try? BPFSyscall.objGet(path) {
            let found: MapShape
            do { found = try BPFSyscall.mapInfo(fd) } catch {
                try? fd.close()
                throw KernelError(code: .pinFailed, error, context: path)
            }
            var sameButSize = found
            sameButSize.maxEntries = shape.maxEntries
            if found == shape {
                adopted.append(name)
                return (fd, nil)
            }
            guard resizable, sameButSize == shape else {
                try? fd.close()
                throw Mismatch.error(name: name, path: path, found: "\(found)", wanted: "\(shape)")
            }
            PinDirectory.unpin(path)
            previous = (fd, found.maxEntries)
            resized.append(name)
        }
        let fd: FileDescriptor
        do { fd = try create() } catch {
            try? previous?.fd.close()
            throw error
        }
        do { try BPFSyscall.objPin(fd, at: path) } catch {
            try? fd.close()
            try? previous?.fd.close()
            throw KernelError(code: .pinFailed, error, context: path)
        }
        created.append(name)
        createdMaps += 1
        return (fd, previous)
    }

    /// The program named `name`: `loaded` (just loaded by this uprobed) is compared by tag with
    /// the pinned one. Same tag: the pinned one is used and `loaded` closed, so pinned links
    /// keep running the program this daemon uses. Another tag (or none pinned): `loaded` is
    /// pinned in its place. Returns the fd to use and the replaced program's id, if any.
    /// The tag leaves map references out, so a pinned program with the same tag that uses a
    /// map this start replaced (`mapsAdopted` false; by default: a map of this instance was
    /// created) is replaced too: its links are moved to `loaded`, which uses the new maps.
    mutating func program(_ name: String, loaded: FileDescriptor, mapsAdopted: Bool? = nil) throws(KernelError) -> (fd: FileDescriptor, replaced: UInt32?) {
        guard let directory else { return (loaded, nil) }
        let path = directory.objectPath(name)
        let mine: (id: UInt32, tag: UInt64)
        do { mine = try BPFSyscall.progInfo(loaded) } catch { throw KernelError(code: .pinFailed, error, context: "program \(name)") }
        var replaced: UInt32? = nil
        if let pinned = try? BPFSyscall.objGet(path) {
            if mapsAdopted ?? (createdMaps == 0), let info = try? BPFSyscall.progInfo(pinned), info.tag == mine.tag {
                try? loaded.close()
                adopted.append(name)
                return (pinned, nil)
            }
            replaced = (try? BPFSyscall.progInfo(pinned))?.id
            try? pinned.close()
            PinDirectory.unpin(path)
        }
        do { try BPFSyscall.objPin(loaded, at: path) } catch { throw KernelError(code: .pinFailed, error, context: path) }
        created.append(name)
        return (loaded, replaced)
    }

    /// A pinned object that does not fit this configuration (e.g. `slot_capacity` changed).
    public enum Mismatch {
        public static let marker = "pinned object does not fit"
        static func error(name: String, path: String, found: String, wanted: String) -> KernelError {
            KernelError(code: .pinFailed, message: "\(marker): \(name) at \(path) is \(found), this configuration needs \(wanted)")
        }
        /// Whether `error` is a mismatch (the daemon then starts over with fresh pins).
        public static func matches(_ error: KernelError) -> Bool { error.message.hasPrefix(marker) }
    }
}
