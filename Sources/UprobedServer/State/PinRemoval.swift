import Logging
import UprobeKernel
#if canImport(Glibc)
import Glibc
#endif

/// `uprobed --remove-pins`: the operator's way to take every probe out of the kernel. Removing
/// a link's pin drops its last reference (no daemon holds it), so the kernel detaches it; the
/// maps and the program go with their pins. Refused while a daemon holds the directory.
public enum PinRemoval {
    public static func run(config: DaemonConfig, logger: Logger) throws -> String {
        guard !config.pinDir.isEmpty else { return "pin_dir is empty: nothing is pinned" }
        let dir = config.pinDir
        var st = stat()
        guard stat(dir, &st) == 0 else { return "no pins: \(dir) does not exist" }
        // Taking the daemon's lock proves no uprobed uses the directory now.
        let holder = try PinDirectory(path: dir)
        let removed = try PinDirectory.removeAll(at: holder.path)
        logger.notice("removed every pin; their probes are detached", metadata: ["pin_dir": "\(dir)", "pins": "\(removed)"])
        return "removed \(removed) pins under \(dir); their probes are detached"
    }
}
