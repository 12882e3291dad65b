/// The release of uprobed and uprobectl: `uprobed --version`, `uprobectl --version`, and the
/// `version` that `status` reports. One constant, so the three cannot disagree.
public enum UprobedVersion {
    public static let current = "0.1.0"
}
