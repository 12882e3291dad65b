import ArgumentParser
import UprobedProtocol

/// `uprobectl`: a client of uprobed's JSON-lines socket.
struct UprobeCtl: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "uprobectl",
        abstract: "Register, list and read user-space probes owned by uprobed.",
        discussion: """
            PROBE spellings: PATH:SYMBOL, PATH:0xOFFSET, or bpftrace's uprobe:PATH:SYMBOL, \
            uretprobe:PATH:SYMBOL, usdt:PATH:PROVIDER:NAME. PATH may be a library name (libc).
            SYMBOL may be a glob (f*), which registers one probe per matching function.
            A probe set is a YAML file listing such spellings under 'probes:' (as in uprobed's \
            probes_dir); apply -f FILE makes the daemon's set match it, diff -f FILE shows how.

            The socket is --socket, else $UPROBED_SOCKET, else /run/uprobed/uprobed.sock. \
            --socket and --json go before or after the command.

            \(ExitStatus.helpText)
            """,
        version: UprobedVersion.current,
        subcommands: [Add.self, Remove.self, List.self, Stats.self, Top.self, Watch.self, Status.self, Resolve.self,
                      Apply.self, Diff.self])

    @OptionGroup var global: GlobalOptions
}
