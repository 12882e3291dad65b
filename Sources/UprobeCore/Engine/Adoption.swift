import UprobeKernel

/// A link found pinned at start that the restore takes over instead of attaching again: its
/// group (file, pid filter, direction), the path it was made from and its sites.
public struct AdoptedLink: Sendable {
    public var file: FileID
    public var pid: Int32  // 0: every process
    public var retprobe: Bool
    public var path: String
    public var sites: [LinkSite]
    public var handle: any KernelLink
    /// A latency (uprobe session) link: its group is the latency group of the file.
    public var latency: Bool
    public init(file: FileID, pid: Int32, retprobe: Bool, path: String, sites: [LinkSite], handle: any KernelLink,
                latency: Bool = false) {
        self.latency = latency
        self.file = file
        self.pid = pid
        self.retprobe = retprobe
        self.path = path
        self.sites = sites
        self.handle = handle
    }
}

/// What a restore adopts from the pin directory: the links, and the slots of those links that
/// no restored registration claims (their sites are retired at once and detached by the next
/// compaction, make-before-break like any removal). Registrations that claim slots say so in
/// `RestoreItem.adoptedSlots`.
public struct Adoption: Sendable {
    public var links: [AdoptedLink]
    public var deadSlots: [UInt32]
    public init(links: [AdoptedLink] = [], deadSlots: [UInt32] = []) {
        self.links = links
        self.deadSlots = deadSlots
    }
}
