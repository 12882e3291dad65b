// The writer's registry: registrations by id, the ids it hands out, and the uprobes-tree
// consumers staged for new registrations until the registry that names them is published.

import UprobeTree

/// The registrations as the writer changes them, batch by batch; `BatchApplier.publish` makes
/// each batch's version what readers see, in one tree version with its consumers.
///
/// Owned by the writer thread. The one other user is a large request's attach
/// (`BatchApplier.applyRequests`): its records are made and entered here by the attach thread
/// while the writer waits in the kernel, which touches none of this meanwhile.
final class RegistryWriter {
    private let tree: UprobeTree
    /// The registrations by id, as the next snapshot will have them.
    private(set) var probes = ProbeMap()
    /// N of the next id `p<N>` to hand out.
    private var nextNumber: UInt64 = 1
    /// Consumers of the registrations entered since the last `stageInserts`.
    private var pendingTreeInserts: [TreeEdit] = []
    /// The largest queue buffer kept between batches (a 10,000-probe register's).
    private static let keptQueueCapacity = 16_384

    init(tree: UprobeTree) {
        self.tree = tree
    }

    subscript(id: String) -> ProbeRecord? { probes[id] }

    /// A new id; ids are never handed out twice (see `skipNumbers`, `reserve`).
    func nextID() -> String {
        defer { nextNumber += 1 }
        return ProbeID.make(nextNumber)
    }

    /// Ids below `floor` were handed out before a restart: never hand them out again.
    func skipNumbers(below floor: UInt64) {
        nextNumber = max(nextNumber, floor)
    }

    /// `id` is taken (a restored registration keeps its id).
    func reserve(_ id: String) {
        if let n = ProbeID.number(id) { nextNumber = max(nextNumber, n + 1) }
    }

    /// Enters a new registration: the registry, and (at the next publication) the tree.
    func insert(_ r: ProbeRecord) {
        probes.insert(r)
        addConsumers(of: r, sites: r.sites)
    }

    /// Enters new registrations, like `insert` each (the registry in runs of one chunk: see
    /// `ProbeMap.insert(contentsOf:)`).
    func insert(contentsOf records: [ProbeRecord]) {
        probes.insert(contentsOf: records)
        pendingTreeInserts.reserveCapacity(pendingTreeInserts.count + records.count)
        for r in records { addConsumers(of: r, sites: r.sites) }
    }

    /// Swaps in a new version of an existing registration (same id). Consumers of sites it
    /// adds or drops are the caller's (`addConsumers`, `removeConsumers`).
    func replace(_ r: ProbeRecord) { probes.insert(r) }

    /// Takes a registration out of the registry; its tree removals go into `treeEdits` (applied
    /// with the registry that no longer has it). Its slots are left for the caller to retire.
    func remove(_ id: String, treeEdits: inout [TreeEdit]) -> ProbeRecord? {
        guard let r = probes.remove(id) else { return nil }
        removeConsumers(of: r, sites: r.sites, into: &treeEdits)
        return r
    }

    /// Queues the tree consumers of `sites` of `r`, to be staged by `stageInserts`. Only
    /// registrations with ids `p<N>` have consumers: the tree keys consumers by N.
    func addConsumers(of r: ProbeRecord, sites: some Sequence<ProbeSite>) {
        guard let number = r.number else { return }
        for site in sites {
            pendingTreeInserts.append(.insertConsumer(site.uprobeKey, Consumer(
                registration: number, slot: site.slot, pid: r.spec.pid ?? 0,
                flags: r.spec.retprobe ? Consumer.retprobe : 0)))
        }
    }

    /// The tree edits that take the consumers of `sites` of `r` out, into `edits`.
    func removeConsumers(of r: ProbeRecord, sites: some Sequence<ProbeSite>, into edits: inout [TreeEdit]) {
        guard let number = r.number else { return }
        for site in sites { edits.append(.removeConsumer(site.uprobeKey, registration: number)) }
    }

    /// Stages the queued consumers in the tree; they are published with the registry that
    /// names them (`BatchApplier.publish`).
    func stageInserts() {
        guard !pendingTreeInserts.isEmpty else { return }
        tree.stage(pendingTreeInserts)
        // A small queue keeps its buffer for the next batch; a large one (a whole binary's
        // glob: 241,000 edits, 15 MB, 61 bytes per probe) does not stay with the daemon.
        pendingTreeInserts.removeAll(keepingCapacity: pendingTreeInserts.capacity <= Self.keptQueueCapacity)
    }

    /// The staged-inserts buffer's capacity (tests: nothing of a bulk stays allocated).
    var insertBufferCapacity: Int { pendingTreeInserts.capacity }
}

extension ProbeSite {
    /// The uprobe this site is: the tree's key, as the kernel's (device, inode, file offset).
    var uprobeKey: UprobeKey {
        UprobeKey(dev: target.device, inode: target.inode, offset: target.fileOffset)
    }
}
