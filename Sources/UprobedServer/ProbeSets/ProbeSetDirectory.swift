import Foundation
import Logging
import UprobeCore
import UprobedProbeSets
import UprobedProtocol
import UprobeSystem
#if canImport(Glibc)
import Glibc
#endif

/// The probe-set files of one directory as read now: each set name with its file and either
/// its parsed content or why it was refused.
struct ProbeSetDirectory {
    struct Loaded {
        var file: String
        var content: Result<ProbeSetFile, ProbeSetError>
    }
    var sets: [String: Loaded] = [:]

    /// Reads every `*.yaml`/`*.yml` of `dir` (following symlinks, as a ConfigMap volume's files
    /// are). A missing directory has no sets; one that cannot be listed is an error (nothing
    /// is changed then: an unreadable directory must not remove every set).
    static func read(_ dir: String) throws(SyscallError) -> ProbeSetDirectory {
        var out = ProbeSetDirectory()
        guard let d = opendir(dir) else {
            let err = Syscall.lastError("opendir", dir)
            if err.errno == .noSuchFileOrDirectory { return out }
            throw err
        }
        var names: [String] = []
        while let entry = readdir(d) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { raw in
                String(decoding: raw.prefix(while: { $0 != 0 }), as: UTF8.self)
            }
            names.append(name)
        }
        closedir(d)
        var byName: [String: [String]] = [:]
        for file in names.sorted() {
            guard let set = ProbeSetFile.setName(fileName: file) else { continue }
            let path = (dir.hasSuffix("/") ? dir : dir + "/") + file
            var st = stat()
            guard stat(path, &st) == 0, (st.st_mode & S_IFMT) == S_IFREG else { continue }  // a dangling link, a directory
            byName[set, default: []].append(path)
        }
        for (set, paths) in byName {
            guard paths.count == 1 else {
                let files = paths.map { ($0 as NSString).lastPathComponent }.joined(separator: " and ")
                out.sets[set] = Loaded(file: paths[0], content: .failure(ProbeSetError(line: nil,
                    "set '\(set)' is defined twice (\(files)); keep one file per set")))
                continue
            }
            out.sets[set] = Loaded(file: paths[0], content: load(paths[0], name: set))
        }
        return out
    }

    static func load(_ path: String, name: String) -> Result<ProbeSetFile, ProbeSetError> {
        guard let bytes = readWholeFile(path, limit: ProbeSetFile.maxBytes) else {
            if errno == EFBIG { return .failure(ProbeSetError(line: nil, "larger than \(ProbeSetFile.maxBytes) bytes")) }
            return .failure(ProbeSetError(line: nil, "cannot \(Syscall.lastError("read", path))"))
        }
        guard let text = String(validating: bytes, as: UTF8.self) else {
            return .failure(ProbeSetError(line: nil, "not UTF-8 text"))
        }
        do { return .success(try ProbeSetFile.parse(text, name: name)) } catch { return .failure(error) }
    }
}

extension ProbeSets {
    /// What one reconcile of the probes directory did.
    struct DirectoryOutcome: Sendable {
        var sets = 0
        var refused = 0
        var added = 0
        var removed = 0
    }

    /// Reconciles every set of `dir` (at start, and on each reload): sets of new or changed
    /// files get their probes, sets whose file is gone lose theirs, a refused file (not a set,
    /// a probe that does not resolve or attach, a name held by an applied set) keeps its set's
    /// previous probes and is logged once with its file, line and reason. Each file on its own.
    @discardableResult
    func reconcileDirectory(_ dir: String) async -> DirectoryOutcome {
        await gate.run { await self.reconcileDirectoryNow(dir) }
    }

    private func reconcileDirectoryNow(_ dir: String) async -> DirectoryOutcome {
        defer { table.directoryReconciles.add(1, ordering: .relaxed) }
        var outcome = DirectoryOutcome()
        let found: ProbeSetDirectory
        do { found = try ProbeSetDirectory.read(dir) } catch {
            logger.error("probes_dir cannot be read; every probe set keeps its probes", metadata: [
                "path": "\(dir)", "error": "\(error)"])
            return outcome
        }
        setFiles(found.sets.mapValues(\.file))
        let held = marks()
        // Sets whose file is gone: all their probes go.
        for mark in held.keys.sorted(by: { $0.name < $1.name }) where mark.source == .file && found.sets[mark.name] == nil {
            switch await reconcile(mark, desired: [], owner: .daemon) {
            case .success(let o):
                outcome.removed += o.change.removed.reduce(0) { $0 + $1.ids.count }
                logger.notice("probe set removed: its file is gone", metadata: [
                    "set": "\(mark.name)", "path": "\(dir)", "removed": "\(o.change.held)"])
            case .failure(let f):
                logger.error("probe set could not be removed", metadata: [
                    "set": "\(mark.name)", "error_code": "\(f.error.code)", "reason": "\(f.error.message)"])
            }
            table.update(mark.name) { $0 = nil }
        }
        let apiNames = Set(held.keys.filter { $0.source == .api }.map(\.name))
        for name in found.sets.keys.sorted() {
            guard let loaded = found.sets[name] else { continue }
            outcome.sets += 1
            let file: ProbeSetFile
            switch loaded.content {
            case .failure(let e):
                outcome.refused += 1
                refuse(name, file: loaded.file, code: .setInvalid, message: e.message, line: e.line)
                continue
            case .success(let f): file = f
            }
            let most = maxSpecs.load(ordering: .relaxed)
            if file.entries.count > most {
                outcome.refused += 1
                refuse(name, file: loaded.file, code: .tooManyProbes, message: "\(file.entries.count) probes; a set has at most \(most) (max_probes_per_request)",
                       line: file.line(of: most))
                continue
            }
            if apiNames.contains(name) {
                outcome.refused += 1
                refuse(name, file: loaded.file, code: .setConflict,
                       message: "set '\(name)' was applied through the API (uprobectl apply); remove it there (apply an empty set) or rename this file",
                       line: nil)
                continue
            }
            switch await reconcile(ProbeSetMark(.file, name), desired: file.specs, owner: .daemon) {
            case .failure(let f):
                outcome.refused += 1
                let line = f.index.flatMap { file.line(of: $0) }
                refuse(name, file: loaded.file, code: f.error.code,
                       message: line == nil ? f.error.message : ProbeSetError.withoutIndex(f.error.message), line: line)
            case .success(let o):
                let added = o.registered.reduce(0) { $0 + $1.count }
                let removed = o.change.removed.reduce(0) { $0 + $1.ids.count }
                outcome.added += added
                outcome.removed += removed
                table.update(name) { $0 = ProbeSetTable.Entry(source: .file, file: loaded.file, refused: nil, appliedAt: clockRealtime()) }
                if !o.change.isEmpty {
                    logger.info("probe set applied", metadata: [
                        "set": "\(name)", "file": "\(loaded.file)", "added": "\(added)", "removed": "\(removed)",
                        "unchanged_specs": "\(o.change.unchanged)", "skipped": "\(o.skipped.count)"])
                }
                if let w = o.warning { logger.warning("probe set applied with a warning", metadata: ["set": "\(name)", "warning": "\(w)"]) }
            }
        }
        // Forget the status of file sets that have neither a file nor probes now.
        table.forget { name, entry in entry.source == .file && found.sets[name] == nil }
        logger.notice("probe sets reconciled", metadata: [
            "path": "\(dir)", "sets": "\(outcome.sets)", "refused": "\(outcome.refused)",
            "added": "\(outcome.added)", "removed": "\(outcome.removed)"])
        return outcome
    }

    /// Logs a refused file (one line: file, line, reason) and records it for `status`. Its set
    /// keeps whatever probes it had.
    private func refuse(_ name: String, file: String, code: ErrorCode, message: String, line: Int?) {
        var metadata: Logger.Metadata = ["set": "\(name)", "file": "\(file)", "error_code": "\(code)", "reason": "\(message)"]
        if let line { metadata["line"] = "\(line)" }
        logger.error("probe set refused; it keeps its previous probes", metadata: metadata)
        table.update(name) { e in
            var entry = e ?? ProbeSetTable.Entry(source: .file)
            entry.source = .file
            entry.file = file
            entry.refused = (code, message, line)
            e = entry
        }
    }
}

extension ProbeSetTable.Entry {
    init(source: ProbeSetSource) { self.init(source: source, file: nil, refused: nil, appliedAt: nil) }
}
