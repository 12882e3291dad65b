// The links the writer holds in the kernel: creating them (through pinned descriptors),
// adopting what the kernel made, forgetting what compaction closes.

import Foundation
import UprobeKernel

extension BatchApplier {
    /// One link to create: a group's file and the sites of its requests that are still good.
    struct LinkRequest: Sendable {
        var key: LinkGroupKey
        var path: String
        var sites: [LinkSite]
    }

    /// Creates the links and adopts those the kernel made; returns each one's outcome.
    /// `meanwhile`, if given, runs on `attacher` while the kernel calls run here. The
    /// descriptors (`kernelPath`) are opened here first: `pinned` is this writer's.
    func createLinks(_ requests: [LinkRequest], meanwhile: (() -> Void)?) -> [Result<Void, KernelError>] {
        var paths: [Result<String, KernelError>] = []
        for r in requests {
            do { paths.append(.success(try kernelPath(r.key, path: r.path))) } catch { paths.append(.failure(error)) }
        }
        let kernel = self.kernel
        let work = zip(requests, paths).map { (request: $0, path: $1) }
        @Sendable func create() -> [Result<any KernelLink, KernelError>] {
            work.map { job in
                do throws(KernelError) {
                    let path = try job.path.get()
                    return .success(try kernel.attach(path: path, sites: job.request.sites,
                                                      pid: job.request.key.pid == 0 ? nil : job.request.key.pid,
                                                      retprobe: job.request.key.retprobe))
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
            made = create()
            lent.wait()
        } else {
            made = create()
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

    /// Work on this writer's state run by `attacher` while the writer waits in the kernel.
    /// The writer touches none of its state between `submit` and `wait`, so the state still
    /// has one user at a time; the NSCondition orders the two threads' accesses (and
    /// ThreadSanitizer sees it, as it does not see `Mutex` or a Dispatch semaphore).
    final class LentWork: @unchecked Sendable {
        // @unchecked: `work` runs on one thread while its owner waits in `wait`; `done` is
        // guarded by `cond`.
        let work: () -> Void
        let cond = NSCondition()
        var done = false
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

    /// The path to hand the kernel for a group's file: its pinned descriptor's
    /// `/proc/self/fd/N` (see `PinnedFiles`), or `path` itself if it cannot be pinned.
    func kernelPath(_ key: LinkGroupKey, path: String) throws(KernelError) -> String {
        try pinned.kernelPath(for: key.file, at: path)
    }

    /// Closes the pinned descriptor of a file once no link of any group uses it.
    func unpinIfUnused(_ key: LinkGroupKey) {
        guard !groupLinks.keys.contains(where: { $0.file == key.file }) else { return }
        pinned.unpin(key.file)
    }

    func adopt(_ record: LinkRecord) {
        links[ObjectIdentifier(record)] = record
        groupLinks[record.group, default: []].insert(ObjectIdentifier(record))
        for s in record.sites { slotLink[s.slot] = record }
        counters.linksCreated += 1
    }

    func forget(_ record: LinkRecord) {
        links.removeValue(forKey: ObjectIdentifier(record))
        groupLinks[record.group]?.remove(ObjectIdentifier(record))
        if groupLinks[record.group]?.isEmpty == true {
            groupLinks.removeValue(forKey: record.group)
            unpinIfUnused(record.group)
        }
    }

    /// Whether a group has more small links than it should (many small batches each added
    /// one). Big links are never rebuilt just to merge: that would make every merge cost the
    /// size of the biggest registration on the binary. Asked for every group after every
    /// batch, so it counts in place and stops past the limit (listing the small links
    /// allocated two arrays per group per batch).
    func groupNeedsMerge(_ g: LinkGroupKey) -> Bool {
        var small = 0
        for id in groupLinks[g] ?? [] {
            guard let l = links[id], isSmall(l) else { continue }
            small += 1
            if small > tuning.maxLinksPerGroup { return true }
        }
        return false
    }

    func smallLinks(of g: LinkGroupKey) -> [LinkRecord] {
        (groupLinks[g] ?? []).compactMap { links[$0] }.filter(isSmall)
    }

    /// A link merges are allowed to rebuild (see `groupNeedsMerge`).
    func isSmall(_ l: LinkRecord) -> Bool { l.sites.count <= tuning.mergeLinksUpTo }
}

/// The (binary, pid filter, direction) a uprobe_multi link is made for.
/// Not a `UprobeKey`: a link covers many offsets of one file, and one file has a link group per
/// pid filter and direction.
struct LinkGroupKey: Hashable {
    var file: FileID
    var pid: Int32  // 0: every process
    var retprobe: Bool
}

/// An attached link and the sites it covers. Owned by the writer.
final class LinkRecord {
    let group: LinkGroupKey
    let path: String
    let sites: [LinkSite]
    let handle: any KernelLink
    init(group: LinkGroupKey, path: String, sites: [LinkSite], handle: any KernelLink) {
        self.group = group
        self.path = path
        self.sites = sites
        self.handle = handle
    }
}
