import ArgumentParser
#if canImport(Glibc)
import Glibc
#endif

/// uprobectl's exit statuses, in one place: `--help` documents them (see `UprobeCtl`) and
/// scripts branch on them, so a value is never reused for something else.
enum ExitStatus {
    static let ok: Int32 = 0
    /// The daemon answered and refused the request (its error code is printed).
    static let refused: Int32 = 1
    /// The command line is wrong (unknown option, bad value, bad probe spelling).
    static let usage: Int32 = 2
    /// The daemon could not be reached, or the connection broke before the reply.
    static let unreachable: Int32 = 3
    /// `diff`: the set file differs from the set the daemon holds (like kubectl diff's 1, which
    /// here already means a refusal).
    static let differs: Int32 = 4

    static let helpText = """
        EXIT STATUS:
          0  success
          1  the daemon refused the request (the message ends with its error code)
          2  bad usage: unknown option, bad value or bad probe spelling
          3  the daemon is unreachable: not running, wrong socket, no permission,
             or the connection broke
          4  diff: the set file differs from what the daemon holds
        """
}

/// A failure that ends the command with a message and an exit status.
struct CtlError: Error, CustomStringConvertible {
    var message: String
    var status: Int32
    var description: String { message }

    static func refused(_ message: String) -> CtlError { CtlError(message: message, status: ExitStatus.refused) }
    static func usage(_ message: String) -> CtlError { CtlError(message: message, status: ExitStatus.usage) }
    static func unreachable(_ message: String) -> CtlError { CtlError(message: message, status: ExitStatus.unreachable) }
}

enum Stderr {
    /// write(2) on fd 2: no shared FILE* state, so it is safe from any context.
    static func write(_ s: String) {
        var bytes = Array(s.utf8)[...]
        while !bytes.isEmpty {
            let n = bytes.withUnsafeBytes { Glibc.write(2, $0.baseAddress, $0.count) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { return }
            bytes = bytes.dropFirst(n)
        }
    }

    static func warning(_ s: String) { write("uprobectl: warning: \(s)\n") }
}

/// The entry point: ArgumentParser's parse and run, with uprobectl's exit statuses. Bad usage
/// exits 2 (ArgumentParser alone would exit EX_USAGE, 64) so that 0–3 are all a script needs.
enum Main {
    static func run(_ arguments: [String]) -> Never {
        // Start with no signal blocked: a mask inherited from the parent (a thread pool of a
        // test runner or a service manager blocks most signals) would make Ctrl-C and kill
        // ineffective against `watch`. Ignored signals (nohup) stay ignored.
        var none = sigset_t()
        sigemptyset(&none)
        _ = sigprocmask(SIG_SETMASK, &none, nil)
        do {
            var command = try UprobeCtl.parseAsRoot(arguments)
            try command.run()
            flushStdout()
            exit(ExitStatus.ok)
        } catch let error as CtlError {
            flushStdout()
            if !error.message.isEmpty { Stderr.write("uprobectl: error: \(error.message)\n") }
            exit(error.status)
        } catch {
            flushStdout()
            if UprobeCtl.exitCode(for: error) == .validationFailure {
                Stderr.write(UprobeCtl.fullMessage(for: error) + "\n")
                exit(ExitStatus.usage)
            }
            UprobeCtl.exit(withError: error)
        }
    }
}

/// fflush(NULL) flushes every output stream; naming `stdout` (a C global var) is not allowed under
/// strict concurrency, and stdout is the only stream uprobectl buffers.
func flushStdout() { fflush(nil) }
