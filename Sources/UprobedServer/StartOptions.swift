import Logging

/// How the daemon was started, beyond the config file: what a reload must re-read and re-apply.
public struct StartOptions: Sendable {
    /// The config file given with --config (nil: the default path if it exists).
    public var configPath: String?
    /// Command-line flags that override the file (applied again after every reload).
    public var overrides: @Sendable (inout DaemonConfig) -> Void
    /// Move corrupt or incomplete state files aside and start empty instead of refusing to start.
    public var moveCorruptState: Bool
    /// The log level every handler follows.
    public var logLevel: LogLevelCell

    public init(configPath: String? = nil, overrides: @escaping @Sendable (inout DaemonConfig) -> Void = { _ in },
                moveCorruptState: Bool = false, logLevel: LogLevelCell = .shared) {
        self.configPath = configPath
        self.overrides = overrides
        self.moveCorruptState = moveCorruptState
        self.logLevel = logLevel
    }
}
