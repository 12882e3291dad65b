import CUprobeSys
import SystemPackage
import UprobeSystem

#if canImport(Glibc)
import Glibc
#endif

/// The bpf(2) commands of pinning: BPF_OBJ_PIN, BPF_OBJ_GET and BPF_OBJ_GET_INFO_BY_FD.
extension BPFSyscall {
    /// BPF_OBJ_PIN: `fd` (map, program or link) gets a name in a bpf file system.
    static func objPin(_ fd: FileDescriptor, at path: String) throws(SyscallFailure) {
        _ = try Syscall.run("bpf(BPF_OBJ_PIN)", path) { CUprobeSys_obj_pin(fd.rawValue, path) }
    }

    /// BPF_OBJ_GET: an fd for the object pinned at `path`.
    static func objGet(_ path: String) throws(SyscallFailure) -> FileDescriptor {
        FileDescriptor(rawValue: try Syscall.run("bpf(BPF_OBJ_GET)", path) { CUprobeSys_obj_get(path) })
    }

    /// The shape of a map (BPF_OBJ_GET_INFO_BY_FD).
    static func mapInfo(_ fd: FileDescriptor) throws(SyscallFailure) -> MapShape {
        var type: UInt32 = 0, id: UInt32 = 0, key: UInt32 = 0, value: UInt32 = 0, max: UInt32 = 0, flags: UInt32 = 0
        _ = try Syscall.run("bpf(BPF_OBJ_GET_INFO_BY_FD map)") {
            CUprobeSys_map_info(fd.rawValue, &type, &id, &key, &value, &max, &flags)
        }
        return MapShape(type: type, keySize: key, valueSize: value, maxEntries: max, flags: flags)
    }

    /// A program's id and tag (BPF_OBJ_GET_INFO_BY_FD).
    static func progInfo(_ fd: FileDescriptor) throws(SyscallFailure) -> (id: UInt32, tag: UInt64) {
        var id: UInt32 = 0
        var tag = [UInt8](repeating: 0, count: 8)
        _ = try Syscall.run("bpf(BPF_OBJ_GET_INFO_BY_FD prog)") { CUprobeSys_prog_info(fd.rawValue, &id, &tag) }
        return (id, tag.reduce(UInt64(0)) { $0 << 8 | UInt64($1) })
    }

    /// Everything a uprobe_multi link says about itself (Linux >= 6.8): two calls, the first
    /// for the sizes. Throws EINVAL-like failures for links of another type.
    static func uprobeMultiLinkInfo(_ fd: FileDescriptor) throws(SyscallFailure) -> UprobeMultiLinkInfo {
        var head = CUprobeSys_uprobe_multi_link_info()
        _ = try Syscall.run("bpf(BPF_OBJ_GET_INFO_BY_FD link)") { CUprobeSys_link_info(fd.rawValue, &head) }
        guard head.type == CUPROBESYS_BPF_LINK_TYPE_UPROBE_MULTI else {
            throw SyscallFailure(call: "bpf(BPF_OBJ_GET_INFO_BY_FD link)", subject: "link type \(head.type)", errno: .invalidArgument)
        }
        let count = Int(head.count)
        var offsets = [UInt64](repeating: 0, count: max(count, 1))
        var refs = [UInt64](repeating: 0, count: max(count, 1))
        var cookies = [UInt64](repeating: 0, count: max(count, 1))
        var path = [CChar](repeating: 0, count: Int(PATH_MAX))
        var full = CUprobeSys_uprobe_multi_link_info()
        try offsets.withUnsafeMutableBufferPointer { (o) throws(SyscallFailure) in
            try refs.withUnsafeMutableBufferPointer { (r) throws(SyscallFailure) in
                try cookies.withUnsafeMutableBufferPointer { (c) throws(SyscallFailure) in
                    try path.withUnsafeMutableBufferPointer { (p) throws(SyscallFailure) in
                        full.path = UInt64(UInt(bitPattern: p.baseAddress))
                        full.path_size = UInt32(p.count)
                        full.offsets = UInt64(UInt(bitPattern: o.baseAddress))
                        full.ref_ctr_offsets = UInt64(UInt(bitPattern: r.baseAddress))
                        full.cookies = UInt64(UInt(bitPattern: c.baseAddress))
                        full.count = UInt32(o.count)
                        _ = try Syscall.run("bpf(BPF_OBJ_GET_INFO_BY_FD link)") { CUprobeSys_link_info(fd.rawValue, &full) }
                    }
                }
            }
        }
        let n = min(count, Int(full.count))
        let name = path.withUnsafeBufferPointer { buf in
            String(decoding: buf.prefix(while: { $0 != 0 }).map { UInt8(bitPattern: $0) }, as: UTF8.self)
        }
        return UprobeMultiLinkInfo(id: full.id, programID: full.prog_id, path: name,
                                   offsets: Array(offsets.prefix(n)), refCtrOffsets: Array(refs.prefix(n)),
                                   cookies: Array(cookies.prefix(n)),
                                   retprobe: full.flags & CUPROBESYS_BPF_F_UPROBE_MULTI_RETURN != 0,
                                   pid: Int32(bitPattern: full.pid))
    }
}

/// What a map was created with; a pinned map is adopted only if it has the shape asked for.
public struct MapShape: Equatable, Sendable, CustomStringConvertible {
    public var type: UInt32
    public var keySize: UInt32
    public var valueSize: UInt32
    public var maxEntries: UInt32
    public var flags: UInt32

    public var description: String {
        "type \(type), key \(keySize) B, value \(valueSize) B, \(maxEntries) entries, flags \(flags)"
    }
}

/// A uprobe_multi link as the kernel describes it (BPF_OBJ_GET_INFO_BY_FD).
public struct UprobeMultiLinkInfo: Sendable {
    public var id: UInt32
    public var programID: UInt32
    /// The probed file's path now (d_path: " (deleted)" appended once it was unlinked).
    public var path: String
    public var offsets: [UInt64]
    public var refCtrOffsets: [UInt64]
    public var cookies: [UInt64]
    public var retprobe: Bool
    /// The pid filter (0: every process), in uprobed's pid namespace.
    public var pid: Int32
}
