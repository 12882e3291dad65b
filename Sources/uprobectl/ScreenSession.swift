import CTerminal
import UprobeSystem
#if canImport(Glibc)
import Glibc
#endif

/// The full-screen session of `top`: keyboard in non-canonical mode without echo, the
/// alternate screen (the shell's screen comes back untouched on exit), hidden cursor, and the
/// signals that must not leave the terminal in that state delivered through a signalfd.
///
/// ISIG stays on, so Ctrl-C still sends SIGINT and Ctrl-Z SIGTSTP; both arrive on the
/// signalfd (they are blocked), and `restore()` runs before the process exits or stops.
final class ScreenSession {
    private var saved = termios()
    private var rawActive = false
    private var screenActive = false
    let input: Int32 = 0
    let output: Int32 = 1
    /// False when stdin is not a terminal: then there are no keys to read.
    let keyboard: Bool
    let signalFD: Int32
    private var blocked = sigset_t()

    init() throws(CtlError) {
        keyboard = isatty(0) == 1
        sigemptyset(&blocked)
        for s in [SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGWINCH, SIGTSTP] { sigaddset(&blocked, s) }
        // Blocked before any thread exists (uprobectl starts none), so they queue for the signalfd.
        guard sigprocmask(SIG_BLOCK, &blocked, nil) == 0 else {
            throw .unreachable(Syscall.lastError("sigprocmask").description)
        }
        let fd = signalfd(-1, &blocked, Int32(SFD_CLOEXEC | SFD_NONBLOCK))
        guard fd >= 0 else { throw .unreachable(Syscall.lastError("signalfd").description) }
        signalFD = fd
    }

    deinit {
        restore()
        close(signalFD)
        _ = sigprocmask(SIG_UNBLOCK, &blocked, nil)
    }

    /// Raw keyboard, alternate screen, hidden cursor.
    func enter() {
        if keyboard && !rawActive, tcgetattr(input, &saved) == 0 {
            var t = saved
            // Non-canonical, no echo: keys arrive one by one and do not print over the view.
            t.c_lflag &= ~tcflag_t(ICANON | ECHO)
            t.c_iflag &= ~tcflag_t(IXON | ICRNL)
            // VMIN/VTIME: read(2) returns what is there; poll(2) does the waiting.
            withUnsafeMutableBytes(of: &t.c_cc) { cc in
                cc[Int(VMIN)] = 0
                cc[Int(VTIME)] = 0
            }
            if tcsetattr(input, TCSAFLUSH, &t) == 0 { rawActive = true }
        }
        if !screenActive {
            writeAll(output, Terminal.Escape.alternateScreenOn + Terminal.Escape.hideCursor)
            screenActive = true
        }
    }

    /// Puts the terminal back as it was; safe to call more than once.
    func restore() {
        if screenActive {
            writeAll(output, Terminal.Escape.reset + Terminal.Escape.showCursor + Terminal.Escape.alternateScreenOff)
            screenActive = false
        }
        if rawActive {
            _ = tcsetattr(input, TCSAFLUSH, &saved)
            rawActive = false
        }
    }

    enum Event: Equatable {
        case key(UInt8)
        case resized
        case quit
        case suspend
        case timeout
    }

    /// Waits up to `timeout` seconds for keys or signals.
    func wait(timeout: Double) -> [Event] {
        var fds = [pollfd(fd: signalFD, events: Int16(POLLIN), revents: 0)]
        if keyboard { fds.append(pollfd(fd: input, events: Int16(POLLIN), revents: 0)) }
        let ms = Int32(max(0, min(timeout, 3600)) * 1000)
        let n = poll(&fds, nfds_t(fds.count), ms)
        if n <= 0 { return [.timeout] }
        var events: [Event] = []
        if fds[0].revents & Int16(POLLIN) != 0 {
            var info = signalfd_siginfo()
            while read(signalFD, &info, MemoryLayout<signalfd_siginfo>.size) == MemoryLayout<signalfd_siginfo>.size {
                switch Int32(info.ssi_signo) {
                case SIGWINCH: events.append(.resized)
                case SIGTSTP: events.append(.suspend)
                default: events.append(.quit)
                }
            }
        }
        if keyboard, fds[1].revents & Int16(POLLIN | POLLHUP | POLLERR) != 0 {
            var buf = [UInt8](repeating: 0, count: 64)
            let got = buf.withUnsafeMutableBytes { read(input, $0.baseAddress, $0.count) }
            if got > 0 {
                var i = 0
                while i < got {
                    // An escape sequence (arrow keys, ...) is not a command: skip the rest of it.
                    if buf[i] == 0x1B { break }
                    events.append(.key(buf[i]))
                    i += 1
                }
            } else if got == 0 {
                // End of input on a terminal that hung up.
                events.append(.quit)
            }
        }
        return events.isEmpty ? [.timeout] : events
    }

    /// Ctrl-Z: give the terminal back, stop, and take it again when continued (`fg`).
    func suspend() {
        restore()
        // SIGTSTP is blocked (it brought us here); SIGSTOP cannot be, and stops us now.
        kill(getpid(), SIGSTOP)
        enter()
    }
}
