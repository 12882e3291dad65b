import SystemPackage

/// A link found pinned at start: held open again (`link`, whose `close()` unpins and detaches
/// it) with what the kernel says it probes.
public struct PinnedLink: Sendable {
    public let link: UprobeMultiLink
    public let info: UprobeMultiLinkInfo
    /// The counter slot of each offset (the low half of its cookie).
    public var slots: [UInt32] { info.cookies.map { UInt32(truncatingIfNeeded: $0) } }
}

/// A pin under `links/` that is no link of this daemon's: unreadable, of another type, or
/// with cookies of another generation than its name. It is removed (its link detached).
public struct UnusablePin: Sendable {
    public let path: String
    public let reason: String
}

extension CounterProgram {
    /// Opens every link pinned under the pin directory (BPF_OBJ_GET, then
    /// BPF_OBJ_GET_INFO_BY_FD: path, offsets, cookies, pid, direction, program; Linux >= 6.8).
    /// Pins that are no link of ours are unpinned and reported. Oldest generation first.
    public func pinnedLinks() -> (links: [PinnedLink], unusable: [UnusablePin]) {
        guard let pins else { return ([], []) }
        let found = pins.openLinkPins(in: pins.linksPath, pinPath: pins.linkPath)
        var unusable = found.unusable
        var links: [PinnedLink] = []
        for pin in found.opened {
            let (g, path, fd, info) = (pin.generation, pin.path, pin.fd, pin.info)
            guard !info.cookies.isEmpty, info.cookies.allSatisfy({ UInt32($0 >> 32) == g }),
                  info.cookies.allSatisfy({ UInt32(truncatingIfNeeded: $0) < capacity }) else {
                let link = UprobeMultiLink(fd: fd, generation: g, offsetCount: info.offsets.count, pinPath: path)
                link.close()
                unusable.append(UnusablePin(path: path, reason: "its cookies are not generation \(g)'s slots below \(capacity); detached"))
                continue
            }
            links.append(PinnedLink(link: UprobeMultiLink(fd: fd, generation: g, offsetCount: info.offsets.count, pinPath: path),
                                    info: info))
        }
        return (links, unusable)
    }

    /// Ends every make-before-break hand-off on `slots` (those of the links still attached):
    /// clears their `overlap` flags and deletes every mark. Only valid when no slot has two
    /// links attached (at start, once the older link of each pair left by an interrupted
    /// rebuild is closed).
    public func endAllHandoffs(slots: [UInt32]) throws(KernelError) {
        try setOverlap(false, slots: slots)
        try Self.deleteAll(marks)
    }

    /// Deletes every entry of a hand-off marks map ({u32 tid; u32 slot} keys), from the first
    /// key on until none is left: no program adds marks now (with one link per slot a program
    /// never leaves one for another link).
    static func deleteAll(_ marks: FileDescriptor) throws(KernelError) {
        var key: UInt64 = 0
        do {
            while try BPFSyscall.mapNextKey(marks, key: nil, next: &key) {
                try BPFSyscall.mapDelete(marks, key: &key)
            }
        } catch {
            throw KernelError(code: .mapOpFailed, error, context: "clearing marks")
        }
    }
}
