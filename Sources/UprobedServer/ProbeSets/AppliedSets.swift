import Logging
import UprobeCore
import UprobedProtocol

/// The probe lists of the applied sets (`apply`), in `probe-sets.json` beside the state files.
///
/// An apply registers the new lines, writes this file, then removes the old lines. A crash
/// between those steps leaves the set with more registrations than it lists (old and new), and
/// the registrations alone cannot tell which are left over; this file can. At the next start
/// (`completeApplied`) each applied set loses the registrations of specs its entry does not list:
/// the new lines of an apply that was never answered (crash before the write), or the old lines
/// of one that was (crash after it). A set of `probes_dir` needs no such file: its file is the list.
struct AppliedSets: Equatable {
    static let fileName = "probe-sets.json"
    static let format = "uprobed-probe-sets"

    var sets: [String: [ProbeSpec]] = [:]

    func encode() -> [UInt8] {
        var o = JSONObject()
        o["format"] = .string(Self.format)
        o["version"] = 1
        var sets = JSONObject()
        for name in self.sets.keys.sorted() { sets[name] = .array((self.sets[name] ?? []).map(\.json)) }
        o["sets"] = .object(sets)
        return JSONSerializer.serializeLine(.object(o))
    }

    static func decode(_ bytes: [UInt8]) throws(StateError) -> AppliedSets {
        func corrupt(_ why: String) -> StateError { StateError(code: .stateCorrupt, message: "\(fileName): \(why)") }
        let value: JSONValue
        do { value = try JSONParser.parse(bytes) } catch { throw corrupt("not valid JSON: \(error)") }
        guard let root = value.objectValue, root["format"]?.stringValue == format else { throw corrupt("not a probe-sets file") }
        guard root["version"]?.int64Value == 1 else { throw corrupt("version \(root["version"].map { "\($0)" } ?? "none") is not supported") }
        guard let sets = root["sets"]?.objectValue else { throw corrupt("no \"sets\"") }
        var out = AppliedSets()
        for member in sets.pairs {
            guard let list = member.value.arrayValue else { throw corrupt("set '\(member.key)' is not a list") }
            var specs: [ProbeSpec] = []
            for (n, item) in list.enumerated() {
                do { specs.append(try ProbeSpec(json: item, context: "\(member.key)[\(n)]")) } catch { throw corrupt(error.message) }
            }
            out.sets[member.key] = specs
        }
        return out
    }
}

extension ProbeSets {
    /// At start, after the restore and before anything else changes sets: reads the applied
    /// sets' lists and removes what an apply interrupted by a crash left over (see
    /// `AppliedSets`). Without the file (an older uprobed's state) or with a corrupt one, the
    /// lists are made from the registrations as they are (nothing is removed) and saved.
    func completeApplied() async {
        await gate.run { await self.completeAppliedNow() }
    }

    private func completeAppliedNow() async {
        let held = marks().keys.filter { $0.source == .api }.sorted { $0.name < $1.name }
        var known: AppliedSets?
        do {
            if let bytes = try store.readFile(AppliedSets.fileName) { known = try AppliedSets.decode(bytes) }
        } catch {
            logger.error("the applied probe sets' lists cannot be read; made again from their registrations (an apply interrupted by a crash keeps its leftovers)",
                         metadata: ["error_code": "\(error.code)", "error": "\(error.message)"])
        }
        guard let known else {
            var rebuilt = AppliedSets()
            for mark in held {
                var seen = Set<ProbeSpec>()
                rebuilt.sets[mark.name] = records(of: mark).map { ProbeSpec($0.spec) }.filter { seen.insert($0).inserted }
            }
            applied.withLock { $0 = rebuilt }
            if !held.isEmpty { saveApplied(rebuilt) }
            return
        }
        applied.withLock { $0 = known }
        for mark in held {
            let change = SetChange(desired: known.sets[mark.name] ?? [], records: records(of: mark))
            let ids = change.removed.flatMap(\.ids)
            guard !ids.isEmpty else { continue }
            switch await engine.unregister(ids: ids, consumer: nil, peer: .daemon) {
            case .success:
                logger.notice("applied probe set completed: an apply interrupted by a stop left registrations it does not list; removed them",
                              metadata: ["set": "\(mark.name)", "removed": "\(ids.count)"])
            case .failure(let e):
                logger.error("applied probe set: leftovers of an interrupted apply could not be removed",
                             metadata: ["set": "\(mark.name)", "error_code": "\(e.code)", "error": "\(e.message)"])
            }
        }
    }

    /// Writes the lists; nil, or why not.
    @discardableResult
    func saveApplied(_ sets: AppliedSets) -> StateError? {
        do { try store.replaceFile(AppliedSets.fileName, with: sets.encode()) } catch {
            logger.error("the applied probe sets' lists cannot be saved", metadata: ["error_code": "\(error.code)", "error": "\(error.message)"])
            return error
        }
        return nil
    }
}
