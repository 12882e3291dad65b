import Dispatch
import Foundation
import Logging
import Synchronization
import UprobeCore
import UprobeKernel
#if canImport(Glibc)
import Glibc
import UprobeErrors
#endif

/// Holds a non-admin's `pid`-filtered probes to the rule they were registered under, for as
/// long as they live: the process must stay the owner's (`ProcessOwnership`). A process that
/// execs a setuid or file-capability binary (`passwd`) stops being its user's; its probes are
/// then ended with a reason (detached, hits kept, state `ended`), like those of an exited
/// process.
///
/// When it looks:
/// - at once after every exec of a watched process (`ExecEvents`: a BPF program on the
///   `sched_process_exec` tracepoint wakes this thread; an unprivileged process gains
///   privileges only through exec);
/// - right after a registration that adds a process (`registered`);
/// - every `checkEvery` (`owner_check_ms`) while there is anything to watch, for what the exec
///   events cannot see (they are unavailable, a watched pid did not fit their map, or the
///   daemon runs in another pid namespace than the processes).
/// One round reads /proc/PID/status once per watched process (about 11 us), so the periodic
/// cost is bounded by the distinct processes that non-admins probe (at most
/// `max_probes_per_uid` per uid).
///
/// Whom: registrations whose owner is not an admin under the policy in force. Groups decide
/// roles too (`admin_groups`), and a registration keeps only the owner's uid and primary gid,
/// so the owner's groups are taken from the user database (as a login would get them). A
/// registrant later made an admin is no longer checked; an admin demoted by a reload has its
/// `pid` probes checked from then on (the policy in force decides what may go on counting).
/// Root's probes are never checked.
///
/// Runs on its own thread, so a long round of the path watcher (resolving a replaced binary,
/// scanning /proc/*/maps) never delays it.
public final class OwnershipWatcher: Sendable {
    private let engine: Engine
    private let access: PolicyCell
    private let logger: Logger
    private let checkEvery: Duration
    private let idleEvery: Duration
    private let stopping = Atomic<Bool>(false)
    private let started = Atomic<Bool>(false)
    /// Registrations reported by `registered` and not yet taken by the thread.
    private let pending = Mutex<[ProbeRecord]>([])
    /// A pipe whose write end wakes the thread (stop, a registration).
    private let wakeFD: Int32
    private let wakeWriteFD: Int32
    private let finished = DispatchSemaphore(value: 0)

    /// `checkEvery`: the periodic check while something is watched; `idleEvery`: how often an
    /// idle watcher looks whether a reload changed whom it must watch.
    public init(engine: Engine, access: PolicyCell, logger: Logger, checkEvery: Duration, idleEvery: Duration) {
        self.engine = engine
        self.access = access
        self.logger = logger
        self.checkEvery = checkEvery
        self.idleEvery = idleEvery
        var fds: [Int32] = [-1, -1]
        if pipe(&fds) == 0 {
            _ = fcntl(fds[0], F_SETFD, FD_CLOEXEC)
            _ = fcntl(fds[1], F_SETFD, FD_CLOEXEC)
            // A full pipe already says "wake up"; a writer must never block on it.
            _ = fcntl(fds[0], F_SETFL, O_NONBLOCK)
            _ = fcntl(fds[1], F_SETFL, O_NONBLOCK)
        }
        self.wakeFD = fds[0]
        self.wakeWriteFD = fds[1]
    }

    public func start() {
        guard !started.exchange(true, ordering: .acquiringAndReleasing) else { return }
        let thread = Thread { [self] in
            ThreadName.setCurrent("uprobed-owner")
            self.run()
            self.finished.signal()
        }
        thread.start()
    }

    /// Stops the thread and waits for it (at most one round).
    public func stop() {
        guard !stopping.exchange(true, ordering: .acquiringAndReleasing) else { return }
        wake()
        if started.load(ordering: .acquiring) && finished.wait(timeout: .now() + .seconds(10)) == .timedOut { return }
        if wakeFD >= 0 { close(wakeFD) }
        if wakeWriteFD >= 0 { close(wakeWriteFD) }
    }

    /// Told of every successful registration: `pid`-filtered ones are checked at once, not at
    /// the next round (the process may have exec'd between the request's check and the attach).
    public func registered(_ records: [ProbeRecord]) {
        let filtered = records.filter { $0.spec.pid != nil && $0.owner.uid != 0 }
        guard !filtered.isEmpty else { return }
        pending.withLock { $0 += filtered }
        wake()
    }

    private func wake() {
        guard wakeWriteFD >= 0 else { return }
        var one: UInt8 = 1
        _ = write(wakeWriteFD, &one, 1)
    }

    /// One watched process: its owner and the registrations that filter on it.
    struct Target {
        var owner: Peer
        var ids: [String]
        /// Start time (/proc/PID/stat) when first seen: a different one means the pid now names
        /// another process, whose end the path watcher reports as an exit.
        var start: UInt64?
    }

    /// What the thread keeps between rounds.
    struct Memo {
        var targets: [Int32: Target] = [:]
        var generation: UInt64 = .max
        var policy: AccessPolicy? = nil
        /// Whether each owner uid is an admin under `policy`.
        var admin: [UInt32: Bool] = [:]
        var lastRebuild: ContinuousClock.Instant? = nil
        /// Exec times (CLOCK_MONOTONIC ns) of watched processes not yet judged after them.
        var execAt: [Int32: UInt64] = [:]
        var eventsFull = false
    }

    private func run() {
        var events: ExecEvents? = nil
        do { events = try ExecEvents() } catch {
            logger.warning("exec events unavailable: processes of pid-filtered probes are checked every owner_check_ms only",
                           metadata: ["error_code": "\(error.code)", "error": "\(error.message)"])
        }
        var memo = Memo()
        let busyMs = Int32(clamping: Int64(checkEvery.inSeconds * 1000))
        let idleMs = Int32(clamping: Int64(idleEvery.inSeconds * 1000))
        var buf = [UInt8](repeating: 0, count: 64)
        while !stopping.load(ordering: .acquiring) {
            round(&memo, events: events)
            var fds = [pollfd(fd: wakeFD, events: Int16(POLLIN), revents: 0),
                       pollfd(fd: events?.fd ?? -1, events: Int16(POLLIN), revents: 0)]
            _ = poll(&fds, 2, max(memo.targets.isEmpty ? idleMs : busyMs, 1))
            if stopping.load(ordering: .acquiring) { break }
            if fds[0].revents != 0 {
                while buf.withUnsafeMutableBytes({ read(wakeFD, $0.baseAddress, $0.count) }) > 0 {}
            }
        }
    }

    /// One round: update whom to watch, take the exec events, judge every watched process, end
    /// the probes of those that failed.
    func round(_ memo: inout Memo, events: ExecEvents?) {
        let now = ContinuousClock.now
        let policy = access.load()
        if policy != memo.policy {
            memo.policy = policy
            memo.admin.removeAll()
            memo.generation = .max  // whom to watch may have changed
        }
        let snap = engine.snapshot
        var changed = false
        // Rebuilt from the registry at most once per `checkEvery` (a register churn publishes
        // many versions a second); registrations in between arrive through `registered`.
        if snap.generation != memo.generation && (memo.lastRebuild.map { now - $0 >= checkEvery } ?? true) {
            rebuild(&memo, snap, policy: policy)
            memo.generation = snap.generation
            memo.lastRebuild = now
            changed = true
        }
        let fresh = pending.withLock { p in defer { p.removeAll() }; return p }
        for r in fresh {
            guard let pid = r.spec.pid, !isAdmin(r.owner, policy: policy, memo: &memo) else { continue }
            if memo.targets[pid] == nil {
                memo.targets[pid] = Target(owner: r.owner, ids: [], start: PathWatcher.processStart(pid))
                changed = true
            }
            if memo.targets[pid]?.ids.contains(r.id) == false { memo.targets[pid]?.ids.append(r.id) }
        }
        if changed, let events {
            let missed = events.watch(Set(memo.targets.keys))
            if missed > 0 && !memo.eventsFull {
                logger.warning("exec events: some watched processes did not fit the map; they are checked every owner_check_ms",
                               metadata: ["processes": "\(missed)"])
            }
            memo.eventsFull = missed > 0
        }
        // Taken before the checks: an exec after this read makes the fd readable again.
        for e in events?.drain() ?? [] where memo.targets[e.pid] != nil { memo.execAt[e.pid] = e.monotonicNanos }

        var changes: [FollowChange] = []
        var failed: [(pid: Int32, target: Target, reason: String)] = []
        for (pid, t) in memo.targets {
            guard let problem = ProcessOwnership.problem(pid: pid, uid: t.owner.uid) else { continue }
            // Gone, or the pid names another process now: an exit, which the path watcher reports.
            if problem == .gone { continue }
            if let start = t.start, PathWatcher.processStart(pid) != start { continue }
            let reason = "process \(pid) is no longer uid \(t.owner.uid)'s (\(problem.likelyCause): \(problem.detail)); the probe was ended, its hits up to then are kept"
            for id in t.ids { changes.append(FollowChange(id: id, kind: .end(reason: reason))) }
            failed.append((pid, t, reason))
        }
        if !changes.isEmpty { engine.followSync(changes) }
        let endedAt = Self.monotonicNanos()
        for f in failed {
            memo.targets.removeValue(forKey: f.pid)
            var meta: Logger.Metadata = [
                "probe_id": "\(f.target.ids.first ?? "")",
                "probe_ids": "\(f.target.ids.prefix(5).joined(separator: ","))\(f.target.ids.count > 5 ? ",…" : "")",
                "probes": "\(f.target.ids.count)", "pid": "\(f.pid)", "owner_uid": "\(f.target.owner.uid)",
                "error_code": "\(ErrorCode.processNotOwned)", "reason": "\(f.reason)",
            ]
            // How long the process ran exec'd and still counted: up to the end's counter read,
            // which `followSync` has done by now.
            if let at = memo.execAt[f.pid], endedAt >= at {
                let micros = (endedAt &- at) / 1000
                meta["exec_to_end_us"] = "\(micros)"
            }
            logger.warning("probe ended: its process is no longer its owner's", metadata: meta)
        }
        if !memo.execAt.isEmpty { memo.execAt = memo.execAt.filter { memo.targets[$0.key] != nil } }
        if !failed.isEmpty, let events { events.watch(Set(memo.targets.keys)) }
    }

    /// Whom to watch, from the registry: active `pid`-filtered registrations of non-admins.
    private func rebuild(_ memo: inout Memo, _ snap: RegistrySnapshot, policy: AccessPolicy) {
        var targets: [Int32: Target] = [:]
        for r in snap.probes.sorted(where: { $0.spec.pid != nil && $0.state == .active && $0.owner.uid != 0 }) {
            guard let pid = r.spec.pid else { continue }
            if targets[pid] != nil {
                targets[pid]?.ids.append(r.id)
                continue
            }
            guard !isAdmin(r.owner, policy: policy, memo: &memo) else { continue }
            let start = memo.targets[pid]?.start ?? PathWatcher.processStart(pid)
            targets[pid] = Target(owner: r.owner, ids: [r.id], start: start)
        }
        memo.targets = targets
    }

    private func isAdmin(_ owner: Peer, policy: AccessPolicy, memo: inout Memo) -> Bool {
        if owner.uid == 0 { return true }
        if let known = memo.admin[owner.uid] { return known }
        let who = PeerIdentity(peer: owner, supplementaryGroups: Self.groups(of: owner.uid, primary: owner.gid))
        let admin = policy.role(of: who) == .admin
        memo.admin[owner.uid] = admin
        return admin
    }

    /// The user's groups from the user database (getgrouplist); just `primary` for a uid the
    /// database does not know.
    static func groups(of uid: UInt32, primary: UInt32) -> [UInt32] {
        var pw = passwd()
        var result: UnsafeMutablePointer<passwd>? = nil
        var buf = [CChar](repeating: 0, count: 16384)
        guard getpwuid_r(uid, &pw, &buf, buf.count, &result) == 0, result != nil, let name = pw.pw_name else { return [primary] }
        var count: Int32 = 64
        var groups = [gid_t](repeating: 0, count: Int(count))
        if getgrouplist(name, pw.pw_gid, &groups, &count) < 0 {
            groups = [gid_t](repeating: 0, count: Int(max(count, 1)))
            guard getgrouplist(name, pw.pw_gid, &groups, &count) >= 0 else { return [primary, pw.pw_gid] }
        }
        return Array(groups.prefix(Int(count))) + [primary]
    }

    /// CLOCK_MONOTONIC in nanoseconds (the clock of the exec events).
    static func monotonicNanos() -> UInt64 {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
    }
}
