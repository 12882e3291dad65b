// The links the writer holds in the kernel: creating them (through pinned descriptors),
// adopting what the kernel made, forgetting what compaction closes.

import Foundation
import UprobeKernel

/// The (binary, pid filter, direction) a uprobe_multi link is made for.
/// Not a `UprobeKey`: a link covers many offsets of one file, and one file has a link group per
/// pid filter and direction.
struct LinkGroupKey: Hashable {
    var file: FileID
    var pid: Int32  // 0: every process
    var retprobe: Bool
    /// A latency link (uprobe session): one more kind of link next to entry and return.
    var latency: Bool = false
}

/// An attached link and the sites it covers. Owned by the writer.
final class LinkRecord {
    let group: LinkGroupKey
    let path: String
    let sites: LinkSites
    let handle: any KernelLink
    init(group: LinkGroupKey, path: String, sites: [LinkSite], handle: any KernelLink) {
        self.group = group
        self.path = path
        self.sites = LinkSites(sites)
        self.handle = handle
    }
}

/// A link's sites as columns, read like an array of `LinkSite`: 12 bytes a site (offset and
/// slot) where an array of `LinkSite` took 24, and a whole binary's link holds 241,000 for as
/// long as it is attached. Semaphore offsets (USDT) get a column only if a site has one.
struct LinkSites: RandomAccessCollection {
    private let offsets: [UInt64]
    private let slots: [UInt32]
    private let refCtrOffsets: [UInt64?]?

    init(_ sites: [LinkSite]) {
        var offsets: [UInt64] = [], slots: [UInt32] = []
        offsets.reserveCapacity(sites.count)
        slots.reserveCapacity(sites.count)
        var semaphores = false
        for s in sites {
            offsets.append(s.offset)
            slots.append(s.slot)
            semaphores = semaphores || s.refCtrOffset != nil
        }
        self.offsets = offsets
        self.slots = slots
        refCtrOffsets = semaphores ? sites.map(\.refCtrOffset) : nil
    }

    var startIndex: Int { 0 }
    var endIndex: Int { offsets.count }
    subscript(i: Int) -> LinkSite {
        LinkSite(offset: offsets[i], refCtrOffset: refCtrOffsets?[i], slot: slots[i])
    }
    /// The slot of site i, without making the site.
    func slot(_ i: Int) -> UInt32 { slots[i] }
}

/// One link to create: a group's file and the sites of its requests that are still good.
struct LinkRequest: Sendable {
    var key: LinkGroupKey
    var path: String
    var sites: [LinkSite]
}

/// The uprobe_multi links the writer holds open: by identity, by group and by slot, the
/// binaries they were made from (pinned, see `PinnedFiles`), and which of them are in a
/// make-before-break hand-off or being closed.
///
/// Owned by the writer thread like the rest of `BatchApplier`. `create` lends other work to
/// the attach thread only while the writer itself waits in the kernel.
final class LinkTable {
    private let kernel: any KernelBackend
    /// Runs the work `create` lends while this thread creates links.
    private let attacher = DrainingThread<@Sendable () -> Void>(name: "uprobed-attach") { jobs in
        for job in jobs { job() }
    }
    private var links: [ObjectIdentifier: LinkRecord] = [:]
    /// The newest link holding each attached slot.
    private var slotLink = SlotTable<LinkRecord>()
    /// Open links of each (binary, pid filter, direction).
    private var groupLinks: [LinkGroupKey: Set<ObjectIdentifier>] = [:]
    /// An open descriptor per attached file (device, inode). Links are created through
    /// `/proc/self/fd/N`, so a rebuild after the path was replaced (an upgrade by rename)
    /// still attaches the old inode, and a file replaced between resolution and attach is
    /// refused (`file_changed`) instead of being probed at offsets meant for another build.
    private var pinned = PinnedFiles()
    /// Links a running detach round attached in place of the ones it is closing. Their slots
    /// are in hand-off with an older link, and the counting program allows at most two links
    /// on a slot, so they are not rebuilt again until that round has finished.
    private var inHandoff: Set<ObjectIdentifier> = []
    /// Links being closed by running rounds (still attached as far as `status` is concerned).
    private var closing = 0
    /// Links created so far (`status`: links created).
    private(set) var created: UInt64 = 0
    /// The last `create`'s time in the kernel calls, and then waiting for the lent work
    /// (`BatchTimings`).
    private(set) var lastCreateMicros: (kernel: UInt64, lentWait: UInt64) = (0, 0)

    init(kernel: any KernelBackend) {
        self.kernel = kernel
    }

    /// Links held (not counting those being closed).
    var count: Int { links.count }

    /// Links open in the kernel: held, and being closed (`status`: links).
    var openCount: Int { links.count + closing }

    /// The groups that have links.
    var groups: some Collection<LinkGroupKey> { groupLinks.keys }

    /// The links of a group.
    func links(of group: LinkGroupKey) -> some Sequence<LinkRecord> {
        (groupLinks[group] ?? []).lazy.compactMap { self.links[$0] }
    }

    /// Entries the slot-to-link table has room for (tests: a bulk's table goes with its links).
    var slotTableCapacity: Int { slotLink.capacity }

    /// The newest link holding `slot`, if any link does.
    func link(holding slot: UInt32) -> LinkRecord? { slotLink[slot] }

    /// Whether some link holds `slot`.
    func isAttached(_ slot: UInt32) -> Bool { slotLink[slot] != nil }

    /// Whether `link` replaced links that a running round is still closing.
    func isInHandoff(_ link: LinkRecord) -> Bool { inHandoff.contains(ObjectIdentifier(link)) }

    /// Creates the links and adopts those the kernel made; returns each one's outcome.
    /// `meanwhile`, if given, runs on `attacher` while the kernel calls run here. The
    /// descriptors (`kernelPath`) are opened here first: `pinned` is this thread's.
    func create(_ requests: [LinkRequest], meanwhile: (() -> Void)?) -> [Result<Void, KernelError>] {
        var paths: [Result<String, KernelError>] = []
        for r in requests {
            do { paths.append(.success(try kernelPath(r.key, path: r.path))) } catch { paths.append(.failure(error)) }
        }
        let kernel = self.kernel
        let work = zip(requests, paths).map { (request: $0, path: $1) }
        @Sendable func create() -> [Result<any KernelLink, KernelError>] {
            work.map { job in
                do throws(KernelError) {
                    return .success(try Self.attach(kernel, job.request.key, path: try job.path.get(), sites: job.request.sites))
                } catch {
                    return .failure(error)
                }
            }
        }
        let made: [Result<any KernelLink, KernelError>]
        if let meanwhile {
            // This thread makes the kernel calls, the long pole, at once; `meanwhile` is lent
            // to `attacher`. When `attacher` made the kernel calls instead, its start waited up
            // to 2.4 ms for a CPU: `meanwhile` can afford such a wait, the attach cannot.
            let lent = LentWork(meanwhile)
            attacher.submit { lent.run() }
            let started = ContinuousClock.now
            made = create()
            let createdAt = ContinuousClock.now
            lent.wait()
            lastCreateMicros = ((createdAt - started).microseconds, (ContinuousClock.now - createdAt).microseconds)
        } else {
            let started = ContinuousClock.now
            made = create()
            lastCreateMicros = ((ContinuousClock.now - started).microseconds, 0)
        }
        return zip(requests, made).map { request, result in
            switch result {
            case .success(let handle):
                adopt(LinkRecord(group: request.key, path: request.path, sites: request.sites, handle: handle))
                return .success(())
            case .failure(let error):
                unpinIfUnused(request.key)
                return .failure(error)
            }
        }
    }

    /// Takes over links found pinned at start (`Adoption`): held like links this writer made
    /// (not counted as created). Their binaries are opened now, while the path still names the
    /// linked file, so a later rebuild reaches that file even if the path is replaced.
    func adopt(_ adopted: [AdoptedLink]) {
        for a in adopted {
            let key = LinkGroupKey(file: a.file, pid: a.pid, retprobe: a.retprobe, latency: a.latency)
            _ = try? kernelPath(key, path: a.path)
            enter(LinkRecord(group: key, path: a.path, sites: a.sites, handle: a.handle))
        }
    }

    /// Creates the link that replaces some of a group's links (make-before-break: the caller
    /// has turned the hand-off on for `sites` and closes the old links in a detach round). It
    /// is in hand-off until that round ends (`roundFinished`).
    func rebuild(_ group: LinkGroupKey, path: String, sites: [LinkSite]) throws(KernelError) -> LinkRecord {
        let handle = try Self.attach(kernel, group, path: try kernelPath(group, path: path), sites: sites)
        let record = LinkRecord(group: group, path: path, sites: sites, handle: handle)
        adopt(record)
        inHandoff.insert(ObjectIdentifier(record))
        return record
    }

    /// Forgets a link handed to a detach round to be closed (it counts as open until the round
    /// ends). Returns the slots among `dead` that it was the newest link of: no link holds
    /// them any more.
    func close(_ record: LinkRecord, dead: (UInt32) -> Bool) -> [UInt32] {
        forget(record)
        closing += 1
        var freed: [UInt32] = []
        for i in record.sites.indices {
            let slot = record.sites.slot(i)
            guard dead(slot), slotLink[slot] === record else { continue }
            slotLink[slot] = nil
            freed.append(slot)
        }
        return freed
    }

    /// A detach round has closed `closed` links: the links it attached in their place
    /// (`handoff`) may be rebuilt again.
    func roundFinished(closed: Int, handoff: [ObjectIdentifier]) {
        inHandoff.subtract(handoff)
        closing -= closed
    }

    /// One link of `group`'s kind.
    private static func attach(_ kernel: any KernelBackend, _ group: LinkGroupKey, path: String,
                               sites: [LinkSite]) throws(KernelError) -> any KernelLink {
        let pid = group.pid == 0 ? nil : group.pid
        if group.latency { return try kernel.attachLatency(path: path, sites: sites, pid: pid) }
        return try kernel.attach(path: path, sites: sites, pid: pid, retprobe: group.retprobe)
    }

    /// Lets go of every link (daemon shutdown: pinned links stay attached for the next
    /// daemon, others are closed together, latency links without waiting for their calls)
    /// and closes every pinned descriptor.
    func closeAll() {
        attacher.stop()
        kernel.release(links.values.map(\.handle))
        links.removeAll()
        groupLinks.removeAll()
        slotLink.removeAll()
        pinned.unpinAll()
    }

    /// The path to hand the kernel for a group's file: its pinned descriptor's
    /// `/proc/self/fd/N` (see `PinnedFiles`), or `path` itself if it cannot be pinned.
    private func kernelPath(_ key: LinkGroupKey, path: String) throws(KernelError) -> String {
        try pinned.kernelPath(for: key.file, at: path)
    }

    /// Closes the pinned descriptor of a file once no link of any group uses it.
    private func unpinIfUnused(_ key: LinkGroupKey) {
        guard !groupLinks.keys.contains(where: { $0.file == key.file }) else { return }
        pinned.unpin(key.file)
    }

    private func adopt(_ record: LinkRecord) {
        enter(record)
        created += 1
    }

    private func enter(_ record: LinkRecord) {
        links[ObjectIdentifier(record)] = record
        groupLinks[record.group, default: []].insert(ObjectIdentifier(record))
        for i in record.sites.indices { slotLink[record.sites.slot(i)] = record }
    }

    private func forget(_ record: LinkRecord) {
        links.removeValue(forKey: ObjectIdentifier(record))
        groupLinks[record.group]?.remove(ObjectIdentifier(record))
        if groupLinks[record.group]?.isEmpty == true {
            groupLinks.removeValue(forKey: record.group)
            unpinIfUnused(record.group)
        }
    }

    /// Work on the writer's state run by `attacher` while the writer waits in the kernel.
    /// The writer touches none of its state between `submit` and `wait`, so the state still
    /// has one user at a time; the NSCondition orders the two threads' accesses (and
    /// ThreadSanitizer sees it, as it does not see `Mutex` or a Dispatch semaphore).
    private final class LentWork: @unchecked Sendable {
        // @unchecked: `work` runs on one thread while its owner waits in `wait`; `done` is
        // guarded by `cond`.
        private let work: () -> Void
        private let cond = NSCondition()
        private var done = false
        init(_ work: @escaping () -> Void) { self.work = work }
        func run() {
            work()
            cond.lock()
            done = true
            cond.signal()
            cond.unlock()
        }
        func wait() {
            cond.lock()
            while !done { cond.wait() }
            cond.unlock()
        }
    }
}
