import SystemPackage

/// Just enough of the kernel's BTF (`/sys/kernel/btf/vmlinux`) to call kfuncs: the type id of
/// a `BTF_KIND_FUNC` by name. A BPF program calls a kfunc with `call` whose source register is
/// BPF_PSEUDO_KFUNC_CALL and whose immediate is that id (offset 0 = vmlinux's BTF).
///
/// Format (Documentation/bpf/btf.rst): a header {u16 magic 0xeB9F; u8 version; u8 flags;
/// u32 hdr_len; u32 type_off; u32 type_len; u32 str_off; u32 str_len}, then the type section
/// (ids from 1, in order) and the string section, offsets relative to the header's end. Each
/// type is a 12-byte {u32 name_off; u32 info (vlen bits 0-15, kind bits 24-28); u32 size/type}
/// followed by kind-specific data whose length depends on kind and vlen. Only the lengths are
/// needed to walk it. Little-endian hosts only (the magic tells).
public enum KernelBTF {
    public static let vmlinuxPath = "/sys/kernel/btf/vmlinux"

    public enum Failure: Error, Sendable, Equatable {
        /// The file is missing or unreadable (kernel without CONFIG_DEBUG_INFO_BTF).
        case unreadable(String)
        /// Not BTF, or a kind this walker does not know (a newer format).
        case malformed(String)
    }

    /// The BTF type ids of the FUNC types named `names` (absent names are left out).
    public static func functionIDs(named names: Set<String>, path: String = vmlinuxPath) throws(Failure) -> [String: UInt32] {
        guard let bytes = readWhole(path) else { throw .unreadable(path) }
        return try functionIDs(named: names, in: bytes)
    }

    static func functionIDs(named names: Set<String>, in b: [UInt8]) throws(Failure) -> [String: UInt32] {
        func u16(_ o: Int) -> UInt32 { UInt32(b[o]) | UInt32(b[o + 1]) << 8 }
        func u32(_ o: Int) -> UInt32 { u16(o) | u16(o + 2) << 16 }
        guard b.count >= 24, u16(0) == 0xeB9F else { throw .malformed("no BTF magic") }
        let hdrLen = Int(u32(4))
        let typeStart = hdrLen + Int(u32(8)), typeEnd = typeStart + Int(u32(12))
        let strStart = hdrLen + Int(u32(16)), strEnd = strStart + Int(u32(20))
        guard hdrLen >= 24, typeEnd <= b.count, strEnd <= b.count, typeStart <= typeEnd else {
            throw .malformed("section bounds")
        }
        // Compare names in place: the section holds ~100,000 strings, only a few are wanted.
        let wanted = names.map { (name: $0, bytes: Array($0.utf8)) }
        func nameMatches(_ off: Int) -> String? {
            let start = strStart + off
            for w in wanted where start + w.bytes.count < strEnd && b[start + w.bytes.count] == 0 {
                if b[start..<(start + w.bytes.count)].elementsEqual(w.bytes) { return w.name }
            }
            return nil
        }
        var found: [String: UInt32] = [:]
        var id: UInt32 = 1
        var o = typeStart
        while o + 12 <= typeEnd {
            let info = u32(o + 4)
            let kind = (info >> 24) & 0x1f, vlen = Int(info & 0xffff)
            let extra: Int
            switch kind {
            case 1, 14, 17: extra = 4                         // INT, VAR, DECL_TAG
            case 3: extra = 12                                // ARRAY
            case 4, 5, 15, 19: extra = 12 * vlen              // STRUCT, UNION, DATASEC, ENUM64
            case 6, 13: extra = 8 * vlen                      // ENUM, FUNC_PROTO
            case 2, 7, 8, 9, 10, 11, 12, 16, 18: extra = 0    // PTR, FWD, TYPEDEF, quals, FUNC, FLOAT, TYPE_TAG
            default: throw .malformed("unknown BTF kind \(kind) at type \(id)")
            }
            if kind == 12, let name = nameMatches(Int(u32(o))) { found[name] = id }
            o += 12 + extra
            id += 1
        }
        return found
    }

    private static func readWhole(_ path: String) -> [UInt8]? {
        guard let fd = try? FileDescriptor.open(FilePath(path), .readOnly, options: .closeOnExec) else { return nil }
        defer { try? fd.close() }
        var out: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 1 << 20)
        while true {
            guard let n = try? chunk.withUnsafeMutableBytes({ try fd.read(into: $0, retryOnInterrupt: true) }) else { return nil }
            if n <= 0 { break }
            out.append(contentsOf: chunk[0..<n])
            if out.count > 256 << 20 { return nil }   // not a BTF blob any kernel ships
        }
        return out
    }
}
