import UprobedProtocol
import UprobeSystem
#if canImport(Glibc)
import Glibc
#endif

/// Largest request the CLI sends when it splits work (`add -f`, `rm --all`): the daemon's
/// default `max_probes_per_request`. Each request is atomic; a split operation is not.
let requestChunk = 10_000

/// Command-line probe spellings to wire specs; a bad spelling is bad usage (exit status 2).
func parseSpecs(_ spellings: [String], pid: Int32?, retprobe: Bool = false, force: Bool = false) throws(CtlError) -> [ProbeSpec] {
    var out: [ProbeSpec] = []
    out.reserveCapacity(spellings.count)
    for text in spellings {
        do throws(ProtocolError) {
            var spec = try ProbeSpec(cliSpelling: text)
            spec.path = absolutePath(spec.path)
            if let pid { spec.pid = pid }
            if retprobe { spec.retprobe = true }
            if force { spec.force = true }
            out.append(spec)
        } catch {
            throw .usage(error.message)
        }
    }
    return out
}

/// The daemon runs elsewhere: a relative path (one with a '/') is made absolute here.
/// A bare name ("libc") is a library name and stays as it is.
func absolutePath(_ path: String) -> String {
    guard !path.hasPrefix("/"), path.contains("/") else { return path }
    var buf = [CChar](repeating: 0, count: Int(PATH_MAX) + 1)
    guard getcwd(&buf, buf.count) != nil else { return path }
    let cwd = String(decoding: buf.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    return (cwd == "/" ? "" : cwd) + "/" + (path.hasPrefix("./") ? String(path.dropFirst(2)) : path)
}

/// The words of a file or of stdin (`-`), one item per line; blank lines and `#` comments are
/// skipped. For `add -f` (probe spellings) and `rm -f` (ids).
func readItems(from file: String) throws(CtlError) -> [String] {
    let data = try readAll(from: file)
    return String(decoding: data, as: UTF8.self).split(separator: "\n").compactMap { line in
        let item = line.trimmingBlanks()
        return item.isEmpty || item.hasPrefix("#") ? nil : item
    }
}

/// The bytes of a file or of stdin (`-`); a failure is bad usage, naming the file.
func readAll(from file: String) throws(CtlError) -> [UInt8] {
    let fd: Int32 = file == "-" ? 0 : open(file, O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { throw .usage("cannot \(Syscall.lastError("read", file))") }
    defer { if fd != 0 { close(fd) } }
    var data: [UInt8] = []
    var chunk = [UInt8](repeating: 0, count: 65536)
    while true {
        let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        if n < 0 && errno == EINTR { continue }
        if n < 0 { throw .usage("cannot \(Syscall.lastError("read", file))") }
        if n == 0 { break }
        data.append(contentsOf: chunk[0..<n])
    }
    return data
}

extension Substring {
    func trimmingBlanks() -> String {
        let blank: (Character) -> Bool = { $0 == " " || $0 == "\t" || $0 == "\r" }
        return String(drop(while: blank).reversed().drop(while: blank).reversed())
    }
}

/// `array` in consecutive pieces of at most `size`.
func chunked<T>(_ array: [T], _ size: Int) -> [ArraySlice<T>] {
    stride(from: 0, to: array.count, by: size).map { array[$0..<min($0 + size, array.count)] }
}

/// A JSON value as a table cell.
func text(_ v: JSONValue?) -> String {
    switch v {
    case .string(let s)?: return s
    case .int(let i)?: return String(i)
    case .double(let d)?: return String(d)
    case .bool(let b)?: return String(b)
    case nil, .null?: return "-"
    case let other?: return JSONSerializer.serialize(other)
    }
}

func hex(_ v: JSONValue?) -> String {
    guard let i = v?.int64Value else { return "-" }
    return "0x" + String(i, radix: 16)
}

/// Prints a table (no width limit: these commands are read in full or piped).
func printTable(_ header: [String], _ rows: [[String]]) {
    var t = Table(header.map { Table.Column(title: $0) })
    t.rows = rows
    for line in t.render() { print(line) }
}

/// The functions a glob left out (their first instruction cannot be probed), on stderr.
func reportSkipped(_ reply: JSONObject) {
    guard let skipped = reply["skipped"]?.arrayValue, !skipped.isEmpty else { return }
    Stderr.write("uprobectl: skipped \(skipped.count) function(s) whose first instruction cannot be probed:\n")
    for s in skipped {
        let o = s.objectValue ?? JSONObject()
        Stderr.write("  \(text(o["symbol"])) \(hex(o["offset"])): \(text(o["reason"]))\n")
    }
}
