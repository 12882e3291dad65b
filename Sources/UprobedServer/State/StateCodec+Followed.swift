import UprobeCore
import UprobeELF
import UprobedProtocol

/// A followed registration's file versions in the state files (members of a probe's entry,
/// written only when present, so other entries are unchanged):
/// - `older_sites`: `[{path, device, inode, build_id?, offset, symbol?, ref_ctr_offset?, slot}]`,
///   its sites in older file versions still mapped by a process (`SavedProbe.olderSites`);
/// - `retired`: `{"versions": [{path, device, inode, build_id?, hits}], "older_count", "older_hits"}`
///   (`SavedProbe.retired`).
extension StateCodec {
    static func writeFollowed(_ p: SavedProbe, into w: inout JSONWriter) {
        if let older = p.olderSites {
            w.objects("older_sites", older) { w, s in
                let t = s.target
                w.field("path", t.path)
                w.field("device", u64(t.device))
                w.field("inode", u64(t.inode))
                if let b = t.buildID { w.field("build_id", b) }
                w.field("offset", u64(t.fileOffset))
                t.withSymbolUTF8 { w.field("symbol", utf8: $0) }
                if let r = t.refCtrOffset { w.field("ref_ctr_offset", u64(r)) }
                w.field("slot", u64(UInt64(s.slot)))
            }
        }
        guard !p.retired.isEmpty else { return }
        w.key("retired")
        w.beginObject()
        w.objects("versions", p.retired.recent) { w, v in
            w.field("path", v.version.path)
            w.field("device", u64(v.version.device))
            w.field("inode", u64(v.version.inode))
            if let b = v.version.buildID { w.field("build_id", b) }
            w.field("hits", u64(v.hits))
        }
        w.field("older_count", Int64(p.retired.olderCount))
        w.field("older_hits", u64(p.retired.olderHits))
        w.endObject()
    }

    static func decodeFollowed(_ o: JSONObject, into p: inout SavedProbe, _ n: Int) throws(StateError) {
        func corrupt(_ why: String) -> StateError { StateError(code: .stateCorrupt, message: "probes[\(n)].\(why)") }
        if let list = o["older_sites"] {
            guard let items = list.arrayValue, !items.isEmpty, p.slots != nil else { throw corrupt("older_sites is not a list of sites next to slots") }
            var sites: [SavedSite] = []
            for v in items {
                guard let x = v.objectValue, let path = x["path"]?.stringValue, let dev = readU64(x["device"]),
                      let ino = readU64(x["inode"]), let off = readU64(x["offset"]),
                      let slot = readU64(x["slot"]).flatMap({ UInt32(exactly: $0) }) else { throw corrupt("older_sites has an incomplete site") }
                sites.append(SavedSite(target: ResolvedProbe(path: path, device: dev, inode: ino, buildID: x["build_id"]?.stringValue,
                                                             fileOffset: off, symbol: x["symbol"]?.stringValue,
                                                             refCtrOffset: readU64(x["ref_ctr_offset"])),
                                       slot: slot))
            }
            p.olderSites = sites
        }
        if let r = o["retired"] {
            guard let x = r.objectValue, let list = x["versions"]?.arrayValue, !list.isEmpty,
                  let count = x["older_count"]?.int64Value, count >= 0, let hits = readU64(x["older_hits"]) else {
                throw corrupt("retired is malformed")
            }
            var recent: [RetiredVersion] = []
            for v in list {
                guard let y = v.objectValue, let path = y["path"]?.stringValue, let dev = readU64(y["device"]),
                      let ino = readU64(y["inode"]), let h = readU64(y["hits"]) else { throw corrupt("retired has an incomplete version") }
                recent.append(RetiredVersion(version: FileVersion(device: dev, inode: ino, buildID: y["build_id"]?.stringValue, path: path),
                                             hits: h))
            }
            p.retired = RetiredVersions(recent: recent, olderCount: Int(count), olderHits: hits)
        }
    }
}
