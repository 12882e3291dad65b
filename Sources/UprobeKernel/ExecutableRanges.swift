import SystemPackage

/// File ranges of a binary's executable PT_LOAD segments, for the attach pre-check.
///
/// The kernel accepts a uprobe at any file offset below i_size: an offset outside every
/// executable mapping is registered "successfully" and simply never fires (uprobes are only
/// installed in VM_EXEC mappings). To give a clear error instead, `attach` checks offsets of
/// ELF64 little-endian files against their PF_X segments. This reads only the ELF and program
/// headers (pread(2)); full symbol work is UprobeELF's business. Non-ELF64 files are not checked.
enum ExecutableRanges {
    /// The [start, end) file ranges of PF_X PT_LOAD segments, or nil if `path` is not an
    /// ELF64 little-endian file (or cannot be read).
    static func of(path: String) -> [Range<UInt64>]? {
        // Non-blocking: a path swapped for a FIFO must not hold the thread that attaches.
        guard let fd = try? FileDescriptor.open(FilePath(path), .readOnly, options: [.closeOnExec, .nonBlocking]) else { return nil }
        defer { try? fd.close() }
        var header = [UInt8](repeating: 0, count: 64)
        guard read(fd, into: &header, at: 0) == 64,
              header[0] == 0x7f, header[1] == 0x45, header[2] == 0x4c, header[3] == 0x46,
              header[4] == 2 /* ELFCLASS64 */, header[5] == 1 /* ELFDATA2LSB */ else { return nil }
        let phoff = le(header, 32, 8)
        let phentsize = le(header, 54, 2)
        let phnum = le(header, 56, 2)
        guard phentsize >= 56, phnum > 0, phnum < 0xffff, phoff > 0 else { return nil }
        var table = [UInt8](repeating: 0, count: Int(phentsize * phnum))
        guard read(fd, into: &table, at: phoff) == table.count else { return nil }
        var ranges: [Range<UInt64>] = []
        for i in 0..<Int(phnum) {
            let base = i * Int(phentsize)
            let type = le(table, base, 4), flags = le(table, base + 4, 4)
            guard type == 1 /* PT_LOAD */, flags & 1 /* PF_X */ != 0 else { continue }
            let offset = le(table, base + 8, 8), filesz = le(table, base + 32, 8)
            let (end, overflow) = offset.addingReportingOverflow(filesz)
            if !overflow { ranges.append(offset..<end) }
        }
        return ranges
    }

    private static func le(_ bytes: [UInt8], _ at: Int, _ size: Int) -> UInt64 {
        var v: UInt64 = 0
        for i in (0..<size).reversed() { v = (v << 8) | UInt64(bytes[at + i]) }
        return v
    }

    private static func read(_ fd: FileDescriptor, into buffer: inout [UInt8], at offset: UInt64) -> Int {
        guard offset <= UInt64(Int64.max) else { return -1 }
        return (try? buffer.withUnsafeMutableBytes {
            try fd.read(fromAbsoluteOffset: Int64(offset), into: $0, retryOnInterrupt: true)
        }) ?? -1
    }
}
